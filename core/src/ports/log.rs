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
/// sequence, while the same `vote_id` with another ballot is [`Appended::VoteIdConflict`].
/// Entries of one uniqueness key always land in the same partition ([`placement`]: a poll's
/// home partition, or one of several for a poll spread over them), which a reader sees in
/// sequence order.
#[async_trait]
pub trait VoteLog: Send + Sync + 'static {
    fn partitions(&self) -> u16;

    /// A poll's home partition: where all its votes go, unless they are spread. Stable for
    /// a given partition count.
    fn partition_of(&self, poll_id: &str) -> u16 {
        partition_of(poll_id, self.partitions())
    }

    /// The partition a vote of `poll_id` with this uniqueness key goes to ([`placement`]).
    fn placement(&self, poll_id: &str, unique_key: &str) -> u16 {
        placement(poll_id, unique_key, self.partitions())
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

/// Stable FNV-1a hash of the poll id, so every process maps a poll to the same partition:
/// its home partition.
pub fn partition_of(poll_id: &str, partitions: u16) -> u16 {
    (fnv1a(poll_id) % partitions.max(1) as u32) as u16
}

fn fnv1a(text: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in text.bytes() {
        hash ^= byte as u32;
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// The most partitions one poll's votes may be spread over.
pub const MAX_SPREAD: u16 = 64;

/// The uniqueness key of a vote of a poll whose votes are spread over `spread` partitions
/// of the log: `key` behind a prefix naming the spread (`~4~v…`), so the key alone says
/// which partition its vote goes to ([`placement`]) wherever it is read — appending, late
/// retries, the stream's shape check. With a spread of 1, the key as it is. The keys tally
/// makes never begin with `~` otherwise.
pub fn spread_key(spread: u16, key: &str) -> String {
    if spread <= 1 {
        key.to_owned()
    } else {
        format!("~{spread}~{key}")
    }
}

/// The spread a uniqueness key names ([`spread_key`]); 1 for a key without one.
pub fn spread_of(unique_key: &str) -> u16 {
    unique_key
        .strip_prefix('~')
        .and_then(|rest| rest.split_once('~'))
        .and_then(|(spread, _)| spread.parse::<u16>().ok())
        .unwrap_or(1)
        .max(1)
}

/// The partition a vote goes to, of `partitions`: its poll's home partition
/// ([`partition_of`]); for a poll spread over several (its uniqueness key says how many,
/// [`spread_key`]), one of that many partitions from the home one on, chosen by a hash of
/// the key. The same key always lands on the same partition (and subject), so the log
/// still holds one vote per voter; a spread beyond the partition count uses them all.
pub fn placement(poll_id: &str, unique_key: &str, partitions: u16) -> u16 {
    let partitions = partitions.max(1);
    let home = partition_of(poll_id, partitions);
    let spread = spread_of(unique_key).min(partitions);
    if spread <= 1 {
        return home;
    }
    let offset = fnv1a(unique_key) % u32::from(spread);
    ((u32::from(home) + offset) % u32::from(partitions)) as u16
}

/// The partitions a poll whose votes are spread over `spread` of `partitions` uses: its
/// home partition and the ones after it ([`placement`]).
pub fn spread_partitions(poll_id: &str, spread: u16, partitions: u16) -> Vec<u16> {
    let partitions = partitions.max(1);
    let home = partition_of(poll_id, partitions);
    (0..spread.clamp(1, partitions))
        .map(|i| ((u32::from(home) + u32::from(i)) % u32::from(partitions)) as u16)
        .collect()
}

/// Removing a finished poll's entries from a log whose every entry costs broker memory.
///
/// Guarantees: after [`LogRetention::purge_poll`] returns, the log holds no entry of the
/// poll in the partition up to its bound, and those entries' keys are free again — so only
/// a poll that can never take a vote again may be purged (its caller marks it so first),
/// and only once every entry is counted.
#[async_trait]
pub trait LogRetention: Send + Sync {
    /// The sequence of the poll's newest entry in `partition`; `None` when it holds none.
    async fn poll_tip(&self, poll_id: &str, partition: u16) -> Result<Option<u64>>;
    /// Removes the poll's entries in `partition` up to and including sequence `through`
    /// (one appended after the caller checked what is counted stays); answers how many it
    /// removed.
    async fn purge_poll(&self, poll_id: &str, partition: u16, through: u64) -> Result<u64>;
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

    /// A spread poll's keys go to its spread partitions, from its home one on, each key
    /// always to the same one, all of them used; an unspread poll's to its home partition.
    #[test]
    fn spread_keys_land_on_the_polls_spread_partitions() {
        let home = partition_of("hot", 8);
        for key in ["v1", "vabc", "i00ff", "t9"] {
            assert_eq!(placement("hot", key, 8), home, "{key}");
            assert_eq!(spread_of(key), 1);
        }
        let partitions = spread_partitions("hot", 4, 8);
        assert_eq!(partitions.len(), 4);
        assert_eq!(partitions[0], home);
        let mut used = std::collections::BTreeSet::new();
        for i in 0..400 {
            let key = spread_key(4, &format!("v{i}"));
            assert_eq!(spread_of(&key), 4);
            let at = placement("hot", &key, 8);
            assert_eq!(at, placement("hot", &key, 8));
            assert!(partitions.contains(&at), "{key} -> {at}");
            used.insert(at);
        }
        assert_eq!(used.len(), 4, "every spread partition takes votes");
        // More than there are: every partition, once.
        assert_eq!(spread_partitions("hot", 64, 3).len(), 3);
        assert!(placement("hot", &spread_key(64, "v1"), 3) < 3);
        assert_eq!(spread_key(1, "v1"), "v1");
        assert_eq!(spread_of("~x~v1"), 1, "an unreadable spread is none");
    }
}
