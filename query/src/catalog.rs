//! Keeps the analysts' `polls` and `poll_options` tables current: every poll the registry
//! holds is recorded in the warehouse when the service starts, then every change as it
//! comes, so analysts' SQL can join votes to titles and labels.
//!
//! The registry's watch starts with every current poll, so one follower does both; when it
//! breaks it is started again, which records everything once more (harmless: per poll the
//! warehouse keeps the record of the highest version). A failed write is retried with the
//! same polls and more that came meanwhile, never dropped, and never stops the service:
//! everything else the query service does works without these tables.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use tally_core::poll::Poll;
use tally_core::ports::{PollChange, PollRegistry, Warehouse};
use tally_core::retry::Backoff;
use tally_service::Tasks;

/// Changes recorded in one warehouse write at most (the watch's first burst is every poll).
const MAX_BATCH: usize = 500;

/// Starts the follower as a task of `tasks`.
pub fn keep_recorded(
    registry: Arc<dyn PollRegistry>,
    warehouse: Arc<dyn Warehouse>,
    tasks: &Tasks,
) {
    tasks.spawn("analyst-polls", move |cancel| async move {
        tokio::select! {
            () = follow(registry.as_ref(), warehouse.as_ref()) => {}
            () = cancel.cancelled() => {}
        }
    });
}

/// Records the registry's polls and their changes, for as long as it runs.
async fn follow(registry: &dyn PollRegistry, warehouse: &dyn Warehouse) {
    let mut backoff = Backoff::standard();
    // Polls read from the watch and not recorded yet, newest version per id.
    let mut pending: BTreeMap<String, Poll> = BTreeMap::new();
    loop {
        let changes = match registry.watch().await {
            Ok(changes) => changes,
            Err(err) => {
                tracing::warn!(error = %err.chain(), "cannot watch the poll registry for the analyst tables, retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let mut changes = changes.ready_chunks(MAX_BATCH);
        while let Some(chunk) = changes.next().await {
            let mut broken = false;
            for change in chunk {
                match change {
                    Ok(PollChange::Put(poll)) => keep_newest(&mut pending, *poll),
                    // Archived polls stay (as `archived_at`); a record removed from the
                    // registry stays too: votes that were counted still name it.
                    Ok(PollChange::Deleted(_)) => {}
                    Err(err) => {
                        tracing::warn!(error = %err.chain(), "poll registry watch failed, restarting it for the analyst tables");
                        broken = true;
                    }
                }
            }
            record(warehouse, &mut pending, &mut backoff).await;
            if broken {
                break;
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

fn keep_newest(pending: &mut BTreeMap<String, Poll>, poll: Poll) {
    match pending.get(&poll.id) {
        Some(held) if held.version >= poll.version => {}
        _ => {
            pending.insert(poll.id.clone(), poll);
        }
    }
}

/// Writes `pending` to the warehouse, retrying until it succeeds; empties it.
async fn record(
    warehouse: &dyn Warehouse,
    pending: &mut BTreeMap<String, Poll>,
    backoff: &mut Backoff,
) {
    if pending.is_empty() {
        return;
    }
    let polls: Vec<Poll> = pending.values().cloned().collect();
    loop {
        match warehouse.record_polls(&polls).await {
            Ok(()) => {
                tracing::debug!(polls = polls.len(), "recorded polls for the analyst tables");
                pending.clear();
                backoff.reset();
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err.chain(), polls = polls.len(), "cannot record polls in the warehouse, retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_version_of_a_poll_is_kept() {
        let mut pending = BTreeMap::new();
        let new: tally_core::poll::NewPoll = serde_json::from_value(serde_json::json!({
            "id": "p", "title": "T", "question": "Q?", "kind": "single",
            "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]
        }))
        .expect("a poll");
        let mut poll = new.into_poll(0, || unreachable!()).expect("a valid poll");
        poll.version = 2;
        keep_newest(&mut pending, poll.clone());
        poll.version = 1;
        poll.title = "older".into();
        keep_newest(&mut pending, poll.clone());
        assert_eq!(pending["p"].version, 2);
        poll.version = 3;
        keep_newest(&mut pending, poll);
        assert_eq!(pending["p"].title, "older");
    }
}
