//! tally's NATS back ends, for the distributed deployment: the vote log on JetStream
//! streams ([`JetStreamLog`], laid out by [`StreamLayout`]), the poll registry on a JetStream key-value bucket
//! ([`KvRegistry`]), processors' partition leases on another ([`KvLeases`]), and live
//! totals on a core NATS subject ([`NatsLiveFeed`]), over a connection made by [`connect`]
//! from [`ConnectSettings`] (servers, credentials, TLS).
//!
//! In: votes to append, poll records, live totals. Out: the same, read back in order. The
//! broker itself enforces one vote per voter (a per-subject limit of one message) across
//! every ingest replica. Live totals are signed with a key from `TALLY_SECRET`, and a keyed
//! subscriber takes no others, so a client that may publish on the broker cannot forge
//! them. Each type implements its `tally_core::ports` trait and passes the
//! `tally-conformance` suite against a real nats-server.

mod acks;
mod connect;
mod layout;
mod leases;
mod live;
mod log;
mod registry;
mod repartition;

pub use connect::{connect, ConnectSettings, TlsSettings};
pub use layout::StreamLayout;
pub use leases::{KvLeases, LEASES_BUCKET};
pub use live::{sign as sign_live_totals, NatsLiveFeed, SIGNATURE_HEADER};
pub use log::{publish_together, Ack, JetStreamLog, ACKS_PER_SUBSCRIPTION};
pub use registry::KvRegistry;
pub use repartition::{repartition, Repartitioned};

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

/// Opens the key-value bucket `config` describes (`what` names it in errors), creating it
/// when missing; refuses one kept in fewer copies than `config.num_replicas`.
pub(crate) async fn open_bucket(
    js: &async_nats::jetstream::Context,
    what: &str,
    config: async_nats::jetstream::kv::Config,
) -> tally_core::Result<async_nats::jetstream::kv::Store> {
    use async_nats::jetstream::stream;
    use std::time::Duration;
    use tally_core::Error;
    let replicas = config.num_replicas.max(1);
    let bucket = config.bucket.clone();
    let stream_name = format!("KV_{bucket}");
    let store = match js.get_key_value(&bucket).await {
        Ok(store) => store,
        Err(_) => {
            if let Err(err) = js.create_key_value(config.clone()).await {
                // Older servers (2.9) answer bucket creation in a shape the client cannot
                // parse; create the bucket's backing stream the way the KV protocol defines it.
                tracing::debug!(error = %err, bucket, "create_key_value failed, creating the bucket stream directly");
                let stream_config = stream::Config {
                    name: stream_name.clone(),
                    subjects: vec![format!("$KV.{bucket}.>")],
                    max_messages_per_subject: config.history,
                    max_age: config.max_age,
                    discard: stream::DiscardPolicy::New,
                    storage: config.storage,
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    // The server refuses a window longer than the entries live.
                    duplicate_window: match config.max_age {
                        age if age.is_zero() => Duration::from_secs(120),
                        age => age.min(Duration::from_secs(120)),
                    },
                    num_replicas: replicas,
                    ..Default::default()
                };
                js.get_or_create_stream(stream_config)
                    .await
                    .map_err(|e| Error::unavailable(what, e))?;
            }
            js.get_key_value(&bucket)
                .await
                .map_err(|e| Error::unavailable(what, e))?
        }
    };
    // Another service may have created it first, with its own setting.
    let found = js
        .get_stream(&stream_name)
        .await
        .map_err(|e| Error::unavailable(what, e))?
        .cached_info()
        .config
        .num_replicas;
    check_replicas(what, &stream_name, found, replicas)?;
    Ok(store)
}
