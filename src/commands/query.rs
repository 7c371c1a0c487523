//! `tally query`: management, results, analytics and live totals on NATS and ClickHouse.

use std::sync::Arc;

use clap::Args;
use tally_core::secrets::Secrets;
use tally_nats::NatsLiveFeed;

use crate::config::{
    shutdown_signal, Bus, Keys, Listen8081, Live, ProxyArgs, Serving, SqlArgs, Timeout,
    WarehouseArgs,
};

#[derive(Args)]
pub struct QueryArgs {
    #[command(flatten)]
    listen: Listen8081,
    #[command(flatten)]
    bus: Bus,
    #[command(flatten)]
    warehouse: WarehouseArgs,
    #[command(flatten)]
    keys: Keys,
    #[command(flatten)]
    live: Live,
    #[command(flatten)]
    sql: SqlArgs,
    #[command(flatten)]
    proxies: ProxyArgs,
    /// Server secret (as given to ingest); enables minting voter tokens.
    #[arg(long, env = "TALLY_SECRET", hide_env_values = true)]
    secret: Option<String>,
    #[command(flatten)]
    timeout: Timeout,
    #[command(flatten)]
    serving: Serving,
}

impl QueryArgs {
    pub async fn run(self) -> anyhow::Result<()> {
        let (warehouse, _) = self.warehouse.open().await?;
        let client = self.bus.connect().await?;
        let registry = self.bus.registry(client.clone()).await?;
        let secrets = self
            .secret
            .map(|secret| Secrets::new(secret.as_bytes()))
            .transpose()
            .map_err(anyhow::Error::msg)?;
        // Takes only live totals signed with the key from the same secret as the processor's.
        let live = Arc::new(NatsLiveFeed::new(
            client,
            secrets.as_ref().map(Secrets::live_key),
        ));
        let api_keys = self.keys.api_keys()?;
        if api_keys.is_empty() {
            tracing::warn!(
                "no API keys configured: poll management and analytics will refuse every request"
            );
        }
        let mut config = self
            .live
            .config(api_keys, secrets, &self.proxies, &self.timeout);
        config.serve = self.serving.config();
        config.sql_limits = self.sql.limits();
        // The document names every route; the vote routes' server is the ingest service.
        config.openapi = Some(tally_query::openapi::Document(
            tally_query::openapi::document(
                tally_ingest::openapi(),
                tally_query::openapi::Votes::IngestService,
            ),
        ));
        let listener = self.listen.bind("query").await?;
        tally_query::run(
            listener,
            tally_query::Deps {
                registry,
                warehouse,
                live,
            },
            config,
            shutdown_signal(),
        )
        .await?;
        Ok(())
    }
}
