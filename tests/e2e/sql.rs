//! Analysts' SQL and exports over real processes, on both deployments: after an exact-count
//! load, SQL counts per option equal /results, `ballots` holds every accepted vote, a join
//! to `poll_options` gives the labels, and exports read by Python's csv module and by
//! pyarrow equal the ground truth. The portable queries' answers are checked against
//! answers computed from the ground truth, so both deployments give the same ones.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::cluster::{option_counts, Cluster, Deployment, ADMIN_KEY, ANALYST_KEY};

const VOTERS: usize = 240;
const COUNTRIES: [&str; 4] = ["DE", "FR", "US", "GB"];
const COLOURS: [(&str, &str); 3] = [
    ("red", "Red"),
    ("blue", "Blue, dark"),
    ("green", "Green \"lime\""),
];

/// One counted ballot as the test knows it: answer ids, country, plan.
type Known = (Vec<String>, String, String);

/// What was voted: per poll, vote id -> its ballot.
#[derive(Default)]
struct Truth {
    votes: BTreeMap<String, BTreeMap<String, Known>>,
}

impl Truth {
    fn counts(&self, poll: &str) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for (answers, _, _) in self.votes[poll].values() {
            for answer in answers {
                *counts.entry(answer.clone()).or_default() += 1;
            }
        }
        counts
    }
}

async fn load(cluster: &Cluster) -> Result<Truth> {
    cluster
        .create_poll(json!({"id": "colours", "title": "Colours", "question": "Which colour?", "kind": "single",
            "dimensions": ["plan"],
            "options": COLOURS.iter().map(|(id, label)| json!({"id": id, "label": label})).collect::<Vec<_>>()}))
        .await?;
    cluster
        .create_poll(json!({"id": "features", "title": "Features", "question": "Which features?", "kind": "multi", "max_choices": 2,
            "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}, {"id": "c", "label": "C"}]}))
        .await?;
    let mut truth = Truth::default();
    for voter in 0..VOTERS {
        let country = COUNTRIES[voter % COUNTRIES.len()];
        let plan = if voter % 5 == 0 { "pro" } else { "free" };
        let colour = COLOURS[(voter * 7 / 3) % 3].0;
        let vote_id = format!("c-{voter}");
        let body = json!({"voter_id": format!("u-{voter}"), "vote_id": vote_id, "choice": colour,
            "segment": {"country": country, "plan": plan}});
        let (status, answer) = cluster.vote("colours", &body).await?;
        ensure!(status == 202, "vote {body}: {status} {answer}");
        truth.votes.entry("colours".into()).or_default().insert(
            vote_id,
            (vec![colour.to_owned()], country.to_owned(), plan.to_owned()),
        );
        if voter % 2 == 0 {
            let picks: Vec<&str> = match voter % 3 {
                0 => vec!["a"],
                1 => vec!["a", "c"],
                _ => vec!["b", "c"],
            };
            let vote_id = format!("f-{voter}");
            let body = json!({"voter_id": format!("u-{voter}"), "vote_id": vote_id, "choice": picks,
                "segment": {"country": country}});
            let (status, answer) = cluster.vote("features", &body).await?;
            ensure!(status == 202, "vote {body}: {status} {answer}");
            truth.votes.entry("features".into()).or_default().insert(
                vote_id,
                (
                    picks.iter().map(|p| (*p).to_owned()).collect(),
                    country.to_owned(),
                    String::new(),
                ),
            );
        }
    }
    Ok(truth)
}

/// `POST /v1/sql` as the analyst: the JSON document.
pub(crate) async fn sql(cluster: &Cluster, query: &str) -> Result<Value> {
    let response = cluster
        .http
        .post(format!("{}/v1/sql", cluster.query.url))
        .bearer_auth(ANALYST_KEY)
        .json(&json!({ "query": query }))
        .send()
        .await?;
    let status = response.status();
    let as_of = response
        .headers()
        .get("tally-as-of")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = response.json().await?;
    ensure!(status == 200, "{query}: {status} {body}");
    ensure!(
        as_of.as_deref() == Some(body["as_of"].to_string().as_str()),
        "Tally-As-Of {as_of:?} and as_of {} differ",
        body["as_of"]
    );
    Ok(body)
}

/// The rows of a query, every value as text (engines may type a count differently).
async fn sql_rows(cluster: &Cluster, query: &str) -> Result<Vec<Vec<String>>> {
    let doc = sql(cluster, query).await?;
    let rows = doc["rows"].as_array().context("rows")?;
    Ok(rows
        .iter()
        .map(|row| {
            row.as_array()
                .into_iter()
                .flatten()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .collect())
}

fn texts(rows: &[&[&str]]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|row| row.iter().map(|v| (*v).to_owned()).collect())
        .collect()
}

/// An export of `poll` in `format`: its `Tally-As-Of` and body.
async fn export(cluster: &Cluster, poll: &str, format: &str) -> Result<(u64, Vec<u8>)> {
    let response = cluster
        .http
        .get(format!(
            "{}/v1/polls/{poll}/export?format={format}",
            cluster.query.url
        ))
        .bearer_auth(ANALYST_KEY)
        .send()
        .await?;
    let status = response.status();
    let as_of = response
        .headers()
        .get("tally-as-of")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = response.bytes().await?.to_vec();
    ensure!(
        status == 200,
        "export {poll} {format}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    Ok((as_of.context("Tally-As-Of")?, body))
}

/// Runs `script` with python3 on `file`; its stdout, parsed as JSON.
fn python(script: &str, file: &std::path::Path) -> Result<Value> {
    let output = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(file)
        .output()
        .context("running python3")?;
    if !output.status.success() {
        bail!(
            "python3 failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

const READ_CSV: &str = "import csv, json, sys\n\
with open(sys.argv[1], newline='') as f:\n    rows = list(csv.DictReader(f))\n\
print(json.dumps(rows))";

const READ_PARQUET: &str = "import json, sys\nimport pyarrow.parquet as pq\n\
t = pq.read_table(sys.argv[1])\n\
meta = {k.decode(): v.decode() for k, v in (pq.ParquetFile(sys.argv[1]).metadata.metadata or {}).items()}\n\
rows = t.to_pylist()\n\
for r in rows:\n    r['received_at'] = r['received_at'].isoformat()\n\
print(json.dumps({'meta': meta, 'types': {f.name: str(f.type) for f in t.schema}, 'rows': rows}))";

// Exports are read back with pyarrow, so both tests say they need it.
mod sql_and_exports_equal_the_ground_truth {
    use crate::cluster::Deployment;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn needs_nats_clickhouse_pyarrow_distributed() -> anyhow::Result<()> {
        tally_testkit::require!(NatsServer, ClickHouse, Pyarrow);
        super::sql_and_exports_equal_the_ground_truth(Deployment::Distributed).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn needs_pyarrow_standalone() -> anyhow::Result<()> {
        tally_testkit::require!(Pyarrow);
        super::sql_and_exports_equal_the_ground_truth(Deployment::Standalone).await
    }
}

async fn sql_and_exports_equal_the_ground_truth(deployment: Deployment) -> Result<()> {
    let cluster = Cluster::start(deployment).await?;
    let truth = load(&cluster).await?;
    let mut results = BTreeMap::new();
    for (poll, votes) in &truth.votes {
        let doc = cluster
            .wait_for_total(poll, votes.len() as u64, Duration::from_secs(120))
            .await?;
        ensure!(option_counts(&doc) == truth.counts(poll), "{poll}: {doc}");
        results.insert(poll.clone(), doc);
    }

    // SQL counts per option equal /results, and `ballots` is every accepted vote.
    for poll in ["colours", "features"] {
        let rows = sql_rows(
            &cluster,
            &format!("SELECT option_id, count(*) AS n FROM answers WHERE poll_id = '{poll}' GROUP BY option_id ORDER BY option_id"),
        )
        .await?;
        let expected: Vec<Vec<String>> = truth
            .counts(poll)
            .into_iter()
            .map(|(option, n)| vec![option, n.to_string()])
            .collect();
        ensure!(
            rows == expected,
            "{poll}: SQL {rows:?} != truth {expected:?}"
        );
        let from_results: Vec<Vec<String>> = option_counts(&results[poll])
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(option, n)| vec![option, n.to_string()])
            .collect();
        ensure!(
            rows == from_results,
            "{poll}: SQL {rows:?} != /results {from_results:?}"
        );
    }
    let accepted: usize = truth.votes.values().map(BTreeMap::len).sum();
    ensure!(
        sql_rows(&cluster, "SELECT count(*) FROM ballots").await?
            == vec![vec![accepted.to_string()]],
        "ballots is not every accepted vote ({accepted})"
    );
    let doc = sql(
        &cluster,
        "SELECT count(*) FROM ballots WHERE poll_id = 'colours'",
    )
    .await?;
    ensure!(doc["as_of"].as_u64() >= results["colours"]["as_of"].as_u64());

    // Labels by a join, once the query service has recorded the polls.
    let labels_query = "SELECT o.label, count(*) AS n FROM answers a JOIN poll_options o \
        ON o.poll_id = a.poll_id AND o.option_id = a.option_id \
        WHERE a.poll_id = 'colours' GROUP BY o.label, o.position ORDER BY o.position";
    let counts = truth.counts("colours");
    let expected: Vec<Vec<String>> = COLOURS
        .iter()
        .map(|(id, label)| vec![(*label).to_owned(), counts[*id].to_string()])
        .collect();
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rows = sql_rows(&cluster, labels_query).await?;
        if rows == expected {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < end,
            "labels by join: {rows:?} != {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The portable subset: answers computed from the ground truth, so the same on both
    // deployments.
    let mut by_country: BTreeMap<&str, u64> = BTreeMap::new();
    let mut pro = 0;
    for (_, country, plan) in truth.votes["colours"].values() {
        *by_country.entry(country).or_default() += 1;
        pro += u64::from(plan == "pro");
    }
    let portable: Vec<(&str, Vec<Vec<String>>)> = vec![
        (
            "SELECT country, count(*) AS n FROM ballots WHERE poll_id = 'colours' GROUP BY country HAVING count(*) > 0 ORDER BY country",
            by_country.iter().map(|(c, n)| vec![(*c).to_owned(), n.to_string()]).collect(),
        ),
        (
            "SELECT count(DISTINCT voter_key), count(DISTINCT vote_id) FROM ballots WHERE poll_id = 'colours'",
            texts(&[&[&VOTERS.to_string(), &VOTERS.to_string()]]),
        ),
        (
            "SELECT count(*) FROM ballot_dimensions WHERE poll_id = 'colours' AND dimension = 'plan' AND value = 'pro'",
            vec![vec![pro.to_string()]],
        ),
        (
            "SELECT p.title, p.kind, count(*) FROM polls p JOIN ballots b ON b.poll_id = p.poll_id GROUP BY p.title, p.kind ORDER BY p.title",
            texts(&[&["Colours", "single", &VOTERS.to_string()], &["Features", "multi", &(VOTERS / 2).to_string()]]),
        ),
        (
            "SELECT count(*) FROM (SELECT date_trunc('hour', received_at) AS h, count(*) AS n FROM ballots GROUP BY date_trunc('hour', received_at)) x WHERE x.n > 0",
            vec![],
        ),
    ];
    for (query, expected) in &portable {
        let rows = sql_rows(&cluster, query).await?;
        if expected.is_empty() {
            // Received times are the server's: only that the query runs, with 1 or 2 hours.
            ensure!(
                rows.len() == 1 && ["1", "2"].contains(&rows[0][0].as_str()),
                "{query}: {rows:?}"
            );
            continue;
        }
        ensure!(&rows == expected, "{query}: {rows:?} != {expected:?}");
    }

    // Every example query of docs/SQL.md runs (on this load's polls).
    let docs = include_str!("../../docs/SQL.md");
    let examples = docs
        .split("```sql\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .flat_map(|block| block.split("\n\n"))
        .map(|query| {
            query
                .replace("spring-launch", "colours")
                .replace("support-nps", "features")
        })
        .filter(|query| !query.trim().is_empty())
        .collect::<Vec<_>>();
    ensure!(
        examples.len() >= 8,
        "examples in docs/SQL.md: {}",
        examples.len()
    );
    for query in &examples {
        sql(&cluster, query).await?;
    }

    // Exports: read by Python's csv module and by pyarrow, equal to the ground truth.
    let dir = tempfile::tempdir()?;
    let (as_of, csv) = export(&cluster, "colours", "csv").await?;
    ensure!(
        Some(as_of) == results["colours"]["as_of"].as_u64(),
        "export as of {as_of}, results as of {}",
        results["colours"]["as_of"]
    );
    let path = dir.path().join("colours.csv");
    std::fs::write(&path, csv)?;
    let rows = python(READ_CSV, &path)?;
    let labels: BTreeMap<&str, &str> = COLOURS.iter().copied().collect();
    let mut seen = BTreeMap::new();
    for row in rows.as_array().context("csv rows")? {
        let vote_id = row["vote_id"].as_str().context("vote_id")?.to_owned();
        let option = row["option_id"].as_str().context("option_id")?;
        ensure!(row["label"] == labels[option], "{row}");
        ensure!(row["as_of"] == as_of.to_string().as_str(), "{row}");
        seen.insert(
            vote_id,
            (
                vec![option.to_owned()],
                row["country"].as_str().unwrap_or("").to_owned(),
                row["plan"].as_str().unwrap_or("").to_owned(),
            ),
        );
    }
    ensure!(
        seen == truth.votes["colours"],
        "the CSV export is not the ground truth"
    );

    let (_, parquet) = export(&cluster, "features", "parquet").await?;
    let path = dir.path().join("features.parquet");
    std::fs::write(&path, parquet)?;
    let table = python(READ_PARQUET, &path)?;
    ensure!(
        table["meta"]["tally.as_of"].as_str()
            == Some(results["features"]["as_of"].to_string().as_str()),
        "{}",
        table["meta"]
    );
    ensure!(
        table["types"]["received_at"] == "timestamp[ms, tz=UTC]"
            && table["types"]["vote_id"] == "string",
        "{}",
        table["types"]
    );
    let mut seen = BTreeMap::new();
    for row in table["rows"].as_array().context("parquet rows")? {
        let choices: Vec<String> = serde_json::from_value(row["choices"].clone())?;
        let labels: Vec<String> = serde_json::from_value(row["labels"].clone())?;
        ensure!(
            labels == choices.iter().map(|c| c.to_uppercase()).collect::<Vec<_>>(),
            "{row}"
        );
        seen.insert(
            row["vote_id"].as_str().context("vote_id")?.to_owned(),
            (
                choices,
                row["country"].as_str().unwrap_or("").to_owned(),
                String::new(),
            ),
        );
    }
    ensure!(
        seen == truth.votes["features"],
        "the Parquet export is not the ground truth"
    );

    // The role matrix over real HTTP.
    for (key, status) in [
        (None, 401),
        (Some("an-unknown-key-0123456789"), 401),
        (Some(ADMIN_KEY), 200),
    ] {
        let mut request = cluster
            .http
            .post(format!("{}/v1/sql", cluster.query.url))
            .json(&json!({"query": "SELECT count(*) FROM polls"}));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let got = request.send().await?.status().as_u16();
        ensure!(got == status, "sql with {key:?}: {got}");
        let mut request = cluster
            .http
            .get(format!("{}/v1/polls/colours/export", cluster.query.url));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let got = request.send().await?.status().as_u16();
        ensure!(got == status, "export with {key:?}: {got}");
    }
    Ok(())
}
