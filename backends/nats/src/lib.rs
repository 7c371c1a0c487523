//! tally's NATS back ends, for the distributed deployment: the vote log on a JetStream
//! stream ([`JetStreamLog`]), the poll registry on a JetStream key-value bucket
//! ([`KvRegistry`]), and live totals on a core NATS subject ([`NatsLiveFeed`]).
//!
//! In: votes to append, poll records, live totals. Out: the same, read back in order. The
//! broker itself enforces one vote per voter (a per-subject limit of one message) across
//! every ingest replica. Each type implements its `tally_core::ports` trait and passes the
//! `tally-conformance` suite against a real nats-server.

mod live;
mod log;
mod registry;

use std::time::Duration;

pub use live::NatsLiveFeed;
pub use log::{publish_together, Ack, JetStreamLog, ACKS_PER_SUBSCRIPTION};
pub use registry::KvRegistry;

pub use async_nats::Client;
pub use log::LogOptions;

use tally_core::{Error, Result};

pub const VOTES_STREAM: &str = "VOTES";
pub const POLLS_BUCKET: &str = "POLLS";
pub const LIVE_PREFIX: &str = "tally.live";

/// Connects to NATS, retrying for the first `patience` while the server comes up.
pub async fn connect(url: &str, patience: Duration) -> Result<async_nats::Client> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let options = async_nats::ConnectOptions::new()
            .name("tally")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .max_reconnects(None);
        // With retry_on_initial_connect the client returns at once and connects in the
        // background; wait until it is actually connected so startup errors are visible.
        match options.connect(url).await {
            Ok(client) => {
                while client.connection_state() != async_nats::connection::State::Connected {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Error::unavailable(
                            "NATS",
                            format!("cannot connect to NATS at {url}"),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                return Ok(client);
            }
            Err(err) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %err, "nats connect failed, retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => {
                return Err(Error::unavailable(
                    "NATS",
                    format!("cannot connect to NATS at {url}: {err}"),
                ))
            }
        }
    }
}

/// The JetStream error code behind a failed call, if the server sent one.
pub(crate) fn jetstream_code(err: &(dyn std::error::Error + 'static)) -> Option<u64> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(err) = source {
        if let Some(js) = err.downcast_ref::<async_nats::jetstream::Error>() {
            return Some(js.error_code().0);
        }
        source = err.source();
    }
    None
}
