//! `tally-loadgen`: drives vote traffic at a tally deployment and reports what it made of it
//! (the default command), and measures the baselines `scripts/bench` compares against.
//! A tool, not a service: it lives apart from the `tally` server binary.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tally-loadgen",
    version,
    about = "Drives vote traffic at a tally deployment and reports throughput, latency and counting",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    load: tally_loadgen::LoadgenArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Measures raw durable appends to the embedded vote log (the standalone baseline).
    BenchLogAppend {
        /// A fresh directory for the log.
        #[arg(long)]
        data_dir: std::path::PathBuf,
        #[arg(long, default_value_t = 200_000)]
        votes: u64,
        #[arg(long, default_value_t = 1024)]
        in_flight: usize,
    },
    /// Measures raw JetStream publishes of vote payloads (the distributed baseline).
    BenchPublish {
        #[arg(long, env = "TALLY_NATS_URL", default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
        #[arg(long, default_value_t = 200_000)]
        votes: u64,
        #[arg(long, default_value_t = 1024)]
        in_flight: usize,
        /// Append through the vote log, with its one message per voter.
        #[arg(long)]
        through_log: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        None => tally_loadgen::run(cli.load).await,
        Some(Command::BenchLogAppend {
            data_dir,
            votes,
            in_flight,
        }) => tally_loadgen::baseline::run(votes, in_flight, &data_dir).await,
        Some(Command::BenchPublish {
            nats_url,
            votes,
            in_flight,
            through_log,
        }) => tally_loadgen::baseline::publish(&nats_url, votes, in_flight, through_log).await,
    }
}
