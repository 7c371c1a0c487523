//! `tally processor`: consumes the vote log on NATS and writes to ClickHouse.

use std::sync::Arc;

use clap::Args;
use tally_core::secrets::Secrets;
use tally_nats::NatsLiveFeed;

use crate::config::{shutdown_signal, Bus, Listen8082, Processing, WarehouseArgs};

#[derive(Args)]
pub struct ProcessorArgs {
    #[command(flatten)]
    listen: Listen8082,
    #[command(flatten)]
    bus: Bus,
    #[command(flatten)]
    warehouse: WarehouseArgs,
    /// Partitions this process owns (comma-separated); all when empty.
    #[arg(long, env = "TALLY_OWN_PARTITIONS", value_delimiter = ',')]
    own_partitions: Vec<u16>,
    #[command(flatten)]
    processing: Processing,
    /// Server secret (as given to the query service); signs live totals.
    #[arg(long, env = "TALLY_SECRET", hide_env_values = true)]
    secret: Option<String>,
}

impl ProcessorArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let (warehouse, _) = self.warehouse.open().await?;
        let client = self.bus.connect().await?;
        let log = self.bus.log(client.clone()).await?;
        let registry = self.bus.registry(client.clone()).await?;
        // Signs live totals with the key the query service checks them with.
        let live_key = self
            .secret
            .map(|secret| Secrets::new(secret.as_bytes()).map(|s| s.live_key()))
            .transpose()
            .map_err(anyhow::Error::msg)?;
        let live = Arc::new(NatsLiveFeed::new(client, live_key));
        let config = self.processing.config(self.own_partitions);
        let listener = self.listen.bind("processor").await?;
        let deps = tally_processor::Deps {
            log,
            registry,
            warehouse,
            live,
        };
        tally_processor::run(listener, deps, config, shutdown_signal()).await?;
        Ok(())
    }
}
