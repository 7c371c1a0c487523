//! Poll management (admin): create, list, read, edit, close, reopen, archive, and minting
//! voter tokens.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use tally_core::api::{PollDoc, PollPage, TokenIssued, TokenRequest};
use tally_core::auth::Role;
use tally_core::poll::{NewPoll, Poll, PollPatch};
use tally_core::problem::Problem;
use tally_core::{time, Error as CoreError};
use tally_service::http::{ApiError, ApiJson, Reply};

use crate::{query_params, App};

fn doc(poll: Poll) -> PollDoc {
    let status = poll.status(time::now_ms());
    PollDoc { poll, status }
}

pub(crate) async fn create(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    ApiJson(new): ApiJson<NewPoll>,
) -> Reply {
    app.authorize(&headers, Role::Admin)?;
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

pub(crate) async fn get(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Reply {
    app.authorize(&headers, Role::Admin)?;
    let poll = app
        .registry
        .get(&id)
        .await?
        .ok_or_else(|| Problem::not_found(&format!("poll `{id}`")))?;
    Ok(Json(doc(poll)).into_response())
}

/// Read-modify-write with the registry's version check, retried when another writer won.
async fn modify(
    app: &App,
    id: &str,
    change: impl Fn(&mut Poll) -> Result<Vec<String>, Problem>,
) -> Result<Poll, ApiError> {
    for _ in 0..5 {
        let mut poll = app
            .registry
            .get(id)
            .await?
            .ok_or_else(|| Problem::not_found(&format!("poll `{id}`")))?;
        let removed = change(&mut poll)?;
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

pub(crate) async fn patch(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<PollPatch>,
) -> Reply {
    app.authorize(&headers, Role::Admin)?;
    let poll = modify(&app, &id, |poll| {
        if poll.archived_at.is_some() {
            return Err(archived(&poll.id));
        }
        patch.clone().apply(poll, time::now_ms())
    })
    .await?;
    Ok(Json(doc(poll)).into_response())
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
pub(crate) async fn mint_token(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<TokenRequest>,
) -> Reply {
    app.authorize(&headers, Role::Admin)?;
    let Some(secret) = &app.config.secret else {
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
        token: tally_core::token::mint(secret, &poll.id, &request.voter_id, expiry),
        poll_id: poll.id.clone(),
        voter_id: request.voter_id,
        expires_at: time::format_ms(expiry * 1000),
    };
    Ok((StatusCode::CREATED, Json(issued)).into_response())
}
