//! The embeddable vote widget in a real browser, on a page of another site: it votes once per
//! browser, and a site the poll does not list cannot vote.
//!
//! The shop page is served by the test on 127.0.0.2 (allowed) and 127.0.0.3 (not allowed);
//! tally is on 127.0.0.1, so every request of the widget is cross-origin (and cross-site).
//! Whether something was counted is read from `/results` after a sentinel vote sent through
//! the API: the sentinel goes to the same poll, so the same log partition, after the vote
//! in question, and once it is counted everything before it is.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use serde_json::{json, Value};

use crate::browser::{serve_page, Browser};
use crate::cluster::{option_counts, Cluster, Deployment};

const WAIT: Duration = Duration::from_secs(30);

/// The widget's state, once it is `want`; fails naming the state and message it shows.
async fn wait_state(browser: &Browser, want: &str) -> Result<()> {
    let end = tokio::time::Instant::now() + WAIT;
    loop {
        let shown = browser
            .eval(
                "const w = document.querySelector('.tally-widget');
                 return w && [w.dataset.state, w.querySelector('.tw-status').textContent];",
                json!([]),
            )
            .await?;
        if shown[0] == want {
            return Ok(());
        }
        if tokio::time::Instant::now() > end {
            bail!("the widget did not reach `{want}`: it shows {shown}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The script tag a site pastes; in standalone `data-ingest` is left out, as it defaults to
/// the script's own origin, which takes votes there.
fn widget_tag(cluster: &Cluster, poll: &str) -> String {
    let ingest = match cluster.deployment {
        Deployment::Distributed => format!(r#" data-ingest="{}""#, cluster.ingest.url),
        Deployment::Standalone => String::new(),
    };
    format!(
        r#"<script src="{}/widget.js" data-poll="{poll}"{ingest} async></script>"#,
        cluster.query.url
    )
}

fn shop_page(body: &str) -> String {
    format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Shop</title></head>\
         <body><h1>Spring sale</h1><p>Tell us what you think.</p>{body}</body></html>"
    )
}

/// Sends one vote through the API and waits until the poll counts `total`: then every vote
/// sent before it is counted too.
async fn sentinel(
    cluster: &Cluster,
    poll: &str,
    voter: &str,
    choice: Value,
    total: u64,
) -> Result<Value> {
    let (status, answer) = cluster
        .vote(poll, &json!({"voter_id": voter, "choice": choice}))
        .await?;
    ensure!(status == 202, "sentinel vote answered {status}: {answer}");
    cluster.wait_for_total(poll, total, WAIT).await
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

crate::for_each_deployment_in_chromium!(widget_votes_once_per_browser_and_only_from_allowed_sites);

async fn widget_votes_once_per_browser_and_only_from_allowed_sites(
    deployment: Deployment,
) -> Result<()> {
    let cluster = Cluster::start(deployment).await?;
    let poll = tally_testkit::unique_name("widget").replace('_', "-");
    let tag = widget_tag(&cluster, &poll);
    let allowed = serve_page("127.0.0.2", shop_page(&tag)).await?;
    let refused = serve_page("127.0.0.3", shop_page(&tag)).await?;
    cluster
        .create_poll(json!({
            "id": poll, "title": "Colour", "question": "Which colour for spring?", "kind": "single",
            "options": [{"id": "red", "label": "Red"}, {"id": "green", "label": "Green"}, {"id": "blue", "label": "Blue"}],
            "allowed_origins": [allowed.origin],
        }))
        .await?;
    let browser = Browser::start().await?;

    browser.goto(&allowed.url).await?;
    wait_state(&browser, "ready").await?;
    let options = browser
        .eval(
            "return [...document.querySelectorAll('.tally-widget [data-option]')].map(e => e.dataset.option)",
            json!([]),
        )
        .await?;
    ensure!(
        options == json!(["red", "green", "blue"]),
        "options shown: {options}"
    );
    browser.click(".tally-widget [data-option='red']").await?;
    wait_state(&browser, "voted").await?;
    let results = cluster.wait_for_total(&poll, 1, WAIT).await?;
    ensure!(
        option_counts(&results) == counts(&[("red", 1)]),
        "{results}"
    );
    browser
        .wait_for(
            "the widget shows the results after the vote",
            "return document.querySelector(\".tally-widget [data-option='red']\").dataset.count === '1'",
            WAIT,
        )
        .await?;

    // The same browser again, after a reload: the vote is refused and nothing changes.
    browser.reload().await?;
    wait_state(&browser, "ready").await?;
    browser.click(".tally-widget [data-option='blue']").await?;
    wait_state(&browser, "already-voted").await?;
    let results = sentinel(&cluster, &poll, "sentinel-1", json!("green"), 2).await?;
    ensure!(
        option_counts(&results) == counts(&[("red", 1), ("green", 1)]),
        "a second vote from the browser was counted: {results}"
    );
    // The widget follows the results live, across origins: the sentinel shows.
    browser
        .wait_for(
            "the widget's live results show the sentinel",
            "return document.querySelector(\".tally-widget [data-option='green']\").dataset.count === '1'",
            WAIT,
        )
        .await?;
    if let Some(dir) = crate::browser::screenshot_dir() {
        if deployment == Deployment::Standalone {
            browser.set_window(700, 560).await?;
            browser.screenshot(&dir.join("widget.png")).await?;
        }
    }

    // A site the poll does not list: the widget cannot load the poll, and cannot vote.
    browser.goto(&refused.url).await?;
    wait_state(&browser, "error").await?;
    let buttons = browser
        .eval(
            "return document.querySelectorAll('.tally-widget [data-option]').length",
            json!([]),
        )
        .await?;
    ensure!(
        buttons == json!(0),
        "a refused site was shown {buttons} answers"
    );
    // What a page there could send anyway (its script may ignore the failed preflight), as
    // the browser would send it: refused, and nothing is stored.
    let votes = format!("{}/v1/polls/{poll}/votes", cluster.ingest.url);
    let preflight = cluster
        .http
        .request(reqwest::Method::OPTIONS, &votes)
        .header("Origin", &refused.origin)
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "content-type")
        .send()
        .await?;
    ensure!(
        preflight.status() == 403
            && preflight
                .headers()
                .get("access-control-allow-origin")
                .is_none(),
        "the preflight from {} answered {} {:?}",
        refused.origin,
        preflight.status(),
        preflight.headers()
    );
    let forged = cluster
        .http
        .post(&votes)
        .header("Origin", &refused.origin)
        .json(&json!({"voter_id": "forged", "choice": "blue"}))
        .send()
        .await?;
    let status = forged.status();
    let problem: Value = forged.json().await?;
    ensure!(
        status == 403
            && problem["type"]
                .as_str()
                .is_some_and(|t| t.ends_with("/origin-not-allowed")),
        "a vote from {} answered {status}: {problem}",
        refused.origin
    );
    let allowed_preflight = cluster
        .http
        .request(reqwest::Method::OPTIONS, &votes)
        .header("Origin", &allowed.origin)
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "content-type, tally-voter",
        )
        .send()
        .await?;
    ensure!(
        allowed_preflight.status() == 204
            && allowed_preflight
                .headers()
                .get("access-control-allow-origin")
                .and_then(|v| v.to_str().ok())
                == Some(allowed.origin.as_str()),
        "the preflight from the allowed site answered {} {:?}",
        allowed_preflight.status(),
        allowed_preflight.headers()
    );
    let results = sentinel(&cluster, &poll, "sentinel-2", json!("green"), 3).await?;
    ensure!(
        option_counts(&results) == counts(&[("red", 1), ("green", 2)]),
        "a refused origin changed the count: {results}"
    );
    browser.close().await;
    Ok(())
}

crate::for_each_deployment_in_chromium!(embed_page_in_an_iframe_votes_once_per_browser);

/// The `/embed/{poll}` page in an `<iframe>` of another site: the frame is tally's own
/// origin (the query service's), which in the distributed deployment votes across origins to
/// ingest and so must be listed; in standalone it is the same origin and needs no listing.
/// Inside the frame the browser keeps the voter token in the frame's own storage.
async fn embed_page_in_an_iframe_votes_once_per_browser(deployment: Deployment) -> Result<()> {
    let cluster = Cluster::start(deployment).await?;
    let poll = tally_testkit::unique_name("embed").replace('_', "-");
    let allowed_origins = match deployment {
        Deployment::Distributed => json!([cluster.query.url]),
        Deployment::Standalone => json!([]),
    };
    cluster
        .create_poll(json!({
            "id": poll, "title": "Rate us", "question": "How likely are you to recommend us?",
            "kind": "nps", "allowed_origins": allowed_origins,
        }))
        .await?;
    let frame = format!(
        r#"<iframe id="poll" title="Poll" width="420" height="260" src="{}/embed/{poll}?ingest={}"></iframe>"#,
        cluster.query.url, cluster.ingest.url
    );
    let page = serve_page("127.0.0.2", shop_page(&frame)).await?;
    let browser = Browser::start().await?;
    browser.goto(&page.url).await?;
    browser.enter_frame("#poll").await?;
    wait_state(&browser, "ready").await?;
    let scale = browser
        .eval(
            "return document.querySelectorAll('.tally-widget [data-option]').length",
            json!([]),
        )
        .await?;
    ensure!(
        scale == json!(11),
        "an NPS widget shows 0-10, not {scale} answers"
    );
    browser.click(".tally-widget [data-option='9']").await?;
    wait_state(&browser, "voted").await?;
    let results = cluster.wait_for_total(&poll, 1, WAIT).await?;
    ensure!(results["nps"]["promoters"] == 1, "{results}");

    browser.leave_frames().await?;
    browser.reload().await?;
    browser.enter_frame("#poll").await?;
    wait_state(&browser, "ready").await?;
    browser.click(".tally-widget [data-option='3']").await?;
    wait_state(&browser, "already-voted").await?;
    let results = sentinel(&cluster, &poll, "sentinel", json!(10), 2).await?;
    ensure!(
        results["nps"]["promoters"] == 2 && results["nps"]["detractors"] == 0,
        "a second vote from the framed widget was counted: {results}"
    );
    browser.close().await;
    Ok(())
}
