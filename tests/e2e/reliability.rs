//! The fault suite: votes flow from `tally-loadgen`, run in-process (careful clients that
//! retry a vote whose outcome is unknown with the same vote_id, and record every 202 as the
//! ground truth) while the test breaks one part of the deployment after another. Afterwards the results,
//! breakdowns, time series and the warehouse's vote rows must equal the ground truth
//! exactly, and loadgen's SSE subscribers (connected throughout, reconnecting when a stream
//! drops) must never have seen a total go back and must end at the truth.
//!
//! Counts are scaled for CI; `TALLY_FAULTS_LONG=1` (`scripts/faults --long`) runs the soak
//! variant (≥ 100,000 votes in most scenarios). docs/RELIABILITY.md describes each fault.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use rand::Rng;
use serde_json::{json, Value};
use tally_loadgen::{LoadgenArgs, Report};
use tokio::task::JoinHandle;

use crate::cluster::{option_counts, Cluster, Deployment, Options, ADMIN_KEY};

fn long() -> bool {
    std::env::var("TALLY_FAULTS_LONG").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Votes per second and seconds of load: (CI, long).
fn scale(ci: (u64, u64), soak: (u64, u64)) -> (u64, u64) {
    if long() {
        soak
    } else {
        ci
    }
}

/// How loadgen's polls count.
#[derive(Clone, Copy)]
enum Dedupe {
    /// One vote per voter: fresh voters only.
    PerVoter,
    /// Every vote counts, and a fifth of the votes come from voters who voted before, so
    /// unique voters differ from votes (and are rebuilt from the warehouse after a crash).
    NoneWithRepeats,
    /// One vote per voter, each poll spread over two partitions (`spread: 2`).
    PerVoterSpreadOverTwo,
}

/// A `tally-loadgen` run against a cluster, as a task of the test's runtime; dropping it
/// ends the run.
struct Load {
    run: JoinHandle<Result<Report>>,
    dir: tempfile::TempDir,
    prefix: String,
    polls: usize,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.run.abort();
    }
}

impl Load {
    /// Starts loadgen sending single votes at `rate` per second for `seconds` to `urls`
    /// (rotating; a retry goes to the next one), over `polls` polls.
    async fn start(
        cluster: &Cluster,
        urls: &[&str],
        rate: u64,
        seconds: u64,
        polls: usize,
    ) -> Result<Load> {
        Self::start_counting(cluster, urls, rate, seconds, polls, Dedupe::PerVoter).await
    }

    async fn start_counting(
        cluster: &Cluster,
        urls: &[&str],
        rate: u64,
        seconds: u64,
        polls: usize,
        dedupe: Dedupe,
    ) -> Result<Load> {
        Self::start_with(cluster, urls, (rate, seconds), polls, dedupe, 0).await
    }

    /// Like [`Load::start_counting`], with NDJSON batches of `batch` votes when not 0.
    async fn start_with(
        cluster: &Cluster,
        urls: &[&str],
        (rate, seconds): (u64, u64),
        polls: usize,
        dedupe: Dedupe,
        batch: usize,
    ) -> Result<Load> {
        let dedupe_args: &[&str] = match dedupe {
            Dedupe::PerVoter => &[],
            Dedupe::PerVoterSpreadOverTwo => &["--spread", "2"],
            Dedupe::NoneWithRepeats => &["--dedupe", "none", "--repeat-ratio", "0.2"],
        };
        let dir = tempfile::tempdir()?;
        let prefix = tally_testkit::unique_name("load").replace('_', "-");
        let truth = dir.path().join("truth.json");
        let (urls, rate, seconds) = (urls.join(","), rate.to_string(), seconds.to_string());
        let (polls_arg, batch) = (polls.to_string(), batch.to_string());
        let args = ["tally-loadgen", "--url", &urls]
            .into_iter()
            .chain(["--query-url", &cluster.query.url])
            .chain(["--admin-key", ADMIN_KEY])
            .chain(["--rate", &rate])
            .chain(["--duration", &seconds])
            .chain(["--polls", &polls_arg])
            .chain(["--poll-prefix", &prefix])
            .chain(["--concurrency", "48"])
            .chain(dedupe_args.iter().copied())
            .chain(["--batch", &batch])
            .chain(["--retry-for", "300", "--settle", "300", "--quiet"])
            .chain(["--truth", truth.to_str().context("a UTF-8 temp dir")?]);
        let args = LoadgenArgs::try_parse_from(args)?;
        let mut load = Load {
            run: tokio::spawn(tally_loadgen::run(args)),
            dir,
            prefix,
            polls,
        };
        // Wait until the polls exist and votes are being counted.
        let first = load.poll(0);
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(results) = cluster.results(&first).await {
                if results["total_votes"].as_u64().unwrap_or(0) > 0 {
                    return Ok(load);
                }
            }
            if load.run.is_finished() {
                let outcome = (&mut load.run).await?;
                bail!(
                    "loadgen ended before its votes were counted: {:?}\n{}",
                    outcome.map(|report| report.failures),
                    cluster.logs()
                );
            }
            ensure!(
                tokio::time::Instant::now() < end,
                "loadgen's votes are not being counted\n{}",
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn poll(&self, index: usize) -> String {
        format!("{}-{index}", self.prefix)
    }

    /// Waits for loadgen to finish (it retries until every vote has a definite answer and
    /// then waits until the results count them) and returns its summary and ground truth.
    async fn finish(mut self, cluster: &Cluster) -> Result<(Value, Value)> {
        let report = tokio::time::timeout(Duration::from_secs(900), &mut self.run)
            .await
            .context("loadgen did not finish in 15 minutes")??
            .with_context(|| format!("loadgen\n{}", cluster.logs()))?;
        let summary = serde_json::to_value(&report.summary)?;
        if !report.failures.is_empty() {
            bail!(
                "loadgen failed ({}): {summary}\n{}",
                report.failures.join("; "),
                cluster.logs()
            );
        }
        let truth: Value =
            serde_json::from_slice(&std::fs::read(self.dir.path().join("truth.json"))?)?;
        ensure!(
            summary["unresolved"] == 0 && summary["exact"] == true,
            "loadgen: {summary}"
        );
        ensure!(
            summary["live"]["went_backwards"] == 0 && summary["live"]["ended_at_truth"] == true,
            "live totals: {}",
            summary["live"]
        );
        ensure!(truth["polls"].as_object().map(|p| p.len()) == Some(self.polls));
        Ok((summary, truth))
    }
}

fn truth_counts(doc: &Value) -> BTreeMap<String, u64> {
    doc.as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .filter(|(_, count)| *count > 0)
        .collect()
}

/// Results, breakdowns by country and by plan, time-series sums and (on ClickHouse) the
/// raw vote rows of every poll equal the ground truth.
async fn verify(cluster: &Cluster, truth: &Value) -> Result<()> {
    let mut accepted_ids: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut voters: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for vote in truth["votes"].as_array().context("truth votes")? {
        let poll = vote["poll_id"].as_str().unwrap_or_default();
        accepted_ids
            .entry(poll)
            .or_default()
            .push(vote["vote_id"].as_str().unwrap_or_default());
        voters
            .entry(poll)
            .or_default()
            .insert(vote["voter_id"].as_str().unwrap_or_default());
    }
    for (poll, expected) in truth["polls"].as_object().context("truth polls")? {
        let results = cluster.results(poll).await?;
        ensure!(
            results["total_votes"] == expected["accepted"]
                && option_counts(&results) == truth_counts(&expected["options"]),
            "results of {poll}: {results}\nexpected {expected}"
        );
        let unique = voters.get(poll.as_str()).map_or(0, |v| v.len());
        ensure!(
            results["unique_voters"] == unique,
            "{poll}: {} unique voters counted, {unique} voted",
            results["unique_voters"]
        );
        for dimension in ["country", "plan"] {
            let breakdown = cluster
                .breakdown(
                    &format!("/v1/polls/{poll}/breakdown?by={dimension}"),
                    expected["accepted"].as_u64().context("accepted")?,
                )
                .await?;
            let groups = breakdown["groups"].as_array().cloned().unwrap_or_default();
            let want = expected["segments"][dimension]
                .as_object()
                .context("truth segments")?;
            ensure!(
                groups.len() == want.len(),
                "{poll} by {dimension}: {} groups, expected {}",
                groups.len(),
                want.len()
            );
            for group in &groups {
                let value = group["segment"][dimension].as_str().unwrap_or_default();
                let want = truth_counts(&want[value]);
                ensure!(
                    option_counts(group) == want
                        && group["total_votes"] == want.values().sum::<u64>(),
                    "{poll} {dimension}={value}: {group}\nexpected {want:?}"
                );
            }
        }
        // Window rows are written before the rollups the breakdowns above read; they must
        // add up as well.
        let sums = cluster.timeseries_sums(poll).await?;
        ensure!(
            sums == truth_counts(&expected["options"]),
            "time series of {poll} sums to {sums:?}, expected {}",
            expected["options"]
        );
        if let Some(rows) = cluster
            .clickhouse_query(&format!(
                "SELECT vote_id FROM votes WHERE poll_id = '{poll}' ORDER BY vote_id"
            ))
            .await?
        {
            let rows: Vec<&str> = rows.lines().filter(|l| !l.is_empty()).collect();
            let mut want = accepted_ids.remove(poll.as_str()).unwrap_or_default();
            want.sort_unstable();
            ensure!(
                rows == want,
                "{poll}: the warehouse holds {} vote rows ({} distinct), the truth {}",
                rows.len(),
                rows.iter().collect::<BTreeSet<_>>().len(),
                want.len()
            );
        }
    }
    Ok(())
}

async fn random_pause(from: Duration, to: Duration) {
    let ms = rand::rng().random_range(from.as_millis() as u64..=to.as_millis() as u64);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// SIGKILLs and restarts what processes votes `times` times at random points spread over
/// the first part of a `seconds`-long load.
async fn kill_processor_during(cluster: &Cluster, times: u64, seconds: u64) -> Result<()> {
    let step = Duration::from_millis(seconds * 1000 / (times + 2));
    for _ in 0..times {
        random_pause(step / 2, step).await;
        cluster.restart_processor(&[]).await?;
    }
    Ok(())
}

fn report(what: &str, summary: &Value) {
    eprintln!(
        "{what}: {} accepted, {} requests retried, statuses {}, live {}",
        summary["accepted"], summary["retried"], summary["statuses"], summary["live"]
    );
}

/// 1. kill -9 the processor five times at random points of the load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn needs_nats_clickhouse_processor_killed_five_times() -> Result<()> {
    tally_testkit::require!(NatsServer, ClickHouse);
    let cluster = Cluster::start(Deployment::Distributed).await?;
    let (rate, seconds) = scale((600, 25), (4_000, 35));
    let load = Load::start_counting(
        &cluster,
        &[&cluster.ingest.url],
        rate,
        seconds,
        3,
        Dedupe::NoneWithRepeats,
    )
    .await?;
    kill_processor_during(&cluster, 5, seconds).await?;
    let (summary, truth) = load.finish(&cluster).await?;
    report("processor killed 5 times", &summary);
    verify(&cluster, &truth).await
}

/// 2. The processor crashes again and again at its failpoints: after the raw-vote insert
///    (before the windows), after a rollup insert (before its watermark moves on), and after
///    the inserts, before the log ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn needs_nats_clickhouse_processor_crash_points_hit_repeatedly() -> Result<()> {
    tally_testkit::require!(NatsServer, ClickHouse);
    let cluster = Cluster::start(Deployment::Distributed).await?;
    let (rate, seconds) = scale((500, 25), (3_000, 40));
    let load = Load::start(&cluster, &[&cluster.ingest.url], rate, seconds, 2).await?;
    let mut crashes = 0;
    for point in [
        "after-votes-insert",
        "after-rollups-insert",
        "before-ack",
        "after-votes-insert",
        "after-rollups-insert",
        "before-ack",
    ] {
        cluster
            .restart_processor(&[("TALLY_FAILPOINT", point)])
            .await?;
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        while !cluster.processor_exited().await {
            ensure!(
                tokio::time::Instant::now() < end,
                "the processor never reached {point}\n{}",
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        crashes += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    cluster.restart_processor(&[]).await?;
    let (summary, truth) = load.finish(&cluster).await?;
    report(&format!("{crashes} failpoint crashes"), &summary);
    verify(&cluster, &truth).await
}

/// 3. kill -9 one of two ingest replicas mid-load; the clients' retries go to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn needs_nats_clickhouse_ingest_replica_killed() -> Result<()> {
    tally_testkit::require!(NatsServer, ClickHouse);
    let cluster = Cluster::start(Deployment::Distributed).await?;
    let mut doomed = cluster.spawn_ingest().await?;
    let (rate, seconds) = scale((600, 20), (4_000, 30));
    let load = Load::start(
        &cluster,
        &[&cluster.ingest.url, &doomed.url],
        rate,
        seconds,
        2,
    )
    .await?;
    random_pause(
        Duration::from_secs(seconds / 4),
        Duration::from_secs(seconds / 2),
    )
    .await;
    doomed.kill().await;
    let (summary, truth) = load.finish(&cluster).await?;
    report("ingest replica killed", &summary);
    ensure!(
        summary["retried"].as_u64() > Some(0),
        "the kill left requests to retry: {summary}"
    );
    verify(&cluster, &truth).await
}

/// 4. nats-server is killed and restarted three times under load. While it is down, ingest
///    answers 503 with Retry-After (never 202); no acknowledged vote is lost. JetStream runs
///    with `sync_interval: always`, so an acknowledged vote is on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn needs_nats_clickhouse_nats_restarted_three_times() -> Result<()> {
    tally_testkit::require!(NatsServer, ClickHouse);
    let cluster = Cluster::launch(
        Deployment::Distributed,
        Options {
            nats_sync_always: true,
            ..Default::default()
        },
    )
    .await?;
    cluster
        .create_poll(
            json!({"id": "probe", "title": "Probe", "question": "Q", "kind": "single",
            "dedupe": "none", "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]}),
        )
        .await?;
    let (rate, seconds) = scale((500, 30), (3_500, 40));
    let load = Load::start(&cluster, &[&cluster.ingest.url], rate, seconds, 2).await?;
    // Beside it, NDJSON batches: a batch's votes are published together and wait for
    // their acks together, so an outage catches many in flight at once.
    let batches = Load::start_with(
        &cluster,
        &[&cluster.ingest.url],
        (rate / 2, seconds),
        2,
        Dedupe::PerVoter,
        50,
    )
    .await?;
    let mut probes = 0;
    for round in 0..3 {
        random_pause(Duration::from_secs(3), Duration::from_secs(5)).await;
        cluster.kill_nats().await?;
        let down_until = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < down_until {
            let response = cluster
                .http
                .post(format!("{}/v1/polls/probe/votes", cluster.ingest.url))
                .json(&json!({"choice": "a", "vote_id": format!("probe-{round}-{probes}")}))
                .send()
                .await?;
            let status = response.status();
            let retry_after = response.headers().get("retry-after").cloned();
            ensure!(
                status == 503 && retry_after.is_some(),
                "with NATS down ingest answered {status} (Retry-After {retry_after:?})"
            );
            probes += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cluster.restart_nats().await?;
    }
    let (summary, truth) = load.finish(&cluster).await?;
    report(
        &format!("NATS restarted 3 times ({probes} probes answered 503)"),
        &summary,
    );
    ensure!(
        summary["statuses"]["503"].as_u64() > Some(0),
        "the load saw the outages: {summary}"
    );
    verify(&cluster, &truth).await?;
    let (summary, truth) = batches.finish(&cluster).await?;
    report("NATS restarted 3 times, NDJSON batches of 50", &summary);
    ensure!(
        summary["statuses"]["503"].as_u64() > Some(0),
        "the batch load saw the outages: {summary}"
    );
    verify(&cluster, &truth).await
}

/// 5. ClickHouse is down for 60 s under load: ingest keeps accepting, the processor backs
///    off and catches up, nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn needs_nats_clickhouse_clickhouse_down_for_a_minute() -> Result<()> {
    tally_testkit::require!(NatsServer, ClickHouse);
    let cluster = Cluster::launch(
        Deployment::Distributed,
        Options {
            own_clickhouse: true,
            ..Default::default()
        },
    )
    .await?;
    let outage = Duration::from_secs(60);
    let (rate, seconds) = scale((300, 75), (2_000, 80));
    let load = Load::start(&cluster, &[&cluster.ingest.url], rate, seconds, 2).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.kill_clickhouse().await?;
    let counted_at_outage = cluster.results(&load.poll(0)).await.ok();
    tokio::time::sleep(outage).await;
    cluster.restart_clickhouse().await?;
    let (summary, truth) = load.finish(&cluster).await?;
    report("ClickHouse down for 60 s", &summary);
    ensure!(
        summary["statuses"]
            .as_object()
            .map(|s| s.keys().cloned().collect::<Vec<_>>())
            == Some(vec!["202".to_owned()]),
        "ingest answered every vote with 202 throughout: {}",
        summary["statuses"]
    );
    // Backing off: attempts grow to one per 5 s, not a hot loop. Whichever call of a batch
    // meets the outage first is the one retried (the inserts, or the reads of a poll's tally
    // or segment values that come before them), so every retried failure counts.
    let log = cluster.processor_log().await;
    let failed_attempts = log
        .lines()
        .filter(|l| l.contains("failed, retrying"))
        .count();
    ensure!(
        (1..=60).contains(&failed_attempts),
        "{failed_attempts} failed attempts during a 60 s outage (counted before it: {counted_at_outage:?})"
    );
    verify(&cluster, &truth).await
}

/// Holders of the partition leases, checked: every one of `partitions` held, only by
/// `live` processors, each of which holds between `least` and `most`.
pub(crate) async fn leases_spread(
    cluster: &Cluster,
    partitions: u16,
    live: &[&str],
    (least, most): (usize, usize),
) -> Result<bool> {
    let owners = cluster.lease_owners().await?;
    let mut held: BTreeMap<&str, usize> = live.iter().map(|id| (*id, 0)).collect();
    for owner in owners.values() {
        match held.get_mut(owner.as_str()) {
            Some(count) => *count += 1,
            None => return Ok(false),
        }
    }
    Ok(owners.len() == usize::from(partitions)
        && held.values().all(|count| (least..=most).contains(count)))
}

/// 5b. Three processors share eight partitions through leases under load: one is killed
///     (-9), another is paused (SIGSTOP) past its lease, the first takes every partition
///     over, then the paused one resumes (SIGCONT) — it must find its leases lost and write
///     nothing more for them (the warehouse fences it) — and gets a share back. Nothing is
///     lost or written twice, and each partition ends with one live owner. Last, the
///     resumed one is stopped (SIGTERM) and hands its partitions over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn needs_nats_clickhouse_processors_share_partitions_through_a_kill_and_a_pause() -> Result<()>
{
    tally_testkit::require!(NatsServer, ClickHouse);
    const PARTITIONS: u16 = 8;
    let cluster = Cluster::start_with(
        Deployment::Distributed,
        &[("TALLY_PARTITIONS", "8"), ("TALLY_LEASE_SECONDS", "4")],
    )
    .await?;
    let mut second = cluster.spawn_processor("processor-b").await?;
    let mut third = cluster.spawn_processor("processor-c").await?;
    let all = ["processor", "processor-b", "processor-c"];
    tally_testkit::wait_until(
        "the partitions spread over three processors",
        Duration::from_secs(60),
        || leases_spread(&cluster, PARTITIONS, &all, (2, 3)),
    )
    .await
    .with_context(|| cluster.logs())?;

    let (rate, seconds) = scale((600, 40), (4_000, 90));
    let load = Load::start_counting(
        &cluster,
        &[&cluster.ingest.url],
        rate,
        seconds,
        12,
        Dedupe::NoneWithRepeats,
    )
    .await?;
    random_pause(Duration::from_secs(2), Duration::from_secs(4)).await;
    second.kill().await;
    random_pause(Duration::from_secs(1), Duration::from_secs(3)).await;
    third.signal("STOP")?;
    let paused = tokio::time::Instant::now();
    tally_testkit::wait_until(
        "the one processor left holding every partition",
        Duration::from_secs(60),
        || leases_spread(&cluster, PARTITIONS, &["processor"], (8, 8)),
    )
    .await
    .with_context(|| format!("{}\n{}", cluster.logs(), third.log_tail()))?;
    let taken_over = paused.elapsed();
    // The new owner writes the paused one's partitions for a while before it wakes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    third.signal("CONT")?;
    tally_testkit::wait_until(
        "the partitions spread over the two live processors",
        Duration::from_secs(60),
        || leases_spread(&cluster, PARTITIONS, &["processor", "processor-c"], (4, 4)),
    )
    .await
    .with_context(|| format!("{}\n{}", cluster.logs(), third.log_tail()))?;
    let (summary, truth) = load.finish(&cluster).await?;
    report("processors sharing partitions", &summary);
    eprintln!("every partition had a live owner {taken_over:?} after the pause began");
    verify(&cluster, &truth).await?;
    for line in third.log_text().lines().filter(|line| {
        ["lease lost", "newer owner", "claimed", "handing"]
            .iter()
            .any(|what| line.contains(what))
    }) {
        eprintln!("processor-c: {line}");
    }
    // It finds out one of two ways, whichever comes first after it wakes: its renewal
    // fails, or the warehouse's fence refuses its next write and its worker ends.
    let log = third.log_text();
    ensure!(
        log.contains("partition lease lost; its worker stopped")
            || log.contains("partition worker ended: its lease was lost"),
        "the paused processor did not notice its leases were gone\n{}",
        third.log_tail()
    );
    ensure!(
        leases_spread(&cluster, PARTITIONS, &["processor", "processor-c"], (4, 4)).await?,
        "leases at the end: {:?}",
        cluster.lease_owners().await?
    );
    // Stopped (SIGTERM), a processor hands its partitions over instead of letting them
    // expire: it releases each of its four leases, and the other one takes them.
    let released = |log: &str| log.matches("partition lease released").count();
    let before = released(&third.log_text());
    let (status, _) = third.terminate(Duration::from_secs(30)).await?;
    ensure!(status.success(), "processor-c stopped with {status}");
    let handed_over = released(&third.log_text()) - before;
    ensure!(
        handed_over == 4,
        "processor-c released {handed_over} leases as it stopped, not its 4\n{}",
        third.log_tail()
    );
    tally_testkit::wait_until(
        "the last processor holding every partition again",
        Duration::from_secs(30),
        || leases_spread(&cluster, PARTITIONS, &["processor"], (8, 8)),
    )
    .await
    .with_context(|| cluster.logs())?;
    Ok(())
}

/// 5c. The broker is three clustered nats-servers holding every stream and bucket in three
///     copies (`TALLY_REPLICAS=3`), and every service lists all three: under load the vote
///     stream's leader is killed -9 and started again, twice (the second time the leader
///     elected after the first kill). Every acknowledged vote is counted once; a vote in
///     flight during an election is answered 503 and retried by loadgen with its vote id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn needs_nats_clickhouse_a_replicated_broker_loses_its_leader_twice() -> Result<()> {
    tally_testkit::require!(NatsServer, ClickHouse);
    let cluster = Cluster::launch(
        Deployment::Distributed,
        Options {
            nats_servers: 3,
            ..Default::default()
        },
    )
    .await?;
    let (rate, seconds) = scale((400, 40), (3_000, 90));
    let load = Load::start_counting(
        &cluster,
        &[&cluster.ingest.url],
        rate,
        seconds,
        3,
        Dedupe::NoneWithRepeats,
    )
    .await?;
    let killed = kill_stream_leaders(&cluster, &["VOTES", "VOTES"]).await?;
    let (summary, truth) = load.finish(&cluster).await?;
    report(
        &format!("R3 broker, stream leaders n{killed:?} killed"),
        &summary,
    );
    verify(&cluster, &truth).await
}

/// For each of `streams` in turn, under load: the clustered nats-server leading it then is
/// killed -9 after 4–6 s and started again 4–6 s later. Answers the servers killed.
async fn kill_stream_leaders(cluster: &Cluster, streams: &[&str]) -> Result<Vec<usize>> {
    let mut killed = Vec::new();
    for stream in streams {
        random_pause(Duration::from_secs(4), Duration::from_secs(6)).await;
        let leader = cluster.nats_stream_leader(stream).await?;
        cluster.kill_nats_member(leader).await?;
        killed.push(leader);
        random_pause(Duration::from_secs(4), Duration::from_secs(6)).await;
        cluster.restart_nats_member(leader).await?;
    }
    Ok(killed)
}

/// 5c'. The vote log laid over two streams of one partition each
///     (`TALLY_PARTITIONS_PER_STREAM=1`), each in three copies on three clustered
///     nats-servers; polls spread over both partitions, so every poll's votes go through
///     both streams' leaders. Under load each stream's leader is killed -9 and started
///     again in turn. Every acknowledged vote is counted once, through both streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn needs_nats_clickhouse_a_replicated_log_over_two_streams_loses_each_leader() -> Result<()> {
    tally_testkit::require!(NatsServer, ClickHouse);
    let settings = [
        ("TALLY_PARTITIONS", "2"),
        ("TALLY_PARTITIONS_PER_STREAM", "1"),
    ];
    let cluster = Cluster::launch(
        Deployment::Distributed,
        Options {
            nats_servers: 3,
            settings: &settings,
            ..Default::default()
        },
    )
    .await?;
    let (rate, seconds) = scale((400, 40), (3_000, 90));
    let load = Load::start_counting(
        &cluster,
        &[&cluster.ingest.url],
        rate,
        seconds,
        2,
        Dedupe::PerVoterSpreadOverTwo,
    )
    .await?;
    let streams = ["VOTES", "VOTES_1"];
    let leaders = kill_stream_leaders(&cluster, &streams).await?;
    let killed: Vec<_> = streams.iter().zip(leaders).collect();
    let (summary, truth) = load.finish(&cluster).await?;
    report(
        &format!("R3 log over two streams, leaders {killed:?} killed"),
        &summary,
    );
    let held = cluster.vote_streams().await?;
    ensure!(
        held.len() == 2 && held.values().all(|&n| n > 0),
        "votes per stream: {held:?}"
    );
    verify(&cluster, &truth).await
}

/// 5d. The warehouse is sharded over two clickhouse-servers by log partition
///     (`TALLY_CLICKHOUSE_CLUSTER`, `TALLY_CLICKHOUSE_SHARDS`); two processors share four
///     partitions and one is killed -9 under load. Results, breakdowns, time series, the raw
///     votes and analysts' SQL, all read through the `Distributed` tables, count every
///     accepted vote once, and each shard holds only the rows of the partitions it owns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn needs_nats_clickhouse_a_sharded_warehouse_counts_exactly() -> Result<()> {
    tally_testkit::require!(NatsServer, ClickHouseServer);
    let settings = [("TALLY_PARTITIONS", "4"), ("TALLY_LEASE_SECONDS", "4")];
    let cluster = Cluster::launch(
        Deployment::Distributed,
        Options {
            settings: &settings,
            clickhouse_shards: true,
            ..Default::default()
        },
    )
    .await?;
    let mut second = cluster.spawn_processor("processor-b").await?;
    let (rate, seconds) = scale((500, 20), (3_000, 60));
    let load = Load::start_counting(
        &cluster,
        &[&cluster.ingest.url],
        rate,
        seconds,
        8,
        Dedupe::NoneWithRepeats,
    )
    .await?;
    random_pause(Duration::from_secs(4), Duration::from_secs(8)).await;
    second.kill().await;
    let (summary, truth) = load.finish(&cluster).await?;
    report("sharded warehouse, a processor killed", &summary);
    verify(&cluster, &truth).await?;

    // Analysts' SQL counts the same ballots across the shards.
    let answer: Value = cluster
        .http
        .post(format!("{}/v1/sql", cluster.query.url))
        .bearer_auth(crate::cluster::ANALYST_KEY)
        .json(&json!({"query": "SELECT poll_id, count(*) FROM ballots GROUP BY poll_id ORDER BY poll_id"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let counted: BTreeMap<String, u64> = answer["rows"]
        .as_array()
        .context("rows")?
        .iter()
        .map(|row| {
            (
                row[0].as_str().unwrap_or_default().to_owned(),
                row[1].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let expected: BTreeMap<String, u64> = truth["polls"]
        .as_object()
        .context("truth polls")?
        .iter()
        .map(|(poll, want)| (poll.clone(), want["accepted"].as_u64().unwrap_or(0)))
        .filter(|(_, accepted)| *accepted > 0)
        .collect();
    ensure!(
        counted == expected,
        "SQL counted {counted:?}, accepted {expected:?}"
    );

    // Each shard holds its own partitions' rows (partition p on shard p mod 2), both some.
    let shards = tally_testkit::clickhouse_cluster().await?;
    for (index, url) in shards.shards.iter().enumerate() {
        let held = tally_testkit::ClickHouse { url: url.clone() }
            .query(&format!(
                "SELECT DISTINCT log_partition FROM {}{}.votes ORDER BY log_partition",
                cluster.database,
                tally_clickhouse::SHARD_DATABASE_SUFFIX
            ))
            .await?;
        let held: Vec<usize> = held.lines().map(str::parse).collect::<Result<_, _>>()?;
        ensure!(
            !held.is_empty() && held.iter().all(|p| p % 2 == index),
            "shard {} holds partitions {held:?}",
            index + 1
        );
    }
    Ok(())
}

// 6. Every vote sent again, as NDJSON batches, changes nothing: each line answers 202 with
//    the original vote id (the log refuses the second copy and finds the first).
crate::for_each_deployment!(replay_of_every_vote);

async fn replay_of_every_vote(deployment: Deployment) -> Result<()> {
    let cluster = Cluster::start(deployment).await?;
    let (rate, seconds) = scale((400, 8), (3_000, 40));
    let load = Load::start(&cluster, &[&cluster.ingest.url], rate, seconds, 2).await?;
    let (summary, truth) = load.finish(&cluster).await?;
    report("before the replay", &summary);
    let votes = truth["votes"].as_array().cloned().unwrap_or_default();
    let mut lines = String::new();
    for vote in &votes {
        lines.push_str(&vote.to_string());
        lines.push('\n');
    }
    let mut replayed = 0;
    for chunk in lines.lines().collect::<Vec<_>>().chunks(1_000) {
        let response = cluster
            .http
            .post(format!("{}/v1/votes:batch", cluster.ingest.url))
            .bearer_auth(ADMIN_KEY)
            .header("content-type", "application/x-ndjson")
            .body(chunk.join("\n"))
            .send()
            .await?;
        ensure!(response.status() == 200);
        let answer: Value = response.json().await?;
        for line in answer["results"].as_array().into_iter().flatten() {
            let sent = &votes[replayed];
            ensure!(
                line["status"] == 202 && line["vote_id"] == sent["vote_id"],
                "replayed vote {sent} answered {line}"
            );
            replayed += 1;
        }
    }
    ensure!(replayed == votes.len());
    // Give the processor time to count anything it wrongly accepted, then compare.
    tokio::time::sleep(Duration::from_secs(3)).await;
    verify(&cluster, &truth).await
}

/// 7. Standalone: kill -9 the whole process three times under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standalone_killed_three_times() -> Result<()> {
    // The vote log writes its uniqueness index every few hundred votes, so the kills land
    // between (and during) its merges: a retry must still find its original vote.
    let cluster =
        Cluster::start_with(Deployment::Standalone, &[("TALLY_LOG_MERGE_AT", "300")]).await?;
    let (rate, seconds) = scale((800, 25), (4_000, 35));
    let load = Load::start_counting(
        &cluster,
        &[&cluster.ingest.url],
        rate,
        seconds,
        3,
        Dedupe::NoneWithRepeats,
    )
    .await?;
    kill_processor_during(&cluster, 3, seconds).await?;
    let (summary, truth) = load.finish(&cluster).await?;
    report("standalone killed 3 times", &summary);
    ensure!(
        summary["live"]["reconnects"].as_u64() >= Some(3),
        "the live streams were cut and reopened: {}",
        summary["live"]
    );
    verify(&cluster, &truth).await
}
