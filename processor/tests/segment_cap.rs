//! Voters cannot blow up a breakdown: past `MAX_SEGMENT_VALUES` distinct values of a
//! dimension, the processor counts new values as `other`, in the raw votes and the rollups
//! alike — and it does so the same way after a restart and after a crash that leaves the
//! tables at different positions, so no vote changes group or counts twice.

use std::time::Duration;

use tally_core::analytics::{Breakdown, BreakdownQuery, Dimension};
use tally_core::poll::Dedupe;
use tally_core::ports::{Appended, PollRegistry, VoteLog, Warehouse};
use tally_core::segment::{Segment, MAX_SEGMENT_VALUES, OTHER_VALUE};
use tally_core::vote::Vote;
use tally_embedded::{Embedded, WarehouseOptions};
use tally_service::Tasks;

const POLL: &str = "capped";

/// An anonymous vote from `device`.
fn vote(i: u64, device: &str) -> Vote {
    Vote {
        vote_id: format!("c-{i}"),
        poll_id: POLL.into(),
        voter_key: String::new(),
        choice: vec![if i.is_multiple_of(3) { "a" } else { "b" }.into()],
        value: None,
        segment: Segment {
            device: device.into(),
            ..Default::default()
        },
        received_at: 1_700_000_000_000 + i as i64 * 100,
    }
}

/// The store in `dir`, with one log partition and warehouse tails flushed every 640 rows:
/// each table's files then end at a position of their own, which a crash makes visible.
/// Waits for a previous store of `dir` to let go of it: the log's writer thread holds the
/// database until its queue closes.
async fn open(dir: &tempfile::TempDir) -> Embedded {
    open_with(dir, 1).await
}

/// [`open`] with `partitions` log partitions.
async fn open_with(dir: &tempfile::TempDir, partitions: u16) -> Embedded {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let opened = tally_embedded::open(
            dir.path(),
            tally_embedded::Options {
                partitions,
                warehouse: WarehouseOptions {
                    flush_rows: 640,
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        match opened {
            Ok(store) => return store,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => panic!("{}", err.chain()),
        }
    }
}

/// Appends one vote per device, numbered from `first`.
async fn append(store: &Embedded, first: u64, devices: &[String]) {
    let votes: Vec<(Vote, String)> = devices
        .iter()
        .enumerate()
        .map(|(i, device)| {
            let v = vote(first + i as u64, device);
            let key = v.unique_key(Dedupe::None);
            (v, key)
        })
        .collect();
    append_keyed(store, &votes).await;
}

/// Appends `(vote, uniqueness key)` pairs, each accepted.
async fn append_keyed(store: &Embedded, votes: &[(Vote, String)]) {
    for answer in store.log.append_many(votes).await {
        assert!(
            matches!(answer, Ok(Appended::Accepted { .. })),
            "{answer:?}"
        );
    }
}

/// A processor on `store`, writing rollups often (small batches, fresh and settled writes
/// every few batches) so a crash finds them at many positions.
fn start(store: &Embedded) -> Tasks {
    let tasks = Tasks::new();
    tally_processor::start(
        tally_processor::Deps {
            log: store.log.clone(),
            registry: store.registry.clone(),
            warehouse: store.warehouse.clone(),
            live: store.live.clone(),
            leases: None,
        },
        tally_processor::Config {
            batch_max: 400,
            rollup_votes: 1_000,
            settle_votes: 2_500,
            ..Default::default()
        },
        &tasks,
    )
    .unwrap();
    tasks
}

/// The breakdown by device once the raw votes and the rollups hold the whole log (every
/// partition of it: a poll's positions add up).
async fn processed(store: &Embedded) -> Breakdown {
    let tip: u64 = (0..store.log.partitions()).map(|p| store.log.tip(p)).sum();
    let query = BreakdownQuery {
        poll_id: POLL.into(),
        by: vec![Dimension("device".into())],
        ..Default::default()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let breakdown = store.warehouse.breakdown(&query).await.unwrap();
        let stored = store.warehouse.tally(POLL).await.unwrap().as_of;
        if breakdown.as_of >= tip && stored >= tip {
            return breakdown;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "processed to {stored} (rollups {}) of {tip}",
            breakdown.as_of
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Ballots per device group.
fn ballots(breakdown: &Breakdown) -> std::collections::BTreeMap<String, u64> {
    breakdown
        .groups
        .iter()
        .map(|g| (g.values[0].clone(), g.ballots))
        .collect()
}

fn devices(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

/// The device values stored anywhere for the poll (raw votes and rollups).
async fn stored_devices(store: &Embedded) -> usize {
    store.warehouse.segment_values(POLL, 0).await.unwrap()["device"].len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_values_past_the_cap_count_as_other_across_restarts_and_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;

    // The cap and 100 more distinct devices: the first keep their value, the last 100 are
    // `other`.
    let first = MAX_SEGMENT_VALUES as u64 + 100;
    append(&store, 0, &devices("d", 0..first as usize)).await;
    let processor = start(&store);
    let breakdown = processed(&store).await;
    processor.shutdown(Duration::from_secs(60)).await;
    let groups = ballots(&breakdown);
    assert_eq!(
        groups.len(),
        MAX_SEGMENT_VALUES + 1,
        "the cap's devices and other"
    );
    assert_eq!(groups[OTHER_VALUE], 100);
    assert!(
        (0..MAX_SEGMENT_VALUES).all(|i| groups[&format!("d{i}")] == 1),
        "the first devices keep their value"
    );
    let tally = store.warehouse.tally(POLL).await.unwrap();
    assert_eq!(tally.ballots, first, "results count every vote");
    assert_eq!(tally.counts.values().sum::<u64>(), first);
    assert_eq!(
        stored_devices(&store).await,
        MAX_SEGMENT_VALUES + 1,
        "no raw value past the cap is stored, in votes or rollups"
    );

    // A restart (new tasks, same store): 50 more new devices are `other`, 20 known ones
    // keep their value.
    append(&store, first, &devices("n", 0..50)).await;
    append(&store, first + 50, &devices("d", 0..20)).await;
    let all = first + 70;
    let processor = start(&store);
    let restarted = processed(&store).await;
    processor.shutdown(Duration::from_secs(60)).await;
    let groups = ballots(&restarted);
    assert_eq!(groups.len(), MAX_SEGMENT_VALUES + 1);
    assert_eq!(
        groups[OTHER_VALUE], 150,
        "new devices after the restart are other"
    );
    assert!((0..20).all(|i| groups[&format!("d{i}")] == 2));
    assert_eq!(
        restarted.groups.iter().map(|g| g.ballots).sum::<u64>(),
        all,
        "each vote counted once"
    );
    assert_eq!(store.warehouse.tally(POLL).await.unwrap().ballots, all);

    // A crash: the store is dropped with its in-memory tails, so each table falls back to
    // its last file, and the processor replays the log from the lowest of them, with the
    // values the files hold. Every replayed vote must land in the group it had.
    drop(store);
    let store = open(&dir).await;
    let marks = store.warehouse.watermarks(0).await.unwrap();
    assert!(
        marks.lowest() < store.log.tip(0),
        "the crash lost rows to replay: {marks:?}"
    );
    let processor = start(&store);
    let replayed = processed(&store).await;
    processor.shutdown(Duration::from_secs(60)).await;
    assert_eq!(
        ballots(&replayed),
        ballots(&restarted),
        "a replay maps every vote as before"
    );
    assert_eq!(
        replayed
            .groups
            .iter()
            .map(|g| g.counts.clone())
            .collect::<Vec<_>>(),
        restarted
            .groups
            .iter()
            .map(|g| g.counts.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(store.warehouse.tally(POLL).await.unwrap().ballots, all);
    assert_eq!(stored_devices(&store).await, MAX_SEGMENT_VALUES + 1);
}

/// A spread poll's partitions share the cap (each counts `MAX_SEGMENT_VALUES / spread`
/// values as themselves), each on its own, and a restarted worker starts from its own
/// partition's values only: partition 0 filling its share leaves partition 1 counting its
/// new values as themselves, before a restart and after it, as an uninterrupted run would;
/// a breakdown by the dimension fits in one answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spread_polls_partitions_share_the_cap_each_on_its_own_across_a_restart() {
    use tally_core::ports::{placement, spread_key};
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(&dir, 2).await;
    let new: tally_core::poll::NewPoll = serde_json::from_value(serde_json::json!({
        "id": POLL, "title": "T", "question": "Q?", "kind": "single", "spread": 2,
        "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]
    }))
    .unwrap();
    let poll = new
        .into_poll(tally_core::time::now_ms(), || unreachable!())
        .unwrap();
    store.registry.create(&poll).await.unwrap();
    let share = MAX_SEGMENT_VALUES / 2;
    // Votes of distinct voters with devices `{prefix}0`, `{prefix}1`, …, each landing on
    // the partition its key gives: `count` of them for `partition`, numbered from `first`.
    let votes_in = |partition: u16, first: u64, count: usize, prefix: &str| {
        let mut picked = Vec::new();
        let mut i = first;
        while picked.len() < count {
            let mut v = vote(i, &format!("{prefix}{}", picked.len()));
            v.voter_key = format!("voter-{i}");
            let key = spread_key(2, &v.unique_key(Dedupe::PerVoter));
            if placement(POLL, &key, 2) == partition {
                picked.push((v, key));
            }
            i += 1;
        }
        picked
    };
    // Partition 0 takes its share of devices and 10 more, partition 1 fifty of its own.
    append_keyed(&store, &votes_in(0, 0, share + 10, "d")).await;
    append_keyed(&store, &votes_in(1, 1_000_000, 50, "e")).await;
    let processor = start(&store);
    processed(&store).await;
    processor.shutdown(Duration::from_secs(60)).await;

    // After a restart partition 1 holds 50 values, far below its share: 50 more new ones
    // are still themselves there (a worker starting from both partitions' values would find
    // the share full and count them `other`).
    let more: Vec<(Vote, String)> = votes_in(1, 2_000_000, 100, "e")
        .into_iter()
        .skip(50)
        .collect();
    append_keyed(&store, &more).await;
    let processor = start(&store);
    let breakdown = processed(&store).await;
    processor.shutdown(Duration::from_secs(60)).await;
    let groups = ballots(&breakdown);
    assert_eq!(
        groups.get(OTHER_VALUE),
        Some(&10),
        "partition 0's devices past its share, only"
    );
    assert!(
        (0..share).all(|i| groups.get(&format!("d{i}")) == Some(&1)),
        "partition 0's first devices keep their value"
    );
    assert!(
        (0..100).all(|i| groups.get(&format!("e{i}")) == Some(&1)),
        "partition 1's devices keep their value after the restart"
    );
    assert_eq!(groups.len(), share + 100 + 1);
    assert_eq!(
        store.warehouse.segment_values(POLL, 1).await.unwrap()["device"].len(),
        100
    );
}
