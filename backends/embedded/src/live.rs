//! The in-process live feed: a broadcast channel from the processor to the query side.

use async_trait::async_trait;
use futures::StreamExt;
use tally_core::ports::{BoxStream, LiveFeed};
use tally_core::results::Results;
use tally_core::Result;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

/// The embedded [`LiveFeed`]. A subscriber that falls behind skips to the newest totals,
/// which is all the feed promises: every message is a full set of totals.
pub struct LocalLiveFeed {
    sender: broadcast::Sender<Results>,
}

impl Default for LocalLiveFeed {
    fn default() -> Self {
        LocalLiveFeed {
            sender: broadcast::channel(4096).0,
        }
    }
}

#[async_trait]
impl LiveFeed for LocalLiveFeed {
    async fn publish(&self, results: &Results) -> Result<()> {
        // No subscriber is not an error: nobody is watching yet.
        let _ = self.sender.send(results.clone());
        Ok(())
    }

    async fn subscribe(&self) -> Result<BoxStream<Results>> {
        let stream = BroadcastStream::new(self.sender.subscribe())
            .filter_map(|item| async move { item.ok() });
        Ok(Box::pin(stream))
    }
}
