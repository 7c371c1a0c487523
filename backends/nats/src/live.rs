//! Live totals on core NATS: `tally.live.<poll>` carries full results as JSON.

use async_trait::async_trait;
use futures::StreamExt;

use super::LIVE_PREFIX;
use tally_core::ports::{BoxStream, LiveFeed};
use tally_core::results::Results;
use tally_core::{Error, Result};

#[derive(Clone)]
pub struct NatsLiveFeed {
    client: async_nats::Client,
}

impl NatsLiveFeed {
    pub fn new(client: async_nats::Client) -> Self {
        NatsLiveFeed { client }
    }
}

#[async_trait]
impl LiveFeed for NatsLiveFeed {
    async fn publish(&self, results: &Results) -> Result<()> {
        let payload = serde_json::to_vec(results).map_err(|e| Error::failed("live feed", e))?;
        self.client
            .publish(format!("{LIVE_PREFIX}.{}", results.poll_id), payload.into())
            .await
            .map_err(|e| Error::unavailable("live feed", e))
    }

    async fn subscribe(&self) -> Result<BoxStream<Results>> {
        let subscriber = self
            .client
            .subscribe(format!("{LIVE_PREFIX}.>"))
            .await
            .map_err(|e| Error::unavailable("live feed", e))?;
        // Make sure the server has registered the interest before the caller relies on it.
        self.client
            .flush()
            .await
            .map_err(|e| Error::unavailable("live feed", e))?;
        let stream = subscriber.filter_map(|message| async move {
            match serde_json::from_slice::<Results>(&message.payload) {
                Ok(results) => Some(results),
                Err(err) => {
                    tracing::warn!(subject = %message.subject, error = %err, "undecodable live totals");
                    None
                }
            }
        });
        Ok(Box::pin(stream))
    }
}
