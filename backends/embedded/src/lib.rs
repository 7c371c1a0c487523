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
pub use log::EmbeddedLog;
pub use registry::EmbeddedRegistry;
pub use warehouse::{ParquetWarehouse, WarehouseOptions};

use tally_core::{Error, Result};

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Partitions of the vote log: how many processor workers run side by side.
    pub partitions: u16,
    /// Uniqueness keys the vote log holds in memory (each also written beside its entry)
    /// before it writes them into its index in key order; 0 for the default (200,000).
    /// Tests set it low, so their few votes cross merges.
    pub log_merge_at: usize,
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
    let db = Arc::new(db);
    Ok(Embedded {
        log: Arc::new(EmbeddedLog::open(
            db.clone(),
            options.partitions,
            options.log_merge_at,
        )?),
        registry: Arc::new(EmbeddedRegistry::open(db)?),
        warehouse: Arc::new(ParquetWarehouse::open(
            dir.join("warehouse"),
            options.warehouse,
        )?),
        live: Arc::new(LocalLiveFeed::default()),
    })
}
