//! A local, always-fresh copy of the poll registry, so hot paths (every vote, every SSE
//! client) never make a registry round trip. Kept current by the registry's watch; a miss
//! falls back to one registry read so a poll created a moment ago is found at once.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use tokio::sync::watch;

use tally_core::poll::Poll;
use tally_core::ports::{PollChange, PollRegistry};
use tally_core::retry::Backoff;
use tally_core::Result;

use crate::tasks::Tasks;

pub struct PollCache {
    registry: Arc<dyn PollRegistry>,
    /// Readers take the lock for a map lookup only; never held across an await.
    polls: RwLock<foldhash::HashMap<String, Arc<Poll>>>,
    /// Bumped on every change, so waiters (SSE streams) notice closes and edits.
    changes: watch::Sender<u64>,
    /// Ids the registry did not know, and when it said so: a request for an unknown poll
    /// (a typo, or an attacker naming random ids) costs one registry read per id per
    /// [`MISS_TTL`], not one per request. Cleared for an id as soon as its poll appears.
    misses: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

/// How long an unknown id is remembered as unknown.
const MISS_TTL: std::time::Duration = std::time::Duration::from_secs(2);
/// Unknown ids remembered at most; the memory starts over when full.
const MAX_MISSES: usize = 10_000;

impl PollCache {
    /// Starts following the registry in a background task of `tasks`.
    pub fn start(registry: Arc<dyn PollRegistry>, tasks: &Tasks) -> Arc<PollCache> {
        let cache = Arc::new(PollCache {
            registry,
            polls: RwLock::default(),
            changes: watch::Sender::new(0),
            misses: std::sync::Mutex::new(HashMap::new()),
        });
        let follower = cache.clone();
        tasks.spawn("poll-cache", move |cancel| async move {
            tokio::select! {
                () = follower.follow() => {}
                () = cancel.cancelled() => {}
            }
        });
        cache
    }

    /// Applies the registry's changes as they come, re-watching after a failure.
    async fn follow(&self) {
        let mut backoff = Backoff::standard();
        loop {
            let mut changes = match self.registry.watch().await {
                Ok(changes) => changes,
                Err(err) => {
                    tracing::warn!(error = %err.chain(), "cannot watch the poll registry, retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            backoff.reset();
            while let Some(change) = changes.next().await {
                match change {
                    Ok(PollChange::Put(poll)) => {
                        self.remember(*poll);
                    }
                    Ok(PollChange::Deleted(id)) => {
                        self.polls.write().expect("poll cache lock").remove(&id);
                        self.changes.send_modify(|n| *n += 1);
                    }
                    Err(err) => {
                        tracing::warn!(error = %err.chain(), "poll registry watch failed, restarting it");
                        break;
                    }
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// Keeps the newer of the cached and the given record.
    pub fn remember(&self, poll: Poll) -> Arc<Poll> {
        self.misses
            .lock()
            .expect("poll cache lock")
            .remove(&poll.id);
        let poll = Arc::new(poll);
        let mut polls = self.polls.write().expect("poll cache lock");
        let kept = match polls.get(&poll.id) {
            Some(cached) if cached.version >= poll.version => cached.clone(),
            _ => {
                polls.insert(poll.id.clone(), poll.clone());
                poll
            }
        };
        drop(polls);
        self.changes.send_modify(|n| *n += 1);
        kept
    }

    /// Every poll the cache holds: once its first watch has delivered them, every poll.
    pub fn all(&self) -> Vec<Arc<Poll>> {
        self.polls
            .read()
            .expect("poll cache lock")
            .values()
            .cloned()
            .collect()
    }

    pub fn cached(&self, id: &str) -> Option<Arc<Poll>> {
        self.polls.read().expect("poll cache lock").get(id).cloned()
    }

    pub async fn get(&self, id: &str) -> Result<Option<Arc<Poll>>> {
        if let Some(poll) = self.cached(id) {
            return Ok(Some(poll));
        }
        let recently_unknown = self
            .misses
            .lock()
            .expect("poll cache lock")
            .get(id)
            .is_some_and(|at| at.elapsed() < MISS_TTL);
        if recently_unknown {
            return Ok(None);
        }
        match self.registry.get(id).await? {
            Some(poll) => Ok(Some(self.remember(poll))),
            None => {
                let mut misses = self.misses.lock().expect("poll cache lock");
                if misses.len() >= MAX_MISSES {
                    misses.clear();
                }
                misses.insert(id.to_owned(), std::time::Instant::now());
                Ok(None)
            }
        }
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn registry(&self) -> &Arc<dyn PollRegistry> {
        &self.registry
    }
}
