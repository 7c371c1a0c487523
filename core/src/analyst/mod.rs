//! What data teams get: the analysts' relational model (its tables, their columns and
//! portable types, the same names and meanings on every warehouse), the limits one of their
//! queries runs under, and what their SQL may be ([`vet`]).
//!
//! The tables, described with example queries in docs/SQL.md:
//! - `polls` and `poll_options`: the poll definitions the registry holds now, kept current
//!   in the warehouse by the query service ([`crate::ports::Warehouse::record_polls`]);
//! - `ballots`: one row per counted vote;
//! - `answers`: one row per counted vote and option it chose — what results count;
//! - `ballot_dimensions`: one row per counted vote and dimension of the poll's own that it
//!   carries (the standard segment keys are columns of `ballots` and `answers`).
//!
//! The window and rollup tables are left out on purpose: their rows are partial counts at
//! two levels (fresh and settled), which a plain `sum()` over them counts twice.
//!
//! `ballots`, `answers` and `ballot_dimensions` are read pinned to one position of the log
//! per partition, so one answer is exact as of that position even while votes come in.

pub mod vet;

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::problem::Problem;
use crate::segment::STANDARD_KEYS;

/// A column of an analyst table and its portable type ([`type_name`]); `nullable` columns
/// may hold NULL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    pub ty: &'static str,
    pub nullable: bool,
}

const fn col(name: &'static str, ty: &'static str) -> Column {
    Column {
        name,
        ty,
        nullable: false,
    }
}

const fn null(name: &'static str, ty: &'static str) -> Column {
    Column {
        name,
        ty,
        nullable: true,
    }
}

/// An analyst table: its name, its columns in order, and whether it is read pinned to the
/// log (the tables of counted votes) or as it is now (poll definitions).
#[derive(Debug, Clone, Copy)]
pub struct Table {
    pub name: &'static str,
    pub columns: &'static [Column],
    pub pinned: bool,
}

pub const POLLS: Table = Table {
    name: "polls",
    pinned: false,
    columns: &[
        col("poll_id", "string"),
        col("title", "string"),
        col("question", "string"),
        col("kind", "string"),
        null("campaign", "string"),
        col("status", "string"),
        col("dedupe", "string"),
        col("results_visibility", "string"),
        col("require_token", "uint8"),
        null("max_choices", "uint32"),
        null("scale_min", "int32"),
        null("scale_max", "int32"),
        col("dimensions", "array(string)"),
        col("created_at", "timestamp"),
        col("updated_at", "timestamp"),
        null("opens_at", "timestamp"),
        null("closes_at", "timestamp"),
        null("closed_at", "timestamp"),
        null("archived_at", "timestamp"),
        col("version", "uint64"),
        col("spread", "uint16"),
    ],
};

pub const POLL_OPTIONS: Table = Table {
    name: "poll_options",
    pinned: false,
    columns: &[
        col("poll_id", "string"),
        col("option_id", "string"),
        col("label", "string"),
        col("position", "uint32"),
    ],
};

pub const BALLOTS: Table = Table {
    name: "ballots",
    pinned: true,
    columns: &[
        col("poll_id", "string"),
        col("vote_id", "string"),
        col("log_partition", "uint16"),
        col("seq", "uint64"),
        null("voter_key", "string"),
        col("received_at", "timestamp"),
        col("received_ms", "uint64"),
        null("choice", "string"),
        col("choices", "array(string)"),
        null("rating", "int32"),
        // The standard segment keys: the empty string where a vote did not say.
        col("campaign", "string"),
        col("channel", "string"),
        col("source", "string"),
        col("medium", "string"),
        col("country", "string"),
        col("device", "string"),
    ],
};

pub const ANSWERS: Table = Table {
    name: "answers",
    pinned: true,
    columns: &[
        col("poll_id", "string"),
        col("vote_id", "string"),
        col("log_partition", "uint16"),
        col("seq", "uint64"),
        null("voter_key", "string"),
        col("received_at", "timestamp"),
        col("received_ms", "uint64"),
        col("option_id", "string"),
        // The standard segment keys: the empty string where a vote did not say.
        col("campaign", "string"),
        col("channel", "string"),
        col("source", "string"),
        col("medium", "string"),
        col("country", "string"),
        col("device", "string"),
    ],
};

pub const BALLOT_DIMENSIONS: Table = Table {
    name: "ballot_dimensions",
    pinned: true,
    columns: &[
        col("poll_id", "string"),
        col("vote_id", "string"),
        col("log_partition", "uint16"),
        col("seq", "uint64"),
        col("dimension", "string"),
        col("value", "string"),
    ],
};

/// Every analyst table; nothing else is reachable from an analyst's SQL.
pub const TABLES: [Table; 5] = [POLLS, POLL_OPTIONS, BALLOTS, ANSWERS, BALLOT_DIMENSIONS];

/// The analyst table named `name` (names are lowercase, as written here).
pub fn table(name: &str) -> Option<&'static Table> {
    TABLES.iter().find(|table| table.name == name)
}

/// The portable name of a column type, as the SQL endpoint reports it: `string`, `int8` …
/// `int64`, `uint8` … `uint64`, `float32`, `float64`, `decimal(p,s)`, `boolean`, `date`,
/// `timestamp` (UTC), `array(<item>)`, `null`; anything else by Arrow's own name.
pub fn type_name(data_type: &DataType) -> String {
    match data_type {
        DataType::Null => "null".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Int8 => "int8".into(),
        DataType::Int16 => "int16".into(),
        DataType::Int32 => "int32".into(),
        DataType::Int64 => "int64".into(),
        DataType::UInt8 => "uint8".into(),
        DataType::UInt16 => "uint16".into(),
        DataType::UInt32 => "uint32".into(),
        DataType::UInt64 => "uint64".into(),
        DataType::Float16 | DataType::Float32 => "float32".into(),
        DataType::Float64 => "float64".into(),
        DataType::Decimal32(p, s)
        | DataType::Decimal64(p, s)
        | DataType::Decimal128(p, s)
        | DataType::Decimal256(p, s) => format!("decimal({p},{s})"),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "string".into(),
        DataType::Date32 | DataType::Date64 => "date".into(),
        DataType::Timestamp(_, _) => "timestamp".into(),
        DataType::List(item)
        | DataType::LargeList(item)
        | DataType::ListView(item)
        | DataType::LargeListView(item)
        | DataType::FixedSizeList(item, _) => format!("array({})", type_name(item.data_type())),
        DataType::Dictionary(_, values) => type_name(values),
        other => other.to_string().to_lowercase(),
    }
}

/// The columns of a poll's counted ballots as [`crate::ports::Warehouse::ballots`] streams
/// them, the same from every warehouse: what an export is made of. `voter_key` is NULL for
/// anonymous votes; `choice` holds option ids (or the value of a rating as text), `value`
/// the rating; `dim_keys` and `dim_values` the poll's own dimensions side by side.
pub fn ballot_schema() -> SchemaRef {
    let text_list = || DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true)));
    let mut fields = vec![
        Field::new("seq", DataType::UInt64, false),
        Field::new("vote_id", DataType::Utf8, false),
        Field::new("voter_key", DataType::Utf8, true),
        Field::new("received_ms", DataType::Int64, false),
        Field::new("choice", text_list(), false),
        Field::new("value", DataType::Int32, true),
    ];
    fields.extend(
        STANDARD_KEYS
            .iter()
            .map(|key| Field::new(*key, DataType::Utf8, false)),
    );
    fields.push(Field::new("dim_keys", text_list(), false));
    fields.push(Field::new("dim_values", text_list(), false));
    Arc::new(Schema::new(fields))
}

/// The type of every timestamp column of the analyst tables: seconds, UTC (ClickHouse's
/// `DateTime('UTC')`; `received_ms` keeps the milliseconds).
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Second, Some("UTC".into()))
}

/// The limits one analyst query runs under. They are the service's, set on every query by
/// tally; nothing in the query can change them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SqlLimits {
    /// Wall time from receipt to the last row; the query is cancelled when it runs out.
    pub max_time: Duration,
    /// Rows in the answer.
    pub max_rows: u64,
    /// Bytes of the answer, as the engine holds it in memory.
    pub max_result_bytes: u64,
    /// Memory the engine may use for the query.
    pub max_memory_bytes: u64,
}

pub const DEFAULT_SQL_MAX_SECONDS: u64 = 15;
pub const DEFAULT_SQL_MAX_ROWS: u64 = 1_000_000;
pub const DEFAULT_SQL_MAX_RESULT_BYTES: u64 = 512 * 1024 * 1024;
pub const DEFAULT_SQL_MAX_MEMORY_BYTES: u64 = 1024 * 1024 * 1024;

impl Default for SqlLimits {
    fn default() -> Self {
        SqlLimits {
            max_time: Duration::from_secs(DEFAULT_SQL_MAX_SECONDS),
            max_rows: DEFAULT_SQL_MAX_ROWS,
            max_result_bytes: DEFAULT_SQL_MAX_RESULT_BYTES,
            max_memory_bytes: DEFAULT_SQL_MAX_MEMORY_BYTES,
        }
    }
}

/// Which limit a query hit, named as the problem names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Time,
    Rows,
    ResultBytes,
    Memory,
}

impl Limit {
    pub fn name(self) -> &'static str {
        match self {
            Limit::Time => "max_time",
            Limit::Rows => "max_rows",
            Limit::ResultBytes => "max_result_bytes",
            Limit::Memory => "max_memory_bytes",
        }
    }

    /// The problem for a query stopped at this limit of `limits`.
    pub fn exceeded(self, limits: &SqlLimits) -> Problem {
        let (what, value) = match self {
            Limit::Time => (
                "ran longer than",
                format!("{} s", limits.max_time.as_secs_f64()),
            ),
            Limit::Rows => ("returned more than", format!("{} rows", limits.max_rows)),
            Limit::ResultBytes => (
                "returned more than",
                format!("{} bytes", limits.max_result_bytes),
            ),
            Limit::Memory => (
                "needed more memory than",
                format!("{} bytes", limits.max_memory_bytes),
            ),
        };
        Problem::new(
            422,
            "sql-limit-exceeded",
            "SQL limit exceeded",
            format!(
                "the query {what} the limit `{}` allows ({value}) and was stopped; narrow it with WHERE, aggregate it, or add LIMIT (exports stream every ballot of a poll without this limit)",
                self.name()
            ),
        )
    }
}

/// 400 `sql-invalid`: the engine (or the parser) could not make sense of the query; `detail`
/// is its message.
pub fn invalid(message: impl Into<String>) -> Problem {
    Problem::new(400, "sql-invalid", "Invalid SQL", message)
}

/// 403 `sql-not-allowed`: a statement or construct analysts' SQL may not use.
pub fn not_allowed(detail: impl Into<String>) -> Problem {
    Problem::new(403, "sql-not-allowed", "SQL not allowed", detail)
}

/// How a poll field's value is written in the analyst tables: its JSON name (`per_voter`,
/// `after_close`, `single`, `open` …).
pub fn name_of<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

/// The names of the analyst tables, for messages.
pub fn table_names() -> String {
    TABLES
        .iter()
        .map(|table| table.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_type_names() {
        assert_eq!(type_name(&DataType::Utf8View), "string");
        assert_eq!(type_name(&timestamp_type()), "timestamp");
        assert_eq!(
            type_name(&DataType::List(Arc::new(Field::new_list_field(
                DataType::Utf8,
                true
            )))),
            "array(string)"
        );
        assert_eq!(type_name(&DataType::Decimal128(18, 4)), "decimal(18,4)");
    }

    #[test]
    fn every_table_has_unique_column_names() {
        for table in TABLES {
            let mut names: Vec<&str> = table.columns.iter().map(|c| c.name).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), table.columns.len(), "{}", table.name);
        }
        assert!(table("ballots").is_some_and(|t| t.pinned));
        assert!(table("votes").is_none());
    }

    #[test]
    fn a_limit_problem_names_the_limit() {
        let problem = Limit::Rows.exceeded(&SqlLimits {
            max_rows: 10,
            ..Default::default()
        });
        assert_eq!(problem.slug(), "sql-limit-exceeded");
        assert!(problem.detail.contains("max_rows"), "{}", problem.detail);
        assert!(problem.detail.contains("10 rows"), "{}", problem.detail);
    }
}
