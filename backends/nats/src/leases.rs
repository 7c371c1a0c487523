//! Processors' partition leases on a JetStream key-value bucket whose entries expire:
//! key `partition.{p}` = the member holding it, key `member.{id}` = a member's presence.
//!
//! The bucket's `max_age` is the lease ttl: an entry not written again within it is removed
//! by the server, which frees the lease. Claims and renewals are compare-and-set on the
//! key's revision, so two members never both hold one. A revision is the sequence of the
//! bucket's stream, which only grows: the revision a claim wrote is its epoch.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use async_trait::async_trait;
use futures::TryStreamExt;

use tally_core::ports::PartitionLeases;
use tally_core::{Error, Result};

pub const LEASES_BUCKET: &str = "tally_leases";

const WHAT: &str = "partition leases";

fn partition_key(partition: u16) -> String {
    format!("partition.{partition}")
}

pub struct KvLeases {
    store: kv::Store,
    ttl: Duration,
    /// The revision each lease this process holds was last written at, by partition.
    held: Mutex<HashMap<u16, u64>>,
}

impl KvLeases {
    /// Opens the bucket with leases lasting `ttl` (at least a second), creating it with
    /// `replicas` copies when missing. A bucket made with another ttl is refused: every
    /// processor must agree on how long a silent owner keeps its partitions.
    pub async fn open(client: async_nats::Client, replicas: usize, ttl: Duration) -> Result<Self> {
        let ttl = ttl.max(Duration::from_secs(1));
        let js = jetstream::new(client);
        let config = kv::Config {
            bucket: LEASES_BUCKET.to_owned(),
            history: 1,
            max_age: ttl,
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            ..Default::default()
        };
        let store = super::open_bucket(&js, WHAT, config).await?;
        let found = store
            .status()
            .await
            .map_err(|e| Error::unavailable(WHAT, e))?
            .max_age();
        if found != ttl {
            return Err(Error::failed(
                WHAT,
                format!(
                    "the bucket {LEASES_BUCKET} keeps leases for {} s where this processor asks \
                     for {} s: start every processor with the same TALLY_LEASE_SECONDS, or, \
                     with every processor stopped, delete the bucket (`nats kv del {LEASES_BUCKET}`)",
                    found.as_secs_f64(),
                    ttl.as_secs_f64()
                ),
            ));
        }
        Ok(KvLeases {
            store,
            ttl,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// Every key in the bucket now: leases and members.
    async fn keys(&self) -> Result<Vec<String>> {
        self.store
            .keys()
            .await
            .map_err(|e| Error::unavailable(WHAT, e))?
            .try_collect()
            .await
            .map_err(|e| Error::unavailable(WHAT, e))
    }

    fn held(&self, partition: u16) -> Option<u64> {
        self.held
            .lock()
            .expect("lease table")
            .get(&partition)
            .copied()
    }

    fn hold(&self, partition: u16, revision: Option<u64>) {
        let mut held = self.held.lock().expect("lease table");
        match revision {
            Some(revision) => held.insert(partition, revision),
            None => held.remove(&partition),
        };
    }
}

#[async_trait]
impl PartitionLeases for KvLeases {
    fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn heartbeat(&self, member: &str) -> Result<Vec<String>> {
        self.store
            .put(format!("member.{member}"), member.to_owned().into())
            .await
            .map_err(|e| Error::unavailable(WHAT, e))?;
        let keys = self.keys().await?;
        let mut members: Vec<String> = keys
            .into_iter()
            .filter_map(|key| key.strip_prefix("member.").map(str::to_owned))
            .collect();
        members.sort();
        members.dedup();
        Ok(members)
    }

    async fn claim(&self, partition: u16, member: &str) -> Result<Option<u64>> {
        let key = partition_key(partition);
        match self.store.create(&key, member.to_owned().into()).await {
            Ok(revision) => {
                self.hold(partition, Some(revision));
                return Ok(Some(revision));
            }
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(err) => return Err(Error::unavailable(WHAT, err)),
        }
        // Held: by this member before a restart, it is taken over with a new revision.
        let entry = self
            .store
            .entry(&key)
            .await
            .map_err(|e| Error::unavailable(WHAT, e))?;
        let Some(entry) = entry else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put || entry.value.as_ref() != member.as_bytes() {
            return Ok(None);
        }
        match self
            .store
            .update(&key, member.to_owned().into(), entry.revision)
            .await
        {
            Ok(revision) => {
                self.hold(partition, Some(revision));
                Ok(Some(revision))
            }
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(err) => Err(Error::unavailable(WHAT, err)),
        }
    }

    async fn renew(&self, partition: u16, member: &str) -> Result<bool> {
        let Some(revision) = self.held(partition) else {
            return Ok(false);
        };
        match self
            .store
            .update(partition_key(partition), member.to_owned().into(), revision)
            .await
        {
            Ok(revision) => {
                self.hold(partition, Some(revision));
                Ok(true)
            }
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                self.hold(partition, None);
                Ok(false)
            }
            Err(err) => Err(Error::unavailable(WHAT, err)),
        }
    }

    async fn release(&self, partition: u16, _member: &str) -> Result<()> {
        let Some(revision) = self.held(partition) else {
            return Ok(());
        };
        self.hold(partition, None);
        match self
            .store
            .delete_expect_revision(partition_key(partition), Some(revision))
            .await
        {
            Ok(()) => Ok(()),
            // Lost already: it is someone else's now, or expires by itself.
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(()),
            Err(err) => Err(Error::unavailable(WHAT, err)),
        }
    }

    async fn owners(&self) -> Result<BTreeMap<u16, String>> {
        let keys = self.keys().await?;
        let mut owners = BTreeMap::new();
        for key in keys {
            let Some(partition) = key
                .strip_prefix("partition.")
                .and_then(|p| p.parse::<u16>().ok())
            else {
                continue;
            };
            if let Some(owner) = self
                .store
                .get(&key)
                .await
                .map_err(|e| Error::unavailable(WHAT, e))?
            {
                owners.insert(partition, String::from_utf8_lossy(&owner).into_owned());
            }
        }
        Ok(owners)
    }
}
