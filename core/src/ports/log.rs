use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::vote::Vote;
use crate::Result;

/// The answer of [`VoteLog::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// The vote is durable at `seq`. `duplicate` says the same vote (same vote_id) was
    /// already there and this call changed nothing.
    Accepted { seq: u64, duplicate: bool },
    /// Another vote already holds this uniqueness key: the voter has voted.
    AlreadyVoted,
    /// The log holds a vote with this vote id and this uniqueness key, but another ballot
    /// (another choice or segment): the id was reused, and this vote was not stored.
    VoteIdConflict,
}

impl Appended {
    /// The answer for `vote` when its uniqueness key already holds `existing` at `seq`: the
    /// original entry for a retry of the same ballot under the same vote id, a conflict for
    /// the same id with another ballot, and otherwise the voter has voted.
    pub fn for_taken_key(existing: &Vote, vote: &Vote, seq: u64) -> Appended {
        if existing.vote_id != vote.vote_id {
            Appended::AlreadyVoted
        } else if existing.same_ballot(vote) {
            Appended::Accepted {
                seq,
                duplicate: true,
            }
        } else {
            Appended::VoteIdConflict
        }
    }
}

/// One entry of a partition of the log, in log order.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// Position in the log; strictly increasing within a partition, never reused.
    pub seq: u64,
    pub payload: Bytes,
}

/// The durable, ordered vote log.
///
/// Guarantees: `append` resolves `Accepted` only once the vote is durable; the log holds at
/// most one entry per `(poll, unique_key)` — the first one — and a repeat of the same
/// `vote_id` with the same ballot ([`Vote::same_ballot`]) resolves to the original entry's
/// sequence, while the same `vote_id` with another ballot is [`Appended::VoteIdConflict`]. Entries of one poll always land in
/// the same partition, which a reader sees in sequence order.
#[async_trait]
pub trait VoteLog: Send + Sync + 'static {
    fn partitions(&self) -> u16;

    /// The partition a poll's votes go to. Stable for a given partition count.
    fn partition_of(&self, poll_id: &str) -> u16 {
        partition_of(poll_id, self.partitions())
    }

    async fn append(&self, vote: &Vote, unique_key: &str) -> Result<Appended>;

    /// Appends many votes, each `(vote, unique_key)` on its own terms: the answers are
    /// [`VoteLog::append`]'s, in the order of `votes`, and one vote's failure does not stop
    /// the others. A log may send them together; by default they are appended
    /// [`APPEND_MANY_IN_FLIGHT`] at a time.
    async fn append_many(&self, votes: &[(Vote, String)]) -> Vec<Result<Appended>> {
        use futures::StreamExt;
        let mut answers = Vec::with_capacity(votes.len());
        let mut in_flight = futures::stream::FuturesOrdered::new();
        for (vote, unique_key) in votes {
            if in_flight.len() >= APPEND_MANY_IN_FLIGHT {
                answers.extend(in_flight.next().await);
            }
            in_flight.push_back(self.append(vote, unique_key));
        }
        while let Some(answer) = in_flight.next().await {
            answers.push(answer);
        }
        answers
    }

    /// What the log holds under `(vote.poll_id, unique_key)`, appending nothing: `None` when
    /// the key is free (or its poll's entries were purged), otherwise the answer
    /// [`VoteLog::append`] would give ([`Appended::for_taken_key`]). A late retry on a poll
    /// that no longer takes votes is answered from it.
    async fn find(&self, vote: &Vote, unique_key: &str) -> Result<Option<Appended>>;

    /// How this log lets go of finished polls; `None` for a log that keeps every entry (the
    /// embedded one: its entries live on disk, not in a broker's memory).
    fn retention(&self) -> Option<&dyn LogRetention> {
        None
    }

    /// Reads a partition from the entry after `after` (0 = from the start).
    async fn reader(&self, partition: u16, after: u64) -> Result<Box<dyn LogReader>>;

    /// Ok when the log is reachable.
    async fn check(&self) -> Result<()>;
}

/// How many appends the default [`VoteLog::append_many`] keeps in flight.
pub const APPEND_MANY_IN_FLIGHT: usize = 512;

/// Stable FNV-1a hash of the poll id, so every process maps a poll to the same partition.
pub fn partition_of(poll_id: &str, partitions: u16) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in poll_id.bytes() {
        hash ^= byte as u32;
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % partitions.max(1) as u32) as u16
}

/// Removing a finished poll's entries from a log whose every entry costs broker memory.
///
/// Guarantees: after [`LogRetention::purge_poll`] returns, the log holds no entry of the
/// poll up to its bound, and those entries' keys are free again — so only a poll that can never take a vote
/// again may be purged (its caller marks it so first), and only once every entry is counted.
#[async_trait]
pub trait LogRetention: Send + Sync {
    /// The sequence of the poll's newest entry; `None` when the log holds none.
    async fn poll_tip(&self, poll_id: &str) -> Result<Option<u64>>;
    /// Removes the poll's entries up to and including sequence `through` (one appended
    /// after the caller checked what is counted stays); answers how many it removed.
    async fn purge_poll(&self, poll_id: &str, through: u64) -> Result<u64>;
}

#[async_trait]
pub trait LogReader: Send {
    /// Waits up to `wait` for entries and returns up to `max` of them in sequence order
    /// (empty when none came). Once entries have come, a reader may gather a little longer
    /// (each log says how long, tens of milliseconds at most) so that batches grow with the
    /// load: a batch costs the processor about the same for ten entries as for a thousand.
    /// After an error, calling again resumes where it stood.
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<LogEntry>>;

    /// Tells the log everything up to `seq` is processed. An optimisation: after a restart
    /// the caller resumes from its own watermark, not from what was committed here.
    async fn commit(&mut self, seq: u64) -> Result<()>;

    /// Entries of the partition after the last one committed: how far processing is behind
    /// the log's tip (an operator's lag gauge; not used for correctness).
    async fn pending(&mut self) -> Result<u64>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_in_range() {
        assert_eq!(partition_of("spring-launch", 1), 0);
        let p = partition_of("spring-launch", 8);
        assert!(p < 8);
        assert_eq!(p, partition_of("spring-launch", 8));
    }
}
