//! `tally ingest`: the public vote intake on NATS.

use clap::Args;

use crate::config::{
    shutdown_signal, Bus, Keys, LimitArgs, Listen8080, LookupWarehouseArgs, ProxyArgs, Serving,
    Timeout,
};

#[derive(Args)]
pub struct IngestArgs {
    #[command(flatten)]
    listen: Listen8080,
    #[command(flatten)]
    bus: Bus,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    proxies: ProxyArgs,
    /// Batch import takes ingest and admin keys (analyst keys are accepted and unused).
    #[command(flatten)]
    keys: Keys,
    #[command(flatten)]
    warehouse: LookupWarehouseArgs,
    #[command(flatten)]
    timeout: Timeout,
    #[command(flatten)]
    serving: Serving,
    /// Server secret for hashing voter ids and signing voter tokens (16+ bytes).
    #[arg(long, env = "TALLY_SECRET", hide_env_values = true)]
    secret: String,
}

impl IngestArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let client = self.bus.connect().await?;
        let log = self.bus.log(client.clone()).await?;
        let registry = self.bus.registry(client).await?;
        let warehouse = self.warehouse.open()?;
        let config = tally_ingest::Config {
            secret: self.secret.into_bytes(),
            keys: self.keys.api_keys()?,
            limits: self.limits.config(&self.proxies),
            request_timeout: self.timeout.duration(),
            serve: self.serving.config(),
            ..Default::default()
        };
        let listener = self.listen.bind("ingest").await?;
        tally_ingest::run(
            listener,
            tally_ingest::Deps {
                log,
                registry,
                warehouse,
            },
            config,
            shutdown_signal(),
        )
        .await?;
        Ok(())
    }
}
