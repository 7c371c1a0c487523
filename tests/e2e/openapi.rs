//! The OpenAPI document against the server that serves it: schemathesis generates requests
//! for every operation of `tally standalone`'s `/openapi.json` (with an admin key) and checks
//! that none is answered with a 5xx and that every answer fits its documented schema.
//!
//! The two live (SSE) routes are left out: a stream that is found never ends, so
//! schemathesis cannot read its answer; tests/e2e/pipeline.rs and query's router tests
//! check their events.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::cluster::{Cluster, Deployment, ADMIN_KEY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn needs_schemathesis_standalone_conforms_to_its_openapi() -> Result<()> {
    tally_testkit::require!(Schemathesis);
    let cluster = Cluster::start(Deployment::Standalone).await?;
    let schema = format!("{}/openapi.json", cluster.query.url);
    let document: serde_json::Value = cluster.http.get(&schema).send().await?.json().await?;
    ensure!(
        document["openapi"]
            .as_str()
            .unwrap_or("")
            .starts_with("3.1"),
        "not OpenAPI 3.1: {}",
        document["openapi"]
    );
    let hooks = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    let reports = tempfile::tempdir()?;
    let run = tokio::process::Command::new("python3")
        .args(["-m", "schemathesis.cli", "run", &schema])
        .args(["--header", &format!("Authorization: Bearer {ADMIN_KEY}")])
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        // A bounded number of examples per operation keeps the run under a minute or so.
        .args(["--max-examples", "20"])
        .args(["--exclude-path-regex", "/live$"])
        .args(["--request-timeout", "10"])
        .args(["--generation-deterministic"])
        .args(["--report-dir"])
        .arg(reports.path())
        // POST /v1/votes:batch is NDJSON, which the hooks teach schemathesis to write.
        .env("SCHEMATHESIS_HOOKS", "schemathesis_hooks")
        .env("PYTHONPATH", &hooks)
        .env("NO_COLOR", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        // schemathesis keeps its example database in the working directory: not the repo.
        .current_dir(reports.path())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(170), run)
        .await
        .context("schemathesis did not finish in 170 s")?
        .context("running schemathesis")?;
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success(),
        "schemathesis found problems:\n{report}\n--- server log ---\n{}",
        cluster.logs()
    );
    ensure!(
        report.contains("passed"),
        "schemathesis ran no test:\n{report}"
    );
    Ok(())
}
