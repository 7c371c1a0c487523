//! A poll's results, and who may see them.

use std::sync::Arc;

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

/// The poll's exact results over every counted vote, from the warehouse.
pub(crate) async fn current(app: &App, poll: &Poll) -> Result<Results, ApiError> {
    let tally = app.warehouse.tally(&poll.id).await?;
    Ok(Results::new(poll, &tally, time::now_ms()))
}

#[derive(Deserialize)]
pub(crate) struct ResultsParams {
    pub(crate) results_token: Option<String>,
}

/// Whether the caller may see `poll`'s results, per its `results_visibility`. Analyst and
/// admin keys always may; a key that is sent must be valid.
pub(crate) fn may_see(
    app: &App,
    poll: &Poll,
    headers: &HeaderMap,
    results_token: Option<&str>,
) -> Result<(), ApiError> {
    if headers.contains_key(header::AUTHORIZATION) {
        return app.authorize(headers, Role::Analyst);
    }
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
            let shown = match (&app.config.secret, results_token) {
                (Some(secret), Some(token)) => tally_core::token::verify_results(
                    secret,
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

pub(crate) async fn results(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    params: Result<Query<ResultsParams>, QueryRejection>,
) -> Reply {
    let params = query_params(params)?;
    let poll = app.poll(&id).await?;
    may_see(&app, &poll, &headers, params.results_token.as_deref())?;
    let results = current(&app, &poll).await?;
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(results)).into_response())
}
