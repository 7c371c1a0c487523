//! The back-end conformance suites against the distributed implementations: JetStream for
//! the vote log, key-value registry and live feed (on a private nats-server), ClickHouse for
//! the warehouse (a private database on the suite's server).

use std::sync::Arc;
use std::time::Duration;

use tally_core::clickhouse::{ClickHouseConfig, ClickHouseWarehouse};
use tally_core::conformance;
use tally_core::nats::{self, JetStreamLog, KvRegistry, LogOptions, NatsLiveFeed};
use tally_testkit::NatsServer;

async fn nats_client(server: &NatsServer) -> nats::Client {
    nats::connect(&server.url(), Duration::from_secs(10))
        .await
        .expect("connect to the private nats-server")
}

#[tokio::test]
async fn jetstream_vote_log_conforms() {
    let server = NatsServer::start().await.expect("nats-server");
    let log = JetStreamLog::open(nats_client(&server).await, LogOptions::default())
        .await
        .expect("open log");
    conformance::vote_log(Arc::new(log)).await;
}

#[tokio::test]
async fn partitioned_jetstream_vote_log_conforms() {
    let server = NatsServer::start().await.expect("nats-server");
    let log = JetStreamLog::open(
        nats_client(&server).await,
        LogOptions {
            partitions: 4,
            ..Default::default()
        },
    )
    .await
    .expect("open log");
    conformance::vote_log(Arc::new(log)).await;
}

#[tokio::test]
async fn key_value_registry_conforms() {
    let server = NatsServer::start().await.expect("nats-server");
    let registry = KvRegistry::open(nats_client(&server).await)
        .await
        .expect("open registry");
    conformance::poll_registry(Arc::new(registry)).await;
}

#[tokio::test]
async fn nats_live_feed_conforms() {
    let server = NatsServer::start().await.expect("nats-server");
    conformance::live_feed(Arc::new(NatsLiveFeed::new(nats_client(&server).await))).await;
}

#[tokio::test]
async fn clickhouse_warehouse_conforms() {
    let clickhouse = tally_testkit::clickhouse()
        .await
        .expect("clickhouse-server");
    let config = ClickHouseConfig {
        url: clickhouse.url.clone(),
        database: tally_testkit::unique_name("conf"),
        user: None,
        password: None,
    };
    conformance::warehouse(Arc::new(
        ClickHouseWarehouse::new(&config).expect("warehouse"),
    ))
    .await;
}

/// Past the broker's duplicate window a retry is caught by the one-message-per-subject
/// limit instead; it must still resolve to the original entry, not to `AlreadyVoted`.
#[tokio::test]
async fn jetstream_retry_after_the_duplicate_window_gets_the_original() {
    use tally_core::backend::{Appended, VoteLog};
    use tally_core::poll::Dedupe;
    use tally_core::vote::Vote;

    let server = NatsServer::start().await.expect("nats-server");
    let options = LogOptions {
        duplicate_window: Duration::from_secs(1),
        ..Default::default()
    };
    let log = JetStreamLog::open(nats_client(&server).await, options)
        .await
        .expect("open log");
    let vote = Vote {
        vote_id: "late-retry".into(),
        poll_id: "window".into(),
        voter_key: "k".into(),
        choice: vec!["a".into()],
        value: None,
        segment: Default::default(),
        received_at: 1,
    };
    let key = vote.unique_key(Dedupe::PerVoter);
    let Ok(Appended::Accepted {
        seq,
        duplicate: false,
    }) = log.append(&vote, &key).await
    else {
        panic!("the first append is accepted");
    };
    // The broker forgets message ids once the window has passed (it sweeps once per window).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        log.append(&vote, &key).await.expect("append"),
        Appended::Accepted {
            seq,
            duplicate: true
        }
    );
    let other = Vote {
        vote_id: "another".into(),
        ..vote.clone()
    };
    assert_eq!(
        log.append(&other, &key).await.expect("append"),
        Appended::AlreadyVoted
    );
}
