//! A poll's results, and who may see them.
//!
//! Public results are served from the totals the live hub holds in memory (kept current by
//! the processors' live feed), read again from the warehouse at most once a second per poll
//! when the feed is quiet: however many anonymous requests come, the warehouse does not
//! count a poll more often than that.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use tally_core::auth::Role;
use tally_core::poll::{Poll, PollStatus, ResultsVisibility};
use tally_core::problem::Problem;
use tally_core::results::Results;
use tally_core::time;
use tally_service::http::{ApiError, Reply};

use crate::{query_params, App};

/// How old the in-memory totals may be before a request reads the warehouse again.
const TOTALS_MAX_AGE: Duration = Duration::from_secs(1);

/// The poll's exact results over every counted vote, from the warehouse: whole, and each
/// partition's share (what the hub adds the processors' live shares up with).
async fn counted(app: &App, poll: &Poll) -> Result<(Results, Vec<Results>), ApiError> {
    let now = time::now_ms();
    let shares: Vec<Results> = app
        .warehouse
        .tally_by_partition(&poll.id)
        .await?
        .into_iter()
        .map(|(partition, tally)| {
            let mut share = Results::new(poll, &tally, now);
            share.partition = Some(partition);
            share
        })
        .collect();
    let whole = Results::merge(&shares)
        .unwrap_or_else(|| Results::new(poll, &tally_core::results::Tally::default(), now));
    Ok((whole, shares))
}

/// The poll's results as served: the newest totals (at most [`TOTALS_MAX_AGE`] old), with
/// the poll's status as of now.
pub(crate) async fn served(app: &App, poll: &Poll) -> Result<Arc<Results>, ApiError> {
    let totals = app
        .live
        .totals(&poll.id, TOTALS_MAX_AGE, || counted(app, poll))
        .await?;
    let status = poll.status(time::now_ms());
    if totals.status == status {
        return Ok(totals);
    }
    let mut current = (*totals).clone();
    current.status = status;
    Ok(Arc::new(current))
}

/// Unknown parameters are ignored here (browsers and caches add their own to public URLs).
#[derive(Deserialize)]
pub(crate) struct ResultsParams {
    pub(crate) results_token: Option<String>,
}

/// Who is asking for results: a key holder (checked once, when the request came), or an
/// anonymous client with perhaps a results token.
#[derive(Debug, Clone)]
pub(crate) enum Access {
    Key,
    Anonymous { results_token: Option<String> },
}

impl Access {
    /// A key that is sent must be valid (and at least `analyst`); without one the client is
    /// anonymous.
    pub(crate) fn of(
        app: &App,
        headers: &HeaderMap,
        results_token: Option<String>,
    ) -> Result<Access, ApiError> {
        if headers.contains_key(header::AUTHORIZATION) {
            app.authorize(headers, Role::Analyst)?;
            return Ok(Access::Key);
        }
        Ok(Access::Anonymous { results_token })
    }
}

/// Whether `access` may see `poll`'s results, per its `results_visibility`.
pub(crate) fn may_see(app: &App, poll: &Poll, access: &Access) -> Result<(), ApiError> {
    let results_token = match access {
        Access::Key => return Ok(()),
        Access::Anonymous { results_token } => results_token.as_deref(),
    };
    let hidden = |detail: String| -> ApiError {
        Problem::new(403, "results-hidden", "Results hidden", detail).into()
    };
    match poll.results_visibility {
        ResultsVisibility::Live => Ok(()),
        ResultsVisibility::AfterClose => match poll.status(time::now_ms()) {
            PollStatus::Closed | PollStatus::Archived => Ok(()),
            _ => Err(hidden(format!(
                "the results of poll `{}` are shown once it closes",
                poll.id
            ))),
        },
        ResultsVisibility::AfterVote => {
            let shown = match (&app.config.secrets, results_token) {
                (Some(secrets), Some(token)) => tally_core::token::verify_results(
                    secrets,
                    poll.voter_key_scheme,
                    token,
                    &poll.id,
                    time::now_ms() / 1000,
                ),
                _ => false,
            };
            if shown {
                Ok(())
            } else {
                Err(hidden(format!(
                    "the results of poll `{}` are shown to voters: pass the results_token of your vote's answer as ?results_token=",
                    poll.id
                )))
            }
        }
        ResultsVisibility::Private => Err(Problem::unauthorized(format!(
            "the results of poll `{}` are private: send an analyst key as Authorization: Bearer <key>",
            poll.id
        ))
        .into()),
    }
}

#[utoipa::path(get, path = "/v1/polls/{id}/results", tag = "results",
    security((), ("api_key" = ["analyst", "admin"])),
    params(("id" = String, Path, description = "the poll"),
        ("results_token" = Option<String>, Query, description = "the `results_token` of the voter's 202 (`after_vote` polls)")),
    responses(
        (status = 200, description = "the poll's counted votes", body = Results),
        (status = 400, description = "`malformed-json`, `invalid-utf8`, `invalid-query`", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "`results-hidden`, `origin-not-allowed`, `invalid-token`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not-found`: no such poll", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn results(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    params: Result<Query<ResultsParams>, QueryRejection>,
) -> Reply {
    let params = query_params(params)?;
    let poll = app.poll(&id).await?;
    let access = Access::of(&app, &headers, params.results_token)?;
    may_see(&app, &poll, &access)?;
    let results = served(&app, &poll).await?;
    Ok((
        [(header::CACHE_CONTROL, "no-store")],
        Json(results.as_ref()),
    )
        .into_response())
}
