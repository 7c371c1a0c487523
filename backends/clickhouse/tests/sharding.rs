//! A warehouse sharded over the two servers of a test cluster (tally_testkit's
//! `clickhouse_cluster`): each log partition's rows land on the shard that owns it and
//! nowhere else, everything read back through the `Distributed` tables is what one server
//! holding the same rows answers, the fence works on the shard, and a shard list that does
//! not match the cluster or the rows already written is refused at start.
//! Every test here needs clickhouse-server (`needs_clickhouse`).

use std::collections::BTreeMap;

use tally_clickhouse::{ClickHouseConfig, ClickHouseWarehouse, Sharding, SHARD_DATABASE_SUFFIX};
use tally_core::analyst::SqlLimits;
use tally_core::analytics::{BreakdownQuery, Dimension, TimeseriesQuery};
use tally_core::ports::{StoredVote, Warehouse, WindowRow};
use tally_core::rollup::{RollupLevel, Rollups};
use tally_core::segment::Segment;
use tally_core::vote::Vote;
use tally_core::ErrorKind;
use tally_testkit::{require, ClickHouse, ClickHouseCluster};

/// Partitions 0..4: 0 and 2 on the first shard, 1 and 3 on the second.
const PARTITIONS: u16 = 4;
const VOTES_PER_POLL: u64 = 60;
const T0: i64 = 1_700_000_000_000;

fn poll_of(partition: u16) -> String {
    format!("shard-poll-{partition}")
}

/// The votes of partition `partition`'s poll (a poll lives in one partition), at seqs
/// 1..=60, 7 s apart; answers, countries, plans and voters vary with the seq.
fn votes_of(partition: u16) -> Vec<StoredVote> {
    (1..=VOTES_PER_POLL)
        .map(|seq| {
            let mut segment = Segment {
                country: ["DE", "FR", "US"][(seq % 3) as usize].into(),
                device: if seq % 2 == 0 { "mobile" } else { "desktop" }.into(),
                ..Default::default()
            };
            segment.custom = BTreeMap::from([(
                "plan".to_owned(),
                if seq % 4 == 0 { "pro" } else { "free" }.to_owned(),
            )]);
            let choice = if (seq + u64::from(partition)) % 3 == 0 {
                vec!["a".to_owned(), "b".to_owned()]
            } else {
                vec!["b".to_owned()]
            };
            StoredVote {
                seq,
                vote: Vote {
                    vote_id: format!("v-{partition}-{seq}"),
                    poll_id: poll_of(partition),
                    voter_key: format!("k-{}", seq % 45),
                    choice,
                    value: None,
                    segment,
                    received_at: T0 + seq as i64 * 7_000,
                },
            }
        })
        .collect()
}

/// The 10-second window rows of `votes`, covering the log up to `covered`.
fn windows_of(votes: &[StoredVote], covered: u64) -> Vec<WindowRow> {
    let mut counts: BTreeMap<(String, i64, String), u64> = BTreeMap::new();
    for stored in votes {
        let start = stored.vote.received_at.div_euclid(10_000) * 10;
        for option in &stored.vote.choice {
            *counts
                .entry((stored.vote.poll_id.clone(), start, option.clone()))
                .or_default() += 1;
        }
    }
    counts
        .into_iter()
        .map(|((poll_id, window_start, option), votes)| WindowRow {
            poll_id,
            window_start,
            window_seconds: 10,
            option,
            votes,
            last_seq: covered,
        })
        .collect()
}

fn rollups_of(votes: &[StoredVote], covered: u64) -> Vec<tally_core::rollup::RollupRow> {
    let mut rollups = Rollups::default();
    for stored in votes {
        rollups.add(&stored.vote, covered);
    }
    rollups.rows()
}

/// Writes every partition's rows as a processor would: two batches of votes, windows and
/// fresh rollups, the first half settled.
async fn fill(warehouse: &dyn Warehouse) {
    warehouse.migrate().await.expect("migrate");
    for partition in 0..PARTITIONS {
        let votes = votes_of(partition);
        let (first, rest) = votes.split_at(votes.len() / 2);
        let first_end = first.last().expect("votes").seq;
        for (batch, covered) in [(first, first_end), (rest, VOTES_PER_POLL)] {
            warehouse
                .insert_votes(partition, batch)
                .await
                .expect("insert votes");
            warehouse
                .insert_windows(partition, &windows_of(batch, covered))
                .await
                .expect("insert windows");
            warehouse
                .insert_rollups(partition, RollupLevel::Fresh, &rollups_of(batch, covered))
                .await
                .expect("insert rollups");
        }
        warehouse
            .insert_rollups(
                partition,
                RollupLevel::Settled,
                &rollups_of(first, first_end),
            )
            .await
            .expect("insert settled rollups");
    }
}

fn config(url: &str, database: &str, sharding: Option<Sharding>) -> ClickHouseConfig {
    ClickHouseConfig {
        url: url.to_owned(),
        database: database.to_owned(),
        user: None,
        password: None,
        analyst_user: Some("tally_analyst".into()),
        analyst_password: None,
        sharding,
        replicated: false,
    }
}

fn sharding(shards: &[String]) -> Option<Sharding> {
    Some(Sharding {
        cluster: ClickHouseCluster::NAME.into(),
        shards: shards.to_vec(),
    })
}

async fn cluster() -> &'static ClickHouseCluster {
    tally_testkit::clickhouse_cluster()
        .await
        .expect("clickhouse cluster")
}

fn server(url: &str) -> ClickHouse {
    ClickHouse {
        url: url.to_owned(),
    }
}

/// Everything the services read of a poll (in `partition`), as text to compare.
async fn readings(warehouse: &dyn Warehouse, poll: &str, partition: u16) -> Vec<String> {
    let breakdown = |by: &[&str], from_ms, to_ms| BreakdownQuery {
        poll_id: poll.into(),
        by: by.iter().map(|d| Dimension((*d).into())).collect(),
        filters: vec![],
        from_ms,
        to_ms,
    };
    let mut voters = warehouse.voter_keys(poll).await.expect("voter keys");
    voters.sort();
    let ballots = warehouse.ballots(poll).await.expect("ballots");
    let ballots_as_of = ballots.as_of;
    let (_, mut ballot_rows) = tally_conformance::rows::answer_of(Ok(ballots))
        .await
        .expect("ballot rows");
    // In storage order, which the shards' parallel reads do not keep.
    ballot_rows.sort();
    vec![
        format!("{:?}", warehouse.tally(poll).await.expect("tally")),
        format!(
            "{:?}",
            warehouse
                .breakdown(&breakdown(&["country"], None, None))
                .await
                .expect("breakdown")
        ),
        format!(
            "{:?}",
            warehouse
                .breakdown(&breakdown(
                    &["country", "plan"],
                    Some(T0 + 50_000),
                    Some(T0 + 300_000)
                ))
                .await
                .expect("breakdown in a range")
        ),
        format!(
            "{:?}",
            warehouse
                .timeseries(&TimeseriesQuery {
                    poll_id: poll.into(),
                    step_seconds: 60,
                    from_ms: None,
                    to_ms: None,
                })
                .await
                .expect("timeseries")
        ),
        format!("{voters:?}"),
        format!(
            "{:?}",
            warehouse
                .segment_values(poll, partition)
                .await
                .expect("segment values")
        ),
        format!(
            "{:?}",
            warehouse.window_widths(poll).await.expect("window widths")
        ),
        format!(
            "{:?}",
            warehouse
                .counted_vote(poll, &format!("v-{}-17", &poll[poll.len() - 1..]))
                .await
                .expect("counted vote")
                .map(|stored| (stored.seq, stored.vote.vote_id))
        ),
        format!("ballots as of {ballots_as_of}: {ballot_rows:?}"),
    ]
}

async fn analyst_rows(warehouse: &dyn Warehouse, query: &str) -> Vec<Vec<String>> {
    let answer = warehouse.analyst_sql(query, &SqlLimits::default()).await;
    match tally_conformance::rows::answer_of(answer).await {
        Ok((_, rows)) => rows,
        Err(err) => panic!("{query}: {}", err.chain()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn needs_clickhouse_sharded_rows_land_on_their_shard_and_read_back_exact() {
    require!(ClickHouseServer, ClickHouse);
    let cluster = cluster().await;
    let database = tally_testkit::unique_name("sharded");
    // Read through the second server: any server of the cluster answers for all.
    let sharded = ClickHouseWarehouse::new(&config(
        &cluster.shards[1],
        &database,
        sharding(&cluster.shards),
    ))
    .expect("sharded warehouse");
    let single_url = tally_testkit::clickhouse()
        .await
        .expect("clickhouse-server")
        .url
        .clone();
    let single = ClickHouseWarehouse::new(&config(&single_url, &database, None))
        .expect("one-server warehouse");
    fill(&sharded).await;
    fill(&single).await;

    // Each shard holds exactly the partitions it owns, in every table written by partition.
    let local = format!("{database}{SHARD_DATABASE_SUFFIX}");
    for (index, url) in cluster.shards.iter().enumerate() {
        let owned: Vec<String> = (0..PARTITIONS)
            .filter(|p| usize::from(*p) % ClickHouseCluster::SHARDS == index)
            .map(|p| p.to_string())
            .collect();
        for table in [
            "votes",
            "vote_windows",
            "segment_rollups",
            "segment_rollups_fresh",
            "vote_positions",
        ] {
            let held = server(url)
                .query(&format!(
                    "SELECT DISTINCT log_partition FROM {local}.{table} ORDER BY log_partition"
                ))
                .await
                .expect("a shard's own rows");
            assert_eq!(
                held.lines().collect::<Vec<_>>(),
                owned,
                "{table} on shard {}",
                index + 1
            );
        }
        let votes = server(url)
            .query(&format!("SELECT count() FROM {local}.votes"))
            .await
            .expect("count");
        assert_eq!(
            votes.trim(),
            (VOTES_PER_POLL * owned.len() as u64).to_string()
        );
        let engine = server(url)
            .query(&format!(
                "SELECT engine FROM system.tables WHERE database = '{database}' AND name = 'votes'"
            ))
            .await
            .expect("engine");
        assert_eq!(engine.trim(), "Distributed", "what the services read");
    }

    // Read through the Distributed tables, every answer is the one-server answer, and both
    // are the counts the votes give.
    for partition in 0..PARTITIONS {
        let poll = poll_of(partition);
        let through_shards = readings(&sharded, &poll, partition).await;
        assert_eq!(
            through_shards,
            readings(&single, &poll, partition).await,
            "{poll}"
        );
        let tally = sharded.tally(&poll).await.expect("tally");
        let votes = votes_of(partition);
        let expected_a = votes
            .iter()
            .filter(|v| v.vote.choice.contains(&"a".to_owned()))
            .count() as u64;
        assert_eq!(tally.ballots, VOTES_PER_POLL);
        assert_eq!(tally.counts.get("a"), Some(&expected_a));
        assert_eq!(tally.counts.get("b"), Some(&VOTES_PER_POLL));
        assert_eq!(tally.unique_voters, 45);
        assert_eq!(tally.as_of, VOTES_PER_POLL);
        let marks = sharded.watermarks(partition).await.expect("watermarks");
        assert_eq!(
            (marks.votes, marks.windows, marks.rollups, marks.settled),
            (
                VOTES_PER_POLL,
                VOTES_PER_POLL,
                VOTES_PER_POLL,
                VOTES_PER_POLL / 2
            )
        );
    }

    // Analysts' SQL joins and groups across the shards alike.
    for query in [
        "SELECT poll_id, count(*), count(DISTINCT voter_key) FROM ballots GROUP BY poll_id ORDER BY poll_id",
        "SELECT poll_id, option_id, count(*) AS n FROM answers GROUP BY poll_id, option_id ORDER BY poll_id, option_id",
        "SELECT country, count(*) FROM ballots WHERE poll_id IN ('shard-poll-1', 'shard-poll-2') GROUP BY country ORDER BY country",
    ] {
        let rows = analyst_rows(&sharded, query).await;
        assert!(!rows.is_empty(), "{query}");
        assert_eq!(rows, analyst_rows(&single, query).await, "{query}");
    }
    let per_poll = analyst_rows(
        &sharded,
        "SELECT poll_id, count(*) FROM ballots GROUP BY poll_id ORDER BY poll_id",
    )
    .await;
    assert_eq!(
        per_poll,
        (0..PARTITIONS)
            .map(|p| vec![poll_of(p), VOTES_PER_POLL.to_string()])
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn needs_clickhouse_sharded_an_older_owner_is_fenced_on_its_shard() {
    require!(ClickHouseServer);
    let cluster = cluster().await;
    let database = tally_testkit::unique_name("sharded_fence");
    let open = || {
        ClickHouseWarehouse::new(&config(
            &cluster.shards[0],
            &database,
            sharding(&cluster.shards),
        ))
        .expect("warehouse")
    };
    let old = open();
    old.migrate().await.expect("migrate");
    let new = open();
    // Partition 1 lives on the second shard: the fences are recorded and checked there.
    old.fence(1, 1).await.expect("first owner");
    new.fence(1, 2).await.expect("second owner");
    let votes = votes_of(1);
    match old.insert_votes(1, &votes[..10]).await {
        Ok(()) => panic!("the older owner wrote past the fence"),
        Err(err) => assert_eq!(err.kind(), ErrorKind::Conflict, "{}", err.chain()),
    }
    new.insert_votes(1, &votes[..10])
        .await
        .expect("the owner writes");
    let local = format!("{database}{SHARD_DATABASE_SUFFIX}");
    // One number a shard's server answers about its own rows.
    let on = |shard: usize, sql: String| async move {
        let answer = server(&cluster.shards[shard]).query(&sql).await;
        answer.expect("a shard's own rows").trim().to_owned()
    };
    let counts = [
        on(0, format!("SELECT count() FROM {local}.votes")).await,
        on(1, format!("SELECT count() FROM {local}.votes")).await,
        on(
            1,
            format!("SELECT max(epoch) FROM {local}.partition_fences"),
        )
        .await,
        on(0, format!("SELECT count() FROM {local}.partition_fences")).await,
    ];
    assert_eq!(counts[0], "0", "nothing on the shard that does not own it");
    assert_eq!(counts[1], "10", "the owner's batch once, on its shard");
    assert_eq!(counts[2], "2", "the fence is on the owning shard");
    assert_eq!(counts[3], "0", "and only there");
}

/// The refusal a migration ends with, as text.
async fn refusal(config: ClickHouseConfig) -> String {
    let warehouse = ClickHouseWarehouse::new(&config).expect("warehouse");
    match warehouse.migrate().await {
        Ok(_) => panic!("migrated where it should refuse: {config:?}"),
        Err(err) => {
            assert!(!err.is_transient(), "{}", err.chain());
            err.chain().to_string()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn needs_clickhouse_a_shard_list_that_does_not_fit_is_refused_at_start() {
    require!(ClickHouseServer);
    let cluster = cluster().await;
    let shards = &cluster.shards;
    let database = tally_testkit::unique_name("sharded_refusals");
    let reversed: Vec<String> = shards.iter().rev().cloned().collect();

    let text = refusal(config(&shards[0], &database, sharding(&reversed))).await;
    assert!(
        text.contains("is shard 2 of cluster") && text.contains("listed as shard 1"),
        "{text}"
    );
    let text = refusal(config(&shards[0], &database, sharding(&shards[..1]))).await;
    assert!(text.contains("has 2 shards"), "{text}");
    let text = refusal(config(
        &shards[0],
        &database,
        Some(Sharding {
            cluster: "no_such_cluster".into(),
            shards: shards.clone(),
        }),
    ))
    .await;
    assert!(
        text.contains("knows no cluster `no_such_cluster`"),
        "{text}"
    );

    // A good start records each shard's place; a list that later moves a shard is refused
    // even where the cluster cannot tell (here: the first shard's record says otherwise).
    let good = ClickHouseWarehouse::new(&config(&shards[0], &database, sharding(shards)))
        .expect("warehouse");
    good.migrate().await.expect("migrate");
    good.migrate().await.expect("again: the same layout");
    // Tables made plain are not taken for replicated ones.
    let mut replicated = config(&shards[1], &database, sharding(shards));
    replicated.replicated = true;
    let text = refusal(replicated).await;
    assert!(
        text.contains("are MergeTree, but TALLY_CLICKHOUSE_REPLICATED is true"),
        "{text}"
    );
    let local = format!("{database}{SHARD_DATABASE_SUFFIX}");
    let first = server(&shards[0]);
    first
        .query(&format!("TRUNCATE TABLE {local}.shard_layout"))
        .await
        .expect("truncate");
    first
        .query(&format!(
            "INSERT INTO {local}.shard_layout VALUES (1, 2, now())"
        ))
        .await
        .expect("another layout");
    let text = refusal(config(&shards[0], &database, sharding(shards))).await;
    assert!(text.contains("holds the rows of shard 2 of 2"), "{text}");

    // A sharded database is not opened as one server's, nor one server's as sharded.
    let text = refusal(config(&shards[1], &database, None)).await;
    assert!(text.contains("is sharded"), "{text}");
    let plain = tally_testkit::unique_name("unsharded");
    ClickHouseWarehouse::new(&config(&shards[0], &plain, None))
        .expect("warehouse")
        .migrate()
        .await
        .expect("one server's warehouse");
    let text = refusal(config(&shards[0], &plain, sharding(shards))).await;
    assert!(text.contains("holds an unsharded warehouse"), "{text}");
}
