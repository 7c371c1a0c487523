//! Analyst answers read back as text, for the suites and for back-end tests that compare
//! two warehouses' answers.

use arrow::util::display::{ArrayFormatter, FormatOptions};
use tally_core::ports::AnalystRows;

/// Rows of a finished answer as text, one `Vec` per row (NULL as the empty string;
/// timestamps RFC 3339 in UTC, lists as `[a, b]`), or the error that ended it: from the call
/// or from its stream, whichever came.
pub async fn answer_of(
    answer: tally_core::Result<AnalystRows>,
) -> tally_core::Result<(AnalystRows, Vec<Vec<String>>)> {
    use futures::StreamExt;
    let mut answer = answer?;
    let mut batches = Vec::new();
    while let Some(batch) = answer.batches.next().await {
        batches.push(batch?);
    }
    let options = FormatOptions::default();
    let mut rows = Vec::new();
    for batch in &batches {
        assert_eq!(
            batch.schema(),
            answer.schema,
            "every batch has the answer's schema"
        );
        let formatters: Vec<ArrayFormatter> = batch
            .columns()
            .iter()
            .map(|column| ArrayFormatter::try_new(column.as_ref(), &options).expect("formattable"))
            .collect();
        for row in 0..batch.num_rows() {
            rows.push(
                formatters
                    .iter()
                    .map(|f| f.value(row).to_string())
                    .collect(),
            );
        }
    }
    Ok((answer, rows))
}
