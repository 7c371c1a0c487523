//! tally as an attacker (and a careless integrator) tries it: each attack gets a clear
//! refusal, no process dies, and afterwards every count is what honest voters made it.
//! The address-wide limits are on here (the other scenarios turn them off), and clients
//! that should be throttled speak from their own loopback address (127.0.0.x) so the
//! throttling of one does not hide what another sees.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster::{expect, slug, Cluster, Deployment, SseClient, ADMIN_KEY, ANALYST_KEY};

/// An HTTP client that connects from `address` (a loopback address of its own).
fn client_from(address: &str) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .local_address(address.parse::<IpAddr>()?)
        .timeout(Duration::from_secs(30))
        .build()?)
}

async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Whether both services still answer their health checks.
async fn alive(cluster: &Cluster) -> Result<()> {
    for base in [&cluster.ingest.url, &cluster.query.url] {
        let status = cluster
            .http
            .get(format!("{base}/healthz"))
            .send()
            .await
            .with_context(|| format!("{base} is gone"))?
            .status();
        ensure!(status == 200, "{base}/healthz answered {status}");
    }
    Ok(())
}

crate::for_each_deployment!(hostile_requests_are_refused_and_change_nothing);

async fn hostile_requests_are_refused_and_change_nothing(deployment: Deployment) -> Result<()> {
    let cluster = Cluster::start_with(
        deployment,
        &[
            ("TALLY_AUTH_FAILURES_PER_IP", "10/10min"),
            ("TALLY_RATE_NEW_VOTERS_PER_IP", "3/h"),
        ],
    )
    .await?;
    let (ingest, query) = (cluster.ingest.url.clone(), cluster.query.url.clone());
    cluster
        .create_poll(
            // Embedded on a shop's site, whose pages vote from their visitors' browsers.
            json!({"id": "target", "title": "T", "question": "Q", "kind": "single",
            "options": [{"id": "red", "label": "Red"}, {"id": "blue", "label": "Blue"}],
            "allowed_origins": ["https://shop.example"]}),
        )
        .await?;
    let options: Vec<Value> = (0..50)
        .map(|i| json!({"id": format!("option-with-a-long-name-{i:02}"), "label": format!("Option {i}")}))
        .collect();
    cluster
        .create_poll(json!({"id": "wide", "title": "W", "question": "Q", "kind": "single", "options": options}))
        .await?;
    cluster
        .create_poll(
            json!({"id": "ballots", "title": "B", "question": "Q", "kind": "single",
            "dedupe": "none", "require_token": true,
            "options": [{"id": "yes", "label": "Yes"}, {"id": "no", "label": "No"}]}),
        )
        .await?;
    for voter in 0..5 {
        let (status, answer) = cluster
            .vote("target", &json!({"voter_id": format!("honest-{voter}"), "choice": "red", "vote_id": format!("honest-{voter}")}))
            .await?;
        ensure!(status == 202, "an honest vote: {status} {answer}");
    }
    cluster
        .wait_for_total("target", 5, Duration::from_secs(30))
        .await?;

    // 1. A `where` of a thousand alternatives is refused before any query planning, and
    // the process stays up; a hundred are answered.
    let thousand: Vec<String> = (0..1_000)
        .map(|i| {
            format!(
                "country:{}{}",
                (b'A' + (i / 26 % 26) as u8) as char,
                (b'A' + (i % 26) as u8) as char
            )
        })
        .collect();
    let got = answer(
        cluster
            .http
            .get(format!(
                "{query}/v1/polls/target/breakdown?by=device&where={}",
                thousand.join(",")
            ))
            .bearer_auth(ANALYST_KEY)
            .send()
            .await?,
    )
    .await;
    expect("a where of 1,000 values", got, 422, "invalid-field")?;
    let got = answer(
        cluster
            .http
            .get(format!(
                "{query}/v1/polls/target/breakdown?by=device&where={}",
                thousand[..100].join(",")
            ))
            .bearer_auth(ANALYST_KEY)
            .send()
            .await?,
    )
    .await;
    ensure!(got.0 == 200, "a where of 100 values: {} {}", got.0, got.1);
    alive(&cluster).await?;

    // 2. A schedule time in epoch microseconds is refused naming the field and the unit;
    // nothing is stored, and listing polls still works.
    let got = answer(
        cluster
            .http
            .post(format!("{query}/v1/polls"))
            .bearer_auth(ADMIN_KEY)
            .json(&json!({"id": "micro", "title": "M", "question": "Q", "kind": "nps", "closes_at": "1767225600000000"}))
            .send()
            .await?,
    )
    .await;
    let problem = expect("closes_at in microseconds", got, 422, "invalid-field")?;
    ensure!(
        problem["field"] == "closes_at"
            && problem["detail"]
                .as_str()
                .unwrap_or("")
                .contains("microseconds"),
        "{problem}"
    );
    let listed = answer(
        cluster
            .http
            .get(format!("{query}/v1/polls?include_archived=true"))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await?,
    )
    .await;
    ensure!(
        listed.0 == 200 && listed.1["polls"].as_array().is_some_and(|p| p.len() == 3),
        "{listed:?}"
    );
    for (path, bad) in [
        ("breakdown?by=country&to=", "-9223372036854775808"),
        ("timeseries?step=1m&from=", "-9223372036854775808"),
        ("timeseries?step=1m&to=", "99999999999999999"),
    ] {
        let got = answer(
            cluster
                .http
                .get(format!("{query}/v1/polls/target/{path}{bad}"))
                .bearer_auth(ANALYST_KEY)
                .send()
                .await?,
        )
        .await;
        expect(&format!("{path}{bad}"), got, 422, "invalid-field")?;
    }

    // 3. Batches are for integrations: without a key 401, with an analyst's 403.
    let line = json!({"poll_id": "target", "voter_id": "batch-1", "choice": "blue"}).to_string();
    let anonymous = cluster
        .http
        .post(format!("{ingest}/v1/votes:batch"))
        .header("content-type", "application/x-ndjson")
        .body(line.clone())
        .send()
        .await?;
    expect(
        "a batch without a key",
        answer(anonymous).await,
        401,
        "unauthorized",
    )?;
    let analyst = cluster
        .http
        .post(format!("{ingest}/v1/votes:batch"))
        .bearer_auth(ANALYST_KEY)
        .header("content-type", "application/x-ndjson")
        .body(line)
        .send()
        .await?;
    expect(
        "a batch with an analyst key",
        answer(analyst).await,
        403,
        "forbidden",
    )?;

    // 4. A vote id is bound to its ballot: the same id with another choice is refused.
    let (status, answer_body) = cluster
        .vote(
            "target",
            &json!({"voter_id": "honest-0", "choice": "blue", "vote_id": "honest-0"}),
        )
        .await?;
    expect(
        "a vote id reused for another ballot",
        (status, answer_body),
        409,
        "vote-id-conflict",
    )?;
    let (status, _) = cluster
        .vote(
            "target",
            &json!({"voter_id": "honest-0", "choice": "red", "vote_id": "honest-0"}),
        )
        .await?;
    ensure!(status == 202, "the same ballot again is a retry: {status}");

    // 8. Invisible characters make look-alike segments: refused.
    for sneaky in ["mo\u{200b}bile", "\u{202e}elibom", "\u{feff}mobile"] {
        let (status, answer_body) = cluster
            .vote(
                "target",
                &json!({"voter_id": "sneaky", "choice": "red", "segment": {"device": sneaky}}),
            )
            .await?;
        let problem = expect(
            &format!("segment {sneaky:?}"),
            (status, answer_body),
            422,
            "invalid-field",
        )?;
        ensure!(problem["field"] == "segment.device", "{problem}");
    }

    // 9. A vote a browser could send from any site without asking (text/plain, a form) is
    // refused; a browser without its cookie is a new voter, and new voters per address are
    // limited.
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let got = cluster
            .http
            .post(format!("{ingest}/v1/polls/target/votes"))
            .header("content-type", content_type)
            .body(json!({"voter_id": "csrf", "choice": "blue"}).to_string())
            .send()
            .await?;
        expect(
            content_type,
            answer(got).await,
            415,
            "unsupported-media-type",
        )?;
    }
    let browser = client_from("127.0.0.5")?;
    let mut cookieless = Vec::new();
    for _ in 0..4 {
        let got = browser
            .post(format!("{ingest}/v1/polls/target/votes"))
            .header("origin", "https://shop.example")
            .json(&json!({"choice": "blue"}))
            .send()
            .await?;
        cookieless.push(got.status().as_u16());
    }
    ensure!(
        cookieless == [202, 202, 202, 429],
        "new browser voters from one address: {cookieless:?}"
    );

    // 10. A batch of millions of short lines is refused by counting, not by splitting them
    // all; a bad line's error stays short however many options the poll has; a batch
    // naming too many polls is answered line by line.
    let flood = "{}\n".repeat(8 * 1024 * 1024 / 3);
    let got = cluster
        .http
        .post(format!("{ingest}/v1/votes:batch"))
        .bearer_auth(ADMIN_KEY)
        .header("content-type", "application/x-ndjson")
        .body(flood)
        .send()
        .await?;
    expect(
        "8 MiB of short lines",
        answer(got).await,
        413,
        "batch-too-large",
    )?;
    let bad_lines: String = (0..2_000)
        .map(|i| {
            format!(
                "{}\n",
                json!({"poll_id": "wide", "voter_id": format!("w{i}"), "choice": "nope"})
            )
        })
        .collect();
    let sent_bytes = bad_lines.len();
    let got = cluster
        .http
        .post(format!("{ingest}/v1/votes:batch"))
        .bearer_auth(ADMIN_KEY)
        .header("content-type", "application/x-ndjson")
        .body(bad_lines)
        .send()
        .await?;
    let answer_bytes = got.bytes().await?.len();
    // Each line's problem is a few hundred bytes whatever the poll (it was 50 times the
    // request when every error listed all of a poll's options).
    ensure!(
        answer_bytes < 8 * sent_bytes,
        "2,000 bad lines ({sent_bytes} bytes) were answered with {answer_bytes} bytes"
    );
    let many_polls: String = (0..150)
        .map(|i| {
            format!(
                "{}\n",
                json!({"poll_id": format!("no-such-poll-{i}"), "voter_id": "x", "choice": "a"})
            )
        })
        .collect();
    let got = answer(
        cluster
            .http
            .post(format!("{ingest}/v1/votes:batch"))
            .bearer_auth(ADMIN_KEY)
            .header("content-type", "application/x-ndjson")
            .body(many_polls)
            .send()
            .await?,
    )
    .await;
    let statuses: Vec<u64> = got.1["results"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|line| line["status"].as_u64().unwrap_or(0))
        .collect();
    ensure!(
        statuses.len() == 150
            && statuses[..100].iter().all(|s| *s == 404)
            && statuses[100..].iter().all(|s| *s == 422),
        "a batch naming 150 polls: {statuses:?}"
    );

    // 13. On a `dedupe: none` poll a voter token is one ballot, whatever the vote id.
    let token: Value = cluster
        .http
        .post(format!("{query}/v1/polls/ballots/tokens"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"voter_id": "panel-7"}))
        .send()
        .await?
        .json()
        .await?;
    let token = token["token"].as_str().unwrap_or_default().to_owned();
    let mut used = Vec::new();
    for attempt in 0..3 {
        let (status, answer_body) = cluster
            .vote("ballots", &json!({"voter_id": "panel-7", "choice": "yes", "token": token, "vote_id": format!("ballot-{attempt}")}))
            .await?;
        used.push((status, slug(&answer_body).to_owned()));
    }
    ensure!(
        used == [
            (202, String::new()),
            (409, "token-used".to_owned()),
            (409, "token-used".to_owned())
        ],
        "one token, three vote ids: {used:?}"
    );

    // 12. Guessing keys: an address that sends unknown keys is throttled after ten, and
    // only that address.
    let guesser = client_from("127.0.0.7")?;
    let mut guesses = Vec::new();
    for i in 0..12 {
        let status = guesser
            .get(format!("{query}/v1/polls"))
            .bearer_auth(format!("guess-{i:02}-0123456789abcdef"))
            .send()
            .await?
            .status()
            .as_u16();
        guesses.push(status);
    }
    ensure!(
        guesses[..10].iter().all(|s| *s == 401) && guesses[11] == 429,
        "guesses: {guesses:?}"
    );
    let throttled = guesser
        .get(format!("{query}/v1/polls"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await?;
    ensure!(
        throttled.status() == 429 && throttled.headers().contains_key("retry-after"),
        "even the right key waits"
    );
    let others = cluster
        .http
        .get(format!("{query}/v1/polls"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await?;
    ensure!(others.status() == 200, "another address is not throttled");

    // Afterwards: the honest votes, the one batch-free retry, the three cookie-less browser
    // voters and one token ballot — nothing else.
    alive(&cluster).await?;
    let target = cluster
        .wait_for_total("target", 8, Duration::from_secs(30))
        .await?;
    ensure!(
        target["options"][0]["count"] == 5 && target["options"][1]["count"] == 3,
        "{target}"
    );
    cluster
        .wait_for_total("ballots", 1, Duration::from_secs(30))
        .await?;
    ensure!(cluster.results("wide").await?["total_votes"] == 0);
    Ok(())
}

/// A service refuses to start with an API key anyone could guess.
#[test]
fn a_short_key_is_refused_at_start() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["standalone", "--listen", "127.0.0.1:0"])
        .env("TALLY_ADMIN_KEYS", "admin")
        .env(
            "TALLY_DATA_DIR",
            std::env::temp_dir().join(tally_testkit::unique_name("shortkey")),
        )
        .output()
        .expect("run tally");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("shorter than 16"), "{stderr}");
}

/// Reads until the server closes the connection or `wait` passes; true when it closed.
async fn closed_within(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// A TCP connection to `url`'s host and port from the loopback address `from`.
async fn connect_from(url: &str, from: &str) -> Result<tokio::net::TcpStream> {
    let target: std::net::SocketAddr = url.trim_start_matches("http://").parse()?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{from}:0").parse()?)?;
    Ok(socket.connect(target).await?)
}

crate::for_each_deployment!(connections_are_timed_out_and_capped);

async fn connections_are_timed_out_and_capped(deployment: Deployment) -> Result<()> {
    let cluster = Cluster::start_with(
        deployment,
        &[
            ("TALLY_HEADER_TIMEOUT_SECONDS", "1"),
            ("TALLY_MAX_CONNECTIONS_PER_ADDRESS", "20"),
            ("TALLY_LIVE_MAX_PER_ADDRESS", "2"),
        ],
    )
    .await?;
    cluster
        .create_poll(json!({"id": "watched", "title": "W", "question": "Q", "kind": "nps"}))
        .await?;
    let url = cluster.ingest.url.clone();

    // Connections that never finish their headers, and an idle kept-alive one, are closed.
    let mut slow = Vec::new();
    for _ in 0..10 {
        let mut stream = connect_from(&url, "127.0.0.11").await?;
        stream
            .write_all(b"POST /v1/polls/watched/votes HTTP/1.1\r\nHost: x\r\n")
            .await?;
        slow.push(stream);
    }
    let mut idle = connect_from(&url, "127.0.0.12").await?;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    for stream in slow.iter_mut().chain(std::iter::once(&mut idle)) {
        ensure!(
            closed_within(stream, Duration::from_secs(5)).await,
            "a stalled connection was still open after 5 s"
        );
    }

    // One address cannot hold more than its share of connections; others still get in.
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut stream = connect_from(&url, "127.0.0.13").await?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await?;
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = connect_from(&url, "127.0.0.13").await?;
    let _ = over
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    ensure!(
        closed_within(&mut over, Duration::from_secs(2)).await,
        "the 21st connection of one address was served"
    );
    let other = client_from("127.0.0.14")?
        .get(format!("{url}/healthz"))
        .send()
        .await?;
    ensure!(other.status() == 200, "another address is served");
    drop(held);

    // One address holds at most two live streams.
    let watcher = client_from("127.0.0.15")?;
    let live = format!("{}/v1/polls/watched/live", cluster.query.url);
    let _first = SseClient::connect(&watcher, &live, None).await?;
    let _second = SseClient::connect(&watcher, &live, None).await?;
    let third = watcher.get(&live).send().await?;
    expect(
        "a third stream from one address",
        answer(third).await,
        503,
        "too-many-live-clients",
    )?;
    let _elsewhere = SseClient::connect(&client_from("127.0.0.16")?, &live, None).await?;
    Ok(())
}

crate::for_each_deployment!(a_live_stream_ends_when_its_poll_goes_private);

async fn a_live_stream_ends_when_its_poll_goes_private(deployment: Deployment) -> Result<()> {
    let cluster = Cluster::start(deployment).await?;
    cluster
        .create_poll(
            json!({"id": "open-then-private", "title": "P", "question": "Q", "kind": "nps"}),
        )
        .await?;
    let live = format!("{}/v1/polls/open-then-private/live", cluster.query.url);
    let mut anonymous = SseClient::connect(&cluster.http, &live, None).await?;
    let (kind, _, _) = anonymous.next_event(Duration::from_secs(10)).await?;
    ensure!(kind == "snapshot", "{kind}");
    let patched = cluster
        .http
        .patch(format!("{}/v1/polls/open-then-private", cluster.query.url))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"results_visibility": "private"}))
        .send()
        .await?;
    ensure!(patched.status() == 200);
    let (kind, _, data) = anonymous.next_event(Duration::from_secs(10)).await?;
    ensure!(kind == "hidden", "the anonymous stream got {kind} {data}");
    ensure!(
        anonymous.next_event(Duration::from_secs(5)).await.is_err(),
        "the stream ends after `hidden`"
    );
    let (status, _) = cluster
        .vote(
            "open-then-private",
            &json!({"voter_id": "after", "choice": 9}),
        )
        .await?;
    ensure!(status == 202);
    // A new anonymous stream is refused.
    let refused = cluster.http.get(&live).send().await?;
    ensure!(refused.status() == 401, "{}", refused.status());
    Ok(())
}
