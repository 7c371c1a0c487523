//! The ports: the back-end traits every service talks through. Services hold them as
//! `Arc<dyn …>`; the distributed deployment implements them on NATS JetStream and
//! ClickHouse (`tally-nats`, `tally-clickhouse`), the standalone one on embedded stores
//! (`tally-embedded`). Each trait states the guarantees its callers rely on; the
//! `tally-conformance` suites prove them for every implementation.

mod leases;
mod live;
mod log;
mod registry;
mod warehouse;

use std::pin::Pin;

use futures::Stream;

pub use leases::PartitionLeases;
pub use live::LiveFeed;
pub use log::{
    partition_of, placement, spread_key, spread_of, spread_partitions, Appended, LogEntry,
    LogReader, LogRetention, VoteLog, APPEND_MANY_IN_FLIGHT, MAX_SPREAD,
};
pub use registry::{PollChange, PollRegistry};
pub use warehouse::{
    newer_positions, poll_as_of, AnalystRows, Positions, StoredVote, Warehouse, Watermarks,
    WindowRow,
};

pub type BoxStream<T> = Pin<Box<dyn Stream<Item = T> + Send>>;
