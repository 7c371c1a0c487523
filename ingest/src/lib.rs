//! Ingest: the public vote intake.
//!
//! In: `POST /v1/polls/{id}/votes` (JSON, from voters and the widget) and
//! `POST /v1/votes:batch` (NDJSON, from integrations holding an `ingest` key). Each vote is
//! validated against the poll (from a local cache kept fresh by the registry's watch), its
//! voter id is turned into the poll's pseudonym for it, and it is appended to the vote log.
//! Out: 202 only after the log acknowledged the vote as durable; 409 when the log says the
//! voter has already voted (or the vote id was used for another ballot); 503 with
//! `Retry-After` when the log cannot be reached or did not confirm in time. A 503 is not a
//! refusal: the vote may have been stored, so a client retries with the same `vote_id`,
//! which gets the same answer as the first try and counts once.
//!
//! Every request first passes the per-address guard (request rate, failed-key throttle);
//! every vote, single or batched, then counts against the per-voter and per-poll limits.

mod batch;
pub mod limits;
mod votes;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};

use axum::extract::DefaultBodyLimit;
use axum::routing::post;
use axum::Router;
use futures::StreamExt;
use tally_core::api::{Accepted, VoteStatus};
use tally_core::auth::ApiKeys;
use tally_core::poll::{Dedupe, Poll, PollStatus, ResultsVisibility};
use tally_core::ports::{spread_key, Appended, PollRegistry, VoteLog, Warehouse};
use tally_core::problem::Problem;
use tally_core::secrets::{PseudonymScheme, Secrets};
use tally_core::vote::{build_vote, token_unique_key, Vote, VoteRequest, VoterHasher};
use tally_core::{time, token};
use tally_service::http::{cors, guard, health, Guard, ServeConfig};
use tally_service::{PollCache, Tasks};
use tokio::net::TcpListener;

pub use batch::{parse_batch, BatchLine};
pub use votes::{VOTER_COOKIE, VOTER_HEADER};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("http listener")]
    Io(#[from] std::io::Error),
    #[error("configuration: {0}")]
    Config(String),
}

#[derive(Clone)]
pub struct Deps {
    pub log: Arc<dyn VoteLog>,
    pub registry: Arc<dyn PollRegistry>,
    /// Answers a late retry on a closed poll whose votes left the log
    /// ([`tally_core::ports::LogRetention`]); without it such a retry is answered
    /// `poll-closed`. Not needed with a log that keeps every entry.
    pub warehouse: Option<Arc<dyn Warehouse>>,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Server secret: the pseudonym, token and results keys are derived from it.
    pub secret: Vec<u8>,
    /// Keys that may import batches (`ingest` and `admin` roles).
    pub keys: ApiKeys,
    pub max_vote_bytes: usize,
    pub max_batch_bytes: usize,
    pub max_batch_lines: usize,
    /// Distinct polls one batch may name.
    pub max_batch_polls: usize,
    pub limits: limits::LimitConfig,
    pub request_timeout: std::time::Duration,
    /// Connection limits and drain of the listener.
    pub serve: ServeConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            secret: Vec::new(),
            keys: ApiKeys::default(),
            max_vote_bytes: 16 * 1024,
            max_batch_bytes: 8 * 1024 * 1024,
            max_batch_lines: 10_000,
            max_batch_polls: 100,
            limits: limits::LimitConfig::default(),
            request_timeout: health::REQUEST_TIMEOUT,
            serve: ServeConfig::default(),
        }
    }
}

pub struct Ingest {
    log: Arc<dyn VoteLog>,
    warehouse: Option<Arc<dyn Warehouse>>,
    /// Warehouse look-ups of late retries in flight at most: any caller can send a vote
    /// with a vote id to a purged poll, and each costs the warehouse a scan of the poll.
    lookups: tokio::sync::Semaphore,
    limits: Arc<limits::Limits>,
    guard: Arc<Guard>,
    polls: Arc<PollCache>,
    secrets: Secrets,
    /// Pseudonym hashers of per-poll polls, so a vote costs no key derivation; bounded.
    hashers: RwLock<foldhash::HashMap<String, VoterHasher>>,
    /// The per-vote metrics, registered once ([`describe_metrics`]): a registry lookup per
    /// vote showed in profiles of single votes.
    accepted: metrics::Counter,
    append_single: metrics::Histogram,
    config: Config,
}

/// How long a results token shows an `after_vote` poll's results.
const RESULTS_TOKEN_TTL_SECONDS: i64 = 30 * 86_400;
/// Per-poll hashers kept at most; the cache starts over when full.
const MAX_CACHED_HASHERS: usize = 10_000;

impl Ingest {
    /// Builds the intake; its background work (the poll cache's registry watch, the
    /// limiter sweeper) runs as tasks of `tasks`.
    pub fn new(deps: Deps, config: Config, tasks: &Tasks) -> Result<Arc<Ingest>> {
        let secrets = Secrets::new(&config.secret).map_err(Error::Config)?;
        describe_metrics();
        let limits = Arc::new(limits::Limits::new(&config.limits));
        let guard = Arc::new(Guard::new(
            limits::Proxies::new(config.limits.trusted_proxies.clone()),
            config.limits.per_ip,
            config.limits.auth_failures,
        ));
        let (swept_limits, swept_guard) = (limits.clone(), guard.clone());
        guard::sweep_periodically(tasks, move || {
            swept_limits.retain_recent();
            swept_guard.retain_recent();
        });
        Ok(Arc::new(Ingest {
            log: deps.log,
            warehouse: deps.warehouse,
            lookups: tokio::sync::Semaphore::new(MAX_WAREHOUSE_LOOKUPS),
            limits,
            guard,
            polls: PollCache::start(deps.registry, tasks),
            secrets,
            hashers: RwLock::default(),
            accepted: metrics::counter!("tally_votes_accepted_total"),
            append_single: metrics::histogram!("tally_log_append_duration_seconds", "mode" => "single"),
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

    /// The hasher that turns voter ids into this poll's voter keys.
    fn hasher(&self, poll: &Poll) -> VoterHasher {
        if poll.voter_key_scheme == PseudonymScheme::Global {
            return self.secrets.voter_hasher(&poll.id, poll.voter_key_scheme);
        }
        if let Some(hasher) = self.hashers.read().expect("hasher cache").get(&poll.id) {
            return hasher.clone();
        }
        let hasher = self.secrets.voter_hasher(&poll.id, poll.voter_key_scheme);
        let mut hashers = self.hashers.write().expect("hasher cache");
        if hashers.len() >= MAX_CACHED_HASHERS {
            hashers.clear();
        }
        hashers.insert(poll.id.clone(), hasher.clone());
        hasher
    }

    /// Validates, hashes and appends one vote.
    pub async fn submit(&self, poll_id: &str, request: VoteRequest) -> Result<Accepted, Problem> {
        let answer = self.submit_one(poll_id, request).await;
        self.count_answer(&answer);
        answer
    }

    async fn submit_one(&self, poll_id: &str, request: VoteRequest) -> Result<Accepted, Problem> {
        let now = time::now_ms();
        let poll = self.poll(poll_id).await?;
        let prepared = self.prepare(&poll, &request, now)?;
        if prepared.late {
            return self.late_retry(&poll, prepared, now).await;
        }
        let started = std::time::Instant::now();
        let appended = self.log.append(&prepared.vote, &prepared.unique_key).await;
        self.append_single.record(started.elapsed().as_secs_f64());
        if let Err(err) = &appended {
            tracing::warn!(poll_id, error = %err.chain(), "vote not accepted: log unavailable");
        }
        self.answer(&poll, prepared, appended, now)
    }

    /// Validates, hashes and appends many votes, each `(poll_id, request)` on its own terms;
    /// the answers are in the order of `requests`. The votes that pass go to the log
    /// together ([`VoteLog::append_many`]). A batch names at most `max_batch_polls` polls:
    /// each new one may cost a registry read.
    pub async fn submit_many(
        &self,
        requests: Vec<Result<(String, VoteRequest), Problem>>,
    ) -> Vec<Result<Accepted, Problem>> {
        let now = time::now_ms();
        // A batch usually names a handful of polls: look each up once.
        let mut polls: HashMap<String, Result<Arc<Poll>, Problem>> = HashMap::new();
        let mut answers: Vec<Option<Result<Accepted, Problem>>> = Vec::new();
        let mut ready: Vec<(Vote, String)> = Vec::new();
        let mut ready_slots: Vec<(usize, Arc<Poll>, bool)> = Vec::new();
        let mut late: Vec<(usize, Arc<Poll>, Prepared)> = Vec::new();
        for request in requests {
            let prepared = match request {
                Err(problem) => Err(problem),
                Ok((poll_id, request)) => {
                    let poll = match polls.get(&poll_id) {
                        Some(poll) => poll.clone(),
                        None if polls.len() >= self.config.max_batch_polls => {
                            Err(too_many_polls(self.config.max_batch_polls))
                        }
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
                Ok((poll, prepared)) if prepared.late => {
                    late.push((answers.len(), poll, prepared));
                    answers.push(None);
                }
                Ok((poll, prepared)) => {
                    ready_slots.push((answers.len(), poll, prepared.by_token));
                    ready.push((prepared.vote, prepared.unique_key));
                    answers.push(None);
                }
                Err(problem) => answers.push(Some(Err(problem))),
            }
        }
        let started = std::time::Instant::now();
        let appended = self.log.append_many(&ready).await;
        metrics::histogram!("tally_log_append_duration_seconds", "mode" => "batch")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("tally_ingest_batch_size").record(answers.len() as f64);
        let unavailable = appended.iter().filter(|a| a.is_err()).count();
        if let Some(Err(err)) = appended.iter().find(|a| a.is_err()) {
            tracing::warn!(votes = unavailable, error = %err.chain(), "votes of a batch not accepted: log unavailable");
        }
        for (((slot, poll, by_token), (vote, unique_key)), appended) in
            ready_slots.into_iter().zip(ready).zip(appended)
        {
            let prepared = Prepared {
                vote,
                unique_key,
                by_token,
                late: false,
            };
            answers[slot] = Some(self.answer(&poll, prepared, appended, now));
        }
        let late_answers: Vec<(usize, Result<Accepted, Problem>)> = futures::stream::iter(late)
            .map(|(slot, poll, prepared)| async move {
                (slot, self.late_retry(&poll, prepared, now).await)
            })
            .buffer_unordered(LATE_RETRIES_IN_FLIGHT)
            .collect()
            .await;
        for (slot, answer) in late_answers {
            answers[slot] = Some(answer);
        }
        answers
            .into_iter()
            .map(|answer| {
                let answer = answer.expect("every vote is answered");
                self.count_answer(&answer);
                answer
            })
            .collect()
    }

    /// What must hold before a vote goes to the log: the poll takes votes, the voter's
    /// token (if the poll wants one), a valid vote, the rate limits. A vote with its own
    /// `vote_id` on a closed poll may be a late retry of a vote taken before the close: it
    /// is prepared as `late`, to be looked up instead of appended.
    fn prepare(&self, poll: &Poll, request: &VoteRequest, now: i64) -> Result<Prepared, Problem> {
        let poll_id = &poll.id;
        let mut late = false;
        match poll.status(now) {
            PollStatus::Open => {}
            PollStatus::Closed if request.vote_id.is_some() => late = true,
            PollStatus::Closed => return Err(poll_closed(poll_id)),
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
                &self.secrets,
                poll.voter_key_scheme,
                request.token.as_deref(),
                &poll.id,
                request.voter_id.as_deref(),
                now / 1000,
            )?;
        }
        let vote = build_vote(poll, request, &self.hasher(poll), now)?;
        self.limits.check_vote(&poll.id, &vote.voter_key)?;
        // On a `dedupe: none` poll that wants tokens, a token vouches for one ballot: it is
        // the uniqueness key, so a second vote with it (under any vote id) is refused.
        let token = request
            .token
            .as_deref()
            .filter(|_| poll.require_token && poll.dedupe == Dedupe::None);
        let (unique_key, by_token) = match token {
            Some(token) => (token_unique_key(token), true),
            None => (vote.unique_key(poll.dedupe), false),
        };
        // A poll spread over partitions: the key says so, and where it goes.
        let unique_key = if poll.spread > 1 {
            spread_key(poll.spread, &unique_key)
        } else {
            unique_key
        };
        Ok(Prepared {
            vote,
            unique_key,
            by_token,
            late,
        })
    }

    /// Answers a vote on a closed poll: the original 202 when it is a retry of a vote taken
    /// before the close — found in the log, or in the warehouse once the poll's entries
    /// left the log — and `poll-closed` otherwise. Nothing is appended.
    async fn late_retry(
        &self,
        poll: &Poll,
        prepared: Prepared,
        now: i64,
    ) -> Result<Accepted, Problem> {
        let vote = &prepared.vote;
        let found = match self.log.find(vote, &prepared.unique_key).await {
            Ok(None) if poll.log_purged_at.is_some() => self.counted(vote).await,
            found => found,
        };
        match found {
            Ok(Some(original @ Appended::Accepted { .. })) => {
                self.answer(poll, prepared, Ok(original), now)
            }
            Ok(_) => Err(poll_closed(&poll.id)),
            Err(err) => {
                tracing::warn!(poll_id = %poll.id, error = %err.chain(), "a late retry could not be looked up");
                Err(Problem::unavailable(
                    "the vote could not be looked up; retry with the same vote_id",
                ))
            }
        }
    }

    /// The counted vote with this vote's id, as the log would answer for it.
    async fn counted(&self, vote: &Vote) -> tally_core::Result<Option<Appended>> {
        let Some(warehouse) = &self.warehouse else {
            return Ok(None);
        };
        // Waits for a turn; the request's time limit bounds the wait.
        let _turn = self.lookups.acquire().await.expect("never closed");
        Ok(warehouse
            .counted_vote(&vote.poll_id, &vote.vote_id)
            .await?
            .map(|stored| Appended::for_taken_key(&stored.vote, vote, stored.seq)))
    }

    /// Counts a vote's answer: `tally_votes_accepted_total` for every 202 (a retry's too:
    /// it is one more 202), `tally_votes_rejected_total` by problem type otherwise.
    fn count_answer(&self, answer: &Result<Accepted, Problem>) {
        match answer {
            Ok(_) => self.accepted.increment(1),
            Err(problem) => {
                metrics::counter!("tally_votes_rejected_total", "type" => problem.slug().to_owned())
                    .increment(1)
            }
        }
    }

    /// The answer to a vote the log has had its say on.
    fn answer(
        &self,
        poll: &Poll,
        prepared: Prepared,
        appended: tally_core::Result<Appended>,
        now: i64,
    ) -> Result<Accepted, Problem> {
        match appended {
            Ok(Appended::Accepted { .. }) => Ok(Accepted {
                vote_id: prepared.vote.vote_id,
                status: VoteStatus::Accepted,
                results_token: (poll.results_visibility == ResultsVisibility::AfterVote).then(
                    || {
                        token::mint_results(
                            &self.secrets,
                            &poll.id,
                            now / 1000 + RESULTS_TOKEN_TTL_SECONDS,
                        )
                    },
                ),
            }),
            Ok(Appended::AlreadyVoted) if prepared.by_token => Err(Problem::new(
                409,
                "token-used",
                "Voter token used",
                format!(
                    "this voter token was already used for a vote in poll `{}`; a token counts once",
                    poll.id
                ),
            )
            .with_field("token")),
            Ok(Appended::AlreadyVoted) => Err(Problem::new(
                409,
                "already-voted",
                "Already voted",
                format!(
                    "this voter has already voted in poll `{}`; the first vote counts",
                    poll.id
                ),
            )),
            Ok(Appended::VoteIdConflict) => Err(Problem::new(
                409,
                "vote-id-conflict",
                "Vote id reused",
                format!(
                    "vote_id `{}` was already used for another ballot in poll `{}`; this vote was not stored — send a new vote_id for a new vote, the same ballot to retry",
                    prepared.vote.vote_id, poll.id
                ),
            )
            .with_field("vote_id")),
            Err(_) => Err(Problem::unavailable("the vote was not accepted because the vote log is unreachable; retry with the same vote_id")),
        }
    }
}

/// Describes the metrics ingest records (once per process).
fn describe_metrics() {
    // Help texts go to the recorder installed then: install the process's first.
    tally_service::http::observe::recorder();
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(
        "tally_votes_accepted_total",
        "Votes answered 202 (single votes and batch lines; a retry's 202 counts again)"
    );
    describe_counter!(
        "tally_votes_rejected_total",
        "Votes refused after their body was read, by problem type"
    );
    describe_histogram!(
        "tally_log_append_duration_seconds",
        Unit::Seconds,
        "Time for the vote log to acknowledge an append (one vote, or the votes of a batch)"
    );
    describe_histogram!("tally_ingest_batch_size", "Lines in an imported batch");
}

/// A vote ready for the log.
struct Prepared {
    vote: Vote,
    unique_key: String,
    /// Its uniqueness key is its voter token (see [`Ingest::prepare`]).
    by_token: bool,
    /// On a closed poll: looked up as a late retry, not appended.
    late: bool,
}

/// Late retries of one batch looked up at once.
const LATE_RETRIES_IN_FLIGHT: usize = 32;
/// Warehouse look-ups of late retries one ingest process runs at once.
const MAX_WAREHOUSE_LOOKUPS: usize = 8;

fn poll_closed(poll_id: &str) -> Problem {
    Problem::new(
        409,
        "poll-closed",
        "Poll closed",
        format!("poll `{poll_id}` is closed to votes"),
    )
}

fn too_many_polls(max: usize) -> Problem {
    Problem::invalid(
        "poll_id",
        format!("a batch names at most {max} polls; split it by poll"),
    )
}

/// What a page on another origin may do with the vote route: POST a JSON vote with its
/// voter token, and read the token and the rate-limit headers of the answer.
static VOTE_CORS: cors::Policy = cors::Policy {
    methods: "POST",
    allow_headers: "content-type, tally-voter",
    expose_headers:
        "tally-voter, retry-after, ratelimit-limit, ratelimit-remaining, ratelimit-reset",
    poll_ids: cors::poll_in_path,
};

/// The vote routes alone, for composing with other services on one listener. They sit
/// behind the per-address guard (request rate and failed-key throttle). A single vote from
/// a web page of another origin is taken only when the poll lists that origin in
/// `allowed_origins` (see [`cors`]); the batch route is for servers and answers no page.
pub fn api(ingest: Arc<Ingest>) -> Router {
    let batch_limit = ingest.config.max_batch_bytes;
    let origins = cors::Cors::new(ingest.polls.clone(), ingest.guard.clone());
    let batch = Router::new().route(
        "/v1/votes:batch",
        post(batch::batch).layer(DefaultBodyLimit::max(batch_limit)),
    );
    // The vote route is guarded by its cross-origin layer (`cors::guarded`), so it is added
    // after `protect`. Its handler keeps the body limit (`max_vote_bytes`) itself: a layer
    // more would cost every vote a clone of the route and a boxed future.
    guard::protect(batch, ingest.guard.clone())
        .route(
            "/v1/polls/{id}/votes",
            post(votes::vote)
                .options(cors::preflight_only)
                .layer(cors::guarded(origins, &VOTE_CORS)),
        )
        .with_state(ingest)
}

/// The vote routes' part of the OpenAPI document (the query service merges it into the one
/// it serves).
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi as _;
    Doc::openapi()
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(votes::vote, batch::batch),
    components(schemas(
        tally_core::vote::VoteRequest,
        tally_core::api::Accepted,
        tally_core::api::BatchResult,
        tally_core::api::LineResult,
        tally_core::api::LineProblem,
        tally_core::api::VoteStatus,
    )),
    tags((name = "votes", description = "Vote intake (the ingest service; public, rate-limited)"))
)]
struct Doc;

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
    health::service("ingest", api(ingest), probes, timeout)
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
    let serve = config.serve.clone();
    let ingest = Ingest::new(deps, config, &tasks)?;
    tally_service::http::serve(listener, router(ingest), serve, shutdown).await?;
    tasks.shutdown(SHUTDOWN_GRACE).await;
    Ok(())
}
