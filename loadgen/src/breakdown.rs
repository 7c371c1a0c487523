//! `--breakdown-requests`: after the load, how long breakdowns of the first poll take, one
//! request at a time.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Context};
use tally_core::api::BreakdownDoc;

use crate::report::{percentile_ms, BreakdownMs};

/// The breakdown shapes timed: one dimension, and two.
const SHAPES: [&str; 2] = ["country", "country,device"];

/// Times `requests` breakdowns of `poll` (which holds `votes` votes) per shape.
pub async fn time(
    http: &reqwest::Client,
    query_url: &str,
    admin_key: &str,
    (poll, votes): (&str, u64),
    requests: usize,
) -> anyhow::Result<BTreeMap<&'static str, BreakdownMs>> {
    let mut per_shape = BTreeMap::new();
    if requests == 0 {
        return Ok(per_shape);
    }
    for by in SHAPES {
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
            if doc.by.join(",") != by {
                bail!(
                    "asked for a breakdown by {by}, got one by {}",
                    doc.by.join(",")
                );
            }
        }
        took_us.sort_unstable();
        per_shape.insert(
            by,
            BreakdownMs {
                p50: percentile_ms(&took_us, 0.50),
                p99: percentile_ms(&took_us, 0.99),
                votes,
            },
        );
    }
    Ok(per_shape)
}
