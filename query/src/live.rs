//! Live totals over Server-Sent Events.
//!
//! One subscription to the live feed per process updates a `watch` channel per poll, which
//! keeps only the newest totals: a burst of updates coalesces into one, memory per poll is
//! one document, and a slow client never holds up the others (each client task reads the
//! channel at its own pace and is dropped if it cannot take an event within a timeout).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use futures::StreamExt;
use tally_core::poll::PollStatus;
use tally_core::ports::LiveFeed;
use tally_core::problem::Problem;
use tally_core::results::Results;
use tally_core::retry::Backoff;
use tally_service::http::Reply;
use tally_service::Tasks;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::results::{self, ResultsParams};
use crate::{query_params, App};

type Latest = watch::Sender<Option<Arc<Results>>>;

#[derive(Default)]
pub struct LiveHub {
    polls: Mutex<HashMap<String, Latest>>,
}

impl LiveHub {
    fn channel(&self, poll_id: &str) -> Latest {
        let mut polls = self.polls.lock().expect("live hub lock");
        polls
            .entry(poll_id.to_owned())
            .or_insert_with(|| watch::Sender::new(None))
            .clone()
    }

    /// Keeps `results` if newer than what the poll's channel holds: totals never go back.
    pub fn offer(&self, results: Results) {
        let channel = self.channel(&results.poll_id);
        channel.send_if_modified(|current| {
            let newer = current.as_ref().is_none_or(|c| results.as_of > c.as_of);
            if newer {
                *current = Some(Arc::new(results));
            }
            newer
        });
    }

    pub fn subscribe(&self, poll_id: &str) -> watch::Receiver<Option<Arc<Results>>> {
        self.channel(poll_id).subscribe()
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

fn event(kind: &str, results: &Results) -> Event {
    Event::default()
        .event(kind)
        .id(results.as_of.to_string())
        .json_data(results)
        .unwrap_or_else(|_| Event::default().comment("encode error"))
}

/// Streams a poll's totals: `snapshot` first (or, when resuming with `Last-Event-ID`, the
/// newer totals only), then `totals` whenever the sequence grows, at most every
/// `min_interval`; `closed` once when the poll closes.
fn stream(
    app: Arc<App>,
    poll_id: String,
    initial: Arc<Results>,
    resume_after: Option<u64>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> impl axum::response::IntoResponse {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(8);
    let mut latest = app.live.subscribe(&poll_id);
    let mut poll_changes = app.polls.changes();
    let min_interval = app.config.live_min_interval;
    let send_timeout = app.config.live_send_timeout;
    let heartbeat = app.config.live_heartbeat;
    tokio::spawn(async move {
        // Held while this client is connected: the live connection cap counts it.
        let _permit = permit;
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
            let status = app
                .polls
                .cached(&poll_id)
                .map(|p| p.status(tally_core::time::now_ms()));
            if !closed_sent && matches!(status, Some(PollStatus::Closed | PollStatus::Archived)) {
                closed_sent = true;
                let data = serde_json::json!({"poll_id": poll_id, "status": status});
                if !send(Event::default().event("closed").data(data.to_string())).await {
                    return;
                }
            }
            let closes_in = app
                .polls
                .cached(&poll_id)
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
                _ = tokio::time::sleep(closes_in) => {}
                _ = tx.closed() => return,
            }
        }
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(heartbeat).text("heartbeat"))
}

/// `GET /v1/polls/{id}/live`.
pub(crate) async fn live(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    params: Result<Query<ResultsParams>, QueryRejection>,
) -> Reply {
    let params = query_params(params)?;
    let poll = app.poll(&id).await?;
    results::may_see(&app, &poll, &headers, params.results_token.as_deref())?;
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
    let cached = app.live.subscribe(&poll.id).borrow().clone();
    let initial = match cached {
        Some(results) => results,
        None => {
            let results = results::current(&app, &poll).await?;
            app.live.offer(results.clone());
            app.live
                .subscribe(&poll.id)
                .borrow()
                .clone()
                .unwrap_or_else(|| Arc::new(results))
        }
    };
    let Ok(permit) = app.live_slots.clone().try_acquire_owned() else {
        let mut problem = Problem::new(
            503,
            "too-many-live-clients",
            "Too many live connections",
            format!(
                "this server already streams to {} clients; retry later or read the results endpoint",
                app.config.live_max_clients
            ),
        );
        problem.retry_after = Some(5);
        return Err(problem.into());
    };
    let mut response =
        stream(app.clone(), poll.id.clone(), initial, resume_after, permit).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        "no-cache".parse().expect("static header"),
    );
    Ok(response)
}
