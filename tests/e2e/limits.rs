//! Intake rate limits: a client address over its quota gets 429 with Retry-After and
//! RateLimit headers while another address is served; a spoofed X-Forwarded-For from an
//! untrusted peer does not escape the limit, while a trusted proxy's does count; a voter
//! over the per-voter limit is refused; nothing refused is counted.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Result};
use serde_json::{json, Value};

use crate::cluster::{Cluster, Deployment};

/// A client whose connections come from `source` (any 127.x address reaches the server).
fn client_from(source: &str) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .local_address(source.parse::<IpAddr>()?)
        .timeout(Duration::from_secs(10))
        .build()?)
}

async fn vote(
    http: &reqwest::Client,
    cluster: &Cluster,
    poll: &str,
    body: Value,
    forwarded_for: Option<&str>,
) -> Result<reqwest::Response> {
    let mut request = http
        .post(format!("{}/v1/polls/{poll}/votes", cluster.ingest.url))
        .json(&body);
    if let Some(chain) = forwarded_for {
        request = request.header("x-forwarded-for", chain);
    }
    Ok(request.send().await?)
}

crate::for_each_deployment!(clients_over_their_quota_wait_and_others_are_served);

async fn clients_over_their_quota_wait_and_others_are_served(deployment: Deployment) -> Result<()> {
    let cluster = Cluster::start_with(
        deployment,
        &[
            ("TALLY_RATE_PER_IP", "5/min"),
            ("TALLY_RATE_PER_VOTER", "2/min"),
            ("TALLY_TRUSTED_PROXIES", "127.0.0.3/32"),
        ],
    )
    .await?;
    cluster
        .create_poll(json!({"id": "busy", "title": "Busy", "question": "Q", "kind": "single", "dedupe": "none",
            "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}],
            "allowed_origins": ["https://shop.example"]}))
        .await?;
    let first = client_from("127.0.0.1")?;
    let mut accepted = 0u64;
    for i in 0..5 {
        let response = vote(
            &first,
            &cluster,
            "busy",
            json!({"voter_id": format!("v{i}"), "choice": "a"}),
            None,
        )
        .await?;
        ensure!(
            response.status() == 202,
            "vote {i} within quota: {}",
            response.status()
        );
        ensure!(response.headers().contains_key("ratelimit-remaining"));
        accepted += 1;
    }
    let refused = vote(
        &first,
        &cluster,
        "busy",
        json!({"voter_id": "v9", "choice": "a"}),
        None,
    )
    .await?;
    ensure!(refused.status() == 429, "over quota: {}", refused.status());
    let headers = refused.headers().clone();
    let retry: u64 = headers["retry-after"].to_str()?.parse()?;
    ensure!((1..=60).contains(&retry), "Retry-After {retry}");
    ensure!(headers["ratelimit-limit"] == "5" && headers["ratelimit-remaining"] == "0");
    ensure!(headers["content-type"] == "application/problem+json");
    let problem: Value = refused.json().await?;
    ensure!(
        problem["type"]
            .as_str()
            .unwrap_or("")
            .ends_with("/rate-limited"),
        "{problem}"
    );

    // Claiming to be someone else does not help an untrusted peer.
    let spoofed = vote(
        &first,
        &cluster,
        "busy",
        json!({"voter_id": "v10", "choice": "a"}),
        Some("203.0.113.77"),
    )
    .await?;
    ensure!(
        spoofed.status() == 429,
        "spoofed X-Forwarded-For escaped the limit: {}",
        spoofed.status()
    );

    // Another address is served.
    let second = client_from("127.0.0.2")?;
    let other = vote(
        &second,
        &cluster,
        "busy",
        json!({"voter_id": "w1", "choice": "b"}),
        None,
    )
    .await?;
    ensure!(other.status() == 202, "another address: {}", other.status());
    accepted += 1;

    // A trusted proxy's X-Forwarded-For names the client: each client has its own quota.
    let proxy = client_from("127.0.0.3")?;
    for client in ["198.51.100.1", "198.51.100.2"] {
        for i in 0..2 {
            let response = vote(
                &proxy,
                &cluster,
                "busy",
                json!({"voter_id": format!("{client}-{i}"), "choice": "b"}),
                Some(&format!("{client}, 127.0.0.3")),
            )
            .await?;
            ensure!(
                response.status() == 202,
                "client {client} behind the proxy: {}",
                response.status()
            );
            accepted += 1;
        }
    }

    // One voter, many addresses: the per-voter limit still holds.
    for i in 0..3 {
        let response = vote(
            &proxy,
            &cluster,
            "busy",
            json!({"voter_id": "eager", "choice": "a"}),
            Some(&format!("192.0.2.{i}")),
        )
        .await?;
        if i < 2 {
            ensure!(
                response.status() == 202,
                "eager vote {i}: {}",
                response.status()
            );
            accepted += 1;
        } else {
            ensure!(
                response.status() == 429,
                "third vote of one voter within a minute: {}",
                response.status()
            );
            let problem: Value = response.json().await?;
            ensure!(
                problem["detail"].as_str().unwrap_or("").contains("voter"),
                "{problem}"
            );
        }
    }

    // Behind a trusted TLS-terminating proxy the voter cookie is Secure.
    let response = proxy
        .post(format!("{}/v1/polls/busy/votes", cluster.ingest.url))
        .header("x-forwarded-for", "198.51.100.9")
        .header("x-forwarded-proto", "https")
        .header("origin", "https://shop.example")
        .json(&json!({"choice": "a"}))
        .send()
        .await?;
    ensure!(response.status() == 202, "{}", response.status());
    let cookie = response.headers()["set-cookie"].to_str()?.to_owned();
    ensure!(cookie.contains("; Secure"), "{cookie}");
    accepted += 1;

    // Only the accepted votes count.
    let results = cluster
        .wait_for_total("busy", accepted, Duration::from_secs(30))
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(cluster.results("busy").await?["total_votes"] == results["total_votes"]);
    Ok(())
}

crate::for_each_deployment!(live_connections_are_capped);

/// Past the cap a live client gets 503 with Retry-After; a slot frees when a client leaves.
async fn live_connections_are_capped(deployment: Deployment) -> Result<()> {
    let cluster = Cluster::start_with(deployment, &[("TALLY_LIVE_MAX_CLIENTS", "2")]).await?;
    cluster
        .create_poll(
            json!({"id": "watched", "title": "W", "question": "Q", "kind": "single",
            "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]}),
        )
        .await?;
    let url = format!("{}/v1/polls/watched/live", cluster.query.url);
    let first = crate::cluster::SseClient::connect(&cluster.http, &url, None).await?;
    let _second = crate::cluster::SseClient::connect(&cluster.http, &url, None).await?;
    let refused = cluster.http.get(&url).send().await?;
    ensure!(
        refused.status() == 503,
        "a third live client: {}",
        refused.status()
    );
    ensure!(refused.headers().contains_key("retry-after"));
    let problem: Value = refused.json().await?;
    ensure!(
        problem["type"]
            .as_str()
            .unwrap_or("")
            .ends_with("/too-many-live-clients"),
        "{problem}"
    );
    // The server notices the departure at its next send (heartbeats come every second here).
    drop(first);
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let response = cluster
            .http
            .get(&url)
            .timeout(Duration::from_secs(2))
            .send()
            .await?;
        if response.status() == 200 {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < end,
            "the slot never freed: {}",
            response.status()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

crate::for_each_deployment!(a_client_that_trickles_its_body_times_out);

/// A vote whose body never finishes arriving is answered 408 (problem+json) when the request
/// timeout passes, instead of holding a connection and a task forever.
async fn a_client_that_trickles_its_body_times_out(deployment: Deployment) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster =
        Cluster::start_with(deployment, &[("TALLY_REQUEST_TIMEOUT_SECONDS", "1")]).await?;
    cluster
        .create_poll(
            json!({"id": "slow", "title": "S", "question": "Q", "kind": "single",
            "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]}),
        )
        .await?;
    let address = cluster.ingest.url.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await?;
    stream
        .write_all(
            format!("POST /v1/polls/slow/votes HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"voter_id\":")
                .as_bytes(),
        )
        .await?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buffer = [0u8; 4096];
        loop {
            let n = stream.read(&mut buffer).await?;
            answer.extend_from_slice(&buffer[..n]);
            if n == 0 || answer.windows(4).any(|w| w == b"\r\n\r\n") {
                return anyhow::Ok(());
            }
        }
    })
    .await;
    ensure!(read.is_ok(), "no answer to a stalled body within 10 s");
    let head = String::from_utf8_lossy(&answer).to_string();
    ensure!(head.starts_with("HTTP/1.1 408"), "{head}");
    ensure!(
        head.to_ascii_lowercase()
            .contains("content-type: application/problem+json"),
        "{head}"
    );
    ensure!(cluster.results("slow").await?["total_votes"] == 0);
    Ok(())
}
