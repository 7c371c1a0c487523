//! What the OpenAPI document of every service shares: the API key scheme, the problem+json
//! shape with its problem types, and the routes [`crate::http::health::service`] adds to each
//! service (`/healthz`, `/readyz`, `/metrics`).
//!
//! Each service crate documents its own routes beside their handlers and merges them onto
//! [`base`]; the query service serves the result at `/openapi.json`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, RefOr, ResponseBuilder};
use utoipa::{OpenApi as _, PartialSchema, ToSchema};

use tally_core::api::Readiness;
use tally_core::problem::{Problem, CONTENT_TYPE};

/// The name of the API key scheme in `security` requirements; its "scopes" are the roles.
pub const API_KEY: &str = "api_key";

/// Every problem type the API answers with: slug, status, when. docs/API.md explains them.
pub const PROBLEM_TYPES: &[(&str, &str, &str)] = &[
    ("malformed-json", "400", "the body is not JSON"),
    ("invalid-utf8", "400", "the body is not UTF-8"),
    (
        "invalid-query",
        "400",
        "an unknown or malformed query parameter",
    ),
    (
        "invalid-last-event-id",
        "400",
        "a `Last-Event-ID` that is not a sequence",
    ),
    ("empty-batch", "400", "a batch with no lines"),
    ("unreadable-body", "400", "the body could not be read"),
    ("unauthorized", "401", "missing or unknown API key"),
    (
        "token-required",
        "401",
        "a `require_token` poll got a vote without `token`",
    ),
    ("forbidden", "403", "the key's role is not enough"),
    (
        "invalid-token",
        "403",
        "forged, expired, or another poll's or voter's token",
    ),
    (
        "results-hidden",
        "403",
        "the poll's `results_visibility` hides its results from this caller",
    ),
    (
        "origin-not-allowed",
        "403",
        "a page on a site the poll's `allowed_origins` does not list",
    ),
    (
        "sql-not-allowed",
        "403",
        "not a single read-only query over the analyst tables",
    ),
    ("not-found", "404", "unknown poll"),
    ("no-route", "404", "unknown path"),
    (
        "method-not-allowed",
        "405",
        "the path does not take this method",
    ),
    (
        "not-acceptable",
        "406",
        "an `Accept` header naming no format the route writes",
    ),
    (
        "request-timeout",
        "408",
        "the request was not answered in time; a retry with the same `vote_id` is safe",
    ),
    (
        "already-voted",
        "409",
        "the voter already voted on a `per_voter` poll (first vote wins)",
    ),
    (
        "vote-id-conflict",
        "409",
        "the `vote_id` was already used for another ballot",
    ),
    (
        "token-used",
        "409",
        "the voter token was already used (a `dedupe: none` poll)",
    ),
    ("poll-closed", "409", "the poll is closed"),
    ("poll-not-open", "409", "the poll is not open yet"),
    ("already-exists", "409", "the poll id is taken"),
    ("concurrent-update", "409", "an edit raced another"),
    (
        "poll-readable",
        "409",
        "`PUT` on a poll that can be read (edit it with `PATCH`)",
    ),
    (
        "poll-archived",
        "410 (votes), 409 (edits)",
        "the poll was archived",
    ),
    (
        "body-too-large",
        "413",
        "the body is over the route's limit",
    ),
    (
        "batch-too-large",
        "413",
        "a batch over 8 MiB or 10,000 lines",
    ),
    ("payload-too-large", "413", "a SQL query over 32 KiB"),
    (
        "unsupported-media-type",
        "415",
        "a vote that is not JSON, a batch that is not NDJSON",
    ),
    (
        "invalid-field",
        "422",
        "a field breaks a rule; `field` says which",
    ),
    ("sql-invalid", "422", "the query does not parse or plan"),
    (
        "rate-limited",
        "429",
        "over a rate limit; `Retry-After` says when to retry",
    ),
    (
        "auth-throttled",
        "429",
        "too many unknown API keys from this address",
    ),
    (
        "poll-unreadable",
        "500",
        "the poll's stored record cannot be read (replace it with `PUT`)",
    ),
    ("internal", "500", "a fault in tally; logged with its cause"),
    (
        "token-minting-disabled",
        "501",
        "the query service has no secret to sign tokens with",
    ),
    (
        "sql-limit-exceeded",
        "422",
        "a query over its row, time or memory limit",
    ),
    (
        "too-many-live-clients",
        "503",
        "too many live streams (server-wide or from this address)",
    ),
    (
        "unavailable",
        "503",
        "the vote log or warehouse is unreachable; retry (same `vote_id`)",
    ),
];

/// The document every service's part is merged onto: info, the API key scheme, the
/// problem schema and the shared routes.
pub fn base(title: &str, description: &str) -> OpenApi {
    let mut doc = Shared::openapi();
    doc.info.title = title.to_owned();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc.info.description = Some(description.to_owned());
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        API_KEY,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("API key")
                .description(Some(
                    "`Authorization: Bearer <key>`. Keys have a role: `admin` (poll \
                     management, and everything an analyst may), `analyst` (results of any \
                     poll, breakdowns, time series, SQL, export) or `ingest` (batch import). \
                     A route's requirement lists the roles it admits.",
                ))
                .build(),
        ),
    );
    let mut problem = Problem::schema();
    if let RefOr::T(utoipa::openapi::Schema::Object(object)) = &mut problem {
        object.description = Some(problem_description());
        // Added to every problem by the request-id middleware (`urn:tally:request:<id>`).
        object.properties.insert(
            "instance".to_owned(),
            utoipa::openapi::ObjectBuilder::new()
                .schema_type(utoipa::openapi::schema::Type::String)
                .description(Some("the request this answers, as in the logs"))
                .into(),
        );
    }
    components
        .schemas
        .insert(Problem::name().into_owned(), problem);
    doc
}

/// The problem schema's description: the table of problem types.
fn problem_description() -> String {
    let mut text = String::from(
        "RFC 9457 problem details (`application/problem+json`), the one error shape of \
         every route. Branch on the slug after `https://tally.dev/problems/` in `type`:\n\n\
         | type | status | when |\n|---|---|---|\n",
    );
    for (slug, status, when) in PROBLEM_TYPES {
        text.push_str(&format!("| `{slug}` | {status} | {when} |\n"));
    }
    text
}

/// Adds the problem answers every API route shares, where a route did not name its own:
/// `429` and `503` on every `/v1` route (all are behind the per-address guard and read a
/// back end), `401` and `403` on every route that takes a key. Routes document only the
/// answers that are theirs.
pub fn add_shared_problems(doc: &mut OpenApi) {
    let shared_by_all = [
        ("429", "`rate-limited`, `auth-throttled`: over a rate limit, or too many unknown keys from this address; `Retry-After` says when to retry"),
        ("503", "`unavailable`: the vote log, registry or warehouse does not answer"),
    ];
    let shared_by_keyed = [
        ("401", "`unauthorized`: no or unknown key"),
        ("403", "`forbidden`: the key's role is not enough"),
    ];
    for (path, item) in doc.paths.paths.iter_mut() {
        if !path.starts_with("/v1/") {
            continue;
        }
        let operations = [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ];
        for operation in operations.into_iter().flatten() {
            let requirements = operation.security.as_deref().unwrap_or_default();
            let keyed = !requirements.is_empty();
            // `security((), …)`: a key is optional, so only an unknown one is refused.
            let key_optional = requirements
                .iter()
                .any(|r| serde_json::to_value(r).is_ok_and(|v| v == serde_json::json!({})));
            let unauthorized: (&str, &str) = if key_optional {
                ("401", "`unauthorized`: an unknown key (none is needed)")
            } else {
                shared_by_keyed[0]
            };
            let shared = shared_by_all.iter().copied().chain(
                [unauthorized, shared_by_keyed[1]]
                    .into_iter()
                    .filter(|_| keyed),
            );
            for (status, description) in shared {
                operation
                    .responses
                    .responses
                    .entry((*status).to_owned())
                    .or_insert_with(|| RefOr::T(problem_response(description)));
            }
        }
    }
}

/// A problem+json response with `description`, for `responses(...)` built by hand.
pub fn problem_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            CONTENT_TYPE,
            ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    Problem::name(),
                ))))
                .build(),
        )
        .build()
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(healthz, readyz, metrics),
    components(schemas(Problem, Readiness, Health)),
    tags(
        (name = "health", description = "Probes and metrics, on every service"),
    )
)]
struct Shared;

/// `GET /healthz`.
#[derive(serde::Serialize, ToSchema)]
#[allow(dead_code)] // documents the body written with `json!`
struct Health {
    status: String,
}

/// Whether the process is up (no dependency is checked).
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "the process serves requests", body = Health)))]
#[allow(dead_code)]
fn healthz() {}

/// Whether the service's dependencies (vote log, registry, warehouse) are reachable.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "every dependency answers", body = Readiness),
        (status = 503, description = "a dependency does not answer; `checks` says which", body = Readiness),
    ))]
#[allow(dead_code)]
fn readyz() {}

/// The service's metrics in the Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text exposition",
        content_type = "text/plain; version=0.0.4", body = String)))]
#[allow(dead_code)]
fn metrics() {}
