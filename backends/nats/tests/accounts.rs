//! The account layout of docs/nats/tally-accounts.conf, on a real nats-server: each of
//! tally's services, as its own user, does every NATS operation it does in production
//! through the permissions the file gives it (whichever service starts first and creates
//! the stream and the bucket), and nobody else publishes votes or live totals: not a client
//! of another account, and not a tally service on a subject that is not its own. Every test
//! here needs a nats-server (`needs_nats` in its name).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use tally_core::poll::Dedupe;
use tally_core::ports::{
    Appended, BoxStream, LiveFeed, PartitionLeases, PollChange, PollRegistry, VoteLog,
};
use tally_core::results::{Results, Tally};
use tally_core::vote::Vote;
use tally_nats::{
    connect, ConnectSettings, JetStreamLog, KvLeases, KvRegistry, LogOptions, NatsLiveFeed,
    VOTES_STREAM,
};
use tally_testkit::{require, NatsAccess, NatsOptions, NatsServer};

/// The file operators are told to use; a change to it is tested here.
const LAYOUT: &str = include_str!("../../../docs/nats/tally-accounts.conf");
/// A client of the same broker that is none of tally's services: in the global account.
const OUTSIDER: &str =
    r#"authorization { users: [{user: outsider, password: outsider-password}] }"#;
const KEY: [u8; 32] = [0x33; 32];
const PATIENCE: Duration = Duration::from_secs(10);
const DELIVERY: Duration = Duration::from_secs(5);
const PARTITIONS: u16 = 2;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Service {
    Ingest,
    Processor,
    Query,
}

impl Service {
    fn user(self) -> &'static str {
        match self {
            Service::Ingest => "tally-ingest",
            Service::Processor => "tally-processor",
            Service::Query => "tally-query",
        }
    }

    /// The environment variable the layout reads the user's password from.
    fn password_variable(self) -> &'static str {
        match self {
            Service::Ingest => "TALLY_NATS_INGEST_PASSWORD",
            Service::Processor => "TALLY_NATS_PROCESSOR_PASSWORD",
            Service::Query => "TALLY_NATS_QUERY_PASSWORD",
        }
    }

    fn password(self) -> String {
        format!("{}-password", self.user())
    }
}

const SERVICES: [Service; 3] = [Service::Ingest, Service::Processor, Service::Query];

async fn start_layout() -> NatsServer {
    NatsServer::start_secured(
        NatsOptions::default(),
        NatsAccess {
            extra_config: Some(format!("{LAYOUT}\n{OUTSIDER}\n")),
            env: SERVICES
                .iter()
                .map(|s| (s.password_variable().to_owned(), s.password()))
                .collect(),
            ..Default::default()
        },
    )
    .await
    .expect("nats-server with the documented layout")
}

fn settings(server: &NatsServer, service: Service) -> ConnectSettings {
    ConnectSettings {
        user: Some(service.user().to_owned()),
        password: Some(service.password()),
        ..ConnectSettings::from_urls(&server.url())
    }
}

/// The permission violations the server reported, quoted in failures: they name the
/// subject a layout forgot.
fn violations(server: &NatsServer) -> String {
    let log = std::fs::read_to_string(server.log_path()).unwrap_or_default();
    log.lines()
        .filter(|line| line.contains("Violation"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What each service opens at start.
#[derive(Default)]
struct Opened {
    ingest: Option<(JetStreamLog, KvRegistry)>,
    processor: Option<(JetStreamLog, KvRegistry, NatsLiveFeed)>,
    query: Option<(KvRegistry, NatsLiveFeed)>,
}

/// Opens `service`'s side; the vote log with `per_stream` partitions to a stream (0: one
/// stream).
async fn open(
    server: &NatsServer,
    service: Service,
    per_stream: u16,
    opened: &mut Opened,
) -> anyhow::Result<()> {
    let client = connect(&settings(server, service), PATIENCE).await?;
    let options = LogOptions {
        partitions: PARTITIONS,
        per_stream,
        ..LogOptions::default()
    };
    match service {
        Service::Ingest => {
            let log = JetStreamLog::open(client.clone(), options).await?;
            opened.ingest = Some((log, KvRegistry::open(client).await?));
        }
        Service::Processor => {
            let log = JetStreamLog::open(client.clone(), options).await?;
            let registry = KvRegistry::open(client.clone()).await?;
            opened.processor = Some((log, registry, NatsLiveFeed::new(client, Some(KEY))));
        }
        Service::Query => {
            let registry = KvRegistry::open(client.clone()).await?;
            opened.query = Some((registry, NatsLiveFeed::new(client, Some(KEY))));
        }
    }
    Ok(())
}

async fn next_change(
    watch: &mut BoxStream<tally_core::Result<PollChange>>,
    poll_id: &str,
) -> anyhow::Result<()> {
    let wanted = async {
        while let Some(change) = watch.next().await {
            if matches!(change?, PollChange::Put(poll) if poll.id == poll_id) {
                return Ok(());
            }
        }
        anyhow::bail!("the watch ended")
    };
    tokio::time::timeout(DELIVERY, wanted).await?
}

fn vote(poll_id: &str, i: usize) -> (Vote, String) {
    let vote = Vote {
        vote_id: format!("v{i}"),
        poll_id: poll_id.into(),
        voter_key: format!("k{i}"),
        choice: vec!["a".into()],
        value: None,
        segment: Default::default(),
        received_at: 1,
    };
    let key = vote.unique_key(Dedupe::PerVoter);
    (vote, key)
}

/// Every NATS operation of the three services, each through its own user, with the vote
/// log laid `per_stream` partitions to a stream.
async fn run_services(server: &NatsServer, first: Service, per_stream: u16) -> anyhow::Result<()> {
    let mut opened = Opened::default();
    open(server, first, per_stream, &mut opened).await?;
    for service in SERVICES.into_iter().filter(|s| *s != first) {
        open(server, service, per_stream, &mut opened).await?;
    }
    let (log, ingest_polls) = opened.ingest.expect("opened");
    let (log_reader, processor_polls, live_out) = opened.processor.expect("opened");
    let (query_polls, live_in) = opened.query.expect("opened");

    // The query service manages polls; ingest and the processor watch and read them.
    let mut ingest_watch = ingest_polls.watch().await?;
    let mut processor_watch = processor_polls.watch().await?;
    let mut query_watch = query_polls.watch().await?;
    let poll = tally_conformance::sample_poll("layout");
    let created = query_polls.create(&poll).await?;
    let updated = query_polls
        .update(&tally_core::poll::Poll {
            title: "T2".into(),
            ..created
        })
        .await?;
    let replaced = query_polls
        .replace(&tally_core::poll::Poll {
            question: "Q2?".into(),
            ..updated
        })
        .await?;
    let listed = query_polls.list(None, 10).await?;
    anyhow::ensure!(listed.len() == 1, "listed {listed:?}");
    anyhow::ensure!(query_polls.get("layout").await? == Some(replaced.clone()));
    for (name, watch) in [
        ("query", &mut query_watch),
        ("ingest", &mut ingest_watch),
        ("processor", &mut processor_watch),
    ] {
        next_change(watch, "layout")
            .await
            .map_err(|e| e.context(format!("{name}'s watch")))?;
    }
    anyhow::ensure!(ingest_polls.get("layout").await? == Some(replaced.clone()));
    anyhow::ensure!(processor_polls.get("layout").await? == Some(replaced));
    for registry in [&ingest_polls, &processor_polls, &query_polls] {
        registry.check().await?;
    }

    // Ingest appends (one, a retry, several at once); the processor reads every partition.
    let votes: Vec<(Vote, String)> = (0..4).map(|i| vote("layout", i)).collect();
    let first_vote = log.append(&votes[0].0, &votes[0].1).await?;
    anyhow::ensure!(
        matches!(
            first_vote,
            Appended::Accepted {
                duplicate: false,
                ..
            }
        ),
        "{first_vote:?}"
    );
    let retried = log.append(&votes[0].0, &votes[0].1).await?;
    anyhow::ensure!(
        matches!(
            retried,
            Appended::Accepted {
                duplicate: true,
                ..
            }
        ),
        "a retry reads the stored vote back: {retried:?}"
    );
    for answer in log.append_many(&votes[1..]).await {
        anyhow::ensure!(matches!(answer?, Appended::Accepted { .. }));
    }
    log.check().await?;
    log_reader.check().await?;
    // One reader per partition, each read until a pause (the votes of one poll share one).
    let mut read = 0;
    for partition in 0..PARTITIONS {
        let mut reader = log_reader.reader(partition, 0).await?;
        let mut last = None;
        loop {
            let batch = reader.next_batch(100, Duration::from_secs(1)).await?;
            let Some(entry) = batch.last() else { break };
            last = Some(entry.seq);
            read += batch.len();
        }
        if let Some(seq) = last {
            reader.commit(seq).await?;
        }
    }
    anyhow::ensure!(read == votes.len(), "the processor read {read} votes");

    // The processor publishes live totals; the query service takes them.
    let mut totals = live_in.subscribe().await?;
    let results = Results::new(
        &tally_conformance::sample_poll("layout"),
        &Tally::default(),
        0,
    );
    let delivered = async {
        loop {
            live_out.publish(&results).await?;
            if let Ok(Some(got)) =
                tokio::time::timeout(Duration::from_millis(100), totals.next()).await
            {
                return anyhow::Ok(got);
            }
        }
    };
    let got = tokio::time::timeout(DELIVERY, delivered).await??;
    anyhow::ensure!(got == results);

    // Ingest looks a late retry up without appending.
    anyhow::ensure!(log.find(&votes[0].0, &votes[0].1).await?.is_some());

    // Processors share the partitions through leases (created by the first to start).
    let leases = KvLeases::open(processor_client(server).await?, 1, Duration::from_secs(5)).await?;
    leases.heartbeat("p-1").await?;
    let epoch = leases
        .claim(0, "p-1")
        .await?
        .context("a free partition is claimed")?;
    anyhow::ensure!(epoch > 0 && leases.renew(0, "p-1").await?);
    anyhow::ensure!(leases.owners().await?.get(&0).map(String::as_str) == Some("p-1"));
    leases.release(0, "p-1").await?;

    // A finished poll: the processor marks it and purges its votes from the stream.
    let retention = log_reader.retention().context("the stream purges")?;
    let at = log_reader.partition_of("layout");
    let tip = retention
        .poll_tip("layout", at)
        .await?
        .context("the poll has votes")?;
    let mut finished = processor_polls.get("layout").await?.context("the poll")?;
    finished.closed_at = Some(1);
    finished.log_purged_at = Some(2);
    processor_polls.update(&finished).await?;
    anyhow::ensure!(retention.purge_poll("layout", at, tip).await? == votes.len() as u64);
    anyhow::ensure!(retention.poll_tip("layout", at).await?.is_none());
    Ok(())
}

/// A client of the processor's user.
async fn processor_client(server: &NatsServer) -> anyhow::Result<async_nats::Client> {
    Ok(connect(&settings(server, Service::Processor), PATIENCE).await?)
}

async fn services_work_when_first(first: Service, per_stream: u16) {
    let server = start_layout().await;
    if let Err(err) = run_services(&server, first, per_stream).await {
        panic!(
            "{err:#}\nviolations reported by the server:\n{}",
            violations(&server)
        );
    }
    let violations = violations(&server);
    assert!(
        violations.is_empty(),
        "tally's own operations were refused:\n{violations}"
    );
}

#[tokio::test]
async fn needs_nats_the_layout_carries_ingest_started_first() {
    require!(NatsServer);
    services_work_when_first(Service::Ingest, 0).await;
}

#[tokio::test]
async fn needs_nats_the_layout_carries_the_processor_started_first() {
    require!(NatsServer);
    services_work_when_first(Service::Processor, 0).await;
}

#[tokio::test]
async fn needs_nats_the_layout_carries_the_query_service_started_first() {
    require!(NatsServer);
    services_work_when_first(Service::Query, 0).await;
}

/// The log over two streams, `VOTES` and `VOTES_1` (one partition each): the poll's
/// votes, their read-back, pulls, acks and purge go to `VOTES_1`, which the layout grants
/// too.
#[tokio::test]
async fn needs_nats_the_layout_carries_a_log_over_two_streams() {
    require!(NatsServer);
    let layout = tally_nats::StreamLayout::new(PARTITIONS, 1);
    let at = tally_core::ports::partition_of("layout", PARTITIONS);
    assert_eq!(
        layout.name_of(at),
        "VOTES_1",
        "the test's poll is meant to be in the second stream"
    );
    services_work_when_first(Service::Ingest, 1).await;
}

/// A raw client of `user`, with the permission violations the server sends it.
async fn raw_client(
    server: &NatsServer,
    user: &str,
    password: &str,
) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
    let refused = Arc::new(Mutex::new(Vec::new()));
    let seen = refused.clone();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .event_callback(move |event| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(async_nats::ServerError::Other(text)) = event
                {
                    seen.lock().unwrap().push(text);
                }
            }
        })
        .connect(server.url())
        .await
        .unwrap_or_else(|err| panic!("{user} connects: {err}"));
    (client, refused)
}

async fn stored_votes(log_client: &async_nats::Client) -> u64 {
    let js = async_nats::jetstream::new(log_client.clone());
    let mut stream = js.get_stream(VOTES_STREAM).await.expect("stream info");
    stream.info().await.expect("stream info").state.messages
}

#[tokio::test]
async fn needs_nats_the_layout_keeps_others_off_tallys_subjects() {
    require!(NatsServer);
    let server = start_layout().await;
    let ingest = connect(&settings(&server, Service::Ingest), PATIENCE)
        .await
        .unwrap();
    let log = JetStreamLog::open(ingest.clone(), LogOptions::default())
        .await
        .unwrap();
    let (stored, _) = vote("guarded", 0);
    log.append(&stored, "k0").await.unwrap();
    let before = stored_votes(&ingest).await;
    // Unkeyed, so that even unsigned totals would show.
    let query = connect(&settings(&server, Service::Query), PATIENCE)
        .await
        .unwrap();
    let mut totals = NatsLiveFeed::new(query, None).subscribe().await.unwrap();
    let processor = connect(&settings(&server, Service::Processor), PATIENCE)
        .await
        .unwrap();
    let genuine_feed = NatsLiveFeed::new(processor, Some(KEY));
    let genuine = Results::new(
        &tally_conformance::sample_poll("guarded"),
        &Tally::default(),
        0,
    );
    // The subscription is registered once published totals reach it.
    let registered = async {
        loop {
            genuine_feed.publish(&genuine).await.unwrap();
            if let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(100), totals.next()).await
            {
                return;
            }
        }
    };
    tokio::time::timeout(DELIVERY, registered)
        .await
        .expect("the query service's subscription is registered");

    let forged = serde_json::to_vec(&Results {
        as_of: u64::MAX,
        ..genuine.clone()
    })
    .unwrap();
    let vote_payload = tally_core::wire::encode(&vote("guarded", 1).0);

    // Another account: its publishes stay in its own subject space. It hears itself, so the
    // server has handled them before anything below.
    let (outsider, _) = raw_client(&server, "outsider", "outsider-password").await;
    let mut echo = outsider.subscribe(">").await.unwrap();
    outsider.flush().await.unwrap();
    let heard = async {
        loop {
            outsider
                .publish("votes.0.guarded.k1", vote_payload.clone().into())
                .await
                .unwrap();
            outsider
                .publish("tally.live.guarded", forged.clone().into())
                .await
                .unwrap();
            if let Ok(Some(message)) =
                tokio::time::timeout(Duration::from_millis(100), echo.next()).await
            {
                if message.subject.as_str() == "tally.live.guarded" {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(DELIVERY, heard)
        .await
        .expect("the outsider hears its own publishes");

    // Tally's own users, each on a subject that is another service's: refused by the server.
    let attempts = [
        (Service::Query, "votes.0.guarded.k2"),
        (Service::Processor, "votes.0.guarded.k3"),
        (Service::Ingest, "tally.live.guarded"),
        (Service::Query, "tally.live.guarded"),
        (Service::Ingest, "$KV.POLLS.guarded"),
    ];
    for (service, subject) in attempts {
        let (client, refused) = raw_client(&server, service.user(), &service.password()).await;
        let payload = if subject.starts_with("tally.live.") {
            forged.clone()
        } else {
            vote_payload.clone()
        };
        client.publish(subject, payload.into()).await.unwrap();
        client.flush().await.unwrap();
        tally_testkit::wait_until(
            &format!("{} refused on {subject}", service.user()),
            DELIVERY,
            || {
                let refused = refused.lock().unwrap().join("\n").to_lowercase();
                let expected =
                    format!("permissions violation for publish to \"{subject}\"").to_lowercase();
                async move { anyhow::Ok(refused.contains(&expected)) }
            },
        )
        .await
        .unwrap();
    }

    // Not one of them reached the vote log or the query service.
    assert_eq!(stored_votes(&ingest).await, before, "a vote got in");
    let after = Results {
        as_of: 1,
        ..genuine.clone()
    };
    genuine_feed.publish(&after).await.unwrap();
    let first = async {
        loop {
            let got = totals.next().await.expect("the stream stays open");
            if got != genuine {
                return got;
            }
        }
    };
    let first = tokio::time::timeout(DELIVERY, first)
        .await
        .expect("the genuine totals arrive");
    assert_eq!(first, after, "forged totals reached the query service");
}
