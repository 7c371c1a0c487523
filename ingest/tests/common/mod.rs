//! An ingest router in-process on the embedded back ends, and the small vocabulary the HTTP
//! tests speak: requests to send, answers to read (typed bodies or problem+json), polls put
//! straight into the registry, and the vote log read back to prove what was (not) stored.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tally_core::poll::{NewPoll, Poll};
use tally_core::ports::{PollRegistry, VoteLog};
use tally_core::vote::Vote;
use tally_embedded::Embedded;
use tally_ingest::{Config, Deps, Ingest};
use tally_service::Tasks;
use tower::ServiceExt;

/// The server secret of every test ingest (at least 16 bytes, as ingest demands).
pub const SECRET: &[u8] = b"ingest-http-test-secret";
/// The key of the test integration that imports batches.
pub const INGEST_KEY: &str = "ingest-http-test-integration-key";

/// The keys derived from [`SECRET`].
pub fn secrets() -> tally_core::secrets::Secrets {
    tally_core::secrets::Secrets::new(SECRET).unwrap()
}

/// One ingest over its own data directory, with a one-partition vote log.
pub struct Harness {
    pub store: Embedded,
    pub router: Router,
    // Dropped last: the store's files live here.
    _dir: tempfile::TempDir,
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with_config(|_| {})
    }

    /// A harness whose config is the default with `change` applied.
    pub fn with_config(change: impl FnOnce(&mut Config)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = tally_embedded::open(
            dir.path(),
            tally_embedded::Options {
                partitions: 1,
                // Every few votes the log merges its pending keys into its index: the
                // rules hold on either side of it.
                log_merge_at: 8,
                ..Default::default()
            },
        )
        .unwrap();
        let mut config = Config {
            secret: SECRET.to_vec(),
            keys: tally_core::auth::ApiKeys::new(&[(
                tally_core::auth::Role::Ingest,
                &[INGEST_KEY.to_owned()],
            )])
            .unwrap(),
            ..Config::default()
        };
        change(&mut config);
        let tasks = Tasks::new();
        let deps = Deps {
            log: store.log.clone(),
            registry: store.registry.clone(),
            warehouse: None,
        };
        let ingest = Ingest::new(deps, config, &tasks).unwrap();
        Harness {
            router: tally_ingest::router(ingest),
            store,
            _dir: dir,
        }
    }

    /// Creates a poll in the registry from its API definition, after `change` (which may
    /// close, archive or schedule it: the poll is stored in that state from the start, so
    /// no test waits for the ingest's cache to hear of a change).
    pub async fn poll(&self, definition: serde_json::Value, change: impl FnOnce(&mut Poll)) {
        let new: NewPoll = serde_json::from_value(definition).unwrap();
        let mut poll = new
            .into_poll(tally_core::time::now_ms(), || {
                unreachable!("tests name polls")
            })
            .unwrap();
        change(&mut poll);
        self.store.registry.create(&poll).await.unwrap();
    }

    /// A single-choice poll with options `red` and `blue`, one vote per voter.
    pub async fn colour_poll(&self, id: &str, change: impl FnOnce(&mut Poll)) {
        self.poll(
            serde_json::json!({"id": id, "title": "Colour", "question": "Which colour?",
                "kind": "single",
                "options": [{"id": "red", "label": "Red"}, {"id": "blue", "label": "Blue"}]}),
            change,
        )
        .await;
    }

    pub async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        Answer {
            status,
            headers,
            body,
        }
    }

    /// The newest sequence of the log's only partition: it moves exactly when a vote is
    /// stored.
    pub fn tip(&self) -> u64 {
        self.store.log.tip(0)
    }

    /// Every vote in the log, in log order.
    pub async fn logged_votes(&self) -> Vec<Vote> {
        let mut reader = self.store.log.reader(0, 0).await.unwrap();
        let mut votes = Vec::new();
        loop {
            let batch = reader
                .next_batch(1000, Duration::from_millis(20))
                .await
                .unwrap();
            if batch.is_empty() {
                return votes;
            }
            votes.extend(
                batch
                    .iter()
                    .map(|entry| tally_core::wire::decode(&entry.payload).unwrap()),
            );
        }
    }
}

/// `POST /v1/polls/{poll}/votes` with `body` as it is.
pub fn vote(poll: &str, body: impl Into<Body>) -> Request<Body> {
    post(&format!("/v1/polls/{poll}/votes"), body)
}

/// `POST /v1/polls/{poll}/votes` with a JSON body.
pub fn vote_json(poll: &str, body: serde_json::Value) -> Request<Body> {
    vote(poll, body.to_string())
}

/// `POST /v1/votes:batch` with an NDJSON body, from the test integration.
pub fn batch(body: impl Into<Body>) -> Request<Body> {
    let mut request = post("/v1/votes:batch", body);
    request.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/x-ndjson".parse().unwrap(),
    );
    request.headers_mut().insert(
        header::AUTHORIZATION,
        format!("Bearer {INGEST_KEY}").parse().unwrap(),
    );
    request
}

pub fn post(path: &str, body: impl Into<Body>) -> Request<Body> {
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap()
}

/// `request` as if it came over a socket from `peer` (what `axum::serve` with connect info
/// adds), which the per-address limit keys on.
pub fn from_peer(mut request: Request<Body>, peer: &str) -> Request<Body> {
    let peer: SocketAddr = peer.parse().unwrap();
    request.extensions_mut().insert(ConnectInfo(peer));
    request
}

pub fn with_header(mut request: Request<Body>, name: &'static str, value: &str) -> Request<Body> {
    request.headers_mut().append(name, value.parse().unwrap());
    request
}

/// A response, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn text(&self) -> String {
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

    /// Checks the answer is the problem `status` / `slug`, naming `field` (or none), and
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
    pub retry_after: Option<u32>,
}

impl ProblemBody {
    /// The stable part of `type`.
    pub fn slug(&self) -> &str {
        self.kind
            .strip_prefix(tally_core::problem::TYPE_BASE)
            .unwrap_or_else(|| panic!("type {} is not a tally problem", self.kind))
    }
}

/// The voter key ingest stores for `voter_id` in `poll` (a poll made by the harness, so one
/// with per-poll pseudonyms).
pub fn voter_key(poll: &str, voter_id: &str) -> String {
    secrets()
        .voter_hasher(poll, tally_core::secrets::PseudonymScheme::PerPoll)
        .voter_key(voter_id)
}
