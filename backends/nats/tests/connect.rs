//! Connecting to brokers that want proof of who tally is: user and password, a token, an
//! nkey, TLS with a CA the test makes, a client certificate; and to a list of servers of
//! which some are down. Every test here needs a nats-server (`needs_nats` in its name).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tally_core::ErrorKind;
use tally_nats::{connect, ConnectSettings, TlsSettings};
use tally_testkit::{free_port, require, NatsAccess, NatsOptions, NatsServer, NatsTls};

/// Long enough for a slow machine; a refusal must come long before it.
const PATIENCE: Duration = Duration::from_secs(10);

fn settings(server: &NatsServer) -> ConnectSettings {
    ConnectSettings::from_urls(&server.url())
}

/// Connects and proves the connection carries messages (a round trip to the server).
async fn connects(settings: &ConnectSettings) -> anyhow::Result<()> {
    let client = connect(settings, PATIENCE).await?;
    client.flush().await?;
    Ok(())
}

/// The refusal of `settings`, as logged; fails the test if it connects or takes its
/// patience to give up (a refusal is final, not retried).
async fn refusal(settings: &ConnectSettings) -> String {
    let started = Instant::now();
    let err = connect(settings, PATIENCE)
        .await
        .expect_err("the server refuses these settings");
    assert!(
        started.elapsed() < PATIENCE / 2,
        "a refusal was retried for {:?}",
        started.elapsed()
    );
    assert_eq!(err.kind(), ErrorKind::Failed, "a refusal is not an outage");
    err.chain().to_string()
}

async fn secured(access: NatsAccess) -> NatsServer {
    NatsServer::start_secured(NatsOptions::default(), access)
        .await
        .expect("nats-server")
}

#[tokio::test]
async fn needs_nats_user_and_password() {
    require!(NatsServer);
    let server = secured(NatsAccess {
        users: vec![("tally-ingest".into(), "the-right-password".into())],
        ..Default::default()
    })
    .await;
    let with = |password: &str| ConnectSettings {
        user: Some("tally-ingest".into()),
        password: Some(password.into()),
        ..settings(&server)
    };

    connects(&with("the-right-password")).await.unwrap();

    let wrong = refusal(&with("a-wrong-password")).await;
    assert!(
        wrong.contains("refused user `tally-ingest` and its password"),
        "{wrong}"
    );
    assert!(wrong.contains("authorization violation"), "{wrong}");
    assert!(!wrong.contains("a-wrong-password"), "{wrong}");

    let anonymous = refusal(&settings(&server)).await;
    assert!(anonymous.contains("refused no credentials"), "{anonymous}");
}

#[tokio::test]
async fn needs_nats_token() {
    require!(NatsServer);
    let server = secured(NatsAccess {
        token: Some("the-right-token".into()),
        ..Default::default()
    })
    .await;
    let with = |token: &str| ConnectSettings {
        token: Some(token.into()),
        ..settings(&server)
    };

    connects(&with("the-right-token")).await.unwrap();

    let wrong = refusal(&with("a-wrong-token")).await;
    assert!(wrong.contains("refused the token"), "{wrong}");
    assert!(wrong.contains("authorization violation"), "{wrong}");
    assert!(!wrong.contains("a-wrong-token"), "{wrong}");
}

#[tokio::test]
async fn needs_nats_nkey_seed_file() {
    require!(NatsServer);
    let dir = tempfile::tempdir().unwrap();
    let known = nkeys::KeyPair::new_user();
    let stranger = nkeys::KeyPair::new_user();
    let server = secured(NatsAccess {
        nkeys: vec![known.public_key()],
        ..Default::default()
    })
    .await;
    let with = |pair: &nkeys::KeyPair, name: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pair.seed().unwrap() + "\n").unwrap();
        ConnectSettings {
            nkey_seed_file: Some(path),
            ..settings(&server)
        }
    };

    connects(&with(&known, "known.nk")).await.unwrap();

    let wrong = refusal(&with(&stranger, "stranger.nk")).await;
    assert!(wrong.contains("refused the nkey seed in"), "{wrong}");
    assert!(wrong.contains("stranger.nk"), "{wrong}");
}

/// A CA, and certificates it signed for the server (127.0.0.1 and localhost) and a client.
struct Certificates {
    dir: tempfile::TempDir,
}

impl Certificates {
    fn make() -> Certificates {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();

        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "tally test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        write("ca.pem", ca.pem());

        let leaf = |names: Vec<String>, purpose: ExtendedKeyUsagePurpose, stem: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, format!("tally test {stem}"));
            params.extended_key_usages = vec![purpose];
            let cert = params.signed_by(&key, &ca).unwrap();
            write(&format!("{stem}.pem"), cert.pem());
            write(&format!("{stem}-key.pem"), key.serialize_pem());
        };
        leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "server",
        );
        leaf(
            vec!["tally-processor".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "client",
        );
        Certificates { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server_tls(&self, verify_clients: bool) -> NatsTls {
        NatsTls {
            cert_file: self.path("server.pem"),
            key_file: self.path("server-key.pem"),
            ca_file: verify_clients.then(|| self.path("ca.pem")),
            verify_clients,
        }
    }
}

fn tls_with(ca: Option<&Path>, client: Option<(&Path, &Path)>) -> TlsSettings {
    TlsSettings {
        required: true,
        ca_file: ca.map(Path::to_owned),
        client_cert: client.map(|(cert, _)| cert.to_owned()),
        client_key: client.map(|(_, key)| key.to_owned()),
    }
}

#[tokio::test]
async fn needs_nats_tls_with_the_servers_ca() {
    require!(NatsServer);
    let certs = Certificates::make();
    let server = secured(NatsAccess {
        tls: Some(certs.server_tls(false)),
        ..Default::default()
    })
    .await;
    let ca = certs.path("ca.pem");

    connects(&ConnectSettings {
        tls: tls_with(Some(&ca), None),
        ..settings(&server)
    })
    .await
    .unwrap();
    // `tls://` asks for TLS too, and `localhost` is in the certificate as well.
    connects(&ConnectSettings {
        tls: tls_with(Some(&ca), None),
        ..ConnectSettings::from_urls(&format!("tls://localhost:{}", server.port()))
    })
    .await
    .unwrap();

    // Without the CA the system's roots are trusted, and none of them signed the server's;
    // nor does a client told nothing of TLS fall back to plaintext (the server asks for TLS).
    for tls in [tls_with(None, None), TlsSettings::default()] {
        let unknown = refusal(&ConnectSettings {
            tls,
            ..settings(&server)
        })
        .await;
        assert!(unknown.contains("TLS with the NATS server"), "{unknown}");
        assert!(unknown.contains("UnknownIssuer"), "{unknown}");
        assert!(unknown.contains("give the CA file"), "{unknown}");
    }

    // A client that requires TLS does not talk to a plaintext server.
    let plaintext = NatsServer::start().await.expect("nats-server");
    let downgraded = refusal(&ConnectSettings {
        tls: tls_with(Some(&ca), None),
        ..settings(&plaintext)
    })
    .await;
    assert!(
        downgraded.contains("does not seem to speak TLS"),
        "{downgraded}"
    );
}

#[tokio::test]
async fn needs_nats_tls_client_certificate() {
    require!(NatsServer);
    let certs = Certificates::make();
    let server = secured(NatsAccess {
        tls: Some(certs.server_tls(true)),
        ..Default::default()
    })
    .await;
    let ca = certs.path("ca.pem");
    let (cert, key) = (certs.path("client.pem"), certs.path("client-key.pem"));

    connects(&ConnectSettings {
        tls: tls_with(Some(&ca), Some((&cert, &key))),
        ..settings(&server)
    })
    .await
    .unwrap();

    // The server asks for a client certificate and refuses to go on without one.
    let without = refusal(&ConnectSettings {
        tls: tls_with(Some(&ca), None),
        ..settings(&server)
    })
    .await;
    assert!(without.contains("CertificateRequired"), "{without}");
    assert!(without.contains("wants a client certificate"), "{without}");

    // Nor does a certificate of a CA the server does not know get in.
    let stranger = Certificates::make();
    let untrusted = refusal(&ConnectSettings {
        tls: tls_with(
            Some(&ca),
            Some((
                &stranger.path("client.pem"),
                &stranger.path("client-key.pem"),
            )),
        ),
        ..settings(&server)
    })
    .await;
    assert!(
        untrusted.contains("wants a client certificate"),
        "{untrusted}"
    );
}

#[tokio::test]
async fn needs_nats_a_comma_separated_server_list() {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let dead = format!("nats://127.0.0.1:{}", free_port());
    // Both orders: the client shuffles the list, so either server may be tried first.
    for urls in [
        format!("{dead},{}", server.url()),
        format!("{} , {dead}", server.url()),
    ] {
        let client = connect(urls.as_str(), PATIENCE)
            .await
            .unwrap_or_else(|err| panic!("{urls}: {}", err.chain()));
        client.flush().await.unwrap();
    }

    // None answering is an outage (retried, then unavailable), naming every server.
    let other_dead = format!("nats://127.0.0.1:{}", free_port());
    let err = connect(
        format!("{dead},{other_dead}").as_str(),
        Duration::from_millis(500),
    )
    .await
    .expect_err("no server answers");
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    let text = err.chain().to_string();
    assert!(text.contains(&dead) && text.contains(&other_dead), "{text}");
}
