//! The processor dies mid-stream — once at a crash point between the raw-vote insert and
//! the window insert, once by SIGKILL at a random moment — and every accepted vote is still
//! counted exactly once in results, the raw vote table and the window aggregates.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::json;

use crate::cluster::Cluster;

const OPTIONS: [&str; 3] = ["red", "blue", "green"];

async fn send_votes(
    cluster: &Arc<Cluster>,
    range: std::ops::Range<usize>,
    accepted: Arc<AtomicU64>,
) -> Result<()> {
    let mut clients = Vec::new();
    for client in 0..16 {
        let cluster = cluster.clone();
        let accepted = accepted.clone();
        let voters: Vec<usize> = range.clone().skip(client).step_by(16).collect();
        clients.push(tokio::spawn(async move {
            for voter in voters {
                let body = json!({"voter_id": format!("v{voter}"), "choice": OPTIONS[voter % 3], "vote_id": format!("id-{voter}"),
                                  "segment": {"country": if voter.is_multiple_of(2) { "DE" } else { "FR" }}});
                let (status, answer) = cluster.vote("crash", &body).await?;
                ensure!(status == 202, "vote answered {status}: {answer}");
                accepted.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for client in clients {
        client.await??;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processor_crashes_mid_stream_count_once() -> Result<()> {
    let cluster = Arc::new(Cluster::start().await?);
    cluster
        .create_poll(json!({"id": "crash", "title": "Crash", "question": "Q", "kind": "single",
            "options": [{"id": "red", "label": "R"}, {"id": "blue", "label": "B"}, {"id": "green", "label": "G"}]}))
        .await?;

    // 1. A processor that aborts right after its first raw-vote insert, before the window insert.
    cluster
        .restart_processor(&[("TALLY_FAILPOINT", "after-votes-insert")])
        .await?;
    let accepted = Arc::new(AtomicU64::new(0));
    send_votes(&cluster, 0..3_000, accepted.clone()).await?;
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cluster.processor_exited().await {
        ensure!(
            tokio::time::Instant::now() < end,
            "the processor never hit its failpoint\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let partial: u64 = cluster
        .clickhouse_query("SELECT count() FROM votes")
        .await?
        .parse()?;
    let windows: u64 = cluster
        .clickhouse_query("SELECT count() FROM vote_windows")
        .await?
        .parse()?;
    ensure!(
        partial > 0 && windows == 0,
        "the crash point leaves votes without windows (votes {partial}, window rows {windows})"
    );

    // 2. A healthy processor catches up; while votes flow it is killed with SIGKILL and restarted.
    cluster.restart_processor(&[]).await?;
    let sender = {
        let (cluster, accepted) = (cluster.clone(), accepted.clone());
        tokio::spawn(async move { send_votes(&cluster, 3_000..6_000, accepted).await })
    };
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while accepted.load(Ordering::Relaxed) < 4_000 {
        ensure!(tokio::time::Instant::now() < end, "votes stopped flowing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let counted_before_kill = cluster.results("crash").await?["total_votes"]
        .as_u64()
        .unwrap_or(0);
    cluster.restart_processor(&[]).await?;
    sender.await??;
    ensure!(counted_before_kill < 6_000, "the kill must land mid-stream");
    ensure!(accepted.load(Ordering::Relaxed) == 6_000);

    let results = cluster
        .wait_for_total("crash", 6_000, Duration::from_secs(120))
        .await?;
    let mut truth: BTreeMap<&str, u64> = BTreeMap::new();
    for voter in 0..6_000 {
        *truth.entry(OPTIONS[voter % 3]).or_default() += 1;
    }
    for option in results["options"].as_array().unwrap() {
        ensure!(
            option["count"] == truth[option["id"].as_str().unwrap()],
            "{option}"
        );
    }
    let rows = cluster
        .clickhouse_query(
            "SELECT count(), uniqExact(vote_id), uniqExact(seq) FROM votes WHERE poll_id = 'crash'",
        )
        .await?;
    ensure!(
        rows == "6000\t6000\t6000",
        "raw votes hold each vote once: {rows}"
    );
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let windows: u64 = cluster
            .clickhouse_query("SELECT sum(votes) FROM vote_windows WHERE poll_id = 'crash'")
            .await?
            .parse()?;
        if windows == 6_000 {
            break;
        }
        ensure!(
            windows < 6_000 && tokio::time::Instant::now() < end,
            "window aggregates count {windows}, expected 6000"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
