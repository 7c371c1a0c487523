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
use tally_core::secrets::Secrets;
use tally_service::http::{guard, health, ApiError, Guard};
use tally_service::limits::{Proxies, Rate};
use tally_service::tasks::CancellationToken;
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
/// The default cap on live connections from one client address.
pub const DEFAULT_LIVE_MAX_PER_ADDRESS: usize = 100;

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
            rate_per_ip: Rate::per_second(100),
            auth_failures: guard::default_auth_failures(),
            trusted_proxies: Vec::new(),
            request_timeout: health::REQUEST_TIMEOUT,
        }
    }
}

pub struct App {
    live_slots: Arc<tokio::sync::Semaphore>,
    streams: Arc<live::StreamsPerAddress>,
    guard: Arc<Guard>,
    /// Fired when the process starts draining: live streams end with a `reconnect` event.
    drain: CancellationToken,
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
        let guard = Arc::new(Guard::new(
            Proxies::new(config.trusted_proxies.clone()),
            config.rate_per_ip,
            config.auth_failures,
        ));
        let swept = guard.clone();
        tasks.spawn("limiter-sweeper", move |cancel| async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tokio::select! {
                    _ = tick.tick() => swept.retain_recent(),
                    () = cancel.cancelled() => return,
                }
            }
        });
        Arc::new(App {
            live_slots: Arc::new(tokio::sync::Semaphore::new(config.live_max_clients)),
            streams: Arc::default(),
            guard,
            drain: CancellationToken::new(),
            polls: PollCache::start(deps.registry.clone(), tasks),
            registry: deps.registry,
            warehouse: deps.warehouse,
            live,
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
    Router::new()
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
        .route("/v1/polls/{id}/results", get(results::results))
        .route("/v1/polls/{id}/breakdown", get(analytics::breakdown))
        .route("/v1/polls/{id}/timeseries", get(analytics::timeseries))
        .route("/v1/polls/{id}/live", get(live::live))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .route_layer(axum::middleware::from_fn_with_state(
            app.guard.clone(),
            guard::layer,
        ))
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
    let draining = app.clone();
    let service = router(app).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(async move {
            shutdown.await;
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
