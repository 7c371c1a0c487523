//! The subcommands of `tally`, one file each.

mod config_table;
mod healthcheck;
mod ingest;
mod migrate;
mod processor;
mod query;
mod repartition;
mod standalone;
mod token;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tally",
    version,
    about = "Real-time polling backend: ingest, process and query votes",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand: the options of `standalone`.
    #[command(flatten)]
    standalone: standalone::StandaloneArgs,
    /// Log lines as text or as JSON objects, one per line.
    #[arg(
        long,
        global = true,
        env = "TALLY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: crate::config::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process on embedded back ends in a data directory (the default).
    Standalone(standalone::StandaloneArgs),
    /// Public vote intake: validates votes and appends them to the vote log.
    Ingest(ingest::IngestArgs),
    /// Consumes the vote log, writes votes and window aggregates, publishes live totals.
    Processor(processor::ProcessorArgs),
    /// Poll management, results, breakdowns, time series and live totals.
    Query(query::QueryArgs),
    /// Mints a signed voter token for a `require_token` poll and prints it.
    Token(token::TokenArgs),
    /// Prints the key that signs voter tokens (for a platform that mints its own).
    TokenKey(token::TokenKeyArgs),
    /// Applies warehouse migrations and exits.
    Migrate(migrate::MigrateArgs),
    /// Changes the vote stream's partition count, once it holds no vote and no service runs.
    Repartition(repartition::RepartitionArgs),
    /// Asks a service on this host whether it is ready (exit 0) or not (exit 1): container
    /// healthchecks without curl.
    Healthcheck(healthcheck::HealthcheckArgs),
    /// Prints the table of every `TALLY_*` variable (for docs/OPERATIONS.md).
    #[command(hide = true)]
    ConfigTable,
}

impl Cli {
    pub fn log_format(&self) -> crate::config::LogFormat {
        self.log_format
    }

    pub async fn run(self) -> anyhow::Result<()> {
        let Some(command) = self.command else {
            return self.standalone.run().await;
        };
        match command {
            Command::Standalone(args) => args.run().await,
            Command::Ingest(args) => args.run().await,
            Command::Processor(args) => args.run().await,
            Command::Query(args) => args.run().await,
            Command::Token(args) => args.run(),
            Command::TokenKey(args) => args.run(),
            Command::Migrate(args) => args.run().await,
            Command::Repartition(args) => args.run().await,
            Command::Healthcheck(args) => args.run().await,
            Command::ConfigTable => {
                print!("{}", config_table::markdown());
                Ok(())
            }
        }
    }
}
