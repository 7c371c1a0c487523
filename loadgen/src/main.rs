//! `tally-loadgen`: drives vote traffic at a tally deployment and reports what it made of it
//! (the default command), and measures the baselines `scripts/bench` compares against.
//! A tool, not a service: it lives apart from the `tally` server binary.

// The same allocator as `tally`: the baselines this binary serves (the HTTP layer alone,
// raw log appends and publishes) are compared with tally's own figures, so they must not
// pay for a slower malloc than tally does; and the load's client costs less of the CPU it
// shares with the servers. glibc's malloc and free were ~30% of the HTTP baseline's
// instructions per request (docs/BENCHMARKS.md, 2026-12-07 (3)).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Optional only so that a baseline needs none of the load's required arguments
    /// (`--admin-key`); without a subcommand clap requires them.
    #[command(flatten)]
    load: Option<tally_loadgen::LoadgenArgs>,
    /// Print the summary as JSON instead of text.
    #[arg(long)]
    json: bool,
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
    /// Serves the HTTP baseline of single votes: parse a vote's JSON, answer 202, nothing
    /// else (run it as its own process, so its CPU can be read apart).
    ServeHttpBaseline {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
    /// Holds many live (SSE) clients of one poll while votes come in, and measures how long
    /// each update takes to reach all of them, and what they cost the server.
    Fanout(tally_loadgen::fanout::FanoutArgs),
    /// Sends single votes to a `serve-http-baseline` server, with the load's client.
    BenchHttp {
        /// The baseline server's base URL.
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
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
        None => {
            let Some(load) = cli.load else {
                anyhow::bail!("no load arguments: see --help");
            };
            let report = tally_loadgen::run(load).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&report.summary)?);
            } else {
                print!("{report}");
            }
            // Exits non-zero, naming what failed, after the summary is out.
            report.result()
        }
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
        Some(Command::ServeHttpBaseline { listen }) => {
            tally_loadgen::baseline::serve_http(listen).await
        }
        Some(Command::Fanout(args)) => {
            let json = args.json;
            let summary = tally_loadgen::fanout::run(args).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{summary}");
            }
            Ok(())
        }
        Some(Command::BenchHttp {
            url,
            concurrency,
            seconds,
        }) => tally_loadgen::baseline::drive_http(&url, concurrency, seconds).await,
    }
}
