//! What a test needs beyond a Rust toolchain, and what happens when it is missing.
//!
//! A test that needs an external program says so twice: by name (its path contains
//! `needs_nats`, `needs_clickhouse`, `needs_chdb`, `needs_chromium` or `needs_schemathesis`) and by calling
//! [`require!`] first. A
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
    /// A `clickhouse-server` binary the test starts itself (`TALLY_TEST_CLICKHOUSE_SERVER`,
    /// PATH, /usr/sbin): a running server's URL is not enough, e.g. for a sharded cluster.
    ClickHouseServer,
    /// Python 3 with the `chdb` module (current ClickHouse in-process).
    Chdb,
    /// Python 3 with `pyarrow`, the reference reader the export tests parse Parquet with.
    Pyarrow,
    /// Headless Chromium and its WebDriver, `chromedriver` (Debian: `chromium`,
    /// `chromium-driver`): `TALLY_TEST_CHROMIUM` and `TALLY_TEST_CHROMEDRIVER`, or on PATH.
    Chromium,
    /// Prometheus's `promtool` (Debian: `prometheus`): `TALLY_TEST_PROMTOOL`, or on PATH.
    Promtool,
    /// `docker-compose` (Debian's or PyPI's) or `docker compose`, to check the compose file:
    /// `TALLY_TEST_DOCKER_COMPOSE`, or `docker-compose` on PATH.
    DockerCompose,
    /// Python 3 with schemathesis (`python3 -m pip install schemathesis`), to test the
    /// OpenAPI document against a running server.
    Schemathesis,
}

/// Environment variable naming `promtool`.
pub const PROMTOOL_ENV: &str = "TALLY_TEST_PROMTOOL";
/// Environment variable naming `docker-compose`.
pub const DOCKER_COMPOSE_ENV: &str = "TALLY_TEST_DOCKER_COMPOSE";

/// The `promtool` the tests run, if there is one.
pub fn promtool_binary() -> Option<PathBuf> {
    binary(PROMTOOL_ENV, &["promtool"])
}

/// The `docker-compose` the tests run, if there is one.
pub fn docker_compose_binary() -> Option<PathBuf> {
    binary(DOCKER_COMPOSE_ENV, &["docker-compose"])
}

/// Environment variable naming the Chromium binary the browser tests drive.
pub const CHROMIUM_ENV: &str = "TALLY_TEST_CHROMIUM";
/// Environment variable naming the `chromedriver` binary.
pub const CHROMEDRIVER_ENV: &str = "TALLY_TEST_CHROMEDRIVER";

/// The Chromium the browser tests start, if there is one: `TALLY_TEST_CHROMIUM`, else the
/// first of `chromium`, `chromium-browser`, `google-chrome` on PATH.
pub fn chromium_binary() -> Option<PathBuf> {
    binary(
        CHROMIUM_ENV,
        &["chromium", "chromium-browser", "google-chrome"],
    )
}

/// The `chromedriver` the browser tests start, if there is one.
pub fn chromedriver_binary() -> Option<PathBuf> {
    binary(CHROMEDRIVER_ENV, &["chromedriver"])
}

fn binary(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

impl Need {
    fn describe(self) -> &'static str {
        match self {
            Need::NatsServer => "nats-server (set TALLY_TEST_NATS_SERVER or put it on PATH)",
            Need::ClickHouse => {
                "clickhouse-server (set TALLY_TEST_CLICKHOUSE_URL or TALLY_TEST_CLICKHOUSE_SERVER, or install it)"
            }
            Need::ClickHouseServer => {
                "clickhouse-server (set TALLY_TEST_CLICKHOUSE_SERVER, or install it)"
            }
            Need::Chdb => "python3 with chdb (python3 -m pip install chdb)",
            Need::Pyarrow => "python3 with pyarrow (python3 -m pip install pyarrow)",
            Need::Chromium => {
                "chromium and chromedriver (apt-get install chromium chromium-driver, or set TALLY_TEST_CHROMIUM and TALLY_TEST_CHROMEDRIVER)"
            }
            Need::Promtool => "promtool (apt-get install prometheus, or set TALLY_TEST_PROMTOOL)",
            Need::DockerCompose => {
                "docker-compose (apt-get install docker-compose, or set TALLY_TEST_DOCKER_COMPOSE)"
            }
            Need::Schemathesis => "python3 with schemathesis (python3 -m pip install schemathesis)",
        }
    }

    /// Whether this machine has it (looked up once per process).
    pub fn present(self) -> bool {
        static NATS: OnceLock<bool> = OnceLock::new();
        static CLICKHOUSE: OnceLock<bool> = OnceLock::new();
        static CLICKHOUSE_SERVER: OnceLock<bool> = OnceLock::new();
        static CHDB: OnceLock<bool> = OnceLock::new();
        static PYARROW: OnceLock<bool> = OnceLock::new();
        static CHROMIUM: OnceLock<bool> = OnceLock::new();
        static PROMTOOL: OnceLock<bool> = OnceLock::new();
        static DOCKER_COMPOSE: OnceLock<bool> = OnceLock::new();
        static SCHEMATHESIS: OnceLock<bool> = OnceLock::new();
        match self {
            Need::NatsServer => *NATS.get_or_init(|| runs(&nats_server_binary(), &["--version"])),
            Need::ClickHouse => *CLICKHOUSE.get_or_init(|| {
                std::env::var_os(CLICKHOUSE_URL_ENV).is_some_and(|url| !url.is_empty())
                    || clickhouse_server_binary().is_some()
            }),
            Need::ClickHouseServer => {
                *CLICKHOUSE_SERVER.get_or_init(|| clickhouse_server_binary().is_some())
            }
            Need::Chdb => *CHDB.get_or_init(|| runs(Path::new("python3"), &["-c", "import chdb"])),
            Need::Pyarrow => {
                *PYARROW.get_or_init(|| runs(Path::new("python3"), &["-c", "import pyarrow"]))
            }
            Need::Chromium => *CHROMIUM.get_or_init(|| {
                chromium_binary().is_some()
                    && chromedriver_binary().is_some_and(|driver| runs(&driver, &["--version"]))
            }),
            Need::Promtool => *PROMTOOL
                .get_or_init(|| promtool_binary().is_some_and(|tool| runs(&tool, &["--version"]))),
            Need::DockerCompose => *DOCKER_COMPOSE.get_or_init(|| {
                docker_compose_binary().is_some_and(|tool| runs(&tool, &["version"]))
            }),
            Need::Schemathesis => *SCHEMATHESIS.get_or_init(|| {
                runs(
                    Path::new("python3"),
                    &["-m", "schemathesis.cli", "--version"],
                )
            }),
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
