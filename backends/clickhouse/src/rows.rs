//! ClickHouse answers as Arrow batches: an analyst query's `JSONCompact` text, read line by
//! line as it streams (18.16 has no Arrow or Parquet output, and `JSONCompact` is the one
//! streamed format of both old and current servers that carries the column types and the
//! rows the query read), and a poll's ballots, read as typed rows.
//!
//! `JSONCompact` puts one row per line between a header (names and types) and a footer
//! (counts and statistics). A server that fails after it started answering writes its
//! exception into the body; a line that is neither a row nor the end of the rows is that
//! exception, and ends the stream as an error.

use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, Date32Builder, Decimal128Builder, Float32Builder, Float64Builder,
    Int16Builder, Int32Builder, Int64Builder, Int8Builder, ListBuilder, NullBuilder, RecordBatch,
    StringBuilder, TimestampMillisecondBuilder, TimestampSecondBuilder, UInt16Builder,
    UInt32Builder, UInt64Builder, UInt8Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::Deserialize;
use serde_json::Value;

/// Rows per batch.
pub const BATCH_ROWS: usize = 8192;

/// A column type of ClickHouse as it maps to Arrow.
#[derive(Debug, Clone, PartialEq)]
enum ChType {
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    Int8,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    String,
    Date,
    /// `DateTime` in UTC.
    DateTime,
    /// `DateTime64(3)` in UTC (current servers).
    DateTimeMs,
    Decimal(u8, i8),
    Array(Box<ChType>),
    Nothing,
    /// Anything else (a `DateTime` in another time zone, tuples, maps …): its JSON text.
    Text,
}

/// A column of the answer: its Arrow field and how its values are read.
#[derive(Debug, Clone)]
struct ChColumn {
    ty: ChType,
    nullable: bool,
}

/// The Arrow type of `ty`.
fn arrow_type(ty: &ChType) -> DataType {
    match ty {
        ChType::UInt8 => DataType::UInt8,
        ChType::UInt16 => DataType::UInt16,
        ChType::UInt32 => DataType::UInt32,
        ChType::UInt64 => DataType::UInt64,
        ChType::Int8 => DataType::Int8,
        ChType::Int16 => DataType::Int16,
        ChType::Int32 => DataType::Int32,
        ChType::Int64 => DataType::Int64,
        ChType::Float32 => DataType::Float32,
        ChType::Float64 => DataType::Float64,
        ChType::String | ChType::Text => DataType::Utf8,
        ChType::Date => DataType::Date32,
        ChType::DateTime => DataType::Timestamp(TimeUnit::Second, Some("UTC".into())),
        ChType::DateTimeMs => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        ChType::Decimal(p, s) => DataType::Decimal128(*p, *s),
        ChType::Array(item) => {
            DataType::List(Arc::new(Field::new_list_field(arrow_type(item), true)))
        }
        ChType::Nothing => DataType::Null,
    }
}

/// Strips `Wrapper(` … `)` from `text`.
fn inside<'a>(text: &'a str, wrapper: &str) -> Option<&'a str> {
    text.strip_prefix(wrapper)?
        .strip_prefix('(')?
        .strip_suffix(')')
}

/// Whether a time zone named in a type is UTC.
fn is_utc(zone: &str) -> bool {
    let zone = zone.trim().trim_matches('\'');
    [
        "UTC",
        "Etc/UTC",
        "GMT",
        "Etc/GMT",
        "UCT",
        "Zulu",
        "Universal",
    ]
    .contains(&zone)
}

/// Reads a ClickHouse type name. `server_utc` says whether a `DateTime` without a time zone
/// (the server's) is in UTC; one in another zone is kept as its text.
fn parse_type(text: &str, server_utc: bool) -> ChColumn {
    let text = text.trim();
    if let Some(inner) = inside(text, "Nullable") {
        return ChColumn {
            nullable: true,
            ..parse_type(inner, server_utc)
        };
    }
    if let Some(inner) = inside(text, "LowCardinality") {
        return parse_type(inner, server_utc);
    }
    if let Some(inner) = inside(text, "Array") {
        return ChColumn {
            ty: ChType::Array(Box::new(parse_type(inner, server_utc).ty)),
            nullable: false,
        };
    }
    let ty = match text {
        "UInt8" | "Bool" => ChType::UInt8,
        "UInt16" => ChType::UInt16,
        "UInt32" => ChType::UInt32,
        "UInt64" => ChType::UInt64,
        "Int8" => ChType::Int8,
        "Int16" => ChType::Int16,
        "Int32" => ChType::Int32,
        "Int64" => ChType::Int64,
        "Float32" => ChType::Float32,
        "Float64" => ChType::Float64,
        "String" | "UUID" | "IPv4" | "IPv6" => ChType::String,
        "Date" | "Date32" => ChType::Date,
        "Nothing" => ChType::Nothing,
        "DateTime" if server_utc => ChType::DateTime,
        _ if text.starts_with("FixedString(") || text.starts_with("Enum") => ChType::String,
        _ => {
            if let Some(zone) = inside(text, "DateTime") {
                if is_utc(zone) {
                    ChType::DateTime
                } else {
                    ChType::Text
                }
            } else if let Some(args) = inside(text, "DateTime64") {
                let mut args = args.split(',');
                let precision = args.next().map(str::trim);
                let zone_ok = args.next().map_or(server_utc, is_utc);
                if precision == Some("3") && zone_ok {
                    ChType::DateTimeMs
                } else {
                    ChType::Text
                }
            } else if let Some(ty) = decimal(text) {
                ty
            } else {
                ChType::Text
            }
        }
    };
    ChColumn {
        ty,
        nullable: false,
    }
}

/// `Decimal(P, S)`, `Decimal32(S)`, `Decimal64(S)`, `Decimal128(S)`.
fn decimal(text: &str) -> Option<ChType> {
    let numbers = |args: &str| -> Option<Vec<u8>> {
        args.split(',').map(|n| n.trim().parse().ok()).collect()
    };
    let (precision, scale) = if let Some(args) = inside(text, "Decimal") {
        match numbers(args)?.as_slice() {
            [p, s] => (*p, *s),
            _ => return None,
        }
    } else {
        let (precision, args) = [("Decimal32", 9), ("Decimal64", 18), ("Decimal128", 38)]
            .iter()
            .find_map(|(name, p)| inside(text, name).map(|args| (*p, args)))?;
        (precision, *numbers(args)?.first()?)
    };
    (precision <= 38 && scale <= precision).then_some(ChType::Decimal(precision, scale as i8))
}

/// A builder for `ty`.
fn builder(ty: &ChType) -> Box<dyn ArrayBuilder> {
    match ty {
        ChType::UInt8 => Box::new(UInt8Builder::new()),
        ChType::UInt16 => Box::new(UInt16Builder::new()),
        ChType::UInt32 => Box::new(UInt32Builder::new()),
        ChType::UInt64 => Box::new(UInt64Builder::new()),
        ChType::Int8 => Box::new(Int8Builder::new()),
        ChType::Int16 => Box::new(Int16Builder::new()),
        ChType::Int32 => Box::new(Int32Builder::new()),
        ChType::Int64 => Box::new(Int64Builder::new()),
        ChType::Float32 => Box::new(Float32Builder::new()),
        ChType::Float64 => Box::new(Float64Builder::new()),
        ChType::String | ChType::Text => Box::new(StringBuilder::new()),
        ChType::Date => Box::new(Date32Builder::new()),
        ChType::DateTime => Box::new(TimestampSecondBuilder::new().with_timezone("UTC")),
        ChType::DateTimeMs => Box::new(TimestampMillisecondBuilder::new().with_timezone("UTC")),
        ChType::Decimal(p, s) => Box::new(
            Decimal128Builder::new()
                .with_precision_and_scale(*p, *s)
                .expect("a valid decimal type"),
        ),
        ChType::Array(item) => Box::new(
            ListBuilder::new(builder(item))
                .with_field(Arc::new(Field::new_list_field(arrow_type(item), true))),
        ),
        ChType::Nothing => Box::new(NullBuilder::new()),
    }
}

fn downcast<B: 'static>(builder: &mut dyn ArrayBuilder) -> &mut B {
    builder
        .as_any_mut()
        .downcast_mut::<B>()
        .expect("the builder made for the type")
}

/// An integer written as a JSON number or (64-bit ones, by default) a string.
fn integer<T: std::str::FromStr>(value: &Value) -> Option<T> {
    match value {
        Value::Number(n) => n.to_string().parse().ok(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn float(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "inf" | "+inf" => Some(f64::INFINITY),
            "-inf" => Some(f64::NEG_INFINITY),
            "nan" | "-nan" => Some(f64::NAN),
            other => other.parse().ok(),
        },
        _ => None,
    }
}

/// Days from 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// `YYYY-MM-DD` as days since the epoch.
fn date(text: &str) -> Option<i64> {
    let mut parts = text.split('-');
    let year = parts.next()?.parse().ok()?;
    let month = parts.next()?.parse().ok()?;
    let day = parts.next()?.parse().ok()?;
    Some(days_from_civil(year, month, day))
}

/// `YYYY-MM-DD hh:mm:ss[.fff]` (UTC) as epoch milliseconds.
fn date_time_ms(text: &str) -> Option<i64> {
    let (day, time) = text.split_once(' ')?;
    let (time, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut parts = time.split(':');
    let hours: i64 = parts.next()?.parse().ok()?;
    let minutes: i64 = parts.next()?.parse().ok()?;
    let seconds: i64 = parts.next()?.parse().ok()?;
    let millis: i64 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<3}")[..3].parse().ok()?
    };
    Some(((date(day)? * 24 + hours) * 60 + minutes) * 60_000 + seconds * 1000 + millis)
}

/// A decimal's text as its unscaled integer at `scale`.
fn decimal_value(value: &Value, scale: i8) -> Option<i128> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.as_str()),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let scale = usize::try_from(scale).ok()?;
    let fraction: String = format!("{fraction:0<scale$}").chars().take(scale).collect();
    let unscaled: i128 = format!("{whole}{fraction}").parse().ok()?;
    Some(if negative { -unscaled } else { unscaled })
}

/// Appends one value of `ty` (or a null) to `builder`; `Err` names what did not fit.
fn append(builder: &mut dyn ArrayBuilder, ty: &ChType, value: &Value) -> Result<(), String> {
    macro_rules! primitive {
        ($builder:ty, $read:expr) => {{
            let builder = downcast::<$builder>(builder);
            if value.is_null() {
                builder.append_null();
            } else {
                let read = $read;
                builder
                    .append_value(read(value).ok_or_else(|| format!("{value} is not a {ty:?}"))?);
            }
        }};
    }
    match ty {
        ChType::UInt8 => primitive!(UInt8Builder, |v| integer::<u8>(v)),
        ChType::UInt16 => primitive!(UInt16Builder, |v| integer::<u16>(v)),
        ChType::UInt32 => primitive!(UInt32Builder, |v| integer::<u32>(v)),
        ChType::UInt64 => primitive!(UInt64Builder, |v| integer::<u64>(v)),
        ChType::Int8 => primitive!(Int8Builder, |v| integer::<i8>(v)),
        ChType::Int16 => primitive!(Int16Builder, |v| integer::<i16>(v)),
        ChType::Int32 => primitive!(Int32Builder, |v| integer::<i32>(v)),
        ChType::Int64 => primitive!(Int64Builder, |v| integer::<i64>(v)),
        ChType::Float32 => primitive!(Float32Builder, |v| float(v).map(|f| f as f32)),
        ChType::Float64 => primitive!(Float64Builder, float),
        ChType::Date => primitive!(Date32Builder, |v: &Value| v
            .as_str()
            .and_then(date)
            .and_then(|d| i32::try_from(d).ok())),
        ChType::DateTime => primitive!(TimestampSecondBuilder, |v: &Value| v
            .as_str()
            .and_then(date_time_ms)
            .map(|ms| ms.div_euclid(1000))),
        ChType::DateTimeMs => {
            primitive!(TimestampMillisecondBuilder, |v: &Value| v
                .as_str()
                .and_then(date_time_ms))
        }
        ChType::Decimal(_, scale) => {
            primitive!(Decimal128Builder, |v| decimal_value(v, *scale))
        }
        ChType::String | ChType::Text => {
            let builder = downcast::<StringBuilder>(builder);
            match value {
                Value::Null => builder.append_null(),
                Value::String(text) => builder.append_value(text),
                other => builder.append_value(other.to_string()),
            }
        }
        ChType::Nothing => downcast::<NullBuilder>(builder).append_null(),
        ChType::Array(item) => {
            let builder = downcast::<ListBuilder<Box<dyn ArrayBuilder>>>(builder);
            match value {
                Value::Null => builder.append_null(),
                Value::Array(items) => {
                    for element in items {
                        append(builder.values().as_mut(), item, element)?;
                    }
                    builder.append(true);
                }
                other => return Err(format!("{other} is not an array")),
            }
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct Header {
    meta: Vec<Meta>,
}

#[derive(Deserialize)]
struct Meta {
    name: String,
    #[serde(rename = "type")]
    ty: String,
}

#[derive(Deserialize, Default)]
struct Footer {
    #[serde(default)]
    statistics: Statistics,
}

#[derive(Deserialize, Default)]
struct Statistics {
    #[serde(default)]
    rows_read: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Header,
    /// Between `"data":` and the opening `[` of the rows.
    BeforeRows,
    Rows,
    Footer,
}

/// Reads a `JSONCompact` answer as it streams in (see the module documentation).
pub struct JsonCompactReader {
    server_utc: bool,
    part: Part,
    /// The end of the last chunk, up to its last newline not yet seen.
    partial: Vec<u8>,
    text: String,
    schema: Option<SchemaRef>,
    columns: Vec<ChColumn>,
    builders: Vec<Box<dyn ArrayBuilder>>,
    rows: usize,
    /// `statistics.rows_read` of the footer, once read.
    pub rows_read: Option<u64>,
}

impl JsonCompactReader {
    pub fn new(server_utc: bool) -> Self {
        JsonCompactReader {
            server_utc,
            part: Part::Header,
            partial: Vec::new(),
            text: String::new(),
            schema: None,
            columns: Vec::new(),
            builders: Vec::new(),
            rows: 0,
            rows_read: None,
        }
    }

    /// The answer's columns, once the header was read.
    pub fn schema(&self) -> Option<&SchemaRef> {
        self.schema.as_ref()
    }

    /// Reads `chunk`; returns the batches it completed. `Err` is the server's message (an
    /// exception written into the answer) or what could not be read.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<RecordBatch>, String> {
        let mut batches = Vec::new();
        let mut rest = chunk;
        while let Some(end) = rest.iter().position(|b| *b == b'\n') {
            let line = if self.partial.is_empty() {
                String::from_utf8_lossy(&rest[..end]).into_owned()
            } else {
                self.partial.extend_from_slice(&rest[..end]);
                let line = String::from_utf8_lossy(&self.partial).into_owned();
                self.partial.clear();
                line
            };
            rest = &rest[end + 1..];
            if let Some(batch) = self.line(&line)? {
                batches.push(batch);
            }
        }
        self.partial.extend_from_slice(rest);
        Ok(batches)
    }

    /// The end of the answer: the last rows, or the error of an answer that stopped short.
    pub fn finish(&mut self) -> Result<Option<RecordBatch>, String> {
        if !self.partial.is_empty() {
            let line = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
            if let Some(batch) = self.line(&line)? {
                debug_assert!(false, "a batch from the last line: {}", batch.num_rows());
            }
        }
        if self.part != Part::Footer {
            return Err(format!(
                "the answer ended early: {}",
                self.text.trim().chars().take(500).collect::<String>()
            ));
        }
        let footer: Footer = serde_json::from_str(&format!("{{{}", self.text.trim()))
            .map_err(|err| format!("unreadable statistics ({err}): {}", self.text.trim()))?;
        self.rows_read = Some(footer.statistics.rows_read);
        self.batch().map_err(|err| err.to_string())
    }

    fn line(&mut self, line: &str) -> Result<Option<RecordBatch>, String> {
        let trimmed = line.trim();
        match self.part {
            Part::Header => {
                if trimmed == "\"data\":" {
                    let header = std::mem::take(&mut self.text);
                    self.start(&header)?;
                    self.part = Part::BeforeRows;
                } else {
                    self.text.push_str(line);
                    self.text.push('\n');
                }
                Ok(None)
            }
            Part::BeforeRows => {
                if trimmed == "[" {
                    self.part = Part::Rows;
                    Ok(None)
                } else {
                    Err(exception(trimmed))
                }
            }
            Part::Rows => {
                // An answer without rows has an empty line where they would be.
                if trimmed.is_empty() {
                    return Ok(None);
                }
                if trimmed == "]," || trimmed == "]" {
                    self.part = Part::Footer;
                    return Ok(None);
                }
                let row = trimmed.strip_suffix(',').unwrap_or(trimmed);
                let values: Vec<Value> =
                    serde_json::from_str(row).map_err(|_| exception(trimmed))?;
                self.row(&values)?;
                if self.rows >= BATCH_ROWS {
                    return self.batch().map_err(|err| err.to_string());
                }
                Ok(None)
            }
            Part::Footer => {
                self.text.push_str(line);
                self.text.push('\n');
                Ok(None)
            }
        }
    }

    /// Reads the header (`{ "meta": [ … ],`) and makes the builders.
    fn start(&mut self, header: &str) -> Result<(), String> {
        let header = header.trim().trim_end_matches(',');
        let header: Header =
            serde_json::from_str(&format!("{header}}}")).map_err(|_| exception(header))?;
        let mut fields = Vec::with_capacity(header.meta.len());
        for meta in &header.meta {
            let column = parse_type(&meta.ty, self.server_utc);
            let nullable = column.nullable || column.ty == ChType::Nothing;
            fields.push(Field::new(&meta.name, arrow_type(&column.ty), nullable));
            self.builders.push(builder(&column.ty));
            self.columns.push(column);
        }
        self.schema = Some(Arc::new(Schema::new(fields)));
        Ok(())
    }

    fn row(&mut self, values: &[Value]) -> Result<(), String> {
        if values.len() != self.columns.len() {
            return Err(format!(
                "a row of {} values for {} columns",
                values.len(),
                self.columns.len()
            ));
        }
        for ((builder, column), value) in self.builders.iter_mut().zip(&self.columns).zip(values) {
            append(builder.as_mut(), &column.ty, value)?;
        }
        self.rows += 1;
        Ok(())
    }

    /// The rows read since the last batch, as a batch (none when there are none).
    fn batch(&mut self) -> Result<Option<RecordBatch>, arrow::error::ArrowError> {
        if self.rows == 0 {
            return Ok(None);
        }
        let Some(schema) = &self.schema else {
            return Ok(None);
        };
        let columns: Vec<ArrayRef> = self.builders.iter_mut().map(|b| b.finish()).collect();
        self.rows = 0;
        RecordBatch::try_new(schema.clone(), columns).map(Some)
    }
}

/// A line where a row was expected: the server's exception, without its C++ decoration.
fn exception(line: &str) -> String {
    exception_text(line)
}

/// A ClickHouse exception's text without the decoration of 18.16 (`e.displayText() = `,
/// `, e.what() = DB::Exception`), at most 2,000 characters.
pub fn exception_text(line: &str) -> String {
    let line = line.trim();
    let line = line
        .split(", e.what() = ")
        .next()
        .unwrap_or(line)
        .replace("e.displayText() = ", "");
    line.chars().take(2000).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{TimestampSecondType, UInt64Type};

    const ANSWER: &str = "{\n\t\"meta\":\n\t[\n\t\t{\n\t\t\t\"name\": \"x\",\n\t\t\t\"type\": \"UInt64\"\n\t\t},\n\t\t{\n\t\t\t\"name\": \"t\",\n\t\t\t\"type\": \"DateTime('UTC')\"\n\t\t},\n\t\t{\n\t\t\t\"name\": \"a\",\n\t\t\t\"type\": \"Array(Nullable(String))\"\n\t\t},\n\t\t{\n\t\t\t\"name\": \"n\",\n\t\t\t\"type\": \"Nullable(Float64)\"\n\t\t}\n\t],\n\n\t\"data\":\n\t[\n\t\t[\"5\", \"2023-11-14 22:13:20\", [\"a,b\",null], 1.5],\n\t\t[\"18446744073709551615\", \"1970-01-01 00:00:00\", [], null]\n\t],\n\n\t\"rows\": 2,\n\n\t\"statistics\":\n\t{\n\t\t\"elapsed\": 0.000328568,\n\t\t\"rows_read\": 5,\n\t\t\"bytes_read\": 201\n\t}\n}\n";

    #[test]
    fn an_answer_read_in_any_chunks_is_the_same_batch() {
        for chunk in [1, 7, 64, ANSWER.len()] {
            let mut reader = JsonCompactReader::new(true);
            let mut batches = Vec::new();
            for piece in ANSWER.as_bytes().chunks(chunk) {
                batches.extend(reader.push(piece).unwrap());
            }
            batches.extend(reader.finish().unwrap());
            assert_eq!(reader.rows_read, Some(5));
            assert_eq!(batches.len(), 1, "chunks of {chunk}");
            let batch = &batches[0];
            assert_eq!(batch.num_rows(), 2);
            let x = batch.column(0).as_primitive::<UInt64Type>();
            assert_eq!(x.value(1), u64::MAX);
            let t = batch.column(1).as_primitive::<TimestampSecondType>();
            assert_eq!(t.value(0), 1_700_000_000);
            let a = batch.column(2).as_list::<i32>();
            assert_eq!(a.value(0).as_string::<i32>().value(0), "a,b");
            assert!(a.value(0).is_null(1));
            assert!(batch.column(3).is_null(1));
        }
    }

    #[test]
    fn an_answer_without_rows_has_its_columns() {
        let start = ANSWER.find("\t\t[\"5\"").unwrap();
        let end = ANSWER.find("\t],\n\n\t\"rows\"").unwrap();
        let empty = format!("{}\n{}", &ANSWER[..start], &ANSWER[end..]);
        let mut reader = JsonCompactReader::new(true);
        let batches = reader.push(empty.as_bytes()).unwrap();
        assert!(batches.is_empty());
        assert!(reader.finish().unwrap().is_none());
        assert_eq!(reader.schema().map(|s| s.fields().len()), Some(4));
    }

    #[test]
    fn an_exception_in_the_rows_is_the_error() {
        let broken = ANSWER.replace(
            "\t\t[\"18446744073709551615\"",
            "Code: 396, e.displayText() = DB::Exception: Limit for result exceeded, e.what() = DB::Exception\n\t\t[\"1\"",
        );
        let mut reader = JsonCompactReader::new(true);
        let err = reader.push(broken.as_bytes()).unwrap_err();
        assert_eq!(err, "Code: 396, DB::Exception: Limit for result exceeded");
        let mut cut = JsonCompactReader::new(true);
        cut.push(&ANSWER.as_bytes()[..200]).unwrap();
        assert!(cut.finish().is_err(), "an answer cut short is an error");
    }

    #[test]
    fn types_map_to_arrow() {
        let ty = |text: &str| arrow_type(&parse_type(text, true).ty);
        assert_eq!(ty("LowCardinality(Nullable(String))"), DataType::Utf8);
        assert_eq!(
            ty("DateTime"),
            DataType::Timestamp(TimeUnit::Second, Some("UTC".into()))
        );
        assert_eq!(
            arrow_type(&parse_type("DateTime", false).ty),
            DataType::Utf8
        );
        assert_eq!(ty("DateTime('Europe/Berlin')"), DataType::Utf8);
        assert_eq!(ty("Decimal(18, 4)"), DataType::Decimal128(18, 4));
        assert_eq!(ty("Decimal64(2)"), DataType::Decimal128(18, 2));
        assert_eq!(ty("Tuple(UInt8, String)"), DataType::Utf8);
        assert_eq!(
            date_time_ms("2024-02-29 23:59:59.5"),
            Some(1_709_251_199_500)
        );
        assert_eq!(decimal_value(&Value::String("-1.5".into()), 3), Some(-1500));
    }
}
