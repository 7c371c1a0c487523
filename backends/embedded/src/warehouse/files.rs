//! The Parquet files of a table: their names, writing and reading them, loading a directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::{ArrowSchemaConverter, ArrowWriter};
use parquet::basic::{Compression, Type as PhysicalType};
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

/// Columns whose every value differs from the others, written without a dictionary.
const UNIQUE_COLUMNS: [&str; 2] = ["vote_id", "voter_key"];

/// The text columns whose min and max let a read skip row groups: rows are stored sorted by
/// poll, and rollups next by dimension set ([`super::tail::sort_columns`]). Every other text
/// column (segment values, choices, ids) holds values spread over every row group, so its
/// statistics prune nothing.
const PRUNING_TEXT_COLUMNS: [&str; 2] = ["poll_id", super::columns::ROLLUP_DIMS_NAME];

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
        // Text statistics cost two comparisons of every value (its min and max): ~2% of
        // standalone's CPU under single votes, for the segment columns, choices and ids,
        // where they prune nothing (perf, docs/BENCHMARKS.md run 2026-12-07 (5)). Numbers'
        // statistics cost next to nothing and prune by position and time.
        let leaves = ArrowSchemaConverter::new()
            .convert(schema)
            .map_err(storage)?;
        for leaf in leaves.columns() {
            let root = leaf.path().parts().first().map_or("", String::as_str);
            if leaf.physical_type() == PhysicalType::BYTE_ARRAY
                && !PRUNING_TEXT_COLUMNS.contains(&root)
            {
                properties = properties
                    .set_column_statistics_enabled(leaf.path().clone(), EnabledStatistics::None);
            }
        }
        // A vote's id and voter key are unique and random: a dictionary of them only fills
        // up before the writer falls back to plain values (~1% of standalone's CPU under
        // single votes, run 2026-12-07 (4)).
        for column in UNIQUE_COLUMNS {
            if schema.column_with_name(column).is_some() {
                properties =
                    properties.set_column_dictionary_enabled(ColumnPath::from(column), false);
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

#[cfg(test)]
mod tests {
    use parquet::basic::Encoding;
    use tally_core::rollup::RollupRow;
    use tally_core::segment::Segment;

    use super::*;
    use crate::warehouse::columns;

    /// Each leaf column of the file's first row group: whether it has statistics, and
    /// whether it is dictionary-encoded.
    fn leaves_of(path: &Path) -> Vec<(String, bool, bool)> {
        let builder = reader(path).unwrap();
        let group = builder.metadata().row_group(0);
        group
            .columns()
            .iter()
            .map(|column| {
                let dictionary = column
                    .encodings()
                    .any(|e| matches!(e, Encoding::RLE_DICTIONARY | Encoding::PLAIN_DICTIONARY));
                (
                    column.column_path().string(),
                    column.statistics().is_some(),
                    dictionary,
                )
            })
            .collect()
    }

    fn has_statistics(leaves: &[(String, bool, bool)], path: &str) -> bool {
        leaves
            .iter()
            .find(|(p, ..)| p == path)
            .unwrap_or_else(|| panic!("no column {path} in {leaves:?}"))
            .1
    }

    /// Text columns keep min and max only where a read prunes by them (the poll, a
    /// rollup's dimension set); numbers always do; unique ids are written without a
    /// dictionary, segment values with one.
    #[test]
    fn statistics_where_they_prune_and_dictionaries_where_values_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let votes = columns::test_votes(200, |i| ["DE", "FR"][(i % 2) as usize].into());
        let schema = columns::votes_schema();
        let batch = columns::votes_batch(&schema, 0, &votes).unwrap();
        let leaves = leaves_of(&write_file(&schema, dir.path(), "votes.parquet", &batch).unwrap());
        for pruning in ["poll_id", "seq", "log_partition", "received_ms", "value"] {
            assert!(has_statistics(&leaves, pruning), "{pruning}: {leaves:?}");
        }
        for text in [
            "vote_id",
            "voter_key",
            "country",
            "choice.list.item",
            "dim_keys.list.item",
        ] {
            assert!(!has_statistics(&leaves, text), "{text}: {leaves:?}");
        }
        for (path, _, dictionary) in &leaves {
            let unique = UNIQUE_COLUMNS.contains(&path.as_str());
            assert_eq!(*dictionary, !unique, "{path}: {leaves:?}");
        }

        let rows: Vec<RollupRow> = ["", "country"]
            .into_iter()
            .map(|dims| RollupRow {
                poll_id: "p".into(),
                dims: dims.into(),
                bucket_start: 0,
                bucket_seconds: 60,
                segment: Segment::default(),
                ballots: 1,
                answers: vec!["a".into()],
                answer_votes: vec![1],
                last_seq: 1,
            })
            .collect();
        let schema = columns::rollups_schema();
        let batch = columns::rollups_batch(&schema, 0, &rows).unwrap();
        let leaves =
            leaves_of(&write_file(&schema, dir.path(), "rollups.parquet", &batch).unwrap());
        for pruning in ["poll_id", "dims", "bucket_start", "last_seq"] {
            assert!(has_statistics(&leaves, pruning), "{pruning}: {leaves:?}");
        }
        for text in ["country", "answers.list.item"] {
            assert!(!has_statistics(&leaves, text), "{text}: {leaves:?}");
        }
    }
}
