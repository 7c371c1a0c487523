//! Segment breakdowns and time series (analyst).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize, Serializer};
use tally_core::analytics::{Breakdown, BreakdownQuery, Dimension, GroupCounts, TimeseriesQuery};
use tally_core::api::{BreakdownDoc, TimeseriesDoc, TimeseriesPoint};
#[cfg(doc)]
use tally_core::api::{BreakdownGroup, GroupOption};
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

    let answers: Vec<String> = poll.answer_keys().into_iter().map(|(id, _)| id).collect();
    let body = breakdown_json(&poll.id, poll.kind, &query.by, &answers, &breakdown)?;
    if breakdown.groups.len() >= DROP_APART_GROUPS {
        // Tens of thousands of small allocations: freed off the answer's path.
        tokio::task::spawn_blocking(move || drop(breakdown));
    }
    Ok(([(CONTENT_TYPE, "application/json")], body).into_response())
}

/// From this many groups a breakdown's rows are freed on a blocking thread, after the
/// answer is written.
const DROP_APART_GROUPS: usize = 1000;

/// Each group's test against the rest of the selection, in the order of the groups, with
/// every p-value corrected for the family of them all.
fn group_tests(breakdown: &Breakdown, kind: PollKind) -> Vec<GroupTest> {
    let total_ballots: u64 = breakdown.groups.iter().map(|g| g.ballots).sum();
    let mut all: BTreeMap<&str, u64> = BTreeMap::new();
    for group in &breakdown.groups {
        for (option, count) in &group.counts {
            *all.entry(option.as_str()).or_default() += count;
        }
    }
    // Votes per answer, in the order of `all`, of the whole selection and of each group.
    let totals: Vec<u64> = all.values().copied().collect();
    let mut counts: Vec<u64> = Vec::with_capacity(all.len());
    let mut rest: Vec<u64> = Vec::with_capacity(all.len());
    let mut tests: Vec<GroupTest> = breakdown
        .groups
        .iter()
        .map(|group| {
            counts.clear();
            counts.extend(
                all.keys()
                    .map(|k| group.counts.get(*k).copied().unwrap_or(0)),
            );
            rest.clear();
            rest.extend(totals.iter().zip(&counts).map(|(all, own)| all - own));
            let difference = if group.ballots < stats::MIN_GROUP_VOTES {
                // Below the minimum size: marked, and no test reported.
                stats::Difference {
                    p_value: None,
                    small_sample: true,
                }
            } else if kind == PollKind::Multi {
                stats::proportions(&counts, group.ballots, &rest, total_ballots - group.ballots)
            } else {
                stats::chi_square(&counts, &rest)
            };
            GroupTest {
                p_value: difference.p_value,
                p_adjusted: None,
                small_sample: difference.small_sample,
            }
        })
        .collect();
    // Every group is tested against the rest at once: correct for that family of tests.
    let raw: Vec<Option<f64>> = tests.iter().map(|t| t.p_value).collect();
    for (test, adjusted) in tests.iter_mut().zip(stats::benjamini_hochberg(&raw)) {
        test.p_adjusted = adjusted;
    }
    tests
}

/// A group's test, as [`BreakdownGroup`] reports it.
struct GroupTest {
    p_value: Option<f64>,
    p_adjusted: Option<f64>,
    small_sample: bool,
}

/// The largest buffer reserved for a breakdown's JSON before it is written; a larger one
/// grows as it is written.
const MAX_RESERVED_JSON: usize = 16 << 20;

/// The JSON of `breakdown` of a poll (its `kind` and every answer of it, in its order) by
/// the dimensions `by`: a [`BreakdownDoc`], written in one buffer sized for it up front (a
/// breakdown by a key of 10,000 values is some 5 MB).
fn breakdown_json(
    poll_id: &str,
    kind: PollKind,
    by: &[Dimension],
    answers: &[String],
    breakdown: &Breakdown,
) -> Result<Vec<u8>, Problem> {
    let tests = group_tests(breakdown, kind);
    let doc = BreakdownView {
        poll_id,
        by: Names(by),
        total_votes: breakdown.groups.iter().map(|g| g.ballots).sum(),
        test: if kind == PollKind::Multi {
            "two_proportion_z_bonferroni"
        } else {
            "chi_square"
        },
        groups: GroupsView {
            by,
            answers,
            groups: &breakdown.groups,
            tests: &tests,
        },
        as_of: breakdown.as_of,
    };
    let per_group = 160 + 110 * answers.len();
    let size = 256 + per_group * breakdown.groups.len();
    let mut body = Vec::with_capacity(size.min(MAX_RESERVED_JSON));
    serde_json::to_writer(&mut body, &doc).map_err(|e| {
        tracing::error!(error = %e, "writing a breakdown");
        Problem::internal()
    })?;
    Ok(body)
}

/// [`BreakdownDoc`] as the handler writes it: the same fields in the same order, borrowed
/// from the warehouse's answer instead of copied into a document per group (what the
/// OpenAPI document and clients read is `BreakdownDoc`; a test holds the two alike).
#[derive(Serialize)]
struct BreakdownView<'a> {
    poll_id: &'a str,
    by: Names<'a>,
    total_votes: u64,
    test: &'static str,
    groups: GroupsView<'a>,
    as_of: u64,
}

/// The names of the `by` dimensions, as a list.
struct Names<'a>(&'a [Dimension]);

impl Serialize for Names<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|d| d.0.as_str()))
    }
}

struct GroupsView<'a> {
    by: &'a [Dimension],
    /// Every answer of the poll, in its order: each group lists them all.
    answers: &'a [String],
    groups: &'a [GroupCounts],
    tests: &'a [GroupTest],
}

impl Serialize for GroupsView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            self.groups
                .iter()
                .zip(self.tests)
                .map(|(group, test)| GroupView {
                    segment: SegmentView {
                        by: self.by,
                        values: &group.values,
                    },
                    total_votes: group.ballots,
                    options: OptionsView {
                        answers: self.answers,
                        group,
                    },
                    differs: test.p_adjusted.is_some_and(|p| p < 0.05),
                    p_value: test.p_value,
                    p_adjusted: test.p_adjusted,
                    small_sample: test.small_sample,
                }),
        )
    }
}

/// [`BreakdownGroup`], borrowed.
#[derive(Serialize)]
struct GroupView<'a> {
    segment: SegmentView<'a>,
    total_votes: u64,
    options: OptionsView<'a>,
    differs: bool,
    p_value: Option<f64>,
    p_adjusted: Option<f64>,
    small_sample: bool,
}

/// A group's value of each `by` dimension, as a map in the order of the names (a name
/// given twice once), as [`BreakdownGroup::segment`] is.
struct SegmentView<'a> {
    by: &'a [Dimension],
    values: &'a [String],
}

impl Serialize for SegmentView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut pairs: Vec<(&str, &str)> = self
            .by
            .iter()
            .zip(self.values)
            .map(|(d, v)| (d.0.as_str(), v.as_str()))
            .collect();
        // Sorted by name, and the last of a name given twice, as a map collected from them.
        pairs.reverse();
        pairs.sort_by_key(|(name, _)| *name);
        pairs.dedup_by_key(|(name, _)| *name);
        serializer.collect_map(pairs)
    }
}

struct OptionsView<'a> {
    answers: &'a [String],
    group: &'a GroupCounts,
}

impl Serialize for OptionsView<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let ballots = self.group.ballots;
        serializer.collect_seq(self.answers.iter().map(|id| {
            let count = self.group.counts.get(id).copied().unwrap_or(0);
            OptionView {
                id,
                count,
                share: share(count, ballots),
                ci95: stats::wilson(count, ballots),
            }
        }))
    }
}

/// [`GroupOption`], borrowed.
#[derive(Serialize)]
struct OptionView<'a> {
    id: &'a str,
    count: u64,
    share: f64,
    ci95: Option<[f64; 2]>,
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
            spread: 1,
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

    /// The breakdown as the handler writes it is a [`BreakdownDoc`]: the same fields in the
    /// same order (it reads back and writes again to the same bytes), with every answer of
    /// the poll in each group (zeros included), the segment as a map by name (a name given
    /// twice once), and the statistics of the groups.
    #[test]
    fn breakdowns_are_written_as_their_document() {
        let group = |values: &[&str], counts: &[(&str, u64)]| GroupCounts {
            values: values.iter().map(|v| (*v).to_owned()).collect(),
            ballots: counts.iter().map(|(_, n)| n).sum(),
            counts: counts.iter().map(|(a, n)| ((*a).to_owned(), *n)).collect(),
        };
        let breakdown = Breakdown {
            groups: vec![
                group(&["mobile", "DE", "mobile"], &[("red", 300), ("blue", 10)]),
                group(&["desktop", "FR", "desktop"], &[("red", 10), ("blue", 300)]),
                group(&["tablet", "", "tablet"], &[("blue", 4)]),
            ],
            as_of: 42,
        };
        let by = ["device", "country", "device"].map(|d| Dimension(d.to_owned()));
        let answers = ["red", "green", "blue"].map(String::from);
        let body = breakdown_json("p", PollKind::Single, &by, &answers, &breakdown).unwrap();
        let doc: BreakdownDoc = serde_json::from_slice(&body).unwrap();
        assert_eq!(serde_json::to_vec(&doc).unwrap(), body);

        assert_eq!(
            (
                doc.poll_id.as_str(),
                doc.test.as_str(),
                doc.total_votes,
                doc.as_of
            ),
            ("p", "chi_square", 624, 42)
        );
        assert_eq!(doc.by, ["device", "country", "device"]);
        let first = &doc.groups[0];
        assert_eq!(
            first.segment,
            BTreeMap::from([
                ("country".to_owned(), "DE".to_owned()),
                ("device".to_owned(), "mobile".to_owned())
            ])
        );
        let options: Vec<(&str, u64)> = first
            .options
            .iter()
            .map(|o| (o.id.as_str(), o.count))
            .collect();
        assert_eq!(options, [("red", 300), ("green", 0), ("blue", 10)]);
        assert_eq!(first.options[0].share, 300.0 / 310.0);
        assert_eq!(first.options[0].ci95, stats::wilson(300, 310));
        // The answers in name order (blue, red): this group against the other two.
        let expected = stats::chi_square(&[10, 300], &[304, 10]);
        assert_eq!(first.p_value, expected.p_value);
        assert!(first.differs && doc.groups[1].differs);
        let small = &doc.groups[2];
        assert!(small.small_sample && small.p_value.is_none() && !small.differs);
        assert_eq!(small.options[1].ci95, stats::wilson(0, 4));
        let raw: Vec<Option<f64>> = doc.groups.iter().map(|g| g.p_value).collect();
        let adjusted: Vec<Option<f64>> = doc.groups.iter().map(|g| g.p_adjusted).collect();
        assert_eq!(adjusted, stats::benjamini_hochberg(&raw));
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
