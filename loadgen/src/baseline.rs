//! The baselines `scripts/bench` measures every figure against, as subcommands:
//! `tally-loadgen bench-log-append` (standalone: durable appends to the embedded vote log,
//! in process) and `tally-loadgen bench-publish` (distributed: JetStream publishes; with
//! `--through-log` through the vote log ingest uses, so with its one message per voter).
//! Both send the same vote payloads with many in flight — no HTTP, no JSON parsing, no
//! processing — and print one line of JSON: `{"votes": N, "seconds": S, "per_s": R}`.
//! The single-vote path has a baseline of its own, the HTTP layer alone:
//! `tally-loadgen serve-http-baseline` (a minimal axum server) driven by
//! `tally-loadgen bench-http` (the load's client and vote bodies), which prints the same line.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use tally_core::poll::Dedupe;
use tally_core::ports::VoteLog;
use tally_core::segment::Segment;
use tally_core::vote::{Vote, VoterHasher};

/// The baseline's voter keys are hashed with this key, made once.
static HASHER: std::sync::LazyLock<VoterHasher> =
    std::sync::LazyLock::new(|| VoterHasher::new(b"baseline"));

/// A vote like the load generator's: four segment values, one choice.
fn sample_vote(i: u64) -> Vote {
    Vote {
        vote_id: format!("baseline-{i}-0123456789"),
        poll_id: format!("baseline-{}", i % 4),
        // Keyed hashes, as ingest makes them: in no order, as a real electorate's keys land
        // in the log's uniqueness index.
        voter_key: HASHER.voter_key(&format!("voter-{i}")),
        choice: vec!["green".into()],
        value: None,
        segment: Segment {
            country: "DE".into(),
            device: "mobile".into(),
            channel: "email".into(),
            custom: [("plan".to_owned(), "pro".to_owned())].into(),
            ..Default::default()
        },
        received_at: 1_700_000_000_000 + i as i64,
    }
}

/// Appends `votes` sample votes with `in_flight` at once, `together` per
/// [`VoteLog::append_many`] call; returns the seconds it took.
async fn append_all(log: Arc<dyn VoteLog>, votes: u64, in_flight: usize, together: u64) -> f64 {
    let together = together.max(1);
    let started = Instant::now();
    futures::stream::iter((0..votes).step_by(together as usize))
        .map(|first| {
            let log = log.clone();
            async move {
                let group: Vec<(Vote, String)> = (first..votes.min(first + together))
                    .map(|i| {
                        let vote = sample_vote(i);
                        let key = vote.unique_key(Dedupe::PerVoter);
                        (vote, key)
                    })
                    .collect();
                log.append_many(&group).await
            }
        })
        .buffer_unordered(in_flight.div_ceil(together as usize).max(1))
        .for_each(|outcomes| async move {
            for outcome in outcomes {
                outcome.expect("append");
            }
        })
        .await;
    started.elapsed().as_secs_f64()
}

/// The one line of JSON every baseline prints.
fn report(votes: u64, seconds: f64, cpu_before: Option<f64>) {
    let cpu = cpu_before
        .zip(crate::own_cpu_seconds())
        .map_or(String::new(), |(before, after)| {
            format!(", \"cpu_seconds\": {:.2}", after - before)
        });
    println!(
        "{{\"votes\": {votes}, \"seconds\": {seconds:.3}, \"per_s\": {:.0}{cpu}}}",
        votes as f64 / seconds
    );
}

pub async fn run(votes: u64, in_flight: usize, dir: &std::path::Path) -> anyhow::Result<()> {
    let store = tally_embedded::open(
        dir,
        tally_embedded::Options {
            partitions: 2,
            ..Default::default()
        },
    )?;
    let log: Arc<dyn VoteLog> = store.log;
    let cpu = crate::own_cpu_seconds();
    let seconds = append_all(log, votes, in_flight, 1).await;
    report(votes, seconds, cpu);
    Ok(())
}

/// Votes per group of the distributed baselines (per `append_many` call through the log):
/// as ingest appends the votes of an NDJSON batch of 1,000 (within
/// [`tally_nats::ACKS_PER_SUBSCRIPTION`]).
const PUBLISH_GROUP: u64 = 1_000;

/// The same votes appended through [`tally_nats::JetStreamLog`], as ingest appends
/// a batch's votes: the `VOTES` stream with one message per voter (discard new per
/// subject). Deletes the stream afterwards, so run it before the services.
async fn publish_through_log(
    client: async_nats::Client,
    votes: u64,
    in_flight: usize,
) -> anyhow::Result<()> {
    let log: Arc<dyn VoteLog> =
        Arc::new(tally_nats::JetStreamLog::open(client.clone(), Default::default()).await?);
    let cpu = crate::own_cpu_seconds();
    let seconds = append_all(log, votes, in_flight, PUBLISH_GROUP).await;
    let _ = async_nats::jetstream::new(client)
        .delete_stream(tally_nats::VOTES_STREAM)
        .await;
    report(votes, seconds, cpu);
    Ok(())
}

/// Publishes the sample votes `range` to the baseline's stream and waits for every ack, the
/// lightest way a client can and the way the vote log publishes a batch
/// ([`tally_nats::publish_together`]).
async fn publish_group(
    client: &async_nats::Client,
    range: std::ops::Range<u64>,
) -> anyhow::Result<()> {
    let messages = range
        .map(|i| {
            let vote = sample_vote(i);
            let subject = format!("bench.{}.{}", vote.poll_id, vote.voter_key);
            (subject, tally_core::wire::encode(&vote).into())
        })
        .collect();
    for ack in tally_nats::publish_together(client, messages).await {
        if let tally_nats::Ack::SubjectTaken = ack? {
            anyhow::bail!("the baseline's stream, which has no per-subject limit, refused one");
        }
    }
    Ok(())
}

/// `tally-loadgen bench-publish` (`scripts/bench` runs it): the broker's ceiling for the
/// distributed deployment — JetStream publishes of the same vote payloads to a file-storage
/// stream of its own (no per-subject limit), from one connection with about as many acks
/// awaited at once as `in_flight`.
pub async fn publish(
    nats_url: &str,
    votes: u64,
    in_flight: usize,
    through_log: bool,
) -> anyhow::Result<()> {
    use async_nats::jetstream::{self, stream};
    let client = tally_nats::connect(nats_url, std::time::Duration::from_secs(10)).await?;
    if through_log {
        return publish_through_log(client, votes, in_flight).await;
    }
    let js = jetstream::new(client);
    let _ = js.delete_stream("BENCH_PUBLISH").await;
    js.create_stream(stream::Config {
        name: "BENCH_PUBLISH".into(),
        subjects: vec!["bench.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let client = js.client();
    let cpu = crate::own_cpu_seconds();
    let started = Instant::now();
    futures::stream::iter((0..votes).step_by(PUBLISH_GROUP as usize))
        .map(|first| publish_group(&client, first..votes.min(first + PUBLISH_GROUP)))
        .buffer_unordered(in_flight.div_ceil(PUBLISH_GROUP as usize).max(1))
        .for_each(|outcome| async move {
            outcome.expect("publish");
        })
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let _ = js.delete_stream("BENCH_PUBLISH").await;
    report(votes, seconds, cpu);
    Ok(())
}

/// The HTTP layer alone, the baseline of single votes (`tally-loadgen serve-http-baseline`):
/// an axum server whose one route takes what ingest's single-vote route takes — a vote's
/// JSON, parsed into the API's [`VoteRequest`](tally_core::vote::VoteRequest) — and answers
/// 202 with a body the size of ingest's, doing nothing else. Prints
/// `listening on http://ADDR` and serves until killed.
pub async fn serve_http(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    use axum::extract::Path;
    use axum::http::StatusCode;
    use axum::Json;

    async fn accept(
        Path(poll): Path<String>,
        Json(vote): Json<tally_core::vote::VoteRequest>,
    ) -> (StatusCode, Json<serde_json::Value>) {
        let answer = serde_json::json!({
            "vote_id": vote.vote_id.unwrap_or_default(),
            "poll_id": poll,
            "status": "accepted",
        });
        (StatusCode::ACCEPTED, Json(answer))
    }

    let app = axum::Router::new().route("/v1/polls/{poll}/votes", axum::routing::post(accept));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

/// Drives `url` (a [`serve_http`] server) with single votes for `seconds`, `concurrency` at
/// once, with the load's HTTP client settings and vote bodies; prints the baseline line
/// with the requests answered 202 as `votes`.
pub async fn drive_http(url: &str, concurrency: usize, seconds: f64) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency.max(1))
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let mix: crate::mix::SegmentMix = crate::mix::DEFAULT_SEGMENT_MIX
        .parse()
        .map_err(anyhow::Error::msg)?;
    let deadline = Instant::now() + std::time::Duration::from_secs_f64(seconds);
    let cpu = crate::own_cpu_seconds();
    let started = Instant::now();
    let workers = (0..concurrency.max(1) as u64).map(|worker| {
        let (http, mix) = (http.clone(), mix.clone());
        let target = format!("{url}/v1/polls/baseline/votes");
        tokio::spawn(async move {
            let mut accepted = 0u64;
            let mut voter = worker << 32;
            while Instant::now() < deadline {
                let vote = crate::vote::SyntheticVote::random(0, voter, &mix);
                voter += 1;
                let mut body = Vec::with_capacity(200);
                vote.write_json(&mut body, "baseline", "base", &mix);
                let sent = http
                    .post(&target)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                if let Ok(response) = sent {
                    let status = response.status();
                    if response.bytes().await.is_ok() && status.as_u16() == 202 {
                        accepted += 1;
                    }
                }
            }
            accepted
        })
    });
    let mut accepted = 0;
    for worker in futures::future::join_all(workers).await {
        accepted += worker?;
    }
    report(accepted, started.elapsed().as_secs_f64(), cpu);
    Ok(())
}
