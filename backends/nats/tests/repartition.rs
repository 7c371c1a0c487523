//! `tally repartition` on a private nats-server: the vote stream's partition count changes
//! only while the stream holds no vote and no processor holds a partition; a refusal says
//! what to do and changes nothing; after the change, services with the old count are
//! refused, the new count opens, and one vote per voter holds with it.
//! Every test here needs a nats-server (`needs_nats`).

use std::time::Duration;

use async_nats::jetstream;
use tally_core::ports::{Appended, PartitionLeases, VoteLog};
use tally_core::vote::Vote;
use tally_nats::{
    self as nats, repartition, JetStreamLog, KvLeases, LogOptions, Repartitioned,
    PARTITIONS_METADATA,
};
use tally_testkit::{require, NatsServer};

/// The sample vote of `voter` in `poll`.
fn vote(poll: &str, voter: &str) -> Vote {
    tally_conformance::vote(
        poll,
        &format!("v-{poll}-{voter}"),
        voter,
        "a",
        1_700_000_000_000,
    )
}

fn options(partitions: u16) -> LogOptions {
    LogOptions {
        partitions,
        replicas: 1,
    }
}

async fn recorded_count(client: &nats::Client) -> Option<String> {
    jetstream::new(client.clone())
        .get_stream("VOTES")
        .await
        .expect("the VOTES stream")
        .cached_info()
        .config
        .metadata
        .get(PARTITIONS_METADATA)
        .cloned()
}

fn refusal(result: tally_core::Result<Repartitioned>) -> String {
    match result {
        Ok(done) => panic!("re-partitioned ({done:?}) where it should have refused"),
        Err(err) => err.chain().to_string(),
    }
}

#[tokio::test]
async fn needs_nats_the_partition_count_changes_only_on_an_empty_stream_with_no_processor() {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let client = nats::connect(&server.url(), Duration::from_secs(10))
        .await
        .expect("connect");
    assert_eq!(
        repartition(client.clone(), 4).await.expect("no stream"),
        Repartitioned::NoStream
    );

    let log = JetStreamLog::open(client.clone(), options(2))
        .await
        .expect("created with 2 partitions");
    let first = log.append(&vote("spring", "u1"), "u1").await.expect("vote");
    assert!(matches!(first, Appended::Accepted { .. }), "{first:?}");

    // A vote in the stream: its voter's subject depends on the count.
    let why = refusal(repartition(client.clone(), 4).await);
    assert!(why.contains("still holds 1 vote"), "{why}");
    assert_eq!(recorded_count(&client).await.as_deref(), Some("2"));

    // Once the finished poll's votes left the log, a processor holding a lease still stops it.
    let retention = log.retention().expect("the NATS log purges");
    let at = log.partition_of("spring");
    let tip = retention
        .poll_tip("spring", at)
        .await
        .expect("tip")
        .expect("a vote");
    retention
        .purge_poll("spring", at, tip)
        .await
        .expect("purge");
    let leases = KvLeases::open(client.clone(), 1, Duration::from_secs(30))
        .await
        .expect("leases");
    leases
        .claim(1, "processor-a")
        .await
        .expect("claim")
        .expect("claimed");
    let why = refusal(repartition(client.clone(), 4).await);
    assert!(
        why.contains("processors hold 1 partition lease(s) (partition.1)"),
        "{why}"
    );
    assert_eq!(recorded_count(&client).await.as_deref(), Some("2"));

    leases.release(1, "processor-a").await.expect("release");
    assert_eq!(
        repartition(client.clone(), 4)
            .await
            .expect("re-partitioned"),
        Repartitioned::Changed { from: Some(2) }
    );
    assert_eq!(recorded_count(&client).await.as_deref(), Some("4"));

    // Services with the old count are refused; the new count opens and keeps one vote per
    // voter.
    let why = JetStreamLog::open(client.clone(), options(2))
        .await
        .err()
        .expect("the old count is refused")
        .chain()
        .to_string();
    assert!(why.contains("TALLY_PARTITIONS=4"), "{why}");
    let log = JetStreamLog::open(client.clone(), options(4))
        .await
        .expect("the new count opens");
    let first = log.append(&vote("summer", "u1"), "u1").await.expect("vote");
    assert!(matches!(first, Appended::Accepted { .. }), "{first:?}");
    let mut again = vote("summer", "u1");
    again.vote_id = "another".into();
    assert_eq!(
        log.append(&again, "u1").await.expect("second vote"),
        Appended::AlreadyVoted
    );
}

/// Processors started with fixed partitions (or none ever started) leave no lease bucket:
/// nothing holds a partition, and an empty stream is re-partitioned.
#[tokio::test]
async fn needs_nats_without_a_lease_bucket_an_empty_stream_is_repartitioned() {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let client = nats::connect(&server.url(), Duration::from_secs(10))
        .await
        .expect("connect");
    JetStreamLog::open(client.clone(), options(1))
        .await
        .expect("created with 1 partition");
    assert_eq!(
        repartition(client.clone(), 3)
            .await
            .expect("re-partitioned"),
        Repartitioned::Changed { from: Some(1) }
    );
    assert_eq!(recorded_count(&client).await.as_deref(), Some("3"));
    let why = refusal(repartition(client.clone(), 0).await);
    assert!(why.contains("at least 1"), "{why}");
    assert_eq!(recorded_count(&client).await.as_deref(), Some("3"));
}
