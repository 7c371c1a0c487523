//! The command line of `tally-loadgen`, run as a process (which also makes a workspace test
//! run build the binary the end-to-end tests drive).

use std::process::Command;

#[test]
fn refuses_a_bad_segment_mix_naming_it() {
    let output = Command::new(env!("CARGO_BIN_EXE_tally-loadgen"))
        .args(["--admin-key", "k", "--segment-mix", "country"])
        .output()
        .expect("run tally-loadgen");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--segment-mix"), "{stderr}");
}

#[test]
fn lists_its_baselines() {
    let output = Command::new(env!("CARGO_BIN_EXE_tally-loadgen"))
        .arg("--help")
        .output()
        .expect("run tally-loadgen");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        help.contains("bench-publish") && help.contains("bench-log-append"),
        "{help}"
    );
}
