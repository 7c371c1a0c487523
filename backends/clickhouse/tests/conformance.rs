//! The warehouse conformance suite against ClickHouse: a private database on the suite's
//! clickhouse-server for each test. Every test here needs one (`needs_clickhouse` in its
//! name).

use std::collections::BTreeMap;
use std::sync::Arc;

use tally_clickhouse::{ClickHouseConfig, ClickHouseWarehouse};
use tally_testkit::require;

/// A warehouse in a private database (named from `prefix`) on the suite's
/// clickhouse-server, read by the analyst user of scripts/clickhouse/users.xml, as in
/// production.
async fn one_server_warehouse(prefix: &str) -> ClickHouseWarehouse {
    ClickHouseWarehouse::new(&one_server_config(prefix).await).expect("warehouse")
}

/// The configuration of [`one_server_warehouse`].
async fn one_server_config(prefix: &str) -> ClickHouseConfig {
    let clickhouse = tally_testkit::clickhouse()
        .await
        .expect("clickhouse-server");
    config_at(&clickhouse.url, prefix)
}

/// A warehouse's configuration: a private database named from `prefix` on the server at
/// `url`, read by the analyst user of scripts/clickhouse/users.xml, not sharded.
fn config_at(url: &str, prefix: &str) -> ClickHouseConfig {
    ClickHouseConfig {
        url: url.to_owned(),
        database: tally_testkit::unique_name(prefix),
        user: None,
        password: None,
        analyst_user: Some("tally_analyst".into()),
        analyst_password: None,
        sharding: None,
        replicated: false,
    }
}

tally_conformance::warehouse_suite!(needs_clickhouse_warehouse, {
    require!(ClickHouse);
    (Arc::new(one_server_warehouse("conf").await), ())
});

// The same suite on a warehouse sharded over the two servers of a test cluster: every
// answer read back through the `Distributed` tables (partition 1 lives on the second shard).
tally_conformance::warehouse_suite!(needs_clickhouse_sharded_warehouse, {
    require!(ClickHouseServer);
    let config = sharded_config("conf_sharded", 1).await;
    let warehouse = ClickHouseWarehouse::new(&config).expect("warehouse");
    (Arc::new(warehouse), ())
});

/// A warehouse in a private database (named from `prefix`) sharded over the two servers of
/// the test cluster, read through the server of shard `read_from`.
async fn sharded_config(prefix: &str, read_from: usize) -> ClickHouseConfig {
    let cluster = tally_testkit::clickhouse_cluster()
        .await
        .expect("clickhouse cluster");
    ClickHouseConfig {
        sharding: Some(tally_clickhouse::Sharding {
            cluster: tally_testkit::ClickHouseCluster::NAME.into(),
            shards: cluster.shards.clone(),
        }),
        ..config_at(&cluster.shards[read_from], prefix)
    }
}

/// A poll whose first rollups were written before the cube existed (whole segments only:
/// what a warehouse migrated from an earlier version holds) is broken down from its whole
/// segments, every vote counted; had the cube been read, the first write's votes would be
/// missing.
#[tokio::test]
async fn needs_clickhouse_a_poll_rolled_up_before_the_cube_is_read_whole() {
    use tally_core::analytics::{BreakdownQuery, Dimension};
    use tally_core::ports::Warehouse;
    use tally_core::rollup::{RollupLevel, Rollups};

    require!(ClickHouse);
    let warehouse = one_server_warehouse("precube").await;
    warehouse.migrate().await.expect("migrate");
    let votes: Vec<tally_core::vote::Vote> = (0..20)
        .map(|i| {
            let mut v = tally_conformance::vote(
                "old",
                &format!("v{i}"),
                "",
                "a",
                1_700_000_000_000 + i * 1000,
            );
            v.segment.country = if i % 2 == 0 { "DE" } else { "FR" }.into();
            v
        })
        .collect();
    let rows = |votes: &[tally_core::vote::Vote], covered: u64| {
        let mut rollups = Rollups::default();
        for v in votes {
            rollups.add(v, covered);
        }
        rollups.rows()
    };
    for level in RollupLevel::ALL {
        let mut before = rows(&votes[..10], 10);
        before.retain(|row| row.dims.is_empty());
        warehouse
            .insert_rollups(0, level, &before)
            .await
            .expect("insert whole segments only");
    }
    warehouse
        .insert_rollups(0, RollupLevel::Fresh, &rows(&votes[10..], 20))
        .await
        .expect("insert with the cube");
    let breakdown = warehouse
        .breakdown(&BreakdownQuery {
            poll_id: "old".into(),
            by: vec![Dimension("country".into())],
            ..Default::default()
        })
        .await
        .expect("breakdown");
    assert_eq!(breakdown.as_of, 20);
    let ballots: Vec<(Vec<String>, u64)> = breakdown
        .groups
        .into_iter()
        .map(|g| (g.values, g.ballots))
        .collect();
    assert_eq!(
        ballots,
        [(vec!["DE".to_owned()], 10), (vec!["FR".to_owned()], 10)]
    );
}

/// Breakdowns read rollup rows added up per group and answer list
/// (`RowShape::PerAnswerList`), which gives a group and answer once per distinct answer
/// list of its rows. Over multiple-choice votes whose rows of one group hold many different
/// lists, at both levels, a breakdown by one of the poll's own keys (its cube set) and by
/// that key with a standard one (the whole segments) equals the votes, and the statement
/// read per answer (the fallback for a full result) gives the same sums.
#[tokio::test]
async fn needs_clickhouse_rows_added_up_per_answer_list_equal_the_votes() {
    use std::collections::BTreeMap;

    use tally_clickhouse::sql::{self, RollupSource, RowShape};
    use tally_core::analytics::{BreakdownQuery, Dimension};
    use tally_core::ports::Warehouse;
    use tally_core::rollup::{RollupLevel, Rollups};

    require!(ClickHouse);
    let config = one_server_config("lists").await;
    let warehouse = ClickHouseWarehouse::new(&config).expect("warehouse");
    warehouse.migrate().await.expect("migrate");
    let options = ["a", "b", "c"];
    let votes: Vec<tally_core::vote::Vote> = (0..600u64)
        .map(|i| {
            let mut v = tally_conformance::vote(
                "lists",
                &format!("v{i}"),
                &format!("k{i}"),
                "a",
                1_700_000_000_000 + i as i64 * 1000,
            );
            // The votes of one store in one write of 100 choose one non-empty subset of
            // the options, another in each write: the store's rows hold six lists.
            let subset = (i / 100 + i % 5) % 7 + 1;
            v.choice = (0..3)
                .filter(|bit| subset & (1 << bit) != 0)
                .map(|bit| options[bit].to_owned())
                .collect();
            v.segment.country = if i % 3 == 0 { "DE" } else { "FR" }.into();
            v.segment
                .custom
                .insert("store".into(), format!("s{}", i % 5));
            v
        })
        .collect();
    // Six writes of 100 votes: five settled, the last fresh.
    for (write, chunk) in votes.chunks(100).enumerate() {
        let mut rollups = Rollups::default();
        for (i, v) in chunk.iter().enumerate() {
            rollups.add(v, (write * 100 + i + 1) as u64);
        }
        let level = if write < 5 {
            RollupLevel::Settled
        } else {
            RollupLevel::Fresh
        };
        warehouse
            .insert_rollups(0, level, &rollups.rows())
            .await
            .expect("insert rollups");
    }
    let truth = |by: &[&str]| {
        let mut groups: BTreeMap<Vec<String>, (u64, BTreeMap<String, u64>)> = BTreeMap::new();
        for v in &votes {
            let values = by
                .iter()
                .map(|key| match *key {
                    "country" => v.segment.country.clone(),
                    key => v.segment.custom[key].clone(),
                })
                .collect();
            let group = groups.entry(values).or_default();
            group.0 += 1;
            for option in &v.choice {
                *group.1.entry(option.clone()).or_default() += 1;
            }
        }
        groups
    };
    let query = |by: &[&str]| BreakdownQuery {
        poll_id: "lists".into(),
        by: by.iter().map(|key| Dimension((*key).into())).collect(),
        ..Default::default()
    };
    for by in [&["store"][..], &["store", "country"]] {
        let breakdown = warehouse.breakdown(&query(by)).await.expect("breakdown");
        assert_eq!(breakdown.as_of, 600);
        let got: BTreeMap<Vec<String>, (u64, BTreeMap<String, u64>)> = breakdown
            .groups
            .into_iter()
            .filter(|g| g.ballots > 0)
            .map(|g| {
                let counts = g.counts.into_iter().filter(|(_, n)| *n > 0).collect();
                (g.values, (g.ballots, counts))
            })
            .collect();
        assert_eq!(got, truth(by), "by {by:?}");
    }

    // The two shapes of the statement, side by side, over the store's set.
    let clickhouse = tally_testkit::clickhouse()
        .await
        .expect("clickhouse-server");
    let database = &config.database;
    let set = tally_core::rollup::cube_set(&query(&["store"])).expect("a cube set");
    let source = RollupSource::Cube {
        dims: &set.dims,
        filtered: false,
        compacted: &[],
    };
    let mut sums = Vec::new();
    for shape in [RowShape::PerAnswerList, RowShape::PerAnswer] {
        let mut statement = sql::breakdown_rollups(
            &query(&["store"]),
            source,
            &[(0, 500)],
            &[(0, 600)],
            (None, None),
            shape,
        );
        if shape == RowShape::PerAnswerList {
            // A row per group and answer list, spread here one per answer.
            statement = format!(
                "SELECT g, opt, c FROM ({statement}) ARRAY JOIN arrayConcat([''], answers) \
                 AS opt, arrayConcat([b], v) AS c"
            );
        }
        let body = run_sql(
            &clickhouse.url,
            database,
            &format!("{statement} FORMAT TSV"),
        )
        .await;
        let lines: Vec<&str> = body.lines().collect();
        let mut sum: BTreeMap<(String, String), u64> = BTreeMap::new();
        for line in &lines {
            let mut fields = line.split('\t');
            let (group, answer, count) = (
                fields.next().unwrap().to_owned(),
                fields.next().unwrap().to_owned(),
                fields.next().unwrap().parse::<u64>().unwrap(),
            );
            *sum.entry((group, answer)).or_default() += count;
        }
        sums.push((lines.len(), sum));
    }
    let (per_list, per_answer) = (&sums[0], &sums[1]);
    assert_eq!(per_list.1, per_answer.1, "both shapes add up alike");
    assert_eq!(
        per_answer.0,
        per_answer.1.len(),
        "one row per group and answer"
    );
    assert!(
        per_list.0 > per_answer.0,
        "a group's rows hold several answer lists ({} rows against {})",
        per_list.0,
        per_answer.0
    );
}

/// A breakdown reads the fresh rows after its settled position by the tables' primary key,
/// not every fresh row the poll was ever given: fresh rows are written about once a second
/// and kept, so a statement that read them all slowed with the poll's age (3.7M rows read
/// for a breakdown of 10,000 at 10M votes). One settled write covering 89 writes' votes and
/// 90 fresh writes of 1,000 stores each: the statement over the store's set runs within a
/// row budget of half the fresh rows, and the breakdown equals the votes.
#[tokio::test]
async fn needs_clickhouse_a_breakdown_reads_only_the_fresh_rows_after_the_settled_ones() {
    use tally_clickhouse::sql::{self, RollupSource, RowShape};
    use tally_core::analytics::{BreakdownQuery, Dimension};
    use tally_core::ports::Warehouse;
    use tally_core::rollup::{RollupLevel, Rollups};

    require!(ClickHouse);
    let config = one_server_config("fresh_key").await;
    let warehouse = ClickHouseWarehouse::new(&config).expect("warehouse");
    warehouse.migrate().await.expect("migrate");
    const WRITES: usize = 90;
    const STORES: usize = 1000;
    let votes: Vec<tally_core::vote::Vote> = (0..WRITES * STORES)
        .map(|i| {
            let mut v = tally_conformance::vote(
                "fresh_key",
                &format!("v{i}"),
                &format!("k{i}"),
                ["a", "b"][(i / STORES) % 2],
                1_700_000_000_000 + i as i64,
            );
            v.segment
                .custom
                .insert("store".into(), format!("s{}", i % STORES));
            v
        })
        .collect();
    let mut settled = Rollups::default();
    for (write, chunk) in votes.chunks(STORES).enumerate() {
        let mut fresh = Rollups::default();
        for (i, v) in chunk.iter().enumerate() {
            let seq = (write * STORES + i + 1) as u64;
            fresh.add(v, seq);
            if write < WRITES - 1 {
                settled.add(v, seq);
            }
        }
        warehouse
            .insert_rollups(0, RollupLevel::Fresh, &fresh.rows())
            .await
            .expect("insert fresh rollups");
    }
    warehouse
        .insert_rollups(0, RollupLevel::Settled, &settled.rows())
        .await
        .expect("insert settled rollups");
    let (settled_at, fresh_at) = (((WRITES - 1) * STORES) as u64, (WRITES * STORES) as u64);

    let query = BreakdownQuery {
        poll_id: "fresh_key".into(),
        by: vec![Dimension("store".into())],
        ..Default::default()
    };
    let breakdown = warehouse.breakdown(&query).await.expect("breakdown");
    assert_eq!(breakdown.as_of, fresh_at);
    let mut truth: BTreeMap<String, u64> = BTreeMap::new();
    for v in &votes {
        *truth.entry(v.segment.custom["store"].clone()).or_default() += 1;
    }
    let got: BTreeMap<String, u64> = breakdown
        .groups
        .iter()
        .filter(|g| g.ballots > 0)
        .map(|g| (g.values[0].clone(), g.ballots))
        .collect();
    assert_eq!(got, truth);

    // The statement itself, refused by the server if it reads more rows than allowed, once
    // the server has merged each table's parts into one (as it does in the background): the
    // index skips rows by granules of 8,192 within a part, so many small parts are each read.
    let clickhouse = tally_testkit::clickhouse()
        .await
        .expect("clickhouse-server");
    for table in [
        "segment_cube",
        "segment_cube_fresh",
        "segment_rollups",
        "segment_rollups_fresh",
    ] {
        run_sql(
            &clickhouse.url,
            &config.database,
            &format!("OPTIMIZE TABLE {table} FINAL"),
        )
        .await;
    }
    let set = tally_core::rollup::cube_set(&query).expect("a cube set");
    let statement = sql::breakdown_rollups(
        &query,
        RollupSource::Cube {
            dims: &set.dims,
            filtered: false,
            compacted: &[],
        },
        &[(0, settled_at)],
        &[(0, fresh_at)],
        (None, None),
        RowShape::PerAnswerList,
    );
    let budget = WRITES * STORES / 2;
    let rows = run_sql_within(&clickhouse.url, &config.database, &statement, budget)
        .await
        .unwrap_or_else(|e| panic!("the breakdown read more than {budget} rows: {e}"));
    assert_eq!(rows.lines().count(), STORES * 2, "a row per store and list");

    // Whether the cube holds every write (asked once per poll and process, before its first
    // breakdown) skips to the whole segments older than the cube's oldest by the key, not
    // every whole segment the poll has (the old statement read all of them: 1.2 s at 10M).
    let every_whole_segment =
        "SELECT min(last_seq) FROM segment_rollups_fresh WHERE poll_id = 'fresh_key'";
    assert!(
        run_sql_within(
            &clickhouse.url,
            &config.database,
            every_whole_segment,
            budget
        )
        .await
        .is_err(),
        "the budget is below what reading every fresh whole segment takes"
    );
    let coverage = sql::cube_coverage("fresh_key");
    let uncovered = run_sql_within(&clickhouse.url, &config.database, &coverage, budget)
        .await
        .unwrap_or_else(|e| panic!("the coverage check read more than {budget} rows: {e}"));
    assert_eq!(
        uncovered.trim(),
        "0",
        "the cube holds every write of both levels"
    );
}

/// Runs `sql` in `database` on the server at `url`, which refuses it once it would read
/// more than `budget` rows; the rows as tab-separated text, or the server's refusal.
async fn run_sql_within(
    url: &str,
    database: &str,
    sql: &str,
    budget: usize,
) -> Result<String, String> {
    let response = reqwest::Client::new()
        .post(format!(
            "{url}/?database={database}&max_rows_to_read={budget}&read_overflow_mode=throw"
        ))
        .body(format!("{sql} FORMAT TSV"))
        .send()
        .await
        .expect("send");
    let status = response.status();
    let body = response.text().await.expect("body");
    if status.is_success() {
        Ok(body)
    } else {
        Err(body)
    }
}

/// Runs `sql` in `database` on the server at `url`; the rows as tab-separated text.
async fn run_sql(url: &str, database: &str, sql: &str) -> String {
    reqwest::Client::new()
        .post(format!("{url}/?database={database}"))
        .body(sql.to_owned())
        .send()
        .await
        .expect("send")
        .error_for_status()
        .expect("the statement runs")
        .text()
        .await
        .expect("body")
}

/// A breakdown by one of the poll's own keys reads its set's added-up runs
/// (`Warehouse::compact_sets`) in place of the settled rows they hold: the same answer as
/// the votes before and after each run, a run started only once enough rows came since the
/// last, and a run that never finished (no record) not read. The poll's rollups are written
/// by `partitions` in turn, each numbering its own positions from 1, and each adds up only
/// its own rows. Answers each partition's runs (their `upto`).
async fn added_up_sets_read_alike(
    warehouse: &ClickHouseWarehouse,
    url: &str,
    database: &str,
    partitions: &[u16],
) -> BTreeMap<u16, Vec<u64>> {
    use tally_core::analytics::{BreakdownQuery, Dimension};
    use tally_core::ports::Warehouse;
    use tally_core::rollup::{RollupLevel, Rollups};

    warehouse.migrate().await.expect("migrate");
    const WRITE: u64 = 2_500;
    let votes: Vec<tally_core::vote::Vote> = (0..6 * WRITE)
        .map(|i| {
            let mut v = tally_conformance::vote(
                "compacted",
                &format!("v{i}"),
                &format!("k{i}"),
                ["a", "b", "c"][(i % 3) as usize],
                // Two hours: the set keeps a row per value and hour.
                1_700_000_000_000 + i as i64 * 500,
            );
            v.segment
                .custom
                .insert("store".into(), format!("s{}", i * 7 % 3_000));
            v
        })
        .collect();
    let query = BreakdownQuery {
        poll_id: "compacted".into(),
        by: vec![Dimension("store".into())],
        ..Default::default()
    };
    let sets = vec![("compacted".to_owned(), "store".to_owned())];
    let runs = || async {
        let mut runs: BTreeMap<u16, Vec<u64>> = BTreeMap::new();
        let rows = run_sql(
            url,
            database,
            "SELECT log_partition, upto FROM segment_cube_compactions \
             WHERE poll_id = 'compacted' ORDER BY log_partition, upto",
        )
        .await;
        for line in rows.lines() {
            let (partition, upto) = line.split_once('\t').expect("two columns");
            runs.entry(partition.parse().unwrap())
                .or_default()
                .push(upto.parse().unwrap());
        }
        runs
    };
    // The breakdown equals the first `counted` votes.
    let check = |counted: usize| {
        let mut truth: BTreeMap<String, (u64, BTreeMap<String, u64>)> = BTreeMap::new();
        for v in &votes[..counted] {
            let group = truth.entry(v.segment.custom["store"].clone()).or_default();
            group.0 += 1;
            *group.1.entry(v.choice[0].clone()).or_default() += 1;
        }
        let query = query.clone();
        async move {
            let breakdown = warehouse.breakdown(&query).await.expect("breakdown");
            assert_eq!(breakdown.as_of, counted as u64);
            let got: BTreeMap<String, (u64, BTreeMap<String, u64>)> = breakdown
                .groups
                .into_iter()
                .filter(|g| g.ballots > 0)
                .map(|g| {
                    let counts = g.counts.into_iter().filter(|(_, n)| *n > 0).collect();
                    (g.values[0].clone(), (g.ballots, counts))
                })
                .collect();
            assert_eq!(got, truth, "after {counted} votes");
        }
    };
    // How far each partition's writes go.
    let mut positions: BTreeMap<u16, u64> = BTreeMap::new();
    for (write, chunk) in votes.chunks(WRITE as usize).enumerate() {
        let partition = partitions[write % partitions.len()];
        let position = positions.entry(partition).or_default();
        let mut rollups = Rollups::default();
        for (i, v) in chunk.iter().enumerate() {
            rollups.add(v, *position + i as u64 + 1);
        }
        *position += WRITE;
        let covered = *position;
        let level = if write < 5 {
            RollupLevel::Settled
        } else {
            RollupLevel::Fresh
        };
        warehouse
            .insert_rollups(partition, level, &rollups.rows())
            .await
            .expect("insert rollups");
        if level == RollupLevel::Settled {
            warehouse
                .compact_sets(partition, &sets, covered)
                .await
                .expect("add up");
        }
        let counted = (write + 1) * WRITE as usize;
        check(counted).await;
        if write == 0 {
            // 2,500 rows: enough for a first run.
            assert_eq!(runs().await, BTreeMap::from([(partition, vec![WRITE])]));
            // A run that did not finish: rows without a record, which a read would count
            // twice.
            let statement = tally_clickhouse::sql::compact_set(
                "compacted",
                "store",
                partition,
                None,
                WRITE,
                "unfinished",
            );
            run_sql(url, database, &statement).await;
            check(counted).await;
        }
    }
    runs().await
}

/// Each partition's runs when one partition writes every rollup of the poll: a run starts
/// once the rows since the last run are at least 2,000 and at least as many as that run
/// holds. Every write holds 2,500 rows (a store per vote; the first 5,600 votes in one
/// hour, the rest in the next). First write: a run (2,500 rows). Second: 2,500 more, a run
/// (3,000: every store once). Third: 2,500 < 3,000, none. Fourth: 5,000 since, a run
/// (6,000: every store in both hours). Fifth: 2,500 < 6,000, none.
const ONE_PARTITIONS_RUNS: [u64; 3] = [2_500, 5_000, 10_000];

#[tokio::test]
async fn needs_clickhouse_a_set_added_up_reads_alike() {
    require!(ClickHouse);
    let config = one_server_config("added_up").await;
    let warehouse = ClickHouseWarehouse::new(&config).expect("warehouse");
    let runs = added_up_sets_read_alike(&warehouse, &config.url, &config.database, &[0]).await;
    assert_eq!(runs, BTreeMap::from([(0, ONE_PARTITIONS_RUNS.to_vec())]));
}

/// The same with the poll's rollups written by two partitions in turn (as a poll spread
/// over partitions has them), each numbering its positions from 1: each partition adds up
/// its own rows only, and a breakdown reads each partition's runs and rows as far as its
/// own positions go. Partition 0 writes 1, 3 and 5 (settled), partition 1 writes 2 and 4
/// (settled) and 6 (fresh): each makes a run at its first write (2,500 rows) and at its
/// second (2,500 since ≥ 2,500 held), none at its third.
#[tokio::test]
async fn needs_clickhouse_a_set_of_a_poll_over_two_partitions_added_up_reads_alike() {
    require!(ClickHouse);
    let config = one_server_config("added_up_two").await;
    let warehouse = ClickHouseWarehouse::new(&config).expect("warehouse");
    let runs = added_up_sets_read_alike(&warehouse, &config.url, &config.database, &[0, 1]).await;
    assert_eq!(
        runs,
        BTreeMap::from([(0, vec![2_500, 5_000]), (1, vec![2_500, 5_000])])
    );
}

/// The same on a warehouse sharded over two servers, the poll's partition on the second:
/// the runs are made on that shard, beside the rows they add up, and read through the
/// `Distributed` tables.
#[tokio::test]
async fn needs_clickhouse_sharded_a_set_added_up_reads_alike() {
    require!(ClickHouseServer);
    let cluster = tally_testkit::clickhouse_cluster()
        .await
        .expect("clickhouse cluster");
    let config = sharded_config("added_up_sharded", 0).await;
    let warehouse = ClickHouseWarehouse::new(&config).expect("warehouse");
    let runs = added_up_sets_read_alike(&warehouse, &config.url, &config.database, &[1]).await;
    assert_eq!(runs, BTreeMap::from([(1, ONE_PARTITIONS_RUNS.to_vec())]));
    let local = format!(
        "{}{}",
        config.database,
        tally_clickhouse::SHARD_DATABASE_SUFFIX
    );
    let held = |url: String| {
        let local = local.clone();
        async move {
            run_sql(&url, &local, "SELECT count() FROM segment_cube_compact")
                .await
                .trim()
                .parse::<u64>()
                .unwrap()
        }
    };
    assert_eq!(
        held(cluster.shards[0].clone()).await,
        0,
        "nothing on the first shard"
    );
    assert!(
        held(cluster.shards[1].clone()).await > 0,
        "the runs are on the second"
    );
}
