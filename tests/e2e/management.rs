//! Poll management over HTTP: create, get, paginated list, patch, close, reopen, archive;
//! votes honour the lifecycle and SSE clients hear about the close.

use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::{json, Value};

use crate::cluster::{Cluster, Deployment, SseClient, ADMIN_KEY};

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
