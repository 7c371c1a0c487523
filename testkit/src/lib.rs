//! Test support for tally: starts private `nats-server` and `clickhouse-server`
//! processes on free 127.0.0.1 ports with their data in temporary directories,
//! so integration tests never touch a shared broker or database. A
//! [`NatsServer`] belongs to one test and can be SIGKILLed and restarted on the
//! same port and store directory; [`clickhouse()`] hands every test in the
//! process the same server (the one named by `TALLY_TEST_CLICKHOUSE_URL`, as
//! `scripts/test` provides, or else one started on first use) and tests keep
//! apart by working in their own database named with [`unique_name`].
//! [`wait_until`] polls a condition with a deadline and a useful error.

use std::collections::hash_map::RandomState;
use std::ffi::OsString;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};

pub mod needs;

pub use needs::Need;

/// Environment variable naming the `nats-server` binary; `nats-server` on `PATH` otherwise.
pub const NATS_SERVER_ENV: &str = "TALLY_TEST_NATS_SERVER";
/// Environment variable with the base URL of an already running ClickHouse HTTP interface.
pub const CLICKHOUSE_URL_ENV: &str = "TALLY_TEST_CLICKHOUSE_URL";
/// Environment variable naming the `clickhouse-server` binary; `clickhouse-server` otherwise.
pub const CLICKHOUSE_SERVER_ENV: &str = "TALLY_TEST_CLICKHOUSE_SERVER";

/// Server configuration template shared with `scripts/test`.
const CLICKHOUSE_CONFIG: &str = include_str!("../../scripts/clickhouse/config.xml");
/// Users, profiles and quotas, read by the server from next to the config file.
const CLICKHOUSE_USERS: &str = include_str!("../../scripts/clickhouse/users.xml");

const NATS_READY_DEADLINE: Duration = Duration::from_secs(10);
const CLICKHOUSE_READY_DEADLINE: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is found by binding port 0 and reading what the kernel picked;
/// the listener is closed again before returning.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("binding 127.0.0.1:0 to find a free port")
}

/// Returns `prefix` followed by `_` and a short random suffix.
///
/// The result only contains `[a-z0-9_]` (other characters of `prefix` are
/// lowercased or replaced by `_`) and can be used unquoted as a ClickHouse
/// database name, a NATS stream name or a subject token.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut name: String = prefix
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
        name.insert(0, 't');
    }

    // RandomState is seeded randomly per process; mixing in time, pid and a
    // counter keeps names apart within and across test processes.
    let mut hasher = RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut bits = hasher.finish();

    const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    name.push('_');
    for _ in 0..10 {
        name.push(ALPHABET[(bits % 36) as usize] as char);
        bits /= 36;
    }
    name
}

/// Polls `f` every 50 ms until it returns `Ok(true)`.
///
/// `Ok(false)` and `Err(_)` both mean "not yet". When `deadline` has passed
/// the error names `what` and carries the last error `f` returned, if any.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let started = Instant::now();
    let mut last_error: Option<anyhow::Error> = None;
    loop {
        match f().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(err) => last_error = Some(err),
        }
        if started.elapsed() >= deadline {
            return Err(match last_error {
                Some(err) => {
                    anyhow!("timed out after {deadline:?} waiting for {what}; last error: {err:#}")
                }
                None => anyhow!("timed out after {deadline:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Options for [`NatsServer::start_with`].
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// JetStream `sync_interval` (nats-server ≥ 2.10), written to a config
    /// file verbatim: a duration such as `"1s"`, or `"always"` to fsync
    /// every write.
    pub sync_interval: Option<String>,
}

/// A private `nats-server` with JetStream enabled, listening on 127.0.0.1.
///
/// The store directory and the server's log (stdout and stderr, appended
/// across restarts) live in a temporary directory that is removed on drop;
/// dropping also kills the server.
pub struct NatsServer {
    // Declared before `dir` so the process is gone before its files are removed.
    child: Option<tokio::process::Child>,
    binary: OsString,
    port: u16,
    config: Option<PathBuf>,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server on a free port and waits until it accepts TCP connections.
    pub async fn start() -> anyhow::Result<NatsServer> {
        Self::start_with(NatsOptions::default()).await
    }

    /// Like [`NatsServer::start`], with extra server options.
    pub async fn start_with(options: NatsOptions) -> anyhow::Result<NatsServer> {
        let binary = std::env::var_os(NATS_SERVER_ENV)
            .filter(|value| !value.is_empty())
            .unwrap_or_else(|| "nats-server".into());
        let dir = tempfile::Builder::new()
            .prefix("tally-nats-")
            .tempdir()
            .context("creating a temporary directory for nats-server")?;
        let store_dir = dir.path().join("store");
        std::fs::create_dir(&store_dir)
            .with_context(|| format!("creating {}", store_dir.display()))?;

        let config = match &options.sync_interval {
            None => None,
            Some(interval) => {
                let path = dir.path().join("nats-server.conf");
                // No store_dir here: nats-server rejects it next to `-sd`
                // ("Duplicate 'store_dir' configuration").
                let text = format!(
                    "jetstream {{\n  sync_interval: {}\n}}\n",
                    quote_nats(interval)
                );
                std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
                Some(path)
            }
        };

        let mut server = NatsServer {
            child: None,
            binary,
            port: free_port(),
            config,
            dir,
        };
        server.spawn().await?;
        Ok(server)
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The TCP port the server listens on; it stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory; it stays the same across restarts.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The file that receives the server's stdout and stderr.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// Kills the server with SIGKILL, like a crash, and waits for it to exit.
    /// Does nothing if it is not running.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Starts the server again on the same port with the same store
    /// directory (killing it first if it is still running) and waits until it
    /// accepts TCP connections.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        self.spawn().await
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log_path = self.log_path();
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let _ = writeln!(
            log,
            "==> tally-testkit: starting {} on port {}",
            self.binary.to_string_lossy(),
            self.port
        );
        let stderr = log.try_clone().context("duplicating the log file handle")?;

        let mut command = tokio::process::Command::new(&self.binary);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        command
            .args(["-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-js")
            .arg("-sd")
            .arg(self.store_dir())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .kill_on_drop(true);
        let child = command.spawn().with_context(|| {
            format!(
                "starting nats-server `{}` (set {NATS_SERVER_ENV} to its path)",
                self.binary.to_string_lossy()
            )
        })?;
        self.child = Some(child);

        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    bail!(
                        "nats-server `{}` exited with {status} before accepting connections \
                         on 127.0.0.1:{}; end of its log:\n{}",
                        self.binary.to_string_lossy(),
                        self.port,
                        tail(&log_path, 40)
                    );
                }
            }
            let connect = tokio::net::TcpStream::connect(("127.0.0.1", self.port));
            if let Ok(Ok(_stream)) = tokio::time::timeout(Duration::from_secs(1), connect).await {
                return Ok(());
            }
            if started.elapsed() >= NATS_READY_DEADLINE {
                self.kill().await;
                bail!(
                    "nats-server `{}` did not accept connections on 127.0.0.1:{} within {:?}; \
                     end of its log:\n{}",
                    self.binary.to_string_lossy(),
                    self.port,
                    NATS_READY_DEADLINE,
                    tail(&log_path, 40)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // kill_on_drop would only send the signal; wait briefly for the exit
        // so the temporary directory is not removed under a live server.
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(2) {
                match child.try_wait() {
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                    _ => break,
                }
            }
        }
    }
}

impl std::fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsServer")
            .field("url", &self.url())
            .field("dir", &self.dir.path())
            .field("running", &self.child.is_some())
            .finish()
    }
}

/// A ClickHouse server shared by every test of the process; see [`clickhouse()`].
#[derive(Debug, Clone)]
pub struct ClickHouse {
    /// Base URL of the HTTP interface, e.g. `http://127.0.0.1:8123` (no trailing slash).
    pub url: String,
}

impl ClickHouse {
    /// Runs one SQL statement over HTTP as the `default` user and returns
    /// the response body; a non-success status becomes an error carrying the
    /// server's message.
    pub async fn query(&self, sql: &str) -> anyhow::Result<String> {
        let response = reqwest::Client::new()
            .post(format!("{}/", self.url))
            .body(sql.to_owned())
            .send()
            .await
            .with_context(|| format!("sending query to ClickHouse at {}", self.url))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .context("reading ClickHouse response")?;
        if !status.is_success() {
            bail!("ClickHouse answered {status} to `{sql}`: {}", body.trim());
        }
        Ok(body)
    }
}

static CLICKHOUSE: tokio::sync::OnceCell<ClickHouse> = tokio::sync::OnceCell::const_new();
/// Servers started by this process; never dropped, see [`PrivateClickHouse`].
static PRIVATE_CLICKHOUSE: Mutex<Vec<PrivateClickHouse>> = Mutex::new(Vec::new());

/// Returns the ClickHouse server for this test process.
///
/// With `TALLY_TEST_CLICKHOUSE_URL` set that server is used after checking
/// that `GET /ping` answers `Ok.`. Otherwise the first call starts one private
/// `clickhouse-server` (binary from `TALLY_TEST_CLICKHOUSE_SERVER`, else
/// `clickhouse-server`) on free ports with its data in a temporary directory,
/// configured from `scripts/clickhouse/`. It outlives the tokio runtimes of
/// individual tests and is killed, and its directory removed, by a watchdog
/// shell once this process exits, however it exits.
pub async fn clickhouse() -> anyhow::Result<&'static ClickHouse> {
    CLICKHOUSE
        .get_or_try_init(|| async {
            if let Some(url) = std::env::var(CLICKHOUSE_URL_ENV)
                .ok()
                .filter(|url| !url.trim().is_empty())
            {
                let url = url.trim().trim_end_matches('/').to_owned();
                ping(&url).await.with_context(|| {
                    format!("ClickHouse from {CLICKHOUSE_URL_ENV}={url} is not answering")
                })?;
                return Ok(ClickHouse { url });
            }
            let server = PrivateClickHouse::start().await?;
            let url = server.url.clone();
            PRIVATE_CLICKHOUSE
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(server);
            Ok(ClickHouse { url })
        })
        .await
}

async fn ping(url: &str) -> anyhow::Result<()> {
    let response = reqwest::Client::new()
        .get(format!("{url}/ping"))
        .timeout(Duration::from_secs(5))
        .send()
        .await?;
    let status = response.status();
    let body = response.text().await?;
    if !status.is_success() || body.trim() != "Ok." {
        bail!("GET {url}/ping answered {status}: {:?}", body.trim());
    }
    Ok(())
}

/// Writes `config.xml` and `users.xml` for a clickhouse-server with its data in `dir`,
/// listening on two free ports; returns the HTTP base URL and the config file.
fn write_clickhouse_config(dir: &Path) -> anyhow::Result<(String, PathBuf)> {
    let http_port = free_port();
    let tcp_port = loop {
        let port = free_port();
        if port != http_port {
            break port;
        }
    };
    let dir_text = dir
        .to_str()
        .ok_or_else(|| anyhow!("temporary directory {} is not UTF-8", dir.display()))?;
    let render = |template: &str| {
        template
            .replace("@HTTP_PORT@", &http_port.to_string())
            .replace("@TCP_PORT@", &tcp_port.to_string())
            .replace("@DATA_DIR@", dir_text)
    };
    let config = dir.join("config.xml");
    std::fs::write(&config, render(CLICKHOUSE_CONFIG))
        .with_context(|| format!("writing {}", config.display()))?;
    std::fs::write(dir.join("users.xml"), render(CLICKHOUSE_USERS))
        .with_context(|| format!("writing users.xml in {}", dir.display()))?;
    Ok((format!("http://127.0.0.1:{http_port}"), config))
}

/// Runs `clickhouse-server` in the background and watches the pipe on its
/// stdin: the write end is held only by the test process, so end-of-file
/// means that process is gone (or dropped the handle), and the server is
/// killed and its directory removed. `$1` binary, `$2` config file, `$3` dir.
const CLICKHOUSE_WATCHDOG: &str = r#"
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
exec 3<&0 </dev/null
"$1" --config-file="$2" 3<&- &
pid=$!
( cat <&3 >/dev/null; kill -9 "$pid" 2>/dev/null ) &
exec 3<&-
wait "$pid"
echo "$?" >"$3/server.exited"
wait
rm -rf "$3"
"#;

/// A `clickhouse-server` started by this process under [`CLICKHOUSE_WATCHDOG`].
/// Dropping it closes the watchdog's stdin, which stops the server and
/// removes its directory.
struct PrivateClickHouse {
    url: String,
    dir: PathBuf,
    watchdog: std::process::Child,
}

impl PrivateClickHouse {
    async fn start() -> anyhow::Result<PrivateClickHouse> {
        let binary = std::env::var_os(CLICKHOUSE_SERVER_ENV)
            .filter(|value| !value.is_empty())
            .unwrap_or_else(|| "clickhouse-server".into());
        // Removed by the watchdog, not by a TempDir: statics are never dropped.
        let dir = tempfile::Builder::new()
            .prefix("tally-clickhouse-")
            .tempdir()
            .context("creating a temporary directory for clickhouse-server")?
            .keep();
        let (url, config) = match write_clickhouse_config(&dir) {
            Ok(written) => written,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(err);
            }
        };

        let stdout_path = dir.join("stdout.log");
        let stdout = std::fs::File::create(&stdout_path)
            .with_context(|| format!("creating {}", stdout_path.display()))?;
        let stderr = stdout
            .try_clone()
            .context("duplicating the log file handle")?;
        let watchdog = std::process::Command::new("sh")
            .arg("-c")
            .arg(CLICKHOUSE_WATCHDOG)
            .arg("sh")
            .arg(&binary)
            .arg(&config)
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(stderr)
            .spawn();
        let watchdog = match watchdog {
            Ok(child) => child,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(err).context("starting sh to run clickhouse-server");
            }
        };
        let mut server = PrivateClickHouse { url, dir, watchdog };

        let started = Instant::now();
        loop {
            let exited = server.dir.join("server.exited");
            let failure = if exited.exists() {
                let status = std::fs::read_to_string(&exited).unwrap_or_default();
                Some(format!("exited with status {}", status.trim()))
            } else if let Ok(Some(status)) = server.watchdog.try_wait() {
                Some(format!("watchdog shell exited with {status}"))
            } else if started.elapsed() >= CLICKHOUSE_READY_DEADLINE {
                Some(format!(
                    "did not answer GET {}/ping within {CLICKHOUSE_READY_DEADLINE:?}",
                    server.url
                ))
            } else {
                None
            };
            if let Some(failure) = failure {
                let logs = server.log_tails();
                let binary = binary.to_string_lossy().into_owned();
                drop(server);
                bail!(
                    "clickhouse-server `{binary}` {failure} (set {CLICKHOUSE_SERVER_ENV} to its \
                     path, or {CLICKHOUSE_URL_ENV} to use a running server)\n{logs}"
                );
            }
            if ping(&server.url).await.is_ok() {
                return Ok(server);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn log_tails(&self) -> String {
        // The directory goes away with the server, so copy what matters.
        let names = [
            "stdout.log",
            "log/clickhouse-server.err.log",
            "log/clickhouse-server.log",
        ];
        names
            .iter()
            .filter(|name| self.dir.join(name).exists())
            .map(|name| format!("--- end of {name}:\n{}", tail(&self.dir.join(name), 30)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops the server and waits until the watchdog removed its directory.
    #[cfg(test)]
    fn stop(mut self) {
        drop(self.watchdog.stdin.take());
        let _ = self.watchdog.wait();
    }
}

/// A `clickhouse-server` owned by one test, which can stop it (SIGKILL, like a crash) and
/// start it again on the same ports and data, e.g. to cut the warehouse off mid-load.
///
/// It runs in the test process's process group and dies with the handle (kill on drop);
/// its temporary directory goes with it.
pub struct ClickHouseServer {
    // Declared before `dir` so the process is gone before its files are removed.
    child: Option<tokio::process::Child>,
    binary: OsString,
    config: PathBuf,
    url: String,
    dir: tempfile::TempDir,
}

impl ClickHouseServer {
    /// Starts a server on free ports and waits until it answers `/ping`.
    pub async fn start() -> anyhow::Result<ClickHouseServer> {
        let binary = std::env::var_os(CLICKHOUSE_SERVER_ENV)
            .filter(|value| !value.is_empty())
            .unwrap_or_else(|| "clickhouse-server".into());
        let dir = tempfile::Builder::new()
            .prefix("tally-clickhouse-")
            .tempdir()
            .context("creating a temporary directory for clickhouse-server")?;
        let (url, config) = write_clickhouse_config(dir.path())?;
        let mut server = ClickHouseServer {
            child: None,
            binary,
            config,
            url,
            dir,
        };
        server.spawn().await?;
        Ok(server)
    }

    /// Base URL of the HTTP interface; it stays the same across restarts.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Kills the server with SIGKILL and waits for it to exit; does nothing if it is down.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Starts the server again (killing it first if it runs) on the same ports and data,
    /// and waits until it answers `/ping`.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        self.spawn().await
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log_path = self.dir.path().join("stdout.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let stderr = log.try_clone().context("duplicating the log file handle")?;
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .arg(format!("--config-file={}", self.config.display()))
            .env(
                "PATH",
                format!(
                    "{}:/usr/local/sbin:/usr/sbin:/sbin",
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .kill_on_drop(true);
        let child = command.spawn().with_context(|| {
            format!(
                "starting clickhouse-server `{}` (set {CLICKHOUSE_SERVER_ENV} to its path)",
                self.binary.to_string_lossy()
            )
        })?;
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    bail!(
                        "clickhouse-server exited with {status} before answering; end of its log:\n{}",
                        tail(&log_path, 30)
                    );
                }
            }
            if ping(&self.url).await.is_ok() {
                return Ok(());
            }
            if started.elapsed() >= CLICKHOUSE_READY_DEADLINE {
                self.kill().await;
                bail!(
                    "clickhouse-server did not answer {}/ping within {CLICKHOUSE_READY_DEADLINE:?}; \
                     end of its log:\n{}",
                    self.url,
                    tail(&log_path, 30)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for ClickHouseServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            for _ in 0..100 {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The last `lines` lines of a text file, or a note why it could not be read.
fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

/// A string in NATS configuration syntax.
fn quote_nats(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn read_info(port: u16) -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    #[test]
    fn free_ports_are_bindable() {
        let port = free_port();
        assert_ne!(port, 0);
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    }

    #[test]
    fn unique_names_are_identifiers() {
        let a = unique_name("Tally-Test");
        let b = unique_name("Tally-Test");
        assert_ne!(a, b);
        for name in [&a, &b, &unique_name(""), &unique_name("9lives")] {
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
            assert!(!name.starts_with(|c: char| c.is_ascii_digit()), "{name}");
        }
        assert!(a.starts_with("tally_test_"), "{a}");
    }

    #[tokio::test]
    async fn wait_until_reports_what_and_last_error() {
        let mut calls = 0;
        wait_until("third call", Duration::from_secs(5), || {
            calls += 1;
            let n = calls;
            async move { Ok(n >= 3) }
        })
        .await
        .unwrap();
        assert_eq!(calls, 3);

        let err = wait_until("the impossible", Duration::from_millis(120), || async {
            Err::<bool, _>(anyhow!("still broken"))
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("the impossible"), "{err}");
        assert!(err.contains("still broken"), "{err}");
    }

    #[tokio::test]
    async fn nats_server_kill_and_restart() {
        let mut nats = NatsServer::start().await.unwrap();
        let port = nats.port();
        assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
        assert_eq!(read_info(port).unwrap(), "INFO");
        let store = nats.store_dir();
        assert!(store.join("jetstream").is_dir(), "JetStream store missing");

        nats.kill().await;
        assert!(read_info(port).is_err(), "still accepting after kill");

        nats.restart().await.unwrap();
        assert_eq!(nats.port(), port);
        assert_eq!(nats.store_dir(), store);
        assert_eq!(read_info(port).unwrap(), "INFO");

        // restart also works on a running server
        nats.restart().await.unwrap();
        assert_eq!(read_info(port).unwrap(), "INFO");

        let log = std::fs::read_to_string(nats.log_path()).unwrap();
        assert_eq!(
            log.matches("==> tally-testkit: starting").count(),
            3,
            "{log}"
        );

        let dir = nats.dir.path().to_path_buf();
        drop(nats);
        assert!(!dir.exists(), "temporary directory left behind");
        assert!(read_info(port).is_err(), "still accepting after drop");
    }

    #[tokio::test]
    async fn nats_server_with_sync_interval() {
        let nats = NatsServer::start_with(NatsOptions {
            sync_interval: Some("always".into()),
        })
        .await
        .unwrap();
        assert_eq!(read_info(nats.port()).unwrap(), "INFO");
        assert!(nats.store_dir().join("jetstream").is_dir());

        // The option reaches the server: a bad value stops it from starting,
        // and the error carries the server's own complaint from its log.
        let err = NatsServer::start_with(NatsOptions {
            sync_interval: Some("bogus".into()),
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("exited with"), "{err}");
        assert!(err.contains("sync_interval"), "{err}");
    }

    #[tokio::test]
    async fn nats_server_reports_missing_binary() {
        // Only the error path of spawning; does not touch the environment.
        let mut server = NatsServer {
            child: None,
            binary: "tally-testkit-no-such-nats-server".into(),
            port: free_port(),
            config: None,
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir(server.store_dir()).unwrap();
        let err = format!("{:#}", server.spawn().await.unwrap_err());
        assert!(err.contains("tally-testkit-no-such-nats-server"), "{err}");
        assert!(err.contains(NATS_SERVER_ENV), "{err}");
    }

    #[tokio::test]
    async fn clickhouse_select_1() {
        let ch = clickhouse().await.unwrap();
        let body = reqwest::Client::new()
            .post(format!("{}/", ch.url))
            .body("SELECT 1")
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body.trim(), "1");

        // The same server again, from the static.
        let again = clickhouse().await.unwrap();
        assert!(std::ptr::eq(ch, again));

        let db = unique_name("testkit");
        ch.query(&format!("CREATE DATABASE {db}")).await.unwrap();
        ch.query(&format!(
            "CREATE TABLE {db}.t (at DateTime('UTC'), n UInt32) ENGINE = MergeTree ORDER BY at"
        ))
        .await
        .unwrap();
        ch.query(&format!(
            "INSERT INTO {db}.t VALUES ('2024-01-02 03:04:05', 7)"
        ))
        .await
        .unwrap();
        let out = ch
            .query(&format!("SELECT sum(n) FROM {db}.t"))
            .await
            .unwrap();
        assert_eq!(out.trim(), "7");
        ch.query(&format!("DROP DATABASE {db}")).await.unwrap();

        let err = ch.query("SELEC 1").await.unwrap_err().to_string();
        assert!(err.contains("Syntax error"), "{err}");
    }

    #[tokio::test]
    async fn private_clickhouse_starts_serves_and_cleans_up() {
        let server = PrivateClickHouse::start().await.unwrap();
        let ch = ClickHouse {
            url: server.url.clone(),
        };
        assert_eq!(ch.query("SELECT 1").await.unwrap().trim(), "1");

        // The read-only user can read but not write.
        let client = reqwest::Client::new();
        let select = client
            .post(format!("{}/?user=tally_readonly", server.url))
            .body("SELECT 2")
            .send()
            .await
            .unwrap();
        assert!(select.status().is_success());
        assert_eq!(select.text().await.unwrap().trim(), "2");
        let create = client
            .post(format!("{}/?user=tally_readonly", server.url))
            .body("CREATE DATABASE nope")
            .send()
            .await
            .unwrap();
        assert!(!create.status().is_success());

        let dir = server.dir.clone();
        let url = server.url.clone();
        assert!(dir.join("data").is_dir());
        tokio::task::spawn_blocking(move || server.stop())
            .await
            .unwrap();
        assert!(!dir.exists(), "data directory left behind");
        assert!(ping(&url).await.is_err(), "server still answering");
    }
}
