//! The spine: polls of every kind, ≥ 20,000 votes from 5,000 voters sent by concurrent
//! clients (repeat voters, retries with the same vote_id, invalid votes, NDJSON batches);
//! results, a two-dimension breakdown and time-series sums equal the ground truth exactly;
//! an SSE client sees a snapshot and then totals that never decrease and end at the results.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::cluster::{option_counts, Cluster, Deployment, SseClient, ADMIN_KEY};

const VOTERS: usize = 5_000;
const CLIENTS: usize = 32;
const COUNTRIES: [&str; 5] = ["DE", "FR", "US", "GB", "ES"];
const DEVICES: [&str; 3] = ["mobile", "desktop", "tablet"];

/// What the test knows must be counted.
#[derive(Default, Debug)]
pub struct Truth {
    /// poll -> answer key -> count
    pub counts: BTreeMap<String, BTreeMap<String, u64>>,
    pub ballots: BTreeMap<String, u64>,
    pub voters: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// (country, device) -> answer -> count, for the `colours` poll
    pub colour_groups: BTreeMap<(String, String), BTreeMap<String, u64>>,
    pub submissions: u64,
}

impl Truth {
    fn count(&mut self, poll: &str, voter: Option<&str>, answers: &[String]) {
        *self.ballots.entry(poll.to_owned()).or_default() += 1;
        let counts = self.counts.entry(poll.to_owned()).or_default();
        for answer in answers {
            *counts.entry(answer.clone()).or_default() += 1;
        }
        if let Some(voter) = voter {
            self.voters
                .entry(poll.to_owned())
                .or_default()
                .insert(voter.to_owned());
        }
    }
}

pub async fn create_polls(cluster: &Cluster) -> Result<()> {
    cluster
        .create_poll(json!({"id": "colours", "title": "Colours", "question": "Which colour?", "kind": "single",
            "options": [{"id": "red", "label": "Red"}, {"id": "blue", "label": "Blue"}, {"id": "green", "label": "Green"}],
            "campaign": "spring", "dimensions": ["plan"]}))
        .await?;
    cluster
        .create_poll(json!({"id": "features", "title": "Features", "question": "Which features?", "kind": "multi", "max_choices": 3,
            "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}, {"id": "c", "label": "C"}, {"id": "d", "label": "D"}]}))
        .await?;
    cluster.create_poll(json!({"id": "stars", "title": "Stars", "question": "How many stars?", "kind": "rating", "scale": {"min": 1, "max": 5}})).await?;
    cluster.create_poll(json!({"id": "nps", "title": "NPS", "question": "Would you recommend us?", "kind": "nps"})).await?;
    cluster
        .create_poll(json!({"id": "clicks", "title": "Clicks", "question": "Click as often as you like", "kind": "single", "dedupe": "none",
            "options": [{"id": "yes", "label": "Yes"}, {"id": "no", "label": "No"}]}))
        .await?;
    Ok(())
}

fn segment(voter: usize) -> Value {
    json!({"country": COUNTRIES[voter % 5], "device": DEVICES[(voter / 5) % 3], "channel": if voter.is_multiple_of(2) { "email" } else { "social" }})
}

async fn expect(cluster: &Cluster, poll: &str, body: &Value, status: u16) -> Result<Value> {
    let (got, answer) = cluster.vote(poll, body).await?;
    ensure!(
        got == status,
        "vote {body} on {poll}: expected {status}, got {got}: {answer}"
    );
    Ok(answer)
}

/// One voter's whole session, sent in order so "first vote wins" has a clear meaning.
async fn voter_session(
    cluster: &Cluster,
    voter: usize,
    truth: &Mutex<Truth>,
    nps_lines: &Mutex<Vec<(String, Value)>>,
) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(voter as u64);
    let id = format!("u-{voter}");
    let seg = segment(voter);
    let colours = ["red", "blue", "green"];
    let mut submissions = 0;

    // colours: everyone; some retry the same vote_id, some try to vote again.
    let colour = colours[rng.random_range(0..3)];
    let vote_id = format!("c-{voter}");
    // `plan` is a dimension only the colours poll declares.
    let mut colour_segment = seg.clone();
    colour_segment["plan"] = json!(if voter.is_multiple_of(7) {
        "pro"
    } else {
        "free"
    });
    let body =
        json!({"voter_id": id, "choice": colour, "segment": colour_segment, "vote_id": vote_id});
    let answer = expect(cluster, "colours", &body, 202).await?;
    ensure!(answer["vote_id"] == vote_id && answer["status"] == "accepted");
    submissions += 1;
    {
        let mut truth = truth.lock().unwrap();
        truth.count("colours", Some(&id), &[colour.to_owned()]);
        let key = (
            COUNTRIES[voter % 5].to_owned(),
            DEVICES[(voter / 5) % 3].to_owned(),
        );
        *truth
            .colour_groups
            .entry(key)
            .or_default()
            .entry(colour.to_owned())
            .or_default() += 1;
    }
    if rng.random_bool(0.1) {
        expect(cluster, "colours", &body, 202).await?;
        submissions += 1;
    }
    if rng.random_bool(0.2) {
        let other =
            json!({"voter_id": id, "choice": colours[rng.random_range(0..3)], "segment": seg});
        let answer = expect(cluster, "colours", &other, 409).await?;
        ensure!(
            answer["type"]
                .as_str()
                .unwrap_or("")
                .ends_with("/already-voted"),
            "{answer}"
        );
        submissions += 1;
    }
    if rng.random_bool(0.05) {
        let answer = expect(
            cluster,
            "colours",
            &json!({"voter_id": id, "choice": "purple"}),
            422,
        )
        .await?;
        ensure!(answer["field"] == "choice", "{answer}");
        submissions += 1;
    }

    // features: multi-choice, 80% of voters.
    if rng.random_bool(0.8) {
        let mut picks: Vec<String> = ["a", "b", "c", "d"]
            .iter()
            .filter(|_| rng.random_bool(0.5))
            .map(|s| (*s).to_owned())
            .collect();
        picks.truncate(3);
        if picks.is_empty() {
            picks.push("d".into());
        }
        expect(
            cluster,
            "features",
            &json!({"voter_id": id, "choice": picks, "segment": seg}),
            202,
        )
        .await?;
        truth.lock().unwrap().count("features", Some(&id), &picks);
        submissions += 1;
    }

    // stars: rating 1-5, 80% of voters.
    if rng.random_bool(0.8) {
        let stars: i64 = rng.random_range(1..=5);
        expect(
            cluster,
            "stars",
            &json!({"voter_id": id, "choice": stars}),
            202,
        )
        .await?;
        truth
            .lock()
            .unwrap()
            .count("stars", Some(&id), &[stars.to_string()]);
        submissions += 1;
    }

    // nps: 80% of voters, sent later as NDJSON batches.
    if rng.random_bool(0.8) {
        let score: i64 = rng.random_range(0..=10);
        nps_lines.lock().unwrap().push((id.clone(), json!({"poll_id": "nps", "voter_id": id, "choice": score, "vote_id": format!("n-{voter}")})));
        truth
            .lock()
            .unwrap()
            .count("nps", Some(&id), &[score.to_string()]);
    }

    // clicks: dedupe none; every submission counts, anonymous ones too, retries once.
    if rng.random_bool(0.3) {
        for click in 0..rng.random_range(1..=3) {
            let choice = if rng.random_bool(0.7) { "yes" } else { "no" };
            let anonymous = rng.random_bool(0.3);
            let mut body = json!({"choice": choice, "vote_id": format!("k-{voter}-{click}")});
            if !anonymous {
                body["voter_id"] = json!(id);
            }
            expect(cluster, "clicks", &body, 202).await?;
            expect(cluster, "clicks", &body, 202).await?;
            truth.lock().unwrap().count(
                "clicks",
                (!anonymous).then_some(id.as_str()),
                &[choice.to_owned()],
            );
            submissions += 2;
        }
    }
    truth.lock().unwrap().submissions += submissions;
    Ok(())
}

async fn send_nps_batches(cluster: &Cluster, lines: Vec<(String, Value)>) -> Result<u64> {
    let mut sent = 0;
    for chunk in lines.chunks(500) {
        let mut body = String::new();
        for (_, line) in chunk {
            body.push_str(&line.to_string());
            body.push('\n');
        }
        // One deliberately invalid line per batch: it is rejected alone.
        body.push_str("{\"poll_id\": \"nps\", \"voter_id\": \"x\", \"choice\": 11}\n");
        let response = cluster
            .http
            .post(format!("{}/v1/votes:batch", cluster.ingest.url))
            .bearer_auth(ADMIN_KEY)
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await?;
        ensure!(
            response.status() == 200,
            "batch answered {}",
            response.status()
        );
        let result: Value = response.json().await?;
        ensure!(
            result["accepted"] == chunk.len() && result["rejected"] == 1,
            "batch result {result}"
        );
        let last = &result["results"][chunk.len()];
        ensure!(last["status"] == 422 && last["field"] == "choice", "{last}");
        sent += chunk.len() as u64 + 1;
    }
    // A batch that repeats and contradicts what was sent, each line answered on its own: a
    // retry of a stored vote gets the original 202 (also twice in one batch), the voter's
    // second vote 409, an unknown poll 404, a line without poll_id 422. Nothing counts.
    if let Some((_, first)) = lines.first() {
        let mut second = first.clone();
        second["vote_id"] = json!("n-second-try");
        second["choice"] = json!((first["choice"].as_i64().unwrap_or(0) + 1) % 11);
        let body: String = [
            first.clone(),
            json!({"poll_id": "nope", "voter_id": "y", "choice": 1}),
            second,
            first.clone(),
            json!({"voter_id": "z", "choice": 1}),
        ]
        .iter()
        .map(|line| format!("{line}\n"))
        .collect();
        let result: Value = cluster
            .http
            .post(format!("{}/v1/votes:batch", cluster.ingest.url))
            .bearer_auth(ADMIN_KEY)
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await?
            .json()
            .await?;
        let lines = result["results"].as_array().cloned().unwrap_or_default();
        let statuses: Vec<u64> = lines.iter().filter_map(|l| l["status"].as_u64()).collect();
        ensure!(
            statuses == [202, 404, 409, 202, 422]
                && lines[0]["vote_id"] == first["vote_id"]
                && lines[3]["vote_id"] == first["vote_id"]
                && lines[2]["type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("already-voted"))
                && lines[4]["field"] == "poll_id"
                && result["accepted"] == 2,
            "mixed batch answered {result}"
        );
        sent += 5;
    }
    Ok(sent)
}

/// Sends the whole load; returns the ground truth.
pub async fn drive_load(cluster: &Arc<Cluster>) -> Result<Truth> {
    let truth = Arc::new(Mutex::new(Truth::default()));
    let nps_lines = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (cluster, truth, nps_lines) = (cluster.clone(), truth.clone(), nps_lines.clone());
        clients.push(tokio::spawn(async move {
            for voter in (client..VOTERS).step_by(CLIENTS) {
                voter_session(&cluster, voter, &truth, &nps_lines).await?;
            }
            anyhow::Ok(())
        }));
    }
    for client in clients {
        client.await??;
    }
    let lines = std::mem::take(&mut *nps_lines.lock().unwrap());
    let batch_submissions = send_nps_batches(cluster, lines).await?;
    let mut truth = Arc::try_unwrap(truth)
        .map_err(|_| anyhow::anyhow!("truth still shared"))?
        .into_inner()
        .unwrap();
    truth.submissions += batch_submissions;
    Ok(truth)
}

pub async fn check_results(cluster: &Cluster, truth: &Truth) -> Result<()> {
    for (poll, ballots) in &truth.ballots {
        let results = cluster
            .wait_for_total(poll, *ballots, Duration::from_secs(120))
            .await?;
        ensure!(
            option_counts(&results) == truth.counts[poll],
            "{poll}: counts {results} != truth {:?}",
            truth.counts[poll]
        );
        let voters = truth.voters.get(poll).map(|v| v.len() as u64).unwrap_or(0);
        ensure!(
            results["unique_voters"] == voters,
            "{poll}: unique voters {} != {voters}",
            results["unique_voters"]
        );
    }
    Ok(())
}

pub async fn check_timeseries(cluster: &Cluster, truth: &Truth) -> Result<()> {
    for (poll, counts) in &truth.counts {
        cluster.wait_for_timeseries(poll, counts).await?;
    }
    Ok(())
}

crate::for_each_deployment!(pipeline_counts_every_vote_exactly_once);

async fn pipeline_counts_every_vote_exactly_once(deployment: Deployment) -> Result<()> {
    let cluster = Arc::new(Cluster::start(deployment).await?);
    create_polls(&cluster).await?;

    let mut sse = SseClient::connect(
        &cluster.http,
        &format!("{}/v1/polls/colours/live", cluster.query.url),
        None,
    )
    .await?;
    let (kind, id, snapshot) = sse.next_event(Duration::from_secs(10)).await?;
    ensure!(
        kind == "snapshot" && snapshot["total_votes"] == 0 && id.as_deref() == Some("0"),
        "first event {kind} {id:?} {snapshot}"
    );

    let started = std::time::Instant::now();
    let truth = drive_load(&cluster).await?;
    let sending = started.elapsed();
    let counted: u64 = truth.ballots.values().sum();
    ensure!(
        counted >= 20_000,
        "the load must count at least 20,000 votes, counted {counted}"
    );
    ensure!(truth.voters["colours"].len() == VOTERS);
    check_results(&cluster, &truth).await?;
    // Figures for the record, not assertions: sequential per voter, 32 clients, debug build.
    eprintln!(
        "sent {} submissions ({counted} counted) in {:.1}s ({:.0}/s); all counted after {:.1}s",
        truth.submissions,
        sending.as_secs_f64(),
        truth.submissions as f64 / sending.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    // Rating and NPS summaries follow from the exact distribution.
    let stars = cluster.results("stars").await?;
    let star_counts = &truth.counts["stars"];
    let sum: u64 = star_counts
        .iter()
        .map(|(k, v)| k.parse::<u64>().unwrap() * v)
        .sum();
    let mean = sum as f64 / truth.ballots["stars"] as f64;
    ensure!(
        (stars["rating"]["mean"].as_f64().unwrap() - mean).abs() < 1e-9,
        "mean {} != {mean}",
        stars["rating"]["mean"]
    );
    let nps = cluster.results("nps").await?;
    let nps_counts = &truth.counts["nps"];
    let promoters: u64 = nps_counts
        .iter()
        .filter(|(k, _)| k.parse::<u64>().unwrap() >= 9)
        .map(|(_, v)| v)
        .sum();
    ensure!(nps["nps"]["promoters"] == promoters, "{}", nps["nps"]);

    // Breakdown by two dimensions: every group's counts equal the truth.
    let colour_ballots: u64 = truth
        .colour_groups
        .values()
        .map(|m| m.values().sum::<u64>())
        .sum();
    let breakdown = cluster
        .breakdown(
            "/v1/polls/colours/breakdown?by=country,device",
            colour_ballots,
        )
        .await?;
    let groups = breakdown["groups"].as_array().cloned().unwrap_or_default();
    ensure!(
        groups.len() == truth.colour_groups.len(),
        "{} groups, expected {}",
        groups.len(),
        truth.colour_groups.len()
    );
    for group in &groups {
        let key = (
            group["segment"]["country"].as_str().unwrap().to_owned(),
            group["segment"]["device"].as_str().unwrap().to_owned(),
        );
        let expected = &truth.colour_groups[&key];
        ensure!(
            option_counts(group) == *expected,
            "group {key:?}: {group} != {expected:?}"
        );
        ensure!(group["total_votes"] == expected.values().sum::<u64>());
        ensure!(
            group["options"][0]["ci95"].is_array() && group["p_value"].is_number(),
            "{group}"
        );
    }
    // Filters narrow it down.
    let de_total: u64 = truth
        .colour_groups
        .iter()
        .filter(|((c, _), _)| c == "DE")
        .map(|(_, m)| m.values().sum::<u64>())
        .sum();
    let filtered = cluster
        .analyst_get("/v1/polls/colours/breakdown?by=plan&where=country:DE")
        .await?;
    let filtered_total: u64 = filtered["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["total_votes"].as_u64().unwrap())
        .sum();
    ensure!(
        filtered_total == de_total,
        "filtered breakdown {filtered_total} != {de_total}"
    );

    check_timeseries(&cluster, &truth).await?;

    // The SSE client: totals never decrease and end at the results.
    let final_results = cluster.results("colours").await?;
    let (mut last_seq, mut last_total) = (0u64, 0u64);
    let mut updates = 0;
    loop {
        let (kind, id, data) = sse.next_event(Duration::from_secs(30)).await?;
        ensure!(kind == "totals", "unexpected event {kind}");
        let seq: u64 = id.unwrap_or_default().parse()?;
        let total = data["total_votes"].as_u64().unwrap_or(0);
        ensure!(
            seq > last_seq && total >= last_total,
            "totals went backwards: {seq} after {last_seq}, {total} after {last_total}"
        );
        (last_seq, last_total) = (seq, total);
        updates += 1;
        if data["as_of"] == final_results["as_of"] {
            ensure!(
                option_counts(&data) == option_counts(&final_results)
                    && data["total_votes"] == final_results["total_votes"]
            );
            break;
        }
    }
    eprintln!("sse client saw {updates} totals updates");
    Ok(())
}
