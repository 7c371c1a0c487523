//! The broker's shape checked at start, on a private nats-server: a stream or bucket whose
//! settings would break one vote per voter, with fewer replicas than asked for, or written
//! with another partition count is refused with a message that says what to do, and
//! nothing about it is changed. Every test here needs a nats-server (`needs_nats`).

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use tally_core::ports::{partition_of, Appended, VoteLog};
use tally_core::vote::Vote;
use tally_nats::{self as nats, JetStreamLog, KvRegistry, LogOptions, PARTITIONS_METADATA};
use tally_testkit::{require, NatsServer};

async fn client(server: &NatsServer) -> nats::Client {
    nats::connect(&server.url(), Duration::from_secs(10))
        .await
        .expect("connect to the private nats-server")
}

fn options(partitions: u16, replicas: usize) -> LogOptions {
    LogOptions {
        partitions,
        replicas,
        per_stream: 0,
    }
}

/// The refusal's message, or a panic if `opened` was not refused.
fn refusal<T>(opened: tally_core::Result<T>) -> String {
    match opened {
        Ok(_) => panic!("opened where it should have been refused"),
        Err(err) => err.chain().to_string(),
    }
}

/// `VOTES` as tally made it before the partition count was recorded: the right shape, one
/// copy, no metadata.
fn earlier_stream() -> stream::Config {
    stream::Config {
        name: "VOTES".to_owned(),
        subjects: vec!["votes.>".to_owned()],
        storage: stream::StorageType::File,
        max_messages_per_subject: 1,
        discard: stream::DiscardPolicy::New,
        discard_new_per_subject: true,
        ..Default::default()
    }
}

/// Creates `VOTES` anew. A nats-server removes a deleted stream's files after it answers
/// the delete, so a create just after one can meet the old directory and fail with "error
/// creating store for stream" (10049); that is retried for a few seconds.
async fn create_votes(js: &jetstream::Context, config: stream::Config) {
    let mut tries = 0;
    loop {
        match js.create_stream(config.clone()).await {
            Ok(_) => return,
            Err(err) if tries < 50 && err.to_string().contains("creating store") => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("create the VOTES stream: {err}"),
        }
    }
}

/// The stream's config as the server holds it now.
async fn stream_config(client: &nats::Client) -> stream::Config {
    jetstream::new(client.clone())
        .get_stream("VOTES")
        .await
        .expect("the VOTES stream")
        .cached_info()
        .config
        .clone()
}

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

#[tokio::test]
async fn needs_nats_a_stream_written_with_another_partition_count_is_refused() {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let client = client(&server).await;
    JetStreamLog::open(client.clone(), options(2, 1))
        .await
        .expect("created with 2 partitions");
    assert_eq!(
        stream_config(&client)
            .await
            .metadata
            .get(PARTITIONS_METADATA),
        Some(&"2".to_owned())
    );
    let why = refusal(JetStreamLog::open(client.clone(), options(4, 1)).await);
    assert!(
        why.contains("written with 2 partitions") && why.contains("TALLY_PARTITIONS=2"),
        "{why}"
    );
    JetStreamLog::open(client.clone(), options(2, 1))
        .await
        .expect("the same count opens");
}

/// A stream made before the count was recorded (no metadata): its stored votes say where
/// their polls were put, and a count that puts them elsewhere is refused.
#[tokio::test]
async fn needs_nats_a_stream_without_its_count_is_checked_against_its_votes() {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let client = client(&server).await;
    let js = jetstream::new(client.clone());
    js.create_stream(earlier_stream())
        .await
        .expect("a stream as earlier versions made it");
    // A poll that 3 and 1 partitions put in different places.
    let poll = (0..100)
        .map(|i| format!("poll-{i}"))
        .find(|p| partition_of(p, 3) != 0)
        .expect("a poll off partition 0");
    let log = JetStreamLog::open(client.clone(), options(3, 1))
        .await
        .expect("no votes yet: nothing to check");
    assert!(matches!(
        log.append(&vote(&poll, "u1"), "u1").await.expect("append"),
        Appended::Accepted { .. }
    ));
    let why = refusal(JetStreamLog::open(client.clone(), options(1, 1)).await);
    assert!(
        why.contains(&format!("poll `{poll}`")) && why.contains("TALLY_PARTITIONS=1"),
        "{why}"
    );
    JetStreamLog::open(client.clone(), options(3, 1))
        .await
        .expect("the count the votes were written with opens");
}

#[tokio::test]
async fn needs_nats_a_stream_that_would_take_a_second_vote_is_refused() {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let client = client(&server).await;
    let js = jetstream::new(client.clone());
    let good = earlier_stream();
    let cases = [
        (
            stream::Config {
                max_messages_per_subject: 5,
                ..good.clone()
            },
            "--max-msgs-per-subject 1",
        ),
        (
            stream::Config {
                discard: stream::DiscardPolicy::Old,
                discard_new_per_subject: false,
                ..good.clone()
            },
            "--discard new --discard-per-subject",
        ),
        (
            stream::Config {
                max_age: Duration::from_secs(86_400),
                ..good.clone()
            },
            "--max-age 0",
        ),
        (
            stream::Config {
                subjects: vec!["votes.*.*.*".to_owned()],
                ..good.clone()
            },
            "--subjects 'votes.>'",
        ),
    ];
    for (config, fix) in cases {
        create_votes(&js, config.clone()).await;
        let why = refusal(JetStreamLog::open(client.clone(), options(1, 1)).await);
        assert!(why.contains(fix), "{why}");
        let after = stream_config(&client).await;
        assert_eq!(
            (
                after.max_messages_per_subject,
                after.discard,
                after.max_age,
                after.subjects
            ),
            (
                config.max_messages_per_subject,
                config.discard,
                config.max_age,
                config.subjects
            ),
            "the refused stream is left as it was"
        );
        js.delete_stream("VOTES").await.expect("delete");
    }
    create_votes(&js, good).await;
    JetStreamLog::open(client.clone(), options(1, 1))
        .await
        .expect("the right shape opens");
}

/// One server keeps one copy: a service asking for three refuses the stream and the bucket
/// it finds, naming the command that scales them.
#[tokio::test]
async fn needs_nats_fewer_replicas_than_asked_for_are_refused() {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let client = client(&server).await;
    JetStreamLog::open(client.clone(), options(1, 1))
        .await
        .expect("created with one replica");
    let why = refusal(JetStreamLog::open(client.clone(), options(1, 3)).await);
    assert!(
        why.contains("1 replica(s)") && why.contains("--replicas 3"),
        "{why}"
    );
    KvRegistry::open_replicated(client.clone(), 1)
        .await
        .expect("bucket created with one replica");
    let why = refusal(KvRegistry::open_replicated(client.clone(), 3).await);
    assert!(
        why.contains("KV_POLLS --replicas 3") && why.contains("TALLY_REPLICAS=1"),
        "{why}"
    );
    assert_eq!(
        stream_config(&client).await.num_replicas,
        1,
        "left as it was"
    );
}
