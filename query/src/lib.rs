//! The query service: poll management, results, segment breakdowns, time series and live
//! totals over Server-Sent Events.
//!
//! In: admin and analyst requests, the registry (through a local cache), the warehouse, and
//! full live totals from processors. Out: JSON documents and SSE streams. Results come from
//! the warehouse, which holds every counted vote exactly once; live streams only move
//! forward in log sequence.

mod live;
mod stats;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tally_core::auth::{ApiKeys, Role};
use tally_core::backend::{
    BreakdownQuery, Dimension, LiveFeed, PollRegistry, TimeseriesQuery, Warehouse,
};
use tally_core::poll::{NewPoll, Poll, PollKind, PollPatch, PollStatus, ResultsVisibility};
use tally_core::polls::PollCache;
use tally_core::problem::{ApiJson, Problem};
use tally_core::results::{share, Results};
use tally_core::segment::STANDARD_KEYS;
use tally_core::{health, time, Error as CoreError};
use tokio::net::TcpListener;

pub use live::LiveHub;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("http listener: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone)]
pub struct Deps {
    pub registry: Arc<dyn PollRegistry>,
    pub warehouse: Arc<dyn Warehouse>,
    pub live: Arc<dyn LiveFeed>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub keys: ApiKeys,
    /// Width of the processor's tumbling windows; time-series steps are multiples of it.
    pub window_seconds: u32,
    pub live_heartbeat: Duration,
    /// Totals for one client are sent at most this often.
    pub live_min_interval: Duration,
    /// A client that cannot take an event within this long is dropped.
    pub live_send_timeout: Duration,
    /// Server secret for minting voter tokens; minting is refused without it.
    pub secret: Option<Vec<u8>>,
    /// Live (SSE) connections served at once; more get 503.
    pub live_max_clients: usize,
    pub request_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            keys: ApiKeys::default(),
            window_seconds: 10,
            live_heartbeat: Duration::from_secs(15),
            live_min_interval: Duration::from_millis(100),
            live_send_timeout: Duration::from_secs(30),
            secret: None,
            live_max_clients: 10_000,
            request_timeout: health::REQUEST_TIMEOUT,
        }
    }
}

pub struct App {
    live_slots: Arc<tokio::sync::Semaphore>,
    registry: Arc<dyn PollRegistry>,
    warehouse: Arc<dyn Warehouse>,
    polls: Arc<PollCache>,
    live: Arc<LiveHub>,
    config: Config,
}

impl App {
    pub fn new(deps: Deps, config: Config) -> Arc<App> {
        let live = Arc::new(LiveHub::default());
        live.follow(deps.live.clone());
        Arc::new(App {
            live_slots: Arc::new(tokio::sync::Semaphore::new(config.live_max_clients)),
            polls: PollCache::start(deps.registry.clone()),
            registry: deps.registry,
            warehouse: deps.warehouse,
            live,
            config,
        })
    }

    fn authorize(&self, headers: &HeaderMap, role: Role) -> Result<(), Problem> {
        let header = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        self.config.keys.authorize(header, role).map(|_| ())
    }

    async fn poll(&self, id: &str) -> Result<Arc<Poll>, Problem> {
        match self.polls.get(id).await {
            Ok(Some(poll)) => Ok(poll),
            Ok(None) => Err(Problem::not_found(&format!("poll `{id}`"))),
            Err(err) => Err(server_error(err)),
        }
    }
}

/// Logs a back-end failure once, with its cause, and hides it from the client.
fn server_error(err: CoreError) -> Problem {
    match err {
        CoreError::Invalid(problem) => problem,
        err if err.is_transient() => {
            tracing::warn!(error = %err, "back end unavailable");
            err.into()
        }
        err => {
            tracing::error!(error = %err, "request failed");
            err.into()
        }
    }
}

/// The query routes alone, for composing with other services on one listener.
pub fn api(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/polls", post(create_poll).get(list_polls))
        .route(
            "/v1/polls/{id}",
            get(get_poll).patch(patch_poll).delete(archive_poll),
        )
        .route("/v1/polls/{id}/close", post(close_poll))
        .route("/v1/polls/{id}/reopen", post(reopen_poll))
        .route("/v1/polls/{id}/tokens", post(mint_token))
        .route("/v1/polls/{id}/results", get(results))
        .route("/v1/polls/{id}/breakdown", get(breakdown))
        .route("/v1/polls/{id}/timeseries", get(timeseries))
        .route("/v1/polls/{id}/live", get(live))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(app)
}

/// Readiness checks of what the query service depends on.
pub fn probes(app: &App) -> Vec<health::Probe> {
    vec![
        health::warehouse(app.warehouse.clone()),
        health::poll_registry(app.registry.clone()),
    ]
}

/// The query service: its routes, health, and problem+json for everything else.
pub fn router(app: Arc<App>) -> Router {
    let probes = probes(&app);
    let timeout = app.config.request_timeout;
    health::service(api(app), probes, timeout)
}

/// Serves the query API on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    deps: Deps,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let app = App::new(deps, config);
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

type Reply = Result<Response, Problem>;

fn poll_json(status: StatusCode, poll: &Poll) -> Response {
    (status, Json(poll.view(time::now_ms()))).into_response()
}

// ---- poll management -------------------------------------------------------------------

async fn create_poll(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    ApiJson(new): ApiJson<NewPoll>,
) -> Reply {
    app.authorize(&headers, Role::Admin)?;
    let poll = new.into_poll(time::now_ms(), || {
        format!("p-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
    })?;
    let created = app.registry.create(&poll).await.map_err(server_error)?;
    app.polls.remember(created.clone());
    let mut response = poll_json(StatusCode::CREATED, &created);
    if let Ok(location) = format!("/v1/polls/{}", created.id).parse() {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    limit: Option<usize>,
    after: Option<String>,
    #[serde(default)]
    include_archived: bool,
}

fn query_params<T>(params: Result<Query<T>, QueryRejection>) -> Result<T, Problem> {
    params
        .map(|Query(p)| p)
        .map_err(|rejection| Problem::bad_request("invalid-query", rejection.body_text()))
}

async fn list_polls(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Reply {
    app.authorize(&headers, Role::Admin)?;
    let params = query_params(params)?;
    let limit = params.limit.unwrap_or(50);
    if !(1..=100).contains(&limit) {
        return Err(Problem::invalid("limit", "limit must be between 1 and 100"));
    }
    let now = time::now_ms();
    let mut polls = Vec::new();
    let mut cursor = params.after.clone();
    // Archived polls are skipped unless asked for, so a page may take several reads.
    'pages: loop {
        let page = app
            .registry
            .list(cursor.as_deref(), limit + 1)
            .await
            .map_err(server_error)?;
        let exhausted = page.len() <= limit;
        for poll in page {
            cursor = Some(poll.id.clone());
            if poll.archived_at.is_some() && !params.include_archived {
                continue;
            }
            polls.push(poll);
            if polls.len() > limit {
                break 'pages;
            }
        }
        if exhausted {
            break;
        }
    }
    let next = (polls.len() > limit).then(|| polls[limit - 1].id.clone());
    polls.truncate(limit);
    let views: Vec<_> = polls.iter().map(|p| p.view(now)).collect();
    Ok(Json(json!({"polls": views, "next": next})).into_response())
}

async fn get_poll(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Reply {
    app.authorize(&headers, Role::Admin)?;
    let poll = app
        .registry
        .get(&id)
        .await
        .map_err(server_error)?
        .ok_or_else(|| Problem::not_found(&format!("poll `{id}`")))?;
    Ok(poll_json(StatusCode::OK, &poll))
}

/// Read-modify-write with the registry's version check, retried when another writer won.
async fn modify(
    app: &App,
    id: &str,
    change: impl Fn(&mut Poll) -> Result<Vec<String>, Problem>,
) -> Result<Poll, Problem> {
    for _ in 0..5 {
        let mut poll = app
            .registry
            .get(id)
            .await
            .map_err(server_error)?
            .ok_or_else(|| Problem::not_found(&format!("poll `{id}`")))?;
        let removed = change(&mut poll)?;
        if !removed.is_empty() {
            let tally = app.warehouse.tally(id).await.map_err(server_error)?;
            if let Some(voted) = removed
                .iter()
                .find(|o| tally.counts.get(*o).copied().unwrap_or(0) > 0)
            {
                return Err(Problem::invalid(
                    "options",
                    format!("option `{voted}` has votes and cannot be removed"),
                ));
            }
        }
        match app.registry.update(&poll).await {
            Ok(updated) => return Ok((*app.polls.remember(updated)).clone()),
            Err(CoreError::Conflict(_)) => continue,
            Err(err) => return Err(server_error(err)),
        }
    }
    Err(CoreError::Conflict(format!("poll `{id}`")).into())
}

async fn patch_poll(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<PollPatch>,
) -> Reply {
    app.authorize(&headers, Role::Admin)?;
    let poll = modify(&app, &id, |poll| {
        if poll.archived_at.is_some() {
            return Err(archived(&poll.id));
        }
        patch.clone().apply(poll, time::now_ms())
    })
    .await?;
    Ok(poll_json(StatusCode::OK, &poll))
}

fn archived(id: &str) -> Problem {
    Problem::new(
        409,
        "poll-archived",
        "Poll archived",
        format!("poll `{id}` is archived and cannot change"),
    )
}

/// Close, reopen and archive: an admin-only status change applied with the version check.
async fn change_status(
    app: &App,
    headers: &HeaderMap,
    id: &str,
    archived_ok: bool,
    change: impl Fn(&mut Poll, i64),
) -> Reply {
    app.authorize(headers, Role::Admin)?;
    let poll = modify(app, id, |poll| {
        if poll.archived_at.is_some() && !archived_ok {
            return Err(archived(&poll.id));
        }
        let now = time::now_ms();
        change(poll, now);
        poll.updated_at = now;
        Ok(Vec::new())
    })
    .await?;
    Ok(poll_json(StatusCode::OK, &poll))
}

async fn close_poll(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Reply {
    change_status(&app, &headers, &id, false, |poll, now| {
        poll.closed_at.get_or_insert(now);
    })
    .await
}

async fn reopen_poll(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Reply {
    change_status(&app, &headers, &id, false, |poll, now| {
        poll.closed_at = None;
        // Reopening means open now: a schedule end already passed no longer applies.
        if poll.closes_at.is_some_and(|at| at <= now) {
            poll.closes_at = None;
        }
    })
    .await
}

async fn archive_poll(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Reply {
    change_status(&app, &headers, &id, true, |poll, now| {
        poll.archived_at.get_or_insert(now);
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    voter_id: String,
    ttl_seconds: Option<u64>,
}

const MAX_TOKEN_TTL: u64 = 90 * 86_400;

/// Mints a signed voter token for one voter of one poll (admin).
async fn mint_token(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<TokenRequest>,
) -> Reply {
    app.authorize(&headers, Role::Admin)?;
    let Some(secret) = &app.config.secret else {
        return Err(Problem::new(
            501,
            "token-minting-disabled",
            "Token minting disabled",
            "start the query service with TALLY_SECRET (the same secret as ingest) to mint voter tokens",
        ));
    };
    let poll = app.poll(&id).await?;
    if request.voter_id.is_empty()
        || request.voter_id.chars().count() > tally_core::vote::MAX_VOTER_ID_CHARS
    {
        return Err(Problem::invalid(
            "voter_id",
            "voter_id must be 1-256 characters",
        ));
    }
    let ttl = request.ttl_seconds.unwrap_or(86_400);
    if ttl == 0 || ttl > MAX_TOKEN_TTL {
        return Err(Problem::invalid(
            "ttl_seconds",
            format!("ttl_seconds must be between 1 and {MAX_TOKEN_TTL}"),
        ));
    }
    let expiry = time::now_ms() / 1000 + ttl as i64;
    let token = tally_core::token::mint(secret, &poll.id, &request.voter_id, expiry);
    let body = json!({"token": token, "poll_id": poll.id, "voter_id": request.voter_id, "expires_at": time::format_ms(expiry * 1000)});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

// ---- results ---------------------------------------------------------------------------

async fn current_results(app: &App, poll: &Poll) -> Result<Results, Problem> {
    let tally = app.warehouse.tally(&poll.id).await.map_err(server_error)?;
    Ok(Results::new(poll, &tally, time::now_ms()))
}

#[derive(Deserialize)]
struct ResultsParams {
    results_token: Option<String>,
}

/// Whether the caller may see `poll`'s results, per its `results_visibility`. Analyst and
/// admin keys always may; a key that is sent must be valid.
fn may_see_results(
    app: &App,
    poll: &Poll,
    headers: &HeaderMap,
    results_token: Option<&str>,
) -> Result<(), Problem> {
    if headers.contains_key(header::AUTHORIZATION) {
        return app.authorize(headers, Role::Analyst);
    }
    let hidden = |detail: String| Problem::new(403, "results-hidden", "Results hidden", detail);
    match poll.results_visibility {
        ResultsVisibility::Live => Ok(()),
        ResultsVisibility::AfterClose => match poll.status(time::now_ms()) {
            PollStatus::Closed | PollStatus::Archived => Ok(()),
            _ => Err(hidden(format!(
                "the results of poll `{}` are shown once it closes",
                poll.id
            ))),
        },
        ResultsVisibility::AfterVote => {
            let shown = match (&app.config.secret, results_token) {
                (Some(secret), Some(token)) => {
                    tally_core::token::verify_results(secret, token, &poll.id, time::now_ms() / 1000)
                }
                _ => false,
            };
            if shown {
                Ok(())
            } else {
                Err(hidden(format!(
                    "the results of poll `{}` are shown to voters: pass the results_token of your vote's answer as ?results_token=",
                    poll.id
                )))
            }
        }
        ResultsVisibility::Private => Err(Problem::unauthorized(format!(
            "the results of poll `{}` are private: send an analyst key as Authorization: Bearer <key>",
            poll.id
        ))),
    }
}

async fn results(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    params: Result<Query<ResultsParams>, QueryRejection>,
) -> Reply {
    let params = query_params(params)?;
    let poll = app.poll(&id).await?;
    may_see_results(&app, &poll, &headers, params.results_token.as_deref())?;
    let results = current_results(&app, &poll).await?;
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(results)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakdownParams {
    by: Option<String>,
    from: Option<String>,
    to: Option<String>,
    #[serde(rename = "where")]
    filter: Option<String>,
}

fn dimension(poll: &Poll, field: &str, key: &str) -> Result<Dimension, Problem> {
    if STANDARD_KEYS.contains(&key) || poll.dimensions.iter().any(|d| d == key) {
        Ok(Dimension(key.to_owned()))
    } else {
        let mut known: Vec<&str> = STANDARD_KEYS.to_vec();
        known.extend(poll.dimensions.iter().map(String::as_str));
        Err(Problem::invalid(
            field,
            format!(
                "`{key}` is not a segment key of this poll; use one of {}",
                known.join(", ")
            ),
        ))
    }
}

fn time_param(field: &str, value: Option<&str>) -> Result<Option<i64>, Problem> {
    value
        .map(|text| {
            time::parse(text).ok_or_else(|| {
                Problem::invalid(
                    field,
                    format!("`{text}` is not an RFC 3339 time or epoch milliseconds"),
                )
            })
        })
        .transpose()
}

#[derive(Serialize)]
struct GroupOption {
    id: String,
    count: u64,
    share: f64,
    ci95: Option<[f64; 2]>,
}

async fn breakdown(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    params: Result<Query<BreakdownParams>, QueryRejection>,
) -> Reply {
    app.authorize(&headers, Role::Analyst)?;
    let params = query_params(params)?;
    let poll = app.poll(&id).await?;
    let by_text = params.by.as_deref().unwrap_or("").trim();
    if by_text.is_empty() {
        return Err(Problem::invalid(
            "by",
            "name the dimensions to break down by, e.g. by=country,device",
        ));
    }
    let by: Vec<Dimension> = by_text
        .split(',')
        .map(|k| dimension(&poll, "by", k.trim()))
        .collect::<Result<_, _>>()?;
    if by.len() > 3 {
        return Err(Problem::invalid(
            "by",
            "break down by at most 3 dimensions at once",
        ));
    }
    let mut filters: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for clause in params
        .filter
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        let Some((key, value)) = clause.split_once(':') else {
            return Err(Problem::invalid(
                "where",
                format!("`{clause}` is not of the form key:value"),
            ));
        };
        dimension(&poll, "where", key)?;
        filters
            .entry(key.to_owned())
            .or_default()
            .push(value.to_owned());
    }
    let query = BreakdownQuery {
        poll_id: poll.id.clone(),
        by: by.clone(),
        filters: filters
            .into_iter()
            .map(|(k, v)| (Dimension(k), v))
            .collect(),
        from_ms: time_param("from", params.from.as_deref())?,
        to_ms: time_param("to", params.to.as_deref())?,
    };
    let breakdown = app
        .warehouse
        .breakdown(&query)
        .await
        .map_err(server_error)?;

    let total_ballots: u64 = breakdown.groups.iter().map(|g| g.ballots).sum();
    let mut all: BTreeMap<String, u64> = BTreeMap::new();
    for group in &breakdown.groups {
        for (option, count) in &group.counts {
            *all.entry(option.clone()).or_default() += count;
        }
    }
    let answer_keys = poll.answer_keys();
    let groups: Vec<serde_json::Value> = breakdown
        .groups
        .iter()
        .map(|group| {
            let segment: serde_json::Map<String, serde_json::Value> = by
                .iter()
                .zip(&group.values)
                .map(|(d, v)| (d.0.clone(), json!(v)))
                .collect();
            let options: Vec<GroupOption> = answer_keys
                .iter()
                .map(|(option, _)| {
                    let count = group.counts.get(option).copied().unwrap_or(0);
                    GroupOption {
                        id: option.clone(),
                        count,
                        share: share(count, group.ballots),
                        ci95: stats::wilson(count, group.ballots),
                    }
                })
                .collect();
            let rest: BTreeMap<String, u64> = all
                .iter()
                .map(|(k, v)| (k.clone(), v - group.counts.get(k).copied().unwrap_or(0)))
                .collect();
            let difference = if poll.kind == PollKind::Multi {
                stats::proportions(
                    &group.counts,
                    group.ballots,
                    &rest,
                    total_ballots - group.ballots,
                )
            } else {
                stats::chi_square(&group.counts, &rest)
            };
            json!({
                "segment": segment,
                "total_votes": group.ballots,
                "options": options,
                "differs": difference.p_value.is_some_and(|p| p < 0.05),
                "p_value": difference.p_value,
                "small_sample": difference.small_sample,
            })
        })
        .collect();
    let by_names: Vec<&str> = by.iter().map(|d| d.0.as_str()).collect();
    Ok(Json(json!({
        "poll_id": poll.id,
        "by": by_names,
        "total_votes": total_ballots,
        "test": if poll.kind == PollKind::Multi { "two_proportion_z_bonferroni" } else { "chi_square" },
        "groups": groups,
        "as_of": breakdown.as_of,
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeseriesParams {
    step: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// `10s`, `1m`, `1h`, `1d` or plain seconds.
fn parse_step(text: &str) -> Option<u32> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let number: u32 = number.parse().ok()?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    number.checked_mul(unit).filter(|s| *s > 0)
}

const MAX_POINTS: i64 = 10_000;

async fn timeseries(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    params: Result<Query<TimeseriesParams>, QueryRejection>,
) -> Reply {
    app.authorize(&headers, Role::Analyst)?;
    let params = query_params(params)?;
    let poll = app.poll(&id).await?;
    let window = app.config.window_seconds.max(1);
    let step_text = params.step.as_deref().unwrap_or("1m");
    let Some(step) = parse_step(step_text) else {
        return Err(Problem::invalid(
            "step",
            format!("`{step_text}` is not a step such as 10s, 1m, 1h or 1d"),
        ));
    };
    if step % window != 0 {
        return Err(Problem::invalid(
            "step",
            format!("step must be a multiple of the {window}s aggregation window"),
        ));
    }
    let from_ms = time_param("from", params.from.as_deref())?;
    let to_ms = time_param("to", params.to.as_deref())?;
    let span_start = from_ms.unwrap_or(poll.created_at);
    let span_end = to_ms.unwrap_or_else(time::now_ms);
    if (span_end - span_start) / 1000 / step as i64 > MAX_POINTS {
        return Err(Problem::invalid("step", format!("that range has more than {MAX_POINTS} steps; choose a larger step or a shorter range")));
    }
    let points = app
        .warehouse
        .timeseries(&TimeseriesQuery {
            poll_id: poll.id.clone(),
            step_seconds: step,
            from_ms,
            to_ms,
        })
        .await
        .map_err(server_error)?;
    let keys = poll.answer_keys();
    let points: Vec<serde_json::Value> = points
        .into_iter()
        .map(|point| {
            let mut options: BTreeMap<String, u64> =
                keys.iter().map(|(k, _)| (k.clone(), 0)).collect();
            options.extend(point.counts);
            json!({"t": time::format_ms(point.t * 1000), "options": options})
        })
        .collect();
    Ok(Json(json!({"poll_id": poll.id, "step_seconds": step, "points": points})).into_response())
}

async fn live(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    params: Result<Query<ResultsParams>, QueryRejection>,
) -> Reply {
    let params = query_params(params)?;
    let poll = app.poll(&id).await?;
    may_see_results(&app, &poll, &headers, params.results_token.as_deref())?;
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
            ))
        }
    };
    let cached = app.live.subscribe(&poll.id).borrow().clone();
    let initial = match cached {
        Some(results) => results,
        None => {
            let results = current_results(&app, &poll).await?;
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
        return Err(problem);
    };
    let mut response =
        live::stream(app.clone(), poll.id.clone(), initial, resume_after, permit).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        "no-cache".parse().expect("static header"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse() {
        assert_eq!(parse_step("10s"), Some(10));
        assert_eq!(parse_step("1m"), Some(60));
        assert_eq!(parse_step("2h"), Some(7200));
        assert_eq!(parse_step("30"), Some(30));
        assert_eq!(parse_step("0m"), None);
        assert_eq!(parse_step("1w"), None);
        assert_eq!(parse_step("m"), None);
    }
}
