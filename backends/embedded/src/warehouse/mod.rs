//! The embedded warehouse: Parquet files queried by DataFusion, with an in-memory Arrow tail.
//!
//! Each insert becomes one Arrow batch in the tail of its table and partition, visible to
//! queries at once. The tail is flushed to a Parquet file when it grows past
//! `flush_rows` or ages past `flush_interval`; small files of a partition are merged when
//! there are more than `compact_at` of them. File names carry the partition and the range of
//! log sequences inside, so the durable watermark is read off the directory.
//!
//! Why no write-ahead log of its own: the vote log is durable and the processor resumes from
//! the watermarks. A crash loses the tail, the watermark falls back to the last flushed file,
//! and the processor re-reads the lost suffix from the log — every vote lands exactly once.
//! A crash mid-compaction leaves a merged file beside its inputs; opening deletes every file
//! whose range another file of its partition covers.
//!
//! - `columns`: Arrow schemas, batches built from rows, columns read back;
//! - `files`: Parquet files on disk, their names, and loading a table's directory;
//! - `tail`: the in-memory tail, flushes and merges;
//! - `rollup_merge`: settled rollup rows added up by group, in columnar form;
//! - `sql`: the DataFusion snapshot and the statements behind each query;
//! - `executor`: the runtime queries run on, apart from request handling;
//! - `analyst`: the analysts' tables (views over the votes, the recorded polls), their SQL
//!   and a poll's ballots for export.

mod analyst;
mod columns;
mod executor;
mod files;
mod rollup_merge;
mod sorted_merge;
mod sql;
mod tail;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use tally_core::analyst::SqlLimits;
use tally_core::analytics::{Breakdown, BreakdownQuery, TimePoint, TimeseriesQuery};
use tally_core::poll::Poll;
use tally_core::ports::{AnalystRows, StoredVote, Warehouse, Watermarks, WindowRow};
use tally_core::results::Tally;
use tally_core::rollup::{RollupLevel, RollupRow};
use tally_core::{Error, Result};
use tokio_util::sync::CancellationToken;

use executor::Executor;
use files::DataFile;
use tail::{MaintenanceLock, Tail};

fn storage(err: impl Into<tally_core::error::BoxError>) -> Error {
    Error::unavailable("embedded warehouse", err)
}

#[derive(Debug, Clone)]
pub struct WarehouseOptions {
    /// Rows of one table and partition kept in memory before they are written to a file.
    pub flush_rows: usize,
    /// Age of the oldest unflushed row before a flush.
    pub flush_interval: Duration,
    /// Small files of one table and partition that trigger a merge.
    pub compact_at: usize,
    /// Files at least this large are left alone by merges.
    pub large_file_rows: usize,
}

impl Default for WarehouseOptions {
    fn default() -> Self {
        WarehouseOptions {
            flush_rows: 200_000,
            flush_interval: Duration::from_secs(5),
            compact_at: 8,
            large_file_rows: 2_000_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Votes,
    Windows,
    Rollups(RollupLevel),
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::Votes,
        Kind::Windows,
        Kind::Rollups(RollupLevel::Fresh),
        Kind::Rollups(RollupLevel::Settled),
    ];

    fn table(self) -> &'static str {
        match self {
            Kind::Votes => "votes",
            Kind::Windows => "vote_windows",
            Kind::Rollups(level) => level.table(),
        }
    }

    /// The column holding the log position each row covers.
    fn seq_column(self) -> usize {
        match self {
            Kind::Votes => 1,
            Kind::Windows => 6,
            Kind::Rollups(_) => 15,
        }
    }

    /// The column holding the poll id.
    fn poll_column(self) -> usize {
        match self {
            Kind::Votes => 3,
            Kind::Windows | Kind::Rollups(_) => 1,
        }
    }
}

/// One table: its files on disk and its in-memory tails.
#[derive(Default)]
struct Table {
    files: Vec<Arc<DataFile>>,
    tails: BTreeMap<u16, Tail>,
    /// Highest log position held, per partition (files and tail).
    marks: HashMap<u16, u64>,
}

struct Inner {
    root: PathBuf,
    options: WarehouseOptions,
    votes_schema: SchemaRef,
    windows_schema: SchemaRef,
    rollups_schema: SchemaRef,
    tables: RwLock<HashMap<Kind, Table>>,
    /// Serialises flushes and merges of one table and partition.
    maintenance: std::sync::Mutex<HashMap<(Kind, u16), MaintenanceLock>>,
    executor: Executor,
    /// What the snapshots of the service's own reads share: the Parquet footers and file
    /// statistics they have read (see [`sql::read_runtime`]).
    runtime: Arc<datafusion::execution::runtime_env::RuntimeEnv>,
    /// The poll definitions of the analysts' `polls` and `poll_options`, newest version of
    /// each (in memory: the registry is their durable home; see `analyst`).
    polls: RwLock<BTreeMap<String, Arc<Poll>>>,
}

impl Inner {
    fn schema(&self, kind: Kind) -> &SchemaRef {
        match kind {
            Kind::Votes => &self.votes_schema,
            Kind::Windows => &self.windows_schema,
            Kind::Rollups(_) => &self.rollups_schema,
        }
    }
}

/// The embedded [`Warehouse`]. Cheap to clone.
#[derive(Clone)]
pub struct ParquetWarehouse {
    inner: Arc<Inner>,
}

impl ParquetWarehouse {
    /// Opens (or creates) the warehouse under `root`. Its tails are flushed as they fill;
    /// [`ParquetWarehouse::flush_periodically`] also flushes them as they age.
    pub fn open(root: impl Into<PathBuf>, options: WarehouseOptions) -> Result<ParquetWarehouse> {
        let root = root.into();
        let mut tables = HashMap::new();
        let rollups_schema = columns::rollups_schema();
        for kind in Kind::ALL {
            let dir = root.join(kind.table());
            std::fs::create_dir_all(&dir).map_err(storage)?;
            let rollups = matches!(kind, Kind::Rollups(_));
            let (mut table, without_cube) =
                files::load_table(&dir, rollups.then_some(columns::ROLLUP_DIMS_NAME))?;
            tail::add_cube_rows(kind, &rollups_schema, &mut table, &without_cube)?;
            tables.insert(kind, table);
        }
        let inner = Arc::new(Inner {
            root,
            options,
            votes_schema: columns::votes_schema(),
            windows_schema: columns::windows_schema(),
            rollups_schema,
            tables: RwLock::new(tables),
            maintenance: Default::default(),
            executor: Executor::start()?,
            runtime: sql::read_runtime()?,
            polls: RwLock::default(),
        });
        Ok(ParquetWarehouse { inner })
    }

    /// Writes every in-memory row to Parquet; call before a clean shutdown.
    pub async fn flush_all(&self) -> Result<()> {
        self.inner.flush_where(|_| true).await
    }

    /// Files on disk per table, for operators and tests.
    pub fn file_count(&self) -> usize {
        let tables = self.inner.tables.read().expect("warehouse lock");
        tables.values().map(|t| t.files.len()).sum()
    }

    /// Writes tails older than `flush_interval` to Parquet every half second, until
    /// `cancel` fires; the process's owner of background tasks runs it.
    pub async fn flush_periodically(&self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = cancel.cancelled() => return,
            }
            let max_age = self.inner.options.flush_interval;
            if let Err(err) = self
                .inner
                .flush_where(|tail| tail.since.is_some_and(|t| t.elapsed() >= max_age))
                .await
            {
                tracing::warn!(error = %err.chain(), "flushing the warehouse tail failed; will retry");
            }
        }
    }
}

#[async_trait]
impl Warehouse for ParquetWarehouse {
    async fn migrate(&self) -> Result<Vec<u32>> {
        let marker = self.inner.root.join("FORMAT");
        if marker.exists() {
            return Ok(Vec::new());
        }
        std::fs::write(&marker, "1\n").map_err(storage)?;
        Ok(vec![1])
    }

    async fn watermarks(&self, partition: u16) -> Result<Watermarks> {
        let tables = self.inner.tables.read().expect("warehouse lock");
        let mark = |kind: Kind| {
            tables[&kind]
                .marks
                .get(&partition)
                .copied()
                .unwrap_or_default()
        };
        Ok(Watermarks {
            votes: mark(Kind::Votes),
            windows: mark(Kind::Windows),
            rollups: mark(Kind::Rollups(RollupLevel::Fresh)),
            settled: mark(Kind::Rollups(RollupLevel::Settled)),
        })
    }

    async fn insert_votes(&self, partition: u16, votes: &[StoredVote]) -> Result<()> {
        let batch = columns::votes_batch(&self.inner.votes_schema, partition, votes)?;
        self.inner.insert(Kind::Votes, partition, batch).await;
        Ok(())
    }

    async fn insert_windows(&self, partition: u16, rows: &[WindowRow]) -> Result<()> {
        let batch = columns::windows_batch(&self.inner.windows_schema, partition, rows)?;
        self.inner.insert(Kind::Windows, partition, batch).await;
        Ok(())
    }

    async fn insert_rollups(
        &self,
        partition: u16,
        level: RollupLevel,
        rows: &[RollupRow],
    ) -> Result<()> {
        let batch = columns::rollups_batch(&self.inner.rollups_schema, partition, rows)?;
        self.inner
            .insert(Kind::Rollups(level), partition, batch)
            .await;
        Ok(())
    }

    async fn tally_by_partition(&self, poll_id: &str) -> Result<BTreeMap<u16, Tally>> {
        self.inner.tally_by_partition(poll_id).await
    }

    async fn voter_keys(&self, poll_id: &str) -> Result<Vec<String>> {
        self.inner.voter_keys(poll_id).await
    }

    async fn breakdown(&self, query: &BreakdownQuery) -> Result<Breakdown> {
        self.inner.breakdown(query).await
    }

    async fn window_widths(&self, poll_id: &str) -> Result<Vec<u32>> {
        self.inner.window_widths(poll_id).await
    }

    async fn timeseries(&self, query: &TimeseriesQuery) -> Result<Vec<TimePoint>> {
        self.inner.timeseries(query).await
    }

    async fn segment_values(
        &self,
        poll_id: &str,
        partition: u16,
    ) -> Result<BTreeMap<String, BTreeSet<String>>> {
        self.inner.segment_values(poll_id, partition).await
    }

    async fn check(&self) -> Result<()> {
        std::fs::metadata(&self.inner.root).map_err(storage)?;
        Ok(())
    }

    async fn record_polls(&self, polls: &[Poll]) -> Result<()> {
        self.inner.record_polls(polls);
        Ok(())
    }

    async fn analyst_sql(&self, sql: &str, limits: &SqlLimits) -> Result<AnalystRows> {
        self.inner.analyst_sql(sql, limits).await
    }

    async fn ballots(&self, poll_id: &str) -> Result<AnalystRows> {
        self.inner.ballots(poll_id).await
    }
}
