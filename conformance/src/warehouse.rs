//! The [`Warehouse`] guarantees: idempotent migrations, per-table and per-partition
//! watermarks, whole inserts, exact tallies, breakdowns exact as of their rollups (settled
//! rows replacing fresh ones, cut buckets completed from raw votes, filters and time
//! ranges), summed windows and the widths they were written with, and the distinct segment
//! values a poll's rows hold; and the analysts' tables: their documented columns, recorded
//! polls, the same answers to the portable subset of SQL, answers pinned to the log,
//! refusals that change nothing, limits that stop a query, and a poll's ballots for export.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tally_core::analyst::{self, SqlLimits};
use tally_core::analytics::{BreakdownQuery, Dimension, TimeseriesQuery};
use tally_core::ports::{StoredVote, Warehouse, Watermarks, WindowRow};
use tally_core::results::Tally;
use tally_core::rollup::{RollupLevel, RollupRow, Rollups};

use crate::rows::answer_of;
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
                breakdowns_read_from_the_cube_equal_the_votes,
                set_rows_kept_per_minute_by_an_earlier_version_are_read_alike,
                a_breakdown_one_set_answers_reads_that_sets_rows,
                a_poll_over_several_partitions_counts_each_as_far_as_it_goes,
                the_windows_watermark_is_the_last_covered_seq,
                partial_window_rows_add_up,
                timeseries_points_are_aligned_to_the_step,
                window_widths_are_distinct_and_smallest_first,
                a_poll_without_window_rows_has_no_widths,
                segment_values_are_the_distinct_values_of_each_dimension,
                segment_values_include_rollup_rows_of_both_levels,
                segment_values_are_those_of_the_poll_only,
                segment_values_are_those_of_the_partition_only,
                a_reachable_warehouse_checks_ok,
                analyst_tables_have_the_documented_columns,
                recorded_polls_keep_their_newest_version,
                poll_options_list_every_answer_in_order,
                ballots_are_the_counted_votes,
                answers_and_dimensions_are_one_row_per_item,
                portable_queries_give_the_same_answers,
                analyst_answers_are_pinned_to_the_positions_they_report,
                statements_that_change_something_are_refused,
                only_the_analyst_tables_can_be_read,
                invalid_queries_carry_the_engine_message,
                the_row_limit_stops_an_answer,
                the_time_limit_stops_a_runaway_query,
                the_memory_limit_stops_a_greedy_query,
                an_empty_answer_has_its_columns,
                a_polls_ballots_are_its_votes_as_of_its_last,
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

const CUBE_POLL: &str = "conf-cube";

/// 60 votes of [`CUBE_POLL`] at seqs 10..=69, 190 s apart from [`T0`] (800 s into an hour),
/// so over four hours: countries, devices and three answers in cycles of different
/// lengths, and a `store` of seven values on three votes in four (the fourth has none).
fn cube_votes() -> Vec<StoredVote> {
    (0..60u64)
        .map(|i| {
            let mut v = vote(
                CUBE_POLL,
                &format!("c-{i}"),
                &format!("k{i}"),
                ["a", "b", "c"][(i % 5 % 3) as usize],
                T0 + i as i64 * 190_000,
            );
            v.segment.country = ["DE", "FR"][(i % 2) as usize].into();
            v.segment.device = ["mobile", "desktop", "tablet"][(i % 3) as usize].into();
            if i % 4 != 0 {
                v.segment
                    .custom
                    .insert("store".into(), format!("s{}", i % 7));
            }
            StoredVote {
                seq: 10 + i,
                vote: v,
            }
        })
        .collect()
}

/// What a breakdown must answer, from the votes themselves: group values to ballots and
/// answer counts.
fn expected_breakdown(
    votes: &[StoredVote],
    query: &BreakdownQuery,
) -> BTreeMap<Vec<String>, (u64, BTreeMap<String, u64>)> {
    let value = |v: &tally_core::vote::Vote, dimension: &Dimension| -> String {
        v.segment.get(&dimension.0).to_owned()
    };
    let mut groups: BTreeMap<Vec<String>, (u64, BTreeMap<String, u64>)> = BTreeMap::new();
    for stored in votes {
        let v = &stored.vote;
        let in_range = query.from_ms.is_none_or(|f| v.received_at >= f)
            && query.to_ms.is_none_or(|t| v.received_at < t);
        let allowed = query
            .filters
            .iter()
            .all(|(dimension, values)| values.contains(&value(v, dimension)));
        if !in_range || !allowed {
            continue;
        }
        let key: Vec<String> = query.by.iter().map(|d| value(v, d)).collect();
        let group = groups.entry(key).or_default();
        group.0 += 1;
        for answer in &v.choice {
            *group.1.entry(answer.clone()).or_default() += 1;
        }
    }
    groups
}

/// Breakdowns the cube answers (one dimension, a poll's own key with its absent value,
/// two standard keys, with filters and cut time ranges: one across whole hours, whose
/// edges a poll's own key takes from the whole segments and the raw votes, one inside an
/// hour) and ones it does not, on rollups written fresh, settled and fresh again: each
/// equals the count of the votes themselves.
pub async fn breakdowns_read_from_the_cube_equal_the_votes(warehouse: Arc<dyn Warehouse>) {
    let votes = cube_votes();
    let (first, rest) = votes.split_at(30);
    let writes = [
        (RollupLevel::Fresh, rollup_rows(first, 39)),
        (RollupLevel::Settled, rollup_rows(first, 39)),
        (RollupLevel::Fresh, rollup_rows(rest, 69)),
    ];
    cube_breakdowns_equal_the_votes(warehouse, &votes, writes).await;
}

/// The same with the first half's rollups as an earlier version wrote them, the sets of a
/// poll's own keys per minute (one row per whole segment that has the key): a breakdown by
/// the key, over whole hours or cut ones, still equals the votes.
pub async fn set_rows_kept_per_minute_by_an_earlier_version_are_read_alike(
    warehouse: Arc<dyn Warehouse>,
) {
    let votes = cube_votes();
    let (first, rest) = votes.split_at(30);
    let per_minute = |rows: Vec<RollupRow>| -> Vec<RollupRow> {
        let mut kept: Vec<RollupRow> = rows.iter().filter(|r| r.dims != "store").cloned().collect();
        let minute_sets = rows
            .iter()
            .filter(|r| r.dims.is_empty())
            .filter_map(|whole| {
                let store = whole.segment.custom.get("store")?;
                let mut segment = tally_core::segment::Segment::default();
                segment.custom.insert("store".into(), store.clone());
                Some(RollupRow {
                    dims: "store".into(),
                    segment,
                    ..whole.clone()
                })
            });
        kept.extend(minute_sets);
        assert!(kept
            .iter()
            .any(|r| r.dims == "store" && r.bucket_seconds == 60));
        kept
    };
    let writes = [
        (RollupLevel::Fresh, per_minute(rollup_rows(first, 39))),
        (RollupLevel::Settled, per_minute(rollup_rows(first, 39))),
        (RollupLevel::Fresh, rollup_rows(rest, 69)),
    ];
    cube_breakdowns_equal_the_votes(warehouse, &votes, writes).await;
}

/// Writes `writes` (each a level and its rows, of `votes` up to seq 69) in partition 0,
/// then asks the breakdowns the cube answers and ones it does not: each must equal the
/// votes counted.
async fn cube_breakdowns_equal_the_votes(
    warehouse: Arc<dyn Warehouse>,
    votes: &[StoredVote],
    writes: [(RollupLevel, Vec<RollupRow>); 3],
) {
    warehouse.migrate().await.expect("migrate");
    warehouse.insert_votes(0, votes).await.expect("insert");
    for (level, rows) in writes {
        warehouse
            .insert_rollups(0, level, &rows)
            .await
            .expect("insert rollups");
    }
    breakdowns_equal_the_votes(warehouse.as_ref(), votes, 69).await;
}

/// Asks [`CUBE_POLL`]'s breakdowns the cube answers and ones it does not: each must equal
/// `votes` counted, as of `as_of`.
async fn breakdowns_equal_the_votes(warehouse: &dyn Warehouse, votes: &[StoredVote], as_of: u64) {
    let d = |name: &str| Dimension(name.into());
    let query =
        |by: &[&str], filters: Vec<(Dimension, Vec<String>)>, range: (Option<i64>, Option<i64>)| {
            BreakdownQuery {
                poll_id: CUBE_POLL.into(),
                by: by.iter().map(|name| d(name)).collect(),
                filters,
                from_ms: range.0.map(|f| T0 + f),
                to_ms: range.1.map(|t| T0 + t),
            }
        };
    let all = (None, None);
    // From 185 s (a vote at 190 s) to 9,315 s (one at 9,310 s): the whole hour from 2,800 s,
    // the whole minutes around it, the cut ones; and 45 s to 1,455 s, in the first hour.
    let cut = (Some(185_000), Some(9_315_000));
    let short = (Some(45_000), Some(1_455_000));
    let values = |v: &[&str]| v.iter().map(|v| (*v).to_owned()).collect::<Vec<String>>();
    let queries = [
        query(&["store"], vec![], all),
        query(&["store"], vec![], cut),
        query(
            &["store"],
            vec![(d("store"), values(&["s1", "", "s5"]))],
            all,
        ),
        query(&["store"], vec![(d("store"), values(&["s2"]))], cut),
        query(&["store"], vec![], short),
        query(&["store"], vec![(d("store"), values(&["", "s4"]))], cut),
        query(
            &["store"],
            vec![(d("store"), values(&["s1"]))],
            (Some(2_800_000), None),
        ),
        query(&["store"], vec![(d("store"), vec![])], all),
        query(&["country"], vec![], all),
        query(
            &["device"],
            vec![(d("device"), values(&["mobile", "tablet"]))],
            cut,
        ),
        query(&["device"], vec![(d("country"), values(&["FR"]))], all),
        query(&["country", "device"], vec![], cut),
        query(
            &["device", "country"],
            vec![(d("device"), values(&["desktop"]))],
            all,
        ),
        query(&["store", "country"], vec![], all),
        query(
            &["country", "device", "store"],
            vec![(d("store"), values(&["s3", ""]))],
            cut,
        ),
    ];
    for query in queries {
        let got = warehouse.breakdown(&query).await.expect("breakdown");
        assert_eq!(got.as_of, as_of, "{query:?}");
        let got: BTreeMap<Vec<String>, (u64, BTreeMap<String, u64>)> = got
            .groups
            .into_iter()
            .map(|g| (g.values, (g.ballots, g.counts)))
            .collect();
        assert_eq!(got, expected_breakdown(votes, &query), "{query:?}");
    }
}

/// A poll whose votes come from two partitions of the log, each numbering its own entries
/// (as the embedded log does; NATS numbers the stream's, so theirs interleave), with rollups
/// written by each partition's processor at its own pace: partition 0 settled up to 10 and
/// fresh up to 30, partition 1 settled up to 30 — so neither partition's positions bound
/// the other's rows. The tally, every breakdown and the poll's ballots count each partition
/// as far as its own rows go, and their `as_of` is the sum of the partitions' positions
/// (which only grows as any of them does).
pub async fn a_poll_over_several_partitions_counts_each_as_far_as_it_goes(
    warehouse: Arc<dyn Warehouse>,
) {
    warehouse.migrate().await.expect("migrate");
    let mut parts: [Vec<StoredVote>; 2] = Default::default();
    for (i, stored) in cube_votes().into_iter().enumerate() {
        let part = &mut parts[i % 2];
        part.push(StoredVote {
            seq: part.len() as u64 + 1,
            vote: stored.vote,
        });
    }
    // A vote of partition 1 that no rollup holds yet, received inside the first cut minute
    // of the breakdowns' cut range: the raw reads must stop at partition 1's position (30),
    // not at a position of the poll as a whole.
    let late = StoredVote {
        seq: 31,
        vote: vote(CUBE_POLL, "c-late", "k-late", "a", T0 + 200_000),
    };
    for (partition, votes) in [(0, &parts[0][..]), (1, &parts[1][..])] {
        warehouse
            .insert_votes(partition, votes)
            .await
            .expect("insert");
    }
    warehouse
        .insert_votes(1, std::slice::from_ref(&late))
        .await
        .expect("insert");
    let [zero, one] = &parts;
    let writes = [
        (0, RollupLevel::Fresh, rollup_rows(&zero[..10], 10)),
        (1, RollupLevel::Fresh, rollup_rows(&one[..15], 15)),
        (0, RollupLevel::Settled, rollup_rows(&zero[..10], 10)),
        (0, RollupLevel::Fresh, rollup_rows(&zero[10..], 30)),
        (1, RollupLevel::Settled, rollup_rows(one, 30)),
    ];
    for (partition, level, rows) in writes {
        warehouse
            .insert_rollups(partition, level, &rows)
            .await
            .expect("insert rollups");
    }
    let mut counted: Vec<StoredVote> = zero.clone();
    counted.extend(one.iter().cloned());
    breakdowns_equal_the_votes(warehouse.as_ref(), &counted, 30 + 30).await;

    let tally = warehouse.tally(CUBE_POLL).await.expect("tally");
    counted.push(late.clone());
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for stored in &counted {
        for answer in &stored.vote.choice {
            *counts.entry(answer.clone()).or_default() += 1;
        }
    }
    assert_eq!(
        tally,
        Tally {
            ballots: 61,
            unique_voters: 61,
            counts,
            as_of: 30 + 31,
        }
    );

    // Each partition's share: its own votes, as of its own last.
    let shares = warehouse
        .tally_by_partition(CUBE_POLL)
        .await
        .expect("tally by partition");
    let share = |votes: &[StoredVote]| {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for stored in votes {
            for answer in &stored.vote.choice {
                *counts.entry(answer.clone()).or_default() += 1;
            }
        }
        Tally {
            ballots: votes.len() as u64,
            unique_voters: votes.len() as u64,
            counts,
            as_of: votes.last().map_or(0, |v| v.seq),
        }
    };
    let mut one_and_late = one.clone();
    one_and_late.push(late.clone());
    assert_eq!(
        shares,
        BTreeMap::from([(0, share(zero)), (1, share(&one_and_late))])
    );
    assert!(warehouse
        .tally_by_partition("conf-none")
        .await
        .expect("tally by partition")
        .is_empty());

    let answer = warehouse.ballots(CUBE_POLL).await.expect("ballots");
    assert_eq!(answer.as_of, 30 + 31);
    assert_eq!(
        answer.positions,
        BTreeMap::from([(0, 30), (1, 31)]),
        "each partition's last vote"
    );
    let (_, rows) = answer_of(Ok(answer)).await.expect("rows");
    let mut ids: Vec<&str> = rows.iter().map(|row| row[1].as_str()).collect();
    ids.sort_unstable();
    let mut want: Vec<&str> = counted.iter().map(|v| v.vote.vote_id.as_str()).collect();
    want.sort_unstable();
    assert_eq!(ids, want, "every vote of both partitions, once");
}

/// A breakdown one set of the cube answers reads that set's rows, not the whole segments:
/// with the whole segments of 30 votes written beside the cube rows of 60 (in one insert,
/// which no processor would write), by country counts 60 and by three keys counts 30.
pub async fn a_breakdown_one_set_answers_reads_that_sets_rows(warehouse: Arc<dyn Warehouse>) {
    warehouse.migrate().await.expect("migrate");
    let votes = cube_votes();
    let mut rows: Vec<RollupRow> = rollup_rows(&votes[..30], 69)
        .into_iter()
        .filter(|row| row.dims.is_empty())
        .collect();
    rows.extend(
        rollup_rows(&votes, 69)
            .into_iter()
            .filter(|row| !row.dims.is_empty()),
    );
    warehouse
        .insert_rollups(0, RollupLevel::Fresh, &rows)
        .await
        .expect("insert rollups");
    let ballots = |by: &[&str]| {
        let query = BreakdownQuery {
            poll_id: CUBE_POLL.into(),
            by: by.iter().map(|name| Dimension((*name).into())).collect(),
            ..Default::default()
        };
        let warehouse = warehouse.clone();
        async move {
            let breakdown = warehouse.breakdown(&query).await.expect("breakdown");
            assert_eq!(breakdown.as_of, 69);
            breakdown.groups.iter().map(|g| g.ballots).sum::<u64>()
        }
    };
    assert_eq!(ballots(&["country"]).await, 60, "read from the country set");
    assert_eq!(
        ballots(&["store"]).await,
        60,
        "read from the store set and the totals"
    );
    assert_eq!(
        ballots(&["country", "device", "channel"]).await,
        30,
        "read from the whole segments"
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

/// `(dimension, [values])` as the map [`Warehouse::segment_values`] answers.
fn values_map(entries: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
    entries
        .iter()
        .map(|(dimension, values)| {
            let values = values.iter().map(|v| (*v).to_owned()).collect();
            ((*dimension).to_owned(), values)
        })
        .collect()
}

/// The sample votes hold two countries and two plans, each many times; their other standard
/// keys are empty, and an empty value is no value.
pub async fn segment_values_are_the_distinct_values_of_each_dimension(
    warehouse: Arc<dyn Warehouse>,
) {
    with_votes(warehouse.as_ref()).await;
    assert_eq!(
        warehouse
            .segment_values(POLL, 0)
            .await
            .expect("segment values"),
        values_map(&[("country", &["DE", "FR"]), ("plan", &["free", "pro"])]),
        "each value once per dimension, standard keys and the poll's own, no empty values"
    );
}

/// Values only rollup rows hold count as much as those of raw votes: a fresh row's, and a
/// settled row's.
pub async fn segment_values_include_rollup_rows_of_both_levels(warehouse: Arc<dyn Warehouse>) {
    warehouse.migrate().await.expect("migrate");
    let mut kiosk = vote(POLL, "r-1", "k1", "a", T0);
    kiosk.segment.device = "kiosk".into();
    let mut team = vote(POLL, "r-2", "k2", "b", T0);
    team.segment.device = "tv".into();
    team.segment.custom.insert("plan".into(), "team".into());
    let rows = |vote: &tally_core::vote::Vote, seq: u64| {
        let mut rollups = Rollups::default();
        rollups.add(vote, seq);
        rollups.rows()
    };
    warehouse
        .insert_rollups(0, RollupLevel::Fresh, &rows(&kiosk, 5))
        .await
        .expect("insert fresh rollups");
    warehouse
        .insert_rollups(0, RollupLevel::Settled, &rows(&team, 6))
        .await
        .expect("insert settled rollups");
    assert_eq!(
        warehouse
            .segment_values(POLL, 0)
            .await
            .expect("segment values"),
        values_map(&[("device", &["kiosk", "tv"]), ("plan", &["team"])]),
        "the values of fresh and settled rollup rows"
    );
}

/// Another poll's values, in another partition or the same one, are not the poll's; a poll
/// without rows has none.
pub async fn segment_values_are_those_of_the_poll_only(warehouse: Arc<dyn Warehouse>) {
    with_votes(warehouse.as_ref()).await;
    let mut other = vote("conf-other", "o-2", "y", "a", T0);
    other.segment.country = "IT".into();
    other.segment.device = "watch".into();
    warehouse
        .insert_votes(
            0,
            &[StoredVote {
                seq: 40,
                vote: other,
            }],
        )
        .await
        .expect("insert");
    let values = warehouse
        .segment_values(POLL, 0)
        .await
        .expect("segment values");
    assert_eq!(
        values,
        values_map(&[("country", &["DE", "FR"]), ("plan", &["free", "pro"])]),
        "another poll's values are not the poll's"
    );
    assert_eq!(
        warehouse
            .segment_values("conf-none", 0)
            .await
            .expect("segment values"),
        BTreeMap::new(),
        "a poll without rows has no values"
    );
}

/// A spread poll's rows in another partition are not the partition's: each partition's
/// processor caps its own share of the poll's values.
pub async fn segment_values_are_those_of_the_partition_only(warehouse: Arc<dyn Warehouse>) {
    with_votes(warehouse.as_ref()).await;
    let mut elsewhere = vote(POLL, "p1-1", "z", "a", T0);
    elsewhere.segment.country = "IT".into();
    elsewhere.segment.device = "watch".into();
    warehouse
        .insert_votes(
            1,
            &[StoredVote {
                seq: 100,
                vote: elsewhere.clone(),
            }],
        )
        .await
        .expect("insert");
    let mut settled = Rollups::default();
    let mut kiosk = elsewhere;
    kiosk.vote_id = "p1-2".into();
    kiosk.segment.device = "kiosk".into();
    settled.add(&kiosk, 101);
    warehouse
        .insert_rollups(1, RollupLevel::Settled, &settled.rows())
        .await
        .expect("insert settled rollups");
    assert_eq!(
        warehouse
            .segment_values(POLL, 0)
            .await
            .expect("segment values"),
        values_map(&[("country", &["DE", "FR"]), ("plan", &["free", "pro"])]),
        "partition 1's values are not partition 0's"
    );
    assert_eq!(
        warehouse
            .segment_values(POLL, 1)
            .await
            .expect("segment values"),
        values_map(&[("country", &["IT"]), ("device", &["kiosk", "watch"])]),
        "partition 1's values, of its raw votes and rollups"
    );
}

pub async fn a_reachable_warehouse_checks_ok(warehouse: Arc<dyn Warehouse>) {
    warehouse.migrate().await.expect("migrate");
    warehouse.check().await.expect("check");
}

// --- The analysts' tables (see `tally_core::analyst`) ----------------------------------------

/// The rows of an analyst query within the default limits; panics with the problem.
async fn sql(warehouse: &dyn Warehouse, query: &str) -> Vec<Vec<String>> {
    match answer_of(warehouse.analyst_sql(query, &SqlLimits::default()).await).await {
        Ok((_, rows)) => rows,
        Err(err) => panic!("{query}: {}", err.chain()),
    }
}

/// The slug of the problem an analyst query is refused with (`ok` when it is not).
async fn refusal(warehouse: &dyn Warehouse, query: &str, limits: &SqlLimits) -> String {
    match answer_of(warehouse.analyst_sql(query, limits).await).await {
        Ok(_) => "ok".into(),
        Err(tally_core::Error::Invalid(problem)) => problem.slug().to_owned(),
        Err(err) => panic!("{query}: not a problem but {}", err.chain()),
    }
}

fn texts(rows: &[&[&str]]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|row| row.iter().map(|v| (*v).to_owned()).collect())
        .collect()
}

/// The sample votes, with their poll recorded (options `a`/`A` and `b`/`B`, title `T`).
async fn with_votes_and_poll(warehouse: &dyn Warehouse) -> Vec<StoredVote> {
    let votes = with_votes(warehouse).await;
    let mut poll = crate::sample_poll(POLL);
    poll.version = 1;
    warehouse.record_polls(&[poll]).await.expect("record polls");
    votes
}

/// Every analyst table has the documented columns, in order, of the documented types.
pub async fn analyst_tables_have_the_documented_columns(warehouse: Arc<dyn Warehouse>) {
    with_votes_and_poll(warehouse.as_ref()).await;
    for table in analyst::TABLES {
        let answer = warehouse
            .analyst_sql(
                &format!("SELECT * FROM {} LIMIT 1", table.name),
                &SqlLimits::default(),
            )
            .await
            .unwrap_or_else(|err| panic!("{}: {}", table.name, err.chain()));
        let got: Vec<(String, String)> = answer
            .schema
            .fields()
            .iter()
            .map(|f| (f.name().clone(), analyst::type_name(f.data_type())))
            .collect();
        let want: Vec<(String, String)> = table
            .columns
            .iter()
            .map(|c| (c.name.to_owned(), c.ty.to_owned()))
            .collect();
        assert_eq!(got, want, "the columns of {}", table.name);
    }
}

/// A poll recorded again keeps its newest version, whatever order versions come in; its
/// status is derived when read.
pub async fn recorded_polls_keep_their_newest_version(warehouse: Arc<dyn Warehouse>) {
    warehouse.migrate().await.expect("migrate");
    let mut old = crate::sample_poll("conf-rec");
    old.version = 3;
    old.title = "Old".into();
    let mut new = old.clone();
    new.version = 5;
    new.title = "New".into();
    new.campaign = Some("spring".into());
    new.closed_at = Some(T0);
    let mut other = crate::sample_poll("conf-rec-2");
    other.version = 4;
    warehouse
        .record_polls(&[old.clone()])
        .await
        .expect("record");
    warehouse.record_polls(&[new, other]).await.expect("record");
    warehouse.record_polls(&[old]).await.expect("record again");
    assert_eq!(
        sql(
            warehouse.as_ref(),
            "SELECT poll_id, title, kind, campaign, status, version FROM polls ORDER BY poll_id"
        )
        .await,
        texts(&[
            &["conf-rec", "New", "single", "spring", "closed", "5"],
            &["conf-rec-2", "T", "single", "", "open", "4"],
        ]),
        "the newest version of each poll, its status as of now"
    );
}

/// `poll_options` lists every answer a poll counts, in its order from 1: the options with
/// their labels, or each value of a scale.
pub async fn poll_options_list_every_answer_in_order(warehouse: Arc<dyn Warehouse>) {
    warehouse.migrate().await.expect("migrate");
    let mut rating = crate::sample_poll("conf-rating");
    rating.kind = tally_core::poll::PollKind::Rating;
    rating.options.clear();
    rating.scale = Some(tally_core::poll::Scale { min: 1, max: 3 });
    warehouse
        .record_polls(&[crate::sample_poll("conf-single"), rating])
        .await
        .expect("record");
    assert_eq!(
        sql(
            warehouse.as_ref(),
            "SELECT poll_id, option_id, label, position FROM poll_options ORDER BY poll_id, position"
        )
        .await,
        texts(&[
            &["conf-rating", "1", "1", "1"],
            &["conf-rating", "2", "2", "2"],
            &["conf-rating", "3", "3", "3"],
            &["conf-single", "a", "A", "1"],
            &["conf-single", "b", "B", "2"],
        ])
    );
    assert_eq!(
        sql(
            warehouse.as_ref(),
            "SELECT scale_min, scale_max FROM polls WHERE poll_id = 'conf-rating'"
        )
        .await,
        texts(&[&["1", "3"]])
    );
}

/// `ballots` holds one row per stored vote: its id, position, voter (NULL when anonymous),
/// time, answer and segment.
pub async fn ballots_are_the_counted_votes(warehouse: Arc<dyn Warehouse>) {
    warehouse.migrate().await.expect("migrate");
    let mut anonymous = vote("conf-b", "anon", "", "a", T0 + 1_500);
    anonymous.segment.country = "DE".into();
    let mut multi = vote("conf-b", "multi", "k1", "a", T0 + 61_000);
    multi.choice = vec!["a".into(), "b".into()];
    let mut rated = vote("conf-b", "rated", "k2", "7", T0 + 3_600_000);
    rated.value = Some(7);
    let stored: Vec<StoredVote> = [anonymous, multi, rated]
        .into_iter()
        .enumerate()
        .map(|(i, vote)| StoredVote {
            seq: 5 + i as u64,
            vote,
        })
        .collect();
    warehouse.insert_votes(0, &stored).await.expect("insert");
    assert_eq!(
        sql(
            warehouse.as_ref(),
            "SELECT vote_id, log_partition, seq, voter_key, received_at, received_ms, choice, choices, rating, country \
             FROM ballots ORDER BY seq"
        )
        .await,
        texts(&[
            &["anon", "0", "5", "", "2023-11-14T22:13:21Z", "1700000001500", "a", "[a]", "", "DE"],
            &["multi", "0", "6", "k1", "2023-11-14T22:14:21Z", "1700000061000", "", "[a, b]", "", ""],
            &["rated", "0", "7", "k2", "2023-11-14T23:13:20Z", "1700003600000", "", "[7]", "7", ""],
        ])
    );
}

/// `answers` holds one row per stored vote and option it chose; `ballot_dimensions` one per
/// vote and dimension of the poll's own.
pub async fn answers_and_dimensions_are_one_row_per_item(warehouse: Arc<dyn Warehouse>) {
    warehouse.migrate().await.expect("migrate");
    let mut multi = vote("conf-a", "multi", "k1", "a", T0);
    multi.choice = vec!["a".into(), "b".into()];
    multi.segment.custom.insert("plan".into(), "pro".into());
    multi.segment.custom.insert("tier".into(), "gold".into());
    let single = vote("conf-a", "single", "k2", "b", T0);
    warehouse
        .insert_votes(
            0,
            &[
                StoredVote {
                    seq: 1,
                    vote: multi,
                },
                StoredVote {
                    seq: 2,
                    vote: single,
                },
            ],
        )
        .await
        .expect("insert");
    assert_eq!(
        sql(
            warehouse.as_ref(),
            "SELECT vote_id, option_id, seq FROM answers ORDER BY vote_id, option_id"
        )
        .await,
        texts(&[
            &["multi", "a", "1"],
            &["multi", "b", "1"],
            &["single", "b", "2"]
        ])
    );
    assert_eq!(
        sql(
            warehouse.as_ref(),
            "SELECT vote_id, dimension, value FROM ballot_dimensions ORDER BY dimension"
        )
        .await,
        texts(&[&["multi", "plan", "pro"], &["multi", "tier", "gold"]])
    );
}

/// The portable subset gives these answers on every warehouse (docs/SQL.md): filters,
/// groups, HAVING, ORDER BY, LIMIT, the aggregates, joins between the analyst tables,
/// WITH subqueries, IN subqueries and date truncation.
pub async fn portable_queries_give_the_same_answers(warehouse: Arc<dyn Warehouse>) {
    with_votes_and_poll(warehouse.as_ref()).await;
    let cases: Vec<(&str, Vec<Vec<String>>)> = vec![
        (
            "SELECT country, count(*) AS n FROM ballots WHERE poll_id = 'conf-wh' GROUP BY country ORDER BY country",
            texts(&[&["DE", "15"], &["FR", "15"]]),
        ),
        (
            "SELECT option_id, count(*) AS n FROM answers WHERE poll_id = 'conf-wh' GROUP BY option_id ORDER BY option_id",
            texts(&[&["a", "10"], &["b", "20"]]),
        ),
        (
            "SELECT o.label, count(*) AS n FROM answers a JOIN poll_options o ON o.poll_id = a.poll_id AND o.option_id = a.option_id \
             WHERE a.poll_id = 'conf-wh' GROUP BY o.label ORDER BY o.label",
            texts(&[&["A", "10"], &["B", "20"]]),
        ),
        (
            "SELECT count(DISTINCT voter_key) AS voters, min(seq) AS first, max(seq) AS last, sum(seq) AS total \
             FROM ballots WHERE poll_id = 'conf-wh'",
            texts(&[&["20", "10", "39", "735"]]),
        ),
        (
            "SELECT date_trunc('minute', received_at) AS m, count(*) AS n FROM ballots WHERE poll_id = 'conf-wh' GROUP BY m ORDER BY m",
            texts(&[
                &["2023-11-14T22:13:00Z", "4"],
                &["2023-11-14T22:14:00Z", "6"],
                &["2023-11-14T22:15:00Z", "6"],
                &["2023-11-14T22:16:00Z", "6"],
                &["2023-11-14T22:17:00Z", "6"],
                &["2023-11-14T22:18:00Z", "2"],
            ]),
        ),
        (
            "SELECT date_trunc('day', received_at) AS d, date_trunc('month', received_at) AS m, count(*) AS n \
             FROM ballots WHERE poll_id = 'conf-wh' GROUP BY d, m",
            texts(&[&["2023-11-14T00:00:00Z", "2023-11-01T00:00:00Z", "30"]]),
        ),
        (
            "SELECT d.value AS plan, count(*) AS n FROM ballot_dimensions d \
             WHERE d.poll_id = 'conf-wh' AND d.dimension = 'plan' GROUP BY d.value ORDER BY plan",
            texts(&[&["free", "20"], &["pro", "10"]]),
        ),
        (
            "SELECT voter_key, count(*) AS n FROM ballots WHERE poll_id = 'conf-wh' \
             GROUP BY voter_key HAVING count(*) > 1 ORDER BY voter_key LIMIT 3",
            texts(&[&["k0", "2"], &["k1", "2"], &["k2", "2"]]),
        ),
        (
            "SELECT p.title, b.n FROM polls p JOIN (SELECT poll_id, count(*) AS n FROM ballots GROUP BY poll_id) b \
             ON b.poll_id = p.poll_id ORDER BY p.title",
            texts(&[&["T", "30"]]),
        ),
        (
            "WITH de AS (SELECT * FROM ballots WHERE poll_id = 'conf-wh' AND country = 'DE') \
             SELECT count(*) AS n, sum(seq) AS s FROM de",
            texts(&[&["15", "360"]]),
        ),
        (
            "SELECT vote_id FROM ballots WHERE poll_id = 'conf-wh' ORDER BY seq DESC LIMIT 2",
            texts(&[&["w-29"], &["w-28"]]),
        ),
        (
            "SELECT min(received_at) AS first, max(received_ms) AS last FROM ballots WHERE poll_id = 'conf-wh'",
            texts(&[&["2023-11-14T22:13:20Z", "1700000290000"]]),
        ),
        (
            "SELECT count(*) AS n FROM ballots WHERE vote_id IN (SELECT vote_id FROM answers WHERE option_id = 'a')",
            texts(&[&["11"]]),
        ),
        (
            "SELECT poll_id, count(*) AS n FROM ballots GROUP BY poll_id HAVING count(*) < 5",
            texts(&[&["conf-other", "1"]]),
        ),
    ];
    for (query, want) in cases {
        assert_eq!(sql(warehouse.as_ref(), query).await, want, "{query}");
    }
}

/// An answer is exact as of one position per partition, the positions reported: votes
/// stored after the call are not in it.
pub async fn analyst_answers_are_pinned_to_the_positions_they_report(
    warehouse: Arc<dyn Warehouse>,
) {
    with_votes(warehouse.as_ref()).await;
    let answer = warehouse
        .analyst_sql("SELECT vote_id FROM ballots", &SqlLimits::default())
        .await
        .expect("query");
    assert_eq!(answer.positions, BTreeMap::from([(0, 39), (1, 99)]));
    assert_eq!(answer.as_of, 99);
    let later = StoredVote {
        seq: 40,
        vote: vote(POLL, "late", "late", "a", T0),
    };
    warehouse.insert_votes(0, &[later]).await.expect("insert");
    let (_, rows) = answer_of(Ok(answer)).await.expect("answer");
    assert_eq!(
        rows.len(),
        31,
        "the 31 votes stored when the query was made"
    );
    assert_eq!(
        sql(warehouse.as_ref(), "SELECT count(*) FROM ballots").await,
        texts(&[&["32"]]),
        "the next query sees the vote"
    );
}

/// Anything but one query is refused before it runs, and changes nothing.
pub async fn statements_that_change_something_are_refused(warehouse: Arc<dyn Warehouse>) {
    with_votes_and_poll(warehouse.as_ref()).await;
    let limits = SqlLimits::default();
    for statement in [
        "INSERT INTO ballots (poll_id, vote_id) VALUES ('conf-wh', 'x')",
        "INSERT INTO votes SELECT * FROM votes",
        "DELETE FROM ballots",
        "UPDATE ballots SET country = 'XX'",
        "DROP TABLE ballots",
        "DROP TABLE votes",
        "TRUNCATE TABLE votes",
        "ALTER TABLE votes DROP COLUMN country",
        "CREATE TABLE evil (a INT)",
        "CREATE VIEW evil AS SELECT 1",
        "SET max_execution_time = 0",
        "SELECT 1; DROP TABLE votes",
        "SELECT count(*) FROM ballots; SELECT 1",
        "COPY ballots TO '/tmp/ballots.csv'",
        "EXPLAIN SELECT * FROM ballots",
    ] {
        assert_eq!(
            refusal(warehouse.as_ref(), statement, &limits).await,
            "sql-not-allowed",
            "{statement}"
        );
    }
    assert_eq!(
        sql(
            warehouse.as_ref(),
            "SELECT count(*), count(DISTINCT country) FROM ballots"
        )
        .await,
        texts(&[&["31", "3"]]),
        "every vote is still there, unchanged"
    );
    assert_eq!(warehouse.tally(POLL).await.expect("tally").ballots, 30);
}

/// Only the analyst tables can be read: no internal table, other database, system table or
/// table function, no engine settings.
pub async fn only_the_analyst_tables_can_be_read(warehouse: Arc<dyn Warehouse>) {
    with_votes(warehouse.as_ref()).await;
    let limits = SqlLimits::default();
    for query in [
        "SELECT * FROM votes",
        "SELECT * FROM vote_windows",
        "SELECT * FROM segment_rollups",
        "SELECT * FROM segment_rollups_fresh",
        "SELECT * FROM system.tables",
        "SELECT * FROM information_schema.tables",
        "SELECT * FROM tally.ballots",
        "SELECT * FROM numbers(1000000000000)",
        "SELECT * FROM generate_series(1, 1000000000000)",
        "SELECT * FROM url('http://127.0.0.1:9/', CSV, 'a String')",
        "SELECT * FROM file('/etc/passwd', CSV, 'a String')",
        "SELECT * FROM remote('127.0.0.1', system.one)",
        "SELECT count(*) FROM ballots WHERE vote_id IN (SELECT vote_id FROM votes)",
        "WITH v AS (SELECT * FROM votes) SELECT count(*) FROM v",
        "SELECT count(*) FROM ballots SETTINGS max_execution_time = 0",
        "SELECT count(*) FROM ballots FORMAT CSV",
        "SELECT * FROM ballots INTO OUTFILE '/tmp/ballots.csv'",
    ] {
        assert_eq!(
            refusal(warehouse.as_ref(), query, &limits).await,
            "sql-not-allowed",
            "{query}"
        );
    }
}

/// A query the engine cannot run is `sql-invalid`, with the engine's message.
pub async fn invalid_queries_carry_the_engine_message(warehouse: Arc<dyn Warehouse>) {
    with_votes(warehouse.as_ref()).await;
    for query in [
        "SELEC 1",
        "SELECT no_such_column FROM ballots",
        "SELECT count(*) FROM ballots GROUP BY",
    ] {
        let answer = warehouse.analyst_sql(query, &SqlLimits::default()).await;
        match answer_of(answer).await {
            Err(tally_core::Error::Invalid(problem)) => {
                assert_eq!(problem.slug(), "sql-invalid", "{query}: {problem:?}");
                assert!(!problem.detail.is_empty(), "{query}");
            }
            Err(err) => panic!("{query}: {}", err.chain()),
            Ok(_) => panic!("{query} answered"),
        }
    }
    let answer = warehouse
        .analyst_sql("SELECT no_such_column FROM ballots", &SqlLimits::default())
        .await;
    let Err(tally_core::Error::Invalid(problem)) = answer_of(answer).await else {
        panic!("refused");
    };
    assert!(
        problem.detail.contains("no_such_column"),
        "the engine's message names the column: {}",
        problem.detail
    );
}

/// An answer over the row limit is refused naming the limit, having delivered no more than
/// it allows; the warehouse answers the next query.
pub async fn the_row_limit_stops_an_answer(warehouse: Arc<dyn Warehouse>) {
    with_votes(warehouse.as_ref()).await;
    let limits = SqlLimits {
        max_rows: 10,
        ..SqlLimits::default()
    };
    let answer = warehouse
        .analyst_sql("SELECT vote_id FROM ballots", &limits)
        .await;
    match answer_of(answer).await {
        Err(tally_core::Error::Invalid(problem)) => {
            assert_eq!(problem.slug(), "sql-limit-exceeded");
            assert!(problem.detail.contains("max_rows"), "{}", problem.detail);
        }
        other => panic!(
            "31 rows within a limit of 10: {:?}",
            other.map(|(_, rows)| rows.len())
        ),
    }
    assert_eq!(
        refusal(
            warehouse.as_ref(),
            "SELECT vote_id FROM ballots LIMIT 10",
            &limits
        )
        .await,
        "ok",
        "as many rows as the limit"
    );
}

/// A query that would run for hours is stopped at its time limit, and the warehouse goes on
/// answering.
pub async fn the_time_limit_stops_a_runaway_query(warehouse: Arc<dyn Warehouse>) {
    with_votes(warehouse.as_ref()).await;
    let limits = SqlLimits {
        max_time: std::time::Duration::from_secs(1),
        ..SqlLimits::default()
    };
    // Forty branches of 31^5 (about 29 million) rows each, over a billion in all, one join
    // per level (as ClickHouse 18.16 wants). Not one deep chain of joins: an engine that
    // makes blocks of left × right rows would run out of memory before time; here a block
    // stays within the memory limit and only the time runs out.
    // One narrow column: an engine may carry every column of a table through a join.
    let narrow = "(SELECT log_partition FROM ballots)";
    let pair = format!("(SELECT 1 AS one FROM {narrow} a CROSS JOIN {narrow} b)");
    let four = format!("(SELECT 1 AS one FROM {pair} a CROSS JOIN {pair} b)");
    // Sums, not counts: an engine may count a cross join from its inputs' sizes.
    let branch =
        format!("SELECT sum(l.one + r.log_partition * 0) AS s FROM {four} l CROSS JOIN {narrow} r");
    let branches = vec![branch; 40].join(" UNION ALL ");
    let runaway = format!("SELECT sum(s) FROM ({branches}) x");
    let started = std::time::Instant::now();
    let answer = warehouse.analyst_sql(&runaway, &limits).await;
    match answer_of(answer).await {
        Err(tally_core::Error::Invalid(problem)) => {
            assert_eq!(problem.slug(), "sql-limit-exceeded", "{problem:?}");
            assert!(problem.detail.contains("max_time"), "{}", problem.detail);
        }
        other => panic!(
            "the runaway query was not stopped: {:?}",
            other.map(|(_, r)| r)
        ),
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "stopped long after its limit: {:?}",
        started.elapsed()
    );
    assert_eq!(
        sql(warehouse.as_ref(), "SELECT count(*) FROM ballots").await,
        texts(&[&["31"]]),
        "the next query is answered"
    );
}

/// A query that needs more memory than its limit is refused naming the limit, and the
/// warehouse goes on answering.
pub async fn the_memory_limit_stops_a_greedy_query(warehouse: Arc<dyn Warehouse>) {
    with_votes(warehouse.as_ref()).await;
    let limits = SqlLimits {
        max_memory_bytes: 16 * 1024 * 1024,
        ..SqlLimits::default()
    };
    // 31^4 (about 920,000) distinct keys of ~40 bytes to group by: some 37 MB of keys alone,
    // well over the limit in any engine's hash table, and quick to make. One join per level
    // and distinct column names on each side, as ClickHouse 18.16 wants.
    let pair = |name: &str| {
        format!(
            "(SELECT concat(x, y) AS {name} FROM (SELECT vote_id AS x FROM ballots) a \
             CROSS JOIN (SELECT vote_id AS y FROM ballots) b)"
        )
    };
    let greedy = format!(
        "SELECT concat(l, r) AS k, count(*) AS n FROM {} p CROSS JOIN {} q \
         GROUP BY concat(l, r) ORDER BY n DESC LIMIT 1",
        pair("l"),
        pair("r")
    );
    let answer = warehouse.analyst_sql(&greedy, &limits).await;
    match answer_of(answer).await {
        Err(tally_core::Error::Invalid(problem)) => {
            assert_eq!(problem.slug(), "sql-limit-exceeded", "{problem:?}");
            assert!(
                problem.detail.contains("max_memory_bytes"),
                "{}",
                problem.detail
            );
        }
        other => panic!(
            "the greedy query was not stopped: {:?}",
            other.map(|(_, r)| r)
        ),
    }
    assert_eq!(
        refusal(
            warehouse.as_ref(),
            "SELECT country, count(*) FROM ballots GROUP BY country",
            &limits
        )
        .await,
        "ok",
        "a small query within the same limit is answered"
    );
}

/// A query that matches nothing answers with its columns and no rows (also through a
/// named subquery used twice, and a division by an empty count).
pub async fn an_empty_answer_has_its_columns(warehouse: Arc<dyn Warehouse>) {
    with_votes_and_poll(warehouse.as_ref()).await;
    let query = "WITH segment AS (SELECT * FROM answers WHERE country = 'nowhere') \
        SELECT option_id, count(*) AS votes, \
        count(*) * 1.0 / (SELECT count(DISTINCT vote_id) FROM segment) AS share \
        FROM segment GROUP BY option_id ORDER BY votes DESC";
    let (answer, rows) =
        match answer_of(warehouse.analyst_sql(query, &SqlLimits::default()).await).await {
            Ok(answer) => answer,
            Err(err) => panic!("{query}: {}", err.chain()),
        };
    assert!(rows.is_empty(), "{rows:?}");
    let names: Vec<&str> = answer
        .schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    assert_eq!(names, ["option_id", "votes", "share"]);
}

/// A poll's ballots are its stored votes up to its last when asked, in the documented
/// columns: a vote stored while they stream is not among them.
pub async fn a_polls_ballots_are_its_votes_as_of_its_last(warehouse: Arc<dyn Warehouse>) {
    let votes = with_votes(warehouse.as_ref()).await;
    let mut anonymous = vote(POLL, "anon", "", "b", T0 + 400_000);
    anonymous
        .segment
        .custom
        .insert("plan".into(), "team".into());
    warehouse
        .insert_votes(
            0,
            &[StoredVote {
                seq: 40,
                vote: anonymous,
            }],
        )
        .await
        .expect("insert");
    let answer = warehouse.ballots(POLL).await.expect("ballots");
    assert_eq!(answer.as_of, 40, "the sequence of the poll's last vote");
    assert_eq!(answer.schema, analyst::ballot_schema());
    warehouse
        .insert_votes(
            0,
            &[StoredVote {
                seq: 41,
                vote: vote(POLL, "late", "late", "a", T0),
            }],
        )
        .await
        .expect("insert");
    let (answer, rows) = answer_of(Ok(answer)).await.expect("rows");
    assert_eq!(rows.len(), 31, "the 31 votes up to seq 40");
    let mut ids: Vec<&str> = rows.iter().map(|row| row[1].as_str()).collect();
    ids.sort_unstable();
    let mut want: Vec<&str> = votes.iter().map(|v| v.vote.vote_id.as_str()).collect();
    want.push("anon");
    want.sort_unstable();
    assert_eq!(ids, want);
    let anon = rows.iter().find(|row| row[1] == "anon").expect("anon");
    assert_eq!(
        anon,
        &texts(&[&[
            "40",
            "anon",
            "",
            "1700000400000",
            "[b]",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "[plan]",
            "[team]"
        ]])[0],
        "an anonymous vote's voter is NULL"
    );
    let first = rows.iter().find(|row| row[1] == "w-0").expect("w-0");
    assert_eq!(first[2], "k0");
    assert_eq!(first[4], "[a]");
    assert_eq!(first[10], "DE");
    drop(answer);
    let none = warehouse.ballots("conf-none").await.expect("ballots");
    assert_eq!(none.as_of, 0);
    let (_, rows) = answer_of(Ok(none)).await.expect("rows");
    assert!(rows.is_empty(), "a poll without votes has no ballots");
}
