//! Who processes which partition of the vote log, when several processors share it.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;

use crate::Result;

/// Partition ownership between processors: one lease per partition in a store they share,
/// held by one member at a time, kept by renewing it and lost [`ttl`](Self::ttl) after the
/// last renewal the store accepted.
///
/// Guarantees: a claim succeeds only when no other member holds the lease, and answers an
/// epoch greater than every epoch answered before for any partition — the number the
/// warehouse fences older owners with ([`Warehouse::fence`](super::Warehouse::fence)). A
/// lease alone does not stop a paused member from writing after it expired; the fence does.
#[async_trait]
pub trait PartitionLeases: Send + Sync + 'static {
    /// How long a lease (and a member's presence) lasts without renewal.
    fn ttl(&self) -> Duration;
    /// Marks `member` present for one ttl; answers every member present now, sorted.
    async fn heartbeat(&self, member: &str) -> Result<Vec<String>>;
    /// Takes `partition` for `member`: its epoch, or `None` while another member holds it.
    /// A lease `member` itself still holds (from before a restart) is taken over at once,
    /// with a new epoch.
    async fn claim(&self, partition: u16, member: &str) -> Result<Option<u64>>;
    /// Renews a lease `member` claimed: `false` when it was lost (it expired, or another
    /// member took it) and must not be used any more.
    async fn renew(&self, partition: u16, member: &str) -> Result<bool>;
    /// Gives a held lease up, so another member may claim it at once.
    async fn release(&self, partition: u16, member: &str) -> Result<()>;
    /// Every lease held now: partition → member.
    async fn owners(&self) -> Result<BTreeMap<u16, String>>;
}
