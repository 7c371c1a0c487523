//! The [`Warehouse`] guarantees: idempotent migrations, per-table and per-partition
//! watermarks, whole inserts, exact tallies, breakdowns exact as of their rollups (settled
//! rows replacing fresh ones, cut buckets completed from raw votes, filters and time
//! ranges), summed windows and the widths they were written with.

use std::collections::BTreeMap;
use std::sync::Arc;

use tally_core::analytics::{BreakdownQuery, Dimension, TimeseriesQuery};
use tally_core::ports::{StoredVote, Warehouse, Watermarks, WindowRow};
use tally_core::results::Tally;
use tally_core::rollup::{RollupLevel, RollupRow, Rollups};

use crate::vote;

/// One `#[tokio::test]` per guarantee of this module, in a module named `$suite`, each on a
/// fresh warehouse from `$factory` (see the crate documentation):
/// `warehouse_suite!(parquet_warehouse, { … (Arc::new(warehouse), guard) });`
#[macro_export]
macro_rules! warehouse_suite {
    ($suite:ident, $factory:block) => {
        $crate::__suite!(
            $suite,
            $factory,
            warehouse {
                migrations_apply_once,
                a_fresh_warehouse_has_zero_watermarks,
                the_votes_watermark_is_the_last_stored_seq,
                watermarks_are_per_partition,
                an_insert_is_seen_whole,
                the_tally_counts_every_stored_vote,
                the_tally_of_a_poll_without_votes_is_empty,
                voter_keys_are_the_distinct_keys,
                a_breakdown_without_rollups_is_empty,
                a_breakdown_is_exact_as_of_its_rollups,
                settled_rollups_replace_the_fresh_rows_they_cover,
                rollup_watermarks_are_per_level,
                time_ranges_count_whole_and_cut_buckets,
                breakdowns_group_by_several_dimensions,
                largest_groups_come_first,
                filters_and_time_range_apply,
                the_windows_watermark_is_the_last_covered_seq,
                partial_window_rows_add_up,
                timeseries_points_are_aligned_to_the_step,
                window_widths_are_distinct_and_smallest_first,
                a_poll_without_window_rows_has_no_widths,
                a_reachable_warehouse_checks_ok,
            }
        );
    };
}

const POLL: &str = "conf-wh";
/// When the first sample vote came: 20 s into a minute.
const T0: i64 = 1_700_000_000_000;

/// 30 votes of [`POLL`] at seqs 10..=39, 10 s apart from [`T0`]: a third for `a`, the rest
/// for `b`; 20 voters; DE and FR alternating; the first 10 on plan `pro`, the rest `free`.
fn sample_votes() -> Vec<StoredVote> {
    (0..30u64)
        .map(|i| {
            let mut v = vote(
                POLL,
                &format!("w-{i}"),
                &format!("k{}", i % 20),
                if i % 3 == 0 { "a" } else { "b" },
                T0 + i as i64 * 10_000,
            );
            v.segment.country = if i % 2 == 0 { "DE".into() } else { "FR".into() };
            v.segment.custom.insert(
                "plan".into(),
                if i < 10 { "pro".into() } else { "free".into() },
            );
            StoredVote {
                seq: 10 + i,
                vote: v,
            }
        })
        .collect()
}

/// Migrates, then stores the sample votes in partition 0 in two inserts (up to seq 29, then
/// 39), and one vote of another poll in partition 1 at seq 99.
async fn with_votes(warehouse: &dyn Warehouse) -> Vec<StoredVote> {
    warehouse.migrate().await.expect("migrate");
    let votes = sample_votes();
    warehouse
        .insert_votes(0, &votes[..20])
        .await
        .expect("insert");
    warehouse
        .insert_votes(0, &votes[20..])
        .await
        .expect("insert");
    let other_partition = StoredVote {
        seq: 99,
        vote: vote("conf-other", "o-1", "x", "a", T0),
    };
    warehouse
        .insert_votes(1, &[other_partition])
        .await
        .expect("insert");
    votes
}

/// The rollup rows of `votes`, covering the log up to `covered`.
fn rollup_rows(votes: &[StoredVote], covered: u64) -> Vec<RollupRow> {
    let mut rollups = Rollups::default();
    for stored in votes {
        rollups.add(&stored.vote, covered);
    }
    rollups.rows()
}

/// The rollups of the first sample votes (up to seq 29), as one fresh write.
async fn first_fresh_rollups(warehouse: &dyn Warehouse, votes: &[StoredVote]) {
    warehouse
        .insert_rollups(0, RollupLevel::Fresh, &rollup_rows(&votes[..20], 29))
        .await
        .expect("insert rollups");
}

/// The same votes settled.
async fn first_settled_rollups(warehouse: &dyn Warehouse, votes: &[StoredVote]) {
    warehouse
        .insert_rollups(0, RollupLevel::Settled, &rollup_rows(&votes[..20], 29))
        .await
        .expect("insert settled rollups");
}

/// Then a second fresh write, of the rest (up to seq 39).
async fn second_fresh_rollups(warehouse: &dyn Warehouse, votes: &[StoredVote]) {
    warehouse
        .insert_rollups(0, RollupLevel::Fresh, &rollup_rows(&votes[20..], 39))
        .await
        .expect("insert rollups");
}

/// The sample votes and all three rollup writes: breakdowns are exact as of seq 39.
async fn with_rollups(warehouse: &dyn Warehouse) {
    let votes = with_votes(warehouse).await;
    first_fresh_rollups(warehouse, &votes).await;
    first_settled_rollups(warehouse, &votes).await;
    second_fresh_rollups(warehouse, &votes).await;
}

fn by_country(from_ms: Option<i64>, to_ms: Option<i64>) -> BreakdownQuery {
    BreakdownQuery {
        poll_id: POLL.into(),
        by: vec![Dimension("country".into())],
        filters: vec![],
        from_ms,
        to_ms,
    }
}

/// The range of the first rollup write's votes, cutting the bucket of the last of them.
fn first_part() -> BreakdownQuery {
    by_country(None, Some(1_700_000_235_000))
}

/// The countries by plan of every sample vote, both plans asked for by a filter.
async fn by_country_and_plan(warehouse: &dyn Warehouse) -> tally_core::analytics::Breakdown {
    warehouse
        .breakdown(&BreakdownQuery {
            poll_id: POLL.into(),
            by: vec![Dimension("country".into()), Dimension("plan".into())],
            filters: vec![(Dimension("plan".into()), vec!["pro".into(), "free".into()])],
            from_ms: Some(T0),
            to_ms: Some(1_700_000_300_000),
        })
        .await
        .expect("breakdown")
}

fn window(start: i64, seconds: u32, option: &str, votes: u64, last_seq: u64) -> WindowRow {
    WindowRow {
        poll_id: POLL.into(),
        window_start: start,
        window_seconds: seconds,
        option: option.into(),
        votes,
        last_seq,
    }
}

/// Two inserts of 10 s window rows: the second adds to a window of the first.
async fn with_windows(warehouse: &dyn Warehouse) {
    warehouse.migrate().await.expect("migrate");
    let rows = vec![
        window(1_700_000_000, 10, "a", 2, 20),
        window(1_700_000_010, 10, "b", 3, 20),
    ];
    warehouse
        .insert_windows(0, &rows)
        .await
        .expect("insert windows");
    let more = vec![window(1_700_000_000, 10, "a", 5, 30)];
    warehouse
        .insert_windows(0, &more)
        .await
        .expect("insert windows");
}

async fn minute_series(warehouse: &dyn Warehouse) -> Vec<tally_core::analytics::TimePoint> {
    warehouse
        .timeseries(&TimeseriesQuery {
            poll_id: POLL.into(),
            step_seconds: 60,
            from_ms: None,
            to_ms: None,
        })
        .await
        .expect("timeseries")
}

pub async fn migrations_apply_once(warehouse: Arc<dyn Warehouse>) {
    warehouse.migrate().await.expect("migrate");
    assert!(
        warehouse.migrate().await.expect("migrate again").is_empty(),
        "migrations apply once"
    );
}

pub async fn a_fresh_warehouse_has_zero_watermarks(warehouse: Arc<dyn Warehouse>) {
    warehouse.migrate().await.expect("migrate");
    assert_eq!(
        warehouse.watermarks(0).await.expect("watermarks"),
        Watermarks::default()
    );
}

pub async fn the_votes_watermark_is_the_last_stored_seq(warehouse: Arc<dyn Warehouse>) {
    with_votes(warehouse.as_ref()).await;
    assert_eq!(
        warehouse.watermarks(0).await.expect("watermarks"),
        Watermarks {
            votes: 39,
            windows: 0,
            rollups: 0,
            settled: 0
        }
    );
}

pub async fn watermarks_are_per_partition(warehouse: Arc<dyn Warehouse>) {
    with_votes(warehouse.as_ref()).await;
    assert_eq!(
        warehouse.watermarks(1).await.expect("watermarks").votes,
        99,
        "watermarks are per partition"
    );
}

/// Once an insert returns, reads see every row of it: the tally and the watermark move by
/// whole inserts.
pub async fn an_insert_is_seen_whole(warehouse: Arc<dyn Warehouse>) {
    warehouse.migrate().await.expect("migrate");
    let votes = sample_votes();
    for (rows, ballots, last_seq) in [(&votes[..20], 20, 29), (&votes[20..], 30, 39)] {
        warehouse.insert_votes(0, rows).await.expect("insert");
        let tally = warehouse.tally(POLL).await.expect("tally");
        assert_eq!(
            (tally.ballots, tally.as_of),
            (ballots, last_seq),
            "a read after an insert sees all of its rows"
        );
        assert_eq!(
            warehouse.watermarks(0).await.expect("watermarks").votes,
            last_seq,
            "the watermark moves to the insert's last row"
        );
    }
}

pub async fn the_tally_counts_every_stored_vote(warehouse: Arc<dyn Warehouse>) {
    with_votes(warehouse.as_ref()).await;
    let tally = warehouse.tally(POLL).await.expect("tally");
    let expected = Tally {
        ballots: 30,
        unique_voters: 20,
        counts: [("a".to_owned(), 10), ("b".to_owned(), 20)].into(),
        as_of: 39,
    };
    assert_eq!(tally, expected);
}

pub async fn the_tally_of_a_poll_without_votes_is_empty(warehouse: Arc<dyn Warehouse>) {
    with_votes(warehouse.as_ref()).await;
    assert_eq!(
        warehouse.tally("conf-none").await.expect("tally"),
        Tally::default()
    );
}

pub async fn voter_keys_are_the_distinct_keys(warehouse: Arc<dyn Warehouse>) {
    with_votes(warehouse.as_ref()).await;
    let mut keys = warehouse.voter_keys(POLL).await.expect("voter keys");
    keys.sort();
    assert_eq!(keys.len(), 20);
    let mut expected: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    expected.sort();
    assert_eq!(keys, expected, "each voter key once");
}

/// Breakdowns read the rollups: none yet, so nothing to show.
pub async fn a_breakdown_without_rollups_is_empty(warehouse: Arc<dyn Warehouse>) {
    with_votes(warehouse.as_ref()).await;
    let empty = warehouse
        .breakdown(&by_country(None, None))
        .await
        .expect("breakdown");
    assert_eq!((empty.groups.len(), empty.as_of), (0, 0));
}

/// After one fresh write a breakdown is exact as of it: the raw votes that complete a cut
/// bucket are counted up to the rollups' position, not beyond.
pub async fn a_breakdown_is_exact_as_of_its_rollups(warehouse: Arc<dyn Warehouse>) {
    let votes = with_votes(warehouse.as_ref()).await;
    first_fresh_rollups(warehouse.as_ref(), &votes).await;
    let first = warehouse.breakdown(&first_part()).await.expect("breakdown");
    assert_eq!(first.as_of, 29, "exact as of the rollups");
    assert_eq!(
        first.groups.iter().map(|g| g.ballots).sum::<u64>(),
        20,
        "raw votes of a cut bucket count up to the rollups' position only"
    );
}

pub async fn settled_rollups_replace_the_fresh_rows_they_cover(warehouse: Arc<dyn Warehouse>) {
    let votes = with_votes(warehouse.as_ref()).await;
    first_fresh_rollups(warehouse.as_ref(), &votes).await;
    let first = warehouse.breakdown(&first_part()).await.expect("breakdown");
    first_settled_rollups(warehouse.as_ref(), &votes).await;
    let settled = warehouse.breakdown(&first_part()).await.expect("breakdown");
    assert_eq!(
        settled, first,
        "settled rows replace the fresh rows they cover, not add to them"
    );
}

pub async fn rollup_watermarks_are_per_level(warehouse: Arc<dyn Warehouse>) {
    with_rollups(warehouse.as_ref()).await;
    let marks = warehouse.watermarks(0).await.expect("watermarks");
    assert_eq!((marks.rollups, marks.settled), (39, 29));
}

/// Votes are 10 s apart from a time 20 s into a minute: minute buckets start at +40 s,
/// +100 s, ... A range counts the rollups of the buckets it covers whole and the raw votes
/// of the parts of buckets it cuts.
pub async fn time_ranges_count_whole_and_cut_buckets(warehouse: Arc<dyn Warehouse>) {
    with_rollups(warehouse.as_ref()).await;
    for (from, to, ballots, what) in [
        (None, None, 30, "all buckets"),
        (
            Some(0),
            Some(300_000),
            30,
            "the whole range, cut buckets at both ends",
        ),
        (Some(5_000), Some(25_000), 2, "inside one bucket"),
        (Some(5_000), Some(300_000), 29, "whole buckets and cut ones"),
        (Some(40_000), Some(160_000), 12, "whole buckets only"),
        (Some(40_000), Some(40_000), 0, "an empty range"),
    ] {
        let breakdown = warehouse
            .breakdown(&by_country(from.map(|f| T0 + f), to.map(|t| T0 + t)))
            .await
            .expect("breakdown");
        assert_eq!(breakdown.as_of, 39);
        assert_eq!(
            breakdown.groups.iter().map(|g| g.ballots).sum::<u64>(),
            ballots,
            "{what}"
        );
        let answers: u64 = breakdown
            .groups
            .iter()
            .flat_map(|g| g.counts.values())
            .sum();
        assert_eq!(answers, ballots, "{what}: one answer per ballot");
    }
}

pub async fn breakdowns_group_by_several_dimensions(warehouse: Arc<dyn Warehouse>) {
    with_rollups(warehouse.as_ref()).await;
    let breakdown = by_country_and_plan(warehouse.as_ref()).await;
    assert_eq!(breakdown.as_of, 39);
    let total: u64 = breakdown.groups.iter().map(|g| g.ballots).sum();
    assert_eq!(total, 30);
    let de_pro = breakdown
        .groups
        .iter()
        .find(|g| g.values == ["DE", "pro"])
        .expect("DE/pro group");
    assert_eq!(de_pro.ballots, 5);
    assert_eq!(de_pro.counts.values().sum::<u64>(), 5);
}

pub async fn largest_groups_come_first(warehouse: Arc<dyn Warehouse>) {
    with_rollups(warehouse.as_ref()).await;
    let breakdown = by_country_and_plan(warehouse.as_ref()).await;
    assert!(
        breakdown
            .groups
            .windows(2)
            .all(|w| w[0].ballots >= w[1].ballots),
        "largest groups first"
    );
}

pub async fn filters_and_time_range_apply(warehouse: Arc<dyn Warehouse>) {
    with_rollups(warehouse.as_ref()).await;
    let filtered = warehouse
        .breakdown(&BreakdownQuery {
            poll_id: POLL.into(),
            by: vec![Dimension("country".into())],
            filters: vec![(Dimension("country".into()), vec!["DE".into()])],
            from_ms: Some(1_700_000_100_000),
            to_ms: None,
        })
        .await
        .expect("breakdown");
    assert_eq!(filtered.groups.len(), 1);
    assert_eq!(
        filtered.groups[0].ballots, 10,
        "filters and time range apply"
    );
}

pub async fn the_windows_watermark_is_the_last_covered_seq(warehouse: Arc<dyn Warehouse>) {
    with_windows(warehouse.as_ref()).await;
    assert_eq!(
        warehouse.watermarks(0).await.expect("watermarks").windows,
        30
    );
}

pub async fn partial_window_rows_add_up(warehouse: Arc<dyn Warehouse>) {
    with_windows(warehouse.as_ref()).await;
    let series = minute_series(warehouse.as_ref()).await;
    let sums: BTreeMap<String, u64> =
        series
            .iter()
            .flat_map(|p| p.counts.clone())
            .fold(BTreeMap::new(), |mut acc, (k, v)| {
                *acc.entry(k).or_default() += v;
                acc
            });
    assert_eq!(
        sums,
        [("a".to_owned(), 7), ("b".to_owned(), 3)].into(),
        "partial window rows add up"
    );
}

pub async fn timeseries_points_are_aligned_to_the_step(warehouse: Arc<dyn Warehouse>) {
    with_windows(warehouse.as_ref()).await;
    let series = minute_series(warehouse.as_ref()).await;
    assert!(!series.is_empty(), "the window rows make points");
    assert!(
        series.iter().all(|p| p.t % 60 == 0),
        "points are aligned to the step"
    );
}

/// A poll's window rows written with several widths (the processor's setting changed
/// between writes) report each width once, smallest first; another poll's widths are not
/// among them.
pub async fn window_widths_are_distinct_and_smallest_first(warehouse: Arc<dyn Warehouse>) {
    with_windows(warehouse.as_ref()).await;
    let wider = vec![
        window(1_700_000_040, 60, "a", 1, 40),
        window(1_700_000_100, 300, "b", 1, 40),
        window(1_700_000_040, 60, "b", 1, 40),
    ];
    warehouse
        .insert_windows(0, &wider)
        .await
        .expect("insert windows");
    let other_poll = WindowRow {
        poll_id: "conf-other".into(),
        ..window(1_700_000_005, 5, "a", 1, 41)
    };
    warehouse
        .insert_windows(0, &[other_poll])
        .await
        .expect("insert windows");
    assert_eq!(
        warehouse.window_widths(POLL).await.expect("window widths"),
        [10, 60, 300],
        "each width once, smallest first, only the poll's own"
    );
}

pub async fn a_poll_without_window_rows_has_no_widths(warehouse: Arc<dyn Warehouse>) {
    with_windows(warehouse.as_ref()).await;
    assert_eq!(
        warehouse
            .window_widths("conf-none")
            .await
            .expect("window widths"),
        Vec::<u32>::new(),
        "no window rows, no widths"
    );
}

pub async fn a_reachable_warehouse_checks_ok(warehouse: Arc<dyn Warehouse>) {
    warehouse.migrate().await.expect("migrate");
    warehouse.check().await.expect("check");
}
