//! Every management and analytics endpoint against every kind of caller: no key and an
//! unknown key get 401, a key without the role 403, the right role (admin includes analyst)
//! gets through — and a refused request changes nothing.

use anyhow::{ensure, Result};
use reqwest::Method;
use serde_json::{json, Value};

use crate::cluster::{Cluster, Deployment, ADMIN_KEY, ANALYST_KEY};

const ALL_POLLS: &str = "/v1/polls?include_archived=true&limit=100";

#[derive(Clone, Copy, PartialEq)]
enum Needs {
    Admin,
    Analyst,
}

crate::for_each_deployment!(each_endpoint_admits_exactly_its_roles);

async fn each_endpoint_admits_exactly_its_roles(deployment: Deployment) -> Result<()> {
    let cluster = Cluster::start(deployment).await?;
    cluster
        .create_poll(
            json!({"id": "guarded", "title": "G", "question": "Q", "kind": "single",
            "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]}),
        )
        .await?;
    let new_poll = json!({"id": "made-by-role", "title": "T", "question": "Q", "kind": "single",
        "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]});
    let endpoints: Vec<(Method, &str, Option<Value>, Needs)> = vec![
        (
            Method::POST,
            "/v1/polls",
            Some(new_poll.clone()),
            Needs::Admin,
        ),
        (Method::GET, "/v1/polls", None, Needs::Admin),
        (Method::GET, "/v1/polls/guarded", None, Needs::Admin),
        (
            Method::PATCH,
            "/v1/polls/guarded",
            Some(json!({"title": "Renamed"})),
            Needs::Admin,
        ),
        (Method::POST, "/v1/polls/guarded/close", None, Needs::Admin),
        (Method::POST, "/v1/polls/guarded/reopen", None, Needs::Admin),
        (
            Method::POST,
            "/v1/polls/guarded/tokens",
            Some(json!({"voter_id": "u1"})),
            Needs::Admin,
        ),
        (Method::DELETE, "/v1/polls/made-by-role", None, Needs::Admin),
        (
            Method::GET,
            "/v1/polls/guarded/breakdown?by=country",
            None,
            Needs::Analyst,
        ),
        (
            Method::GET,
            "/v1/polls/guarded/timeseries",
            None,
            Needs::Analyst,
        ),
    ];
    let call = |method: Method, path: &str, body: Option<Value>, key: Option<&str>| {
        let mut request = cluster
            .http
            .request(method, format!("{}{path}", cluster.query.url));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send()
    };
    for (method, path, body, needs) in &endpoints {
        // Every poll, archived ones included: a refused create or archive would show here.
        let before = call(Method::GET, ALL_POLLS, None, Some(ADMIN_KEY))
            .await?
            .json::<Value>()
            .await?;
        for (key, expected) in [(None, 401), (Some("not-a-key"), 401)] {
            let response = call(method.clone(), path, body.clone(), key).await?;
            ensure!(
                response.status() == expected,
                "{method} {path} with {key:?}: {}",
                response.status()
            );
            let problem: Value = response.json().await?;
            ensure!(
                problem["type"]
                    .as_str()
                    .unwrap_or("")
                    .ends_with("/unauthorized"),
                "{problem}"
            );
        }
        if *needs == Needs::Admin {
            let response = call(method.clone(), path, body.clone(), Some(ANALYST_KEY)).await?;
            ensure!(
                response.status() == 403,
                "{method} {path} as analyst: {}",
                response.status()
            );
        }
        let after = call(Method::GET, ALL_POLLS, None, Some(ADMIN_KEY))
            .await?
            .json::<Value>()
            .await?;
        ensure!(
            before["polls"].is_array() && before == after,
            "a refused {method} {path} changed the polls: {before} -> {after}"
        );
        let allowed = match needs {
            Needs::Admin => vec![ADMIN_KEY],
            Needs::Analyst => vec![ANALYST_KEY, ADMIN_KEY],
        };
        for key in allowed {
            let response = call(method.clone(), path, body.clone(), Some(key)).await?;
            ensure!(
                response.status().is_success(),
                "{method} {path} with the right key: {}",
                response.status()
            );
        }
    }
    Ok(())
}
