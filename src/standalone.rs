//! `tally standalone`: ingest, processor and query in one process on the embedded back ends,
//! every route on one listener.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tally_core::auth::ApiKeys;
use tally_core::backend::Warehouse;
use tally_core::health;
use tokio::net::TcpListener;

use crate::demo;

pub struct Settings {
    pub data_dir: PathBuf,
    pub partitions: u16,
    pub admin_keys: Vec<String>,
    pub analyst_keys: Vec<String>,
    pub secret: Option<String>,
    pub window_seconds: u32,
    pub batch_max: usize,
    pub settle_interval: Duration,
    pub sse_heartbeat: Duration,
    pub demo: bool,
    pub limits: tally_ingest::limits::LimitConfig,
    pub live_max_clients: usize,
    pub request_timeout: Duration,
}

/// Reads a generated secret from `path`, or makes one and stores it there (mode 0600).
fn stored_secret(path: &Path, prefix: &str) -> anyhow::Result<(String, bool)> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        let existing = existing.trim().to_owned();
        if !existing.is_empty() {
            return Ok((existing, false));
        }
    }
    let value = format!("{prefix}{}", hex(&rand::random::<[u8; 24]>()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(file, "{value}")?;
    file.sync_all()?;
    Ok((value, true))
}

/// Waits until the processor holds in the warehouse every vote the log held at open.
///
/// The warehouse keeps its newest rows in memory and writes them to Parquet every few
/// seconds; after a crash they are gone and its watermarks fall back to the last file, and
/// the processor re-reads the rest from the log, which keeps every accepted vote. Serving
/// only after that keeps results and live totals from showing less than before the crash.
async fn catch_up(store: &tally_embedded::Embedded) -> anyhow::Result<()> {
    use tally_core::backend::VoteLog;
    let started = std::time::Instant::now();
    let mut reported = started;
    for partition in 0..store.log.partitions() {
        let tip = store.log.tip(partition);
        loop {
            let marks = store.warehouse.watermarks(partition).await?;
            // Settled rollups may trail by half a minute; breakdowns are exact without them.
            let held = marks.votes.min(marks.windows).min(marks.rollups_covered());
            if held >= tip {
                break;
            }
            if reported.elapsed() >= Duration::from_secs(5) {
                reported = std::time::Instant::now();
                tracing::info!(
                    partition,
                    held,
                    tip,
                    "catching up with the vote log before serving"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if started.elapsed() >= Duration::from_millis(100) {
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            "caught up with the vote log"
        );
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let dir = &settings.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let store = tally_embedded::open(
        dir,
        tally_embedded::Options {
            partitions: settings.partitions.max(1),
            ..Default::default()
        },
    )
    .context("opening the data directory")?;
    store
        .warehouse
        .migrate()
        .await
        .context("preparing the warehouse")?;

    let secret = match settings.secret {
        Some(secret) => secret,
        None => stored_secret(&dir.join("secret"), "")?.0,
    };
    let mut admin_keys = settings.admin_keys;
    let mut generated_key = None;
    if admin_keys.is_empty() {
        let (key, fresh) = stored_secret(&dir.join("admin-key"), "tly_admin_")?;
        generated_key = Some((key.clone(), fresh));
        admin_keys.push(key);
    }

    let ingest = tally_ingest::Ingest::new(
        tally_ingest::Deps {
            log: store.log.clone(),
            registry: store.registry.clone(),
        },
        tally_ingest::Config {
            secret: secret.clone().into_bytes(),
            limits: settings.limits,
            request_timeout: settings.request_timeout,
            ..Default::default()
        },
    )?;
    let query = tally_query::App::new(
        tally_query::Deps {
            registry: store.registry.clone(),
            warehouse: store.warehouse.clone(),
            live: store.live.clone(),
        },
        tally_query::Config {
            keys: ApiKeys::new(&admin_keys, &settings.analyst_keys),
            window_seconds: settings.window_seconds,
            live_heartbeat: settings.sse_heartbeat,
            live_max_clients: settings.live_max_clients,
            secret: Some(secret.into_bytes()),
            ..Default::default()
        },
    );
    let processor_deps = tally_processor::Deps {
        log: store.log.clone(),
        registry: store.registry.clone(),
        warehouse: store.warehouse.clone(),
        live: store.live.clone(),
    };
    let probes = vec![
        health::vote_log(store.log.clone()),
        health::poll_registry(store.registry.clone()),
        health::warehouse(store.warehouse.clone()),
    ];
    let processor = tally_processor::start(
        processor_deps,
        tally_processor::Config {
            window_seconds: settings.window_seconds,
            batch_max: settings.batch_max,
            settle_interval: settings.settle_interval,
            ..Default::default()
        },
    )?;
    catch_up(&store).await?;
    let app = health::service(
        tally_ingest::api(ingest.clone()).merge(tally_query::api(query)),
        probes,
        settings.request_timeout,
    );

    let local = listener.local_addr()?;
    // Scripts and tests read the first line to find the port.
    println!("tally standalone listening on http://{local}");
    println!("data directory: {}", dir.display());
    match &generated_key {
        Some((key, true)) => println!(
            "admin API key (generated, stored in {}): {key}",
            dir.join("admin-key").display()
        ),
        Some((key, false)) => println!(
            "admin API key (from {}): {key}",
            dir.join("admin-key").display()
        ),
        None => println!("admin API keys: as configured"),
    }
    if settings.demo {
        let poll = demo::start(ingest, store.registry.clone()).await?;
        println!("demo: live results at http://{local}/v1/polls/{poll}/results and http://{local}/v1/polls/{poll}/live");
    }
    let _ = std::io::stdout().flush();

    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await?;
    processor.stop().await;
    store
        .warehouse
        .flush_all()
        .await
        .context("writing the warehouse tail")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_are_stored_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin-key");
        let (first, fresh) = stored_secret(&path, "tly_admin_").unwrap();
        assert!(fresh && first.starts_with("tly_admin_") && first.len() == 10 + 48);
        let (again, fresh) = stored_secret(&path, "tly_admin_").unwrap();
        assert!(!fresh);
        assert_eq!(first, again);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
