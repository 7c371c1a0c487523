//! Every statement the services send to ClickHouse, built in one place so a test can run
//! them all on the current ClickHouse engine (chdb) as well as on the 18.16 server the
//! suite uses. Values are rendered as escaped literals; identifiers come only from the
//! fixed column list or from validated dimension names.

use tally_core::analytics::{BreakdownQuery, Dimension, TimeseriesQuery};
use tally_core::rollup::{MsRange, RollupLevel, BREAKDOWN_ROW_LIMIT, TOTAL_SET};
use tally_core::segment::STANDARD_KEYS;

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

/// The columns [`dimension_expr`] reads.
fn dimension_columns(dimension: &Dimension) -> &'static [&'static str] {
    match STANDARD_KEYS.iter().find(|k| **k == dimension.0) {
        Some(column) => std::slice::from_ref(column),
        None => &["dim_keys", "dim_values"],
    }
}

pub const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, applied_at DateTime('UTC')) ENGINE = MergeTree ORDER BY version";

/// The segment columns of votes and of both rollup tables ([`segment_columns`] names
/// them), as a literal for `concat!`. Migrations 1, 3 and 4 are built with it: a new segment
/// column needs a migration of its own that adds it, not an edit here.
macro_rules! segment_column_defs {
    () => {
        "campaign String, channel String, source String, medium String, country String, device String, \
         dim_keys Array(String), dim_values Array(String)"
    };
}

/// The columns of both rollup tables (settled and fresh), as a literal for `concat!`.
macro_rules! rollup_column_defs {
    () => {
        concat!(
            "log_partition UInt16, poll_id String, bucket_start DateTime('UTC'), bucket_seconds UInt32, ",
            segment_column_defs!(),
            ", ballots UInt64, answers Array(String), answer_votes Array(UInt64), last_seq UInt64"
        )
    };
}

/// The names of the columns `rollup_column_defs!` declares, as a literal for `concat!`.
macro_rules! rollup_column_names {
    () => {
        "log_partition, poll_id, bucket_start, bucket_seconds, campaign, channel, source, medium, \
         country, device, dim_keys, dim_values, ballots, answers, answer_votes, last_seq"
    };
}

/// The bodies of the analyst views over `votes` (no `WHERE`: the SQL endpoint adds the
/// position it pins each partition to, see [`pinned`]). The standard segment keys keep
/// the empty string for "not given", as breakdowns show it.
///
/// `choices` is an `ALIAS` column of `votes` (migration 6): in a ClickHouse `SELECT`, an
/// alias hides a column of the same name everywhere in the statement, so the scalar
/// `choice` cannot be computed from the array column `choice` next to the array itself.
macro_rules! ballots_body {
    () => {
        "SELECT poll_id, vote_id, log_partition, seq, nullIf(voter_key, '') AS voter_key, \
         received_at, received_ms, \
         if(value IS NULL AND length(choices) = 1, choices[1], NULL) AS choice, choices, \
         value AS rating, campaign, channel, source, medium, country, device FROM votes"
    };
}

macro_rules! answers_body {
    () => {
        "SELECT poll_id, vote_id, log_partition, seq, nullIf(voter_key, '') AS voter_key, \
         received_at, received_ms, option_id, campaign, channel, source, medium, country, device \
         FROM votes ARRAY JOIN choice AS option_id"
    };
}

macro_rules! ballot_dimensions_body {
    () => {
        "SELECT poll_id, vote_id, log_partition, seq, dimension, value \
         FROM votes ARRAY JOIN dim_keys AS dimension, dim_values AS value"
    };
}

/// The columns of the analysts' `polls` view as migration 10 made it, each poll's newest
/// record with its status as of now; migration 26 adds `spread` after them.
macro_rules! polls_columns {
    () => {
        "poll_id, title, question, kind, campaign, \
         multiIf(archived_at IS NOT NULL, 'archived', \
                 closed_at IS NOT NULL OR closes_at <= now(), 'closed', \
                 opens_at > now(), 'scheduled', 'open') AS status, \
         dedupe, results_visibility, require_token, max_choices, scale_min, scale_max, dimensions, \
         created_at, updated_at, opens_at, closes_at, closed_at, archived_at, version"
    };
}

/// Versioned schema migrations, applied in order. Each is idempotent so services starting
/// together may race through them safely (an `ALTER … ADD COLUMN`, which 18.16 cannot make
/// conditional, fails only with "already exists" when raced, which `migrate` accepts).
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (
        1,
        "votes",
        // No PARTITION BY: an insert into a single-partition MergeTree is one part, so one
        // processor batch is atomic even when it spans a month boundary.
        concat!(
            "CREATE TABLE IF NOT EXISTS votes (\
                log_partition UInt16, seq UInt64, vote_id String, poll_id String, voter_key String, \
                choice Array(String), value Nullable(Int32), ",
            segment_column_defs!(),
            ", received_at DateTime('UTC'), received_ms UInt64\
            ) ENGINE = MergeTree ORDER BY (poll_id, received_at, seq)"
        ),
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
    (
        3,
        "segment_rollups",
        // Settled rollups: one row per poll, minute and whole segment per processor write
        // (about every half minute); breakdowns add the partial rows up. Plain MergeTree for
        // the same reason as vote_windows: `last_seq` is the table's watermark.
        concat!(
            "CREATE TABLE IF NOT EXISTS segment_rollups (",
            rollup_column_defs!(),
            ") ENGINE = MergeTree ORDER BY (poll_id, bucket_start, last_seq)"
        ),
    ),
    (
        4,
        "segment_rollups_fresh",
        // Fresh rollups, written about every second; a breakdown reads only those after the
        // poll's newest settled row, so they are ordered by position.
        concat!(
            "CREATE TABLE IF NOT EXISTS segment_rollups_fresh (",
            rollup_column_defs!(),
            ") ENGINE = MergeTree ORDER BY (poll_id, last_seq)"
        ),
    ),
    (
        5,
        "poll_records",
        // Poll definitions as the query service records them, one row per version it saw;
        // `polls` reads the newest (FINAL), and merges keep only it. The answers a poll
        // counts (its options, or its scale's values) are kept side by side, in its order.
        "CREATE TABLE IF NOT EXISTS poll_records (\
            poll_id String, title String, question String, kind String, campaign Nullable(String), \
            dedupe String, results_visibility String, require_token UInt8, max_choices Nullable(UInt32), \
            scale_min Nullable(Int32), scale_max Nullable(Int32), dimensions Array(String), \
            answer_ids Array(String), answer_labels Array(String), \
            created_at DateTime('UTC'), updated_at DateTime('UTC'), opens_at Nullable(DateTime('UTC')), \
            closes_at Nullable(DateTime('UTC')), closed_at Nullable(DateTime('UTC')), \
            archived_at Nullable(DateTime('UTC')), version UInt64\
        ) ENGINE = ReplacingMergeTree(version) ORDER BY poll_id",
    ),
    (
        6,
        "votes choices",
        // The array of a ballot's answers under the name analysts see (no data: an alias).
        "ALTER TABLE votes ADD COLUMN choices Array(String) ALIAS choice",
    ),
    (
        7,
        "vote_positions",
        // How far `votes` holds each partition, one row per insert (merges keep the
        // highest): the SQL endpoint pins a query to these without scanning `votes`.
        "CREATE TABLE IF NOT EXISTS vote_positions (log_partition UInt16, seq UInt64) \
         ENGINE = ReplacingMergeTree(seq) ORDER BY log_partition",
    ),
    (
        8,
        "vote_positions_mv",
        // Written by every insert into `votes`, after its rows: a position here means every
        // vote of the partition up to it is in `votes` (the processor writes a partition's
        // batches in order, each after the last was acknowledged).
        "CREATE MATERIALIZED VIEW IF NOT EXISTS vote_positions_mv TO vote_positions AS \
         SELECT log_partition, max(seq) AS seq FROM votes GROUP BY log_partition",
    ),
    (
        9,
        "vote_positions of earlier votes",
        "INSERT INTO vote_positions SELECT log_partition, max(seq) FROM votes GROUP BY log_partition",
    ),
    (
        10,
        "polls",
        concat!(
            "CREATE VIEW IF NOT EXISTS polls AS SELECT ",
            polls_columns!(),
            " FROM poll_records FINAL"
        ),
    ),
    (
        11,
        "poll_options",
        "CREATE VIEW IF NOT EXISTS poll_options AS \
         SELECT poll_id, option_id, label, toUInt32(n) AS position FROM poll_records FINAL \
         ARRAY JOIN answer_ids AS option_id, answer_labels AS label, arrayEnumerate(answer_ids) AS n",
    ),
    (
        12,
        "ballots",
        concat!("CREATE VIEW IF NOT EXISTS ballots AS ", ballots_body!()),
    ),
    (
        13,
        "answers",
        concat!("CREATE VIEW IF NOT EXISTS answers AS ", answers_body!()),
    ),
    (
        14,
        "ballot_dimensions",
        concat!(
            "CREATE VIEW IF NOT EXISTS ballot_dimensions AS ",
            ballot_dimensions_body!()
        ),
    ),
    (
        15,
        "partition_fences",
        // The epoch of each partition's owner, one row per claim (merges keep the newest):
        // a processor's inserts check it, so one whose lease moved on writes nothing.
        "CREATE TABLE IF NOT EXISTS partition_fences (log_partition UInt16, epoch UInt64, \
         fenced_at DateTime('UTC')) ENGINE = ReplacingMergeTree(epoch) ORDER BY log_partition",
    ),
    // The cube (see `tally_core::rollup`): each rollup write also holds rows per dimension
    // set, marked by `dims` ('' for a whole segment, so rows written before are whole), in
    // the same insert. A materialized view copies them to a table ordered by set, so a
    // breakdown by country reads a few rows instead of every whole segment.
    (
        16,
        "segment_rollups dims",
        "ALTER TABLE segment_rollups ADD COLUMN dims String",
    ),
    (
        17,
        "segment_rollups_fresh dims",
        "ALTER TABLE segment_rollups_fresh ADD COLUMN dims String",
    ),
    (
        18,
        "segment_cube",
        concat!(
            "CREATE TABLE IF NOT EXISTS segment_cube (",
            rollup_column_defs!(),
            ", dims String) ENGINE = MergeTree ORDER BY (poll_id, dims, bucket_start, last_seq)"
        ),
    ),
    (
        19,
        "segment_cube_fresh",
        concat!(
            "CREATE TABLE IF NOT EXISTS segment_cube_fresh (",
            rollup_column_defs!(),
            ", dims String) ENGINE = MergeTree ORDER BY (poll_id, dims, last_seq)"
        ),
    ),
    (
        20,
        "segment_cube_mv",
        concat!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS segment_cube_mv TO segment_cube AS SELECT ",
            rollup_column_names!(),
            ", dims FROM segment_rollups WHERE dims != ''"
        ),
    ),
    (
        21,
        "segment_cube_fresh_mv",
        concat!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS segment_cube_fresh_mv TO segment_cube_fresh AS SELECT ",
            rollup_column_names!(),
            ", dims FROM segment_rollups_fresh WHERE dims != ''"
        ),
    ),
    // The settled rows of a poll's own keys' sets added up, up to a position (`upto`), by one
    // run (`run`: a run that did not finish is never read), and each finished run; see
    // [`compact_set`]. Sharded by partition like the rows they add up.
    (
        22,
        "segment_cube_compact",
        concat!(
            "CREATE TABLE IF NOT EXISTS segment_cube_compact (",
            rollup_column_defs!(),
            ", dims String, upto UInt64, run String) \
             ENGINE = MergeTree ORDER BY (poll_id, dims, upto, run, bucket_start)"
        ),
    ),
    (
        23,
        "segment_cube_compactions",
        "CREATE TABLE IF NOT EXISTS segment_cube_compactions (log_partition UInt16, \
         poll_id String, dims String, upto UInt64, run String, rows UInt64, \
         made_at DateTime('UTC')) ENGINE = MergeTree ORDER BY (poll_id, dims, upto)",
    ),
    // A poll's spread over log partitions (`spread`), for the analysts' `polls`: records
    // written before hold 0, which `polls` shows as 1 (not spread). The view is made again
    // with the column (a view's columns cannot be altered on 18.16).
    (
        24,
        "poll_records spread",
        "ALTER TABLE poll_records ADD COLUMN spread UInt16",
    ),
    (25, "polls without spread", "DROP TABLE IF EXISTS polls"),
    (
        26,
        "polls with spread",
        concat!(
            "CREATE VIEW IF NOT EXISTS polls AS SELECT ",
            polls_columns!(),
            ", greatest(spread, toUInt16(1)) AS spread FROM poll_records FINAL"
        ),
    ),
];

/// The cube table holding a rollup level's rows per dimension set.
pub fn cube_table(level: RollupLevel) -> &'static str {
    match level {
        RollupLevel::Fresh => "segment_cube_fresh",
        RollupLevel::Settled => "segment_cube",
    }
}

/// The table a `CREATE TABLE IF NOT EXISTS` statement creates.
pub fn created_table(statement: &str) -> Option<&str> {
    let rest = statement.strip_prefix("CREATE TABLE IF NOT EXISTS ")?;
    let end = rest.find([' ', '('])?;
    Some(&rest[..end])
}

/// A `CREATE TABLE` of the MergeTree family made replicated: the same table on every replica
/// of a shard, kept in step through ClickHouse Keeper (or ZooKeeper) under
/// `/clickhouse/tables/{shard}/<database>/<table>`, the servers' `shard` and `replica`
/// macros naming the rest. Other statements come back as they are. Replicated tables also
/// drop a retried insert's block that a replica already holds.
pub fn replicated_table(statement: &str, database: &str) -> String {
    let Some(table) = created_table(statement) else {
        return statement.to_owned();
    };
    let path = lit(&format!("/clickhouse/tables/{{shard}}/{database}/{table}"));
    let replica = lit("{replica}");
    for engine in ["ReplacingMergeTree", "MergeTree"] {
        let plain = format!("ENGINE = {engine}");
        let Some(at) = statement.find(&plain) else {
            continue;
        };
        let rest = &statement[at + plain.len()..];
        let (arguments, rest) = match rest.strip_prefix('(') {
            Some(inner) => {
                let end = inner.find(')').expect("engine arguments end");
                let arguments = &inner[..end];
                let arguments = if arguments.is_empty() {
                    String::new()
                } else {
                    format!(", {arguments}")
                };
                (arguments, &inner[end + 1..])
            }
            None => (String::new(), rest),
        };
        return format!(
            "{}ENGINE = Replicated{engine}({path}, {replica}{arguments}){rest}",
            &statement[..at]
        );
    }
    statement.to_owned()
}

/// Whether the server takes `insert_deduplication_token` (current ClickHouse; not 18.16):
/// then each partition insert carries one, and a retry of an insert that did land after
/// all is dropped by the server instead of written twice.
pub const TAKES_DEDUPLICATION_TOKENS: &str =
    "SELECT count() FROM system.settings WHERE name = 'insert_deduplication_token'";

/// Whether plain MergeTree tables can remember recent inserts to drop their retries.
pub const HAS_DEDUPLICATION_WINDOW: &str = "SELECT count() FROM system.merge_tree_settings \
     WHERE name = 'non_replicated_deduplication_window'";

/// The tables a processor writes by partition, whose retried inserts are deduplicated.
pub const PARTITION_TABLES: [&str; 4] = [
    "votes",
    "vote_windows",
    "segment_rollups",
    "segment_rollups_fresh",
];

/// How many recent inserts a plain table remembers (replicated ones do by themselves).
pub fn deduplication_window(table: &str) -> String {
    format!("ALTER TABLE {table} MODIFY SETTING non_replicated_deduplication_window = 1000")
}

/// Which database of a server a migration statement runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A sharded warehouse's own rows on this server (`<database>_shard`).
    Local,
    /// What the services and analysts read (`<database>`; all of a one-server warehouse).
    Read,
}

/// The statements a migration takes on one server, in order, each with where it runs.
/// On one server: the statement, in `database`. On a server of a sharded warehouse (`shard`:
/// its local database and the cluster's name), the shard's rows live in the local database
/// and `database` holds `Distributed` twins of those tables and the views over them: a new
/// table is made in both, a change to one is made to both, the fences its inserts check
/// and the materialized view and backfill of its positions stay local, and views are read
/// through. With `replicated`, tables are made [`replicated_table`].
pub fn migration_steps(
    name: &str,
    statement: &str,
    database: &str,
    shard: Option<(&str, &str)>,
    replicated: bool,
) -> Vec<(Target, String)> {
    let statement = statement.to_owned();
    let steps = match shard {
        None => vec![(Target::Read, statement)],
        Some((local, cluster)) => match created_table(&statement) {
            // Fences are checked by the insert that writes, on the server that holds the rows.
            Some(_) if name == "partition_fences" => vec![(Target::Local, statement)],
            Some(table) => {
                let twin = distributed_twin(table, &statement, local, cluster);
                vec![(Target::Local, statement), (Target::Read, twin)]
            }
            None if statement.starts_with("ALTER TABLE") => {
                vec![
                    (Target::Local, statement.clone()),
                    (Target::Read, statement),
                ]
            }
            None if statement.starts_with("CREATE MATERIALIZED VIEW")
                || statement.starts_with("INSERT") =>
            {
                vec![(Target::Local, statement)]
            }
            None if statement.starts_with("CREATE VIEW")
                || statement.starts_with("DROP TABLE IF EXISTS") =>
            {
                vec![(Target::Read, statement)]
            }
            None => panic!("migration `{name}` has no place in a sharded warehouse"),
        },
    };
    if !replicated {
        return steps;
    }
    let local = shard.map_or(database, |(local, _)| local);
    steps
        .into_iter()
        .map(|(target, statement)| {
            let into = match target {
                Target::Local => local,
                Target::Read => database,
            };
            (target, replicated_table(&statement, into))
        })
        .collect()
}

/// The `Distributed` twin of a shard's table: the rows of a log partition live on shard
/// `log_partition % shards`, which is also where the engine would send an insert through it
/// (one replica per shard weight). Poll records, which have no partition, live on the first.
pub fn distributed_twin(
    table: &str,
    statement: &str,
    local_database: &str,
    cluster: &str,
) -> String {
    let key = if statement.contains("log_partition UInt16") {
        "log_partition"
    } else {
        "0"
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {table} AS {}.{table} ENGINE = Distributed({}, {}, {}, {key})",
        ident(local_database),
        lit(cluster),
        lit(local_database),
        lit(table)
    )
}

/// The suffix of a sharded warehouse's local database (`<database>_shard`).
pub const SHARD_DATABASE_SUFFIX: &str = "_shard";

/// Which shard of how many a server's local database was made for, recorded once: a list
/// of shards in another order, or of another length, would move partitions to servers
/// without their rows.
pub const SHARD_LAYOUT_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS shard_layout (shard UInt32, shards UInt32, \
     recorded_at DateTime('UTC')) ENGINE = MergeTree ORDER BY recorded_at";

pub fn shard_layout() -> String {
    "SELECT shard, shards FROM shard_layout ORDER BY recorded_at, shard LIMIT 1".to_owned()
}

pub fn record_shard_layout(shard: u32, shards: u32) -> String {
    format!(
        "INSERT INTO shard_layout (shard, shards, recorded_at) VALUES ({shard}, {shards}, now())"
    )
}

/// The shards of a cluster as a server knows them: its shard numbers (one row per replica)
/// and whether that replica is the server itself.
pub fn cluster_shards(cluster: &str) -> String {
    format!(
        "SELECT shard_num, is_local FROM system.clusters WHERE cluster = {} ORDER BY shard_num",
        lit(cluster)
    )
}

/// The engine of a table (no row when there is no such table).
pub fn table_engine(database: &str, table: &str) -> String {
    format!(
        "SELECT engine FROM system.tables WHERE database = {} AND name = {}",
        lit(database),
        lit(table)
    )
}

/// The columns of `poll_records`, in the order of its migration.
pub const POLL_RECORD_COLUMNS: &[&str] = &[
    "poll_id",
    "title",
    "question",
    "kind",
    "campaign",
    "dedupe",
    "results_visibility",
    "require_token",
    "max_choices",
    "scale_min",
    "scale_max",
    "dimensions",
    "answer_ids",
    "answer_labels",
    "created_at",
    "updated_at",
    "opens_at",
    "closes_at",
    "closed_at",
    "archived_at",
    "version",
    "spread",
];

/// The body of a pinned analyst table (`ballots`, `answers`, `ballot_dimensions`) reading
/// each partition of `votes` up to its position in `positions` (nothing of a partition
/// that has none), or `None` for the tables read as they are.
pub fn pinned(table: &str, positions: &[(u16, u64)]) -> Option<String> {
    let body = match table {
        "ballots" => ballots_body!(),
        "answers" => answers_body!(),
        "ballot_dimensions" => ballot_dimensions_body!(),
        _ => return None,
    };
    Some(format!("{body} WHERE {}", at_most("seq", positions)))
}

/// Each partition's bound in `bounds`, as an expression of a row's `log_partition`: one
/// array lookup per row, however many partitions (an `OR` per partition made the analysts'
/// pin ~1.6× dearer at 16 partitions, docs/BENCHMARKS.md run 7). A partition without a
/// bound reads 0 (in a gap, or past the array's end).
fn bound_of_partition(bounds: &[(u16, u64)]) -> String {
    let last = bounds
        .iter()
        .map(|(p, _)| usize::from(*p))
        .max()
        .unwrap_or(0);
    let mut array = vec![0u64; last + 1];
    for (partition, bound) in bounds {
        array[usize::from(*partition)] = *bound;
    }
    let array: Vec<String> = array.iter().map(u64::to_string).collect();
    format!("[{}][log_partition + 1]", array.join(", "))
}

/// `column` at most the bound of its row's partition in `bounds`: none of the rows of a
/// partition without one.
pub fn at_most(column: &str, bounds: &[(u16, u64)]) -> String {
    match bounds {
        [] => "0".to_owned(),
        [(partition, bound)] => format!("(log_partition = {partition} AND {column} <= {bound})"),
        _ => format!("{column} <= {}", bound_of_partition(bounds)),
    }
}

/// `column` above the bound of its row's partition in `bounds`: every row of a partition
/// without one.
fn above(column: &str, bounds: &[(u16, u64)]) -> String {
    match bounds {
        [] => "1".to_owned(),
        [(partition, bound)] => format!("(log_partition != {partition} OR {column} > {bound})"),
        _ => format!("{column} > {}", bound_of_partition(bounds)),
    }
}

/// `column` above the bound of its row's partition in `after` (none: every row) and at most
/// its bound in `upto`: [`above`] and [`at_most`], and beside them one plain range over all
/// partitions (above the lowest bound in `after` of a partition in `upto`, at most the
/// highest in `upto`). The range takes no row the rest would not, but it is what the
/// engine's primary key can use: its index skips the rows outside the range, where the
/// per-partition conditions (an `OR`, an array lookup) make it read every row of the poll.
/// On a poll's fresh rollups, which keep every write, that was 3.7M rows read for 10,000
/// (docs/BENCHMARKS.md, 2026-12-07 (7)).
fn between(column: &str, after: &[(u16, u64)], upto: &[(u16, u64)]) -> String {
    let Some(highest) = upto.iter().map(|(_, bound)| *bound).max() else {
        return "0".to_owned();
    };
    let lowest = upto
        .iter()
        .map(|(partition, _)| {
            after
                .iter()
                .find(|(p, _)| p == partition)
                .map_or(0, |(_, bound)| *bound)
        })
        .min()
        .unwrap_or(0);
    format!(
        "{column} > {lowest} AND {column} <= {highest} AND {} AND {}",
        above(column, after),
        at_most(column, upto)
    )
}

/// How far `votes` holds each partition, from `vote_positions`.
pub fn vote_positions() -> String {
    "SELECT log_partition, max(seq) FROM vote_positions GROUP BY log_partition ORDER BY log_partition"
        .to_owned()
}

/// Where a poll's stored votes end in each partition of the log: `(partition, seq)` rows.
pub fn poll_positions(poll_id: &str) -> String {
    format!(
        "SELECT log_partition, max(seq) FROM votes WHERE poll_id = {} \
         GROUP BY log_partition ORDER BY log_partition",
        lit(poll_id)
    )
}

/// The columns of a poll's ballots for export, as [`tally_core::analyst::ballot_schema`]
/// names them (`voter_key` still the stored empty string for anonymous votes).
pub const BALLOT_COLUMNS: &[&str] = &[
    "seq",
    "vote_id",
    "voter_key",
    "received_ms",
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
];

/// A poll's ballots up to each partition's position in `positions`, in storage order.
pub fn ballots_of_poll(poll_id: &str, positions: &[(u16, u64)]) -> String {
    format!(
        "SELECT {} FROM votes WHERE poll_id = {} AND {}",
        BALLOT_COLUMNS.join(", "),
        lit(poll_id),
        at_most("seq", positions)
    )
}

/// The segment columns votes and rollups both carry, in the order of
/// `segment_column_defs!`: the standard keys, then a poll's own keys and values.
pub fn segment_columns() -> impl Iterator<Item = &'static str> {
    STANDARD_KEYS.into_iter().chain(["dim_keys", "dim_values"])
}

/// The columns of `votes`, in the order of its migration.
pub fn vote_columns() -> Vec<&'static str> {
    let mut columns = vec![
        "log_partition",
        "seq",
        "vote_id",
        "poll_id",
        "voter_key",
        "choice",
        "value",
    ];
    columns.extend(segment_columns());
    columns.extend(["received_at", "received_ms"]);
    columns
}

pub const WINDOW_COLUMNS: &[&str] = &[
    "log_partition",
    "poll_id",
    "window_start",
    "window_seconds",
    "option",
    "votes",
    "last_seq",
];

/// The columns of both rollup tables, in the order of their migrations.
pub fn rollup_columns() -> Vec<&'static str> {
    let mut columns = vec!["log_partition", "poll_id", "bucket_start", "bucket_seconds"];
    columns.extend(segment_columns());
    columns.extend(["ballots", "answers", "answer_votes", "last_seq", "dims"]);
    columns
}

pub fn applied_migrations() -> String {
    "SELECT version FROM schema_migrations GROUP BY version ORDER BY version".to_owned()
}

pub fn record_migration(version: u32, name: &str) -> String {
    format!(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES ({version}, {}, now())",
        lit(name)
    )
}

/// The newest epoch fenced into a partition (0 when none was).
pub fn fence_epoch(partition: u16) -> String {
    format!("SELECT max(epoch) FROM partition_fences WHERE log_partition = {partition}")
}

pub fn record_fence(partition: u16, epoch: u64) -> String {
    format!("INSERT INTO partition_fences (log_partition, epoch, fenced_at) VALUES ({partition}, {epoch}, now())")
}

/// The column definitions (`name Type, …`) of an external table carrying `table`'s rows:
/// the table's own types, with times as the `UInt32` seconds they are sent as (the INSERT
/// converts them). `None` for a table no migration creates.
pub fn external_structure(table: &str) -> Option<String> {
    let (_, _, statement) = MIGRATIONS.iter().find(|(_, name, _)| *name == table)?;
    let start = statement.find('(')? + 1;
    let end = statement.find(") ENGINE")?;
    let mut structure = statement[start..end].to_owned();
    // Columns later migrations add, but not aliases (they hold no data).
    let added = format!("ALTER TABLE {table} ADD COLUMN ");
    for (_, _, statement) in MIGRATIONS {
        if let Some(column) = statement.strip_prefix(&added) {
            if !column.contains(" ALIAS ") {
                structure.push_str(", ");
                structure.push_str(column);
            }
        }
    }
    Some(structure.replace("DateTime('UTC')", "UInt32"))
}

/// An INSERT of the rows of the external table `batch` into `table`, refused by the server
/// (`throwIf`, code 395) and writing nothing when an epoch newer than `epoch` was fenced
/// into `partition`. The check runs once the whole batch has arrived, in the statement that
/// writes it.
pub fn fenced_insert(table: &str, columns: &[&str], partition: u16, epoch: u64) -> String {
    let columns = columns.join(", ");
    format!(
        "INSERT INTO {table} ({columns}) SELECT {columns} FROM batch \
         WHERE throwIf(({}) > {epoch}) = 0",
        fence_epoch(partition)
    )
}

pub fn votes_watermark(partition: u16) -> String {
    format!("SELECT max(seq) FROM votes WHERE log_partition = {partition}")
}

pub fn windows_watermark(partition: u16) -> String {
    format!("SELECT max(last_seq) FROM vote_windows WHERE log_partition = {partition}")
}

pub fn rollups_watermark(partition: u16, level: RollupLevel) -> String {
    format!(
        "SELECT max(last_seq) FROM {} WHERE log_partition = {partition}",
        level.table()
    )
}

/// A poll's ballots, distinct voters and newest sequence in each partition, from one
/// consistent read: `(partition, ballots, voters, seq)` rows. (Its positions and counts per
/// answer in one statement, voters counted beside the array-joined answers, took ~20% longer
/// over 3M votes on 18.16.)
pub fn tally_totals_by_partition(poll_id: &str) -> String {
    format!(
        "SELECT log_partition, count(), uniqExactIf(voter_key, voter_key != ''), max(seq) \
         FROM votes WHERE poll_id = {} GROUP BY log_partition ORDER BY log_partition",
        lit(poll_id)
    )
}

/// A poll's counts per answer in each partition, up to the partition's position in
/// `positions` ([`tally_totals_by_partition`], read just before), so they agree with those
/// totals: `(partition, answer, count)` rows.
pub fn tally_counts_by_partition(poll_id: &str, positions: &[(u16, u64)]) -> String {
    format!(
        "SELECT log_partition, opt, count() FROM votes ARRAY JOIN choice AS opt \
         WHERE poll_id = {} AND {} GROUP BY log_partition, opt ORDER BY log_partition, opt",
        lit(poll_id),
        at_most("seq", positions)
    )
}

pub fn voter_keys(poll_id: &str) -> String {
    format!(
        "SELECT DISTINCT voter_key FROM votes WHERE poll_id = {} AND voter_key != ''",
        lit(poll_id)
    )
}

/// The first counted vote of a poll with this vote id, as a `VoteRow`.
pub fn counted_vote(poll_id: &str, vote_id: &str) -> String {
    format!(
        "SELECT {} FROM votes WHERE poll_id = {} AND vote_id = {} ORDER BY seq LIMIT 1",
        vote_columns().join(", "),
        lit(poll_id),
        lit(vote_id)
    )
}

/// How far a poll's rollup rows of `level` cover each partition of the log: its whole
/// segments, or (`totals`) the totals rows of its cube (a few per write, found by the
/// cube's sort key). `(partition, last_seq)` rows.
pub fn rollup_positions(poll_id: &str, level: RollupLevel, totals: bool) -> String {
    let (table, set) = if totals {
        (cube_table(level), format!(" AND dims = {}", lit(TOTAL_SET)))
    } else {
        (level.table(), String::new())
    };
    format!(
        "SELECT log_partition, max(last_seq) FROM {table} WHERE poll_id = {}{set} \
         GROUP BY log_partition ORDER BY log_partition",
        lit(poll_id)
    )
}

/// The newest finished run adding up a poll's settled rows of one of its own keys' sets,
/// per partition: `(partition, upto, run, rows)`, no row for a partition before its first.
/// With `partition`, that partition's only.
pub fn newest_compactions(poll_id: &str, set: &str, partition: Option<u16>) -> String {
    let only = partition.map_or(String::new(), |p| format!(" AND log_partition = {p}"));
    format!(
        "SELECT log_partition, upto, run, rows FROM segment_cube_compactions \
         WHERE poll_id = {} AND dims = {}{only} \
         ORDER BY log_partition, upto DESC, run LIMIT 1 BY log_partition",
        lit(poll_id),
        lit(set)
    )
}

/// How many settled rows of a poll's set that `partition` wrote lie in `(after, upto]`.
pub fn set_rows_between(poll_id: &str, set: &str, partition: u16, after: u64, upto: u64) -> String {
    format!(
        "SELECT count() FROM {} WHERE poll_id = {} AND dims = {} AND log_partition = {partition} \
         AND last_seq > {after} AND last_seq <= {upto}",
        cube_table(RollupLevel::Settled),
        lit(poll_id),
        lit(set)
    )
}

/// The key columns of a set row: what [`compact_set`] adds rows up by.
const SET_KEY_COLUMNS: &str = "log_partition, poll_id, bucket_start, bucket_seconds, campaign, \
     channel, source, medium, country, device, dim_keys, dim_values, dims";

/// One run (`run`) adding up the settled rows `partition` wrote of a poll's set of one of
/// its own keys, up to position `upto`, into `segment_cube_compact`: the rows of the
/// partition's newest finished run before it (`since`: its `upto` and `run`) and the
/// settled rows after that, one row per bucket and value, answers in key order. 18.16 has
/// no `sumMap` over strings: answers are spread one per row, added up, and gathered again.
pub fn compact_set(
    poll_id: &str,
    set: &str,
    partition: u16,
    since: Option<(u64, &str)>,
    upto: u64,
    run: &str,
) -> String {
    let (poll, set) = (lit(poll_id), lit(set));
    let columns = format!("{SET_KEY_COLUMNS}, ballots, answers, answer_votes, last_seq");
    let after = since.map_or(0, |(upto, _)| upto);
    let mut rows = format!(
        "SELECT {columns} FROM {} WHERE poll_id = {poll} AND dims = {set} \
         AND log_partition = {partition} AND last_seq > {after} AND last_seq <= {upto}",
        cube_table(RollupLevel::Settled)
    );
    if let Some((before, before_run)) = since {
        rows.push_str(&format!(
            " UNION ALL SELECT {columns} FROM segment_cube_compact WHERE poll_id = {poll} \
             AND dims = {set} AND upto = {before} AND run = {}",
            lit(before_run)
        ));
    }
    format!(
        "INSERT INTO segment_cube_compact ({SET_KEY_COLUMNS}, ballots, answers, answer_votes, \
         last_seq, upto, run) \
         SELECT {SET_KEY_COLUMNS}, sumIf(n, o = '') AS ballots, \
         arraySort(groupArrayIf(o, o != '')) AS answers, \
         arraySort((v, a) -> a, groupArrayIf(n, o != ''), groupArrayIf(o, o != '')) AS answer_votes, \
         max(ls) AS last_seq, {upto} AS upto, {} AS run \
         FROM (SELECT {SET_KEY_COLUMNS}, o, sum(c) AS n, max(last_seq) AS ls FROM ({rows}) \
         ARRAY JOIN arrayConcat([''], answers) AS o, arrayConcat([ballots], answer_votes) AS c \
         GROUP BY {SET_KEY_COLUMNS}, o) \
         GROUP BY {SET_KEY_COLUMNS}",
        lit(run)
    )
}

/// How many rows a run of [`compact_set`] wrote.
pub fn compacted_rows(poll_id: &str, set: &str, upto: u64, run: &str) -> String {
    format!(
        "SELECT count() FROM segment_cube_compact WHERE poll_id = {} AND dims = {} \
         AND upto = {upto} AND run = {}",
        lit(poll_id),
        lit(set),
        lit(run)
    )
}

/// Records a finished run of [`compact_set`]: from then on breakdowns read its rows.
pub fn record_compaction(
    partition: u16,
    poll_id: &str,
    set: &str,
    upto: u64,
    run: &str,
    rows: u64,
) -> String {
    format!(
        "INSERT INTO segment_cube_compactions (log_partition, poll_id, dims, upto, run, rows, \
         made_at) VALUES ({partition}, {}, {}, {upto}, {}, {rows}, now())",
        lit(poll_id),
        lit(set),
        lit(run)
    )
}

/// Whether the cube holds every rollup write of a poll: the number of levels (at most 2)
/// with a whole segment older than the level's oldest cube totals row, 0 when it holds
/// them all. The first write of a level tells: writes made before the cube existed have
/// none of its rows and every write since has them (a level whose cube has no row has
/// every whole segment older). Asked as "is there one older", which the key skips to
/// (`last_seq` follows `poll_id` in the fresh table's), not as the poll's oldest whole
/// segment, which read every one of them (~1.2 s before the first breakdown of a poll of
/// 10M votes and 10,000 stores after a start). Counted over a subquery, not compared in
/// scalar ones: the server's read limits do not hold in a scalar subquery. The rows counted
/// are `last_seq`, not a constant: over `Distributed` tables 18.16 fails a query whose
/// subquery gives a constant column.
pub fn cube_coverage(poll_id: &str) -> String {
    let poll = lit(poll_id);
    let level = |level: RollupLevel| {
        format!(
            "SELECT last_seq FROM {whole} WHERE poll_id = {poll} AND last_seq < \
             (SELECT if(count() = 0, {NO_POSITION}, min(last_seq)) FROM {cube} \
             WHERE poll_id = {poll} AND dims = {total}) LIMIT 1",
            cube = cube_table(level),
            whole = level.table(),
            total = lit(TOTAL_SET),
        )
    };
    format!(
        "SELECT count() FROM ({} UNION ALL {})",
        level(RollupLevel::Settled),
        level(RollupLevel::Fresh)
    )
}

/// Above every log position: what [`cube_coverage`] compares with when the cube has no row.
const NO_POSITION: u64 = u64::MAX;

/// ` AND` the segment filters of a breakdown (columns common to votes and rollups): one
/// `IN` list per dimension, a set lookup however many values it holds (never a chain of
/// `OR`s, which grows the statement's syntax tree one level per value).
fn segment_filter(query: &BreakdownQuery) -> String {
    let mut filter = String::new();
    for (dimension, values) in &query.filters {
        if values.is_empty() {
            // `IN ()` is not valid SQL; no allowed value matches no row.
            filter.push_str(" AND 0");
            continue;
        }
        let values: Vec<String> = values.iter().map(|v| lit(v)).collect();
        filter.push_str(&format!(
            " AND {} IN ({})",
            dimension_expr(dimension),
            values.join(", ")
        ));
    }
    filter
}

fn group_key(query: &BreakdownQuery) -> String {
    let exprs: Vec<String> = query.by.iter().map(dimension_expr).collect();
    format!("[{}]", exprs.join(", "))
}

/// Where a breakdown reads its rollup rows: the whole segments, or one dimension set of
/// the cube.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollupSource<'a> {
    Whole,
    /// The set's rows (its name), grouped by the query's dimensions and filtered by its
    /// filters when `filtered`.
    Cube {
        dims: &'a str,
        filtered: bool,
        /// The newest finished run adding up the set's settled rows ([`compact_set`]) of
        /// each partition that has one, its `upto` and `run`, read in place of the settled
        /// rows it holds.
        compacted: &'a [(u16, u64, String)],
    },
    /// The poll's totals, grouped by nothing.
    Totals,
}

/// How a breakdown statement over rollup rows gives its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowShape {
    /// `(group, ballots, answers, votes per answer)` rows
    /// ([`tally_core::rollup::BreakdownListRow`]): the rows added up per group and answer
    /// list, so a group comes once per distinct answer list of its rows and the reader adds
    /// them up. A quarter of the rows of [`RowShape::PerAnswer`], in half the engine's time
    /// on a key of 10,000 values (each row's answers added up as one array instead of one
    /// row each); but the rows are not bounded by the groups: a result that fills the row
    /// limit is read again per answer.
    PerAnswerList,
    /// `(group, answer, count)` rows, one per group and answer: at most one per answer key
    /// and one for the ballots per group, so a full result means too many groups.
    PerAnswer,
}

/// Whether [`breakdown_rollups`] reads `source` per answer list when asked to: not the
/// totals, nor a breakdown by nothing (a few rows, grouped by a constant).
pub fn reads_answer_lists(query: &BreakdownQuery, source: RollupSource) -> bool {
    !query.by.is_empty() && !matches!(source, RollupSource::Totals)
}

/// The rows ([`RowShape`]) of a breakdown from the rollups whose bucket starts in
/// `[from, to)` (epoch seconds), each partition of the log as far as its own positions go:
/// settled rows up to its position in `settled`, fresh rows after it up to its position in
/// `fresh`; of a set with a finished run adding up a partition's settled rows up to a
/// position at or before its settled one, that run's rows and the settled rows after it.
/// Per answer, answer `''` holds the group's ballots. The totals (and a breakdown by
/// nothing) are always read [`RowShape::PerAnswer`]: a few rows.
pub fn breakdown_rollups(
    query: &BreakdownQuery,
    source: RollupSource,
    settled: &[(u16, u64)],
    fresh: &[(u16, u64)],
    (from, to): (Option<i64>, Option<i64>),
    shape: RowShape,
) -> String {
    let mut common = String::new();
    if let Some(from) = from {
        common.push_str(&format!(" AND toUInt32(bucket_start) >= {}", from.max(0)));
    }
    if let Some(to) = to {
        common.push_str(&format!(" AND toUInt32(bucket_start) < {}", to.max(0)));
    }
    let (dims, group, filtered) = match source {
        RollupSource::Whole => ("", group_key(query), true),
        RollupSource::Cube { dims, filtered, .. } => (dims, group_key(query), filtered),
        RollupSource::Totals => (TOTAL_SET, "[]".to_owned(), false),
    };
    common.push_str(&format!(" AND dims = {}", lit(dims)));
    if filtered {
        common.push_str(&segment_filter(query));
    }
    let table = |level: RollupLevel| match source {
        RollupSource::Whole => level.table(),
        _ => cube_table(level),
    };
    // Both levels' rows first, then one aggregation over them: half the time of adding up
    // each level and then the sums (132 -> 93 ms for 80,000 rows of a 10,000-value key on
    // 18.16). The group is made outside the union: over `Distributed` tables 18.16 refuses
    // a constant one (the totals' `[]`) from a subquery.
    let mut columns: Vec<&str> = Vec::new();
    if !matches!(source, RollupSource::Totals) {
        columns.extend(query.by.iter().flat_map(dimension_columns));
    }
    columns.extend(["ballots", "answers", "answer_votes"]);
    columns.sort_unstable();
    columns.dedup();
    let columns = columns.join(", ");
    let part = |level: RollupLevel, positions: String| {
        format!(
            "SELECT {columns} FROM {} WHERE poll_id = {} AND {positions}{common}",
            table(level),
            lit(&query.poll_id)
        )
    };
    // The runs that hold no more than their partition's settled rows.
    let compacted: Vec<&(u16, u64, String)> = match source {
        RollupSource::Cube { compacted, .. } => compacted
            .iter()
            .filter(|(partition, upto, _)| {
                settled
                    .iter()
                    .any(|(p, position)| p == partition && upto <= position)
            })
            .collect(),
        _ => Vec::new(),
    };
    let added_up: Vec<(u16, u64)> = compacted.iter().map(|(p, upto, _)| (*p, *upto)).collect();
    let mut rows = format!(
        "{} UNION ALL {}",
        part(
            RollupLevel::Settled,
            between("last_seq", &added_up, settled)
        ),
        part(RollupLevel::Fresh, between("last_seq", settled, fresh)),
    );
    if !compacted.is_empty() {
        let runs: Vec<String> = compacted.iter().map(|(_, _, run)| lit(run)).collect();
        // `upto` decides nothing (`run` does) but comes before it in the table's key, so the
        // index skips the other runs' rows.
        let uptos: Vec<String> = compacted
            .iter()
            .map(|(_, upto, _)| upto.to_string())
            .collect();
        rows.push_str(&format!(
            " UNION ALL SELECT {columns} FROM segment_cube_compact WHERE poll_id = {} \
             AND upto IN ({}) AND run IN ({}){common}",
            lit(&query.poll_id),
            uptos.join(", "),
            runs.join(", ")
        ));
    }
    match shape {
        RowShape::PerAnswerList if reads_answer_lists(query, source) => format!(
            "SELECT {group} AS g, sum(ballots) AS b, answers, sumForEach(answer_votes) AS v \
             FROM ({rows}) GROUP BY g, answers LIMIT {BREAKDOWN_ROW_LIMIT}"
        ),
        _ => format!(
            "SELECT {group} AS g, opt, sum(c) FROM ({rows}) \
             ARRAY JOIN arrayConcat([''], answers) AS opt, arrayConcat([ballots], answer_votes) AS c \
             GROUP BY g, opt LIMIT {BREAKDOWN_ROW_LIMIT}"
        ),
    }
}

/// Epoch ms as DateTime seconds, within what a DateTime holds. The `received_at`
/// conditions only let ClickHouse skip granules; `received_ms` decides.
fn seconds(ms: &i64) -> i64 {
    (ms / 1000).min(i64::from(u32::MAX))
}

/// The same rows from the raw votes, each partition up to its position in `as_of`,
/// received in any of `ranges`.
pub fn breakdown_votes(query: &BreakdownQuery, as_of: &[(u16, u64)], ranges: &[MsRange]) -> String {
    let ranges: Vec<String> = ranges
        .iter()
        .map(|(from, to)| {
            let mut range = vec!["1".to_owned()];
            if let Some(from) = from {
                let from = from.max(&0);
                range.push(format!(
                    "received_ms >= {from} AND received_at >= toDateTime({})",
                    seconds(from)
                ));
            }
            if let Some(to) = to {
                let to = to.max(&0);
                range.push(format!(
                    "received_ms < {to} AND received_at <= toDateTime({})",
                    seconds(to)
                ));
            }
            format!("({})", range.join(" AND "))
        })
        .collect();
    let ranges = if ranges.is_empty() {
        "0".to_owned()
    } else {
        ranges.join(" OR ")
    };
    format!(
        "SELECT {} AS g, opt, count() FROM votes ARRAY JOIN arrayConcat([''], choice) AS opt \
         WHERE poll_id = {} AND {} AND ({ranges}){} GROUP BY g, opt LIMIT {BREAKDOWN_ROW_LIMIT}",
        group_key(query),
        lit(&query.poll_id),
        at_most("seq", as_of),
        segment_filter(query)
    )
}

/// The distinct `(dimension, value)` pairs of a poll's votes and rollup rows of both levels,
/// empty values left out: the standard columns and the poll's own keys side by side, array
/// joined together.
pub fn segment_values(poll_id: &str, partition: u16) -> String {
    let names: Vec<String> = STANDARD_KEYS.iter().map(|key| lit(key)).collect();
    let keys = format!("arrayConcat([{}], dim_keys)", names.join(", "));
    let values = format!("arrayConcat([{}], dim_values)", STANDARD_KEYS.join(", "));
    let poll = lit(poll_id);
    let tables = [
        "votes",
        RollupLevel::Settled.table(),
        RollupLevel::Fresh.table(),
    ];
    let tables: Vec<String> = tables
        .iter()
        .map(|table| {
            format!(
                "SELECT DISTINCT k, v FROM {table} ARRAY JOIN {keys} AS k, {values} AS v \
                 WHERE poll_id = {poll} AND log_partition = {partition} AND v != ''"
            )
        })
        .collect();
    format!(
        "SELECT DISTINCT k, v FROM ({}) ORDER BY k, v",
        tables.join(" UNION ALL ")
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

/// The distinct window widths of a poll's window rows, smallest first.
pub fn window_widths(poll_id: &str) -> String {
    format!(
        "SELECT DISTINCT window_seconds FROM vote_windows WHERE poll_id = {} ORDER BY window_seconds",
        lit(poll_id)
    )
}

/// The migrations as a server of a sharded warehouse runs them (`replicated`: with its
/// tables replicated), `USE` switching between its two databases, and the statements that
/// check a shard's place, for dialect checks where `cluster` is defined.
pub fn sharded_for_check(database: &str, cluster: &str, replicated: bool) -> Vec<(String, String)> {
    let local = format!("{database}{SHARD_DATABASE_SUFFIX}");
    let mut statements = vec![
        (
            "create the local database".to_owned(),
            format!("CREATE DATABASE IF NOT EXISTS {}", ident(&local)),
        ),
        (
            "use the local database".to_owned(),
            format!("USE {}", ident(&local)),
        ),
        (
            "shard layout table".to_owned(),
            SHARD_LAYOUT_TABLE.to_owned(),
        ),
        ("shard layout".to_owned(), shard_layout()),
        ("record shard layout".to_owned(), record_shard_layout(0, 2)),
        ("cluster shards".to_owned(), cluster_shards(cluster)),
        ("table engine".to_owned(), table_engine(database, "votes")),
        (
            "use the database".to_owned(),
            format!("USE {}", ident(database)),
        ),
        ("schema_migrations".to_owned(), MIGRATIONS_TABLE.to_owned()),
    ];
    for (version, name, statement) in MIGRATIONS {
        let shard = Some((local.as_str(), cluster));
        for (target, statement) in migration_steps(name, statement, database, shard, replicated) {
            // What is checked of replicated tables is that they are made: an in-memory
            // Keeper takes no writes, and a change to a replicated table is one (the same
            // statements are checked on plain tables).
            let writes = statement.starts_with("INSERT")
                || (target == Target::Local && statement.starts_with("ALTER"));
            // The cube's views read the `dims` column such a change adds.
            let reads_a_change = statement.starts_with("CREATE MATERIALIZED VIEW")
                && statement.contains("segment_cube");
            if replicated && (writes || reads_a_change) {
                continue;
            }
            let (into, database) = match target {
                Target::Local => ("local", local.as_str()),
                Target::Read => ("read", database),
            };
            statements.push((format!("use {into}"), format!("USE {}", ident(database))));
            statements.push((format!("migration {version} {name} ({into})"), statement));
        }
    }
    statements
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
    let segment = "'c', 'email', 's', 'm', 'DE', 'mobile', ['plan'], ['pro']";
    statements.push((
        "insert votes".into(),
        format!(
            "INSERT INTO votes ({}) VALUES (0, 7, 'v-1', 'p', 'abc', ['red', 'blue'], NULL, {segment}, 1700000000, 1700000000123)",
            vote_columns().join(", ")
        ),
    ));
    statements.push((
        "insert windows".into(),
        format!(
            "INSERT INTO vote_windows ({}) VALUES (0, 'p', 1700000000, 10, 'red', 3, 7)",
            WINDOW_COLUMNS.join(", ")
        ),
    ));
    for level in RollupLevel::ALL {
        statements.push((
            format!("insert {}", level.table()),
            format!(
                "INSERT INTO {} ({}) VALUES (0, 'p', 1700000040, 60, {segment}, 2, ['blue', 'red'], [1, 2], 7, ''), \
                 (0, 'p', 1700000040, 60, {segment}, 2, ['blue', 'red'], [1, 2], 7, '*')",
                level.table(),
                rollup_columns().join(", ")
            ),
        ));
        statements.push((
            format!("the cube copy of {}", level.table()),
            format!(
                "SELECT throwIf(count() != 1, 'the cube row was not copied') FROM {} WHERE dims = '*'",
                cube_table(level)
            ),
        ));
        statements.push((
            format!("{} watermark", level.table()),
            rollups_watermark(0, level),
        ));
    }
    // A fenced insert reads the batch from an external table, which a check has to make.
    statements.push(("record fence".into(), record_fence(0, 5)));
    statements.push(("fence epoch".into(), fence_epoch(0)));
    statements.push((
        "external batch".into(),
        format!(
            "CREATE TABLE batch ({}) ENGINE = Memory",
            external_structure("votes").expect("votes")
        ),
    ));
    statements.push((
        "fill the external batch".into(),
        format!(
            "INSERT INTO batch ({}) VALUES (0, 8, 'v-2', 'p', 'def', ['red'], NULL, {segment}, 1700000001, 1700000001123)",
            vote_columns().join(", ")
        ),
    ));
    statements.push((
        "fenced insert votes".into(),
        fenced_insert("votes", &vote_columns(), 0, 5),
    ));
    // A retried insert with the token of one that landed is dropped (current ClickHouse,
    // once the table remembers its inserts): the batch's vote is there once more, not twice.
    statements.push((
        "takes deduplication tokens".into(),
        TAKES_DEDUPLICATION_TOKENS.into(),
    ));
    statements.push((
        "has a deduplication window".into(),
        HAS_DEDUPLICATION_WINDOW.into(),
    ));
    for table in PARTITION_TABLES {
        statements.push((
            format!("remember inserts into {table}"),
            deduplication_window(table),
        ));
    }
    let with_token = fenced_insert("votes", &vote_columns(), 0, 5).replacen(
        " SELECT ",
        " SETTINGS insert_deduplication_token = 'check:votes:0:8-8' SELECT ",
        1,
    );
    statements.push(("fenced insert with a token".into(), with_token.clone()));
    statements.push(("the same insert retried".into(), with_token));
    statements.push((
        "the retry was dropped".into(),
        "SELECT throwIf(count() != 2, 'a retried insert was written twice') FROM votes WHERE vote_id = 'v-2'"
            .into(),
    ));
    statements.push(("drop the external batch".into(), "DROP TABLE batch".into()));
    statements.push(("votes watermark".into(), votes_watermark(0)));
    statements.push(("windows watermark".into(), windows_watermark(0)));
    statements.push(("poll positions".into(), poll_positions("p")));
    statements.push((
        "tally totals by partition".into(),
        tally_totals_by_partition("p"),
    ));
    for positions in [&[][..], &[(0, 7)], &[(0, 7), (1, 3)]] {
        statements.push((
            format!("tally counts by partition at {positions:?}"),
            tally_counts_by_partition("p", positions),
        ));
    }
    statements.push(("voter keys".into(), voter_keys("p")));
    statements.push(("window widths".into(), window_widths("p")));
    for level in RollupLevel::ALL {
        for totals in [false, true] {
            statements.push((
                format!("rollup positions {level:?} (totals: {totals})"),
                rollup_positions("p", level, totals),
            ));
        }
    }
    statements.push(("cube coverage".into(), cube_coverage("p")));
    statements.push((
        "newest compactions".into(),
        newest_compactions("p", "plan", None),
    ));
    statements.push((
        "newest compaction of a partition".into(),
        newest_compactions("p", "plan", Some(0)),
    ));
    statements.push((
        "set rows between".into(),
        set_rows_between("p", "plan", 0, 3, 7),
    ));
    statements.push((
        "compact a set".into(),
        compact_set("p", "plan", 0, None, 7, "run-1"),
    ));
    statements.push((
        "compact a set again".into(),
        compact_set("p", "plan", 0, Some((7, "run-1")), 9, "run-2"),
    ));
    statements.push((
        "compacted rows".into(),
        compacted_rows("p", "plan", 9, "run-2"),
    ));
    statements.push((
        "record a compaction".into(),
        record_compaction(0, "p", "plan", 9, "run-2", 3),
    ));
    statements.push(("segment values".into(), segment_values("p", 0)));
    statements.push((
        "insert poll_records".into(),
        format!(
            "INSERT INTO poll_records ({}) VALUES ('p', 'T', 'Q?', 'single', NULL, 'per_voter', 'live', 0, NULL, NULL, NULL, ['plan'], ['red', 'blue'], ['Red', 'Blue'], 1700000000, 1700000001, NULL, 1800000000, NULL, NULL, 3, 2)",
            POLL_RECORD_COLUMNS.join(", ")
        ),
    ));
    statements.push(("vote positions".into(), vote_positions()));
    for positions in [&[(0, 7)][..], &[(0, 7), (1, 3)]] {
        statements.push((
            format!("ballots of a poll at {positions:?}"),
            ballots_of_poll("p", positions),
        ));
    }
    for table in ["ballots", "answers", "ballot_dimensions"] {
        for positions in [&[][..], &[(0, 7)], &[(0, 7), (1, 3)], &[(1, 3), (4, 9)]] {
            let body = pinned(table, positions).expect("a pinned table");
            statements.push((
                format!("pinned {table} at {positions:?}"),
                format!("SELECT count() FROM ({body}) AS {table}"),
            ));
        }
    }
    for table in tally_core::analyst::TABLES {
        statements.push((
            format!("analyst table {}", table.name),
            format!("SELECT * FROM {} LIMIT 1", table.name),
        ));
    }
    statements.extend(crate::analyst::sample_statements());
    let query = BreakdownQuery {
        poll_id: "p".into(),
        by: vec![Dimension("country".into()), Dimension("plan".into())],
        filters: vec![
            (
                Dimension("device".into()),
                vec!["mobile".into(), "it's".into()],
            ),
            (
                Dimension("plan".into()),
                (0..100).map(|i| format!("plan-{i}")).collect(),
            ),
            (Dimension("source".into()), vec![]),
        ],
        from_ms: Some(1_699_999_999_000),
        to_ms: Some(1_800_000_000_000),
    };
    for shape in [RowShape::PerAnswerList, RowShape::PerAnswer] {
        statements.push((
            format!("breakdown rollups {shape:?}"),
            breakdown_rollups(
                &query,
                RollupSource::Whole,
                &[(0, 5)],
                &[(0, 7)],
                (Some(1_699_999_980), Some(1_800_000_000)),
                shape,
            ),
        ));
        statements.push((
            format!("breakdown rollups, all buckets {shape:?}"),
            breakdown_rollups(
                &query,
                RollupSource::Whole,
                &[],
                &[(0, 7)],
                (None, None),
                shape,
            ),
        ));
        let cube = RollupSource::Cube {
            dims: "country,device",
            filtered: true,
            compacted: &[],
        };
        let (settled, fresh) = (&[(0, 5), (1, 9)][..], &[(0, 7), (2, 4)][..]);
        statements.push((
            format!("breakdown cube {shape:?}"),
            breakdown_rollups(
                &query,
                cube,
                settled,
                fresh,
                (Some(1_699_999_980), None),
                shape,
            ),
        ));
        let runs = [(0, 4, "run-1".to_owned()), (1, 9, "run-2".to_owned())];
        let compacted = RollupSource::Cube {
            dims: "plan",
            filtered: false,
            compacted: &runs,
        };
        statements.push((
            format!("breakdown compacted set {shape:?}"),
            breakdown_rollups(
                &query,
                compacted,
                settled,
                fresh,
                (Some(1_699_999_980), None),
                shape,
            ),
        ));
        statements.push((
            format!("breakdown cube totals {shape:?}"),
            breakdown_rollups(
                &query,
                RollupSource::Totals,
                settled,
                fresh,
                (None, None),
                shape,
            ),
        ));
    }
    statements.push((
        "breakdown votes".into(),
        breakdown_votes(
            &query,
            &[(0, 7), (1, 9)],
            &[
                (Some(1_699_999_999_000), Some(1_700_000_040_000)),
                (Some(1_800_000_000_000), None),
                (Some(253_402_300_700_000), Some(253_402_300_799_000)),
            ],
        ),
    ));
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

    /// The column names a CREATE TABLE statement declares, in order.
    fn declared_columns(statement: &str) -> Vec<&str> {
        let start = statement.find('(').expect("a column list") + 1;
        let end = statement.find(") ENGINE").expect("an engine clause");
        statement[start..end]
            .split(", ")
            .map(|column| column.split_whitespace().next().expect("a column name"))
            .collect()
    }

    #[test]
    fn a_range_between_positions_covers_every_partition_it_reads() {
        // Partition 2 has no lower bound: the range starts at 0 for it; partition 5 has one
        // but no upper bound, so it reads nothing and does not narrow the range.
        let condition = between("last_seq", &[(1, 40), (5, 90)], &[(1, 70), (2, 20)]);
        assert!(
            condition.starts_with("last_seq > 0 AND last_seq <= 70 AND "),
            "{condition}"
        );
        let condition = between("last_seq", &[(1, 40)], &[(1, 70)]);
        assert_eq!(
            condition,
            "last_seq > 40 AND last_seq <= 70 AND (log_partition != 1 OR last_seq > 40) \
             AND (log_partition = 1 AND last_seq <= 70)"
        );
        assert_eq!(between("last_seq", &[(1, 40)], &[]), "0");
    }

    #[test]
    fn a_pin_bounds_each_partition_and_reads_nothing_of_the_others() {
        let body = pinned("ballots", &[(1, 3), (4, 9)]).expect("pinned");
        assert!(
            body.ends_with(" WHERE seq <= [0, 3, 0, 0, 9][log_partition + 1]"),
            "{body}"
        );
        let body = pinned("answers", &[(2, 7)]).expect("pinned");
        assert!(
            body.ends_with(" WHERE (log_partition = 2 AND seq <= 7)"),
            "{body}"
        );
        assert!(pinned("ballot_dimensions", &[])
            .expect("pinned")
            .ends_with(" WHERE 0"));
        assert!(pinned("polls", &[(0, 1)]).is_none(), "read as they are");
    }

    #[test]
    fn replicated_tables_keep_their_columns_and_engine_arguments() {
        let mut tables = 0;
        for (_, name, statement) in MIGRATIONS {
            let made = replicated_table(statement, "t");
            if created_table(statement).is_none() {
                assert_eq!(&made, statement, "{name}: not a table, unchanged");
                continue;
            }
            tables += 1;
            let path = format!("('/clickhouse/tables/{{shard}}/t/{name}', '{{replica}}'");
            assert!(made.contains(&path), "{made}");
            assert_eq!(
                declared_columns(&made),
                declared_columns(statement),
                "{name}"
            );
        }
        assert!(tables >= 7, "every table of the migrations");
        assert_eq!(
            replicated_table(
                "CREATE TABLE IF NOT EXISTS p (v UInt64) ENGINE = ReplacingMergeTree(v) ORDER BY v",
                "db"
            ),
            "CREATE TABLE IF NOT EXISTS p (v UInt64) ENGINE = ReplicatedReplacingMergeTree(\
             '/clickhouse/tables/{shard}/db/p', '{replica}', v) ORDER BY v"
        );
        assert_eq!(
            replicated_table(
                "CREATE TABLE IF NOT EXISTS m (v UInt64) ENGINE = MergeTree ORDER BY v",
                "db"
            ),
            "CREATE TABLE IF NOT EXISTS m (v UInt64) ENGINE = ReplicatedMergeTree(\
             '/clickhouse/tables/{shard}/db/m', '{replica}') ORDER BY v"
        );
    }

    #[test]
    fn every_migration_has_its_place_in_a_sharded_warehouse() {
        use Target::{Local, Read};
        for (version, name, statement) in MIGRATIONS {
            let one_server = migration_steps(name, statement, "t", None, false);
            assert_eq!(
                one_server,
                vec![(Read, (*statement).to_owned())],
                "{version}"
            );
            let steps = migration_steps(name, statement, "t", Some(("t_shard", "c")), false);
            let targets: Vec<Target> = steps.iter().map(|(target, _)| *target).collect();
            match created_table(statement) {
                // The fences are checked where the rows are written.
                Some(_) if *name == "partition_fences" => assert_eq!(targets, [Local]),
                Some(table) => {
                    assert_eq!(table, *name, "migration {version} is named after its table");
                    assert_eq!(targets, [Local, Read], "{name}");
                    let twin = &steps[1].1;
                    assert!(
                        twin.contains(&format!("Distributed('c', 't_shard', '{table}', ")),
                        "{twin}"
                    );
                    // Rows by partition go where their partition's processor writes them.
                    let key = if statement.contains("log_partition UInt16") {
                        "log_partition)"
                    } else {
                        "0)"
                    };
                    assert!(twin.ends_with(key), "{twin}");
                }
                None if statement.starts_with("CREATE VIEW") => {
                    assert_eq!(targets, [Read], "{name}: views read through")
                }
                None => assert!(!targets.is_empty(), "{name}"),
            }
            // Replicated, each table's path names the database it is made in.
            let replicated = migration_steps(name, statement, "t", Some(("t_shard", "c")), true);
            for ((target, plain), (_, made)) in steps.iter().zip(&replicated) {
                if created_table(plain).is_some() && plain.contains("MergeTree") {
                    let into = if *target == Local { "t_shard" } else { "t" };
                    assert!(
                        made.contains(&format!("/clickhouse/tables/{{shard}}/{into}/{name}'")),
                        "{made}"
                    );
                } else {
                    assert_eq!(made, plain);
                }
            }
        }
    }

    #[test]
    fn migrations_create_the_listed_columns() {
        let created = |table: &str| {
            let (_, _, statement) = MIGRATIONS
                .iter()
                .find(|(_, name, _)| *name == table)
                .expect("a migration creates the table");
            declared_columns(statement)
        };
        assert_eq!(created("votes"), vote_columns());
        assert_eq!(created("vote_windows"), WINDOW_COLUMNS);
        for level in RollupLevel::ALL {
            // `dims` came later, added by a migration of its own.
            let mut columns = created(level.table());
            columns.push("dims");
            assert_eq!(columns, rollup_columns());
            assert_eq!(created(cube_table(level)), rollup_columns());
            let structure = external_structure(level.table()).expect("a rollup table");
            assert!(structure.ends_with(", dims String"), "{structure}");
        }
        assert!(!external_structure("votes").unwrap().contains("choices"));
    }

    #[test]
    fn filters_are_one_in_list_per_dimension() {
        let query = BreakdownQuery {
            poll_id: "p".into(),
            filters: vec![
                (Dimension("country".into()), vec!["DE".into(), "FR".into()]),
                (Dimension("plan".into()), vec!["it's".into()]),
                (Dimension("device".into()), vec![]),
            ],
            ..Default::default()
        };
        assert_eq!(
            segment_filter(&query),
            " AND country IN ('DE', 'FR') AND dim_values[indexOf(dim_keys, 'plan')] IN ('it\\'s') AND 0"
        );
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
