//! `tally repartition` on a private nats-server: the vote stream's partition count changes
//! only while the stream holds no vote and no processor holds a partition; a refusal says
//! what to do and changes nothing; after the change, services with the old count are
//! refused, the new count opens, and one vote per voter holds with it. The log is laid
//! over streams of some partitions each (and back) the same way.
//! Every test here needs a nats-server (`needs_nats`).

use std::time::Duration;

use async_nats::jetstream;
use futures::TryStreamExt;
use tally_core::ports::{Appended, PartitionLeases, VoteLog};
use tally_core::vote::Vote;
use tally_nats::{
    self as nats, repartition, JetStreamLog, KvLeases, LogOptions, Repartitioned, StreamLayout,
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
        ..LogOptions::default()
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
        repartition(client.clone(), 4, None)
            .await
            .expect("no stream"),
        Repartitioned::NoStream
    );

    let log = JetStreamLog::open(client.clone(), options(2))
        .await
        .expect("created with 2 partitions");
    let first = log.append(&vote("spring", "u1"), "u1").await.expect("vote");
    assert!(matches!(first, Appended::Accepted { .. }), "{first:?}");

    // A vote in the stream: its voter's subject depends on the count.
    let why = refusal(repartition(client.clone(), 4, None).await);
    assert!(why.contains("still holds votes (VOTES holds 1)"), "{why}");
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
    let why = refusal(repartition(client.clone(), 4, None).await);
    assert!(
        why.contains("processors hold 1 partition lease(s) (partition.1)"),
        "{why}"
    );
    assert_eq!(recorded_count(&client).await.as_deref(), Some("2"));

    leases.release(1, "processor-a").await.expect("release");
    assert_eq!(
        repartition(client.clone(), 4, None)
            .await
            .expect("re-partitioned"),
        Repartitioned::Changed {
            from: Some(2),
            layout: StreamLayout::new(4, 0)
        }
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
        repartition(client.clone(), 3, None)
            .await
            .expect("re-partitioned"),
        Repartitioned::Changed {
            from: Some(1),
            layout: StreamLayout::new(3, 0)
        }
    );
    assert_eq!(recorded_count(&client).await.as_deref(), Some("3"));
    let why = refusal(repartition(client.clone(), 0, None).await);
    assert!(why.contains("at least 1"), "{why}");
    assert_eq!(recorded_count(&client).await.as_deref(), Some("3"));
}

/// A poll named `{prefix}-<n>` that `log` puts in `partition`.
fn poll_in(log: &JetStreamLog, prefix: &str, partition: u16) -> String {
    (0..)
        .map(|n| format!("{prefix}-{n}"))
        .find(|poll| log.partition_of(poll) == partition)
        .expect("some poll lands in every partition")
}

/// Appends one vote of a poll in each partition, then purges them as a processor does once
/// they are counted; answers the highest sequence they took.
async fn vote_and_purge_each_partition(log: &JetStreamLog, prefix: &str) -> u64 {
    let retention = log.retention().expect("the NATS log purges");
    let mut highest = 0;
    for partition in 0..log.partitions() {
        let poll = poll_in(log, prefix, partition);
        match log.append(&vote(&poll, "u1"), "u1").await.expect("vote") {
            Appended::Accepted { seq, .. } => highest = highest.max(seq),
            other => panic!("{other:?}"),
        }
        let tip = retention
            .poll_tip(&poll, partition)
            .await
            .expect("tip")
            .expect("the vote");
        retention
            .purge_poll(&poll, partition, tip)
            .await
            .expect("purge");
    }
    highest
}

/// `--partitions-per-stream` lays the empty log over streams anew, and back: each new
/// stream numbers its votes after every vote any stream numbered, so a partition's
/// watermark stays below its votes wherever it moved; services with the other layout are
/// refused; one vote per voter holds; a reader asked to start past its stream's numbers
/// (a stream made anew by hand) refuses instead of passing votes over.
#[tokio::test]
async fn needs_nats_the_log_is_laid_over_streams_anew_numbering_after_every_vote() {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let client = nats::connect(&server.url(), Duration::from_secs(10))
        .await
        .expect("connect");
    let one = JetStreamLog::open(client.clone(), options(4))
        .await
        .expect("one stream of 4 partitions");
    // More votes than partitions, so the last stream's numbers run ahead of the others'.
    vote_and_purge_each_partition(&one, "spring").await;
    let reached = vote_and_purge_each_partition(&one, "summer").await;
    assert_eq!(reached, 8);

    let laid = repartition(client.clone(), 4, Some(2))
        .await
        .expect("laid over two streams");
    assert_eq!(
        laid,
        Repartitioned::Changed {
            from: Some(4),
            layout: StreamLayout::new(4, 2)
        }
    );
    let why = JetStreamLog::open(client.clone(), options(4))
        .await
        .err()
        .expect("one stream is refused now")
        .chain()
        .to_string();
    assert!(
        why.contains("TALLY_PARTITIONS_PER_STREAM") && why.contains("tally repartition"),
        "{why}"
    );
    let grouped = LogOptions {
        per_stream: 2,
        ..options(4)
    };
    let two = JetStreamLog::open(client.clone(), grouped)
        .await
        .expect("two streams open");
    assert_eq!(
        two.held_per_stream().await.expect("streams"),
        [("VOTES".to_owned(), 0), ("VOTES_1".to_owned(), 0)]
    );
    for partition in 0..4 {
        let poll = poll_in(&two, "autumn", partition);
        let seq = match two.append(&vote(&poll, "u1"), "u1").await.expect("vote") {
            Appended::Accepted { seq, .. } => seq,
            other => panic!("{other:?}"),
        };
        assert!(
            seq > reached,
            "partition {partition}: {seq} after {reached}"
        );
        let mut again = vote(&poll, "u1");
        again.vote_id = "another".into();
        assert_eq!(
            two.append(&again, "u1").await.expect("second vote"),
            Appended::AlreadyVoted
        );
        // A watermark at the old numbers reads the new vote; one past them is refused.
        let mut reader = two.reader(partition, reached).await.expect("reader");
        let batch = reader
            .next_batch(10, Duration::from_secs(5))
            .await
            .expect("batch");
        assert_eq!(batch.iter().map(|e| e.seq).collect::<Vec<_>>(), [seq]);
        let why = match two.reader(partition, seq + 100).await {
            Ok(_) => panic!("a reader past the stream's numbers opened"),
            Err(err) => err.chain().to_string(),
        };
        assert!(why.contains("made anew"), "{why}");
    }
    let held = two.held_per_stream().await.expect("streams");
    assert_eq!(held[0].1 + held[1].1, 4, "{held:?}");
    assert!(held.iter().all(|(_, n)| *n == 2), "{held:?}");

    // A log that holds votes keeps its layout.
    let why = refusal(repartition(client.clone(), 4, Some(0)).await);
    assert!(why.contains("VOTES holds 2, VOTES_1 holds 2"), "{why}");

    // Back to one stream once empty, numbering after both: `VOTES_1` has run ahead.
    let retention = two.retention().expect("purges");
    for round in 0..3 {
        for partition in 2..4 {
            let poll = poll_in(&two, &format!("extra{round}"), partition);
            two.append(&vote(&poll, "u1"), "u1").await.expect("vote");
            let tip = retention.poll_tip(&poll, partition).await.expect("tip");
            retention
                .purge_poll(&poll, partition, tip.expect("the vote"))
                .await
                .expect("purge");
        }
    }
    let reached = vote_and_purge_each_partition(&two, "winter").await;
    for partition in 0..4 {
        let poll = poll_in(&two, "autumn", partition);
        let tip = retention.poll_tip(&poll, partition).await.expect("tip");
        retention
            .purge_poll(&poll, partition, tip.expect("the vote"))
            .await
            .expect("purge");
    }
    assert_eq!(
        repartition(client.clone(), 4, Some(0))
            .await
            .expect("back to one stream"),
        Repartitioned::Changed {
            from: Some(4),
            layout: StreamLayout::new(4, 0)
        }
    );
    let one = JetStreamLog::open(client.clone(), options(4))
        .await
        .expect("one stream again");
    assert_eq!(
        one.held_per_stream().await.expect("streams"),
        [("VOTES".to_owned(), 0)]
    );
    let names: Vec<String> = jetstream::new(client.clone())
        .stream_names()
        .try_collect()
        .await
        .expect("names");
    assert!(!names.iter().any(|n| n == "VOTES_1"), "{names:?}");
    for partition in 0..4 {
        let poll = poll_in(&one, "spring-again", partition);
        match one.append(&vote(&poll, "u1"), "u1").await.expect("vote") {
            Appended::Accepted { seq, .. } => {
                assert!(
                    seq > reached,
                    "partition {partition}: {seq} after {reached}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
