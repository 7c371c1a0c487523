//! What an operator's log collector gets with `TALLY_LOG_FORMAT=json`: one JSON object per
//! line; an access line per request (method, route template, status, latency) carrying the
//! request id, which the client may give as `X-Request-Id` and which problem+json names as
//! its `instance`; and never an API key or a raw voter id.

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::cluster::{Cluster, Deployment, ADMIN_KEY};

crate::for_each_deployment!(json_logs_carry_request_ids_and_no_secrets);

async fn json_logs_carry_request_ids_and_no_secrets(deployment: Deployment) -> Result<()> {
    let cluster = Cluster::start_with(deployment, &[("TALLY_LOG_FORMAT", "json")]).await?;
    cluster
        .create_poll(
            json!({"id": "logged", "title": "Logged", "question": "Which?", "kind": "single",
            "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]}),
        )
        .await?;
    let voter = "voter-who-must-not-be-logged-7781";
    let (status, _) = cluster
        .vote("logged", &json!({"voter_id": voter, "choice": "a"}))
        .await?;
    ensure!(status == 202);

    // A problem names the request it answered; a client's own id is kept.
    let response = cluster
        .http
        .get(format!("{}/v1/polls/no-such-poll", cluster.query.url))
        .bearer_auth(ADMIN_KEY)
        .header("X-Request-Id", "trace-4711.a")
        .send()
        .await?;
    ensure!(response.status() == 404);
    ensure!(
        response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            == Some("trace-4711.a"),
        "the request id is echoed"
    );
    let problem: Value = response.json().await?;
    ensure!(
        problem["instance"] == "urn:tally:request:trace-4711.a",
        "problem instance: {problem}"
    );
    // Without one, the server makes one and still names it.
    let response = cluster
        .http
        .get(format!("{}/v1/polls/no-such-poll", cluster.query.url))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await?;
    let made = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .context("a made request id")?
        .to_owned();
    let problem: Value = response.json().await?;
    ensure!(problem["instance"] == format!("urn:tally:request:{made}"));

    let logs = match deployment {
        Deployment::Distributed => {
            let processor = cluster.processor.lock().await.log_text();
            [
                processor,
                cluster.ingest.log_text(),
                cluster.query.log_text(),
            ]
            .join("\n")
        }
        Deployment::Standalone => cluster.processor.lock().await.log_text(),
    };
    let mut access = Vec::new();
    for line in logs.lines().filter(|l| l.starts_with('{')) {
        let entry: Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        if entry["target"] == "tally::access" {
            access.push(entry);
        }
    }
    // Lines not starting with `{` are the harness's own and the listening line on stdout.
    for line in logs.lines().filter(|l| l.contains("\"level\"")) {
        ensure!(line.starts_with('{'), "a log line that is not JSON: {line}");
    }
    let traced = access
        .iter()
        .find(|e| e["span"]["request_id"] == "trace-4711.a")
        .context("no access line with the client's request id")?;
    ensure!(
        traced["method"] == "GET" && traced["route"] == "/v1/polls/{id}" && traced["status"] == 404,
        "access line: {traced}"
    );
    ensure!(traced["latency_ms"].is_number(), "access line: {traced}");
    ensure!(
        access
            .iter()
            .any(|e| e["route"] == "/v1/polls/{id}/votes" && e["status"] == 202),
        "no access line for the vote"
    );
    ensure!(!logs.contains(ADMIN_KEY), "an API key reached the logs");
    ensure!(!logs.contains(voter), "a raw voter id reached the logs");
    ensure!(
        !logs.contains("no-such-poll"),
        "a path's poll id reached an access line"
    );
    Ok(())
}
