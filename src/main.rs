//! `tally`: one binary, one subcommand per service. Flags and `TALLY_*` environment
//! variables mean the same thing; a flag wins. With no subcommand it runs `standalone`.

// Vote handling allocates many small strings per vote; glibc's malloc/free took about a
// fifth of the workers' CPU in profiles (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod demo;
mod loadgen;
mod log_baseline;
mod standalone;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tally_core::auth::ApiKeys;
use tally_core::backend::Warehouse;
use tally_core::clickhouse::{ClickHouseConfig, ClickHouseWarehouse};
use tally_core::nats::{self, JetStreamLog, KvRegistry, NatsLiveFeed};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "tally",
    version,
    about = "Real-time polling backend: ingest, process and query votes",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand: the options of `standalone`.
    #[command(flatten)]
    standalone: StandaloneArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process on embedded back ends in a data directory (the default).
    Standalone(StandaloneArgs),
    /// Public vote intake: validates votes and appends them to the vote log.
    Ingest {
        #[command(flatten)]
        listen: Listen<8080>,
        #[command(flatten)]
        bus: Bus,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        timeout: Timeout,
        /// Server secret for hashing voter ids and signing voter tokens (16+ bytes).
        #[arg(long, env = "TALLY_SECRET", hide_env_values = true)]
        secret: String,
    },
    /// Consumes the vote log, writes votes and window aggregates, publishes live totals.
    Processor {
        #[command(flatten)]
        listen: Listen<8082>,
        #[command(flatten)]
        bus: Bus,
        #[command(flatten)]
        warehouse: WarehouseArgs,
        /// Partitions this process owns (comma-separated); all when empty.
        #[arg(long, env = "TALLY_OWN_PARTITIONS", value_delimiter = ',')]
        own_partitions: Vec<u16>,
        /// Width of the tumbling windows, in seconds.
        #[arg(long, env = "TALLY_WINDOW_SECONDS", default_value_t = 10)]
        window_seconds: u32,
        /// Largest batch read from the log and written at once.
        #[arg(long, env = "TALLY_BATCH_MAX", default_value_t = 5000)]
        batch_max: usize,
        /// Seconds between writes of settled segment rollups.
        #[arg(long, env = "TALLY_SETTLE_SECONDS", default_value_t = 30)]
        settle_seconds: u64,
    },
    /// Poll management, results, breakdowns, time series and live totals.
    Query {
        #[command(flatten)]
        listen: Listen<8081>,
        #[command(flatten)]
        bus: Bus,
        #[command(flatten)]
        warehouse: WarehouseArgs,
        #[command(flatten)]
        keys: Keys,
        /// Width of the processor's tumbling windows, in seconds.
        #[arg(long, env = "TALLY_WINDOW_SECONDS", default_value_t = 10)]
        window_seconds: u32,
        /// Seconds between SSE heartbeats.
        #[arg(long, env = "TALLY_SSE_HEARTBEAT_SECONDS", default_value_t = 15)]
        sse_heartbeat_seconds: u64,
        /// Server secret (as given to ingest); enables minting voter tokens.
        #[arg(long, env = "TALLY_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// Live (SSE) connections served at once; more get 503.
        #[arg(long, env = "TALLY_LIVE_MAX_CLIENTS", default_value_t = 10_000)]
        live_max_clients: usize,
        #[command(flatten)]
        timeout: Timeout,
    },
    /// Mints a signed voter token for a `require_token` poll and prints it.
    Token {
        /// The poll the token is for.
        #[arg(long)]
        poll: String,
        /// The voter id the token vouches for.
        #[arg(long)]
        voter: String,
        /// Seconds until the token expires.
        #[arg(long, default_value_t = 86_400)]
        ttl: u64,
        /// Server secret (as given to ingest).
        #[arg(long, env = "TALLY_SECRET", hide_env_values = true)]
        secret: String,
    },
    /// Drives vote traffic at a deployment and reports throughput, latency and counting.
    Loadgen(loadgen::LoadgenArgs),
    /// Measures raw durable appends to the embedded vote log (the standalone baseline).
    #[command(hide = true)]
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
    #[command(hide = true)]
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
    /// Applies warehouse migrations and exits.
    Migrate {
        #[command(flatten)]
        warehouse: WarehouseArgs,
    },
}

/// A rate setting: `N/s`, `N/min`, `N/h` or `off`.
#[derive(Clone, Debug)]
struct RateSetting(Option<tally_ingest::limits::Rate>);

impl std::str::FromStr for RateSetting {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        tally_ingest::limits::Rate::parse(text).map(RateSetting)
    }
}

#[derive(Args)]
struct LimitArgs {
    /// Votes requests per client address (IPv6: per /64): N/s, N/min, N/h or off.
    #[arg(long, env = "TALLY_RATE_PER_IP", default_value = "100/s")]
    rate_per_ip: RateSetting,
    /// Votes per voter: N/s, N/min, N/h or off.
    #[arg(long, env = "TALLY_RATE_PER_VOTER", default_value = "10/min")]
    rate_per_voter: RateSetting,
    /// Votes per poll: N/s, N/min, N/h or off.
    #[arg(long, env = "TALLY_RATE_PER_POLL", default_value = "off")]
    rate_per_poll: RateSetting,
    /// Proxies (CIDRs, comma-separated) whose X-Forwarded-For names the client.
    #[arg(long, env = "TALLY_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxies: Vec<ipnet::IpNet>,
}

impl LimitArgs {
    fn config(&self) -> tally_ingest::limits::LimitConfig {
        tally_ingest::limits::LimitConfig {
            per_ip: self.rate_per_ip.0,
            per_voter: self.rate_per_voter.0,
            per_poll: self.rate_per_poll.0,
            trusted_proxies: self.trusted_proxies.clone(),
        }
    }
}

#[derive(Args)]
struct Timeout {
    /// Seconds a request may take to be answered (408 after).
    #[arg(
        long = "request-timeout-seconds",
        env = "TALLY_REQUEST_TIMEOUT_SECONDS",
        default_value_t = 30.0
    )]
    seconds: f64,
}

impl Timeout {
    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds.clamp(0.1, 3600.0))
    }
}

#[derive(Args)]
struct StandaloneArgs {
    #[command(flatten)]
    timeout: Timeout,
    #[command(flatten)]
    listen: Listen<8080>,
    #[command(flatten)]
    limits: LimitArgs,
    /// Where votes, polls and the warehouse are kept.
    #[arg(long, env = "TALLY_DATA_DIR", default_value = "tally-data")]
    data_dir: std::path::PathBuf,
    /// Vote log partitions: processor workers that run side by side.
    #[arg(long, env = "TALLY_PARTITIONS", default_value_t = 2)]
    partitions: u16,
    #[command(flatten)]
    keys: Keys,
    /// Server secret for hashing voter ids and signing voter tokens; generated and kept in
    /// the data directory when not given.
    #[arg(long, env = "TALLY_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Width of the tumbling windows, in seconds.
    #[arg(long, env = "TALLY_WINDOW_SECONDS", default_value_t = 10)]
    window_seconds: u32,
    /// Largest batch read from the log and written at once.
    #[arg(long, env = "TALLY_BATCH_MAX", default_value_t = 5000)]
    batch_max: usize,
    /// Seconds between writes of settled segment rollups.
    #[arg(long, env = "TALLY_SETTLE_SECONDS", default_value_t = 30)]
    settle_seconds: u64,
    /// Seconds between SSE heartbeats.
    #[arg(long, env = "TALLY_SSE_HEARTBEAT_SECONDS", default_value_t = 15)]
    sse_heartbeat_seconds: u64,
    /// Live (SSE) connections served at once; more get 503.
    #[arg(long, env = "TALLY_LIVE_MAX_CLIENTS", default_value_t = 10_000)]
    live_max_clients: usize,
    /// Creates a sample poll and feeds it synthetic votes.
    #[arg(long)]
    demo: bool,
}

impl StandaloneArgs {
    async fn run(self) -> anyhow::Result<()> {
        let listener = TcpListener::bind(&self.listen.addr)
            .await
            .with_context(|| format!("binding {}", self.listen.addr))?;
        let settings = standalone::Settings {
            data_dir: self.data_dir,
            partitions: self.partitions,
            admin_keys: self.keys.admin_keys,
            analyst_keys: self.keys.analyst_keys,
            secret: self.secret,
            window_seconds: self.window_seconds,
            batch_max: self.batch_max,
            settle_interval: Duration::from_secs(self.settle_seconds.max(1)),
            sse_heartbeat: Duration::from_secs(self.sse_heartbeat_seconds.max(1)),
            demo: self.demo,
            limits: self.limits.config(),
            live_max_clients: self.live_max_clients,
            request_timeout: self.timeout.duration(),
        };
        standalone::run(listener, settings, shutdown_signal()).await
    }
}

#[derive(Args)]
struct Listen<const PORT: u16> {
    /// Address:port of the HTTP listener (port 0 picks a free one).
    #[arg(long = "listen", env = "TALLY_LISTEN", default_value_t = format!("127.0.0.1:{PORT}"))]
    addr: String,
}

#[derive(Args)]
struct Bus {
    /// NATS server(s), comma-separated.
    #[arg(long, env = "TALLY_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Number of vote log partitions (must agree across all services).
    #[arg(long, env = "TALLY_PARTITIONS", default_value_t = 1)]
    partitions: u16,
}

#[derive(Args)]
struct WarehouseArgs {
    #[arg(
        long,
        env = "TALLY_CLICKHOUSE_URL",
        default_value = "http://127.0.0.1:8123"
    )]
    clickhouse_url: String,
    #[arg(long, env = "TALLY_CLICKHOUSE_DATABASE", default_value = "tally")]
    clickhouse_database: String,
    #[arg(long, env = "TALLY_CLICKHOUSE_USER")]
    clickhouse_user: Option<String>,
    #[arg(long, env = "TALLY_CLICKHOUSE_PASSWORD", hide_env_values = true)]
    clickhouse_password: Option<String>,
}

#[derive(Args)]
struct Keys {
    /// API keys with the admin role, comma-separated.
    #[arg(
        long,
        env = "TALLY_ADMIN_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    admin_keys: Vec<String>,
    /// API keys with the analyst role, comma-separated.
    #[arg(
        long,
        env = "TALLY_ANALYST_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    analyst_keys: Vec<String>,
}

impl WarehouseArgs {
    /// Connects and applies pending migrations (idempotent; every service does it at start).
    async fn open(&self) -> anyhow::Result<(Arc<ClickHouseWarehouse>, Vec<u32>)> {
        let warehouse = ClickHouseWarehouse::new(&ClickHouseConfig {
            url: self.clickhouse_url.clone(),
            database: self.clickhouse_database.clone(),
            user: self.clickhouse_user.clone(),
            password: self.clickhouse_password.clone(),
        })?;
        let mut attempt = 0;
        loop {
            match warehouse.migrate().await {
                Ok(applied) => return Ok((Arc::new(warehouse), applied)),
                Err(err) if attempt < 30 => {
                    attempt += 1;
                    tracing::warn!(error = %err, "warehouse not ready, retrying migrations");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(err) => return Err(err).context("applying warehouse migrations"),
            }
        }
    }
}

impl Bus {
    async fn connect(&self) -> anyhow::Result<nats::Client> {
        nats::connect(&self.nats_url, Duration::from_secs(30))
            .await
            .context("connecting to NATS")
    }

    async fn log(&self, client: nats::Client) -> anyhow::Result<Arc<JetStreamLog>> {
        let options = nats::LogOptions {
            partitions: self.partitions,
        };
        Ok(Arc::new(
            JetStreamLog::open(client, options)
                .await
                .context("opening the vote stream")?,
        ))
    }
}

async fn bind(addr: &str, service: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    // Scripts and tests read this line to find the port.
    println!("tally {service} listening on http://{local}");
    Ok(listener)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let Some(command) = cli.command else {
        return cli.standalone.run().await;
    };
    match command {
        Command::Standalone(args) => args.run().await?,
        Command::Loadgen(args) => loadgen::run(args).await?,
        Command::BenchLogAppend {
            data_dir,
            votes,
            in_flight,
        } => log_baseline::run(votes, in_flight, &data_dir).await?,
        Command::BenchPublish {
            nats_url,
            votes,
            in_flight,
            through_log,
        } => log_baseline::publish(&nats_url, votes, in_flight, through_log).await?,
        Command::Migrate { warehouse } => {
            let (_, applied) = warehouse.open().await?;
            println!("warehouse schema is current (applied now: {applied:?})");
        }
        Command::Ingest {
            listen,
            bus,
            limits,
            timeout,
            secret,
        } => {
            let client = bus.connect().await?;
            let log = bus.log(client.clone()).await?;
            let registry = Arc::new(
                KvRegistry::open(client)
                    .await
                    .context("opening the poll registry")?,
            );
            let config = tally_ingest::Config {
                secret: secret.into_bytes(),
                limits: limits.config(),
                request_timeout: timeout.duration(),
                ..Default::default()
            };
            let listener = bind(&listen.addr, "ingest").await?;
            tally_ingest::run(
                listener,
                tally_ingest::Deps { log, registry },
                config,
                shutdown_signal(),
            )
            .await?;
        }
        Command::Processor {
            listen,
            bus,
            warehouse,
            own_partitions,
            window_seconds,
            batch_max,
            settle_seconds,
        } => {
            let (warehouse, _) = warehouse.open().await?;
            let client = bus.connect().await?;
            let log = bus.log(client.clone()).await?;
            let registry = Arc::new(
                KvRegistry::open(client.clone())
                    .await
                    .context("opening the poll registry")?,
            );
            let live = Arc::new(NatsLiveFeed::new(client));
            let config = tally_processor::Config {
                partitions: own_partitions,
                window_seconds,
                batch_max,
                settle_interval: Duration::from_secs(settle_seconds.max(1)),
                ..Default::default()
            };
            let listener = bind(&listen.addr, "processor").await?;
            let deps = tally_processor::Deps {
                log,
                registry,
                warehouse,
                live,
            };
            tally_processor::run(listener, deps, config, shutdown_signal()).await?;
        }
        Command::Token {
            poll,
            voter,
            ttl,
            secret,
        } => {
            let expiry = tally_core::time::now_ms() / 1000 + ttl as i64;
            println!(
                "{}",
                tally_core::token::mint(secret.as_bytes(), &poll, &voter, expiry)
            );
        }
        Command::Query {
            listen,
            bus,
            warehouse,
            keys,
            window_seconds,
            sse_heartbeat_seconds,
            secret,
            live_max_clients,
            timeout,
        } => {
            let (warehouse, _) = warehouse.open().await?;
            let client = bus.connect().await?;
            let registry = Arc::new(
                KvRegistry::open(client.clone())
                    .await
                    .context("opening the poll registry")?,
            );
            let live = Arc::new(NatsLiveFeed::new(client));
            let api_keys = ApiKeys::new(&keys.admin_keys, &keys.analyst_keys);
            if api_keys.is_empty() {
                tracing::warn!("no API keys configured: poll management and analytics will refuse every request");
            }
            let config = tally_query::Config {
                keys: api_keys,
                window_seconds,
                live_heartbeat: Duration::from_secs(sse_heartbeat_seconds.max(1)),
                secret: secret.map(String::into_bytes),
                live_max_clients,
                request_timeout: timeout.duration(),
                ..Default::default()
            };
            let listener = bind(&listen.addr, "query").await?;
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
        }
    }
    Ok(())
}
