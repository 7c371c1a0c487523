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
    #[arg(long, env = "TALLY_PROCESSOR_ID", value_parser = parse_member)]
    processor_id: Option<String>,
    /// Seconds a poll stays closed before its counted votes leave the NATS stream, which
    /// keeps memory for every vote it holds (archived polls leave once counted). From then
    /// on the poll cannot be reopened, and a late retry is answered from ClickHouse.
    #[arg(long, env = "TALLY_PURGE_CLOSED_AFTER_SECONDS", default_value_t = tally_processor::DEFAULT_PURGE_CLOSED_AFTER_SECONDS, value_parser = clap::value_parser!(u64).range(1..))]
    purge_closed_after_seconds: u64,
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
            let member = self.processor_id.unwrap_or_else(default_member);
            Some(tally_processor::Leasing { leases, member })
        } else {
            None
        };
        let config = tally_processor::Config {
            purge_closed_after: Duration::from_secs(self.purge_closed_after_seconds),
            ..self.processing.config(self.own_partitions)
        };
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

/// A processor's name as given: 1 to 64 letters, digits, `-` and `_` (it becomes part of
/// a key in the lease bucket). Checked when the arguments are read, before anything starts.
fn parse_member(name: &str) -> Result<String, String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(name.to_owned())
    } else {
        Err("use 1 to 64 letters, digits, `-` and `_`".to_owned())
    }
}

/// The name of a processor not given one: its host name (as a key allows) and process id.
fn default_member() -> String {
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
    let host = if host.is_empty() { "processor" } else { &host };
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::{default_member, parse_member};

    #[test]
    fn a_processor_name_is_a_key_part_or_refused() {
        assert_eq!(parse_member("proc-1_b").as_deref(), Ok("proc-1_b"));
        for bad in ["", "a b", "a.b", "a*", "ä", &"x".repeat(65)] {
            assert!(parse_member(bad).is_err(), "{bad:?} was accepted");
        }
        let default = default_member();
        assert!(parse_member(&default).is_ok(), "{default}");
    }
}
