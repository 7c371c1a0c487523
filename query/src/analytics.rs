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

/// Values a `where` may list for one dimension, and in all: a filter is a set to match,
/// not a program, and its size bounds the work of every breakdown.
pub(crate) const MAX_WHERE_VALUES_PER_KEY: usize = 100;
pub(crate) const MAX_WHERE_VALUES: usize = 200;

/// Splits `where` into its `key:value` clauses. Clauses are separated by `,`; a value that
/// holds `,` or `\` writes it as `\,` or `\\`.
fn where_clauses(text: &str) -> Result<Vec<String>, Problem> {
    let mut clauses = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(escaped @ (',' | '\\')) => current.push(escaped),
                _ => {
                    return Err(Problem::invalid(
                        "where",
                        "in `where`, `\\` escapes only `,` and `\\` (write a comma in a value as `\\,`)",
                    ))
                }
            },
            ',' => clauses.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    clauses.push(current);
    Ok(clauses
        .into_iter()
        .map(|clause| clause.trim().to_owned())
        .filter(|clause| !clause.is_empty())
        .collect())
}

/// The `where` filters: each named dimension must take one of its listed values.
fn parse_where(poll: &Poll, text: &str) -> Result<BTreeMap<String, Vec<String>>, Problem> {
    let mut filters: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let clauses = where_clauses(text)?;
    if clauses.len() > MAX_WHERE_VALUES {
        return Err(Problem::invalid(
            "where",
            format!(
                "`where` lists {} values; the limit is {MAX_WHERE_VALUES} (and {MAX_WHERE_VALUES_PER_KEY} per key)",
                clauses.len()
            ),
        ));
    }
    for clause in clauses {
        let Some((key, value)) = clause.split_once(':') else {
            return Err(Problem::invalid(
                "where",
                format!("`{clause}` is not of the form key:value"),
            ));
        };
        let key = key.trim();
        dimension(poll, "where", key)?;
        let values = filters.entry(key.to_owned()).or_default();
        if values.len() == MAX_WHERE_VALUES_PER_KEY {
            return Err(Problem::invalid(
                "where",
                format!("`where` lists more than {MAX_WHERE_VALUES_PER_KEY} values of `{key}`"),
            ));
        }
        values.push(value.to_owned());
    }
    Ok(filters)
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
    let filters = parse_where(poll, params.filter.as_deref().unwrap_or(""))?;
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

#[utoipa::path(get, path = "/v1/polls/{id}/breakdown", tag = "analytics",
    security(("api_key" = ["analyst", "admin"])),
    params(("id" = String, Path, description = "the poll"),
        ("by" = Option<String>, Query, description = "comma-separated segment keys (standard or the poll's `dimensions`)"),
        ("from" = Option<String>, Query, format = DateTime, description = "RFC 3339, inclusive"),
        ("to" = Option<String>, Query, format = DateTime, description = "RFC 3339, exclusive"),
        ("where" = Option<String>, Query, description = "`key:value` filters, comma-separated"),
    ),
    responses(
        (status = 200, description = "counts per segment group, with intervals and tests", body = BreakdownDoc),
        (status = 400, description = "`malformed-json`, `invalid-utf8`, `invalid-query`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not-found`: no such poll", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-field`: `field` names the parameter", body = Problem, content_type = "application/problem+json"),
    ))]
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
    // Votes per answer, in the order of `all`, of the whole selection and of each group.
    let totals: Vec<u64> = all.values().copied().collect();
    let mut counts: Vec<u64> = Vec::with_capacity(all.len());
    let mut rest: Vec<u64> = Vec::with_capacity(all.len());
    let mut groups: Vec<BreakdownGroup> = breakdown
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
            counts.clear();
            counts.extend(
                all.keys()
                    .map(|k| group.counts.get(k).copied().unwrap_or(0)),
            );
            rest.clear();
            rest.extend(totals.iter().zip(&counts).map(|(all, own)| all - own));
            let difference = if group.ballots < stats::MIN_GROUP_VOTES {
                // Below the minimum size: marked, and no test reported.
                stats::Difference {
                    p_value: None,
                    small_sample: true,
                }
            } else if poll.kind == PollKind::Multi {
                stats::proportions(&counts, group.ballots, &rest, total_ballots - group.ballots)
            } else {
                stats::chi_square(&counts, &rest)
            };
            BreakdownGroup {
                segment,
                total_votes: group.ballots,
                options,
                differs: false,
                p_value: difference.p_value,
                p_adjusted: None,
                small_sample: difference.small_sample,
            }
        })
        .collect();
    // Every group is tested against the rest at once: correct for that family of tests.
    let raw: Vec<Option<f64>> = groups.iter().map(|g| g.p_value).collect();
    for (group, adjusted) in groups.iter_mut().zip(stats::benjamini_hochberg(&raw)) {
        group.p_adjusted = adjusted;
        group.differs = adjusted.is_some_and(|p| p < 0.05);
    }
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

#[utoipa::path(get, path = "/v1/polls/{id}/timeseries", tag = "analytics",
    security(("api_key" = ["analyst", "admin"])),
    params(("id" = String, Path, description = "the poll"),
        ("step" = Option<String>, Query, description = "`10s`, `1m`, `1h`, `1d` or seconds"),
        ("from" = Option<String>, Query, format = DateTime, description = "RFC 3339, inclusive"),
        ("to" = Option<String>, Query, format = DateTime, description = "RFC 3339, exclusive"),
    ),
    responses(
        (status = 200, description = "votes per option per step", body = TimeseriesDoc),
        (status = 400, description = "`malformed-json`, `invalid-utf8`, `invalid-query`", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "`not-found`: no such poll", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid-field`: `field` names the parameter", body = Problem, content_type = "application/problem+json"),
    ))]
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
    fn where_clauses_split_on_unescaped_commas() {
        assert_eq!(
            where_clauses("country:DE, device:mobile").unwrap(),
            ["country:DE", "device:mobile"]
        );
        assert_eq!(
            where_clauses(r"source:a\,b,source:c\\d").unwrap(),
            ["source:a,b", r"source:c\d"]
        );
        assert!(where_clauses(r"source:a\x").is_err());
        assert!(where_clauses("").unwrap().is_empty());
    }

    #[test]
    fn where_is_bounded() {
        let poll: Poll = tally_core::poll::NewPoll {
            id: Some("p".into()),
            title: "t".into(),
            question: "q".into(),
            kind: PollKind::Nps,
            options: Vec::new(),
            max_choices: None,
            scale: None,
            campaign: None,
            dimensions: Vec::new(),
            dedupe: Default::default(),
            require_token: false,
            results_visibility: Default::default(),
            allowed_origins: Vec::new(),
            opens_at: None,
            closes_at: None,
        }
        .into_poll(0, || "p".into())
        .unwrap();
        let many = |key: &str, n: usize| {
            (0..n)
                .map(|i| format!("{key}:{i:02}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(
            parse_where(&poll, &many("country", 100)).unwrap()["country"].len(),
            100
        );
        let over = parse_where(&poll, &many("country", 101)).unwrap_err();
        assert_eq!(over.field.as_deref(), Some("where"));
        let attack = parse_where(&poll, &many("country", 1_000)).unwrap_err();
        assert!(attack.detail.contains("200"), "{}", attack.detail);
    }

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
