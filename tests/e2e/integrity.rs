//! One vote per voter holds across ingest replicas: the vote log decides at intake.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::json;

use crate::cluster::{Cluster, Deployment};

crate::for_each_deployment!(one_voter_counts_once_across_two_ingest_replicas);

async fn one_voter_counts_once_across_two_ingest_replicas(deployment: Deployment) -> Result<()> {
    let cluster = Arc::new(Cluster::start(deployment).await?);
    let second = cluster.spawn_ingest().await?;
    cluster
        .create_poll(
            json!({"id": "once", "title": "Once", "question": "Q", "kind": "single",
            "options": [{"id": "red", "label": "R"}, {"id": "blue", "label": "B"}]}),
        )
        .await?;

    // 50 concurrent submissions by one voter, alternating between the replicas; ten of them
    // repeat the same vote_id (a client retrying), the others are distinct attempts.
    let mut attempts = Vec::new();
    for n in 0..50 {
        let base = if n % 2 == 0 {
            cluster.ingest.url.clone()
        } else {
            second.url.clone()
        };
        let vote_id = if n < 10 {
            "retry".to_owned()
        } else {
            format!("attempt-{n}")
        };
        let choice = if n % 3 == 0 { "red" } else { "blue" };
        let cluster = cluster.clone();
        attempts.push(tokio::spawn(async move {
            let body = json!({"voter_id": "the-same-voter", "choice": choice, "vote_id": vote_id});
            let (status, answer) = cluster.vote_at(&base, "once", &body).await?;
            anyhow::Ok((vote_id, status, answer))
        }));
    }
    let mut accepted_ids = std::collections::BTreeSet::new();
    let (mut accepted, mut refused) = (0, 0);
    for attempt in attempts {
        let (vote_id, status, answer) = attempt.await??;
        match status {
            202 => {
                accepted += 1;
                accepted_ids.insert(vote_id);
            }
            409 => {
                ensure!(
                    answer["type"]
                        .as_str()
                        .unwrap_or("")
                        .ends_with("/already-voted"),
                    "{answer}"
                );
                refused += 1;
            }
            other => anyhow::bail!("unexpected {other}: {answer}"),
        }
    }
    ensure!(
        accepted_ids.len() == 1,
        "exactly one vote wins, got {accepted_ids:?}"
    );
    let winner = accepted_ids.iter().next().unwrap();
    let expected_accepted = if winner == "retry" { 10 } else { 1 };
    ensure!(
        accepted == expected_accepted && refused == 50 - expected_accepted,
        "{accepted} accepted, {refused} refused (winner {winner})"
    );

    cluster
        .wait_for_total("once", 1, Duration::from_secs(30))
        .await?;
    // Still one after the processor has had time to see everything.
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(cluster.results("once").await?["total_votes"] == 1);
    if let Some(rows) = cluster
        .clickhouse_query("SELECT count() FROM votes WHERE poll_id = 'once'")
        .await?
    {
        ensure!(rows == "1", "the warehouse holds one vote, not {rows}");
    }
    Ok(())
}
