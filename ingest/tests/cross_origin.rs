//! Votes from web pages of other origins (the embedded widget): allowed only from a poll's
//! `allowed_origins`, refused from anywhere else without storing anything, and one vote per
//! browser through the voter token ingest hands out.

#[allow(dead_code)] // this file uses part of the harness
mod common;

use axum::body::Body;
use axum::http::{header, Method, Request};
use common::{from_peer, vote_json, with_header, Harness};
use serde_json::json;

const SHOP: &str = "https://shop.example";
const ELSEWHERE: &str = "https://elsewhere.example";

async fn widget_poll(harness: &Harness, id: &str) {
    harness
        .colour_poll(id, |poll| poll.allowed_origins = vec![SHOP.to_owned()])
        .await;
}

fn preflight(poll: &str, origin: &str) -> Request<Body> {
    Request::builder()
        .method(Method::OPTIONS)
        .uri(format!("/v1/polls/{poll}/votes"))
        .header(header::ORIGIN, origin)
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .header(
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            "content-type, tally-voter",
        )
        .body(Body::empty())
        .unwrap()
}

/// A vote as a browser on `origin` sends it: with `Origin` and `Sec-Fetch-Mode: cors`, and
/// no voter id of its own.
fn browser_vote(poll: &str, origin: &str, choice: &str) -> Request<Body> {
    let request = vote_json(poll, json!({ "choice": choice }));
    let request = with_header(request, "origin", origin);
    from_peer(
        with_header(request, "sec-fetch-mode", "cors"),
        "203.0.113.7:5000",
    )
}

#[tokio::test]
async fn a_listed_origin_passes_the_preflight_and_votes() {
    let harness = Harness::new();
    widget_poll(&harness, "p").await;
    let answer = harness.send(preflight("p", SHOP)).await;
    assert_eq!(answer.status, 204, "{answer:?}");
    assert_eq!(answer.header("access-control-allow-origin"), Some(SHOP));
    assert_eq!(answer.header("access-control-allow-methods"), Some("POST"));
    assert!(answer
        .header("access-control-allow-headers")
        .is_some_and(|h| h.contains("tally-voter") && h.contains("content-type")));
    assert!(answer.header("access-control-allow-credentials").is_none());

    let answer = harness.send(browser_vote("p", SHOP, "red")).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_eq!(answer.header("access-control-allow-origin"), Some(SHOP));
    assert!(answer
        .header("access-control-expose-headers")
        .is_some_and(|h| h.contains("tally-voter")));
    assert_eq!(harness.tip(), 1);
}

#[tokio::test]
async fn any_other_origin_is_refused_and_nothing_is_stored() {
    let harness = Harness::new();
    widget_poll(&harness, "p").await;
    harness.colour_poll("closed-to-all", |_| {}).await;
    for (poll, origin) in [("p", ELSEWHERE), ("closed-to-all", SHOP), ("p", "null")] {
        let answer = harness.send(preflight(poll, origin)).await;
        assert_eq!(answer.status, 403, "{poll} {origin}: {answer:?}");
        assert!(answer.header("access-control-allow-origin").is_none());
        let answer = harness.send(browser_vote(poll, origin, "red")).await;
        let problem = answer.expect_problem(403, "origin-not-allowed", None);
        assert!(answer.header("access-control-allow-origin").is_none());
        if origin != "null" {
            assert!(problem.detail.contains(origin), "{}", problem.detail);
        }
    }
    assert_eq!(harness.tip(), 0, "a refused vote was stored");
}

#[tokio::test]
async fn votes_without_origin_and_from_tallys_own_origin_need_no_listing() {
    let harness = Harness::new();
    harness.colour_poll("p", |_| {}).await;
    // A server: no Origin.
    let answer = harness
        .send(vote_json("p", json!({"voter_id": "u-1", "choice": "red"})))
        .await;
    assert_eq!(answer.status, 202, "{answer:?}");
    // A page served by tally itself (the dashboard, /embed/…): Origin is the Host it sent to,
    // whatever the case and default port.
    let same = with_header(
        browser_vote("p", "http://Tally.example", "blue"),
        "host",
        "tally.example:80",
    );
    let answer = harness.send(same).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    assert!(answer.header("access-control-allow-origin").is_none());
    // The same host on another port is another origin.
    let other_port = with_header(
        browser_vote("p", "http://tally.example:8081", "blue"),
        "host",
        "tally.example:8080",
    );
    harness
        .send(other_port)
        .await
        .expect_problem(403, "origin-not-allowed", None);
    assert_eq!(harness.tip(), 2);
}

#[tokio::test]
async fn a_browser_votes_once_with_the_voter_token_it_was_given() {
    let harness = Harness::new();
    widget_poll(&harness, "p").await;
    let first = harness.send(browser_vote("p", SHOP, "red")).await;
    assert_eq!(first.status, 202, "{first:?}");
    let token = first
        .header("tally-voter")
        .expect("a voter token")
        .to_owned();
    assert!(token.starts_with("bv1."), "{token}");
    // Across sites the browser sends no cookie of tally's: the token is what it brings back.
    let again = with_header(browser_vote("p", SHOP, "blue"), "tally-voter", &token);
    harness
        .send(again)
        .await
        .expect_problem(409, "already-voted", None);
    // The token names the same voter as the cookie set with it (same-site pages).
    let cookie = first.header("set-cookie").expect("a cookie");
    let id = cookie
        .strip_prefix("tally_voter=")
        .and_then(|rest| rest.split(';').next())
        .unwrap();
    assert_eq!(token.split('.').nth(1), Some(id));
    // A token ingest did not sign is no identity: the browser is a new voter.
    let forged = format!("bv1.{}.{}", "a".repeat(32), "0".repeat(32));
    let answer = harness
        .send(with_header(
            browser_vote("p", SHOP, "blue"),
            "tally-voter",
            &forged,
        ))
        .await;
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_ne!(answer.header("tally-voter"), Some(forged.as_str()));
    let tampered = token.replacen("bv1.", "bv1.x", 1);
    let answer = harness
        .send(with_header(
            browser_vote("p", SHOP, "blue"),
            "tally-voter",
            &tampered,
        ))
        .await;
    assert_eq!(
        answer.status, 202,
        "a tampered token is not the voter it names"
    );
    assert_eq!(harness.tip(), 3);
}
