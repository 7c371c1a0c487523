//! `POST /v1/sql`: read-only SQL over the analysts' tables (analyst or admin key).
//!
//! The body is `{"query": "SELECT …"}` and nothing else. The warehouse vets the query (one
//! `SELECT` or `WITH … SELECT` over the analyst tables, see [`tally_core::analyst::vet`])
//! and runs it within the service's limits, which nothing in the request can change. The
//! answer's format is chosen by `Accept` ([`Format::from_accept`]) before the query runs,
//! and it streams ([`crate::encode`]).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{FromRequest, Request, State};
use axum::http::header;
use serde::Deserialize;
use tally_core::auth::Role;
use tally_core::problem::Problem;
use tally_service::http::{ApiJson, Reply};

use crate::encode::{self, Format};
use crate::App;

/// The longest query text taken, in bytes (the body limit is a little larger).
pub(crate) const MAX_QUERY_BYTES: usize = 32 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SqlRequest {
    query: String,
}

pub(crate) async fn sql(State(app): State<Arc<App>>, request: Request) -> Reply {
    let started = Instant::now();
    app.authorize(request.headers(), Role::Analyst)?;
    let accept = request
        .headers()
        .get(header::ACCEPT)
        .map(|value| value.to_str().unwrap_or("?"));
    let format = Format::from_accept(accept)?;
    let ApiJson(body) = ApiJson::<SqlRequest>::from_request(request, &()).await?;
    if body.query.len() > MAX_QUERY_BYTES {
        return Err(Problem::new(
            413,
            "payload-too-large",
            "Query too long",
            format!(
                "the query is {} bytes; at most {MAX_QUERY_BYTES} are taken",
                body.query.len()
            ),
        )
        .into());
    }
    if body.query.trim().is_empty() {
        return Err(Problem::invalid(
            "query",
            "the query is empty: send {\"query\": \"SELECT …\"}",
        )
        .into());
    }
    let rows = app
        .warehouse
        .analyst_sql(&body.query, &app.config.sql_limits)
        .await?;
    encode::respond(rows, format, started, Vec::new()).await
}
