//! The baselines `scripts/bench` measures every figure against, as hidden subcommands:
//! `tally bench-log-append` (standalone: durable appends to the embedded vote log, in
//! process) and `tally bench-publish` (distributed: JetStream publishes; with `--through-log`
//! through the vote log ingest uses, so with its per-voter uniqueness and duplicate window).
//! Both send the same vote payloads with many in flight — no HTTP, no JSON parsing, no
//! processing — and print one line of JSON: `{"votes": N, "seconds": S, "per_s": R}`.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use tally_core::backend::VoteLog;
use tally_core::poll::Dedupe;
use tally_core::segment::Segment;
use tally_core::vote::Vote;

/// A vote like the load generator's: four segment values, one choice.
fn sample_vote(i: u64) -> Vote {
    Vote {
        vote_id: format!("baseline-{i}-0123456789"),
        poll_id: format!("baseline-{}", i % 4),
        voter_key: format!("{i:032x}"),
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

/// Appends `votes` sample votes with `in_flight` at once; returns the seconds it took.
async fn append_all(log: Arc<dyn VoteLog>, votes: u64, in_flight: usize) -> f64 {
    let started = Instant::now();
    futures::stream::iter(0..votes)
        .map(|i| {
            let log = log.clone();
            async move {
                let vote = sample_vote(i);
                log.append(&vote, &vote.unique_key(Dedupe::PerVoter)).await
            }
        })
        .buffer_unordered(in_flight)
        .for_each(|outcome| async move {
            outcome.expect("append");
        })
        .await;
    started.elapsed().as_secs_f64()
}

/// The one line of JSON every baseline prints.
fn report(votes: u64, seconds: f64) {
    println!(
        "{{\"votes\": {votes}, \"seconds\": {seconds:.3}, \"per_s\": {:.0}}}",
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
    let seconds = append_all(log, votes, in_flight).await;
    report(votes, seconds);
    Ok(())
}

/// The same votes appended through [`tally_core::nats::JetStreamLog`], as ingest appends
/// them: the `VOTES` stream with one message per voter, discard-new per subject and
/// `Nats-Msg-Id` deduplication. Deletes the stream afterwards, so run it before the services.
async fn publish_through_log(
    client: async_nats::Client,
    votes: u64,
    in_flight: usize,
) -> anyhow::Result<()> {
    let log: Arc<dyn VoteLog> =
        Arc::new(tally_core::nats::JetStreamLog::open(client.clone(), Default::default()).await?);
    let seconds = append_all(log, votes, in_flight).await;
    let _ = async_nats::jetstream::new(client)
        .delete_stream(tally_core::nats::VOTES_STREAM)
        .await;
    report(votes, seconds);
    Ok(())
}

/// `tally bench-publish` (hidden; `scripts/bench` runs it): the broker's ceiling for the
/// distributed deployment — JetStream publishes of the same vote payloads to a file-storage
/// stream of its own, from one connection with many acks awaited at once.
pub async fn publish(
    nats_url: &str,
    votes: u64,
    in_flight: usize,
    through_log: bool,
) -> anyhow::Result<()> {
    use async_nats::jetstream::{self, stream};
    let client = tally_core::nats::connect(nats_url, std::time::Duration::from_secs(10)).await?;
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
    let started = Instant::now();
    futures::stream::iter(0..votes)
        .map(|i| {
            let js = js.clone();
            async move {
                let vote = sample_vote(i);
                let subject = format!("bench.{}.{}", vote.poll_id, vote.voter_key);
                let ack = js
                    .publish(subject, tally_core::wire::encode(&vote).into())
                    .await?;
                ack.await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(in_flight)
        .for_each(|outcome| async move {
            outcome.expect("publish");
        })
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let _ = js.delete_stream("BENCH_PUBLISH").await;
    report(votes, seconds);
    Ok(())
}
