//! Connecting to the broker: which servers, who tally is to them, and TLS.
//!
//! Exactly one way of authenticating may be given (user and password, a token, a `.creds`
//! file, or an nkey seed file), so a deployment never depends on which one the server
//! happens to look at first. Refusals of the server (bad credentials, a certificate it or we
//! do not trust) end the connect at once: retrying cannot fix them, and the message says what
//! to check. Only an unreachable broker is retried, for the patience the caller gives.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions};
use tally_core::{Error, Result};

/// How long one attempt at one server may take (TCP, TLS, the CONNECT handshake).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// The pause between rounds over the server list while no server answers.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Where the broker is and how to prove who tally is to it.
///
/// `Debug` shows which secrets are set, never their values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ConnectSettings {
    /// `nats://host:port` (or `tls://host:port`), one per server of the cluster. The client
    /// connects to one of them and moves to another when it goes away.
    pub servers: Vec<String>,
    /// User name, with [`ConnectSettings::password`].
    pub user: Option<String>,
    pub password: Option<String>,
    /// The server's `authorization { token }`.
    pub token: Option<String>,
    /// A `.creds` file (a user JWT and its nkey seed), for servers in operator (JWT) mode.
    pub credentials_file: Option<PathBuf>,
    /// A file holding a user's nkey seed (`SU…`), for users the server lists by public nkey.
    pub nkey_seed_file: Option<PathBuf>,
    pub tls: TlsSettings,
}

/// TLS to the broker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// Refuse a server that does not speak TLS. Implied by each file below: a CA or a client
    /// certificate given for a plaintext server is a mistake, not a wish for plaintext.
    pub required: bool,
    /// PEM file of the CA(s) that signed the servers' certificates. Without it the system's
    /// roots are trusted.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for a server that verifies its clients (with `client_key`).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
}

impl TlsSettings {
    /// Whether the connection must be TLS: asked for, or implied by a file.
    pub fn is_required(&self) -> bool {
        self.required
            || self.ca_file.is_some()
            || self.client_cert.is_some()
            || self.client_key.is_some()
    }
}

impl fmt::Debug for ConnectSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |secret: &Option<String>| secret.as_ref().map(|_| "(hidden)");
        f.debug_struct("ConnectSettings")
            .field("servers", &self.servers)
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .field("credentials_file", &self.credentials_file)
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("tls", &self.tls)
            .finish()
    }
}

impl ConnectSettings {
    /// Settings for the servers of `urls`, comma-separated (`nats://a:4222,nats://b:4222`,
    /// as `TALLY_NATS_URL` takes them), with no credentials and no TLS settings.
    pub fn from_urls(urls: &str) -> ConnectSettings {
        ConnectSettings {
            servers: urls
                .split(',')
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .map(str::to_owned)
                .collect(),
            ..Default::default()
        }
    }

    /// How tally authenticates, in words for errors: "user `ingest` and its password".
    fn identity(&self) -> String {
        if let Some(user) = &self.user {
            format!("user `{user}` and its password")
        } else if self.token.is_some() {
            "the token".to_owned()
        } else if let Some(path) = &self.credentials_file {
            format!("the credentials file {}", path.display())
        } else if let Some(path) = &self.nkey_seed_file {
            format!("the nkey seed in {}", path.display())
        } else {
            "no credentials (none were given)".to_owned()
        }
    }

    /// Refuses settings that cannot work, before any server is asked.
    fn check(&self) -> Result<()> {
        let refuse = |why: String| Err(Error::failed("NATS settings", why));
        if self.servers.is_empty() {
            return refuse("no NATS server given".into());
        }
        match (&self.user, &self.password) {
            (Some(user), None) => return refuse(format!("NATS user `{user}` needs a password")),
            (None, Some(_)) => return refuse("a NATS password needs a user".into()),
            _ => {}
        }
        let ways: Vec<&str> = [
            (self.user.is_some(), "user and password"),
            (self.token.is_some(), "token"),
            (self.credentials_file.is_some(), "credentials file"),
            (self.nkey_seed_file.is_some(), "nkey seed file"),
        ]
        .into_iter()
        .filter_map(|(given, way)| given.then_some(way))
        .collect();
        if ways.len() > 1 {
            return refuse(format!(
                "give one way of authenticating to NATS, not {}",
                ways.join(", ")
            ));
        }
        if self.tls.client_cert.is_some() != self.tls.client_key.is_some() {
            return refuse("a TLS client certificate and its key go together".into());
        }
        let files = [
            (&self.credentials_file, "credentials file"),
            (&self.nkey_seed_file, "nkey seed file"),
            (&self.tls.ca_file, "TLS CA file"),
            (&self.tls.client_cert, "TLS client certificate"),
            (&self.tls.client_key, "TLS client key"),
        ];
        for (path, what) in files {
            let Some(path) = path else { continue };
            if let Err(err) = std::fs::metadata(path) {
                return refuse(format!(
                    "cannot read the NATS {what} {}: {err}",
                    path.display()
                ));
            }
        }
        Ok(())
    }

    /// The client's options for these settings (one set per attempt: they are not `Clone`).
    async fn options(&self) -> Result<ConnectOptions> {
        let mut options = ConnectOptions::new()
            .name("tally")
            .connection_timeout(ATTEMPT_TIMEOUT)
            // Once connected, keep reconnecting for as long as the process runs.
            .max_reconnects(None);
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(path) = &self.credentials_file {
            options = options.credentials_file(path).await.map_err(|err| {
                Error::failed(
                    "NATS settings",
                    format!("reading the credentials file {}: {err}", path.display()),
                )
            })?;
        }
        if let Some(path) = &self.nkey_seed_file {
            options = options.nkey(read_seed(path)?);
        }
        if self.tls.is_required() {
            options = options.require_tls(true);
        }
        if let Some(ca) = &self.tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls.client_cert, &self.tls.client_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options)
    }
}

impl From<&str> for ConnectSettings {
    fn from(urls: &str) -> ConnectSettings {
        ConnectSettings::from_urls(urls)
    }
}

impl From<&String> for ConnectSettings {
    fn from(urls: &String) -> ConnectSettings {
        ConnectSettings::from_urls(urls)
    }
}

impl From<&ConnectSettings> for ConnectSettings {
    fn from(settings: &ConnectSettings) -> ConnectSettings {
        settings.clone()
    }
}

/// The seed in an nkey seed file: its first line that is one (`nk -gen user` writes a bare
/// seed; other tools add comment lines around it).
fn read_seed(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        Error::failed(
            "NATS settings",
            format!("reading the nkey seed file {}: {err}", path.display()),
        )
    })?;
    text.lines()
        .map(str::trim)
        .find(|line| {
            // Seeds are `S` + base32 (A-Z, 2-7).
            line.starts_with('S')
                && line
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
        })
        .map(str::to_owned)
        .ok_or_else(|| {
            Error::failed(
                "NATS settings",
                format!(
                    "no nkey seed (a line starting with `S`) in {}",
                    path.display()
                ),
            )
        })
}

/// Connects to one of `settings`' servers, retrying for the first `patience` while none
/// answers (a broker still starting). A refusal (credentials, TLS) fails at once.
///
/// Takes settings, a URL list (`"nats://a:4222,nats://b:4222"`) or a `&String` of one.
pub async fn connect(
    settings: impl Into<ConnectSettings>,
    patience: Duration,
) -> Result<async_nats::Client> {
    let settings: ConnectSettings = settings.into();
    settings.check()?;
    let servers = shown_servers(&settings.servers);
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        // Without `retry_on_initial_connect` one call tries each server once and returns
        // the server's refusal, which the background retry would only log.
        let attempt = settings.options().await?.connect(&settings.servers).await;
        let err = match attempt {
            Ok(client) => {
                tracing::info!(servers = %servers, "connected to NATS");
                return Ok(client);
            }
            Err(err) => err,
        };
        match err.kind() {
            ConnectErrorKind::AuthorizationViolation => {
                return Err(Error::failed(
                    "NATS",
                    format!(
                        "the NATS server at {servers} refused {} ({}): check the user \
                         and password, token, credentials or nkey given to tally",
                        settings.identity(),
                        err.kind()
                    ),
                ))
            }
            ConnectErrorKind::Authentication => {
                return Err(Error::failed(
                    "NATS",
                    format!(
                        "could not answer the NATS server's challenge with {}: {err}",
                        settings.identity()
                    ),
                ))
            }
            ConnectErrorKind::Tls => {
                return Err(Error::failed(
                    "NATS",
                    format!(
                        "TLS with the NATS server at {servers} failed: {}",
                        error_chain(&err)
                    ),
                ))
            }
            ConnectErrorKind::ServerParse => {
                return Err(Error::failed(
                    "NATS settings",
                    format!("NATS server list `{servers}`: {}", error_chain(&err)),
                ))
            }
            _ => {}
        }
        // A failed handshake reaches us as an I/O error around the TLS library's own.
        if let Some(why) = tls_failure(&err) {
            return Err(Error::failed(
                "NATS",
                format!("TLS with the NATS server at {servers} failed: {why}"),
            ));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::unavailable(
                "NATS",
                format!("cannot connect to NATS at {servers}: {}", error_chain(&err)),
            ));
        }
        tracing::debug!(error = %error_chain(&err), "nats connect failed, retrying");
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// The server list for logs and errors, without the credentials a URL may carry
/// (`nats://user:password@host:4222`).
fn shown_servers(servers: &[String]) -> String {
    servers
        .iter()
        .map(|url| {
            let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
            match rest.rsplit_once('@') {
                Some((_credentials, host)) if scheme.is_empty() => format!("***@{host}"),
                Some((_credentials, host)) => format!("{scheme}://***@{host}"),
                None => url.clone(),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What went wrong in a TLS handshake, with what to check, if `err` comes from one.
fn tls_failure(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    use async_nats::rustls::{AlertDescription, Error as TlsError};
    let mut source = Some(err);
    let tls = loop {
        let current = source?;
        // `io::Error::source` skips the error it wraps, so look into it by hand.
        let wrapped = current
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<TlsError>());
        if let Some(tls) = wrapped.or_else(|| current.downcast_ref::<TlsError>()) {
            break tls;
        }
        source = current.source();
    };
    let hint = match tls {
        TlsError::InvalidCertificate(_) => {
            "tally does not trust the server's certificate: give the CA file that signed it"
        }
        TlsError::AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown,
        ) => "the server wants a client certificate it trusts: give one, with its key",
        TlsError::InvalidMessage(_) => "the server does not seem to speak TLS",
        _ => "check the server's TLS settings against tally's",
    };
    Some(format!("{tls} ({hint})"))
}

/// The error and its causes, `: `-separated (the client's errors keep the reason, such as
/// the certificate problem, in their source).
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    tally_core::error::Chain(err).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comma_separated_list_is_several_servers() {
        let settings = ConnectSettings::from_urls(" nats://a:4222, nats://b:4222 ,,tls://c:4443");
        assert_eq!(
            settings.servers,
            ["nats://a:4222", "nats://b:4222", "tls://c:4443"]
        );
        assert_eq!(ConnectSettings::from("nats://a:4222").servers.len(), 1);
    }

    #[test]
    fn credentials_in_urls_are_not_shown() {
        let servers = [
            "nats://ingest:s3cret@a:4222".to_owned(),
            "tls://b:4443".to_owned(),
            "token@c:4222".to_owned(),
        ];
        assert_eq!(
            shown_servers(&servers),
            "nats://***@a:4222, tls://b:4443, ***@c:4222"
        );
    }

    #[test]
    fn debug_hides_secrets() {
        let settings = ConnectSettings {
            user: Some("ingest".into()),
            password: Some("hunter2-password".into()),
            token: Some("s3cret-token".into()),
            ..ConnectSettings::from_urls("nats://a:4222")
        };
        let shown = format!("{settings:?}");
        assert!(shown.contains("ingest"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    fn refusal(settings: &ConnectSettings) -> String {
        settings
            .check()
            .expect_err("settings refused")
            .chain()
            .to_string()
    }

    #[test]
    fn refuses_settings_that_cannot_work() {
        let base = ConnectSettings::from_urls("nats://a:4222");
        assert!(base.check().is_ok());
        assert!(refusal(&ConnectSettings::from_urls(" , ")).contains("no NATS server"));
        let no_password = ConnectSettings {
            user: Some("ingest".into()),
            ..base.clone()
        };
        assert!(refusal(&no_password).contains("`ingest` needs a password"));
        let two_ways = ConnectSettings {
            user: Some("ingest".into()),
            password: Some("pw".into()),
            token: Some("t".into()),
            ..base.clone()
        };
        assert!(refusal(&two_ways).contains("not user and password, token"));
        let half_a_pair = ConnectSettings {
            tls: TlsSettings {
                client_cert: Some("/tmp/cert.pem".into()),
                ..Default::default()
            },
            ..base.clone()
        };
        assert!(refusal(&half_a_pair).contains("certificate and its key"));
        let missing = ConnectSettings {
            tls: TlsSettings {
                ca_file: Some("/nonexistent/tally-ca.pem".into()),
                ..Default::default()
            },
            ..base
        };
        let text = refusal(&missing);
        assert!(
            text.contains("TLS CA file /nonexistent/tally-ca.pem"),
            "{text}"
        );
    }

    #[test]
    fn a_tls_file_requires_tls() {
        assert!(!TlsSettings::default().is_required());
        let with_ca = TlsSettings {
            ca_file: Some("ca.pem".into()),
            ..Default::default()
        };
        assert!(with_ca.is_required());
    }

    #[test]
    fn reads_the_seed_line_of_a_seed_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("user.nk");
        std::fs::write(&path, "Seed of tally-ingest:\n  SUAFAKESEED234\n").unwrap();
        assert_eq!(read_seed(&path).unwrap(), "SUAFAKESEED234");
        std::fs::write(&path, "Seed: none here\n").unwrap();
        let err = read_seed(&path).unwrap_err().chain().to_string();
        assert!(err.contains("no nkey seed"), "{err}");
    }
}
