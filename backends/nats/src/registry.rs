//! The poll registry on a JetStream key-value bucket: key = poll id, value = the versioned
//! poll record, revision = the poll's `version`.

use async_nats::jetstream::{self, kv, stream};
use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};

use super::POLLS_BUCKET;
use tally_core::poll::Poll;
use tally_core::ports::{BoxStream, PollChange, PollRegistry};
use tally_core::{Error, Result};

#[derive(Clone)]
pub struct KvRegistry {
    store: kv::Store,
}

impl KvRegistry {
    /// Opens the bucket, creating it with one replica when missing.
    pub async fn open(client: async_nats::Client) -> Result<Self> {
        Self::open_replicated(client, 1).await
    }

    /// Opens the bucket, creating it with `replicas` copies when missing; refuses one found
    /// with fewer.
    pub async fn open_replicated(client: async_nats::Client, replicas: usize) -> Result<Self> {
        let js = jetstream::new(client);
        let config = kv::Config {
            bucket: POLLS_BUCKET.to_owned(),
            history: 5,
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            ..Default::default()
        };
        let store = super::open_bucket(&js, "poll registry", config).await?;
        Ok(KvRegistry { store })
    }

    fn decode(entry: &kv::Entry) -> Result<Poll> {
        let mut poll = Poll::decode(&entry.value)?;
        poll.version = entry.revision;
        Ok(poll)
    }
}

#[async_trait]
impl PollRegistry for KvRegistry {
    async fn create(&self, poll: &Poll) -> Result<Poll> {
        match self.store.create(&poll.id, poll.encode().into()).await {
            Ok(revision) => Ok(Poll {
                version: revision,
                ..poll.clone()
            }),
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {
                Err(Error::AlreadyExists(format!("poll `{}`", poll.id)))
            }
            Err(err) => Err(Error::unavailable("poll registry", err)),
        }
    }

    async fn get(&self, id: &str) -> Result<Option<Poll>> {
        let entry = self
            .store
            .entry(id)
            .await
            .map_err(|e| Error::unavailable("poll registry", e))?;
        match entry {
            Some(entry) if entry.operation == kv::Operation::Put => Ok(Some(Self::decode(&entry)?)),
            _ => Ok(None),
        }
    }

    async fn update(&self, poll: &Poll) -> Result<Poll> {
        match self
            .store
            .update(&poll.id, poll.encode().into(), poll.version)
            .await
        {
            Ok(revision) => Ok(Poll {
                version: revision,
                ..poll.clone()
            }),
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Err(Error::Conflict(format!("poll `{}`", poll.id)))
            }
            Err(err) => Err(Error::unavailable("poll registry", err)),
        }
    }

    async fn replace(&self, poll: &Poll) -> Result<Poll> {
        match self.store.put(&poll.id, poll.encode().into()).await {
            Ok(revision) => Ok(Poll {
                version: revision,
                ..poll.clone()
            }),
            Err(err) => Err(Error::unavailable("poll registry", err)),
        }
    }

    async fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<Poll>> {
        let mut keys: Vec<String> = match self.store.keys().await {
            Ok(keys) => keys
                .try_collect()
                .await
                .map_err(|e| Error::unavailable("poll registry", e))?,
            Err(err) => return Err(Error::unavailable("poll registry", err)),
        };
        keys.sort();
        let mut polls = Vec::new();
        for key in keys
            .into_iter()
            .filter(|k| after.is_none_or(|a| k.as_str() > a))
        {
            if polls.len() >= limit {
                break;
            }
            // An unreadable record is left out (and reported) rather than failing every
            // list; `get` of it still says it is corrupt, and it can be replaced.
            match self.get(&key).await {
                Ok(Some(poll)) => polls.push(poll),
                Ok(None) => {}
                Err(err) if err.kind() == tally_core::ErrorKind::Corrupt => {
                    tracing::error!(poll_id = %key, error = %err.chain(), "skipping an unreadable poll record; replace it with PUT /v1/polls/{{id}}")
                }
                Err(err) => return Err(err),
            }
        }
        Ok(polls)
    }

    async fn watch(&self) -> Result<BoxStream<Result<PollChange>>> {
        let watch = self
            .store
            .watch_with_history(">")
            .await
            .map_err(|e| Error::unavailable("poll registry", e))?;
        let changes = watch.filter_map(|entry| async move {
            let entry = match entry {
                Ok(entry) => entry,
                Err(err) => return Some(Err(Error::unavailable("poll registry", err))),
            };
            match entry.operation {
                kv::Operation::Put => match Self::decode(&entry) {
                    Ok(poll) => Some(Ok(PollChange::Put(Box::new(poll)))),
                    // Skipped, not an error: an error would restart the watch, which would
                    // meet the same record again, and nothing after it would ever arrive.
                    Err(err) => {
                        tracing::error!(poll_id = %entry.key, error = %err.chain(), "skipping an unreadable poll record; replace it with PUT /v1/polls/{{id}}");
                        None
                    }
                },
                kv::Operation::Delete | kv::Operation::Purge => {
                    Some(Ok(PollChange::Deleted(entry.key)))
                }
            }
        });
        Ok(Box::pin(changes))
    }

    async fn check(&self) -> Result<()> {
        self.store
            .status()
            .await
            .map_err(|e| Error::unavailable("poll registry", e))?;
        Ok(())
    }
}
