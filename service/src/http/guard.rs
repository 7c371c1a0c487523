//! The per-address guard every public router gets: a request rate per client address, and
//! a throttle on failed authentication, so no address can hammer a service or guess keys.
//!
//! Both are counted before a body is read. Failed authentication is what the handler
//! answered (401): the guard does not need to know which routes take keys. An address
//! that fails too often is refused with 429 until its quota replenishes, whatever it sends.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request};
use axum::response::{IntoResponse, Response};
use tally_core::problem::Problem;

use super::around::{Around, AroundLayer};
use super::ApiError;
use crate::limits::{limit_key, Limit, Proxies, Rate};

/// Failed authentications an address may make before it is throttled: a burst of 10,
/// then one a minute (`10/10min`).
pub const DEFAULT_AUTH_FAILURES: &str = "10/10min";

pub fn default_auth_failures() -> Option<Rate> {
    Rate::parse(DEFAULT_AUTH_FAILURES).expect("a valid rate")
}

/// The guard of one service process. Cheap to share (`Arc`).
pub struct Guard {
    proxies: Proxies,
    per_ip: Option<Limit<IpAddr>>,
    auth_failures: Option<Limit<IpAddr>>,
    /// Addresses that used up their failed-authentication quota, and until when they wait.
    /// Bounded by [`Guard::retain_recent`].
    blocked: Mutex<HashMap<IpAddr, Instant>>,
}

impl Guard {
    pub fn new(proxies: Proxies, per_ip: Option<Rate>, auth_failures: Option<Rate>) -> Guard {
        Guard {
            proxies,
            per_ip: per_ip.map(|rate| Limit::new("requests from one client address", rate)),
            auth_failures: auth_failures
                .map(|rate| Limit::new("failed authentications from one client address", rate)),
            blocked: Mutex::new(HashMap::new()),
        }
    }

    /// The client address of a request (its peer, or what trusted proxies say).
    pub fn client_ip(&self, request: &Request) -> Option<IpAddr> {
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip())?;
        Some(self.proxies.client_ip(peer, request.headers()))
    }

    /// The client address of a request from `peer` with `headers`.
    pub fn client_ip_of(&self, peer: IpAddr, headers: &axum::http::HeaderMap) -> IpAddr {
        self.proxies.client_ip(peer, headers)
    }

    pub fn proxies(&self) -> &Proxies {
        &self.proxies
    }

    fn blocked_for(&self, key: IpAddr) -> Option<Duration> {
        let blocked = self.blocked.lock().expect("guard lock");
        let until = blocked.get(&key)?;
        until.checked_duration_since(Instant::now())
    }

    /// Counts a failed authentication; once the address's quota is spent, it waits.
    fn failed_auth(&self, key: IpAddr) {
        let Some(limit) = &self.auth_failures else {
            return;
        };
        if let Err(problem) = limit.check(&key) {
            let wait = Duration::from_secs(u64::from(problem.retry_after.unwrap_or(60)));
            self.blocked
                .lock()
                .expect("guard lock")
                .insert(key, Instant::now() + wait);
            tracing::warn!(address = %key, "too many failed authentications; address throttled");
        }
    }

    /// Forgets replenished keys and expired blocks; call periodically.
    pub fn retain_recent(&self) {
        if let Some(limit) = &self.per_ip {
            limit.retain_recent();
        }
        if let Some(limit) = &self.auth_failures {
            limit.retain_recent();
        }
        let now = Instant::now();
        self.blocked
            .lock()
            .expect("guard lock")
            .retain(|_, until| *until > now);
    }
}

/// `router` behind `guard` (see [`layer`]); the layer applies to the routes it already has.
/// Routes taken from other origins are added after, each with [`super::cors::guarded`],
/// which guards them too.
pub fn protect<S: Clone + Send + Sync + 'static>(
    router: axum::Router<S>,
    guard: Arc<Guard>,
) -> axum::Router<S> {
    router.route_layer(layer(guard))
}

/// Runs `sweep` every 10 s until `tasks` shut down: how the owner of limiters forgets the
/// keys whose quota has replenished, so their memory stays bounded.
pub fn sweep_periodically(tasks: &crate::Tasks, sweep: impl Fn() + Send + 'static) {
    tasks.spawn("limiter-sweeper", move |cancel| async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = tick.tick() => sweep(),
                () = cancel.cancelled() => return,
            }
        }
    });
}

/// The guard as middleware (a layer: `router.route_layer(guard::layer(guard))`). Without a
/// peer address (a router served without connect info, as in some tests) there is nothing
/// to key on and the guard lets the request through.
pub fn layer(guard: Arc<Guard>) -> AroundLayer<Guarding> {
    AroundLayer(Guarding(guard))
}

/// The middleware of [`layer`]: [`run`] around the rest of each request.
#[derive(Clone)]
pub struct Guarding(Arc<Guard>);

impl Around for Guarding {
    fn around<F, Fut>(&self, request: Request, inner: F) -> impl Future<Output = Response> + Send
    where
        F: FnOnce(Request) -> Fut + Send,
        Fut: Future<Output = Response> + Send,
    {
        run(&self.0, request, inner)
    }
}

/// The guard around `inner`, the rest of the request: what [`layer`] does, for a middleware
/// that does more than guard (a route taken from other origins is guarded by
/// [`super::cors::guarded`], one layer instead of two).
pub async fn run<F, Fut>(guard: &Guard, request: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let Some(client) = guard.client_ip(&request) else {
        return inner(request).await;
    };
    let key = limit_key(client);
    if let Some(wait) = guard.blocked_for(key) {
        let mut problem = Problem::new(
            429,
            "auth-throttled",
            "Too many failed authentications",
            "this address sent too many unknown API keys; retry after the time in Retry-After",
        );
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        problem.retry_after = Some(u32::try_from(seconds.max(1)).unwrap_or(u32::MAX));
        return ApiError(problem).into_response();
    }
    let allowance = match &guard.per_ip {
        Some(limit) => match limit.check(&key) {
            Ok(allowance) => Some(allowance),
            Err(problem) => return ApiError(problem).into_response(),
        },
        None => None,
    };
    // Only a key that was sent and refused is a failed authentication; asking without one
    // for something that needs one is not guessing.
    let sent_key = request
        .headers()
        .contains_key(axum::http::header::AUTHORIZATION);
    let mut response = inner(request).await;
    if sent_key && response.status() == axum::http::StatusCode::UNAUTHORIZED {
        guard.failed_auth(key);
    }
    if let Some(allowance) = allowance {
        let headers = response.headers_mut();
        headers.insert("ratelimit-limit", allowance.limit.into());
        headers.insert("ratelimit-remaining", allowance.remaining.into());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    fn app(guard: Arc<Guard>) -> Router {
        Router::new()
            .route(
                "/",
                get(|headers: axum::http::HeaderMap| async move {
                    if headers.contains_key("authorization") {
                        axum::http::StatusCode::UNAUTHORIZED
                    } else {
                        axum::http::StatusCode::OK
                    }
                }),
            )
            .layer(layer(guard))
    }

    fn request(from: &str, key: bool) -> Request {
        let mut request = Request::builder().uri("/");
        if key {
            request = request.header("authorization", "Bearer wrong");
        }
        let mut request = request.body(Body::empty()).unwrap();
        let addr: SocketAddr = format!("{from}:40000").parse().unwrap();
        request.extensions_mut().insert(ConnectInfo(addr));
        request
    }

    #[tokio::test]
    async fn an_address_guessing_keys_is_throttled_and_others_are_not() {
        let rate = Rate {
            count: std::num::NonZeroU32::new(3).unwrap(),
            per: Duration::from_secs(60),
        };
        let guard = Arc::new(Guard::new(Proxies::default(), None, Some(rate)));
        let app = app(guard);
        for _ in 0..3 {
            let answer = app
                .clone()
                .oneshot(request("192.0.2.1", true))
                .await
                .unwrap();
            assert_eq!(answer.status(), 401);
        }
        // The fourth failure spends the quota; from then on the address waits, key or not.
        let answer = app
            .clone()
            .oneshot(request("192.0.2.1", true))
            .await
            .unwrap();
        assert_eq!(answer.status(), 401);
        let answer = app
            .clone()
            .oneshot(request("192.0.2.1", false))
            .await
            .unwrap();
        assert_eq!(answer.status(), 429);
        assert!(answer.headers().contains_key("retry-after"));
        let answer = app
            .clone()
            .oneshot(request("192.0.2.2", false))
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "another address is not affected");
    }

    #[tokio::test]
    async fn each_address_has_its_request_rate() {
        let per_ip = Rate::per_second(2);
        let guard = Arc::new(Guard::new(
            Proxies::default(),
            per_ip,
            default_auth_failures(),
        ));
        let app = app(guard);
        for _ in 0..2 {
            let answer = app
                .clone()
                .oneshot(request("192.0.2.1", false))
                .await
                .unwrap();
            assert_eq!(answer.status(), 200);
        }
        let answer = app
            .clone()
            .oneshot(request("192.0.2.1", false))
            .await
            .unwrap();
        assert_eq!(answer.status(), 429);
        let answer = app
            .clone()
            .oneshot(request("192.0.2.9", false))
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
}
