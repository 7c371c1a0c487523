use async_trait::async_trait;

use super::BoxStream;
use crate::poll::Poll;
use crate::Result;

#[derive(Debug, Clone, PartialEq)]
pub enum PollChange {
    Put(Box<Poll>),
    Deleted(String),
}

/// Where poll definitions live. `version` is the registry's revision of a record: updates
/// are conditional on it, so concurrent edits never silently overwrite each other.
#[async_trait]
pub trait PollRegistry: Send + Sync + 'static {
    /// Stores a new poll; `AlreadyExists` if the id is taken. Returns it with its version.
    async fn create(&self, poll: &Poll) -> Result<Poll>;
    async fn get(&self, id: &str) -> Result<Option<Poll>>;
    /// Replaces a poll if its stored version is still `poll.version`, else `Conflict`.
    async fn update(&self, poll: &Poll) -> Result<Poll>;
    /// Writes `poll` whatever is stored under its id. Only for repairing a record that
    /// cannot be read (so has no version to update from); never for edits.
    async fn replace(&self, poll: &Poll) -> Result<Poll>;
    /// Polls with ids after `after`, in id order, at most `limit`. Records that cannot be
    /// read are left out (and logged), as they are from `watch`.
    async fn list(&self, after: Option<&str>, limit: usize) -> Result<Vec<Poll>>;
    /// Every current poll, then every later change, as they happen.
    async fn watch(&self) -> Result<BoxStream<Result<PollChange>>>;
    async fn check(&self) -> Result<()>;
}
