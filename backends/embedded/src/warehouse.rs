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

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use arrow::array::{
    Array, ArrayRef, Int32Builder, Int64Array, Int64Builder, ListArray, ListBuilder, RecordBatch,
    StringArray, StringBuilder, UInt16Array, UInt16Builder, UInt32Array, UInt32Builder,
    UInt64Array, UInt64Builder,
};
use arrow::compute::{cast, concat_batches, lexsort_to_indices, take_record_batch, SortColumn};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::common::ScalarValue;
use datafusion::datasource::MemTable;
use datafusion::execution::context::{SessionConfig, SessionContext};
use datafusion::prelude::ParquetReadOptions;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use tally_core::analytics::{Breakdown, BreakdownQuery, Dimension, TimePoint, TimeseriesQuery};
use tally_core::ports::{StoredVote, Warehouse, Watermarks, WindowRow};
use tally_core::results::Tally;
use tally_core::rollup::{
    self, BreakdownPlan, BreakdownRow, RollupLevel, RollupRow, BREAKDOWN_ROW_LIMIT,
};
use tally_core::segment::{Segment, STANDARD_KEYS};
use tally_core::{Error, Result};
use tokio_util::sync::CancellationToken;

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

fn list_field() -> Arc<Field> {
    Arc::new(Field::new_list_field(DataType::Utf8, true))
}

/// The segment columns votes and rollups both store: the standard keys, then the poll's
/// own keys and values, in the order [`SegmentColumns`] builds and reads them.
fn segment_fields() -> Vec<Field> {
    let mut fields: Vec<Field> = STANDARD_KEYS
        .iter()
        .map(|name| Field::new(*name, DataType::Utf8, false))
        .collect();
    fields.push(Field::new("dim_keys", DataType::List(list_field()), false));
    fields.push(Field::new(
        "dim_values",
        DataType::List(list_field()),
        false,
    ));
    fields
}

fn votes_schema() -> SchemaRef {
    let text = |name: &str| Field::new(name, DataType::Utf8, false);
    let mut fields = vec![
        Field::new("log_partition", DataType::UInt16, false),
        Field::new("seq", DataType::UInt64, false),
        text("vote_id"),
        text("poll_id"),
        text("voter_key"),
        Field::new("choice", DataType::List(list_field()), false),
        Field::new("value", DataType::Int32, true),
    ];
    fields.extend(segment_fields());
    fields.push(Field::new("received_ms", DataType::Int64, false));
    Arc::new(Schema::new(fields))
}

fn windows_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("log_partition", DataType::UInt16, false),
        Field::new("poll_id", DataType::Utf8, false),
        Field::new("window_start", DataType::Int64, false),
        Field::new("window_seconds", DataType::UInt32, false),
        Field::new("option", DataType::Utf8, false),
        Field::new("votes", DataType::UInt64, false),
        Field::new("last_seq", DataType::UInt64, false),
    ]))
}

fn rollups_schema() -> SchemaRef {
    let mut fields = vec![
        Field::new("log_partition", DataType::UInt16, false),
        Field::new("poll_id", DataType::Utf8, false),
        Field::new("bucket_start", DataType::Int64, false),
        Field::new("bucket_seconds", DataType::UInt32, false),
    ];
    fields.extend(segment_fields());
    fields.extend([
        Field::new("ballots", DataType::UInt64, false),
        Field::new("answers", DataType::List(list_field()), false),
        Field::new(
            "answer_votes",
            DataType::List(Arc::new(Field::new_list_field(DataType::UInt64, true))),
            false,
        ),
        Field::new("last_seq", DataType::UInt64, false),
    ]);
    Arc::new(Schema::new(fields))
}

/// Builds the segment columns ([`segment_fields`]) row by row, and reads them back.
struct SegmentColumns {
    text: Vec<StringBuilder>,
    dim_keys: ListBuilder<StringBuilder>,
    dim_values: ListBuilder<StringBuilder>,
}

impl SegmentColumns {
    fn new() -> Self {
        SegmentColumns {
            text: STANDARD_KEYS.iter().map(|_| StringBuilder::new()).collect(),
            dim_keys: ListBuilder::new(StringBuilder::new()).with_field(list_field()),
            dim_values: ListBuilder::new(StringBuilder::new()).with_field(list_field()),
        }
    }

    fn append(&mut self, segment: &Segment) {
        for (builder, key) in self.text.iter_mut().zip(STANDARD_KEYS) {
            builder.append_value(segment.get(key));
        }
        for (key, value) in &segment.custom {
            self.dim_keys.values().append_value(key);
            self.dim_values.values().append_value(value);
        }
        self.dim_keys.append(true);
        self.dim_values.append(true);
    }

    fn finish(mut self) -> Vec<ArrayRef> {
        let mut columns: Vec<ArrayRef> = self
            .text
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef)
            .collect();
        columns.push(Arc::new(self.dim_keys.finish()));
        columns.push(Arc::new(self.dim_values.finish()));
        columns
    }

    /// The segments of `batch`, whose segment columns start at column `first`.
    fn read(batch: &RecordBatch, first: usize) -> Result<Vec<Segment>> {
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
}

fn rollups_batch(schema: &SchemaRef, partition: u16, rows: &[RollupRow]) -> Result<RecordBatch> {
    let mut log_partition = UInt16Builder::with_capacity(rows.len());
    let mut poll_id = StringBuilder::new();
    let mut bucket_start = Int64Builder::with_capacity(rows.len());
    let mut bucket_seconds = UInt32Builder::with_capacity(rows.len());
    let mut segments = SegmentColumns::new();
    let mut ballots = UInt64Builder::with_capacity(rows.len());
    let mut answers = ListBuilder::new(StringBuilder::new()).with_field(list_field());
    let mut answer_votes = ListBuilder::new(UInt64Builder::new())
        .with_field(Arc::new(Field::new_list_field(DataType::UInt64, true)));
    let mut last_seq = UInt64Builder::with_capacity(rows.len());
    for row in rows {
        log_partition.append_value(partition);
        poll_id.append_value(&row.poll_id);
        bucket_start.append_value(row.bucket_start);
        bucket_seconds.append_value(row.bucket_seconds);
        segments.append(&row.segment);
        ballots.append_value(row.ballots);
        for answer in &row.answers {
            answers.values().append_value(answer);
        }
        answers.append(true);
        for votes in &row.answer_votes {
            answer_votes.values().append_value(*votes);
        }
        answer_votes.append(true);
        last_seq.append_value(row.last_seq);
    }
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(log_partition.finish()),
        Arc::new(poll_id.finish()),
        Arc::new(bucket_start.finish()),
        Arc::new(bucket_seconds.finish()),
    ];
    columns.extend(segments.finish());
    columns.extend([
        Arc::new(ballots.finish()) as ArrayRef,
        Arc::new(answers.finish()),
        Arc::new(answer_votes.finish()),
        Arc::new(last_seq.finish()),
    ]);
    RecordBatch::try_new(schema.clone(), columns).map_err(storage)
}

fn votes_batch(schema: &SchemaRef, partition: u16, votes: &[StoredVote]) -> Result<RecordBatch> {
    let mut log_partition = UInt16Builder::with_capacity(votes.len());
    let mut seq = UInt64Builder::with_capacity(votes.len());
    let mut text: Vec<StringBuilder> = (0..3).map(|_| StringBuilder::new()).collect();
    let mut choice = ListBuilder::new(StringBuilder::new()).with_field(list_field());
    let mut value = Int32Builder::with_capacity(votes.len());
    let mut segments = SegmentColumns::new();
    let mut received = Int64Builder::with_capacity(votes.len());
    for stored in votes {
        let vote = &stored.vote;
        log_partition.append_value(partition);
        seq.append_value(stored.seq);
        for (builder, value) in text
            .iter_mut()
            .zip([&vote.vote_id, &vote.poll_id, &vote.voter_key])
        {
            builder.append_value(value);
        }
        for option in &vote.choice {
            choice.values().append_value(option);
        }
        choice.append(true);
        value.append_option(vote.value);
        segments.append(&vote.segment);
        received.append_value(vote.received_at);
    }
    let mut columns: Vec<ArrayRef> = vec![Arc::new(log_partition.finish()), Arc::new(seq.finish())];
    columns.extend(text.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    columns.push(Arc::new(choice.finish()));
    columns.push(Arc::new(value.finish()));
    columns.extend(segments.finish());
    columns.push(Arc::new(received.finish()));
    RecordBatch::try_new(schema.clone(), columns).map_err(storage)
}

fn windows_batch(schema: &SchemaRef, partition: u16, rows: &[WindowRow]) -> Result<RecordBatch> {
    let mut log_partition = UInt16Builder::new();
    let mut poll_id = StringBuilder::new();
    let mut window_start = Int64Builder::new();
    let mut window_seconds = UInt32Builder::new();
    let mut option = StringBuilder::new();
    let mut votes = UInt64Builder::new();
    let mut last_seq = UInt64Builder::new();
    for row in rows {
        log_partition.append_value(partition);
        poll_id.append_value(&row.poll_id);
        window_start.append_value(row.window_start);
        window_seconds.append_value(row.window_seconds);
        option.append_value(&row.option);
        votes.append_value(row.votes);
        last_seq.append_value(row.last_seq);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(log_partition.finish()),
        Arc::new(poll_id.finish()),
        Arc::new(window_start.finish()),
        Arc::new(window_seconds.finish()),
        Arc::new(option.finish()),
        Arc::new(votes.finish()),
        Arc::new(last_seq.finish()),
    ];
    RecordBatch::try_new(schema.clone(), columns).map_err(storage)
}

/// A Parquet file of one table and partition, holding log positions `first..=last`.
/// Deleted from disk when it is both replaced by a merge and no longer read by a query.
#[derive(Debug)]
struct DataFile {
    path: PathBuf,
    partition: u16,
    first: u64,
    last: u64,
    rows: usize,
    obsolete: AtomicBool,
}

impl DataFile {
    fn name(partition: u16, first: u64, last: u64) -> String {
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

#[derive(Default)]
struct Tail {
    batches: Vec<RecordBatch>,
    rows: usize,
    /// When the oldest unflushed batch came in.
    since: Option<Instant>,
}

#[derive(Default)]
struct Table {
    files: Vec<Arc<DataFile>>,
    tails: BTreeMap<u16, Tail>,
    /// Highest log position held, per partition (files and tail).
    marks: HashMap<u16, u64>,
}

type MaintenanceLock = Arc<tokio::sync::Mutex<()>>;

struct Inner {
    root: PathBuf,
    options: WarehouseOptions,
    votes_schema: SchemaRef,
    windows_schema: SchemaRef,
    rollups_schema: SchemaRef,
    tables: RwLock<HashMap<Kind, Table>>,
    /// Serialises flushes and merges of one table and partition.
    maintenance: std::sync::Mutex<HashMap<(Kind, u16), MaintenanceLock>>,
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
        for kind in Kind::ALL {
            let dir = root.join(kind.table());
            std::fs::create_dir_all(&dir).map_err(storage)?;
            tables.insert(kind, load_table(&dir)?);
        }
        let inner = Arc::new(Inner {
            root,
            options,
            votes_schema: votes_schema(),
            windows_schema: windows_schema(),
            rollups_schema: rollups_schema(),
            tables: RwLock::new(tables),
            maintenance: Default::default(),
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
}

/// Reads a table's directory: parses file names, drops leftovers of interrupted writes and
/// merges, and derives the watermarks.
fn load_table(dir: &Path) -> Result<Table> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(storage)? {
        let path = entry.map_err(storage)?.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let Some((partition, first, last)) = DataFile::parse(&path) else {
            continue;
        };
        let rows = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).map_err(storage)?)
            .map_err(storage)?
            .metadata()
            .file_metadata()
            .num_rows() as usize;
        files.push(DataFile {
            path,
            partition,
            first,
            last,
            rows,
            obsolete: AtomicBool::new(false),
        });
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
    Ok(table)
}

impl ParquetWarehouse {
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

/// Sorts rows by poll and position, so Parquet row-group statistics prune other polls.
fn sort_for_storage(kind: Kind, batch: &RecordBatch) -> Result<RecordBatch> {
    let columns = [
        SortColumn {
            values: batch.column(kind.poll_column()).clone(),
            options: None,
        },
        SortColumn {
            values: batch.column(kind.seq_column()).clone(),
            options: None,
        },
    ];
    let indices = lexsort_to_indices(&columns, None).map_err(storage)?;
    take_record_batch(batch, &indices).map_err(storage)
}

/// Adds up the rollup rows of one poll, bucket and segment, so a file holds one row per
/// segment and bucket however many flushes it covers. A row keeps the highest `last_seq` of
/// its inputs: breakdowns read every row of a poll up to its newest `last_seq`, and the
/// file's name, not its rows, records the log range it covers.
fn compact_rollups(schema: &SchemaRef, batch: &RecordBatch) -> Result<RecordBatch> {
    if batch.num_rows() == 0 {
        return Ok(batch.clone());
    }
    let batches = std::slice::from_ref(batch);
    let partitions = column(batches, 0, &DataType::UInt16, |a: &UInt16Array, i| {
        a.value(i)
    })?;
    let polls = strings(batches, 1)?;
    let starts = column(batches, 2, &DataType::Int64, |a: &Int64Array, i| a.value(i))?;
    let widths = column(batches, 3, &DataType::UInt32, |a: &UInt32Array, i| {
        a.value(i)
    })?;
    let segments = SegmentColumns::read(batch, 4)?;
    let ballots = u64s(batches, 12)?;
    let answers = string_lists(batch, 13)?;
    let answer_votes = lists(batch, 14, &DataType::UInt64, |a: &UInt64Array| {
        a.values().to_vec()
    })?;
    let last_seqs = u64s(batches, 15)?;

    type Key = (String, i64, u32, Segment);
    let mut merged: HashMap<Key, (u64, BTreeMap<String, u64>, u64)> = HashMap::new();
    for (row, segment) in segments.into_iter().enumerate() {
        let key = (polls[row].clone(), starts[row], widths[row], segment);
        let entry = merged.entry(key).or_default();
        entry.0 += ballots[row];
        for (answer, votes) in answers[row].iter().zip(&answer_votes[row]) {
            *entry.1.entry(answer.clone()).or_default() += votes;
        }
        entry.2 = entry.2.max(last_seqs[row]);
    }
    let rows: Vec<RollupRow> = merged
        .into_iter()
        .map(
            |((poll_id, bucket_start, bucket_seconds, segment), (ballots, answers, last_seq))| {
                RollupRow {
                    poll_id,
                    bucket_start,
                    bucket_seconds,
                    segment,
                    ballots,
                    answers: answers.keys().cloned().collect(),
                    answer_votes: answers.into_values().collect(),
                    last_seq,
                }
            },
        )
        .collect();
    rollups_batch(schema, partitions[0], &rows)
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

/// Writes `batches` to `dir/name` atomically: a temp file, fsync, rename, fsync of the dir.
/// Returns the file and the rows written (fewer than given for rollups, which are added up).
fn write_file(
    kind: Kind,
    schema: &SchemaRef,
    dir: &Path,
    name: &str,
    batches: &[RecordBatch],
) -> Result<(PathBuf, usize)> {
    let batch = concat_batches(schema, batches).map_err(storage)?;
    // Fresh rollups keep their rows: a breakdown tells them apart by `last_seq`.
    let batch = match kind {
        Kind::Rollups(RollupLevel::Settled) => compact_rollups(schema, &batch)?,
        _ => batch,
    };
    let batch = sort_for_storage(kind, &batch)?;
    let rows = batch.num_rows();
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let file = File::create(&tmp).map_err(storage)?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(64 * 1024))
        .build();
    let mut writer =
        ArrowWriter::try_new(file, schema.clone(), Some(properties)).map_err(storage)?;
    writer.write(&batch).map_err(storage)?;
    let file = writer.into_inner().map_err(storage)?;
    file.sync_all().map_err(storage)?;
    std::fs::rename(&tmp, &path).map_err(storage)?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(storage)?;
    Ok((path, rows))
}

fn read_file(path: &Path) -> Result<Vec<RecordBatch>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).map_err(storage)?)
        .map_err(storage)?
        .build()
        .map_err(storage)?;
    reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(storage)
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

impl Inner {
    fn schema(&self, kind: Kind) -> &SchemaRef {
        match kind {
            Kind::Votes => &self.votes_schema,
            Kind::Windows => &self.windows_schema,
            Kind::Rollups(_) => &self.rollups_schema,
        }
    }

    fn maintenance_lock(&self, kind: Kind, partition: u16) -> MaintenanceLock {
        self.maintenance
            .lock()
            .expect("maintenance lock")
            .entry((kind, partition))
            .or_default()
            .clone()
    }

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

    /// A flush an insert asked for. The insert itself has succeeded (its rows are in the
    /// tail and visible), so a failed write is not the insert's error — reporting it would
    /// make the caller retry and add the rows twice. The background flusher tries again.
    async fn flush_after_insert(self: &Arc<Self>, kind: Kind, partition: u16) {
        if let Err(err) = self.flush(kind, partition).await {
            tracing::warn!(table = kind.table(), partition, error = %err, "writing the warehouse tail failed; will retry");
        }
    }

    async fn flush_where(self: &Arc<Self>, due: impl Fn(&Tail) -> bool) -> Result<()> {
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
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let dir = self.root.join(kind.table());
        let name = DataFile::name(partition, first, last);
        let schema = self.schema(kind).clone();
        let written = batches.clone();
        let (path, file_rows) =
            tokio::task::spawn_blocking(move || write_file(kind, &schema, &dir, &name, &written))
                .await
                .map_err(storage)??;
        {
            let mut tables = self.tables.write().expect("warehouse lock");
            let table = tables.get_mut(&kind).expect("every table exists");
            table.files.push(Arc::new(DataFile {
                path,
                partition,
                first,
                last,
                rows: file_rows,
                obsolete: AtomicBool::new(false),
            }));
            let tail = table.tails.entry(partition).or_default();
            // Only this flush removes batches, and inserts only append: the first
            // `batches.len()` batches are exactly the ones written.
            tail.batches.drain(..batches.len());
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
        let dir = self.root.join(kind.table());
        let name = DataFile::name(partition, first, last);
        let schema = self.schema(kind).clone();
        let inputs: Vec<PathBuf> = run.iter().map(|f| f.path.clone()).collect();
        let started = Instant::now();
        let (path, rows) = tokio::task::spawn_blocking(move || -> Result<(PathBuf, usize)> {
            let mut batches = Vec::new();
            for input in &inputs {
                batches.extend(read_file(input)?);
            }
            write_file(kind, &schema, &dir, &name, &batches)
        })
        .await
        .map_err(storage)??;
        {
            let mut tables = self.tables.write().expect("warehouse lock");
            let table = tables.get_mut(&kind).expect("every table exists");
            table
                .files
                .retain(|f| !run.iter().any(|merged| Arc::ptr_eq(f, merged)));
            table.files.push(Arc::new(DataFile {
                path,
                partition,
                first,
                last,
                rows,
                obsolete: AtomicBool::new(false),
            }));
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

    /// A query context over a consistent snapshot of some tables: their files (kept alive
    /// until the context is dropped) and their in-memory tails.
    async fn snapshot(&self, kinds: &[Kind]) -> Result<Snapshot> {
        // Every table's files and tail under one lock, so the tables agree with each other.
        let tables: Vec<(Kind, Vec<Arc<DataFile>>, Vec<RecordBatch>)> = {
            let tables = self.tables.read().expect("warehouse lock");
            kinds
                .iter()
                .map(|&kind| {
                    let table = &tables[&kind];
                    let batches = table
                        .tails
                        .values()
                        .flat_map(|t| t.batches.iter().cloned())
                        .collect();
                    (kind, table.files.clone(), batches)
                })
                .collect()
        };
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(2));
        let mut kept = Vec::new();
        for (kind, files, batches) in tables {
            let schema = self.schema(kind).clone();
            let memory = MemTable::try_new(schema.clone(), vec![batches]).map_err(storage)?;
            let mut frame = ctx.read_table(Arc::new(memory)).map_err(storage)?;
            if !files.is_empty() {
                let paths: Vec<String> = files
                    .iter()
                    .map(|f| f.path.to_string_lossy().into_owned())
                    .collect();
                let stored = ctx
                    .read_parquet(paths, ParquetReadOptions::default().schema(&schema))
                    .await
                    .map_err(storage)?;
                frame = stored.union(frame).map_err(storage)?;
            }
            ctx.register_table(kind.table(), frame.into_view())
                .map_err(storage)?;
            kept.extend(files);
        }
        Ok(Snapshot { ctx, _files: kept })
    }
}

struct Snapshot {
    ctx: SessionContext,
    _files: Vec<Arc<DataFile>>,
}

impl Snapshot {
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

fn text(value: &str) -> ScalarValue {
    ScalarValue::Utf8(Some(value.to_owned()))
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
fn u64s(batches: &[RecordBatch], index: usize) -> Result<Vec<u64>> {
    column(batches, index, &DataType::UInt64, |a: &UInt64Array, i| {
        a.value(i)
    })
}

/// Column `index` of every batch as strings (nulls as "").
fn strings(batches: &[RecordBatch], index: usize) -> Result<Vec<String>> {
    column(batches, index, &DataType::Utf8, |a: &StringArray, i| {
        a.value(i).to_owned()
    })
}

/// Rows of the `columns` text columns, as one key per row.
fn group_keys(batches: &[RecordBatch], columns: usize) -> Result<Vec<Vec<String>>> {
    let columns: Vec<Vec<String>> = (0..columns)
        .map(|i| strings(batches, i))
        .collect::<Result<_>>()?;
    let rows = batches.iter().map(RecordBatch::num_rows).sum();
    Ok((0..rows)
        .map(|row| columns.iter().map(|c| c[row].clone()).collect())
        .collect())
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

/// The segment filters of a breakdown as ` AND` clauses, with their parameters (`$1` is
/// the poll id).
fn segment_filter(query: &BreakdownQuery) -> Result<(String, Vec<ScalarValue>)> {
    let mut params = vec![text(&query.poll_id)];
    let mut filter = String::new();
    for (dimension, values) in &query.filters {
        let expr = dimension_expr(dimension)?;
        let mut alternatives = Vec::new();
        for value in values {
            params.push(text(value));
            alternatives.push(format!("{expr} = ${}", params.len()));
        }
        if alternatives.is_empty() {
            alternatives.push("false".into());
        }
        filter.push_str(&format!(" AND ({})", alternatives.join(" OR ")));
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
        if votes.is_empty() {
            return Ok(());
        }
        let batch = votes_batch(&self.inner.votes_schema, partition, votes)?;
        if self.inner.append(Kind::Votes, partition, batch) {
            self.inner.flush_after_insert(Kind::Votes, partition).await;
        }
        Ok(())
    }

    async fn insert_windows(&self, partition: u16, rows: &[WindowRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let batch = windows_batch(&self.inner.windows_schema, partition, rows)?;
        if self.inner.append(Kind::Windows, partition, batch) {
            self.inner
                .flush_after_insert(Kind::Windows, partition)
                .await;
        }
        Ok(())
    }

    async fn insert_rollups(
        &self,
        partition: u16,
        level: RollupLevel,
        rows: &[RollupRow],
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let batch = rollups_batch(&self.inner.rollups_schema, partition, rows)?;
        let kind = Kind::Rollups(level);
        if self.inner.append(kind, partition, batch) {
            self.inner.flush_after_insert(kind, partition).await;
        }
        Ok(())
    }

    async fn tally(&self, poll_id: &str) -> Result<Tally> {
        let snapshot = self.inner.snapshot(&[Kind::Votes]).await?;
        let totals = snapshot
            .query(
                "SELECT count(*), count(DISTINCT nullif(voter_key, '')), max(seq) FROM votes WHERE poll_id = $1",
                vec![text(poll_id)],
            )
            .await?;
        let counts = snapshot
            .query(
                "SELECT opt, count(*) FROM (SELECT unnest(choice) AS opt FROM votes WHERE poll_id = $1) GROUP BY opt",
                vec![text(poll_id)],
            )
            .await?;
        let options = strings(&counts, 0)?;
        let numbers = u64s(&counts, 1)?;
        let first = |column| -> Result<u64> {
            Ok(u64s(&totals, column)?.first().copied().unwrap_or_default())
        };
        Ok(Tally {
            ballots: first(0)?,
            unique_voters: first(1)?,
            counts: options.into_iter().zip(numbers).collect(),
            as_of: first(2)?,
        })
    }

    async fn voter_keys(&self, poll_id: &str) -> Result<Vec<String>> {
        let snapshot = self.inner.snapshot(&[Kind::Votes]).await?;
        let keys = snapshot
            .query(
                "SELECT DISTINCT voter_key FROM votes WHERE poll_id = $1 AND voter_key <> ''",
                vec![text(poll_id)],
            )
            .await?;
        strings(&keys, 0)
    }

    async fn breakdown(&self, query: &BreakdownQuery) -> Result<Breakdown> {
        let plan = BreakdownPlan::new(query.from_ms, query.to_ms);
        let (fresh_kind, settled_kind) = (
            Kind::Rollups(RollupLevel::Fresh),
            Kind::Rollups(RollupLevel::Settled),
        );
        let kinds: &[Kind] = if plan.raw.is_empty() {
            &[fresh_kind, settled_kind]
        } else {
            &[fresh_kind, settled_kind, Kind::Votes]
        };
        let snapshot = self.inner.snapshot(kinds).await?;
        let positions = snapshot
            .query(
                &format!(
                    "SELECT (SELECT max(last_seq) FROM {} WHERE poll_id = $1), \
                     (SELECT max(last_seq) FROM {} WHERE poll_id = $1)",
                    settled_kind.table(),
                    fresh_kind.table()
                ),
                vec![text(&query.poll_id)],
            )
            .await?;
        let settled = u64s(&positions, 0)?.first().copied().unwrap_or_default();
        let fresh = u64s(&positions, 1)?.first().copied().unwrap_or_default();
        let as_of = settled.max(fresh);
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
        let mut groups: Vec<String> = (0..dims).map(|i| format!("g{i}")).collect();
        groups.push("opt".into());
        let groups = groups.join(", ");

        // Rows of (group values…, answer, count); answer '' holds the ballots.
        let mut parts = Vec::new();
        if let Some(buckets) = plan.buckets {
            let mut inner = select.clone();
            inner.push("unnest(array_prepend('', answers)) AS opt".into());
            inner.push("unnest(array_prepend(ballots, answer_votes)) AS n".into());
            let inner = inner.join(", ");
            let buckets = range_clause("bucket_start", buckets);
            parts.push(format!(
                "SELECT {groups}, sum(n) FROM (\
                 SELECT {inner} FROM {} WHERE poll_id = $1 AND last_seq <= {settled} AND {buckets}{filter} \
                 UNION ALL \
                 SELECT {inner} FROM {} WHERE poll_id = $1 AND last_seq > {settled} AND last_seq <= {fresh} AND {buckets}{filter}\
                 ) GROUP BY {groups} LIMIT {BREAKDOWN_ROW_LIMIT}",
                settled_kind.table(),
                fresh_kind.table(),
            ));
        }
        if !plan.raw.is_empty() {
            let ranges: Vec<String> = plan
                .raw
                .iter()
                .map(|range| range_clause("received_ms", *range))
                .collect();
            select.push("unnest(array_prepend('', choice)) AS opt".into());
            parts.push(format!(
                "SELECT {groups}, count(*) FROM (SELECT {} FROM votes \
                 WHERE poll_id = $1 AND seq <= {as_of} AND ({}){filter}) \
                 GROUP BY {groups} LIMIT {BREAKDOWN_ROW_LIMIT}",
                select.join(", "),
                ranges.join(" OR "),
            ));
        }
        let mut rows: Vec<Vec<BreakdownRow>> = Vec::new();
        for sql in parts {
            let part = snapshot.query(&sql, params.clone()).await?;
            rows.push(
                group_keys(&part, dims)?
                    .into_iter()
                    .zip(strings(&part, dims)?)
                    .zip(u64s(&part, dims + 1)?)
                    .map(|((group, answer), count)| (group, answer, count))
                    .collect(),
            );
        }
        rollup::assemble(rows, as_of)
    }

    async fn window_widths(&self, poll_id: &str) -> Result<Vec<u32>> {
        let snapshot = self.inner.snapshot(&[Kind::Windows]).await?;
        let rows = snapshot
            .query(
                "SELECT DISTINCT window_seconds FROM vote_windows WHERE poll_id = $1 ORDER BY window_seconds",
                vec![text(poll_id)],
            )
            .await?;
        Ok(u64s(&rows, 0)?.into_iter().map(|w| w as u32).collect())
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
        let snapshot = self.inner.snapshot(&[Kind::Windows]).await?;
        let rows = snapshot
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

    async fn check(&self) -> Result<()> {
        std::fs::metadata(&self.inner.root).map_err(storage)?;
        Ok(())
    }
}
