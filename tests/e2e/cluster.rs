//! A private tally deployment for one test, in either shape:
//! - distributed: its own nats-server, its own ClickHouse database on the suite's
//!   ClickHouse server, and the three services as real processes of the `tally` binary;
//! - standalone: one `tally standalone` process on a private data directory.
//!
//! Either way the test can kill (SIGKILL) and restart what does the processing.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use tally_testkit::process::log_tail;
use tally_testkit::{ClickHouseServer, ManagedProcess, NatsCluster, NatsOptions, NatsServer};

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
pub const ANALYST_KEY: &str = "test-analyst-key-0123456789";
pub const SECRET: &str = "an-e2e-test-secret-of-enough-length";

/// The two deployments every end-to-end scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deployment {
    Distributed,
    Standalone,
}

/// Runs a scenario `async fn(Deployment) -> Result<()>` as two tests, one per deployment.
/// The distributed one needs a nats-server and a ClickHouse server, and says so by name.
#[macro_export]
macro_rules! for_each_deployment {
    ($scenario:ident) => {
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn needs_nats_clickhouse_distributed() -> anyhow::Result<()> {
                tally_testkit::require!(NatsServer, ClickHouse);
                super::$scenario($crate::cluster::Deployment::Distributed).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn standalone() -> anyhow::Result<()> {
                super::$scenario($crate::cluster::Deployment::Standalone).await
            }
        }
    };
}

/// One process of the `tally` binary (or, as an alias, another handle on one), which prints
/// `tally <service> listening on http://…` once it serves.
pub struct Service {
    name: &'static str,
    pub url: String,
    /// The `--listen` address it was given; a replacement gets the same.
    listen: String,
    /// Its stdout and stderr, one file per process.
    log: PathBuf,
    /// `None` for an alias, which owns no process.
    process: Option<ManagedProcess>,
}

impl Service {
    /// Another handle on the same endpoint, owning no process.
    fn alias(&self) -> Service {
        Service {
            name: self.name,
            url: self.url.clone(),
            listen: self.listen.clone(),
            log: self.log.clone(),
            process: None,
        }
    }

    async fn spawn(
        name: &'static str,
        env: &HashMap<String, String>,
        extra_env: &[(&str, &str)],
        dir: &std::path::Path,
    ) -> Result<Service> {
        Self::spawn_on(name, "127.0.0.1:0", env, extra_env, dir).await
    }

    async fn spawn_on(
        name: &'static str,
        listen: &str,
        env: &HashMap<String, String>,
        extra_env: &[(&str, &str)],
        dir: &std::path::Path,
    ) -> Result<Service> {
        let log = dir.join(format!(
            "{name}-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_micros()
        ));
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tally"));
        command
            .arg(name)
            .arg("--listen")
            .arg(listen)
            .envs(env)
            .envs(extra_env.iter().copied());
        let mut process = ManagedProcess::start(format!("tally {name}"), command, &log)?;
        let line = process
            .wait_for_line(" listening on http://", Duration::from_secs(90))
            .await?;
        let url = line.rsplit(' ').next().unwrap_or_default().to_owned();
        Ok(Service {
            name,
            url,
            listen: listen.to_owned(),
            log,
            process: Some(process),
        })
    }

    /// A new process of the same service on the same `--listen` address, with `extra_env`
    /// added; this one must have been killed.
    async fn replacement(
        &self,
        env: &HashMap<String, String>,
        extra_env: &[(&str, &str)],
        dir: &std::path::Path,
    ) -> Result<Service> {
        Service::spawn_on(self.name, &self.listen, env, extra_env, dir).await
    }

    /// SIGTERM, as an orchestrator stops a service; see [`ManagedProcess::terminate`].
    pub async fn terminate(
        &mut self,
        deadline: Duration,
    ) -> Result<(std::process::ExitStatus, Duration)> {
        let process = self.process.as_mut().context("an alias owns no process")?;
        process.terminate(deadline).await
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the process, as `kill -s` does.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let pid = self
            .process
            .as_ref()
            .and_then(|process| process.pid())
            .context("no running process to signal")?;
        let status = std::process::Command::new("kill")
            .args(["-s", signal, &pid.to_string()])
            .status()?;
        ensure!(status.success(), "kill -s {signal} {pid}: {status}");
        Ok(())
    }

    /// SIGKILL, like a crashed machine: no shutdown hooks run.
    pub async fn kill(&mut self) {
        if let Some(process) = self.process.as_mut() {
            process.kill().await;
        }
    }

    pub async fn exited(&mut self) -> bool {
        self.process.as_mut().is_none_or(|process| process.exited())
    }

    pub fn log_tail(&self) -> String {
        format!("--- {} ---\n{}", self.name, log_tail(&self.log, 40))
    }

    /// Everything this process logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// How a test wants its deployment beyond the defaults.
#[derive(Default)]
pub struct Options<'a> {
    /// Added to every process's environment.
    pub settings: &'a [(&'a str, &'a str)],
    /// Distributed: a clickhouse-server of this cluster's own, which the test may stop,
    /// instead of a database on the suite's shared server.
    pub own_clickhouse: bool,
    /// Distributed: JetStream fsyncs every write before acknowledging it, the production
    /// setting (`sync_interval: always`); the default syncs every two minutes.
    pub nats_sync_always: bool,
    /// Distributed: this many nats-servers clustered on loopback instead of one, every
    /// stream and bucket in that many copies (`TALLY_REPLICAS`), each service given all of
    /// them; 0 or 1 for one server.
    pub nats_servers: usize,
    /// Distributed: the warehouse sharded over the suite's two-shard ClickHouse cluster
    /// (`TALLY_CLICKHOUSE_CLUSTER`, `TALLY_CLICKHOUSE_SHARDS`), read through the second
    /// shard's server.
    pub clickhouse_shards: bool,
}

pub struct Cluster {
    pub deployment: Deployment,
    /// The cluster's nats-server (distributed only), which a test may kill and restart.
    nats: tokio::sync::Mutex<Option<NatsServer>>,
    /// The cluster's nats-servers, with [`Options::nats_servers`].
    nats_cluster: Option<tokio::sync::Mutex<NatsCluster>>,
    /// The cluster's own clickhouse-server, with [`Options::own_clickhouse`].
    own_clickhouse: Option<tokio::sync::Mutex<ClickHouseServer>>,
    clickhouse_url: Option<String>,
    pub database: String,
    env: HashMap<String, String>,
    dir: tempfile::TempDir,
    /// Where votes go: the ingest service, or the standalone process.
    pub ingest: Service,
    /// What processes votes: the processor, or the standalone process (which it owns).
    pub processor: tokio::sync::Mutex<Service>,
    /// Where polls, results and analytics are served.
    pub query: Service,
    pub http: reqwest::Client,
}

impl Cluster {
    /// A deployment with intake rate limits off, so load from one test address gets through.
    pub async fn start(deployment: Deployment) -> Result<Cluster> {
        Self::start_with(deployment, &[]).await
    }

    /// A deployment with `settings` added to every process's environment.
    pub async fn start_with(deployment: Deployment, settings: &[(&str, &str)]) -> Result<Cluster> {
        Self::launch(
            deployment,
            Options {
                settings,
                ..Default::default()
            },
        )
        .await
    }

    pub async fn launch(deployment: Deployment, options: Options<'_>) -> Result<Cluster> {
        let settings = options.settings;
        let dir = tempfile::tempdir()?;
        let mut env: HashMap<String, String> = [
            ("TALLY_SECRET", SECRET.to_owned()),
            ("TALLY_ADMIN_KEYS", ADMIN_KEY.to_owned()),
            ("TALLY_ANALYST_KEYS", ANALYST_KEY.to_owned()),
            ("TALLY_SSE_HEARTBEAT_SECONDS", "1".to_owned()),
            // Settled rollups every few seconds, so every scenario reads both levels.
            ("TALLY_SETTLE_SECONDS", "3".to_owned()),
            ("RUST_LOG", "info".to_owned()),
            ("TALLY_RATE_PER_IP", "off".to_owned()),
            ("TALLY_RATE_PER_VOTER", "off".to_owned()),
            ("TALLY_RATE_NEW_VOTERS_PER_IP", "off".to_owned()),
            ("TALLY_QUERY_RATE_PER_IP", "off".to_owned()),
            ("TALLY_AUTH_FAILURES_PER_IP", "off".to_owned()),
            // A restarted processor takes its own partition leases back at once.
            ("TALLY_PROCESSOR_ID", "processor".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (key, value) in settings {
            env.insert((*key).to_owned(), (*value).to_owned());
        }
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .timeout(Duration::from_secs(30))
            .build()?;
        match deployment {
            Deployment::Distributed => {
                let (nats, nats_cluster) = if options.nats_servers > 1 {
                    let servers = NatsCluster::start(options.nats_servers).await?;
                    env.insert("TALLY_NATS_URL".into(), servers.urls());
                    env.insert("TALLY_REPLICAS".into(), options.nats_servers.to_string());
                    (None, Some(servers))
                } else {
                    let server = NatsServer::start_with(NatsOptions {
                        sync_interval: options.nats_sync_always.then(|| "always".to_owned()),
                    })
                    .await?;
                    env.insert("TALLY_NATS_URL".into(), server.url());
                    (Some(server), None)
                };
                let own_clickhouse = if options.own_clickhouse {
                    Some(ClickHouseServer::start().await?)
                } else {
                    None
                };
                let clickhouse_url = match &own_clickhouse {
                    Some(server) => server.url().to_owned(),
                    None if options.clickhouse_shards => {
                        let shards = tally_testkit::clickhouse_cluster().await?;
                        env.insert(
                            "TALLY_CLICKHOUSE_CLUSTER".into(),
                            tally_testkit::ClickHouseCluster::NAME.into(),
                        );
                        env.insert("TALLY_CLICKHOUSE_SHARDS".into(), shards.shards.join(","));
                        shards.shards[1].clone()
                    }
                    None => tally_testkit::clickhouse().await?.url.clone(),
                };
                let database = tally_testkit::unique_name("e2e");
                env.insert("TALLY_CLICKHOUSE_URL".into(), clickhouse_url.clone());
                env.insert("TALLY_CLICKHOUSE_DATABASE".into(), database.clone());
                // Analysts' SQL as the read-only user of scripts/clickhouse/users.xml, as in
                // production (the processor and ingest do not read this; only query does).
                env.insert(
                    "TALLY_CLICKHOUSE_ANALYST_USER".into(),
                    "tally_analyst".into(),
                );
                // The processor first: it applies migrations and creates the stream others use.
                let processor = Service::spawn("processor", &env, &[], dir.path()).await?;
                let ingest = Service::spawn("ingest", &env, &[], dir.path()).await?;
                let query = Service::spawn("query", &env, &[], dir.path()).await?;
                Ok(Cluster {
                    deployment,
                    nats: tokio::sync::Mutex::new(nats),
                    nats_cluster: nats_cluster.map(tokio::sync::Mutex::new),
                    own_clickhouse: own_clickhouse.map(tokio::sync::Mutex::new),
                    clickhouse_url: Some(clickhouse_url),
                    database,
                    env,
                    dir,
                    ingest,
                    processor: tokio::sync::Mutex::new(processor),
                    query,
                    http,
                })
            }
            Deployment::Standalone => {
                env.insert(
                    "TALLY_DATA_DIR".into(),
                    dir.path().join("data").to_string_lossy().into_owned(),
                );
                // A fixed port, so the process comes back at the same address after a kill.
                let listen = format!("127.0.0.1:{}", tally_testkit::free_port());
                let process =
                    Service::spawn_on("standalone", &listen, &env, &[], dir.path()).await?;
                Ok(Cluster {
                    deployment,
                    nats: tokio::sync::Mutex::new(None),
                    nats_cluster: None,
                    own_clickhouse: None,
                    clickhouse_url: None,
                    database: String::new(),
                    env,
                    dir,
                    ingest: process.alias(),
                    query: process.alias(),
                    processor: tokio::sync::Mutex::new(process),
                    http,
                })
            }
        }
    }

    /// SIGTERM to the process serving live streams (query, or standalone), waiting up to
    /// `deadline` for it to exit: its status and how long it took.
    pub async fn terminate_query(
        &mut self,
        deadline: Duration,
    ) -> Result<(std::process::ExitStatus, Duration)> {
        match self.deployment {
            Deployment::Distributed => self.query.terminate(deadline).await,
            Deployment::Standalone => self.processor.get_mut().terminate(deadline).await,
        }
    }

    /// Kills the processor (SIGKILL) and starts a new one with `extra_env` added. In
    /// standalone that is the whole process, which comes back on the same address.
    pub async fn restart_processor(&self, extra_env: &[(&str, &str)]) -> Result<()> {
        let mut processor = self.processor.lock().await;
        processor.kill().await;
        *processor = processor
            .replacement(&self.env, extra_env, self.dir.path())
            .await?;
        Ok(())
    }

    /// Kills the processor, deletes every row of the rollup `tables` (`segment_rollups`,
    /// `segment_rollups_fresh`) and starts it again: both, as after an upgrade from a version
    /// that wrote none; the fresh ones alone, as after a crash that lost only those.
    pub async fn drop_rollups_and_restart(&self, tables: &[&str]) -> Result<()> {
        let mut processor = self.processor.lock().await;
        processor.kill().await;
        match self.deployment {
            Deployment::Distributed => {
                for table in tables {
                    self.clickhouse_query(&format!("TRUNCATE TABLE {table}"))
                        .await?;
                }
            }
            Deployment::Standalone => {
                for table in tables {
                    let dir = self.dir.path().join("data").join("warehouse").join(table);
                    ensure!(dir.is_dir(), "no {} in the data directory", dir.display());
                    std::fs::remove_dir_all(&dir)?;
                }
            }
        }
        *processor = processor
            .replacement(&self.env, &[], self.dir.path())
            .await?;
        Ok(())
    }

    /// One more ingest replica against the same log; in standalone, the same process again.
    pub async fn spawn_ingest(&self) -> Result<Service> {
        match self.deployment {
            Deployment::Distributed => {
                Service::spawn("ingest", &self.env, &[], self.dir.path()).await
            }
            Deployment::Standalone => Ok(self.ingest.alias()),
        }
    }

    /// One more processor sharing the partitions, named `id` among them; distributed only.
    pub async fn spawn_processor(&self, id: &str) -> Result<Service> {
        ensure!(
            self.deployment == Deployment::Distributed,
            "standalone has one processor"
        );
        Service::spawn(
            "processor",
            &self.env,
            &[("TALLY_PROCESSOR_ID", id)],
            self.dir.path(),
        )
        .await
    }

    /// A setting every process was given, or `default`.
    fn setting<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        Ok(self.env.get(name).map_or(Ok(default), |s| s.parse())?)
    }

    /// A client of the cluster's NATS; distributed only.
    async fn nats_client(&self) -> Result<tally_nats::Client> {
        let url = self.env.get("TALLY_NATS_URL").context("no NATS")?;
        Ok(tally_nats::connect(url, Duration::from_secs(10)).await?)
    }

    /// Runs `tally <args>` with this deployment's settings, to its end.
    pub async fn tally_command(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"));
        command.args(args).envs(&self.env).env("RUST_LOG", "warn");
        Ok(tokio::time::timeout(Duration::from_secs(60), command.output()).await??)
    }

    /// Who holds each partition's lease now (partition → processor id); distributed only.
    pub async fn lease_owners(&self) -> Result<BTreeMap<u16, String>> {
        use tally_core::ports::PartitionLeases;
        let ttl = Duration::from_secs(self.setting("TALLY_LEASE_SECONDS", 10)?);
        let leases = tally_nats::KvLeases::open(self.nats_client().await?, 1, ttl).await?;
        Ok(leases.owners().await?)
    }

    /// The sequence of a poll's newest vote in the NATS stream, in whichever partition;
    /// `None` when the stream holds none of its votes. Distributed only.
    pub async fn poll_tip_in_log(&self, poll: &str) -> Result<Option<u64>> {
        use tally_core::ports::VoteLog;
        let log = self.vote_log().await?;
        let partitions = log.partitions();
        let retention = log.retention().context("the NATS log purges")?;
        let mut tip = None;
        for partition in 0..partitions {
            tip = tip.max(retention.poll_tip(poll, partition).await?);
        }
        Ok(tip)
    }

    /// The votes each stream of the vote log holds now (by stream name); distributed only.
    pub async fn vote_streams(&self) -> Result<BTreeMap<String, u64>> {
        let log = self.vote_log().await?;
        Ok(log.held_per_stream().await?.into_iter().collect())
    }

    /// The cluster's vote log, laid out as its services have it; distributed only.
    async fn vote_log(&self) -> Result<tally_nats::JetStreamLog> {
        let options = tally_nats::LogOptions {
            partitions: self.setting("TALLY_PARTITIONS", 1)?,
            per_stream: self.setting("TALLY_PARTITIONS_PER_STREAM", 0)?,
            ..Default::default()
        };
        Ok(tally_nats::JetStreamLog::open(self.nats_client().await?, options).await?)
    }

    /// The index of the clustered nats-server leading stream `stream` (`VOTES`, …) now; see
    /// [`Options::nats_servers`].
    pub async fn nats_stream_leader(&self, stream: &str) -> Result<usize> {
        let servers = self.nats_cluster.as_ref().context("no NATS cluster")?;
        servers.lock().await.stream_leader(stream).await
    }

    /// Member `index` of the clustered nats-servers, to kill or restart.
    async fn nats_member(
        &self,
        index: usize,
    ) -> Result<tokio::sync::MappedMutexGuard<'_, NatsServer>> {
        let servers = self.nats_cluster.as_ref().context("no NATS cluster")?;
        tokio::sync::MutexGuard::try_map(servers.lock().await, |c| c.servers.get_mut(index))
            .map_err(|_| anyhow::anyhow!("no NATS cluster member {index}"))
    }

    /// Kills member `index` of the clustered nats-servers (SIGKILL).
    pub async fn kill_nats_member(&self, index: usize) -> Result<()> {
        self.nats_member(index).await?.kill().await;
        Ok(())
    }

    /// Starts member `index` of the clustered nats-servers again.
    pub async fn restart_nats_member(&self, index: usize) -> Result<()> {
        self.nats_member(index).await?.restart().await
    }

    /// Kills the nats-server (SIGKILL); distributed only.
    pub async fn kill_nats(&self) -> Result<()> {
        let mut nats = self.nats.lock().await;
        nats.as_mut()
            .context("this deployment has no NATS")?
            .kill()
            .await;
        Ok(())
    }

    /// Starts the nats-server again on its port and store directory.
    pub async fn restart_nats(&self) -> Result<()> {
        let mut nats = self.nats.lock().await;
        nats.as_mut()
            .context("this deployment has no NATS")?
            .restart()
            .await
    }

    /// Kills the cluster's own clickhouse-server (SIGKILL); see [`Options::own_clickhouse`].
    pub async fn kill_clickhouse(&self) -> Result<()> {
        let server = self
            .own_clickhouse
            .as_ref()
            .context("this cluster has no clickhouse-server of its own")?;
        server.lock().await.kill().await;
        Ok(())
    }

    /// Starts the cluster's own clickhouse-server again on its ports and data.
    pub async fn restart_clickhouse(&self) -> Result<()> {
        let server = self
            .own_clickhouse
            .as_ref()
            .context("this cluster has no clickhouse-server of its own")?;
        server.lock().await.restart().await
    }

    /// Everything the running processor logged.
    pub async fn processor_log(&self) -> String {
        self.processor.lock().await.log_text()
    }

    pub async fn processor_exited(&self) -> bool {
        self.processor.lock().await.exited().await
    }

    pub fn logs(&self) -> String {
        let processor = self
            .processor
            .try_lock()
            .map(|p| p.log_tail())
            .unwrap_or_default();
        match self.deployment {
            Deployment::Distributed => {
                [processor, self.ingest.log_tail(), self.query.log_tail()].join("\n")
            }
            Deployment::Standalone => processor,
        }
    }

    pub async fn create_poll(&self, body: Value) -> Result<Value> {
        let response = self
            .http
            .post(format!("{}/v1/polls", self.query.url))
            .bearer_auth(ADMIN_KEY)
            .json(&body)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if status != 201 {
            bail!("creating a poll answered {status}: {body}");
        }
        Ok(body)
    }

    pub async fn vote(&self, poll: &str, body: &Value) -> Result<(u16, Value)> {
        self.vote_at(&self.ingest.url, poll, body).await
    }

    /// Waits until ingest sees a poll's new status: a probe vote with an option no poll has
    /// is refused with 422 while ingest sees the poll open and with 409/410 while it sees it
    /// closed/archived; this waits for `status`
    /// with the change, so probing never counts anything. Changes reach every ingest replica
    /// through the registry watch within milliseconds; a vote racing a close may still count.
    pub async fn wait_for_ingest_status(&self, poll: &str, status: u16) -> Result<()> {
        let probe =
            serde_json::json!({"voter_id": "status-probe", "choice": "no-such-option-anywhere"});
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (got, answer) = self.vote(poll, &probe).await?;
            if got == status {
                return Ok(());
            }
            if ![409, 410, 422].contains(&got) || tokio::time::Instant::now() > end {
                bail!("ingest answered {got} for poll {poll} while waiting for {status}: {answer}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Votes through the ingest service at `base`.
    pub async fn vote_at(&self, base: &str, poll: &str, body: &Value) -> Result<(u16, Value)> {
        let response = self
            .http
            .post(format!("{base}/v1/polls/{poll}/votes"))
            .json(body)
            .send()
            .await?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    pub async fn results(&self, poll: &str) -> Result<Value> {
        let response = self
            .http
            .get(format!("{}/v1/polls/{poll}/results", self.query.url))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("results answered {}", response.status());
        }
        Ok(response.json().await?)
    }

    pub async fn analyst_get(&self, path: &str) -> Result<Value> {
        let response = self
            .http
            .get(format!("{}{path}", self.query.url))
            .bearer_auth(ANALYST_KEY)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            bail!("GET {path} answered {status}: {body}");
        }
        Ok(body)
    }

    /// Waits until a poll's results count `total` votes.
    pub async fn wait_for_total(
        &self,
        poll: &str,
        total: u64,
        deadline: Duration,
    ) -> Result<Value> {
        let end = tokio::time::Instant::now() + deadline;
        loop {
            let results = self.results(poll).await;
            if let Ok(results) = &results {
                if results["total_votes"].as_u64() == Some(total) {
                    return Ok(results.clone());
                }
            }
            if tokio::time::Instant::now() > end {
                bail!(
                    "poll {poll} did not reach {total} votes in time (last: {results:?})\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A breakdown (`path` from `/v1/polls/…`) once it covers `ballots` votes. Breakdowns
    /// are exact as of the processor's latest segment rollups, which trail the live totals
    /// by about a second; a breakdown never covers more than was voted.
    pub async fn breakdown(&self, path: &str, ballots: u64) -> Result<Value> {
        let end = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let breakdown = self.analyst_get(path).await?;
            let covered: u64 = breakdown["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|g| g["total_votes"].as_u64().unwrap_or(0))
                .sum();
            ensure!(
                covered <= ballots,
                "{path} covers {covered} votes, more than the {ballots} voted: {breakdown}"
            );
            if covered == ballots {
                return Ok(breakdown);
            }
            ensure!(
                tokio::time::Instant::now() < end,
                "{path} still covers {covered} of {ballots} votes: {breakdown}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A poll's time-series points summed per option (options with no votes left out).
    pub async fn timeseries_sums(&self, poll: &str) -> Result<BTreeMap<String, u64>> {
        let series = self
            .analyst_get(&format!("/v1/polls/{poll}/timeseries?step=1m"))
            .await?;
        let mut sums: BTreeMap<String, u64> = BTreeMap::new();
        for point in series["points"].as_array().into_iter().flatten() {
            for (option, count) in point["options"].as_object().into_iter().flatten() {
                *sums.entry(option.clone()).or_default() += count.as_u64().unwrap_or(0);
            }
        }
        sums.retain(|_, count| *count > 0);
        Ok(sums)
    }

    /// Waits until a poll's time series sums to `counts` per option (options with no votes
    /// left out). Window rows trail the live totals by about a second; a time series that
    /// counts more votes than `counts` fails at once, as does one not there in 60 s.
    pub async fn wait_for_timeseries(
        &self,
        poll: &str,
        counts: &BTreeMap<String, u64>,
    ) -> Result<()> {
        let want: u64 = counts.values().sum();
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let sums = self.timeseries_sums(poll).await?;
            if &sums == counts {
                return Ok(());
            }
            ensure!(
                sums.values().sum::<u64>() < want && tokio::time::Instant::now() < end,
                "{poll}: time-series sums {sums:?}, expected {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs a statement on this cluster's ClickHouse database and returns its TSV output;
    /// `None` in standalone, which has no ClickHouse.
    pub async fn clickhouse_query(&self, sql: &str) -> Result<Option<String>> {
        let Some(url) = &self.clickhouse_url else {
            return Ok(None);
        };
        let response = self
            .http
            .post(format!("{url}/?database={}", self.database))
            .body(sql.to_owned())
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("clickhouse answered {status}: {text}");
        }
        Ok(Some(text.trim().to_owned()))
    }
}

/// The slug of a problem+json answer (the last part of its `type`).
pub fn slug(answer: &Value) -> &str {
    answer["type"]
        .as_str()
        .unwrap_or("")
        .rsplit('/')
        .next()
        .unwrap_or("")
}

/// Expects `(status, slug)` of an answer, naming `what` when it is not.
pub fn expect(what: &str, got: (u16, Value), status: u16, wanted: &str) -> Result<Value> {
    ensure!(
        got.0 == status && slug(&got.1) == wanted,
        "{what}: expected {status} {wanted}, got {} {}",
        got.0,
        got.1
    );
    Ok(got.1)
}

/// Per-option counts of a results document or a breakdown group, options with no votes
/// left out.
pub fn option_counts(doc: &Value) -> BTreeMap<String, u64> {
    doc["options"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| Some((o["id"].as_str()?.to_owned(), o["count"].as_u64()?)))
        .filter(|(_, count)| *count > 0)
        .collect()
}

/// A Server-Sent Events client that records every event it receives.
pub struct SseClient {
    pub events: tokio::sync::mpsc::UnboundedReceiver<(String, Option<String>, String)>,
}

impl SseClient {
    pub async fn connect(
        http: &reqwest::Client,
        url: &str,
        last_event_id: Option<&str>,
    ) -> Result<SseClient> {
        use futures::StreamExt;
        let mut request = http.get(url).timeout(Duration::from_secs(3600));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await?;
        if response.status() != 200 {
            bail!("SSE connect answered {}", response.status());
        }
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        if !content_type.starts_with("text/event-stream") {
            bail!("SSE content type is {content_type}");
        }
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let mut body = response.bytes_stream();
        tokio::spawn(async move {
            let mut buffer = String::new();
            while let Some(Ok(chunk)) = body.next().await {
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buffer.find("\n\n") {
                    let block: String = buffer.drain(..end + 2).collect();
                    let (mut kind, mut id, mut data) = ("message".to_owned(), None, String::new());
                    let mut comment = None;
                    for line in block.lines() {
                        if let Some(rest) = line.strip_prefix("event:") {
                            kind = rest.trim().to_owned();
                        } else if let Some(rest) = line.strip_prefix("id:") {
                            id = Some(rest.trim().to_owned());
                        } else if let Some(rest) = line.strip_prefix("data:") {
                            data.push_str(rest.trim_start());
                        } else if let Some(rest) = line.strip_prefix(':') {
                            comment = Some(rest.trim().to_owned());
                        }
                    }
                    let event = match comment {
                        Some(comment) if data.is_empty() => ("comment".to_owned(), None, comment),
                        _ => (kind, id, data),
                    };
                    if tx.send(event).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(SseClient { events })
    }

    /// The next event that is not a comment, within `deadline`.
    pub async fn next_event(
        &mut self,
        deadline: Duration,
    ) -> Result<(String, Option<String>, Value)> {
        let end = tokio::time::Instant::now() + deadline;
        loop {
            let event = tokio::time::timeout_at(end, self.events.recv())
                .await
                .context("no SSE event in time")?
                .context("SSE stream ended")?;
            if event.0 == "comment" {
                continue;
            }
            let data = serde_json::from_str(&event.2).unwrap_or(Value::String(event.2.clone()));
            return Ok((event.0, event.1, data));
        }
    }
}
