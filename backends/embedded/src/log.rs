//! The vote log on redb: one table keyed by `(partition, seq)` holds the encoded votes, one
//! keyed by `poll \0 unique_key` holds where each key's first vote is. Appends go through a
//! single writer thread that commits everything queued in one durable transaction (group
//! commit), so a burst of votes costs one fsync, not one each. While votes come side by
//! side it waits a moment for more to join a group ([`gather`]): single votes arrive one
//! request at a time, and each commit costs about the same whatever it holds.
//!
//! The uniqueness index is written in bulk. Voter keys are keyed hashes, so each new key
//! lands on a random leaf of the index's B-tree, and redb copies and writes every leaf a
//! transaction touches: written one group at a time, the index cost about one 4 KiB page
//! per vote once it outgrew a group (docs/BENCHMARKS.md, run of 2026-12-06 (5)). So an
//! append writes its key beside its entry, in `vote_log_keys` (keyed by the entry's
//! position, so in order), and the writer keeps the keys not yet in the index in memory.
//! Once [`MERGE_AT`] of them are pending, it writes them into the index in key order, a
//! sixteenth ([`MERGE_STEPS`]) after each group it commits (each slice a narrow range of keys,
//! so a few of the index's leaves, and a short pause for appends), then drops them from
//! `vote_log_keys`. A lookup asks the keys in memory, then the index. After a crash, the
//! keys of `vote_log_keys` are pending again, some perhaps in the index already, where
//! writing them again changes nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tally_core::ports::{Appended, LogEntry, LogReader, VoteLog};
use tally_core::vote::Vote;
use tally_core::{wire, Error, Result};
use tokio::sync::{mpsc, oneshot, watch};

pub(crate) const LOG: TableDefinition<(u16, u64), &[u8]> = TableDefinition::new("vote_log");
pub(crate) const UNIQUE: TableDefinition<&str, (u16, u64)> = TableDefinition::new("vote_unique");
/// The uniqueness key of each entry the index does not hold yet, by the entry's position.
const KEYS: TableDefinition<(u16, u64), &str> = TableDefinition::new("vote_log_keys");
const LOG_META: TableDefinition<&str, u64> = TableDefinition::new("vote_log_meta");

/// Appends one writer transaction takes at most.
const GROUP_MAX: usize = 4096;

/// How long the writer waits, by default, for more appends to join a group while votes come
/// side by side (see [`gather`]).
pub const GROUP_WAIT: Duration = Duration::from_millis(2);

/// A group this large is committed without waiting for more.
const GROUP_WAIT_UNTIL: usize = 256;

/// Keys pending (appended, not yet in the index) that make the writer merge them into it,
/// unless the store says otherwise (`TALLY_LOG_MERGE_AT`): ~130 bytes of memory each, ~25
/// MiB, plus the keys that come while a merge runs. The more go in at once, the fewer times
/// each of the index's leaves is written.
pub(crate) const MERGE_AT: usize = 200_000;

/// The steps a merge takes, one after each group commit, each a sixteenth of the keys it
/// began with (~12,500 by default).
const MERGE_STEPS: usize = 16;

/// The most keys that may wait for the index before appends are refused. A healthy writer
/// stays under it: at most `merge_at` plus a group wait when a merge begins, and each of the
/// merge's steps follows a group of at most [`GROUP_MAX`]. Only merges failing again and
/// again while commits succeed reach it, and then the log stops taking new votes (they are
/// refused as unavailable, so clients retry) instead of holding keys in memory without end.
fn pending_cap(merge_at: usize) -> usize {
    2 * (merge_at + (MERGE_STEPS + 1) * GROUP_MAX)
}

/// The uniqueness keys appended but not yet (all) in the index, with where each one's
/// entry is: the writer's, shared with [`VoteLog::find`].
#[derive(Default)]
struct Unindexed {
    pending: HashMap<String, (u16, u64)>,
    /// A merge under way: its keys in key order, the first `merged` of them in the index.
    merging: Vec<(String, (u16, u64))>,
    merged: usize,
}

impl Unindexed {
    fn get(&self, key: &str) -> Option<(u16, u64)> {
        self.pending.get(key).copied().or_else(|| {
            self.merging
                .binary_search_by(|(held, _)| held.as_str().cmp(key))
                .ok()
                .map(|at| self.merging[at].1)
        })
    }
}

type Pending = Arc<Mutex<Unindexed>>;

fn storage(err: impl Into<tally_core::error::BoxError>) -> Error {
    Error::unavailable("embedded vote log", err)
}

struct AppendRequest {
    partition: u16,
    unique: String,
    payload: Vec<u8>,
    reply: oneshot::Sender<Result<Appended>>,
    /// When it was handed to the writer: how long it has waited already (see [`gather`]).
    queued: Instant,
}

/// The embedded [`VoteLog`].
pub struct EmbeddedLog {
    db: Arc<Database>,
    partitions: u16,
    appends: mpsc::Sender<AppendRequest>,
    /// The newest sequence of each partition, for readers waiting on new entries.
    tips: Arc<Vec<watch::Sender<u64>>>,
    pending: Pending,
}

impl EmbeddedLog {
    /// Opens the log in `db`; it merges pending keys into its index once `merge_at` are
    /// (0: [`MERGE_AT`]), and waits up to `group_wait` for appends to join a group (see
    /// [`gather`]; zero never waits).
    pub(crate) fn open(
        db: Arc<Database>,
        partitions: u16,
        merge_at: usize,
        group_wait: Duration,
    ) -> Result<EmbeddedLog> {
        let partitions = partitions.max(1);
        let merge_at = if merge_at == 0 { MERGE_AT } else { merge_at };
        let txn = db.begin_write().map_err(storage)?;
        {
            txn.open_table(LOG).map_err(storage)?;
            txn.open_table(UNIQUE).map_err(storage)?;
            txn.open_table(KEYS).map_err(storage)?;
            // A poll's partition depends on the count: a store keeps the count it began with.
            let mut meta = txn.open_table(LOG_META).map_err(storage)?;
            let stored = meta
                .get("partitions")
                .map_err(storage)?
                .map(|guard| guard.value());
            match stored {
                Some(count) if count != u64::from(partitions) => {
                    return Err(Error::failed(
                        "embedded vote log",
                        format!(
                            "this data directory's vote log has {count} partitions; start with --partitions {count} (TALLY_PARTITIONS={count})"
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    meta.insert("partitions", u64::from(partitions))
                        .map_err(storage)?;
                }
            }
        }
        txn.commit().map_err(storage)?;

        let read = db.begin_read().map_err(storage)?;
        let log = read.open_table(LOG).map_err(storage)?;
        let mut tips = Vec::new();
        for partition in 0..partitions {
            let last = log
                .range((partition, 0)..=(partition, u64::MAX))
                .map_err(storage)?
                .next_back()
                .transpose()
                .map_err(storage)?
                .map(|(key, _)| key.value().1)
                .unwrap_or(0);
            tips.push(watch::Sender::new(last));
        }
        drop(log);
        // The keys appended after the last merge (or before a crash) are pending again.
        let mut pending = Unindexed::default();
        for item in read
            .open_table(KEYS)
            .map_err(storage)?
            .iter()
            .map_err(storage)?
        {
            let (at, key) = item.map_err(storage)?;
            pending.pending.insert(key.value().to_owned(), at.value());
        }
        drop(read);
        if !pending.pending.is_empty() {
            tracing::info!(
                keys = pending.pending.len(),
                "vote log: read back the voters' keys not yet in its uniqueness index"
            );
        }

        let tips = Arc::new(tips);
        let pending: Pending = Arc::new(Mutex::new(pending));
        let (appends, queue) = mpsc::channel(GROUP_MAX * 4);
        let writer = Writer {
            db: Arc::downgrade(&db),
            tips: tips.clone(),
            pending: pending.clone(),
            merge_at,
            group_wait,
        };
        std::thread::Builder::new()
            .name("tally-log-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(storage)?;
        Ok(EmbeddedLog {
            db,
            partitions,
            appends,
            tips,
            pending,
        })
    }
}

impl EmbeddedLog {
    /// The newest sequence appended to `partition` (0 when it is empty).
    pub fn tip(&self, partition: u16) -> u64 {
        self.tips
            .get(usize::from(partition))
            .map(|tip| *tip.borrow())
            .unwrap_or(0)
    }
}

struct Writer {
    /// Weak, so the store closes when its last user drops it: redb marks the file clean
    /// only when its `Database` is dropped, and a process that ends while this thread still
    /// held it left the file to be repaired (every page read and checked) at the next start.
    db: Weak<Database>,
    tips: Arc<Vec<watch::Sender<u64>>>,
    pending: Pending,
    merge_at: usize,
    group_wait: Duration,
}

/// Completes a group begun by one append: takes every append queued, and when the last
/// group held more than one (appends come side by side) and this one is still under
/// [`GROUP_WAIT_UNTIL`], `pause`s once, until the group's oldest append has waited `wait`
/// since it was queued (as of `now`), and takes what came meanwhile. A commit costs about
/// the same for one vote as for a hundred (redb's pages and the fsync), so under a steady
/// stream of single votes this is a fraction of the CPU per vote for at most `wait` more
/// latency. The time an append spent queued behind the commit before counts: under a
/// flat-out stream it has waited that long already, and the writer does not add a whole
/// `wait` to every commit's time. An append that comes alone is never held.
fn gather(
    queue: &mut mpsc::Receiver<AppendRequest>,
    group: &mut Vec<AppendRequest>,
    last: usize,
    wait: Duration,
    now: Instant,
    pause: impl FnOnce(Duration),
) {
    let take_queued = |queue: &mut mpsc::Receiver<AppendRequest>, group: &mut Vec<_>| {
        while group.len() < GROUP_MAX {
            match queue.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
    };
    take_queued(queue, group);
    if wait.is_zero() || last <= 1 || group.len() >= GROUP_WAIT_UNTIL {
        return;
    }
    let waited = group.first().map_or(Duration::ZERO, |oldest| {
        now.saturating_duration_since(oldest.queued)
    });
    if let Some(rest) = wait.checked_sub(waited).filter(|rest| !rest.is_zero()) {
        pause(rest);
        take_queued(queue, group);
    }
}

impl Writer {
    fn run(self, mut queue: mpsc::Receiver<AppendRequest>) {
        let mut group = Vec::with_capacity(GROUP_MAX);
        let mut last = 0;
        while let Some(first) = queue.blocking_recv() {
            group.push(first);
            gather(
                &mut queue,
                &mut group,
                last,
                self.group_wait,
                Instant::now(),
                std::thread::sleep,
            );
            last = group.len();
            match self.commit(&group) {
                Ok(outcomes) => {
                    for (request, outcome) in group.drain(..).zip(outcomes) {
                        let _ = request.reply.send(Ok(outcome));
                    }
                }
                Err(err) => {
                    tracing::error!(error = %err.chain(), "vote log commit failed");
                    for request in group.drain(..) {
                        let _ = request.reply.send(Err(storage(err.chain().to_string())));
                    }
                }
            }
            if let Err(err) = self.merge_step() {
                // Nothing is lost: the keys stay where lookups find them, and the next group
                // tries again.
                tracing::error!(error = %err.chain(), "merging keys into the vote log's index failed");
            }
        }
    }

    /// Writes the next slice of a merge into the index, beginning one when enough keys are
    /// pending. Not durable on its own: the next group's commit makes it so, and a crash
    /// before that finds the keys still in `vote_log_keys`. Holds the keys in memory
    /// throughout, so a lookup that misses them finds them in the index.
    fn merge_step(&self) -> Result<()> {
        let mut unindexed = self.pending.lock().expect("pending keys");
        if unindexed.merging.is_empty() {
            if unindexed.pending.len() < self.merge_at {
                return Ok(());
            }
            let mut keys: Vec<(String, (u16, u64))> = unindexed.pending.drain().collect();
            keys.sort_unstable();
            unindexed.merging = keys;
            unindexed.merged = 0;
        }
        let db = self
            .db
            .upgrade()
            .ok_or_else(|| storage("the store is closed"))?;
        let started = std::time::Instant::now();
        let from = unindexed.merged;
        let to =
            (from + unindexed.merging.len().div_ceil(MERGE_STEPS)).min(unindexed.merging.len());
        let last = to == unindexed.merging.len();
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::None).map_err(storage)?;
        {
            let mut unique = txn.open_table(UNIQUE).map_err(storage)?;
            for (key, at) in &unindexed.merging[from..to] {
                unique.insert(key.as_str(), *at).map_err(storage)?;
            }
            if last {
                // Every key appended before the merge began is in the index now. They were
                // all of `vote_log_keys` then, and every key appended since is further on
                // in its partition: what goes is each partition up to the run's last key.
                let mut through: HashMap<u16, u64> = HashMap::new();
                for (_, (partition, seq)) in &unindexed.merging {
                    let newest = through.entry(*partition).or_default();
                    *newest = (*newest).max(*seq);
                }
                let mut positions = txn.open_table(KEYS).map_err(storage)?;
                for (partition, seq) in through {
                    positions
                        .retain_in((partition, 0)..=(partition, seq), |_, _| false)
                        .map_err(storage)?;
                }
            }
        }
        txn.commit().map_err(storage)?;
        unindexed.merged = to;
        if last {
            unindexed.merging = Vec::new();
            unindexed.merged = 0;
        }
        tracing::debug!(
            keys = to - from,
            last,
            ms = started.elapsed().as_millis() as u64,
            "merged uniqueness keys into the vote log's index"
        );
        Ok(())
    }

    /// Applies a group in one durable transaction; returns each request's outcome.
    fn commit(&self, group: &[AppendRequest]) -> Result<Vec<Appended>> {
        let db = self
            .db
            .upgrade()
            .ok_or_else(|| storage("the store is closed"))?;
        // Held through the commit: a lookup that misses a key of this group then finds it.
        let mut unindexed = self.pending.lock().expect("pending keys");
        let waiting = unindexed.pending.len() + unindexed.merging.len() - unindexed.merged;
        if waiting >= pending_cap(self.merge_at) {
            return Err(storage(format!(
                "{waiting} voters' keys wait for the uniqueness index, which is not being written (see the errors before this one); no vote is taken until it is"
            )));
        }
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        let mut outcomes = Vec::with_capacity(group.len());
        let mut tips: Vec<u64> = self.tips.iter().map(|tip| *tip.borrow()).collect();
        // The keys this group adds, pending once it is committed.
        let mut added: HashMap<&str, (u16, u64)> = HashMap::new();
        {
            let mut log = txn.open_table(LOG).map_err(storage)?;
            let unique = txn.open_table(UNIQUE).map_err(storage)?;
            let mut positions = txn.open_table(KEYS).map_err(storage)?;
            for request in group {
                let key = request.unique.as_str();
                let held = match unindexed.get(key).or_else(|| added.get(key).copied()) {
                    Some(at) => Some(at),
                    None => unique.get(key).map_err(storage)?.map(|guard| guard.value()),
                };
                let outcome = match held {
                    Some(at) => {
                        let stored = log.get(at).map_err(storage)?.ok_or_else(|| {
                            Error::corrupt("embedded vote log", format!("entry {at:?} missing"))
                        })?;
                        let original = wire::decode(stored.value())?;
                        // Decoded only here: a taken key is the rare case.
                        let vote = wire::decode(&request.payload)?;
                        Appended::for_taken_key(&original, &vote, at.1)
                    }
                    None => {
                        let partition = request.partition as usize;
                        let seq = tips[partition] + 1;
                        let at = (request.partition, seq);
                        log.insert(at, request.payload.as_slice())
                            .map_err(storage)?;
                        positions.insert(at, key).map_err(storage)?;
                        added.insert(key, at);
                        tips[partition] = seq;
                        Appended::Accepted {
                            seq,
                            duplicate: false,
                        }
                    }
                };
                outcomes.push(outcome);
            }
        }
        txn.commit().map_err(storage)?;
        unindexed
            .pending
            .extend(added.into_iter().map(|(key, at)| (key.to_owned(), at)));
        drop(unindexed);
        for (tip, seq) in self.tips.iter().zip(tips) {
            tip.send_if_modified(|current| {
                let moved = *current != seq;
                *current = seq;
                moved
            });
        }
        Ok(outcomes)
    }
}

impl EmbeddedLog {
    /// Hands one vote to the writer; the receiver gets its answer once committed.
    async fn send(&self, vote: &Vote, unique: &str) -> Result<oneshot::Receiver<Result<Appended>>> {
        let (reply, outcome) = oneshot::channel();
        let request = AppendRequest {
            partition: self.placement(&vote.poll_id, unique),
            unique: unique_key(&vote.poll_id, unique),
            payload: wire::encode(vote),
            reply,
            queued: Instant::now(),
        };
        self.appends
            .send(request)
            .await
            .map_err(|_| storage("the writer has stopped"))?;
        Ok(outcome)
    }
}

/// The key of the uniqueness table: poll ids cannot hold a NUL.
fn unique_key(poll_id: &str, unique_key: &str) -> String {
    format!("{poll_id}\0{unique_key}")
}

#[async_trait]
impl VoteLog for EmbeddedLog {
    fn partitions(&self) -> u16 {
        self.partitions
    }

    async fn append(&self, vote: &Vote, unique: &str) -> Result<Appended> {
        self.send(vote, unique)
            .await?
            .await
            .map_err(|_| storage("the writer has stopped"))?
    }

    /// Queues every vote for the writer before waiting for any answer, so a batch lands in
    /// as few group commits as the writer makes of it.
    async fn append_many(&self, votes: &[(Vote, String)]) -> Vec<Result<Appended>> {
        let mut queued = Vec::with_capacity(votes.len());
        for (vote, unique) in votes {
            queued.push(self.send(vote, unique).await);
        }
        let mut answers = Vec::with_capacity(votes.len());
        for outcome in queued {
            answers.push(match outcome {
                Ok(outcome) => outcome
                    .await
                    .unwrap_or_else(|_| Err(storage("the writer has stopped"))),
                Err(err) => Err(err),
            });
        }
        answers
    }

    async fn find(&self, vote: &Vote, unique: &str) -> Result<Option<Appended>> {
        let db = self.db.clone();
        let pending = self.pending.clone();
        let key = unique_key(&vote.poll_id, unique);
        let vote = vote.clone();
        tokio::task::spawn_blocking(move || {
            // The pending keys first: a key leaves them only once the index holds it.
            let pending_at = pending.lock().expect("pending keys").get(&key);
            let read = db.begin_read().map_err(storage)?;
            let held = match pending_at {
                Some(at) => Some(at),
                None => read
                    .open_table(UNIQUE)
                    .map_err(storage)?
                    .get(key.as_str())
                    .map_err(storage)?
                    .map(|guard| guard.value()),
            };
            let Some(at) = held else {
                return Ok(None);
            };
            let log = read.open_table(LOG).map_err(storage)?;
            let stored = log.get(at).map_err(storage)?.ok_or_else(|| {
                Error::corrupt("embedded vote log", format!("entry {at:?} missing"))
            })?;
            let original = wire::decode(stored.value())?;
            Ok(Some(Appended::for_taken_key(&original, &vote, at.1)))
        })
        .await
        .map_err(storage)?
    }

    async fn reader(&self, partition: u16, after: u64) -> Result<Box<dyn LogReader>> {
        let tip = self
            .tips
            .get(partition as usize)
            .ok_or_else(|| storage(format!("no partition {partition}")))?
            .subscribe();
        Ok(Box::new(EmbeddedReader {
            db: self.db.clone(),
            partition,
            after,
            tip,
            fill_wait: READ_FILL_WAIT,
        }))
    }

    async fn check(&self) -> Result<()> {
        if self.appends.is_closed() {
            return Err(storage("the writer has stopped"));
        }
        Ok(())
    }
}

/// A reader's batch that holds fewer entries than this (or than the caller's most) waits up
/// to [`READ_FILL_WAIT`] for more. The processor's cost is mostly per batch (decoding, the
/// window aggregation, a warehouse insert, a live update), and single votes reach the log
/// a group commit at a time; so up to 20 ms more before live totals move buys a fifth less
/// of standalone's CPU per vote at 5,000 votes/s (docs/BENCHMARKS.md, run of 2026-12-06 (7)).
const READ_FILL: usize = 1024;
const READ_FILL_WAIT: Duration = Duration::from_millis(20);

struct EmbeddedReader {
    db: Arc<Database>,
    partition: u16,
    after: u64,
    tip: watch::Receiver<u64>,
    /// How long a batch short of a full one waits for more ([`READ_FILL_WAIT`]).
    fill_wait: Duration,
}

#[async_trait]
impl LogReader for EmbeddedReader {
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<LogEntry>> {
        let after = self.after;
        if *self.tip.borrow_and_update() <= after {
            let _ = tokio::time::timeout(wait, self.tip.wait_for(|tip| *tip > after)).await;
            if *self.tip.borrow() <= after {
                return Ok(Vec::new());
            }
        }
        // Entries came, but fewer than a full batch: give more a moment to join them.
        let fill = after + (max.clamp(1, READ_FILL) as u64);
        if *self.tip.borrow() < fill {
            let _ =
                tokio::time::timeout(self.fill_wait, self.tip.wait_for(|tip| *tip >= fill)).await;
        }
        let (db, partition) = (self.db.clone(), self.partition);
        let entries = tokio::task::spawn_blocking(move || -> Result<Vec<LogEntry>> {
            let read = db.begin_read().map_err(storage)?;
            let log = read.open_table(LOG).map_err(storage)?;
            let mut entries = Vec::new();
            for item in log
                .range((partition, after + 1)..=(partition, u64::MAX))
                .map_err(storage)?
                .take(max.max(1))
            {
                let (key, value) = item.map_err(storage)?;
                entries.push(LogEntry {
                    seq: key.value().1,
                    payload: Bytes::copy_from_slice(value.value()),
                });
            }
            Ok(entries)
        })
        .await
        .map_err(storage)??;
        if let Some(last) = entries.last() {
            self.after = last.seq;
        }
        Ok(entries)
    }

    /// Nothing to do: the log keeps every entry (its uniqueness index needs them) and the
    /// processor resumes from the warehouse's watermark.
    async fn pending(&mut self) -> Result<u64> {
        Ok(self.tip.borrow().saturating_sub(self.after))
    }

    async fn commit(&mut self, _seq: u64) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(unique: &str) -> (AppendRequest, oneshot::Receiver<Result<Appended>>) {
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest {
            partition: 0,
            unique: unique.to_owned(),
            payload: b"entry".to_vec(),
            reply,
            queued: Instant::now(),
        };
        (request, answer)
    }

    /// A queue holding `count` appends.
    fn queued(
        count: usize,
    ) -> (
        mpsc::Sender<AppendRequest>,
        mpsc::Receiver<AppendRequest>,
        Vec<oneshot::Receiver<Result<Appended>>>,
    ) {
        let (appends, queue) = mpsc::channel(GROUP_MAX * 4);
        let answers = (0..count)
            .map(|i| {
                let (request, answer) = request(&format!("k{i}"));
                appends.try_send(request).unwrap();
                answer
            })
            .collect();
        (appends, queue, answers)
    }

    /// A group takes what is queued; it waits once for more only while appends come side
    /// by side (the last group held several) and it is still small.
    #[test]
    fn a_group_waits_for_more_appends_only_while_they_come_side_by_side() {
        let wait = Duration::from_millis(2);
        // Side by side: the pause is taken, and what came during it joins the group. The
        // clock is read before the appends are queued: they have not waited yet.
        let before = Instant::now();
        let (appends, mut queue, _answers) = queued(3);
        let mut group = Vec::new();
        let mut paused = None;
        gather(&mut queue, &mut group, 5, wait, before, |pause| {
            paused = Some(pause);
            for i in 0..4 {
                appends.try_send(request(&format!("late{i}")).0).unwrap();
            }
        });
        assert_eq!(paused, Some(wait));
        assert_eq!(group.len(), 7);
        assert_eq!(group[6].unique, "late3");

        // The time the oldest append spent queued counts: it is held only for the rest of
        // the wait, and not at all once it has waited the whole of it.
        let group_of_two = || {
            let (appends, queue, _answers) = queued(0);
            let oldest = request("oldest").0;
            let queued_at = oldest.queued;
            appends.try_send(oldest).unwrap();
            appends.try_send(request("next").0).unwrap();
            (appends, queue, queued_at)
        };
        let (_appends, mut queue, queued_at) = group_of_two();
        let mut group = Vec::new();
        let mut paused = None;
        let now = queued_at + Duration::from_micros(1500);
        gather(&mut queue, &mut group, 5, wait, now, |pause| {
            paused = Some(pause)
        });
        assert_eq!(paused, Some(Duration::from_micros(500)));
        assert_eq!(group.len(), 2);

        let (_appends, mut queue, queued_at) = group_of_two();
        let mut group = Vec::new();
        gather(&mut queue, &mut group, 5, wait, queued_at + wait, |pause| {
            panic!("paused {pause:?} for an append that has waited {wait:?} already")
        });
        assert_eq!(group.len(), 2);

        // After a group of one (a vote that came alone), and with no wait set: no pause.
        for (last, wait) in [(1, wait), (0, wait), (5, Duration::ZERO)] {
            let (_appends, mut queue, _answers) = queued(3);
            let mut group = Vec::new();
            gather(&mut queue, &mut group, last, wait, before, |_| {
                panic!("paused after a group of {last}, wait {wait:?}")
            });
            assert_eq!(group.len(), 3);
        }

        // A group already large enough is committed at once.
        let (_appends, mut queue, _answers) = queued(GROUP_WAIT_UNTIL);
        let mut group = Vec::new();
        gather(&mut queue, &mut group, 5, wait, before, |_| {
            panic!("paused with a full group")
        });
        assert_eq!(group.len(), GROUP_WAIT_UNTIL);

        // Never more than a transaction takes, waiting or not.
        let (appends, mut queue, _answers) = queued(GROUP_MAX + 10);
        let mut group = Vec::new();
        gather(&mut queue, &mut group, 5, wait, before, |_| unreachable!());
        assert_eq!(group.len(), GROUP_MAX);
        drop(appends);
    }

    /// A reader that finds fewer entries than a batch holds waits for more to join them,
    /// and returns at once when the batch is full.
    #[tokio::test]
    async fn a_short_batch_waits_for_entries_to_fill_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("log.redb")).unwrap());
        let append = |seqs: std::ops::RangeInclusive<u64>| {
            let txn = db.begin_write().unwrap();
            {
                let mut log = txn.open_table(LOG).unwrap();
                for seq in seqs {
                    log.insert((0, seq), b"entry".as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        };
        let tip = watch::Sender::new(0);
        let mut reader = EmbeddedReader {
            db: db.clone(),
            partition: 0,
            after: 0,
            tip: tip.subscribe(),
            // So long that only a full batch can end the wait.
            fill_wait: Duration::from_secs(3600),
        };

        append(1..=1);
        tip.send_replace(1);
        let wait = Duration::from_secs(30);
        {
            let mut batch = std::pin::pin!(reader.next_batch(3, wait));
            assert!(
                tokio::time::timeout(Duration::from_millis(100), &mut batch)
                    .await
                    .is_err(),
                "a batch of one of three was read without waiting for more"
            );
            append(2..=2);
            tip.send_replace(2);
            append(3..=4);
            tip.send_replace(4);
            let entries = tokio::time::timeout(wait, batch).await.unwrap().unwrap();
            let seqs: Vec<u64> = entries.iter().map(|entry| entry.seq).collect();
            assert_eq!(seqs, [1, 2, 3]);
        }
        // One entry is left, and the most asked for is one: a full batch, read at once.
        let entries = tokio::time::timeout(wait, reader.next_batch(1, wait))
            .await
            .expect("a full batch waited")
            .unwrap();
        assert_eq!(entries[0].seq, 4);
    }

    /// Keys that pile up while merges fail stop the log taking votes, until merges succeed.
    #[test]
    fn keys_that_cannot_be_indexed_stop_appends_until_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("log.redb")).unwrap());
        let merge_at = 1;
        let cap = pending_cap(merge_at);
        let writer = Writer {
            db: Arc::downgrade(&db),
            tips: Arc::new(vec![watch::Sender::new(0)]),
            pending: Pending::default(),
            merge_at,
            group_wait: Duration::ZERO,
        };
        {
            let txn = db.begin_write().unwrap();
            txn.open_table(LOG).unwrap();
            txn.open_table(UNIQUE).unwrap();
            txn.open_table(KEYS).unwrap();
            txn.commit().unwrap();
        }
        // As merges that failed again and again would leave it: one key short of the cap.
        writer.pending.lock().unwrap().pending = (0..cap as u64 - 1)
            .map(|i| (format!("k{i}"), (0, i + 1)))
            .collect();
        writer.tips[0].send_replace(cap as u64 - 1);

        let (last, _) = request("last-taken");
        assert!(writer.commit(std::slice::from_ref(&last)).is_ok());
        let (refused, _) = request("refused");
        let error = writer.commit(&[refused]).unwrap_err().chain().to_string();
        assert!(
            error.contains(&format!("{cap} voters' keys wait")),
            "{error}"
        );
        assert_eq!(writer.tips[0].borrow().to_owned(), cap as u64);

        // Once merges succeed again the waiting keys drain and appends are taken.
        writer.merge_step().unwrap();
        while !writer.pending.lock().unwrap().merging.is_empty() {
            writer.merge_step().unwrap();
        }
        let (again, _) = request("refused");
        assert!(writer.commit(&[again]).is_ok());
        assert_eq!(writer.tips[0].borrow().to_owned(), cap as u64 + 1);
    }
}
