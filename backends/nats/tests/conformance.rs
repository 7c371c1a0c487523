//! The conformance suites against the NATS back ends, each on a private nats-server:
//! JetStream for the vote log, a key-value bucket for the registry, a core subject for the
//! live feed. Every test here needs a nats-server (`needs_nats` in its name).

use std::sync::Arc;
use std::time::Duration;

use tally_core::error::Chain;
use tally_nats::{self as nats, JetStreamLog, KvRegistry, LogOptions, NatsLiveFeed};
use tally_testkit::{require, NatsServer};

async fn nats_client(server: &NatsServer) -> nats::Client {
    nats::connect(&server.url(), Duration::from_secs(10))
        .await
        .expect("connect to the private nats-server")
}

/// A vote log over 4 partitions of the server's stream.
async fn partitioned_log(server: &NatsServer) -> JetStreamLog {
    let options = LogOptions {
        partitions: 4,
        ..LogOptions::default()
    };
    JetStreamLog::open(nats_client(server).await, options)
        .await
        .expect("open log")
}

// Each test of a suite starts its own nats-server after `require!`, so a machine without one
// skips the test before anything starts.

tally_conformance::vote_log_suite!(needs_nats_jetstream_vote_log, {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let log = JetStreamLog::open(nats_client(&server).await, LogOptions::default())
        .await
        .expect("open log");
    (Arc::new(log), server)
});

tally_conformance::vote_log_suite!(needs_nats_partitioned_jetstream_vote_log, {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let log = partitioned_log(&server).await;
    (Arc::new(log), server)
});

/// A vote log over 4 partitions in two streams (`VOTES`, `VOTES_1`) of two partitions each.
async fn log_over_streams(server: &NatsServer) -> JetStreamLog {
    let options = LogOptions {
        partitions: 4,
        per_stream: 2,
        ..LogOptions::default()
    };
    JetStreamLog::open(nats_client(server).await, options)
        .await
        .expect("open log")
}

tally_conformance::vote_log_suite!(needs_nats_jetstream_vote_log_over_streams, {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let log = log_over_streams(&server).await;
    (Arc::new(log), server)
});

tally_conformance::log_retention_suite!(needs_nats_jetstream_log_retention_over_streams, {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let log = log_over_streams(&server).await;
    (Arc::new(log), server)
});

tally_conformance::log_retention_suite!(needs_nats_partitioned_jetstream_log_retention, {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let log = partitioned_log(&server).await;
    (Arc::new(log), server)
});

tally_conformance::poll_registry_suite!(needs_nats_key_value_registry, {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let registry = KvRegistry::open(nats_client(&server).await)
        .await
        .expect("open registry");
    (Arc::new(registry), server)
});

tally_conformance::live_feed_suite!(needs_nats_live_feed, {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let feed = NatsLiveFeed::new(nats_client(&server).await, None);
    (Arc::new(feed), server)
});

tally_conformance::live_feed_suite!(needs_nats_signed_live_feed, {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let feed = NatsLiveFeed::new(nats_client(&server).await, Some([42; 32]));
    (Arc::new(feed), server)
});

/// Votes sent together while the broker is down fail at once rather than wait for acks;
/// once it is back they are stored, and the votes stored before it went down answer as the
/// originals when sent again (the per-subject limit, then the stored message).
#[tokio::test]
async fn needs_nats_jetstream_appends_many_across_a_broker_restart() {
    require!(NatsServer);
    use tally_core::poll::Dedupe;
    use tally_core::ports::{Appended, VoteLog};
    use tally_core::vote::Vote;

    let mut server = NatsServer::start().await.expect("nats-server");
    let client = nats_client(&server).await;
    let log = JetStreamLog::open(client.clone(), LogOptions::default())
        .await
        .expect("open log");
    let votes = |from: usize| -> Vec<(Vote, String)> {
        (from..from + 20)
            .map(|i| {
                let vote = Vote {
                    vote_id: format!("restart-{i}"),
                    poll_id: "restart".into(),
                    voter_key: format!("k{i}"),
                    choice: vec!["a".into()],
                    value: None,
                    segment: Default::default(),
                    received_at: 1,
                };
                let key = vote.unique_key(Dedupe::PerVoter);
                (vote, key)
            })
            .collect()
    };
    let before = votes(0);
    let stored: Vec<u64> = log
        .append_many(&before)
        .await
        .into_iter()
        .map(|answer| match answer {
            Ok(Appended::Accepted {
                seq,
                duplicate: false,
            }) => seq,
            other => panic!("a new vote is accepted, got {other:?}"),
        })
        .collect();

    server.kill().await;
    tally_testkit::wait_until(
        "the client sees the broker gone",
        Duration::from_secs(10),
        || {
            let state = client.connection_state();
            async move { anyhow::Ok(state != async_nats::connection::State::Connected) }
        },
    )
    .await
    .expect("disconnected");
    let during = votes(100);
    for answer in log.append_many(&during).await {
        let err = answer.expect_err("no vote is accepted while the broker is down");
        let text = Chain(&err).to_string();
        assert!(text.contains("not connected"), "{text}");
    }

    server.restart().await.expect("restart nats-server");
    tally_testkit::wait_until("the client reconnects", Duration::from_secs(20), || {
        let state = client.connection_state();
        async move { anyhow::Ok(state == async_nats::connection::State::Connected) }
    })
    .await
    .expect("reconnected");
    for answer in log.append_many(&during).await {
        assert!(
            matches!(
                answer,
                Ok(Appended::Accepted {
                    duplicate: false,
                    ..
                })
            ),
            "a vote refused while the broker was down is stored after, got {answer:?}"
        );
    }
    let again = log.append_many(&before).await;
    for (answer, seq) in again.into_iter().zip(stored) {
        assert_eq!(
            answer.expect("append"),
            Appended::Accepted {
                seq,
                duplicate: true
            },
            "a vote stored before the restart answers as the original"
        );
    }
}
