//! Queries: a DataFusion snapshot of some tables, and the SQL behind each warehouse read.

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::common::ScalarValue;
use datafusion::datasource::MemTable;
use datafusion::execution::context::{SessionConfig, SessionContext};
use datafusion::prelude::ParquetReadOptions;
use tally_core::analytics::{Breakdown, BreakdownQuery, Dimension, TimePoint, TimeseriesQuery};
use tally_core::results::Tally;
use tally_core::rollup::{self, BreakdownPlan, BreakdownRow, RollupLevel, BREAKDOWN_ROW_LIMIT};
use tally_core::segment::STANDARD_KEYS;
use tally_core::{Error, Result};

use super::columns::{group_keys, strings, u64s};
use super::files::DataFile;
use super::{storage, Inner, Kind};

/// A query context over a consistent view of some tables.
struct Snapshot {
    ctx: SessionContext,
    /// The files the context reads, kept from deletion by a merge until it is dropped.
    _files: Vec<Arc<DataFile>>,
}

impl Snapshot {
    async fn query(&self, sql: &str, params: Vec<ScalarValue>) -> Result<Vec<RecordBatch>> {
        let frame = self.ctx.sql(sql).await.map_err(storage)?;
        let frame = if params.is_empty() {
            frame
        } else {
            frame.with_param_values(params).map_err(storage)?
        };
        frame.collect().await.map_err(storage)
    }
}

impl Inner {
    /// A query context over a consistent snapshot of some tables: their files (kept alive
    /// until the context is dropped) and their in-memory tails.
    async fn snapshot(&self, kinds: &[Kind]) -> Result<Snapshot> {
        // Every table's files and tail under one lock, so the tables agree with each other.
        let tables: Vec<(Kind, Vec<Arc<DataFile>>, Vec<RecordBatch>)> = {
            let tables = self.tables.read().expect("warehouse lock");
            kinds
                .iter()
                .map(|&kind| {
                    let table = &tables[&kind];
                    let batches = table
                        .tails
                        .values()
                        .flat_map(|t| t.batches.iter().cloned())
                        .collect();
                    (kind, table.files.clone(), batches)
                })
                .collect()
        };
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(2));
        let mut kept = Vec::new();
        for (kind, files, batches) in tables {
            let schema = self.schema(kind).clone();
            let memory = MemTable::try_new(schema.clone(), vec![batches]).map_err(storage)?;
            let mut frame = ctx.read_table(Arc::new(memory)).map_err(storage)?;
            if !files.is_empty() {
                let paths: Vec<String> = files
                    .iter()
                    .map(|f| f.path.to_string_lossy().into_owned())
                    .collect();
                let stored = ctx
                    .read_parquet(paths, ParquetReadOptions::default().schema(&schema))
                    .await
                    .map_err(storage)?;
                frame = stored.union(frame).map_err(storage)?;
            }
            ctx.register_table(kind.table(), frame.into_view())
                .map_err(storage)?;
            kept.extend(files);
        }
        Ok(Snapshot { ctx, _files: kept })
    }

    /// One statement about one poll (its id is `$1`) on a snapshot of one table.
    async fn query_poll(&self, kind: Kind, sql: &str, poll_id: &str) -> Result<Vec<RecordBatch>> {
        let snapshot = self.snapshot(&[kind]).await?;
        snapshot.query(sql, vec![text(poll_id)]).await
    }

    pub(super) async fn tally(&self, poll_id: &str) -> Result<Tally> {
        let snapshot = self.snapshot(&[Kind::Votes]).await?;
        let totals = snapshot
            .query(
                "SELECT count(*), count(DISTINCT nullif(voter_key, '')), max(seq) FROM votes WHERE poll_id = $1",
                vec![text(poll_id)],
            )
            .await?;
        let counts = snapshot
            .query(
                "SELECT opt, count(*) FROM (SELECT unnest(choice) AS opt FROM votes WHERE poll_id = $1) GROUP BY opt",
                vec![text(poll_id)],
            )
            .await?;
        let options = strings(&counts, 0)?;
        let numbers = u64s(&counts, 1)?;
        let first = |column| -> Result<u64> {
            Ok(u64s(&totals, column)?.first().copied().unwrap_or_default())
        };
        Ok(Tally {
            ballots: first(0)?,
            unique_voters: first(1)?,
            counts: options.into_iter().zip(numbers).collect(),
            as_of: first(2)?,
        })
    }

    pub(super) async fn voter_keys(&self, poll_id: &str) -> Result<Vec<String>> {
        let keys = self
            .query_poll(
                Kind::Votes,
                "SELECT DISTINCT voter_key FROM votes WHERE poll_id = $1 AND voter_key <> ''",
                poll_id,
            )
            .await?;
        strings(&keys, 0)
    }

    pub(super) async fn breakdown(&self, query: &BreakdownQuery) -> Result<Breakdown> {
        let plan = BreakdownPlan::new(query.from_ms, query.to_ms);
        let (fresh_kind, settled_kind) = (
            Kind::Rollups(RollupLevel::Fresh),
            Kind::Rollups(RollupLevel::Settled),
        );
        let kinds: &[Kind] = if plan.raw.is_empty() {
            &[fresh_kind, settled_kind]
        } else {
            &[fresh_kind, settled_kind, Kind::Votes]
        };
        let snapshot = self.snapshot(kinds).await?;
        let positions = snapshot
            .query(
                &format!(
                    "SELECT (SELECT max(last_seq) FROM {} WHERE poll_id = $1), \
                     (SELECT max(last_seq) FROM {} WHERE poll_id = $1)",
                    settled_kind.table(),
                    fresh_kind.table()
                ),
                vec![text(&query.poll_id)],
            )
            .await?;
        let settled = u64s(&positions, 0)?.first().copied().unwrap_or_default();
        let fresh = u64s(&positions, 1)?.first().copied().unwrap_or_default();
        let as_of = settled.max(fresh);
        let (filter, params) = segment_filter(query)?;
        let exprs = query
            .by
            .iter()
            .map(dimension_expr)
            .collect::<Result<Vec<_>>>()?;
        let dims = exprs.len();
        let mut select: Vec<String> = exprs
            .iter()
            .enumerate()
            .map(|(i, expr)| format!("{expr} AS g{i}"))
            .collect();
        let mut groups: Vec<String> = (0..dims).map(|i| format!("g{i}")).collect();
        groups.push("opt".into());
        let groups = groups.join(", ");

        // Rows of (group values…, answer, count); answer '' holds the ballots.
        let mut parts = Vec::new();
        if let Some(buckets) = plan.buckets {
            let mut inner = select.clone();
            inner.push("unnest(array_prepend('', answers)) AS opt".into());
            inner.push("unnest(array_prepend(ballots, answer_votes)) AS n".into());
            let inner = inner.join(", ");
            let buckets = range_clause("bucket_start", buckets);
            parts.push(format!(
                "SELECT {groups}, sum(n) FROM (\
                 SELECT {inner} FROM {} WHERE poll_id = $1 AND last_seq <= {settled} AND {buckets}{filter} \
                 UNION ALL \
                 SELECT {inner} FROM {} WHERE poll_id = $1 AND last_seq > {settled} AND last_seq <= {fresh} AND {buckets}{filter}\
                 ) GROUP BY {groups} LIMIT {BREAKDOWN_ROW_LIMIT}",
                settled_kind.table(),
                fresh_kind.table(),
            ));
        }
        if !plan.raw.is_empty() {
            let ranges: Vec<String> = plan
                .raw
                .iter()
                .map(|range| range_clause("received_ms", *range))
                .collect();
            select.push("unnest(array_prepend('', choice)) AS opt".into());
            parts.push(format!(
                "SELECT {groups}, count(*) FROM (SELECT {} FROM votes \
                 WHERE poll_id = $1 AND seq <= {as_of} AND ({}){filter}) \
                 GROUP BY {groups} LIMIT {BREAKDOWN_ROW_LIMIT}",
                select.join(", "),
                ranges.join(" OR "),
            ));
        }
        let mut rows: Vec<Vec<BreakdownRow>> = Vec::new();
        for sql in parts {
            let part = snapshot.query(&sql, params.clone()).await?;
            rows.push(
                group_keys(&part, dims)?
                    .into_iter()
                    .zip(strings(&part, dims)?)
                    .zip(u64s(&part, dims + 1)?)
                    .map(|((group, answer), count)| (group, answer, count))
                    .collect(),
            );
        }
        rollup::assemble(rows, as_of)
    }

    pub(super) async fn window_widths(&self, poll_id: &str) -> Result<Vec<u32>> {
        let rows = self
            .query_poll(
                Kind::Windows,
                "SELECT DISTINCT window_seconds FROM vote_windows WHERE poll_id = $1 ORDER BY window_seconds",
                poll_id,
            )
            .await?;
        Ok(u64s(&rows, 0)?.into_iter().map(|w| w as u32).collect())
    }

    pub(super) async fn timeseries(&self, query: &TimeseriesQuery) -> Result<Vec<TimePoint>> {
        let step = query.step_seconds.max(1);
        let mut filter = "poll_id = $1".to_owned();
        if let Some(from) = query.from_ms {
            filter.push_str(&format!(" AND window_start >= {}", from.max(0) / 1000));
        }
        if let Some(to) = query.to_ms {
            filter.push_str(&format!(" AND window_start < {}", to.max(0) / 1000));
        }
        let rows = self
            .query_poll(
                Kind::Windows,
                &format!(
                    "SELECT (window_start / {step}) * {step} AS t, option, sum(votes) FROM vote_windows \
                     WHERE {filter} GROUP BY t, option ORDER BY t, option"
                ),
                &query.poll_id,
            )
            .await?;
        let times = u64s(&rows, 0)?;
        let options = strings(&rows, 1)?;
        let votes = u64s(&rows, 2)?;
        Ok(TimePoint::from_rows(
            times
                .into_iter()
                .zip(options)
                .zip(votes)
                .map(|((t, option), votes)| (t as i64, option, votes)),
        ))
    }
}

fn text(value: &str) -> ScalarValue {
    ScalarValue::Utf8(Some(value.to_owned()))
}

/// The SQL expression of a dimension. Custom keys are validated segment keys; they are
/// checked again here because they are spliced into the statement.
fn dimension_expr(dimension: &Dimension) -> Result<String> {
    if STANDARD_KEYS.contains(&dimension.0.as_str()) {
        return Ok(dimension.0.clone());
    }
    let safe = !dimension.0.is_empty()
        && dimension
            .0
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !safe {
        return Err(Error::Invalid(tally_core::problem::Problem::invalid(
            "by",
            format!("`{}` is not a segment key", dimension.0),
        )));
    }
    Ok(format!(
        "coalesce(dim_values[CAST(array_position(dim_keys, '{}') AS BIGINT)], '')",
        dimension.0
    ))
}

/// The segment filters of a breakdown as ` AND` clauses, with their parameters (`$1` is
/// the poll id).
fn segment_filter(query: &BreakdownQuery) -> Result<(String, Vec<ScalarValue>)> {
    let mut params = vec![text(&query.poll_id)];
    let mut filter = String::new();
    for (dimension, values) in &query.filters {
        let expr = dimension_expr(dimension)?;
        let mut alternatives = Vec::new();
        for value in values {
            params.push(text(value));
            alternatives.push(format!("{expr} = ${}", params.len()));
        }
        if alternatives.is_empty() {
            alternatives.push("false".into());
        }
        filter.push_str(&format!(" AND ({})", alternatives.join(" OR ")));
    }
    Ok((filter, params))
}

/// `[from, to)` as a condition on `column`; `None` is open.
fn range_clause(column: &str, (from, to): (Option<i64>, Option<i64>)) -> String {
    let mut range = vec!["true".to_owned()];
    if let Some(from) = from {
        range.push(format!("{column} >= {from}"));
    }
    if let Some(to) = to {
        range.push(format!("{column} < {to}"));
    }
    format!("({})", range.join(" AND "))
}
