//! `GET /v1/polls/{id}/ballot`: what a voter is shown — the question, the answers, whether
//! the poll takes votes and whether its results will be shown. Public: it is what every
//! page that embeds the poll displays anyway. It holds nothing else of the poll (no
//! campaign, dimensions or allowed origins), so the embeddable widget can load it from any
//! page the poll allows.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use tally_core::poll::{Dedupe, PollKind, PollOption, PollStatus, ResultsVisibility, Scale};
use tally_core::problem::Problem;
use tally_core::time;
use tally_service::http::Reply;

use crate::App;

/// The ballot of a poll.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Ballot {
    pub poll_id: String,
    pub title: String,
    pub question: String,
    pub kind: PollKind,
    /// Single and multi: the answers, in the poll's order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<PollOption>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_choices: Option<u32>,
    /// Rating and NPS: the range an answer falls in (NPS is 0-10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<Scale>,
    pub status: PollStatus,
    pub results_visibility: ResultsVisibility,
    pub dedupe: Dedupe,
    /// Votes must carry a voter token the embedding site mints.
    pub require_token: bool,
    #[serde(
        default,
        with = "tally_core::time::opt_rfc3339",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub opens_at: Option<i64>,
    #[serde(
        default,
        with = "tally_core::time::opt_rfc3339",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub closes_at: Option<i64>,
}

#[utoipa::path(get, path = "/v1/polls/{id}/ballot", tag = "results",
    params(("id" = String, Path, description = "the poll")),
    responses(
        (status = 200, description = "what a voter is shown", body = Ballot),
        (status = 403, description = "`origin-not-allowed`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not-found`: no such poll", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn ballot(State(app): State<Arc<App>>, Path(id): Path<String>) -> Reply {
    let poll = app.poll(&id).await?;
    let ballot = Ballot {
        poll_id: poll.id.clone(),
        title: poll.title.clone(),
        question: poll.question.clone(),
        kind: poll.kind,
        options: poll.options.clone(),
        max_choices: poll.max_choices,
        scale: poll.effective_scale(),
        status: poll.status(time::now_ms()),
        results_visibility: poll.results_visibility,
        dedupe: poll.dedupe,
        require_token: poll.require_token,
        opens_at: poll.opens_at,
        closes_at: poll.closes_at,
    };
    // A few seconds of caching spares the service a request per page view of a busy page,
    // while a close still shows within seconds.
    Ok(([(header::CACHE_CONTROL, "public, max-age=5")], Json(ballot)).into_response())
}
