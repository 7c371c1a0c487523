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

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::Extension;
use futures::StreamExt;
use tally_core::poll::{Poll, PollStatus};
use tally_core::ports::LiveFeed;
use tally_core::problem::Problem;
use tally_core::results::Results;
use tally_core::retry::Backoff;
use tally_service::http::Reply;
use tally_service::Tasks;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::results::{self, Access, ResultsParams};
use crate::{query_params, App};

/// The newest totals of one poll, and when they were last known fresh.
struct PollLive {
    latest: watch::Sender<Option<Arc<Results>>>,
    /// When the totals last came from the feed or were read from the warehouse.
    fresh_at: Mutex<Option<Instant>>,
    /// One warehouse read at a time per poll: concurrent requests wait for it and share it.
    refresh: tokio::sync::Mutex<()>,
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
                    fresh_at: Mutex::new(None),
                    refresh: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    /// Keeps `results` if newer than what the poll holds: totals never go back. Either way
    /// the poll's totals are now known to be current.
    pub fn offer(&self, results: Results) {
        let poll = self.poll(&results.poll_id);
        *poll.fresh_at.lock().expect("live hub lock") = Some(Instant::now());
        poll.latest.send_if_modified(|current| {
            let newer = current.as_ref().is_none_or(|c| results.as_of > c.as_of);
            if newer {
                *current = Some(Arc::new(results));
            }
            newer
        });
    }

    pub fn subscribe(&self, poll_id: &str) -> watch::Receiver<Option<Arc<Results>>> {
        self.poll(poll_id).latest.subscribe()
    }

    /// The poll's newest totals if they are at most `max_age` old.
    fn fresh(&self, poll_id: &str, max_age: Duration) -> Option<Arc<Results>> {
        let poll = self.poll(poll_id);
        let fresh_at = *poll.fresh_at.lock().expect("live hub lock");
        fresh_at
            .filter(|at| at.elapsed() <= max_age)
            .and_then(|_| poll.latest.borrow().clone())
    }

    /// The poll's totals, from memory when they are at most `max_age` old, else read once
    /// with `read` (concurrent callers wait for that one read) and kept. So however many
    /// requests come, the warehouse is asked at most once per `max_age` per poll.
    pub async fn totals<F, Fut, E>(
        &self,
        poll_id: &str,
        max_age: Duration,
        read: F,
    ) -> Result<Arc<Results>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Results, E>>,
    {
        if let Some(results) = self.fresh(poll_id, max_age) {
            return Ok(results);
        }
        let poll = self.poll(poll_id);
        let _reading = poll.refresh.lock().await;
        if let Some(results) = self.fresh(poll_id, max_age) {
            return Ok(results);
        }
        let results = read().await?;
        let fallback = Arc::new(results.clone());
        self.offer(results);
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

/// Live streams held per client address, so one address cannot take every slot.
#[derive(Default)]
pub(crate) struct StreamsPerAddress {
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One stream of one address; gives its slot back when dropped.
struct AddressSlot {
    streams: Arc<StreamsPerAddress>,
    address: IpAddr,
}

impl StreamsPerAddress {
    fn take(self: &Arc<Self>, address: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut held = self.held.lock().expect("streams lock");
        let count = held.entry(address).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            streams: self.clone(),
            address,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut held = self.streams.held.lock().expect("streams lock");
        if let Some(count) = held.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.address);
            }
        }
    }
}

fn event(kind: &str, results: &Results) -> Event {
    Event::default()
        .event(kind)
        .id(results.as_of.to_string())
        .json_data(results)
        .unwrap_or_else(|_| Event::default().comment("encode error"))
}

/// What a stream holds for its client while it lasts.
struct Slots {
    _process: tokio::sync::OwnedSemaphorePermit,
    _address: Option<AddressSlot>,
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
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(8);
    let mut latest = app.live.subscribe(&poll_id);
    let mut poll_changes = app.polls.changes();
    let min_interval = app.config.live_min_interval;
    let send_timeout = app.config.live_send_timeout;
    let heartbeat = app.config.live_heartbeat;
    let drain = app.drain.clone();
    tokio::spawn(async move {
        // Held while this client is connected: the live connection caps count them.
        let _slots = slots;
        let send = |event: Event| {
            let tx = tx.clone();
            async move {
                matches!(
                    tokio::time::timeout(send_timeout, tx.send(Ok(event))).await,
                    Ok(Ok(()))
                )
            }
        };
        let mut sent = resume_after.unwrap_or(0);
        let first = match resume_after {
            None => Some(event("snapshot", &initial)),
            Some(after) if initial.as_of > after => Some(event("totals", &initial)),
            Some(_) => None,
        };
        if let Some(first) = first {
            sent = sent.max(initial.as_of);
            if !send(first).await {
                return;
            }
        }
        let mut closed_sent = false;
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
            let next_change = poll
                .as_ref()
                .and_then(|p| p.closes_at)
                .map(|at| at - tally_core::time::now_ms())
                .filter(|ms| *ms > 0 && !closed_sent)
                .map(|ms| Duration::from_millis(ms as u64 + 5))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                changed = latest.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let current = latest.borrow_and_update().clone();
                    if let Some(current) = current {
                        if current.as_of > sent {
                            sent = current.as_of;
                            if !send(event("totals", &current)).await {
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
                    let data = serde_json::json!({"reason": "the server is shutting down; reconnect to continue from Last-Event-ID"});
                    let _ = send(
                        Event::default()
                            .event("reconnect")
                            .retry(Duration::from_secs(1))
                            .data(data.to_string()),
                    )
                    .await;
                    return;
                }
                _ = tokio::time::sleep(next_change) => {}
                _ = tx.closed() => return,
            }
        }
    });
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

/// `GET /v1/polls/{id}/live`.
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
    let resume_after = match headers
        .get("last-event-id")
        .map(|v| v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()))
    {
        None => None,
        Some(Some(id)) => Some(id),
        Some(None) => {
            return Err(Problem::bad_request(
                "invalid-last-event-id",
                "Last-Event-ID must be a sequence number sent by this stream",
            )
            .into())
        }
    };
    let address = match peer {
        Some(Extension(ConnectInfo(peer))) => {
            let client = app.guard.client_ip_of(peer.ip(), &headers);
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
    let initial = results::served(&app, &poll).await?;
    let slots = Slots {
        _process: permit,
        _address: address,
    };
    let mut response = stream(
        app.clone(),
        poll.id.clone(),
        access,
        initial,
        resume_after,
        slots,
    )
    .into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        "no-cache".parse().expect("static header"),
    );
    Ok(response)
}
