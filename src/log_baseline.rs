//! `tally bench-log-append` (hidden; `scripts/bench` runs it): the ceiling of standalone
//! intake on this machine — durable appends to the embedded vote log, in process, with many
//! in flight; no HTTP, no JSON parsing, no processing. Prints one line of JSON:
//! `{"votes": N, "seconds": S, "per_s": R}`.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use tally_core::backend::VoteLog;
use tally_core::poll::Dedupe;
use tally_core::segment::Segment;
use tally_core::vote::Vote;

pub async fn run(votes: u64, in_flight: usize, dir: &std::path::Path) -> anyhow::Result<()> {
    let store = tally_embedded::open(
        dir,
        tally_embedded::Options {
            partitions: 2,
            ..Default::default()
        },
    )?;
    let log: Arc<dyn VoteLog> = store.log;
    let started = Instant::now();
    futures::stream::iter(0..votes)
        .map(|i| {
            let log = log.clone();
            async move {
                let segment = Segment {
                    country: "DE".into(),
                    device: "mobile".into(),
                    channel: "email".into(),
                    custom: [("plan".to_owned(), "pro".to_owned())].into(),
                    ..Default::default()
                };
                let vote = Vote {
                    vote_id: format!("baseline-{i}-0123456789"),
                    poll_id: format!("baseline-{}", i % 4),
                    voter_key: format!("{:032x}", i),
                    choice: vec!["green".into()],
                    value: None,
                    segment,
                    received_at: 1_700_000_000_000 + i as i64,
                };
                log.append(&vote, &vote.unique_key(Dedupe::PerVoter)).await
            }
        })
        .buffer_unordered(in_flight)
        .for_each(|outcome| async move {
            outcome.expect("append");
        })
        .await;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{{\"votes\": {votes}, \"seconds\": {seconds:.3}, \"per_s\": {:.0}}}",
        votes as f64 / seconds
    );
    Ok(())
}
