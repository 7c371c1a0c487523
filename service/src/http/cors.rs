//! Cross-origin access for the routes a page on another site uses: voting (ingest) and a
//! poll's ballot, results and live totals (query), for the embeddable widget.
//!
//! Which sites may is each poll's `allowed_origins`. A request that carries `Origin` and
//! does not come from tally's own origin is answered only when every poll it names lists
//! that origin: a preflight gets the `Access-Control-Allow-*` headers, the request itself
//! gets `Access-Control-Allow-Origin` on whatever the handler answers. Any other origin is
//! refused with 403 `origin-not-allowed` before the handler runs, so a refused vote is never
//! stored — the browser's CORS check is not what protects the count (a page can send a
//! request it may not read), this refusal is.
//!
//! Requests without `Origin` (servers, `curl`, same-origin navigations) pass untouched: the
//! check is about which web pages may act through a visitor's browser, not an
//! authentication. Credentials are never allowed across origins (no
//! `Access-Control-Allow-Credentials`), so a cross-site page cannot ride on tally's cookies.

use std::future::Future;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use tally_core::poll::parse_origin;
use tally_core::problem::Problem;

use super::around::{Around, AroundLayer};
use super::{ApiError, Guard};
use crate::PollCache;

/// How long a browser may cache a preflight answer. Short, so a removed origin stops
/// voting within minutes even in a browser that asked before.
const PREFLIGHT_MAX_AGE_SECONDS: u32 = 600;
/// Polls one request may name (the multi-poll live stream names several).
pub const MAX_POLLS_PER_REQUEST: usize = 100;

/// What one kind of route allows across origins.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// `Access-Control-Allow-Methods` of its preflight.
    pub methods: &'static str,
    /// `Access-Control-Allow-Headers` of its preflight (lower case).
    pub allow_headers: &'static str,
    /// Response headers a page may read (`Access-Control-Expose-Headers`).
    pub expose_headers: &'static str,
    /// The poll ids a request names.
    pub poll_ids: fn(&Request) -> Vec<String>,
}

/// The poll of a `/v1/polls/{id}/…` path.
pub fn poll_in_path(request: &Request) -> Vec<String> {
    request
        .uri()
        .path()
        .strip_prefix("/v1/polls/")
        .and_then(|rest| rest.split('/').next())
        .filter(|id| !id.is_empty())
        .map(|id| vec![id.to_owned()])
        .unwrap_or_default()
}

/// The polls of a `polls=a,b,c` query parameter.
pub fn polls_in_query(request: &Request) -> Vec<String> {
    request
        .uri()
        .query()
        .into_iter()
        .flat_map(|query| query.split('&'))
        .filter_map(|pair| pair.strip_prefix("polls="))
        .flat_map(|list| {
            list.replace("%2C", ",")
                .replace("%2c", ",")
                .split(',')
                .filter(|id| !id.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The cross-origin gate of one service: its polls (for `allowed_origins`) and its guard
/// (whose trusted proxies say which host a request was sent to).
pub struct Cors {
    polls: Arc<PollCache>,
    guard: Arc<Guard>,
}

impl Cors {
    pub fn new(polls: Arc<PollCache>, guard: Arc<Guard>) -> Arc<Cors> {
        Arc::new(Cors { polls, guard })
    }

    /// Whether `origin` is the origin the request was sent to: the dashboard and the widget
    /// served by tally itself. The host is the `Host` header, or `X-Forwarded-Host` when a
    /// trusted proxy forwarded the request. The scheme is taken from the origin: a page of
    /// the same host and port is tally's own, whichever scheme a proxy ended.
    fn same_origin(&self, origin: &str, request: &Request) -> bool {
        let Some((scheme, _)) = origin.split_once("://") else {
            return false;
        };
        let headers = request.headers();
        let from_proxy = request
            .extensions()
            .get::<ConnectInfo<std::net::SocketAddr>>()
            .is_some_and(|info| self.guard.proxies().trusts(info.0.ip()));
        let forwarded = from_proxy
            .then(|| first_value(headers, "x-forwarded-host"))
            .flatten();
        let Some(host) = forwarded.or_else(|| first_value(headers, header::HOST.as_str())) else {
            return false;
        };
        match (
            parse_origin(&format!("{scheme}://{host}")),
            parse_origin(origin),
        ) {
            (Ok(served), Ok(origin)) => served == origin,
            _ => false,
        }
    }
}

fn first_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let value = headers.get(name)?.to_str().ok()?;
    let first = value.split(',').next()?.trim();
    (!first.is_empty()).then(|| first.to_owned())
}

fn refused(detail: String) -> Response {
    ApiError(Problem::new(
        403,
        "origin-not-allowed",
        "Origin not allowed",
        detail,
    ))
    .into_response()
}

/// The middleware of a route taken from other origins: the per-address guard
/// ([`super::guard::run`], with the guard of `cors`) and then the origin check, in one layer
/// (each layer costs a request a clone of the service under it and a boxed future).
/// `cors::guarded(cors, policy)` on a route (as `MethodRouter::layer`) added after
/// [`super::guard::protect`], whose `OPTIONS` is [`preflight_only`] so that preflights reach
/// the layer.
pub fn guarded(cors: Arc<Cors>, policy: &'static Policy) -> AroundLayer<Guarded> {
    AroundLayer(Guarded { cors, policy })
}

/// The middleware of [`guarded`].
#[derive(Clone)]
pub struct Guarded {
    cors: Arc<Cors>,
    policy: &'static Policy,
}

impl Around for Guarded {
    fn around<F, Fut>(&self, request: Request, inner: F) -> impl Future<Output = Response> + Send
    where
        F: FnOnce(Request) -> Fut + Send,
        Fut: Future<Output = Response> + Send,
    {
        super::guard::run(&self.cors.guard, request, |request| {
            check(&self.cors, self.policy, request, inner)
        })
    }
}

/// The origin check of [`guarded`] around `inner`, the rest of the request.
async fn check<F, Fut>(cors: &Cors, policy: &Policy, request: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let Some(origin) = request.headers().get(header::ORIGIN).cloned() else {
        return with_vary(inner(request).await);
    };
    let Ok(origin_text) = origin.to_str().map(str::to_owned) else {
        return refused("the Origin header is not readable".to_owned());
    };
    if cors.same_origin(&origin_text, &request) {
        return with_vary(inner(request).await);
    }
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let poll_ids = (policy.poll_ids)(&request);
    if poll_ids.is_empty() || poll_ids.len() > MAX_POLLS_PER_REQUEST {
        return refused(format!(
            "a request from another origin names 1 to {MAX_POLLS_PER_REQUEST} polls, each listing `{origin_text}` in allowed_origins"
        ));
    }
    for id in &poll_ids {
        let poll = match cors.polls.get(id).await {
            Ok(Some(poll)) => poll,
            Ok(None) => {
                return ApiError(Problem::not_found(&format!("poll `{id}`"))).into_response()
            }
            Err(err) => return ApiError::from(err).into_response(),
        };
        if !poll.allowed_origins.contains(&origin_text) {
            return refused(format!(
                "pages on `{origin_text}` may not use poll `{id}`: an admin adds the origin to the poll's allowed_origins (PATCH /v1/polls/{id})"
            ));
        }
    }
    if preflight {
        let mut response = StatusCode::NO_CONTENT.into_response();
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(policy.methods),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(policy.allow_headers),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(PREFLIGHT_MAX_AGE_SECONDS),
        );
        return with_vary(response);
    }
    let mut response = inner(request).await;
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    if !policy.expose_headers.is_empty() {
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(policy.expose_headers),
        );
    }
    with_vary(response)
}

/// The `OPTIONS` handler of a route behind [`layer`]: the layer answers preflights itself,
/// so whatever reaches this is an `OPTIONS` that is not one, which the route does not take.
pub async fn preflight_only() -> Response {
    ApiError(tally_core::problem::method_not_allowed()).into_response()
}

/// Answers on these routes differ by `Origin`: caches must keep them apart.
fn with_vary(mut response: Response) -> Response {
    response
        .headers_mut()
        .append(header::VARY, HeaderValue::from_static("origin"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    fn request(uri: &str) -> Request {
        Request::builder().uri(uri).body(Body::empty()).unwrap()
    }

    #[test]
    fn finds_the_polls_a_request_names() {
        assert_eq!(poll_in_path(&request("/v1/polls/spring/votes")), ["spring"]);
        assert_eq!(poll_in_path(&request("/v1/polls/spring")), ["spring"]);
        assert!(poll_in_path(&request("/v1/live?polls=a")).is_empty());
        assert_eq!(
            polls_in_query(&request("/v1/live?x=1&polls=a,b%2Cc&y=2")),
            ["a", "b", "c"]
        );
        assert!(polls_in_query(&request("/v1/live?polls=")).is_empty());
    }
}
