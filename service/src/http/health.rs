//! `/healthz` (the process is up) and `/readyz` (its dependencies answer), for every service.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::future::BoxFuture;
use serde_json::json;

use tally_core::ports::{PollRegistry, VoteLog, Warehouse};
use tally_core::problem;
use tally_core::Result;

use super::around::{infallible, ResponseFuture};
use super::observe::{Observed, Observing};
use super::ApiError;

/// A named readiness check of one dependency.
pub type Probe = (
    &'static str,
    Arc<dyn Fn() -> BoxFuture<'static, Result<()>> + Send + Sync>,
);

/// The readiness check of a vote log.
pub fn vote_log(log: Arc<dyn VoteLog>) -> Probe {
    probe("vote_log", move || {
        let log = log.clone();
        async move { log.check().await }
    })
}

/// The readiness check of a poll registry.
pub fn poll_registry(registry: Arc<dyn PollRegistry>) -> Probe {
    probe("poll_registry", move || {
        let registry = registry.clone();
        async move { registry.check().await }
    })
}

/// The readiness check of a warehouse.
pub fn warehouse(warehouse: Arc<dyn Warehouse>) -> Probe {
    probe("warehouse", move || {
        let warehouse = warehouse.clone();
        async move { warehouse.check().await }
    })
}

pub fn probe<F, Fut>(name: &'static str, check: F) -> Probe
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    (
        name,
        Arc::new(move || Box::pin(check()) as BoxFuture<'static, Result<()>>),
    )
}

/// The default of how long a request may take to be answered (its response head; a live
/// stream's body may flow for hours). Covers clients that trickle their body.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A service's router: its `api`, `/healthz` and `/readyz` over `probes`, `/metrics`,
/// problem+json answers for unknown paths and methods, a 408 for requests not answered in
/// `timeout`, and (outermost) the request id, access log and request metrics of
/// [`super::observe`], under the service `name`.
pub fn service(name: &'static str, api: Router, probes: Vec<Probe>, timeout: Duration) -> Router {
    // Installed before any request, so every metric recorded is exposed.
    let observed = Arc::new(Observed::new(name));
    api.merge(routes(probes))
        .route("/metrics", get(super::observe::metrics_route))
        .fallback(|| async { ApiError(problem::no_route()) })
        .method_not_allowed_fallback(|| async { ApiError(problem::method_not_allowed()) })
        .layer(Outermost { observed, timeout })
}

/// The outermost middleware of [`service`]: [`super::observe`] around [`time_limit`]. A layer
/// of its own, not `from_fn`: it reads the request before calling the service under it
/// directly, so a request costs no clone of that service (see [`super::around`]).
#[derive(Clone)]
struct Outermost {
    observed: Arc<Observed>,
    timeout: Duration,
}

impl<S> tower::Layer<S> for Outermost {
    type Service = OutermostService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OutermostService {
            outermost: self.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
struct OutermostService<S> {
    outermost: Outermost,
    inner: S,
}

impl<S> tower::Service<Request> for OutermostService<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let observing = Observing::start(&self.outermost.observed, &request);
        // Made now, run when polled: inside the request's scope, within the time limit. Boxed
        // at once: it holds the request until the route takes it, and the futures around it
        // would each copy it.
        let rest = Box::pin(self.inner.call(request));
        let timeout = self.outermost.timeout;
        Box::pin(async move {
            let rest = time_limit(timeout, infallible(rest));
            Ok(observing.around(rest).await)
        })
    }
}

/// `rest` answered within `timeout`, else 408.
async fn time_limit(timeout: Duration, rest: impl Future<Output = Response>) -> Response {
    match tokio::time::timeout(timeout, rest).await {
        Ok(response) => response,
        Err(_) => ApiError(problem::Problem::new(
            408,
            "request-timeout",
            "Request timeout",
            format!(
                "the request was not answered within {} s; a body must arrive within that time, and a retry with the same vote_id is safe",
                timeout.as_secs_f64()
            ),
        ))
        .into_response(),
    }
}

pub fn routes<S: Clone + Send + Sync + 'static>(probes: Vec<Probe>) -> Router<S> {
    let probes = Arc::new(probes);
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route(
            "/readyz",
            get(move || {
                let probes = probes.clone();
                async move {
                    let mut checks = serde_json::Map::new();
                    let mut ready = true;
                    for (name, check) in probes.iter() {
                        let outcome = tokio::time::timeout(Duration::from_secs(2), check()).await;
                        let status = match outcome {
                            Ok(Ok(())) => "ok".to_owned(),
                            Ok(Err(err)) => {
                                ready = false;
                                err.to_string()
                            }
                            Err(_) => {
                                ready = false;
                                "timed out".to_owned()
                            }
                        };
                        checks.insert((*name).to_owned(), json!(status));
                    }
                    let code = if ready {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (code, Json(json!({"ready": ready, "checks": checks})))
                }
            }),
        )
}
