//! `--breakdown-requests`: after the load, how long breakdowns of the first poll take, one
//! request at a time; and the same for the analysts' routes: `GROUP BY country` through
//! `POST /v1/sql`, and whole exports of the poll (CSV and Parquet), with the server's
//! resident memory during each export when `--server-pid` names it.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Context};
use tally_core::api::BreakdownDoc;

use crate::report::{percentile_ms, BreakdownMs};

/// The breakdown shapes timed unless `--breakdown-by` says otherwise: one dimension, and
/// two.
pub const DEFAULT_SHAPES: &str = "country;country,device";

/// Times `requests` breakdowns of `poll` (which holds `votes` votes) per shape (each a
/// `by` list).
pub async fn time(
    http: &reqwest::Client,
    query_url: &str,
    admin_key: &str,
    (poll, votes): (&str, u64),
    requests: usize,
    shapes: &[String],
) -> anyhow::Result<BTreeMap<String, BreakdownMs>> {
    let mut per_shape = BTreeMap::new();
    if requests == 0 {
        return Ok(per_shape);
    }
    for by in shapes {
        let url = format!("{query_url}/v1/polls/{poll}/breakdown?by={by}");
        let mut took_us = Vec::with_capacity(requests);
        for _ in 0..requests {
            let started = Instant::now();
            let response = http.get(&url).bearer_auth(admin_key).send().await?;
            let status = response.status();
            let body = response.bytes().await?;
            took_us.push(started.elapsed().as_micros() as u64);
            if !status.is_success() {
                bail!(
                    "breakdown by {by} answered {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            let doc: BreakdownDoc = serde_json::from_slice(&body)
                .with_context(|| format!("the breakdown by {by} is not a breakdown"))?;
            if doc.by.join(",") != *by {
                bail!(
                    "asked for a breakdown by {by}, got one by {}",
                    doc.by.join(",")
                );
            }
        }
        took_us.sort_unstable();
        per_shape.insert(
            by.clone(),
            BreakdownMs {
                p50: percentile_ms(&took_us, 0.50),
                p99: percentile_ms(&took_us, 0.99),
                votes,
            },
        );
    }
    Ok(per_shape)
}

/// What the analysts' routes took on the first poll (see the module documentation).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AnalystTimes {
    /// `SELECT country, count(*) … GROUP BY country` through `POST /v1/sql`.
    pub sql_group_by: Option<BreakdownMs>,
    /// Whole exports, by format.
    pub exports: BTreeMap<&'static str, ExportRun>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportRun {
    pub rows: u64,
    pub seconds: f64,
    pub rows_per_s: f64,
    pub bytes: u64,
    /// The server's resident memory before the export and its highest during it (MiB), when
    /// its pid is known.
    pub server_rss_before_mib: Option<f64>,
    pub server_rss_peak_mib: Option<f64>,
}

/// Times `requests` SQL `GROUP BY` queries of `poll` and one export per format.
pub async fn time_analysts(
    http: &reqwest::Client,
    query_url: &str,
    key: &str,
    (poll, votes): (&str, u64),
    requests: usize,
    server_pid: Option<u32>,
) -> anyhow::Result<AnalystTimes> {
    let mut times = AnalystTimes::default();
    if requests == 0 {
        return Ok(times);
    }
    let query = format!(
        "SELECT country, count(*) AS votes FROM ballots WHERE poll_id = '{poll}' GROUP BY country ORDER BY country"
    );
    let mut took_us = Vec::with_capacity(requests);
    for _ in 0..requests {
        let started = Instant::now();
        let response = http
            .post(format!("{query_url}/v1/sql"))
            .bearer_auth(key)
            .json(&serde_json::json!({ "query": query }))
            .send()
            .await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        took_us.push(started.elapsed().as_micros() as u64);
        if !status.is_success() {
            bail!("the SQL GROUP BY answered {status}: {body}");
        }
        let counted: u64 = body["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|row| row[1].as_u64())
            .sum();
        if counted != votes {
            bail!("the SQL GROUP BY counted {counted} votes of {votes}");
        }
    }
    took_us.sort_unstable();
    times.sql_group_by = Some(BreakdownMs {
        p50: percentile_ms(&took_us, 0.50),
        p99: percentile_ms(&took_us, 0.99),
        votes,
    });
    for format in ["csv", "parquet"] {
        use futures::StreamExt;
        let before = server_pid.and_then(crate::rss_mib);
        let sampling =
            server_pid.map(|pid| crate::PeakRss::sample(pid, std::time::Duration::from_millis(20)));
        let started = Instant::now();
        let response = http
            .get(format!(
                "{query_url}/v1/polls/{poll}/export?format={format}"
            ))
            .bearer_auth(key)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("the {format} export answered {}", response.status());
        }
        let mut body = response.bytes_stream();
        let (mut bytes, mut lines) = (0u64, 0u64);
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            bytes += chunk.len() as u64;
            lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        }
        let seconds = started.elapsed().as_secs_f64();
        let peak = sampling.and_then(|sampling| sampling.peak());
        // CSV: a header line and one line per ballot; Parquet is binary, its rows are the
        // poll's ballots (the format tests check that).
        let rows = if format == "csv" {
            lines.saturating_sub(1)
        } else {
            votes
        };
        if format == "csv" && rows != votes {
            bail!("the CSV export held {rows} ballots of {votes}");
        }
        times.exports.insert(
            format,
            ExportRun {
                rows,
                seconds,
                rows_per_s: rows as f64 / seconds.max(1e-9),
                bytes,
                server_rss_before_mib: before,
                server_rss_peak_mib: peak,
            },
        );
    }
    Ok(times)
}
