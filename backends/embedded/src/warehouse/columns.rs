//! The tables as Arrow: their schemas, batches built from rows, and columns read back.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Int32Array, Int64Array, ListArray, RecordBatch, StringArray, StringBuilder,
    UInt16Array, UInt32Array, UInt64Array,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt64Type};
use tally_core::ports::{StoredVote, WindowRow};
use tally_core::rollup::RollupRow;
use tally_core::segment::{Segment, STANDARD_KEYS};
use tally_core::Result;

use super::storage;

/// The item field of every list column. Arrow's list builders name it the same way, so the
/// arrays built below match the schemas.
fn list_field(item: DataType) -> Arc<Field> {
    Arc::new(Field::new_list_field(item, true))
}

fn text_field(name: &str) -> Field {
    Field::new(name, DataType::Utf8, false)
}

fn text_list_field(name: &str) -> Field {
    Field::new(name, DataType::List(list_field(DataType::Utf8)), false)
}

/// The segment columns votes and rollups both store: the standard keys, then the poll's
/// own keys and values, in the order [`segment_columns`] builds and [`segments`] reads them.
fn segment_fields() -> Vec<Field> {
    let mut fields: Vec<Field> = STANDARD_KEYS.iter().map(|name| text_field(name)).collect();
    fields.push(text_list_field("dim_keys"));
    fields.push(text_list_field("dim_values"));
    fields
}

pub(super) fn votes_schema() -> SchemaRef {
    let mut fields = vec![
        Field::new("log_partition", DataType::UInt16, false),
        Field::new("seq", DataType::UInt64, false),
        text_field("vote_id"),
        text_field("poll_id"),
        text_field("voter_key"),
        text_list_field("choice"),
        Field::new("value", DataType::Int32, true),
    ];
    fields.extend(segment_fields());
    fields.push(Field::new("received_ms", DataType::Int64, false));
    Arc::new(Schema::new(fields))
}

pub(super) fn windows_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("log_partition", DataType::UInt16, false),
        text_field("poll_id"),
        Field::new("window_start", DataType::Int64, false),
        Field::new("window_seconds", DataType::UInt32, false),
        text_field("option"),
        Field::new("votes", DataType::UInt64, false),
        Field::new("last_seq", DataType::UInt64, false),
    ]))
}

pub(super) fn rollups_schema() -> SchemaRef {
    let mut fields = vec![
        Field::new("log_partition", DataType::UInt16, false),
        text_field("poll_id"),
        Field::new("bucket_start", DataType::Int64, false),
        Field::new("bucket_seconds", DataType::UInt32, false),
    ];
    fields.extend(segment_fields());
    fields.extend([
        Field::new("ballots", DataType::UInt64, false),
        text_list_field("answers"),
        Field::new(
            "answer_votes",
            DataType::List(list_field(DataType::UInt64)),
            false,
        ),
        Field::new("last_seq", DataType::UInt64, false),
        // The row's dimension set (`RollupRow::dims`). Last, and nullable: files written
        // before the cube lack it, and are given their cube rows when the store opens.
        Field::new(ROLLUP_DIMS_NAME, DataType::Utf8, true),
    ]);
    Arc::new(Schema::new(fields))
}

/// The column of the rollup tables holding each row's dimension set, and its name.
pub(super) const ROLLUP_DIMS_COLUMN: usize = 16;
pub(super) const ROLLUP_DIMS_NAME: &str = "dims";

// Batches are built a column at a time, each column in the order of its schema.

/// The `log_partition` column: a batch holds the rows of one partition.
fn partition_column(partition: u16, rows: usize) -> ArrayRef {
    Arc::new(UInt16Array::from(vec![partition; rows]))
}

/// A text column, one value per row.
fn text_column<S: AsRef<str>>(values: impl Iterator<Item = S>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(values))
}

/// A list-of-strings column, one list per row.
fn text_list_column<'a, L>(rows: impl Iterator<Item = L>) -> ArrayRef
where
    L: IntoIterator<Item = &'a String>,
{
    let lists = rows.map(|list| Some(list.into_iter().map(Some)));
    Arc::new(ListArray::from_nested_iter::<StringBuilder, _, _, _>(lists))
}

/// The segment columns ([`segment_fields`]) of rows with these segments.
fn segment_columns<'a>(segments: impl Iterator<Item = &'a Segment> + Clone) -> Vec<ArrayRef> {
    let mut columns: Vec<ArrayRef> = STANDARD_KEYS
        .iter()
        .map(|key| text_column(segments.clone().map(|segment| segment.get(key))))
        .collect();
    columns.push(text_list_column(
        segments.clone().map(|segment| segment.custom.keys()),
    ));
    columns.push(text_list_column(
        segments.map(|segment| segment.custom.values()),
    ));
    columns
}

pub(super) fn votes_batch(
    schema: &SchemaRef,
    partition: u16,
    votes: &[StoredVote],
) -> Result<RecordBatch> {
    let each_vote = || votes.iter().map(|stored| &stored.vote);
    let mut columns: Vec<ArrayRef> = vec![
        partition_column(partition, votes.len()),
        Arc::new(UInt64Array::from_iter_values(votes.iter().map(|s| s.seq))),
        text_column(each_vote().map(|v| &v.vote_id)),
        text_column(each_vote().map(|v| &v.poll_id)),
        text_column(each_vote().map(|v| &v.voter_key)),
        text_list_column(each_vote().map(|v| &v.choice)),
        Arc::new(Int32Array::from_iter(each_vote().map(|v| v.value))),
    ];
    columns.extend(segment_columns(each_vote().map(|v| &v.segment)));
    columns.push(Arc::new(Int64Array::from_iter_values(
        each_vote().map(|v| v.received_at),
    )));
    RecordBatch::try_new(schema.clone(), columns).map_err(storage)
}

pub(super) fn windows_batch(
    schema: &SchemaRef,
    partition: u16,
    rows: &[WindowRow],
) -> Result<RecordBatch> {
    let columns: Vec<ArrayRef> = vec![
        partition_column(partition, rows.len()),
        text_column(rows.iter().map(|r| &r.poll_id)),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.window_start),
        )),
        Arc::new(UInt32Array::from_iter_values(
            rows.iter().map(|r| r.window_seconds),
        )),
        text_column(rows.iter().map(|r| &r.option)),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.votes))),
        Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|r| r.last_seq),
        )),
    ];
    RecordBatch::try_new(schema.clone(), columns).map_err(storage)
}

pub(super) fn rollups_batch(
    schema: &SchemaRef,
    partition: u16,
    rows: &[RollupRow],
) -> Result<RecordBatch> {
    let answer_votes = rows
        .iter()
        .map(|r| Some(r.answer_votes.iter().copied().map(Some)));
    let mut columns: Vec<ArrayRef> = vec![
        partition_column(partition, rows.len()),
        text_column(rows.iter().map(|r| &r.poll_id)),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.bucket_start),
        )),
        Arc::new(UInt32Array::from_iter_values(
            rows.iter().map(|r| r.bucket_seconds),
        )),
    ];
    columns.extend(segment_columns(rows.iter().map(|r| &r.segment)));
    columns.extend([
        Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|r| r.ballots),
        )) as ArrayRef,
        text_list_column(rows.iter().map(|r| &r.answers)),
        Arc::new(ListArray::from_iter_primitive::<UInt64Type, _, _>(
            answer_votes,
        )),
        Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|r| r.last_seq),
        )),
        text_column(rows.iter().map(|r| &r.dims)),
    ]);
    RecordBatch::try_new(schema.clone(), columns).map_err(storage)
}

/// The rows of a batch of [`rollups_schema`], as [`rollups_batch`] got them.
pub(super) fn rollup_rows(batch: &RecordBatch) -> Result<Vec<RollupRow>> {
    let batches = std::slice::from_ref(batch);
    let polls = strings(batches, 1)?;
    let starts = column(batches, 2, &DataType::Int64, |a: &Int64Array, i| a.value(i))?;
    let widths = column(batches, 3, &DataType::UInt32, |a: &UInt32Array, i| {
        a.value(i)
    })?;
    let segments = segments(batch, 4)?;
    let ballots = u64s(batches, 12)?;
    let answers = string_lists(batch, 13)?;
    let answer_votes = lists(batch, 14, &DataType::UInt64, |a: &UInt64Array| {
        a.values().to_vec()
    })?;
    let last_seqs = u64s(batches, 15)?;
    // A file written before the cube has whole segments only.
    let dims = if batch.num_columns() > ROLLUP_DIMS_COLUMN {
        strings(batches, ROLLUP_DIMS_COLUMN)?
    } else {
        vec![String::new(); batch.num_rows()]
    };
    Ok(segments
        .into_iter()
        .zip(answers)
        .zip(answer_votes)
        .enumerate()
        .map(|(row, ((segment, answers), answer_votes))| RollupRow {
            poll_id: polls[row].clone(),
            dims: dims[row].clone(),
            bucket_start: starts[row],
            bucket_seconds: widths[row],
            segment,
            ballots: ballots[row],
            answers,
            answer_votes,
            last_seq: last_seqs[row],
        })
        .collect())
}

/// The segments of `batch`, whose segment columns ([`segment_fields`]) start at column
/// `first`.
fn segments(batch: &RecordBatch, first: usize) -> Result<Vec<Segment>> {
    let batches = std::slice::from_ref(batch);
    let text: Vec<Vec<String>> = (first..first + STANDARD_KEYS.len())
        .map(|i| strings(batches, i))
        .collect::<Result<_>>()?;
    let keys = string_lists(batch, first + STANDARD_KEYS.len())?;
    let values = string_lists(batch, first + STANDARD_KEYS.len() + 1)?;
    Ok(keys
        .into_iter()
        .zip(values)
        .enumerate()
        .map(|(row, (keys, values))| {
            let mut text = text.iter().map(|column| column[row].clone());
            let mut next = || text.next().expect("six text columns");
            Segment {
                campaign: next(),
                channel: next(),
                source: next(),
                medium: next(),
                country: next(),
                device: next(),
                custom: keys.into_iter().zip(values).collect(),
            }
        })
        .collect())
}

/// Column `index` of every batch, cast to `as_type` and read with `value` (nulls as the
/// default).
fn column<A: Array + 'static, T: Default>(
    batches: &[RecordBatch],
    index: usize,
    as_type: &DataType,
    value: impl Fn(&A, usize) -> T,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for batch in batches {
        let cast = cast(batch.column(index), as_type).map_err(storage)?;
        let array = cast
            .as_any()
            .downcast_ref::<A>()
            .ok_or_else(|| storage(format!("expected a {as_type} column")))?;
        out.extend((0..array.len()).map(|i| {
            if array.is_null(i) {
                T::default()
            } else {
                value(array, i)
            }
        }));
    }
    Ok(out)
}

/// Column `index` of every batch as u64 (nulls as 0).
pub(super) fn u64s(batches: &[RecordBatch], index: usize) -> Result<Vec<u64>> {
    column(batches, index, &DataType::UInt64, |a: &UInt64Array, i| {
        a.value(i)
    })
}

/// Column `index` of every batch as strings (nulls as "").
pub(super) fn strings(batches: &[RecordBatch], index: usize) -> Result<Vec<String>> {
    column(batches, index, &DataType::Utf8, |a: &StringArray, i| {
        a.value(i).to_owned()
    })
}

/// Rows of the `columns` text columns, as one key per row.
pub(super) fn group_keys(batches: &[RecordBatch], columns: usize) -> Result<Vec<Vec<String>>> {
    let columns: Vec<Vec<String>> = (0..columns)
        .map(|i| strings(batches, i))
        .collect::<Result<_>>()?;
    let rows = batches.iter().map(RecordBatch::num_rows).sum();
    Ok((0..rows)
        .map(|row| columns.iter().map(|c| c[row].clone()).collect())
        .collect())
}

/// A list column, row by row: each row's values cast to `as_type` and read with `values`.
fn lists<A: Array + 'static, T>(
    batch: &RecordBatch,
    index: usize,
    as_type: &DataType,
    values: impl Fn(&A) -> Vec<T>,
) -> Result<Vec<Vec<T>>> {
    let list = batch
        .column(index)
        .as_any()
        .downcast_ref::<ListArray>()
        .ok_or_else(|| storage("expected a list column"))?;
    (0..list.len())
        .map(|row| {
            let cast = cast(&list.value(row), as_type).map_err(storage)?;
            let array = cast
                .as_any()
                .downcast_ref::<A>()
                .ok_or_else(|| storage(format!("expected a list of {as_type}")))?;
            Ok(values(array))
        })
        .collect()
}

fn string_lists(batch: &RecordBatch, index: usize) -> Result<Vec<Vec<String>>> {
    lists(batch, index, &DataType::Utf8, |a: &StringArray| {
        (0..a.len()).map(|i| a.value(i).to_owned()).collect()
    })
}

/// `count` votes of poll `p` for option `a`, at positions 1 onwards, each with its own id
/// and voter key, the country `country(i)` of the i-th: rows for tests of the files and
/// queries.
#[cfg(test)]
pub(super) fn test_votes(count: u64, country: impl Fn(u64) -> String) -> Vec<StoredVote> {
    (0..count)
        .map(|i| StoredVote {
            seq: i + 1,
            vote: tally_core::vote::Vote {
                vote_id: format!("v{i}"),
                poll_id: "p".into(),
                voter_key: format!("k{i:08x}"),
                choice: vec!["a".into()],
                value: None,
                segment: Segment {
                    country: country(i),
                    ..Default::default()
                },
                received_at: 1_700_000_000_000 + i as i64,
            },
        })
        .collect()
}
