//! A hot poll spread over partitions of the log (`spread`): its voters' votes land on four
//! partitions, counted by whichever processors own them (two processes sharing them by
//! lease, and two streams of two partitions each holding them, in the distributed
//! deployment); results, live totals, a breakdown, the analysts'
//! SQL and an export add the partitions up exactly, and one vote per voter still holds
//! across them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::cluster::{option_counts, Cluster, Deployment, SseClient, ANALYST_KEY};

const PARTITIONS: u16 = 4;
const VOTERS: usize = 2_000;
const CLIENTS: usize = 16;
const OPTIONS: [&str; 3] = ["red", "green", "blue"];
const COUNTRIES: [&str; 4] = ["DE", "FR", "US", "BR"];

crate::for_each_deployment!(a_poll_spread_over_partitions_counts_exactly);

async fn a_poll_spread_over_partitions_counts_exactly(deployment: Deployment) -> Result<()> {
    let cluster = Arc::new(
        Cluster::start_with(
            deployment,
            &[
                ("TALLY_PARTITIONS", "4"),
                // Distributed, the log is two streams of two partitions each.
                ("TALLY_PARTITIONS_PER_STREAM", "2"),
                ("TALLY_LEASE_SECONDS", "4"),
                ("TALLY_PURGE_CLOSED_AFTER_SECONDS", "2"),
            ],
        )
        .await?,
    );
    let _second = match deployment {
        Deployment::Distributed => {
            let second = cluster.spawn_processor("processor-b").await?;
            tally_testkit::wait_until(
                "the partitions shared by two processors",
                Duration::from_secs(60),
                || {
                    crate::reliability::leases_spread(
                        &cluster,
                        PARTITIONS,
                        &["processor", "processor-b"],
                        (2, 2),
                    )
                },
            )
            .await
            .with_context(|| cluster.logs())?;
            Some(second)
        }
        Deployment::Standalone => None,
    };

    // Only a poll with one vote per voter spreads, over 1 to 64 partitions.
    let refused = |body: Value| {
        let cluster = cluster.clone();
        async move {
            let response = cluster
                .http
                .post(format!("{}/v1/polls", cluster.query.url))
                .bearer_auth(crate::cluster::ADMIN_KEY)
                .json(&body)
                .send()
                .await?;
            let status = response.status().as_u16();
            let problem: Value = response.json().await?;
            ensure!(
                status == 422 && problem.to_string().contains("spread"),
                "{body}: {status} {problem}"
            );
            anyhow::Ok(())
        }
    };
    let poll = |id: &str| {
        json!({"id": id, "title": "Hot", "question": "Which colour?", "kind": "single",
            "options": OPTIONS.iter().map(|o| json!({"id": o, "label": o})).collect::<Vec<_>>()})
    };
    let mut none = poll("hot-none");
    none["dedupe"] = json!("none");
    none["spread"] = json!(4);
    refused(none).await?;
    let mut wide = poll("hot-wide");
    wide["spread"] = json!(65);
    refused(wide).await?;
    let mut hot = poll("hot");
    hot["spread"] = json!(4);
    let created = cluster.create_poll(hot).await?;
    ensure!(created["spread"] == 4, "{created}");

    let mut sse = SseClient::connect(
        &cluster.http,
        &format!("{}/v1/polls/hot/live", cluster.query.url),
        None,
    )
    .await?;

    // Each voter votes once; every fifth votes again (refused: across partitions too, the
    // second vote lands on the first one's partition) and every seventh retries its first
    // vote with the same vote id (its original answer).
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let cluster = cluster.clone();
        clients.push(tokio::spawn(async move {
            let mut truth: BTreeMap<(String, String), u64> = BTreeMap::new();
            for voter in (client..VOTERS).step_by(CLIENTS) {
                let choice = OPTIONS[voter * 7 % 3];
                let country = COUNTRIES[voter % 4];
                let first = json!({"voter_id": format!("voter-{voter}"), "choice": choice,
                    "vote_id": format!("first-{voter}"), "segment": {"country": country}});
                let (status, answer) = cluster.vote("hot", &first).await?;
                ensure!(status == 202, "voter {voter}: {status} {answer}");
                *truth
                    .entry((choice.to_owned(), country.to_owned()))
                    .or_default() += 1;
                if voter % 7 == 0 {
                    let (status, again) = cluster.vote("hot", &first).await?;
                    ensure!(
                        status == 202 && again["vote_id"] == answer["vote_id"],
                        "voter {voter}'s retry: {status} {again}"
                    );
                }
                if voter % 5 == 0 {
                    let second = json!({"voter_id": format!("voter-{voter}"), "choice": OPTIONS[(voter + 1) % 3]});
                    let (status, refusal) = cluster.vote("hot", &second).await?;
                    ensure!(status == 409, "voter {voter}'s second vote: {status} {refusal}");
                }
            }
            anyhow::Ok(truth)
        }));
    }
    let mut truth: BTreeMap<(String, String), u64> = BTreeMap::new();
    for client in clients {
        for (key, n) in client.await?? {
            *truth.entry(key).or_default() += n;
        }
    }
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for ((choice, _), n) in &truth {
        *counts.entry(choice.clone()).or_default() += n;
    }

    let results = cluster
        .wait_for_total("hot", VOTERS as u64, Duration::from_secs(120))
        .await?;
    ensure!(option_counts(&results) == counts, "{results} != {counts:?}");
    ensure!(results["unique_voters"] == VOTERS as u64, "{results}");

    // The votes are in every partition.
    let spread = crate::sql::sql(
        &cluster,
        "SELECT log_partition, count(*) AS ballots FROM ballots WHERE poll_id = 'hot' \
         GROUP BY log_partition ORDER BY log_partition",
    )
    .await?;
    let rows = spread["rows"].as_array().context("rows")?;
    ensure!(rows.len() == usize::from(PARTITIONS), "{spread}");
    let in_partitions: u64 = rows.iter().map(|row| row[1].as_u64().unwrap_or(0)).sum();
    ensure!(
        in_partitions == VOTERS as u64 && rows.iter().all(|row| row[1].as_u64() > Some(0)),
        "{spread}"
    );

    // The analysts' `polls` shows the spread.
    let polls = crate::sql::sql(
        &cluster,
        "SELECT poll_id, spread FROM polls WHERE poll_id = 'hot'",
    )
    .await?;
    ensure!(polls["rows"] == json!([["hot", 4]]), "{polls}");

    // Distributed, the poll's votes came in through both streams of the log.
    if deployment == Deployment::Distributed {
        let held = cluster.vote_streams().await?;
        ensure!(
            held.len() == 2
                && held.values().all(|&n| n > 0)
                && held.values().sum::<u64>() == VOTERS as u64,
            "votes per stream: {held:?}"
        );
    }

    // Live totals: never back, every event id above the last, ending at the results.
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    let (mut last_id, mut last_total) = (0u64, 0u64);
    loop {
        let (kind, id, data) = sse
            .next_event(end.saturating_duration_since(tokio::time::Instant::now()))
            .await?;
        let id: u64 = id.as_deref().unwrap_or("0").parse()?;
        let total = data["total_votes"].as_u64().unwrap_or(0);
        ensure!(
            (kind == "snapshot" && last_id == 0) || (kind == "totals" && id > last_id),
            "{kind} {id} after {last_id}"
        );
        ensure!(
            total >= last_total,
            "live totals went back: {total} after {last_total}"
        );
        ensure!(
            data["partition"].is_null(),
            "a share was served as the poll's totals: {data}"
        );
        (last_id, last_total) = (id, total);
        if total == VOTERS as u64 {
            ensure!(option_counts(&data) == counts, "{data} != {counts:?}");
            ensure!(results["as_of"] == id, "{id} != {}", results["as_of"]);
            break;
        }
    }

    // A breakdown by country adds the partitions' rollups up.
    let breakdown = cluster
        .breakdown("/v1/polls/hot/breakdown?by=country", VOTERS as u64)
        .await?;
    for group in breakdown["groups"].as_array().context("groups")? {
        let country = group["segment"]["country"].as_str().context("country")?;
        let want: BTreeMap<String, u64> = truth
            .iter()
            .filter(|((_, c), _)| c == country)
            .map(|((choice, _), n)| (choice.clone(), *n))
            .collect();
        ensure!(
            option_counts(group) == want,
            "{country}: {group} != {want:?}"
        );
    }

    // An export holds every ballot once, as of the positions the results report.
    let response = cluster
        .http
        .get(format!(
            "{}/v1/polls/hot/export?format=csv",
            cluster.query.url
        ))
        .bearer_auth(ANALYST_KEY)
        .send()
        .await?;
    ensure!(response.status() == 200, "export: {}", response.status());
    let as_of = response
        .headers()
        .get("tally-as-of")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.text().await?;
    let ids: std::collections::BTreeSet<&str> = body
        .lines()
        .skip(1)
        .filter_map(|line| line.split(',').next())
        .collect();
    ensure!(
        body.lines().count() == VOTERS + 1 && ids.len() == VOTERS,
        "the export holds {} lines, {} vote ids",
        body.lines().count(),
        ids.len()
    );
    ensure!(
        as_of.as_deref() == Some(results["as_of"].to_string().as_str()),
        "export as of {as_of:?}, results as of {}",
        results["as_of"]
    );

    // Closed, the poll's votes leave the stream from every partition (distributed), and a
    // late retry still gets its first answer while a new vote is refused.
    let response = cluster
        .http
        .post(format!("{}/v1/polls/hot/close", cluster.query.url))
        .bearer_auth(crate::cluster::ADMIN_KEY)
        .send()
        .await?;
    ensure!(response.status() == 200, "close: {}", response.status());
    cluster.wait_for_ingest_status("hot", 409).await?;
    if deployment == Deployment::Distributed {
        tally_testkit::wait_until(
            "the spread poll's votes leave every partition of the stream",
            Duration::from_secs(60),
            || async { Ok(cluster.poll_tip_in_log("hot").await?.is_none()) },
        )
        .await
        .with_context(|| cluster.logs())?;
    }
    for voter in (0..VOTERS).step_by(97) {
        let first = json!({"voter_id": format!("voter-{voter}"), "choice": OPTIONS[voter * 7 % 3],
            "vote_id": format!("first-{voter}"), "segment": {"country": COUNTRIES[voter % 4]}});
        let (status, answer) = cluster.vote("hot", &first).await?;
        ensure!(
            status == 202 && answer["vote_id"] == format!("first-{voter}"),
            "voter {voter}'s late retry: {status} {answer}"
        );
    }
    let (status, answer) = cluster
        .vote("hot", &json!({"voter_id": "newcomer", "choice": "red"}))
        .await?;
    ensure!(
        status == 409,
        "a new vote on the closed poll: {status} {answer}"
    );
    let results = cluster.results("hot").await?;
    ensure!(results["total_votes"] == VOTERS as u64, "{results}");
    Ok(())
}
