//! What an operator sees of every request: a request id, an access log line, and the
//! request metrics; and the `/metrics` route that exposes every metric of the process in the
//! Prometheus text format.
//!
//! - **Request id.** A request's `X-Request-Id` is kept when it is a sane token (1–64 of
//!   `A-Za-z0-9._-`), else one is made. It is echoed in the response, carried by every log
//!   line of the request (a tracing span), and put in problem+json `instance`
//!   (`urn:tally:request:<id>`), so a client's error report leads to the server's logs.
//! - **Access log.** One line per request at `info`: method, route (the path's template, so
//!   no poll id or token from the path), status, latency, request id, client address. Never a
//!   header, a query string or a body: no API key or voter id reaches a log.
//! - **Metrics.** `tally_http_requests_total` and `tally_http_request_duration_seconds` by
//!   service, route, method and status class. Metric names follow Prometheus conventions:
//!   `tally_` prefix, base units, `_total` counters; poll ids are never labels.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument;

tokio::task_local! {
    /// The id of the request being handled, for problem+json `instance`.
    static REQUEST_ID: String;
}

/// Parsed once: a header named by `&str` is parsed on every lookup.
const REQUEST_ID_HEADER: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// The id of the request the current task handles, if any.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Buckets of latency histograms, in seconds: 0.5 ms to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets of size histograms (votes in a batch, rows in an insert).
const SIZE_BUCKETS: [f64; 10] = [
    1.0, 10.0, 50.0, 100.0, 500.0, 1_000.0, 5_000.0, 10_000.0, 50_000.0, 100_000.0,
];

/// The process's metric recorder, installed on first use; every crate records through the
/// `metrics` facade into it.
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), &SIZE_BUCKETS))
            .expect("valid buckets");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (a test harness); this handle then
        // renders only what is recorded here, which is nothing — but serving still works.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::debug!("a metrics recorder was already installed");
        }
        describe();
        metrics::gauge!("tally_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        handle.clone()
    })
}

/// Help texts of the metrics every service may record.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "tally_http_requests_total",
        "HTTP requests answered, by service, route, method and status"
    );
    describe_histogram!(
        "tally_http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request (response head; a live stream's body is not timed)"
    );
    describe_gauge!("tally_build_info", "Always 1; the version is a label");
}

/// `GET /metrics`.
pub async fn metrics_route() -> Response {
    let body = recorder().render();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The methods a request is counted under. HTTP lets a client invent methods (`BREW`,
/// `X1`, `X2`, …), and each label value is a new series kept for the life of the process:
/// anything but the standard methods is counted as `other`.
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "other",
];

/// The index in [`METHODS`] of the method a request is counted under.
fn method_index(method: &axum::http::Method) -> usize {
    use axum::http::Method;
    match *method {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::PATCH => 3,
        Method::DELETE => 4,
        Method::HEAD => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

/// The status classes a request is counted under (`2xx`, `4xx`, …): labels stay few.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The index in [`STATUS_CLASSES`] of a status.
fn status_class(status: StatusCode) -> usize {
    match status.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// The handles of one route's request metric series, registered on the route's first
/// request and then recorded through: building a metric key from label strings and finding
/// it in the registry on every request was ~5% of ingest's instructions per single vote.
#[derive(Default)]
struct RouteMetrics {
    requests: [[OnceLock<metrics::Counter>; STATUS_CLASSES.len()]; METHODS.len()],
    durations: [OnceLock<metrics::Histogram>; METHODS.len()],
}

/// One service's request metrics, by route. Routes are templates (or `unmatched`), methods
/// and status classes a fixed few, so this holds a bounded number of series.
pub struct Observed {
    service: &'static str,
    routes: std::sync::RwLock<foldhash::HashMap<String, std::sync::Arc<RouteMetrics>>>,
}

impl Observed {
    pub fn new(service: &'static str) -> Observed {
        // Handles registered before the process's recorder is installed would record nowhere.
        recorder();
        Observed {
            service,
            routes: Default::default(),
        }
    }

    fn route(&self, route: &str) -> std::sync::Arc<RouteMetrics> {
        use std::sync::PoisonError;
        if let Some(found) = self
            .routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(route)
        {
            return found.clone();
        }
        self.routes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(route.to_owned())
            .or_default()
            .clone()
    }
}

/// The middleware of [`super::service`]: request id, access log and request metrics around
/// the rest of the stack (one middleware, so a request pays for one layer here).
///
/// [`Observing::start`] reads what it needs of the request before the request goes on, so
/// the layer can call the service under it directly, needing no clone of it;
/// [`Observing::around`] then runs the rest inside the request's id scope and span, and
/// counts and logs its answer.
pub struct Observing {
    started: Instant,
    id: String,
    method: axum::http::Method,
    route: Option<MatchedPath>,
    client: Option<std::net::IpAddr>,
    series: std::sync::Arc<RouteMetrics>,
    service: &'static str,
    span: tracing::Span,
}

impl Observing {
    pub fn start(observed: &Observed, request: &Request) -> Observing {
        let started = Instant::now();
        let id = request
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|id| valid_request_id(id))
            .map(str::to_owned)
            .unwrap_or_else(uuid_like);
        let route = request.extensions().get::<MatchedPath>().cloned();
        let client = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip());
        let series = observed.route(route.as_ref().map_or("unmatched", MatchedPath::as_str));
        let span = tracing::info_span!("request", request_id = %id);
        Observing {
            started,
            id,
            method: request.method().clone(),
            route,
            client,
            series,
            service: observed.service,
            span,
        }
    }

    /// Answers with `rest`, the request's future (made, not yet run).
    pub async fn around(self, rest: impl std::future::Future<Output = Response>) -> Response {
        let mut response = REQUEST_ID
            .scope(self.id.clone(), rest.instrument(self.span.clone()))
            .await;
        let status = response.status();
        let elapsed = self.started.elapsed();
        let route = self.route.as_ref().map_or("unmatched", MatchedPath::as_str);
        // Counted under a fixed few labels; logged as sent.
        let method_index = method_index(&self.method);
        let labels = || {
            [
                ("service", self.service.to_owned()),
                ("route", route.to_owned()),
                ("method", METHODS[method_index].to_owned()),
            ]
        };
        self.series.requests[method_index][status_class(status)]
            .get_or_init(|| {
                let [service, route, method] = labels();
                let status = ("status", STATUS_CLASSES[status_class(status)].to_owned());
                metrics::counter!(
                    "tally_http_requests_total",
                    &[service, route, method, status]
                )
            })
            .increment(1);
        self.series.durations[method_index]
            .get_or_init(|| metrics::histogram!("tally_http_request_duration_seconds", &labels()))
            .record(elapsed.as_secs_f64());
        self.span.in_scope(|| {
            tracing::info!(
                target: "tally::access",
                method = %self.method,
                route,
                status = status.as_u16(),
                latency_ms = elapsed.as_secs_f64() * 1000.0,
                client = self.client.map(|ip| ip.to_string()).unwrap_or_default(),
                "request"
            )
        });
        if let Ok(value) = HeaderValue::from_str(&self.id) {
            response.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
        response
    }
}

/// A new request id: 16 hex digits, unique within the process (a counter from a random
/// start, through a bijective mixer so ids do not look sequential) and, with a random start
/// per process, in practice across processes. Unpredictability is not required, only
/// uniqueness; the start is drawn once, so a request costs a counter step and the mixing.
fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: std::sync::OnceLock<AtomicU64> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        hasher.write_u32(std::process::id());
        AtomicU64::new(hasher.finish())
    });
    // SplitMix64's output function: a bijection of u64, so distinct counts give distinct ids.
    let mut id = next.fetch_add(1, Ordering::Relaxed);
    id = (id ^ (id >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    id = (id ^ (id >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    id ^= id >> 31;
    tally_core::text::hex(&id.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Invented methods do not become metric series of their own: a client sending a new
    /// one per request would otherwise grow the process's memory without bound. And the
    /// handles registered on a series' first request go on counting every later one.
    #[tokio::test]
    async fn invented_methods_are_counted_as_other() {
        use axum::body::Body;
        use tower::ServiceExt;
        let app = crate::http::service(
            "observe-test",
            axum::Router::new().route("/observed", axum::routing::get(|| async { "ok" })),
            Vec::new(),
            std::time::Duration::from_secs(5),
        );
        for method in ["BREW", "XMETHOD1", "XMETHOD2"] {
            let request = axum::http::Request::builder()
                .method(method)
                .uri("/observed")
                .body(Body::empty())
                .unwrap();
            app.clone().oneshot(request).await.unwrap();
        }
        let text = recorder().render();
        let ours: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("service=\"observe-test\""))
            .collect();
        let other = ours.iter().find(|l| {
            l.starts_with("tally_http_requests_total{") && l.contains("method=\"other\"")
        });
        assert!(
            other.is_some_and(|l| l.ends_with(" 3")),
            "three requests counted under method=\"other\": {ours:#?}"
        );
        assert!(
            !text.contains("BREW") && !text.contains("XMETHOD"),
            "{ours:#?}"
        );
    }

    #[test]
    fn request_ids_from_clients_must_be_tokens() {
        assert!(valid_request_id("abc-123_X.y"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("has space"));
        assert!(!valid_request_id("new\nline"));
        assert!(!valid_request_id(&"x".repeat(65)));
        let ids: std::collections::HashSet<String> = (0..10_000).map(|_| uuid_like()).collect();
        assert_eq!(ids.len(), 10_000, "every id differs");
        assert!(ids.iter().all(|id| id.len() == 16
            && id.bytes().all(|b| b.is_ascii_hexdigit())
            && valid_request_id(id)));
    }
}
