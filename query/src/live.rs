//! Live totals over Server-Sent Events, and the per-poll cache of the newest totals that
//! both the streams and the public results endpoint read.
//!
//! One subscription to the live feed per process updates a `watch` channel per poll, which
//! keeps only the newest totals: a burst of updates coalesces into one, memory per poll is
//! one document, and a slow client never holds up the others (each client task reads the
//! channel at its own pace and is dropped if it cannot take an event within a timeout).
//!
//! A stream re-checks, whenever the poll changes, that its client may still see the results
//! (a poll made private ends the anonymous streams of it), and ends with a `reconnect` event
//! when the process drains, so clients move to another replica.
//!
//! Two routes: `GET /v1/polls/{id}/live` streams one poll; `GET /v1/live?polls=a,b,c`
//! streams up to [`MAX_STREAM_POLLS`] polls over one connection (a dashboard of many polls
//! would otherwise need a connection each, and browsers open at most six per origin). Both
//! follow the same rules: a `snapshot` first, then full `totals` whenever a sequence grows,
//! at most one event per `live_min_interval`, and an event id that `Last-Event-ID` resumes
//! from.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::Extension;
use futures::{FutureExt, StreamExt};
use serde::Deserialize;
use tally_core::poll::{Poll, PollStatus};
use tally_core::ports::LiveFeed;
use tally_core::problem::Problem;
use tally_core::results::Results;
use tally_core::retry::Backoff;
use tally_service::http::{ApiError, Reply};
use tally_service::Tasks;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tokio_stream::StreamMap;

use crate::results::{self, Access, ResultsParams};
use crate::{query_params, App};

/// The newest totals of one poll, and when they were last known fresh.
struct PollLive {
    /// The poll's totals: its shares added up ([`Results::merge`]).
    latest: watch::Sender<Option<Arc<Results>>>,
    /// The newest share of each partition of the log the poll's votes come from (a
    /// processor's totals, or the warehouse's count of the partition), and when each was
    /// last known fresh; key `None` for whole-poll totals.
    shares: Mutex<std::collections::BTreeMap<Option<u16>, Share>>,
    /// One warehouse read at a time per poll: concurrent requests wait for it and share it.
    refresh: tokio::sync::Mutex<()>,
    /// The newest totals sent, as the JSON of an event's data: encoded once, for however
    /// many clients stream the poll.
    encoded: Mutex<Option<(Arc<Results>, Arc<str>)>>,
}

impl PollLive {
    /// An event carrying `results`, whose JSON is shared with every other client sent the
    /// same totals.
    fn event(&self, kind: &str, results: &Arc<Results>) -> Event {
        let data = {
            let mut encoded = self.encoded.lock().expect("live hub lock");
            match &*encoded {
                Some((sent, data)) if Arc::ptr_eq(sent, results) => data.clone(),
                _ => {
                    let Ok(data) = serde_json::to_string(&**results) else {
                        return Event::default().comment("encode error");
                    };
                    let data: Arc<str> = data.into();
                    *encoded = Some((results.clone(), data.clone()));
                    data
                }
            }
        };
        Event::default()
            .event(kind)
            .id(results.as_of.to_string())
            .data(&*data)
    }
}

/// One partition's share of a poll's totals.
struct Share {
    results: Results,
    /// When it last came from the feed or was read from the warehouse.
    fresh_at: Instant,
}

#[derive(Default)]
pub struct LiveHub {
    polls: Mutex<HashMap<String, Arc<PollLive>>>,
}

impl LiveHub {
    fn poll(&self, poll_id: &str) -> Arc<PollLive> {
        let mut polls = self.polls.lock().expect("live hub lock");
        polls
            .entry(poll_id.to_owned())
            .or_insert_with(|| {
                Arc::new(PollLive {
                    latest: watch::Sender::new(None),
                    shares: Mutex::default(),
                    refresh: tokio::sync::Mutex::new(()),
                    encoded: Mutex::new(None),
                })
            })
            .clone()
    }

    /// Keeps `results` — a partition's share of a poll's totals, or a whole poll's — if
    /// newer than what the poll holds of it, and the poll's totals become its shares added
    /// up: each share only moves forward, so the totals never go back. Either way that share
    /// is now known to be current.
    pub fn offer(&self, results: Results) {
        let poll = self.poll(&results.poll_id);
        let merged = {
            let mut shares = poll.shares.lock().expect("live hub lock");
            let now = Instant::now();
            let key = results.partition;
            // Whole-poll totals (from a processor of an earlier version) and shares of the
            // same votes must not be added up: a share replaces whole totals of a poll, the
            // only partition's, and whole totals replace all shares when they are ahead.
            let held = match key {
                Some(_) => shares
                    .get(&key)
                    .or_else(|| shares.get(&None))
                    .map(|share| share.results.as_of),
                None => (!shares.is_empty()).then(|| {
                    shares
                        .values()
                        .fold(0u64, |sum, share| sum.saturating_add(share.results.as_of))
                }),
            };
            match held {
                Some(as_of) if results.as_of <= as_of => {
                    if let Some(share) = shares.get_mut(&key) {
                        share.fresh_at = now;
                    }
                    return;
                }
                _ => {}
            }
            if key.is_none() {
                shares.clear();
            } else {
                shares.remove(&None);
            }
            shares.insert(
                key,
                Share {
                    results,
                    fresh_at: now,
                },
            );
            Results::merge(shares.values().map(|share| &share.results))
        };
        let Some(merged) = merged else { return };
        poll.latest.send_if_modified(|current| {
            let newer = current.as_ref().is_none_or(|c| merged.as_of > c.as_of);
            if newer {
                *current = Some(Arc::new(merged));
            }
            newer
        });
    }

    pub fn subscribe(&self, poll_id: &str) -> watch::Receiver<Option<Arc<Results>>> {
        self.poll(poll_id).latest.subscribe()
    }

    /// The poll's newest totals if each of its shares is at most `max_age` old.
    fn fresh(&self, poll_id: &str, max_age: Duration) -> Option<Arc<Results>> {
        let poll = self.poll(poll_id);
        let shares = poll.shares.lock().expect("live hub lock");
        let fresh = !shares.is_empty()
            && shares
                .values()
                .all(|share| share.fresh_at.elapsed() <= max_age);
        drop(shares);
        fresh.then(|| poll.latest.borrow().clone()).flatten()
    }

    /// The poll's totals, from memory when they are at most `max_age` old, else read once
    /// with `read` (concurrent callers wait for that one read) and kept. So however many
    /// requests come, the warehouse is asked at most once per `max_age` per poll. `read`
    /// answers the poll's whole totals and its shares, one per partition its votes come
    /// from (none before its first vote).
    pub async fn totals<F, Fut, E>(
        &self,
        poll_id: &str,
        max_age: Duration,
        read: F,
    ) -> Result<Arc<Results>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(Results, Vec<Results>), E>>,
    {
        if let Some(results) = self.fresh(poll_id, max_age) {
            return Ok(results);
        }
        let poll = self.poll(poll_id);
        let _reading = poll.refresh.lock().await;
        if let Some(results) = self.fresh(poll_id, max_age) {
            return Ok(results);
        }
        let (whole, shares) = read().await?;
        let fallback = Arc::new(whole.clone());
        if shares.is_empty() {
            self.offer(whole);
        }
        for share in shares {
            self.offer(share);
        }
        let latest = poll.latest.borrow().clone();
        Ok(latest.unwrap_or(fallback))
    }

    /// Follows the live feed, resubscribing after failures, in a task of `tasks`.
    pub fn follow(self: &Arc<Self>, feed: Arc<dyn LiveFeed>, tasks: &Tasks) {
        let hub = self.clone();
        tasks.spawn("live-follower", move |cancel| async move {
            tokio::select! {
                () = hub.follow_feed(feed) => {}
                () = cancel.cancelled() => {}
            }
        });
    }

    async fn follow_feed(&self, feed: Arc<dyn LiveFeed>) {
        let mut backoff = Backoff::standard();
        loop {
            match feed.subscribe().await {
                Ok(mut updates) => {
                    backoff.reset();
                    while let Some(results) = updates.next().await {
                        self.offer(results);
                    }
                    tracing::warn!("live feed subscription ended, resubscribing");
                }
                Err(err) => {
                    tracing::warn!(error = %err.chain(), "cannot subscribe to the live feed")
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

/// What a stream holds for its client while it lasts.
struct Slots {
    _process: tokio::sync::OwnedSemaphorePermit,
    _address: Option<tally_service::http::serve::Place>,
    _client: LiveClient,
}

/// One connected live client in `tally_live_clients`, for as long as it is held.
struct LiveClient;

impl LiveClient {
    fn connect() -> LiveClient {
        metrics::gauge!("tally_live_clients").increment(1.0);
        LiveClient
    }
}

impl Drop for LiveClient {
    fn drop(&mut self) {
        metrics::gauge!("tally_live_clients").decrement(1.0);
    }
}

/// Streams a poll's totals: `snapshot` first (or, when resuming with `Last-Event-ID`, the
/// newer totals only), then `totals` whenever the sequence grows, at most every
/// `min_interval`; `closed` once when the poll closes; `hidden` (and the end) when the
/// client may no longer see the results; `reconnect` (and the end) when the process drains.
fn stream(
    app: Arc<App>,
    poll_id: String,
    access: Access,
    initial: Arc<Results>,
    resume_after: Option<u64>,
    slots: Slots,
) -> impl axum::response::IntoResponse {
    let (outbox, rx) = Outbox::new(app.config.live_send_timeout);
    let live = app.live.poll(&poll_id);
    let mut latest = live.latest.subscribe();
    let mut poll_changes = app.polls.changes();
    let min_interval = app.config.live_min_interval;
    let heartbeat = app.config.live_heartbeat;
    let drain = app.drain.clone();
    tokio::spawn(async move {
        // Held while this client is connected: the live connection caps count them.
        let _slots = slots;
        let send = |event: Event| outbox.send(event);
        let mut sent = resume_after.unwrap_or(0);
        let first = match resume_after {
            None => Some(live.event("snapshot", &initial)),
            Some(after) if initial.as_of > after => Some(live.event("totals", &initial)),
            Some(_) => None,
        };
        if let Some(first) = first {
            sent = sent.max(initial.as_of);
            if !send(first).await {
                return;
            }
        }
        let mut closed_sent = false;
        let mut wake = Wake::new();
        loop {
            let poll: Option<Arc<Poll>> = app.polls.cached(&poll_id);
            if let Some(poll) = &poll {
                if let Err(problem) = results::may_see(&app, poll, &access) {
                    let data = serde_json::json!({"poll_id": poll_id, "detail": problem.0.detail});
                    let _ = send(Event::default().event("hidden").data(data.to_string())).await;
                    return;
                }
            }
            let status = poll.as_ref().map(|p| p.status(tally_core::time::now_ms()));
            if !closed_sent && matches!(status, Some(PollStatus::Closed | PollStatus::Archived)) {
                closed_sent = true;
                let data = serde_json::json!({"poll_id": poll_id, "status": status});
                if !send(Event::default().event("closed").data(data.to_string())).await {
                    return;
                }
            }
            // Wake when a scheduled close or visibility change comes due.
            wake.due_in(
                poll.as_ref()
                    .and_then(|p| p.closes_at)
                    .map(|at| at - tally_core::time::now_ms())
                    .filter(|ms| *ms > 0 && !closed_sent)
                    .map(|ms| Duration::from_millis(ms as u64 + 5)),
            );
            tokio::select! {
                changed = latest.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let current = latest.borrow_and_update().clone();
                    if let Some(current) = current {
                        if current.as_of > sent {
                            sent = current.as_of;
                            if !send(live.event("totals", &current)).await {
                                return;
                            }
                            // Coalesce: whatever arrives meanwhile is sent as one update.
                            tokio::time::sleep(min_interval).await;
                        }
                    }
                }
                changed = poll_changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = drain.cancelled() => {
                    let _ = send(reconnect_event()).await;
                    return;
                }
                () = wake.fired() => {}
                _ = outbox.closed() => return,
            }
        }
    });
    sse(rx, heartbeat)
}

/// The sending half of one live stream. An event the client does not take within the send
/// timeout ends the stream: a stalled client must not hold its slot forever.
struct Outbox {
    tx: mpsc::Sender<Result<Event, Infallible>>,
    timeout: Duration,
}

impl Outbox {
    fn new(timeout: Duration) -> (Outbox, mpsc::Receiver<Result<Event, Infallible>>) {
        let (tx, rx) = mpsc::channel(8);
        (Outbox { tx, timeout }, rx)
    }

    /// Whether the client took `event` in time. An outbox with room takes it at once, with
    /// no timer: only a client that has fallen behind is waited for.
    async fn send(&self, event: Event) -> bool {
        let sent = match self.tx.try_send(Ok(event)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(event)) => matches!(
                tokio::time::timeout(self.timeout, self.tx.send(event)).await,
                Ok(Ok(()))
            ),
        };
        if sent {
            metrics::counter!("tally_live_events_total").increment(1);
        }
        sent
    }

    /// Resolves when the client has gone.
    async fn closed(&self) {
        self.tx.closed().await
    }
}

/// When a stream looks at its polls again though nothing told it to: a scheduled close
/// coming due, or, lacking one, an hour from the last look. One timer per stream, moved
/// only when its deadline does (not made anew for every event it sends).
struct Wake {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Wake {
    /// Without a scheduled change, a stream looks again this often.
    const IDLE: Duration = Duration::from_secs(3600);
    /// A deadline this close to the armed one is left as it is.
    const SLACK: Duration = Duration::from_millis(20);

    fn new() -> Wake {
        Wake {
            sleep: Box::pin(tokio::time::sleep(Self::IDLE)),
        }
    }

    /// Fire `wait` from now, when there is a change due; otherwise keep the idle deadline.
    fn due_in(&mut self, wait: Option<Duration>) {
        let Some(wait) = wait else {
            return;
        };
        let due = tokio::time::Instant::now() + wait;
        let armed = self.sleep.deadline();
        let apart = due
            .saturating_duration_since(armed)
            .max(armed.saturating_duration_since(due));
        if apart > Self::SLACK {
            self.sleep.as_mut().reset(due);
        }
    }

    /// Resolves at the deadline, and re-arms for the idle time.
    async fn fired(&mut self) {
        (&mut self.sleep).await;
        self.sleep
            .as_mut()
            .reset(tokio::time::Instant::now() + Self::IDLE);
    }
}

/// The last event of a stream whose server is shutting down: the client reconnects (after
/// the `retry` hint) elsewhere and resumes from its `Last-Event-ID`.
fn reconnect_event() -> Event {
    let data = serde_json::json!({"reason": "the server is shutting down; reconnect to continue from Last-Event-ID"});
    Event::default()
        .event("reconnect")
        .retry(Duration::from_secs(1))
        .data(data.to_string())
}

/// The response of a live stream fed by `rx`, with heartbeats.
fn sse(rx: mpsc::Receiver<Result<Event, Infallible>>, heartbeat: Duration) -> impl IntoResponse {
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(heartbeat).text("heartbeat"))
}

fn too_many_streams(detail: String, retry_after: u32) -> Problem {
    let mut problem = Problem::new(
        503,
        "too-many-live-clients",
        "Too many live connections",
        detail,
    );
    problem.retry_after = Some(retry_after);
    problem
}

/// The `Last-Event-ID` a client resumes from, if it sent one; `parse` reads our own ids.
fn resume_point<T>(
    headers: &HeaderMap,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<Option<T>, ApiError> {
    match headers.get("last-event-id") {
        None => Ok(None),
        Some(value) => match value.to_str().ok().and_then(|s| parse(s.trim())) {
            Some(point) => Ok(Some(point)),
            None => Err(Problem::bad_request(
                "invalid-last-event-id",
                "Last-Event-ID must be an event id sent by this stream",
            )
            .into()),
        },
    }
}

/// A live connection's place under the per-address and per-process caps, or a 503.
fn take_slots(
    app: &App,
    headers: &HeaderMap,
    peer: Option<Extension<ConnectInfo<std::net::SocketAddr>>>,
) -> Result<Slots, ApiError> {
    let address = match peer {
        Some(Extension(ConnectInfo(peer))) => {
            let client = app.guard.client_ip_of(peer.ip(), headers);
            let max = app.config.live_max_per_address;
            match app.streams.take(client, max) {
                Some(slot) => Some(slot),
                None => {
                    return Err(too_many_streams(
                        format!("this address already holds {max} live streams; close some, or read the results endpoint"),
                        5,
                    )
                    .into())
                }
            }
        }
        None => None,
    };
    let Ok(permit) = app.live_slots.clone().try_acquire_owned() else {
        return Err(too_many_streams(
            format!(
                "this server already streams to {} clients; retry later or read the results endpoint",
                app.config.live_max_clients
            ),
            5,
        )
        .into());
    };
    Ok(Slots {
        _process: permit,
        _address: address,
        _client: LiveClient::connect(),
    })
}

fn no_cache(response: impl IntoResponse) -> axum::response::Response {
    let mut response = response.into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        "no-cache".parse().expect("static header"),
    );
    response
}

/// `GET /v1/polls/{id}/live`.
#[utoipa::path(get, path = "/v1/polls/{id}/live", tag = "live",
    security((), ("api_key" = ["analyst", "admin"])),
    params(("id" = String, Path, description = "the poll"),
        ("results_token" = Option<String>, Query, description = "the `results_token` of the voter's 202 (`after_vote` polls)"),
        ("Last-Event-ID" = Option<String>, Header, description = "resume after this sequence")),
    responses(
        (status = 200, description = "Server-Sent Events: `snapshot` on connect, then `totals` (data: the results document), `closed`, `hidden`, `reconnect`; `id:` is the log sequence", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid-query`, `invalid-last-event-id`", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`results-hidden`, `origin-not-allowed`, `invalid-token`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not-found`: no such poll", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`too-many-live-clients`, `unavailable`", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn live(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    peer: Option<Extension<ConnectInfo<std::net::SocketAddr>>>,
    params: Result<Query<ResultsParams>, QueryRejection>,
) -> Reply {
    let params = query_params(params)?;
    let poll = app.poll(&id).await?;
    let access = Access::of(&app, &headers, params.results_token)?;
    results::may_see(&app, &poll, &access)?;
    let resume_after = resume_point(&headers, |id| id.parse::<u64>().ok())?;
    let slots = take_slots(&app, &headers, peer)?;
    let initial = results::served(&app, &poll).await?;
    Ok(no_cache(stream(
        app.clone(),
        poll.id.clone(),
        access,
        initial,
        resume_after,
        slots,
    )))
}

/// Polls one multi-poll stream may carry.
pub const MAX_STREAM_POLLS: usize = tally_service::http::cors::MAX_POLLS_PER_REQUEST;

/// Unknown parameters are ignored, as on the single-poll stream.
#[derive(Deserialize)]
pub(crate) struct ManyParams {
    polls: Option<String>,
}

/// The poll ids of `?polls=a,b,c`: 1 to [`MAX_STREAM_POLLS`], each once, in the order given.
fn stream_polls(param: Option<&str>) -> Result<Vec<String>, ApiError> {
    let mut ids: Vec<String> = Vec::new();
    for id in param.unwrap_or("").split(',').map(str::trim) {
        if !id.is_empty() && !ids.iter().any(|known| known == id) {
            ids.push(id.to_owned());
        }
    }
    if ids.is_empty() || ids.len() > MAX_STREAM_POLLS {
        return Err(Problem::invalid(
            "polls",
            format!("name 1 to {MAX_STREAM_POLLS} polls, comma-separated: ?polls=a,b,c"),
        )
        .into());
    }
    Ok(ids)
}

/// The event id of a multi-poll stream: the sequence sent for each poll, in the order of
/// `?polls=`, joined by `.` (`120.0.87`). A client reconnects with the same `polls`, so the
/// position of a number says whose it is.
fn many_id(sent: &[u64]) -> String {
    sent.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

fn parse_many_id(id: &str, polls: usize) -> Option<Vec<u64>> {
    let sent: Vec<u64> = id
        .split('.')
        .map(|n| n.parse::<u64>().ok())
        .collect::<Option<_>>()?;
    (sent.len() == polls).then_some(sent)
}

/// A `snapshot` or `totals` event of a multi-poll stream: the full results of the polls that
/// changed, and the id covering every poll.
fn many_event(kind: &str, changed: &[Arc<Results>], sent: &[u64]) -> Event {
    Event::default()
        .event(kind)
        .id(many_id(sent))
        .json_data(serde_json::json!({
            "polls": changed.iter().map(|r| r.as_ref()).collect::<Vec<&Results>>()
        }))
        .unwrap_or_else(|_| Event::default().comment("encode error"))
}

/// `GET /v1/live?polls=a,b,c`: the totals of several polls over one connection. Every poll
/// must be one the client may see.
#[utoipa::path(get, path = "/v1/live", tag = "live",
    security((), ("api_key" = ["analyst", "admin"])),
    params(("polls" = String, Query, description = "comma-separated poll ids, each once"),
        ("Last-Event-ID" = Option<String>, Header, description = "resume after this event")),
    responses(
        (status = 200, description = "Server-Sent Events of several polls: `snapshot` and `totals` events carry `{\"polls\": [results…]}`", content_type = "text/event-stream", body = String),
        (status = 400, description = "`invalid-query`, `invalid-last-event-id`", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`results-hidden`, `origin-not-allowed`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not-found`: no such poll", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-field`: `polls`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`too-many-live-clients`, `unavailable`", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn live_many(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    peer: Option<Extension<ConnectInfo<std::net::SocketAddr>>>,
    params: Result<Query<ManyParams>, QueryRejection>,
) -> Reply {
    let params = query_params(params)?;
    let ids = stream_polls(params.polls.as_deref())?;
    let access = Access::of(&app, &headers, None)?;
    let mut polls = Vec::with_capacity(ids.len());
    for id in &ids {
        let poll = app.poll(id).await?;
        results::may_see(&app, &poll, &access)?;
        polls.push(poll);
    }
    let resume_after = resume_point(&headers, |id| parse_many_id(id, ids.len()))?;
    let slots = take_slots(&app, &headers, peer)?;
    let mut initial = Vec::with_capacity(polls.len());
    for poll in &polls {
        initial.push(results::served(&app, poll).await?);
    }
    Ok(no_cache(stream_many(
        app.clone(),
        ids,
        access,
        initial,
        resume_after,
        slots,
    )))
}

/// What a multi-poll stream knows of one of its polls.
struct Streamed {
    id: String,
    /// The sequence last sent to the client (or the one it resumed from).
    sent: u64,
    /// Newer totals waiting for the next event.
    pending: Option<Arc<Results>>,
    closed_sent: bool,
    /// Hidden from this client since the stream began: no longer streamed.
    hidden: bool,
}

/// Streams several polls: a `snapshot` with all of them first (or, when resuming, `totals`
/// with those newer than the resumed id), then `totals` with the polls whose sequence grew,
/// at most every `min_interval`; `closed` once per poll that closes; `hidden` for a poll the
/// client may no longer see (the stream goes on with the rest, and ends when none is left);
/// `reconnect` (and the end) when the process drains.
fn stream_many(
    app: Arc<App>,
    ids: Vec<String>,
    access: Access,
    initial: Vec<Arc<Results>>,
    resume_after: Option<Vec<u64>>,
    slots: Slots,
) -> impl IntoResponse {
    let (outbox, rx) = Outbox::new(app.config.live_send_timeout);
    let mut updates: StreamMap<usize, WatchStream<Option<Arc<Results>>>> = StreamMap::new();
    for (index, id) in ids.iter().enumerate() {
        updates.insert(index, WatchStream::new(app.live.subscribe(id)));
    }
    let mut poll_changes = app.polls.changes();
    let min_interval = app.config.live_min_interval;
    let heartbeat = app.config.live_heartbeat;
    let drain = app.drain.clone();
    tokio::spawn(async move {
        let _slots = slots;
        let send = |event: Event| outbox.send(event);
        let resumed = resume_after.is_some();
        let mut polls: Vec<Streamed> = ids
            .into_iter()
            .enumerate()
            .map(|(i, id)| Streamed {
                id,
                sent: resume_after.as_ref().map_or(0, |after| after[i]),
                pending: None,
                closed_sent: false,
                hidden: false,
            })
            .collect();
        let first: Vec<Arc<Results>> = initial
            .into_iter()
            .zip(polls.iter_mut())
            .filter(|(results, poll)| !resumed || results.as_of > poll.sent)
            .map(|(results, poll)| {
                poll.sent = poll.sent.max(results.as_of);
                results
            })
            .collect();
        let sent: Vec<u64> = polls.iter().map(|p| p.sent).collect();
        let first = match (resumed, first.is_empty()) {
            (false, _) => Some(many_event("snapshot", &first, &sent)),
            (true, false) => Some(many_event("totals", &first, &sent)),
            (true, true) => None,
        };
        if let Some(first) = first {
            if !send(first).await {
                return;
            }
        }
        let mut wake = Wake::new();
        loop {
            // Visibility and closes, checked on start and whenever a poll changes.
            let now = tally_core::time::now_ms();
            let mut next_change: Option<Duration> = None;
            for streamed in polls.iter_mut().filter(|p| !p.hidden) {
                let Some(poll) = app.polls.cached(&streamed.id) else {
                    continue;
                };
                if let Err(problem) = results::may_see(&app, &poll, &access) {
                    streamed.hidden = true;
                    let data =
                        serde_json::json!({"poll_id": streamed.id, "detail": problem.0.detail});
                    if !send(Event::default().event("hidden").data(data.to_string())).await {
                        return;
                    }
                    continue;
                }
                let status = poll.status(now);
                if !streamed.closed_sent
                    && matches!(status, PollStatus::Closed | PollStatus::Archived)
                {
                    streamed.closed_sent = true;
                    let data = serde_json::json!({"poll_id": streamed.id, "status": status});
                    if !send(Event::default().event("closed").data(data.to_string())).await {
                        return;
                    }
                }
                if let Some(ms) = poll.closes_at.map(|at| at - now).filter(|ms| *ms > 0) {
                    if !streamed.closed_sent {
                        let due = Duration::from_millis(ms as u64 + 5);
                        next_change = Some(next_change.map_or(due, |next| next.min(due)));
                    }
                }
            }
            for (index, streamed) in polls.iter().enumerate() {
                if streamed.hidden {
                    updates.remove(&index);
                }
            }
            if updates.is_empty() {
                return;
            }
            wake.due_in(next_change);
            tokio::select! {
                update = updates.next() => {
                    let Some((index, latest)) = update else {
                        return;
                    };
                    note(&mut polls, index, latest);
                    // Whatever else is ready now goes in the same event.
                    while let Some(Some((index, latest))) = updates.next().now_or_never() {
                        note(&mut polls, index, latest);
                    }
                    let changed: Vec<Arc<Results>> = polls
                        .iter_mut()
                        .filter_map(|p| {
                            let results = p.pending.take()?;
                            p.sent = results.as_of;
                            Some(results)
                        })
                        .collect();
                    if !changed.is_empty() {
                        let sent: Vec<u64> = polls.iter().map(|p| p.sent).collect();
                        if !send(many_event("totals", &changed, &sent)).await {
                            return;
                        }
                        // Coalesce: whatever arrives meanwhile is sent as one update.
                        tokio::time::sleep(min_interval).await;
                    }
                }
                changed = poll_changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = drain.cancelled() => {
                    let _ = send(reconnect_event()).await;
                    return;
                }
                () = wake.fired() => {}
                _ = outbox.closed() => return,
            }
        }
    });
    sse(rx, heartbeat)
}

/// Keeps `latest` for poll `index` if it is newer than what the client has: totals never go
/// back, and totals already sent are not sent again.
fn note(polls: &mut [Streamed], index: usize, latest: Option<Arc<Results>>) {
    let (Some(streamed), Some(latest)) = (polls.get_mut(index), latest) else {
        return;
    };
    let known = streamed
        .pending
        .as_ref()
        .map_or(streamed.sent, |pending| pending.as_of);
    if latest.as_of > known {
        streamed.pending = Some(latest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_outbox_takes_events_at_once_and_gives_up_on_a_client_that_stops_reading() {
        let (outbox, mut rx) = Outbox::new(Duration::from_millis(50));
        for _ in 0..8 {
            assert!(outbox.send(Event::default().data("x")).await, "room: taken");
        }
        let started = Instant::now();
        assert!(
            !outbox.send(Event::default().data("x")).await,
            "full and unread: not taken"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "waited its timeout"
        );
        let _ = rx.recv().await.expect("an event");
        assert!(
            outbox.send(Event::default().data("x")).await,
            "read again: taken"
        );
        drop(rx);
        let started = Instant::now();
        assert!(
            !outbox.send(Event::default().data("x")).await,
            "gone: not taken"
        );
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "without waiting"
        );
    }

    #[tokio::test]
    async fn a_stream_wakes_when_a_change_comes_due_and_otherwise_rests() {
        let mut wake = Wake::new();
        let idle = wake.sleep.deadline();
        wake.due_in(None);
        assert_eq!(
            wake.sleep.deadline(),
            idle,
            "nothing due: the idle deadline stays"
        );
        wake.due_in(Some(Duration::from_millis(30)));
        let armed = wake.sleep.deadline();
        assert!(armed < idle);
        wake.due_in(Some(Duration::from_millis(31)));
        assert_eq!(
            wake.sleep.deadline(),
            armed,
            "a deadline within the slack is left alone"
        );
        tokio::time::timeout(Duration::from_secs(5), wake.fired())
            .await
            .expect("fires when due");
        assert!(
            wake.sleep.deadline() > tokio::time::Instant::now() + Duration::from_secs(3000),
            "re-armed for the idle time"
        );
    }

    #[test]
    fn multi_poll_ids_resume_only_with_the_same_polls() {
        assert_eq!(many_id(&[120, 0, 87]), "120.0.87");
        assert_eq!(parse_many_id("120.0.87", 3), Some(vec![120, 0, 87]));
        assert_eq!(parse_many_id("120.0", 3), None);
        assert_eq!(parse_many_id("120.x.1", 3), None);
        assert_eq!(parse_many_id("", 1), None);
    }

    fn results(as_of: u64) -> Results {
        Results {
            poll_id: "p".into(),
            kind: tally_core::poll::PollKind::Single,
            status: PollStatus::Open,
            total_votes: as_of,
            unique_voters: as_of,
            options: Vec::new(),
            rating: None,
            nps: None,
            as_of,
            updated_at: String::new(),
            partition: None,
        }
    }

    /// 300 concurrent requests for a poll's totals read the warehouse once; after `max_age`
    /// it is read once more; totals offered by the feed meanwhile are served without a read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_warehouse_is_read_once_per_max_age_however_many_ask() {
        let hub = Arc::new(LiveHub::default());
        let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let max_age = Duration::from_millis(300);
        let ask = |hub: Arc<LiveHub>, reads: Arc<std::sync::atomic::AtomicU64>| async move {
            hub.totals("p", max_age, || async {
                let n = reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                // A read that takes a while, so the other requests arrive during it.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, ()>((results(n * 10), Vec::new()))
            })
            .await
            .expect("read")
        };
        let asked: Vec<_> = (0..300)
            .map(|_| tokio::spawn(ask(hub.clone(), reads.clone())))
            .collect();
        for answer in asked {
            assert_eq!(answer.await.expect("task").as_of, 10);
        }
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 1);

        // Totals from the feed are fresh: served as they are.
        hub.offer(results(15));
        assert_eq!(ask(hub.clone(), reads.clone()).await.as_of, 15);
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 1);

        // Once they are older than max_age, one more read; totals never go back.
        tokio::time::sleep(max_age + Duration::from_millis(50)).await;
        assert_eq!(ask(hub.clone(), reads.clone()).await.as_of, 20);
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    fn share(partition: u16, votes: u64, as_of: u64) -> Results {
        Results {
            total_votes: votes,
            unique_voters: votes,
            partition: Some(partition),
            ..results(as_of)
        }
    }

    fn latest(hub: &LiveHub) -> (u64, u64) {
        let latest = hub.subscribe("p").borrow().clone().expect("totals");
        assert_eq!(latest.partition, None, "served totals are whole");
        (latest.total_votes, latest.as_of)
    }

    /// A poll's totals are its partitions' shares added up; a share that is not newer than
    /// the one held is ignored, so the totals never go back; whole totals of an earlier
    /// processor give way to a share, and replace the shares only when ahead of them.
    #[test]
    fn shares_add_up_and_never_go_back() {
        let hub = LiveHub::default();
        hub.offer(results(4));
        assert_eq!(latest(&hub), (4, 4));
        hub.offer(share(0, 5, 6));
        assert_eq!(latest(&hub), (5, 6), "the share replaced the whole totals");
        hub.offer(share(1, 3, 9));
        assert_eq!(latest(&hub), (8, 15));
        hub.offer(share(1, 2, 8));
        assert_eq!(latest(&hub), (8, 15), "an older share is ignored");
        hub.offer(share(0, 6, 7));
        assert_eq!(latest(&hub), (9, 16));
        hub.offer(results(12));
        assert_eq!(
            latest(&hub),
            (9, 16),
            "whole totals behind the shares are ignored"
        );
        hub.offer(results(20));
        assert_eq!(latest(&hub), (20, 20));
    }

    /// The totals are fresh only while every share is: a partition that stopped sending
    /// makes the next request read the warehouse, however busy the others are.
    #[test]
    fn totals_are_fresh_while_every_share_is() {
        let hub = LiveHub::default();
        let max_age = Duration::from_millis(200);
        assert!(hub.fresh("p", max_age).is_none());
        hub.offer(share(0, 1, 1));
        hub.offer(share(1, 1, 1));
        assert_eq!(hub.fresh("p", max_age).expect("fresh").as_of, 2);
        std::thread::sleep(max_age + Duration::from_millis(20));
        hub.offer(share(0, 2, 2));
        assert!(hub.fresh("p", max_age).is_none(), "partition 1 went quiet");
        hub.offer(share(1, 1, 1));
        assert_eq!(
            hub.fresh("p", max_age).expect("fresh again").as_of,
            3,
            "a share that is not newer still says it is current"
        );
    }

    #[test]
    fn stream_polls_are_named_once_and_bounded() {
        assert_eq!(stream_polls(Some("a, b,a,,c")).unwrap(), ["a", "b", "c"]);
        assert!(stream_polls(Some("")).is_err());
        assert!(stream_polls(None).is_err());
        let many: Vec<String> = (0..=MAX_STREAM_POLLS).map(|i| format!("p{i}")).collect();
        assert!(stream_polls(Some(&many.join(","))).is_err());
    }
}
