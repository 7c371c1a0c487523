use async_trait::async_trait;

use crate::analytics::{Breakdown, BreakdownQuery, TimePoint, TimeseriesQuery};
use crate::results::Tally;
use crate::rollup::{RollupLevel, RollupRow};
use crate::vote::Vote;
use crate::Result;

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
    /// The widths of the tumbling windows a poll's window rows were written with (the
    /// processor's setting when it wrote them), smallest first; empty before its first vote.
    async fn window_widths(&self, poll_id: &str) -> Result<Vec<u32>>;
    async fn timeseries(&self, query: &TimeseriesQuery) -> Result<Vec<TimePoint>>;
    async fn check(&self) -> Result<()>;
}
