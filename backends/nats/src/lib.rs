//! tally's NATS back ends, for the distributed deployment: the vote log on a JetStream
//! stream ([`JetStreamLog`]), the poll registry on a JetStream key-value bucket
//! ([`KvRegistry`]), and live totals on a core NATS subject ([`NatsLiveFeed`]), over a
//! connection made by [`connect`] from [`ConnectSettings`] (servers, credentials, TLS).
//!
//! In: votes to append, poll records, live totals. Out: the same, read back in order. The
//! broker itself enforces one vote per voter (a per-subject limit of one message) across
//! every ingest replica. Live totals are signed with a key from `TALLY_SECRET`, and a keyed
//! subscriber takes no others, so a client that may publish on the broker cannot forge
//! them. Each type implements its `tally_core::ports` trait and passes the
//! `tally-conformance` suite against a real nats-server.

mod connect;
mod live;
mod log;
mod registry;

pub use connect::{connect, ConnectSettings, TlsSettings};
pub use live::{sign as sign_live_totals, NatsLiveFeed, SIGNATURE_HEADER};
pub use log::{publish_together, Ack, JetStreamLog, ACKS_PER_SUBSCRIPTION};
pub use registry::KvRegistry;

pub use async_nats::Client;
pub use log::{check_shape, LogOptions, PARTITIONS_METADATA};

pub const VOTES_STREAM: &str = "VOTES";
pub const POLLS_BUCKET: &str = "POLLS";
pub const LIVE_PREFIX: &str = "tally.live";

/// Refuses a stream (`what` in words, `stream` by name) kept in fewer copies than
/// `TALLY_REPLICAS` asks for, naming the command that scales it.
pub(crate) fn check_replicas(
    what: &str,
    stream: &str,
    found: usize,
    wanted: usize,
) -> tally_core::Result<()> {
    if found >= wanted {
        return Ok(());
    }
    Err(tally_core::Error::failed(
        what,
        format!(
            "the stream {stream} has {found} replica(s) where TALLY_REPLICAS asks for {wanted}: \
             scale it with `nats stream edit {stream} --replicas {wanted}` (a cluster of at least \
             {wanted} servers), or set TALLY_REPLICAS={found}"
        ),
    ))
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
