//! `tally-loadgen`: drives vote traffic at any deployment over its public HTTP API, the way
//! careful clients do, and checks what the deployment made of it.
//!
//! Every vote has its own `vote_id`. A vote whose outcome is unknown (the connection died,
//! a timeout, 408, 429 or a 5xx) is sent again, unchanged, until it gets an answer, so the
//! run ends knowing exactly which votes were accepted (the ground truth, `--truth`). Then it
//! waits until the results count exactly those, per poll and option. An SSE subscriber per
//! poll, reconnecting whenever its stream drops, checks that live totals never go back and
//! end at the truth, and measures how long an accepted vote takes to show.

pub mod baseline;

use std::collections::BTreeMap;
use std::path::PathBuf;
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
    #[arg(long, default_value = DEFAULT_SEGMENT_MIX)]
    segment_mix: SegmentMix,
    /// The polls' dedupe rule: `per_voter` (one vote per voter) or `none` (every vote
    /// counts; unique voters are counted apart).
    #[arg(long, default_value = "per_voter")]
    dedupe: String,
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
    /// Print the summary as JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Stats {
    /// When each vote to the watched poll (the first) was acknowledged with 202.
    watched_acks: Mutex<Vec<Instant>>,
    requests: AtomicU64,
    retried: AtomicU64,
    sent: AtomicU64,
    accepted: AtomicU64,
    unresolved: AtomicU64,
    statuses: Mutex<BTreeMap<String, u64>>,
    latencies_us: Mutex<Vec<u64>>,
    /// What the accepted votes add up to (each worker's share, merged at the end).
    truth: Mutex<Truth>,
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

/// What the accepted votes add up to.
#[derive(Serialize, Default)]
struct Truth {
    polls: BTreeMap<String, PollTruth>,
    /// Every accepted vote as it was sent (with `poll_id`), in no particular order.
    votes: Vec<Value>,
}

#[derive(Serialize, Default)]
struct PollTruth {
    accepted: u64,
    options: BTreeMap<String, u64>,
    /// dimension → value → option → votes.
    segments: BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>>,
}

impl Truth {
    fn new(polls: &[String]) -> Truth {
        Truth {
            polls: polls
                .iter()
                .map(|p| (p.clone(), PollTruth::default()))
                .collect(),
            votes: Vec::new(),
        }
    }

    /// Counts an accepted vote of the poll `poll_id`, and keeps it when `keep`.
    fn add(
        &mut self,
        vote: &SyntheticVote,
        poll_id: &str,
        (run, mix): (&str, &SegmentMix),
        keep: bool,
    ) {
        /// `map[key] += 1`, allocating the key only the first time it is seen.
        fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
            match map.get_mut(key) {
                Some(count) => *count += 1,
                None => {
                    map.insert(key.to_owned(), 1);
                }
            }
        }
        fn slot<'a, T: Default>(map: &'a mut BTreeMap<String, T>, key: &str) -> &'a mut T {
            if !map.contains_key(key) {
                map.insert(key.to_owned(), T::default());
            }
            map.get_mut(key).expect("inserted above")
        }
        let poll = slot(&mut self.polls, poll_id);
        let option = vote.option();
        poll.accepted += 1;
        bump(&mut poll.options, option);
        for (dimension, value) in mix.values(&vote.segment) {
            let values = slot(&mut poll.segments, dimension);
            let options = slot(values, value);
            bump(options, option);
        }
        if keep {
            self.votes.push(vote.to_value(poll_id, run, mix));
        }
    }

    fn merge(&mut self, other: Truth) {
        for (id, theirs) in other.polls {
            let poll = self.polls.entry(id).or_default();
            poll.accepted += theirs.accepted;
            for (option, count) in theirs.options {
                *poll.options.entry(option).or_default() += count;
            }
            for (dimension, values) in theirs.segments {
                let ours = poll.segments.entry(dimension).or_default();
                for (value, options) in values {
                    let ours = ours.entry(value).or_default();
                    for (option, count) in options {
                        *ours.entry(option).or_default() += count;
                    }
                }
            }
        }
        self.votes.extend(other.votes);
    }
}

#[derive(Serialize)]
struct Summary {
    target: String,
    mode: String,
    concurrency: usize,
    seconds: f64,
    requests: u64,
    /// Requests sent again after an unknown outcome.
    retried: u64,
    votes_sent: u64,
    accepted: u64,
    accepted_per_s: f64,
    /// The load generator's own CPU time (user + system) while it sent votes: how much of
    /// the machine the client took, where it shares one with the deployment.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_seconds: Option<f64>,
    /// Votes still without a definite answer when `--retry-for` ran out.
    unresolved: u64,
    /// Answers per attempt: HTTP status, or `connection` / `timeout`.
    statuses: BTreeMap<String, u64>,
    latency_ms: BTreeMap<&'static str, f64>,
    /// From a vote's 202 until the SSE stream of its poll showed a total that includes it.
    visible_ms: BTreeMap<&'static str, f64>,
    counted: u64,
    /// From the first vote until the results counted every accepted vote.
    all_counted_after_s: Option<f64>,
    counted_per_s: Option<f64>,
    /// The results equal the accepted votes, per poll and option.
    exact: bool,
    mismatches: Vec<String>,
    live: LiveSummary,
    /// Breakdown request latency of the first poll after the load, per `by`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    breakdown_ms: BTreeMap<&'static str, BTreeMap<&'static str, f64>>,
}

#[derive(Serialize, Clone, Default)]
struct LiveSummary {
    events: u64,
    /// Streams that dropped and were opened again (each reconnect starts with a snapshot).
    reconnects: u64,
    /// Totals lower than one the same poll's stream showed before.
    went_backwards: u64,
    backwards_examples: Vec<String>,
    /// Every poll's stream ended showing the accepted count.
    ended_at_truth: bool,
}

/// What the SSE subscriber of one poll has seen.
#[derive(Default)]
struct Watched {
    events: u64,
    reconnects: u64,
    went_backwards: u64,
    examples: Vec<String>,
    highest: u64,
    last: u64,
}

const OPTIONS: [&str; 4] = ["red", "green", "blue", "yellow"];
/// The segment values votes carry when `--segment-mix` is not given: four keys, every
/// value equally likely.
const DEFAULT_SEGMENT_MIX: &str = "country=US,DE,GB,FR,BR,IN,JP,ES;device=mobile,desktop,tablet;\
                                   channel=email,social,search,ads;plan=free,pro,enterprise";
/// At most this many segment keys per vote (the mix is parsed into a fixed-size pick).
const MAX_MIX_KEYS: usize = 8;

/// `--segment-mix`: which segment keys votes carry and how often each value comes up.
/// `key=value[:weight],value[:weight],…;key=…` — weights are whole numbers (default 1).
/// Keys that are not standard segment keys become the load polls' own dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentMix {
    keys: Vec<MixKey>,
}

#[derive(Debug, Clone, PartialEq)]
struct MixKey {
    key: String,
    values: Vec<String>,
    /// Running sums of the weights, for drawing a value.
    cumulative: Vec<u64>,
}

impl std::str::FromStr for SegmentMix {
    type Err = String;

    fn from_str(spec: &str) -> Result<SegmentMix, String> {
        let mut keys: Vec<MixKey> = Vec::new();
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((key, values)) = part.split_once('=') else {
                return Err(format!("`{part}`: expected key=value,value,…"));
            };
            let key = key.trim();
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(format!("`{key}`: a segment key is letters, digits and `_`"));
            }
            if keys.iter().any(|k| k.key == key) {
                return Err(format!("`{key}` is given twice"));
            }
            let mut mix = MixKey {
                key: key.to_owned(),
                values: Vec::new(),
                cumulative: Vec::new(),
            };
            for value in values.split(',').map(str::trim) {
                let (value, weight) = match value.rsplit_once(':') {
                    Some((value, weight)) => match weight.parse::<u64>() {
                        Ok(weight) if weight > 0 => (value, weight),
                        _ => {
                            return Err(format!(
                                "`{key}={value}:{weight}`: a weight is a whole number above 0"
                            ))
                        }
                    },
                    None => (value, 1),
                };
                if value.is_empty() {
                    return Err(format!("`{key}` has an empty value"));
                }
                let total = mix.cumulative.last().copied().unwrap_or(0) + weight;
                mix.values.push(value.to_owned());
                mix.cumulative.push(total);
            }
            if mix.values.len() > usize::from(u8::MAX) {
                return Err(format!("`{key}` has more than 255 values"));
            }
            keys.push(mix);
        }
        if keys.len() > MAX_MIX_KEYS {
            return Err(format!("at most {MAX_MIX_KEYS} segment keys"));
        }
        Ok(SegmentMix { keys })
    }
}

impl SegmentMix {
    /// The keys the load polls must declare: those that are not standard segment keys.
    fn dimensions(&self) -> Vec<&str> {
        self.keys
            .iter()
            .map(|k| k.key.as_str())
            .filter(|key| !tally_core::segment::STANDARD_KEYS.contains(key))
            .collect()
    }

    fn pick(&self, rng: &mut impl Rng) -> [u8; MAX_MIX_KEYS] {
        let mut picked = [0; MAX_MIX_KEYS];
        for (slot, key) in picked.iter_mut().zip(&self.keys) {
            let total = key.cumulative.last().copied().unwrap_or(1);
            let draw = rng.random_range(0..total);
            *slot = key.cumulative.partition_point(|&sum| sum <= draw) as u8;
        }
        picked
    }

    /// The (key, value) pairs of a pick.
    fn values<'a>(
        &'a self,
        picked: &'a [u8; MAX_MIX_KEYS],
    ) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.keys
            .iter()
            .zip(picked)
            .map(|(key, &i)| (key.key.as_str(), key.values[usize::from(i)].as_str()))
    }
}

/// One synthetic vote: its poll (an index into the run's polls), voter, option and segment
/// values (indices into the mix). `voter` numbers are unique per run unless repeated on
/// purpose. It becomes JSON only when written into a request body (or kept for `--truth`),
/// so the load generator spends little of a shared machine on making votes.
#[derive(Debug, Clone, Copy)]
struct SyntheticVote {
    poll: usize,
    voter: u64,
    nonce: u32,
    choice: usize,
    segment: [u8; MAX_MIX_KEYS],
}

impl SyntheticVote {
    fn random(poll: usize, voter: u64, mix: &SegmentMix) -> SyntheticVote {
        let mut rng = rand::rng();
        SyntheticVote {
            poll,
            voter,
            nonce: rng.random(),
            choice: rng.random_range(0..OPTIONS.len()),
            segment: mix.pick(&mut rng),
        }
    }

    fn option(&self) -> &'static str {
        OPTIONS[self.choice]
    }

    /// Appends the vote as one JSON object with `poll_id`.
    fn write_json(&self, out: &mut Vec<u8>, poll_id: &str, run: &str, mix: &SegmentMix) {
        use std::io::Write;
        out.extend_from_slice(br#"{"poll_id":"#);
        serde_json::to_writer(&mut *out, poll_id).expect("a string serializes");
        let (voter, nonce, choice) = (self.voter, self.nonce, self.option());
        let _ = write!(
            out,
            r#","voter_id":"lg-{run}-{voter}","vote_id":"lg-{run}-{voter}-{nonce}","choice":"{choice}","segment":{{"#
        );
        for (i, (key, value)) in mix.values(&self.segment).enumerate() {
            if i > 0 {
                out.push(b',');
            }
            serde_json::to_writer(&mut *out, key).expect("a string serializes");
            out.push(b':');
            serde_json::to_writer(&mut *out, value).expect("a string serializes");
        }
        out.extend_from_slice(b"}}");
    }

    fn to_value(self, poll_id: &str, run: &str, mix: &SegmentMix) -> Value {
        let mut json = Vec::new();
        self.write_json(&mut json, poll_id, run, mix);
        serde_json::from_slice(&json).expect("the vote is JSON")
    }
}

/// Whether an answer leaves the vote's fate open, so a careful client sends it again.
fn unknown_outcome(status: u16) -> bool {
    matches!(status, 408 | 429 | 500..=599)
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let seconds: u64 = response
        .headers()
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds.min(30)))
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index] as f64 / 1000.0
}

/// Sends votes (one request, or one batch) until each has a definite answer or
/// `retry_for` runs out; returns each vote's final status, `None` when still unknown.
struct Sender {
    http: reqwest::Client,
    urls: Arc<Vec<String>>,
    polls: Arc<Vec<String>>,
    run: String,
    mix: Arc<SegmentMix>,
    batch: bool,
    retry_for: Duration,
    stats: Arc<Stats>,
    next_url: usize,
    latencies: Vec<u64>,
}

impl Sender {
    async fn send(&mut self, votes: &[SyntheticVote]) -> Vec<Option<u16>> {
        let mut outcome: Vec<Option<u16>> = vec![None; votes.len()];
        let mut pending: Vec<usize> = (0..votes.len()).collect();
        let first_try = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let base = &self.urls[self.next_url % self.urls.len()];
            self.next_url = self.next_url.wrapping_add(1);
            let sent_at = Instant::now();
            let (answers, wait) = self.attempt(base, votes, &pending).await;
            self.latencies.push(sent_at.elapsed().as_micros() as u64);
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let mut still = Vec::new();
            for (index, answer) in pending.iter().zip(answers) {
                match answer {
                    Some(status) if !unknown_outcome(status) => outcome[*index] = Some(status),
                    _ => still.push(*index),
                }
            }
            pending = still;
            if pending.is_empty() || first_try.elapsed() >= self.retry_for {
                return outcome;
            }
            self.stats.retried.fetch_add(1, Ordering::Relaxed);
            // With several URLs the retry first goes straight to the next one; a pause
            // comes once each has been tried.
            if attempts % self.urls.len() == 0 {
                tokio::time::sleep(wait.unwrap_or(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }

    /// One request carrying the `pending` votes; the answer per vote (`None`: no answer) and
    /// how long the deployment asked to wait before a retry.
    async fn attempt(
        &self,
        base: &str,
        votes: &[SyntheticVote],
        pending: &[usize],
    ) -> (Vec<Option<u16>>, Option<Duration>) {
        let request = if self.batch {
            let mut body = Vec::with_capacity(pending.len() * 200);
            for index in pending {
                let vote = &votes[*index];
                vote.write_json(&mut body, &self.polls[vote.poll], &self.run, &self.mix);
                body.push(b'\n');
            }
            self.http
                .post(format!("{base}/v1/votes:batch"))
                .header("content-type", "application/x-ndjson")
                .body(body)
        } else {
            let vote = &votes[pending[0]];
            let poll = &self.polls[vote.poll];
            let mut body = Vec::with_capacity(200);
            vote.write_json(&mut body, poll, &self.run, &self.mix);
            self.http
                .post(format!("{base}/v1/polls/{poll}/votes"))
                .header("content-type", "application/json")
                .body(body)
        };
        let response = match request.send().await {
            Ok(response) => response,
            Err(err) => {
                let kind = if err.is_timeout() {
                    "timeout"
                } else {
                    "connection"
                };
                self.stats.status(kind.to_owned(), pending.len() as u64);
                return (vec![None; pending.len()], None);
            }
        };
        let status = response.status().as_u16();
        let wait = retry_after(&response);
        let body = response.bytes().await;
        let answers: Vec<Option<u16>> = match (self.batch, status, body) {
            (true, 200, Ok(body)) => {
                // Only each line's status is read; the rest of the answer is skipped.
                #[derive(serde::Deserialize)]
                struct Answer {
                    results: Vec<Line>,
                }
                #[derive(serde::Deserialize)]
                struct Line {
                    status: u16,
                }
                let lines = serde_json::from_slice::<Answer>(&body)
                    .map(|answer| answer.results)
                    .unwrap_or_default();
                (0..pending.len())
                    .map(|i| lines.get(i).map(|line| line.status))
                    .collect()
            }
            (_, _, Ok(_)) => vec![Some(status); pending.len()],
            // The answer broke off: its outcome is unknown.
            (_, _, Err(_)) => vec![None; pending.len()],
        };
        let mut counted: BTreeMap<String, u64> = BTreeMap::new();
        for answer in &answers {
            let key = answer.map_or("connection".to_owned(), |s| s.to_string());
            *counted.entry(key).or_default() += 1;
        }
        for (key, votes) in counted {
            self.stats.status(key, votes);
        }
        (answers, wait)
    }
}

/// Follows one poll's live stream for the whole run, opening it again whenever it drops.
/// Each (re)connect starts with a snapshot, which must not be lower than what came before.
fn watch_poll(
    http: reqwest::Client,
    url: String,
    state: Arc<Mutex<Watched>>,
    seen: Option<tokio::sync::mpsc::UnboundedSender<(Instant, u64)>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use futures::StreamExt;
        let mut connected_before = false;
        loop {
            if let Ok(response) = http
                .get(&url)
                .timeout(Duration::from_secs(86_400))
                .send()
                .await
            {
                if response.status() == 200 {
                    if connected_before {
                        state.lock().expect("watch").reconnects += 1;
                    }
                    connected_before = true;
                    let mut body = response.bytes_stream();
                    let mut buffer = String::new();
                    while let Some(Ok(chunk)) = body.next().await {
                        let arrived = Instant::now();
                        buffer.push_str(&String::from_utf8_lossy(&chunk));
                        while let Some(end) = buffer.find("\n\n") {
                            let block: String = buffer.drain(..end + 2).collect();
                            for line in block.lines() {
                                let Some(data) = line.strip_prefix("data:") else {
                                    continue;
                                };
                                let Ok(value) = serde_json::from_str::<Value>(data.trim()) else {
                                    continue;
                                };
                                let Some(total) = value["total_votes"].as_u64() else {
                                    continue;
                                };
                                let mut watched = state.lock().expect("watch");
                                watched.events += 1;
                                if total < watched.highest {
                                    watched.went_backwards += 1;
                                    if watched.examples.len() < 5 {
                                        let example =
                                            format!("{url}: {total} after {}", watched.highest);
                                        watched.examples.push(example);
                                    }
                                }
                                watched.highest = watched.highest.max(total);
                                watched.last = total;
                                if let Some(seen) = &seen {
                                    let _ = seen.send((arrived, total));
                                }
                            }
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

pub async fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    if args.url.is_empty() {
        bail!("--url needs at least one base URL");
    }
    let query_url = args
        .query_url
        .clone()
        .unwrap_or_else(|| args.url[0].clone());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency.max(1))
        .timeout(Duration::from_secs(30))
        .build()?;
    let run = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
    let mix = Arc::new(args.segment_mix.clone());
    let prefix = args
        .poll_prefix
        .clone()
        .unwrap_or_else(|| format!("lg-{run}"));
    let mut polls = Vec::new();
    for i in 0..args.polls.max(1) {
        let id = format!("{prefix}-{i}");
        let response = http
            .post(format!("{query_url}/v1/polls"))
            .bearer_auth(&args.admin_key)
            .json(&json!({
                "id": id, "title": "Load test", "question": "Which colour?", "kind": "single",
                "options": OPTIONS.iter().map(|o| json!({"id": o, "label": o})).collect::<Vec<_>>(),
                "dimensions": mix.dimensions(), "dedupe": args.dedupe,
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
    let urls = Arc::new(args.url.clone());
    let stats = Arc::new(Stats::default());
    let next_voter = Arc::new(AtomicU64::new(0));

    // Our own live subscribers: do totals only grow, and when does an accepted vote show?
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, u64)>();
    let watched: Vec<Arc<Mutex<Watched>>> = polls
        .iter()
        .map(|_| Arc::new(Mutex::new(Watched::default())))
        .collect();
    let watchers: Vec<_> = polls
        .iter()
        .zip(&watched)
        .enumerate()
        .map(|(i, (poll, state))| {
            watch_poll(
                http.clone(),
                format!("{query_url}/v1/polls/{poll}/live"),
                state.clone(),
                (i == 0).then(|| seen_tx.clone()),
            )
        })
        .collect();
    drop(seen_tx);

    let cpu_before = own_cpu_seconds();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    let per_request = args.batch.max(1) as u64;
    let progress = {
        let stats = stats.clone();
        let (duration, votes) = (args.duration, args.votes);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = 0;
            loop {
                tick.tick().await;
                let accepted = stats.accepted.load(Ordering::Relaxed);
                let sent = stats.sent.load(Ordering::Relaxed);
                let elapsed = started.elapsed().as_secs_f64();
                let mut done = elapsed / duration.max(1) as f64;
                if let Some(votes) = votes {
                    done = done.max(sent as f64 / votes.max(1) as f64);
                }
                let filled = ((done.min(1.0)) * 24.0).round() as usize;
                eprint!(
                    "\r[{}{}] {:>3.0}% {:>4.0}s  sent {:>9}  accepted {:>9}  {:>7}/s  retried {:>6}  ",
                    "#".repeat(filled),
                    "-".repeat(24 - filled),
                    done.min(1.0) * 100.0,
                    elapsed,
                    sent,
                    accepted,
                    accepted - last,
                    stats.retried.load(Ordering::Relaxed),
                );
                last = accepted;
            }
        })
    };

    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (stats, polls, next_voter, args, run, mix) = (
            stats.clone(),
            polls.clone(),
            next_voter.clone(),
            args.clone(),
            run.clone(),
            mix.clone(),
        );
        let mut sender = Sender {
            http: http.clone(),
            urls: urls.clone(),
            batch: args.batch > 0,
            retry_for: Duration::from_secs(args.retry_for),
            stats: stats.clone(),
            next_url: rand::rng().random_range(0..urls.len()),
            latencies: Vec::new(),
            polls: polls.clone(),
            run: run.clone(),
            mix: mix.clone(),
        };
        workers.push(tokio::spawn(async move {
            let mut truth = Truth::new(&polls);
            let keep = args.truth.is_some();
            loop {
                let first = next_voter.fetch_add(per_request, Ordering::Relaxed);
                if args.votes.is_some_and(|votes| first >= votes) {
                    break;
                }
                if args.rate > 0 {
                    let due = started + Duration::from_secs_f64(first as f64 / args.rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                if Instant::now() >= deadline {
                    break;
                }
                let last = args
                    .votes
                    .map_or(first + per_request, |votes| votes.min(first + per_request));
                let votes: Vec<SyntheticVote> = (first..last)
                    .map(|voter| {
                        let mut rng = rand::rng();
                        let voter =
                            if voter > 0 && rng.random_bool(args.repeat_ratio.clamp(0.0, 1.0)) {
                                rng.random_range(0..voter)
                            } else {
                                voter
                            };
                        let voter = args.voters.map_or(voter, |voters| voter % voters.max(1));
                        SyntheticVote::random((voter % polls.len() as u64) as usize, voter, &mix)
                    })
                    .collect();
                stats.sent.fetch_add(votes.len() as u64, Ordering::Relaxed);
                let outcome = sender.send(&votes).await;
                let acked_at = Instant::now();
                let mut watched = 0;
                for (vote, status) in votes.iter().zip(outcome) {
                    match status {
                        Some(202) => {
                            stats.accepted.fetch_add(1, Ordering::Relaxed);
                            if vote.poll == 0 {
                                watched += 1;
                            }
                            truth.add(vote, &polls[vote.poll], (&run, &mix), keep);
                        }
                        Some(_) => {}
                        None => {
                            stats.unresolved.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                if watched > 0 {
                    stats
                        .watched_acks
                        .lock()
                        .expect("stats")
                        .extend(std::iter::repeat_n(acked_at, watched));
                }
            }
            stats
                .latencies_us
                .lock()
                .expect("stats")
                .extend(sender.latencies);
            stats.truth.lock().expect("stats").merge(truth);
        }));
    }
    for worker in workers {
        worker.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_after = own_cpu_seconds();
    progress.abort();
    eprintln!();

    let mut truth = Truth::new(&polls);
    truth.merge(std::mem::take(&mut *stats.truth.lock().expect("stats")));
    if let Some(path) = &args.truth {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        serde_json::to_writer(std::io::BufWriter::new(file), &truth)
            .with_context(|| format!("writing {}", path.display()))?;
    }

    // Wait until the results count exactly the accepted votes of each poll.
    let accepted = stats.accepted.load(Ordering::Relaxed);
    let settle_until = Instant::now() + Duration::from_secs(args.settle);
    let mut all_counted_after = None;
    let mut mismatches = Vec::new();
    let counted = loop {
        let mut total = 0;
        let mut all_there = true;
        mismatches.clear();
        for poll in polls.iter() {
            // A deployment that is still coming back counts as "not yet".
            let results: Value = match http
                .get(format!("{query_url}/v1/polls/{poll}/results"))
                .send()
                .await
            {
                Ok(response) => response.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            let counted = results["total_votes"].as_u64().unwrap_or(0);
            total += counted;
            let expected = &truth.polls[poll];
            if counted < expected.accepted {
                all_there = false;
                continue;
            }
            for option in results["options"].as_array().into_iter().flatten() {
                let id = option["id"].as_str().unwrap_or_default();
                let count = option["count"].as_u64().unwrap_or(0);
                let want = expected.options.get(id).copied().unwrap_or(0);
                if count != want {
                    mismatches.push(format!(
                        "{poll} option {id}: counted {count}, accepted {want}"
                    ));
                }
            }
            if counted != expected.accepted {
                mismatches.push(format!(
                    "{poll}: counted {counted} votes, accepted {}",
                    expected.accepted
                ));
            }
        }
        if all_there {
            all_counted_after = Some(started.elapsed().as_secs_f64());
            break total;
        }
        if Instant::now() > settle_until {
            mismatches.push(format!(
                "only {total} of {accepted} accepted votes counted within {}s",
                args.settle
            ));
            break total;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // The live streams end at the truth too (they may trail the results briefly).
    let live_until = Instant::now() + Duration::from_secs(args.settle.max(10));
    let ended_at_truth = loop {
        let at_truth = polls
            .iter()
            .zip(&watched)
            .all(|(poll, state)| state.lock().expect("watch").last == truth.polls[poll].accepted);
        if at_truth || Instant::now() > live_until || !mismatches.is_empty() {
            break at_truth;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Give the first stream a moment past the final count, then match acks to totals: the
    // i-th acknowledged vote became visible with the first total of at least i.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for watcher in watchers {
        watcher.abort();
    }
    let mut live = LiveSummary {
        ended_at_truth,
        ..Default::default()
    };
    for state in &watched {
        let state = state.lock().expect("watch");
        live.events += state.events;
        live.reconnects += state.reconnects;
        live.went_backwards += state.went_backwards;
        live.backwards_examples.extend(state.examples.clone());
    }
    let mut seen = Vec::new();
    while let Ok(event) = seen_rx.try_recv() {
        seen.push(event);
    }
    // A reconnect replays a snapshot: keep each total's first sighting only.
    seen.dedup_by_key(|event| event.1);
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

    let mut breakdown_ms = BTreeMap::new();
    if args.breakdown_requests > 0 {
        for by in ["country", "country,device"] {
            let mut took = Vec::with_capacity(args.breakdown_requests);
            for _ in 0..args.breakdown_requests {
                let started = Instant::now();
                let response = http
                    .get(format!(
                        "{query_url}/v1/polls/{}/breakdown?by={by}",
                        polls[0]
                    ))
                    .bearer_auth(&args.admin_key)
                    .send()
                    .await?;
                let status = response.status();
                let body = response.bytes().await?;
                if !status.is_success() {
                    bail!(
                        "breakdown by {by} answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    );
                }
                took.push(started.elapsed().as_micros() as u64);
            }
            took.sort_unstable();
            breakdown_ms.insert(
                by,
                [
                    ("p50", percentile(&took, 0.50)),
                    ("p99", percentile(&took, 0.99)),
                    ("votes", truth.polls[&polls[0]].accepted as f64),
                ]
                .into(),
            );
        }
    }

    let mut latencies = std::mem::take(&mut *stats.latencies_us.lock().expect("stats"));
    latencies.sort_unstable();
    let unresolved = stats.unresolved.load(Ordering::Relaxed);
    let summary = Summary {
        target: args.url.join(","),
        mode: if args.batch == 0 {
            "single votes".into()
        } else {
            format!("NDJSON batches of {}", args.batch)
        },
        concurrency: args.concurrency,
        seconds,
        requests: stats.requests.load(Ordering::Relaxed),
        retried: stats.retried.load(Ordering::Relaxed),
        votes_sent: stats.sent.load(Ordering::Relaxed),
        accepted,
        accepted_per_s: accepted as f64 / seconds,
        cpu_seconds: cpu_before
            .zip(cpu_after)
            .map(|(before, after)| after - before),
        unresolved,
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
        exact: mismatches.is_empty() && unresolved == 0,
        mismatches,
        live,
        breakdown_ms,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary, &polls[0]);
    }
    let mut failures = Vec::new();
    if unresolved > 0 {
        failures.push(format!(
            "{unresolved} votes never got a definite answer within {}s",
            args.retry_for
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
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

/// CPU time (user + system) this process has used so far, from `/proc/self/stat`; `None`
/// where there is no such file.
pub fn own_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name (which may hold spaces) start with the state (3rd
    // field); utime and stime are the 14th and 15th, in clock ticks of 1/100 s on Linux.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn print_summary(summary: &Summary, watched_poll: &str) {
    println!("target           {} ({})", summary.target, summary.mode);
    println!(
        "sent             {} votes in {} requests ({} retries) over {:.1}s, {} in flight",
        summary.votes_sent, summary.requests, summary.retried, summary.seconds, summary.concurrency
    );
    println!(
        "accepted         {} ({:.0}/s), {} without a definite answer",
        summary.accepted, summary.accepted_per_s, summary.unresolved
    );
    println!("by status        {:?}", summary.statuses);
    if let Some(cpu) = summary.cpu_seconds {
        println!(
            "client CPU       {cpu:.1} s ({:.1} µs per accepted vote)",
            cpu * 1e6 / summary.accepted.max(1) as f64
        );
    }
    println!(
        "request latency  p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms",
        summary.latency_ms["p50"], summary.latency_ms["p95"], summary.latency_ms["p99"]
    );
    println!(
        "vote→live        p50 {:.1} ms, p99 {:.1} ms ({} votes seen on the SSE stream of {watched_poll})",
        summary.visible_ms["p50"], summary.visible_ms["p99"], summary.visible_ms["samples"],
    );
    println!(
        "live streams     {} events, {} reconnects, {} times backwards, ended at the truth: {}",
        summary.live.events,
        summary.live.reconnects,
        summary.live.went_backwards,
        summary.live.ended_at_truth
    );
    match (summary.all_counted_after_s, summary.counted_per_s) {
        (Some(after), Some(rate)) => println!(
            "counted          all {} after {after:.2}s from the first vote: {rate:.0} counted votes/s",
            summary.counted
        ),
        _ => println!(
            "counted          {} of {} accepted",
            summary.counted, summary.accepted
        ),
    }
    for (by, took) in &summary.breakdown_ms {
        println!(
            "breakdown        by={by}: p50 {:.1} ms, p99 {:.1} ms over {} votes",
            took["p50"], took["p99"], took["votes"]
        );
    }
    if summary.mismatches.is_empty() {
        println!("exact            {}", summary.exact);
    } else {
        for mismatch in &summary.mismatches {
            println!("MISMATCH         {mismatch}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_default_mix_has_four_keys_and_one_own_dimension() {
        let mix: SegmentMix = DEFAULT_SEGMENT_MIX.parse().expect("default mix");
        let keys: Vec<&str> = mix.keys.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(keys, ["country", "device", "channel", "plan"]);
        assert_eq!(mix.dimensions(), ["plan"]);
        assert_eq!(mix.keys[0].values.len(), 8);
    }

    #[test]
    fn values_come_up_as_often_as_their_weights_say() {
        let mix: SegmentMix = "country=US:3,DE;plan=pro".parse().expect("mix");
        assert_eq!(mix.keys[0].cumulative, [3, 4]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let draws = 20_000;
        let us = (0..draws)
            .filter(|_| {
                let picked = mix.pick(&mut rng);
                let values: Vec<(&str, &str)> = mix.values(&picked).collect();
                assert_eq!(values[1], ("plan", "pro"));
                values[0].1 == "US"
            })
            .count();
        let share = us as f64 / draws as f64;
        assert!(
            (0.72..0.78).contains(&share),
            "US came up {share} of the time, not 3/4"
        );
    }

    #[test]
    fn a_bad_mix_is_refused_with_what_to_fix() {
        for (spec, says) in [
            ("country", "expected key=value"),
            ("country=US:0", "whole number above 0"),
            ("country=US:x", "whole number above 0"),
            ("coun try=US", "letters, digits"),
            ("country=US;country=DE", "given twice"),
            ("country=US,,DE", "empty value"),
            ("a=1;b=1;c=1;d=1;e=1;f=1;g=1;h=1;i=1", "at most 8"),
        ] {
            let err = spec.parse::<SegmentMix>().expect_err(spec);
            assert!(err.contains(says), "{spec}: {err}");
        }
    }

    #[test]
    fn votes_are_written_as_json_the_api_takes() {
        let mix: SegmentMix = r#"country=D"E;tier=gold"#.parse().expect("mix");
        let vote = SyntheticVote {
            poll: 0,
            voter: 12,
            nonce: 34,
            choice: 1,
            segment: [0; MAX_MIX_KEYS],
        };
        let json = vote.to_value("p-1", "run", &mix);
        assert_eq!(
            json,
            json!({"poll_id": "p-1", "voter_id": "lg-run-12", "vote_id": "lg-run-12-34",
                   "choice": "green", "segment": {"country": "D\"E", "tier": "gold"}})
        );
        assert_eq!(mix.dimensions(), ["tier"]);
    }
}
