//! The processor keeps the two rollup levels aligned across restarts: whatever tables a
//! crash left behind, a breakdown counts every vote once; and what it holds between rollup
//! writes is bounded by its settings, not by the length of the log. Runs on the embedded
//! back ends, where a crash can keep one table's file and lose another's in-memory tail.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tally_core::analytics::{Breakdown, BreakdownQuery, Dimension, TimePoint, TimeseriesQuery};
use tally_core::poll::Dedupe;
use tally_core::ports::{Appended, StoredVote, VoteLog, Warehouse, Watermarks, WindowRow};
use tally_core::results::Tally;
use tally_core::rollup::{RollupLevel, RollupRow, Rollups};
use tally_core::segment::Segment;
use tally_core::vote::Vote;
use tally_service::Tasks;

fn vote(i: u64) -> Vote {
    Vote {
        vote_id: format!("v-{i}"),
        poll_id: "aligned".into(),
        voter_key: format!("k{i}"),
        choice: vec![if i.is_multiple_of(3) { "a" } else { "b" }.into()],
        value: None,
        segment: Segment {
            country: if i.is_multiple_of(2) { "DE" } else { "FR" }.into(),
            ..Default::default()
        },
        received_at: 1_700_000_000_000 + i as i64 * 100,
    }
}

/// Embedded back ends with one log partition, in `dir`.
fn one_partition(dir: &tempfile::TempDir) -> tally_embedded::Embedded {
    tally_embedded::open(
        dir.path(),
        tally_embedded::Options {
            partitions: 1,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Appends `votes` to the log of `store`, each accepted; their log positions, in order.
async fn append(store: &tally_embedded::Embedded, votes: impl Iterator<Item = Vote>) -> Vec<u64> {
    let votes: Vec<(Vote, String)> = votes
        .map(|v| {
            let key = v.unique_key(Dedupe::PerVoter);
            (v, key)
        })
        .collect();
    store
        .log
        .append_many(&votes)
        .await
        .into_iter()
        .map(|answer| match answer {
            Ok(Appended::Accepted { seq, .. }) => seq,
            other => panic!("vote refused: {other:?}"),
        })
        .collect()
}

/// Starts a processor over the log and registry of `store`, writing to `warehouse`.
fn start(
    store: &tally_embedded::Embedded,
    warehouse: Arc<dyn Warehouse>,
    config: tally_processor::Config,
) -> Tasks {
    let processor = Tasks::new();
    tally_processor::start(
        tally_processor::Deps {
            log: store.log.clone(),
            registry: store.registry.clone(),
            warehouse,
            live: store.live.clone(),
            leases: None,
        },
        config,
        &processor,
    )
    .unwrap();
    processor
}

/// The test poll's answers per option over its whole time series (the window rows).
async fn windowed(warehouse: &dyn Warehouse) -> BTreeMap<String, u64> {
    let points = warehouse
        .timeseries(&TimeseriesQuery {
            poll_id: "aligned".into(),
            step_seconds: 60,
            from_ms: None,
            to_ms: None,
        })
        .await
        .unwrap();
    let mut counts = BTreeMap::new();
    for (option, votes) in points.into_iter().flat_map(|point| point.counts) {
        *counts.entry(option).or_default() += votes;
    }
    counts
}

/// The test poll's breakdown by country, once the rollups reach `tip`.
async fn breakdown_at(warehouse: &dyn Warehouse, tip: u64) -> Breakdown {
    let query = BreakdownQuery {
        poll_id: "aligned".into(),
        by: vec![Dimension("country".into())],
        ..Default::default()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let breakdown = warehouse.breakdown(&query).await.unwrap();
        if breakdown.as_of >= tip {
            return breakdown;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rollups reached {} of {tip}",
            breakdown.as_of
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Settled rows cover the first 300 votes while the fresh rows (and the raw votes) are gone,
/// as after a standalone crash that kept the settled file but not the others' tails. The
/// processor replays the log; its first fresh write must start after the settled rows,
/// or the votes between would count twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_rows_ahead_of_fresh_ones_count_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = one_partition(&dir);
    let votes: Vec<Vote> = (1..=500).map(vote).collect();
    let seqs = append(&store, votes.iter().cloned()).await;
    let mut settled = Rollups::default();
    for (v, seq) in votes.iter().zip(seqs).take(300) {
        settled.add(v, seq);
    }
    let covered = settled.last_seq();
    store
        .warehouse
        .insert_rollups(0, RollupLevel::Settled, &settled.rows())
        .await
        .unwrap();

    let warehouse: Arc<dyn Warehouse> = store.warehouse.clone();
    let processor = start(
        &store,
        warehouse.clone(),
        tally_processor::Config {
            // No settled write during the test: the breakdown must rest on the old one.
            settle_interval: Duration::from_secs(600),
            ..Default::default()
        },
    );

    let breakdown = breakdown_at(warehouse.as_ref(), store.log.tip(0)).await;
    processor.shutdown(Duration::from_secs(60)).await;
    let ballots: Vec<(String, u64)> = breakdown
        .groups
        .iter()
        .map(|g| (g.values[0].clone(), g.ballots))
        .collect();
    assert_eq!(
        ballots,
        [("DE".to_owned(), 250), ("FR".to_owned(), 250)],
        "each vote once (settled up to {covered}, fresh after)"
    );
    let answers: u64 = breakdown
        .groups
        .iter()
        .flat_map(|g| g.counts.values())
        .sum();
    assert_eq!(answers, 500);
}

/// Window rows cover the first 300 votes while the raw votes and the rollups are gone,
/// as after a crash that kept one table's rows and not the others'. The processor replays
/// the log from the start; the replayed votes at or below the windows watermark must not
/// reach the window rows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_rows_ahead_of_the_other_tables_count_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = one_partition(&dir);
    let votes: Vec<Vote> = (1..=500).map(vote).collect();
    let seqs = append(&store, votes.iter().cloned()).await;
    let covered = seqs[299];
    let width = i64::from(tally_processor::DEFAULT_WINDOW_SECONDS);
    let mut windows: BTreeMap<(i64, String), u64> = BTreeMap::new();
    for v in &votes[..300] {
        let start = v.received_at / 1000 / width * width;
        *windows.entry((start, v.choice[0].clone())).or_default() += 1;
    }
    let rows: Vec<WindowRow> = windows
        .into_iter()
        .map(|((window_start, option), votes)| WindowRow {
            poll_id: "aligned".into(),
            window_start,
            window_seconds: tally_processor::DEFAULT_WINDOW_SECONDS,
            option,
            votes,
            last_seq: covered,
        })
        .collect();
    store.warehouse.insert_windows(0, &rows).await.unwrap();
    assert_eq!(
        store.warehouse.watermarks(0).await.unwrap().windows,
        covered
    );

    let warehouse: Arc<dyn Warehouse> = store.warehouse.clone();
    let processor = start(
        &store,
        warehouse.clone(),
        tally_processor::Config::default(),
    );
    breakdown_at(warehouse.as_ref(), store.log.tip(0)).await;
    processor.shutdown(Duration::from_secs(60)).await;

    let counts = windowed(warehouse.as_ref()).await;
    // Votes 3, 6, … 498 chose `a`: 166 of them.
    assert_eq!(
        counts,
        [("a".to_owned(), 166), ("b".to_owned(), 334)].into(),
        "each answer once in the window rows (the first 300 written before the start)"
    );
}

/// The embedded warehouse, noting how many votes each rollup write covers; with
/// `lose_answers`, the first insert into each table lands but answers an error, as when
/// the warehouse goes down while answering.
struct Recording {
    inner: Arc<dyn Warehouse>,
    writes: Mutex<Vec<(RollupLevel, u64)>>,
    /// The position each settled write ended at.
    settled_at: Mutex<Vec<u64>>,
    /// Each call of `compact_sets`: its sets and position.
    compactions: Mutex<Vec<Compaction>>,
    /// The answers each window write counts.
    window_writes: Mutex<Vec<u64>>,
    /// Each fresh write: the position it covers and where the window rows stood before it.
    fresh_and_windows: Mutex<Vec<(u64, u64)>>,
    lose_answers: Mutex<Vec<&'static str>>,
}

/// A call of `compact_sets`: its `(poll, set)` pairs and position.
type Compaction = (Vec<(String, String)>, u64);

impl Recording {
    fn new(inner: Arc<dyn Warehouse>, lose_answers: &[&'static str]) -> Arc<Recording> {
        Arc::new(Recording {
            inner,
            writes: Mutex::new(Vec::new()),
            settled_at: Mutex::new(Vec::new()),
            compactions: Mutex::new(Vec::new()),
            window_writes: Mutex::new(Vec::new()),
            fresh_and_windows: Mutex::new(Vec::new()),
            lose_answers: Mutex::new(lose_answers.to_vec()),
        })
    }

    /// The answer to an insert into `table` that landed.
    fn answer(&self, table: &str) -> tally_core::Result<()> {
        let mut lose = self.lose_answers.lock().unwrap();
        match lose.iter().position(|t| *t == table) {
            Some(i) => {
                lose.remove(i);
                Err(tally_core::Error::unavailable(
                    "warehouse",
                    format!("the answer to the insert into {table} was lost"),
                ))
            }
            None => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl Warehouse for Recording {
    async fn migrate(&self) -> tally_core::Result<Vec<u32>> {
        self.inner.migrate().await
    }
    async fn watermarks(&self, partition: u16) -> tally_core::Result<Watermarks> {
        self.inner.watermarks(partition).await
    }
    async fn insert_votes(&self, partition: u16, votes: &[StoredVote]) -> tally_core::Result<()> {
        self.inner.insert_votes(partition, votes).await?;
        self.answer("votes")
    }
    async fn insert_windows(&self, partition: u16, rows: &[WindowRow]) -> tally_core::Result<()> {
        self.inner.insert_windows(partition, rows).await?;
        let answers = rows.iter().map(|row| row.votes).sum();
        self.window_writes.lock().unwrap().push(answers);
        self.answer("vote_windows")
    }
    async fn insert_rollups(
        &self,
        partition: u16,
        level: RollupLevel,
        rows: &[RollupRow],
    ) -> tally_core::Result<()> {
        if level == RollupLevel::Fresh {
            let windows = self.inner.watermarks(partition).await?.windows;
            let covered = rows.iter().map(|row| row.last_seq).max().unwrap_or(0);
            self.fresh_and_windows
                .lock()
                .unwrap()
                .push((covered, windows));
        }
        self.inner.insert_rollups(partition, level, rows).await?;
        // The votes a write covers: its whole segments' ballots (the cube counts them again).
        let votes = rows
            .iter()
            .filter(|row| row.dims.is_empty())
            .map(|row| row.ballots)
            .sum();
        self.writes.lock().unwrap().push((level, votes));
        if level == RollupLevel::Settled {
            let at = rows.iter().map(|row| row.last_seq).max().unwrap_or(0);
            self.settled_at.lock().unwrap().push(at);
        }
        self.answer(level.table())
    }
    async fn compact_sets(
        &self,
        partition: u16,
        sets: &[(String, String)],
        covered: u64,
    ) -> tally_core::Result<()> {
        self.compactions
            .lock()
            .unwrap()
            .push((sets.to_vec(), covered));
        self.inner.compact_sets(partition, sets, covered).await
    }
    async fn tally_by_partition(
        &self,
        poll_id: &str,
    ) -> tally_core::Result<std::collections::BTreeMap<u16, Tally>> {
        self.inner.tally_by_partition(poll_id).await
    }
    async fn voter_keys(&self, poll_id: &str) -> tally_core::Result<Vec<String>> {
        self.inner.voter_keys(poll_id).await
    }
    async fn breakdown(&self, query: &BreakdownQuery) -> tally_core::Result<Breakdown> {
        self.inner.breakdown(query).await
    }
    async fn window_widths(&self, poll_id: &str) -> tally_core::Result<Vec<u32>> {
        self.inner.window_widths(poll_id).await
    }
    async fn timeseries(&self, query: &TimeseriesQuery) -> tally_core::Result<Vec<TimePoint>> {
        self.inner.timeseries(query).await
    }
    async fn segment_values(
        &self,
        poll_id: &str,
        partition: u16,
    ) -> tally_core::Result<BTreeMap<String, BTreeSet<String>>> {
        self.inner.segment_values(poll_id, partition).await
    }
    async fn check(&self) -> tally_core::Result<()> {
        self.inner.check().await
    }
}

/// Appends `votes` to an empty log of one partition, then has the processor read the backlog
/// without a pause (the rollup limits in votes, never in time) until the rollups reach its
/// end; the warehouse calls it made, recorded.
async fn process_backlog(
    votes: impl Iterator<Item = Vote>,
    batch_max: usize,
    rollup_votes: usize,
    settle_votes: usize,
) -> Arc<Recording> {
    let dir = tempfile::tempdir().unwrap();
    let store = one_partition(&dir);
    append(&store, votes).await;
    let recording = Recording::new(store.warehouse.clone(), &[]);
    let processor = start(
        &store,
        recording.clone(),
        tally_processor::Config {
            batch_max,
            rollup_votes,
            rollup_interval: Duration::from_secs(600),
            settle_votes,
            settle_interval: Duration::from_secs(600),
            ..Default::default()
        },
    );
    breakdown_at(recording.as_ref(), store.log.tip(0)).await;
    processor.shutdown(Duration::from_secs(60)).await;
    recording
}

/// Window rows are not written per batch (each insert is a ClickHouse part) but with the
/// fresh rollups, for many batches at once, and always before them, so a time series is
/// never behind a breakdown; they count every answer once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_rows_are_written_for_many_batches_at_once_before_the_rollups() {
    const VOTES: u64 = 3_000;
    let (batch_max, rollup_votes) = (50, 500);
    let recording = process_backlog((1..=VOTES).map(vote), batch_max, rollup_votes, 1_000).await;

    let writes = recording.window_writes.lock().unwrap().clone();
    assert_eq!(
        writes.iter().sum::<u64>(),
        VOTES,
        "window rows count every answer once: {writes:?}"
    );
    // 60 batches; a write when the pending answers reach the limit, and at the end.
    let most = (VOTES as usize).div_ceil(rollup_votes) + 1;
    assert!(
        writes.len() <= most,
        "{} window writes for {} batches, more than {most}: {writes:?}",
        writes.len(),
        VOTES as usize / batch_max
    );
    let fresh = recording.fresh_and_windows.lock().unwrap().clone();
    assert!(!fresh.is_empty());
    for (covered, windows) in fresh {
        assert!(
            windows >= covered,
            "fresh rollups up to {covered} written while the window rows stood at {windows}"
        );
    }
}

/// A backlog many times the rollup limits, read without a pause (so neither the time
/// limits nor a quiet log ever write the rollups): every write covers at most the vote
/// limit plus one batch, so the accumulators never hold more, however long the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_in_memory_stay_within_their_limits() {
    const VOTES: u64 = 3_000;
    let (batch_max, rollup_votes, settle_votes) = (50, 100, 300);
    let recording =
        process_backlog((1..=VOTES).map(vote), batch_max, rollup_votes, settle_votes).await;

    let writes = recording.writes.lock().unwrap().clone();
    let fresh: Vec<u64> = writes
        .iter()
        .filter(|(level, _)| *level == RollupLevel::Fresh)
        .map(|(_, votes)| *votes)
        .collect();
    let settled: Vec<u64> = writes
        .iter()
        .filter(|(level, _)| *level == RollupLevel::Settled)
        .map(|(_, votes)| *votes)
        .collect();
    let fresh_most = (rollup_votes + batch_max - 1) as u64;
    let settled_most = settle_votes as u64 + fresh_most - 1;
    assert_eq!(
        fresh.iter().sum::<u64>(),
        VOTES,
        "fresh writes cover every vote once"
    );
    assert!(
        fresh.iter().all(|&votes| votes <= fresh_most),
        "a fresh write covered more than {fresh_most} votes: {fresh:?}"
    );
    assert!(
        settled.len() as u64 >= VOTES / settled_most
            && settled.iter().all(|&votes| votes <= settled_most),
        "settled writes must come every {settle_votes} votes or so: {settled:?}"
    );
    assert!(
        recording.compactions.lock().unwrap().is_empty(),
        "a poll without keys of its own has no sets to add up"
    );
}

/// After a settled write the processor asks the warehouse to add up the settled rows of the
/// poll's own keys it wrote, naming the poll, the key's set and where the write ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_writes_ask_for_the_poll_own_keys_to_be_added_up() {
    let votes = (1..=1_000).map(|i| {
        let mut v = vote(i);
        v.segment
            .custom
            .insert("store".into(), format!("s{}", i % 40));
        v
    });
    let recording = process_backlog(votes, 50, 100, 200).await;

    let settled_at = recording.settled_at.lock().unwrap().clone();
    let compactions = recording.compactions.lock().unwrap().clone();
    assert!(settled_at.len() >= 3, "settled writes: {settled_at:?}");
    assert!(!compactions.is_empty(), "no settled rows were added up");
    for (sets, covered) in &compactions {
        assert_eq!(sets, &[("aligned".to_owned(), "store".to_owned())]);
        assert!(
            settled_at.contains(covered),
            "asked up to {covered}, where no settled write ended ({settled_at:?})"
        );
    }
}

/// Every insert lands but its answer is lost once per table: the processor must not write
/// the same rows again, or results, windows and breakdowns would count those votes twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_whose_answer_was_lost_is_not_written_twice() {
    let dir = tempfile::tempdir().unwrap();
    let store = one_partition(&dir);
    append(&store, (1..=500).map(vote)).await;
    let tables = [
        "votes",
        "vote_windows",
        RollupLevel::Fresh.table(),
        RollupLevel::Settled.table(),
    ];
    let recording = Recording::new(store.warehouse.clone(), &tables);
    let processor = start(
        &store,
        recording.clone(),
        tally_processor::Config {
            batch_max: 100,
            rollup_votes: 100,
            settle_votes: 200,
            ..Default::default()
        },
    );
    let breakdown = breakdown_at(recording.as_ref(), store.log.tip(0)).await;
    processor.shutdown(Duration::from_secs(60)).await;
    assert!(
        recording.lose_answers.lock().unwrap().is_empty(),
        "every table lost an answer once"
    );
    let tally = recording.tally("aligned").await.unwrap();
    assert_eq!(tally.ballots, 500, "results count each vote once");
    let ballots: Vec<u64> = breakdown.groups.iter().map(|g| g.ballots).collect();
    assert_eq!(ballots, [250, 250], "breakdowns count each vote once");
    let windowed: u64 = windowed(recording.as_ref()).await.values().sum();
    assert_eq!(windowed, 500, "windows count each vote once");
}
