//! The processor: reads each owned partition of the vote log in order, writes the
//! deduplicated votes and their tumbling-window aggregates to the warehouse, and publishes
//! full live totals per poll.
//!
//! In: log entries (versioned vote events). Out: `votes`, `vote_windows` and
//! `segment_rollups` rows, each stamped with the log sequence it covers, and [`Results`] on
//! the live feed. Raw votes are written per batch, before the batch's totals are published.
//! Window rows and rollups are collected over about a second (window rows and fresh
//! rollups) and about half a minute (settled rollups) of batches and written together, after
//! the totals are out (see [`tally_core::rollup`]): a ClickHouse insert is a part of files
//! written and merged later, whatever its size.
//!
//! Segment values are capped per poll and dimension: the first
//! [`MAX_SEGMENT_VALUES`](tally_core::segment::MAX_SEGMENT_VALUES) distinct values are kept,
//! later new ones are counted as `other` in every table, the same way on every replay (see
//! `partition/segments.rs`), so a voter cannot push a breakdown past its group cap.
//!
//! Exactly-once: every warehouse table knows how far it holds the log (its watermark). On
//! start the processor reads the watermarks and resumes after the lower one; an entry at or
//! below a table's watermark is never written to that table again. One insert is atomic, so
//! a crash at any point leaves each table either with a whole batch or without it. Log acks
//! only spare the broker redeliveries. One vote per voter is enforced by the log at intake
//! (one entry per uniqueness key), so every entry read is a vote to count.
//!
//! [`Results`]: tally_core::results::Results

mod leases;
mod partition;
mod retention;
mod windows;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tally_core::ports::{LiveFeed, PartitionLeases, PollRegistry, VoteLog, Warehouse};
use tally_service::http::health;
use tally_service::{PollCache, Tasks};
use tokio::net::TcpListener;

pub use windows::{PickBatch, Picks, WindowEngine};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] tally_core::Error),
    #[error("window aggregation")]
    Window(#[source] tally_core::error::BoxError),
    #[error("http listener")]
    Io(#[from] std::io::Error),
}

#[derive(Clone)]
pub struct Deps {
    pub log: Arc<dyn VoteLog>,
    pub registry: Arc<dyn PollRegistry>,
    pub warehouse: Arc<dyn Warehouse>,
    pub live: Arc<dyn LiveFeed>,
    /// Shares the partitions with other processors when [`Config::partitions`] is empty;
    /// without it, this processor takes every partition (the only one, or standalone).
    pub leases: Option<Leasing>,
}

/// How this processor shares partitions with the others.
#[derive(Clone)]
pub struct Leasing {
    pub leases: Arc<dyn PartitionLeases>,
    /// This processor's name among them: stable across its restarts, so a restarted
    /// processor takes its own leases back at once instead of waiting for them to expire.
    pub member: String,
}

/// The default width of the tumbling windows, in seconds.
pub const DEFAULT_WINDOW_SECONDS: u32 = 10;
/// The default largest batch read from the log and written at once.
pub const DEFAULT_BATCH_MAX: usize = 5_000;
/// The default time a poll stays closed before its counted votes leave the log: a day, so
/// a late retry is answered from the log, and a poll closed by mistake can be reopened.
pub const DEFAULT_PURGE_CLOSED_AFTER_SECONDS: u64 = 86_400;
/// The default time between writes of settled segment rollups.
pub const DEFAULT_SETTLE_SECONDS: u64 = 30;

#[derive(Debug, Clone)]
pub struct Config {
    /// Partitions this process owns; empty = all of them.
    pub partitions: Vec<u16>,
    pub batch_max: usize,
    /// How long a read waits for the first entry of a batch.
    pub batch_wait: Duration,
    pub window_seconds: u32,
    /// Fresh segment rollups are written once their oldest vote has waited this long, when
    /// this many votes are pending, or when the log falls quiet — whichever comes first.
    pub rollup_interval: Duration,
    pub rollup_votes: usize,
    /// Settled segment rollups are written with the first fresh write after their oldest
    /// vote has waited this long, or once this many votes are pending (which bounds the
    /// memory of segments that take many values).
    pub settle_interval: Duration,
    pub settle_votes: usize,
    /// How long a poll stays closed before its votes, once counted, leave a log that keeps
    /// them in a broker's memory (archived polls leave at once).
    pub purge_closed_after: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            partitions: Vec::new(),
            batch_max: DEFAULT_BATCH_MAX,
            batch_wait: Duration::from_millis(500),
            window_seconds: DEFAULT_WINDOW_SECONDS,
            rollup_interval: Duration::from_secs(1),
            rollup_votes: 100_000,
            settle_interval: Duration::from_secs(DEFAULT_SETTLE_SECONDS),
            settle_votes: 500_000,
            purge_closed_after: Duration::from_secs(DEFAULT_PURGE_CLOSED_AFTER_SECONDS),
        }
    }
}

/// Starts one worker per owned partition — the listed ones, or with [`Deps::leases`] those
/// it holds a lease on — and what they share (the window engine, the poll
/// cache), as tasks of `tasks`. They run until `tasks` shuts down; each finishes its current
/// batch and writes its pending rollups first.
pub fn start(deps: Deps, config: Config, tasks: &Tasks) -> Result<()> {
    describe_metrics();
    let engine = WindowEngine::start(config.window_seconds, tasks)?;
    let polls = PollCache::start(deps.registry.clone(), tasks);
    if config.partitions.is_empty() {
        if let Some(leasing) = deps.leases.clone() {
            let coordinator = leases::Coordinator {
                leases: leasing.leases,
                member: leasing.member,
                partitions: deps.log.partitions(),
                deps,
                config,
                polls,
                engine,
            };
            tasks.spawn("partition-leases", move |cancel| coordinator.run(cancel));
            return Ok(());
        }
    }
    let partitions: Vec<u16> = if config.partitions.is_empty() {
        (0..deps.log.partitions()).collect()
    } else {
        config.partitions.clone()
    };
    for partition in partitions {
        let worker = partition::Partition::new(
            partition,
            None,
            deps.clone(),
            config.clone(),
            polls.clone(),
            engine.clone(),
        );
        tasks.spawn("partition-worker", move |cancel| worker.run(cancel));
    }
    Ok(())
}

/// Describes the metrics the processor records.
fn describe_metrics() {
    // Help texts go to the recorder installed then: install the process's first.
    tally_service::http::observe::recorder();
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!("tally_processor_batch_size", "Log entries in a batch read");
    describe_counter!(
        "tally_votes_counted_total",
        "Votes written to the warehouse's votes table (each once)"
    );
    describe_histogram!(
        "tally_warehouse_insert_duration_seconds",
        Unit::Seconds,
        "Time of one warehouse insert (one attempt), by table"
    );
    describe_counter!(
        "tally_warehouse_insert_retries_total",
        "Failed warehouse inserts that were retried, by table"
    );
    describe_counter!(
        "tally_log_purged_votes_total",
        "Votes of finished polls removed from the vote log once counted"
    );
    describe_gauge!(
        "tally_processor_partitions_owned",
        "Partitions this processor holds a lease on and processes"
    );
    describe_gauge!(
        "tally_processor_lag",
        "Log entries of a partition not yet processed (log tip minus the processor's position)"
    );
}

/// Readiness checks of what the processor depends on.
pub fn probes(deps: &Deps) -> Vec<health::Probe> {
    vec![
        health::vote_log(deps.log.clone()),
        health::warehouse(deps.warehouse.clone()),
    ]
}

/// How long a stopping processor waits for its workers to finish their batches.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Runs the processor until `shutdown` resolves; serves `/healthz` and `/readyz` on
/// `listener`. Returns once every partition has finished its current batch.
pub async fn run(
    listener: TcpListener,
    deps: Deps,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let app = health::service(
        "processor",
        axum::Router::new(),
        probes(&deps),
        health::REQUEST_TIMEOUT,
    );
    let tasks = Tasks::new();
    start(deps, config, &tasks)?;
    // Health stays up while the workers finish their batches.
    let http_stop = tally_service::tasks::CancellationToken::new();
    let http_stopped = http_stop.clone();
    let server = tokio::spawn(tally_service::http::serve(
        listener,
        app,
        tally_service::http::ServeConfig::default(),
        async move { http_stopped.cancelled().await },
    ));
    shutdown.await;
    tasks.shutdown(SHUTDOWN_GRACE).await;
    http_stop.cancel();
    let _ = server.await;
    Ok(())
}
