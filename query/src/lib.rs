//! The query service: poll management, results, segment breakdowns, time series and live
//! totals over Server-Sent Events.
//!
//! In: admin and analyst requests, the registry (through a local cache), the warehouse, and
//! full live totals from processors. Out: the typed documents of `tally_core::api` and SSE
//! streams. Results come from the warehouse, which holds every counted vote exactly once;
//! live streams only move forward in log sequence.
//!
//! One module per resource: [`polls`] (management), [`results`] (results and who may see
//! them), [`analytics`] (breakdowns and time series), [`live`] (SSE).

mod analytics;
mod live;
mod polls;
mod results;
mod stats;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Query};
use axum::http::{header, HeaderMap};
use axum::routing::{get, post};
use axum::Router;
use tally_core::auth::{ApiKeys, Role};
use tally_core::poll::Poll;
use tally_core::ports::{LiveFeed, PollRegistry, Warehouse};
use tally_core::problem::Problem;
use tally_service::http::{health, ApiError};
use tally_service::{PollCache, Tasks};
use tokio::net::TcpListener;

pub use live::LiveHub;

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

#[derive(Debug, Clone)]
pub struct Config {
    pub keys: ApiKeys,
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
            live_heartbeat: Duration::from_secs(DEFAULT_LIVE_HEARTBEAT_SECONDS),
            live_min_interval: Duration::from_millis(100),
            live_send_timeout: Duration::from_secs(30),
            secret: None,
            live_max_clients: DEFAULT_LIVE_MAX_CLIENTS,
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
    /// Builds the service; its background work (the registry watch, the live feed
    /// follower) runs as tasks of `tasks`.
    pub fn new(deps: Deps, config: Config, tasks: &Tasks) -> Arc<App> {
        let live = Arc::new(LiveHub::default());
        live.follow(deps.live.clone(), tasks);
        Arc::new(App {
            live_slots: Arc::new(tokio::sync::Semaphore::new(config.live_max_clients)),
            polls: PollCache::start(deps.registry.clone(), tasks),
            registry: deps.registry,
            warehouse: deps.warehouse,
            live,
            config,
        })
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
    Router::new()
        .route("/v1/polls", post(polls::create).get(polls::list))
        .route(
            "/v1/polls/{id}",
            get(polls::get).patch(polls::patch).delete(polls::archive),
        )
        .route("/v1/polls/{id}/close", post(polls::close))
        .route("/v1/polls/{id}/reopen", post(polls::reopen))
        .route("/v1/polls/{id}/tokens", post(polls::mint_token))
        .route("/v1/polls/{id}/results", get(results::results))
        .route("/v1/polls/{id}/breakdown", get(analytics::breakdown))
        .route("/v1/polls/{id}/timeseries", get(analytics::timeseries))
        .route("/v1/polls/{id}/live", get(live::live))
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
    let app = App::new(deps, config, &tasks);
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown)
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
