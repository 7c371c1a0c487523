//! Changing the partition count of the vote log, and how many partitions a stream holds
//! (`tally repartition`).
//!
//! A poll's subject (`votes.<partition>.<poll>.<key>`) depends on the count, and one vote
//! per voter rests on a voter's second vote landing on the subject of the first. So the
//! count changes only while the log holds no vote — every poll that took votes has had
//! them counted and purged (which makes it final) — and no processor holds a partition.
//! The processors' watermarks carry over: a stream's sequence only grows, and a stream
//! made anew numbers after every vote the old streams numbered, so every vote written with
//! the new count comes after every vote the warehouse holds, whatever partition or stream
//! either is in.

use std::collections::BTreeSet;

use async_nats::jetstream;
use futures::TryStreamExt;

use super::{LEASES_BUCKET, PARTITIONS_METADATA, VOTES_STREAM};
use crate::layout::StreamLayout;
use crate::log::existing_stream;
use tally_core::{Error, Result};

const WHAT: &str = "re-partitioning";

/// What [`repartition`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repartitioned {
    /// There is no vote stream yet: the first service creates it with its count.
    NoStream,
    /// The recorded count was changed from `from` (`None`: not recorded); the log is now
    /// laid out as `layout` (its streams made anew when that changed them).
    Changed {
        from: Option<u16>,
        layout: StreamLayout,
    },
}

/// Records `partitions` as the count the vote log's votes are written with, and lays the
/// log over streams of `per_stream` partitions (0: one stream; `None`: as it is now),
/// refusing (and changing nothing) while the log holds any vote or any processor holds a
/// partition. Ingest must be stopped as well: a vote it writes meanwhile is found by the
/// check after the change, which then puts the old count back and refuses.
///
/// Streams whose partitions change are made anew, numbering their votes after every vote
/// any of the log's streams ever numbered: a partition's watermark in the warehouse stays
/// below its new stream's votes, whichever stream held it before.
pub async fn repartition(
    client: async_nats::Client,
    partitions: u16,
    per_stream: Option<u16>,
) -> Result<Repartitioned> {
    if partitions == 0 {
        return Err(Error::failed(
            WHAT,
            "the partition count must be at least 1",
        ));
    }
    let js = jetstream::new(client);
    let Some(first) = existing_stream(&js, VOTES_STREAM).await? else {
        return Ok(Repartitioned::NoStream);
    };
    let first = first.cached_info().clone();
    let from = first
        .config
        .metadata
        .get(PARTITIONS_METADATA)
        .and_then(|count| count.parse::<u16>().ok());
    let current = StreamLayout::of_first_stream(&first.config.subjects, from.unwrap_or(1))
        .ok_or_else(|| {
            Error::failed(
                WHAT,
                format!(
                    "the stream {VOTES_STREAM} takes the subjects {:?}, which tally did not \
                     give it; see docs/OPERATIONS.md, \"The broker's shape\"",
                    first.config.subjects
                ),
            )
        })?;
    let streams = vote_streams(&js).await?;
    let held: Vec<String> = streams
        .iter()
        .filter(|info| info.state.messages > 0)
        .map(|info| format!("{} holds {}", info.config.name, info.state.messages))
        .collect();
    refuse_while_holding_votes(&held)?;
    refuse_while_processors_run(&js).await?;
    let per_stream = per_stream.unwrap_or(match current.streams() {
        1 => 0,
        _ => current.per_stream(),
    });
    let wanted = StreamLayout::new(partitions, per_stream);
    // The streams and their subjects, found and wanted.
    let found: BTreeSet<(String, Vec<String>)> = streams
        .iter()
        .map(|info| (info.config.name.clone(), info.config.subjects.clone()))
        .collect();
    let laid_out: BTreeSet<(String, Vec<String>)> = (0..wanted.streams())
        .map(|n| (wanted.name(n), wanted.subjects(n)))
        .collect();
    let same_streams = found == laid_out;
    if same_streams {
        record_count(&js, &streams, partitions).await?;
    } else {
        lay_anew(&js, &streams, &first, wanted).await?;
    }
    // A vote a running ingest wrote meanwhile went where the old count put it.
    let arrived: u64 = vote_streams(&js)
        .await?
        .iter()
        .map(|info| info.state.messages)
        .sum();
    if arrived > 0 {
        if same_streams {
            for info in &streams {
                js.update_stream(&info.config)
                    .await
                    .map_err(|e| Error::unavailable("vote log", e))?;
            }
            return Err(Error::failed(
                WHAT,
                format!(
                    "{arrived} vote(s) arrived while the count was being changed, so it was \
                     put back: stop every ingest first"
                ),
            ));
        }
        return Err(Error::failed(
            WHAT,
            format!(
                "{arrived} vote(s) arrived while the streams were being made anew: an ingest \
                 still runs. Stop every ingest, let the processors count and purge those \
                 votes with the old settings, then run this again"
            ),
        ));
    }
    Ok(Repartitioned::Changed {
        from,
        layout: wanted,
    })
}

/// Every stream of the vote log: `VOTES` and any `VOTES_<n>`, in name order.
async fn vote_streams(js: &jetstream::Context) -> Result<Vec<jetstream::stream::Info>> {
    let mut names: Vec<String> = js
        .stream_names()
        .try_collect()
        .await
        .map_err(|e| Error::unavailable("vote log", e))?;
    names.retain(|name| {
        name == VOTES_STREAM
            || name
                .strip_prefix(VOTES_STREAM)
                .and_then(|rest| rest.strip_prefix('_'))
                .is_some_and(|n| n.parse::<u16>().is_ok())
    });
    names.sort();
    let mut infos = Vec::new();
    for name in names {
        if let Some(stream) = existing_stream(js, &name).await? {
            infos.push(stream.cached_info().clone());
        }
    }
    Ok(infos)
}

/// Records `partitions` on every stream, which keep their subjects.
async fn record_count(
    js: &jetstream::Context,
    streams: &[jetstream::stream::Info],
    partitions: u16,
) -> Result<()> {
    for info in streams {
        let mut config = info.config.clone();
        config
            .metadata
            .insert(PARTITIONS_METADATA.to_owned(), partitions.to_string());
        js.update_stream(&config)
            .await
            .map_err(|e| Error::unavailable("vote log", e))?;
    }
    Ok(())
}

/// Lays the (empty) log out anew as `wanted`: `VOTES` is kept, with its settings (replicas,
/// storage, placement), and takes the first stream's subjects; the other streams are
/// deleted and made again like it. Every stream numbers its next vote after every sequence
/// any of them reached, `VOTES` first, so a run cut short leaves that number behind.
async fn lay_anew(
    js: &jetstream::Context,
    streams: &[jetstream::stream::Info],
    first: &jetstream::stream::Info,
    wanted: StreamLayout,
) -> Result<()> {
    let reached = streams
        .iter()
        .map(|info| info.state.last_sequence)
        .max()
        .unwrap_or(0);
    let votes = js
        .get_stream_no_info(VOTES_STREAM)
        .await
        .map_err(|e| Error::unavailable("vote log", e))?;
    if first.state.last_sequence < reached {
        // Purging an empty stream up to a sequence past its end numbers its next message so.
        votes
            .purge()
            .sequence(reached + 1)
            .await
            .map_err(|e| Error::unavailable("vote log", e))?;
    }
    for info in streams
        .iter()
        .filter(|info| info.config.name != VOTES_STREAM)
    {
        js.delete_stream(&info.config.name)
            .await
            .map_err(|e| Error::unavailable("vote log", e))?;
    }
    // Processors' consumers of partitions that may now be elsewhere; they are made again.
    let consumers: Vec<String> = votes
        .consumer_names()
        .try_collect()
        .await
        .map_err(|e| Error::unavailable("vote log", e))?;
    for name in consumers
        .iter()
        .filter(|name| name.starts_with("processor-p"))
    {
        votes
            .delete_consumer(name)
            .await
            .map_err(|e| Error::unavailable("vote log", e))?;
    }
    let mut config = first.config.clone();
    config.subjects = wanted.subjects(0);
    config.metadata.insert(
        PARTITIONS_METADATA.to_owned(),
        wanted.partitions().to_string(),
    );
    js.update_stream(&config)
        .await
        .map_err(|e| Error::unavailable("vote log", e))?;
    for stream in 1..wanted.streams() {
        let mut config = config.clone();
        config.name = wanted.name(stream);
        config.subjects = wanted.subjects(stream);
        config.first_sequence = (reached > 0).then_some(reached + 1);
        create_anew(js, config).await?;
    }
    Ok(())
}

/// Creates a stream, retrying for a few seconds while the server still removes the files
/// of a stream of that name it has just deleted ("error creating store").
async fn create_anew(js: &jetstream::Context, config: jetstream::stream::Config) -> Result<()> {
    let mut tries = 0;
    loop {
        match js.create_stream(config.clone()).await {
            Ok(_) => return Ok(()),
            Err(err) if tries < 50 && err.to_string().contains("creating store") => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(err) => return Err(Error::unavailable("vote log", err)),
        }
    }
}

fn refuse_while_holding_votes(held: &[String]) -> Result<()> {
    if held.is_empty() {
        return Ok(());
    }
    Err(Error::failed(
        WHAT,
        format!(
            "the vote log still holds votes ({}), whose voters the count keeps on their \
             subjects. Close (or archive) every poll that took votes and let the processors \
             purge them once counted (TALLY_PURGE_CLOSED_AFTER_SECONDS), then stop ingest \
             and the processors and run this again",
            held.join(", ")
        ),
    ))
}

/// Refuses while any partition lease is held: a running processor reads its partitions by
/// the old count.
async fn refuse_while_processors_run(js: &jetstream::Context) -> Result<()> {
    // No lease bucket: processors run with fixed partitions or never ran. Any other
    // failure to look is not taken for "none held".
    let bucket = format!("KV_{LEASES_BUCKET}");
    if existing_stream(js, &bucket).await?.is_none() {
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
