//! The processor: reads each owned partition of the vote log in order, writes the
//! deduplicated votes and their tumbling-window aggregates to the warehouse, and publishes
//! full live totals per poll.
//!
//! In: log entries (versioned vote events). Out: `votes`, `vote_windows` and
//! `segment_rollups` rows, each stamped with the log sequence it covers, and [`Results`] on
//! the live feed. Rollups are collected over about a second (fresh) and about half a minute
//! (settled) of batches and written together (see [`tally_core::rollup`]); the others are
//! written per batch.
//!
//! Exactly-once: every warehouse table knows how far it holds the log (its watermark). On
//! start the processor reads the watermarks and resumes after the lower one; an entry at or
//! below a table's watermark is never written to that table again. One insert is atomic, so
//! a crash at any point leaves each table either with a whole batch or without it. Log acks
//! only spare the broker redeliveries. One vote per voter is enforced by the log at intake
//! (one entry per uniqueness key), so every entry read is a vote to count.

mod windows;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tally_core::backend::{
    Backoff, LiveFeed, LogEntry, PollRegistry, StoredVote, VoteLog, Warehouse, Watermarks,
};
use tally_core::poll::Dedupe;
use tally_core::polls::PollCache;
use tally_core::results::{Results, Tally};
use tally_core::rollup::{RollupLevel, Rollups};
use tally_core::{health, wire};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use windows::{Pick, WindowEngine};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] tally_core::Error),
    #[error("window aggregation: {0}")]
    Window(String),
    #[error("http listener: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone)]
pub struct Deps {
    pub log: Arc<dyn VoteLog>,
    pub registry: Arc<dyn PollRegistry>,
    pub warehouse: Arc<dyn Warehouse>,
    pub live: Arc<dyn LiveFeed>,
}

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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            partitions: Vec::new(),
            batch_max: 5_000,
            batch_wait: Duration::from_millis(500),
            window_seconds: 10,
            rollup_interval: Duration::from_secs(1),
            rollup_votes: 100_000,
            settle_interval: Duration::from_secs(30),
            settle_votes: 500_000,
        }
    }
}

/// A processor at work: one worker per owned partition.
pub struct Running {
    stop: watch::Sender<bool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Asks every worker to stop and waits until each has finished its current batch.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for worker in self.workers {
            let _ = worker.await;
        }
    }
}

/// Starts the partition workers; they run until [`Running::stop`].
pub fn start(deps: Deps, config: Config) -> Result<Running> {
    let engine = WindowEngine::start(config.window_seconds)?;
    let polls = PollCache::start(deps.registry.clone());
    let (stop, stop_rx) = watch::channel(false);
    let partitions: Vec<u16> = if config.partitions.is_empty() {
        (0..deps.log.partitions()).collect()
    } else {
        config.partitions.clone()
    };
    let workers = partitions
        .into_iter()
        .map(|partition| {
            let worker = Partition::new(
                partition,
                deps.clone(),
                config.clone(),
                polls.clone(),
                engine.clone(),
                stop_rx.clone(),
            );
            tokio::spawn(worker.run())
        })
        .collect();
    Ok(Running { stop, workers })
}

/// Readiness checks of what the processor depends on.
pub fn probes(deps: &Deps) -> Vec<health::Probe> {
    vec![
        health::vote_log(deps.log.clone()),
        health::warehouse(deps.warehouse.clone()),
    ]
}

/// Runs the processor until `shutdown` resolves; serves `/healthz` and `/readyz` on
/// `listener`. Returns once every partition has finished its current batch.
pub async fn run(
    listener: TcpListener,
    deps: Deps,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let app = health::service(axum::Router::new(), probes(&deps), health::REQUEST_TIMEOUT);
    let running = start(deps, config)?;
    let (http_stop, mut http_stopped) = watch::channel(false);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = http_stopped.wait_for(|stop| *stop).await;
    });
    let server = tokio::spawn(async move { server.await });
    shutdown.await;
    running.stop().await;
    let _ = http_stop.send(true);
    let _ = server.await;
    Ok(())
}

/// Counting state of one poll, as of the `votes` table's watermark.
struct PollState {
    tally: Tally,
    /// Voter keys seen, only for `dedupe: none` polls (on `per_voter` polls every counted
    /// vote is a new voter, which the log guarantees).
    voters: Option<HashSet<String>>,
}

struct Partition {
    partition: u16,
    deps: Deps,
    config: Config,
    polls: Arc<PollCache>,
    engine: WindowEngine,
    stop: watch::Receiver<bool>,
    watermarks: Watermarks,
    states: HashMap<String, PollState>,
    /// Votes after each rollup watermark not yet written as rollup rows.
    fresh: Rollups,
    settled: Rollups,
}

impl Partition {
    fn new(
        partition: u16,
        deps: Deps,
        config: Config,
        polls: Arc<PollCache>,
        engine: WindowEngine,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Partition {
            partition,
            deps,
            config,
            polls,
            engine,
            stop,
            watermarks: Watermarks::default(),
            states: HashMap::new(),
            fresh: Rollups::default(),
            settled: Rollups::default(),
        }
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Waits `delay` unless asked to stop first; returns whether to go on.
    async fn pause(&mut self, delay: Duration) -> bool {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => !self.stopping(),
            _ = stop.wait_for(|stop| *stop) => false,
        }
    }

    async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let (partition, warehouse, log) = (
            self.partition,
            self.deps.warehouse.clone(),
            self.deps.log.clone(),
        );
        while !self.stopping() {
            // (Re)start from the warehouse: it is the source of truth for positions.
            let Some(watermarks) = self
                .retry("read watermarks", || warehouse.watermarks(partition))
                .await
            else {
                return;
            };
            let start = watermarks.lowest();
            let Some(mut reader) = self
                .retry("open the vote log", || log.reader(partition, start))
                .await
            else {
                return;
            };
            self.watermarks = watermarks;
            self.states.clear();
            self.fresh.clear();
            self.settled.clear();
            tracing::info!(
                partition,
                votes = watermarks.votes,
                windows = watermarks.windows,
                rollups = watermarks.rollups,
                settled = watermarks.settled,
                "processing from watermarks"
            );
            loop {
                let mut stop = self.stop.clone();
                let batch = tokio::select! {
                    batch = reader.next_batch(self.config.batch_max, self.config.batch_wait) => Some(batch),
                    _ = stop.wait_for(|stop| *stop) => None,
                };
                let Some(batch) = batch else {
                    self.write_rollups(true).await;
                    return;
                };
                let batch = match batch {
                    Ok(batch) if batch.is_empty() => {
                        // The log is quiet: bring the rollups up to date.
                        if !self.write_rollups(false).await {
                            return;
                        }
                        continue;
                    }
                    Ok(batch) => batch,
                    Err(err) => {
                        tracing::warn!(partition, error = %err, "reading the vote log failed, reopening");
                        break;
                    }
                };
                let last = batch.last().map(|e| e.seq).unwrap_or(0);
                if !self.process(batch).await {
                    return;
                }
                backoff.reset();
                failpoint("before-ack");
                if let Err(err) = reader.commit(last).await {
                    tracing::debug!(partition, error = %err, "ack failed; the watermark still holds");
                }
                failpoint("after-commit");
            }
            let delay = backoff.next_delay();
            if !self.pause(delay).await {
                return;
            }
        }
    }

    /// Writes one batch to every table that does not hold it yet, then publishes totals.
    /// Retries writes until they succeed; returns false only when stopping.
    async fn process(&mut self, batch: Vec<LogEntry>) -> bool {
        let started = std::time::Instant::now();
        let mut stages = [Duration::ZERO; 4];
        let entries = batch.len();
        let last_seq = batch.last().map(|e| e.seq).unwrap_or(0);
        let mut votes = Vec::with_capacity(batch.len());
        for entry in batch {
            match wire::decode(&entry.payload) {
                Ok(vote) => votes.push(StoredVote {
                    seq: entry.seq,
                    vote,
                }),
                // Only ingest writes the log and it writes valid events; an undecodable entry
                // was never a 202 and counting it is impossible, so it is logged and skipped.
                Err(err) => {
                    tracing::error!(partition = self.partition, seq = entry.seq, error = %err, "skipping undecodable log entry")
                }
            }
        }

        // Entries are in sequence order, so what a table lacks is a suffix of the batch.
        let new_votes = &votes[votes.partition_point(|v| v.seq <= self.watermarks.votes)..];
        let window_votes = &votes[votes.partition_point(|v| v.seq <= self.watermarks.windows)..];
        stages[0] = started.elapsed();
        if !new_votes.is_empty() {
            if !self.load_states(new_votes).await {
                return false;
            }
            let warehouse = self.deps.warehouse.clone();
            let partition = self.partition;
            let covered = new_votes.last().map_or(0, |v| v.seq);
            if !self
                .insert(
                    "insert votes",
                    covered,
                    |m| m.votes,
                    || warehouse.insert_votes(partition, new_votes),
                )
                .await
            {
                return false;
            }
            failpoint("after-votes-insert");
            debug_assert!(
                last_seq > self.watermarks.votes,
                "the votes watermark only moves forward"
            );
            self.watermarks.votes = last_seq;
        }
        stages[1] = started.elapsed();

        let picks: Vec<Pick> = window_votes
            .iter()
            .flat_map(|v| {
                v.vote.choice.iter().map(|option| Pick {
                    poll_id: v.vote.poll_id.clone(),
                    received_ms: v.vote.received_at,
                    option: option.clone(),
                })
            })
            .collect();
        if !picks.is_empty() {
            let picks = Arc::new(picks);
            let rows = loop {
                match self.engine.windows(picks.clone(), last_seq).await {
                    Ok(rows) => break rows,
                    Err(err) => {
                        tracing::error!(partition = self.partition, error = %err, "window aggregation failed, retrying");
                        if !self.pause(Duration::from_secs(1)).await {
                            return false;
                        }
                    }
                }
            };
            let warehouse = self.deps.warehouse.clone();
            let partition = self.partition;
            if !self
                .insert(
                    "insert windows",
                    last_seq,
                    |m| m.windows,
                    || warehouse.insert_windows(partition, &rows),
                )
                .await
            {
                return false;
            }
            self.watermarks.windows = last_seq;
        }
        stages[2] = started.elapsed();

        self.count_and_publish(new_votes).await;
        stages[3] = started.elapsed();

        // Rollups after the totals are out, so their write never delays live results. Votes
        // the settled rows hold go nowhere; votes the fresh rows already hold (a replay after
        // a restart) go to the settled ones directly; the rest go to the fresh ones and reach
        // the settled ones when they are written. So a fresh write never reaches back over
        // the settled position, even when fresh rows were lost and their watermark is lower.
        let (settled_mark, fresh_mark) = (self.watermarks.settled, self.watermarks.rollups);
        for stored in &votes[votes.partition_point(|v| v.seq <= settled_mark)..] {
            if stored.seq <= fresh_mark {
                self.settled.add(&stored.vote, last_seq.min(fresh_mark));
            } else {
                self.fresh.add(&stored.vote, last_seq);
            }
        }
        if (self.fresh.votes() >= self.config.rollup_votes
            || self.fresh.age() >= self.config.rollup_interval)
            && !self.write_rollups(false).await
        {
            return false;
        }
        // Where a batch's time goes, cumulative ms after: decode, raw-vote insert, windows
        // and their insert, counting and publishing.
        tracing::debug!(
            partition = self.partition,
            entries,
            decoded_ms = stages[0].as_millis() as u64,
            votes_written_ms = stages[1].as_millis() as u64,
            windows_written_ms = stages[2].as_millis() as u64,
            published_ms = stages[3].as_millis() as u64,
            "batch processed"
        );
        true
    }

    /// Writes the pending fresh rollups, then the settled ones when they are due (or
    /// `settle_now`) and end where the fresh rows end — a breakdown relies on every settled
    /// write ending at a fresh write's position. Retries until written; false only when
    /// stopping first.
    async fn write_rollups(&mut self, settle_now: bool) -> bool {
        if self.fresh.votes() > 0 {
            if !self.write_level(RollupLevel::Fresh).await {
                return false;
            }
            failpoint("after-rollups-insert");
        }
        let due = settle_now
            || self.settled.age() >= self.config.settle_interval
            || self.settled.votes() >= self.config.settle_votes;
        if self.settled.votes() > 0 && due && self.settled.last_seq() == self.watermarks.rollups {
            return self.write_level(RollupLevel::Settled).await;
        }
        true
    }

    async fn write_level(&mut self, level: RollupLevel) -> bool {
        let pending = match level {
            RollupLevel::Fresh => &self.fresh,
            RollupLevel::Settled => &self.settled,
        };
        let rows = pending.rows();
        let covered = pending.last_seq();
        let votes = pending.votes();
        let warehouse = self.deps.warehouse.clone();
        let partition = self.partition;
        let mark = match level {
            RollupLevel::Fresh => |m: &Watermarks| m.rollups,
            RollupLevel::Settled => |m: &Watermarks| m.settled,
        };
        if !self
            .insert("insert rollups", covered, mark, || {
                warehouse.insert_rollups(partition, level, &rows)
            })
            .await
        {
            return false;
        }
        tracing::debug!(
            partition,
            ?level,
            votes,
            rows = rows.len(),
            covered,
            "rollups written"
        );
        match level {
            RollupLevel::Fresh => {
                self.watermarks.rollups = covered;
                self.settled.merge(&self.fresh);
                self.fresh.clear();
            }
            RollupLevel::Settled => {
                self.watermarks.settled = covered;
                self.settled.clear();
            }
        }
        true
    }

    /// Loads the counting state of polls seen for the first time, from the warehouse as it
    /// stands before this batch is written.
    async fn load_states(&mut self, votes: &[StoredVote]) -> bool {
        let missing: HashSet<&str> = votes
            .iter()
            .map(|v| v.vote.poll_id.as_str())
            .filter(|id| !self.states.contains_key(*id))
            .collect();
        for poll_id in missing {
            let poll = self.polls.get(poll_id).await.ok().flatten();
            let count_voters = poll.as_ref().is_none_or(|p| p.dedupe == Dedupe::None);
            let warehouse = self.deps.warehouse.clone();
            let loaded = self
                .retry("load tally", || {
                    let warehouse = warehouse.clone();
                    let poll_id = poll_id.to_owned();
                    async move {
                        let tally = warehouse.tally(&poll_id).await?;
                        let voters: Option<HashSet<String>> = if count_voters {
                            Some(warehouse.voter_keys(&poll_id).await?.into_iter().collect())
                        } else {
                            None
                        };
                        Ok((tally, voters))
                    }
                })
                .await;
            let Some((tally, voters)) = loaded else {
                return false;
            };
            self.states
                .insert(poll_id.to_owned(), PollState { tally, voters });
        }
        true
    }

    async fn count_and_publish(&mut self, votes: &[StoredVote]) {
        let mut changed: Vec<String> = Vec::new();
        for stored in votes {
            let Some(state) = self.states.get_mut(&stored.vote.poll_id) else {
                continue;
            };
            let new_voter = match &mut state.voters {
                Some(seen) => {
                    !stored.vote.voter_key.is_empty() && seen.insert(stored.vote.voter_key.clone())
                }
                None => true,
            };
            state.tally.add(&stored.vote, stored.seq, new_voter);
            if !changed.contains(&stored.vote.poll_id) {
                changed.push(stored.vote.poll_id.clone());
            }
        }
        let now = tally_core::time::now_ms();
        for poll_id in changed {
            let Ok(Some(poll)) = self.polls.get(&poll_id).await else {
                tracing::warn!(poll_id = %poll_id, "votes for a poll the registry does not know; totals not published");
                continue;
            };
            let results = Results::new(&poll, &self.states[&poll_id].tally, now);
            if let Err(err) = self.deps.live.publish(&results).await {
                tracing::warn!(poll_id = %poll_id, error = %err, "publishing live totals failed");
            }
        }
    }

    /// Retries a warehouse call with backoff until it succeeds; None when stopping.
    /// Writes rows that cover the log up to `covered` into the table whose watermark `mark`
    /// reads, retrying until written; false only when stopping. An insert whose answer was
    /// lost (the warehouse went down while answering) may have landed all the same — one
    /// INSERT is atomic — so before each retry the watermarks are read again, and a table
    /// that already holds `covered` is not written twice.
    async fn insert<F, Fut>(
        &mut self,
        what: &str,
        covered: u64,
        mark: fn(&Watermarks) -> u64,
        mut call: F,
    ) -> bool
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = tally_core::Result<()>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let Err(err) = call().await else {
                return true;
            };
            tracing::warn!(partition = self.partition, error = %err, "{what} failed, retrying");
            if !self.pause(backoff.next_delay()).await {
                return false;
            }
            match self.deps.warehouse.watermarks(self.partition).await {
                Ok(marks) if mark(&marks) >= covered => {
                    tracing::info!(
                        partition = self.partition,
                        covered,
                        "{what}: the failed insert had landed"
                    );
                    return true;
                }
                // Not there, or the warehouse cannot tell yet: write it again.
                _ => {}
            }
        }
    }

    async fn retry<T, F, Fut>(&mut self, what: &str, mut call: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = tally_core::Result<T>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match call().await {
                Ok(value) => return Some(value),
                Err(err) => {
                    tracing::warn!(partition = self.partition, error = %err, "{what} failed, retrying");
                    let delay = backoff.next_delay();
                    if !self.pause(delay).await {
                        return None;
                    }
                }
            }
        }
    }
}

/// Test-only crash points: `TALLY_FAILPOINT=<name>` makes the process abort there, the way
/// kill -9 would, so fault tests can hit the gaps between a write and what follows it.
fn failpoint(name: &str) {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("TALLY_FAILPOINT").ok());
    if armed.as_deref() == Some(name) {
        tracing::error!(failpoint = name, "failpoint hit, aborting");
        std::process::abort();
    }
}
