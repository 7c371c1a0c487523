//! tally's warehouse on ClickHouse, for the distributed deployment, over the HTTP interface.
//!
//! In: position-stamped votes, window rows and segment rollups from the processor. Out:
//! tallies, breakdowns and time series for the query service. Schema and statements live in
//! [`sql`]; they run on ClickHouse 18.16 and on current releases alike (checked through chdb
//! by `tests/dialect.rs`). Row types are sent as RowBinary with the client's schema
//! validation off (18.16 does not know `RowBinaryWithNamesAndTypes`). One INSERT is one
//! atomic block, which is what exactly-once counting rests on.

pub mod sql;

use async_trait::async_trait;
use clickhouse::{Row, RowOwned, RowWrite};
use serde::{Deserialize, Serialize};

use tally_core::analytics::{Breakdown, BreakdownQuery, TimePoint, TimeseriesQuery};
use tally_core::ports::{StoredVote, Warehouse, Watermarks, WindowRow};
use tally_core::results::Tally;
use tally_core::rollup::{self, BreakdownPlan, BreakdownRow, RollupLevel, RollupRow};
use tally_core::{Error, Result};

/// ClickHouse error codes of a server that is overloaded or busy rather than refusing the
/// statement: a retry later may succeed (memory limit, too many parts, timeout, too many
/// simultaneous queries, network between servers).
const TRANSIENT_CODES: [&str; 6] = [
    "Code: 159.",
    "Code: 202.",
    "Code: 209.",
    "Code: 210.",
    "Code: 241.",
    "Code: 252.",
];

/// Maps a client error to its kind: no answer, or an overloaded server, is `Unavailable`;
/// a statement the server refused is `Failed`; rows that do not decode are `Corrupt`.
fn warehouse_error(err: clickhouse::error::Error) -> Error {
    use clickhouse::error::Error as Ch;
    match &err {
        Ch::Network(_) | Ch::TimedOut => Error::unavailable("warehouse", err),
        Ch::BadResponse(text) if TRANSIENT_CODES.iter().any(|code| text.contains(code)) => {
            Error::unavailable("warehouse", err)
        }
        Ch::BadResponse(_) | Ch::InvalidParams(_) | Ch::Unsupported(_) => {
            Error::failed("warehouse", err)
        }
        _ => Error::corrupt("warehouse rows", err),
    }
}

#[derive(Debug, Clone)]
pub struct ClickHouseConfig {
    pub url: String,
    pub database: String,
    pub user: Option<String>,
    pub password: Option<String>,
}

#[derive(Clone)]
pub struct ClickHouseWarehouse {
    client: clickhouse::Client,
    server: clickhouse::Client,
    database: String,
}

// The row types spell the segment columns out one by one: the `Row` derive names the
// columns after a struct's own fields and knows no `serde(flatten)`, so a shared segment
// struct would be sent as one column. `row_types_match_the_column_lists` checks them against
// the lists in [`sql`].

#[derive(Row, Serialize, Deserialize)]
struct VoteRow {
    log_partition: u16,
    seq: u64,
    vote_id: String,
    poll_id: String,
    voter_key: String,
    choice: Vec<String>,
    value: Option<i32>,
    campaign: String,
    channel: String,
    source: String,
    medium: String,
    country: String,
    device: String,
    dim_keys: Vec<String>,
    dim_values: Vec<String>,
    received_at: u32,
    received_ms: u64,
}

#[derive(Row, Serialize, Deserialize)]
struct WindowRowCh {
    log_partition: u16,
    poll_id: String,
    window_start: u32,
    window_seconds: u32,
    option: String,
    votes: u64,
    last_seq: u64,
}

#[derive(Row, Serialize, Deserialize)]
struct RollupRowCh {
    log_partition: u16,
    poll_id: String,
    bucket_start: u32,
    bucket_seconds: u32,
    campaign: String,
    channel: String,
    source: String,
    medium: String,
    country: String,
    device: String,
    dim_keys: Vec<String>,
    dim_values: Vec<String>,
    ballots: u64,
    answers: Vec<String>,
    answer_votes: Vec<u64>,
    last_seq: u64,
}

impl VoteRow {
    fn new(partition: u16, stored: &StoredVote) -> Self {
        let vote = &stored.vote;
        let segment = &vote.segment;
        VoteRow {
            log_partition: partition,
            seq: stored.seq,
            vote_id: vote.vote_id.clone(),
            poll_id: vote.poll_id.clone(),
            voter_key: vote.voter_key.clone(),
            choice: vote.choice.clone(),
            value: vote.value,
            campaign: segment.campaign.clone(),
            channel: segment.channel.clone(),
            source: segment.source.clone(),
            medium: segment.medium.clone(),
            country: segment.country.clone(),
            device: segment.device.clone(),
            dim_keys: segment.custom.keys().cloned().collect(),
            dim_values: segment.custom.values().cloned().collect(),
            received_at: (vote.received_at.max(0) / 1000) as u32,
            received_ms: vote.received_at.max(0) as u64,
        }
    }
}

impl WindowRowCh {
    fn new(partition: u16, row: &WindowRow) -> Self {
        debug_assert_eq!(
            row.window_start % row.window_seconds as i64,
            0,
            "windows are aligned"
        );
        WindowRowCh {
            log_partition: partition,
            poll_id: row.poll_id.clone(),
            window_start: row.window_start.max(0) as u32,
            window_seconds: row.window_seconds,
            option: row.option.clone(),
            votes: row.votes,
            last_seq: row.last_seq,
        }
    }
}

impl RollupRowCh {
    fn new(partition: u16, row: &RollupRow) -> Self {
        let segment = &row.segment;
        RollupRowCh {
            log_partition: partition,
            poll_id: row.poll_id.clone(),
            bucket_start: row.bucket_start.max(0) as u32,
            bucket_seconds: row.bucket_seconds,
            campaign: segment.campaign.clone(),
            channel: segment.channel.clone(),
            source: segment.source.clone(),
            medium: segment.medium.clone(),
            country: segment.country.clone(),
            device: segment.device.clone(),
            dim_keys: segment.custom.keys().cloned().collect(),
            dim_values: segment.custom.values().cloned().collect(),
            ballots: row.ballots,
            answers: row.answers.clone(),
            answer_votes: row.answer_votes.clone(),
            last_seq: row.last_seq,
        }
    }
}

impl ClickHouseWarehouse {
    pub fn new(config: &ClickHouseConfig) -> Result<Self> {
        let valid_name = !config.database.is_empty()
            && config
                .database
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_name {
            return Err(Error::failed(
                "warehouse",
                format!(
                    "database name `{}` must be letters, digits and '_'",
                    config.database
                ),
            ));
        }
        let mut server = clickhouse::Client::default()
            .with_url(&config.url)
            .with_validation(false);
        if let Some(user) = &config.user {
            server = server.with_user(user);
        }
        if let Some(password) = &config.password {
            server = server.with_password(password);
        }
        let client = server.clone().with_database(&config.database);
        Ok(ClickHouseWarehouse {
            client,
            server,
            database: config.database.clone(),
        })
    }

    async fn fetch_u64(&self, sql: &str) -> Result<u64> {
        self.client
            .query_raw(sql)
            .fetch_one::<u64>()
            .await
            .map_err(warehouse_error)
    }

    async fn execute(&self, sql: &str) -> Result<()> {
        self.client
            .query_raw(sql)
            .execute()
            .await
            .map_err(warehouse_error)
    }

    /// Writes `rows` into `table` with one INSERT: they land together or not at all. No
    /// rows, no statement.
    async fn insert_rows<R: RowOwned + RowWrite>(
        &self,
        table: &str,
        rows: impl ExactSizeIterator<Item = R> + Send,
    ) -> Result<()> {
        if rows.len() == 0 {
            return Ok(());
        }
        let mut insert = self
            .client
            .insert::<R>(table)
            .await
            .map_err(warehouse_error)?;
        for row in rows {
            insert.write(&row).await.map_err(warehouse_error)?;
        }
        insert.end().await.map_err(warehouse_error)
    }
}

#[async_trait]
impl Warehouse for ClickHouseWarehouse {
    async fn migrate(&self) -> Result<Vec<u32>> {
        let create_db = format!(
            "CREATE DATABASE IF NOT EXISTS {}",
            sql::ident(&self.database)
        );
        self.server
            .query_raw(&create_db)
            .execute()
            .await
            .map_err(warehouse_error)?;
        self.execute(sql::MIGRATIONS_TABLE).await?;
        let applied: Vec<u32> = self
            .client
            .query_raw(&sql::applied_migrations())
            .fetch_all::<u32>()
            .await
            .map_err(warehouse_error)?;
        let mut newly = Vec::new();
        for (version, name, statement) in sql::MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            self.execute(statement).await?;
            self.execute(&sql::record_migration(*version, name)).await?;
            tracing::info!(version, name, "applied warehouse migration");
            newly.push(*version);
        }
        Ok(newly)
    }

    async fn watermarks(&self, partition: u16) -> Result<Watermarks> {
        Ok(Watermarks {
            votes: self.fetch_u64(&sql::votes_watermark(partition)).await?,
            windows: self.fetch_u64(&sql::windows_watermark(partition)).await?,
            rollups: self
                .fetch_u64(&sql::rollups_watermark(partition, RollupLevel::Fresh))
                .await?,
            settled: self
                .fetch_u64(&sql::rollups_watermark(partition, RollupLevel::Settled))
                .await?,
        })
    }

    async fn insert_votes(&self, partition: u16, votes: &[StoredVote]) -> Result<()> {
        let rows = votes.iter().map(|stored| VoteRow::new(partition, stored));
        self.insert_rows("votes", rows).await
    }

    async fn insert_windows(&self, partition: u16, rows: &[WindowRow]) -> Result<()> {
        let rows = rows.iter().map(|row| WindowRowCh::new(partition, row));
        self.insert_rows("vote_windows", rows).await
    }

    async fn insert_rollups(
        &self,
        partition: u16,
        level: RollupLevel,
        rows: &[RollupRow],
    ) -> Result<()> {
        let rows = rows.iter().map(|row| RollupRowCh::new(partition, row));
        self.insert_rows(level.table(), rows).await
    }

    async fn tally(&self, poll_id: &str) -> Result<Tally> {
        let (ballots, unique_voters, as_of) = self
            .client
            .query_raw(&sql::tally_totals(poll_id))
            .fetch_one::<(u64, u64, u64)>()
            .await
            .map_err(warehouse_error)?;
        let counts: Vec<(String, u64)> = self
            .client
            .query_raw(&sql::tally_counts(poll_id, as_of))
            .fetch_all()
            .await
            .map_err(warehouse_error)?;
        Ok(Tally {
            ballots,
            unique_voters,
            counts: counts.into_iter().collect(),
            as_of,
        })
    }

    async fn voter_keys(&self, poll_id: &str) -> Result<Vec<String>> {
        self.client
            .query_raw(&sql::voter_keys(poll_id))
            .fetch_all::<String>()
            .await
            .map_err(warehouse_error)
    }

    async fn breakdown(&self, query: &BreakdownQuery) -> Result<Breakdown> {
        let (settled, fresh) = self
            .client
            .query_raw(&sql::rollup_positions(&query.poll_id))
            .fetch_one::<(u64, u64)>()
            .await
            .map_err(warehouse_error)?;
        let as_of = settled.max(fresh);
        let plan = BreakdownPlan::new(query.from_ms, query.to_ms);
        let mut statements = Vec::new();
        if let Some(buckets) = plan.buckets {
            statements.push(sql::breakdown_rollups(query, settled, fresh, buckets));
        }
        if !plan.raw.is_empty() {
            statements.push(sql::breakdown_votes(query, as_of, &plan.raw));
        }
        let mut parts: Vec<Vec<BreakdownRow>> = Vec::new();
        for statement in statements {
            parts.push(
                self.client
                    .query_raw(&statement)
                    .fetch_all()
                    .await
                    .map_err(warehouse_error)?,
            );
        }
        rollup::assemble(parts, as_of)
    }

    async fn window_widths(&self, poll_id: &str) -> Result<Vec<u32>> {
        self.client
            .query_raw(&sql::window_widths(poll_id))
            .fetch_all::<u32>()
            .await
            .map_err(warehouse_error)
    }

    async fn timeseries(&self, query: &TimeseriesQuery) -> Result<Vec<TimePoint>> {
        let rows: Vec<(u32, String, u64)> = self
            .client
            .query_raw(&sql::timeseries(query))
            .fetch_all()
            .await
            .map_err(warehouse_error)?;
        Ok(TimePoint::from_rows(
            rows.into_iter()
                .map(|(t, option, votes)| (i64::from(t), option, votes)),
        ))
    }

    async fn check(&self) -> Result<()> {
        self.server
            .query_raw("SELECT 1")
            .fetch_one::<u8>()
            .await
            .map_err(warehouse_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_types_match_the_column_lists() {
        assert_eq!(VoteRow::COLUMN_NAMES, sql::vote_columns());
        assert_eq!(WindowRowCh::COLUMN_NAMES, sql::WINDOW_COLUMNS);
        assert_eq!(RollupRowCh::COLUMN_NAMES, sql::rollup_columns());
    }
}
