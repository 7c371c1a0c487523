//! The OpenAPI 3.1 document the query service serves at `/openapi.json`, and its rendered
//! reference at `/docs`.
//!
//! The document is generated from the handlers' `#[utoipa::path]` attributes and the body
//! types of `tally_core::api`: query's routes ([`openapi`]), merged by the binary with
//! ingest's vote routes ([`document`]) so one document names every route of the API. In the
//! distributed deployment the vote routes carry the ingest service as their server.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tally_core::api::*;
use tally_core::poll::*;
use tally_core::problem::Problem;
use tally_core::results::*;
use utoipa::openapi::server::{ServerBuilder, ServerVariableBuilder};
use utoipa::openapi::OpenApi;
use utoipa::ToSchema;

use crate::App;

/// Where the vote routes are served, which the document tells clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Votes {
    /// On the same listener as everything else (`tally standalone`).
    Here,
    /// By the ingest service (`tally ingest`), on another address.
    IngestService,
}

const DESCRIPTION: &str = "tally's HTTP API (v1): poll management, vote intake, results, \
breakdowns, time series, live totals over Server-Sent Events, analysts' SQL and export. \
JSON in and out; every error is `application/problem+json` (the `Problem` schema lists the \
problem types). Keys go in `Authorization: Bearer <key>`; each route's security requirement \
names the roles it admits, and an empty requirement means the route is public.";

/// Query's routes and the routes every service has, without ingest's.
pub fn openapi() -> OpenApi {
    use utoipa::OpenApi as _;
    let mut doc = tally_service::openapi::base("tally", DESCRIPTION);
    doc.merge(Doc::openapi());
    doc
}

/// The whole API: query's routes and `ingest` (the vote routes, `tally_ingest::openapi()`).
pub fn document(ingest: OpenApi, votes: Votes) -> OpenApi {
    let mut doc = openapi();
    let mut ingest = ingest;
    if votes == Votes::IngestService {
        let server = ServerBuilder::new()
            .url("{ingest}")
            .description(Some(
                "the ingest service: votes are sent there, not to query",
            ))
            .parameter(
                "ingest",
                ServerVariableBuilder::new()
                    .default_value("http://localhost:8080")
                    .description(Some("the ingest service's base URL")),
            )
            .build();
        for item in ingest.paths.paths.values_mut() {
            item.servers = Some(vec![server.clone()]);
        }
        if let Some(description) = &mut doc.info.description {
            description.push_str(
                "\n\nThis is the distributed deployment: the `votes` routes are served by \
                 the ingest service (their `servers` say where), everything else by query.",
            );
        }
    }
    doc.merge(ingest);
    tally_service::openapi::add_shared_problems(&mut doc);
    doc
}

/// `GET /openapi.json`: the document, rendered once when the service starts.
#[utoipa::path(get, path = "/openapi.json", tag = "reference",
    responses((status = 200, description = "this document (OpenAPI 3.1)",
        content_type = "application/json", body = Object)))]
pub(crate) async fn openapi_json(State(app): State<Arc<App>>) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            ),
        ],
        app.openapi.clone(),
    )
        .into_response()
}

/// A document to serve (see [`document`]).
#[derive(Clone)]
pub struct Document(pub OpenApi);

impl std::fmt::Debug for Document {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Document({} paths)", self.0.paths.paths.len())
    }
}

/// The document as served: the configured one, or query's own.
pub(crate) fn render(config: &crate::Config) -> Bytes {
    let doc = match &config.openapi {
        Some(Document(doc)) => doc.clone(),
        None => openapi(),
    };
    Bytes::from(doc.to_pretty_json().unwrap_or_default())
}

/// `GET /docs`: the API reference, rendered in the browser by the vendored Redoc bundle.
#[utoipa::path(get, path = "/docs", tag = "reference",
    responses((status = 200, description = "the API reference page", content_type = "text/html", body = String)))]
pub(crate) async fn docs(headers: HeaderMap) -> Response {
    crate::assets::docs_page(headers).await
}

/// `POST /v1/sql` body.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // documents the body `sql::sql` reads
struct SqlRequest {
    /// One read-only `SELECT` over `polls`, `poll_options`, `ballots` and `answers`.
    query: String,
}

/// A column of a SQL answer.
#[derive(Serialize, Deserialize, ToSchema)]
#[allow(dead_code)]
struct SqlColumn {
    name: String,
    /// The Arrow type of the column.
    #[serde(rename = "type")]
    kind: String,
}

/// `200` to `POST /v1/sql` as JSON.
#[derive(Serialize, Deserialize, ToSchema)]
#[allow(dead_code)]
struct SqlAnswer {
    /// Log sequence the warehouse held when the query ran.
    as_of: u64,
    columns: Vec<SqlColumn>,
    #[schema(value_type = Vec<Vec<Object>>)]
    rows: Vec<Vec<serde_json::Value>>,
    rows_read: u64,
    elapsed_ms: u64,
}

/// Read-only SQL over the analyst tables, under row, time and memory limits. `Accept`
/// picks the format: JSON (default), `text/csv`, `application/x-ndjson`, Parquet.
#[utoipa::path(post, path = "/v1/sql", tag = "analytics",
    security(("api_key" = ["analyst", "admin"])),
    request_body = SqlRequest,
    responses(
        (status = 200, description = "the rows; `Tally-As-Of` names the log sequence",
            content(
                (SqlAnswer = "application/json"),
                (String = "text/csv"),
                (String = "application/x-ndjson"),
                (String = "application/vnd.apache.parquet"),
            )),
        (status = 400, description = "`malformed-json`, `invalid-utf8`", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`forbidden`, `sql-not-allowed`", body = Problem, content_type = "application/problem+json"),
        (status = 406, description = "`not-acceptable`", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`payload-too-large`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-field`, `sql-invalid`, `sql-limit-exceeded`", body = Problem, content_type = "application/problem+json"),
    ))]
#[allow(dead_code)] // documents `sql::sql`
fn sql() {}

/// A poll's counted ballots, one row each.
#[utoipa::path(get, path = "/v1/polls/{id}/export", tag = "analytics",
    security(("api_key" = ["analyst", "admin"])),
    params(
        ("id" = String, Path, description = "the poll"),
        ("format" = Option<String>, Query, description = "`csv` (default), `ndjson` or `parquet`"),
    ),
    responses(
        (status = 200, description = "the ballots; `Tally-As-Of` names the log sequence",
            content(
                (String = "text/csv"),
                (String = "application/x-ndjson"),
                (String = "application/vnd.apache.parquet"),
            )),
        (status = 400, description = "`invalid-query`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not-found`: no such poll", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-field`: `format`", body = Problem, content_type = "application/problem+json"),
    ))]
#[allow(dead_code)] // documents `export::export`
fn export() {}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        crate::polls::create, crate::polls::list, crate::polls::get, crate::polls::replace,
        crate::polls::patch, crate::polls::archive, crate::polls::close, crate::polls::reopen,
        crate::polls::mint_token,
        crate::results::results, crate::ballot::ballot,
        crate::analytics::breakdown, crate::analytics::timeseries, sql, export,
        crate::live::live, crate::live::live_many,
        crate::assets::dashboard_redirect, crate::assets::overview, crate::assets::poll_page,
        crate::assets::versioned, crate::assets::widget, crate::assets::embed_page,
        openapi_json, docs,
    ),
    components(schemas(
        PollDoc, PollPage, NewPoll, PollPatch, Poll, PollOption, PollKind, PollStatus, Scale,
        Dedupe, ResultsVisibility, TokenRequest, TokenIssued, Results, OptionResult,
        RatingResult, NpsResult, BreakdownDoc, BreakdownGroup, GroupOption, TimeseriesDoc,
        TimeseriesPoint, crate::Ballot, SqlRequest, SqlAnswer, SqlColumn,
    )),
    tags(
        (name = "polls", description = "Poll management (admin)"),
        (name = "results", description = "A poll's results and ballot (public unless the poll says otherwise)"),
        (name = "analytics", description = "Breakdowns, time series, SQL and export (analyst)"),
        (name = "live", description = "Live totals over Server-Sent Events"),
        (name = "dashboard", description = "The web dashboard and the embeddable widget"),
        (name = "reference", description = "This document and its rendered reference"),
    )
)]
struct Doc;
