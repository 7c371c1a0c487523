//! `GET /v1/polls/{id}/export?format=csv|ndjson|parquet` (analyst or admin key): every
//! counted ballot of a poll, with labels, streamed.
//!
//! The ballots are read as of the poll's last counted vote when the request came
//! ([`tally_core::ports::Warehouse::ballots`]); that position is the `Tally-As-Of` header,
//! part of the file name, the `as_of` column of every row and (Parquet) the file's
//! `tally.as_of` metadata, so an export taken while votes come in is still an exact
//! snapshot, and says which one.
//!
//! Columns, in order: `vote_id`, `seq`, `received_at` (UTC, milliseconds), `voter_key`
//! (NULL for anonymous votes), then by the poll's kind `option_id` and `label` (single),
//! `choices` and `labels` (multi, lists) or `rating` (rating, NPS); then the standard
//! segment keys and the poll's own dimensions, one column each (the empty string where a
//! vote did not say); last `as_of`, the same log position in every row.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    Array, ArrayRef, AsArray, ListArray, ListBuilder, RecordBatch, StringArray, StringBuilder,
    TimestampMillisecondArray, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Int32Type, Int64Type, Schema, SchemaRef, TimeUnit};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use futures::StreamExt;
use serde::Deserialize;
use tally_core::auth::Role;
use tally_core::poll::{Poll, PollKind};
use tally_core::ports::AnalystRows;
use tally_core::problem::Problem;
use tally_core::segment::STANDARD_KEYS;
use tally_core::{Error, Result};
use tally_service::http::Reply;

use crate::encode::{self, Format};
use crate::{query_params, App};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExportParams {
    format: Option<String>,
}

fn format(name: Option<&str>) -> Result<Format, Problem> {
    match name.unwrap_or("csv") {
        "csv" => Ok(Format::Csv),
        "ndjson" => Ok(Format::Ndjson),
        "parquet" => Ok(Format::Parquet),
        other => Err(Problem::invalid(
            "format",
            format!(
                "`{}` is not an export format; use csv (the default), ndjson or parquet",
                other.chars().take(40).collect::<String>()
            ),
        )),
    }
}

pub(crate) async fn export(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    params: Result<Query<ExportParams>, QueryRejection>,
) -> Reply {
    let started = Instant::now();
    app.authorize(&headers, Role::Analyst)?;
    let params = query_params(params)?;
    let format = format(params.format.as_deref())?;
    let poll = app.poll(&id).await?;
    let ballots = app.warehouse.ballots(&poll.id).await?;
    let shape = Arc::new(Shape::new(&poll, ballots.as_of));
    let rows = AnalystRows {
        schema: shape.schema.clone(),
        as_of: ballots.as_of,
        positions: ballots.positions,
        rows_read: ballots.rows_read,
        batches: {
            let shape = shape.clone();
            Box::pin(
                ballots
                    .batches
                    .map(move |batch| batch.and_then(|batch| shape.rows(&batch))),
            )
        },
    };
    let file = format!(
        "attachment; filename=\"{}-as-of-{}.{}\"",
        poll.id,
        rows.as_of,
        format.extension()
    );
    encode::respond(
        rows,
        format,
        started,
        vec![(header::CONTENT_DISPOSITION, file)],
    )
    .await
}

/// A poll's export columns, and how a batch of its ballots becomes them.
struct Shape {
    schema: SchemaRef,
    kind: PollKind,
    labels: HashMap<String, String>,
    dimensions: Vec<String>,
    /// The log position the export is pinned to, repeated in every row's `as_of`.
    as_of: u64,
}

/// The last column: the log position the export is pinned to, so a file that lost its name
/// and headers still says which snapshot it is.
const AS_OF: &str = "as_of";

fn text_list() -> DataType {
    DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true)))
}

fn failed(err: impl std::fmt::Display) -> Error {
    Error::failed("exporting ballots", err.to_string())
}

impl Shape {
    fn new(poll: &Poll, as_of: u64) -> Shape {
        let mut fields = vec![
            Field::new("vote_id", DataType::Utf8, false),
            Field::new("seq", DataType::UInt64, false),
            Field::new(
                "received_at",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                false,
            ),
            Field::new("voter_key", DataType::Utf8, true),
        ];
        match poll.kind {
            PollKind::Single => {
                fields.push(Field::new("option_id", DataType::Utf8, true));
                fields.push(Field::new("label", DataType::Utf8, true));
            }
            PollKind::Multi => {
                fields.push(Field::new("choices", text_list(), false));
                fields.push(Field::new("labels", text_list(), false));
            }
            PollKind::Rating | PollKind::Nps => {
                fields.push(Field::new("rating", DataType::Int32, true));
            }
        }
        for key in STANDARD_KEYS {
            fields.push(Field::new(key, DataType::Utf8, false));
        }
        // The poll's own dimensions under their names, unless a name is taken above or
        // is `as_of`, the last column.
        let mut taken: Vec<String> = fields.iter().map(|f| f.name().clone()).collect();
        taken.push(AS_OF.to_owned());
        for dimension in &poll.dimensions {
            let name = if taken.contains(dimension) {
                format!("dimension_{dimension}")
            } else {
                dimension.clone()
            };
            fields.push(Field::new(name, DataType::Utf8, false));
        }
        fields.push(Field::new(AS_OF, DataType::UInt64, false));
        Shape {
            schema: Arc::new(Schema::new(fields)),
            kind: poll.kind,
            labels: poll.answer_keys().into_iter().collect(),
            dimensions: poll.dimensions.clone(),
            as_of,
        }
    }

    /// A batch of [`tally_core::analyst::ballot_schema`] rows as export rows.
    fn rows(&self, batch: &RecordBatch) -> Result<RecordBatch> {
        let column = |name: &str| -> Result<&ArrayRef> {
            batch
                .column_by_name(name)
                .ok_or_else(|| failed(format!("ballots without a `{name}` column")))
        };
        let received_ms = column("received_ms")?
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| failed("received_ms is not an Int64"))?;
        let received: TimestampMillisecondArray =
            TimestampMillisecondArray::from(received_ms.values().to_vec()).with_timezone("UTC");
        let choice = column("choice")?
            .as_list_opt::<i32>()
            .ok_or_else(|| failed("choice is not a list"))?;
        let mut columns: Vec<ArrayRef> = vec![
            column("vote_id")?.clone(),
            column("seq")?.clone(),
            Arc::new(received),
            column("voter_key")?.clone(),
        ];
        match self.kind {
            PollKind::Single => {
                let first = |row: usize| -> Option<String> {
                    if choice.is_null(row) {
                        return None;
                    }
                    let ids = choice.value(row);
                    let ids = ids.as_string_opt::<i32>()?;
                    (!ids.is_empty() && ids.is_valid(0)).then(|| ids.value(0).to_owned())
                };
                let ids: Vec<Option<String>> = (0..batch.num_rows()).map(first).collect();
                let labels: StringArray = ids
                    .iter()
                    .map(|id| id.as_ref().and_then(|id| self.labels.get(id)).cloned())
                    .collect();
                columns.push(Arc::new(StringArray::from(ids)));
                columns.push(Arc::new(labels));
            }
            PollKind::Multi => {
                let mut labels = ListBuilder::new(StringBuilder::new())
                    .with_field(Arc::new(Field::new_list_field(DataType::Utf8, true)));
                for row in 0..batch.num_rows() {
                    let ids = choice.value(row);
                    if let Some(ids) = ids.as_string_opt::<i32>() {
                        for id in ids.iter() {
                            labels
                                .values()
                                .append_option(id.and_then(|id| self.labels.get(id)));
                        }
                    }
                    labels.append(true);
                }
                let choices: ListArray = choice.clone();
                columns.push(Arc::new(choices));
                columns.push(Arc::new(labels.finish()));
            }
            PollKind::Rating | PollKind::Nps => {
                let value = column("value")?;
                if value.as_primitive_opt::<Int32Type>().is_none() {
                    return Err(failed("value is not an Int32"));
                }
                columns.push(value.clone());
            }
        }
        for key in STANDARD_KEYS {
            columns.push(column(key)?.clone());
        }
        if !self.dimensions.is_empty() {
            columns.extend(self.dimension_columns(batch, &column)?);
        }
        columns.push(Arc::new(UInt64Array::from_value(
            self.as_of,
            batch.num_rows(),
        )));
        RecordBatch::try_new(self.schema.clone(), columns).map_err(failed)
    }

    /// The poll's own dimensions, one text column each, from the ballots' key and value
    /// lists.
    fn dimension_columns<'a>(
        &self,
        batch: &'a RecordBatch,
        column: &dyn Fn(&str) -> Result<&'a ArrayRef>,
    ) -> Result<Vec<ArrayRef>> {
        let keys = column("dim_keys")?
            .as_list_opt::<i32>()
            .ok_or_else(|| failed("dim_keys is not a list"))?;
        let values = column("dim_values")?
            .as_list_opt::<i32>()
            .ok_or_else(|| failed("dim_values is not a list"))?;
        let mut out: Vec<StringBuilder> = self
            .dimensions
            .iter()
            .map(|_| StringBuilder::new())
            .collect();
        for row in 0..batch.num_rows() {
            let row_keys = keys.value(row);
            let row_values = values.value(row);
            let (Some(row_keys), Some(row_values)) = (
                row_keys.as_string_opt::<i32>(),
                row_values.as_string_opt::<i32>(),
            ) else {
                return Err(failed("dimension lists are not text"));
            };
            for (dimension, builder) in self.dimensions.iter().zip(out.iter_mut()) {
                let value = (0..row_keys.len())
                    .find(|i| row_keys.is_valid(*i) && row_keys.value(*i) == dimension)
                    .filter(|i| *i < row_values.len() && row_values.is_valid(*i))
                    .map(|i| row_values.value(i))
                    .unwrap_or("");
                builder.append_value(value);
            }
        }
        Ok(out
            .into_iter()
            .map(|mut builder| Arc::new(builder.finish()) as ArrayRef)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_named_in_the_refusal() {
        assert_eq!(format(None).unwrap(), Format::Csv);
        assert_eq!(format(Some("parquet")).unwrap(), Format::Parquet);
        let problem = format(Some("xlsx")).unwrap_err();
        assert!(problem.detail.contains("ndjson"), "{}", problem.detail);
    }
}
