//! The warehouse conformance suite against ClickHouse: a private database on the suite's
//! clickhouse-server. Every test here needs one (`needs_clickhouse` in its name).

use std::sync::Arc;

use tally_clickhouse::{ClickHouseConfig, ClickHouseWarehouse};
use tally_conformance as conformance;
use tally_testkit::require;

#[tokio::test]
async fn needs_clickhouse_warehouse_conforms() {
    require!(ClickHouse);
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
