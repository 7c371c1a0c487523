//! ClickHouse for tests: [`clickhouse()`] hands every test of the process one shared server,
//! and a [`ClickHouseServer`] belongs to one test, which may kill and restart it. Both kinds
//! are configured from `scripts/clickhouse/`, on free ports, with their data in a temporary
//! directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use crate::needs::clickhouse_server_binary;
use crate::process::{Detached, ManagedProcess};
use crate::{free_port, CLICKHOUSE_SERVER_ENV, CLICKHOUSE_URL_ENV};

/// Server configuration template shared with `scripts/test`.
const CLICKHOUSE_CONFIG: &str = include_str!("../../scripts/clickhouse/config.xml");
/// Users, profiles and quotas, read by the server from next to the config file.
const CLICKHOUSE_USERS: &str = include_str!("../../scripts/clickhouse/users.xml");

const CLICKHOUSE_READY_DEADLINE: Duration = Duration::from_secs(60);

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
/// The server [`clickhouse()`] started, if it started one. Statics are never dropped, so it
/// serves until the test process exits; then its watchdog stops it and removes its directory.
static SHARED_SERVER: Mutex<Option<Detached>> = Mutex::new(None);

/// Returns the ClickHouse server for this test process.
///
/// With `TALLY_TEST_CLICKHOUSE_URL` set that server is used after checking
/// that `GET /ping` answers `Ok.`. Otherwise the first call starts one private
/// `clickhouse-server` (binary from `TALLY_TEST_CLICKHOUSE_SERVER`, else
/// `clickhouse-server` from `PATH` or the sbin directories) on free ports with
/// its data in a temporary directory, configured from `scripts/clickhouse/`. It
/// outlives the tokio runtimes of individual tests and is killed, and its
/// directory removed, by a watchdog once this process exits, however it exits.
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
            let (url, server) = start_shared().await?;
            *SHARED_SERVER
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(server);
            Ok(ClickHouse { url })
        })
        .await
}

/// Starts the server [`clickhouse()`] shares; returns its URL and the watchdog's handle.
async fn start_shared() -> anyhow::Result<(String, Detached)> {
    let dir = tempfile::Builder::new()
        .prefix("tally-clickhouse-")
        .tempdir()
        .context("creating a temporary directory for clickhouse-server")?;
    let (process, url) = launch(dir.path()).await?;
    let server = process.detach(dir.path())?;
    // The watchdog removes the directory from now on: a static is never dropped.
    let _ = dir.keep();
    Ok((url, server))
}

/// A `clickhouse-server` owned by one test, which can stop it (SIGKILL, like a crash) and
/// start it again on the same ports and data, e.g. to cut the warehouse off mid-load.
///
/// It dies with the handle (kill on drop); its temporary directory goes with it.
#[derive(Debug)]
pub struct ClickHouseServer {
    // Declared before `_dir` so the process is gone before its files are removed.
    process: ManagedProcess,
    url: String,
    _dir: tempfile::TempDir,
}

impl ClickHouseServer {
    /// Starts a server on free ports and waits until it answers `/ping`.
    pub async fn start() -> anyhow::Result<ClickHouseServer> {
        let dir = tempfile::Builder::new()
            .prefix("tally-clickhouse-")
            .tempdir()
            .context("creating a temporary directory for clickhouse-server")?;
        let (process, url) = launch(dir.path()).await?;
        Ok(ClickHouseServer {
            process,
            url,
            _dir: dir,
        })
    }

    /// Base URL of the HTTP interface; it stays the same across restarts.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Kills the server with SIGKILL and waits for it to exit; does nothing if it is down.
    pub async fn kill(&mut self) {
        self.process.kill().await;
    }

    /// Starts the server again (killing it first if it runs) on the same ports and data,
    /// and waits until it answers `/ping`.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.restart().await?;
        wait_for_ping(&mut self.process, &self.url).await
    }
}

/// Starts a `clickhouse-server` with its configuration, data and logs in `dir`, on free
/// ports, and waits until it answers; returns it with the base URL of its HTTP interface.
async fn launch(dir: &Path) -> anyhow::Result<(ManagedProcess, String)> {
    launch_on(dir, Ports::free(), None).await
}

/// The two ports a server listens on.
#[derive(Debug, Clone, Copy)]
struct Ports {
    http: u16,
    tcp: u16,
}

impl Ports {
    fn free() -> Ports {
        let http = free_port();
        let tcp = loop {
            let port = free_port();
            if port != http {
                break port;
            }
        };
        Ports { http, tcp }
    }
}

/// [`launch`] on the given ports, with `extra` (a whole configuration file) written to
/// `config.d/`, which the server merges into its configuration.
async fn launch_on(
    dir: &Path,
    ports: Ports,
    extra: Option<&str>,
) -> anyhow::Result<(ManagedProcess, String)> {
    let binary = clickhouse_server_binary().unwrap_or_else(|| PathBuf::from("clickhouse-server"));
    let started = async {
        let (url, config) = write_clickhouse_config(dir, ports)?;
        if let Some(extra) = extra {
            let config_d = dir.join("config.d");
            std::fs::create_dir_all(&config_d)
                .with_context(|| format!("creating {}", config_d.display()))?;
            std::fs::write(config_d.join("tally-test.xml"), extra)
                .with_context(|| format!("writing {}/tally-test.xml", config_d.display()))?;
        }
        let mut command = Command::new(&binary);
        command.arg(format!("--config-file={}", config.display()));
        let mut process =
            ManagedProcess::start("clickhouse-server", command, dir.join("stdout.log"))?
                .with_own_log(dir.join("log/clickhouse-server.err.log"));
        wait_for_ping(&mut process, &url).await?;
        anyhow::Ok((process, url))
    };
    started.await.with_context(|| {
        format!(
            "starting clickhouse-server `{}` (set {CLICKHOUSE_SERVER_ENV} to its path, \
             or {CLICKHOUSE_URL_ENV} to use a running server)",
            binary.display()
        )
    })
}

/// Servers forming one ClickHouse cluster of single-replica shards, shared by every test of
/// the process (like [`clickhouse()`]): each server's `remote_servers` names them all, in
/// shard order, as [`ClickHouseCluster::NAME`].
#[derive(Debug, Clone)]
pub struct ClickHouseCluster {
    /// The HTTP base URL of each shard's server, in the cluster's shard order.
    pub shards: Vec<String>,
}

impl ClickHouseCluster {
    /// The cluster's name in `remote_servers`.
    pub const NAME: &'static str = "tally_test_shards";
    /// How many shards it has.
    pub const SHARDS: usize = 2;
}

static CLUSTER: tokio::sync::OnceCell<ClickHouseCluster> = tokio::sync::OnceCell::const_new();
/// The servers of [`clickhouse_cluster()`], stopped by their watchdogs when the process ends.
static CLUSTER_SERVERS: Mutex<Vec<Detached>> = Mutex::new(Vec::new());

/// Returns the sharded cluster of this test process, starting its servers on the first call
/// (always private servers: they need a configuration naming each other). Needs
/// [`Need::ClickHouseServer`](crate::Need::ClickHouseServer).
pub async fn clickhouse_cluster() -> anyhow::Result<&'static ClickHouseCluster> {
    CLUSTER
        .get_or_try_init(|| async {
            let mut ports: Vec<Ports> = Vec::new();
            while ports.len() < ClickHouseCluster::SHARDS {
                let candidate = Ports::free();
                let taken = ports.iter().any(|p| {
                    [p.http, p.tcp].contains(&candidate.http)
                        || [p.http, p.tcp].contains(&candidate.tcp)
                });
                if !taken {
                    ports.push(candidate);
                }
            }
            let shards: String = ports
                .iter()
                .map(|port| {
                    format!(
                        "<shard><replica><host>127.0.0.1</host><port>{}</port></replica></shard>",
                        port.tcp
                    )
                })
                .collect();
            let extra = format!(
                "<?xml version=\"1.0\"?>\n<yandex><remote_servers><{name}>{shards}</{name}>\
                 </remote_servers></yandex>\n",
                name = ClickHouseCluster::NAME
            );
            let mut urls = Vec::new();
            for port in ports {
                let dir = tempfile::Builder::new()
                    .prefix("tally-clickhouse-shard-")
                    .tempdir()
                    .context("creating a temporary directory for clickhouse-server")?;
                let (process, url) = launch_on(dir.path(), port, Some(&extra)).await?;
                let server = process.detach(dir.path())?;
                let _ = dir.keep();
                CLUSTER_SERVERS
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(server);
                urls.push(url);
            }
            Ok(ClickHouseCluster { shards: urls })
        })
        .await
}

async fn wait_for_ping(process: &mut ManagedProcess, url: &str) -> anyhow::Result<()> {
    let what = format!("answering GET {url}/ping");
    process
        .wait_ready(&what, CLICKHOUSE_READY_DEADLINE, || async move {
            ping(url).await.map(|()| true)
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
/// listening on `ports`; returns the HTTP base URL and the config file.
fn write_clickhouse_config(dir: &Path, ports: Ports) -> anyhow::Result<(String, PathBuf)> {
    let Ports {
        http: http_port,
        tcp: tcp_port,
    } = ports;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unique_name;

    #[tokio::test]
    async fn needs_clickhouse_select_1() {
        crate::require!(ClickHouse);
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
    async fn needs_clickhouse_shared_server_starts_serves_and_cleans_up() {
        crate::require!(ClickHouse);
        let (url, server) = start_shared().await.unwrap();
        let ch = ClickHouse { url: url.clone() };
        assert_eq!(ch.query("SELECT 1").await.unwrap().trim(), "1");

        // The read-only user can read but not write.
        let client = reqwest::Client::new();
        let select = client
            .post(format!("{url}/?user=tally_readonly"))
            .body("SELECT 2")
            .send()
            .await
            .unwrap();
        assert!(select.status().is_success());
        assert_eq!(select.text().await.unwrap().trim(), "2");
        let create = client
            .post(format!("{url}/?user=tally_readonly"))
            .body("CREATE DATABASE nope")
            .send()
            .await
            .unwrap();
        assert!(!create.status().is_success());

        let dir = server.dir().to_owned();
        assert!(dir.join("data").is_dir());
        tokio::task::spawn_blocking(move || drop(server))
            .await
            .unwrap();
        assert!(!dir.exists(), "data directory left behind");
        assert!(ping(&url).await.is_err(), "server still answering");
    }

    #[tokio::test]
    async fn needs_clickhouse_owned_server_kill_and_restart() {
        crate::require!(ClickHouse);
        let mut server = ClickHouseServer::start().await.unwrap();
        let ch = ClickHouse {
            url: server.url().to_owned(),
        };
        ch.query("CREATE TABLE kept (n UInt32) ENGINE = MergeTree ORDER BY n")
            .await
            .unwrap();
        ch.query("INSERT INTO kept VALUES (41), (1)").await.unwrap();

        server.kill().await;
        assert!(
            ping(server.url()).await.is_err(),
            "still answering after kill"
        );
        server.restart().await.unwrap();
        assert_eq!(ch.url, server.url(), "moved to another port");
        let sum = ch.query("SELECT sum(n) FROM kept").await.unwrap();
        assert_eq!(sum.trim(), "42", "data lost across the restart");

        let url = server.url().to_owned();
        drop(server);
        assert!(ping(&url).await.is_err(), "still answering after drop");
    }
}
