//! `--demo`: a sample poll fed with synthetic votes whose preferences differ by segment, so a
//! first run has live totals that move and breakdowns worth looking at.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde_json::json;
use tally_core::poll::NewPoll;
use tally_core::ports::PollRegistry;
use tally_core::vote::VoteRequest;
use tally_core::Error;
use tally_service::Tasks;

pub const POLL_ID: &str = "demo-next-feature";

const OPTIONS: [&str; 4] = ["mobile-app", "dark-mode", "integrations", "ai-summaries"];

/// Picks from `items` with the given weights.
fn weighted<'a, R: Rng>(rng: &mut R, items: &[(&'a str, u32)]) -> &'a str {
    let total: u32 = items.iter().map(|(_, w)| w).sum();
    let mut pick = rng.random_range(0..total);
    for (item, weight) in items {
        if pick < *weight {
            return item;
        }
        pick -= weight;
    }
    items[items.len() - 1].0
}

/// Creates the demo poll when missing and starts feeding it; returns its id.
pub async fn start(
    ingest: Arc<tally_ingest::Ingest>,
    registry: Arc<dyn PollRegistry>,
    tasks: &Tasks,
) -> anyhow::Result<&'static str> {
    let new: NewPoll = serde_json::from_value(json!({
        "id": POLL_ID,
        "title": "Product roadmap pulse",
        "question": "Which feature should we ship next?",
        "kind": "single",
        "options": OPTIONS.iter().map(|id| json!({"id": id, "label": id.replace('-', " ")})).collect::<Vec<_>>(),
        "campaign": "spring-launch",
        "dimensions": ["plan"],
    }))?;
    let poll = new
        .into_poll(tally_core::time::now_ms(), || POLL_ID.to_owned())
        .map_err(|problem| anyhow::anyhow!("demo poll: {problem:?}"))?;
    match registry.create(&poll).await {
        Ok(_) | Err(Error::AlreadyExists(_)) => {}
        Err(err) => return Err(err.into()),
    }
    tasks.spawn("demo-feed", move |cancel| async move {
        tokio::select! {
            () = feed(ingest) => {}
            () = cancel.cancelled() => {}
        }
    });
    Ok(POLL_ID)
}

/// About 20 votes a second from new voters, with realistic segment mixes.
async fn feed(ingest: Arc<tally_ingest::Ingest>) {
    let run = uuid::Uuid::now_v7().simple().to_string();
    let mut voter = 0u64;
    loop {
        let request = {
            let mut rng = rand::rng();
            voter += 1;
            let device = weighted(&mut rng, &[("mobile", 55), ("desktop", 38), ("tablet", 7)]);
            let plan = weighted(&mut rng, &[("free", 70), ("pro", 25), ("enterprise", 5)]);
            let channel = weighted(
                &mut rng,
                &[("email", 30), ("social", 35), ("search", 25), ("ads", 10)],
            );
            let country = weighted(
                &mut rng,
                &[
                    ("US", 40),
                    ("DE", 15),
                    ("GB", 12),
                    ("FR", 10),
                    ("BR", 13),
                    ("IN", 10),
                ],
            );
            // Mobile users want the app, paying teams want integrations.
            let choice = match (device, plan) {
                ("mobile", _) => weighted(
                    &mut rng,
                    &[
                        ("mobile-app", 50),
                        ("dark-mode", 25),
                        ("integrations", 10),
                        ("ai-summaries", 15),
                    ],
                ),
                (_, "pro" | "enterprise") => weighted(
                    &mut rng,
                    &[
                        ("mobile-app", 10),
                        ("dark-mode", 15),
                        ("integrations", 50),
                        ("ai-summaries", 25),
                    ],
                ),
                _ => weighted(
                    &mut rng,
                    &[
                        ("mobile-app", 25),
                        ("dark-mode", 30),
                        ("integrations", 15),
                        ("ai-summaries", 30),
                    ],
                ),
            };
            VoteRequest {
                poll_id: None,
                voter_id: Some(format!("demo-{run}-{voter}")),
                choice: json!(choice),
                segment: [
                    ("device", device),
                    ("plan", plan),
                    ("channel", channel),
                    ("country", country),
                    ("campaign", "spring-launch"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), json!(v)))
                .collect(),
                vote_id: None,
                token: None,
            }
        };
        if let Err(problem) = ingest.submit(POLL_ID, request).await {
            tracing::debug!(?problem, "demo vote refused");
        }
        let pause = rand::rng().random_range(10..90);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}
