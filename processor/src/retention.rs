//! Letting go of finished polls in the log. A broker that enforces one vote per voter keeps
//! an index entry for every vote it ever stored; a poll closed for longer than
//! [`Config::purge_closed_after`] (or archived) whose votes are all counted no longer needs
//! them. The owner of the poll's (home) partition then marks the poll `log_purged_at` in the
//! registry — from then on it can never take a vote again, since the log could not refuse a
//! voter's second one — and purges the poll's entries, in each partition its votes go to, up
//! to the last one it saw counted there.
//! A late retry on such a poll is answered from the warehouse (see ingest).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tally_core::poll::{Poll, PollStatus};
use tally_core::ports::{spread_partitions, LogRetention};
use tally_core::{time, Error, Result};
use tally_service::PollCache;

use crate::{Config, Deps};

/// How often a partition's polls are looked over: often enough that a short grace (a test's)
/// is kept to within a second or so, at most once a minute.
fn sweep_interval(grace: Duration) -> Duration {
    (grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Sweeps one partition's finished polls for as long as its worker runs.
pub(crate) struct Retention {
    partition: u16,
    deps: Deps,
    polls: Arc<PollCache>,
    grace: Duration,
    /// Polls marked and purged (or that never had a vote in the log) since the worker
    /// started: not looked at again.
    done: HashSet<String>,
}

impl Retention {
    pub(crate) fn new(partition: u16, deps: Deps, config: &Config, polls: Arc<PollCache>) -> Self {
        Retention {
            partition,
            deps,
            polls,
            grace: config.purge_closed_after,
            done: HashSet::new(),
        }
    }

    /// Never returns; the worker drops it when it stops.
    pub(crate) async fn run(mut self) -> std::convert::Infallible {
        let log = self.deps.log.clone();
        let Some(retention) = log.retention() else {
            // A log that keeps every entry (the embedded one) has nothing to let go of.
            return std::future::pending().await;
        };
        let interval = sweep_interval(self.grace);
        loop {
            tokio::time::sleep(interval).await;
            let now = time::now_ms();
            let due: Vec<Arc<Poll>> = self
                .polls
                .all()
                .into_iter()
                .filter(|poll| {
                    self.deps.log.partition_of(&poll.id) == self.partition
                        && !self.done.contains(&poll.id)
                        && purge_due(poll, now, self.grace)
                })
                .collect();
            for poll in due {
                match self.purge(retention, &poll).await {
                    Ok(true) => {
                        self.done.insert(poll.id.clone());
                    }
                    Ok(false) => {}
                    Err(err) => {
                        tracing::warn!(partition = self.partition, poll_id = %poll.id, error = %err.chain(), "purging a finished poll from the log failed; retrying at the next sweep")
                    }
                }
            }
        }
    }

    /// Purges one due poll once every vote of it is counted, in each partition its votes
    /// go to; `false` when some are not yet.
    async fn purge(&self, retention: &dyn LogRetention, poll: &Poll) -> Result<bool> {
        let partitions = spread_partitions(&poll.id, poll.spread, self.deps.log.partitions());
        let mut tips = Vec::new();
        for partition in partitions {
            let Some(tip) = retention.poll_tip(&poll.id, partition).await? else {
                continue;
            };
            let counted = self.deps.warehouse.watermarks(partition).await?.lowest();
            if counted < tip {
                return Ok(false);
            }
            tips.push((partition, tip));
        }
        if poll.log_purged_at.is_none() && !self.mark(&poll.id).await? {
            return Ok(false);
        }
        for (partition, tip) in tips {
            let purged = retention.purge_poll(&poll.id, partition, tip).await?;
            metrics::counter!("tally_log_purged_votes_total").increment(purged);
            tracing::info!(partition, poll_id = %poll.id, votes = purged, through = tip, "a finished poll's votes left the log");
        }
        Ok(true)
    }

    /// Marks the poll `log_purged_at` in the registry if it is still due; `false` when it is
    /// not (reopened or moved since, or gone).
    async fn mark(&self, id: &str) -> Result<bool> {
        for _ in 0..5 {
            let Some(mut poll) = self.deps.registry.get(id).await? else {
                return Ok(false);
            };
            let now = time::now_ms();
            if poll.log_purged_at.is_some() {
                return Ok(true);
            }
            if !purge_due(&poll, now, self.grace) {
                return Ok(false);
            }
            poll.log_purged_at = Some(now);
            match self.deps.registry.update(&poll).await {
                Ok(marked) => {
                    self.polls.remember(marked);
                    return Ok(true);
                }
                Err(Error::Conflict(_)) => continue,
                Err(err) => return Err(err),
            }
        }
        Ok(false)
    }
}

/// Whether a poll's votes may leave the log: archived, closed for at least `grace`, or
/// already marked (a purge cut short by a stop).
pub(crate) fn purge_due(poll: &Poll, now_ms: i64, grace: Duration) -> bool {
    if poll.log_purged_at.is_some() {
        return true;
    }
    match poll.status(now_ms) {
        PollStatus::Archived => true,
        PollStatus::Closed => poll
            .closed_since(now_ms)
            .is_some_and(|ended| now_ms.saturating_sub(ended) >= grace.as_millis() as i64),
        PollStatus::Open | PollStatus::Scheduled => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll(json: &str) -> Poll {
        let new: tally_core::poll::NewPoll = serde_json::from_str(json).unwrap();
        new.into_poll(0, || "p".into()).unwrap()
    }

    #[test]
    fn a_poll_is_due_once_closed_for_the_grace() {
        let grace = Duration::from_secs(60);
        let mut p = poll(r#"{"title":"t","question":"q","kind":"nps"}"#);
        assert!(!purge_due(&p, 1_000_000, grace), "open");
        p.closed_at = Some(1_000_000);
        assert!(
            !purge_due(&p, 1_059_999, grace),
            "closed for less than the grace"
        );
        assert!(purge_due(&p, 1_060_000, grace));
        // Scheduled end: counted from it, and only once it passed.
        let mut p =
            poll(r#"{"title":"t","question":"q","kind":"nps","closes_at":"1970-01-01T00:20:00Z"}"#);
        assert!(!purge_due(&p, 1_000_000, grace), "still open");
        assert!(!purge_due(&p, 1_230_000, grace));
        assert!(purge_due(&p, 1_260_000, grace));
        p.closed_at = Some(1_100_000);
        assert!(
            !purge_due(&p, 1_150_000, grace),
            "the earlier of the two ends counts"
        );
        assert!(purge_due(&p, 1_160_000, grace));
    }

    #[test]
    fn archived_and_marked_polls_are_due_at_once() {
        let grace = Duration::from_secs(3600);
        let mut p = poll(r#"{"title":"t","question":"q","kind":"nps"}"#);
        p.archived_at = Some(5);
        assert!(purge_due(&p, 10, grace));
        let mut p = poll(r#"{"title":"t","question":"q","kind":"nps"}"#);
        p.log_purged_at = Some(5);
        assert!(purge_due(&p, 10, grace));
    }

    #[test]
    fn sweeps_come_often_enough_for_the_grace() {
        assert_eq!(sweep_interval(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(
            sweep_interval(Duration::from_secs(8)),
            Duration::from_secs(2)
        );
        assert_eq!(
            sweep_interval(Duration::from_secs(86_400)),
            Duration::from_secs(60)
        );
    }
}
