//! tally's embedded back ends, for `tally standalone`: everything in one data directory,
//! nothing to install.
//!
//! - [`EmbeddedLog`]: the vote log, on redb (durable group commits, one entry per
//!   uniqueness key, resumable reads by sequence).
//! - [`EmbeddedRegistry`]: the poll registry, in the same redb file.
//! - [`ParquetWarehouse`]: Parquet files plus an in-memory Arrow tail, queried by DataFusion.
//! - [`LocalLiveFeed`]: an in-process broadcast.
//!
//! Each implements the same trait as its distributed counterpart and passes the same
//! conformance suite.

mod live;
mod log;
mod registry;
mod warehouse;

use std::path::Path;
use std::sync::Arc;

pub use live::LocalLiveFeed;
pub use log::{EmbeddedLog, GROUP_WAIT as LOG_GROUP_WAIT};
pub use registry::EmbeddedRegistry;
pub use warehouse::{ParquetWarehouse, WarehouseOptions};

use redb::{ReadableTable, TableDefinition};
use tally_core::{Error, Result};

/// The layout of a data directory this build writes. Raised when a change makes a
/// directory unsafe for an earlier build to open; a build refuses a directory of a newer
/// layout than its own instead of misreading it.
///
/// 1: the layout before the stamp (no `format` key).
/// 2: uniqueness keys wait in `vote_log_keys` for the index, which a build of layout 1
///    would not look in, and so would accept a vote twice.
pub const DATA_FORMAT: u64 = 2;

/// Store-wide values (the poll registry's revision, the data directory's layout).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const FORMAT: &str = "format";

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Partitions of the vote log: how many processor workers run side by side.
    pub partitions: u16,
    /// Uniqueness keys the vote log holds in memory (each also written beside its entry)
    /// before it writes them into its index in key order; 0 for the default (200,000).
    /// Tests set it low, so their few votes cross merges.
    pub log_merge_at: usize,
    /// How long the vote log's writer waits for more votes to join a group commit while
    /// votes come side by side; `None` for the default ([`LOG_GROUP_WAIT`], 2 ms), zero
    /// never waits.
    pub log_group_wait: Option<std::time::Duration>,
    pub warehouse: WarehouseOptions,
}

/// The four back ends of one data directory.
pub struct Embedded {
    pub log: Arc<EmbeddedLog>,
    pub registry: Arc<EmbeddedRegistry>,
    pub warehouse: Arc<ParquetWarehouse>,
    pub live: Arc<LocalLiveFeed>,
}

/// The page cache of the redb file (the vote log, its uniqueness index and the polls).
/// redb's default is 1 GiB, which the process filled as votes were stored (its memory grew
/// with them); pages beyond this are read again from the system's file cache.
const LOG_CACHE_BYTES: usize = 128 * 1024 * 1024;

/// Opens (creating when new) the store in `dir`. Only one process may hold it at a time.
pub fn open(dir: &Path, options: Options) -> Result<Embedded> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::failed(format!("data directory {}", dir.display()), e))?;
    let path = dir.join("tally.redb");
    let db = redb::Database::builder()
        .set_cache_size(LOG_CACHE_BYTES)
        .create(&path)
        .map_err(|e| {
            Error::failed(
                format!(
                    "opening {} (is another tally using this data directory?)",
                    path.display()
                ),
                e,
            )
        })?;
    stamp_format(&db, dir)?;
    let db = Arc::new(db);
    Ok(Embedded {
        log: Arc::new(EmbeddedLog::open(
            db.clone(),
            options.partitions,
            options.log_merge_at,
            options.log_group_wait.unwrap_or(log::GROUP_WAIT),
        )?),
        registry: Arc::new(EmbeddedRegistry::open(db)?),
        warehouse: Arc::new(ParquetWarehouse::open(
            dir.join("warehouse"),
            options.warehouse,
        )?),
        live: Arc::new(LocalLiveFeed::default()),
    })
}

/// Refuses a data directory written by a newer build (a layout above [`DATA_FORMAT`]),
/// writing nothing to it; otherwise stamps it with this build's layout, before anything
/// else is written.
fn stamp_format(db: &redb::Database, dir: &Path) -> Result<()> {
    let what = || format!("reading the data directory {}", dir.display());
    let storage = |e: redb::Error| Error::failed(what(), e);
    let txn = db.begin_write().map_err(|e| storage(e.into()))?;
    {
        let mut meta = txn.open_table(META).map_err(|e| storage(e.into()))?;
        let stored = meta
            .get(FORMAT)
            .map_err(|e| storage(e.into()))?
            .map(|guard| guard.value());
        match stored {
            // Returning drops the transaction uncommitted: nothing is written.
            Some(format) if format > DATA_FORMAT => {
                return Err(Error::failed(
                    what(),
                    format!(
                        "it was written by a newer tally (data format {format}; this build reads formats up to {DATA_FORMAT}): run that version or a newer one"
                    ),
                ))
            }
            // Already stamped: nothing to write, so no commit (and no fsync) at each start.
            Some(DATA_FORMAT) => return Ok(()),
            _ => {
                meta.insert(FORMAT, DATA_FORMAT)
                    .map_err(|e| storage(e.into()))?;
            }
        }
    }
    txn.commit().map_err(|e| storage(e.into()))
}
