//! `tally-loadgen` against a deployment, in-process: what it reports agrees with what the
//! deployment counted, in single-vote and NDJSON-batch mode, with repeat voters refused.

use anyhow::{ensure, Context, Result};
use clap::Parser;
use serde_json::Value;
use tally_loadgen::LoadgenArgs;

use crate::cluster::{Cluster, Deployment, ADMIN_KEY};

async fn loadgen(cluster: &Cluster, extra: &[&str]) -> Result<Value> {
    let args = [
        "tally-loadgen",
        "--url",
        &cluster.ingest.url,
        "--query-url",
        &cluster.query.url,
    ]
    .into_iter()
    .chain(["--admin-key", ADMIN_KEY, "--duration", "2", "--polls", "2"])
    .chain(["--repeat-ratio", "0.1", "--quiet"])
    .chain(extra.iter().copied());
    let report = tally_loadgen::run(LoadgenArgs::try_parse_from(args)?)
        .await
        .with_context(|| format!("running tally-loadgen\n{}", cluster.logs()))?;
    let summary = serde_json::to_value(&report.summary)?;
    ensure!(
        report.failures.is_empty(),
        "loadgen failed: {}\n{summary}\n{}",
        report.failures.join("; "),
        cluster.logs()
    );
    Ok(summary)
}

crate::for_each_deployment!(loadgen_reports_what_the_deployment_counted);

async fn loadgen_reports_what_the_deployment_counted(deployment: Deployment) -> Result<()> {
    let cluster = Cluster::start(deployment).await?;
    for extra in [
        &["--concurrency", "8"][..],
        &["--concurrency", "2", "--batch", "50"],
    ] {
        let summary = loadgen(&cluster, extra).await?;
        let accepted = summary["accepted"].as_u64().unwrap_or(0);
        let statuses = &summary["statuses"];
        ensure!(accepted > 50, "too little load got through: {summary}");
        ensure!(
            summary["counted"] == accepted && statuses["202"] == accepted,
            "every accepted vote is counted and reported once: {summary}"
        );
        ensure!(
            statuses["409"].as_u64().unwrap_or(0) > 0,
            "repeat voters are refused: {summary}"
        );
        let sent = summary["votes_sent"].as_u64().unwrap_or(0);
        let by_status: u64 = statuses
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        ensure!(by_status == sent, "every vote has an outcome: {summary}");
        ensure!(
            statuses.get("connection").is_none() && statuses.get("timeout").is_none(),
            "no transport errors: {summary}"
        );
        ensure!(summary["latency_ms"]["p99"].as_f64().unwrap_or(0.0) > 0.0);
        ensure!(
            summary["visible_ms"]["samples"].as_f64().unwrap_or(0.0) > 0.0,
            "the live subscriber saw votes arrive: {summary}"
        );
    }
    Ok(())
}

crate::for_each_deployment!(fanout_sees_every_update_reach_every_client);

/// `tally-loadgen fanout` holds its clients from several source addresses while votes come,
/// and every update it saw reached every client. 150 clients are more than the server lets
/// one address stream (100), so they are all held only if they come from three addresses.
async fn fanout_sees_every_update_reach_every_client(deployment: Deployment) -> Result<()> {
    let cluster = Cluster::start(deployment).await?;
    let args = tally_loadgen::fanout::FanoutArgs {
        query_url: cluster.query.url.clone(),
        ingest_url: Some(cluster.ingest.url.clone()),
        admin_key: ADMIN_KEY.to_owned(),
        clients: 150,
        per_address: 50,
        rate: 300,
        seconds: 2,
        server_pid: None,
        json: true,
    };
    let summary = tally_loadgen::fanout::run(args)
        .await
        .with_context(|| format!("running tally-loadgen fanout\n{}", cluster.logs()))?;
    let shown = serde_json::to_string(&summary)?;
    ensure!(
        summary.clients == 150 && summary.source_addresses == 3,
        "{shown}"
    );
    ensure!(summary.votes_sent >= 600, "the votes went in: {shown}");
    ensure!(
        summary.updates > 0,
        "the totals moved while votes came: {shown}"
    );
    ensure!(
        summary.dropped == 0 && summary.incomplete == 0,
        "every update reached every client: {shown}"
    );
    ensure!(
        summary.events >= summary.updates as u64,
        "each update is at least one event: {shown}"
    );
    ensure!(summary.age_ms.max > 0.0 && summary.age_ms.p99 <= summary.age_ms.max);
    Ok(())
}
