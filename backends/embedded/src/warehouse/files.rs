//! The Parquet files of a table: their names, writing and reading them, loading a directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use tally_core::Result;

use super::{storage, Table};

/// A Parquet file of one table and partition, holding log positions `first..=last`.
/// Deleted from disk when it is both replaced by a merge and no longer read by a query.
#[derive(Debug)]
pub(super) struct DataFile {
    pub(super) path: PathBuf,
    pub(super) partition: u16,
    pub(super) first: u64,
    pub(super) last: u64,
    pub(super) rows: usize,
    /// Set once a merged file replaces this one; the last reference deletes it.
    pub(super) obsolete: AtomicBool,
}

impl DataFile {
    pub(super) fn new(path: PathBuf, partition: u16, first: u64, last: u64, rows: usize) -> Self {
        DataFile {
            path,
            partition,
            first,
            last,
            rows,
            obsolete: AtomicBool::new(false),
        }
    }

    /// The file name of a partition's positions `first..=last`, which [`DataFile::parse`]
    /// reads back.
    pub(super) fn name(partition: u16, first: u64, last: u64) -> String {
        format!("p{partition:05}-{first:020}-{last:020}.parquet")
    }

    fn parse(path: &Path) -> Option<(u16, u64, u64)> {
        let name = path.file_name()?.to_str()?.strip_suffix(".parquet")?;
        let mut parts = name.strip_prefix('p')?.split('-');
        let partition = parts.next()?.parse().ok()?;
        let first = parts.next()?.parse().ok()?;
        let last = parts.next()?.parse().ok()?;
        parts.next().is_none().then_some((partition, first, last))
    }

    fn covers(&self, other: &DataFile) -> bool {
        self.partition == other.partition
            && self.first <= other.first
            && other.last <= self.last
            && (self.first, self.last) != (other.first, other.last)
    }
}

impl Drop for DataFile {
    fn drop(&mut self) {
        if self.obsolete.load(Ordering::Acquire) {
            if let Err(err) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %err, "cannot delete a merged file");
            }
        }
    }
}

/// Reads a table's directory: parses file names, drops leftovers of interrupted writes and
/// merges, and derives the watermarks.
/// The table whose files are in `dir`, and the paths of those (kept) files whose schema
/// lacks the column `wanted`: a file's footer is read once for both.
pub(super) fn load_table(dir: &Path, wanted: Option<&str>) -> Result<(Table, Vec<PathBuf>)> {
    let mut files = Vec::new();
    let mut lacking = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(storage)? {
        let path = entry.map_err(storage)?.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let Some((partition, first, last)) = DataFile::parse(&path) else {
            continue;
        };
        let footer = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).map_err(storage)?)
            .map_err(storage)?;
        let rows = footer.metadata().file_metadata().num_rows() as usize;
        if wanted.is_some_and(|column| footer.schema().column_with_name(column).is_none()) {
            lacking.push(path.clone());
        }
        files.push(DataFile::new(path, partition, first, last, rows));
    }
    let covered: Vec<bool> = files
        .iter()
        .map(|f| files.iter().any(|other| other.covers(f)))
        .collect();
    let mut table = Table::default();
    for (file, covered) in files.into_iter().zip(covered) {
        if covered {
            tracing::info!(path = %file.path.display(), "removing a file a finished merge replaced");
            file.obsolete.store(true, Ordering::Release);
            continue;
        }
        let mark = table.marks.entry(file.partition).or_default();
        *mark = (*mark).max(file.last);
        table.files.push(Arc::new(file));
    }
    table.files.sort_by_key(|f| (f.partition, f.first));
    lacking.retain(|path| table.files.iter().any(|f| &f.path == path));
    Ok((table, lacking))
}

/// Columns whose every value differs from the others, written without dictionary or
/// statistics.
const UNIQUE_COLUMNS: [&str; 2] = ["vote_id", "voter_key"];

/// Writes `batch` to `dir/name` atomically: a temp file, fsync, rename, fsync of the dir.
pub(super) fn write_file(
    schema: &SchemaRef,
    dir: &Path,
    name: &str,
    batch: &RecordBatch,
) -> Result<PathBuf> {
    let mut writer = Writer::create(schema, dir, name)?;
    writer.write(batch)?;
    Ok(writer.finish()?.0)
}

/// A file written a batch at a time, in place at `dir/name` only when finished: a temp
/// file, fsync, rename, fsync of the dir.
pub(super) struct Writer {
    writer: ArrowWriter<File>,
    dir: PathBuf,
    path: PathBuf,
    tmp: PathBuf,
    rows: usize,
}

impl Writer {
    pub(super) fn create(schema: &SchemaRef, dir: &Path, name: &str) -> Result<Writer> {
        let path = dir.join(name);
        let tmp = dir.join(format!("{name}.tmp"));
        let file = File::create(&tmp).map_err(storage)?;
        let mut properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(64 * 1024));
        // A vote's id and voter key are unique and random: a dictionary of them only fills
        // up before the writer falls back to plain values, and their min and max prune
        // nothing. Comparing their values for both was ~3% of standalone's CPU under single
        // votes (perf, docs/BENCHMARKS.md run 2026-12-07 (4)).
        for column in UNIQUE_COLUMNS {
            if schema.column_with_name(column).is_some() {
                let path = ColumnPath::from(column);
                properties = properties
                    .set_column_dictionary_enabled(path.clone(), false)
                    .set_column_statistics_enabled(path, EnabledStatistics::None);
            }
        }
        let properties = properties.build();
        let writer =
            ArrowWriter::try_new(file, schema.clone(), Some(properties)).map_err(storage)?;
        Ok(Writer {
            writer,
            dir: dir.to_owned(),
            path,
            tmp,
            rows: 0,
        })
    }

    pub(super) fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.rows += batch.num_rows();
        self.writer.write(batch).map_err(storage)
    }

    /// The file's path and its number of rows.
    pub(super) fn finish(self) -> Result<(PathBuf, usize)> {
        let file = self.writer.into_inner().map_err(storage)?;
        file.sync_all().map_err(storage)?;
        std::fs::rename(&self.tmp, &self.path).map_err(storage)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(storage)?;
        Ok((self.path, self.rows))
    }
}

pub(super) fn read_file(path: &Path) -> Result<Vec<RecordBatch>> {
    read_batches(path)?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(storage)
}

/// The batches of a file, read one at a time.
pub(super) fn read_batches(path: &Path) -> Result<ParquetRecordBatchReader> {
    reader(path)?.build().map_err(storage)
}

/// The batches of a file, `rows` at a time.
pub(super) fn read_batches_of(path: &Path, rows: usize) -> Result<ParquetRecordBatchReader> {
    reader(path)?.with_batch_size(rows).build().map_err(storage)
}

fn reader(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    ParquetRecordBatchReaderBuilder::try_new(File::open(path).map_err(storage)?).map_err(storage)
}
