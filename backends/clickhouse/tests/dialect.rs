//! Every migration and every statement the services send to ClickHouse runs on the current
//! ClickHouse engine (chdb, in-process) — the 18.16 server of the rest of the suite proves
//! the old dialect, this proves the new one, so SQL only one of them accepts fails a test.

use std::process::Command;

use tally_clickhouse::sql;

#[test]
fn needs_chdb_statements_run_on_current_clickhouse() {
    tally_testkit::require!(Chdb);
    let statements: Vec<serde_json::Value> = sql::all_for_check()
        .into_iter()
        .map(|(name, sql)| serde_json::json!({"name": name, "sql": sql}))
        .collect();
    let file = tempfile::NamedTempFile::new().expect("temp file");
    let document = serde_json::json!({"database": "tally_dialect", "statements": statements});
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
