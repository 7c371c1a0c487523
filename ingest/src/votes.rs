//! `POST /v1/polls/{id}/votes`: one vote, from a voter's browser, the widget or a server.
//!
//! A voter who brings no `voter_id` from a browser is a *browser voter*: ingest gives the
//! browser an anonymous id on its first vote and knows it again by it, so one browser votes
//! once in a `per_voter` poll. The id travels two ways, both minted together:
//! - the first-party cookie `tally_voter` (`SameSite=Lax`), which a browser sends only to
//!   pages of tally's own site (the dashboard, a widget on the same site);
//! - a signed voter token (`Tally-Voter` response header, `bv1.<id>.<mac>`), which the
//!   embedded widget keeps in the embedding page's storage and sends back as the
//!   `Tally-Voter` request header: this works when the page and tally are different sites,
//!   where no cookie of tally's is sent. The signature (a key derived from the server secret
//!   for this purpose) means only ingest mints browser ids, so the per-address limit on new
//!   browser voters cannot be sidestepped by inventing ids.
//!
//! What this guarantees, and what not: one vote per browser *profile and embedding site*
//! while the browser keeps its storage. A cleared browser, a private window, another
//! browser or device, or the same poll embedded on another site (browsers partition storage
//! by site) is a new voter. Polls that need one person, one vote use `require_token`.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tally_core::api::Accepted;
use tally_core::problem::Problem;
use tally_core::vote::VoteRequest;
use tally_service::http::{read_body_within, require_content_type, ApiError};

use crate::Ingest;

/// The cookie that identifies a browser voter who brings no `voter_id` (the vote widget).
pub const VOTER_COOKIE: &str = "tally_voter";
/// The header that carries a browser voter token: sent by the widget, answered by ingest.
pub const VOTER_HEADER: &str = "tally-voter";
/// The request headers a single vote reads, parsed once (a header looked up by `&str` is
/// parsed again on every request).
const VOTER_HEADER_NAME: HeaderName = HeaderName::from_static(VOTER_HEADER);
const SEC_FETCH_MODE: HeaderName = HeaderName::from_static("sec-fetch-mode");
const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// The version prefix of browser voter tokens.
const VOTER_TOKEN_PREFIX: &str = "bv1";

/// The signer of browser voter tokens. It is a pseudonym hasher keyed for a "poll" named
/// `\0browser-voter`, which no poll can be named (ids are `[a-z0-9-]`): a key of its own,
/// derived from the server secret and held by ingest alone.
fn voter_token_signer(ingest: &Ingest) -> tally_core::vote::VoterHasher {
    ingest.secrets.voter_hasher(
        "\0browser-voter",
        tally_core::secrets::PseudonymScheme::PerPoll,
    )
}

/// A browser voter token for the browser id `id`.
fn mint_voter_token(ingest: &Ingest, id: &str) -> String {
    let mac = voter_token_signer(ingest).voter_key(id);
    format!("{VOTER_TOKEN_PREFIX}.{id}.{mac}")
}

/// The browser id a voter token vouches for; `None` for anything ingest did not mint.
fn verify_voter_token(ingest: &Ingest, token: &str) -> Option<String> {
    let mut parts = token.trim().split('.');
    let (Some(VOTER_TOKEN_PREFIX), Some(id), Some(mac), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if !valid_browser_id(id) {
        return None;
    }
    let expected = voter_token_signer(ingest).voter_key(id);
    // Constant time: how much of a guess matched must not show in the answer's timing.
    let same = expected.len() == mac.len()
        && expected
            .bytes()
            .zip(mac.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0;
    same.then(|| id.to_owned())
}

/// Browser ids are what ingest makes: 16-64 ASCII letters and digits.
fn valid_browser_id(id: &str) -> bool {
    (16..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

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
        .filter(|id| valid_browser_id(id))
}

/// What a request says about a voter who brings no `voter_id`.
struct BrowserVoter {
    /// The id of a valid voter token, else of a `tally_voter` cookie ingest could have set.
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
        let token = headers
            .get(VOTER_HEADER_NAME)
            .and_then(|value| value.to_str().ok())
            .and_then(|token| verify_voter_token(ingest, token));
        BrowserVoter {
            known: token.or_else(|| cookie_voter(headers)),
            browser: headers.contains_key(SEC_FETCH_MODE) || headers.contains_key(header::ORIGIN),
            tls: peer.is_some_and(|peer| ingest.guard.proxies().trusts(peer))
                && headers
                    .get(FORWARDED_PROTO)
                    .is_some_and(|proto| proto.as_bytes().eq_ignore_ascii_case(b"https")),
            client: ingest.guard.client_ip(request),
        }
    }
}

/// A vote, durable in the vote log before the 202 is sent. A retry with the same `vote_id`
/// gets the same answer and counts once.
#[utoipa::path(post, path = "/v1/polls/{id}/votes", tag = "votes",
    params(("id" = String, Path, description = "the poll")),
    request_body(content = VoteRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "accepted: the vote is in the durable log", body = Accepted),
        (status = 400, description = "`malformed-json`, `invalid-utf8`", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "`token-required`", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`invalid-token`, `origin-not-allowed`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not-found`: no such poll", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`already-voted`, `vote-id-conflict`, `token-used`, `poll-closed`, `poll-not-open`", body = Problem, content_type = "application/problem+json"),
        (status = 410, description = "`poll-archived`", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`body-too-large`", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported-media-type`: only `application/json`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-field`: `field` names it", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "`rate-limited`, with `Retry-After`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "`unavailable`: retry with the same `vote_id`", body = Problem, content_type = "application/problem+json"),
    ))]
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
    let body = match read_body_within(request, ingest.config.max_vote_bytes).await {
        Ok(body) => body,
        Err(problem) => return problem.into_response(),
    };
    let mut vote: VoteRequest = match tally_core::problem::parse_json(&body) {
        Ok(vote) => vote,
        Err(problem) => return ApiError(problem).into_response(),
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
    // The same id also goes back as a voter token, for pages on other sites (see the module
    // documentation).
    let mut new_cookie = None;
    let mut browser_id = None;
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
        browser_id = Some(id.clone());
        vote.voter_id = Some(id);
    }
    let mut response = match ingest.submit(&poll_id, vote).await {
        Ok(accepted) => (StatusCode::ACCEPTED, Json(accepted)).into_response(),
        Err(problem) => ApiError(problem).into_response(),
    };
    if let Some(id) = browser_id {
        if let Ok(value) = mint_voter_token(&ingest, &id).parse() {
            response.headers_mut().insert(VOTER_HEADER, value);
        }
    }
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
