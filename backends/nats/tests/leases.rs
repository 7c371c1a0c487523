//! Partition leases on a private nats-server: one holder at a time, epochs that only grow,
//! renewal by the holder only, release and expiry free a lease, a restarted member takes
//! its own lease back at once, and processors must agree on the ttl. Every test here needs
//! a nats-server (`needs_nats`).

use std::collections::BTreeMap;
use std::time::Duration;

use tally_core::ports::PartitionLeases;
use tally_nats::{self as nats, KvLeases};
use tally_testkit::{require, NatsServer};

async fn leases(server: &NatsServer, ttl: Duration) -> tally_core::Result<KvLeases> {
    let client = nats::connect(&server.url(), Duration::from_secs(10))
        .await
        .expect("connect to the private nats-server");
    KvLeases::open(client, 1, ttl).await
}

#[tokio::test]
async fn needs_nats_a_lease_has_one_holder_and_moves_on_release_or_expiry() {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let ttl = Duration::from_secs(2);
    let a = leases(&server, ttl).await.expect("open");
    let b = leases(&server, ttl).await.expect("open");

    let first = a.claim(0, "a").await.expect("claim").expect("free");
    assert_eq!(b.claim(0, "b").await.expect("claim"), None, "held by a");
    let other = b.claim(1, "b").await.expect("claim").expect("free");
    assert!(other > first, "epochs grow across partitions");
    assert!(a.renew(0, "a").await.expect("renew"));
    assert!(!b.renew(0, "b").await.expect("renew"), "b never held 0");
    assert_eq!(
        a.owners().await.expect("owners"),
        BTreeMap::from([(0, "a".to_owned()), (1, "b".to_owned())])
    );
    assert_eq!(
        a.heartbeat("a").await.expect("heartbeat"),
        vec!["a".to_owned()]
    );
    assert_eq!(
        b.heartbeat("b").await.expect("heartbeat"),
        vec!["a".to_owned(), "b".to_owned()]
    );

    a.release(0, "a").await.expect("release");
    let taken = b.claim(0, "b").await.expect("claim").expect("released");
    assert!(taken > other);
    assert!(!a.renew(0, "a").await.expect("renew"), "a let it go");

    // b stops renewing: after the ttl its leases (and its presence) are gone.
    tokio::time::sleep(ttl + Duration::from_millis(1_500)).await;
    let after = a.claim(0, "a").await.expect("claim").expect("expired");
    assert!(after > taken, "a claim after expiry has a newer epoch");
    assert!(
        !b.renew(0, "b").await.expect("renew"),
        "an expired lease is lost"
    );
    assert_eq!(
        a.heartbeat("a").await.expect("heartbeat"),
        vec!["a".to_owned()],
        "b's presence expired too"
    );
}

#[tokio::test]
async fn needs_nats_a_restarted_member_takes_its_own_lease_back() {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    let ttl = Duration::from_secs(30);
    let before = leases(&server, ttl).await.expect("open");
    let epoch = before.claim(3, "p-1").await.expect("claim").expect("free");
    drop(before);
    // The same member after a restart: a new handle that knows nothing of the old one.
    let after = leases(&server, ttl).await.expect("open");
    let again = after
        .claim(3, "p-1")
        .await
        .expect("claim")
        .expect("its own");
    assert!(
        again > epoch,
        "taken back with a new epoch, which fences the old one"
    );
    assert_eq!(after.claim(3, "p-2").await.expect("claim"), None);
    assert!(after.renew(3, "p-1").await.expect("renew"));
}

#[tokio::test]
async fn needs_nats_processors_must_agree_on_the_lease_ttl() {
    require!(NatsServer);
    let server = NatsServer::start().await.expect("nats-server");
    leases(&server, Duration::from_secs(10))
        .await
        .expect("open");
    let why = match leases(&server, Duration::from_secs(20)).await {
        Ok(_) => panic!("a different ttl was accepted"),
        Err(err) => err.chain().to_string(),
    };
    assert!(why.contains("TALLY_LEASE_SECONDS"), "{why}");
}
