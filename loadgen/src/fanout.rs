//! `tally-loadgen fanout`: many live clients of one poll while votes come in, and how long
//! each update of its totals takes to reach every one of them.
//!
//! The clients are plain TCP connections, each bound to one of many 127.x.y.z source
//! addresses (a server caps live streams per address), that send one `GET …/live` and then
//! only read: a client costs this process a task and a small buffer, so the measurement is
//! the server's, not the client's. A client scans what it reads for the `id:` line of each
//! event (the poll's log position) and the `updated_at` of the first event that brings a
//! new position.
//!
//! An update is a new position of the poll's totals. It has reached every client once each
//! connected client has seen it or a later one (a client may skip an update: the server
//! coalesces what comes faster than a client's minimum interval). For each update the run
//! records when the first client saw it, when the last one did, and the `updated_at` the
//! processor stamped it with, so two delays come out: the spread between the first and the
//! last client, and the age of the update when the last client saw it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde::Serialize;
use tally_core::poll::Dedupe;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::task::JoinSet;

use crate::mix::{SegmentMix, DEFAULT_SEGMENT_MIX};
use crate::report::percentile_ms;
use crate::vote::SyntheticVote;
use crate::{rss_mib, PeakRss};

/// What to run.
#[derive(clap::Args, Clone, Debug)]
pub struct FanoutArgs {
    /// Base URL of the query service (or standalone process) the clients connect to; an
    /// `http://` address of this machine.
    #[arg(long)]
    pub query_url: String,
    /// Base URL votes go to (ingest); the query URL when not given.
    #[arg(long)]
    pub ingest_url: Option<String>,
    /// Admin API key: creates the poll and sends its votes.
    #[arg(long, env = "TALLY_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: String,
    /// Live clients to hold.
    #[arg(long, default_value_t = 1_000)]
    pub clients: usize,
    /// Clients per source address (keep it at or under the server's
    /// `TALLY_LIVE_MAX_PER_ADDRESS`).
    #[arg(long, default_value_t = 100)]
    pub per_address: usize,
    /// Votes per second sent to the poll while the clients are measured (NDJSON batches,
    /// ten a second).
    #[arg(long, default_value_t = 5_000)]
    pub rate: u64,
    /// Seconds of votes.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// The server process (on this machine) whose memory and CPU are read: its resident
    /// memory before and after the clients connect, its CPU over the votes.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print the summary as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What the run measured.
#[derive(Serialize, Debug, Default)]
pub struct FanoutSummary {
    pub clients: usize,
    pub source_addresses: usize,
    /// Seconds until every client had its first event (the snapshot).
    pub connect_seconds: f64,
    /// Clients whose stream ended or failed while measured.
    pub dropped: u64,
    pub votes_sent: u64,
    /// Updates (new positions) first seen while votes came.
    pub updates: usize,
    /// Updates that had not reached every client when the run ended.
    pub incomplete: usize,
    /// Time from the first client seeing an update to the last one seeing it (or a later).
    pub spread_ms: Percentiles,
    /// An update's age (from its `updated_at`) when the last client saw it.
    pub age_ms: Percentiles,
    /// Events the clients received while votes came (snapshots not counted).
    pub events: u64,
    pub events_per_second: f64,
    pub server_rss_before_mib: Option<f64>,
    pub server_rss_connected_mib: Option<f64>,
    /// (RSS with the clients connected − RSS before) / clients.
    pub server_kib_per_client: Option<f64>,
    pub server_rss_peak_mib: Option<f64>,
    /// The server's CPU over the votes, per event delivered.
    pub server_cpu_us_per_event: Option<f64>,
    /// This process's CPU over the votes, per event received.
    pub client_cpu_us_per_event: Option<f64>,
}

#[derive(Serialize, Debug, Default)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(mut us: Vec<u64>) -> Percentiles {
        us.sort_unstable();
        Percentiles {
            p50: percentile_ms(&us, 0.50),
            p99: percentile_ms(&us, 0.99),
            max: percentile_ms(&us, 1.0),
        }
    }
}

impl std::fmt::Display for FanoutSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |v: Option<f64>, digits: usize| {
            v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
        };
        writeln!(
            f,
            "clients            {} over {} source addresses, all connected in {:.1} s, {} dropped",
            self.clients, self.source_addresses, self.connect_seconds, self.dropped
        )?;
        writeln!(
            f,
            "votes              {} sent; {} updates, {} incomplete",
            self.votes_sent, self.updates, self.incomplete
        )?;
        writeln!(
            f,
            "every client       spread p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; age p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            self.spread_ms.p50,
            self.spread_ms.p99,
            self.spread_ms.max,
            self.age_ms.p50,
            self.age_ms.p99,
            self.age_ms.max
        )?;
        writeln!(
            f,
            "events             {} ({:.0}/s)",
            self.events, self.events_per_second
        )?;
        writeln!(
            f,
            "server             RSS {} MiB before, {} MiB connected ({} KiB per client), peak {} MiB; CPU {} µs per event",
            opt(self.server_rss_before_mib, 0),
            opt(self.server_rss_connected_mib, 0),
            opt(self.server_kib_per_client, 1),
            opt(self.server_rss_peak_mib, 0),
            opt(self.server_cpu_us_per_event, 2),
        )?;
        writeln!(
            f,
            "client             CPU {} µs per event",
            opt(self.client_cpu_us_per_event, 2)
        )
    }
}

/// One update: a new position of the poll's totals.
struct Update {
    first: Instant,
    /// The processor's `updated_at`, epoch ms, once a client read it.
    updated_at_ms: Option<i64>,
    /// Live clients that have seen it or a later one.
    reached: usize,
    /// When the last live client did: (instant, epoch ms).
    all: Option<(Instant, i64)>,
}

/// What every client has seen.
struct Board {
    /// Per client, the highest position seen (0 before any; `u64::MAX`: gone).
    seen: Vec<u64>,
    live: usize,
    /// Updates are recorded once this is set (after every client connected).
    measuring: bool,
    updates: BTreeMap<u64, Update>,
    dropped: u64,
    /// Clients that have had their first event.
    greeted: usize,
}

impl Board {
    /// Client `c` saw position `id`; answers whether it is a new update whose
    /// `updated_at` is wanted.
    fn saw(&mut self, c: usize, id: u64) -> bool {
        let before = self.seen[c];
        if before == u64::MAX || id <= before {
            return false;
        }
        self.seen[c] = id;
        let (now, now_ms) = (Instant::now(), tally_core::time::now_ms());
        let live = self.live;
        for (_, update) in self.updates.range_mut(before + 1..=id) {
            update.reached += 1;
            if update.reached >= live && update.all.is_none() {
                update.all = Some((now, now_ms));
            }
        }
        if !self.measuring || self.updates.contains_key(&id) {
            return false;
        }
        let reached = self
            .seen
            .iter()
            .filter(|&&s| s != u64::MAX && s >= id)
            .count();
        self.updates.insert(
            id,
            Update {
                first: now,
                updated_at_ms: None,
                reached,
                all: (reached >= live).then_some((now, now_ms)),
            },
        );
        true
    }

    fn updated_at(&mut self, id: u64, ms: i64) {
        if let Some(update) = self.updates.get_mut(&id) {
            update.updated_at_ms.get_or_insert(ms);
        }
    }

    /// Client `c` is gone: updates no longer wait for it.
    fn gone(&mut self, c: usize) {
        let before = std::mem::replace(&mut self.seen[c], u64::MAX);
        if before == u64::MAX {
            return;
        }
        self.dropped += u64::from(self.measuring);
        for (_, update) in self.updates.range_mut(..=before) {
            update.reached -= 1;
        }
        self.live -= 1;
        let (now, now_ms) = (Instant::now(), tally_core::time::now_ms());
        for update in self.updates.values_mut() {
            if update.all.is_none() && update.reached >= self.live {
                update.all = Some((now, now_ms));
            }
        }
    }
}

/// `host:port` of an `http://` URL of this machine.
async fn address_of(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("`{url}`: the clients speak plain http://"))?;
    let host = rest.split('/').next().unwrap_or(rest);
    let address = tokio::net::lookup_host(host)
        .await
        .with_context(|| format!("resolving {host}"))?
        .find(SocketAddr::is_ipv4)
        .with_context(|| format!("{host} has no IPv4 address"))?;
    ensure!(
        address.ip().is_loopback(),
        "{url}: the clients bind loopback source addresses, so the server must be on 127.0.0.0/8"
    );
    Ok(address)
}

/// The `k`-th source address: 127.1.0.1, 127.1.0.2, … (avoiding 127.0.0.x, where the
/// servers listen).
fn source(k: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        1 + (k / 62_500) as u8,
        (k / 250 % 250) as u8,
        (k % 250 + 1) as u8,
    ))
}

/// Runs the fan-out and reports it.
pub async fn run(args: FanoutArgs) -> anyhow::Result<FanoutSummary> {
    ensure!(args.clients > 0, "--clients must be at least 1");
    ensure!(args.per_address > 0, "--per-address must be at least 1");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    // The clients watch a poll of their own; anyone may see its live totals.
    let poll = format!(
        "fanout-{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    let mix = mix()?;
    crate::load::create_poll(
        &http,
        &args.query_url,
        &args.admin_key,
        &poll,
        &mix,
        Dedupe::None,
        1,
    )
    .await?;
    let server = address_of(&args.query_url).await?;
    let request: Arc<[u8]> = format!(
        "GET /v1/polls/{poll}/live HTTP/1.1\r\nHost: {server}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .into_bytes()
    .into();

    let board = Arc::new(Mutex::new(Board {
        seen: vec![0; args.clients],
        live: args.clients,
        measuring: false,
        updates: BTreeMap::new(),
        dropped: 0,
        greeted: 0,
    }));
    let events = Arc::new(AtomicU64::new(0));
    let rss_before = args.server_pid.and_then(rss_mib);
    let started = Instant::now();
    let mut clients = JoinSet::new();
    for c in 0..args.clients {
        let (board, events, request) = (board.clone(), events.clone(), request.clone());
        let from = source(c / args.per_address);
        clients.spawn(async move {
            let outcome = client(c, from, server, &request, &board, &events).await;
            board.lock().expect("board").gone(c);
            outcome
        });
        // Connect in waves, so the server's accept queue is not what is measured.
        if c % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Every client has its snapshot, or the run stops.
    let connect_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (greeted, live) = {
            let board = board.lock().expect("board");
            (board.greeted, board.live)
        };
        if greeted >= args.clients {
            break;
        }
        if live < args.clients || Instant::now() > connect_deadline {
            let reason = match clients.try_join_next() {
                Some(Ok(Err(err))) => format!("{err:#}"),
                _ => "no error seen".to_owned(),
            };
            bail!(
                "{greeted} of {} clients got their snapshot ({} streams ended; first reason: {reason})",
                args.clients,
                args.clients - live
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    // Let the server settle before its memory is read.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_connected = args.server_pid.and_then(rss_mib);

    let pid = args.server_pid.map(|p| p.to_string());
    let server_cpu_before = pid.as_deref().and_then(crate::cpu_seconds_of);
    let own_cpu_before = crate::own_cpu_seconds();
    board.lock().expect("board").measuring = true;
    events.store(0, Ordering::Relaxed);
    let votes_started = Instant::now();
    let sampler = args
        .server_pid
        .map(|pid| PeakRss::sample(pid, Duration::from_millis(250)));
    let votes_sent = send_votes(&http, &args, &poll, &mix).await?;
    let voting = votes_started.elapsed().as_secs_f64();
    let events_seen = events.load(Ordering::Relaxed);
    let server_cpu = pid.as_deref().and_then(crate::cpu_seconds_of);
    let own_cpu = crate::own_cpu_seconds();
    // Stop taking new updates, and give the last ones time to reach everyone.
    board.lock().expect("board").measuring = false;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let peak_rss = sampler.and_then(|sampler| sampler.peak());
    clients.abort_all();

    let board = board.lock().expect("board");
    let mut spread = Vec::new();
    let mut age = Vec::new();
    let mut incomplete = 0;
    for update in board.updates.values() {
        match update.all {
            Some((at, at_ms)) => {
                spread.push(at.duration_since(update.first).as_micros() as u64);
                if let Some(stamped) = update.updated_at_ms {
                    age.push((at_ms - stamped).max(0) as u64 * 1000);
                }
            }
            None => incomplete += 1,
        }
    }
    let per_event = |before: Option<f64>, after: Option<f64>| {
        let (before, after) = (before?, after?);
        (events_seen > 0).then(|| (after - before) * 1e6 / events_seen as f64)
    };
    Ok(FanoutSummary {
        clients: args.clients,
        source_addresses: args.clients.div_ceil(args.per_address),
        connect_seconds,
        dropped: board.dropped,
        votes_sent,
        updates: board.updates.len(),
        incomplete,
        spread_ms: Percentiles::of(spread),
        age_ms: Percentiles::of(age),
        events: events_seen,
        events_per_second: events_seen as f64 / voting.max(1e-9),
        server_rss_before_mib: rss_before,
        server_rss_connected_mib: rss_connected,
        server_kib_per_client: rss_before
            .zip(rss_connected)
            .map(|(before, after)| (after - before) * 1024.0 / args.clients as f64),
        server_rss_peak_mib: peak_rss,
        server_cpu_us_per_event: per_event(server_cpu_before, server_cpu),
        client_cpu_us_per_event: per_event(own_cpu_before, own_cpu),
    })
}

/// The segments the votes carry: the load's default mix.
fn mix() -> anyhow::Result<SegmentMix> {
    DEFAULT_SEGMENT_MIX.parse().map_err(anyhow::Error::msg)
}

/// Sends `rate` votes a second for `seconds`, as ten NDJSON batches a second (up to
/// [`BATCHES_IN_FLIGHT`] at once, so a slow answer does not slow the rate); answers how
/// many were accepted.
async fn send_votes(
    http: &reqwest::Client,
    args: &FanoutArgs,
    poll: &str,
    mix: &SegmentMix,
) -> anyhow::Result<u64> {
    let base = args.ingest_url.as_deref().unwrap_or(&args.query_url);
    let url: Arc<str> = format!("{base}/v1/votes:batch").into();
    let run = &uuid::Uuid::now_v7().simple().to_string()[20..];
    let per_batch = (args.rate / 10).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut in_flight = JoinSet::new();
    let mut sent = 0;
    let mut voter = 0;
    let until = Instant::now() + Duration::from_secs(args.seconds);
    while Instant::now() < until {
        tick.tick().await;
        while in_flight.len() >= BATCHES_IN_FLIGHT {
            sent += in_flight.join_next().await.context("a batch")???;
        }
        let mut body = Vec::with_capacity(per_batch as usize * 200);
        for _ in 0..per_batch {
            voter += 1;
            SyntheticVote::random(0, voter, mix).write_json(&mut body, poll, run, mix);
            body.push(b'\n');
        }
        let request = http
            .post(&*url)
            .bearer_auth(&args.admin_key)
            .header("content-type", "application/x-ndjson")
            .body(body);
        in_flight.spawn(send_batch(request));
    }
    while let Some(accepted) = in_flight.join_next().await {
        sent += accepted.context("a batch")??;
    }
    Ok(sent)
}

/// Vote batches sent at once at most.
const BATCHES_IN_FLIGHT: usize = 16;

/// Sends one batch; answers how many of its votes were accepted (all, or an error).
async fn send_batch(request: reqwest::RequestBuilder) -> anyhow::Result<u64> {
    #[derive(serde::Deserialize)]
    struct Answer {
        accepted: u64,
        rejected: u64,
    }
    let response = request.send().await.context("sending votes")?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    ensure!(status == 200, "a vote batch answered {status}: {text:.600}");
    let answer: Answer = serde_json::from_str(&text)
        .with_context(|| format!("reading a batch's answer: {text:.300}"))?;
    ensure!(
        answer.rejected == 0,
        "{} votes of a batch were refused: {text:.600}",
        answer.rejected
    );
    Ok(answer.accepted)
}

/// The longest line a client keeps (a results document is well under it).
const MAX_LINE: usize = 1 << 20;

/// One live client: connects from `from`, asks for the stream, then reads it until it
/// ends, telling the board each position it sees.
async fn client(
    c: usize,
    from: IpAddr,
    server: SocketAddr,
    request: &[u8],
    board: &Mutex<Board>,
    events: &AtomicU64,
) -> anyhow::Result<()> {
    let socket = TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::new(from, 0))
        .with_context(|| format!("binding {from}"))?;
    let mut stream = socket.connect(server).await.context("connecting")?;
    stream.write_all(request).await?;
    let mut buffer = vec![0u8; 2048];
    // The unfinished line carried from one read to the next.
    let mut line: Vec<u8> = Vec::new();
    let mut headers_done = false;
    let mut wants_data: Option<u64> = None;
    let mut greeted = false;
    loop {
        let n = stream.read(&mut buffer).await?;
        if n == 0 {
            bail!("the server ended the stream");
        }
        let mut chunk = &buffer[..n];
        while let Some(end) = chunk.iter().position(|&b| b == b'\n') {
            let whole: &[u8] = if line.is_empty() {
                &chunk[..end]
            } else {
                line.extend_from_slice(&chunk[..end]);
                &line
            };
            let whole = whole.strip_suffix(b"\r").unwrap_or(whole);
            if !headers_done {
                if whole.starts_with(b"HTTP/1.1 ") && !whole.starts_with(b"HTTP/1.1 200") {
                    bail!("the stream answered {}", String::from_utf8_lossy(whole));
                }
                headers_done = whole.is_empty();
            } else if let Some(id) = whole.strip_prefix(b"id: ") {
                let id = std::str::from_utf8(id).ok().and_then(|s| s.parse().ok());
                if let Some(id) = id {
                    events.fetch_add(1, Ordering::Relaxed);
                    let mut board = board.lock().expect("board");
                    if !greeted {
                        greeted = true;
                        board.greeted += 1;
                    }
                    wants_data = board.saw(c, id).then_some(id);
                }
            } else if let (Some(id), Some(data)) = (wants_data, whole.strip_prefix(b"data: ")) {
                wants_data = None;
                if let Some(ms) = updated_at_ms(data) {
                    board.lock().expect("board").updated_at(id, ms);
                }
            }
            line.clear();
            chunk = &chunk[end + 1..];
        }
        line.extend_from_slice(chunk);
        ensure!(
            line.len() <= MAX_LINE,
            "the stream sent a line over {MAX_LINE} bytes"
        );
    }
}

/// The `updated_at` of a results document, epoch ms.
fn updated_at_ms(data: &[u8]) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct Stamp {
        updated_at: String,
    }
    let stamp: Stamp = serde_json::from_slice(data).ok()?;
    tally_core::time::parse(&stamp.updated_at).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(clients: usize) -> Board {
        Board {
            seen: vec![0; clients],
            live: clients,
            measuring: true,
            updates: BTreeMap::new(),
            dropped: 0,
            greeted: 0,
        }
    }

    #[test]
    fn an_update_reaches_everyone_when_the_last_client_sees_it_or_a_later_one() {
        let mut board = board(3);
        assert!(board.saw(0, 10), "a new update wants its stamp");
        assert!(!board.saw(1, 10), "a known one does not");
        assert!(board.updates[&10].all.is_none());
        // The third client skips 10 (coalesced) and sees 12: both reached it.
        assert!(board.saw(2, 12));
        assert!(board.updates[&10].all.is_some());
        assert_eq!(board.updates[&12].reached, 1);
        assert!(
            !board.saw(2, 11),
            "an older position than one seen is not news"
        );
        board.saw(0, 12);
        assert!(board.updates[&12].all.is_none());
        board.gone(1);
        assert!(
            board.updates[&12].all.is_some(),
            "a client gone is not waited for"
        );
        assert_eq!(board.dropped, 1);
    }

    #[test]
    fn a_stamp_is_read_from_the_results_document() {
        let data = br#"{"poll_id":"p","as_of":3,"updated_at":"2026-12-03T08:00:00.250Z"}"#;
        assert_eq!(updated_at_ms(data), Some(1_796_284_800_250));
        assert_eq!(updated_at_ms(b"{}"), None);
    }

    #[test]
    fn source_addresses_stay_off_the_servers_own() {
        assert_eq!(source(0), IpAddr::V4(Ipv4Addr::new(127, 1, 0, 1)));
        assert_eq!(source(250), IpAddr::V4(Ipv4Addr::new(127, 1, 1, 1)));
        assert!(matches!(source(70_000), IpAddr::V4(a) if a.octets()[1] == 2));
    }
}
