//! The formats analysts' rows leave in — JSON, CSV, NDJSON and Parquet — written batch by
//! batch as the warehouse makes them, so an answer never sits in memory whole.
//!
//! An answer starts once the first rows are in hand (or the query is done): a query refused
//! or stopped before then is a problem+json 4xx like any other. One that fails after the
//! response has started cannot change its status any more; its body is cut off without its
//! end (no closing chunk), which every HTTP client reports as an error, so a cut answer is
//! never taken for a whole one.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::{DataType, FieldRef, SchemaRef};
use arrow::json::writer::{make_encoder, EncoderOptions, LineDelimited, WriterBuilder};
use arrow::json::StructMode;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use futures::StreamExt;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use tally_core::analyst;
use tally_core::ports::{AnalystRows, BoxStream};
use tally_core::problem::Problem;
use tally_core::Result;
use tally_service::http::{ApiError, Reply};

/// The header that names the log position an answer is exact as of.
pub(crate) const AS_OF_HEADER: &str = "tally-as-of";

/// Rows (by the engine's measure of their memory) taken before the response starts: a
/// small answer, or a refusal that comes with its first rows, is still a clear 4xx.
const PREFETCH_BYTES: usize = 1024 * 1024;

/// Rows per Parquet row group at most, and bytes of one at most: the writer holds one row
/// group in memory before it goes out.
const PARQUET_ROW_GROUP_ROWS: usize = 64 * 1024;
const PARQUET_ROW_GROUP_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Json,
    Csv,
    Ndjson,
    Parquet,
}

const JSON: &str = "application/json";
const CSV: &str = "text/csv";
const NDJSON: &str = "application/x-ndjson";
const PARQUET: &str = "application/vnd.apache.parquet";

impl Format {
    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8; header=present",
            Format::Ndjson => NDJSON,
            Format::Parquet => PARQUET,
        }
    }

    pub(crate) fn extension(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Csv => "csv",
            Format::Ndjson => "ndjson",
            Format::Parquet => "parquet",
        }
    }

    /// The format an `Accept` header asks for: the acceptable media range with the highest
    /// `q` (the first of equals), JSON when there is none or it is `*/*`; 406 naming the
    /// formats when nothing it lists is one of them.
    pub(crate) fn from_accept(accept: Option<&str>) -> Result<Format, Problem> {
        let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
            return Ok(Format::Json);
        };
        let mut best: Option<(f32, Format)> = None;
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q=").map(str::trim))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            if q <= 0.0 {
                continue;
            }
            let format = match media.as_str() {
                "*/*" | "application/*" | JSON => Format::Json,
                "text/*" | CSV => Format::Csv,
                NDJSON | "application/ndjson" | "application/jsonl" => Format::Ndjson,
                PARQUET | "application/parquet" | "application/x-parquet" => Format::Parquet,
                _ => continue,
            };
            if best.is_none_or(|(best_q, _)| q > best_q) {
                best = Some((q, format));
            }
        }
        best.map(|(_, format)| format).ok_or_else(|| {
            Problem::new(
                406,
                "not-acceptable",
                "Not acceptable",
                format!(
                    "no format named in Accept (`{}`) is one this answers in: {JSON} (the default), {CSV}, {NDJSON} or {PARQUET} (also application/parquet)",
                    accept.chars().take(200).collect::<String>()
                ),
            )
        })
    }
}

/// The response for `rows` in `format`, streamed: `headers` added, `Tally-As-Of` set. JSON
/// is the analyst SQL document (`as_of` first; `rows_read` and `elapsed_ms`, known only at
/// the end, last); the other formats are the rows alone.
pub(crate) async fn respond(
    rows: AnalystRows,
    format: Format,
    started: Instant,
    headers: Vec<(header::HeaderName, String)>,
) -> Reply {
    let AnalystRows {
        schema,
        as_of,
        mut batches,
        rows_read,
        ..
    } = rows;
    let mut encoder = Encoder::new(format, &schema, as_of).map_err(ApiError::from)?;
    let mut early = VecDeque::new();
    let mut taken = 0;
    let mut ended = false;
    while taken < PREFETCH_BYTES {
        match batches.next().await {
            Some(Ok(batch)) => {
                taken += batch.get_array_memory_size();
                early.push_back(batch);
            }
            Some(Err(err)) => return Err(err.into()),
            None => {
                ended = true;
                break;
            }
        }
    }
    let head = encoder.head().map_err(ApiError::from)?;
    let body = Body::from_stream(futures::stream::unfold(
        Some(Streaming {
            encoder,
            head: Some(head),
            early,
            rest: (!ended).then_some(batches),
            rows_read,
            started,
        }),
        |state| async move {
            let mut state = state?;
            match state.next().await {
                Step::Chunk(bytes) => Some((Ok(bytes), Some(state))),
                Step::Last(bytes) => Some((Ok(bytes), None)),
                Step::Failed(err) => Some((Err(err), None)),
            }
        },
    ));
    let mut response = (StatusCode::OK, body).into_response();
    let out = response.headers_mut();
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    out.insert(AS_OF_HEADER, HeaderValue::from(as_of));
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            out.insert(name, value);
        }
    }
    Ok(response)
}

/// An answer on its way out.
struct Streaming {
    encoder: Encoder,
    head: Option<Bytes>,
    early: VecDeque<RecordBatch>,
    rest: Option<BoxStream<Result<RecordBatch>>>,
    rows_read: Arc<AtomicU64>,
    started: Instant,
}

enum Step {
    Chunk(Bytes),
    Last(Bytes),
    Failed(std::io::Error),
}

impl Streaming {
    async fn next(&mut self) -> Step {
        if let Some(head) = self.head.take() {
            return Step::Chunk(head);
        }
        loop {
            let batch = match self.early.pop_front() {
                Some(batch) => batch,
                None => match self.rest.as_mut() {
                    None => break,
                    Some(rest) => match rest.next().await {
                        Some(Ok(batch)) => batch,
                        Some(Err(err)) => return cut_off(&err),
                        None => {
                            self.rest = None;
                            break;
                        }
                    },
                },
            };
            match self.encoder.batch(&batch) {
                Ok(bytes) if bytes.is_empty() => continue,
                Ok(bytes) => return Step::Chunk(bytes),
                Err(err) => return cut_off(&err),
            }
        }
        let rows_read = self.rows_read.load(Ordering::Acquire);
        let elapsed_ms = self.started.elapsed().as_millis();
        match self.encoder.finish(rows_read, elapsed_ms) {
            Ok(bytes) => Step::Last(bytes),
            Err(err) => cut_off(&err),
        }
    }
}

/// An answer that fails after it started: logged, and its body cut off.
fn cut_off(err: &tally_core::Error) -> Step {
    match err {
        tally_core::Error::Invalid(problem) => {
            tracing::info!(problem = problem.slug(), detail = %problem.detail, "analyst answer stopped after it started")
        }
        other => tracing::warn!(error = %other.chain(), "analyst answer failed after it started"),
    }
    Step::Failed(std::io::Error::other("the answer was stopped"))
}

fn encoding(err: impl std::fmt::Display) -> tally_core::Error {
    tally_core::Error::failed("encoding analyst rows", err.to_string())
}

/// Writes one answer in one format.
enum Encoder {
    Json {
        as_of: u64,
        schema: SchemaRef,
        rows: u64,
    },
    Csv {
        schema: SchemaRef,
    },
    Ndjson,
    Parquet {
        writer: Option<Box<ArrowWriter<SharedBuffer>>>,
        out: SharedBuffer,
    },
}

impl Encoder {
    fn new(format: Format, schema: &SchemaRef, as_of: u64) -> Result<Encoder> {
        Ok(match format {
            Format::Json => Encoder::Json {
                as_of,
                schema: schema.clone(),
                rows: 0,
            },
            Format::Csv => Encoder::Csv {
                schema: schema.clone(),
            },
            Format::Ndjson => Encoder::Ndjson,
            Format::Parquet => {
                let out = SharedBuffer::default();
                let properties = WriterProperties::builder()
                    .set_compression(Compression::SNAPPY)
                    .set_max_row_group_row_count(Some(PARQUET_ROW_GROUP_ROWS))
                    .set_max_row_group_bytes(Some(PARQUET_ROW_GROUP_BYTES))
                    .set_key_value_metadata(Some(vec![KeyValue::new(
                        "tally.as_of".to_owned(),
                        as_of.to_string(),
                    )]))
                    .build();
                let writer = ArrowWriter::try_new(out.clone(), schema.clone(), Some(properties))
                    .map_err(encoding)?;
                Encoder::Parquet {
                    writer: Some(Box::new(writer)),
                    out,
                }
            }
        })
    }

    fn head(&mut self) -> Result<Bytes> {
        match self {
            Encoder::Json { as_of, schema, .. } => {
                let columns: Vec<serde_json::Value> = schema
                    .fields()
                    .iter()
                    .map(|field| {
                        serde_json::json!({
                            "name": field.name(),
                            "type": analyst::type_name(field.data_type()),
                        })
                    })
                    .collect();
                let columns = serde_json::to_string(&columns).map_err(encoding)?;
                Ok(Bytes::from(format!(
                    "{{\"as_of\":{as_of},\"columns\":{columns},\"rows\":["
                )))
            }
            Encoder::Csv { schema } => {
                let mut line = Vec::new();
                for (i, field) in schema.fields().iter().enumerate() {
                    if i > 0 {
                        line.push(b',');
                    }
                    csv_cell(&mut line, field.name());
                }
                line.extend_from_slice(b"\r\n");
                Ok(Bytes::from(line))
            }
            Encoder::Ndjson => Ok(Bytes::new()),
            Encoder::Parquet { out, .. } => Ok(out.take()),
        }
    }

    fn batch(&mut self, batch: &RecordBatch) -> Result<Bytes> {
        match self {
            Encoder::Json { rows, .. } => {
                let lines = json_lines(batch, StructMode::ListOnly)?;
                let mut out = Vec::with_capacity(lines.len() + 16);
                for line in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    if *rows > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(line);
                    *rows += 1;
                }
                Ok(Bytes::from(out))
            }
            Encoder::Csv { .. } => csv_rows(batch).map(Bytes::from),
            Encoder::Ndjson => json_lines(batch, StructMode::ObjectOnly).map(Bytes::from),
            Encoder::Parquet { writer, out } => {
                let writer = writer
                    .as_mut()
                    .ok_or_else(|| encoding("a parquet answer written after its end"))?;
                writer.write(batch).map_err(encoding)?;
                Ok(out.take())
            }
        }
    }

    fn finish(&mut self, rows_read: u64, elapsed_ms: u128) -> Result<Bytes> {
        match self {
            Encoder::Json { .. } => Ok(Bytes::from(format!(
                "],\"rows_read\":{rows_read},\"elapsed_ms\":{elapsed_ms}}}"
            ))),
            Encoder::Csv { .. } | Encoder::Ndjson => Ok(Bytes::new()),
            Encoder::Parquet { writer, out } => {
                if let Some(writer) = writer.take() {
                    writer.close().map_err(encoding)?;
                }
                Ok(out.take())
            }
        }
    }
}

/// The rows of `batch` as JSON, one per line: arrays (`ListOnly`) or objects, every
/// column present (NULL as `null`).
fn json_lines(batch: &RecordBatch, mode: StructMode) -> Result<Vec<u8>> {
    let mut writer = WriterBuilder::new()
        .with_explicit_nulls(true)
        .with_struct_mode(mode)
        .build::<_, LineDelimited>(Vec::new());
    writer.write(batch).map_err(encoding)?;
    writer.finish().map_err(encoding)?;
    Ok(writer.into_inner())
}

/// The rows of `batch` as CSV lines (RFC 4180: CRLF, fields quoted when they hold a comma,
/// a quote or a line break). NULL is the empty field; lists and other nested values are
/// their JSON text (`["red","blue"]`); timestamps RFC 3339.
fn csv_rows(batch: &RecordBatch) -> Result<Vec<u8>> {
    let options = FormatOptions::default().with_null("");
    let json_options = EncoderOptions::default().with_explicit_nulls(true);
    let fields: Vec<FieldRef> = batch.schema().fields().iter().cloned().collect();
    let mut cells: Vec<Cell> = Vec::with_capacity(batch.num_columns());
    for (field, column) in fields.iter().zip(batch.columns()) {
        let nested = matches!(
            column.data_type(),
            DataType::List(_)
                | DataType::LargeList(_)
                | DataType::FixedSizeList(_, _)
                | DataType::ListView(_)
                | DataType::LargeListView(_)
                | DataType::Struct(_)
                | DataType::Map(_, _)
        );
        cells.push(if nested {
            Cell::Json(
                make_encoder(field, column.as_ref(), &json_options).map_err(encoding)?,
                column.as_ref(),
            )
        } else {
            Cell::Text(ArrayFormatter::try_new(column.as_ref(), &options).map_err(encoding)?)
        });
    }
    let mut out = Vec::new();
    let mut text = Vec::new();
    for row in 0..batch.num_rows() {
        for (i, cell) in cells.iter_mut().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            text.clear();
            match cell {
                Cell::Text(formatter) => {
                    write!(&mut text, "{}", formatter.value(row)).map_err(encoding)?;
                }
                Cell::Json(encoder, column) => {
                    if column.is_valid(row) {
                        encoder.encode(row, &mut text);
                    }
                }
            }
            csv_cell(&mut out, &String::from_utf8_lossy(&text));
        }
        out.extend_from_slice(b"\r\n");
    }
    Ok(out)
}

enum Cell<'a> {
    Text(ArrayFormatter<'a>),
    Json(arrow::json::writer::NullableEncoder<'a>, &'a dyn Array),
}

/// One CSV field, quoted when RFC 4180 needs it (and when it has edge spaces, which some
/// readers trim).
fn csv_cell(out: &mut Vec<u8>, text: &str) {
    let quote =
        text.contains([',', '"', '\r', '\n']) || text.starts_with(' ') || text.ends_with(' ');
    if !quote {
        out.extend_from_slice(text.as_bytes());
        return;
    }
    out.push(b'"');
    out.extend_from_slice(text.replace('"', "\"\"").as_bytes());
    out.push(b'"');
}

/// Where the Parquet writer writes; each chunk of the answer is what it wrote since the
/// last one.
#[derive(Clone, Default)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    fn take(&self) -> Bytes {
        let mut buffer = self.0.lock().expect("parquet buffer lock");
        Bytes::from(std::mem::take(&mut *buffer))
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .expect("parquet buffer lock")
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_picks_the_preferred_known_format() {
        assert_eq!(Format::from_accept(None).unwrap(), Format::Json);
        assert_eq!(Format::from_accept(Some("*/*")).unwrap(), Format::Json);
        assert_eq!(Format::from_accept(Some("text/csv")).unwrap(), Format::Csv);
        assert_eq!(
            Format::from_accept(Some("application/parquet")).unwrap(),
            Format::Parquet
        );
        assert_eq!(
            Format::from_accept(Some(
                "text/html, application/x-ndjson;q=0.5, text/csv;q=0.9"
            ))
            .unwrap(),
            Format::Csv
        );
        assert_eq!(
            Format::from_accept(Some("text/csv;q=0, application/json")).unwrap(),
            Format::Json
        );
        let problem = Format::from_accept(Some("application/xml")).unwrap_err();
        assert_eq!(problem.status, 406);
        assert!(problem.detail.contains("text/csv"), "{}", problem.detail);
    }

    #[test]
    fn csv_fields_are_quoted_as_rfc_4180_says() {
        let mut out = Vec::new();
        for text in ["plain", "a,b", "say \"hi\"", "two\nlines", " edge", ""] {
            csv_cell(&mut out, text);
            out.push(b'|');
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "plain|\"a,b\"|\"say \"\"hi\"\"\"|\"two\nlines\"|\" edge\"||"
        );
    }
}
