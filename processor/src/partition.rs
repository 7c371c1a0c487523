//! One partition's worker: reads its part of the log in order and writes each batch to
//! every table that does not hold it yet, each vote's segment capped to
//! [`tally_core::segment::MAX_SEGMENT_VALUES`] values per dimension (see [`segments`]).

mod segments;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tally_core::poll::Dedupe;
use tally_core::ports::{LogEntry, StoredVote, Watermarks};
use tally_core::results::{Results, Tally};
use tally_core::retry::Backoff;
use tally_core::rollup::{self, RollupLevel, RollupRow, Rollups};
use tally_core::wire;
use tally_service::tasks::CancellationToken;
use tally_service::PollCache;

use crate::windows::{Picks, WindowEngine};
use crate::{Config, Deps};
use segments::{cap_of, SegmentValues};

/// The worker was asked to stop before it could finish a step. Everything it wrote so far
/// is whole (each insert is atomic) and the next start resumes from the watermarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stopped;

/// The outcome of a step that retries until it succeeds or the worker is stopped.
type Step<T = ()> = Result<T, Stopped>;

/// Counting state of one poll, as of the `votes` table's watermark.
struct PollState {
    /// This partition's share of the poll's votes (its live totals are published as such,
    /// and the query service adds a poll's shares up).
    tally: Tally,
    /// Voter keys seen, only for `dedupe: none` polls (on `per_voter` polls every counted
    /// vote is a new voter, which the log guarantees).
    voters: Option<HashSet<String>>,
}

pub(crate) struct Partition {
    partition: u16,
    /// The epoch of this worker's lease, fenced into the warehouse before it reads the
    /// watermarks; `None` when the partition is this process's without a lease.
    epoch: Option<u64>,
    deps: Deps,
    config: Config,
    polls: Arc<PollCache>,
    engine: WindowEngine,
    /// Fires when the process shuts down; set by [`Partition::run`].
    cancel: CancellationToken,
    watermarks: Watermarks,
    states: HashMap<String, PollState>,
    /// The segment values counted per poll, loaded from the warehouse when a poll is first
    /// seen after a (re)start and grown with every vote read since.
    segment_values: HashMap<String, SegmentValues>,
    /// Votes after each rollup watermark not yet written as rollup rows.
    fresh: Rollups,
    settled: Rollups,
    /// Answers of votes after the windows watermark not yet written as window rows.
    windows: PendingWindows,
    /// The running [`compact_sets`](tally_core::ports::Warehouse::compact_sets) of this
    /// partition, if any.
    compacting: Option<tokio::task::JoinHandle<()>>,
}

impl Partition {
    pub(crate) fn new(
        partition: u16,
        epoch: Option<u64>,
        deps: Deps,
        config: Config,
        polls: Arc<PollCache>,
        engine: WindowEngine,
    ) -> Self {
        Partition {
            partition,
            epoch,
            deps,
            config,
            polls,
            engine,
            cancel: CancellationToken::new(),
            watermarks: Watermarks::default(),
            states: HashMap::new(),
            segment_values: HashMap::new(),
            fresh: Rollups::default(),
            settled: Rollups::default(),
            windows: PendingWindows::default(),
            compacting: None,
        }
    }

    /// Waits `delay` unless asked to stop first.
    async fn pause(&self, delay: Duration) -> Step {
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => Err(Stopped),
            () = tokio::time::sleep(delay) => Ok(()),
        }
    }

    /// Works until `cancel` fires, then finishes the batch at hand and writes the pending
    /// rollups.
    pub(crate) async fn run(mut self, cancel: CancellationToken) {
        self.cancel = cancel;
        let partition = self.partition;
        // However the worker ends (stopped, or aborted with a lost lease), its lag is no
        // longer this process's to report: the partition's new owner reports it.
        let _lag = ClearLag(partition);
        // Finished polls of the partition leave the log while, and only while, it is ours.
        let retention = crate::retention::Retention::new(
            partition,
            self.deps.clone(),
            &self.config,
            self.polls.clone(),
        );
        tokio::select! {
            worked = self.work() => match worked {
                Err(Stopped) => tracing::info!(partition, "partition worker stopped"),
                Ok(never) => match never {},
            },
            never = retention.run() => match never {},
        }
    }

    async fn work(&mut self) -> Step<std::convert::Infallible> {
        let mut backoff = Backoff::standard();
        let (partition, warehouse, log) = (
            self.partition,
            self.deps.warehouse.clone(),
            self.deps.log.clone(),
        );
        if let Some(epoch) = self.epoch {
            // Before anything is read: from here on an earlier owner writes nothing.
            self.retry("fence the partition", || warehouse.fence(partition, epoch))
                .await?;
            tracing::info!(partition, epoch, "partition fenced");
        }
        loop {
            // (Re)start from the warehouse: it is the source of truth for positions.
            let watermarks = self
                .retry("read watermarks", || warehouse.watermarks(partition))
                .await?;
            let start = watermarks.lowest();
            let mut reader = self
                .retry("open the vote log", || log.reader(partition, start))
                .await?;
            // When the lag gauge was last set: at most once a second, it asks the log.
            let mut lag_reported: Option<std::time::Instant> = None;
            self.watermarks = watermarks;
            self.states.clear();
            self.segment_values.clear();
            self.fresh.clear();
            self.settled.clear();
            self.windows = PendingWindows::after(watermarks.windows);
            tracing::info!(
                partition,
                votes = watermarks.votes,
                windows = watermarks.windows,
                rollups = watermarks.rollups,
                settled = watermarks.settled,
                "processing from watermarks"
            );
            loop {
                let cancel = self.cancel.clone();
                let batch = tokio::select! {
                    batch = reader.next_batch(self.config.batch_max, self.config.batch_wait) => batch,
                    () = cancel.cancelled() => {
                        self.write_rollups(true).await?;
                        return Err(Stopped);
                    }
                };
                let batch = match batch {
                    Ok(batch) if batch.is_empty() => {
                        // The log is quiet: bring the rollups up to date.
                        self.write_rollups(false).await?;
                        report_lag(partition, reader.as_mut(), &mut lag_reported).await;
                        continue;
                    }
                    Ok(batch) => batch,
                    Err(err) => {
                        tracing::warn!(partition, error = %err.chain(), "reading the vote log failed, reopening");
                        break;
                    }
                };
                let last = batch.last().map(|e| e.seq).unwrap_or(0);
                self.process(batch).await?;
                backoff.reset();
                failpoint("before-ack");
                if let Err(err) = reader.commit(last).await {
                    tracing::debug!(partition, error = %err.chain(), "ack failed; the watermark still holds");
                }
                failpoint("after-commit");
                report_lag(partition, reader.as_mut(), &mut lag_reported).await;
            }
            self.pause(backoff.next_delay()).await?;
        }
    }

    /// Writes one batch to every table that does not hold it yet, then publishes totals.
    /// Retries writes until they succeed or the worker is stopped.
    async fn process(&mut self, batch: Vec<LogEntry>) -> Step {
        let started = std::time::Instant::now();
        let mut stages = [Duration::ZERO; 3];
        let entries = batch.len();
        metrics::histogram!("tally_processor_batch_size").record(entries as f64);
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
                    tracing::error!(partition = self.partition, seq = entry.seq, error = %err.chain(), "skipping undecodable log entry")
                }
            }
        }

        // Every vote read is capped, whichever tables it still goes to: the votes and the
        // rollups must hold the same segment for it, and mapping it again is harmless (see
        // `segments`). From here on the batch holds what the warehouse is to store.
        self.load_segment_values(&votes).await?;
        for stored in &mut votes {
            self.segment_values
                .get_mut(&stored.vote.poll_id)
                .expect("loaded for every poll of the batch")
                .cap(&mut stored.vote.segment);
        }

        // Entries are in sequence order, so what a table lacks is a suffix of the batch.
        let new_votes = &votes[votes.partition_point(|v| v.seq <= self.watermarks.votes)..];
        let window_votes = &votes[votes.partition_point(|v| v.seq <= self.windows.upto)..];
        stages[0] = started.elapsed();
        if !new_votes.is_empty() {
            self.load_states(new_votes).await?;
            let warehouse = self.deps.warehouse.clone();
            let partition = self.partition;
            let covered = new_votes.last().map_or(0, |v| v.seq);
            self.insert(
                "insert votes",
                covered,
                |m| m.votes,
                || warehouse.insert_votes(partition, new_votes),
            )
            .await?;
            failpoint("after-votes-insert");
            debug_assert!(
                last_seq > self.watermarks.votes,
                "the votes watermark only moves forward"
            );
            self.watermarks.votes = last_seq;
        }
        stages[1] = started.elapsed();

        for v in window_votes {
            for option in &v.vote.choice {
                self.windows
                    .push(&v.vote.poll_id, v.vote.received_at, option);
            }
        }
        if !window_votes.is_empty() {
            self.windows.upto = last_seq;
        }

        self.count_and_publish(new_votes).await;
        metrics::counter!("tally_votes_counted_total").increment(new_votes.len() as u64);
        stages[2] = started.elapsed();

        // Window rows and rollups after the totals are out, so their writes never delay live
        // results, and for many batches at once: each insert is a part on ClickHouse. Votes
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
        if self.fresh.votes() >= self.config.rollup_votes
            || self.fresh.age() >= self.config.rollup_interval
            || self.windows.answers.len() >= self.config.rollup_votes
            || self.windows.age() >= self.config.rollup_interval
        {
            self.write_rollups(false).await?;
        }
        // Where a batch's time goes, cumulative ms after: decode, raw-vote insert, counting
        // and publishing.
        tracing::debug!(
            partition = self.partition,
            entries,
            decoded_ms = stages[0].as_millis() as u64,
            votes_written_ms = stages[1].as_millis() as u64,
            published_ms = stages[2].as_millis() as u64,
            "batch processed"
        );
        Ok(())
    }

    /// Writes the pending window rows, then the pending fresh rollups, then the settled
    /// ones when they are due (or `settle_now`) and end where the fresh rows end — a
    /// breakdown relies on every settled write ending at a fresh write's position. So the
    /// time series is never behind the breakdowns. Retries until written or stopped.
    async fn write_rollups(&mut self, settle_now: bool) -> Step {
        self.write_windows().await?;
        if self.fresh.votes() > 0 {
            self.write_level(RollupLevel::Fresh).await?;
            failpoint("after-rollups-insert");
        }
        let due = settle_now
            || self.settled.age() >= self.config.settle_interval
            || self.settled.votes() >= self.config.settle_votes;
        if self.settled.votes() > 0 && due && self.settled.last_seq() == self.watermarks.rollups {
            return self.write_level(RollupLevel::Settled).await;
        }
        Ok(())
    }

    /// Counts the pending answers per (poll, window, option) and writes them as window
    /// rows covering the log up to the last vote they hold. Retries until written or
    /// stopped.
    async fn write_windows(&mut self) -> Step {
        if self.windows.upto <= self.watermarks.windows {
            return Ok(());
        }
        let (picks, upto) = (self.windows.take(), self.windows.upto);
        if !picks.is_empty() {
            let picks = picks.finish();
            let rows = loop {
                match self.engine.windows(picks.clone(), upto).await {
                    Ok(rows) => break rows,
                    Err(err) => {
                        tracing::error!(partition = self.partition, error = %tally_core::error::Chain(&err), "window aggregation failed, retrying");
                        self.pause(Duration::from_secs(1)).await?;
                    }
                }
            };
            let warehouse = self.deps.warehouse.clone();
            let partition = self.partition;
            self.insert(
                "insert windows",
                upto,
                |m| m.windows,
                || warehouse.insert_windows(partition, &rows),
            )
            .await?;
            tracing::debug!(
                partition,
                rows = rows.len(),
                covered = upto,
                "windows written"
            );
            self.watermarks.windows = upto;
        }
        Ok(())
    }

    async fn write_level(&mut self, level: RollupLevel) -> Step {
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
        self.insert("insert rollups", covered, mark, || {
            warehouse.insert_rollups(partition, level, &rows)
        })
        .await?;
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
                self.compact_sets(&rows, covered);
            }
        }
        Ok(())
    }

    /// Has the warehouse add up the settled rows of polls' own keys this settled write
    /// added to ([`compact_sets`](tally_core::ports::Warehouse::compact_sets)), in the background: it counts nothing anew, so
    /// processing goes on meanwhile, and a run still going when the next write ends lets
    /// that write pass (the one after asks again).
    fn compact_sets(&mut self, rows: &[RollupRow], covered: u64) {
        if self
            .compacting
            .as_ref()
            .is_some_and(|run| !run.is_finished())
        {
            return;
        }
        let sets = rollup::custom_sets(rows);
        if sets.is_empty() {
            return;
        }
        let warehouse = self.deps.warehouse.clone();
        let partition = self.partition;
        self.compacting = Some(tokio::spawn(async move {
            if let Err(err) = warehouse.compact_sets(partition, &sets, covered).await {
                tracing::warn!(partition, error = %err, "adding up the settled rows of polls' own keys failed; a later settled write tries again");
            }
        }));
    }

    /// Loads the counting state of polls seen for the first time, from the warehouse as it
    /// stands before this batch is written.
    async fn load_states(&mut self, votes: &[StoredVote]) -> Step {
        let missing: HashSet<&str> = votes
            .iter()
            .map(|v| v.vote.poll_id.as_str())
            .filter(|id| !self.states.contains_key(*id))
            .collect();
        for poll_id in missing {
            let poll = self.polls.get(poll_id).await.ok().flatten();
            let count_voters = poll.as_ref().is_none_or(|p| p.dedupe == Dedupe::None);
            let warehouse = self.deps.warehouse.clone();
            let partition = self.partition;
            let (tally, voters) = self
                .retry("load tally", || {
                    let warehouse = warehouse.clone();
                    let poll_id = poll_id.to_owned();
                    async move {
                        // This partition's share of the poll: what it counts on from.
                        let mut shares = warehouse.tally_by_partition(&poll_id).await?;
                        let tally = shares.remove(&partition).unwrap_or_default();
                        let voters: Option<HashSet<String>> = if count_voters {
                            Some(warehouse.voter_keys(&poll_id).await?.into_iter().collect())
                        } else {
                            None
                        };
                        Ok((tally, voters))
                    }
                })
                .await?;
            self.states
                .insert(poll_id.to_owned(), PollState { tally, voters });
        }
        Ok(())
    }

    /// Loads the segment values stored for polls seen for the first time since the worker
    /// (re)started, before any of this batch is written.
    async fn load_segment_values(&mut self, votes: &[StoredVote]) -> Step {
        let missing: HashSet<&str> = votes
            .iter()
            .map(|v| v.vote.poll_id.as_str())
            .filter(|id| !self.segment_values.contains_key(*id))
            .collect();
        for poll_id in missing {
            let (warehouse, partition) = (self.deps.warehouse.clone(), self.partition);
            let stored = self
                .retry("load segment values", || {
                    warehouse.segment_values(poll_id, partition)
                })
                .await?;
            // A spread poll's partitions share the cap (a poll the registry does not know
            // is taken as not spread).
            let polls = self.polls.clone();
            let poll = self
                .retry("look up the poll", || polls.get(poll_id))
                .await?;
            let partitions = self.deps.log.partitions().max(1);
            let cap = cap_of(poll.map_or(1, |poll| poll.spread.clamp(1, partitions)));
            self.segment_values
                .insert(poll_id.to_owned(), SegmentValues::from_stored(stored, cap));
        }
        Ok(())
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
            let mut results = Results::new(&poll, &self.states[&poll_id].tally, now);
            results.partition = Some(self.partition);
            if let Err(err) = self.deps.live.publish(&results).await {
                tracing::warn!(poll_id = %poll_id, error = %err.chain(), "publishing live totals failed");
            }
        }
    }

    /// Writes rows that cover the log up to `covered` into the table whose watermark `mark`
    /// reads, retrying until written or stopped. An insert whose answer was
    /// lost (the warehouse went down while answering) may have landed all the same — one
    /// INSERT is atomic — so before each retry the watermarks are read again, and a table
    /// that already holds `covered` is not written twice.
    async fn insert<F, Fut>(
        &mut self,
        what: &str,
        covered: u64,
        mark: fn(&Watermarks) -> u64,
        mut call: F,
    ) -> Step
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = tally_core::Result<()>>,
    {
        let mut backoff = Backoff::standard();
        // `insert votes` → `votes`: a label of few values.
        let table = what.trim_start_matches("insert ").to_owned();
        loop {
            let started = std::time::Instant::now();
            let result = call().await;
            metrics::histogram!("tally_warehouse_insert_duration_seconds", "table" => table.clone())
                .record(started.elapsed().as_secs_f64());
            let Err(err) = result else {
                return Ok(());
            };
            self.stop_if_fenced(what, &err)?;
            metrics::counter!("tally_warehouse_insert_retries_total", "table" => table.clone())
                .increment(1);
            self.report_failure(what, &err);
            self.pause(backoff.next_delay()).await?;
            match self.deps.warehouse.watermarks(self.partition).await {
                Ok(marks) if mark(&marks) >= covered => {
                    tracing::info!(
                        partition = self.partition,
                        covered,
                        "{what}: the failed insert had landed"
                    );
                    return Ok(());
                }
                // Not there, or the warehouse cannot tell yet: write it again.
                _ => {}
            }
        }
    }

    /// Retries a back-end call with backoff until it succeeds, the worker is stopped, or the
    /// warehouse's fence refuses it.
    async fn retry<T, F, Fut>(&mut self, what: &str, mut call: F) -> Step<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = tally_core::Result<T>>,
    {
        let mut backoff = Backoff::standard();
        loop {
            match call().await {
                Ok(value) => return Ok(value),
                Err(err) => {
                    self.stop_if_fenced(what, &err)?;
                    self.report_failure(what, &err);
                    self.pause(backoff.next_delay()).await?;
                }
            }
        }
    }

    /// Stops the worker when `err` is the warehouse's fence: a newer owner holds the
    /// partition (see [`tally_core::ports::Warehouse::fence`]), so nothing is retried and
    /// nothing more is written — not even the pending rollups.
    fn stop_if_fenced(&self, what: &str, err: &tally_core::Error) -> Step {
        if err.kind() != tally_core::ErrorKind::Conflict {
            return Ok(());
        }
        tracing::warn!(partition = self.partition, error = %err.chain(), "{what} refused: the partition has a newer owner");
        Err(Stopped)
    }

    /// Logs a failed back-end call that will be retried. Every kind is retried — a vote
    /// the log holds must reach the warehouse, so giving up is never right — but an outage
    /// is expected and a refusal is not: the latter is logged as an error, for a person.
    fn report_failure(&self, what: &str, err: &tally_core::Error) {
        if err.is_transient() {
            tracing::warn!(partition = self.partition, error = %err.chain(), "{what} failed, retrying");
        } else {
            tracing::error!(partition = self.partition, kind = ?err.kind(), error = %err.chain(), "{what} failed, retrying");
        }
    }
}

/// Answers taken from the votes after the windows watermark, not yet written as window
/// rows: they are counted and written together, with the fresh rollups.
#[derive(Default)]
struct PendingWindows {
    answers: Picks,
    /// The last log entry whose answers were taken, pending or written: the windows
    /// watermark when nothing is pending.
    upto: u64,
    /// When the oldest pending answer was taken.
    since: Option<std::time::Instant>,
}

impl PendingWindows {
    /// None pending, the window rows holding the log up to `watermark`.
    fn after(watermark: u64) -> Self {
        PendingWindows {
            upto: watermark,
            ..Default::default()
        }
    }

    fn push(&mut self, poll_id: &str, received_ms: i64, option: &str) {
        self.answers.push(poll_id, received_ms, option);
        self.since.get_or_insert_with(std::time::Instant::now);
    }

    fn age(&self) -> Duration {
        self.since.map_or(Duration::ZERO, |since| since.elapsed())
    }

    /// The pending answers, leaving none.
    fn take(&mut self) -> Picks {
        self.since = None;
        std::mem::take(&mut self.answers)
    }
}

/// Sets a partition's `tally_processor_lag` to 0 when dropped.
struct ClearLag(u16);

impl Drop for ClearLag {
    fn drop(&mut self) {
        metrics::gauge!("tally_processor_lag", "partition" => self.0.to_string()).set(0.0);
    }
}

/// Sets `tally_processor_lag` for the partition, at most once a second.
async fn report_lag(
    partition: u16,
    reader: &mut dyn tally_core::ports::LogReader,
    reported: &mut Option<std::time::Instant>,
) {
    if reported.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
        return;
    }
    *reported = Some(std::time::Instant::now());
    match reader.pending().await {
        Ok(pending) => metrics::gauge!("tally_processor_lag", "partition" => partition.to_string())
            .set(pending as f64),
        Err(err) => tracing::debug!(partition, error = %err.chain(), "cannot read the lag"),
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
