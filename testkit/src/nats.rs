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

/// Who may connect to a test server and how, for [`NatsServer::start_secured`]. Everything
/// here is written into the server's configuration file.
///
/// A separate type rather than more fields of [`NatsOptions`], whose callers build it as a
/// struct literal. nats-server takes users (with passwords or nkeys) or a token, not both,
/// and an `accounts` block in `extra_config` brings its own users.
#[derive(Debug, Clone, Default)]
pub struct NatsAccess {
    /// `(user, password)` pairs; each user may publish and subscribe to anything.
    pub users: Vec<(String, String)>,
    /// Public user nkeys (`U…`) that may connect by signing the server's nonce.
    pub nkeys: Vec<String>,
    /// `authorization { token }`: the one token clients must present.
    pub token: Option<String>,
    /// TLS for client connections; without it clients connect in plaintext.
    pub tls: Option<NatsTls>,
    /// Configuration appended verbatim, such as an `accounts` block with permissions.
    pub extra_config: Option<String>,
    /// Environment variables of the server process, for `$NAME` references in
    /// `extra_config` (nats-server resolves an unknown variable from its environment).
    pub env: Vec<(String, String)>,
}

/// The server side of TLS, PEM files all.
#[derive(Debug, Clone)]
pub struct NatsTls {
    /// The server's certificate (its chain) and key.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The CA that client certificates must chain to; needed with `verify_clients`.
    pub ca_file: Option<PathBuf>,
    /// Refuse clients that present no certificate signed by `ca_file`.
    pub verify_clients: bool,
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
        Self::launch(&nats_server_binary(), options, NatsAccess::default()).await
    }

    /// Like [`NatsServer::start_with`], for clients that must authenticate or use TLS.
    pub async fn start_secured(
        options: NatsOptions,
        access: NatsAccess,
    ) -> anyhow::Result<NatsServer> {
        Self::launch(&nats_server_binary(), options, access).await
    }

    async fn launch(
        binary: &Path,
        options: NatsOptions,
        access: NatsAccess,
    ) -> anyhow::Result<NatsServer> {
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
            if let Some(text) = config_text(&options, &access) {
                let config = dir.path().join("nats-server.conf");
                std::fs::write(&config, text)
                    .with_context(|| format!("writing {}", config.display()))?;
                command.arg("-c").arg(config);
            }
            command.envs(access.env.iter().map(|(name, value)| (name, value)));
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

/// Several private nats-servers clustered on loopback (routes between all of them), each
/// with JetStream and a store of its own: a replicated broker as docs/nats/cluster.conf
/// describes, for one test. Each member can be killed and restarted like a
/// [`NatsServer`]; dropping the cluster stops them all.
#[derive(Debug)]
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` servers clustered with each other and waits until each accepts
    /// connections. JetStream needs a moment more to elect its meta leader: a client's
    /// first stream may have to be retried (see [`crate::wait_until`]).
    pub async fn start(size: usize) -> anyhow::Result<NatsCluster> {
        let routes: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let mut servers = Vec::with_capacity(size);
        for (i, own) in routes.iter().enumerate() {
            let others = routes
                .iter()
                .filter(|port| *port != own)
                .map(|port| format!("    nats-route://127.0.0.1:{port}"))
                .collect::<Vec<_>>()
                .join("\n");
            let access = NatsAccess {
                extra_config: Some(format!(
                    "server_name: n{i}\ncluster {{\n  name: tally-test\n  listen: \
                     127.0.0.1:{own}\n  routes: [\n{others}\n  ]\n}}"
                )),
                ..NatsAccess::default()
            };
            servers.push(NatsServer::start_secured(NatsOptions::default(), access).await?);
        }
        Ok(NatsCluster { servers })
    }

    /// The index of the member leading `stream`'s replicas now (members are named
    /// `n<index>`), waiting up to 30 s while the cluster elects one.
    pub async fn stream_leader(&self, stream: &str) -> anyhow::Result<usize> {
        let servers = self
            .servers
            .iter()
            .map(|server| server.url().parse())
            .collect::<Result<Vec<async_nats::ServerAddr>, _>>()?;
        let client = async_nats::connect(servers).await?;
        let js = async_nats::jetstream::new(client);
        let started = std::time::Instant::now();
        loop {
            if let Ok(found) = js.get_stream(stream).await {
                let leader = found
                    .cached_info()
                    .cluster
                    .as_ref()
                    .and_then(|c| c.leader.clone());
                if let Some(name) = leader {
                    return name
                        .trim_start_matches('n')
                        .parse()
                        .with_context(|| format!("leader `{name}`"));
                }
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "no leader for the stream {stream}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Every member's URL, comma-separated, as `TALLY_NATS_URL` takes them.
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The server's configuration file, when the options need one. No port, address or
/// store_dir here: those are flags, and nats-server rejects a setting given both ways
/// ("Duplicate 'store_dir' configuration").
fn config_text(options: &NatsOptions, access: &NatsAccess) -> Option<String> {
    use std::fmt::Write;
    let mut text = String::new();
    if let Some(interval) = &options.sync_interval {
        let _ = writeln!(
            text,
            "jetstream {{\n  sync_interval: {}\n}}",
            quote_nats(interval)
        );
    }
    let users = access
        .users
        .iter()
        .map(|(user, password)| {
            format!(
                "{{user: {}, password: {}}}",
                quote_nats(user),
                quote_nats(password)
            )
        })
        .chain(
            access
                .nkeys
                .iter()
                .map(|nkey| format!("{{nkey: {}}}", quote_nats(nkey))),
        )
        .collect::<Vec<_>>();
    if !users.is_empty() || access.token.is_some() {
        text.push_str("authorization {\n");
        if !users.is_empty() {
            let _ = writeln!(text, "  users: [\n    {}\n  ]", users.join("\n    "));
        }
        if let Some(token) = &access.token {
            let _ = writeln!(text, "  token: {}", quote_nats(token));
        }
        text.push_str("}\n");
    }
    if let Some(tls) = &access.tls {
        text.push_str("tls {\n");
        let _ = writeln!(text, "  cert_file: {}", quote_path(&tls.cert_file));
        let _ = writeln!(text, "  key_file: {}", quote_path(&tls.key_file));
        if let Some(ca) = &tls.ca_file {
            let _ = writeln!(text, "  ca_file: {}", quote_path(ca));
        }
        if tls.verify_clients {
            text.push_str("  verify: true\n");
        }
        text.push_str("}\n");
    }
    if let Some(extra) = &access.extra_config {
        text.push_str(extra);
        text.push('\n');
    }
    (!text.is_empty()).then_some(text)
}

fn quote_path(path: &Path) -> String {
    quote_nats(&path.to_string_lossy())
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

    /// The server's INFO line, which says what it requires of clients.
    fn read_info_line(port: u16) -> std::io::Result<String> {
        use std::io::BufRead;
        let stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut line = String::new();
        std::io::BufReader::new(stream).read_line(&mut line)?;
        Ok(line)
    }

    #[test]
    fn access_is_written_into_the_configuration() {
        assert_eq!(
            config_text(&NatsOptions::default(), &NatsAccess::default()),
            None
        );
        let access = NatsAccess {
            users: vec![("ingest".into(), "pa\"ss".into())],
            nkeys: vec!["UABC".into()],
            tls: Some(NatsTls {
                cert_file: "/certs/server.pem".into(),
                key_file: "/certs/server-key.pem".into(),
                ca_file: Some("/certs/ca.pem".into()),
                verify_clients: true,
            }),
            extra_config: Some("# extra".into()),
            ..Default::default()
        };
        let text = config_text(&NatsOptions::default(), &access).unwrap();
        for expected in [
            r#"{user: "ingest", password: "pa\"ss"}"#,
            r#"{nkey: "UABC"}"#,
            r#"cert_file: "/certs/server.pem""#,
            r#"ca_file: "/certs/ca.pem""#,
            "verify: true",
            "# extra",
        ] {
            assert!(text.contains(expected), "{expected} missing from:\n{text}");
        }
        assert!(!text.contains("token"), "{text}");
        let token = NatsAccess {
            token: Some("t0ken".into()),
            ..Default::default()
        };
        let text = config_text(&NatsOptions::default(), &token).unwrap();
        assert!(text.contains(r#"token: "t0ken""#), "{text}");
        assert!(!text.contains("users"), "{text}");
    }

    #[tokio::test]
    async fn needs_nats_secured_servers_require_what_they_were_given() {
        crate::require!(NatsServer);
        let open = NatsServer::start().await.unwrap();
        let info = read_info_line(open.port()).unwrap();
        assert!(!info.contains(r#""auth_required":true"#), "{info}");

        let with_users = NatsServer::start_secured(
            NatsOptions::default(),
            NatsAccess {
                users: vec![("ingest".into(), "a-password".into())],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let info = read_info_line(with_users.port()).unwrap();
        assert!(info.contains(r#""auth_required":true"#), "{info}");
        assert!(
            with_users.store_dir().join("jetstream").is_dir(),
            "JetStream is still on"
        );

        // The environment reaches the server: a `$VARIABLE` in the extra configuration.
        let with_env = NatsServer::start_secured(
            NatsOptions::default(),
            NatsAccess {
                extra_config: Some("authorization { token: $TESTKIT_TOKEN }".into()),
                env: vec![("TESTKIT_TOKEN".into(), "from-the-environment".into())],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let info = read_info_line(with_env.port()).unwrap();
        assert!(info.contains(r#""auth_required":true"#), "{info}");
        let unset = NatsServer::start_secured(
            NatsOptions::default(),
            NatsAccess {
                extra_config: Some("authorization { token: $TESTKIT_UNSET_TOKEN }".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        let unset = format!("{unset:#}");
        assert!(unset.contains("TESTKIT_UNSET_TOKEN"), "{unset}");

        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let with_tls = NatsServer::start_secured(
            NatsOptions::default(),
            NatsAccess {
                tls: Some(NatsTls {
                    cert_file,
                    key_file,
                    ca_file: None,
                    verify_clients: false,
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let info = read_info_line(with_tls.port()).unwrap();
        assert!(info.contains(r#""tls_required":true"#), "{info}");
    }

    #[tokio::test]
    async fn a_missing_nats_server_is_named_with_the_variable_to_set() {
        // Only the error path of spawning; does not touch the environment.
        let binary = Path::new("tally-testkit-no-such-nats-server");
        let err = NatsServer::launch(binary, NatsOptions::default(), NatsAccess::default())
            .await
            .unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("tally-testkit-no-such-nats-server"), "{err}");
        assert!(err.contains(NATS_SERVER_ENV), "{err}");
    }
}
