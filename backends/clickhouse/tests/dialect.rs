//! Every migration and every statement the services send to ClickHouse runs on the current
//! ClickHouse engine (chdb, in-process) — the 18.16 server of the rest of the suite proves
//! the old dialect, this proves the new one, so SQL only one of them accepts fails a test.

use std::process::Command;

use tally_clickhouse::sql;

#[test]
fn needs_chdb_statements_run_on_current_clickhouse() {
    tally_testkit::require!(Chdb);
    check(sql::all_for_check(), None);
}

/// A cluster of two shards, the macros a replicated table's path names, and ClickHouse's
/// in-memory Keeper: enough to create (not to fill) sharded and replicated tables.
const CLUSTER_CONFIG: &str = "<clickhouse>\
    <remote_servers><tally_check>\
    <shard><internal_replication>true</internal_replication>\
    <replica><host>127.0.0.1</host><port>9000</port></replica></shard>\
    <shard><internal_replication>true</internal_replication>\
    <replica><host>127.0.0.2</host><port>9000</port></replica></shard>\
    </tally_check></remote_servers>\
    <macros><shard>01</shard><replica>replica-1</replica></macros>\
    <zookeeper><implementation>testkeeper</implementation></zookeeper>\
    </clickhouse>";

#[test]
fn needs_chdb_sharded_and_replicated_migrations_run_on_current_clickhouse() {
    tally_testkit::require!(Chdb);
    check(
        sql::sharded_for_check("tally_dialect", "tally_check", false),
        Some(CLUSTER_CONFIG),
    );
    check(
        sql::sharded_for_check("tally_dialect", "tally_check", true),
        Some(CLUSTER_CONFIG),
    );
}

/// Runs `statements` through chdb (with a server configuration, when given); fails with
/// every statement it refused.
fn check(statements: Vec<(String, String)>, config: Option<&str>) {
    let statements: Vec<serde_json::Value> = statements
        .into_iter()
        .map(|(name, sql)| serde_json::json!({"name": name, "sql": sql}))
        .collect();
    let file = tempfile::NamedTempFile::new().expect("temp file");
    let document = serde_json::json!({
        "database": "tally_dialect",
        "config": config,
        "statements": statements,
    });
    std::fs::write(file.path(), serde_json::to_vec(&document).expect("json"))
        .expect("write statements");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/chdb_check.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(file.path())
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "statements rejected by current ClickHouse (chdb); install chdb with `python3 -m pip install chdb`\n{stdout}\n{stderr}");
    eprintln!("{stdout}");
}
