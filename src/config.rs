//! The configuration model: clap argument blocks shared by the commands that take them.
//! Every setting is a flag and a `TALLY_*` variable (a flag wins); every default is written
//! once, here or as a constant of the crate that uses it. docs/OPERATIONS.md lists every
//! variable; a test (`env_table_in_the_docs_is_current`) keeps that list from drifting.

use std::path::PathBuf;
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
            /// Address:port of the HTTP listener, or an address alone for the service's
            /// default port (port 0 picks a free one).
            #[arg(long = "listen", env = "TALLY_LISTEN", default_value = concat!("127.0.0.1:", $port))]
            pub addr: String,
        }

        impl $name {
            /// Binds the listener and prints the line scripts and tests read to find the
            /// port.
            pub async fn bind(&self, service: &str) -> anyhow::Result<TcpListener> {
                bind(&with_default_port(&self.addr, $port), service).await
            }
        }
    };
}

listen_args!(Listen8080, "8080");
listen_args!(Listen8081, "8081");
listen_args!(Listen8082, "8082");

/// `addr`, with `port` added when it is an IP address alone (the image sets
/// `TALLY_LISTEN=0.0.0.0`, so each service listens on all interfaces on its own port).
fn with_default_port(addr: &str, port: &str) -> String {
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        Ok(ip) => format!("{ip}:{port}"),
        Err(_) => addr.to_owned(),
    }
}

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

/// How a service's listener treats connections.
#[derive(Args, Clone)]
pub struct Serving {
    /// Seconds a client has to send a request's headers, and to start its next request on a
    /// kept-alive connection (idle connections close after it).
    #[arg(long, env = "TALLY_HEADER_TIMEOUT_SECONDS", default_value_t = tally_service::http::serve::DEFAULT_HEADER_READ_TIMEOUT.as_secs_f64())]
    pub header_timeout_seconds: f64,
    /// Connections open at once; more are closed when accepted.
    #[arg(long, env = "TALLY_MAX_CONNECTIONS", default_value_t = tally_service::http::serve::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Connections open at once from one client address (IPv6: one /64).
    #[arg(long, env = "TALLY_MAX_CONNECTIONS_PER_ADDRESS", default_value_t = tally_service::http::serve::DEFAULT_MAX_PER_ADDRESS)]
    pub max_connections_per_address: usize,
    /// Seconds a stopping service waits for in-flight requests and streams to end.
    #[arg(long, env = "TALLY_SHUTDOWN_SECONDS", default_value_t = tally_service::http::serve::DEFAULT_DRAIN.as_secs_f64())]
    pub shutdown_seconds: f64,
}

impl Serving {
    pub fn config(&self) -> tally_service::http::ServeConfig {
        tally_service::http::ServeConfig {
            header_read_timeout: Duration::from_secs_f64(
                self.header_timeout_seconds.clamp(0.1, 3600.0),
            ),
            max_connections: self.max_connections.max(1),
            max_per_address: self.max_connections_per_address.max(1),
            drain: Duration::from_secs_f64(self.shutdown_seconds.clamp(0.0, 3600.0)),
        }
    }
}

/// The NATS servers, how tally proves who it is to them, and the partitioning of the vote
/// log. Give at most one of user and password, token, credentials file, nkey seed file
/// (docs/nats/README.md).
#[derive(Args, Clone)]
pub struct Bus {
    /// NATS server(s), comma-separated (nats://host:port, or tls://host:port for TLS).
    #[arg(long, env = "TALLY_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS user (with --nats-password).
    #[arg(long, env = "TALLY_NATS_USER")]
    pub nats_user: Option<String>,
    /// That NATS user's password.
    #[arg(long, env = "TALLY_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS token (a server with `authorization { token }`).
    #[arg(long, env = "TALLY_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// NATS credentials file (.creds: a user JWT and its nkey seed), for operator mode.
    #[arg(long, env = "TALLY_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// File holding the NATS user's nkey seed (SU…), for users listed by nkey.
    #[arg(long, env = "TALLY_NATS_NKEY_SEED_FILE")]
    pub nats_nkey_seed_file: Option<PathBuf>,
    /// Refuse NATS servers that do not speak TLS (implied by --nats-tls-ca, --nats-tls-cert
    /// and tls:// URLs).
    #[arg(long, env = "TALLY_NATS_TLS", value_parser = clap::builder::BoolishValueParser::new())]
    pub nats_tls: bool,
    /// PEM file of the CA that signed the NATS servers' certificates (else the system's).
    #[arg(long, env = "TALLY_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate, for NATS servers that verify clients (with --nats-tls-key).
    #[arg(long, env = "TALLY_NATS_TLS_CERT")]
    pub nats_tls_cert: Option<PathBuf>,
    /// PEM private key of --nats-tls-cert.
    #[arg(long, env = "TALLY_NATS_TLS_KEY")]
    pub nats_tls_key: Option<PathBuf>,
    /// Number of vote log partitions (must agree across all services, and with the count
    /// the stream's votes were written with: a service finding another refuses to start).
    #[arg(long, env = "TALLY_PARTITIONS", default_value_t = 1)]
    pub partitions: u16,
    /// Copies a NATS cluster keeps of the vote stream and the poll bucket (3 survives the
    /// loss of one server); a service finding fewer refuses to start.
    #[arg(long, env = "TALLY_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub replicas: u8,
    /// Partitions to a vote stream: the log becomes streams `VOTES`, `VOTES_1`, … of this
    /// many partitions each, whose leaders a NATS cluster spreads over its servers, so
    /// intake grows with servers. Unset or 0: one stream (must agree across all services,
    /// and with the streams found; `tally repartition` changes it).
    #[arg(long, env = "TALLY_PARTITIONS_PER_STREAM")]
    pub partitions_per_stream: Option<u16>,
}

impl Bus {
    pub fn connect_settings(&self) -> tally_nats::ConnectSettings {
        tally_nats::ConnectSettings {
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            token: self.nats_token.clone(),
            credentials_file: self.nats_creds.clone(),
            nkey_seed_file: self.nats_nkey_seed_file.clone(),
            tls: tally_nats::TlsSettings {
                required: self.nats_tls,
                ca_file: self.nats_tls_ca.clone(),
                client_cert: self.nats_tls_cert.clone(),
                client_key: self.nats_tls_key.clone(),
            },
            ..tally_nats::ConnectSettings::from_urls(&self.nats_url)
        }
    }

    pub async fn connect(&self) -> anyhow::Result<tally_nats::Client> {
        tally_nats::connect(self.connect_settings(), Duration::from_secs(30))
            .await
            .context("connecting to NATS")
    }

    pub async fn log(&self, client: tally_nats::Client) -> anyhow::Result<Arc<JetStreamLog>> {
        let options = LogOptions {
            partitions: self.partitions,
            replicas: self.replicas.into(),
            per_stream: self.partitions_per_stream.unwrap_or(0),
        };
        let log = while_electing(|| JetStreamLog::open(client.clone(), options.clone()))
            .await
            .context("opening the vote log")?;
        Ok(Arc::new(log))
    }

    pub async fn registry(
        &self,
        client: tally_nats::Client,
    ) -> anyhow::Result<Arc<tally_nats::KvRegistry>> {
        let replicas = self.replicas.into();
        let registry =
            while_electing(|| tally_nats::KvRegistry::open_replicated(client.clone(), replicas))
                .await
                .context("opening the poll registry")?;
        Ok(Arc::new(registry))
    }

    /// The processors' partition leases, lasting `ttl`.
    pub async fn leases(
        &self,
        client: tally_nats::Client,
        ttl: Duration,
    ) -> anyhow::Result<Arc<tally_nats::KvLeases>> {
        let replicas = self.replicas.into();
        let leases = while_electing(|| tally_nats::KvLeases::open(client.clone(), replicas, ttl))
            .await
            .context("opening the partition leases")?;
        Ok(Arc::new(leases))
    }
}

/// Retries `open` for up to 30 s while it fails as unavailable: a NATS cluster that has
/// just started (or lost a server) answers JetStream calls only once it has elected a
/// leader. A refusal (the stream's shape, permissions) fails at once.
async fn while_electing<T, F, Fut>(mut open: F) -> tally_core::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = tally_core::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match open().await {
            Err(err) if err.is_transient() && tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %err.chain(), "JetStream not ready; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
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
    /// The read-only ClickHouse user analysts' SQL runs as (a `readonly` profile, only the
    /// analyst tables granted); without one it runs as the main user with `readonly=2`.
    #[arg(long, env = "TALLY_CLICKHOUSE_ANALYST_USER")]
    pub clickhouse_analyst_user: Option<String>,
    /// That user's password.
    #[arg(
        long,
        env = "TALLY_CLICKHOUSE_ANALYST_PASSWORD",
        hide_env_values = true
    )]
    pub clickhouse_analyst_password: Option<String>,
    /// A sharded warehouse: the name of the cluster in the ClickHouse servers'
    /// `remote_servers` (with TALLY_CLICKHOUSE_SHARDS). Reads go through the Distributed
    /// tables of the server at TALLY_CLICKHOUSE_URL, any server of the cluster.
    #[arg(long, env = "TALLY_CLICKHOUSE_CLUSTER", requires = "clickhouse_shards")]
    pub clickhouse_cluster: Option<String>,
    /// A sharded warehouse: the HTTP URL of one server of each shard, comma-separated, in
    /// the cluster's shard order; log partition p is written to shard p mod their number.
    /// Fixed once rows are written (a changed list is refused at start).
    #[arg(
        long,
        env = "TALLY_CLICKHOUSE_SHARDS",
        value_delimiter = ',',
        requires = "clickhouse_cluster"
    )]
    pub clickhouse_shards: Vec<String>,
    /// Make tally's tables Replicated…MergeTree, under `/clickhouse/tables/{shard}/<db>/…` in
    /// ClickHouse Keeper (the servers need `zookeeper` and the `shard` and `replica` macros).
    /// Chosen when the tables are first made; a database made otherwise is refused.
    #[arg(
        long,
        env = "TALLY_CLICKHOUSE_REPLICATED",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub clickhouse_replicated: bool,
}

impl WarehouseArgs {
    /// Connects and applies pending migrations (idempotent; every service does it at start).
    pub async fn open(&self) -> anyhow::Result<(Arc<ClickHouseWarehouse>, Vec<u32>)> {
        let warehouse = ClickHouseWarehouse::new(&ClickHouseConfig {
            url: self.clickhouse_url.clone(),
            database: self.clickhouse_database.clone(),
            user: self.clickhouse_user.clone(),
            password: self.clickhouse_password.clone(),
            analyst_user: self.clickhouse_analyst_user.clone(),
            analyst_password: self.clickhouse_analyst_password.clone(),
            sharding: self
                .clickhouse_cluster
                .as_ref()
                .map(|cluster| tally_clickhouse::Sharding {
                    cluster: cluster.clone(),
                    shards: self
                        .clickhouse_shards
                        .iter()
                        .map(|url| url.trim().to_owned())
                        .filter(|url| !url.is_empty())
                        .collect(),
                }),
            replicated: self.clickhouse_replicated,
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

/// ClickHouse for a service that only reads a vote back now and then (ingest answering a
/// late retry on a poll whose votes left the log). Optional, and not connected at start:
/// the service runs and is ready without it.
#[derive(Args, Clone)]
pub struct LookupWarehouseArgs {
    /// ClickHouse HTTP interface. Ingest's is optional: it only answers late retries on
    /// polls whose votes left the NATS stream (without it those are answered `poll-closed`).
    #[arg(long, env = "TALLY_CLICKHOUSE_URL")]
    pub clickhouse_url: Option<String>,
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

impl LookupWarehouseArgs {
    pub fn open(&self) -> anyhow::Result<Option<Arc<dyn tally_core::ports::Warehouse>>> {
        let Some(url) = &self.clickhouse_url else {
            return Ok(None);
        };
        let warehouse = ClickHouseWarehouse::new(&ClickHouseConfig {
            url: url.clone(),
            database: self.clickhouse_database.clone(),
            user: self.clickhouse_user.clone(),
            password: self.clickhouse_password.clone(),
            analyst_user: None,
            analyst_password: None,
            // Late retries are read back through the Distributed tables of a sharded one.
            sharding: None,
            replicated: false,
        })?;
        Ok(Some(Arc::new(warehouse)))
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
    #[arg(long, env = "TALLY_RATE_PER_IP", default_value = tally_ingest::limits::DEFAULT_RATE_PER_IP)]
    pub rate_per_ip: RateSetting,
    /// Votes per voter: N/s, N/min, N/h or off.
    #[arg(long, env = "TALLY_RATE_PER_VOTER", default_value = tally_ingest::limits::DEFAULT_RATE_PER_VOTER)]
    pub rate_per_voter: RateSetting,
    /// Votes per poll: N/s, N/min, N/h or off.
    #[arg(long, env = "TALLY_RATE_PER_POLL", default_value = tally_ingest::limits::DEFAULT_RATE_PER_POLL)]
    pub rate_per_poll: RateSetting,
    /// New browser voters (tally_voter cookies) per client address: N/s, N/min, N/h or off.
    #[arg(long, env = "TALLY_RATE_NEW_VOTERS_PER_IP", default_value = tally_ingest::limits::DEFAULT_RATE_NEW_VOTERS_PER_IP)]
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
    #[arg(long, env = "TALLY_QUERY_RATE_PER_IP", default_value = tally_query::DEFAULT_RATE_PER_IP)]
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

/// The limits every analyst query (`POST /v1/sql`) runs under; nothing in a request can
/// change them.
#[derive(Args, Clone)]
pub struct SqlArgs {
    /// Seconds an analyst query may run, from receipt to its last row, before it is stopped
    #[arg(long, env = "TALLY_SQL_MAX_SECONDS", default_value_t = tally_core::analyst::DEFAULT_SQL_MAX_SECONDS)]
    pub sql_max_seconds: u64,
    /// Rows an analyst query may return (exports are not limited)
    #[arg(long, env = "TALLY_SQL_MAX_ROWS", default_value_t = tally_core::analyst::DEFAULT_SQL_MAX_ROWS)]
    pub sql_max_rows: u64,
    /// Bytes of the rows an analyst query may return, as the engine holds them
    #[arg(long, env = "TALLY_SQL_MAX_RESULT_BYTES", default_value_t = tally_core::analyst::DEFAULT_SQL_MAX_RESULT_BYTES)]
    pub sql_max_result_bytes: u64,
    /// Bytes of memory the engine may use for an analyst query (standalone: for all running
    /// analyst queries together)
    #[arg(long, env = "TALLY_SQL_MAX_MEMORY_BYTES", default_value_t = tally_core::analyst::DEFAULT_SQL_MAX_MEMORY_BYTES)]
    pub sql_max_memory_bytes: u64,
}

impl SqlArgs {
    pub fn limits(&self) -> tally_core::analyst::SqlLimits {
        tally_core::analyst::SqlLimits {
            max_time: Duration::from_secs(self.sql_max_seconds.max(1)),
            max_rows: self.sql_max_rows,
            max_result_bytes: self.sql_max_result_bytes,
            max_memory_bytes: self.sql_max_memory_bytes,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for a person reading a terminal.
    Text,
    /// One JSON object per line (fields, the request id of the request being handled).
    Json,
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

#[cfg(test)]
mod tests {
    use super::with_default_port;

    #[test]
    fn an_address_alone_listens_on_the_services_port() {
        assert_eq!(with_default_port("0.0.0.0", "8081"), "0.0.0.0:8081");
        assert_eq!(with_default_port("::", "8082"), "[::]:8082");
        assert_eq!(with_default_port("127.0.0.1:0", "8080"), "127.0.0.1:0");
        assert_eq!(with_default_port("[::1]:9000", "8080"), "[::1]:9000");
        assert_eq!(
            with_default_port("localhost:9000", "8080"),
            "localhost:9000"
        );
    }
}
