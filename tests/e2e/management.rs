//! Poll management over HTTP: create, get, paginated list, patch, close, reopen, archive;
//! votes honour the lifecycle and SSE clients hear about the close.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::cluster::{expect, Cluster, Deployment, SseClient, ADMIN_KEY};

async fn admin(
    cluster: &Cluster,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let mut request = cluster
        .http
        .request(method, format!("{}{path}", cluster.query.url))
        .bearer_auth(ADMIN_KEY);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    Ok((
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    ))
}

crate::for_each_deployment!(polls_are_managed_through_their_lifecycle);

async fn polls_are_managed_through_their_lifecycle(deployment: Deployment) -> Result<()> {
    use reqwest::Method as M;
    let cluster = Cluster::start(deployment).await?;
    let created = cluster
        .create_poll(
            json!({"title": "Launch", "question": "Colour?", "kind": "single",
            "options": [{"id": "red", "label": "Red"}, {"id": "blue", "label": "Blue"}]}),
        )
        .await?;
    let id = created["id"].as_str().unwrap().to_owned();
    ensure!(
        id.starts_with("p-")
            && created["status"] == "open"
            && created["version"].as_u64().unwrap() > 0,
        "{created}"
    );
    ensure!(created["dedupe"] == "per_voter" && created["created_at"].is_string());

    for n in 0..5 {
        cluster
            .create_poll(
                json!({"id": format!("list-{n}"), "title": "T", "question": "Q", "kind": "nps"}),
            )
            .await?;
    }
    let (status, page) = admin(&cluster, M::GET, "/v1/polls?limit=4", None).await?;
    ensure!(
        status == 200 && page["polls"].as_array().unwrap().len() == 4,
        "{page}"
    );
    let next = page["next"].as_str().unwrap().to_owned();
    let (_, rest) = admin(
        &cluster,
        M::GET,
        &format!("/v1/polls?limit=4&after={next}"),
        None,
    )
    .await?;
    ensure!(
        rest["polls"].as_array().unwrap().len() == 2 && rest["next"].is_null(),
        "{rest}"
    );

    let (status, got) = admin(&cluster, M::GET, &format!("/v1/polls/{id}"), None).await?;
    ensure!(status == 200 && got["id"] == id);

    let (status, patched) = admin(&cluster, M::PATCH, &format!("/v1/polls/{id}"),
        Some(json!({"title": "Launch day", "options": [{"id": "red", "label": "Scarlet"}, {"id": "blue", "label": "Blue"}, {"id": "green", "label": "Green"}]}))).await?;
    ensure!(
        status == 200
            && patched["title"] == "Launch day"
            && patched["options"].as_array().unwrap().len() == 3,
        "{patched}"
    );
    ensure!(patched["version"].as_u64() > created["version"].as_u64());

    let (status, _) = cluster
        .vote(&id, &json!({"voter_id": "a", "choice": "green"}))
        .await?;
    ensure!(status == 202, "a new option takes votes at once");
    cluster
        .wait_for_total(&id, 1, Duration::from_secs(30))
        .await?;

    let mut sse = SseClient::connect(
        &cluster.http,
        &format!("{}/v1/polls/{id}/live", cluster.query.url),
        None,
    )
    .await?;
    let (kind, _, snapshot) = sse.next_event(Duration::from_secs(10)).await?;
    ensure!(
        kind == "snapshot" && snapshot["total_votes"] == 1,
        "{kind} {snapshot}"
    );
    // Heartbeats keep the connection alive (every second in tests).
    let heartbeat = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = sse.events.recv().await {
            if event.0 == "comment" {
                return true;
            }
        }
        false
    })
    .await;
    ensure!(heartbeat == Ok(true), "no heartbeat");

    let (status, closed) = admin(&cluster, M::POST, &format!("/v1/polls/{id}/close"), None).await?;
    ensure!(status == 200 && closed["status"] == "closed");
    cluster.wait_for_ingest_status(&id, 409).await?;
    let (kind, _, data) = sse.next_event(Duration::from_secs(10)).await?;
    ensure!(
        kind == "closed" && data["status"] == "closed",
        "{kind} {data}"
    );
    let (status, problem) = cluster
        .vote(&id, &json!({"voter_id": "b", "choice": "red"}))
        .await?;
    ensure!(
        status == 409 && problem["type"].as_str().unwrap().ends_with("poll-closed"),
        "{problem}"
    );

    let (status, reopened) =
        admin(&cluster, M::POST, &format!("/v1/polls/{id}/reopen"), None).await?;
    ensure!(status == 200 && reopened["status"] == "open");
    cluster.wait_for_ingest_status(&id, 422).await?;
    let (status, _) = cluster
        .vote(&id, &json!({"voter_id": "b", "choice": "red"}))
        .await?;
    ensure!(status == 202);
    cluster
        .wait_for_total(&id, 2, Duration::from_secs(30))
        .await?;

    // Resuming with Last-Event-ID only sends what is newer.
    let results = cluster.results(&id).await?;
    let as_of = results["as_of"].to_string();
    let mut resumed = SseClient::connect(
        &cluster.http,
        &format!("{}/v1/polls/{id}/live", cluster.query.url),
        Some(&as_of),
    )
    .await?;
    let (status, _) = cluster
        .vote(&id, &json!({"voter_id": "c", "choice": "blue"}))
        .await?;
    ensure!(status == 202);
    let (kind, event_id, data) = resumed.next_event(Duration::from_secs(10)).await?;
    ensure!(
        kind == "totals"
            && data["total_votes"] == 3
            && event_id.unwrap().parse::<u64>()? > results["as_of"].as_u64().unwrap()
    );

    let (status, archived) = admin(&cluster, M::DELETE, &format!("/v1/polls/{id}"), None).await?;
    ensure!(status == 200 && archived["status"] == "archived");
    cluster.wait_for_ingest_status(&id, 410).await?;
    let (status, _) = cluster
        .vote(&id, &json!({"voter_id": "d", "choice": "blue"}))
        .await?;
    ensure!(status == 410);
    let (_, listed) = admin(&cluster, M::GET, "/v1/polls?limit=100", None).await?;
    ensure!(
        !listed["polls"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == id),
        "archived polls are not listed by default"
    );
    let (_, listed) = admin(
        &cluster,
        M::GET,
        "/v1/polls?limit=100&include_archived=true",
        None,
    )
    .await?;
    ensure!(listed["polls"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["id"] == id));
    ensure!(
        cluster.results(&id).await?["total_votes"] == 3,
        "results of an archived poll stay readable"
    );
    Ok(())
}

crate::for_each_deployment!(a_finished_poll_leaves_the_log_and_late_retries_keep_their_answer);

/// A poll closed for `TALLY_PURGE_CLOSED_AFTER_SECONDS` leaves the NATS stream once its votes
/// are counted (the broker's memory is not held for it forever), is marked so and can never
/// be reopened; a late retry of a vote taken before the close keeps its 202 — from the log,
/// then from ClickHouse — and anything else is `poll-closed`. Standalone's log is on disk
/// and keeps every vote: the poll stays as it was, and can be reopened.
async fn a_finished_poll_leaves_the_log_and_late_retries_keep_their_answer(
    deployment: Deployment,
) -> Result<()> {
    use reqwest::Method as M;
    const VOTERS: usize = 40;
    let cluster =
        Cluster::start_with(deployment, &[("TALLY_PURGE_CLOSED_AFTER_SECONDS", "2")]).await?;
    let definition = |id: &str| {
        json!({"id": id, "title": "Launch", "question": "Colour?", "kind": "single",
            "options": [{"id": "red", "label": "Red"}, {"id": "blue", "label": "Blue"}]})
    };
    cluster.create_poll(definition("finished")).await?;
    cluster.create_poll(definition("ongoing")).await?;
    let ballot = |i: usize, choice: &str| {
        json!({"voter_id": format!("u{i}"), "vote_id": format!("v{i}"), "choice": choice,
            "segment": {"country": "DE"}})
    };
    let mut first_answers = Vec::new();
    for i in 0..VOTERS {
        let choice = if i % 4 == 0 { "blue" } else { "red" };
        for poll in ["finished", "ongoing"] {
            let (status, answer) = cluster.vote(poll, &ballot(i, choice)).await?;
            ensure!(status == 202, "{poll} vote {i}: {status} {answer}");
            if poll == "finished" {
                first_answers.push(answer);
            }
        }
    }
    let counted = cluster
        .wait_for_total("finished", VOTERS as u64, Duration::from_secs(30))
        .await?;
    let (status, _) = admin(&cluster, M::POST, "/v1/polls/finished/close", None).await?;
    ensure!(status == 200);
    cluster.wait_for_ingest_status("finished", 409).await?;

    // Each late retry gets its first answer; a new vote id, a changed ballot under the same
    // id, or a new voter get poll-closed and count nothing.
    let late_retries_keep_their_answer = || async {
        for (i, first) in first_answers.iter().enumerate().step_by(7) {
            let choice = if i % 4 == 0 { "blue" } else { "red" };
            let (status, answer) = cluster.vote("finished", &ballot(i, choice)).await?;
            ensure!(
                status == 202 && &answer == first,
                "late retry {i}: {status} {answer}, first {first}"
            );
        }
        let refused = [
            json!({"voter_id": "u1", "vote_id": "v1", "choice": "blue", "segment": {"country": "DE"}}),
            json!({"voter_id": "u1", "vote_id": "v1-again", "choice": "red", "segment": {"country": "DE"}}),
            ballot(VOTERS + 1, "red"),
        ];
        for body in refused {
            let answer = cluster.vote("finished", &body).await?;
            expect(&body.to_string(), answer, 409, "poll-closed")?;
        }
        anyhow::Ok(())
    };
    late_retries_keep_their_answer().await?;

    match deployment {
        Deployment::Distributed => {
            tally_testkit::wait_until(
                "the finished poll's votes leave the stream",
                Duration::from_secs(60),
                || async { Ok(cluster.poll_tip_in_log("finished").await?.is_none()) },
            )
            .await
            .with_context(|| cluster.logs())?;
            ensure!(
                cluster.poll_tip_in_log("ongoing").await?.is_some(),
                "an open poll keeps its votes in the stream"
            );
            let (_, poll) = admin(&cluster, M::GET, "/v1/polls/finished", None).await?;
            ensure!(
                poll["status"] == "closed" && poll["log_purged_at"].is_string(),
                "{poll}"
            );
            ensure!(
                cluster
                    .processor_log()
                    .await
                    .contains("a finished poll's votes left the log"),
                "the purge is logged"
            );
            // Now answered from ClickHouse, the same way.
            late_retries_keep_their_answer().await?;
            let answer = admin(&cluster, M::POST, "/v1/polls/finished/reopen", None).await?;
            expect("reopening a purged poll", answer, 409, "poll-purged")?;
            // The open poll's votes (and the running processor) keep the partition count.
            let refused = cluster.tally_command(&["repartition", "--to", "4"]).await?;
            let stderr = String::from_utf8_lossy(&refused.stderr);
            ensure!(
                !refused.status.success() && stderr.contains(&format!("VOTES holds {VOTERS}")),
                "repartition with votes in the stream: {:?}\n{stderr}",
                refused.status
            );
        }
        Deployment::Standalone => {
            tokio::time::sleep(Duration::from_secs(4)).await;
            let (_, poll) = admin(&cluster, M::GET, "/v1/polls/finished", None).await?;
            ensure!(poll.get("log_purged_at").is_none(), "{poll}");
            late_retries_keep_their_answer().await?;
            let (status, reopened) =
                admin(&cluster, M::POST, "/v1/polls/finished/reopen", None).await?;
            ensure!(status == 200 && reopened["status"] == "open", "{reopened}");
        }
    }
    let results = cluster.results("finished").await?;
    ensure!(
        results["total_votes"] == counted["total_votes"]
            && results["options"] == counted["options"],
        "nothing counted after the close: {results} vs {counted}"
    );
    // The open poll still refuses a voter's second vote.
    let (status, problem) = cluster
        .vote(
            "ongoing",
            &json!({"voter_id": "u3", "vote_id": "other", "choice": "red"}),
        )
        .await?;
    ensure!(status == 409, "{status} {problem}");
    Ok(())
}
