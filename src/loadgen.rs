//! `tally loadgen`: drives vote traffic at any deployment over its public HTTP API and
//! reports what it saw: accepted votes per second, errors by status, request latency, and
//! how long until every accepted vote was counted in the results.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};

#[derive(Args, Clone)]
pub struct LoadgenArgs {
    /// Base URL votes go to (ingest, or a standalone process).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Base URL of the query service, for creating polls and reading results; `--url` when
    /// not given.
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
    /// Polls the votes are spread over.
    #[arg(long, default_value_t = 4)]
    polls: usize,
    /// Share of votes sent by a voter who already voted (expected to get 409).
    #[arg(long, default_value_t = 0.0)]
    repeat_ratio: f64,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Votes per NDJSON batch request; 0 sends single votes.
    #[arg(long, default_value_t = 0)]
    batch: usize,
    /// Seconds to wait, after the load, for every accepted vote to be counted.
    #[arg(long, default_value_t = 120)]
    settle: u64,
    /// Print the summary as JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Stats {
    /// When each vote to the watched poll (the first) was acknowledged with 202.
    watched_acks: Mutex<Vec<Instant>>,
    requests: AtomicU64,
    sent: AtomicU64,
    accepted: AtomicU64,
    statuses: Mutex<BTreeMap<String, u64>>,
    latencies_us: Mutex<Vec<u64>>,
}

impl Stats {
    fn status(&self, status: String, votes: u64) {
        *self
            .statuses
            .lock()
            .expect("stats")
            .entry(status)
            .or_default() += votes;
    }
}

#[derive(Serialize)]
struct Summary {
    target: String,
    mode: String,
    concurrency: usize,
    seconds: f64,
    requests: u64,
    votes_sent: u64,
    accepted: u64,
    accepted_per_s: f64,
    statuses: BTreeMap<String, u64>,
    latency_ms: BTreeMap<&'static str, f64>,
    /// From a vote's 202 until the SSE stream of its poll showed a total that includes it.
    visible_ms: BTreeMap<&'static str, f64>,
    counted: u64,
    /// From the first vote until the results counted every accepted vote.
    all_counted_after_s: Option<f64>,
    counted_per_s: Option<f64>,
}

const OPTIONS: [&str; 4] = ["red", "green", "blue", "yellow"];
const COUNTRIES: [&str; 8] = ["US", "DE", "GB", "FR", "BR", "IN", "JP", "ES"];
const DEVICES: [&str; 3] = ["mobile", "desktop", "tablet"];
const CHANNELS: [&str; 4] = ["email", "social", "search", "ads"];
const PLANS: [&str; 3] = ["free", "pro", "enterprise"];

/// One synthetic vote line; `voter` numbers are unique per run unless repeated on purpose.
fn vote_body(poll: &str, run: &str, voter: u64, with_poll: bool) -> Value {
    let mut rng = rand::rng();
    let mut body = json!({
        "voter_id": format!("lg-{run}-{voter}"),
        "vote_id": format!("lg-{run}-{voter}-{}", rng.random::<u32>()),
        "choice": OPTIONS[rng.random_range(0..OPTIONS.len())],
        "segment": {
            "country": COUNTRIES[rng.random_range(0..COUNTRIES.len())],
            "device": DEVICES[rng.random_range(0..DEVICES.len())],
            "channel": CHANNELS[rng.random_range(0..CHANNELS.len())],
            "plan": PLANS[rng.random_range(0..PLANS.len())],
        },
    });
    if with_poll {
        body["poll_id"] = json!(poll);
    }
    body
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index] as f64 / 1000.0
}

pub async fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    let query_url = args.query_url.clone().unwrap_or_else(|| args.url.clone());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency.max(1))
        .timeout(Duration::from_secs(30))
        .build()?;
    let run = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
    let mut polls = Vec::new();
    for i in 0..args.polls.max(1) {
        let id = format!("lg-{run}-{i}");
        let response = http
            .post(format!("{query_url}/v1/polls"))
            .bearer_auth(&args.admin_key)
            .json(&json!({
                "id": id, "title": "Load test", "question": "Which colour?", "kind": "single",
                "options": OPTIONS.iter().map(|o| json!({"id": o, "label": o})).collect::<Vec<_>>(),
                "dimensions": ["plan"],
            }))
            .send()
            .await
            .context("creating a poll")?;
        if response.status() != 201 {
            bail!(
                "creating poll {id} answered {}: {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        polls.push(id);
    }
    let polls = Arc::new(polls);
    let stats = Arc::new(Stats::default());
    let next_voter = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    let per_request = args.batch.max(1) as u64;

    // Our own live subscriber on the first poll: when does an accepted vote show up?
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, u64)>();
    let watcher = {
        let url = format!("{query_url}/v1/polls/{}/live", polls[0]);
        let http = http.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            let Ok(response) = http
                .get(url)
                .timeout(Duration::from_secs(86_400))
                .send()
                .await
            else {
                return;
            };
            let mut body = response.bytes_stream();
            let mut buffer = String::new();
            while let Some(Ok(chunk)) = body.next().await {
                let arrived = Instant::now();
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buffer.find("\n\n") {
                    let block: String = buffer.drain(..end + 2).collect();
                    for line in block.lines() {
                        if let Some(data) = line.strip_prefix("data:") {
                            if let Ok(value) = serde_json::from_str::<Value>(data.trim()) {
                                if let Some(total) = value["total_votes"].as_u64() {
                                    let _ = seen_tx.send((arrived, total));
                                }
                            }
                        }
                    }
                }
            }
        })
    };

    let progress = {
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = 0;
            loop {
                tick.tick().await;
                let accepted = stats.accepted.load(Ordering::Relaxed);
                eprint!(
                    "\r[{:>4.0}s] sent {:>9}  accepted {:>9}  {:>7}/s   ",
                    started.elapsed().as_secs_f64(),
                    stats.sent.load(Ordering::Relaxed),
                    accepted,
                    accepted - last
                );
                last = accepted;
            }
        })
    };

    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (http, stats, polls, next_voter, args, run) = (
            http.clone(),
            stats.clone(),
            polls.clone(),
            next_voter.clone(),
            args.clone(),
            run.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let first = next_voter.fetch_add(per_request, Ordering::Relaxed);
                if args.rate > 0 {
                    let due = started + Duration::from_secs_f64(first as f64 / args.rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                if Instant::now() >= deadline {
                    break;
                }
                let voters: Vec<u64> = (first..first + per_request)
                    .map(|voter| {
                        let mut rng = rand::rng();
                        if voter > 0 && rng.random_bool(args.repeat_ratio.clamp(0.0, 1.0)) {
                            rng.random_range(0..voter)
                        } else {
                            voter
                        }
                    })
                    .collect();
                let poll_of = |voter: u64| polls[(voter % polls.len() as u64) as usize].as_str();
                let sent_at = Instant::now();
                let outcome = if args.batch == 0 {
                    let voter = voters[0];
                    let poll = poll_of(voter);
                    http.post(format!("{}/v1/polls/{poll}/votes", args.url))
                        .json(&vote_body(poll, &run, voter, false))
                        .send()
                        .await
                        .map(|response| vec![response.status().as_u16()])
                } else {
                    let mut body = String::new();
                    for voter in &voters {
                        body.push_str(&vote_body(poll_of(*voter), &run, *voter, true).to_string());
                        body.push('\n');
                    }
                    match http
                        .post(format!("{}/v1/votes:batch", args.url))
                        .header("content-type", "application/x-ndjson")
                        .body(body)
                        .send()
                        .await
                    {
                        Ok(response) if response.status() == 200 => {
                            let answer: Value = response.json().await.unwrap_or(Value::Null);
                            Ok(answer["results"]
                                .as_array()
                                .map(|lines| {
                                    lines
                                        .iter()
                                        .map(|line| line["status"].as_u64().unwrap_or(0) as u16)
                                        .collect()
                                })
                                .unwrap_or_default())
                        }
                        Ok(response) => Ok(vec![response.status().as_u16(); voters.len()]),
                        Err(err) => Err(err),
                    }
                };
                latencies.push(sent_at.elapsed().as_micros() as u64);
                stats.requests.fetch_add(1, Ordering::Relaxed);
                stats.sent.fetch_add(voters.len() as u64, Ordering::Relaxed);
                let acked_at = Instant::now();
                match outcome {
                    Ok(statuses) => {
                        let watched = statuses
                            .iter()
                            .zip(&voters)
                            .filter(|(status, voter)| {
                                **status == 202 && poll_of(**voter) == polls[0].as_str()
                            })
                            .count();
                        if watched > 0 {
                            stats
                                .watched_acks
                                .lock()
                                .expect("stats")
                                .extend(std::iter::repeat_n(acked_at, watched));
                        }
                        let accepted = statuses.iter().filter(|s| **s == 202).count() as u64;
                        stats.accepted.fetch_add(accepted, Ordering::Relaxed);
                        let mut counted: BTreeMap<u16, u64> = BTreeMap::new();
                        for status in statuses {
                            *counted.entry(status).or_default() += 1;
                        }
                        for (status, votes) in counted {
                            stats.status(status.to_string(), votes);
                        }
                    }
                    Err(err) => {
                        let kind = if err.is_timeout() {
                            "timeout"
                        } else {
                            "connection"
                        };
                        stats.status(kind.to_owned(), voters.len() as u64);
                    }
                }
            }
            stats.latencies_us.lock().expect("stats").extend(latencies);
        }));
    }
    for worker in workers {
        worker.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.abort();
    eprintln!();

    // Wait for the results to count everything that was accepted.
    let accepted = stats.accepted.load(Ordering::Relaxed);
    let settle_until = Instant::now() + Duration::from_secs(args.settle);
    let mut all_counted_after = None;
    let counted = loop {
        let mut total = 0;
        for poll in polls.iter() {
            let results: Value = http
                .get(format!("{query_url}/v1/polls/{poll}/results"))
                .send()
                .await?
                .json()
                .await?;
            total += results["total_votes"].as_u64().unwrap_or(0);
        }
        if total >= accepted {
            all_counted_after = Some(started.elapsed().as_secs_f64());
            break total;
        }
        if Instant::now() > settle_until {
            break total;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Give the stream a moment past the final count, then match acks to totals: the i-th
    // acknowledged vote became visible with the first total of at least i.
    tokio::time::sleep(Duration::from_millis(500)).await;
    watcher.abort();
    let mut seen = Vec::new();
    while let Ok(event) = seen_rx.try_recv() {
        seen.push(event);
    }
    let mut acks = std::mem::take(&mut *stats.watched_acks.lock().expect("stats"));
    acks.sort_unstable();
    let mut visible_us = Vec::new();
    let mut next_event = 0;
    for (i, acked) in acks.iter().enumerate() {
        while next_event < seen.len() && seen[next_event].1 < (i as u64 + 1) {
            next_event += 1;
        }
        let Some((arrived, _)) = seen.get(next_event) else {
            break;
        };
        visible_us.push(arrived.saturating_duration_since(*acked).as_micros() as u64);
    }
    visible_us.sort_unstable();

    let mut latencies = std::mem::take(&mut *stats.latencies_us.lock().expect("stats"));
    latencies.sort_unstable();
    let summary = Summary {
        target: args.url.clone(),
        mode: if args.batch == 0 {
            "single votes".into()
        } else {
            format!("NDJSON batches of {}", args.batch)
        },
        concurrency: args.concurrency,
        seconds,
        requests: stats.requests.load(Ordering::Relaxed),
        votes_sent: stats.sent.load(Ordering::Relaxed),
        accepted,
        accepted_per_s: accepted as f64 / seconds,
        statuses: stats.statuses.lock().expect("stats").clone(),
        latency_ms: [
            ("p50", percentile(&latencies, 0.50)),
            ("p95", percentile(&latencies, 0.95)),
            ("p99", percentile(&latencies, 0.99)),
        ]
        .into(),
        visible_ms: [
            ("p50", percentile(&visible_us, 0.50)),
            ("p99", percentile(&visible_us, 0.99)),
            ("samples", visible_us.len() as f64),
        ]
        .into(),
        counted,
        all_counted_after_s: all_counted_after,
        counted_per_s: all_counted_after.map(|after| accepted as f64 / after),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("target           {} ({})", summary.target, summary.mode);
        println!(
            "sent             {} votes in {} requests over {:.1}s, {} in flight",
            summary.votes_sent, summary.requests, summary.seconds, summary.concurrency
        );
        println!(
            "accepted         {} ({:.0}/s)",
            summary.accepted, summary.accepted_per_s
        );
        println!("by status        {:?}", summary.statuses);
        println!(
            "request latency  p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms",
            summary.latency_ms["p50"], summary.latency_ms["p95"], summary.latency_ms["p99"]
        );
        println!(
            "vote→live        p50 {:.1} ms, p99 {:.1} ms ({} votes seen on the SSE stream of {})",
            summary.visible_ms["p50"],
            summary.visible_ms["p99"],
            summary.visible_ms["samples"],
            polls[0]
        );
        match (summary.all_counted_after_s, summary.counted_per_s) {
            (Some(after), Some(rate)) => println!(
                "counted          all {} after {after:.2}s from the first vote: {rate:.0} counted votes/s",
                summary.counted
            ),
            _ => println!(
                "counted          only {} of {} within {}s of the end",
                summary.counted, summary.accepted, args.settle
            ),
        }
    }
    if all_counted_after.is_none() {
        bail!("not every accepted vote was counted");
    }
    Ok(())
}
