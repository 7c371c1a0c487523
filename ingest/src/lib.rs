//! Ingest: the public vote intake.
//!
//! In: `POST /v1/polls/{id}/votes` (JSON) and `POST /v1/votes:batch` (NDJSON). Each vote is
//! validated against the poll (from a local cache kept fresh by the registry's watch), its
//! voter id is hashed with the server secret, and it is appended to the vote log. Out: 202
//! only after the log acknowledged the vote as durable; 409 when the log says the voter has
//! already voted; 503 with `Retry-After` when the log cannot be reached or did not confirm
//! in time. A 503 is not a refusal: the vote may have been stored, so a client retries with
//! the same `vote_id`, which gets the same answer as the first try and counts once.

pub mod limits;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::FromRequest;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use tally_core::api::{Accepted, BatchResult, LineProblem, LineResult, VoteStatus};
use tally_core::poll::{Poll, PollStatus, ResultsVisibility};
use tally_core::ports::{Appended, PollRegistry, VoteLog};
use tally_core::problem::{self, parse_json, Problem};
use tally_core::vote::{build_vote, VoteRequest, VoterHasher};
use tally_core::{time, token};
use tally_service::http::{health, read_body, ApiError, ApiJson};
use tally_service::{PollCache, Tasks};
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
    pub limits: limits::LimitConfig,
    pub request_timeout: std::time::Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            secret: Vec::new(),
            max_vote_bytes: 16 * 1024,
            max_batch_bytes: 8 * 1024 * 1024,
            max_batch_lines: 10_000,
            limits: limits::LimitConfig::default(),
            request_timeout: health::REQUEST_TIMEOUT,
        }
    }
}

pub struct Ingest {
    log: Arc<dyn VoteLog>,
    limits: Arc<limits::Limits>,
    polls: Arc<PollCache>,
    hasher: VoterHasher,
    config: Config,
}

/// How long a results token shows an `after_vote` poll's results.
const RESULTS_TOKEN_TTL_SECONDS: i64 = 30 * 86_400;

impl Ingest {
    /// Builds the intake; its background work (the poll cache's registry watch, the
    /// limiter sweeper) runs as tasks of `tasks`.
    pub fn new(deps: Deps, config: Config, tasks: &Tasks) -> Result<Arc<Ingest>> {
        if config.secret.len() < 16 {
            return Err(Error::Config(
                "the server secret (TALLY_SECRET) must be at least 16 bytes".into(),
            ));
        }
        let limits = Arc::new(limits::Limits::new(&config.limits));
        // Forget limiter keys whose quota has replenished, so memory stays bounded.
        let sweeper = limits.clone();
        tasks.spawn("limiter-sweeper", move |cancel| async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
            loop {
                tokio::select! {
                    _ = tick.tick() => sweeper.retain_recent(),
                    () = cancel.cancelled() => return,
                }
            }
        });
        Ok(Arc::new(Ingest {
            log: deps.log,
            limits,
            polls: PollCache::start(deps.registry, tasks),
            hasher: VoterHasher::new(&config.secret),
            config,
        }))
    }

    async fn poll(&self, poll_id: &str) -> Result<Arc<Poll>, Problem> {
        match self.polls.get(poll_id).await {
            Ok(Some(poll)) => Ok(poll),
            Ok(None) => Err(Problem::not_found(&format!("poll `{poll_id}`"))),
            Err(err) => {
                tracing::warn!(poll_id, error = %err.chain(), "poll registry unreachable");
                Err(err.into())
            }
        }
    }

    /// Validates, hashes and appends one vote.
    pub async fn submit(&self, poll_id: &str, request: VoteRequest) -> Result<Accepted, Problem> {
        let now = time::now_ms();
        let poll = self.poll(poll_id).await?;
        let (vote, unique_key) = self.prepare(&poll, &request, now)?;
        let appended = self.log.append(&vote, &unique_key).await;
        if let Err(err) = &appended {
            tracing::warn!(poll_id, error = %err.chain(), "vote not accepted: log unavailable");
        }
        self.answer(&poll, vote.vote_id, appended, now)
    }

    /// Validates, hashes and appends many votes, each `(poll_id, request)` on its own terms;
    /// the answers are in the order of `requests`. The votes that pass go to the log
    /// together ([`VoteLog::append_many`]).
    pub async fn submit_many(
        &self,
        requests: Vec<Result<(String, VoteRequest), Problem>>,
    ) -> Vec<Result<Accepted, Problem>> {
        let now = time::now_ms();
        // A batch usually names a handful of polls: look each up once.
        let mut polls: HashMap<String, Result<Arc<Poll>, Problem>> = HashMap::new();
        let mut answers: Vec<Option<Result<Accepted, Problem>>> = Vec::new();
        let mut ready = Vec::new();
        let mut ready_polls = Vec::new();
        for request in requests {
            let prepared = match request {
                Err(problem) => Err(problem),
                Ok((poll_id, request)) => {
                    let poll = match polls.get(&poll_id) {
                        Some(poll) => poll.clone(),
                        None => {
                            let poll = self.poll(&poll_id).await;
                            polls.insert(poll_id, poll.clone());
                            poll
                        }
                    };
                    poll.and_then(|poll| {
                        let prepared = self.prepare(&poll, &request, now)?;
                        Ok((poll, prepared))
                    })
                }
            };
            match prepared {
                Ok((poll, vote)) => {
                    ready.push(vote);
                    ready_polls.push((answers.len(), poll));
                    answers.push(None);
                }
                Err(problem) => answers.push(Some(Err(problem))),
            }
        }
        let appended = self.log.append_many(&ready).await;
        let unavailable = appended.iter().filter(|a| a.is_err()).count();
        if let Some(Err(err)) = appended.iter().find(|a| a.is_err()) {
            tracing::warn!(votes = unavailable, error = %err.chain(), "votes of a batch not accepted: log unavailable");
        }
        for (((slot, poll), (vote, _)), appended) in
            ready_polls.into_iter().zip(ready).zip(appended)
        {
            answers[slot] = Some(self.answer(&poll, vote.vote_id, appended, now));
        }
        answers
            .into_iter()
            .map(|answer| answer.expect("every vote is answered"))
            .collect()
    }

    /// What must hold before a vote goes to the log: the poll takes votes, the voter's
    /// token (if the poll wants one), a valid vote, the rate limits. Returns the vote and
    /// its uniqueness key.
    fn prepare(
        &self,
        poll: &Poll,
        request: &VoteRequest,
        now: i64,
    ) -> Result<(tally_core::vote::Vote, String), Problem> {
        let poll_id = &poll.id;
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
        let vote = build_vote(poll, request, &self.hasher, now)?;
        self.limits.check_vote(&poll.id, &vote.voter_key)?;
        let unique_key = vote.unique_key(poll.dedupe);
        Ok((vote, unique_key))
    }

    /// The answer to a vote the log has had its say on.
    fn answer(
        &self,
        poll: &Poll,
        vote_id: String,
        appended: tally_core::Result<Appended>,
        now: i64,
    ) -> Result<Accepted, Problem> {
        match appended {
            Ok(Appended::Accepted { .. }) => Ok(Accepted {
                vote_id,
                status: VoteStatus::Accepted,
                results_token: (poll.results_visibility == ResultsVisibility::AfterVote).then(
                    || {
                        token::mint_results(
                            &self.config.secret,
                            &poll.id,
                            now / 1000 + RESULTS_TOKEN_TTL_SECONDS,
                        )
                    },
                ),
            }),
            Ok(Appended::AlreadyVoted) => Err(Problem::new(
                409,
                "already-voted",
                "Already voted",
                format!(
                    "this voter has already voted in poll `{}`; the first vote counts",
                    poll.id
                ),
            )),
            Err(_) => Err(Problem::unavailable("the vote was not accepted because the vote log is unreachable; retry with the same vote_id")),
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
        .route_layer(axum::middleware::from_fn_with_state(
            ingest.clone(),
            limit_by_address,
        ))
        .with_state(ingest)
}

/// The per-address limit, before a body is read. Without a peer address (a router served
/// without connect info) there is nothing to key on and the limit does not apply.
async fn limit_by_address(
    State(ingest): State<Arc<Ingest>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(ConnectInfo(peer)) = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .copied()
    else {
        return next.run(request).await;
    };
    let client = ingest.limits.client_ip(peer.ip(), request.headers());
    match ingest.limits.check_ip(client) {
        Err(problem) => ApiError(problem).into_response(),
        Ok(allowance) => {
            let mut response = next.run(request).await;
            if let Some(allowance) = allowance {
                let headers = response.headers_mut();
                headers.insert("ratelimit-limit", allowance.limit.into());
                headers.insert("ratelimit-remaining", allowance.remaining.into());
            }
            response
        }
    }
}

/// Readiness checks of what ingest depends on.
pub fn probes(ingest: &Ingest) -> Vec<health::Probe> {
    vec![
        health::vote_log(ingest.log.clone()),
        health::poll_registry(ingest.polls.registry().clone()),
    ]
}

/// The ingest service: vote routes, health, and problem+json for everything else.
pub fn router(ingest: Arc<Ingest>) -> Router {
    let probes = probes(&ingest);
    let timeout = ingest.config.request_timeout;
    health::service(api(ingest), probes, timeout)
}

/// The cookie that identifies a browser voter who brings no `voter_id` (the vote widget).
pub const VOTER_COOKIE: &str = "tally_voter";

/// The voter id in a request's `tally_voter` cookie, when it is one ingest could have set.
fn cookie_voter(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == VOTER_COOKIE)
        .map(|(_, value)| value.trim().to_owned())
        .filter(|id| (16..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// What a request says about a voter who brings no `voter_id`.
struct BrowserVoter {
    /// The id in a `tally_voter` cookie ingest could have set.
    known: Option<String>,
    /// Browsers send Sec-Fetch-Mode or Origin; API clients usually send neither.
    browser: bool,
    /// The client reached us over TLS, as a trusted proxy reports it.
    tls: bool,
}

impl BrowserVoter {
    fn read(ingest: &Ingest, request: &Request) -> BrowserVoter {
        let headers = request.headers();
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip());
        BrowserVoter {
            known: cookie_voter(headers),
            browser: headers.contains_key("sec-fetch-mode") || headers.contains_key(header::ORIGIN),
            tls: peer.is_some_and(|peer| ingest.limits.trusts(peer))
                && headers
                    .get("x-forwarded-proto")
                    .is_some_and(|proto| proto.as_bytes().eq_ignore_ascii_case(b"https")),
        }
    }
}

async fn vote(
    State(ingest): State<Arc<Ingest>>,
    Path(poll_id): Path<String>,
    request: Request,
) -> Response {
    let browser = BrowserVoter::read(&ingest, &request);
    let mut vote = match ApiJson::<VoteRequest>::from_request(request, &()).await {
        Ok(ApiJson(vote)) => vote,
        Err(problem) => return problem.into_response(),
    };
    if vote.poll_id.as_ref().is_some_and(|id| id != &poll_id) {
        return ApiError(Problem::invalid(
            "poll_id",
            "poll_id in the body differs from the poll in the path; leave it out",
        ))
        .into_response();
    }
    // Without a voter_id a browser voter is its first-party cookie, set now if new. Only
    // browsers get one (or whoever brings the cookie back): an API client that forgets
    // voter_id is told so, not given a new identity per request.
    let mut new_cookie = None;
    if vote.voter_id.is_none() && (browser.known.is_some() || browser.browser) {
        let id = browser.known.unwrap_or_else(|| {
            let id = uuid::Uuid::new_v4().simple().to_string();
            new_cookie = Some(id.clone());
            id
        });
        vote.voter_id = Some(id);
    }
    let mut response = match ingest.submit(&poll_id, vote).await {
        Ok(accepted) => (StatusCode::ACCEPTED, Json(accepted)).into_response(),
        Err(problem) => ApiError(problem).into_response(),
    };
    if let Some(id) = new_cookie {
        let cookie = format!(
            "{VOTER_COOKIE}={id}; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax{}",
            if browser.tls { "; Secure" } else { "" }
        );
        if let Ok(value) = cookie.parse() {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
    }
    response
}

/// One parsed line of a batch: its number (from 1) and its poll and vote, or what is wrong
/// with it.
pub type BatchLine = (usize, Result<(String, VoteRequest), Problem>);

/// Parses an NDJSON batch: UTF-8, one JSON vote with `poll_id` per non-blank line, at most
/// `max_lines`. A bad line is that line's error; a bad batch is the batch's.
pub fn parse_batch(body: &[u8], max_lines: usize) -> Result<Vec<BatchLine>, Problem> {
    let text = problem::utf8(body)?;
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return Err(Problem::bad_request(
            "empty-batch",
            "the batch has no votes; send one JSON vote per line",
        ));
    }
    if lines.len() > max_lines {
        return Err(Problem::new(
            413,
            "batch-too-large",
            "Batch too large",
            format!("a batch holds at most {max_lines} votes"),
        ));
    }
    Ok(lines
        .into_iter()
        .map(|(line, text)| {
            let parsed =
                parse_json::<VoteRequest>(text.as_bytes()).and_then(|request| {
                    match request.poll_id.clone() {
                        Some(poll_id) => Ok((poll_id, request)),
                        None => Err(Problem::invalid("poll_id", "each batch line needs poll_id")),
                    }
                });
            (line, parsed)
        })
        .collect())
}

/// NDJSON batch: one vote per line, each with `poll_id`. Lines are validated and answered
/// independently, and the valid ones go to the log together; the answer lists each line's
/// outcome in order.
async fn batch(State(ingest): State<Arc<Ingest>>, request: Request) -> Response {
    let body = match read_body(request, &()).await {
        Ok(body) => body,
        Err(problem) => return problem.into_response(),
    };
    let lines = match parse_batch(&body, ingest.config.max_batch_lines) {
        Ok(lines) => lines,
        Err(problem) => return ApiError(problem).into_response(),
    };
    let (numbers, requests): (Vec<usize>, Vec<_>) = lines.into_iter().unzip();
    let answers = ingest.submit_many(requests).await;
    let outcomes: Vec<LineResult> = numbers
        .into_iter()
        .zip(answers)
        .map(|(line, answer)| match answer {
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
                problem: Some(LineProblem {
                    kind: problem.kind,
                    title: problem.title,
                    detail: problem.detail,
                    field: problem.field,
                }),
            },
        })
        .collect();
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

/// How long a stopping process waits for its background tasks.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves the ingest API on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    deps: Deps,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let tasks = Tasks::new();
    let ingest = Ingest::new(deps, config, &tasks)?;
    let app = router(ingest).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    tasks.shutdown(SHUTDOWN_GRACE).await;
    Ok(())
}
