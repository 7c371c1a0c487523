//! The query service: poll management, results, segment breakdowns, time series and live
//! totals over Server-Sent Events.
//!
//! In: admin and analyst requests, the registry (through a local cache), the warehouse, and
//! full live totals from processors. Out: the typed documents of `tally_core::api` and SSE
//! streams. Results come from the warehouse, which holds every counted vote exactly once;
//! live streams only move forward in log sequence.
//!
//! One module per resource: [`polls`] (management), [`results`] (results and who may see
//! them), [`analytics`] (breakdowns and time series), [`live`] (SSE), [`ballot`] (what a
//! voter is shown), [`sql`] (analysts' read-only SQL) and [`export`] (a poll's ballots as
//! files), both written by [`encode`]; [`catalog`] keeps the warehouse's copy of the poll
//! definitions current for analysts; [`assets`] serves the dashboard and the embeddable
//! widget.

mod analytics;
mod assets;
mod ballot;
mod catalog;
mod encode;
mod export;
mod live;
pub mod openapi;
mod polls;
mod results;
mod sql;
mod stats;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Query};
use axum::http::{header, HeaderMap};
use axum::routing::{get, post};
use axum::Router;
use tally_core::analyst::SqlLimits;
use tally_core::auth::{ApiKeys, Role};
use tally_core::poll::Poll;
use tally_core::ports::{LiveFeed, PollRegistry, Warehouse};
use tally_core::problem::Problem;
use tally_core::secrets::Secrets;
use tally_service::http::{cors, guard, health, ApiError, Guard, ServeConfig};
use tally_service::limits::{Proxies, Rate};
use tally_service::tasks::CancellationToken;
use tally_service::{PollCache, Tasks};
use tokio::net::TcpListener;

pub use ballot::Ballot;
pub use live::{LiveHub, MAX_STREAM_POLLS};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("http listener")]
    Io(#[from] std::io::Error),
}

#[derive(Clone)]
pub struct Deps {
    pub registry: Arc<dyn PollRegistry>,
    pub warehouse: Arc<dyn Warehouse>,
    pub live: Arc<dyn LiveFeed>,
}

/// The default time between SSE heartbeats, in seconds.
pub const DEFAULT_LIVE_HEARTBEAT_SECONDS: u64 = 15;
/// The default cap on live (SSE) connections served at once.
pub const DEFAULT_LIVE_MAX_CLIENTS: usize = 10_000;
/// The default cap on live connections from one client address.
pub const DEFAULT_LIVE_MAX_PER_ADDRESS: usize = 100;
/// The default request rate per client address.
pub const DEFAULT_RATE_PER_IP: &str = "100/s";

#[derive(Debug, Clone)]
pub struct Config {
    pub keys: ApiKeys,
    pub live_heartbeat: Duration,
    /// Totals for one client are sent at most this often.
    pub live_min_interval: Duration,
    /// A client that cannot take an event within this long is dropped.
    pub live_send_timeout: Duration,
    /// The server secret's keys: for minting voter tokens (refused without) and checking
    /// results tokens.
    pub secrets: Option<Secrets>,
    /// Live (SSE) connections served at once; more get 503.
    pub live_max_clients: usize,
    /// Live connections from one client address; more get 503.
    pub live_max_per_address: usize,
    /// Requests per client address (IPv6: per /64); `None` turns the limit off.
    pub rate_per_ip: Option<Rate>,
    /// Failed authentications per client address before it waits.
    pub auth_failures: Option<Rate>,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub request_timeout: Duration,
    /// Connection limits and drain of the listener.
    pub serve: ServeConfig,
    /// The limits every analyst query (`POST /v1/sql`) runs under.
    pub sql_limits: SqlLimits,
    /// The document served at `/openapi.json` (see [`openapi::document`]); `None` serves
    /// query's routes alone.
    pub openapi: Option<openapi::Document>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            keys: ApiKeys::default(),
            live_heartbeat: Duration::from_secs(DEFAULT_LIVE_HEARTBEAT_SECONDS),
            live_min_interval: Duration::from_millis(100),
            live_send_timeout: Duration::from_secs(30),
            secrets: None,
            live_max_clients: DEFAULT_LIVE_MAX_CLIENTS,
            live_max_per_address: DEFAULT_LIVE_MAX_PER_ADDRESS,
            rate_per_ip: Rate::parse(DEFAULT_RATE_PER_IP).expect("a valid default rate"),
            auth_failures: guard::default_auth_failures(),
            trusted_proxies: Vec::new(),
            request_timeout: health::REQUEST_TIMEOUT,
            serve: ServeConfig::default(),
            sql_limits: SqlLimits::default(),
            openapi: None,
        }
    }
}

pub struct App {
    live_slots: Arc<tokio::sync::Semaphore>,
    /// Live streams held per client address, so one address cannot take every slot.
    streams: Arc<tally_service::http::serve::PerAddress>,
    guard: Arc<Guard>,
    /// Fired when the process starts draining: live streams end with a `reconnect` event.
    drain: CancellationToken,
    registry: Arc<dyn PollRegistry>,
    warehouse: Arc<dyn Warehouse>,
    polls: Arc<PollCache>,
    live: Arc<LiveHub>,
    /// `/openapi.json`, rendered once.
    openapi: bytes::Bytes,
    config: Config,
}

impl App {
    /// Builds the service; its background work (the registry watch, the live feed
    /// follower) runs as tasks of `tasks`.
    pub fn new(deps: Deps, config: Config, tasks: &Tasks) -> Arc<App> {
        let live = Arc::new(LiveHub::default());
        live.follow(deps.live.clone(), tasks);
        let guard = Arc::new(Guard::new(
            Proxies::new(config.trusted_proxies.clone()),
            config.rate_per_ip,
            config.auth_failures,
        ));
        let swept = guard.clone();
        guard::sweep_periodically(tasks, move || swept.retain_recent());
        catalog::keep_recorded(deps.registry.clone(), deps.warehouse.clone(), tasks);
        Arc::new(App {
            live_slots: Arc::new(tokio::sync::Semaphore::new(config.live_max_clients)),
            streams: Arc::default(),
            guard,
            drain: CancellationToken::new(),
            polls: PollCache::start(deps.registry.clone(), tasks),
            registry: deps.registry,
            warehouse: deps.warehouse,
            live,
            openapi: openapi::render(&config),
            config,
        })
    }

    /// Ends every live stream (with a `reconnect` event) so a draining server can stop.
    pub fn drain(&self) {
        self.drain.cancel();
    }

    fn authorize(&self, headers: &HeaderMap, role: Role) -> Result<(), ApiError> {
        let header = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        self.config.keys.authorize(header, role)?;
        Ok(())
    }

    /// A poll from the cache (or the registry on a miss); 404 when there is none.
    async fn poll(&self, id: &str) -> Result<Arc<Poll>, ApiError> {
        match self.polls.get(id).await? {
            Some(poll) => Ok(poll),
            None => Err(Problem::not_found(&format!("poll `{id}`")).into()),
        }
    }
}

/// The query routes alone, for composing with other services on one listener.
pub fn api(app: Arc<App>) -> Router {
    let origins = cors::Cors::new(app.polls.clone(), app.guard.clone());
    let read_cors = cors::guarded(origins.clone(), &READ_CORS);
    let many_cors = cors::guarded(origins, &MANY_CORS);
    let routes = Router::new()
        .route("/v1/polls", post(polls::create).get(polls::list))
        .route(
            "/v1/polls/{id}",
            get(polls::get)
                .put(polls::replace)
                .patch(polls::patch)
                .delete(polls::archive),
        )
        .route("/v1/polls/{id}/close", post(polls::close))
        .route("/v1/polls/{id}/reopen", post(polls::reopen))
        .route("/v1/polls/{id}/tokens", post(polls::mint_token))
        .route("/v1/polls/{id}/breakdown", get(analytics::breakdown))
        .route("/v1/polls/{id}/timeseries", get(analytics::timeseries))
        .route("/v1/polls/{id}/export", get(export::export))
        .route("/v1/sql", post(sql::sql))
        .route("/dashboard", get(assets::dashboard_redirect))
        .route("/dashboard/", get(assets::overview))
        .route("/dashboard/polls/{id}", get(assets::poll_page))
        .route("/dashboard/assets/{version}/{file}", get(assets::versioned))
        .route("/widget.js", get(assets::widget))
        .route("/embed/{poll}", get(assets::embed_page))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/docs", get(openapi::docs));
    // The routes pages on other sites use are guarded by their cross-origin layer
    // (`cors::guarded`), so they are added after `protect`.
    guard::protect(routes, app.guard.clone())
        .route(
            "/v1/polls/{id}/results",
            get(results::results)
                .options(cors::preflight_only)
                .layer(read_cors.clone()),
        )
        .route(
            "/v1/polls/{id}/ballot",
            get(ballot::ballot)
                .options(cors::preflight_only)
                .layer(read_cors.clone()),
        )
        .route(
            "/v1/polls/{id}/live",
            get(live::live)
                .options(cors::preflight_only)
                .layer(read_cors),
        )
        .route(
            "/v1/live",
            get(live::live_many)
                .options(cors::preflight_only)
                .layer(many_cors),
        )
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(app)
}

/// What a page on another origin may read: a poll's ballot, results and live totals (the
/// widget), when the poll lists the origin in `allowed_origins`. Never with a key or cookie.
static READ_CORS: cors::Policy = cors::Policy {
    methods: "GET",
    allow_headers: "last-event-id",
    expose_headers: "",
    poll_ids: cors::poll_in_path,
};

/// The multi-poll live stream: every poll it names must allow the origin.
static MANY_CORS: cors::Policy = cors::Policy {
    methods: "GET",
    allow_headers: "last-event-id",
    expose_headers: "",
    poll_ids: cors::polls_in_query,
};

/// Readiness checks of what the query service depends on.
pub fn probes(app: &App) -> Vec<health::Probe> {
    vec![
        health::warehouse(app.warehouse.clone()),
        health::poll_registry(app.registry.clone()),
    ]
}

/// The query service: its routes, health, and problem+json for everything else.
pub fn router(app: Arc<App>) -> Router {
    describe_metrics();
    let probes = probes(&app);
    let timeout = app.config.request_timeout;
    health::service("query", api(app), probes, timeout)
}

/// Help texts of the query service's own metrics (live streams).
fn describe_metrics() {
    // Help texts go to the recorder installed then: install the process's first.
    tally_service::http::observe::recorder();
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!("tally_live_clients", "Live (SSE) streams open now");
    describe_counter!(
        "tally_live_events_total",
        "Live events delivered to clients (snapshots, totals, closed, hidden, reconnect)"
    );
}

/// How long a stopping process waits for its background tasks.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves the query API on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    deps: Deps,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let tasks = Tasks::new();
    let serve = config.serve.clone();
    let app = App::new(deps, config, &tasks);
    let draining = app.clone();
    tally_service::http::serve(listener, router(app), serve, async move {
        shutdown.await;
        // Live streams end with a `reconnect` event, so the drain does not wait on them.
        draining.drain();
    })
    .await?;
    tasks.shutdown(SHUTDOWN_GRACE).await;
    Ok(())
}

/// The query string as `T`, or a 400 naming what is wrong with it.
fn query_params<T>(params: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    params
        .map(|Query(p)| p)
        .map_err(|rejection| Problem::bad_request("invalid-query", rejection.body_text()).into())
}
