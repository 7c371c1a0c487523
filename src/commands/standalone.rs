//! `tally standalone`: ingest, processor and query in one process on the embedded back ends,
//! every route on one listener.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tally_core::ports::Warehouse;
use tally_core::secrets::Secrets;
use tally_service::http::health;
use tally_service::Tasks;
use tokio::net::TcpListener;

use crate::config::{
    shutdown_signal, Keys, LimitArgs, Listen8080, Live, Processing, ProxyArgs, Serving, SqlArgs,
    Timeout,
};
use crate::demo;

#[derive(Args)]
pub struct StandaloneArgs {
    #[command(flatten)]
    timeout: Timeout,
    #[command(flatten)]
    serving: Serving,
    #[command(flatten)]
    listen: Listen8080,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    proxies: ProxyArgs,
    /// Where votes, polls and the warehouse are kept.
    #[arg(long, env = "TALLY_DATA_DIR", default_value = "tally-data")]
    data_dir: PathBuf,
    /// Vote log partitions: processor workers that run side by side.
    #[arg(long, env = "TALLY_PARTITIONS", default_value_t = 2)]
    partitions: u16,
    /// Voters' keys the vote log holds in memory (~130 bytes each) before it writes them into
    /// its uniqueness index, in key order: more make fewer index writes per vote once it
    /// holds millions
    #[arg(long, env = "TALLY_LOG_MERGE_AT", default_value_t = 200_000,
          value_parser = clap::value_parser!(u32).range(1..=5_000_000))]
    log_merge_at: u32,
    /// Microseconds a vote may wait, from when it reaches the vote log, for more votes to
    /// join its durable commit while votes come side by side (a vote that comes alone never
    /// waits): one commit's fsync then serves more votes. 0 commits every group at once, for
    /// the lowest latency at a higher CPU cost per vote
    #[arg(long, env = "TALLY_LOG_GROUP_WAIT_US", default_value_t = tally_embedded::LOG_GROUP_WAIT.as_micros() as u32,
          value_parser = clap::value_parser!(u32).range(0..=100_000))]
    log_group_wait_us: u32,
    #[command(flatten)]
    keys: Keys,
    /// Server secret for hashing voter ids and signing voter tokens; generated and kept in
    /// the data directory when not given.
    #[arg(long, env = "TALLY_SECRET", hide_env_values = true)]
    secret: Option<String>,
    #[command(flatten)]
    processing: Processing,
    #[command(flatten)]
    live: Live,
    #[command(flatten)]
    sql: SqlArgs,
    /// Creates a sample poll and feeds it synthetic votes.
    #[arg(long)]
    demo: bool,
}

impl StandaloneArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let listener = TcpListener::bind(&self.listen.addr)
            .await
            .with_context(|| format!("binding {}", self.listen.addr))?;
        run(listener, self, shutdown_signal()).await
    }
}

/// How long a stopping process waits for its background tasks (the processor's workers
/// finishing their batches among them).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Reads a generated secret from `path`, or makes one and stores it there (mode 0600).
fn stored_secret(path: &Path, prefix: &str) -> anyhow::Result<(String, bool)> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        let existing = existing.trim().to_owned();
        if !existing.is_empty() {
            return Ok((existing, false));
        }
    }
    let value = format!(
        "{prefix}{}",
        tally_core::text::hex(&rand::random::<[u8; 24]>())
    );
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
    use tally_core::ports::VoteLog;
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

async fn run(
    listener: TcpListener,
    settings: StandaloneArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let dir = &settings.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let store = tally_embedded::open(
        dir,
        tally_embedded::Options {
            partitions: settings.partitions.max(1),
            log_merge_at: settings.log_merge_at as usize,
            log_group_wait: Some(Duration::from_micros(settings.log_group_wait_us.into())),
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
    let mut keys = settings.keys.clone();
    let mut generated_key = None;
    if keys.admin_keys.is_empty() {
        let (key, fresh) = stored_secret(&dir.join("admin-key"), "tly_admin_")?;
        generated_key = Some((key.clone(), fresh));
        keys.admin_keys.push(key);
    }
    let api_keys = keys.api_keys()?;
    let secrets = Secrets::new(secret.as_bytes()).map_err(anyhow::Error::msg)?;

    let tasks = Tasks::new();
    let flushed = store.warehouse.clone();
    tasks.spawn("warehouse-flusher", move |cancel| async move {
        flushed.flush_periodically(cancel).await
    });
    let ingest = tally_ingest::Ingest::new(
        tally_ingest::Deps {
            log: store.log.clone(),
            registry: store.registry.clone(),
            // The embedded log keeps every entry: it answers every late retry.
            warehouse: None,
        },
        tally_ingest::Config {
            secret: secret.clone().into_bytes(),
            keys: api_keys.clone(),
            limits: settings.limits.config(&settings.proxies),
            request_timeout: settings.timeout.duration(),
            ..Default::default()
        },
        &tasks,
    )?;
    let query = tally_query::App::new(
        tally_query::Deps {
            registry: store.registry.clone(),
            warehouse: store.warehouse.clone(),
            live: store.live.clone(),
        },
        tally_query::Config {
            sql_limits: settings.sql.limits(),
            // One listener serves every route, the vote routes among them.
            openapi: Some(tally_query::openapi::Document(
                tally_query::openapi::document(
                    tally_ingest::openapi(),
                    tally_query::openapi::Votes::Here,
                ),
            )),
            ..settings.live.config(
                api_keys,
                Some(secrets),
                &settings.proxies,
                &settings.timeout,
            )
        },
        &tasks,
    );
    let processor_deps = tally_processor::Deps {
        log: store.log.clone(),
        registry: store.registry.clone(),
        warehouse: store.warehouse.clone(),
        live: store.live.clone(),
        leases: None,
    };
    let probes = vec![
        health::vote_log(store.log.clone()),
        health::poll_registry(store.registry.clone()),
        health::warehouse(store.warehouse.clone()),
    ];
    tally_processor::start(
        processor_deps,
        settings.processing.config(Vec::new()),
        &tasks,
    )?;
    catch_up(&store).await?;
    let draining = query.clone();
    let app = health::service(
        "standalone",
        tally_ingest::api(ingest.clone()).merge(tally_query::api(query)),
        probes,
        settings.timeout.duration(),
    );

    let local = listener.local_addr()?;
    // Scripts and tests read the first line to find the port.
    println!("tally standalone listening on http://{local}");
    println!("data directory: {}", dir.display());
    // The generated key is shown once, when it is made; after that only where it is kept
    // (a key in every start's output ends up in every log collector).
    match &generated_key {
        Some((key, true)) => println!(
            "admin API key (generated, stored in {}): {key}",
            dir.join("admin-key").display()
        ),
        Some((_, false)) => println!(
            "admin API key: in {} (made on first start)",
            dir.join("admin-key").display()
        ),
        None => println!("admin API keys: as configured"),
    }
    if settings.demo {
        let poll = demo::start(ingest, store.registry.clone(), &tasks).await?;
        println!("demo: live results at http://{local}/v1/polls/{poll}/results and http://{local}/v1/polls/{poll}/live");
    }
    let _ = std::io::stdout().flush();

    tally_service::http::serve(listener, app, settings.serving.config(), async move {
        shutdown.await;
        // Live streams end with a `reconnect` event, so the drain does not wait on them.
        draining.drain();
    })
    .await?;
    // The processor's workers finish their batches and write their rollups; then whatever
    // the warehouse still holds in memory goes to disk.
    tasks.shutdown(SHUTDOWN_GRACE).await;
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
