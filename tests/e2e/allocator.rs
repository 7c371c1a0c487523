//! The binary runs with its allocator's settings (see `allocator_settings` in
//! `src/main.rs`): set when the environment lacks them, kept when it has them. Linux only:
//! the tests read a process's environment from `/proc`.

use std::time::{Duration, Instant};

/// The environment of a running `tally standalone` started with `env`, as its process
/// shows it a second after it holds `wait_for` (by then it has run itself again if it was
/// going to).
fn environment_of_a_server(env: &[(&str, &str)], wait_for: &str) -> String {
    let dir = std::env::temp_dir().join(tally_testkit::unique_name("allocator"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["standalone", "--listen", "127.0.0.1:0"])
        .env("TALLY_ADMIN_KEYS", "allocator-admin-key-0123456789")
        .env("TALLY_DATA_DIR", &dir)
        .env_remove("MIMALLOC_ARENA_EAGER_COMMIT")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run tally");
    let path = format!("/proc/{}/environ", child.id());
    let deadline = Instant::now() + Duration::from_secs(20);
    let read = || {
        std::fs::read(&path)
            .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', "\n"))
            .unwrap_or_default()
    };
    while Instant::now() < deadline && !read().lines().any(|line| line == wait_for) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    let seen = read();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    seen
}

#[test]
fn the_server_runs_with_its_allocator_settings() {
    let seen = environment_of_a_server(&[], "MIMALLOC_ARENA_EAGER_COMMIT=0");
    let lines: Vec<&str> = seen.lines().collect();
    assert!(lines.contains(&"MIMALLOC_ARENA_EAGER_COMMIT=0"), "{seen}");
    assert!(
        lines.contains(&"TALLY_ADMIN_KEYS=allocator-admin-key-0123456789"),
        "the rest of the environment is kept: {seen}"
    );
}

#[test]
fn allocator_settings_in_the_environment_are_kept() {
    let seen = environment_of_a_server(
        &[("MIMALLOC_ARENA_EAGER_COMMIT", "2")],
        "TALLY_ADMIN_KEYS=allocator-admin-key-0123456789",
    );
    let lines: Vec<&str> = seen.lines().collect();
    assert!(lines.contains(&"MIMALLOC_ARENA_EAGER_COMMIT=2"), "{seen}");
    assert!(!lines.contains(&"MIMALLOC_ARENA_EAGER_COMMIT=0"), "{seen}");
}
