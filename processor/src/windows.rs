//! Tumbling-window aggregation of a micro-batch with DataFusion.
//!
//! DataFusion runs on its own thread with its own single-threaded runtime, so planning and
//! aggregation never stall the runtime that serves requests and drives the pipeline. The
//! thread belongs to the process's [`Tasks`]; it ends once every handle on the engine is
//! gone (the partition workers have finished their last batch).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::prelude::{SessionConfig, SessionContext};
use tally_core::ports::WindowRow;
use tally_service::Tasks;
use tokio::sync::{mpsc, oneshot};

use crate::{Error, Result};

/// One answer of one vote: the unit a window counts.
#[derive(Debug, Clone)]
pub struct Pick {
    pub poll_id: String,
    pub received_ms: i64,
    pub option: String,
}

type Job = (
    Arc<Vec<Pick>>,
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
                let config = SessionConfig::new()
                    .with_target_partitions(1)
                    .with_batch_size(8192);
                let ctx = SessionContext::new_with_config(config);
                runtime.block_on(async move {
                    while let Some((picks, reply)) = queue.recv().await {
                        let _ = reply.send(aggregate(&ctx, picks, window_seconds).await);
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
    pub async fn windows(&self, picks: Arc<Vec<Pick>>, last_seq: u64) -> Result<Vec<WindowRow>> {
        if picks.is_empty() {
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

async fn aggregate(
    ctx: &SessionContext,
    picks: Arc<Vec<Pick>>,
    window_seconds: u32,
) -> Result<Vec<(String, i64, String, u64)>> {
    let df_err = |e: datafusion::error::DataFusionError| Error::Window(e.into());
    let schema = Arc::new(Schema::new(vec![
        Field::new("poll_id", DataType::Utf8, false),
        Field::new("received_ms", DataType::Int64, false),
        Field::new("option", DataType::Utf8, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            picks.iter().map(|p| p.poll_id.as_str()),
        )),
        Arc::new(Int64Array::from_iter_values(
            picks.iter().map(|p| p.received_ms),
        )),
        Arc::new(StringArray::from_iter_values(
            picks.iter().map(|p| p.option.as_str()),
        )),
    ];
    let batch = RecordBatch::try_new(schema, columns).map_err(|e| Error::Window(e.into()))?;
    ctx.register_batch("picks", batch).map_err(df_err)?;
    let w = window_seconds as i64;
    let sql = format!(
        "SELECT poll_id, (received_ms / 1000 / {w}) * {w} AS window_start, option, COUNT(*) AS votes \
         FROM picks GROUP BY poll_id, (received_ms / 1000 / {w}) * {w}, option"
    );
    let result = async { ctx.sql(&sql).await?.collect().await }.await;
    ctx.deregister_table("picks").map_err(df_err)?;
    let batches = result.map_err(df_err)?;

    let mut rows = Vec::new();
    for batch in batches {
        let column = |i: usize, to: &DataType| {
            cast(batch.column(i), to).map_err(|e| Error::Window(e.into()))
        };
        let polls = column(0, &DataType::Utf8)?;
        let starts = column(1, &DataType::Int64)?;
        let options = column(2, &DataType::Utf8)?;
        let votes = column(3, &DataType::Int64)?;
        let polls = polls
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("cast to Utf8");
        let starts = starts
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("cast to Int64");
        let options = options
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("cast to Utf8");
        let votes = votes
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("cast to Int64");
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn windows_match_a_reference_count(raw in proptest::collection::vec((0u8..3, 0i64..120_000, 0u8..4), 1..300), w in prop_oneof![Just(1u32), Just(10), Just(60)]) {
            let picks: Vec<Pick> = raw.iter().map(|(p, t, o)| Pick { poll_id: format!("p{p}"), received_ms: 1_700_000_000_000 + t, option: format!("o{o}") }).collect();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let rows = runtime.block_on(async {
                let tasks = Tasks::new();
                let engine = WindowEngine::start(w, &tasks).unwrap();
                engine.windows(Arc::new(picks.clone()), 42).await.unwrap()
            });
            let got: BTreeMap<_, _> = rows.iter().map(|r| ((r.poll_id.clone(), r.window_start, r.option.clone()), r.votes)).collect();
            prop_assert_eq!(got, reference(&picks, w as i64));
            prop_assert!(rows.iter().all(|r| r.window_start % w as i64 == 0 && r.last_seq == 42));
        }
    }
}
