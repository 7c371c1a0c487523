//! `POST /v1/polls/{id}/votes`: one vote, from a voter's browser, the widget or a server.

use std::sync::Arc;

use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tally_core::problem::Problem;
use tally_core::vote::VoteRequest;
use tally_service::http::{require_content_type, ApiError, ApiJson};

use crate::Ingest;

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
    /// The client's address, when the request came over a socket.
    client: Option<std::net::IpAddr>,
}

impl BrowserVoter {
    fn read(ingest: &Ingest, request: &Request) -> BrowserVoter {
        let headers = request.headers();
        let peer = request
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0.ip());
        BrowserVoter {
            known: cookie_voter(headers),
            browser: headers.contains_key("sec-fetch-mode") || headers.contains_key(header::ORIGIN),
            tls: peer.is_some_and(|peer| ingest.guard.proxies().trusts(peer))
                && headers
                    .get("x-forwarded-proto")
                    .is_some_and(|proto| proto.as_bytes().eq_ignore_ascii_case(b"https")),
            client: ingest.guard.client_ip(request),
        }
    }
}

pub(crate) async fn vote(
    State(ingest): State<Arc<Ingest>>,
    Path(poll_id): Path<String>,
    request: Request,
) -> Response {
    // JSON only: a browser sends `text/plain` or a form across sites without asking (no
    // CORS preflight), so anything else could be a vote forged by another site.
    if let Err(problem) = require_content_type(request.headers(), &["application/json"]) {
        return ApiError(problem).into_response();
    }
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
    // voter_id is told so, not given a new identity per request. A browser that drops its
    // cookie is a new voter each time, so new identities per address are limited.
    let mut new_cookie = None;
    if vote.voter_id.is_none() && (browser.known.is_some() || browser.browser) {
        let id = match browser.known {
            Some(id) => id,
            None => {
                if let Some(client) = browser.client {
                    if let Err(problem) = ingest.limits.check_new_voter(client) {
                        return ApiError(problem).into_response();
                    }
                }
                let id = uuid::Uuid::new_v4().simple().to_string();
                new_cookie = Some(id.clone());
                id
            }
        };
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
