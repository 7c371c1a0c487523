//! A query router in-process on the embedded back ends, with an admin and an analyst key, and
//! the vocabulary the HTTP tests speak: requests with or without a key, answers read as typed
//! bodies or problem+json, SSE events read off a live stream, and votes put straight into the
//! warehouse (raw votes, window rows and segment rollups, as the processor writes them).

#![allow(dead_code)] // each test binary uses part of the harness

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use tally_core::api::PollDoc;
use tally_core::auth::{ApiKeys, Role};
use tally_core::poll::Poll;
use tally_core::ports::{PollRegistry, StoredVote, Warehouse, WindowRow};
use tally_core::rollup::{RollupLevel, Rollups};
use tally_core::segment::Segment;
use tally_core::vote::Vote;
use tally_embedded::Embedded;
use tally_query::{App, Config, Deps};
use tally_service::Tasks;
use tower::ServiceExt;

pub const ADMIN_KEY: &str = "admin-key-for-http-tests";
pub const ANALYST_KEY: &str = "analyst-key-for-http-tests";
/// The server secret (shared with ingest in a deployment): signs voter and results tokens.
pub const SECRET: &[u8] = b"query-http-test-secret";

/// The keys derived from [`SECRET`].
pub fn secrets() -> tally_core::secrets::Secrets {
    tally_core::secrets::Secrets::new(SECRET).unwrap()
}
/// Width of the window rows [`Harness::put_votes`] writes.
pub const WINDOW_SECONDS: u32 = 10;

/// One query service over its own data directory, with a one-partition store.
pub struct Harness {
    pub store: Embedded,
    pub router: Router,
    /// The last log sequence given to a vote put into the warehouse.
    seq: AtomicU64,
    // Dropped last: the store's files live here.
    _dir: tempfile::TempDir,
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with_config(|_| {})
    }

    /// A harness whose config (admin and analyst keys, the secret) has `change` applied.
    pub fn with_config(change: impl FnOnce(&mut Config)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = tally_embedded::open(
            dir.path(),
            tally_embedded::Options {
                partitions: 1,
                ..Default::default()
            },
        )
        .unwrap();
        let mut config = Config {
            keys: ApiKeys::new(&[
                (Role::Admin, &[ADMIN_KEY.to_owned()]),
                (Role::Analyst, &[ANALYST_KEY.to_owned()]),
            ])
            .unwrap(),
            secrets: Some(secrets()),
            ..Config::default()
        };
        change(&mut config);
        let tasks = Tasks::new();
        let deps = Deps {
            registry: store.registry.clone(),
            warehouse: store.warehouse.clone(),
            live: store.live.clone(),
        };
        let app = App::new(deps, config, &tasks);
        Harness {
            router: tally_query::router(app),
            store,
            seq: AtomicU64::new(0),
            _dir: dir,
        }
    }

    /// Sends `method path` with `Authorization: Bearer key` when there is a key and `body`
    /// as JSON when there is one.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(key) = key {
            request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let request = match body {
            Some(body) => request
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string())),
            None => request.body(Body::empty()),
        };
        self.send(request.unwrap()).await
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> Answer {
        self.call(Method::GET, path, key, None).await
    }

    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        self.call(method, path, Some(ADMIN_KEY), body).await
    }

    /// Sends a request and reads the answer; an event stream is left unread in
    /// [`Answer::stream`], since it does not end.
    pub async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let is_stream = headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let (body, stream) = if is_stream {
            (Bytes::new(), Some(SseReader::new(response.into_body())))
        } else {
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            (body, None)
        };
        Answer {
            status,
            headers,
            body,
            stream,
        }
    }

    /// Creates a poll through the API (admin) and returns it.
    pub async fn create(&self, definition: Value) -> PollDoc {
        self.admin(Method::POST, "/v1/polls", Some(definition))
            .await
            .json(201)
    }

    /// Creates a single-choice poll `id` with options `a` and `b` and the given results
    /// visibility.
    pub async fn ab_poll(&self, id: &str, visibility: &str) -> PollDoc {
        self.create(serde_json::json!({"id": id, "title": "T", "question": "Q",
            "kind": "single", "results_visibility": visibility,
            "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]}))
            .await
    }

    /// Every poll in the registry, archived ones included.
    pub async fn all_polls(&self) -> Vec<Poll> {
        self.store.registry.list(None, 10_000).await.unwrap()
    }

    /// Puts `votes` into the warehouse as one processor batch would: the raw votes, their
    /// tumbling windows of [`WINDOW_SECONDS`] and their fresh segment rollups, at the next
    /// log sequences. Returns the last sequence.
    pub async fn put_votes(&self, votes: Vec<Vote>) -> u64 {
        let first = self.seq.fetch_add(votes.len() as u64, Ordering::SeqCst) + 1;
        let stored: Vec<StoredVote> = votes
            .into_iter()
            .zip(first..)
            .map(|(vote, seq)| StoredVote { seq, vote })
            .collect();
        let last = stored.last().map(|s| s.seq).unwrap_or(first - 1);
        let mut windows: BTreeMap<(String, i64, String), u64> = BTreeMap::new();
        let mut rollups = Rollups::default();
        for StoredVote { vote, .. } in &stored {
            let window_ms = i64::from(WINDOW_SECONDS) * 1000;
            let start = vote.received_at.div_euclid(window_ms) * i64::from(WINDOW_SECONDS);
            for option in &vote.choice {
                *windows
                    .entry((vote.poll_id.clone(), start, option.clone()))
                    .or_default() += 1;
            }
            rollups.add(vote, last);
        }
        let windows: Vec<WindowRow> = windows
            .into_iter()
            .map(|((poll_id, window_start, option), votes)| WindowRow {
                poll_id,
                window_start,
                window_seconds: WINDOW_SECONDS,
                option,
                votes,
                last_seq: last,
            })
            .collect();
        let warehouse = &self.store.warehouse;
        warehouse.insert_votes(0, &stored).await.unwrap();
        warehouse.insert_windows(0, &windows).await.unwrap();
        warehouse
            .insert_rollups(0, RollupLevel::Fresh, &rollups.rows())
            .await
            .unwrap();
        last
    }
}

/// A vote for `choice` by `voter` from `country`, received at `received_at` (epoch ms).
pub fn ballot(poll: &str, voter: &str, choice: &str, country: &str, received_at: i64) -> Vote {
    Vote {
        vote_id: format!("{poll}-{voter}"),
        poll_id: poll.to_owned(),
        voter_key: format!("key-{voter}"),
        choice: vec![choice.to_owned()],
        value: None,
        segment: Segment {
            country: country.to_owned(),
            ..Default::default()
        },
        received_at,
    }
}

/// A response. Its body is read whole, except an event stream's.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub stream: Option<SseReader>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as `T`, after checking the answer is `status` and JSON.
    pub fn json<T: DeserializeOwned>(&self, status: u16) -> T {
        assert_eq!(self.status.as_u16(), status, "{}", self.text());
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{}",
            self.text()
        );
        serde_json::from_slice(&self.body).unwrap_or_else(|err| panic!("{err}: {}", self.text()))
    }

    /// The body as a problem, after checking it is `application/problem+json` and that its
    /// `status` is the response's.
    pub fn problem(&self) -> ProblemBody {
        assert_eq!(
            self.header("content-type"),
            Some(tally_core::problem::CONTENT_TYPE),
            "{} {}",
            self.status,
            self.text()
        );
        let problem: ProblemBody = serde_json::from_slice(&self.body)
            .unwrap_or_else(|err| panic!("{err}: {}", self.text()));
        assert_eq!(problem.status, self.status.as_u16(), "{problem:?}");
        assert!(
            !problem.title.is_empty() && !problem.detail.is_empty(),
            "{problem:?}"
        );
        problem
    }

    /// Checks the answer is the problem `status` / `slug` naming `field` (or none), and
    /// returns it.
    pub fn expect_problem(&self, status: u16, slug: &str, field: Option<&str>) -> ProblemBody {
        let problem = self.problem();
        assert_eq!(
            (problem.status, problem.slug(), problem.field.as_deref()),
            (status, slug, field),
            "{problem:?}"
        );
        problem
    }

    /// The event stream of a 200 `text/event-stream` answer.
    pub fn events(self) -> SseReader {
        assert_eq!(self.status, StatusCode::OK);
        self.stream.expect("an event stream")
    }
}

/// An RFC 9457 problem as the services send it (`tally_core::problem::Problem` is only
/// serialized, so the client side reads it with this).
#[derive(Debug, Clone, Deserialize)]
pub struct ProblemBody {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    pub field: Option<String>,
}

impl ProblemBody {
    /// The stable part of `type`.
    pub fn slug(&self) -> &str {
        self.kind
            .strip_prefix(tally_core::problem::TYPE_BASE)
            .unwrap_or_else(|| panic!("type {} is not a tally problem", self.kind))
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// Reads events off an SSE body. Cancel-safe: a chunk is added to the buffer only once it
/// has been received, so a timed-out [`SseReader::next`] loses nothing.
pub struct SseReader {
    body: axum::body::BodyDataStream,
    buffer: String,
}

impl SseReader {
    fn new(body: Body) -> SseReader {
        SseReader {
            body: body.into_data_stream(),
            buffer: String::new(),
        }
    }

    /// The next event (comments, such as heartbeats, are skipped); panics after `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> SseEvent {
        tokio::time::timeout(wait, self.next())
            .await
            .expect("an event in time")
    }

    pub async fn next(&mut self) -> SseEvent {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent {
                    event: "message".into(),
                    ..Default::default()
                };
                let mut fields = 0;
                for line in block.lines() {
                    let Some((name, value)) = line.split_once(':') else {
                        continue;
                    };
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match name {
                        "event" => event.event = value.to_owned(),
                        "id" => event.id = Some(value.to_owned()),
                        "data" => event.data.push_str(value),
                        _ => continue,
                    }
                    fields += 1;
                }
                if fields > 0 {
                    return event;
                }
                continue;
            }
            let chunk = self.body.next().await.expect("the stream goes on").unwrap();
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}
