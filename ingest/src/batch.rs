//! `POST /v1/votes:batch`: many votes from one integration, as NDJSON (one vote with
//! `poll_id` per line). Needs an `ingest` (or `admin`) key: one request carries up to
//! `max_batch_lines` votes, so it is for servers that are trusted with that, not for the
//! public. Every line still counts against the per-voter and per-poll limits.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tally_core::api::{BatchResult, LineProblem, LineResult};
use tally_core::auth::Role;
use tally_core::problem::{self, parse_json, Problem};
use tally_core::vote::VoteRequest;
use tally_service::http::{read_body, require_content_type, ApiError};

use crate::Ingest;

/// One parsed line of a batch: its number (from 1) and its poll and vote, or what is wrong
/// with it.
pub type BatchLine = (usize, Result<(String, VoteRequest), Problem>);

/// The longest `detail` a line's problem carries: an answer stays proportional to its
/// request however wordy an error is.
const MAX_LINE_DETAIL: usize = 300;

/// Parses an NDJSON batch: UTF-8, one JSON vote with `poll_id` per non-blank line, at most
/// `max_lines`. A bad line is that line's error; a bad batch is the batch's. Lines are
/// counted as they are found, so a body of millions of short lines is refused after
/// `max_lines + 1` of them, not after splitting all.
pub fn parse_batch(body: &[u8], max_lines: usize) -> Result<Vec<BatchLine>, Problem> {
    let text = problem::utf8(body)?;
    let mut lines: Vec<(usize, &str)> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if lines.len() == max_lines {
            return Err(Problem::new(
                413,
                "batch-too-large",
                "Batch too large",
                format!("a batch holds at most {max_lines} votes"),
            ));
        }
        lines.push((index + 1, line));
    }
    if lines.is_empty() {
        return Err(Problem::bad_request(
            "empty-batch",
            "the batch has no votes; send one JSON vote per line",
        ));
    }
    Ok(lines
        .into_iter()
        .map(|(line, text)| {
            let parsed =
                parse_json::<VoteRequest>(text.as_bytes()).and_then(|request| {
                    match request.poll_id.clone() {
                        Some(poll_id) => Ok((poll_id, request)),
                        None => Err(Problem::invalid("poll_id", "each batch line needs poll_id")),
                    }
                });
            (line, parsed)
        })
        .collect())
}

fn line_problem(problem: Problem) -> LineProblem {
    let mut detail = problem.detail;
    if detail.len() > MAX_LINE_DETAIL {
        let mut end = MAX_LINE_DETAIL;
        while !detail.is_char_boundary(end) {
            end -= 1;
        }
        detail.truncate(end);
        detail.push('…');
    }
    LineProblem {
        kind: problem.kind,
        title: problem.title,
        detail,
        field: problem.field,
    }
}

/// Lines are validated and answered independently, and the valid ones go to the log
/// together; the answer lists each line's outcome in order. The key is checked before the
/// body is read.
#[utoipa::path(post, path = "/v1/votes:batch", tag = "votes",
    security(("api_key" = ["ingest", "admin"])),
    request_body(content = Vec<VoteRequest>, content_type = "application/x-ndjson",
        description = "NDJSON: one vote per line (the items of this array), each the single \
        vote's body with `poll_id`"),
    responses(
        (status = 200, description = "each line's outcome, in order", body = BatchResult),
        (status = 400, description = "`empty-batch`, `invalid-utf8`", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "`batch-too-large`", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "`unsupported-media-type`: NDJSON only", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-field`: too many polls in one batch", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn batch(State(ingest): State<Arc<Ingest>>, request: Request) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(problem) = ingest.config.keys.authorize(authorization, Role::Ingest) {
        return ApiError(problem).into_response();
    }
    if let Err(problem) = require_content_type(
        request.headers(),
        &[
            "application/x-ndjson",
            "application/jsonl",
            "application/json",
        ],
    ) {
        return ApiError(problem).into_response();
    }
    let body = match read_body(request, &()).await {
        Ok(body) => body,
        Err(problem) => return problem.into_response(),
    };
    let lines = match parse_batch(&body, ingest.config.max_batch_lines) {
        Ok(lines) => lines,
        Err(problem) => return ApiError(problem).into_response(),
    };
    drop(body);
    let (numbers, requests): (Vec<usize>, Vec<_>) = lines.into_iter().unzip();
    let answers = ingest.submit_many(requests).await;
    let outcomes: Vec<LineResult> = numbers
        .into_iter()
        .zip(answers)
        .map(|(line, answer)| match answer {
            Ok(accepted) => LineResult {
                line,
                status: 202,
                vote_id: Some(accepted.vote_id),
                problem: None,
            },
            Err(problem) => LineResult {
                line,
                status: problem.status,
                vote_id: None,
                problem: Some(line_problem(problem)),
            },
        })
        .collect();
    let accepted = outcomes.iter().filter(|o| o.status == 202).count();
    let result = BatchResult {
        accepted,
        rejected: outcomes.len() - accepted,
        results: outcomes,
    };
    (
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        Json(result),
    )
        .into_response()
}
