//! The load itself: the polls it goes to, `--concurrency` senders taking voter numbers from
//! one counter (paced to `--rate` when given), and the retries of votes whose outcome is
//! unknown. Each sender keeps its own account ([`Sent`]) and they are added up at the end,
//! so the hot path shares nothing but a few counters for the progress line.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use rand::Rng;
use serde::Deserialize;
use tally_core::api::{Accepted, PollDoc};
use tally_core::poll::{Dedupe, NewPoll, PollKind, PollOption};
use tokio::task::JoinSet;

use crate::mix::SegmentMix;
use crate::truth::{Tally, Truth};
use crate::vote::{SyntheticVote, OPTIONS};
use crate::LoadgenArgs;

/// Where the votes go and what they are made of; shared by every sender.
pub struct Target {
    pub http: reqwest::Client,
    /// Base URLs votes go to, in turn.
    pub urls: Vec<String>,
    pub polls: Vec<String>,
    /// This run's part of every voter and vote id.
    pub run: String,
    pub mix: SegmentMix,
    /// The key batches are imported with (an admin or ingest key).
    pub batch_key: String,
}

/// Creates the `--polls` polls the load goes to (`<prefix>-0`, `<prefix>-1`, …).
pub async fn create_polls(
    http: &reqwest::Client,
    query_url: &str,
    args: &LoadgenArgs,
    prefix: &str,
) -> anyhow::Result<Vec<String>> {
    let mut polls = Vec::new();
    for i in 0..args.polls.max(1) {
        let id = format!("{prefix}-{i}");
        create_poll(
            http,
            query_url,
            &args.admin_key,
            &id,
            &args.segment_mix,
            args.dedupe,
            args.spread,
        )
        .await?;
        polls.push(id);
    }
    Ok(polls)
}

/// Creates a load poll: single choice over [`OPTIONS`], the mix's own keys as its
/// dimensions, results anyone may see.
pub async fn create_poll(
    http: &reqwest::Client,
    query_url: &str,
    admin_key: &str,
    id: &str,
    mix: &SegmentMix,
    dedupe: Dedupe,
    spread: u16,
) -> anyhow::Result<()> {
    let poll = NewPoll {
        id: Some(id.to_owned()),
        title: "Load test".into(),
        question: "Which colour?".into(),
        kind: PollKind::Single,
        options: OPTIONS
            .iter()
            .map(|option| PollOption {
                id: (*option).into(),
                label: (*option).into(),
            })
            .collect(),
        max_choices: None,
        scale: None,
        campaign: None,
        dimensions: mix.dimensions().into_iter().map(str::to_owned).collect(),
        dedupe,
        require_token: false,
        results_visibility: Default::default(),
        allowed_origins: Vec::new(),
        opens_at: None,
        closes_at: None,
        spread,
    };
    let response = http
        .post(format!("{query_url}/v1/polls"))
        .bearer_auth(admin_key)
        .json(&poll)
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
    let created: PollDoc = response.json().await.context("reading a created poll")?;
    ensure!(
        created.poll.id == id,
        "creating poll {id} made {}",
        created.poll.id
    );
    Ok(())
}

/// What the votes are, and how fast and how long they are sent.
#[derive(Clone, Copy)]
pub struct Schedule {
    /// Votes per second; 0 is as fast as the deployment answers.
    pub rate: u64,
    pub duration: Duration,
    /// Stop after this many votes.
    pub votes: Option<u64>,
    /// Votes per request: a batch, or 1.
    pub per_request: u64,
    pub repeat_ratio: f64,
    pub voters: Option<u64>,
    /// How long a vote with an unknown outcome is sent again.
    pub retry_for: Duration,
    /// Keep every accepted vote in the truth (`--truth`).
    pub keep_votes: bool,
    pub concurrency: usize,
    pub batch: bool,
    pub progress: bool,
}

impl Schedule {
    /// The voter of the `n`-th vote: a fresh one, or (a `repeat_ratio` share of the time)
    /// one who voted before; always one of the `voters` when the electorate is bounded.
    fn voter(&self, n: u64, rng: &mut impl Rng) -> u64 {
        let voter = if n > 0 && rng.random_bool(self.repeat_ratio.clamp(0.0, 1.0)) {
            rng.random_range(0..n)
        } else {
            n
        };
        self.voters.map_or(voter, |voters| voter % voters.max(1))
    }
}

/// One answer to one vote: an HTTP status (per line of a batch), or none at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Answer {
    Status(u16),
    /// The connection failed, or the answer broke off or did not say.
    Connection,
    Timeout,
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Status(status) => write!(f, "{status}"),
            Answer::Connection => f.write_str("connection"),
            Answer::Timeout => f.write_str("timeout"),
        }
    }
}

impl Answer {
    /// The status, when it settles the vote's fate: 408, 429 and 5xx leave it open, and a
    /// careful client sends the vote again.
    fn definite(self) -> Option<u16> {
        match self {
            Answer::Status(408 | 429 | 500..=599) => None,
            Answer::Status(status) => Some(status),
            Answer::Connection | Answer::Timeout => None,
        }
    }
}

/// What the load sent and what came of it: each sender's own account, added up at the end.
pub struct Sent {
    pub requests: u64,
    /// Requests sent again after an unknown outcome.
    pub retried: u64,
    pub votes: u64,
    pub accepted: u64,
    /// Votes still without a definite answer when `--retry-for` ran out.
    pub unresolved: u64,
    /// 202 answers that did not name the vote sent.
    pub misacknowledged: u64,
    /// Answers per attempt.
    pub answers: BTreeMap<Answer, u64>,
    pub latencies_us: Vec<u64>,
    /// When each vote to the first poll (the one whose vote→live latency is measured) was
    /// acknowledged with 202.
    pub watched_acks: Vec<Instant>,
    /// The accepted votes, counted by index while the load runs.
    tally: Tally,
    /// The accepted votes by name: made from the tally when the load ends.
    pub truth: Truth,
    /// When the first vote was sent, how long the load took, and the CPU time this process
    /// used meanwhile (`None` where it cannot be read).
    pub started: Instant,
    pub seconds: f64,
    pub cpu_seconds: Option<f64>,
}

impl Sent {
    fn new(started: Instant) -> Sent {
        Sent {
            requests: 0,
            retried: 0,
            votes: 0,
            accepted: 0,
            unresolved: 0,
            misacknowledged: 0,
            answers: BTreeMap::new(),
            latencies_us: Vec::new(),
            watched_acks: Vec::new(),
            tally: Tally::default(),
            truth: Truth::default(),
            started,
            seconds: 0.0,
            cpu_seconds: None,
        }
    }

    fn merge(&mut self, other: Sent) {
        self.requests += other.requests;
        self.retried += other.retried;
        self.votes += other.votes;
        self.accepted += other.accepted;
        self.unresolved += other.unresolved;
        self.misacknowledged += other.misacknowledged;
        for (answer, count) in other.answers {
            *self.answers.entry(answer).or_default() += count;
        }
        self.latencies_us.extend(other.latencies_us);
        self.watched_acks.extend(other.watched_acks);
        self.tally.merge(other.tally);
    }
}

/// What the progress line shows while the load runs.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    accepted: AtomicU64,
    retried: AtomicU64,
}

/// Sends the whole load and returns its account. Dropping the future ends every sender.
pub async fn send(target: Arc<Target>, schedule: Schedule) -> anyhow::Result<Sent> {
    let counters = Arc::new(Counters::default());
    let next_vote = Arc::new(AtomicU64::new(0));
    let cpu_before = crate::own_cpu_seconds();
    let started = Instant::now();
    let mut progress = JoinSet::new();
    if schedule.progress {
        progress.spawn(show_progress(counters.clone(), schedule, started));
    }
    let mut senders = JoinSet::new();
    for _ in 0..schedule.concurrency.max(1) {
        let sender = Sender {
            next_url: rand::rng().random_range(0..target.urls.len()),
            target: target.clone(),
            schedule,
            counters: counters.clone(),
        };
        senders.spawn(sender.run(next_vote.clone(), started));
    }
    let mut sent = Sent::new(started);
    while let Some(account) = senders.join_next().await {
        sent.merge(account.context("a sender failed")?);
    }
    sent.seconds = started.elapsed().as_secs_f64();
    sent.cpu_seconds = cpu_before
        .zip(crate::own_cpu_seconds())
        .map(|(before, after)| after - before);
    let tally = std::mem::take(&mut sent.tally);
    sent.truth = Truth::of(tally, &target.polls, &target.mix);
    if schedule.progress {
        progress.shutdown().await;
        eprintln!();
    }
    Ok(sent)
}

/// One of the `--concurrency` senders: one request in flight at a time, until the load's
/// votes or time run out.
struct Sender {
    target: Arc<Target>,
    schedule: Schedule,
    counters: Arc<Counters>,
    /// Which of the URLs the next attempt goes to.
    next_url: usize,
}

impl Sender {
    /// Takes the next `per_request` vote numbers from `next_vote` (every sender shares it,
    /// so vote `n` is sent at `started + n / rate`) until the load is done.
    async fn run(mut self, next_vote: Arc<AtomicU64>, started: Instant) -> Sent {
        let schedule = self.schedule;
        let deadline = started + schedule.duration;
        let mut sent = Sent::new(started);
        loop {
            let first = next_vote.fetch_add(schedule.per_request, Ordering::Relaxed);
            if schedule.votes.is_some_and(|votes| first >= votes) {
                break;
            }
            if schedule.rate > 0 {
                let due = started + Duration::from_secs_f64(first as f64 / schedule.rate as f64);
                tokio::time::sleep_until(due.into()).await;
            }
            if Instant::now() >= deadline {
                break;
            }
            let last = schedule
                .votes
                .map_or(first + schedule.per_request, |votes| {
                    votes.min(first + schedule.per_request)
                });
            let votes: Vec<SyntheticVote> = (first..last)
                .map(|n| {
                    let voter = schedule.voter(n, &mut rand::rng());
                    let poll = (voter % self.target.polls.len() as u64) as usize;
                    SyntheticVote::random(poll, voter, &self.target.mix)
                })
                .collect();
            sent.votes += votes.len() as u64;
            self.counters
                .sent
                .fetch_add(votes.len() as u64, Ordering::Relaxed);
            let outcomes = self.send(&votes, &mut sent).await;
            self.record(&votes, &outcomes, &mut sent);
        }
        sent
    }

    /// Counts the final outcome of each vote; accepted votes go into the truth.
    fn record(&self, votes: &[SyntheticVote], outcomes: &[Option<u16>], sent: &mut Sent) {
        let acked_at = Instant::now();
        let target = &*self.target;
        for (vote, outcome) in votes.iter().zip(outcomes) {
            match outcome {
                Some(202) => {
                    sent.accepted += 1;
                    self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    if vote.poll == 0 {
                        sent.watched_acks.push(acked_at);
                    }
                    sent.tally.add(vote, &target.mix);
                    if self.schedule.keep_votes {
                        let poll = &target.polls[vote.poll];
                        sent.tally.keep(vote, poll, &target.run, &target.mix);
                    }
                }
                Some(_) => {}
                None => sent.unresolved += 1,
            }
        }
    }

    /// Sends the votes (one request, or one batch) until each has a definite answer or
    /// `retry_for` runs out; each vote's final status, `None` when still unknown. A retry
    /// carries the same votes, unchanged, so the deployment can tell it is one.
    async fn send(&mut self, votes: &[SyntheticVote], sent: &mut Sent) -> Vec<Option<u16>> {
        let mut outcomes: Vec<Option<u16>> = vec![None; votes.len()];
        let mut pending: Vec<usize> = (0..votes.len()).collect();
        let first_try = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let url_count = self.target.urls.len();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let base = &self.target.urls[self.next_url % url_count];
            self.next_url = self.next_url.wrapping_add(1);
            let sent_at = Instant::now();
            let (answers, wait) = self.attempt(base, votes, &pending, sent).await;
            sent.latencies_us.push(sent_at.elapsed().as_micros() as u64);
            sent.requests += 1;
            let mut still = Vec::new();
            for (&index, answer) in pending.iter().zip(answers) {
                match answer.definite() {
                    Some(status) => outcomes[index] = Some(status),
                    None => still.push(index),
                }
            }
            pending = still;
            if pending.is_empty() || first_try.elapsed() >= self.schedule.retry_for {
                return outcomes;
            }
            sent.retried += 1;
            self.counters.retried.fetch_add(1, Ordering::Relaxed);
            // With several URLs the retry first goes straight to the next one; a pause
            // comes once each has been tried.
            if attempts % url_count == 0 {
                tokio::time::sleep(wait.unwrap_or(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }

    /// One request carrying the `pending` votes: the answer to each (in `pending` order)
    /// and how long the deployment asked to wait before a retry.
    async fn attempt(
        &self,
        base: &str,
        votes: &[SyntheticVote],
        pending: &[usize],
        sent: &mut Sent,
    ) -> (Vec<Answer>, Option<Duration>) {
        let target = &*self.target;
        let request = if self.schedule.batch {
            let mut body = Vec::with_capacity(pending.len() * 200);
            for &index in pending {
                let vote = &votes[index];
                vote.write_json(
                    &mut body,
                    &target.polls[vote.poll],
                    &target.run,
                    &target.mix,
                );
                body.push(b'\n');
            }
            target
                .http
                .post(format!("{base}/v1/votes:batch"))
                .bearer_auth(&target.batch_key)
                .header("content-type", "application/x-ndjson")
                .body(body)
        } else {
            let vote = &votes[pending[0]];
            let poll = &target.polls[vote.poll];
            let mut body = Vec::with_capacity(200);
            vote.write_json(&mut body, poll, &target.run, &target.mix);
            target
                .http
                .post(format!("{base}/v1/polls/{poll}/votes"))
                .header("content-type", "application/json")
                .body(body)
        };
        let answers = match request.send().await {
            Err(err) if err.is_timeout() => (vec![Answer::Timeout; pending.len()], None),
            Err(_) => (vec![Answer::Connection; pending.len()], None),
            Ok(response) => {
                let wait = retry_after(&response);
                let status = response.status().as_u16();
                let answers = match response.bytes().await {
                    // The answer broke off: its outcome is unknown.
                    Err(_) => vec![Answer::Connection; pending.len()],
                    Ok(body) => {
                        let names =
                            |i: usize, id: &str| votes[pending[i]].is_named_by(&target.run, id);
                        let read =
                            read_answer(self.schedule.batch, status, &body, pending.len(), names);
                        sent.misacknowledged += read.misacknowledged;
                        read.answers
                    }
                };
                (answers, wait)
            }
        };
        for answer in &answers.0 {
            *sent.answers.entry(*answer).or_default() += 1;
        }
        answers
    }
}

/// The answers one response gives to the votes it carried.
struct ReadAnswer {
    answers: Vec<Answer>,
    /// 202s that did not name the vote sent.
    misacknowledged: u64,
}

/// The fields of a [`LineResult`](tally_core::api::LineResult) a sender reads, borrowed
/// from the answer. Reading [`BatchResult`](tally_core::api::BatchResult) itself (whose
/// flattened `problem` buffers every line, and which allocates every `vote_id`) cost ~150 ns
/// more per vote in a release build, a fifth of all the client spends on a batched vote; a
/// test checks that this reads what `BatchResult` writes.
#[derive(Deserialize)]
struct BatchAnswer<'a> {
    #[serde(borrow)]
    results: Vec<LineAnswer<'a>>,
}

#[derive(Deserialize)]
struct LineAnswer<'a> {
    line: usize,
    status: u16,
    #[serde(borrow, default)]
    vote_id: Option<std::borrow::Cow<'a, str>>,
}

/// Reads a response to `count` votes; `names(i, id)` says whether `id` is the `vote_id` of
/// the i-th vote it carried. A batch (`200`) answers per line; any other answer is the same
/// for every vote. A 202 names the vote it accepts: a careful client checks that it was
/// this one.
fn read_answer(
    batch: bool,
    status: u16,
    body: &[u8],
    count: usize,
    names: impl Fn(usize, &str) -> bool,
) -> ReadAnswer {
    let mut misacknowledged = 0;
    let answers = if batch && status == 200 {
        // A line that is missing from the answer, or an answer that is not a batch
        // result, leaves its votes' outcome unknown.
        let mut answers = vec![Answer::Connection; count];
        let lines = serde_json::from_slice::<BatchAnswer>(body)
            .map(|answer| answer.results)
            .unwrap_or_default();
        for line in lines {
            let Some(slot) = line.line.checked_sub(1).filter(|&i| i < count) else {
                continue;
            };
            answers[slot] = Answer::Status(line.status);
            if line.status == 202 && !line.vote_id.is_some_and(|id| names(slot, &id)) {
                misacknowledged += 1;
            }
        }
        answers
    } else {
        if status == 202 {
            let accepted = serde_json::from_slice::<Accepted>(body).ok();
            misacknowledged += (0..count)
                .filter(|&i| !accepted.as_ref().is_some_and(|a| names(i, &a.vote_id)))
                .count() as u64;
        }
        vec![Answer::Status(status); count]
    };
    ReadAnswer {
        answers,
        misacknowledged,
    }
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

/// Redraws one line on stderr every second: how far the load is, and how it goes.
async fn show_progress(counters: Arc<Counters>, schedule: Schedule, started: Instant) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = 0;
    loop {
        tick.tick().await;
        let accepted = counters.accepted.load(Ordering::Relaxed);
        let sent = counters.sent.load(Ordering::Relaxed);
        let elapsed = started.elapsed().as_secs_f64();
        let mut done = elapsed / schedule.duration.as_secs_f64().max(1.0);
        if let Some(votes) = schedule.votes {
            done = done.max(sent as f64 / votes.max(1) as f64);
        }
        let filled = (done.min(1.0) * 24.0).round() as usize;
        eprint!(
            "\r[{}{}] {:>3.0}% {:>4.0}s  sent {:>9}  accepted {:>9}  {:>7}/s  retried {:>6}  ",
            "#".repeat(filled),
            "-".repeat(24 - filled),
            done.min(1.0) * 100.0,
            elapsed,
            sent,
            accepted,
            accepted - last,
            counters.retried.load(Ordering::Relaxed),
        );
        last = accepted;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: usize, named: &str) -> bool {
        named == format!("v-{i}")
    }

    #[test]
    fn batch_answers_are_read_as_the_api_writes_them() {
        use tally_core::api::{BatchResult, LineProblem, LineResult};
        let written = BatchResult {
            accepted: 1,
            rejected: 1,
            results: vec![
                LineResult {
                    line: 1,
                    status: 202,
                    vote_id: Some("v-0".into()),
                    problem: None,
                },
                LineResult {
                    line: 2,
                    status: 422,
                    vote_id: None,
                    problem: Some(LineProblem {
                        kind: "https://tally.dev/problems/invalid-vote".into(),
                        title: "Invalid vote".into(),
                        detail: "option `x` is not one of red, green".into(),
                        field: Some("choice".into()),
                    }),
                },
            ],
        };
        let body = serde_json::to_vec(&written).expect("json");
        let read = read_answer(true, 200, &body, 2, id);
        assert_eq!(read.answers, [Answer::Status(202), Answer::Status(422)]);
        assert_eq!(read.misacknowledged, 0);
    }

    #[test]
    fn batch_lines_answer_the_votes_by_their_line_number() {
        let body = serde_json::json!({"accepted": 2, "rejected": 1, "results": [
            {"line": 3, "status": 202, "vote_id": "v-2"},
            {"line": 1, "status": 202, "vote_id": "v-0"},
            {"line": 2, "status": 409, "type": "https://tally.dev/problems/duplicate",
             "title": "Already voted", "detail": "this voter has voted"},
        ]});
        let read = read_answer(true, 200, body.to_string().as_bytes(), 4, id);
        assert_eq!(
            read.answers,
            [
                Answer::Status(202),
                Answer::Status(409),
                Answer::Status(202),
                // No line answered the fourth vote: its outcome is unknown.
                Answer::Connection,
            ]
        );
        assert_eq!(read.misacknowledged, 0);
    }

    #[test]
    fn an_acceptance_naming_another_vote_is_counted() {
        let batch = serde_json::json!({"accepted": 1, "rejected": 0, "results": [
            {"line": 1, "status": 202, "vote_id": "v-9"},
        ]});
        let read = read_answer(true, 200, batch.to_string().as_bytes(), 1, id);
        assert_eq!(read.misacknowledged, 1);

        let single = br#"{"vote_id": "v-0", "status": "accepted"}"#;
        assert_eq!(read_answer(false, 202, single, 1, id).misacknowledged, 0);
        let other = br#"{"vote_id": "v-7", "status": "accepted"}"#;
        assert_eq!(read_answer(false, 202, other, 1, id).misacknowledged, 1);
        assert_eq!(read_answer(false, 202, b"ok", 1, id).misacknowledged, 1);
    }

    #[test]
    fn any_other_answer_is_the_same_for_every_vote_it_carried() {
        let read = read_answer(true, 503, b"{}", 3, id);
        assert_eq!(read.answers, [Answer::Status(503); 3]);
        let read = read_answer(true, 200, b"not a batch result", 2, id);
        assert_eq!(read.answers, [Answer::Connection; 2]);
    }

    #[test]
    fn only_a_definite_answer_settles_a_vote() {
        for status in [202, 400, 404, 409, 422] {
            assert_eq!(Answer::Status(status).definite(), Some(status));
        }
        for open in [408, 429, 500, 503] {
            assert_eq!(Answer::Status(open).definite(), None);
        }
        assert_eq!(Answer::Connection.definite(), None);
        assert_eq!(Answer::Timeout.definite(), None);
    }

    #[test]
    fn a_bounded_electorate_only_repeats_voters() {
        let schedule = Schedule {
            rate: 0,
            duration: Duration::from_secs(1),
            votes: None,
            per_request: 1,
            repeat_ratio: 0.0,
            voters: Some(10),
            retry_for: Duration::ZERO,
            keep_votes: false,
            concurrency: 1,
            batch: false,
            progress: false,
        };
        let mut rng = rand::rng();
        let voters: Vec<u64> = (0..25).map(|n| schedule.voter(n, &mut rng)).collect();
        assert_eq!(voters[..10], (0..10).collect::<Vec<_>>());
        assert_eq!(voters[20..], [0, 1, 2, 3, 4]);
        let repeating = Schedule {
            repeat_ratio: 1.0,
            voters: None,
            ..schedule
        };
        assert_eq!(repeating.voter(0, &mut rng), 0, "the first voter is new");
        assert!((1..100).all(|n| repeating.voter(n, &mut rng) < n));
    }
}
