//! The command line of `tally-loadgen`, run as a process (`scripts/bench` drives it so).

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

#[test]
fn a_baseline_needs_none_of_the_loads_arguments() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bench-log-append-{}", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_tally-loadgen"))
        .args(["bench-log-append", "--votes", "10", "--data-dir"])
        .arg(&dir)
        .env_remove("TALLY_ADMIN_KEY")
        .output()
        .expect("run tally-loadgen");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(r#""votes": 10"#), "{stdout}");
}
