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
        // A retry is the same ballot again; the distinct attempts choose either way.
        let choice = if n < 10 || n % 3 == 0 { "red" } else { "blue" };
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

crate::for_each_deployment!(a_browser_without_voter_id_is_its_cookie);

/// The widget sends no voter_id: ingest identifies the browser by a first-party cookie it
/// sets (HttpOnly, SameSite=Lax), so a second vote from the same browser is refused.
async fn a_browser_without_voter_id_is_its_cookie(deployment: Deployment) -> Result<()> {
    let cluster = Cluster::start(deployment).await?;
    cluster
        .create_poll(
            json!({"id": "widget", "title": "W", "question": "Q", "kind": "single",
            "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]}),
        )
        .await?;
    let url = format!("{}/v1/polls/widget/votes", cluster.ingest.url);
    // An API client that forgets voter_id is told so, not given an identity.
    let (status, problem) = cluster.vote("widget", &json!({"choice": "a"})).await?;
    ensure!(
        status == 422 && problem["field"] == "voter_id",
        "{status} {problem}"
    );
    let browser = |body: serde_json::Value| {
        cluster
            .http
            .post(&url)
            .header("sec-fetch-mode", "cors")
            .json(&body)
    };
    let first = browser(json!({"choice": "a"})).send().await?;
    ensure!(first.status() == 202, "{}", first.status());
    let cookie = first.headers()["set-cookie"].to_str()?.to_owned();
    ensure!(
        cookie.starts_with("tally_voter=")
            && cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Lax")
            && !cookie.contains("Secure"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap_or_default().to_owned();
    let again = browser(json!({"choice": "b"}))
        .header("cookie", &pair)
        .send()
        .await?;
    ensure!(
        again.status() == 409,
        "the same browser votes once: {}",
        again.status()
    );
    ensure!(
        again.headers().get("set-cookie").is_none(),
        "a known voter keeps its cookie"
    );
    let other = browser(json!({"choice": "b"})).send().await?;
    ensure!(other.status() == 202, "another browser: {}", other.status());
    ensure!(other.headers()["set-cookie"].to_str()?.split(';').next() != Some(pair.as_str()));
    // A cookie ingest could not have set is not an identity: a fresh one replaces it.
    let forged = browser(json!({"choice": "b"}))
        .header("cookie", "tally_voter=x")
        .send()
        .await?;
    ensure!(forged.status() == 202 && forged.headers().contains_key("set-cookie"));
    let results = cluster
        .wait_for_total("widget", 3, Duration::from_secs(30))
        .await?;
    ensure!(results["unique_voters"] == 3, "{results}");
    Ok(())
}
