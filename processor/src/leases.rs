//! Partition ownership when several processors share the log: each claims a fair share of
//! the partitions through [`PartitionLeases`], runs a worker for each one it holds, and
//! hands them over when it stops or when a new processor joins.
//!
//! A tick every fifth of the lease ttl: announce this processor, renew what it holds (a
//! lease found lost stops its worker at once, without another write), give up what is over
//! its share (the worker finishes its batch and writes its rollups first, then the lease is
//! released), and claim free partitions up to its share. A claimed partition's worker
//! fences the warehouse with the claim's epoch before it reads the watermarks, so a
//! previous owner that was paused rather than dead cannot write it again (see
//! [`tally_core::ports::Warehouse::fence`]). A dead processor's partitions are free once
//! its leases expire: within one ttl and one tick.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tally_core::ports::PartitionLeases;
use tally_service::tasks::CancellationToken;
use tally_service::PollCache;
use tokio::task::JoinHandle;

use crate::partition::Partition;
use crate::windows::WindowEngine;
use crate::{Config, Deps, SHUTDOWN_GRACE};

struct Worker {
    epoch: u64,
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

pub(crate) struct Coordinator {
    pub(crate) leases: Arc<dyn PartitionLeases>,
    pub(crate) member: String,
    pub(crate) partitions: u16,
    pub(crate) deps: Deps,
    pub(crate) config: Config,
    pub(crate) polls: Arc<PollCache>,
    pub(crate) engine: WindowEngine,
}

/// How many of `partitions` the member at `rank` among `members` should hold: an equal
/// share, the first `partitions % members` members one more.
pub(crate) fn fair_share(partitions: u16, members: usize, rank: usize) -> usize {
    let members = members.max(1);
    let partitions = usize::from(partitions);
    partitions / members + usize::from(rank < partitions % members)
}

impl Coordinator {
    pub(crate) async fn run(self, cancel: CancellationToken) {
        let tick = (self.leases.ttl() / 5).max(Duration::from_millis(200));
        let mut workers: BTreeMap<u16, Worker> = BTreeMap::new();
        // Leases being handed over: their workers are finishing; released after.
        let mut releasing: BTreeMap<u16, JoinHandle<()>> = BTreeMap::new();
        tracing::info!(
            member = %self.member,
            partitions = self.partitions,
            ttl_ms = self.leases.ttl().as_millis() as u64,
            "sharing partitions through leases"
        );
        loop {
            releasing.retain(|_, handle| !handle.is_finished());
            self.reap(&mut workers).await;
            // Bounded: a store that stops answering must not stall the renewals for good.
            let heartbeat =
                tokio::time::timeout(self.leases.ttl(), self.leases.heartbeat(&self.member))
                    .await
                    .unwrap_or_else(|_| {
                        Err(tally_core::Error::unavailable(
                            "partition leases",
                            "no answer within a lease",
                        ))
                    });
            match heartbeat {
                Ok(members) => {
                    self.renew(&mut workers).await;
                    let rank = members
                        .iter()
                        .position(|m| *m == self.member)
                        .unwrap_or(members.len());
                    let share = fair_share(self.partitions, members.len().max(rank + 1), rank);
                    if workers.len() > share {
                        self.hand_over(&mut workers, &mut releasing, share);
                    } else if workers.len() < share {
                        self.claim(&mut workers, &releasing, share, rank, members.len())
                            .await;
                    }
                    metrics::gauge!("tally_processor_partitions_owned").set(workers.len() as f64);
                }
                Err(err) => {
                    // The store cannot be reached: keep working; if the leases expire
                    // meanwhile, the warehouse's fence stops these workers' writes.
                    tracing::warn!(member = %self.member, error = %err.chain(), "partition leases unavailable");
                }
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(tick) => {}
            }
        }
        // Stopping: every worker finishes its batch and writes its rollups, then the leases
        // go back so the others take the partitions at once.
        // One grace for all of them: a worker still writing at the end keeps its lease,
        // which expires (the fence covers the rest).
        for worker in workers.values() {
            worker.stop.cancel();
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        let this = &self;
        let stopping = workers.into_iter().map(|(partition, worker)| async move {
            if tokio::time::timeout_at(deadline, worker.handle)
                .await
                .is_ok()
            {
                this.release(partition).await;
            }
        });
        futures::future::join_all(stopping).await;
        for (_, handle) in releasing {
            let _ = tokio::time::timeout_at(deadline, handle).await;
        }
    }

    /// A worker that ended by itself was fenced out by a newer owner: its lease is gone.
    async fn reap(&self, workers: &mut BTreeMap<u16, Worker>) {
        let ended: Vec<u16> = workers
            .iter()
            .filter(|(_, w)| w.handle.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for partition in ended {
            workers.remove(&partition);
            tracing::warn!(partition, member = %self.member, "partition worker ended: its lease was lost");
            self.release(partition).await;
        }
    }

    async fn renew(&self, workers: &mut BTreeMap<u16, Worker>) {
        let mut lost = Vec::new();
        for &partition in workers.keys() {
            match self.leases.renew(partition, &self.member).await {
                Ok(true) => {}
                Ok(false) => lost.push(partition),
                Err(err) => {
                    tracing::warn!(partition, error = %err.chain(), "renewing a partition lease failed")
                }
            }
        }
        for partition in lost {
            let worker = workers.remove(&partition).expect("held");
            // No graceful stop: another processor may own the partition already.
            worker.handle.abort();
            tracing::warn!(
                partition,
                epoch = worker.epoch,
                member = %self.member,
                "partition lease lost; its worker stopped"
            );
        }
    }

    /// Hands the partitions over `share` to the processors that have fewer, highest first.
    fn hand_over(
        &self,
        workers: &mut BTreeMap<u16, Worker>,
        releasing: &mut BTreeMap<u16, JoinHandle<()>>,
        share: usize,
    ) {
        while workers.len() > share {
            let (partition, worker) = workers.pop_last().expect("more than the share");
            tracing::info!(partition, member = %self.member, "handing a partition over");
            worker.stop.cancel();
            let leases = self.leases.clone();
            let member = self.member.clone();
            releasing.insert(
                partition,
                tokio::spawn(async move {
                    if tokio::time::timeout(SHUTDOWN_GRACE, worker.handle)
                        .await
                        .is_err()
                    {
                        // Still writing: let the lease expire, the fence covers the rest.
                        return;
                    }
                    release(&*leases, partition, &member).await;
                }),
            );
        }
    }

    /// Claims free partitions up to `share`, starting at this member's slice of the
    /// partitions so members starting together do not all race for the same ones.
    async fn claim(
        &self,
        workers: &mut BTreeMap<u16, Worker>,
        releasing: &BTreeMap<u16, JoinHandle<()>>,
        share: usize,
        rank: usize,
        members: usize,
    ) {
        let start = usize::from(self.partitions) * rank / members.max(1);
        let order: Vec<u16> = (0..self.partitions)
            .cycle()
            .skip(start)
            .take(usize::from(self.partitions))
            .collect();
        let busy: BTreeSet<u16> = workers.keys().chain(releasing.keys()).copied().collect();
        for partition in order {
            if workers.len() >= share {
                break;
            }
            if busy.contains(&partition) {
                continue;
            }
            match self.leases.claim(partition, &self.member).await {
                Ok(Some(epoch)) => {
                    tracing::info!(partition, epoch, member = %self.member, "partition claimed");
                    workers.insert(partition, self.spawn(partition, epoch));
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(partition, error = %err.chain(), "claiming a partition failed");
                    break;
                }
            }
        }
    }

    fn spawn(&self, partition: u16, epoch: u64) -> Worker {
        let stop = CancellationToken::new();
        let worker = Partition::new(
            partition,
            Some(epoch),
            self.deps.clone(),
            self.config.clone(),
            self.polls.clone(),
            self.engine.clone(),
        );
        let handle = tokio::spawn(worker.run(stop.clone()));
        Worker {
            epoch,
            stop,
            handle,
        }
    }

    async fn release(&self, partition: u16) {
        release(&*self.leases, partition, &self.member).await;
    }
}

/// Gives a lease up so another processor takes the partition at once; one that cannot be
/// released expires.
async fn release(leases: &dyn PartitionLeases, partition: u16, member: &str) {
    match leases.release(partition, member).await {
        Ok(()) => tracing::info!(partition, member, "partition lease released"),
        Err(err) => {
            tracing::warn!(partition, error = %err.chain(), "releasing a partition lease failed; it expires")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fair_share;

    #[test]
    fn shares_add_up_to_every_partition() {
        for partitions in [1u16, 2, 7, 8, 64] {
            for members in 1..=9usize {
                let total: usize = (0..members)
                    .map(|rank| fair_share(partitions, members, rank))
                    .sum();
                assert_eq!(
                    total,
                    usize::from(partitions),
                    "{partitions} over {members}"
                );
                let most = fair_share(partitions, members, 0);
                let least = fair_share(partitions, members, members - 1);
                assert!(most - least <= 1, "{partitions} over {members}");
            }
        }
    }
}
