//! Test support for tally: starts private `nats-server` and `clickhouse-server`
//! processes on free 127.0.0.1 ports with their data in temporary directories,
//! so integration tests never touch a shared broker or database.
//!
//! - [`ManagedProcess`] (module `process`) is the one way a test runs a child
//!   process: started with its output in a log file, waited on until ready,
//!   SIGKILLed and restarted with the same command, killed on drop, and quoted
//!   from its log in every error. The servers below and the end-to-end tests'
//!   tally services are all built on it.
//! - A [`NatsServer`] belongs to one test and can be SIGKILLed and restarted on
//!   the same port and store directory.
//! - [`clickhouse()`] hands every test in the process the same server (the one
//!   named by `TALLY_TEST_CLICKHOUSE_URL`, as `scripts/test` provides, or else one
//!   started on first use) and tests keep apart by working in their own database
//!   named with [`unique_name`]; a [`ClickHouseServer`] is one a test owns and
//!   may kill.
//! - [`wait_until`] polls a condition with a deadline and a useful error;
//!   [`require!`] skips a test whose server is missing (see [`needs`]).

mod clickhouse;
mod names;
mod nats;
pub mod needs;
pub mod process;
mod wait;

pub use clickhouse::{
    clickhouse, clickhouse_cluster, ClickHouse, ClickHouseCluster, ClickHouseServer,
};
pub use names::{free_port, unique_name};
pub use nats::{NatsAccess, NatsCluster, NatsOptions, NatsServer, NatsTls};
pub use needs::Need;
pub use process::{Detached, ManagedProcess};
pub use wait::wait_until;

/// Environment variable naming the `nats-server` binary; `nats-server` on `PATH` otherwise.
pub const NATS_SERVER_ENV: &str = "TALLY_TEST_NATS_SERVER";
/// Environment variable with the base URL of an already running ClickHouse HTTP interface.
pub const CLICKHOUSE_URL_ENV: &str = "TALLY_TEST_CLICKHOUSE_URL";
/// Environment variable naming the `clickhouse-server` binary; `clickhouse-server` otherwise.
pub const CLICKHOUSE_SERVER_ENV: &str = "TALLY_TEST_CLICKHOUSE_SERVER";
