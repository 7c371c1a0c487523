//! The back-end traits. Services hold them as `Arc<dyn …>`; the distributed deployment
//! implements them on NATS JetStream and ClickHouse, the standalone one on embedded stores.
//! Each trait states the guarantees its callers rely on; [`crate::conformance`] proves them
//! for every implementation.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

use crate::poll::Poll;
use crate::results::{Results, Tally};
use crate::rollup::{RollupLevel, RollupRow};
use crate::vote::Vote;
use crate::Result;

pub type BoxStream<T> = Pin<Box<dyn Stream<Item = T> + Send>>;

/// The answer of [`VoteLog::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// The vote is durable at `seq`. `duplicate` says the same vote (same vote_id) was
    /// already there and this call changed nothing.
    Accepted { seq: u64, duplicate: bool },
    /// Another vote already holds this uniqueness key: the voter has voted.
    AlreadyVoted,
}

/// One entry of a partition of the log, in log order.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// Position in the log; strictly increasing within a partition, never reused.
    pub seq: u64,
    pub payload: Bytes,
}

/// The durable, ordered vote log.
///
/// Guarantees: `append` resolves `Accepted` only once the vote is durable; the log holds at
/// most one entry per `(poll, unique_key)` — the first one — and a repeat of the same
/// `vote_id` resolves to the original entry's sequence. Entries of one poll always land in
/// the same partition, which a reader sees in sequence order.
#[async_trait]
pub trait VoteLog: Send + Sync + 'static {
    fn partitions(&self) -> u16;

    /// The partition a poll's votes go to. Stable for a given partition count.
    fn partition_of(&self, poll_id: &str) -> u16 {
        partition_of(poll_id, self.partitions())
    }

    async fn append(&self, vote: &Vote, unique_key: &str) -> Result<Appended>;

    /// Appends many votes, each `(vote, unique_key)` on its own terms: the answers are
    /// [`VoteLog::append`]'s, in the order of `votes`, and one vote's failure does not stop
    /// the others. A log may send them together; by default they are appended
    /// [`APPEND_MANY_IN_FLIGHT`] at a time.
    async fn append_many(&self, votes: &[(Vote, String)]) -> Vec<Result<Appended>> {
        use futures::StreamExt;
        let mut answers = Vec::with_capacity(votes.len());
        let mut in_flight = futures::stream::FuturesOrdered::new();
        for (vote, unique_key) in votes {
            if in_flight.len() >= APPEND_MANY_IN_FLIGHT {
                answers.extend(in_flight.next().await);
            }
            in_flight.push_back(self.append(vote, unique_key));
        }
        while let Some(answer) = in_flight.next().await {
            answers.push(answer);
        }
        answers
    }

    /// Reads a partition from the entry after `after` (0 = from the start).
    async fn reader(&self, partition: u16, after: u64) -> Result<Box<dyn LogReader>>;

    /// Ok when the log is reachable.
    async fn check(&self) -> Result<()>;
}

/// How many appends the default [`VoteLog::append_many`] keeps in flight.
pub const APPEND_MANY_IN_FLIGHT: usize = 512;

/// Stable FNV-1a hash of the poll id, so every process maps a poll to the same partition.
pub fn partition_of(poll_id: &str, partitions: u16) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in poll_id.bytes() {
        hash ^= byte as u32;
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % partitions.max(1) as u32) as u16
}

#[async_trait]
pub trait LogReader: Send {
    /// Waits up to `wait` for entries and returns up to `max` of them in sequence order
    /// (empty when none came). After an error, calling again resumes where it stood.
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<LogEntry>>;

    /// Tells the log everything up to `seq` is processed. An optimisation: after a restart
    /// the caller resumes from its own watermark, not from what was committed here.
    async fn commit(&mut self, seq: u64) -> Result<()>;
}

#[derive(Debug, Clone, PartialEq)]
pub enum PollChange {
    Put(Box<Poll>),
    Deleted(String),
}

/// Where poll definitions live. `version` is the registry's revision of a record: updates
/// are conditional on it, so concurrent edits never silently overwrite each other.
#[async_trait]
pub trait PollRegistry: Send + Sync + 'static {
    /// Stores a new poll; `AlreadyExists` if the id is taken. Returns it with its version.
    async fn create(&self, poll: &Poll) -> Result<Poll>;
    async fn get(&self, id: &str) -> Result<Option<Poll>>;
    /// Replaces a poll if its stored version is still `poll.version`, else `Conflict`.
    async fn update(&self, poll: &Poll) -> Result<Poll>;
    /// Polls with ids after `after`, in id order, at most `limit`.
    async fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<Poll>>;
    /// Every current poll, then every later change, as they happen.
    async fn watch(&self) -> Result<BoxStream<Result<PollChange>>>;
    async fn check(&self) -> Result<()>;
}

/// A vote with its position in the log, as the warehouse stores it.
#[derive(Debug, Clone)]
pub struct StoredVote {
    pub seq: u64,
    pub vote: Vote,
}

/// A partial count of one option of one poll in one tumbling window, covering the log up
/// to `last_seq`. The warehouse adds partial rows up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowRow {
    pub poll_id: String,
    /// Window start, epoch seconds, a multiple of `window_seconds`.
    pub window_start: i64,
    pub window_seconds: u32,
    pub option: String,
    pub votes: u64,
    pub last_seq: u64,
}

/// How far each warehouse table holds a partition of the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Watermarks {
    pub votes: u64,
    pub windows: u64,
    /// Fresh segment rollups (written about every second).
    pub rollups: u64,
    /// Settled segment rollups (written about every half minute).
    pub settled: u64,
}

impl Watermarks {
    /// How far breakdowns are exact: a breakdown reads fresh rollups only after the settled
    /// ones, so settled rows cover for fresh rows that were lost (a standalone crash can
    /// keep a settled file and lose the fresh tail before it).
    pub fn rollups_covered(&self) -> u64 {
        self.rollups.max(self.settled)
    }

    /// Where processing resumes: after the position every table holds. Fresh rollups are
    /// never needed at or below the settled ones, so they do not pull it back.
    pub fn lowest(&self) -> u64 {
        self.votes.min(self.windows).min(self.settled)
    }
}

/// A segment dimension: a standard key or one of the poll's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dimension(pub String);

/// The most groups a breakdown returns; more is refused as a bad request.
pub const MAX_GROUPS: usize = 1_000;

/// The error for a breakdown over more than [`MAX_GROUPS`] groups.
pub fn too_many_groups() -> crate::Error {
    crate::Error::Invalid(crate::problem::Problem::invalid(
        "by",
        format!("the breakdown has more than {MAX_GROUPS} groups; break down by fewer dimensions or add filters"),
    ))
}

#[derive(Debug, Clone, Default)]
pub struct BreakdownQuery {
    pub poll_id: String,
    pub by: Vec<Dimension>,
    /// Each dimension must take one of its listed values.
    pub filters: Vec<(Dimension, Vec<String>)>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCounts {
    /// Values of the `by` dimensions, in their order.
    pub values: Vec<String>,
    pub ballots: u64,
    pub counts: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Breakdown {
    pub groups: Vec<GroupCounts>,
    pub as_of: u64,
}

#[derive(Debug, Clone)]
pub struct TimeseriesQuery {
    pub poll_id: String,
    pub step_seconds: u32,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimePoint {
    /// Start of the step, epoch seconds.
    pub t: i64,
    pub counts: BTreeMap<String, u64>,
}

impl TimePoint {
    /// Groups `(step start, option, votes)` rows, ordered by step, into points.
    pub fn from_rows(rows: impl IntoIterator<Item = (i64, String, u64)>) -> Vec<TimePoint> {
        let mut points: Vec<TimePoint> = Vec::new();
        for (t, option, votes) in rows {
            match points.last_mut() {
                Some(point) if point.t == t => {
                    point.counts.insert(option, votes);
                }
                _ => points.push(TimePoint {
                    t,
                    counts: [(option, votes)].into(),
                }),
            }
        }
        points
    }
}

/// The analytical store of deduplicated votes and window aggregates.
///
/// Guarantees: one `insert_*` call is atomic (all rows or none); rows carry their log
/// sequence so [`Warehouse::watermarks`] tells a restarted processor where each table stands.
/// Reads see whole inserts only.
#[async_trait]
pub trait Warehouse: Send + Sync + 'static {
    /// Applies pending schema migrations; returns the versions it applied.
    async fn migrate(&self) -> Result<Vec<u32>>;
    async fn watermarks(&self, partition: u16) -> Result<Watermarks>;
    async fn insert_votes(&self, partition: u16, votes: &[StoredVote]) -> Result<()>;
    async fn insert_windows(&self, partition: u16, rows: &[WindowRow]) -> Result<()>;
    async fn insert_rollups(
        &self,
        partition: u16,
        level: RollupLevel,
        rows: &[RollupRow],
    ) -> Result<()>;
    /// The exact tally of a poll over every stored vote.
    async fn tally(&self, poll_id: &str) -> Result<Tally>;
    /// The distinct non-empty voter keys of a poll.
    async fn voter_keys(&self, poll_id: &str) -> Result<Vec<String>>;
    /// Ballots and answer counts per group, exact as of the poll's newest rollup row
    /// (`as_of`): read from [`RollupRow`]s, with cut buckets of a time range completed from
    /// the raw votes (see [`crate::rollup`]).
    async fn breakdown(&self, query: &BreakdownQuery) -> Result<Breakdown>;
    async fn timeseries(&self, query: &TimeseriesQuery) -> Result<Vec<TimePoint>>;
    async fn check(&self) -> Result<()>;
}

/// Fan-out of full per-poll totals from processors to query replicas. Best effort: a
/// subscriber that misses a message gets the next full totals, never a delta.
#[async_trait]
pub trait LiveFeed: Send + Sync + 'static {
    async fn publish(&self, results: &Results) -> Result<()>;
    async fn subscribe(&self) -> Result<BoxStream<Results>>;
}

/// Retry pacing for back-end outages: doubles from `start` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    start: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(start: Duration, max: Duration) -> Self {
        Backoff {
            next: start,
            start,
            max,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    pub fn reset(&mut self) {
        self.next = self.start;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_in_range() {
        assert_eq!(partition_of("spring-launch", 1), 0);
        let p = partition_of("spring-launch", 8);
        assert!(p < 8);
        assert_eq!(p, partition_of("spring-launch", 8));
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<_> = (0..4).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 350, 350]);
    }
}
