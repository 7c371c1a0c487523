use async_trait::async_trait;

use super::BoxStream;
use crate::results::Results;
use crate::Result;

/// Fan-out of full per-poll totals from processors to query replicas. Best effort: a
/// subscriber that misses a message gets the next full totals, never a delta.
#[async_trait]
pub trait LiveFeed: Send + Sync + 'static {
    async fn publish(&self, results: &Results) -> Result<()>;
    async fn subscribe(&self) -> Result<BoxStream<Results>>;
}
