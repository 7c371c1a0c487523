//! tally's warehouse on ClickHouse, for the distributed deployment, over the HTTP interface.
//!
//! In: position-stamped votes, window rows and segment rollups from the processor. Out:
//! tallies, breakdowns and time series for the query service. Schema and statements live in
//! [`sql`]; they run on ClickHouse 18.16 and on current releases alike (checked through chdb
//! by `tests/dialect.rs`). Row types are sent as RowBinary with the client's schema
//! validation off (18.16 does not know `RowBinaryWithNamesAndTypes`). One INSERT is one
//! atomic block, which is what exactly-once counting rests on.
//!
//! Analysts' SQL ([`analyst`]) is vetted, rewritten and rendered here, then run as the
//! analyst user (read-only, `readonly=2`) with tally's limits as settings of the request;
//! its `JSONCompact` answer streams back as Arrow batches ([`rows`]).

pub mod analyst;
mod rowbinary;
pub mod rows;
pub mod sql;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{
    ArrayRef, Int32Builder, Int64Builder, ListBuilder, RecordBatch, StringBuilder, UInt64Builder,
};
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use clickhouse::{Row, RowOwned, RowWrite};
use serde::{Deserialize, Serialize};

use tally_core::analyst::{self as model, Limit, SqlLimits};
use tally_core::analytics::{Breakdown, BreakdownQuery, TimePoint, TimeseriesQuery};
use tally_core::poll::Poll;
use tally_core::ports::{
    newer_positions, poll_as_of, AnalystRows, BoxStream, Positions, StoredVote, Warehouse,
    Watermarks, WindowRow,
};
use tally_core::results::Tally;
use tally_core::rollup::{self, BreakdownPlan, BreakdownRow, GroupSums, RollupLevel, RollupRow};
use tally_core::segment::Segment;
use tally_core::vote::Vote;
use tally_core::{Error, Result};

/// ClickHouse error codes of a server that is overloaded or busy rather than refusing the
/// statement: a retry later may succeed (memory limit, too many parts, timeout, too many
/// simultaneous queries, network between servers).
const TRANSIENT_CODES: [u32; 6] = [159, 202, 209, 210, 241, 252];

/// Whether a server's error text carries `code`: `Code: 159.` on current releases,
/// `Code: 159,` on 18.16.
fn has_code(text: &str, code: u32) -> bool {
    let mark = format!("Code: {code}");
    text.match_indices(&mark)
        .any(|(at, _)| matches!(text.as_bytes().get(at + mark.len()), Some(b'.' | b',')))
}

/// Maps a client error to its kind: no answer, or an overloaded server, is `Unavailable`;
/// a statement the server refused is `Failed`; rows that do not decode are `Corrupt`.
fn warehouse_error(err: clickhouse::error::Error) -> Error {
    use clickhouse::error::Error as Ch;
    match &err {
        Ch::Network(_) | Ch::TimedOut => Error::unavailable("warehouse", err),
        Ch::BadResponse(text) if TRANSIENT_CODES.iter().any(|code| has_code(text, *code)) => {
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
    /// The read-only user analysts' SQL runs as (its profile `readonly=2`: no writes, no
    /// DDL, `readonly` fixed, settings open to tally's limits). Without one, analysts' SQL
    /// runs as `user` with `readonly=2` set on each request.
    pub analyst_user: Option<String>,
    pub analyst_password: Option<String>,
    /// Spread over the shards of a cluster; `None`: everything on the server at `url`.
    pub sharding: Option<Sharding>,
    /// Tables made `Replicated…MergeTree` ([`sql::replicated_table`]): each shard (or the one
    /// server's data) kept on several replicas through ClickHouse Keeper. The servers need
    /// a `zookeeper` section and `shard`/`replica` macros (docs/SCALING.md).
    pub replicated: bool,
}

/// A warehouse spread over the shards of a ClickHouse cluster: every server keeps its
/// shard's rows in `<database>_shard`, and `Distributed` tables of the same names over all
/// of them in `<database>` ([`sql::migration_steps`]). A log partition's rows are written to shard
/// `partition % shards` and nowhere else, with its watermarks and fences beside them, so a
/// processor's exactly-once bookkeeping stays on one server; everything is read through
/// the `Distributed` tables of the server at [`ClickHouseConfig::url`] (any of the cluster's).
#[derive(Debug, Clone)]
pub struct Sharding {
    /// The cluster's name in each server's `remote_servers`.
    pub cluster: String,
    /// The HTTP URL of one server of each shard, in the cluster's shard order.
    pub shards: Vec<String>,
}

pub use sql::SHARD_DATABASE_SUFFIX;

/// Where the rows of some log partitions are written: the one server of an unsharded
/// warehouse, or a shard's server and its local database.
#[derive(Clone)]
struct Writer {
    /// The server, no database chosen (for DDL).
    server: clickhouse::Client,
    /// The database the rows are written to.
    client: clickhouse::Client,
    url: String,
    database: String,
    /// Whether the server takes `insert_deduplication_token`, asked once.
    tokens: Arc<tokio::sync::OnceCell<bool>>,
}

impl Writer {
    /// Whether inserts here carry a deduplication token ([`sql::TAKES_DEDUPLICATION_TOKENS`]).
    async fn takes_tokens(&self) -> Result<bool> {
        self.tokens
            .get_or_try_init(|| async {
                Ok(fetch_u64(&self.server, sql::TAKES_DEDUPLICATION_TOKENS).await? > 0)
            })
            .await
            .copied()
    }
}

#[derive(Clone)]
pub struct ClickHouseWarehouse {
    client: clickhouse::Client,
    server: clickhouse::Client,
    /// The client analysts' queries go through: the analyst user's, on the database.
    analyst: clickhouse::Client,
    database: String,
    /// Whether the server's own time zone is UTC (a `DateTime` without one is in it).
    server_utc: Arc<tokio::sync::OnceCell<bool>>,
    /// Fenced inserts go over plain HTTP: the client library has no external tables.
    http: reqwest::Client,
    /// Where each partition's rows go: `writers[partition % writers.len()]`.
    writers: Arc<Vec<Writer>>,
    cluster: Option<String>,
    replicated: bool,
    /// The server read through.
    url: String,
    user: Option<String>,
    password: Option<String>,
    /// The epoch this handle fenced each partition with ([`Warehouse::fence`]); inserts for
    /// those partitions are made conditional on it.
    fences: Arc<Mutex<HashMap<u16, u64>>>,
    /// Names this handle in deduplication tokens: a retry by the same handle is dropped if
    /// its first try landed; a batch written again by another (after a restart, or into
    /// tables rebuilt from the log) is the fence's and the watermarks' business.
    incarnation: String,
    /// What is known of each poll's cube ([`ClickHouseWarehouse::cube_positions`]).
    cubes: Arc<Mutex<HashMap<String, CubeCoverage>>>,
}

/// A row of [`sql::RowShape::PerAnswerList`], as RowBinary gives it.
#[derive(Row, Deserialize)]
struct ListRow {
    group: Vec<String>,
    ballots: u64,
    answers: Vec<String>,
    votes: Vec<u64>,
}

/// A part of a breakdown read from rollup rows, in the shape it was read in
/// ([`sql::RowShape`]).
enum RollupPart {
    Lists(Vec<rollup::BreakdownListRow>),
    Answers(Vec<BreakdownRow>),
}

impl RollupPart {
    fn add_to(self, sums: &mut GroupSums) -> Result<()> {
        match self {
            RollupPart::Lists(rows) => sums.add_list_rows(rows),
            RollupPart::Answers(rows) => sums.add_rows(rows),
        }
    }
}

/// Whether a poll's cube holds every rollup write of it.
#[derive(Debug, Clone, Copy)]
enum CubeCoverage {
    /// It does, and always will: every write since the first holds its cube rows.
    Whole,
    /// It did not when asked at this time. Asked again after [`CUBE_RECHECK`]: a poll's
    /// first write read between its insert and its view's copy looks uncovered for a moment.
    Partial(std::time::Instant),
}

/// How long a poll whose cube was found not to hold every write is read from its whole
/// segments before the warehouse is asked again.
const CUBE_RECHECK: Duration = Duration::from_secs(60);

/// The settled rows of a poll's own key's set that come after its newest added-up run before
/// [`Warehouse::compact_sets`] adds them up again: at least this many, and at least as many
/// as that run holds — so a breakdown reads under about twice the rows of one run and one
/// settled write, and each run writes no more than the rows that came since the last.
const COMPACT_SET_ROWS: u64 = 2_000;

/// How many polls [`ClickHouseWarehouse::cube_positions`] remembers before it starts over.
const CUBE_POLLS_REMEMBERED: usize = 100_000;

/// How long [`Warehouse::fence`] waits after recording an epoch before it returns: an
/// insert of the earlier owner that passed its check just before is written by then (the
/// check and the write are one statement on the server, which runs in milliseconds once
/// the batch has arrived).
pub const FENCE_SETTLE: Duration = Duration::from_secs(2);

/// The ClickHouse error code of `throwIf`: what a fenced insert is refused with.
const FENCED_CODE: u32 = 395;

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
    dims: String,
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

impl VoteRow {
    fn into_stored(self) -> StoredVote {
        StoredVote {
            seq: self.seq,
            vote: Vote {
                vote_id: self.vote_id,
                poll_id: self.poll_id,
                voter_key: self.voter_key,
                choice: self.choice,
                value: self.value,
                segment: Segment {
                    campaign: self.campaign,
                    channel: self.channel,
                    source: self.source,
                    medium: self.medium,
                    country: self.country,
                    device: self.device,
                    custom: self.dim_keys.into_iter().zip(self.dim_values).collect(),
                },
                received_at: self.received_ms as i64,
            },
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
            dims: row.dims.clone(),
        }
    }
}

impl ClickHouseWarehouse {
    async fn breakdown_rows(&self, statement: &str) -> Result<Vec<BreakdownRow>> {
        self.client
            .query_raw(statement)
            .fetch_all()
            .await
            .map_err(warehouse_error)
    }

    /// A breakdown's rollup rows ([`sql::breakdown_rollups`]), added up per answer list
    /// where its group is not a constant; read again one row per answer when that fills the
    /// row limit, so a full result means too many groups.
    async fn rollup_part(
        &self,
        query: &BreakdownQuery,
        source: sql::RollupSource<'_>,
        settled: &[(u16, u64)],
        fresh: &[(u16, u64)],
        buckets: (Option<i64>, Option<i64>),
    ) -> Result<RollupPart> {
        let statement =
            |shape| sql::breakdown_rollups(query, source, settled, fresh, buckets, shape);
        if sql::reads_answer_lists(query, source) {
            let rows: Vec<ListRow> = self
                .client
                .query_raw(&statement(sql::RowShape::PerAnswerList))
                .fetch_all()
                .await
                .map_err(warehouse_error)?;
            if rows.len() < rollup::BREAKDOWN_ROW_LIMIT {
                let rows = rows
                    .into_iter()
                    .map(|r| (r.group, r.ballots, r.answers, r.votes))
                    .collect();
                return Ok(RollupPart::Lists(rows));
            }
        }
        let rows = self
            .breakdown_rows(&statement(sql::RowShape::PerAnswer))
            .await?;
        Ok(RollupPart::Answers(rows))
    }

    /// How far a poll's rollup rows of `level` cover each partition: its whole segments,
    /// or (`totals`) its cube's totals rows.
    async fn rollup_positions(
        &self,
        poll_id: &str,
        level: RollupLevel,
        totals: bool,
    ) -> Result<Vec<(u16, u64)>> {
        self.client
            .query_raw(&sql::rollup_positions(poll_id, level, totals))
            .fetch_all()
            .await
            .map_err(warehouse_error)
    }

    /// The settled and fresh positions of a poll's rollup rows per partition, of its cube
    /// (`cube`) or its whole segments, both read at once.
    async fn level_positions(&self, poll_id: &str, cube: bool) -> Result<(Positions, Positions)> {
        let (settled, fresh) = futures::try_join!(
            self.rollup_positions(poll_id, RollupLevel::Settled, cube),
            self.rollup_positions(poll_id, RollupLevel::Fresh, cube),
        )?;
        Ok((settled.into_iter().collect(), fresh.into_iter().collect()))
    }

    /// The settled and fresh positions of a poll's cube rows per partition when its cube
    /// holds every rollup write of it, so a breakdown may read it; `None` for a poll with
    /// rollups written before the cube existed, read from its whole segments. Whether the
    /// cube holds them all is asked of the warehouse once per poll and process (while the
    /// answer is yes; a no is asked again after [`CUBE_RECHECK`]).
    async fn cube_positions(&self, poll_id: &str) -> Result<Option<(Positions, Positions)>> {
        let known = self.cubes.lock().expect("cubes").get(poll_id).copied();
        match known {
            Some(CubeCoverage::Whole) => {
                return Ok(Some(self.level_positions(poll_id, true).await?));
            }
            Some(CubeCoverage::Partial(at)) if at.elapsed() < CUBE_RECHECK => return Ok(None),
            _ => {}
        }
        let coverage = async {
            self.client
                .query_raw(&sql::cube_coverage(poll_id))
                .fetch_one::<u64>()
                .await
                .map_err(warehouse_error)
        };
        let ((settled, fresh), uncovered) =
            futures::try_join!(self.level_positions(poll_id, true), coverage)?;
        let covers = uncovered == 0;
        // A poll without rows at either level is asked again when it has them.
        let learnt = match (covers, !settled.is_empty() && !fresh.is_empty()) {
            (true, true) => Some(CubeCoverage::Whole),
            (true, false) => None,
            (false, _) => Some(CubeCoverage::Partial(std::time::Instant::now())),
        };
        if let Some(learnt) = learnt {
            let mut cubes = self.cubes.lock().expect("cubes");
            if cubes.len() >= CUBE_POLLS_REMEMBERED {
                cubes.clear();
            }
            cubes.insert(poll_id.to_owned(), learnt);
        }
        Ok(covers.then_some((settled, fresh)))
    }

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
        let connect = |url: &str| {
            let mut server = clickhouse::Client::default()
                .with_url(url)
                .with_validation(false);
            if let Some(user) = &config.user {
                server = server.with_user(user);
            }
            if let Some(password) = &config.password {
                server = server.with_password(password);
            }
            server
        };
        let server = connect(&config.url);
        let client = server.clone().with_database(&config.database);
        let writer = |url: &str, database: String| {
            let server = connect(url);
            Writer {
                client: server.clone().with_database(&database),
                server,
                url: url.trim_end_matches('/').to_owned(),
                database,
                tokens: Arc::default(),
            }
        };
        let (writers, cluster) = match &config.sharding {
            None => (vec![writer(&config.url, config.database.clone())], None),
            Some(sharding) => {
                if sharding.shards.is_empty() || sharding.cluster.trim().is_empty() {
                    return Err(Error::failed(
                        "warehouse",
                        "a sharded warehouse needs its cluster's name and one URL per shard",
                    ));
                }
                let local = format!("{}{SHARD_DATABASE_SUFFIX}", config.database);
                let writers = sharding
                    .shards
                    .iter()
                    .map(|url| writer(url, local.clone()))
                    .collect();
                (writers, Some(sharding.cluster.clone()))
            }
        };
        let mut analyst = clickhouse::Client::default()
            .with_url(&config.url)
            .with_validation(false)
            .with_database(&config.database);
        match &config.analyst_user {
            Some(user) => {
                analyst = analyst.with_user(user);
                if let Some(password) = &config.analyst_password {
                    analyst = analyst.with_password(password);
                }
            }
            None => {
                if let Some(user) = &config.user {
                    analyst = analyst.with_user(user);
                }
                if let Some(password) = &config.password {
                    analyst = analyst.with_password(password);
                }
            }
        }
        // Idle connections are let go before the server closes them (`keep_alive_timeout`,
        // 3 s by default), as the ClickHouse client does: reusing one the server closed
        // failed the next insert with "Broken pipe" (retried, but a warning and a delay).
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            .pool_idle_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| Error::failed("warehouse", e))?;
        Ok(ClickHouseWarehouse {
            client,
            server,
            analyst,
            database: config.database.clone(),
            server_utc: Arc::default(),
            http,
            writers: Arc::new(writers),
            cluster,
            replicated: config.replicated,
            url: config.url.trim_end_matches('/').to_owned(),
            user: config.user.clone(),
            password: config.password.clone(),
            fences: Arc::default(),
            incarnation: uuid::Uuid::new_v4().simple().to_string(),
            cubes: Arc::default(),
        })
    }

    /// Whether the server's time zone is UTC, asked once.
    async fn server_utc(&self) -> Result<bool> {
        self.server_utc
            .get_or_try_init(|| async {
                let zone: String = self
                    .server
                    .query_raw("SELECT timezone()")
                    .fetch_one()
                    .await
                    .map_err(warehouse_error)?;
                Ok([
                    "UTC",
                    "Etc/UTC",
                    "GMT",
                    "Etc/GMT",
                    "UCT",
                    "Universal",
                    "Zulu",
                ]
                .contains(&zone.as_str()))
            })
            .await
            .copied()
    }

    /// Where a poll's stored votes end in each partition ([`sql::poll_positions`]).
    async fn poll_positions(&self, poll_id: &str) -> Result<Vec<(u16, u64)>> {
        self.client
            .query_raw(&sql::poll_positions(poll_id))
            .fetch_all()
            .await
            .map_err(warehouse_error)
    }

    /// Where `partition`'s rows, watermarks and fences are.
    fn writer(&self, partition: u16) -> &Writer {
        &self.writers[usize::from(partition) % self.writers.len()]
    }

    /// On servers that have it, the plain tables a processor writes remember their recent
    /// inserts, so a retried one carrying the same token is dropped (replicated tables do
    /// that by themselves; 18.16 does neither, and the watermark check stands alone there).
    async fn remember_inserts(&self) -> Result<()> {
        if self.replicated {
            return Ok(());
        }
        for writer in self.writers.iter() {
            if fetch_u64(&writer.server, sql::HAS_DEDUPLICATION_WINDOW).await? == 0 {
                continue;
            }
            for table in sql::PARTITION_TABLES {
                execute(&writer.client, &sql::deduplication_window(table)).await?;
            }
        }
        Ok(())
    }

    /// Every server this warehouse talks to, once each: the one read through, then each
    /// shard's that is another.
    fn servers(&self) -> Vec<(&str, &clickhouse::Client)> {
        let mut servers = vec![(self.url.as_str(), &self.server)];
        for writer in self.writers.iter() {
            if !servers.iter().any(|(url, _)| *url == writer.url) {
                servers.push((&writer.url, &writer.server));
            }
        }
        servers
    }

    /// Checks each shard against the cluster and the layout its rows were written with,
    /// then applies the migrations on every shard's server, and on the server read through
    /// when it is not one of them.
    async fn migrate_sharded(&self, cluster: &str) -> Result<Vec<u32>> {
        let shards = self.writers.len();
        for (index, writer) in self.writers.iter().enumerate() {
            self.check_shard(writer, index, shards, cluster).await?;
        }
        let local = &self.writers[0].database;
        let mut newly = BTreeSet::new();
        for (url, server) in self.servers() {
            self.refuse_other_layout(url, server).await?;
            newly.extend(
                migrate_server(
                    server,
                    &self.database,
                    Some((local, cluster)),
                    self.replicated,
                )
                .await?,
            );
        }
        Ok(newly.into_iter().collect())
    }

    /// Refuses a shard whose server places it elsewhere in the cluster, or whose rows were
    /// written for another place in the list; records the place of a new one.
    async fn check_shard(
        &self,
        writer: &Writer,
        index: usize,
        shards: usize,
        cluster: &str,
    ) -> Result<()> {
        let url = &writer.url;
        let known: Vec<(u32, u8)> = writer
            .server
            .query_raw(&sql::cluster_shards(cluster))
            .fetch_all()
            .await
            .map_err(warehouse_error)?;
        let refuse = |what: String| Err(Error::failed("warehouse", what));
        if known.is_empty() {
            return refuse(format!(
                "{url} knows no cluster `{cluster}`: define it in the server's remote_servers, \
                 its shards in the order of TALLY_CLICKHOUSE_SHARDS"
            ));
        }
        let numbers: BTreeSet<u32> = known.iter().map(|(number, _)| *number).collect();
        if numbers.len() != shards {
            return refuse(format!(
                "cluster `{cluster}` has {} shards on {url}, but {shards} shard URLs are \
                 configured (TALLY_CLICKHOUSE_SHARDS): list one server of each shard",
                numbers.len()
            ));
        }
        let place = index + 1;
        match known.iter().find(|(_, local)| *local == 1) {
            Some((number, _)) if *number as usize != place => {
                return refuse(format!(
                    "{url} is shard {number} of cluster `{cluster}` but is listed as shard \
                     {place} in TALLY_CLICKHOUSE_SHARDS: list the shards in the cluster's order"
                ));
            }
            Some(_) => {}
            None => tracing::warn!(
                url = %url,
                cluster,
                "the server does not say which shard of the cluster it is; taking it as listed"
            ),
        }
        execute(
            &writer.server,
            &format!(
                "CREATE DATABASE IF NOT EXISTS {}",
                sql::ident(&writer.database)
            ),
        )
        .await?;
        execute(&writer.client, sql::SHARD_LAYOUT_TABLE).await?;
        let recorded: Option<(u32, u32)> = writer
            .client
            .query_raw(&sql::shard_layout())
            .fetch_optional()
            .await
            .map_err(warehouse_error)?;
        match recorded {
            None => {
                execute(
                    &writer.client,
                    &sql::record_shard_layout(index as u32, shards as u32),
                )
                .await
            }
            Some((was, of)) if (was as usize, of as usize) == (index, shards) => Ok(()),
            Some((was, of)) => refuse(format!(
                "{url} holds the rows of shard {} of {of}, but TALLY_CLICKHOUSE_SHARDS now \
                 makes it shard {place} of {shards}: log partitions would move to servers \
                 without their rows and be counted again. Configure the shards as they were; \
                 to add shards, follow docs/SCALING.md",
                was + 1
            )),
        }
    }

    /// Refuses a database laid out for the other kind of warehouse: unsharded tables where
    /// the configuration says sharded, or `Distributed` ones where it does not;
    /// plain tables where it says replicated, or replicated ones where it does not.
    async fn refuse_other_layout(&self, url: &str, server: &clickhouse::Client) -> Result<()> {
        let sharded = self.cluster.is_some();
        let engine_of = |database: &str| {
            server
                .query_raw(&sql::table_engine(database, "votes"))
                .fetch_optional::<String>()
        };
        let engine = engine_of(&self.database).await.map_err(warehouse_error)?;
        let database = &self.database;
        // Where the rows are: the local database of a sharded one (every writer's is the same).
        let rows_database = &self.writers[0].database;
        let rows_engine = if rows_database == database {
            engine.clone()
        } else {
            engine_of(rows_database).await.map_err(warehouse_error)?
        };
        if let Some(rows_engine) = rows_engine {
            if rows_engine.starts_with("Replicated") != self.replicated {
                return Err(Error::failed(
                    "warehouse",
                    format!(
                        "the tables of `{rows_database}` on {url} are {rows_engine}, but \
                         TALLY_CLICKHOUSE_REPLICATED is {}: set it as they were made (to \
                         replicate existing tables, follow docs/SCALING.md)",
                        self.replicated
                    ),
                ));
            }
        }
        match engine {
            Some(engine) if sharded && engine != "Distributed" => Err(Error::failed(
                "warehouse",
                format!(
                    "database `{database}` on {url} holds an unsharded warehouse ({engine} \
                     tables): give the sharded one a database of its own \
                     (TALLY_CLICKHOUSE_DATABASE), or move the rows as docs/SCALING.md describes"
                ),
            )),
            Some(engine) if !sharded && engine == "Distributed" => Err(Error::failed(
                "warehouse",
                format!(
                    "database `{database}` on {url} is sharded (its tables are Distributed): \
                     set TALLY_CLICKHOUSE_CLUSTER and TALLY_CLICKHOUSE_SHARDS as they were"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// [`insert_rows`] for rows of one partition: for a partition this handle fenced, the
    /// INSERT writes nothing and answers [`Error::Conflict`] once a newer epoch owns it.
    /// `batch` tells the batch from the partition's others (its positions in the log): on a
    /// server that takes deduplication tokens, a retry of the same insert is written once.
    async fn insert_partition_rows<R: RowOwned + RowWrite + rowbinary::RowBinary>(
        &self,
        table: &str,
        partition: u16,
        batch: &str,
        rows: impl ExactSizeIterator<Item = R> + Send,
    ) -> Result<()> {
        if rows.len() == 0 {
            return Ok(());
        }
        let writer = self.writer(partition);
        let token = writer
            .takes_tokens()
            .await?
            .then(|| format!("{}:{table}:{partition}:{batch}", self.incarnation));
        let fenced = self.fences.lock().expect("fences").get(&partition).copied();
        match fenced {
            Some(epoch) => {
                self.insert_fenced(table, partition, epoch, token.as_deref(), rows)
                    .await
            }
            None => insert_rows(&writer.client, table, token.as_deref(), rows).await,
        }
    }

    /// One INSERT … SELECT from the rows sent as an external table, refused by the server
    /// when a newer epoch than `epoch` was fenced into the partition
    /// ([`sql::fenced_insert`]).
    async fn insert_fenced<R: RowOwned + rowbinary::RowBinary>(
        &self,
        table: &str,
        partition: u16,
        epoch: u64,
        token: Option<&str>,
        rows: impl Iterator<Item = R>,
    ) -> Result<()> {
        let structure = sql::external_structure(table)
            .ok_or_else(|| Error::failed("warehouse", format!("no migration creates `{table}`")))?;
        let statement = sql::fenced_insert(table, R::COLUMN_NAMES, partition, epoch);
        // RowBinary may hold any bytes, the multipart delimiter included: a random boundary
        // per request, chosen after the rows are fixed, cannot be aimed at by a vote.
        let boundary = format!("tally-batch-{}", uuid::Uuid::new_v4().simple());
        let mut body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"batch\"; filename=\"batch\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .into_bytes();
        for row in rows {
            row.encode(&mut body);
        }
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let writer = self.writer(partition);
        let mut request = self.http.post(format!("{}/", writer.url)).query(&[
            ("database", writer.database.as_str()),
            ("query", statement.as_str()),
            ("batch_format", "RowBinary"),
            ("batch_structure", structure.as_str()),
        ]);
        if let Some(token) = token {
            request = request.query(&[("insert_deduplication_token", token)]);
        }
        let mut request = request
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body);
        if let Some(user) = &self.user {
            request = request.basic_auth(user, self.password.as_ref());
        }
        let response = request
            .send()
            .await
            .map_err(|e| Error::unavailable("warehouse", e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response
            .text()
            .await
            .map_err(|e| Error::unavailable("warehouse", e))?;
        if has_code(&text, FENCED_CODE) {
            return Err(Error::Conflict(format!(
                "partition {partition} (a newer owner than epoch {epoch} fenced it)"
            )));
        }
        Err(warehouse_error(clickhouse::error::Error::BadResponse(
            text.trim().to_owned(),
        )))
    }
}

/// Applies the pending migrations on one server, as [`sql::migration_steps`] places them
/// (`shard`: the local database and the cluster of a sharded warehouse). Every step is
/// idempotent, so services starting together may race through them.
async fn migrate_server(
    server: &clickhouse::Client,
    database: &str,
    shard: Option<(&str, &str)>,
    replicated: bool,
) -> Result<Vec<u32>> {
    let main = server.clone().with_database(database);
    let local = shard.map(|(local, _)| server.clone().with_database(local));
    for name in std::iter::once(database).chain(shard.map(|(local, _)| local)) {
        execute(
            server,
            &format!("CREATE DATABASE IF NOT EXISTS {}", sql::ident(name)),
        )
        .await?;
    }
    execute(&main, sql::MIGRATIONS_TABLE).await?;
    let applied: Vec<u32> = main
        .query_raw(&sql::applied_migrations())
        .fetch_all::<u32>()
        .await
        .map_err(warehouse_error)?;
    let mut newly = Vec::new();
    for (version, name, statement) in sql::MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        for (target, statement) in
            sql::migration_steps(name, statement, database, shard, replicated)
        {
            let client = match (target, &local) {
                (sql::Target::Local, Some(local)) => local,
                _ => &main,
            };
            match execute(client, &statement).await {
                Ok(()) => {}
                // Another service applied it a moment ago (the one kind of migration that
                // cannot say IF NOT EXISTS on 18.16: adding a column).
                Err(err) if err.chain().to_string().contains("already exists") => {
                    tracing::info!(
                        version,
                        name,
                        "warehouse migration applied by another service"
                    );
                }
                Err(err) => return Err(err),
            }
        }
        execute(&main, &sql::record_migration(*version, name)).await?;
        tracing::info!(version, name, "applied warehouse migration");
        newly.push(*version);
    }
    Ok(newly)
}

/// What tells a batch of window or rollup rows from a partition's others: the log position
/// it covers, and how many rows it holds.
fn covered_batch(last_seqs: impl Iterator<Item = u64>, rows: usize) -> String {
    format!("{}x{rows}", last_seqs.max().unwrap_or(0))
}

async fn fetch_u64(client: &clickhouse::Client, sql: &str) -> Result<u64> {
    client
        .query_raw(sql)
        .fetch_one::<u64>()
        .await
        .map_err(warehouse_error)
}

async fn execute(client: &clickhouse::Client, sql: &str) -> Result<()> {
    client
        .query_raw(sql)
        .execute()
        .await
        .map_err(warehouse_error)
}

/// Writes `rows` into `table` with one INSERT: they land together or not at all (and, with
/// a deduplication `token` the server knows, once however often they are sent). No rows,
/// no statement.
async fn insert_rows<R: RowOwned + RowWrite>(
    client: &clickhouse::Client,
    table: &str,
    token: Option<&str>,
    rows: impl ExactSizeIterator<Item = R> + Send,
) -> Result<()> {
    if rows.len() == 0 {
        return Ok(());
    }
    let mut insert = client.insert::<R>(table).await.map_err(warehouse_error)?;
    if let Some(token) = token {
        insert = insert.with_setting("insert_deduplication_token", token);
    }
    for row in rows {
        insert.write(&row).await.map_err(warehouse_error)?;
    }
    insert.end().await.map_err(warehouse_error)
}

#[async_trait]
impl Warehouse for ClickHouseWarehouse {
    async fn migrate(&self) -> Result<Vec<u32>> {
        let applied = match &self.cluster {
            None => {
                self.refuse_other_layout(&self.url, &self.server).await?;
                migrate_server(&self.server, &self.database, None, self.replicated).await
            }
            Some(cluster) => self.migrate_sharded(cluster).await,
        }?;
        self.remember_inserts().await?;
        Ok(applied)
    }

    async fn watermarks(&self, partition: u16) -> Result<Watermarks> {
        let rows = &self.writer(partition).client;
        Ok(Watermarks {
            votes: fetch_u64(rows, &sql::votes_watermark(partition)).await?,
            windows: fetch_u64(rows, &sql::windows_watermark(partition)).await?,
            rollups: fetch_u64(rows, &sql::rollups_watermark(partition, RollupLevel::Fresh))
                .await?,
            settled: fetch_u64(
                rows,
                &sql::rollups_watermark(partition, RollupLevel::Settled),
            )
            .await?,
        })
    }

    async fn fence(&self, partition: u16, epoch: u64) -> Result<()> {
        let rows = &self.writer(partition).client;
        let newest = fetch_u64(rows, &sql::fence_epoch(partition)).await?;
        if newest > epoch {
            return Err(Error::Conflict(format!(
                "partition {partition} (epoch {newest} owns it, newer than {epoch}; if the \
                 lease bucket was deleted and made again, stop every processor and run \
                 `TRUNCATE TABLE partition_fences`)"
            )));
        }
        execute(rows, &sql::record_fence(partition, epoch)).await?;
        self.fences.lock().expect("fences").insert(partition, epoch);
        tokio::time::sleep(FENCE_SETTLE).await;
        Ok(())
    }

    async fn insert_votes(&self, partition: u16, votes: &[StoredVote]) -> Result<()> {
        let batch = match (votes.first(), votes.last()) {
            (Some(first), Some(last)) => format!("{}-{}", first.seq, last.seq),
            _ => return Ok(()),
        };
        let rows = votes.iter().map(|stored| VoteRow::new(partition, stored));
        self.insert_partition_rows("votes", partition, &batch, rows)
            .await
    }

    async fn insert_windows(&self, partition: u16, rows: &[WindowRow]) -> Result<()> {
        let batch = covered_batch(rows.iter().map(|row| row.last_seq), rows.len());
        let rows = rows.iter().map(|row| WindowRowCh::new(partition, row));
        self.insert_partition_rows("vote_windows", partition, &batch, rows)
            .await
    }

    async fn insert_rollups(
        &self,
        partition: u16,
        level: RollupLevel,
        rows: &[RollupRow],
    ) -> Result<()> {
        let batch = covered_batch(rows.iter().map(|row| row.last_seq), rows.len());
        let rows = rows.iter().map(|row| RollupRowCh::new(partition, row));
        self.insert_partition_rows(level.table(), partition, &batch, rows)
            .await
    }

    async fn compact_sets(
        &self,
        partition: u16,
        sets: &[(String, String)],
        covered: u64,
    ) -> Result<()> {
        // On the server holding the partition's rows, in its own tables.
        let client = &self.writer(partition).client;
        for (poll_id, set) in sets {
            let since: Option<(u16, u64, String, u64)> = client
                .query_raw(&sql::newest_compactions(poll_id, set, Some(partition)))
                .fetch_optional()
                .await
                .map_err(warehouse_error)?;
            let since = since.map(|(_, upto, run, rows)| (upto, run, rows));
            let (after, held) = since
                .as_ref()
                .map_or((0, 0), |(upto, _, rows)| (*upto, *rows));
            if after >= covered {
                continue;
            }
            let between = sql::set_rows_between(poll_id, set, partition, after, covered);
            let new = fetch_u64(client, &between).await?;
            if new < held.max(COMPACT_SET_ROWS) {
                continue;
            }
            let started = std::time::Instant::now();
            let run = uuid::Uuid::new_v4().to_string();
            let since = since.as_ref().map(|(upto, run, _)| (*upto, run.as_str()));
            execute(
                client,
                &sql::compact_set(poll_id, set, partition, since, covered, &run),
            )
            .await?;
            let rows = fetch_u64(client, &sql::compacted_rows(poll_id, set, covered, &run)).await?;
            execute(
                client,
                &sql::record_compaction(partition, poll_id, set, covered, &run, rows),
            )
            .await?;
            tracing::debug!(
                partition,
                poll_id,
                set,
                upto = covered,
                read = held + new,
                rows,
                ms = started.elapsed().as_millis() as u64,
                "added up the settled rows of a poll's own key"
            );
        }
        Ok(())
    }

    async fn tally_by_partition(&self, poll_id: &str) -> Result<BTreeMap<u16, Tally>> {
        let totals: Vec<(u16, u64, u64, u64)> = self
            .client
            .query_raw(&sql::tally_totals_by_partition(poll_id))
            .fetch_all()
            .await
            .map_err(warehouse_error)?;
        let positions: Vec<(u16, u64)> = totals
            .iter()
            .map(|(partition, _, _, seq)| (*partition, *seq))
            .collect();
        // Counted up to those positions, so the counts agree with the totals whatever is
        // inserted meanwhile.
        let counts: Vec<(u16, String, u64)> = self
            .client
            .query_raw(&sql::tally_counts_by_partition(poll_id, &positions))
            .fetch_all()
            .await
            .map_err(warehouse_error)?;
        let mut tallies: BTreeMap<u16, Tally> = totals
            .into_iter()
            .map(|(partition, ballots, unique_voters, as_of)| {
                let tally = Tally {
                    ballots,
                    unique_voters,
                    counts: BTreeMap::new(),
                    as_of,
                };
                (partition, tally)
            })
            .collect();
        for (partition, answer, count) in counts {
            tallies
                .entry(partition)
                .or_default()
                .counts
                .insert(answer, count);
        }
        Ok(tallies)
    }

    async fn counted_vote(&self, poll_id: &str, vote_id: &str) -> Result<Option<StoredVote>> {
        let row = self
            .client
            .query_raw(&sql::counted_vote(poll_id, vote_id))
            .fetch_optional::<VoteRow>()
            .await
            .map_err(warehouse_error)?;
        Ok(row.map(VoteRow::into_stored))
    }

    async fn voter_keys(&self, poll_id: &str) -> Result<Vec<String>> {
        self.client
            .query_raw(&sql::voter_keys(poll_id))
            .fetch_all::<String>()
            .await
            .map_err(warehouse_error)
    }

    async fn breakdown(&self, query: &BreakdownQuery) -> Result<Breakdown> {
        let set = rollup::cube_set(query);
        // Whether the cube answers, and (for a set of the poll's own keys) its newest
        // added-up run, asked at once.
        let positions = async {
            match &set {
                Some(_) => self.cube_positions(&query.poll_id).await,
                None => Ok(None),
            }
        };
        let compaction = async {
            match &set {
                Some(set) if set.custom => self
                    .client
                    .query_raw(&sql::newest_compactions(&query.poll_id, &set.dims, None))
                    .fetch_all::<(u16, u64, String, u64)>()
                    .await
                    .map(|runs| {
                        runs.into_iter()
                            .map(|(partition, upto, run, _)| (partition, upto, run))
                            .collect::<Vec<_>>()
                    })
                    .map_err(warehouse_error),
                _ => Ok(Vec::new()),
            }
        };
        let (positions, compacted) = futures::try_join!(positions, compaction)?;
        let cube = set.zip(positions);
        let (settled, fresh) = match cube {
            Some((_, ref positions)) => positions.clone(),
            None => self.level_positions(&query.poll_id, false).await?,
        };
        let cube = cube.map(|(set, _)| set);
        let plan = BreakdownPlan::for_set(query, cube.as_ref());
        let covered = newer_positions(&settled, &fresh);
        let as_of = poll_as_of(&covered);
        let covered: Vec<(u16, u64)> = covered.into_iter().collect();
        let (settled, fresh): (Vec<(u16, u64)>, Vec<(u16, u64)>) =
            (settled.into_iter().collect(), fresh.into_iter().collect());
        let mut sums = GroupSums::default();
        if let Some(buckets) = plan.buckets {
            let source = match &cube {
                None => sql::RollupSource::Whole,
                Some(set) => sql::RollupSource::Cube {
                    dims: &set.dims,
                    filtered: !set.custom,
                    compacted: if set.custom { &compacted } else { &[] },
                },
            };
            let part = self.rollup_part(query, source, &settled, &fresh, buckets);
            if cube.as_ref().is_some_and(|set| set.custom) {
                // The set holds the key's non-empty values only; the votes without it are
                // the totals less the rest, and filters apply after. Both read at once.
                let totals = sql::RollupSource::Totals;
                let totals = self.rollup_part(query, totals, &settled, &fresh, buckets);
                let (part, totals) = futures::try_join!(part, totals)?;
                part.add_to(&mut sums)?;
                let mut all = GroupSums::default();
                totals.add_to(&mut all)?;
                sums.complete_custom(query, all)?;
            } else {
                part.await?.add_to(&mut sums)?;
            }
        }
        // The whole minutes a set kept per hour does not answer, from the whole segments.
        for range in &plan.segments {
            let whole = sql::RollupSource::Whole;
            self.rollup_part(query, whole, &settled, &fresh, *range)
                .await?
                .add_to(&mut sums)?;
        }
        if !plan.raw.is_empty() {
            sums.add_rows(
                self.breakdown_rows(&sql::breakdown_votes(query, &covered, &plan.raw))
                    .await?,
            )?;
        }
        Ok(sums.into_breakdown(as_of))
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

    async fn segment_values(
        &self,
        poll_id: &str,
        partition: u16,
    ) -> Result<BTreeMap<String, BTreeSet<String>>> {
        let pairs: Vec<(String, String)> = self
            .client
            .query_raw(&sql::segment_values(poll_id, partition))
            .fetch_all()
            .await
            .map_err(warehouse_error)?;
        let mut values: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (dimension, value) in pairs {
            values.entry(dimension).or_default().insert(value);
        }
        Ok(values)
    }

    async fn check(&self) -> Result<()> {
        for (_, server) in self.servers() {
            server
                .query_raw("SELECT 1")
                .fetch_one::<u8>()
                .await
                .map_err(warehouse_error)?;
        }
        Ok(())
    }

    async fn record_polls(&self, polls: &[Poll]) -> Result<()> {
        // Sharded, poll records live on the first shard (their `Distributed` table's key).
        insert_rows(
            &self.writers[0].client,
            "poll_records",
            None,
            polls.iter().map(PollRecordRow::new),
        )
        .await
    }

    async fn analyst_sql(&self, sql_text: &str, limits: &SqlLimits) -> Result<AnalystRows> {
        let positions: Vec<(u16, u64)> = self
            .client
            .query_raw(&sql::vote_positions())
            .fetch_all()
            .await
            .map_err(warehouse_error)?;
        let rendered = analyst::render(sql_text, &positions).map_err(Error::Invalid)?;
        let server_utc = self.server_utc().await?;
        let seconds = limits.max_time.as_secs_f64().ceil().max(1.0);
        // Set here, on every request, and nothing of the caller's ever reaches the URL or
        // the settings: the query was rendered from its vetted tree, and SETTINGS in it
        // were refused.
        let query = self
            .analyst
            .query_raw(&rendered)
            .with_setting("readonly", "2")
            .with_setting("max_execution_time", format!("{seconds}"))
            .with_setting("timeout_overflow_mode", "throw")
            .with_setting("max_result_rows", limits.max_rows.to_string())
            .with_setting("max_result_bytes", limits.max_result_bytes.to_string())
            .with_setting("result_overflow_mode", "throw")
            .with_setting("max_memory_usage", limits.max_memory_bytes.to_string())
            .with_setting("join_use_nulls", "1")
            .with_setting("join_default_strictness", "ALL")
            .with_setting("enable_optimize_predicate_expression", "1")
            // Infinities and NaN as "inf" and "nan", not as null in a column that has none.
            .with_setting("output_format_json_quote_denormals", "1");
        let cursor = query
            .fetch_bytes("JSONCompact")
            .map_err(|err| analyst_error(err, limits))?;
        // The server stops the query at `max_execution_time`; this stops waiting for a
        // server that does not.
        let deadline = tokio::time::Instant::now() + limits.max_time + Duration::from_secs(5);
        let mut answer = JsonAnswer {
            cursor,
            reader: rows::JsonCompactReader::new(server_utc),
            ready: VecDeque::new(),
            ended: false,
            deadline,
            limits: *limits,
            rows_read: Arc::new(AtomicU64::new(0)),
        };
        let schema = answer.head().await?;
        let as_of = positions.iter().map(|(_, seq)| *seq).max().unwrap_or(0);
        let rows_read = answer.rows_read.clone();
        Ok(AnalystRows {
            schema,
            as_of,
            positions: positions.into_iter().collect(),
            batches: answer.into_stream(),
            rows_read,
        })
    }

    async fn ballots(&self, poll_id: &str) -> Result<AnalystRows> {
        let positions = self.poll_positions(poll_id).await?;
        let cursor = self
            .client
            .query_raw(&sql::ballots_of_poll(poll_id, &positions))
            .fetch::<BallotRow>()
            .map_err(warehouse_error)?;
        let rows_read = Arc::new(AtomicU64::new(0));
        let positions: Positions = positions.into_iter().collect();
        Ok(AnalystRows {
            schema: model::ballot_schema(),
            as_of: poll_as_of(&positions),
            positions,
            batches: ballot_batches(cursor, rows_read.clone()),
            rows_read,
        })
    }
}

/// A poll definition as a row of `poll_records`.
#[derive(Row, Serialize)]
struct PollRecordRow {
    poll_id: String,
    title: String,
    question: String,
    kind: String,
    campaign: Option<String>,
    dedupe: String,
    results_visibility: String,
    require_token: u8,
    max_choices: Option<u32>,
    scale_min: Option<i32>,
    scale_max: Option<i32>,
    dimensions: Vec<String>,
    answer_ids: Vec<String>,
    answer_labels: Vec<String>,
    created_at: u32,
    updated_at: u32,
    opens_at: Option<u32>,
    closes_at: Option<u32>,
    closed_at: Option<u32>,
    archived_at: Option<u32>,
    version: u64,
    spread: u16,
}

/// Epoch ms as a `DateTime` (seconds, within what it holds).
fn date_time(ms: i64) -> u32 {
    u32::try_from(ms.div_euclid(1000).max(0)).unwrap_or(u32::MAX)
}

impl PollRecordRow {
    fn new(poll: &Poll) -> Self {
        let scale = poll.effective_scale();
        let (answer_ids, answer_labels) = poll.answer_keys().into_iter().unzip();
        PollRecordRow {
            poll_id: poll.id.clone(),
            title: poll.title.clone(),
            question: poll.question.clone(),
            kind: model::name_of(&poll.kind),
            campaign: poll.campaign.clone(),
            dedupe: model::name_of(&poll.dedupe),
            results_visibility: model::name_of(&poll.results_visibility),
            require_token: u8::from(poll.require_token),
            max_choices: poll.max_choices,
            scale_min: scale.map(|s| s.min),
            scale_max: scale.map(|s| s.max),
            dimensions: poll.dimensions.clone(),
            answer_ids,
            answer_labels,
            created_at: date_time(poll.created_at),
            updated_at: date_time(poll.updated_at),
            opens_at: poll.opens_at.map(date_time),
            closes_at: poll.closes_at.map(date_time),
            closed_at: poll.closed_at.map(date_time),
            archived_at: poll.archived_at.map(date_time),
            version: poll.version,
            spread: poll.spread,
        }
    }
}

/// An analyst query's answer as it streams: the reader, and the batches it completed that
/// were not taken yet.
struct JsonAnswer {
    cursor: clickhouse::query::BytesCursor,
    reader: rows::JsonCompactReader,
    ready: VecDeque<RecordBatch>,
    ended: bool,
    deadline: tokio::time::Instant,
    limits: SqlLimits,
    rows_read: Arc<AtomicU64>,
}

impl JsonAnswer {
    /// Reads until the columns are known (the server answers with them when the query has
    /// started to produce rows, so most errors come before them, as an error status).
    async fn head(&mut self) -> Result<SchemaRef> {
        while self.reader.schema().is_none() && !self.ended {
            self.read().await?;
        }
        self.reader
            .schema()
            .cloned()
            .ok_or_else(|| Error::failed("warehouse", "an analyst answer without columns"))
    }

    /// Reads one chunk of the answer.
    async fn read(&mut self) -> Result<()> {
        let chunk = match tokio::time::timeout_at(self.deadline, self.cursor.next()).await {
            Err(_) => return Err(Error::Invalid(Limit::Time.exceeded(&self.limits))),
            Ok(chunk) => chunk.map_err(|err| analyst_error(err, &self.limits))?,
        };
        match chunk {
            Some(bytes) => {
                let batches = self
                    .reader
                    .push(&bytes)
                    .map_err(|text| classify(&text, &self.limits))?;
                self.ready.extend(batches);
            }
            None => {
                self.ended = true;
                let last = self
                    .reader
                    .finish()
                    .map_err(|text| classify(&text, &self.limits))?;
                self.ready.extend(last);
                self.rows_read
                    .store(self.reader.rows_read.unwrap_or(0), Ordering::Release);
            }
        }
        Ok(())
    }

    fn into_stream(self) -> BoxStream<Result<RecordBatch>> {
        Box::pin(futures::stream::unfold(Some(self), |answer| async move {
            let mut answer = answer?;
            loop {
                if let Some(batch) = answer.ready.pop_front() {
                    return Some((Ok(batch), Some(answer)));
                }
                if answer.ended {
                    return None;
                }
                if let Err(err) = answer.read().await {
                    return Some((Err(err), None));
                }
            }
        }))
    }
}

/// A failed analyst request as the caller's problem or the warehouse's error.
fn analyst_error(err: clickhouse::error::Error, limits: &SqlLimits) -> Error {
    match err {
        clickhouse::error::Error::BadResponse(text) => classify(&text, limits),
        other => warehouse_error(other),
    }
}

/// A ClickHouse exception, by its code: a limit, a refusal, the query's own fault (with
/// the engine's message), or the warehouse's.
fn classify(text: &str, limits: &SqlLimits) -> Error {
    let code: Option<u32> = text
        .split("Code: ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse().ok());
    let message = rows::exception_text(text);
    let limit = |limit: Limit| Error::Invalid(limit.exceeded(limits));
    match code {
        Some(159) => limit(Limit::Time),
        Some(396 | 158 | 307) if message.contains("bytes") => limit(Limit::ResultBytes),
        Some(396 | 158 | 307) => limit(Limit::Rows),
        Some(241) => limit(Limit::Memory),
        // The analyst user's profile refused tally's own settings (it must be readonly=2),
        // or its login failed: the deployment's error, not the caller's.
        Some(164) if message.contains("override") || message.contains("modify") => {
            Error::failed("warehouse analyst user", message)
        }
        Some(192 | 193 | 194 | 516) => Error::failed("warehouse analyst user", message),
        Some(164 | 291 | 497) => Error::Invalid(model::not_allowed(message)),
        Some(202 | 209 | 210 | 252) => Error::unavailable("warehouse", message),
        Some(_) => Error::Invalid(model::invalid(message)),
        None => Error::failed("warehouse", message),
    }
}

/// One stored ballot of a poll (see [`sql::BALLOT_COLUMNS`]).
#[derive(Row, Deserialize)]
struct BallotRow {
    seq: u64,
    vote_id: String,
    voter_key: String,
    received_ms: u64,
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
}

/// The rows of `cursor` as [`model::ballot_schema`] batches of up to
/// [`rows::BATCH_ROWS`] rows.
fn ballot_batches(
    cursor: clickhouse::query::RowCursor<BallotRow>,
    rows_read: Arc<AtomicU64>,
) -> BoxStream<Result<RecordBatch>> {
    let state = Some((cursor, rows_read));
    Box::pin(futures::stream::unfold(state, |state| async move {
        let (mut cursor, rows_read) = state?;
        let mut batch = BallotBatch::default();
        loop {
            match cursor.next().await {
                Ok(Some(row)) => {
                    batch.push(row);
                    if batch.rows == rows::BATCH_ROWS {
                        break;
                    }
                }
                Ok(None) => {
                    rows_read.fetch_add(batch.rows as u64, Ordering::AcqRel);
                    return if batch.rows == 0 {
                        None
                    } else {
                        Some((batch.finish(), None))
                    };
                }
                Err(err) => return Some((Err(warehouse_error(err)), None)),
            }
        }
        rows_read.fetch_add(batch.rows as u64, Ordering::AcqRel);
        Some((batch.finish(), Some((cursor, rows_read))))
    }))
}

/// Builders of one batch of ballots.
struct BallotBatch {
    rows: usize,
    seq: UInt64Builder,
    vote_id: StringBuilder,
    voter_key: StringBuilder,
    received_ms: Int64Builder,
    choice: ListBuilder<StringBuilder>,
    value: Int32Builder,
    segment: [StringBuilder; 6],
    dim_keys: ListBuilder<StringBuilder>,
    dim_values: ListBuilder<StringBuilder>,
}

impl Default for BallotBatch {
    fn default() -> Self {
        let list = || {
            ListBuilder::new(StringBuilder::new()).with_field(Arc::new(
                arrow::datatypes::Field::new_list_field(arrow::datatypes::DataType::Utf8, true),
            ))
        };
        BallotBatch {
            rows: 0,
            seq: UInt64Builder::new(),
            vote_id: StringBuilder::new(),
            voter_key: StringBuilder::new(),
            received_ms: Int64Builder::new(),
            choice: list(),
            value: Int32Builder::new(),
            segment: std::array::from_fn(|_| StringBuilder::new()),
            dim_keys: list(),
            dim_values: list(),
        }
    }
}

impl BallotBatch {
    fn push(&mut self, row: BallotRow) {
        self.rows += 1;
        self.seq.append_value(row.seq);
        self.vote_id.append_value(&row.vote_id);
        if row.voter_key.is_empty() {
            self.voter_key.append_null();
        } else {
            self.voter_key.append_value(&row.voter_key);
        }
        self.received_ms
            .append_value(i64::try_from(row.received_ms).unwrap_or(i64::MAX));
        for (list, values) in [
            (&mut self.choice, &row.choice),
            (&mut self.dim_keys, &row.dim_keys),
            (&mut self.dim_values, &row.dim_values),
        ] {
            for value in values {
                list.values().append_value(value);
            }
            list.append(true);
        }
        self.value.append_option(row.value);
        let segment = [
            &row.campaign,
            &row.channel,
            &row.source,
            &row.medium,
            &row.country,
            &row.device,
        ];
        for (builder, value) in self.segment.iter_mut().zip(segment) {
            builder.append_value(value);
        }
    }

    fn finish(mut self) -> Result<RecordBatch> {
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.seq.finish()),
            Arc::new(self.vote_id.finish()),
            Arc::new(self.voter_key.finish()),
            Arc::new(self.received_ms.finish()),
            Arc::new(self.choice.finish()),
            Arc::new(self.value.finish()),
        ];
        columns.extend(
            self.segment
                .iter_mut()
                .map(|builder| Arc::new(builder.finish()) as ArrayRef),
        );
        columns.push(Arc::new(self.dim_keys.finish()));
        columns.push(Arc::new(self.dim_values.finish()));
        RecordBatch::try_new(model::ballot_schema(), columns)
            .map_err(|err| Error::corrupt("ballot rows", err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_read_in_both_dialects() {
        assert!(has_code(
            "Code: 395, e.displayText() = DB::Exception: …",
            395
        ));
        assert!(has_code("Code: 241. DB::Exception: Memory limit", 241));
        assert!(!has_code("Code: 3950, e.displayText()", 395));
        assert!(!has_code("Code: 39, e.displayText()", 395));
    }

    #[test]
    fn row_types_match_the_column_lists() {
        assert_eq!(VoteRow::COLUMN_NAMES, sql::vote_columns());
        assert_eq!(WindowRowCh::COLUMN_NAMES, sql::WINDOW_COLUMNS);
        assert_eq!(RollupRowCh::COLUMN_NAMES, sql::rollup_columns());
        assert_eq!(PollRecordRow::COLUMN_NAMES, sql::POLL_RECORD_COLUMNS);
        assert_eq!(BallotRow::COLUMN_NAMES, sql::BALLOT_COLUMNS);
        let exported: Vec<String> = model::ballot_schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(
            exported,
            sql::BALLOT_COLUMNS,
            "ballots are exported as they are read"
        );
    }

    #[test]
    fn exceptions_are_classified_by_code() {
        let limits = SqlLimits::default();
        let slug = |text: &str| match classify(text, &limits) {
            Error::Invalid(problem) => problem.slug().to_owned(),
            other => format!("{:?}", other.kind()),
        };
        assert_eq!(slug("Code: 159, e.displayText() = DB::Exception: Timeout exceeded: elapsed 5.0 seconds, maximum: 5, e.what() = DB::Exception"), "sql-limit-exceeded");
        assert_eq!(slug("Code: 396, e.displayText() = DB::Exception: Limit for result exceeded, max rows: 5.00, current rows: 10.00"), "sql-limit-exceeded");
        assert_eq!(slug("Code: 47, e.displayText() = DB::Exception: Unknown identifier: x, e.what() = DB::Exception"), "sql-invalid");
        assert_eq!(slug("Code: 164, e.displayText() = DB::Exception: Table functions are forbidden in readonly mode"), "sql-not-allowed");
        assert_eq!(slug("Code: 164, e.displayText() = DB::Exception: Cannot override setting (max_result_rows) in readonly mode"), "Failed");
        assert_eq!(slug("Code: 202. DB::Exception: Too many simultaneous queries. (TOO_MANY_SIMULTANEOUS_QUERIES)"), "Unavailable");
        match classify("Code: 47, e.displayText() = DB::Exception: Unknown identifier: x, e.what() = DB::Exception", &limits) {
            Error::Invalid(problem) => assert_eq!(problem.detail, "Code: 47, DB::Exception: Unknown identifier: x"),
            other => panic!("{other:?}"),
        }
    }
}
