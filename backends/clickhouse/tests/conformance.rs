//! The warehouse conformance suite against ClickHouse: a private database on the suite's
//! clickhouse-server for each test. Every test here needs one (`needs_clickhouse` in its
//! name).

use std::sync::Arc;

use tally_clickhouse::{ClickHouseConfig, ClickHouseWarehouse};
use tally_testkit::require;

/// A warehouse in a private database (named from `prefix`) on the suite's
/// clickhouse-server, read by the analyst user of scripts/clickhouse/users.xml, as in
/// production.
async fn one_server_warehouse(prefix: &str) -> ClickHouseWarehouse {
    let clickhouse = tally_testkit::clickhouse()
        .await
        .expect("clickhouse-server");
    let config = ClickHouseConfig {
        url: clickhouse.url.clone(),
        database: tally_testkit::unique_name(prefix),
        user: None,
        password: None,
        analyst_user: Some("tally_analyst".into()),
        analyst_password: None,
        sharding: None,
        replicated: false,
    };
    ClickHouseWarehouse::new(&config).expect("warehouse")
}

tally_conformance::warehouse_suite!(needs_clickhouse_warehouse, {
    require!(ClickHouse);
    (Arc::new(one_server_warehouse("conf").await), ())
});

// The same suite on a warehouse sharded over the two servers of a test cluster: every
// answer read back through the `Distributed` tables (partition 1 lives on the second shard).
tally_conformance::warehouse_suite!(needs_clickhouse_sharded_warehouse, {
    require!(ClickHouseServer);
    let cluster = tally_testkit::clickhouse_cluster()
        .await
        .expect("clickhouse cluster");
    let config = ClickHouseConfig {
        url: cluster.shards[1].clone(),
        database: tally_testkit::unique_name("conf_sharded"),
        user: None,
        password: None,
        analyst_user: Some("tally_analyst".into()),
        analyst_password: None,
        sharding: Some(tally_clickhouse::Sharding {
            cluster: tally_testkit::ClickHouseCluster::NAME.into(),
            shards: cluster.shards.clone(),
        }),
        replicated: false,
    };
    let warehouse = ClickHouseWarehouse::new(&config).expect("warehouse");
    (Arc::new(warehouse), ())
});

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
