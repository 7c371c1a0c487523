//! Problems as HTTP responses: every error of every service leaves through [`ApiError`],
//! and extractor rejections (bad JSON, wrong types, bodies too large, invalid UTF-8) go
//! through [`ApiJson`] and [`read_body`], so they have the same shape as our own errors.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use tally_core::error::Chain;
use tally_core::problem::{parse_json, Problem, CONTENT_TYPE};

/// A [`Problem`] on its way out as a response. Converting a back-end [`tally_core::Error`]
/// logs it once, with its cause chain, and shows the client only what its kind allows.
#[derive(Debug)]
pub struct ApiError(pub Problem);

/// What a handler answers.
pub type Reply = Result<Response, ApiError>;

impl From<Problem> for ApiError {
    fn from(problem: Problem) -> Self {
        ApiError(problem)
    }
}

impl From<tally_core::Error> for ApiError {
    fn from(err: tally_core::Error) -> Self {
        use tally_core::ErrorKind;
        match err.kind() {
            ErrorKind::Unavailable => {
                tracing::warn!(error = %err.chain(), "back end unavailable")
            }
            ErrorKind::Failed | ErrorKind::Corrupt => {
                tracing::error!(error = %err.chain(), "request failed")
            }
            _ => {}
        }
        ApiError(err.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = self.0;
        // This occurrence, `urn:tally:request:<id>`: the id the server logged the request
        // under (also its `X-Request-Id`), so an error report leads to the logs.
        #[derive(serde::Serialize)]
        struct WithInstance<'a> {
            #[serde(flatten)]
            problem: &'a Problem,
            #[serde(skip_serializing_if = "Option::is_none")]
            instance: Option<String>,
        }
        let status = StatusCode::from_u16(problem.status).unwrap_or_else(|_| {
            tracing::error!(status = problem.status, "a problem with an invalid status");
            StatusCode::INTERNAL_SERVER_ERROR
        });
        let body = WithInstance {
            problem: &problem,
            instance: super::observe::current_request_id()
                .map(|id| format!("urn:tally:request:{id}")),
        };
        let body = match serde_json::to_vec(&body) {
            Ok(body) => body,
            Err(err) => {
                tracing::error!(error = %Chain(&err), "cannot encode a problem");
                Vec::new()
            }
        };
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        if let Some(seconds) = problem.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            if let Some(limit) = problem.rate_limit {
                headers.insert("ratelimit-limit", HeaderValue::from(limit));
                headers.insert("ratelimit-remaining", HeaderValue::from(0u32));
                headers.insert("ratelimit-reset", HeaderValue::from(seconds));
            }
        }
        response
    }
}

/// 415 unless the request's `Content-Type` is one of `accepted` (parameters such as
/// `charset` aside). Votes demand JSON so that a browser cannot be made to send one from
/// another site without a CORS preflight (which `text/plain` and form bodies skip).
pub fn require_content_type(
    headers: &axum::http::HeaderMap,
    accepted: &[&str],
) -> Result<(), Problem> {
    let given = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    match given {
        Some(given) if accepted.contains(&given.as_str()) => Ok(()),
        given => Err(Problem::new(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            format!(
                "send the body as {} (Content-Type was {})",
                accepted.join(" or "),
                given.map_or("missing".to_owned(), |g| format!("`{g}`"))
            ),
        )),
    }
}

/// A JSON body extractor whose rejections are problems. The body limit is axum's
/// `DefaultBodyLimit`, which also counts chunked bodies as they stream.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = read_body(req, state).await?;
        Ok(ApiJson(parse_json(&body)?))
    }
}

/// Buffers a body within the configured limit, mapping the limit to 413.
pub async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    match Bytes::from_request(req, state).await {
        Ok(bytes) => Ok(bytes),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(body_too_large())
        }
        Err(rejection) => {
            Err(Problem::bad_request("unreadable-body", rejection.body_text()).into())
        }
    }
}

/// Buffers a body of at most `limit` bytes (counted as it arrives, chunked or not), mapping
/// the limit to 413: [`read_body`] under `DefaultBodyLimit::max(limit)`, for a route that
/// keeps its limit without a layer (a layer costs each request a clone of the service under
/// it and a boxed future).
pub async fn read_body_within(req: Request, limit: usize) -> Result<Bytes, ApiError> {
    match axum::body::to_bytes(req.into_body(), limit).await {
        Ok(bytes) => Ok(bytes),
        Err(err)
            if std::error::Error::source(&err)
                .is_some_and(|source| source.is::<http_body_util::LengthLimitError>()) =>
        {
            Err(body_too_large())
        }
        Err(err) => Err(Problem::bad_request(
            "unreadable-body",
            format!("Failed to buffer the request body: {err}"),
        )
        .into()),
    }
}

fn body_too_large() -> ApiError {
    Problem::new(
        413,
        "body-too-large",
        "Body too large",
        "the request body exceeds the size limit of this endpoint",
    )
    .into()
}
