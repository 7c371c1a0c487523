//! Every statement the services send to ClickHouse, built in one place so a test can run
//! them all on the current ClickHouse engine (chdb) as well as on the 18.16 server the
//! suite uses. Values are rendered as escaped literals; identifiers come only from the
//! fixed column list or from validated dimension names.

use crate::backend::{BreakdownQuery, Dimension, TimeseriesQuery};
use crate::segment::STANDARD_KEYS;

/// A ClickHouse string literal.
pub fn lit(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for ch in text.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\0' => out.push_str("\\0"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            other => out.push(other),
        }
    }
    out.push('\'');
    out
}

/// A backquoted identifier for names we validated ourselves (databases).
pub fn ident(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

/// The column expression of a dimension: a column for standard keys, an array lookup for
/// a poll's own keys.
pub fn dimension_expr(dimension: &Dimension) -> String {
    match STANDARD_KEYS.iter().find(|k| **k == dimension.0) {
        Some(column) => (*column).to_owned(),
        None => format!("dim_values[indexOf(dim_keys, {})]", lit(&dimension.0)),
    }
}

pub const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, applied_at DateTime('UTC')) ENGINE = MergeTree ORDER BY version";

/// Versioned schema migrations, applied in order. Each is idempotent so services starting
/// together may race through them safely.
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (
        1,
        "votes",
        // No PARTITION BY: an insert into a single-partition MergeTree is one part, so one
        // processor batch is atomic even when it spans a month boundary.
        "CREATE TABLE IF NOT EXISTS votes (\
            log_partition UInt16, seq UInt64, vote_id String, poll_id String, voter_key String, \
            choice Array(String), value Nullable(Int32), \
            campaign String, channel String, source String, medium String, country String, device String, \
            dim_keys Array(String), dim_values Array(String), \
            received_at DateTime('UTC'), received_ms UInt64\
        ) ENGINE = MergeTree ORDER BY (poll_id, received_at, seq)",
    ),
    (
        2,
        "vote_windows",
        // Plain MergeTree, not SummingMergeTree: a summing merge would keep an arbitrary
        // `last_seq` per key and the table's watermark could move backwards. Partial rows are
        // few (one per batch, poll, window and option) and are summed when read.
        "CREATE TABLE IF NOT EXISTS vote_windows (\
            log_partition UInt16, poll_id String, window_start DateTime('UTC'), window_seconds UInt32, \
            option String, votes UInt64, last_seq UInt64\
        ) ENGINE = MergeTree ORDER BY (poll_id, window_start, option)",
    ),
];

pub const VOTE_COLUMNS: &[&str] = &[
    "log_partition",
    "seq",
    "vote_id",
    "poll_id",
    "voter_key",
    "choice",
    "value",
    "campaign",
    "channel",
    "source",
    "medium",
    "country",
    "device",
    "dim_keys",
    "dim_values",
    "received_at",
    "received_ms",
];

pub const WINDOW_COLUMNS: &[&str] = &[
    "log_partition",
    "poll_id",
    "window_start",
    "window_seconds",
    "option",
    "votes",
    "last_seq",
];

pub fn applied_migrations() -> String {
    "SELECT version FROM schema_migrations GROUP BY version ORDER BY version".to_owned()
}

pub fn record_migration(version: u32, name: &str) -> String {
    format!(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES ({version}, {}, now())",
        lit(name)
    )
}

pub fn votes_watermark(partition: u16) -> String {
    format!("SELECT max(seq) FROM votes WHERE log_partition = {partition}")
}

pub fn windows_watermark(partition: u16) -> String {
    format!("SELECT max(last_seq) FROM vote_windows WHERE log_partition = {partition}")
}

/// Ballots, distinct voters and the newest sequence of a poll, from one consistent read.
pub fn tally_totals(poll_id: &str) -> String {
    format!("SELECT count(), uniqExactIf(voter_key, voter_key != ''), max(seq) FROM votes WHERE poll_id = {}", lit(poll_id))
}

/// Per-answer counts up to `as_of`, so they agree with the totals read just before.
pub fn tally_counts(poll_id: &str, as_of: u64) -> String {
    format!(
        "SELECT opt, count() FROM votes ARRAY JOIN choice AS opt WHERE poll_id = {} AND seq <= {as_of} GROUP BY opt ORDER BY opt",
        lit(poll_id)
    )
}

pub fn voter_keys(poll_id: &str) -> String {
    format!(
        "SELECT DISTINCT voter_key FROM votes WHERE poll_id = {} AND voter_key != ''",
        lit(poll_id)
    )
}

pub fn poll_watermark(poll_id: &str) -> String {
    format!(
        "SELECT max(seq) FROM votes WHERE poll_id = {}",
        lit(poll_id)
    )
}

fn breakdown_filter(query: &BreakdownQuery, as_of: u64) -> String {
    let mut filter = format!("poll_id = {} AND seq <= {as_of}", lit(&query.poll_id));
    for (dimension, values) in &query.filters {
        let values: Vec<String> = values.iter().map(|v| lit(v)).collect();
        filter.push_str(&format!(
            " AND {} IN ({})",
            dimension_expr(dimension),
            values.join(", ")
        ));
    }
    if let Some(from) = query.from_ms {
        filter.push_str(&format!(" AND received_ms >= {}", from.max(0)));
    }
    if let Some(to) = query.to_ms {
        filter.push_str(&format!(" AND received_ms < {}", to.max(0)));
    }
    filter
}

fn group_key(query: &BreakdownQuery) -> String {
    let exprs: Vec<String> = query.by.iter().map(dimension_expr).collect();
    format!("[{}]", exprs.join(", "))
}

/// Ballots per group. `limit` bounds the groups read.
pub fn breakdown_ballots(query: &BreakdownQuery, as_of: u64, limit: usize) -> String {
    format!(
        "SELECT {} AS g, count() AS n FROM votes WHERE {} GROUP BY g ORDER BY n DESC, g LIMIT {limit}",
        group_key(query),
        breakdown_filter(query, as_of)
    )
}

/// Answer counts per group.
pub fn breakdown_counts(query: &BreakdownQuery, as_of: u64) -> String {
    format!(
        "SELECT {} AS g, opt, count() FROM votes ARRAY JOIN choice AS opt WHERE {} GROUP BY g, opt",
        group_key(query),
        breakdown_filter(query, as_of)
    )
}

pub fn timeseries(query: &TimeseriesQuery) -> String {
    let step = query.step_seconds.max(1);
    let mut filter = format!("poll_id = {}", lit(&query.poll_id));
    if let Some(from) = query.from_ms {
        filter.push_str(&format!(
            " AND toUInt32(window_start) >= {}",
            from.max(0) / 1000
        ));
    }
    if let Some(to) = query.to_ms {
        filter.push_str(&format!(
            " AND toUInt32(window_start) < {}",
            to.max(0) / 1000
        ));
    }
    format!(
        "SELECT toUInt32(intDiv(toUInt32(window_start), {step}) * {step}) AS t, option, sum(votes) FROM vote_windows \
         WHERE {filter} GROUP BY t, option ORDER BY t, option"
    )
}

/// Every statement shape the services issue, with sample arguments, for dialect checks.
/// Inserts are sent as RowBinary; their VALUES form here checks the column list and types.
pub fn all_for_check() -> Vec<(String, String)> {
    let mut statements = vec![("schema_migrations".to_owned(), MIGRATIONS_TABLE.to_owned())];
    for (version, name, sql) in MIGRATIONS {
        statements.push((format!("migration {version} {name}"), (*sql).to_owned()));
        statements.push((
            format!("record migration {version}"),
            record_migration(*version, name),
        ));
    }
    statements.push(("applied migrations".into(), applied_migrations()));
    statements.push((
        "insert votes".into(),
        format!(
            "INSERT INTO votes ({}) VALUES (0, 7, 'v-1', 'p', 'abc', ['red', 'blue'], NULL, 'c', 'email', 's', 'm', 'DE', 'mobile', ['plan'], ['pro'], 1700000000, 1700000000123)",
            VOTE_COLUMNS.join(", ")
        ),
    ));
    statements.push((
        "insert windows".into(),
        format!(
            "INSERT INTO vote_windows ({}) VALUES (0, 'p', 1700000000, 10, 'red', 3, 7)",
            WINDOW_COLUMNS.join(", ")
        ),
    ));
    statements.push(("votes watermark".into(), votes_watermark(0)));
    statements.push(("windows watermark".into(), windows_watermark(0)));
    statements.push(("tally totals".into(), tally_totals("p")));
    statements.push(("tally counts".into(), tally_counts("p", 7)));
    statements.push(("voter keys".into(), voter_keys("p")));
    statements.push(("poll watermark".into(), poll_watermark("p")));
    let query = BreakdownQuery {
        poll_id: "p".into(),
        by: vec![Dimension("country".into()), Dimension("plan".into())],
        filters: vec![(
            Dimension("device".into()),
            vec!["mobile".into(), "it's".into()],
        )],
        from_ms: Some(1_699_999_999_000),
        to_ms: Some(1_800_000_000_000),
    };
    statements.push((
        "breakdown ballots".into(),
        breakdown_ballots(&query, 7, 1001),
    ));
    statements.push(("breakdown counts".into(), breakdown_counts(&query, 7)));
    let series = TimeseriesQuery {
        poll_id: "p".into(),
        step_seconds: 60,
        from_ms: Some(0),
        to_ms: Some(1_800_000_000_000),
    };
    statements.push(("timeseries".into(), timeseries(&series)));
    statements
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(lit(r"it's \ fine"), r"'it\'s \\ fine'");
        assert_eq!(lit("?"), "'?'");
    }

    #[test]
    fn custom_dimensions_are_array_lookups() {
        assert_eq!(dimension_expr(&Dimension("country".into())), "country");
        assert_eq!(
            dimension_expr(&Dimension("plan".into())),
            "dim_values[indexOf(dim_keys, 'plan')]"
        );
    }
}
