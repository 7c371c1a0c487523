//! The outcome of a run: the [`Summary`] (what `--json` prints, field for field), the
//! failures that make the run fail, and the text printout.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::load::Sent;
use crate::truth::Counted;
use crate::watch::LiveSummary;

/// What a run did and saw.
#[derive(Serialize, Debug)]
pub struct Summary {
    pub target: String,
    pub mode: String,
    pub concurrency: usize,
    pub seconds: f64,
    pub requests: u64,
    /// Requests sent again after an unknown outcome.
    pub retried: u64,
    pub votes_sent: u64,
    pub accepted: u64,
    pub accepted_per_s: f64,
    /// The load generator's own CPU time (user + system) while it sent votes: how much of
    /// the machine the client took, where it shares one with the deployment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    /// Votes still without a definite answer when `--retry-for` ran out.
    pub unresolved: u64,
    /// 202 answers that did not name the vote sent.
    pub misacknowledged: u64,
    /// Answers per attempt: HTTP status, or `connection` / `timeout`.
    pub statuses: BTreeMap<String, u64>,
    pub latency_ms: LatencyMs,
    /// From a vote's 202 until the SSE stream of its poll showed a total that includes it.
    pub visible_ms: VisibleMs,
    pub counted: u64,
    /// From the first vote until the results counted every accepted vote.
    pub all_counted_after_s: Option<f64>,
    pub counted_per_s: Option<f64>,
    /// The results equal the accepted votes, per poll and option.
    pub exact: bool,
    pub mismatches: Vec<String>,
    pub live: LiveSummary,
    /// Breakdown request latency of the first poll after the load, per `by`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub breakdown_ms: BTreeMap<String, BreakdownMs>,
    /// The analysts' routes on the first poll after the load (with `--breakdown-requests`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub analysts: Option<crate::breakdown::AnalystTimes>,
}

/// Request latency, from sending a request until its whole answer arrived.
#[derive(Serialize, Debug, Clone, Copy)]
pub struct LatencyMs {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

#[derive(Serialize, Debug, Clone, Copy)]
pub struct VisibleMs {
    pub p50: f64,
    pub p99: f64,
    /// Accepted votes whose showing was seen.
    pub samples: u64,
}

#[derive(Serialize, Debug, Clone, Copy)]
pub struct BreakdownMs {
    pub p50: f64,
    pub p99: f64,
    /// Votes of the poll broken down.
    pub votes: u64,
}

/// How the run was set up, as the summary names it.
pub struct Setup {
    pub target: String,
    pub batch: usize,
    pub concurrency: usize,
}

impl Summary {
    pub fn new(
        setup: Setup,
        mut sent: Sent,
        counted: Counted,
        (live, visible_us): (LiveSummary, Vec<u64>),
        breakdown_ms: BTreeMap<String, BreakdownMs>,
    ) -> Summary {
        sent.latencies_us.sort_unstable();
        let latencies = &sent.latencies_us;
        Summary {
            target: setup.target,
            mode: if setup.batch == 0 {
                "single votes".into()
            } else {
                format!("NDJSON batches of {}", setup.batch)
            },
            concurrency: setup.concurrency,
            seconds: sent.seconds,
            requests: sent.requests,
            retried: sent.retried,
            votes_sent: sent.votes,
            accepted: sent.accepted,
            accepted_per_s: sent.accepted as f64 / sent.seconds,
            cpu_seconds: sent.cpu_seconds,
            unresolved: sent.unresolved,
            misacknowledged: sent.misacknowledged,
            statuses: sent
                .answers
                .iter()
                .map(|(answer, count)| (answer.to_string(), *count))
                .collect(),
            latency_ms: LatencyMs {
                p50: percentile_ms(latencies, 0.50),
                p95: percentile_ms(latencies, 0.95),
                p99: percentile_ms(latencies, 0.99),
            },
            visible_ms: VisibleMs {
                p50: percentile_ms(&visible_us, 0.50),
                p99: percentile_ms(&visible_us, 0.99),
                samples: visible_us.len() as u64,
            },
            counted: counted.counted,
            all_counted_after_s: counted.all_counted_after_s,
            counted_per_s: counted
                .all_counted_after_s
                .map(|after| sent.accepted as f64 / after),
            exact: counted.mismatches.is_empty() && sent.unresolved == 0,
            mismatches: counted.mismatches,
            live,
            breakdown_ms,
            analysts: None,
        }
    }
}

/// A run's outcome: what it measured, and what went wrong.
#[derive(Debug)]
pub struct Report {
    pub summary: Summary,
    /// Why the run fails; empty when the deployment did everything right.
    pub failures: Vec<String>,
    /// The polls the load went to; vote→live latency is measured on the first.
    pub polls: Vec<String>,
}

impl Report {
    pub fn new(summary: Summary, polls: Vec<String>, retry_for_s: u64) -> Report {
        let mut failures = Vec::new();
        if summary.unresolved > 0 {
            failures.push(format!(
                "{} votes never got a definite answer within {retry_for_s}s",
                summary.unresolved
            ));
        }
        if summary.misacknowledged > 0 {
            failures.push(format!(
                "{} acceptances did not name the vote sent",
                summary.misacknowledged
            ));
        }
        if !summary.mismatches.is_empty() {
            failures.push("the results differ from the accepted votes".to_owned());
        }
        if summary.live.went_backwards > 0 {
            failures.push("live totals went backwards".to_owned());
        }
        if !summary.live.ended_at_truth {
            failures.push("the live streams did not end at the accepted counts".to_owned());
        }
        Report {
            summary,
            failures,
            polls,
        }
    }

    /// `Err` naming every failure, when there is one.
    pub fn result(&self) -> anyhow::Result<()> {
        if self.failures.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("{}", self.failures.join("; "))
        }
    }
}

/// The text printout of the summary.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let summary = &self.summary;
        let watched_poll = self.polls.first().map_or("", String::as_str);
        writeln!(f, "target           {} ({})", summary.target, summary.mode)?;
        writeln!(
            f,
            "sent             {} votes in {} requests ({} retries) over {:.1}s, {} in flight",
            summary.votes_sent,
            summary.requests,
            summary.retried,
            summary.seconds,
            summary.concurrency
        )?;
        writeln!(
            f,
            "accepted         {} ({:.0}/s), {} without a definite answer",
            summary.accepted, summary.accepted_per_s, summary.unresolved
        )?;
        writeln!(f, "by status        {:?}", summary.statuses)?;
        if summary.misacknowledged > 0 {
            writeln!(
                f,
                "misacknowledged  {} acceptances named another vote",
                summary.misacknowledged
            )?;
        }
        if let Some(cpu) = summary.cpu_seconds {
            writeln!(
                f,
                "client CPU       {cpu:.1} s ({:.1} µs per accepted vote)",
                cpu * 1e6 / summary.accepted.max(1) as f64
            )?;
        }
        let latency = summary.latency_ms;
        writeln!(
            f,
            "request latency  p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms",
            latency.p50, latency.p95, latency.p99
        )?;
        let visible = summary.visible_ms;
        writeln!(
            f,
            "vote→live        p50 {:.1} ms, p99 {:.1} ms ({} votes seen on the SSE stream of {watched_poll})",
            visible.p50, visible.p99, visible.samples,
        )?;
        writeln!(
            f,
            "live streams     {} events, {} reconnects, {} times backwards, ended at the truth: {}",
            summary.live.events,
            summary.live.reconnects,
            summary.live.went_backwards,
            summary.live.ended_at_truth
        )?;
        match (summary.all_counted_after_s, summary.counted_per_s) {
            (Some(after), Some(rate)) => writeln!(
                f,
                "counted          all {} after {after:.2}s from the first vote: {rate:.0} counted votes/s",
                summary.counted
            )?,
            _ => writeln!(
                f,
                "counted          {} of {} accepted",
                summary.counted, summary.accepted
            )?,
        }
        for (by, took) in &summary.breakdown_ms {
            writeln!(
                f,
                "breakdown        by={by}: p50 {:.1} ms, p99 {:.1} ms over {} votes",
                took.p50, took.p99, took.votes
            )?;
        }
        if let Some(analysts) = &summary.analysts {
            if let Some(took) = &analysts.sql_group_by {
                writeln!(
                    f,
                    "sql group by     country: p50 {:.1} ms, p99 {:.1} ms over {} votes",
                    took.p50, took.p99, took.votes
                )?;
            }
            for (format, run) in &analysts.exports {
                let rss = match (run.server_rss_before_mib, run.server_rss_peak_mib) {
                    (Some(before), Some(peak)) => {
                        format!(", server RSS {before:.0} → peak {peak:.0} MiB")
                    }
                    _ => String::new(),
                };
                writeln!(
                    f,
                    "export           {format}: {} rows in {:.2} s ({:.0} rows/s, {} bytes){rss}",
                    run.rows, run.seconds, run.rows_per_s, run.bytes
                )?;
            }
        }
        if summary.mismatches.is_empty() {
            writeln!(f, "exact            {}", summary.exact)?;
        }
        for mismatch in &summary.mismatches {
            writeln!(f, "MISMATCH         {mismatch}")?;
        }
        Ok(())
    }
}

/// The `p` percentile of microsecond samples, in milliseconds; 0 without samples.
pub fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let index = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    sorted_us[index] as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_read_from_sorted_microseconds() {
        let us: Vec<u64> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(percentile_ms(&us, 0.50), 51.0);
        assert_eq!(percentile_ms(&us, 0.99), 99.0);
        assert_eq!(percentile_ms(&[], 0.99), 0.0);
    }
}
