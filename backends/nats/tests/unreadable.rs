//! A poll record the registry cannot read (written by a bug, a newer version, or by hand)
//! must not take the registry down with it: `list` and `watch` leave it out and go on, `get`
//! says it is corrupt, and `replace` — what `PUT /v1/polls/{id}` calls — repairs it.

use std::time::Duration;

use futures::StreamExt;
use tally_conformance::sample_poll;
use tally_core::error::Error;
use tally_core::ports::{PollChange, PollRegistry};
use tally_nats::{KvRegistry, POLLS_BUCKET};
use tally_testkit::{require, NatsServer};

#[tokio::test]
async fn needs_nats_an_unreadable_record_is_skipped_and_can_be_replaced() {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let client = tally_nats::connect(&server.url(), Duration::from_secs(10))
        .await
        .expect("connect");
    let registry = KvRegistry::open(client.clone()).await.expect("registry");
    registry
        .create(&sample_poll("a-good"))
        .await
        .expect("create");
    registry
        .create(&sample_poll("c-good"))
        .await
        .expect("create");
    // What an integration bug once stored: a record whose time is an empty string.
    let kv = async_nats::jetstream::new(client)
        .get_key_value(POLLS_BUCKET)
        .await
        .expect("bucket");
    kv.put(
        "b-broken",
        r#"{"v":1,"id":"b-broken","closes_at":""}"#.into(),
    )
    .await
    .expect("raw put");

    let listed: Vec<String> = registry
        .list(None, 10)
        .await
        .expect("list despite the broken record")
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(listed, ["a-good", "c-good"]);
    assert!(
        matches!(registry.get("b-broken").await, Err(Error::Corrupt { .. })),
        "get of the broken record says it is corrupt"
    );
    let mut watch = registry.watch().await.expect("watch");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let change = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("the watch goes on past the broken record")
            .expect("the watch did not end")
            .expect("no error from the broken record");
        if let PollChange::Put(poll) = change {
            seen.push(poll.id);
        }
    }
    assert_eq!(seen, ["a-good", "c-good"]);

    // The repair: a whole definition written over it; the watch delivers it.
    let repaired = registry
        .replace(&sample_poll("b-broken"))
        .await
        .expect("replace");
    assert!(repaired.version > 0);
    assert_eq!(
        registry
            .get("b-broken")
            .await
            .expect("get")
            .expect("found")
            .id,
        "b-broken"
    );
    let change = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("the repair is watched")
        .expect("watch open")
        .expect("readable");
    assert!(matches!(change, PollChange::Put(poll) if poll.id == "b-broken"));
}
