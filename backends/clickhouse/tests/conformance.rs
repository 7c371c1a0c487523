//! The warehouse conformance suite against ClickHouse: a private database on the suite's
//! clickhouse-server for each test. Every test here needs one (`needs_clickhouse` in its
//! name).

use std::sync::Arc;

use tally_clickhouse::{ClickHouseConfig, ClickHouseWarehouse};
use tally_testkit::require;

tally_conformance::warehouse_suite!(needs_clickhouse_warehouse, {
    require!(ClickHouse);
    let clickhouse = tally_testkit::clickhouse()
        .await
        .expect("clickhouse-server");
    let config = ClickHouseConfig {
        url: clickhouse.url.clone(),
        database: tally_testkit::unique_name("conf"),
        user: None,
        password: None,
        // The analyst user of scripts/clickhouse/users.xml, as in production.
        analyst_user: Some("tally_analyst".into()),
        analyst_password: None,
        sharding: None,
        replicated: false,
    };
    let warehouse = ClickHouseWarehouse::new(&config).expect("warehouse");
    (Arc::new(warehouse), ())
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
