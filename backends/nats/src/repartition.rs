//! Changing the partition count of the vote stream (`tally repartition`).
//!
//! A poll's subject (`votes.<partition>.<poll>.<key>`) depends on the count, and one vote
//! per voter rests on a voter's second vote landing on the subject of the first. So the
//! count changes only while the stream holds no vote — every poll that took votes has had
//! them counted and purged (which makes it final) — and no processor holds a partition.
//! The processors' watermarks carry over: the stream's sequence only grows, so every vote
//! written with the new count comes after every vote the warehouse holds, whatever
//! partition either is in.

use async_nats::jetstream;
use futures::TryStreamExt;

use super::{LEASES_BUCKET, PARTITIONS_METADATA, VOTES_STREAM};
use tally_core::{Error, Result};

const WHAT: &str = "re-partitioning";

/// What [`repartition`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repartitioned {
    /// There is no vote stream yet: the first service creates it with its count.
    NoStream,
    /// The stream's recorded count was changed from `from` (`None`: not recorded).
    Changed { from: Option<u16> },
}

/// Records `partitions` as the count the vote stream's votes are written with, refusing
/// (and changing nothing) while the stream holds any vote or any processor holds a
/// partition. Ingest must be stopped as well: a vote it writes meanwhile is found by the
/// check after the change, which then puts the old count back and refuses.
pub async fn repartition(client: async_nats::Client, partitions: u16) -> Result<Repartitioned> {
    if partitions == 0 {
        return Err(Error::failed(
            WHAT,
            "the partition count must be at least 1",
        ));
    }
    let js = jetstream::new(client);
    let Some(mut stream) = existing_stream(&js, VOTES_STREAM, "vote log").await? else {
        return Ok(Repartitioned::NoStream);
    };
    let info = stream.cached_info().clone();
    refuse_while_holding_votes(info.state.messages)?;
    refuse_while_processors_run(&js).await?;
    let from = info
        .config
        .metadata
        .get(PARTITIONS_METADATA)
        .and_then(|count| count.parse::<u16>().ok());
    let mut config = info.config.clone();
    config
        .metadata
        .insert(PARTITIONS_METADATA.to_owned(), partitions.to_string());
    js.update_stream(&config)
        .await
        .map_err(|e| Error::unavailable("vote log", e))?;
    // A vote a running ingest wrote meanwhile went where the old count put it.
    let after = stream
        .info()
        .await
        .map_err(|e| Error::unavailable("vote log", e))?
        .state
        .messages;
    if after > 0 {
        js.update_stream(&info.config)
            .await
            .map_err(|e| Error::unavailable("vote log", e))?;
        return Err(Error::failed(
            WHAT,
            format!(
                "{after} vote(s) arrived while the count was being changed, so it was put \
                 back: stop every ingest first"
            ),
        ));
    }
    Ok(Repartitioned::Changed { from })
}

fn refuse_while_holding_votes(messages: u64) -> Result<()> {
    if messages == 0 {
        return Ok(());
    }
    Err(Error::failed(
        WHAT,
        format!(
            "the stream {VOTES_STREAM} still holds {messages} vote(s), whose voters the \
             count keeps on their subjects. Close (or archive) every poll that took votes \
             and let the processors purge them once counted \
             (TALLY_PURGE_CLOSED_AFTER_SECONDS), then stop ingest and the processors and \
             run this again"
        ),
    ))
}

/// Refuses while any partition lease is held: a running processor reads its partitions by
/// the old count.
async fn refuse_while_processors_run(js: &jetstream::Context) -> Result<()> {
    // No lease bucket: processors run with fixed partitions or never ran. Any other
    // failure to look is not taken for "none held".
    let bucket = format!("KV_{LEASES_BUCKET}");
    if existing_stream(js, &bucket, "partition leases")
        .await?
        .is_none()
    {
        return Ok(());
    }
    let store = js
        .get_key_value(LEASES_BUCKET)
        .await
        .map_err(|e| Error::unavailable("partition leases", e))?;
    let keys: Vec<String> = store
        .keys()
        .await
        .map_err(|e| Error::unavailable("partition leases", e))?
        .try_collect()
        .await
        .map_err(|e| Error::unavailable("partition leases", e))?;
    let held: Vec<&str> = keys
        .iter()
        .filter(|key| key.starts_with("partition."))
        .map(String::as_str)
        .collect();
    if held.is_empty() {
        return Ok(());
    }
    Err(Error::failed(
        WHAT,
        format!(
            "processors hold {} partition lease(s) ({}): stop every processor and ingest \
             first (a lease of a processor that was killed lapses after TALLY_LEASE_SECONDS)",
            held.len(),
            held.join(", ")
        ),
    ))
}

/// The stream `name`, or `None` when the server has no such stream; any other failure is
/// the server's (`what` names it).
async fn existing_stream(
    js: &jetstream::Context,
    name: &str,
    what: &str,
) -> Result<Option<jetstream::stream::Stream>> {
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream)),
        Err(err)
            if matches!(
                err.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            Ok(None)
        }
        Err(err) => Err(Error::unavailable(what, err)),
    }
}
