//! What a test needs beyond a Rust toolchain, and what happens when it is missing.
//!
//! A test that needs an external program says so twice: by name (its path contains
//! `needs_nats`, `needs_clickhouse` or `needs_chdb`) and by calling [`require!`] first. A
//! bare `cargo test` on a machine without the program skips it with a line on stderr (written
//! past the test harness's capture, so it shows) and the test passes; with
//! `TALLY_TEST_REQUIRE_ALL=1`, which `scripts/test` and so CI set, a missing program fails
//! the test instead, so nothing is silently skipped there.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::{CLICKHOUSE_SERVER_ENV, CLICKHOUSE_URL_ENV, NATS_SERVER_ENV};

/// Set (to anything but `0` or empty) by `scripts/test`: every test must run.
pub const REQUIRE_ALL_ENV: &str = "TALLY_TEST_REQUIRE_ALL";

/// An external program a test needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A `nats-server` with JetStream: `TALLY_TEST_NATS_SERVER`, or `nats-server` on PATH.
    NatsServer,
    /// A ClickHouse server: `TALLY_TEST_CLICKHOUSE_URL` of a running one, or a
    /// `clickhouse-server` to start (`TALLY_TEST_CLICKHOUSE_SERVER`, PATH, /usr/sbin).
    ClickHouse,
    /// Python 3 with the `chdb` module (current ClickHouse in-process).
    Chdb,
}

impl Need {
    fn describe(self) -> &'static str {
        match self {
            Need::NatsServer => "nats-server (set TALLY_TEST_NATS_SERVER or put it on PATH)",
            Need::ClickHouse => {
                "clickhouse-server (set TALLY_TEST_CLICKHOUSE_URL or TALLY_TEST_CLICKHOUSE_SERVER, or install it)"
            }
            Need::Chdb => "python3 with chdb (python3 -m pip install chdb)",
        }
    }

    /// Whether this machine has it (looked up once per process).
    pub fn present(self) -> bool {
        static NATS: OnceLock<bool> = OnceLock::new();
        static CLICKHOUSE: OnceLock<bool> = OnceLock::new();
        static CHDB: OnceLock<bool> = OnceLock::new();
        match self {
            Need::NatsServer => *NATS.get_or_init(|| runs(&nats_server_binary(), &["--version"])),
            Need::ClickHouse => *CLICKHOUSE.get_or_init(|| {
                std::env::var_os(CLICKHOUSE_URL_ENV).is_some_and(|url| !url.is_empty())
                    || clickhouse_server_binary().is_some()
            }),
            Need::Chdb => *CHDB.get_or_init(|| runs(Path::new("python3"), &["-c", "import chdb"])),
        }
    }
}

/// The `nats-server` the tests start.
pub(crate) fn nats_server_binary() -> PathBuf {
    std::env::var_os(NATS_SERVER_ENV)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

/// The `clickhouse-server` the tests may start, if there is one.
pub(crate) fn clickhouse_server_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(CLICKHOUSE_SERVER_ENV).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("clickhouse-server"))
        .find(|candidate| candidate.is_file())
}

fn runs(program: &Path, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn require_all() -> bool {
    std::env::var(REQUIRE_ALL_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// True when the running test may go on; false after reporting a skip. Panics (failing the
/// test) when `need` is missing under [`REQUIRE_ALL_ENV`]. Use through [`require!`].
pub fn check(needs: &[Need]) -> bool {
    let missing: Vec<Need> = needs.iter().copied().filter(|n| !n.present()).collect();
    if missing.is_empty() {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    let what: Vec<&str> = missing.iter().map(|n| n.describe()).collect();
    if require_all() {
        panic!(
            "{test} needs {} and {REQUIRE_ALL_ENV} forbids skipping it",
            what.join(", ")
        );
    }
    // Straight to the process's stderr: the harness captures only print!/eprint!.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs {}",
        what.join(", ")
    );
    false
}

/// What a skipped test returns: `()` or `Ok(())`.
pub trait Skipped {
    fn skipped() -> Self;
}

impl Skipped for () {
    fn skipped() {}
}

impl<E> Skipped for Result<(), E> {
    fn skipped() -> Self {
        Ok(())
    }
}

/// Returns from the enclosing test (skipping it) unless every named need is present:
/// `require!(NatsServer, ClickHouse);`. See the module documentation.
#[macro_export]
macro_rules! require {
    ($($need:ident),+ $(,)?) => {
        if !$crate::needs::check(&[$($crate::needs::Need::$need),+]) {
            return $crate::needs::Skipped::skipped();
        }
    };
}
