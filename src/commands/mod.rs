//! The subcommands of `tally`, one file each.

mod config_table;
mod ingest;
mod migrate;
mod processor;
mod query;
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
    /// Prints the table of every `TALLY_*` variable (for docs/OPERATIONS.md).
    #[command(hide = true)]
    ConfigTable,
}

impl Cli {
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
            Command::ConfigTable => {
                print!("{}", config_table::markdown());
                Ok(())
            }
        }
    }
}
