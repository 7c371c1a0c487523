//! A replicated broker: three nats-servers clustered on loopback and `TALLY_REPLICAS=3`
//! (`LogOptions::replicas`). The stream and the bucket are made with three copies; votes
//! keep coming while the stream's leader and then another server are killed -9 and
//! restarted, and afterwards the log holds every acknowledged vote exactly once, while a
//! voter whose vote was acknowledged still cannot vote twice. Needs a nats-server
//! (`needs_nats`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use async_nats::jetstream;
use tally_core::ports::{Appended, VoteLog};
use tally_core::vote::Vote;
use tally_core::wire;
use tally_nats::{self as nats, JetStreamLog, KvRegistry, LogOptions};
use tally_testkit::{require, NatsCluster};

const POLL: &str = "replicated";

fn vote(i: usize) -> (Vote, String) {
    let vote = Vote {
        vote_id: format!("v{i}"),
        poll_id: POLL.into(),
        voter_key: format!("k{i}"),
        choice: vec!["a".into()],
        value: None,
        segment: Default::default(),
        received_at: 1_700_000_000_000 + i as i64,
    };
    (vote, format!("k{i}"))
}

/// Opens the log with three replicas, retrying while the cluster elects its JetStream
/// meta leader.
async fn open(client: &nats::Client) -> anyhow::Result<JetStreamLog> {
    let started = Instant::now();
    loop {
        let options = LogOptions {
            partitions: 1,
            replicas: 3,
            per_stream: 0,
        };
        match JetStreamLog::open(client.clone(), options).await {
            Ok(log) => return Ok(log),
            Err(err) if started.elapsed() < Duration::from_secs(30) => {
                tracing::debug!(error = %err, "JetStream not ready");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(err) => bail!("opening the replicated log: {err}"),
        }
    }
}

/// Sends votes `range` one at a time (as single votes come), each retried until the log
/// acknowledges it; records the seq of each and how many attempts failed on the way.
async fn send(
    log: &JetStreamLog,
    range: std::ops::Range<usize>,
    acked: &mut BTreeMap<String, u64>,
    failed: &mut usize,
) -> anyhow::Result<()> {
    for i in range {
        let (vote, key) = vote(i);
        let started = Instant::now();
        loop {
            match log.append(&vote, &key).await {
                Ok(Appended::Accepted { seq, .. }) => {
                    acked.insert(vote.vote_id.clone(), seq);
                    break;
                }
                Ok(other) => bail!("vote {i}: {other:?}"),
                Err(err) => {
                    *failed += 1;
                    ensure!(
                        started.elapsed() < Duration::from_secs(60),
                        "vote {i} not acknowledged in a minute: {err}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn needs_nats_a_three_server_cluster_keeps_every_acknowledged_vote_through_kills(
) -> anyhow::Result<()> {
    require!(NatsServer);
    let mut cluster = NatsCluster::start(3).await?;
    let client = nats::connect(cluster.urls().as_str(), Duration::from_secs(10)).await?;
    let log = open(&client).await?;
    let registry = KvRegistry::open_replicated(client.clone(), 3).await?;
    drop(registry);
    let js = jetstream::new(client.clone());
    for stream in ["VOTES", "KV_POLLS"] {
        let replicas = js
            .get_stream(stream)
            .await?
            .cached_info()
            .config
            .num_replicas;
        ensure!(replicas == 3, "{stream} has {replicas} replicas");
    }

    let (mut acked, mut failed) = (BTreeMap::new(), 0);
    send(&log, 0..200, &mut acked, &mut failed).await?;
    let first = cluster.stream_leader("VOTES").await?;
    cluster.servers[first].kill().await;
    send(&log, 200..400, &mut acked, &mut failed).await?;
    cluster.servers[first].restart().await?;
    let second = (first + 1) % 3;
    cluster.servers[second].kill().await;
    send(&log, 400..600, &mut acked, &mut failed).await?;
    cluster.servers[second].restart().await?;
    send(&log, 600..700, &mut acked, &mut failed).await?;
    ensure!(acked.len() == 700, "{} votes acknowledged", acked.len());

    // A voter whose vote was acknowledged before the kills still cannot vote again.
    let (mut again, key) = vote(5);
    again.vote_id = "another".into();
    ensure!(
        matches!(log.append(&again, &key).await, Ok(Appended::AlreadyVoted)),
        "a second vote of voter k5 was not refused"
    );

    // The log holds each acknowledged vote once, at the seq it was acknowledged with.
    let mut reader = log.reader(0, 0).await?;
    let mut stored: BTreeMap<String, u64> = BTreeMap::new();
    let started = Instant::now();
    while stored.len() < acked.len() && started.elapsed() < Duration::from_secs(60) {
        for entry in reader.next_batch(1000, Duration::from_secs(1)).await? {
            let vote = wire::decode(&entry.payload)?;
            ensure!(
                stored.insert(vote.vote_id.clone(), entry.seq).is_none(),
                "{} stored twice",
                vote.vote_id
            );
        }
    }
    ensure!(
        stored == acked,
        "stored {} votes, acknowledged {}; differing: {:?}",
        stored.len(),
        acked.len(),
        stored
            .iter()
            .filter(|(id, seq)| acked.get(*id) != Some(seq))
            .take(5)
            .collect::<Vec<_>>()
    );
    eprintln!(
        "700 votes acknowledged across two kills; {failed} attempts failed during the elections"
    );
    Ok(())
}
