//! `tally processor`: consumes the vote log on NATS and writes to ClickHouse.

use std::sync::Arc;
use std::time::Duration;

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
    /// Partitions this process owns (comma-separated), and no other processor may. When
    /// empty, processors share the partitions through leases in NATS: start as many as you
    /// like, each takes a fair share and a dead one's partitions move within a lease.
    #[arg(long, env = "TALLY_OWN_PARTITIONS", value_delimiter = ',')]
    own_partitions: Vec<u16>,
    /// How long a processor keeps its partitions without renewing their leases: a stopped
    /// or cut-off processor's partitions move after this (every processor must agree).
    #[arg(long, env = "TALLY_LEASE_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=300))]
    lease_seconds: u64,
    /// This processor's name among those sharing the partitions (letters, digits, `-`,
    /// `_`): keep it across restarts (a pod name) so a restarted processor takes its own
    /// leases back at once. Default: host name and process id.
    #[arg(long, env = "TALLY_PROCESSOR_ID")]
    processor_id: Option<String>,
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
        let live = Arc::new(NatsLiveFeed::new(client.clone(), live_key));
        let leases = if self.own_partitions.is_empty() {
            let leases = self
                .bus
                .leases(client.clone(), Duration::from_secs(self.lease_seconds))
                .await?;
            let member = member_name(self.processor_id.as_deref())?;
            Some(tally_processor::Leasing { leases, member })
        } else {
            None
        };
        let config = self.processing.config(self.own_partitions);
        let listener = self.listen.bind("processor").await?;
        let deps = tally_processor::Deps {
            log,
            registry,
            warehouse,
            live,
            leases,
        };
        tally_processor::run(listener, deps, config, shutdown_signal()).await?;
        Ok(())
    }
}

/// The processor's name among those sharing partitions: the one given, checked, or the host
/// name and process id.
fn member_name(given: Option<&str>) -> anyhow::Result<String> {
    if let Some(name) = given {
        anyhow::ensure!(
            !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "TALLY_PROCESSOR_ID `{name}`: use 1 to 64 letters, digits, `-` and `_`"
        );
        return Ok(name.to_owned());
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(48)
        .collect();
    let host = if host.is_empty() {
        "processor".to_owned()
    } else {
        host
    };
    Ok(format!("{host}-{}", std::process::id()))
}
