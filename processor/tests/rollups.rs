//! The processor keeps the two rollup levels aligned across restarts: whatever tables a
//! crash left behind, a breakdown counts every vote once. Runs on the embedded back ends,
//! where a crash can keep one table's file and lose another's in-memory tail.

use std::sync::Arc;
use std::time::Duration;

use tally_core::backend::{Appended, BreakdownQuery, Dimension, VoteLog, Warehouse};
use tally_core::poll::Dedupe;
use tally_core::rollup::{RollupLevel, Rollups};
use tally_core::segment::Segment;
use tally_core::vote::Vote;

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

/// Settled rows cover the first 300 votes while the fresh rows (and the raw votes) are gone,
/// as after a standalone crash that kept the settled file but not the others' tails. The
/// processor replays the log; its first fresh write must start after the settled rows,
/// or the votes between would count twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_rows_ahead_of_fresh_ones_count_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = tally_embedded::open(
        dir.path(),
        tally_embedded::Options {
            partitions: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let votes: Vec<Vote> = (1..=500).map(vote).collect();
    let mut settled = Rollups::default();
    for (i, v) in votes.iter().enumerate() {
        let Appended::Accepted { seq, .. } = store
            .log
            .append(v, &v.unique_key(Dedupe::PerVoter))
            .await
            .unwrap()
        else {
            panic!("vote {i} refused");
        };
        if i < 300 {
            settled.add(v, seq);
        }
    }
    let covered = settled.last_seq();
    store
        .warehouse
        .insert_rollups(0, RollupLevel::Settled, &settled.rows())
        .await
        .unwrap();

    let warehouse: Arc<dyn Warehouse> = store.warehouse.clone();
    let processor = tally_processor::start(
        tally_processor::Deps {
            log: store.log.clone(),
            registry: store.registry.clone(),
            warehouse: warehouse.clone(),
            live: store.live.clone(),
        },
        tally_processor::Config {
            // No settled write during the test: the breakdown must rest on the old one.
            settle_interval: Duration::from_secs(600),
            ..Default::default()
        },
    )
    .unwrap();

    let query = BreakdownQuery {
        poll_id: "aligned".into(),
        by: vec![Dimension("country".into())],
        ..Default::default()
    };
    let tip = store.log.tip(0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let breakdown = loop {
        let breakdown = warehouse.breakdown(&query).await.unwrap();
        if breakdown.as_of >= tip {
            break breakdown;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rollups reached {} of {tip}",
            breakdown.as_of
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    processor.stop().await;
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
