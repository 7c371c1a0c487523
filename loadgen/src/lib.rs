//! `tally-loadgen`: drives vote traffic at any deployment over its public HTTP API, the way
//! careful clients do, and checks what the deployment made of it.
//!
//! Every vote has its own `vote_id`. A vote whose outcome is unknown (the connection died,
//! a timeout, 408, 429 or a 5xx) is sent again, unchanged, until it gets an answer, so the
//! run ends knowing exactly which votes were accepted (the ground truth, `--truth`). Then it
//! waits until the results count exactly those, per poll and option. An SSE subscriber per
//! poll, reconnecting whenever its stream drops, checks that live totals never go back and
//! end at the truth, and measures how long an accepted vote takes to show.
//!
//! [`run`] does all of that in-process and returns a [`Report`]: the [`Summary`] and the
//! failures. The `tally-loadgen` binary prints it; the end-to-end tests read it.

pub mod baseline;
mod breakdown;
pub mod fanout;
mod load;
mod mix;
mod report;
mod truth;
mod vote;
mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use serde::de::IntoDeserializer;
use serde::Deserialize;
use tally_core::poll::Dedupe;

pub use mix::SegmentMix;
pub use report::{BreakdownMs, LatencyMs, Report, Summary, VisibleMs};
pub use watch::LiveSummary;

/// What to load, how hard, and what to check. A test builds it with
/// `LoadgenArgs::try_parse_from(["tally-loadgen", "--url", …])`.
#[derive(Parser, Clone, Debug)]
#[command(name = "tally-loadgen")]
pub struct LoadgenArgs {
    /// Base URL votes go to (ingest, or a standalone process). Several, comma-separated:
    /// requests rotate over them, and a retry goes to the next one.
    #[arg(long, default_value = "http://127.0.0.1:8080", value_delimiter = ',')]
    url: Vec<String>,
    /// Base URL of the query service, for creating polls and reading results; the first
    /// `--url` when not given.
    #[arg(long)]
    query_url: Option<String>,
    /// Admin API key, for creating the polls the load goes to.
    #[arg(long, env = "TALLY_ADMIN_KEY", hide_env_values = true)]
    admin_key: String,
    /// Target votes per second; 0 sends as fast as the deployment answers.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Stop after sending this many votes, if that comes before `--duration` ends.
    #[arg(long)]
    votes: Option<u64>,
    /// Polls the votes are spread over.
    #[arg(long, default_value_t = 4)]
    polls: usize,
    /// Poll ids are `<prefix>-0`, `<prefix>-1`, …; a fresh random prefix by default.
    #[arg(long)]
    poll_prefix: Option<String>,
    /// Share of votes sent by a voter who already voted (expected to get 409 unless
    /// `--dedupe none`).
    #[arg(long, default_value_t = 0.0)]
    repeat_ratio: f64,
    /// The electorate: voters are numbered below this, so once each has voted every
    /// further vote comes from someone who already did. Unbounded when not given.
    #[arg(long)]
    voters: Option<u64>,
    /// The segment values votes carry, with weights: `key=value[:weight],…;key=…`, e.g.
    /// `country=US:5,DE:3,FR:2;device=mobile:7,desktop:3;plan=free,pro`. Keys that are not
    /// standard segment keys become the load polls' own dimensions.
    #[arg(long, default_value = mix::DEFAULT_SEGMENT_MIX)]
    segment_mix: SegmentMix,
    /// The polls' dedupe rule: `per_voter` (one vote per voter) or `none` (every vote
    /// counts; unique voters are counted apart).
    #[arg(long, default_value = "per_voter", value_parser = parse_dedupe)]
    dedupe: Dedupe,
    /// Partitions of the vote log each load poll's votes are spread over (a hot poll's
    /// `spread`; `per_voter` polls only).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    spread: u16,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Votes per NDJSON batch request; 0 sends single votes.
    #[arg(long, default_value_t = 0)]
    batch: usize,
    /// Seconds a vote with an unknown outcome keeps being retried with the same vote_id;
    /// 0 never retries.
    #[arg(long, default_value_t = 300)]
    retry_for: u64,
    /// Seconds to wait, after the load, for every accepted vote to be counted.
    #[arg(long, default_value_t = 120)]
    settle: u64,
    /// Writes the ground truth here as JSON: every accepted vote, and the counts per poll,
    /// option and segment they add up to.
    #[arg(long)]
    truth: Option<PathBuf>,
    /// After the load, time this many breakdown requests of the first poll per shape
    /// (`by=country`, `by=country,device`), one at a time.
    #[arg(long, default_value_t = 0)]
    breakdown_requests: usize,
    /// The breakdowns `--breakdown-requests` times, `;`-separated, each a `by` list.
    #[arg(long, default_value = breakdown::DEFAULT_SHAPES, value_delimiter = ';')]
    breakdown_by: Vec<String>,
    /// With `--breakdown-requests`, time the breakdowns only: no SQL, no exports.
    #[arg(long)]
    breakdowns_only: bool,
    /// The server's process id (on this machine): its resident memory is sampled during the
    /// exports timed with `--breakdown-requests`.
    #[arg(long)]
    server_pid: Option<u32>,
    /// No progress line on stderr while the load runs.
    #[arg(long)]
    quiet: bool,
}

fn parse_dedupe(text: &str) -> Result<Dedupe, String> {
    Dedupe::deserialize(text.into_deserializer())
        .map_err(|_: serde::de::value::Error| format!("`{text}`: expected per_voter or none"))
}

/// Runs the load, then the checks, and reports. `Err` only when the run could not be made
/// (no poll could be created, a breakdown failed); what the deployment did wrong is in
/// [`Report::failures`]. Dropping the future ends the load and its subscribers.
pub async fn run(args: LoadgenArgs) -> anyhow::Result<Report> {
    let Some(first_url) = args.url.first() else {
        bail!("--url needs at least one base URL");
    };
    let query_url = args.query_url.clone().unwrap_or_else(|| first_url.clone());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency.max(1))
        .timeout(Duration::from_secs(30))
        .build()?;
    let run_id = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
    let prefix = args
        .poll_prefix
        .clone()
        .unwrap_or_else(|| format!("lg-{run_id}"));

    let polls = load::create_polls(&http, &query_url, &args, &prefix).await?;
    let watchers = watch::Watchers::start(&http, &query_url, &polls);
    let target = Arc::new(load::Target {
        http: http.clone(),
        urls: args.url.clone(),
        polls: polls.clone(),
        run: run_id,
        mix: args.segment_mix.clone(),
        batch_key: args.admin_key.clone(),
    });
    let mut sent = load::send(target, schedule(&args)).await?;
    let truth = std::mem::take(&mut sent.truth);
    if let Some(path) = &args.truth {
        truth.write(path)?;
    }

    let settle = Duration::from_secs(args.settle);
    let counted = truth::wait_until_counted(&http, &query_url, &truth, settle, sent.started).await;
    // The live streams end at the truth too (they may trail the results briefly); when the
    // results are already wrong there is nothing to wait for.
    let live_wait = if counted.mismatches.is_empty() {
        settle.max(Duration::from_secs(10))
    } else {
        Duration::ZERO
    };
    let live = watchers
        .finish(&truth, std::mem::take(&mut sent.watched_acks), live_wait)
        .await;
    let first_poll = (polls[0].as_str(), truth.polls[&polls[0]].accepted);
    let breakdowns = breakdown::time(
        &http,
        &query_url,
        &args.admin_key,
        first_poll,
        args.breakdown_requests,
        &args.breakdown_by,
    )
    .await?;

    let setup = report::Setup {
        target: args.url.join(","),
        batch: args.batch,
        concurrency: args.concurrency,
    };
    let mut summary = Summary::new(setup, sent, counted, live, breakdowns);
    if args.breakdown_requests > 0 && !args.breakdowns_only {
        let analysts = breakdown::time_analysts(
            &http,
            &query_url,
            &args.admin_key,
            first_poll,
            args.breakdown_requests,
            args.server_pid,
        )
        .await?;
        summary.analysts = Some(analysts);
    }
    Ok(Report::new(summary, polls, args.retry_for))
}

fn schedule(args: &LoadgenArgs) -> load::Schedule {
    load::Schedule {
        rate: args.rate,
        duration: Duration::from_secs(args.duration),
        votes: args.votes,
        per_request: args.batch.max(1) as u64,
        repeat_ratio: args.repeat_ratio,
        voters: args.voters,
        retry_for: Duration::from_secs(args.retry_for),
        keep_votes: args.truth.is_some(),
        concurrency: args.concurrency,
        batch: args.batch > 0,
        progress: !args.quiet,
    }
}

/// CPU time (user + system) this process has used so far, from `/proc/self/stat`; `None`
/// where there is no such file.
pub fn own_cpu_seconds() -> Option<f64> {
    cpu_seconds_of("self")
}

/// Resident memory of `pid` in MiB (`VmRSS` of /proc/<pid>/status).
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The highest resident memory of a process while this lives, sampled every `every`;
/// ends its sampling when dropped.
pub struct PeakRss {
    peak: std::sync::Arc<std::sync::Mutex<Option<f64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PeakRss {
    pub fn sample(pid: u32, every: Duration) -> PeakRss {
        let peak = std::sync::Arc::new(std::sync::Mutex::new(rss_mib(pid)));
        let task = tokio::spawn({
            let peak = peak.clone();
            async move {
                loop {
                    if let Some(now) = rss_mib(pid) {
                        let mut peak = peak.lock().expect("rss lock");
                        *peak = Some(peak.map_or(now, |p: f64| p.max(now)));
                    }
                    tokio::time::sleep(every).await;
                }
            }
        });
        PeakRss { peak, task }
    }

    /// The peak so far, in MiB.
    pub fn peak(&self) -> Option<f64> {
        *self.peak.lock().expect("rss lock")
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// CPU time (user + system) process `pid` (a number, or `self`) has used so far.
pub fn cpu_seconds_of(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces) start with the state (3rd
    // field); utime and stime are the 14th and 15th, in clock ticks of 1/100 s on Linux.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_with_their_defaults() {
        let args =
            LoadgenArgs::try_parse_from(["tally-loadgen", "--admin-key", "k"]).expect("arguments");
        assert_eq!(args.url, ["http://127.0.0.1:8080"]);
        assert_eq!(args.dedupe, Dedupe::PerVoter);
        assert_eq!(args.segment_mix.dimensions(), ["plan"]);
        let schedule = schedule(&args);
        assert_eq!(schedule.per_request, 1);
        assert!(!schedule.keep_votes && schedule.progress);
    }

    #[test]
    fn a_bad_dedupe_rule_is_refused_naming_the_choices() {
        let args = ["tally-loadgen", "--admin-key", "k", "--dedupe", "once"];
        let err = LoadgenArgs::try_parse_from(args).expect_err("refused");
        assert!(err.to_string().contains("per_voter or none"), "{err}");
        let args = ["tally-loadgen", "--admin-key", "k", "--dedupe", "none"];
        let args = LoadgenArgs::try_parse_from(args).expect("accepted");
        assert_eq!(args.dedupe, Dedupe::None);
    }

    #[tokio::test]
    async fn a_deployment_that_does_not_answer_fails_the_run_saying_so() {
        // A port nothing listens on: bound, then released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let args = [
            "tally-loadgen",
            "--admin-key",
            "k",
            "--quiet",
            "--url",
            &url,
        ];
        let args = LoadgenArgs::try_parse_from(args).expect("arguments");
        let err = run(args).await.expect_err("no deployment");
        assert!(format!("{err:#}").contains("creating a poll"), "{err:#}");
    }
}
