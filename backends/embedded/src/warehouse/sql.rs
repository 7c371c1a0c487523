//! Queries: a DataFusion snapshot of some tables, and the SQL behind each warehouse read.
//!
//! Every read takes a consistent view of its tables on the caller's side (a lock held for a
//! few clones) and does the rest — opening the snapshot, planning, executing — on the query
//! runtime ([`super::executor`]).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef, UInt64Type};
use datafusion::common::ScalarValue;
use datafusion::datasource::MemTable;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::context::{SessionConfig, SessionContext};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::prelude::ParquetReadOptions;
use futures::StreamExt;
use tally_core::analytics::{Breakdown, BreakdownQuery, Dimension, TimePoint, TimeseriesQuery};
use tally_core::ports::{newer_positions, poll_as_of, Positions};
use tally_core::results::Tally;
use tally_core::rollup::{
    self, BreakdownPlan, BreakdownRow, CubeSet, GroupSums, RollupLevel, BREAKDOWN_ROW_LIMIT,
    TOTAL_SET,
};
use tally_core::segment::STANDARD_KEYS;
use tally_core::{Error, Result};

use super::columns::{group_keys, strings, u64s};
use super::files::DataFile;
use super::{storage, Inner, Kind};

/// One table as of one moment: its files and its in-memory rows.
pub(super) struct TableView {
    pub(super) kind: Kind,
    pub(super) schema: SchemaRef,
    pub(super) files: Vec<Arc<DataFile>>,
    pub(super) batches: Vec<RecordBatch>,
}

/// Registers each table of `tables` in `ctx` as a view of its files and in-memory rows,
/// under its own name; returns the files, which must outlive the queries that read them.
pub(super) async fn register_tables(
    ctx: &SessionContext,
    tables: Vec<TableView>,
) -> Result<Vec<Arc<DataFile>>> {
    let mut kept = Vec::new();
    for table in tables {
        let memory =
            MemTable::try_new(table.schema.clone(), vec![table.batches]).map_err(storage)?;
        let mut frame = ctx.read_table(Arc::new(memory)).map_err(storage)?;
        if !table.files.is_empty() {
            let paths: Vec<String> = table
                .files
                .iter()
                .map(|f| f.path.to_string_lossy().into_owned())
                .collect();
            let stored = ctx
                .read_parquet(paths, ParquetReadOptions::default().schema(&table.schema))
                .await
                .map_err(storage)?;
            frame = stored.union(frame).map_err(storage)?;
        }
        ctx.register_table(table.kind.table(), frame.into_view())
            .map_err(storage)?;
        kept.extend(table.files);
    }
    Ok(kept)
}

/// The runtime the service's own reads share, so each Parquet footer and file's statistics
/// are read once, not in every query that plans over the file. Both caches check an
/// entry against the file's size and time of change; the list of files is never cached
/// (each snapshot names its files, and a merge replaces them).
pub(super) fn read_runtime() -> Result<Arc<RuntimeEnv>> {
    RuntimeEnvBuilder::new()
        .with_cache_manager(CacheManagerConfig::default().with_list_files_cache_limit(0))
        .build_arc()
        .map_err(storage)
}

/// A query context over a consistent view of some tables.
struct Snapshot {
    ctx: SessionContext,
    /// The files the context reads, kept from deletion by a merge until it is dropped.
    _files: Vec<Arc<DataFile>>,
}

impl Snapshot {
    /// A context in which each table of `tables` is a view of its files and in-memory rows.
    async fn open(tables: Vec<TableView>, runtime: Arc<RuntimeEnv>) -> Result<Snapshot> {
        let mut config = SessionConfig::new().with_target_partitions(2);
        config.options_mut().execution.parquet.pushdown_filters = true;
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        let kept = register_tables(&ctx, tables).await?;
        Ok(Snapshot { ctx, _files: kept })
    }

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
    /// The files and tails of `kinds`, under one lock so the tables agree with each other.
    fn view(&self, kinds: &[Kind]) -> Vec<TableView> {
        let tables = self.tables.read().expect("warehouse lock");
        kinds
            .iter()
            .map(|&kind| {
                let table = &tables[&kind];
                TableView {
                    kind,
                    schema: self.schema(kind).clone(),
                    files: table.files.clone(),
                    batches: table
                        .tails
                        .values()
                        .flat_map(|t| t.batches.iter().cloned())
                        .collect(),
                }
            })
            .collect()
    }

    /// Runs `read` on a snapshot of `kinds` (files kept alive until it is done), on the
    /// query runtime.
    async fn read<T, F, Fut>(&self, kinds: &[Kind], read: F) -> Result<T>
    where
        F: FnOnce(Snapshot) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let tables = self.view(kinds);
        let runtime = self.runtime.clone();
        self.executor
            .run(async move { read(Snapshot::open(tables, runtime).await?).await })
            .await
    }

    pub(super) async fn tally_by_partition(&self, poll_id: &str) -> Result<BTreeMap<u16, Tally>> {
        let poll_id = poll_id.to_owned();
        self.read(&[Kind::Votes], move |snapshot| async move {
            snapshot.tally_by_partition(&poll_id).await
        })
        .await
    }

    pub(super) async fn voter_keys(&self, poll_id: &str) -> Result<Vec<String>> {
        let poll_id = poll_id.to_owned();
        self.read(&[Kind::Votes], move |snapshot| async move {
            let keys = snapshot
                .query(
                    "SELECT DISTINCT voter_key FROM votes WHERE poll_id = $1 AND voter_key <> ''",
                    vec![text(&poll_id)],
                )
                .await?;
            strings(&keys, 0)
        })
        .await
    }

    pub(super) async fn breakdown(&self, query: &BreakdownQuery) -> Result<Breakdown> {
        let cube = rollup::cube_set(query);
        let plan = BreakdownPlan::for_set(query, cube.as_ref());
        let kinds: &[Kind] = if plan.raw.is_empty() {
            &SEGMENT_KINDS[..2]
        } else {
            &SEGMENT_KINDS
        };
        let query = query.clone();
        self.read(kinds, move |snapshot| async move {
            snapshot.breakdown(&query, cube, plan).await
        })
        .await
    }

    pub(super) async fn window_widths(&self, poll_id: &str) -> Result<Vec<u32>> {
        let poll_id = poll_id.to_owned();
        self.read(&[Kind::Windows], move |snapshot| async move {
            let rows = snapshot
                .query(
                    "SELECT DISTINCT window_seconds FROM vote_windows WHERE poll_id = $1 ORDER BY window_seconds",
                    vec![text(&poll_id)],
                )
                .await?;
            Ok(u64s(&rows, 0)?.into_iter().map(|w| w as u32).collect())
        })
        .await
    }

    pub(super) async fn timeseries(&self, query: &TimeseriesQuery) -> Result<Vec<TimePoint>> {
        let query = query.clone();
        self.read(&[Kind::Windows], move |snapshot| async move {
            snapshot.timeseries(&query).await
        })
        .await
    }

    pub(super) async fn segment_values(
        &self,
        poll_id: &str,
        partition: u16,
    ) -> Result<BTreeMap<String, BTreeSet<String>>> {
        let poll_id = poll_id.to_owned();
        self.read(&SEGMENT_KINDS, move |snapshot| async move {
            snapshot.segment_values(&poll_id, partition).await
        })
        .await
    }
}

/// `(log_partition, position)` rows as positions.
pub(super) fn partition_positions(rows: &[RecordBatch]) -> Result<Positions> {
    let partitions = u64s(rows, 0)?;
    let positions = u64s(rows, 1)?;
    partitions
        .into_iter()
        .zip(positions)
        .map(|(partition, position)| {
            let partition = u16::try_from(partition).map_err(storage)?;
            Ok((partition, position))
        })
        .collect()
}

/// Each partition's bound in `bounds`, as an expression of a row's `log_partition`; 0 for
/// a partition without one.
fn bound_of_partition(bounds: &Positions) -> String {
    let cases: Vec<String> = bounds
        .iter()
        .map(|(partition, bound)| format!("WHEN {partition} THEN {bound}"))
        .collect();
    format!(
        "CAST(CASE log_partition {} ELSE 0 END AS BIGINT UNSIGNED)",
        cases.join(" ")
    )
}

/// `column` at most the bound of its row's partition in `bounds`: none of the rows of a
/// partition without one.
fn at_most(column: &str, bounds: &Positions) -> String {
    match bounds.len() {
        0 => "false".to_owned(),
        1 => {
            let (partition, bound) = bounds.iter().next().expect("one bound");
            format!("(log_partition = {partition} AND {column} <= {bound})")
        }
        _ => format!("{column} <= {}", bound_of_partition(bounds)),
    }
}

/// `column` above the bound of its row's partition in `bounds`: every row of a partition
/// without one.
fn above(column: &str, bounds: &Positions) -> String {
    match bounds.len() {
        0 => "true".to_owned(),
        1 => {
            let (partition, bound) = bounds.iter().next().expect("one bound");
            format!("(log_partition <> {partition} OR {column} > {bound})")
        }
        _ => format!("{column} > {}", bound_of_partition(bounds)),
    }
}

/// `column` above the bound of its row's partition in `after` and at most its bound in
/// `upto`, with one plain range over all partitions beside it (above the lowest bound in
/// `after` of a partition in `upto`, at most the highest in `upto`): it takes no row the
/// rest would not, and it is what the files' statistics can skip whole row groups by, where
/// the per-partition conditions make every fresh row of a poll be read.
fn between(column: &str, after: &Positions, upto: &Positions) -> String {
    let Some(highest) = upto.values().max() else {
        return "false".to_owned();
    };
    let lowest = upto
        .keys()
        .map(|partition| after.get(partition).copied().unwrap_or(0))
        .min()
        .unwrap_or(0);
    format!(
        "{column} > {lowest} AND {column} <= {highest} AND {} AND {}",
        above(column, after),
        at_most(column, upto)
    )
}

/// The tables that hold segments: the rollups of both levels (all a breakdown of whole
/// buckets reads) and the raw votes (for the cut buckets of a time range).
const SEGMENT_KINDS: [Kind; 3] = [
    Kind::Rollups(RollupLevel::Fresh),
    Kind::Rollups(RollupLevel::Settled),
    Kind::Votes,
];

impl Snapshot {
    async fn tally_by_partition(&self, poll_id: &str) -> Result<BTreeMap<u16, Tally>> {
        let totals = self
            .query(
                "SELECT log_partition, count(*), count(DISTINCT nullif(voter_key, '')), max(seq) \
                 FROM votes WHERE poll_id = $1 GROUP BY log_partition",
                vec![text(poll_id)],
            )
            .await?;
        let counts = self
            .query(
                "SELECT log_partition, opt, count(*) FROM \
                 (SELECT log_partition, unnest(choice) AS opt FROM votes WHERE poll_id = $1) \
                 GROUP BY log_partition, opt",
                vec![text(poll_id)],
            )
            .await?;
        let partition = |batches: &[RecordBatch]| -> Result<Vec<u16>> {
            u64s(batches, 0)?
                .into_iter()
                .map(|p| u16::try_from(p).map_err(storage))
                .collect()
        };
        let mut tallies = BTreeMap::new();
        for (((partition, ballots), voters), as_of) in partition(&totals)?
            .into_iter()
            .zip(u64s(&totals, 1)?)
            .zip(u64s(&totals, 2)?)
            .zip(u64s(&totals, 3)?)
        {
            let tally = Tally {
                ballots,
                unique_voters: voters,
                counts: BTreeMap::new(),
                as_of,
            };
            tallies.insert(partition, tally);
        }
        for ((partition, option), count) in partition(&counts)?
            .into_iter()
            .zip(strings(&counts, 1)?)
            .zip(u64s(&counts, 2)?)
        {
            tallies
                .entry(partition)
                .or_insert_with(Tally::default)
                .counts
                .insert(option, count);
        }
        Ok(tallies)
    }

    /// The highest `column` of a poll's rows of `table` (and `filter`) in each partition.
    async fn positions(
        &self,
        table: &str,
        column: &str,
        poll_id: &str,
        filter: &str,
    ) -> Result<Positions> {
        let rows = self
            .query(
                &format!(
                    "SELECT log_partition, max({column}) FROM {table} WHERE poll_id = $1{filter} \
                     GROUP BY log_partition"
                ),
                vec![text(poll_id)],
            )
            .await?;
        partition_positions(&rows)
    }

    /// `query` read from the dimension set `cube` (`None`: the whole segments) as `plan`
    /// says ([`BreakdownPlan::for_set`]).
    async fn breakdown(
        &self,
        query: &BreakdownQuery,
        cube: Option<CubeSet>,
        plan: BreakdownPlan,
    ) -> Result<Breakdown> {
        let (fresh_kind, settled_kind) = (
            Kind::Rollups(RollupLevel::Fresh),
            Kind::Rollups(RollupLevel::Settled),
        );
        // Every write holds the poll's totals rows, a few per write: the newest of each
        // level in each partition is how far the partition's rows of the level go.
        let totals = format!(" AND dims = '{TOTAL_SET}'");
        let settled = self
            .positions(settled_kind.table(), "last_seq", &query.poll_id, &totals)
            .await?;
        let fresh = self
            .positions(fresh_kind.table(), "last_seq", &query.poll_id, &totals)
            .await?;
        let covered = newer_positions(&settled, &fresh);
        let as_of = poll_as_of(&covered);
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
        let mut sums = GroupSums::default();
        // Both levels' rows of a dimension set (names are checked segment keys) in a range of
        // buckets, with `select` and `where` on top, then each row's ballots and answers:
        // added up here as they are read (see `add_rollups`).
        let rollups =
            |set: &str, select: &[String], filter: &str, buckets: (Option<i64>, Option<i64>)| {
                let buckets = range_clause("bucket_start", buckets);
                let mut columns = select.to_vec();
                columns.extend(["ballots", "answers", "answer_votes"].map(String::from));
                let columns = columns.join(", ");
                let level = |kind: Kind, positions: String| {
                    format!(
                        "SELECT {columns} FROM {} WHERE poll_id = $1 AND dims = '{set}' \
                         AND {positions} AND {buckets}{filter}",
                        kind.table()
                    )
                };
                format!(
                    "{} UNION ALL {}",
                    level(settled_kind, at_most("last_seq", &settled)),
                    level(fresh_kind, between("last_seq", &settled, &fresh)),
                )
            };
        if let Some(buckets) = plan.buckets {
            match cube {
                Some(set) if set.custom => {
                    // The set holds the key's non-empty values only; the votes without it
                    // are the totals less the rest, and filters apply after.
                    let poll = vec![text(&query.poll_id)];
                    let part = rollups(&set.dims, &select, "", buckets);
                    self.add_rollups(&part, poll.clone(), &mut sums).await?;
                    let mut totals = GroupSums::default();
                    let part = rollups(TOTAL_SET, &[], "", buckets);
                    self.add_rollups(&part, poll, &mut totals).await?;
                    sums.complete_custom(query, totals)?;
                }
                cube => {
                    let set = cube.map_or(String::new(), |set| set.dims);
                    let part = rollups(&set, &select, &filter, buckets);
                    self.add_rollups(&part, params.clone(), &mut sums).await?;
                }
            }
        }
        // The whole minutes a set kept per hour does not answer, from the whole segments.
        for range in &plan.segments {
            let part = rollups("", &select, &filter, *range);
            self.add_rollups(&part, params.clone(), &mut sums).await?;
        }
        if !plan.raw.is_empty() {
            let ranges: Vec<String> = plan
                .raw
                .iter()
                .map(|range| range_clause("received_ms", *range))
                .collect();
            select.push("unnest(array_prepend('', choice)) AS opt".into());
            let mut groups: Vec<String> = (0..dims).map(|i| format!("g{i}")).collect();
            groups.push("opt".into());
            let groups = groups.join(", ");
            let part = self
                .query(
                    &format!(
                        "SELECT {groups}, count(*) FROM (SELECT {} FROM votes \
                         WHERE poll_id = $1 AND {} AND ({}){filter}) \
                         GROUP BY {groups} LIMIT {BREAKDOWN_ROW_LIMIT}",
                        select.join(", "),
                        at_most("seq", &covered),
                        ranges.join(" OR "),
                    ),
                    params.clone(),
                )
                .await?;
            sums.add_rows(breakdown_rows(&part, dims)?)?;
        }
        Ok(sums.into_breakdown(as_of))
    }

    /// Adds the rollup rows `sql` selects to `sums`, a batch at a time as they are read: the
    /// group's values (`sums`' width of text columns), then `ballots`, `answers` and
    /// `answer_votes`. Added up here rather than by the engine: a group is one hash lookup
    /// per row, where the engine would unnest every row's answers and group by two text
    /// columns; and at most the groups are held, however many rows there are.
    async fn add_rollups(
        &self,
        sql: &str,
        params: Vec<ScalarValue>,
        sums: &mut GroupSums,
    ) -> Result<()> {
        let frame = self.ctx.sql(sql).await.map_err(storage)?;
        let frame = frame.with_param_values(params).map_err(storage)?;
        let mut batches = frame.execute_stream().await.map_err(storage)?;
        while let Some(batch) = batches.next().await {
            add_rollup_batch(&batch.map_err(storage)?, sums)?;
        }
        Ok(())
    }

    async fn timeseries(&self, query: &TimeseriesQuery) -> Result<Vec<TimePoint>> {
        let step = query.step_seconds.max(1);
        let mut filter = "poll_id = $1".to_owned();
        if let Some(from) = query.from_ms {
            filter.push_str(&format!(" AND window_start >= {}", from.max(0) / 1000));
        }
        if let Some(to) = query.to_ms {
            filter.push_str(&format!(" AND window_start < {}", to.max(0) / 1000));
        }
        let rows = self
            .query(
                &format!(
                    "SELECT (window_start / {step}) * {step} AS t, option, sum(votes) FROM vote_windows \
                     WHERE {filter} GROUP BY t, option ORDER BY t, option"
                ),
                vec![text(&query.poll_id)],
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

    /// Every (dimension, value) pair of the poll's votes and rollup rows: the six standard
    /// columns and the poll's own keys side by side, unnested together.
    async fn segment_values(
        &self,
        poll_id: &str,
        partition: u16,
    ) -> Result<BTreeMap<String, BTreeSet<String>>> {
        let names: Vec<String> = STANDARD_KEYS.iter().map(|k| format!("'{k}'")).collect();
        let segment = format!(
            "make_array({}) AS keys, make_array({}) AS vals, dim_keys, dim_values",
            names.join(", "),
            STANDARD_KEYS.join(", ")
        );
        let tables: Vec<String> = SEGMENT_KINDS
            .iter()
            .map(|kind| {
                format!(
                    "SELECT {segment} FROM {} WHERE poll_id = $1 AND log_partition = {partition}",
                    kind.table()
                )
            })
            .collect();
        let rows = self
            .query(
                &format!(
                    "SELECT DISTINCT k, v FROM (\
                     SELECT unnest(array_concat(keys, dim_keys)) AS k, \
                     unnest(array_concat(vals, dim_values)) AS v FROM ({})\
                     ) WHERE v <> ''",
                    tables.join(" UNION ALL ")
                ),
                vec![text(poll_id)],
            )
            .await?;
        let mut values: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (dimension, value) in strings(&rows, 0)?.into_iter().zip(strings(&rows, 1)?) {
            values.entry(dimension).or_default().insert(value);
        }
        Ok(values)
    }
}

/// `(group, answer, count)` rows of a breakdown part: `dims` group columns, then the
/// answer and its count.
fn breakdown_rows(part: &[RecordBatch], dims: usize) -> Result<Vec<BreakdownRow>> {
    Ok(group_keys(part, dims)?
        .into_iter()
        .zip(strings(part, dims)?)
        .zip(u64s(part, dims + 1)?)
        .map(|((group, answer), count)| (group, answer, count))
        .collect())
}

/// One batch of [`Snapshot::add_rollups`]: the columns before the last three are the
/// group's values.
fn add_rollup_batch(batch: &RecordBatch, sums: &mut GroupSums) -> Result<()> {
    let dims = batch
        .num_columns()
        .checked_sub(3)
        .ok_or_else(|| storage("a rollup read lacks its counts"))?;
    let as_text = |array: &ArrayRef| cast(array, &DataType::Utf8).map_err(storage);
    let groups: Vec<ArrayRef> = batch.columns()[..dims]
        .iter()
        .map(as_text)
        .collect::<Result<_>>()?;
    let groups: Vec<&StringArray> = groups.iter().map(|g| g.as_string::<i32>()).collect();
    let ballots = cast(batch.column(dims), &DataType::UInt64).map_err(storage)?;
    let ballots = ballots.as_primitive::<UInt64Type>();
    let (Some(answers), Some(votes)) = (
        batch.column(dims + 1).as_list_opt::<i32>(),
        batch.column(dims + 2).as_list_opt::<i32>(),
    ) else {
        return Err(storage("a rollup read's answers are not lists"));
    };
    let answer_names = as_text(answers.values())?;
    let answer_names = answer_names.as_string::<i32>();
    let answer_votes = cast(votes.values(), &DataType::UInt64).map_err(storage)?;
    let answer_votes = answer_votes.as_primitive::<UInt64Type>();
    let (names_at, votes_at) = (answers.value_offsets(), votes.value_offsets());
    let mut values: Vec<&str> = Vec::with_capacity(dims);
    for row in 0..batch.num_rows() {
        values.clear();
        values.extend(
            groups
                .iter()
                .map(|g| if g.is_null(row) { "" } else { g.value(row) }),
        );
        let mut group = sums.group(&values)?;
        group.add("", ballots.value(row));
        let names = names_at[row] as usize..names_at[row + 1] as usize;
        let counts = votes_at[row] as usize..votes_at[row + 1] as usize;
        for (name, count) in names.zip(counts) {
            group.add(answer_names.value(name), answer_votes.value(count));
        }
    }
    Ok(())
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

/// The segment filters of a breakdown as ` AND` clauses, one `IN` list per dimension, with
/// their parameters (`$1` is the poll id). An `IN` list is one flat expression however many
/// values it holds, and runs as a hash lookup; a chain of `OR`s would be as deep as it is
/// long for the planner to walk through.
fn segment_filter(query: &BreakdownQuery) -> Result<(String, Vec<ScalarValue>)> {
    let mut params = vec![text(&query.poll_id)];
    let mut filter = String::new();
    for (dimension, values) in &query.filters {
        let expr = dimension_expr(dimension)?;
        if values.is_empty() {
            filter.push_str(" AND false");
            continue;
        }
        let mut placeholders = Vec::with_capacity(values.len());
        for value in values {
            params.push(text(value));
            placeholders.push(format!("${}", params.len()));
        }
        filter.push_str(&format!(" AND {expr} IN ({})", placeholders.join(", ")));
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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::warehouse::columns;

    #[test]
    fn filters_are_one_in_list_per_dimension() {
        let query = BreakdownQuery {
            poll_id: "p".into(),
            filters: vec![
                (
                    Dimension("country".into()),
                    vec!["DE".into(), "FR".into(), "IT".into()],
                ),
                (Dimension("plan".into()), vec!["pro".into()]),
                (Dimension("device".into()), vec![]),
            ],
            ..Default::default()
        };
        let (filter, params) = segment_filter(&query).unwrap();
        assert_eq!(
            filter,
            " AND country IN ($2, $3, $4) \
             AND coalesce(dim_values[CAST(array_position(dim_keys, 'plan') AS BIGINT)], '') IN ($5) \
             AND false"
        );
        assert_eq!(
            params,
            ["p", "DE", "FR", "IT", "pro"].map(text),
            "the poll id, then each value once"
        );
    }

    #[test]
    fn a_range_between_positions_covers_every_partition_it_reads() {
        let positions = |pairs: &[(u16, u64)]| pairs.iter().copied().collect::<Positions>();
        // Partition 2 has no lower bound: the range starts at 0 for it; partition 5 has one
        // but no upper bound, so it reads nothing and does not narrow the range.
        let condition = between(
            "last_seq",
            &positions(&[(1, 40), (5, 90)]),
            &positions(&[(1, 70), (2, 20)]),
        );
        assert!(
            condition.starts_with("last_seq > 0 AND last_seq <= 70 AND "),
            "{condition}"
        );
        let condition = between("last_seq", &positions(&[(1, 40)]), &positions(&[(1, 70)]));
        assert!(
            condition.starts_with("last_seq > 40 AND last_seq <= 70 AND "),
            "{condition}"
        );
        assert_eq!(
            between("last_seq", &positions(&[(1, 40)]), &positions(&[])),
            "false"
        );
    }

    /// 300 votes of poll `p`, countries `C0` to `C299`, as the in-memory rows of `votes`.
    fn votes_view() -> TableView {
        let schema = columns::votes_schema();
        let votes = columns::test_votes(300, |i| format!("C{i}"));
        let batch = columns::votes_batch(&schema, 0, &votes).unwrap();
        TableView {
            kind: Kind::Votes,
            schema,
            files: Vec::new(),
            batches: vec![batch],
        }
    }

    /// The attack on breakdown filters without the IN list that now defuses it: a chain of
    /// 1,000 ORs, planned and run through the warehouse's query path on a thread with the
    /// stack of a Tokio worker (2 MiB) and a runtime of its own. DataFusion's planner recurses
    /// once per term; without `recursive_protection` growing the stack, a breakdown with
    /// two 100-term chains aborted the whole test process on such a stack. An error would do
    /// as well as an answer: what must not happen is the abort.
    ///
    /// Not less stack, nor a longer chain: the derived `Clone` and `Drop` of DataFusion's
    /// expressions recurse too, unprotected, over a kilobyte a level in this unoptimised build
    /// (and the query threads have 8 MiB for them). Our own statements are never deep:
    /// filters are IN lists, and at most one per dimension.
    #[test]
    fn a_deep_or_chain_does_not_overflow_a_worker_sized_stack() {
        let chain: Vec<String> = (0..1_000).map(|i| format!("country = 'C{i}'")).collect();
        let sql = format!(
            "SELECT count(*) FROM votes WHERE poll_id = 'p' AND ({})",
            chain.join(" OR ")
        );
        let answer = std::thread::Builder::new()
            .name("worker-sized-stack".into())
            .stack_size(2 * 1024 * 1024)
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let snapshot = Snapshot::open(vec![votes_view()], read_runtime()?).await?;
                    let rows = snapshot.query(&sql, Vec::new()).await?;
                    u64s(&rows, 0)
                })
            })
            .unwrap()
            .join()
            .expect("the query thread did not panic");
        match answer {
            Ok(counts) => assert_eq!(counts, [300], "every vote matches one term"),
            Err(err) => eprintln!("the deep OR chain was refused: {}", err.chain()),
        }
    }
}
