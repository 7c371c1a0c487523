//! Merging files that are each sorted for storage into one sorted the same way, a batch of
//! each at a time: a merge holds a few batches per file, not the rows it writes (a merge of
//! 1.6M votes read them all, concatenated and sorted them: some 650 MB above the process's
//! usual size for the seconds it took).

use std::path::PathBuf;

use arrow::array::RecordBatch;
use arrow::compute::interleave_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, Rows, SortField};
use parquet::arrow::arrow_reader::ParquetRecordBatchReader;
use tally_core::Result;

use super::{files, storage, Kind};

/// Rows read from each file at a time, and the most written at a time.
const BATCH_ROWS: usize = 8 * 1024;

/// One input file: its current batch, that batch's sort keys, and the next row to take.
struct Cursor {
    reader: ParquetRecordBatchReader,
    batch: RecordBatch,
    keys: Rows,
    next: usize,
}

impl Cursor {
    fn has_row(&self) -> bool {
        self.next < self.batch.num_rows()
    }
}

/// Reads the files at `paths`, each sorted by [`super::tail::sort_columns`] of `kind`, and
/// hands `write` their rows in that order, at most [`BATCH_ROWS`] at a time. Rows equal in
/// their sort keys come in the order of `paths`.
pub(super) fn merge_sorted(
    kind: Kind,
    schema: &SchemaRef,
    paths: &[PathBuf],
    write: impl FnMut(&RecordBatch) -> Result<()>,
) -> Result<()> {
    merge_sorted_by(kind, schema, paths, BATCH_ROWS, write)
}

/// [`merge_sorted`], reading and writing `batch_rows` at a time.
fn merge_sorted_by(
    kind: Kind,
    schema: &SchemaRef,
    paths: &[PathBuf],
    batch_rows: usize,
    mut write: impl FnMut(&RecordBatch) -> Result<()>,
) -> Result<()> {
    let key_columns = super::tail::sort_columns(kind);
    let converter = RowConverter::new(
        key_columns
            .iter()
            .map(|&i| SortField::new(schema.field(i).data_type().clone()))
            .collect(),
    )
    .map_err(storage)?;
    let keys_of = |batch: &RecordBatch| -> Result<Rows> {
        let columns: Vec<_> = key_columns
            .iter()
            .map(|&i| batch.column(i).clone())
            .collect();
        converter.convert_columns(&columns).map_err(storage)
    };
    let empty = RecordBatch::new_empty(schema.clone());
    let mut cursors = Vec::with_capacity(paths.len());
    for path in paths {
        let reader = files::read_batches_of(path, batch_rows)?;
        let mut cursor = Cursor {
            reader,
            batch: empty.clone(),
            keys: keys_of(&empty)?,
            next: 0,
        };
        advance(&mut cursor, &empty, &keys_of)?;
        cursors.push(cursor);
    }
    // (cursor, row) of each row to write, in order; written before any cursor moves to its
    // next batch, so every pick names a batch still held.
    let mut picks: Vec<(usize, usize)> = Vec::with_capacity(batch_rows);
    loop {
        let mut least: Option<usize> = None;
        for (i, cursor) in cursors.iter().enumerate() {
            if !cursor.has_row() {
                continue;
            }
            let lower = match least {
                None => true,
                Some(l) => cursor.keys.row(cursor.next) < cursors[l].keys.row(cursors[l].next),
            };
            if lower {
                least = Some(i);
            }
        }
        let Some(i) = least else {
            break;
        };
        picks.push((i, cursors[i].next));
        cursors[i].next += 1;
        if !cursors[i].has_row() || picks.len() == batch_rows {
            emit(&cursors, &mut picks, &mut write)?;
            if !cursors[i].has_row() {
                advance(&mut cursors[i], &empty, &keys_of)?;
            }
        }
    }
    emit(&cursors, &mut picks, &mut write)
}

/// Moves `cursor` to the next non-empty batch of its file, or to `empty` at the end.
fn advance(
    cursor: &mut Cursor,
    empty: &RecordBatch,
    keys_of: &impl Fn(&RecordBatch) -> Result<Rows>,
) -> Result<()> {
    for batch in cursor.reader.by_ref() {
        let batch = batch.map_err(storage)?;
        if batch.num_rows() > 0 {
            cursor.keys = keys_of(&batch)?;
            cursor.batch = batch;
            cursor.next = 0;
            return Ok(());
        }
    }
    cursor.keys = keys_of(empty)?;
    cursor.batch = empty.clone();
    cursor.next = 0;
    Ok(())
}

/// Writes the picked rows as one batch.
fn emit(
    cursors: &[Cursor],
    picks: &mut Vec<(usize, usize)>,
    write: &mut impl FnMut(&RecordBatch) -> Result<()>,
) -> Result<()> {
    if picks.is_empty() {
        return Ok(());
    }
    let batches: Vec<&RecordBatch> = cursors.iter().map(|c| &c.batch).collect();
    let batch = interleave_record_batch(&batches, picks).map_err(storage)?;
    picks.clear();
    write(&batch)
}

#[cfg(test)]
mod tests {
    use arrow::compute::concat_batches;
    use tally_core::rollup::{RollupLevel, RollupRow};
    use tally_core::segment::Segment;

    use super::*;
    use crate::warehouse::columns::{rollups_batch, rollups_schema};
    use crate::warehouse::tail::sort_for_storage;

    fn row(i: u64) -> RollupRow {
        RollupRow {
            poll_id: ["p1", "p2", "p3"][(i * 7 % 3) as usize].into(),
            dims: ["", "country", "store"][(i * 5 % 3) as usize].into(),
            bucket_start: 60 * (i % 4) as i64,
            bucket_seconds: 60,
            segment: Segment {
                country: ["DE", "FR"][(i % 2) as usize].into(),
                ..Segment::default()
            },
            ballots: i % 9 + 1,
            answers: vec!["a".into()],
            answer_votes: vec![i % 5 + 1],
            // Unique: the order of the rows is fully given by their keys.
            last_seq: i * 7919 % 10_007,
        }
    }

    #[test]
    fn sorted_files_merge_into_the_order_one_sort_of_all_their_rows_gives() {
        let kind = Kind::Rollups(RollupLevel::Fresh);
        let schema = rollups_schema();
        let dir = tempfile::tempdir().unwrap();
        let mut inputs = Vec::new();
        let mut all = Vec::new();
        // Files of different sizes, one of them empty, each sorted as stored.
        for (file, rows) in [(0u64, 1_000u64), (1, 0), (2, 2_345), (3, 17)]
            .into_iter()
            .enumerate()
        {
            let rows: Vec<RollupRow> = (0..rows.1).map(|i| row(i * 4 + rows.0)).collect();
            let batch = rollups_batch(&schema, 0, &rows).unwrap();
            let batch = sort_for_storage(kind, &batch).unwrap();
            let name = format!("f{file}.parquet");
            inputs.push(files::write_file(&schema, dir.path(), &name, &batch).unwrap());
            all.push(batch);
        }
        let want = sort_for_storage(kind, &concat_batches(&schema, &all).unwrap()).unwrap();
        for batch_rows in [1, 100, 8 * 1024] {
            let mut written = Vec::new();
            merge_sorted_by(kind, &schema, &inputs, batch_rows, |batch| {
                assert!(batch.num_rows() <= batch_rows);
                written.push(batch.clone());
                Ok(())
            })
            .unwrap();
            let got = concat_batches(&schema, &written).unwrap();
            assert_eq!(got.num_rows(), 3_362);
            assert_eq!(got, want, "{batch_rows} rows at a time");
        }
    }
}
