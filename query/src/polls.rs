//! Poll management (admin): create, list, read, edit, close, reopen, archive, and minting
//! voter tokens.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tally_core::api::{PollDoc, PollPage, TokenIssued, TokenRequest};
use tally_core::auth::Role;
use tally_core::poll::{NewPoll, Poll, PollPatch, PollStatus};
use tally_core::problem::Problem;
use tally_core::secrets::PseudonymScheme;
use tally_core::{time, Error as CoreError, ErrorKind};
use tally_service::http::{ApiError, ApiJson, Reply};

use crate::{query_params, App};

fn doc(poll: Poll) -> PollDoc {
    let status = poll.status(time::now_ms());
    PollDoc { poll, status }
}

/// The body of an admin request, read only once the key is known to be an admin's: an
/// unauthenticated caller learns nothing about what the body should be.
async fn admin_body<T: DeserializeOwned>(app: &App, request: Request) -> Result<T, ApiError> {
    app.authorize(request.headers(), Role::Admin)?;
    let ApiJson(body) = ApiJson::<T>::from_request(request, &()).await?;
    Ok(body)
}

/// A stored poll, with an unreadable record named as such (and how to repair it).
async fn stored(app: &App, id: &str) -> Result<Poll, ApiError> {
    match app.registry.get(id).await {
        Ok(Some(poll)) => Ok(poll),
        Ok(None) => Err(Problem::not_found(&format!("poll `{id}`")).into()),
        Err(err) if err.kind() == ErrorKind::Corrupt => {
            tracing::error!(poll_id = id, error = %err.chain(), "unreadable poll record");
            Err(Problem::new(
                500,
                "poll-unreadable",
                "Poll record unreadable",
                format!("the stored record of poll `{id}` cannot be read; an admin can replace it with PUT /v1/polls/{id}"),
            )
            .into())
        }
        Err(err) => Err(err.into()),
    }
}

#[utoipa::path(post, path = "/v1/polls", tag = "polls",
    security(("api_key" = ["admin"])),
    request_body = NewPoll,
    responses(
        (status = 201, description = "the poll, with its status and version", body = PollDoc),
        (status = 400, description = "`malformed-json`, `invalid-utf8`, `invalid-query`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`already-exists`: the id is taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-field`: `field` names it", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn create(State(app): State<Arc<App>>, request: Request) -> Reply {
    let new: NewPoll = admin_body(&app, request).await?;
    let poll = new.into_poll(time::now_ms(), || {
        format!("p-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
    })?;
    let created = app.registry.create(&poll).await?;
    app.polls.remember(created.clone());
    let location = format!("/v1/polls/{}", created.id);
    let mut response = (StatusCode::CREATED, Json(doc(created))).into_response();
    if let Ok(location) = location.parse() {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    limit: Option<usize>,
    after: Option<String>,
    #[serde(default)]
    include_archived: bool,
}

#[utoipa::path(get, path = "/v1/polls", tag = "polls",
    security(("api_key" = ["admin"])),
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "polls per page (default 50)"),
        ("after" = Option<String>, Query, description = "the `next` cursor of the previous page"),
        ("include_archived" = Option<bool>, Query, description = "list archived polls too"),
    ),
    responses(
        (status = 200, description = "a page of polls", body = PollPage),
        (status = 400, description = "`malformed-json`, `invalid-utf8`, `invalid-query`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-field`: `limit` out of range", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn list(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Reply {
    app.authorize(&headers, Role::Admin)?;
    let params = query_params(params)?;
    let limit = params.limit.unwrap_or(50);
    if !(1..=100).contains(&limit) {
        return Err(Problem::invalid("limit", "limit must be between 1 and 100").into());
    }
    let mut polls = Vec::new();
    let mut cursor = params.after.clone();
    // Archived polls are skipped unless asked for, so a page may take several reads.
    'pages: loop {
        let page = app.registry.list(cursor.as_deref(), limit + 1).await?;
        let exhausted = page.len() <= limit;
        for poll in page {
            cursor = Some(poll.id.clone());
            if poll.archived_at.is_some() && !params.include_archived {
                continue;
            }
            polls.push(poll);
            if polls.len() > limit {
                break 'pages;
            }
        }
        if exhausted {
            break;
        }
    }
    let next = (polls.len() > limit).then(|| polls[limit - 1].id.clone());
    polls.truncate(limit);
    let page = PollPage {
        polls: polls.into_iter().map(doc).collect(),
        next,
    };
    Ok(Json(page).into_response())
}

#[utoipa::path(get, path = "/v1/polls/{id}", tag = "polls",
    security(("api_key" = ["admin"])),
    params(("id" = String, Path, description = "the poll")),
    responses(
        (status = 200, description = "the poll", body = PollDoc),
        (status = 404, description = "`not-found`: no such poll", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "`poll-unreadable`: replace it with `PUT`", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn get(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Reply {
    app.authorize(&headers, Role::Admin)?;
    let poll = stored(&app, &id).await?;
    Ok(Json(doc(poll)).into_response())
}

/// `PUT /v1/polls/{id}`: replaces a poll whose stored record cannot be read (written by a
/// broken version, damaged on disk). Refused for a readable poll: that one is changed with
/// PATCH, which keeps its history. Votes already counted stay counted.
#[utoipa::path(put, path = "/v1/polls/{id}", tag = "polls",
    security(("api_key" = ["admin"])),
    params(("id" = String, Path, description = "the poll")),
    request_body(content = NewPoll, description = "a whole definition, plus `voter_key_scheme` (1 or 2) of the lost record"),
    responses(
        (status = 200, description = "the replaced poll", body = PollDoc),
        (status = 400, description = "`malformed-json`, `invalid-utf8`, `invalid-query`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not-found`: no such poll", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`poll-readable`: edit it with `PATCH`", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-field`", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn replace(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    request: Request,
) -> Reply {
    // The body is a whole poll definition plus the pseudonym scheme the lost record had
    // (1 for polls created before per-poll pseudonyms, the default; 2 after), so voters
    // who already voted still count once.
    let mut body: serde_json::Map<String, serde_json::Value> = admin_body(&app, request).await?;
    let scheme = match body.remove("voter_key_scheme") {
        None => PseudonymScheme::Global,
        Some(value) => serde_json::from_value(value)
            .map_err(|_| Problem::invalid("voter_key_scheme", "voter_key_scheme must be 1 or 2"))?,
    };
    let definition = serde_json::to_vec(&body).unwrap_or_default();
    let new: NewPoll = tally_core::problem::parse_json(&definition)?;
    match app.registry.get(&id).await {
        Ok(Some(_)) => {
            return Err(Problem::new(
                409,
                "poll-readable",
                "Poll readable",
                format!("poll `{id}` can be read; change it with PATCH /v1/polls/{id}"),
            )
            .into())
        }
        Ok(None) => return Err(Problem::not_found(&format!("poll `{id}`")).into()),
        Err(err) if err.kind() == ErrorKind::Corrupt => {}
        Err(err) => return Err(err.into()),
    }
    if new.id.as_ref().is_some_and(|body_id| body_id != &id) {
        return Err(Problem::invalid("id", "the id in the body differs from the path").into());
    }
    let mut poll = new.into_poll(time::now_ms(), || id.clone())?;
    poll.voter_key_scheme = scheme;
    let replaced = app.registry.replace(&poll).await?;
    tracing::warn!(poll_id = %id, "an unreadable poll record was replaced");
    Ok(Json(doc((*app.polls.remember(replaced)).clone())).into_response())
}

/// Read-modify-write with the registry's version check, retried when another writer won.
async fn modify(
    app: &App,
    id: &str,
    change: impl Fn(&mut Poll) -> Result<Vec<String>, Problem>,
) -> Result<Poll, ApiError> {
    for _ in 0..5 {
        let mut poll = stored(app, id).await?;
        let removed = change(&mut poll)?;
        let now = time::now_ms();
        if let Some(purged) = poll.log_purged_at {
            if matches!(
                poll.scheduled_status(now),
                PollStatus::Open | PollStatus::Scheduled
            ) {
                return Err(purged_poll(id, purged).into());
            }
        }
        if !removed.is_empty() {
            let tally = app.warehouse.tally(id).await?;
            if let Some(voted) = removed
                .iter()
                .find(|o| tally.counts.get(*o).copied().unwrap_or(0) > 0)
            {
                return Err(Problem::invalid(
                    "options",
                    format!("option `{voted}` has votes and cannot be removed"),
                )
                .into());
            }
        }
        match app.registry.update(&poll).await {
            Ok(updated) => return Ok((*app.polls.remember(updated)).clone()),
            Err(CoreError::Conflict(_)) => continue,
            Err(err) => return Err(err.into()),
        }
    }
    Err(CoreError::Conflict(format!("poll `{id}`")).into())
}

#[utoipa::path(patch, path = "/v1/polls/{id}", tag = "polls",
    security(("api_key" = ["admin"])),
    params(("id" = String, Path, description = "the poll")),
    request_body = PollPatch,
    responses(
        (status = 200, description = "the edited poll", body = PollDoc),
        (status = 400, description = "`malformed-json`, `invalid-utf8`, `invalid-query`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not-found`: no such poll", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`concurrent-update`, `poll-archived`, `poll-purged` (an edit that would open a poll whose votes left the log)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-field`: `field` names it", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn patch(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    request: Request,
) -> Reply {
    let patch: PollPatch = admin_body(&app, request).await?;
    let poll = modify(&app, &id, |poll| {
        if poll.archived_at.is_some() {
            return Err(archived(&poll.id));
        }
        patch.clone().apply(poll, time::now_ms())
    })
    .await?;
    Ok(Json(doc(poll)).into_response())
}

/// Refuses to open again a poll whose votes left the log: the log no longer holds its
/// voters' keys, so it could not refuse a voter's second vote.
fn purged_poll(id: &str, purged_at: i64) -> Problem {
    Problem::new(
        409,
        "poll-purged",
        "Poll finished",
        format!(
            "poll `{id}`'s votes left the vote log at {} (it had been closed for TALLY_PURGE_CLOSED_AFTER_SECONDS); it cannot take votes again — create a new poll",
            time::format_ms(purged_at)
        ),
    )
}

fn archived(id: &str) -> Problem {
    Problem::new(
        409,
        "poll-archived",
        "Poll archived",
        format!("poll `{id}` is archived and cannot change"),
    )
}

/// Close, reopen and archive: an admin-only status change applied with the version check.
async fn change_status(
    app: &App,
    headers: &HeaderMap,
    id: &str,
    archived_ok: bool,
    change: impl Fn(&mut Poll, i64),
) -> Reply {
    app.authorize(headers, Role::Admin)?;
    let poll = modify(app, id, |poll| {
        if poll.archived_at.is_some() && !archived_ok {
            return Err(archived(&poll.id));
        }
        let now = time::now_ms();
        change(poll, now);
        poll.updated_at = now;
        Ok(Vec::new())
    })
    .await?;
    Ok(Json(doc(poll)).into_response())
}

#[utoipa::path(post, path = "/v1/polls/{id}/close", tag = "polls",
    security(("api_key" = ["admin"])),
    params(("id" = String, Path, description = "the poll")),
    responses(
        (status = 200, description = "the closed poll", body = PollDoc),
        (status = 404, description = "`not-found`: no such poll", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`poll-archived`, `concurrent-update`", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn close(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Reply {
    change_status(&app, &headers, &id, false, |poll, now| {
        poll.closed_at.get_or_insert(now);
    })
    .await
}

#[utoipa::path(post, path = "/v1/polls/{id}/reopen", tag = "polls",
    security(("api_key" = ["admin"])),
    params(("id" = String, Path, description = "the poll")),
    responses(
        (status = 200, description = "the reopened poll", body = PollDoc),
        (status = 404, description = "`not-found`: no such poll", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`poll-archived`, `concurrent-update`, `poll-purged`: its votes left the log", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn reopen(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Reply {
    change_status(&app, &headers, &id, false, |poll, now| {
        poll.closed_at = None;
        // Reopening means open now: a schedule end already passed no longer applies.
        if poll.closes_at.is_some_and(|at| at <= now) {
            poll.closes_at = None;
        }
    })
    .await
}

#[utoipa::path(delete, path = "/v1/polls/{id}", tag = "polls",
    security(("api_key" = ["admin"])),
    params(("id" = String, Path, description = "the poll")),
    responses(
        (status = 200, description = "the archived poll (kept, status `archived`)", body = PollDoc),
        (status = 404, description = "`not-found`: no such poll", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`concurrent-update`", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn archive(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Reply {
    change_status(&app, &headers, &id, true, |poll, now| {
        poll.archived_at.get_or_insert(now);
    })
    .await
}

const MAX_TOKEN_TTL: u64 = 90 * 86_400;

/// Mints a signed voter token for one voter of one poll (admin).
#[utoipa::path(post, path = "/v1/polls/{id}/tokens", tag = "polls",
    security(("api_key" = ["admin"])),
    params(("id" = String, Path, description = "the poll")),
    request_body = TokenRequest,
    responses(
        (status = 201, description = "a signed voter token", body = TokenIssued),
        (status = 400, description = "`malformed-json`, `invalid-utf8`, `invalid-query`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not-found`: no such poll", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-field`", body = Problem, content_type = "application/problem+json"),
        (status = 501, description = "`token-minting-disabled`: no secret configured", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn mint_token(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    request: Request,
) -> Reply {
    let request: TokenRequest = admin_body(&app, request).await?;
    let Some(secrets) = &app.config.secrets else {
        return Err(Problem::new(
            501,
            "token-minting-disabled",
            "Token minting disabled",
            "start the query service with TALLY_SECRET (the same secret as ingest) to mint voter tokens",
        )
        .into());
    };
    let poll = app.poll(&id).await?;
    if request.voter_id.is_empty()
        || request.voter_id.chars().count() > tally_core::vote::MAX_VOTER_ID_CHARS
    {
        return Err(Problem::invalid("voter_id", "voter_id must be 1-256 characters").into());
    }
    let ttl = request.ttl_seconds.unwrap_or(86_400);
    if ttl == 0 || ttl > MAX_TOKEN_TTL {
        return Err(Problem::invalid(
            "ttl_seconds",
            format!("ttl_seconds must be between 1 and {MAX_TOKEN_TTL}"),
        )
        .into());
    }
    let expiry = time::now_ms() / 1000 + ttl as i64;
    let issued = TokenIssued {
        token: tally_core::token::mint(&secrets.token_key(), &poll.id, &request.voter_id, expiry),
        poll_id: poll.id.clone(),
        voter_id: request.voter_id,
        expires_at: time::format_ms(expiry * 1000),
    };
    Ok((StatusCode::CREATED, Json(issued)).into_response())
}
