//! Forged live totals never reach a subscriber that holds the live key: a plain client of
//! the broker publishes totals without a signature, with a made-up one, and with a genuine
//! signature it overheard, moved onto another payload. A subscriber without the key takes
//! them all (the behaviour before signatures, documented in docs/nats/README.md). Every test
//! here needs a nats-server (`needs_nats` in its name).
//!
//! Each client has its own connection, and the server keeps no order between connections:
//! so a test waits until a subscription is registered (probe totals reach it) and until the
//! server has taken one client's messages (a witness received them) before the next client
//! publishes. Then "the first message after the forgeries" is a real statement about them.

use std::time::Duration;

use futures::StreamExt;
use tally_core::poll::{PollKind, PollStatus};
use tally_core::ports::{BoxStream, LiveFeed};
use tally_core::results::Results;
use tally_nats::{connect, NatsLiveFeed, LIVE_PREFIX, SIGNATURE_HEADER};
use tally_testkit::{require, NatsServer};

const KEY: [u8; 32] = [0x5a; 32];
const DELIVERY: Duration = Duration::from_secs(5);
/// The poll of the totals that only show a subscription is registered.
const PROBE_POLL: &str = "probe";

fn totals(poll_id: &str, as_of: u64) -> Results {
    Results {
        poll_id: poll_id.into(),
        kind: PollKind::Single,
        status: PollStatus::Open,
        total_votes: as_of,
        unique_voters: as_of,
        options: Vec::new(),
        rating: None,
        nps: None,
        as_of,
        updated_at: "2026-01-01T00:00:00Z".into(),
        partition: None,
    }
}

/// The next totals other than probes.
async fn next(stream: &mut BoxStream<Results>, what: &str) -> Results {
    let next = async {
        loop {
            let results = stream.next().await.expect("the stream stays open");
            if results.poll_id != PROBE_POLL {
                return results;
            }
        }
    };
    tokio::time::timeout(DELIVERY, next)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing delivered in {DELIVERY:?}"))
}

/// Returns once `stream` is registered with the server: probes published by `publisher`
/// (with the subscriber's key) reach it.
async fn registered(publisher: &NatsLiveFeed, stream: &mut BoxStream<Results>) {
    let deadline = tokio::time::Instant::now() + DELIVERY;
    for as_of in 1.. {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the subscription was not registered in {DELIVERY:?}"
        );
        publisher.publish(&totals(PROBE_POLL, as_of)).await.unwrap();
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), stream.next()).await {
            return;
        }
    }
}

/// What a client without the key can do on `tally.live.<poll>`: plain publishes, with or
/// without a header of its choosing.
struct Forger {
    client: async_nats::Client,
}

impl Forger {
    async fn publish(&self, results: &Results, signature: Option<&str>) {
        let subject = format!("{LIVE_PREFIX}.{}", results.poll_id);
        let payload = serde_json::to_vec(results).unwrap().into();
        match signature {
            Some(signature) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(SIGNATURE_HEADER, signature);
                self.client
                    .publish_with_headers(subject, headers, payload)
                    .await
            }
            None => self.client.publish(subject, payload).await,
        }
        .unwrap();
    }

    /// Overhears a genuine message that `publisher` sends, and returns its signature.
    async fn overhear(&self, publisher: &NatsLiveFeed, genuine: &Results) -> String {
        let mut overheard = self
            .client
            .subscribe(format!("{LIVE_PREFIX}.>"))
            .await
            .unwrap();
        self.client.flush().await.unwrap();
        let deadline = tokio::time::Instant::now() + DELIVERY;
        loop {
            assert!(tokio::time::Instant::now() < deadline, "overheard nothing");
            publisher.publish(genuine).await.unwrap();
            let Ok(Some(message)) =
                tokio::time::timeout(Duration::from_millis(100), overheard.next()).await
            else {
                continue;
            };
            return message
                .headers
                .as_ref()
                .and_then(|headers| headers.get(SIGNATURE_HEADER))
                .expect("a keyed publisher signs")
                .as_str()
                .to_owned();
        }
    }
}

#[tokio::test]
async fn needs_nats_forged_totals_never_reach_a_keyed_subscriber() {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let client = || connect(url.as_str(), DELIVERY);
    let publisher = NatsLiveFeed::new(client().await.unwrap(), Some(KEY));
    let keyed = NatsLiveFeed::new(client().await.unwrap(), Some(KEY));
    let unkeyed = NatsLiveFeed::new(client().await.unwrap(), None);
    let forger = Forger {
        client: client().await.unwrap(),
    };
    let mut keyed_totals = keyed.subscribe().await.unwrap();
    let mut unkeyed_totals = unkeyed.subscribe().await.unwrap();
    registered(&publisher, &mut keyed_totals).await;
    registered(&publisher, &mut unkeyed_totals).await;

    let genuine = totals("p1", 10);
    let stolen = forger.overhear(&publisher, &genuine).await;
    assert_eq!(next(&mut keyed_totals, "genuine, keyed").await, genuine);

    // The forgeries, each of which would freeze the poll's live streams if it got through.
    let frozen = totals("p1", u64::MAX);
    let made_up = format!("v1={}", "00".repeat(32));
    let forgeries: [(&str, Option<&str>); 4] = [
        ("no signature", None),
        ("a made-up signature", Some(&made_up)),
        ("an unreadable signature", Some("v1=not-hex")),
        ("a genuine signature over another payload", Some(&stolen)),
    ];
    for (_, signature) in forgeries {
        forger.publish(&frozen, signature).await;
    }
    // Without the key, everything is taken: the overheard genuine totals (once or more),
    // then every forgery. That the unkeyed subscriber has them shows the server took them,
    // and so handed them to the keyed subscriber's connection too, before what follows.
    for (what, _) in forgeries {
        let mut taken = next(&mut unkeyed_totals, what).await;
        while taken == genuine {
            taken = next(&mut unkeyed_totals, what).await;
        }
        assert_eq!(taken, frozen, "{what}");
    }
    let after = totals("p1", 11);
    publisher.publish(&after).await.unwrap();

    let mut first = next(&mut keyed_totals, "the first message after the forgeries").await;
    while first == genuine {
        first = next(&mut keyed_totals, "the first message after the forgeries").await;
    }
    assert_eq!(first, after, "a forgery reached the keyed subscriber");
    assert_eq!(next(&mut unkeyed_totals, "genuine, unkeyed").await, after);
}

/// A publisher with another key (a service given another TALLY_SECRET) or none (not given
/// one) reaches no keyed subscriber; an unkeyed subscriber takes both.
#[tokio::test]
async fn needs_nats_totals_of_another_key_or_none_reach_only_unkeyed_subscribers() {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let client = || connect(url.as_str(), DELIVERY);
    let publisher = NatsLiveFeed::new(client().await.unwrap(), Some(KEY));
    let other_key_publisher = NatsLiveFeed::new(client().await.unwrap(), Some([0x11; 32]));
    let unkeyed_publisher = NatsLiveFeed::new(client().await.unwrap(), None);
    let keyed = NatsLiveFeed::new(client().await.unwrap(), Some(KEY));
    let unkeyed = NatsLiveFeed::new(client().await.unwrap(), None);
    let mut keyed_totals = keyed.subscribe().await.unwrap();
    let mut unkeyed_totals = unkeyed.subscribe().await.unwrap();
    registered(&publisher, &mut keyed_totals).await;
    registered(&publisher, &mut unkeyed_totals).await;

    let other_key = totals("p2", 1);
    other_key_publisher.publish(&other_key).await.unwrap();
    assert_eq!(
        next(&mut unkeyed_totals, "another key, unkeyed").await,
        other_key
    );
    let unsigned = totals("p2", 2);
    unkeyed_publisher.publish(&unsigned).await.unwrap();
    assert_eq!(
        next(&mut unkeyed_totals, "unsigned, unkeyed").await,
        unsigned
    );

    let signed = totals("p2", 3);
    publisher.publish(&signed).await.unwrap();
    assert_eq!(
        next(
            &mut keyed_totals,
            "the first totals a keyed subscriber takes"
        )
        .await,
        signed
    );
    assert_eq!(next(&mut unkeyed_totals, "signed, unkeyed").await, signed);
}
