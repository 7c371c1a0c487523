//! Tumbling-window aggregation of a micro-batch with DataFusion.
//!
//! The aggregation is planned once, when the engine starts: its SQL is parsed, optimised and
//! turned into a physical plan over a streaming table whose only stream is the micro-batch
//! at hand. Each batch then runs a fresh copy of that plan (new metrics, no state carried
//! over), so a batch pays for the aggregation and not for planning it again.
//!
//! DataFusion runs on its own thread with its own single-threaded runtime, so aggregation
//! never stalls the runtime that serves requests and drives the pipeline. The thread
//! belongs to the process's [`Tasks`]; it ends once every handle on the engine is gone (the
//! partition workers have finished their last batch).

use std::sync::{Arc, Mutex};

use arrow::array::{ArrayBuilder, AsArray, Int64Builder, RecordBatch, StringBuilder};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{collect, ExecutionPlan, SendableRecordBatchStream};
use datafusion::prelude::{SessionConfig, SessionContext};
use tally_core::ports::WindowRow;
use tally_service::Tasks;
use tokio::sync::{mpsc, oneshot};

use crate::{Error, Result};

/// The answers of a micro-batch's votes, one row per (vote, chosen option): the unit a
/// window counts. Built with [`Picks::push`], handed to the engine as one [`PickBatch`].
#[derive(Default)]
pub struct Picks {
    polls: StringBuilder,
    received_ms: Int64Builder,
    options: StringBuilder,
}

impl Picks {
    /// One answer: `option`, chosen in a vote on `poll_id` received at `received_ms`.
    pub fn push(&mut self, poll_id: &str, received_ms: i64, option: &str) {
        self.polls.append_value(poll_id);
        self.received_ms.append_value(received_ms);
        self.options.append_value(option);
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many answers it holds.
    pub fn len(&self) -> usize {
        self.received_ms.len()
    }

    /// The answers as the batch the plan reads.
    pub fn finish(mut self) -> PickBatch {
        let batch = RecordBatch::try_new(
            picks_schema(),
            vec![
                Arc::new(self.polls.finish()),
                Arc::new(self.received_ms.finish()),
                Arc::new(self.options.finish()),
            ],
        )
        .expect("three columns of equal length, as the schema says");
        PickBatch(batch)
    }
}

/// A finished [`Picks`]: an Arrow batch of the schema the window plan was made for, which
/// only [`Picks::finish`] builds. Cloning it shares the columns.
#[derive(Clone)]
pub struct PickBatch(RecordBatch);

fn picks_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("poll_id", DataType::Utf8, false),
        Field::new("received_ms", DataType::Int64, false),
        Field::new("option", DataType::Utf8, false),
    ]))
}

type Job = (
    PickBatch,
    oneshot::Sender<Result<Vec<(String, i64, String, u64)>>>,
);

#[derive(Clone)]
pub struct WindowEngine {
    jobs: mpsc::Sender<Job>,
    window_seconds: u32,
}

impl WindowEngine {
    pub fn start(window_seconds: u32, tasks: &Tasks) -> Result<Self> {
        let window_seconds = window_seconds.max(1);
        let (jobs, mut queue) = mpsc::channel::<Job>(4);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Window(e.into()))?;
        // Not stopped by the token: it drains the jobs of workers finishing their last batch
        // and ends when the last of them drops its handle.
        tasks
            .spawn_thread("windows", move |_cancel| {
                runtime.block_on(async move {
                    // The query is fixed, so planning it cannot fail unless DataFusion
                    // itself does; then every batch gets the reason (its worker logs it and
                    // retries) rather than the thread ending.
                    let plan = Plan::new(window_seconds).await.map_err(|e| e.to_string());
                    while let Some((picks, reply)) = queue.recv().await {
                        let result = match &plan {
                            Ok(plan) => plan.aggregate(picks).await,
                            Err(reason) => Err(Error::Window(
                                format!("the window query could not be planned: {reason}").into(),
                            )),
                        };
                        let _ = reply.send(result);
                    }
                });
            })
            .map_err(|e| Error::Window(e.into()))?;
        Ok(WindowEngine {
            jobs,
            window_seconds,
        })
    }

    /// Counts picks per (poll, window, option); every row covers the log up to `last_seq`.
    pub async fn windows(&self, picks: PickBatch, last_seq: u64) -> Result<Vec<WindowRow>> {
        if picks.0.num_rows() == 0 {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send((picks, reply))
            .await
            .map_err(|_| Error::Window("window engine stopped".into()))?;
        let counts = answer
            .await
            .map_err(|_| Error::Window("window engine stopped".into()))??;
        Ok(counts
            .into_iter()
            .map(|(poll_id, window_start, option, votes)| WindowRow {
                poll_id,
                window_start,
                window_seconds: self.window_seconds,
                option,
                votes,
                last_seq,
            })
            .collect())
    }
}

/// The one stream of the `picks` table: the batch being aggregated, handed over by
/// [`Plan::aggregate`] and taken by the plan's scan. Only the engine's thread uses it, one
/// batch at a time.
#[derive(Debug)]
struct CurrentBatch {
    schema: SchemaRef,
    batch: Mutex<Option<RecordBatch>>,
}

impl PartitionStream for CurrentBatch {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batch = self.batch.lock().expect("picks slot").take();
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::stream::iter(batch.map(Ok)),
        ))
    }
}

/// The window aggregation, planned once.
struct Plan {
    current: Arc<CurrentBatch>,
    physical: Arc<dyn ExecutionPlan>,
    task: Arc<TaskContext>,
}

impl Plan {
    async fn new(window_seconds: u32) -> Result<Plan> {
        let df_err = |e: DataFusionError| Error::Window(e.into());
        let config = SessionConfig::new()
            .with_target_partitions(1)
            .with_batch_size(8192);
        let ctx = SessionContext::new_with_config(config);
        let schema = picks_schema();
        let current = Arc::new(CurrentBatch {
            schema: schema.clone(),
            batch: Mutex::new(None),
        });
        let table = StreamingTable::try_new(schema, vec![current.clone()]).map_err(df_err)?;
        ctx.register_table("picks", Arc::new(table))
            .map_err(df_err)?;
        let w = window_seconds as i64;
        let sql = format!(
            "SELECT poll_id, (received_ms / 1000 / {w}) * {w} AS window_start, option, COUNT(*) AS votes \
             FROM picks GROUP BY poll_id, (received_ms / 1000 / {w}) * {w}, option"
        );
        let physical = ctx
            .sql(&sql)
            .await
            .map_err(df_err)?
            .create_physical_plan()
            .await
            .map_err(df_err)?;
        Ok(Plan {
            current,
            physical,
            task: ctx.task_ctx(),
        })
    }

    async fn aggregate(&self, picks: PickBatch) -> Result<Vec<(String, i64, String, u64)>> {
        let df_err = |e: DataFusionError| Error::Window(e.into());
        *self.current.batch.lock().expect("picks slot") = Some(picks.0);
        // A fresh copy of the plan for each run: operators keep metrics (and may keep
        // state) per execution, which must neither pile up nor carry over.
        let run = async {
            let plan = reset_plan_states(self.physical.clone())?;
            collect(plan, self.task.clone()).await
        }
        .await;
        // A run that failed before its scan started must not leave its batch for the next.
        self.current.batch.lock().expect("picks slot").take();
        let batches = run.map_err(df_err)?;

        let mut rows = Vec::new();
        for batch in batches {
            // The plan's output types, cast in case a DataFusion release widens one.
            let column = |i: usize, to: &DataType| {
                cast(batch.column(i), to).map_err(|e| Error::Window(e.into()))
            };
            let (polls, starts) = (column(0, &DataType::Utf8)?, column(1, &DataType::Int64)?);
            let (options, votes) = (column(2, &DataType::Utf8)?, column(3, &DataType::Int64)?);
            let (polls, options) = (polls.as_string::<i32>(), options.as_string::<i32>());
            let starts = starts.as_primitive::<Int64Type>();
            let votes = votes.as_primitive::<Int64Type>();
            for i in 0..batch.num_rows() {
                rows.push((
                    polls.value(i).to_owned(),
                    starts.value(i),
                    options.value(i).to_owned(),
                    votes.value(i) as u64,
                ));
            }
        }
        rows.sort();
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    struct Pick {
        poll_id: String,
        received_ms: i64,
        option: String,
    }

    fn batch(picks: &[Pick]) -> PickBatch {
        let mut batch = Picks::default();
        for p in picks {
            batch.push(&p.poll_id, p.received_ms, &p.option);
        }
        batch.finish()
    }

    fn reference(picks: &[Pick], w: i64) -> BTreeMap<(String, i64, String), u64> {
        let mut counts = BTreeMap::new();
        for p in picks {
            *counts
                .entry((
                    p.poll_id.clone(),
                    p.received_ms / 1000 / w * w,
                    p.option.clone(),
                ))
                .or_default() += 1;
        }
        counts
    }

    fn picks(raw: &[(u8, i64, u8)]) -> Vec<Pick> {
        raw.iter()
            .map(|(p, t, o)| Pick {
                poll_id: format!("p{p}"),
                received_ms: 1_700_000_000_000 + t,
                option: format!("o{o}"),
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// One engine, several batches in a row: the plan made at start counts each batch
        /// alone, with nothing carried over from the batches before it.
        #[test]
        fn windows_match_a_reference_count(raw in proptest::collection::vec(proptest::collection::vec((0u8..3, 0i64..120_000, 0u8..4), 1..300), 1..5), w in prop_oneof![Just(1u32), Just(10), Just(60)]) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let tasks = Tasks::new();
            let engine = runtime.block_on(async { WindowEngine::start(w, &tasks) }).unwrap();
            for (n, raw) in raw.iter().enumerate() {
                let picks = picks(raw);
                let rows = runtime.block_on(engine.windows(batch(&picks), n as u64)).unwrap();
                let got: BTreeMap<_, _> = rows.iter().map(|r| ((r.poll_id.clone(), r.window_start, r.option.clone()), r.votes)).collect();
                prop_assert_eq!(got, reference(&picks, w as i64));
                prop_assert!(rows.iter().all(|r| r.window_start % w as i64 == 0 && r.last_seq == n as u64));
            }
        }
    }

    /// The plan itself, not the engine (which answers an empty batch without it): a run
    /// over no rows gives none, and the run after it counts its own batch.
    #[test]
    fn an_empty_batch_is_no_rows_and_the_next_batch_counts() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let plan = Plan::new(10).await.unwrap();
            let empty = plan.aggregate(Picks::default().finish()).await.unwrap();
            assert!(empty.is_empty());
            let picks = picks(&[(0, 0, 0), (0, 0, 0), (0, 10_000, 1)]);
            let rows = plan.aggregate(batch(&picks)).await.unwrap();
            assert_eq!(
                rows,
                vec![
                    ("p0".to_owned(), 1_700_000_000, "o0".to_owned(), 2),
                    ("p0".to_owned(), 1_700_000_010, "o1".to_owned(), 1),
                ]
            );
        });
    }
}
