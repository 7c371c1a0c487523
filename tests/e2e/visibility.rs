//! Results visibility per poll, honoured by the results endpoint and the live stream:
//! `after_vote` (the vote's 202 carries a results token), `after_close`, `private`.

use anyhow::{ensure, Result};
use serde_json::{json, Value};

use crate::cluster::{Cluster, Deployment, ADMIN_KEY, ANALYST_KEY};

async fn get(cluster: &Cluster, path: &str, key: Option<&str>) -> Result<(u16, Value)> {
    let mut request = cluster.http.get(format!("{}{path}", cluster.query.url));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let body = if path.ends_with("/live") && status == 200 {
        Value::Null
    } else {
        response.json().await.unwrap_or(Value::Null)
    };
    Ok((status, body))
}

fn poll(id: &str, visibility: &str) -> Value {
    json!({"id": id, "title": "T", "question": "Q", "kind": "single", "results_visibility": visibility,
           "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]})
}

crate::for_each_deployment!(results_are_shown_as_each_poll_says);

async fn results_are_shown_as_each_poll_says(deployment: Deployment) -> Result<()> {
    let cluster = Cluster::start(deployment).await?;
    for (id, visibility) in [
        ("voters-only", "after_vote"),
        ("suspense", "after_close"),
        ("internal", "private"),
    ] {
        let created = cluster.create_poll(poll(id, visibility)).await?;
        ensure!(created["results_visibility"] == visibility, "{created}");
    }

    // after_vote: hidden until you vote; the 202 carries the token that shows them.
    let (status, problem) = get(&cluster, "/v1/polls/voters-only/results", None).await?;
    ensure!(
        status == 403
            && problem["type"]
                .as_str()
                .unwrap_or("")
                .ends_with("/results-hidden"),
        "{status} {problem}"
    );
    ensure!(get(&cluster, "/v1/polls/voters-only/live", None).await?.0 == 403);
    let (status, accepted) = cluster
        .vote("voters-only", &json!({"voter_id": "u1", "choice": "a"}))
        .await?;
    ensure!(status == 202, "{accepted}");
    let token = accepted["results_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        !token.is_empty(),
        "the 202 of an after_vote poll carries a results token: {accepted}"
    );
    let (status, results) = get(
        &cluster,
        &format!("/v1/polls/voters-only/results?results_token={token}"),
        None,
    )
    .await?;
    ensure!(
        status == 200 && results["poll_id"] == "voters-only",
        "{status} {results}"
    );
    ensure!(
        get(
            &cluster,
            &format!("/v1/polls/voters-only/live?results_token={token}"),
            None
        )
        .await?
        .0 == 200
    );
    let (status, _) = get(
        &cluster,
        &format!("/v1/polls/suspense/results?results_token={token}"),
        None,
    )
    .await?;
    ensure!(status == 403, "a token shows only its own poll: {status}");
    let (status, _) = get(
        &cluster,
        "/v1/polls/voters-only/results?results_token=4102444800.00ff",
        None,
    )
    .await?;
    ensure!(status == 403, "a forged token shows nothing: {status}");
    let (status, accepted) = cluster
        .vote("suspense", &json!({"voter_id": "u1", "choice": "b"}))
        .await?;
    ensure!(
        status == 202 && accepted.get("results_token").is_none(),
        "{accepted}"
    );

    // after_close: hidden while open (but not from analysts), public once closed.
    ensure!(get(&cluster, "/v1/polls/suspense/results", None).await?.0 == 403);
    ensure!(
        get(&cluster, "/v1/polls/suspense/results", Some(ANALYST_KEY))
            .await?
            .0
            == 200
    );
    let closed = cluster
        .http
        .post(format!("{}/v1/polls/suspense/close", cluster.query.url))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await?;
    ensure!(closed.status() == 200, "close: {}", closed.status());
    let (status, results) = get(&cluster, "/v1/polls/suspense/results", None).await?;
    ensure!(status == 200, "after close: {status} {results}");
    ensure!(get(&cluster, "/v1/polls/suspense/live", None).await?.0 == 200);

    // private: keys only; a wrong key is refused, not ignored.
    let (status, problem) = get(&cluster, "/v1/polls/internal/results", None).await?;
    ensure!(status == 401, "{status} {problem}");
    ensure!(get(&cluster, "/v1/polls/internal/live", None).await?.0 == 401);
    ensure!(
        get(&cluster, "/v1/polls/internal/results", Some("not-a-key"))
            .await?
            .0
            == 401
    );
    ensure!(
        get(&cluster, "/v1/polls/internal/results", Some(ANALYST_KEY))
            .await?
            .0
            == 200
    );
    ensure!(
        get(&cluster, "/v1/polls/internal/results", Some(ADMIN_KEY))
            .await?
            .0
            == 200
    );

    // Visibility can change: made public, the results are.
    let patched = cluster
        .http
        .patch(format!("{}/v1/polls/internal", cluster.query.url))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"results_visibility": "live"}))
        .send()
        .await?;
    ensure!(patched.status() == 200, "patch: {}", patched.status());
    ensure!(get(&cluster, "/v1/polls/internal/results", None).await?.0 == 200);
    let bad = cluster
        .http
        .patch(format!("{}/v1/polls/internal", cluster.query.url))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"results_visibility": "sometimes"}))
        .send()
        .await?;
    ensure!(
        bad.status() == 422 || bad.status() == 400,
        "unknown visibility: {}",
        bad.status()
    );
    Ok(())
}
