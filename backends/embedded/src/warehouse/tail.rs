//! The in-memory tail of each table and partition, its flushes to files, and merges of files.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{RecordBatch, UInt64Array};
use arrow::compute::{concat_batches, lexsort_to_indices, take_record_batch, SortColumn};
use arrow::datatypes::SchemaRef;
use tally_core::rollup::RollupLevel;
use tally_core::Result;

use super::files::{self, DataFile};
use super::rollup_merge::RollupMerge;
use super::sorted_merge::merge_sorted;
use super::{columns, storage, Inner, Kind};

/// Inserted rows of one table and partition not yet in a file.
#[derive(Default)]
pub(super) struct Tail {
    pub(super) batches: Vec<RecordBatch>,
    pub(super) rows: usize,
    /// When the oldest unflushed batch came in.
    pub(super) since: Option<Instant>,
}

pub(super) type MaintenanceLock = Arc<tokio::sync::Mutex<()>>;

impl Inner {
    fn maintenance_lock(&self, kind: Kind, partition: u16) -> MaintenanceLock {
        self.maintenance
            .lock()
            .expect("maintenance lock")
            .entry((kind, partition))
            .or_default()
            .clone()
    }

    /// Adds an insert's rows to the tail, where queries see them at once, and flushes the
    /// tail when it is full.
    ///
    /// A failed flush is not the insert's error: its rows are in the tail and visible, and
    /// reporting it would make the caller retry and add the rows twice. The background
    /// flusher tries again.
    pub(super) async fn insert(self: &Arc<Self>, kind: Kind, partition: u16, batch: RecordBatch) {
        if batch.num_rows() == 0 || !self.append(kind, partition, batch) {
            return;
        }
        if let Err(err) = self.flush(kind, partition).await {
            tracing::warn!(table = kind.table(), partition, error = %err, "writing the warehouse tail failed; will retry");
        }
    }

    /// Appends to the tail and raises the watermark; true when the tail is due a flush.
    fn append(&self, kind: Kind, partition: u16, batch: RecordBatch) -> bool {
        let Some((_, last)) = seq_range(kind, &batch) else {
            return false;
        };
        let mut tables = self.tables.write().expect("warehouse lock");
        let table = tables.get_mut(&kind).expect("every table exists");
        let tail = table.tails.entry(partition).or_default();
        tail.rows += batch.num_rows();
        tail.since.get_or_insert_with(Instant::now);
        tail.batches.push(batch);
        let mark = table.marks.entry(partition).or_default();
        *mark = (*mark).max(last);
        tail.rows >= self.options.flush_rows
    }

    pub(super) async fn flush_where(self: &Arc<Self>, due: impl Fn(&Tail) -> bool) -> Result<()> {
        let mut work = Vec::new();
        {
            let tables = self.tables.read().expect("warehouse lock");
            for (kind, table) in tables.iter() {
                for (partition, tail) in &table.tails {
                    if tail.rows > 0 && due(tail) {
                        work.push((*kind, *partition));
                    }
                }
            }
        }
        for (kind, partition) in work {
            self.flush(kind, partition).await?;
        }
        Ok(())
    }

    /// Writes the tail of one table and partition to a file, then merges small files.
    async fn flush(self: &Arc<Self>, kind: Kind, partition: u16) -> Result<()> {
        let lock = self.maintenance_lock(kind, partition);
        let _guard = lock.lock().await;
        let batches: Vec<RecordBatch> = {
            let tables = self.tables.read().expect("warehouse lock");
            match tables[&kind].tails.get(&partition) {
                Some(tail) => tail.batches.clone(),
                None => return Ok(()),
            }
        };
        if batches.is_empty() {
            return Ok(());
        }
        let (mut first, mut last) = (u64::MAX, 0);
        for batch in &batches {
            if let Some((lo, hi)) = seq_range(kind, batch) {
                first = first.min(lo);
                last = last.max(hi);
            }
        }
        let written = batches.len();
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let file = self
            .write_data_file(kind, partition, (first, last), Rows::Batches(batches))
            .await?;
        {
            let mut tables = self.tables.write().expect("warehouse lock");
            let table = tables.get_mut(&kind).expect("every table exists");
            table.files.push(Arc::new(file));
            let tail = table.tails.entry(partition).or_default();
            // Only this flush removes batches, and inserts only append: the first
            // `written` batches are exactly the ones written.
            tail.batches.drain(..written);
            tail.rows -= rows;
            tail.since = if tail.batches.is_empty() {
                None
            } else {
                Some(Instant::now())
            };
        }
        self.merge_small_files(kind, partition).await
    }

    /// Merges the newest run of small files of a partition into one, when there are enough.
    async fn merge_small_files(self: &Arc<Self>, kind: Kind, partition: u16) -> Result<()> {
        let run: Vec<Arc<DataFile>> = {
            let tables = self.tables.read().expect("warehouse lock");
            let files: Vec<&Arc<DataFile>> = tables[&kind]
                .files
                .iter()
                .filter(|f| f.partition == partition)
                .collect();
            let small: Vec<Arc<DataFile>> = files
                .iter()
                .rev()
                .take_while(|f| f.rows < self.options.large_file_rows)
                .map(|f| Arc::clone(f))
                .collect();
            if small.len() < self.options.compact_at {
                return Ok(());
            }
            small.into_iter().rev().collect()
        };
        let first = run.first().map(|f| f.first).unwrap_or_default();
        let last = run.last().map(|f| f.last).unwrap_or_default();
        let inputs: Vec<PathBuf> = run.iter().map(|f| f.path.clone()).collect();
        let started = Instant::now();
        let merged = self
            .write_data_file(kind, partition, (first, last), Rows::Files(inputs))
            .await?;
        let rows = merged.rows;
        {
            let mut tables = self.tables.write().expect("warehouse lock");
            let table = tables.get_mut(&kind).expect("every table exists");
            table
                .files
                .retain(|f| !run.iter().any(|merged| Arc::ptr_eq(f, merged)));
            table.files.push(Arc::new(merged));
            table.files.sort_by_key(|f| (f.partition, f.first));
        }
        for merged in &run {
            merged.obsolete.store(true, Ordering::Release);
        }
        tracing::debug!(
            table = kind.table(),
            partition,
            files = run.len(),
            rows,
            ms = started.elapsed().as_millis() as u64,
            "merged small files"
        );
        Ok(())
    }

    /// Writes rows of one table and partition, covering log positions `first..=last`, as a
    /// new file, off the async runtime. The file holds them in their stored form: sorted,
    /// and settled rollups added up (so it may hold fewer rows than given).
    async fn write_data_file(
        &self,
        kind: Kind,
        partition: u16,
        (first, last): (u64, u64),
        rows: Rows,
    ) -> Result<DataFile> {
        let dir = self.root.join(kind.table());
        let schema = self.schema(kind).clone();
        tokio::task::spawn_blocking(move || {
            let name = DataFile::name(partition, first, last);
            let batch = match (kind, rows) {
                // Added up as they are read: a merge holds the rows it writes, not all it reads.
                (Kind::Rollups(RollupLevel::Settled), rows) => {
                    let mut merge = RollupMerge::new(&schema)?;
                    rows.for_each(|batch| merge.add(&batch))?;
                    merge.finish(partition)?
                }
                // Files already sorted: merged a batch of each at a time, written as they go.
                // Fresh rollups keep their rows: a breakdown tells them apart by `last_seq`.
                (_, Rows::Files(paths)) => {
                    let mut writer = files::Writer::create(&schema, &dir, &name)?;
                    merge_sorted(kind, &schema, &paths, |batch| writer.write(batch))?;
                    let (path, rows) = writer.finish()?;
                    return Ok(DataFile::new(path, partition, first, last, rows));
                }
                (_, Rows::Batches(batches)) => {
                    concat_batches(&schema, &batches).map_err(storage)?
                }
            };
            let batch = sort_for_storage(kind, &batch)?;
            let path = files::write_file(&schema, &dir, &name, &batch)?;
            Ok(DataFile::new(
                path,
                partition,
                first,
                last,
                batch.num_rows(),
            ))
        })
        .await
        .map_err(storage)?
    }
}

/// The rows a new file is written from: a tail's batches, or the files a merge replaces.
enum Rows {
    Batches(Vec<RecordBatch>),
    /// Read a batch at a time.
    Files(Vec<PathBuf>),
}

impl Rows {
    fn for_each(self, mut each: impl FnMut(RecordBatch) -> Result<()>) -> Result<()> {
        match self {
            Rows::Batches(batches) => batches.into_iter().try_for_each(each),
            Rows::Files(paths) => {
                for path in &paths {
                    for batch in files::read_batches(path)? {
                        each(batch.map_err(storage)?)?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// Gives the rollup files written before the cube (`without_cube`: those without its
/// `dims` column) their cube rows ([`tally_core::rollup::cube_rows`]), each file rewritten
/// in place, so every breakdown the cube answers finds all of a poll's votes in it. Has
/// work only when a store written by an earlier version opens; a crash midway leaves each
/// file old or new, and the next open finishes.
pub(super) fn add_cube_rows(
    kind: Kind,
    schema: &SchemaRef,
    table: &mut super::Table,
    without_cube: &[PathBuf],
) -> Result<()> {
    for file in table.files.iter_mut() {
        if !without_cube.contains(&file.path) {
            continue;
        }
        let batches = files::read_file(&file.path)?;
        let mut rows = Vec::new();
        for batch in &batches {
            rows.extend(columns::rollup_rows(batch)?);
        }
        let cube = tally_core::rollup::cube_rows(&rows);
        rows.extend(cube);
        let batch = columns::rollups_batch(schema, file.partition, &rows)?;
        let batch = sort_for_storage(kind, &batch)?;
        let dir = file.path.parent().expect("a file in a table's directory");
        let name = DataFile::name(file.partition, file.first, file.last);
        files::write_file(schema, dir, &name, &batch)?;
        tracing::info!(path = %file.path.display(), rows = batch.num_rows(), "added the cube rows to a rollup file");
        *file = Arc::new(DataFile::new(
            file.path.clone(),
            file.partition,
            file.first,
            file.last,
            batch.num_rows(),
        ));
    }
    Ok(())
}

/// The highest and lowest log position in a batch.
fn seq_range(kind: Kind, batch: &RecordBatch) -> Option<(u64, u64)> {
    let seqs = batch
        .column(kind.seq_column())
        .as_any()
        .downcast_ref::<UInt64Array>()?;
    let min = arrow::compute::min(seqs)?;
    let max = arrow::compute::max(seqs)?;
    Some((min, max))
}

/// The columns rows are stored sorted by: poll and position, so Parquet row-group
/// statistics prune other polls; rollups by poll, dimension set and position, so they also
/// prune the rows of other sets (a breakdown by country reads no whole segments).
pub(super) fn sort_columns(kind: Kind) -> Vec<usize> {
    let mut columns = vec![kind.poll_column()];
    if matches!(kind, Kind::Rollups(_)) {
        columns.push(columns::ROLLUP_DIMS_COLUMN);
    }
    columns.push(kind.seq_column());
    columns
}

/// Sorts rows by [`sort_columns`].
pub(super) fn sort_for_storage(kind: Kind, batch: &RecordBatch) -> Result<RecordBatch> {
    let columns: Vec<SortColumn> = sort_columns(kind)
        .into_iter()
        .map(|index| SortColumn {
            values: batch.column(index).clone(),
            options: None,
        })
        .collect();
    let indices = lexsort_to_indices(&columns, None).map_err(storage)?;
    take_record_batch(batch, &indices).map_err(storage)
}
