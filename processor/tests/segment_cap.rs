//! Voters cannot blow up a breakdown: past `MAX_SEGMENT_VALUES` distinct values of a
//! dimension, the processor counts new values as `other`, in the raw votes and the rollups
//! alike — and it does so the same way after a restart and after a crash that leaves the
//! tables at different positions, so no vote changes group or counts twice.

use std::time::Duration;

use tally_core::analytics::{Breakdown, BreakdownQuery, Dimension};
use tally_core::poll::Dedupe;
use tally_core::ports::{Appended, VoteLog, Warehouse};
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let opened = tally_embedded::open(
            dir.path(),
            tally_embedded::Options {
                partitions: 1,
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
    for answer in store.log.append_many(&votes).await {
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

/// The breakdown by device once the raw votes and the rollups hold the whole log.
async fn processed(store: &Embedded) -> Breakdown {
    let tip = store.log.tip(0);
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
