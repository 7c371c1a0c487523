//! Ingest: the public vote intake.
//!
//! In: `POST /v1/polls/{id}/votes` (JSON) and `POST /v1/votes:batch` (NDJSON). Each vote is
//! validated against the poll (from a local cache kept fresh by the registry's watch), its
//! voter id is hashed with the server secret, and it is appended to the vote log. Out: 202
//! only after the log acknowledged the vote as durable; 409 when the log says the voter has
//! already voted; 503 with `Retry-After` when the log cannot be reached, in which case
//! nothing was accepted. A retry with the same `vote_id` gets the same answer and counts once.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt;
use serde::Serialize;
use tally_core::backend::{Appended, PollRegistry, VoteLog};
use tally_core::poll::{Poll, PollStatus};
use tally_core::polls::PollCache;
use tally_core::problem::{self, parse_json, ApiJson, Problem};
use tally_core::vote::{build_vote, VoteRequest, VoterHasher};
use tally_core::{health, time, token};
use tokio::net::TcpListener;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("http listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("configuration: {0}")]
    Config(String),
}

#[derive(Clone)]
pub struct Deps {
    pub log: Arc<dyn VoteLog>,
    pub registry: Arc<dyn PollRegistry>,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Server secret: keys voter hashes and signs voter tokens.
    pub secret: Vec<u8>,
    pub max_vote_bytes: usize,
    pub max_batch_bytes: usize,
    pub max_batch_lines: usize,
    /// Appends of one batch in flight at once.
    pub batch_concurrency: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            secret: Vec::new(),
            max_vote_bytes: 16 * 1024,
            max_batch_bytes: 8 * 1024 * 1024,
            max_batch_lines: 10_000,
            batch_concurrency: 512,
        }
    }
}

pub struct Ingest {
    log: Arc<dyn VoteLog>,
    polls: Arc<PollCache>,
    hasher: VoterHasher,
    config: Config,
}

#[derive(Debug, Serialize)]
pub struct Accepted {
    pub vote_id: String,
    pub status: &'static str,
}

impl Ingest {
    pub fn new(deps: Deps, config: Config) -> Result<Arc<Ingest>> {
        if config.secret.len() < 16 {
            return Err(Error::Config(
                "the server secret (TALLY_SECRET) must be at least 16 bytes".into(),
            ));
        }
        Ok(Arc::new(Ingest {
            log: deps.log,
            polls: PollCache::start(deps.registry),
            hasher: VoterHasher::new(&config.secret),
            config,
        }))
    }

    async fn poll(&self, poll_id: &str) -> Result<Arc<Poll>, Problem> {
        match self.polls.get(poll_id).await {
            Ok(Some(poll)) => Ok(poll),
            Ok(None) => Err(Problem::not_found(&format!("poll `{poll_id}`"))),
            Err(err) => {
                tracing::warn!(poll_id, error = %err, "poll registry unreachable");
                Err(err.into())
            }
        }
    }

    /// Validates, hashes and appends one vote.
    pub async fn submit(&self, poll_id: &str, request: VoteRequest) -> Result<Accepted, Problem> {
        let now = time::now_ms();
        let poll = self.poll(poll_id).await?;
        match poll.status(now) {
            PollStatus::Open => {}
            PollStatus::Closed => {
                return Err(Problem::new(
                    409,
                    "poll-closed",
                    "Poll closed",
                    format!("poll `{poll_id}` is closed to votes"),
                ))
            }
            PollStatus::Scheduled => {
                return Err(Problem::new(
                    409,
                    "poll-not-open",
                    "Poll not open yet",
                    format!("poll `{poll_id}` opens later"),
                ))
            }
            PollStatus::Archived => {
                return Err(Problem::new(
                    410,
                    "poll-archived",
                    "Poll archived",
                    format!("poll `{poll_id}` was archived"),
                ))
            }
        }
        if poll.require_token {
            token::verify(
                &self.config.secret,
                request.token.as_deref(),
                &poll.id,
                request.voter_id.as_deref(),
                now / 1000,
            )?;
        }
        let vote = build_vote(&poll, &request, &self.hasher, now)?;
        match self.log.append(&vote, &vote.unique_key(poll.dedupe)).await {
            Ok(Appended::Accepted { .. }) => Ok(Accepted {
                vote_id: vote.vote_id,
                status: "accepted",
            }),
            Ok(Appended::AlreadyVoted) => Err(Problem::new(
                409,
                "already-voted",
                "Already voted",
                format!("this voter has already voted in poll `{poll_id}`; the first vote counts"),
            )),
            Err(err) => {
                tracing::warn!(poll_id, error = %err, "vote not accepted: log unavailable");
                Err(Problem::unavailable("the vote was not accepted because the vote log is unreachable; retry with the same vote_id"))
            }
        }
    }
}

/// The vote routes alone, for composing with other services on one listener.
pub fn api(ingest: Arc<Ingest>) -> Router {
    let vote_limit = ingest.config.max_vote_bytes;
    let batch_limit = ingest.config.max_batch_bytes;
    Router::new()
        .route(
            "/v1/polls/{id}/votes",
            post(vote).layer(DefaultBodyLimit::max(vote_limit)),
        )
        .route(
            "/v1/votes:batch",
            post(batch).layer(DefaultBodyLimit::max(batch_limit)),
        )
        .with_state(ingest)
}

/// Readiness checks of what ingest depends on.
pub fn probes(ingest: &Ingest) -> Vec<health::Probe> {
    let log = ingest.log.clone();
    let registry = ingest.polls.registry().clone();
    vec![
        health::probe("vote_log", move || {
            let log = log.clone();
            async move { log.check().await }
        }),
        health::probe("poll_registry", move || {
            let registry = registry.clone();
            async move { registry.check().await }
        }),
    ]
}

/// The ingest service: vote routes, health, and problem+json for everything else.
pub fn router(ingest: Arc<Ingest>) -> Router {
    let probes = probes(&ingest);
    health::service(api(ingest), probes)
}

async fn vote(
    State(ingest): State<Arc<Ingest>>,
    Path(poll_id): Path<String>,
    ApiJson(request): ApiJson<VoteRequest>,
) -> Response {
    if request.poll_id.as_ref().is_some_and(|id| id != &poll_id) {
        return Problem::invalid(
            "poll_id",
            "poll_id in the body differs from the poll in the path; leave it out",
        )
        .into_response();
    }
    match ingest.submit(&poll_id, request).await {
        Ok(accepted) => (StatusCode::ACCEPTED, Json(accepted)).into_response(),
        Err(problem) => problem.into_response(),
    }
}

#[derive(Serialize)]
struct LineResult {
    line: usize,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    vote_id: Option<String>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    problem: Option<ProblemFields>,
}

#[derive(Serialize)]
struct ProblemFields {
    #[serde(rename = "type")]
    kind: String,
    title: String,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
}

#[derive(Serialize)]
struct BatchResult {
    accepted: usize,
    rejected: usize,
    results: Vec<LineResult>,
}

/// NDJSON batch: one vote per line, each with `poll_id`. Lines are validated and appended
/// independently (many in flight at once); the answer lists each line's outcome in order.
async fn batch(State(ingest): State<Arc<Ingest>>, request: Request) -> Response {
    let body = match problem::read_body(request, &()).await {
        Ok(body) => body,
        Err(problem) => return problem.into_response(),
    };
    let text = match problem::utf8(&body) {
        Ok(text) => text,
        Err(problem) => return problem.into_response(),
    };
    let lines: Vec<(usize, String)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| (i, l.to_owned()))
        .collect();
    if lines.is_empty() {
        return Problem::bad_request(
            "empty-batch",
            "the batch has no votes; send one JSON vote per line",
        )
        .into_response();
    }
    if lines.len() > ingest.config.max_batch_lines {
        return Problem::new(
            413,
            "batch-too-large",
            "Batch too large",
            format!(
                "a batch holds at most {} votes",
                ingest.config.max_batch_lines
            ),
        )
        .into_response();
    }
    let outcomes: Vec<LineResult> = futures::stream::iter(lines)
        .map(|(line, text)| {
            let ingest = ingest.clone();
            async move {
                let outcome = async {
                    let request: VoteRequest = parse_json(text.as_bytes())?;
                    let Some(poll_id) = request.poll_id.clone() else {
                        return Err(Problem::invalid("poll_id", "each batch line needs poll_id"));
                    };
                    ingest.submit(&poll_id, request).await
                }
                .await;
                match outcome {
                    Ok(accepted) => LineResult {
                        line,
                        status: 202,
                        vote_id: Some(accepted.vote_id),
                        problem: None,
                    },
                    Err(problem) => LineResult {
                        line,
                        status: problem.status,
                        vote_id: None,
                        problem: Some(ProblemFields {
                            kind: problem.kind,
                            title: problem.title,
                            detail: problem.detail,
                            field: problem.field,
                        }),
                    },
                }
            }
        })
        .buffered(ingest.config.batch_concurrency.max(1))
        .collect()
        .await;
    let accepted = outcomes.iter().filter(|o| o.status == 202).count();
    let result = BatchResult {
        accepted,
        rejected: outcomes.len() - accepted,
        results: outcomes,
    };
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        Json(result),
    )
        .into_response()
}

/// Serves the ingest API on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    deps: Deps,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let ingest = Ingest::new(deps, config)?;
    let app = router(ingest).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
