//! A clean stop: SIGTERM, as `docker stop` sends it, while 1,000 live streams are open. The
//! process must end every stream with a `reconnect` event carrying an SSE `retry:` hint (so
//! the clients reconnect elsewhere), exit by itself within `TALLY_SHUTDOWN_SECONDS`, and,
//! in standalone, keep every vote it answered 202 (its final flush ran).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use serde_json::json;

use crate::cluster::{Cluster, Deployment};

const STREAMS: usize = 1_000;
const SHUTDOWN_SECONDS: u64 = 10;

/// What one stream saw until it ended.
struct Seen {
    reconnect: bool,
    retry_hint: bool,
}

crate::for_each_deployment!(sigterm_ends_a_thousand_streams_and_exits_in_time);

async fn sigterm_ends_a_thousand_streams_and_exits_in_time(deployment: Deployment) -> Result<()> {
    let mut cluster = Cluster::start_with(
        deployment,
        &[
            ("TALLY_LIVE_MAX_PER_ADDRESS", "5000"),
            ("TALLY_MAX_CONNECTIONS_PER_ADDRESS", "5000"),
            ("TALLY_SHUTDOWN_SECONDS", "10"),
        ],
    )
    .await?;
    cluster
        .create_poll(
            json!({"id": "drain", "title": "Drain", "question": "Still there?", "kind": "single",
            "options": [{"id": "yes", "label": "Yes"}, {"id": "no", "label": "No"}],
            "results_visibility": "live"}),
        )
        .await?;
    let mut accepted = 0;
    for voter in 0..50 {
        let (status, answer) = cluster
            .vote(
                "drain",
                &json!({"voter_id": format!("v{voter}"), "choice": "yes"}),
            )
            .await?;
        ensure!(status == 202, "vote {voter}: {status} {answer}");
        accepted += 1;
    }
    cluster
        .wait_for_total("drain", accepted, Duration::from_secs(60))
        .await?;

    // Each stream its own connection, as a thousand browsers would hold them.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let url = format!("{}/v1/polls/drain/live", cluster.query.url);
    let snapshots = Arc::new(AtomicUsize::new(0));
    let mut streams = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        let (http, url, snapshots) = (http.clone(), url.clone(), snapshots.clone());
        streams.push(tokio::spawn(async move {
            let response = http.get(&url).send().await?.error_for_status()?;
            let mut body = response.bytes_stream();
            let mut text = String::new();
            let mut counted = false;
            while let Some(chunk) = body.next().await {
                let Ok(chunk) = chunk else { break };
                text.push_str(&String::from_utf8_lossy(&chunk));
                if !counted && text.contains("event: snapshot") {
                    counted = true;
                    snapshots.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(Seen {
                reconnect: text.contains("event: reconnect"),
                retry_hint: text.lines().any(|line| line.starts_with("retry:")),
            })
        }));
    }
    tally_testkit::wait_until("every stream's snapshot", Duration::from_secs(120), || {
        let seen = snapshots.load(Ordering::Relaxed);
        async move { Ok(seen == STREAMS) }
    })
    .await?;

    let margin = Duration::from_secs(3);
    let (status, took) = cluster
        .terminate_query(Duration::from_secs(SHUTDOWN_SECONDS) + margin)
        .await?;
    eprintln!("{deployment:?}: exited {status} {took:?} after SIGTERM with {STREAMS} streams open");
    ensure!(
        status.success(),
        "the process exited with {status} after SIGTERM"
    );
    ensure!(
        took <= Duration::from_secs(SHUTDOWN_SECONDS),
        "took {took:?} to stop, more than TALLY_SHUTDOWN_SECONDS"
    );
    let (mut reconnects, mut hints) = (0, 0);
    for stream in streams {
        let seen = tokio::time::timeout(Duration::from_secs(10), stream)
            .await
            .context("a stream still open after the process exited")???;
        reconnects += usize::from(seen.reconnect);
        hints += usize::from(seen.retry_hint);
    }
    ensure!(
        reconnects == STREAMS && hints == STREAMS,
        "of {STREAMS} streams {reconnects} got `reconnect` and {hints} a retry hint"
    );

    if deployment == Deployment::Standalone {
        // The data directory holds every vote answered 202: the final flush ran.
        cluster.restart_processor(&[]).await?;
        let results = cluster.results("drain").await?;
        ensure!(
            results["total_votes"].as_u64() == Some(accepted),
            "after restart: {results}"
        );
    }
    Ok(())
}
