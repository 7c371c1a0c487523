//! The Grafana boards of `dashboards/grafana/boards`: every ClickHouse panel's SQL, taken
//! from the board JSON with its template variables and macros filled in as Grafana would,
//! runs on ClickHouse 18.16 (the suite's server) against a real deployment and gives the
//! numbers the API gives for the same polls; and it runs on the current ClickHouse engine
//! (chdb) over the schema the migrations create. A board edited into SQL one engine refuses,
//! or into numbers that disagree with tally's own, fails here.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::cluster::{option_counts, Cluster, Deployment};

/// A ClickHouse panel: its board, its title and its SQL as written in the board.
struct Panel {
    board: String,
    title: String,
    sql: String,
}

fn clickhouse_panels() -> Result<Vec<Panel>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/grafana/boards");
    let mut panels = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let board: Value = serde_json::from_slice(&std::fs::read(&path)?)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let name = board["uid"]
            .as_str()
            .context("a board without uid")?
            .to_owned();
        for panel in board["panels"].as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let Some(sql) = target["rawSql"].as_str() else {
                    continue;
                };
                ensure!(
                    target["datasource"]["uid"] == "tally-clickhouse",
                    "{name}: a panel with SQL not on the ClickHouse data source"
                );
                panels.push(Panel {
                    board: name.clone(),
                    title: panel["title"].as_str().unwrap_or_default().to_owned(),
                    sql: sql.to_owned(),
                });
            }
        }
        for variable in board["templating"]["list"].as_array().into_iter().flatten() {
            if let Some(sql) = variable["query"].as_str() {
                panels.push(Panel {
                    board: name.clone(),
                    title: format!("variable {}", variable["name"]),
                    sql: sql.to_owned(),
                });
            }
        }
    }
    ensure!(
        panels.len() >= 6,
        "found only {} ClickHouse queries",
        panels.len()
    );
    Ok(panels)
}

/// `sql` with the board's variables and the data source's time macro filled in, as
/// Grafana sends it (the time range: everything).
fn fill(sql: &str, vars: &BTreeMap<&str, &str>) -> Result<String> {
    let mut filled = sql.replace(
        "$__timeFilter(received_at)",
        "received_at >= toDateTime(0, 'UTC') AND received_at <= toDateTime(4000000000, 'UTC')",
    );
    for (name, value) in vars {
        filled = filled.replace(&format!("${{{name}}}"), value);
    }
    if filled.contains('$') {
        bail!("unfilled variable or macro in `{filled}`");
    }
    Ok(filled)
}

fn board_vars() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([("campaign", "spring"), ("poll", "spring-colour")])
}

/// Rows of tab-separated ClickHouse output.
fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|line| !line.is_empty())
        .map(|line| line.split('\t').map(str::to_owned).collect())
        .collect()
}

fn panel<'a>(panels: &'a [Panel], board: &str, title: &str) -> Result<&'a Panel> {
    panels
        .iter()
        .find(|p| p.board == board && p.title == title)
        .with_context(|| format!("no panel `{title}` on board {board}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn needs_nats_clickhouse_grafana_panels_agree_with_the_api() -> Result<()> {
    tally_testkit::require!(NatsServer, ClickHouse);
    let cluster = Cluster::start(Deployment::Distributed).await?;
    cluster
        .create_poll(json!({"id": "spring-colour", "title": "Spring colour", "question": "Which colour?",
            "kind": "single", "campaign": "spring",
            "options": [{"id": "red", "label": "Red"}, {"id": "green", "label": "Green"}, {"id": "blue", "label": "Blue"}]}))
        .await?;
    cluster
        .create_poll(
            json!({"id": "spring-stars", "title": "Spring stars", "question": "How many stars?",
            "kind": "rating", "campaign": "spring", "scale": {"min": 1, "max": 5}}),
        )
        .await?;
    cluster
        .create_poll(
            json!({"id": "autumn-colour", "title": "Autumn colour", "question": "Which colour?",
            "kind": "single", "campaign": "autumn",
            "options": [{"id": "red", "label": "Red"}, {"id": "blue", "label": "Blue"}]}),
        )
        .await?;
    let countries = ["DE", "FR", "US"];
    let colours = ["red", "green", "blue"];
    for voter in 0..60 {
        let segment = json!({"country": countries[voter % 3], "channel": if voter % 2 == 0 { "email" } else { "social" },
            "device": if voter % 4 == 0 { "mobile" } else { "desktop" }});
        let votes = [
            (
                "spring-colour",
                json!({"voter_id": format!("v{voter}"), "choice": colours[(voter * 7 / 5) % 3], "segment": segment}),
            ),
            (
                "spring-stars",
                json!({"voter_id": format!("v{voter}"), "choice": 1 + voter % 5, "segment": segment}),
            ),
            (
                "autumn-colour",
                json!({"voter_id": format!("v{voter}"), "choice": "blue"}),
            ),
        ];
        for (poll, body) in votes {
            if poll == "autumn-colour" && voter >= 10 {
                continue;
            }
            let (status, answer) = cluster.vote(poll, &body).await?;
            ensure!(status == 202, "{poll} vote {voter}: {status} {answer}");
        }
    }
    let wait = Duration::from_secs(60);
    let colour = cluster.wait_for_total("spring-colour", 60, wait).await?;
    let stars = cluster.wait_for_total("spring-stars", 60, wait).await?;
    cluster.wait_for_total("autumn-colour", 10, wait).await?;

    let panels = clickhouse_panels()?;
    let vars = board_vars();
    let mut answers = BTreeMap::new();
    for p in &panels {
        let sql = fill(&p.sql, &vars)?;
        let text = cluster
            .clickhouse_query(&sql)
            .await
            .with_context(|| format!("{} / {}: {sql}", p.board, p.title))?
            .context("a distributed cluster has ClickHouse")?;
        answers.insert((p.board.clone(), p.title.clone()), text);
    }
    let answer = |board: &str, title: &str| -> Result<Vec<Vec<String>>> {
        let p = panel(&panels, board, title)?;
        Ok(rows(&answers[&(p.board.clone(), p.title.clone())]))
    };

    // Campaign board: totals per poll and per option are the API's.
    let per_poll = answer("tally-campaign", "Votes per poll")?;
    ensure!(
        per_poll
            == vec![
                vec!["Spring colour".to_owned(), "60".to_owned()],
                vec!["Spring stars".to_owned(), "60".to_owned()]
            ],
        "votes per poll: {per_poll:?}"
    );
    let mut per_option: BTreeMap<String, u64> = BTreeMap::new();
    for row in answer("tally-campaign", "Answers per option")? {
        if row[0] == "spring-colour" {
            per_option.insert(row[1].clone(), row[2].parse()?);
        }
    }
    ensure!(
        per_option == option_counts(&colour),
        "answers per option {per_option:?}, results {}",
        colour["options"]
    );
    let per_minute: u64 = answer("tally-campaign", "Votes per minute")?
        .iter()
        .map(|row| row[1].parse::<u64>())
        .sum::<Result<_, _>>()?;
    ensure!(per_minute == 120, "votes per minute add up to {per_minute}");
    let campaigns = answer("tally-campaign", "variable \"campaign\"")?;
    ensure!(
        campaigns == vec![vec!["autumn".to_owned()], vec!["spring".to_owned()]],
        "campaign variable: {campaigns:?}"
    );

    // Segment board: the country split is the breakdown's, the counts the results'.
    let breakdown = cluster
        .breakdown("/v1/polls/spring-colour/breakdown?by=country", 60)
        .await?;
    let mut expected: BTreeMap<(String, String), u64> = BTreeMap::new();
    for group in breakdown["groups"].as_array().into_iter().flatten() {
        let country = group["segment"]["country"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        for (option, count) in option_counts(group) {
            expected.insert((country.clone(), option), count);
        }
    }
    let mut shown = BTreeMap::new();
    for row in answer("tally-segments", "Votes per option and country")? {
        shown.insert((row[0].clone(), row[1].clone()), row[2].parse::<u64>()?);
    }
    ensure!(
        shown == expected,
        "by country {shown:?}, breakdown {expected:?}"
    );
    let voters = answer("tally-segments", "Voters who answered")?;
    ensure!(
        voters
            == vec![vec![
                colour["total_votes"].to_string(),
                colour["unique_voters"].to_string()
            ]],
        "voters who answered: {voters:?}, results {colour}"
    );
    // The average rating per device, for the rating poll, is the votes' own average.
    let stars_vars = BTreeMap::from([("campaign", "spring"), ("poll", "spring-stars")]);
    let sql = fill(
        &panel(&panels, "tally-segments", "Average rating per device")?.sql,
        &stars_vars,
    )?;
    let text = cluster.clickhouse_query(&sql).await?.unwrap_or_default();
    let counted: u64 = rows(&text)
        .iter()
        .map(|row| row[2].parse::<u64>())
        .sum::<Result<_, _>>()?;
    ensure!(
        counted == stars["total_votes"].as_u64().unwrap_or(0),
        "rating rows {text}"
    );
    Ok(())
}

/// Every board query runs on the current ClickHouse engine over the migrated schema.
#[test]
fn needs_chdb_grafana_panels_run_on_current_clickhouse() -> Result<()> {
    tally_testkit::require!(Chdb);
    let mut statements: Vec<Value> = tally_clickhouse::sql::all_for_check()
        .into_iter()
        .map(|(name, sql)| json!({"name": name, "sql": sql}))
        .collect();
    for p in clickhouse_panels()? {
        statements.push(json!({"name": format!("{} / {}", p.board, p.title), "sql": fill(&p.sql, &board_vars())?}));
    }
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(
        file.path(),
        serde_json::to_vec(&json!({"database": "tally_grafana", "statements": statements}))?,
    )?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/chdb_check.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(file.path())
        .output()?;
    ensure!(
        output.status.success(),
        "board SQL rejected by current ClickHouse (chdb):\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
