//! The processor dies mid-stream — once at a crash point between the raw-vote insert and
//! the window insert, once by SIGKILL at a random moment — and every accepted vote is still
//! counted exactly once in results, the raw vote table, the window aggregates and the
//! segment rollups; then the rollups are deleted and rebuilt from the log.
//!
//! In standalone the processor is the whole process: the kill takes ingest down too, so the
//! clients behave as careful clients do and retry a vote whose request failed with the same
//! vote_id until it is answered.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::json;

use crate::cluster::{Cluster, Deployment};

const OPTIONS: [&str; 3] = ["red", "blue", "green"];

/// Sends one vote per voter in `range` from 16 clients. A request that fails (connection
/// refused or reset, 503) is retried with the same vote_id; every vote must end with a 202.
/// Returns how many requests failed and were retried.
async fn send_votes(
    cluster: &Arc<Cluster>,
    range: std::ops::Range<usize>,
    accepted: Arc<AtomicU64>,
) -> Result<u64> {
    let mut clients = Vec::new();
    for client in 0..16 {
        let cluster = cluster.clone();
        let accepted = accepted.clone();
        let voters: Vec<usize> = range.clone().skip(client).step_by(16).collect();
        clients.push(tokio::spawn(async move {
            let mut retried = 0u64;
            for voter in voters {
                let body = json!({"voter_id": format!("v{voter}"), "choice": OPTIONS[voter % 3], "vote_id": format!("id-{voter}"),
                                  "segment": {"country": if voter.is_multiple_of(2) { "DE" } else { "FR" }}});
                let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
                loop {
                    match cluster.vote("crash", &body).await {
                        Ok((202, _)) => break,
                        Ok((503, _)) | Err(_) if tokio::time::Instant::now() < give_up => {
                            retried += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Ok((status, answer)) => {
                            anyhow::bail!("vote {voter} answered {status}: {answer}")
                        }
                        Err(err) => anyhow::bail!("vote {voter} never got through: {err}"),
                    }
                }
                accepted.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(retried)
        }));
    }
    let mut retried = 0;
    for client in clients {
        retried += client.await??;
    }
    Ok(retried)
}

crate::for_each_deployment!(processor_crashes_mid_stream_count_once);

async fn processor_crashes_mid_stream_count_once(deployment: Deployment) -> Result<()> {
    let cluster = Arc::new(Cluster::start(deployment).await?);
    cluster
        .create_poll(json!({"id": "crash", "title": "Crash", "question": "Q", "kind": "single",
            "options": [{"id": "red", "label": "R"}, {"id": "blue", "label": "B"}, {"id": "green", "label": "G"}]}))
        .await?;

    // 1. A processor that aborts right after its first raw-vote insert, before the window insert.
    cluster
        .restart_processor(&[("TALLY_FAILPOINT", "after-votes-insert")])
        .await?;
    let accepted = Arc::new(AtomicU64::new(0));
    let first_load = {
        let (cluster, accepted) = (cluster.clone(), accepted.clone());
        tokio::spawn(async move { send_votes(&cluster, 0..3_000, accepted).await })
    };
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cluster.processor_exited().await {
        ensure!(
            tokio::time::Instant::now() < end,
            "the processor never hit its failpoint\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // In ClickHouse the crash leaves raw votes without their windows; in standalone both
    // were still in memory and are gone with the process.
    if let (Some(partial), Some(windows)) = (
        cluster
            .clickhouse_query("SELECT count() FROM votes")
            .await?,
        cluster
            .clickhouse_query("SELECT count() FROM vote_windows")
            .await?,
    ) {
        let (partial, windows): (u64, u64) = (partial.parse()?, windows.parse()?);
        ensure!(
            partial > 0 && windows == 0,
            "the crash point leaves votes without windows (votes {partial}, window rows {windows})"
        );
    }

    // 2. A healthy processor catches up; while votes flow it is killed with SIGKILL and restarted.
    cluster.restart_processor(&[]).await?;
    first_load.await??;
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
    let retried = sender.await??;
    eprintln!("{deployment:?}: {retried} requests failed during the kill and were retried");
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
    if let Some(rows) = cluster
        .clickhouse_query(
            "SELECT count(), uniqExact(vote_id), uniqExact(seq) FROM votes WHERE poll_id = 'crash'",
        )
        .await?
    {
        ensure!(
            rows == "6000\t6000\t6000",
            "raw votes hold each vote once: {rows}"
        );
    }
    let by_country = cluster
        .breakdown("/v1/polls/crash/breakdown?by=country", 6_000)
        .await?;
    for group in by_country["groups"].as_array().cloned().unwrap_or_default() {
        ensure!(
            group["total_votes"] == 3_000,
            "each country holds half the votes: {group}"
        );
    }
    let truth: BTreeMap<String, u64> = truth.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    cluster.wait_for_timeseries("crash", &truth).await?;

    // 3. Segment rollups are lost: first the fresh ones alone (the settled ones then cover
    //    for them), then both levels, as in an upgrade from a version without them. Each
    //    time the processor rebuilds what is missing from the log, every vote once, and
    //    breakdowns come back exact, with the same answer counts as before.
    // The log is quiet, so after the settle interval (3 s in these tests) the settled rows
    // reach its end, and standalone writes them to a file within 5 s more: with the fresh
    // ones gone, they alone must answer, and a standalone restart must not wait for fresh
    // rows that have nothing left to cover.
    tokio::time::sleep(Duration::from_secs(10)).await;
    for tables in [
        &["segment_rollups_fresh"][..],
        &["segment_rollups", "segment_rollups_fresh"][..],
    ] {
        cluster.drop_rollups_and_restart(tables).await?;
        let rebuilt = cluster
            .breakdown("/v1/polls/crash/breakdown?by=country", 6_000)
            .await?;
        ensure!(
            rebuilt["groups"] == by_country["groups"],
            "rebuilt {tables:?}: {rebuilt}\nbefore: {by_country}"
        );
    }
    Ok(())
}
