//! The analysts' tables in standalone: DataFusion views over the votes table — its Parquet
//! files *and* its in-memory tail, so a query sees every counted vote — and the poll
//! definitions the query service records.
//!
//! Poll definitions are held in memory only: the registry is their durable home, and the
//! query service records every poll it holds when it starts, then every change, before it
//! serves SQL. Votes are read from a snapshot of the votes table taken under the tables'
//! lock, so one query sees each partition as of one position (its watermark then).
//!
//! A query runs in a session of its own — only the analyst tables in it (the votes table
//! that they are views of is removed from the session once they are made), drawing on one
//! memory pool of `max_memory_bytes` that all running analyst queries share, with spilling
//! to disk off — on the warehouse's query runtime, and
//! streams its batches through a small channel: the caller's memory stays flat whatever it
//! returns, the wall-time limit cancels the query where it stands, and dropping the answer
//! cancels it too.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow::array::Int32Array;
use arrow::array::{
    ArrayRef, ListBuilder, RecordBatch, StringArray, StringBuilder, TimestampSecondArray,
    UInt16Array, UInt32Array, UInt64Array, UInt8Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::MemTable;
use datafusion::execution::context::{SessionConfig, SessionContext};
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{GreedyMemoryPool, MemoryPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::{execute_stream, ExecutionPlan};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use futures::StreamExt;
use tally_core::analyst::{self, Limit, SqlLimits};
use tally_core::poll::Poll;
use tally_core::ports::{AnalystRows, BoxStream};
use tally_core::{Error, Result};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::AbortOnDropHandle;

use super::files::DataFile;
use super::sql::{register_tables, TableView};
use super::{storage, Inner, Kind};

/// Batches a query may have made and the caller not yet taken: with the batch in the
/// sender's hands and the one being made, what one answer holds in memory at a time.
const IN_FLIGHT_BATCHES: usize = 2;

/// Rows per batch of the analyst sessions.
const BATCH_ROWS: usize = 8192;

/// The views over `votes`, in the column order of [`analyst::TABLES`]. They read the
/// columns they change under other names first: a view naming an output like one of its
/// inputs is ambiguous to DataFusion.
const VOTES_RENAMED: &str = "(SELECT *, voter_key AS stored_voter_key, received_ms AS stored_ms, \
     choice AS stored_choice FROM votes)";

fn received() -> &'static str {
    "arrow_cast(stored_ms / 1000, 'Timestamp(Second, Some(\"UTC\"))') AS received_at, \
     arrow_cast(stored_ms, 'UInt64') AS received_ms"
}

const SEGMENT: &str = "campaign, channel, source, medium, country, device";

fn ballots_view() -> String {
    format!(
        "SELECT poll_id, vote_id, log_partition, seq, nullif(stored_voter_key, '') AS voter_key, {}, \
         CASE WHEN value IS NULL AND array_length(stored_choice) = 1 THEN stored_choice[1] END AS choice, \
         stored_choice AS choices, value AS rating, {SEGMENT} FROM {VOTES_RENAMED}",
        received()
    )
}

fn answers_view() -> String {
    format!(
        "SELECT poll_id, vote_id, log_partition, seq, nullif(stored_voter_key, '') AS voter_key, {}, \
         unnest(stored_choice) AS option_id, {SEGMENT} FROM {VOTES_RENAMED}",
        received()
    )
}

const BALLOT_DIMENSIONS_VIEW: &str = "SELECT poll_id, vote_id, log_partition, seq, \
     unnest(dim_keys) AS dimension, unnest(dim_values) AS value FROM votes";

/// A poll's counted ballots as [`analyst::ballot_schema`] columns.
const BALLOTS_OF_POLL: &str = "SELECT seq, vote_id, nullif(voter_key, '') AS voter_key, \
     received_ms, choice, value, campaign, channel, source, medium, country, device, \
     dim_keys, dim_values FROM votes WHERE poll_id = $1";

/// What a query sends before its batches.
struct Head {
    schema: SchemaRef,
    as_of: u64,
    /// The positions the rows are exact as of, when the work learns them.
    positions: BTreeMap<u16, u64>,
}

impl Inner {
    /// Keeps the newest version of each poll.
    pub(super) fn record_polls(&self, polls: &[Poll]) {
        let mut held = self.polls.write().expect("polls lock");
        for poll in polls {
            let newer = held
                .get(&poll.id)
                .is_none_or(|known| known.version <= poll.version);
            if newer {
                held.insert(poll.id.clone(), Arc::new(poll.clone()));
            }
        }
    }

    /// The votes table as of now, and each partition's position in it, under one lock.
    fn votes_now(&self) -> (TableView, BTreeMap<u16, u64>) {
        let tables = self.tables.read().expect("warehouse lock");
        let votes = &tables[&Kind::Votes];
        let view = TableView {
            kind: Kind::Votes,
            schema: self.schema(Kind::Votes).clone(),
            files: votes.files.clone(),
            batches: votes
                .tails
                .values()
                .flat_map(|t| t.batches.iter().cloned())
                .collect(),
        };
        let positions = votes.marks.iter().map(|(p, seq)| (*p, *seq)).collect();
        (view, positions)
    }

    pub(super) async fn analyst_sql(
        self: &Arc<Self>,
        sql: &str,
        limits: &SqlLimits,
    ) -> Result<AnalystRows> {
        let query = analyst::vet::vet(sql, &GenericDialect {}).map_err(Error::Invalid)?;
        let (votes, positions) = self.votes_now();
        let polls: Vec<Arc<Poll>> = self
            .polls
            .read()
            .expect("polls lock")
            .values()
            .cloned()
            .collect();
        let limits = *limits;
        let as_of = positions.values().copied().max().unwrap_or(0);
        let statement = DfStatement::Statement(Box::new(Statement::Query(Box::new(query))));
        let run = move |head: oneshot::Sender<Head>,
                        out: mpsc::Sender<Result<RecordBatch>>,
                        rows_read: Arc<AtomicU64>| async move {
            let ctx = analyst_session(&limits)?;
            let _files = register_analyst_tables(&ctx, votes, &polls).await?;
            let plan = ctx
                .state()
                .statement_to_plan(statement)
                .await
                .map_err(|err| sql_error(err, &limits))?;
            if matches!(
                plan,
                LogicalPlan::Ddl(_)
                    | LogicalPlan::Dml(_)
                    | LogicalPlan::Copy(_)
                    | LogicalPlan::Statement(_)
                    | LogicalPlan::DescribeTable(_)
                    | LogicalPlan::Explain(_)
                    | LogicalPlan::Analyze(_)
            ) {
                return Err(Error::Invalid(analyst::not_allowed(
                    "only a query runs here",
                )));
            }
            let physical = ctx
                .state()
                .create_physical_plan(&plan)
                .await
                .map_err(|err| sql_error(err, &limits))?;
            let stream = execute_stream(physical.clone(), ctx.task_ctx())
                .map_err(|err| sql_error(err, &limits))?;
            let _ = head.send(Head {
                schema: physical.schema(),
                as_of,
                positions: BTreeMap::new(),
            });
            let mut taken = Taken::default();
            pump(stream, &out, |batch| taken.add(batch, &limits), &limits).await;
            rows_read.store(leaf_rows(physical.as_ref()), Ordering::Release);
            Ok(())
        };
        let mut rows = self.stream(limits.max_time, run).await?;
        rows.positions = positions;
        Ok(rows)
    }

    pub(super) async fn ballots(self: &Arc<Self>, poll_id: &str) -> Result<AnalystRows> {
        let (votes, _) = self.votes_now();
        let poll_id = poll_id.to_owned();
        let unlimited = SqlLimits {
            max_rows: u64::MAX,
            max_result_bytes: u64::MAX,
            ..SqlLimits::default()
        };
        let run = move |head: oneshot::Sender<Head>,
                        out: mpsc::Sender<Result<RecordBatch>>,
                        rows_read: Arc<AtomicU64>| async move {
            let ctx = SessionContext::new_with_config(
                SessionConfig::new()
                    .with_target_partitions(2)
                    .with_batch_size(BATCH_ROWS),
            );
            let _files = register_tables(&ctx, vec![votes]).await?;
            let poll = || vec![ScalarValue::Utf8(Some(poll_id.clone()))];
            let last = ctx
                .sql(
                    "SELECT log_partition, max(seq) FROM votes WHERE poll_id = $1 \
                     GROUP BY log_partition",
                )
                .await
                .and_then(|frame| frame.with_param_values(poll()))
                .map_err(storage)?
                .collect()
                .await
                .map_err(storage)?;
            let positions = super::sql::partition_positions(&last)?;
            let frame = ctx
                .sql(BALLOTS_OF_POLL)
                .await
                .and_then(|frame| frame.with_param_values(poll()))
                .map_err(storage)?;
            let physical = frame.create_physical_plan().await.map_err(storage)?;
            let stream = execute_stream(physical.clone(), ctx.task_ctx()).map_err(storage)?;
            let schema = analyst::ballot_schema();
            let _ = head.send(Head {
                schema: schema.clone(),
                as_of: tally_core::ports::poll_as_of(&positions),
                positions,
            });
            let reshape = move |batch: RecordBatch| as_ballots(&schema, batch);
            pump(stream, &out, reshape, &unlimited).await;
            rows_read.store(leaf_rows(physical.as_ref()), Ordering::Release);
            Ok(())
        };
        // An export may stream for minutes: no time limit but the caller's.
        self.stream(std::time::Duration::MAX, run).await
    }

    /// Runs `run` on the query runtime and answers with its head and a stream of what it
    /// sends: an error before the head is this call's error, one after it ends the stream.
    /// The work stops when `max_time` runs out (a `max_time` problem) or the answer is
    /// dropped.
    async fn stream<F, Fut>(
        self: &Arc<Self>,
        max_time: std::time::Duration,
        run: F,
    ) -> Result<AnalystRows>
    where
        F: FnOnce(oneshot::Sender<Head>, mpsc::Sender<Result<RecordBatch>>, Arc<AtomicU64>) -> Fut
            + Send
            + 'static,
        Fut: std::future::Future<Output = Result<()>> + Send + 'static,
    {
        let (head_tx, head_rx) = oneshot::channel();
        let (out_tx, out_rx) = mpsc::channel(IN_FLIGHT_BATCHES);
        let rows_read = Arc::new(AtomicU64::new(0));
        let work = run(head_tx, out_tx, rows_read.clone());
        let inner = Arc::clone(self);
        let task = tokio::spawn(async move {
            inner
                .executor
                .run(async move {
                    // Dropping `work` at the deadline cancels DataFusion's tasks where they
                    // stand; the error is the call's answer before the head, and ends the
                    // stream after it.
                    tokio::time::timeout(max_time, work)
                        .await
                        .unwrap_or_else(|_| {
                            Err(Error::Invalid(Limit::Time.exceeded(&SqlLimits {
                                max_time,
                                ..SqlLimits::default()
                            })))
                        })
                })
                .await
        });
        let mut task = AbortOnDropHandle::new(task);
        let head = match head_rx.await {
            Ok(head) => head,
            Err(_) => {
                // The work ended without a head: its answer says why.
                return Err(match (&mut task).await {
                    Ok(Err(err)) => err,
                    Ok(Ok(())) => {
                        Error::failed("embedded warehouse query", "ended without an answer")
                    }
                    Err(err) => Error::failed("embedded warehouse query", err),
                });
            }
        };
        Ok(AnalystRows {
            schema: head.schema,
            as_of: head.as_of,
            positions: head.positions,
            batches: batches(out_rx, task),
            rows_read,
        })
    }
}

/// The batches `out` receives, then the work's own error if it ended in one (a panic, a
/// time limit hit while the channel was full) — never a silent early end.
fn batches(
    out: mpsc::Receiver<Result<RecordBatch>>,
    task: AbortOnDropHandle<Result<()>>,
) -> BoxStream<Result<RecordBatch>> {
    let state = (out, Some(task));
    Box::pin(futures::stream::unfold(
        state,
        |(mut out, task)| async move {
            if let Some(item) = out.recv().await {
                return Some((item, (out, task)));
            }
            let outcome = task?.await;
            let error = match outcome {
                Ok(Ok(())) => return None,
                Ok(Err(err)) => err,
                Err(err) => Error::failed("embedded warehouse query", err),
            };
            Some((Err(error), (out, None)))
        },
    ))
}

/// Sends each batch of `stream`, passed through `each` (which may refuse it), to `out`;
/// stops at the first error, which it sends too, or when nobody listens.
async fn pump(
    mut stream: datafusion::execution::SendableRecordBatchStream,
    out: &mpsc::Sender<Result<RecordBatch>>,
    mut each: impl FnMut(RecordBatch) -> Result<RecordBatch>,
    limits: &SqlLimits,
) {
    while let Some(batch) = stream.next().await {
        let item = batch
            .map_err(|err| sql_error(err, limits))
            .and_then(&mut each);
        let failed = item.is_err();
        if out.send(item).await.is_err() || failed {
            return;
        }
    }
}

/// Rows and bytes of an answer so far, against its limits.
#[derive(Default)]
struct Taken {
    rows: u64,
    bytes: u64,
}

impl Taken {
    fn add(&mut self, batch: RecordBatch, limits: &SqlLimits) -> Result<RecordBatch> {
        self.rows += batch.num_rows() as u64;
        self.bytes += batch.get_array_memory_size() as u64;
        if self.rows > limits.max_rows {
            return Err(Error::Invalid(Limit::Rows.exceeded(limits)));
        }
        if self.bytes > limits.max_result_bytes {
            return Err(Error::Invalid(Limit::ResultBytes.exceeded(limits)));
        }
        Ok(batch)
    }
}

/// A batch of [`BALLOTS_OF_POLL`] as [`analyst::ballot_schema`] rows (the same columns;
/// types cast where the engine chose another encoding of them).
fn as_ballots(schema: &SchemaRef, batch: RecordBatch) -> Result<RecordBatch> {
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| {
            if column.data_type() == field.data_type() {
                Ok(column.clone())
            } else {
                arrow::compute::cast(column, field.data_type()).map_err(storage)
            }
        })
        .collect::<Result<_>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(storage)
}

/// Rows read by the plan: what its leaves (the scans) put out. A scan of batches in memory
/// (the tail, the poll definitions) counts none in its metrics; it reads every row it holds.
fn leaf_rows(plan: &dyn ExecutionPlan) -> u64 {
    let children = plan.children();
    if children.is_empty() {
        let counted = plan
            .metrics()
            .and_then(|metrics| metrics.output_rows())
            .unwrap_or(0);
        let plan_any: &dyn std::any::Any = plan;
        let held: usize = plan_any
            .downcast_ref::<DataSourceExec>()
            .and_then(|scan| {
                let source: &dyn std::any::Any = scan.data_source().as_ref();
                source.downcast_ref::<MemorySourceConfig>()
            })
            .map(|memory| {
                memory
                    .partitions()
                    .iter()
                    .flatten()
                    .map(RecordBatch::num_rows)
                    .sum()
            })
            .unwrap_or(0);
        return counted.max(held) as u64;
    }
    children.iter().map(|child| leaf_rows(child.as_ref())).sum()
}

/// The memory pool every analyst query of the process draws from, one per size of
/// `max_memory_bytes` (one in practice: the service's limit). Shared, so the limit bounds
/// what all running queries hold together: a pool per query would let a hundred concurrent
/// queries hold a hundred times the limit, and the process run out of memory.
fn shared_pool(bytes: u64) -> Arc<dyn MemoryPool> {
    static POOLS: std::sync::Mutex<BTreeMap<u64, Arc<dyn MemoryPool>>> =
        std::sync::Mutex::new(BTreeMap::new());
    let mut pools = POOLS.lock().expect("analyst memory pools");
    pools
        .entry(bytes)
        .or_insert_with(|| {
            let size = usize::try_from(bytes).unwrap_or(usize::MAX);
            Arc::new(GreedyMemoryPool::new(size))
        })
        .clone()
}

/// A session for one analyst query: the shared memory pool, no spilling, batches of
/// [`BATCH_ROWS`].
fn analyst_session(limits: &SqlLimits) -> Result<SessionContext> {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(shared_pool(limits.max_memory_bytes))
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build_arc()
        .map_err(storage)?;
    let config = SessionConfig::new()
        .with_target_partitions(2)
        .with_batch_size(BATCH_ROWS)
        .with_information_schema(false);
    Ok(SessionContext::new_with_config_rt(config, runtime))
}

/// Makes the analyst tables in `ctx`: views over `votes`, and the polls as tables. The
/// votes table itself is gone from the session afterwards (the views hold it).
async fn register_analyst_tables(
    ctx: &SessionContext,
    votes: TableView,
    polls: &[Arc<Poll>],
) -> Result<Vec<Arc<DataFile>>> {
    let files = register_tables(ctx, vec![votes]).await?;
    for (name, sql) in [
        ("ballots", ballots_view()),
        ("answers", answers_view()),
        ("ballot_dimensions", BALLOT_DIMENSIONS_VIEW.to_owned()),
    ] {
        let view = ctx.sql(&sql).await.map_err(storage)?.into_view();
        ctx.register_table(name, view).map_err(storage)?;
    }
    ctx.deregister_table(Kind::Votes.table()).map_err(storage)?;
    let now = tally_core::time::now_ms();
    for (name, batch) in [
        ("polls", polls_batch(polls, now)?),
        ("poll_options", poll_options_batch(polls)?),
    ] {
        let table = MemTable::try_new(batch.schema(), vec![vec![batch]]).map_err(storage)?;
        ctx.register_table(name, Arc::new(table)).map_err(storage)?;
    }
    Ok(files)
}

/// An engine error as the analyst's problem: their query's fault (`sql-invalid`, with the
/// engine's message), a limit (`sql-limit-exceeded`), or the warehouse's own.
fn sql_error(err: DataFusionError, limits: &SqlLimits) -> Error {
    match err.find_root() {
        DataFusionError::ResourcesExhausted(_) => Error::Invalid(Limit::Memory.exceeded(limits)),
        DataFusionError::Plan(_)
        | DataFusionError::SQL(_, _)
        | DataFusionError::SchemaError(_, _)
        | DataFusionError::NotImplemented(_)
        | DataFusionError::Execution(_)
        | DataFusionError::ArrowError(_, _)
        | DataFusionError::Configuration(_) => {
            Error::Invalid(analyst::invalid(err.find_root().to_string()))
        }
        _ => storage(err),
    }
}

fn text_list_field() -> Arc<Field> {
    Arc::new(Field::new_list_field(DataType::Utf8, true))
}

fn seconds(ms: Option<i64>) -> Option<i64> {
    ms.map(|ms| ms.div_euclid(1000))
}

/// The `polls` table ([`analyst::POLLS`]), with each poll's status as of `now_ms`.
fn polls_batch(polls: &[Arc<Poll>], now_ms: i64) -> Result<RecordBatch> {
    let text = |f: &dyn Fn(&Poll) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(polls.iter().map(|p| f(p))))
    };
    let time = |f: &dyn Fn(&Poll) -> Option<i64>| -> ArrayRef {
        Arc::new(
            TimestampSecondArray::from_iter(polls.iter().map(|p| seconds(f(p))))
                .with_timezone("UTC"),
        )
    };
    let mut dimensions = ListBuilder::new(StringBuilder::new()).with_field(text_list_field());
    for poll in polls {
        for dimension in &poll.dimensions {
            dimensions.values().append_value(dimension);
        }
        dimensions.append(true);
    }
    let scales: Vec<Option<(i32, i32)>> = polls
        .iter()
        .map(|p| p.effective_scale().map(|s| (s.min, s.max)))
        .collect();
    let columns: Vec<ArrayRef> = vec![
        text(&|p| p.id.clone()),
        text(&|p| p.title.clone()),
        text(&|p| p.question.clone()),
        text(&|p| analyst::name_of(&p.kind)),
        Arc::new(StringArray::from_iter(
            polls.iter().map(|p| p.campaign.clone()),
        )),
        text(&|p| analyst::name_of(&p.status(now_ms))),
        text(&|p| analyst::name_of(&p.dedupe)),
        text(&|p| analyst::name_of(&p.results_visibility)),
        Arc::new(UInt8Array::from_iter_values(
            polls.iter().map(|p| u8::from(p.require_token)),
        )),
        Arc::new(UInt32Array::from_iter(polls.iter().map(|p| p.max_choices))),
        Arc::new(Int32Array::from_iter(scales.iter().map(|s| s.map(|s| s.0)))),
        Arc::new(Int32Array::from_iter(scales.iter().map(|s| s.map(|s| s.1)))),
        Arc::new(dimensions.finish()),
        time(&|p| Some(p.created_at)),
        time(&|p| Some(p.updated_at)),
        time(&|p| p.opens_at),
        time(&|p| p.closes_at),
        time(&|p| p.closed_at),
        time(&|p| p.archived_at),
        Arc::new(UInt64Array::from_iter_values(
            polls.iter().map(|p| p.version),
        )),
        Arc::new(UInt16Array::from_iter_values(
            polls.iter().map(|p| p.spread),
        )),
    ];
    RecordBatch::try_new(schema_of(&analyst::POLLS), columns).map_err(storage)
}

/// The `poll_options` table ([`analyst::POLL_OPTIONS`]): every answer a poll counts (its
/// options, or each value of its scale), in the poll's order from 1.
fn poll_options_batch(polls: &[Arc<Poll>]) -> Result<RecordBatch> {
    let mut poll_ids = Vec::new();
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    let mut positions = Vec::new();
    for poll in polls {
        for (position, (id, label)) in poll.answer_keys().into_iter().enumerate() {
            poll_ids.push(poll.id.clone());
            ids.push(id);
            labels.push(label);
            positions.push(position as u32 + 1);
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(poll_ids)),
        Arc::new(StringArray::from(ids)),
        Arc::new(StringArray::from(labels)),
        Arc::new(UInt32Array::from(positions)),
    ];
    RecordBatch::try_new(schema_of(&analyst::POLL_OPTIONS), columns).map_err(storage)
}

/// The Arrow schema of an analyst table, from its portable column types.
fn schema_of(table: &analyst::Table) -> SchemaRef {
    let fields: Vec<Field> = table
        .columns
        .iter()
        .map(|column| {
            let data_type = match column.ty {
                "string" => DataType::Utf8,
                "uint8" => DataType::UInt8,
                "uint16" => DataType::UInt16,
                "uint32" => DataType::UInt32,
                "uint64" => DataType::UInt64,
                "int32" => DataType::Int32,
                "timestamp" => analyst::timestamp_type(),
                "array(string)" => DataType::List(text_list_field()),
                other => unreachable!("no analyst column has type {other}"),
            };
            Field::new(column.name, data_type, column.nullable)
        })
        .collect();
    Arc::new(Schema::new(fields))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::execution::memory_pool::MemoryConsumer;

    /// Two analyst sessions draw on one pool: what one query holds, another cannot take, so
    /// concurrent queries together stay within `max_memory_bytes`.
    #[test]
    fn concurrent_queries_share_one_memory_limit() {
        // A size no other test uses, so this pool is this test's alone.
        let limits = SqlLimits {
            max_memory_bytes: 3_000_017,
            ..SqlLimits::default()
        };
        let first = analyst_session(&limits).unwrap();
        let second = analyst_session(&limits).unwrap();
        let held = MemoryConsumer::new("first query").register(&first.runtime_env().memory_pool);
        held.try_grow(2_000_000).expect("the first query fits");
        let wanted =
            MemoryConsumer::new("second query").register(&second.runtime_env().memory_pool);
        assert!(
            wanted.try_grow(2_000_000).is_err(),
            "two queries held more than the limit together"
        );
        drop(held);
        wanted
            .try_grow(2_000_000)
            .expect("memory comes back when the first query ends");
    }
}
