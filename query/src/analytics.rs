//! Segment breakdowns and time series (analyst).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use tally_core::analytics::{BreakdownQuery, Dimension, TimeseriesQuery};
use tally_core::api::{BreakdownDoc, BreakdownGroup, GroupOption, TimeseriesDoc, TimeseriesPoint};
use tally_core::auth::Role;
use tally_core::poll::{Poll, PollKind};
use tally_core::problem::Problem;
use tally_core::results::share;
use tally_core::segment::STANDARD_KEYS;
use tally_core::time;
use tally_service::http::Reply;

use crate::{query_params, stats, App};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BreakdownParams {
    by: Option<String>,
    from: Option<String>,
    to: Option<String>,
    #[serde(rename = "where")]
    filter: Option<String>,
}

fn dimension(poll: &Poll, field: &str, key: &str) -> Result<Dimension, Problem> {
    if STANDARD_KEYS.contains(&key) || poll.dimensions.iter().any(|d| d == key) {
        Ok(Dimension(key.to_owned()))
    } else {
        let mut known: Vec<&str> = STANDARD_KEYS.to_vec();
        known.extend(poll.dimensions.iter().map(String::as_str));
        Err(Problem::invalid(
            field,
            format!(
                "`{key}` is not a segment key of this poll; use one of {}",
                known.join(", ")
            ),
        ))
    }
}

fn time_param(field: &str, value: Option<&str>) -> Result<Option<i64>, Problem> {
    value
        .map(|text| time::parse(text).map_err(|why| Problem::invalid(field, why)))
        .transpose()
}

/// Parses `by` and `where` against the poll's dimensions.
fn breakdown_query(poll: &Poll, params: BreakdownParams) -> Result<BreakdownQuery, Problem> {
    let by_text = params.by.as_deref().unwrap_or("").trim();
    if by_text.is_empty() {
        return Err(Problem::invalid(
            "by",
            "name the dimensions to break down by, e.g. by=country,device",
        ));
    }
    let by: Vec<Dimension> = by_text
        .split(',')
        .map(|k| dimension(poll, "by", k.trim()))
        .collect::<Result<_, _>>()?;
    if by.len() > 3 {
        return Err(Problem::invalid(
            "by",
            "break down by at most 3 dimensions at once",
        ));
    }
    let mut filters: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for clause in params
        .filter
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        let Some((key, value)) = clause.split_once(':') else {
            return Err(Problem::invalid(
                "where",
                format!("`{clause}` is not of the form key:value"),
            ));
        };
        dimension(poll, "where", key)?;
        filters
            .entry(key.to_owned())
            .or_default()
            .push(value.to_owned());
    }
    Ok(BreakdownQuery {
        poll_id: poll.id.clone(),
        by,
        filters: filters
            .into_iter()
            .map(|(k, v)| (Dimension(k), v))
            .collect(),
        from_ms: time_param("from", params.from.as_deref())?,
        to_ms: time_param("to", params.to.as_deref())?,
    })
}

pub(crate) async fn breakdown(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    params: Result<Query<BreakdownParams>, QueryRejection>,
) -> Reply {
    app.authorize(&headers, Role::Analyst)?;
    let params = query_params(params)?;
    let poll = app.poll(&id).await?;
    let query = breakdown_query(&poll, params)?;
    let breakdown = app.warehouse.breakdown(&query).await?;

    let total_ballots: u64 = breakdown.groups.iter().map(|g| g.ballots).sum();
    let mut all: BTreeMap<String, u64> = BTreeMap::new();
    for group in &breakdown.groups {
        for (option, count) in &group.counts {
            *all.entry(option.clone()).or_default() += count;
        }
    }
    let answer_keys = poll.answer_keys();
    let groups: Vec<BreakdownGroup> = breakdown
        .groups
        .iter()
        .map(|group| {
            let segment: BTreeMap<String, String> = query
                .by
                .iter()
                .zip(&group.values)
                .map(|(d, v)| (d.0.clone(), v.clone()))
                .collect();
            let options: Vec<GroupOption> = answer_keys
                .iter()
                .map(|(option, _)| {
                    let count = group.counts.get(option).copied().unwrap_or(0);
                    GroupOption {
                        id: option.clone(),
                        count,
                        share: share(count, group.ballots),
                        ci95: stats::wilson(count, group.ballots),
                    }
                })
                .collect();
            let rest: BTreeMap<String, u64> = all
                .iter()
                .map(|(k, v)| (k.clone(), v - group.counts.get(k).copied().unwrap_or(0)))
                .collect();
            let difference = if poll.kind == PollKind::Multi {
                stats::proportions(
                    &group.counts,
                    group.ballots,
                    &rest,
                    total_ballots - group.ballots,
                )
            } else {
                stats::chi_square(&group.counts, &rest)
            };
            BreakdownGroup {
                segment,
                total_votes: group.ballots,
                options,
                differs: difference.p_value.is_some_and(|p| p < 0.05),
                p_value: difference.p_value,
                small_sample: difference.small_sample,
            }
        })
        .collect();
    let test = if poll.kind == PollKind::Multi {
        "two_proportion_z_bonferroni"
    } else {
        "chi_square"
    };
    Ok(Json(BreakdownDoc {
        poll_id: poll.id.clone(),
        by: query.by.iter().map(|d| d.0.clone()).collect(),
        total_votes: total_ballots,
        test: test.to_owned(),
        groups,
        as_of: breakdown.as_of,
    })
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TimeseriesParams {
    step: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// `10s`, `1m`, `1h`, `1d` or plain seconds.
fn parse_step(text: &str) -> Option<u32> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let number: u32 = number.parse().ok()?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    number.checked_mul(unit).filter(|s| *s > 0)
}

const MAX_POINTS: i64 = 10_000;

pub(crate) async fn timeseries(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    params: Result<Query<TimeseriesParams>, QueryRejection>,
) -> Reply {
    app.authorize(&headers, Role::Analyst)?;
    let params = query_params(params)?;
    let poll = app.poll(&id).await?;
    let step_text = params.step.as_deref().unwrap_or("1m");
    let Some(step) = parse_step(step_text) else {
        return Err(Problem::invalid(
            "step",
            format!("`{step_text}` is not a step such as 10s, 1m, 1h or 1d"),
        )
        .into());
    };
    // The window width is the processor's setting when it counted the votes: every window
    // row carries it, so a step must be a whole number of each width the poll has.
    let widths = app.warehouse.window_widths(&poll.id).await?;
    if let Some(width) = widths.iter().find(|w| step % (**w).max(1) != 0) {
        return Err(Problem::invalid(
            "step",
            format!("step must be a multiple of the {width}s aggregation window"),
        )
        .into());
    }
    let from_ms = time_param("from", params.from.as_deref())?;
    let to_ms = time_param("to", params.to.as_deref())?;
    let span_start = from_ms.unwrap_or(poll.created_at);
    let span_end = to_ms.unwrap_or_else(time::now_ms);
    if (span_end - span_start) / 1000 / step as i64 > MAX_POINTS {
        return Err(Problem::invalid("step", format!("that range has more than {MAX_POINTS} steps; choose a larger step or a shorter range")).into());
    }
    let points = app
        .warehouse
        .timeseries(&TimeseriesQuery {
            poll_id: poll.id.clone(),
            step_seconds: step,
            from_ms,
            to_ms,
        })
        .await?;
    let keys = poll.answer_keys();
    let points: Vec<TimeseriesPoint> = points
        .into_iter()
        .map(|point| {
            let mut options: BTreeMap<String, u64> =
                keys.iter().map(|(k, _)| (k.clone(), 0)).collect();
            options.extend(point.counts);
            TimeseriesPoint {
                t: time::format_ms(point.t * 1000),
                options,
            }
        })
        .collect();
    Ok(Json(TimeseriesDoc {
        poll_id: poll.id.clone(),
        step_seconds: step,
        points,
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse() {
        assert_eq!(parse_step("10s"), Some(10));
        assert_eq!(parse_step("1m"), Some(60));
        assert_eq!(parse_step("2h"), Some(7200));
        assert_eq!(parse_step("30"), Some(30));
        assert_eq!(parse_step("0m"), None);
        assert_eq!(parse_step("1w"), None);
        assert_eq!(parse_step("m"), None);
    }
}
