//! The configuration model: clap argument blocks shared by the commands that take them.
//! Every setting is a flag and a `TALLY_*` variable (a flag wins); every default is written
//! once, here or as a constant of the crate that uses it. docs/OPERATIONS.md lists every
//! variable; a test (`env_table_in_the_docs_is_current`) keeps that list from drifting.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tally_clickhouse::{ClickHouseConfig, ClickHouseWarehouse};
use tally_core::auth::{ApiKeys, Role};
use tally_core::ports::Warehouse;
use tally_core::secrets::Secrets;
use tally_nats::{JetStreamLog, LogOptions};
use tokio::net::TcpListener;

/// The HTTP listener of a service, with the service's default port. (One type per port:
/// clap keeps a generated default once per definition, so a port chosen by a const generic
/// would leak from one service to the others.)
macro_rules! listen_args {
    ($name:ident, $port:literal) => {
        #[derive(Args, Clone)]
        pub struct $name {
            /// Address:port of the HTTP listener (port 0 picks a free one).
            #[arg(long = "listen", env = "TALLY_LISTEN", default_value = concat!("127.0.0.1:", $port))]
            pub addr: String,
        }

        impl $name {
            /// Binds the listener and prints the line scripts and tests read to find the
            /// port.
            pub async fn bind(&self, service: &str) -> anyhow::Result<TcpListener> {
                bind(&self.addr, service).await
            }
        }
    };
}

listen_args!(Listen8080, "8080");
listen_args!(Listen8081, "8081");
listen_args!(Listen8082, "8082");

async fn bind(addr: &str, service: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    println!("tally {service} listening on http://{local}");
    Ok(listener)
}

/// How long a request may take to be answered.
#[derive(Args, Clone)]
pub struct Timeout {
    /// Seconds a request may take to be answered (408 after).
    #[arg(
        long = "request-timeout-seconds",
        env = "TALLY_REQUEST_TIMEOUT_SECONDS",
        default_value_t = tally_service::http::REQUEST_TIMEOUT.as_secs_f64()
    )]
    pub seconds: f64,
}

impl Timeout {
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.seconds.clamp(0.1, 3600.0))
    }
}

/// The NATS servers and the partitioning of the vote log.
#[derive(Args, Clone)]
pub struct Bus {
    /// NATS server(s), comma-separated.
    #[arg(long, env = "TALLY_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Number of vote log partitions (must agree across all services).
    #[arg(long, env = "TALLY_PARTITIONS", default_value_t = 1)]
    pub partitions: u16,
}

impl Bus {
    pub async fn connect(&self) -> anyhow::Result<tally_nats::Client> {
        tally_nats::connect(&self.nats_url, Duration::from_secs(30))
            .await
            .context("connecting to NATS")
    }

    pub async fn log(&self, client: tally_nats::Client) -> anyhow::Result<Arc<JetStreamLog>> {
        let options = LogOptions {
            partitions: self.partitions,
        };
        Ok(Arc::new(
            JetStreamLog::open(client, options)
                .await
                .context("opening the vote stream")?,
        ))
    }

    pub async fn registry(
        &self,
        client: tally_nats::Client,
    ) -> anyhow::Result<Arc<tally_nats::KvRegistry>> {
        Ok(Arc::new(
            tally_nats::KvRegistry::open(client)
                .await
                .context("opening the poll registry")?,
        ))
    }
}

/// The ClickHouse warehouse.
#[derive(Args, Clone)]
pub struct WarehouseArgs {
    /// ClickHouse HTTP interface.
    #[arg(
        long,
        env = "TALLY_CLICKHOUSE_URL",
        default_value = "http://127.0.0.1:8123"
    )]
    pub clickhouse_url: String,
    /// ClickHouse database holding tally's tables (created when missing).
    #[arg(long, env = "TALLY_CLICKHOUSE_DATABASE", default_value = "tally")]
    pub clickhouse_database: String,
    /// ClickHouse user tally writes and reads as.
    #[arg(long, env = "TALLY_CLICKHOUSE_USER")]
    pub clickhouse_user: Option<String>,
    /// That user's password.
    #[arg(long, env = "TALLY_CLICKHOUSE_PASSWORD", hide_env_values = true)]
    pub clickhouse_password: Option<String>,
}

impl WarehouseArgs {
    /// Connects and applies pending migrations (idempotent; every service does it at start).
    pub async fn open(&self) -> anyhow::Result<(Arc<ClickHouseWarehouse>, Vec<u32>)> {
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
                Err(err) if attempt < 30 && err.is_transient() => {
                    attempt += 1;
                    tracing::warn!(error = %err.chain(), "warehouse not ready, retrying migrations");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(err) => return Err(err).context("applying warehouse migrations"),
            }
        }
    }
}

/// API keys per role.
#[derive(Args, Clone)]
pub struct Keys {
    /// API keys with the admin role, comma-separated.
    #[arg(
        long,
        env = "TALLY_ADMIN_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub admin_keys: Vec<String>,
    /// API keys with the analyst role, comma-separated.
    #[arg(
        long,
        env = "TALLY_ANALYST_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub analyst_keys: Vec<String>,
    /// API keys with the ingest role (batch import by integrations), comma-separated.
    #[arg(
        long,
        env = "TALLY_INGEST_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub ingest_keys: Vec<String>,
}

impl Keys {
    /// The keys by role; refuses keys shorter than 16 characters.
    pub fn api_keys(&self) -> anyhow::Result<ApiKeys> {
        ApiKeys::new(&[
            (Role::Admin, &self.admin_keys),
            (Role::Analyst, &self.analyst_keys),
            (Role::Ingest, &self.ingest_keys),
        ])
        .map_err(anyhow::Error::msg)
    }
}

/// Who the client is, and how often it may fail to authenticate.
#[derive(Args, Clone)]
pub struct ProxyArgs {
    /// Proxies (CIDRs, comma-separated) whose X-Forwarded-For names the client.
    #[arg(long, env = "TALLY_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Unknown API keys one client address may send before it must wait: N/s, N/min,
    /// N/10min, N/h or off.
    #[arg(long, env = "TALLY_AUTH_FAILURES_PER_IP", default_value = tally_service::http::guard::DEFAULT_AUTH_FAILURES)]
    pub auth_failures_per_ip: RateSetting,
}

/// A rate setting: `N/s`, `N/min`, `N/h` or `off`.
#[derive(Clone, Debug)]
pub struct RateSetting(Option<tally_ingest::limits::Rate>);

impl std::str::FromStr for RateSetting {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        tally_ingest::limits::Rate::parse(text).map(RateSetting)
    }
}

/// The rate limits of vote intake.
#[derive(Args, Clone)]
pub struct LimitArgs {
    /// Vote requests per client address (IPv6: per /64): N/s, N/min, N/h or off.
    #[arg(long, env = "TALLY_RATE_PER_IP", default_value = "100/s")]
    pub rate_per_ip: RateSetting,
    /// Votes per voter: N/s, N/min, N/h or off.
    #[arg(long, env = "TALLY_RATE_PER_VOTER", default_value = "10/min")]
    pub rate_per_voter: RateSetting,
    /// Votes per poll: N/s, N/min, N/h or off.
    #[arg(long, env = "TALLY_RATE_PER_POLL", default_value = "off")]
    pub rate_per_poll: RateSetting,
    /// New browser voters (tally_voter cookies) per client address: N/s, N/min, N/h or off.
    #[arg(long, env = "TALLY_RATE_NEW_VOTERS_PER_IP", default_value = "60/h")]
    pub rate_new_voters_per_ip: RateSetting,
}

impl LimitArgs {
    pub fn config(&self, proxies: &ProxyArgs) -> tally_ingest::limits::LimitConfig {
        tally_ingest::limits::LimitConfig {
            per_ip: self.rate_per_ip.0,
            per_voter: self.rate_per_voter.0,
            per_poll: self.rate_per_poll.0,
            new_voters_per_ip: self.rate_new_voters_per_ip.0,
            auth_failures: proxies.auth_failures_per_ip.0,
            trusted_proxies: proxies.trusted_proxies.clone(),
        }
    }
}

/// How the processor reads, windows and rolls up votes.
#[derive(Args, Clone)]
pub struct Processing {
    /// Width of the tumbling windows, in seconds.
    #[arg(long, env = "TALLY_WINDOW_SECONDS", default_value_t = tally_processor::DEFAULT_WINDOW_SECONDS)]
    pub window_seconds: u32,
    /// Largest batch read from the log and written at once.
    #[arg(long, env = "TALLY_BATCH_MAX", default_value_t = tally_processor::DEFAULT_BATCH_MAX)]
    pub batch_max: usize,
    /// Seconds between writes of settled segment rollups.
    #[arg(long, env = "TALLY_SETTLE_SECONDS", default_value_t = tally_processor::DEFAULT_SETTLE_SECONDS)]
    pub settle_seconds: u64,
}

impl Processing {
    /// The processor's configuration for `partitions` (empty: every partition).
    pub fn config(&self, partitions: Vec<u16>) -> tally_processor::Config {
        tally_processor::Config {
            partitions,
            window_seconds: self.window_seconds,
            batch_max: self.batch_max,
            settle_interval: Duration::from_secs(self.settle_seconds.max(1)),
            ..Default::default()
        }
    }
}

/// How live (SSE) streams are served.
#[derive(Args, Clone)]
pub struct Live {
    /// Seconds between SSE heartbeats.
    #[arg(long, env = "TALLY_SSE_HEARTBEAT_SECONDS", default_value_t = tally_query::DEFAULT_LIVE_HEARTBEAT_SECONDS)]
    pub sse_heartbeat_seconds: u64,
    /// Live (SSE) connections served at once; more get 503.
    #[arg(long, env = "TALLY_LIVE_MAX_CLIENTS", default_value_t = tally_query::DEFAULT_LIVE_MAX_CLIENTS)]
    pub live_max_clients: usize,
    /// Live connections from one client address; more get 503.
    #[arg(long, env = "TALLY_LIVE_MAX_PER_ADDRESS", default_value_t = tally_query::DEFAULT_LIVE_MAX_PER_ADDRESS)]
    pub live_max_per_address: usize,
    /// Query requests (results, management, analytics) per client address: N/s, N/min, N/h
    /// or off.
    #[arg(long, env = "TALLY_QUERY_RATE_PER_IP", default_value = "100/s")]
    pub query_rate_per_ip: RateSetting,
}

impl Live {
    /// The query service's configuration with these settings.
    pub fn config(
        &self,
        keys: ApiKeys,
        secrets: Option<Secrets>,
        proxies: &ProxyArgs,
        timeout: &Timeout,
    ) -> tally_query::Config {
        tally_query::Config {
            keys,
            live_heartbeat: Duration::from_secs(self.sse_heartbeat_seconds.max(1)),
            live_max_clients: self.live_max_clients,
            live_max_per_address: self.live_max_per_address,
            rate_per_ip: self.query_rate_per_ip.0,
            auth_failures: proxies.auth_failures_per_ip.0,
            trusted_proxies: proxies.trusted_proxies.clone(),
            secrets,
            request_timeout: timeout.duration(),
            ..Default::default()
        }
    }
}

/// Resolves when the process is asked to stop (SIGINT or SIGTERM).
pub async fn shutdown_signal() {
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
