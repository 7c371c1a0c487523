//! A private `nats-server` with JetStream for one test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::needs::nats_server_binary;
use crate::process::ManagedProcess;
use crate::{free_port, NATS_SERVER_ENV};

const NATS_READY_DEADLINE: Duration = Duration::from_secs(10);

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
#[derive(Debug)]
pub struct NatsServer {
    // Declared before `dir` so the process is gone before its files are removed.
    process: ManagedProcess,
    port: u16,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server on a free port and waits until it accepts TCP connections.
    pub async fn start() -> anyhow::Result<NatsServer> {
        Self::start_with(NatsOptions::default()).await
    }

    /// Like [`NatsServer::start`], with extra server options.
    pub async fn start_with(options: NatsOptions) -> anyhow::Result<NatsServer> {
        Self::launch(&nats_server_binary(), options).await
    }

    async fn launch(binary: &Path, options: NatsOptions) -> anyhow::Result<NatsServer> {
        let started = async {
            let dir = tempfile::Builder::new()
                .prefix("tally-nats-")
                .tempdir()
                .context("creating a temporary directory")?;
            let store_dir = dir.path().join("store");
            std::fs::create_dir(&store_dir)
                .with_context(|| format!("creating {}", store_dir.display()))?;
            let port = free_port();

            let mut command = Command::new(binary);
            if let Some(interval) = &options.sync_interval {
                let config = dir.path().join("nats-server.conf");
                // No store_dir here: nats-server rejects it next to `-sd`
                // ("Duplicate 'store_dir' configuration").
                let text = format!(
                    "jetstream {{\n  sync_interval: {}\n}}\n",
                    quote_nats(interval)
                );
                std::fs::write(&config, text)
                    .with_context(|| format!("writing {}", config.display()))?;
                command.arg("-c").arg(config);
            }
            command
                .args(["-a", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .arg("-js")
                .arg("-sd")
                .arg(&store_dir);
            let process =
                ManagedProcess::start("nats-server", command, dir.path().join("nats-server.log"))?;
            let mut server = NatsServer { process, port, dir };
            server.wait_ready().await?;
            anyhow::Ok(server)
        };
        started.await.with_context(|| {
            format!(
                "starting nats-server `{}` (set {NATS_SERVER_ENV} to its path)",
                binary.display()
            )
        })
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
        self.process.log_path().to_owned()
    }

    /// Kills the server with SIGKILL, like a crash, and waits for it to exit.
    /// Does nothing if it is not running.
    pub async fn kill(&mut self) {
        self.process.kill().await;
    }

    /// Starts the server again on the same port with the same store
    /// directory (killing it first if it is still running) and waits until it
    /// accepts TCP connections.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.restart().await?;
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let port = self.port;
        let what = format!("accepting connections on 127.0.0.1:{port}");
        self.process
            .wait_ready(&what, NATS_READY_DEADLINE, || async move {
                let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
                tokio::time::timeout(Duration::from_secs(1), connect).await??;
                Ok(true)
            })
            .await
    }
}

/// A string in NATS configuration syntax.
fn quote_nats(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn read_info(port: u16) -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    #[tokio::test]
    async fn needs_nats_kill_and_restart() {
        crate::require!(NatsServer);
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
    async fn needs_nats_with_sync_interval() {
        crate::require!(NatsServer);
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
        .unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("exited with"), "{err}");
        assert!(err.contains("sync_interval"), "{err}");
    }

    #[tokio::test]
    async fn a_missing_nats_server_is_named_with_the_variable_to_set() {
        // Only the error path of spawning; does not touch the environment.
        let binary = Path::new("tally-testkit-no-such-nats-server");
        let err = NatsServer::launch(binary, NatsOptions::default())
            .await
            .unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("tally-testkit-no-such-nats-server"), "{err}");
        assert!(err.contains(NATS_SERVER_ENV), "{err}");
    }
}
