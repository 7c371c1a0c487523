//! The one error shape of the HTTP API: RFC 9457 `application/problem+json`.
//!
//! A [`Problem`] is data: the domain returns it for every rule a request breaks, and the
//! HTTP kit (`tally-service`) turns it into a response, so every error of every service has
//! one shape. `type` is a stable URI per kind of problem; `detail` says what to fix.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Base of every problem `type`; the slug after it is the stable part of the contract.
pub const TYPE_BASE: &str = "https://tally.dev/problems/";

pub const CONTENT_TYPE: &str = "application/problem+json";

#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error, utoipa::ToSchema)]
#[error("{title}: {detail}")]
pub struct Problem {
    /// `https://tally.dev/problems/<slug>`; the slug is the stable part.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The request field at fault, as a JSON path (`choice`, `segment.country`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Seconds after which a retry may succeed (also sent as `Retry-After`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u32>,
    /// For 429: the limit that was exceeded, sent as `RateLimit-Limit` with
    /// `RateLimit-Remaining: 0` and `RateLimit-Reset` (= `Retry-After`).
    #[serde(skip)]
    pub rate_limit: Option<u32>,
}

impl Problem {
    pub fn new(status: u16, slug: &str, title: &str, detail: impl Into<String>) -> Self {
        Problem {
            kind: format!("{TYPE_BASE}{slug}"),
            title: title.to_owned(),
            status,
            detail: detail.into(),
            field: None,
            retry_after: None,
            rate_limit: None,
        }
    }

    /// The slug of `type` (`already-voted`, `invalid-field`, …).
    pub fn slug(&self) -> &str {
        self.kind.strip_prefix(TYPE_BASE).unwrap_or(&self.kind)
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// 422 for a field whose value breaks a rule.
    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Problem::new(422, "invalid-field", "Invalid field", detail).with_field(field)
    }

    pub fn bad_request(slug: &str, detail: impl Into<String>) -> Self {
        Problem::new(400, slug, "Bad request", detail)
    }

    pub fn not_found(what: &str) -> Self {
        Problem::new(
            404,
            "not-found",
            "Not found",
            format!("{what} does not exist"),
        )
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        let mut problem = Problem::new(503, "unavailable", "Service unavailable", detail);
        problem.retry_after = Some(1);
        problem
    }

    pub fn internal() -> Self {
        Problem::new(
            500,
            "internal",
            "Internal error",
            "the server failed to handle the request; it has been logged",
        )
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Problem::new(401, "unauthorized", "Unauthorized", detail)
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Problem::new(403, "forbidden", "Forbidden", detail)
    }
}

/// The body as text, or 400 `invalid-utf8` saying where it stops being UTF-8.
pub fn utf8(body: &[u8]) -> Result<&str, Problem> {
    std::str::from_utf8(body).map_err(|err| {
        Problem::bad_request(
            "invalid-utf8",
            format!("the body is not valid UTF-8 (byte {})", err.valid_up_to()),
        )
    })
}

/// Parses a JSON body that must be valid UTF-8 and match `T` exactly; every failure is a
/// [`Problem`] naming the field at fault. Types meant for it use `deny_unknown_fields`.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    // The common case parses without tracking where it is; only a body that fails is
    // parsed again with the path, to name the field in the problem.
    if let Ok(value) = serde_json::from_slice(body) {
        return Ok(value);
    }
    utf8(body)?;
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            Problem::bad_request(
                "malformed-json",
                format!("the body is not valid JSON: {inner}"),
            )
        } else if path == "." {
            Problem::invalid(
                "body",
                format!("the body does not have the expected shape: {inner}"),
            )
        } else {
            Problem::invalid(path.clone(), format!("`{path}`: {inner}"))
        }
    })?;
    // The value parsed but the first pass failed: something follows it.
    deserializer.end().map_err(|err| {
        Problem::bad_request(
            "malformed-json",
            format!("the body is not valid JSON: {err}"),
        )
    })?;
    Ok(value)
}

/// The answer for unknown routes, so even a 404 has the problem shape.
pub fn no_route() -> Problem {
    Problem::new(
        404,
        "no-route",
        "Not found",
        "no endpoint at this path; see the API reference",
    )
}

/// The answer for a method a route does not take.
pub fn method_not_allowed() -> Problem {
    Problem::new(
        405,
        "method-not-allowed",
        "Method not allowed",
        "this endpoint does not accept that method",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        #[allow(dead_code)]
        n: u32,
    }

    #[test]
    fn names_the_field_at_fault() {
        let problem = parse_json::<Body>(br#"{"n": "x"}"#).unwrap_err();
        assert_eq!(problem.status, 422);
        assert_eq!(problem.field.as_deref(), Some("n"));
        let problem = parse_json::<Body>(br#"{"n": 1, "extra": 2}"#).unwrap_err();
        assert_eq!(problem.status, 422);
        assert!(problem.detail.contains("extra"), "{}", problem.detail);
    }

    #[test]
    fn trailing_characters_are_malformed_json() {
        assert_eq!(
            parse_json::<Body>(br#"{"n": 1} x"#).unwrap_err().slug(),
            "malformed-json"
        );
        assert_eq!(
            parse_json::<Body>(br#"{"n": 1}{"n": 2}"#)
                .unwrap_err()
                .slug(),
            "malformed-json"
        );
        assert!(parse_json::<Body>(b"{\"n\": 1}\n").is_ok());
    }

    #[test]
    fn malformed_json_and_bad_utf8_are_400() {
        assert_eq!(
            parse_json::<Body>(b"{\"n\": ").unwrap_err().slug(),
            "malformed-json"
        );
        assert_eq!(
            parse_json::<Body>(b"{\"n\": \"\xff\"}").unwrap_err().slug(),
            "invalid-utf8"
        );
    }
}
