//! A barrage of bad requests against every endpoint: each gets a problem+json error naming
//! what to fix, and afterwards every count is exactly what it was.

use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::{json, Value};

use crate::cluster::{slug, Cluster, Deployment, ADMIN_KEY, ANALYST_KEY};

struct Case {
    name: &'static str,
    method: reqwest::Method,
    url: String,
    auth: Option<&'static str>,
    body: Option<reqwest::Body>,
    status: u16,
    slug: &'static str,
}

fn case(
    name: &'static str,
    method: reqwest::Method,
    url: String,
    body: impl Into<Option<Vec<u8>>>,
    status: u16,
    slug: &'static str,
) -> Case {
    Case {
        name,
        method,
        url,
        auth: None,
        body: body.into().map(reqwest::Body::from),
        status,
        slug,
    }
}

fn comparable(results: &Value) -> Value {
    let mut results = results.clone();
    results.as_object_mut().map(|o| o.remove("updated_at"));
    results
}

crate::for_each_deployment!(bad_input_gets_clear_errors_and_changes_nothing);

async fn bad_input_gets_clear_errors_and_changes_nothing(deployment: Deployment) -> Result<()> {
    let cluster = Cluster::start(deployment).await?;
    cluster
        .create_poll(
            json!({"id": "bad", "title": "Bad", "question": "Q", "kind": "single",
            "options": [{"id": "red", "label": "R"}, {"id": "blue", "label": "B"}]}),
        )
        .await?;
    cluster
        .create_poll(json!({"id": "shut", "title": "Shut", "question": "Q", "kind": "nps"}))
        .await?;
    let closed = cluster
        .http
        .post(format!("{}/v1/polls/shut/close", cluster.query.url))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await?;
    ensure!(closed.status() == 200);
    cluster.wait_for_ingest_status("shut", 409).await?;
    for voter in 0..10 {
        let (status, _) = cluster
            .vote(
                "bad",
                &json!({"voter_id": format!("u{voter}"), "choice": "red"}),
            )
            .await?;
        ensure!(status == 202);
    }
    let before = cluster
        .wait_for_total("bad", 10, Duration::from_secs(30))
        .await?;
    // A step is checked against the window widths the window rows carry, which trail the
    // totals by about a second.
    cluster
        .wait_for_timeseries("bad", &[("red".to_owned(), 10)].into())
        .await?;
    let shut_before = cluster.results("shut").await?;

    let ingest = &cluster.ingest.url;
    let query = &cluster.query.url;
    let votes = format!("{ingest}/v1/polls/bad/votes");
    let batch = format!("{ingest}/v1/votes:batch");
    use reqwest::Method as M;
    let mut cases = vec![
        case(
            "malformed json",
            M::POST,
            votes.clone(),
            b"{\"voter_id\": ".to_vec(),
            400,
            "malformed-json",
        ),
        case(
            "empty body",
            M::POST,
            votes.clone(),
            Vec::new(),
            400,
            "malformed-json",
        ),
        case(
            "not an object",
            M::POST,
            votes.clone(),
            b"[1,2]".to_vec(),
            422,
            "invalid-field",
        ),
        case(
            "wrong type of choice",
            M::POST,
            votes.clone(),
            br#"{"voter_id":"u1","choice":5}"#.to_vec(),
            422,
            "invalid-field",
        ),
        case(
            "wrong type of voter_id",
            M::POST,
            votes.clone(),
            br#"{"voter_id":12,"choice":"red"}"#.to_vec(),
            422,
            "invalid-field",
        ),
        case(
            "unknown field",
            M::POST,
            votes.clone(),
            br#"{"voter_id":"u1","choice":"red","colour":"x"}"#.to_vec(),
            422,
            "invalid-field",
        ),
        case(
            "unknown option",
            M::POST,
            votes.clone(),
            br#"{"voter_id":"u99","choice":"purple"}"#.to_vec(),
            422,
            "invalid-field",
        ),
        case(
            "unknown segment key",
            M::POST,
            votes.clone(),
            br#"{"voter_id":"u99","choice":"red","segment":{"colour":"x"}}"#.to_vec(),
            422,
            "invalid-field",
        ),
        case(
            "bad vote id",
            M::POST,
            votes.clone(),
            br#"{"voter_id":"u99","choice":"red","vote_id":"has spaces"}"#.to_vec(),
            422,
            "invalid-field",
        ),
        case(
            "missing voter id",
            M::POST,
            votes.clone(),
            br#"{"choice":"red"}"#.to_vec(),
            422,
            "invalid-field",
        ),
        case(
            "invalid utf-8",
            M::POST,
            votes.clone(),
            b"{\"voter_id\":\"\xff\xfe\",\"choice\":\"red\"}".to_vec(),
            400,
            "invalid-utf8",
        ),
        case(
            "unknown poll",
            M::POST,
            format!("{ingest}/v1/polls/nope/votes"),
            br#"{"voter_id":"u1","choice":"red"}"#.to_vec(),
            404,
            "not-found",
        ),
        case(
            "closed poll",
            M::POST,
            format!("{ingest}/v1/polls/shut/votes"),
            br#"{"voter_id":"u1","choice":7}"#.to_vec(),
            409,
            "poll-closed",
        ),
        case(
            "wrong method",
            M::PUT,
            votes.clone(),
            b"{}".to_vec(),
            405,
            "method-not-allowed",
        ),
        case(
            "no such route",
            M::GET,
            format!("{ingest}/v2/anything"),
            None,
            404,
            "no-route",
        ),
        // Batches are for integrations: these carry a key with the right to import.
        Case {
            auth: Some(ADMIN_KEY),
            ..case(
                "empty batch",
                M::POST,
                batch.clone(),
                b"\n\n".to_vec(),
                400,
                "empty-batch",
            )
        },
        Case {
            auth: Some(ADMIN_KEY),
            ..case(
                "batch invalid utf-8",
                M::POST,
                batch.clone(),
                b"\xff\n".to_vec(),
                400,
                "invalid-utf8",
            )
        },
        case(
            "create poll without key",
            M::POST,
            format!("{query}/v1/polls"),
            br#"{"title":"t","question":"q","kind":"nps"}"#.to_vec(),
            401,
            "unauthorized",
        ),
        case(
            "results of unknown poll",
            M::GET,
            format!("{query}/v1/polls/nope/results"),
            None,
            404,
            "not-found",
        ),
        case(
            "breakdown without key",
            M::GET,
            format!("{query}/v1/polls/bad/breakdown?by=country"),
            None,
            401,
            "unauthorized",
        ),
    ];
    let mut with_key = |name, method, url: String, auth, body: Option<&[u8]>, status, slug| {
        cases.push(Case {
            name,
            method,
            url,
            auth: Some(auth),
            body: body.map(|b| reqwest::Body::from(b.to_vec())),
            status,
            slug,
        });
    };
    with_key(
        "create poll as analyst",
        M::POST,
        format!("{query}/v1/polls"),
        ANALYST_KEY,
        Some(br#"{"title":"t","question":"q","kind":"nps"}"#),
        403,
        "forbidden",
    );
    with_key(
        "invalid poll",
        M::POST,
        format!("{query}/v1/polls"),
        ADMIN_KEY,
        Some(br#"{"title":"t","question":"q","kind":"single","options":[]}"#),
        422,
        "invalid-field",
    );
    with_key(
        "unknown poll kind",
        M::POST,
        format!("{query}/v1/polls"),
        ADMIN_KEY,
        Some(br#"{"title":"t","question":"q","kind":"poll"}"#),
        422,
        "invalid-field",
    );
    with_key(
        "duplicate poll",
        M::POST,
        format!("{query}/v1/polls"),
        ADMIN_KEY,
        Some(br#"{"id":"bad","title":"t","question":"q","kind":"nps"}"#),
        409,
        "already-exists",
    );
    with_key(
        "patch changes kind",
        M::PATCH,
        format!("{query}/v1/polls/bad"),
        ADMIN_KEY,
        Some(br#"{"kind":"multi"}"#),
        422,
        "invalid-field",
    );
    with_key(
        "remove voted option",
        M::PATCH,
        format!("{query}/v1/polls/bad"),
        ADMIN_KEY,
        Some(br#"{"options":[{"id":"blue","label":"B"},{"id":"green","label":"G"}]}"#),
        422,
        "invalid-field",
    );
    with_key(
        "breakdown by unknown key",
        M::GET,
        format!("{query}/v1/polls/bad/breakdown?by=colour"),
        ANALYST_KEY,
        None,
        422,
        "invalid-field",
    );
    with_key(
        "breakdown without by",
        M::GET,
        format!("{query}/v1/polls/bad/breakdown"),
        ANALYST_KEY,
        None,
        422,
        "invalid-field",
    );
    with_key(
        "breakdown bad where",
        M::GET,
        format!("{query}/v1/polls/bad/breakdown?by=country&where=country"),
        ANALYST_KEY,
        None,
        422,
        "invalid-field",
    );
    with_key(
        "breakdown bad time",
        M::GET,
        format!("{query}/v1/polls/bad/breakdown?by=country&from=yesterday"),
        ANALYST_KEY,
        None,
        422,
        "invalid-field",
    );
    with_key(
        "breakdown unknown param",
        M::GET,
        format!("{query}/v1/polls/bad/breakdown?by=country&colour=red"),
        ANALYST_KEY,
        None,
        400,
        "invalid-query",
    );
    with_key(
        "timeseries bad step",
        M::GET,
        format!("{query}/v1/polls/bad/timeseries?step=7s"),
        ANALYST_KEY,
        None,
        422,
        "invalid-field",
    );
    with_key(
        "list bad limit",
        M::GET,
        format!("{query}/v1/polls?limit=0"),
        ADMIN_KEY,
        None,
        422,
        "invalid-field",
    );
    with_key(
        "unknown api key",
        M::GET,
        format!("{query}/v1/polls"),
        "not-a-key",
        None,
        401,
        "unauthorized",
    );

    for case in cases {
        let mut request = cluster.http.request(case.method.clone(), &case.url);
        if let Some(auth) = case.auth {
            request = request.bearer_auth(auth);
        }
        if let Some(body) = case.body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        ensure!(
            status == case.status,
            "{}: expected {}, got {status}: {body}",
            case.name,
            case.status
        );
        ensure!(
            content_type == "application/problem+json",
            "{}: content type {content_type}",
            case.name
        );
        let slug = slug(&body);
        ensure!(
            slug == case.slug,
            "{}: type {} (expected {})",
            case.name,
            body["type"],
            case.slug
        );
        ensure!(
            body["status"] == status && body["title"].is_string(),
            "{}: {body}",
            case.name
        );
        ensure!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{}: no detail",
            case.name
        );
    }

    // Oversized bodies, declared (10 MB Content-Length) and chunked (no length), are refused
    // before they are read in full. Raw TCP: the server may answer and close while the client
    // is still writing, which an HTTP client library reports as a broken pipe.
    let address = cluster.ingest.url.trim_start_matches("http://").to_owned();
    let declared = format!("POST /v1/polls/bad/votes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", 10 * 1024 * 1024);
    let (status, body) = raw_http(&address, declared.into_bytes(), 10 * 1024 * 1024, false).await?;
    ensure!(
        status == 413 && body.contains("body-too-large"),
        "declared 10 MB body answered {status}: {body}"
    );
    let chunked = "POST /v1/polls/bad/votes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned();
    let (status, body) = raw_http(&address, chunked.into_bytes(), 4 * 1024 * 1024, true).await?;
    ensure!(
        status == 413 && body.contains("body-too-large"),
        "chunked oversized body answered {status}: {body}"
    );

    // Nothing changed: no vote counted, and the voters of the barrage can still vote once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        comparable(&cluster.results("bad").await?) == comparable(&before),
        "counts changed after bad input"
    );
    ensure!(
        comparable(&cluster.results("shut").await?) == comparable(&shut_before),
        "closed poll changed"
    );
    let (status, _) = cluster
        .vote("bad", &json!({"voter_id": "u99", "choice": "blue"}))
        .await?;
    ensure!(
        status == 202,
        "a voter whose bad votes were refused still has their vote"
    );
    cluster
        .wait_for_total("bad", 11, Duration::from_secs(30))
        .await?;
    Ok(())
}

/// Sends `head`, then `body_len` bytes of spaces (optionally in 64 KiB chunks), ignoring write
/// errors, and reads the status line and body of the answer.
async fn raw_http(
    address: &str,
    head: Vec<u8>,
    body_len: usize,
    chunked: bool,
) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(address).await?;
    let (mut reader, mut writer) = stream.into_split();
    let writing = tokio::spawn(async move {
        writer.write_all(&head).await?;
        let chunk = vec![b' '; 64 * 1024];
        let mut sent = 0;
        while sent < body_len {
            if chunked {
                writer
                    .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .await?;
                writer.write_all(&chunk).await?;
                writer.write_all(b"\r\n").await?;
            } else {
                writer.write_all(&chunk).await?;
            }
            sent += chunk.len();
        }
        if chunked {
            writer.write_all(b"0\r\n\r\n").await?;
        }
        std::io::Result::Ok(())
    });
    let mut answer = Vec::new();
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read =
            tokio::time::timeout(Duration::from_secs(10), reader.read(&mut buffer)).await??;
        if read == 0 {
            break;
        }
        answer.extend_from_slice(&buffer[..read]);
        let text = String::from_utf8_lossy(&answer);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end].lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            });
            if length.is_some_and(|n| answer.len() >= end + 4 + n) {
                break;
            }
        }
    }
    writing.abort();
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
