//! The poll registry in the same redb store as the vote log. A poll's `version` is a
//! store-wide revision counter, so conditional updates work as on the JetStream bucket.

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tally_core::poll::Poll;
use tally_core::ports::{BoxStream, PollChange, PollRegistry};
use tally_core::{Error, Result};
use tokio::sync::broadcast;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

use crate::META;

const POLLS: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("polls");
const REVISION: &str = "poll_revision";

fn storage(err: impl Into<tally_core::error::BoxError>) -> Error {
    Error::unavailable("embedded poll registry", err)
}

/// The embedded [`PollRegistry`].
pub struct EmbeddedRegistry {
    db: Arc<Database>,
    changes: broadcast::Sender<PollChange>,
}

enum Write {
    Create,
    Update,
    /// Whatever is stored (the repair of an unreadable record).
    Replace,
}

impl EmbeddedRegistry {
    pub(crate) fn open(db: Arc<Database>) -> Result<EmbeddedRegistry> {
        let txn = db.begin_write().map_err(storage)?;
        {
            txn.open_table(POLLS).map_err(storage)?;
            txn.open_table(META).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(EmbeddedRegistry {
            db,
            changes: broadcast::channel(1024).0,
        })
    }

    async fn write(&self, poll: &Poll, mode: Write) -> Result<Poll> {
        let db = self.db.clone();
        let mut poll = poll.clone();
        let stored = tokio::task::spawn_blocking(move || -> Result<Poll> {
            let txn = db.begin_write().map_err(storage)?;
            {
                let mut polls = txn.open_table(POLLS).map_err(storage)?;
                let current = polls
                    .get(poll.id.as_str())
                    .map_err(storage)?
                    .map(|guard| guard.value().0);
                match (mode, current) {
                    (Write::Create, Some(_)) => {
                        return Err(Error::AlreadyExists(format!("poll `{}`", poll.id)))
                    }
                    (Write::Update, None) => {
                        return Err(Error::NotFound(format!("poll `{}`", poll.id)))
                    }
                    (Write::Update, Some(version)) if version != poll.version => {
                        return Err(Error::Conflict(format!("poll `{}`", poll.id)))
                    }
                    _ => {}
                }
                let mut meta = txn.open_table(META).map_err(storage)?;
                let revision = meta
                    .get(REVISION)
                    .map_err(storage)?
                    .map(|guard| guard.value())
                    .unwrap_or(0)
                    + 1;
                meta.insert(REVISION, revision).map_err(storage)?;
                poll.version = revision;
                polls
                    .insert(poll.id.as_str(), (revision, poll.encode().as_slice()))
                    .map_err(storage)?;
            }
            txn.commit().map_err(storage)?;
            Ok(poll)
        })
        .await
        .map_err(storage)??;
        let _ = self.changes.send(PollChange::Put(Box::new(stored.clone())));
        Ok(stored)
    }

    fn read(db: &Database, after: Option<&str>, limit: usize) -> Result<Vec<Poll>> {
        let read = db.begin_read().map_err(storage)?;
        let polls = read.open_table(POLLS).map_err(storage)?;
        let range = match after {
            Some(after) => polls.range::<&str>(after..),
            None => polls.range::<&str>(..),
        }
        .map_err(storage)?;
        let mut out = Vec::new();
        for item in range {
            let (key, value) = item.map_err(storage)?;
            if after == Some(key.value()) {
                continue;
            }
            if out.len() >= limit {
                break;
            }
            let (version, bytes) = value.value();
            // An unreadable record is left out (and reported) rather than failing every
            // list and watch; `get` of it still says it is corrupt, and it can be replaced.
            match Poll::decode(bytes) {
                Ok(mut poll) => {
                    poll.version = version;
                    out.push(poll);
                }
                Err(err) => {
                    tracing::error!(poll_id = key.value(), error = %err.chain(), "skipping an unreadable poll record; replace it with PUT /v1/polls/{{id}}")
                }
            }
        }
        Ok(out)
    }

    async fn snapshot(db: Arc<Database>) -> Result<Vec<Poll>> {
        tokio::task::spawn_blocking(move || Self::read(&db, None, usize::MAX))
            .await
            .map_err(storage)?
    }
}

#[async_trait]
impl PollRegistry for EmbeddedRegistry {
    async fn create(&self, poll: &Poll) -> Result<Poll> {
        self.write(poll, Write::Create).await
    }

    async fn get(&self, id: &str) -> Result<Option<Poll>> {
        let db = self.db.clone();
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || -> Result<Option<Poll>> {
            let read = db.begin_read().map_err(storage)?;
            let polls = read.open_table(POLLS).map_err(storage)?;
            let Some(guard) = polls.get(id.as_str()).map_err(storage)? else {
                return Ok(None);
            };
            let (version, bytes) = guard.value();
            let mut poll = Poll::decode(bytes)?;
            poll.version = version;
            Ok(Some(poll))
        })
        .await
        .map_err(storage)?
    }

    async fn update(&self, poll: &Poll) -> Result<Poll> {
        self.write(poll, Write::Update).await
    }

    async fn replace(&self, poll: &Poll) -> Result<Poll> {
        self.write(poll, Write::Replace).await
    }

    async fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<Poll>> {
        let db = self.db.clone();
        let after = after.map(str::to_owned);
        tokio::task::spawn_blocking(move || Self::read(&db, after.as_deref(), limit))
            .await
            .map_err(storage)?
    }

    /// Subscribes before reading the snapshot, so no change falls between the two; a
    /// subscriber that falls behind gets a fresh snapshot instead of the changes it missed.
    async fn watch(&self) -> Result<BoxStream<Result<PollChange>>> {
        let changes = BroadcastStream::new(self.changes.subscribe());
        let current = Self::snapshot(self.db.clone()).await?;
        let initial = futures::stream::iter(
            current
                .into_iter()
                .map(|poll| Ok(PollChange::Put(Box::new(poll)))),
        );
        let db = self.db.clone();
        let later = changes.then(move |change| {
            let db = db.clone();
            async move {
                match change {
                    Ok(change) => vec![Ok(change)],
                    Err(BroadcastStreamRecvError::Lagged(_)) => match Self::snapshot(db).await {
                        Ok(polls) => polls
                            .into_iter()
                            .map(|poll| Ok(PollChange::Put(Box::new(poll))))
                            .collect(),
                        Err(err) => vec![Err(err)],
                    },
                }
            }
        });
        let later = later.flat_map(futures::stream::iter);
        Ok(Box::pin(initial.chain(later)))
    }

    async fn check(&self) -> Result<()> {
        Ok(())
    }
}
