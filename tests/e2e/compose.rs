//! The deployment files an operator runs: `docker-compose.yml`, the Prometheus configuration
//! and alert rules beside it. No container engine runs here, so the compose file is checked
//! by what can read it (docker-compose's own `config`) and by running its tally services
//! natively: the same commands and environment, with the hosts `nats` and `clickhouse`
//! pointed at private servers and each listener at a free loopback port. An unknown
//! `TALLY_*` variable, a variable given to a service that does not read it, or a wrong
//! command fails here before it fails an operator.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use tally_testkit::{ManagedProcess, NatsServer};

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// What the test puts in `.env` (the secrets the compose file asks for).
fn test_env_file() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        ("TALLY_SECRET", "compose-test-secret-0123456789"),
        ("TALLY_ADMIN_KEYS", "compose-admin-key-0123456789"),
        ("TALLY_ANALYST_KEYS", "compose-analyst-key-0123456789"),
        ("TALLY_INGEST_KEYS", ""),
        ("TALLY_CLICKHOUSE_PASSWORD", "compose-clickhouse"),
        ("TALLY_CLICKHOUSE_ANALYST_PASSWORD", "compose-analyst"),
        ("GRAFANA_CLICKHOUSE_PASSWORD", "compose-grafana"),
        ("GRAFANA_ADMIN_PASSWORD", "compose-grafana-admin"),
    ])
}

/// `${NAME}`, `${NAME:-default}` and `${NAME:?message}` replaced as compose does.
fn interpolate(text: &str, vars: &BTreeMap<&str, &str>) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| anyhow!("unclosed ${{ in `{text}`"))?;
        let expr = &after[..end];
        let (name, fallback) = match expr.find([':', '-', '?']) {
            Some(at) => (&expr[..at], Some(&expr[at..])),
            None => (expr, None),
        };
        let value = vars.get(name).copied().filter(|v| !v.is_empty());
        match (value, fallback) {
            (Some(value), _) => out.push_str(value),
            (None, Some(f)) if f.starts_with(":-") => out.push_str(&f[2..]),
            (None, Some(f)) if f.starts_with(":?") => bail!("compose needs {name}: {}", &f[2..]),
            (None, _) => {}
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The compose file, its anchors merged and its variables filled from `vars`.
fn compose_file(vars: &BTreeMap<&str, &str>) -> Result<serde_yaml::Value> {
    let text = std::fs::read_to_string(repo_file("docker-compose.yml"))?;
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&interpolate(&text, vars)?)?;
    doc.apply_merge()?;
    // Merge keys nest one level down (environment maps) as well.
    if let Some(services) = doc
        .get_mut("services")
        .and_then(serde_yaml::Value::as_mapping_mut)
    {
        for (_, service) in services.iter_mut() {
            service.apply_merge()?;
            if let Some(env) = service.get_mut("environment") {
                env.apply_merge()?;
            }
        }
    }
    Ok(doc)
}

/// A tally service of the compose file: its command and environment.
struct TallyService {
    name: String,
    command: Vec<String>,
    env: BTreeMap<String, String>,
    healthcheck: Option<Vec<String>>,
    depends_on: Vec<String>,
}

fn strings(value: Option<&serde_yaml::Value>) -> Vec<String> {
    value
        .and_then(serde_yaml::Value::as_sequence)
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn scalar(value: &serde_yaml::Value) -> String {
    match value {
        serde_yaml::Value::String(s) => s.clone(),
        serde_yaml::Value::Number(n) => n.to_string(),
        serde_yaml::Value::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

fn tally_services(doc: &serde_yaml::Value) -> Result<Vec<TallyService>> {
    let services = doc
        .get("services")
        .and_then(serde_yaml::Value::as_mapping)
        .context("no services in docker-compose.yml")?;
    let mut found = Vec::new();
    for (name, service) in services {
        let image = service.get("image").map(scalar).unwrap_or_default();
        if !image.starts_with("tally:") {
            continue;
        }
        let env = service
            .get("environment")
            .and_then(serde_yaml::Value::as_mapping)
            .map(|map| {
                map.iter()
                    .map(|(k, v)| (scalar(k), scalar(v)))
                    .collect::<BTreeMap<_, _>>()
            })
            .unwrap_or_default();
        let depends_on = service
            .get("depends_on")
            .and_then(serde_yaml::Value::as_mapping)
            .map(|map| map.keys().map(scalar).collect())
            .unwrap_or_default();
        found.push(TallyService {
            name: scalar(name),
            command: strings(service.get("command")),
            env,
            healthcheck: service
                .get("healthcheck")
                .map(|check| strings(check.get("test"))),
            depends_on,
        });
    }
    Ok(found)
}

/// Every `TALLY_*` variable and the commands that read it, from the binary itself.
fn variables_by_command() -> Result<HashMap<String, Vec<String>>> {
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("config-table")
        .output()?;
    ensure!(output.status.success(), "tally config-table failed");
    let table = String::from_utf8(output.stdout)?;
    let mut known = HashMap::new();
    for line in table.lines().filter(|l| l.starts_with("| `TALLY_")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`').to_owned();
        let commands = cells[4].split(", ").map(str::to_owned).collect();
        known.insert(name, commands);
    }
    ensure!(!known.is_empty(), "tally config-table listed no variables");
    Ok(known)
}

/// The compose file names only variables tally reads, each for a command that reads it, and
/// commands that exist; images are pinned; healthchecks ask the port the service listens on.
#[test]
fn compose_file_speaks_tallys_language() -> Result<()> {
    let doc = compose_file(&test_env_file())?;
    let known = variables_by_command()?;
    let services = doc
        .get("services")
        .and_then(serde_yaml::Value::as_mapping)
        .context("services")?;
    let names: Vec<String> = services.keys().map(scalar).collect();
    for wanted in [
        "nats",
        "clickhouse",
        "migrate",
        "ingest",
        "processor",
        "query",
        "grafana",
        "prometheus",
    ] {
        ensure!(
            names.iter().any(|n| n == wanted),
            "compose has no service `{wanted}`"
        );
    }
    for (name, service) in services {
        let image = service.get("image").map(scalar).unwrap_or_default();
        let tag = image.rsplit_once(':').map(|(_, tag)| tag).unwrap_or("");
        ensure!(
            image.starts_with("tally:") || (!tag.is_empty() && tag != "latest"),
            "service `{}` uses image `{image}`, not pinned to a version",
            scalar(name)
        );
    }
    let tally = tally_services(&doc)?;
    ensure!(
        tally.len() == 4,
        "four tally services, found {}",
        tally.len()
    );
    for service in &tally {
        let command = service
            .command
            .first()
            .context("a tally service without a command")?;
        for (variable, value) in &service.env {
            if !variable.starts_with("TALLY_") {
                continue;
            }
            let Some(commands) = known.get(variable) else {
                bail!(
                    "service `{}` sets {variable}, which tally does not read",
                    service.name
                );
            };
            ensure!(
                commands.iter().any(|c| c == command),
                "service `{}` (tally {command}) sets {variable}={value}, which only {} read",
                service.name,
                commands.join(", ")
            );
        }
        if let Some(check) = &service.healthcheck {
            let listen = service
                .env
                .get("TALLY_LISTEN")
                .context("a probed service names its port")?;
            let port = listen.rsplit(':').next().unwrap_or_default();
            ensure!(
                check.len() == 4
                    && check[..3] == ["CMD", "tally", "healthcheck"]
                    && check[3] == format!("http://127.0.0.1:{port}/readyz"),
                "service `{}`'s healthcheck {check:?} does not ask its own port {port}",
                service.name
            );
        }
    }
    Ok(())
}

/// docker-compose itself accepts the file with the variables of `.env.example`, and refuses
/// it without them (no secret has a default baked in).
#[test]
fn needs_docker_compose_accepts_the_file() -> Result<()> {
    tally_testkit::require!(DockerCompose);
    let compose = tally_testkit::needs::docker_compose_binary().context("docker-compose")?;
    let run = |env_file: &Path| {
        Command::new(&compose)
            .arg("--project-directory")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .arg("--file")
            .arg(repo_file("docker-compose.yml"))
            .arg("--env-file")
            .arg(env_file)
            .args(["config", "--quiet"])
            .env_remove("TALLY_SECRET")
            .output()
    };
    let accepted = run(&repo_file(".env.example"))?;
    ensure!(
        accepted.status.success(),
        "docker-compose config refused the file: {}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    let empty = tempfile::NamedTempFile::new()?;
    let refused = run(empty.path())?;
    ensure!(
        !refused.status.success(),
        "docker-compose accepted the file without secrets"
    );
    ensure!(String::from_utf8_lossy(&refused.stderr).contains("TALLY_"));
    Ok(())
}

/// Prometheus accepts the scrape configuration and the alert rules shipped beside it.
#[test]
fn needs_promtool_accepts_the_prometheus_config_and_rules() -> Result<()> {
    tally_testkit::require!(Promtool);
    let promtool = tally_testkit::needs::promtool_binary().context("promtool")?;
    let output = Command::new(promtool)
        .args(["check", "config"])
        .arg(repo_file("docker/prometheus.yml"))
        .output()?;
    ensure!(
        output.status.success(),
        "promtool check config: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        String::from_utf8_lossy(&output.stdout).contains("rule files found"),
        "the config's rule file was not checked"
    );
    Ok(())
}

/// A tally service of the compose file running natively.
struct Native {
    process: ManagedProcess,
    url: String,
}

/// The compose environment of `service` for a native run: hosts and credentials of the
/// private servers, a free loopback port for the listener. Nothing else is changed.
fn native_env(
    service: &TallyService,
    nats_url: &str,
    clickhouse_url: &str,
    database: &str,
) -> Result<(BTreeMap<String, String>, Option<u16>)> {
    let mut env = service.env.clone();
    let mut port = None;
    for (key, value) in env.iter_mut() {
        match key.as_str() {
            "TALLY_NATS_URL" => {
                ensure!(value == "nats://nats:4222", "{key}={value}");
                *value = nats_url.to_owned();
            }
            "TALLY_CLICKHOUSE_URL" => {
                ensure!(value == "http://clickhouse:8123", "{key}={value}");
                *value = clickhouse_url.to_owned();
            }
            "TALLY_CLICKHOUSE_DATABASE" => *value = database.to_owned(),
            // The private ClickHouse knows `default` and the test profile's `tally_analyst`
            // (scripts/clickhouse/users.xml), both without a password.
            "TALLY_CLICKHOUSE_USER" => *value = "default".to_owned(),
            "TALLY_CLICKHOUSE_PASSWORD" | "TALLY_CLICKHOUSE_ANALYST_PASSWORD" => value.clear(),
            "TALLY_LISTEN" => {
                ensure!(
                    value.starts_with("0.0.0.0:"),
                    "{key}={value}: listens on all interfaces in a container"
                );
                let free = tally_testkit::free_port();
                *value = format!("127.0.0.1:{free}");
                port = Some(free);
            }
            _ => {}
        }
    }
    Ok((env, port))
}

/// Starts the compose file's tally services natively, in `depends_on` order, waiting on
/// each one's own healthcheck command; `migrate` must run to completion first.
async fn start_natively(
    services: &[TallyService],
    nats_url: &str,
    clickhouse_url: &str,
    database: &str,
    dir: &Path,
) -> Result<BTreeMap<String, Native>> {
    let mut done: Vec<String> = Vec::new();
    let mut running: BTreeMap<String, Native> = BTreeMap::new();
    let mut pending: Vec<&TallyService> = services.iter().collect();
    while !pending.is_empty() {
        let next = pending
            .iter()
            .position(|s| {
                s.depends_on
                    .iter()
                    .filter(|d| services.iter().any(|t| &t.name == *d))
                    .all(|d| done.contains(d))
            })
            .context("the tally services' depends_on form a cycle")?;
        let service = pending.remove(next);
        let (env, port) = native_env(service, nats_url, clickhouse_url, database)?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
        command
            .args(&service.command)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .envs(&env);
        let Some(port) = port else {
            // A one-shot service (migrate): it must finish, and succeed, before the others.
            let output = tokio::task::spawn_blocking(move || command.output()).await??;
            ensure!(
                output.status.success(),
                "service `{}` failed: {}",
                service.name,
                String::from_utf8_lossy(&output.stderr)
            );
            done.push(service.name.clone());
            continue;
        };
        let log = dir.join(format!("{}.log", service.name));
        let mut process = ManagedProcess::start(format!("tally {}", service.name), command, &log)?;
        // The compose healthcheck, asking the port the native run listens on.
        let check = service
            .healthcheck
            .clone()
            .context("a long-running service has a healthcheck")?;
        let path = check[3]
            .split_once("://")
            .and_then(|(_, rest)| rest.find('/').map(|at| rest[at..].to_owned()))
            .unwrap_or_default();
        let url = format!("http://127.0.0.1:{port}{path}");
        process
            .wait_ready(
                "passing its compose healthcheck",
                Duration::from_secs(90),
                || {
                    let (program, args) = (check[1].clone(), check[2].clone());
                    let url = url.clone();
                    async move {
                        ensure!(program == "tally");
                        let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_tally"))
                            .args([args.as_str(), url.as_str()])
                            .output()
                            .await?
                            .status;
                        Ok(status.success())
                    }
                },
            )
            .await?;
        done.push(service.name.clone());
        running.insert(
            service.name.clone(),
            Native {
                process,
                url: format!("http://127.0.0.1:{port}"),
            },
        );
    }
    Ok(running)
}

/// The value of an unlabelled (or summed) metric in a Prometheus text exposition.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The compose topology, run natively, takes votes to a live total: the services start with
/// the compose file's commands and environment, pass their healthchecks, count every vote
/// answered 202 exactly once; their `/metrics` pass `promtool check metrics`, ingest's
/// `tally_votes_accepted_total` equals the 202s and the processor's lag falls to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn needs_nats_clickhouse_promtool_compose_topology_runs_natively() -> Result<()> {
    tally_testkit::require!(NatsServer, ClickHouse, Promtool);
    let vars = test_env_file();
    let doc = compose_file(&vars)?;
    let services = tally_services(&doc)?;
    let nats = NatsServer::start().await?;
    let clickhouse = tally_testkit::clickhouse().await?;
    let database = tally_testkit::unique_name("compose");
    let dir = tempfile::tempdir()?;
    let mut running = start_natively(
        &services,
        &nats.url(),
        &clickhouse.url,
        &database,
        dir.path(),
    )
    .await?;
    let result = drive(&running, &vars).await;
    if result.is_err() {
        for (name, native) in &running {
            eprintln!("--- {name}\n{}", native.process.log_tail(40));
        }
    }
    for native in running.values_mut() {
        native.process.kill().await;
    }
    result
}

async fn drive(running: &BTreeMap<String, Native>, vars: &BTreeMap<&str, &str>) -> Result<()> {
    let http = reqwest::Client::new();
    let admin = vars["TALLY_ADMIN_KEYS"];
    let (ingest, query, processor) = (
        &running["ingest"].url,
        &running["query"].url,
        &running["processor"].url,
    );
    let poll: Value = http
        .post(format!("{query}/v1/polls"))
        .bearer_auth(admin)
        .json(&json!({
            "id": "compose-poll",
            "title": "Compose",
            "question": "Does the compose topology count?",
            "kind": "single",
            "options": [{"id": "yes", "label": "Yes"}, {"id": "no", "label": "No"}],
            "results_visibility": "live",
        }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    ensure!(poll["id"] == "compose-poll", "created {poll}");
    let mut accepted = 0u64;
    let mut expected: BTreeMap<&str, u64> = BTreeMap::new();
    for i in 0..40 {
        let choice = if i % 3 == 0 { "no" } else { "yes" };
        // The poll appears to ingest through the registry watch: retry until it knows it.
        let mut attempts = 0;
        loop {
            let response = http
                .post(format!("{ingest}/v1/polls/compose-poll/votes"))
                .json(&json!({"voter_id": format!("voter-{i}"), "choice": choice}))
                .send()
                .await?;
            match response.status().as_u16() {
                202 => break,
                404 if attempts < 100 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                status => bail!("vote {i}: {status} {}", response.text().await?),
            }
        }
        accepted += 1;
        *expected.entry(choice).or_default() += 1;
    }
    tally_testkit::wait_until(
        "the live total of every accepted vote",
        Duration::from_secs(60),
        || {
            let http = http.clone();
            let query = query.clone();
            async move {
                let results: Value = http
                    .get(format!("{query}/v1/polls/compose-poll/results"))
                    .send()
                    .await?
                    .json()
                    .await?;
                Ok(results["total_votes"].as_u64() == Some(accepted))
            }
        },
    )
    .await?;
    let results: Value = http
        .get(format!("{query}/v1/polls/compose-poll/results"))
        .send()
        .await?
        .json()
        .await?;
    for (option, count) in &expected {
        let shown = results["options"]
            .as_array()
            .and_then(|options| options.iter().find(|o| o["id"] == *option))
            .and_then(|o| o["count"].as_u64());
        ensure!(
            shown == Some(*count),
            "option {option}: {shown:?} counted, {count} sent: {results}"
        );
    }

    let promtool = tally_testkit::needs::promtool_binary().context("promtool")?;
    let mut pages = BTreeMap::new();
    for (name, base) in [
        ("ingest", ingest),
        ("query", query),
        ("processor", processor),
    ] {
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let mut child = tokio::process::Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all(text.as_bytes()).await?;
        drop(stdin);
        let output = child.wait_with_output().await?;
        ensure!(
            output.status.success(),
            "promtool check metrics on {name}'s /metrics: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        pages.insert(name, text);
    }
    let counted = metric_sum(&pages["ingest"], "tally_votes_accepted_total");
    ensure!(
        counted == accepted as f64,
        "tally_votes_accepted_total {counted}, 202s {accepted}"
    );
    ensure!(metric_sum(&pages["processor"], "tally_votes_counted_total") >= accepted as f64);
    ensure!(pages["query"].contains("tally_http_requests_total"));
    tally_testkit::wait_until("the processor's lag at 0", Duration::from_secs(30), || {
        let http = http.clone();
        let processor = processor.clone();
        async move {
            let text = http
                .get(format!("{processor}/metrics"))
                .send()
                .await?
                .text()
                .await?;
            Ok(text.contains("tally_processor_lag{")
                && metric_sum(&text, "tally_processor_lag") == 0.0)
        }
    })
    .await?;
    Ok(())
}
