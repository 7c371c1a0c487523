use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;

use super::BoxStream;
use crate::analyst::SqlLimits;
use crate::analytics::{Breakdown, BreakdownQuery, TimePoint, TimeseriesQuery};
use crate::poll::Poll;
use crate::results::Tally;
use crate::rollup::{RollupLevel, RollupRow};
use crate::vote::Vote;
use crate::{Error, Result};

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

/// The position of each partition of the log a poll's rows were read at.
pub type Positions = BTreeMap<u16, u64>;

/// What a read of a poll at `positions` reports as its `as_of`: for a poll whose votes go
/// to one partition of the log, its position there; for a poll whose votes come from
/// several, the sum of theirs. Each partition's position only grows, so the sum grows
/// whenever any of them does and a newer read never reports less — while the counts
/// themselves are read per partition, each as far as its own rows go (partitions number
/// their entries independently, so no one position bounds them all).
pub fn poll_as_of(positions: &Positions) -> u64 {
    positions
        .values()
        .fold(0u64, |sum, position| sum.saturating_add(*position))
}

/// Per partition, the newer of its two positions in `a` and `b` (either, where the other
/// has none): how far a poll's rollups of both levels go in each partition.
pub fn newer_positions(a: &Positions, b: &Positions) -> Positions {
    let mut newer = a.clone();
    for (partition, position) in b {
        let at = newer.entry(*partition).or_default();
        *at = (*at).max(*position);
    }
    newer
}

/// Rows for analysts — the answer to an analyst query, or a poll's ballots for an export —
/// as Arrow batches streamed while the engine makes them, exact as of one position of the
/// log. Dropping it (or its stream) cancels the work behind it.
pub struct AnalystRows {
    pub schema: SchemaRef,
    /// The log position the rows are exact as of: for a poll's ballots, [`poll_as_of`] its
    /// `positions` (what its results call `as_of`); for an analyst query, the highest of
    /// `positions`.
    pub as_of: u64,
    /// The position each partition of the log was read at (every counted vote of the
    /// partition up to it, none after): for a poll's ballots, the partitions that hold its
    /// votes, each at its last counted vote of the poll.
    pub positions: Positions,
    /// The batches, each of `schema`; an error ends the stream (a limit hit while rows were
    /// coming is a `sql-limit-exceeded` problem).
    pub batches: BoxStream<Result<RecordBatch>>,
    /// Rows the engine read to answer, final once `batches` has ended.
    pub rows_read: Arc<AtomicU64>,
}

/// The error of a warehouse that does not serve analysts.
fn no_analyst_tables(what: &str) -> Error {
    Error::failed(
        "warehouse",
        format!("{what}: this warehouse has no analyst tables"),
    )
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
    /// Makes `epoch` the owner of `partition`'s rows: from the time this returns, an insert
    /// for the partition made through a handle fenced with an older epoch is refused with
    /// [`Error::Conflict`](crate::Error::Conflict) and writes nothing, and this handle's
    /// inserts for it are refused in turn once a newer epoch is fenced. It returns only when
    /// no insert of an older owner can still land, so watermarks read after it are final for
    /// them. Refused when a newer epoch already owns the partition. Epochs come from
    /// [`PartitionLeases::claim`](super::PartitionLeases::claim).
    ///
    /// A warehouse only one process writes (the embedded one) has nothing to fence.
    async fn fence(&self, partition: u16, epoch: u64) -> Result<()> {
        let _ = (partition, epoch);
        Ok(())
    }
    async fn insert_votes(&self, partition: u16, votes: &[StoredVote]) -> Result<()>;
    async fn insert_windows(&self, partition: u16, rows: &[WindowRow]) -> Result<()>;
    async fn insert_rollups(
        &self,
        partition: u16,
        level: RollupLevel,
        rows: &[RollupRow],
    ) -> Result<()>;
    /// Adds up the settled rows of the sets of polls' own keys (`sets`: poll and set name,
    /// see [`crate::rollup::custom_sets`]) that `partition`'s settled writes up to `covered`
    /// hold, when enough have come since the last time, so a breakdown by such a key reads
    /// about a row per value and hour instead of one per settled write. Called by the
    /// partition's processor after a settled write ends at `covered`. Counts nothing anew: a
    /// breakdown is the same with or without it, and a failure (or a stale caller) loses
    /// nothing. A warehouse whose reads add those rows up already (the embedded one, whose
    /// merges do) has nothing to do.
    async fn compact_sets(
        &self,
        partition: u16,
        sets: &[(String, String)],
        covered: u64,
    ) -> Result<()> {
        let _ = (partition, sets, covered);
        Ok(())
    }
    /// The exact tally of a poll over every stored vote, of every partition its votes come
    /// from: its shares ([`Warehouse::tally_by_partition`]) added up ([`Tally::merged`]);
    /// `as_of` is [`poll_as_of`] the last stored vote of each.
    async fn tally(&self, poll_id: &str) -> Result<Tally> {
        let shares = self.tally_by_partition(poll_id).await?;
        Ok(Tally::merged(shares.values()))
    }
    /// A poll's tally in each partition of the log its votes come from, each over that
    /// partition's stored votes (`as_of`: the partition's last one, `unique_voters`: the
    /// distinct voters among them): the shares a processor of each partition counts on from,
    /// and that live totals add up (see [`crate::results::Results::merge`]). Empty before
    /// the poll's first vote.
    async fn tally_by_partition(&self, poll_id: &str) -> Result<BTreeMap<u16, Tally>>;
    /// The distinct non-empty voter keys of a poll.
    async fn voter_keys(&self, poll_id: &str) -> Result<Vec<String>>;
    /// Ballots and answer counts per group, exact as of the poll's newest rollup row in
    /// each partition its votes come from (`as_of`: [`poll_as_of`] those): read from
    /// [`RollupRow`]s, with cut buckets of a time range completed from the raw votes (see
    /// [`crate::rollup`]).
    async fn breakdown(&self, query: &BreakdownQuery) -> Result<Breakdown>;
    /// The widths of the tumbling windows a poll's window rows were written with (the
    /// processor's setting when it wrote them), smallest first; empty before its first vote.
    async fn window_widths(&self, poll_id: &str) -> Result<Vec<u32>>;
    async fn timeseries(&self, query: &TimeseriesQuery) -> Result<Vec<TimePoint>>;
    /// The distinct values each segment dimension (standard key or the poll's own) takes in
    /// every row stored for a poll in `partition` — raw votes and rollups of both levels —
    /// leaving out the empty value; a dimension without values is absent. A partition's
    /// processor starts from them to cap the values it counts per dimension (see
    /// [`crate::segment::MAX_SEGMENT_VALUES`]); a spread poll's partitions cap their shares
    /// each on its own, so each starts from its own rows only.
    async fn segment_values(
        &self,
        poll_id: &str,
        partition: u16,
    ) -> Result<BTreeMap<String, BTreeSet<String>>>;
    async fn check(&self) -> Result<()>;

    /// The counted vote of a poll with this vote id (the first, if a `dedupe: none` poll
    /// counted the id under several keys), or `None`. Answers late retries on polls whose
    /// entries left the log ([`super::LogRetention`]); a warehouse behind a log that keeps
    /// every entry is never asked.
    async fn counted_vote(&self, poll_id: &str, vote_id: &str) -> Result<Option<StoredVote>> {
        let _ = (poll_id, vote_id);
        Err(Error::failed(
            "warehouse",
            "looking up a vote by id: this warehouse does not",
        ))
    }

    // The analysts' tables (see [`crate::analyst`]). A warehouse without them answers every
    // call with an error; both of tally's warehouses have them.

    /// Keeps these poll definitions as the rows of `polls` and `poll_options`: per poll, the
    /// record with the highest `version` recorded so far wins, whatever order they come in.
    async fn record_polls(&self, polls: &[Poll]) -> Result<()> {
        let _ = polls;
        Err(no_analyst_tables("recording polls"))
    }

    /// Runs an analyst's query within `limits`, over the analyst tables only, with the
    /// tables of counted votes pinned to one position of the log per partition. Refusals are
    /// [`crate::Error::Invalid`] problems: `sql-not-allowed` (before any engine sees the
    /// query), `sql-invalid` (with the engine's message) and `sql-limit-exceeded` (naming the
    /// limit; also as the error that ends `batches` when it is hit while rows come).
    async fn analyst_sql(&self, sql: &str, limits: &SqlLimits) -> Result<AnalystRows> {
        let _ = (sql, limits);
        Err(no_analyst_tables("analyst SQL"))
    }

    /// Every counted ballot of a poll, as [`crate::analyst::ballot_schema`] rows in no
    /// particular order, exact as of the poll's last counted vote in each partition when
    /// the call was made (`positions`, and `as_of` as its results report it): a vote
    /// counted while the rows stream is not among them.
    async fn ballots(&self, poll_id: &str) -> Result<AnalystRows> {
        let _ = poll_id;
        Err(no_analyst_tables("exporting ballots"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_polls_position_adds_up_its_partitions() {
        assert_eq!(poll_as_of(&Positions::new()), 0);
        assert_eq!(poll_as_of(&Positions::from([(3, 41)])), 41);
        assert_eq!(poll_as_of(&Positions::from([(0, 30), (1, 31)])), 61);
        assert_eq!(
            poll_as_of(&Positions::from([(0, u64::MAX), (1, 1)])),
            u64::MAX
        );
    }

    #[test]
    fn newer_positions_take_each_partitions_newer() {
        let settled = Positions::from([(0, 5), (1, 3)]);
        let fresh = Positions::from([(1, 7), (2, 1)]);
        assert_eq!(
            newer_positions(&settled, &fresh),
            Positions::from([(0, 5), (1, 7), (2, 1)])
        );
        assert_eq!(
            newer_positions(&fresh, &settled),
            newer_positions(&settled, &fresh)
        );
    }
}
