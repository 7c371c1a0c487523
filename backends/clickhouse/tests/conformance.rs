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
    };
    let warehouse = ClickHouseWarehouse::new(&config).expect("warehouse");
    (Arc::new(warehouse), ())
});
