//! What the query service serves the web faces: the dashboard's pages and versioned assets,
//! the widget script, a poll's public ballot, cross-origin reads for the widget, and the
//! multi-poll live stream of the campaign overview.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request};
use common::{ballot, Harness, ANALYST_KEY};
use serde_json::{json, Value};
use tally_core::ports::{LiveFeed, PollRegistry};
use tally_core::results::{Results, Tally};
use tally_core::time::now_ms;

const T0: i64 = 1_767_225_600_000;

fn get_with(path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut request = Request::get(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Body::empty()).unwrap()
}

/// The `src`/`href` of `page` that point at a versioned asset named `file`.
fn asset_path(page: &str, file: &str) -> String {
    let at = page
        .find(&format!("/{file}\""))
        .unwrap_or_else(|| panic!("the page does not load {file}"));
    let start = page[..at].rfind('"').unwrap() + 1;
    let relative = &page[start..at + file.len() + 1];
    format!("/{}", relative.trim_start_matches("../"))
}

#[tokio::test]
async fn pages_are_revalidated_and_assets_are_cached_by_version() {
    let h = Harness::new();
    let redirect = h.get("/dashboard", None).await;
    assert_eq!(redirect.status, 308);
    assert_eq!(redirect.header("location"), Some("dashboard/"));

    for path in [
        "/dashboard/",
        "/dashboard/polls/anything",
        "/embed/anything",
    ] {
        let page = h.get(path, None).await;
        assert_eq!(page.status, 200, "{path}");
        assert_eq!(
            page.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(page.header("cache-control"), Some("no-cache"), "{path}");
        assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
        let csp = page.header("content-security-policy").unwrap();
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        let etag = page.header("etag").unwrap().to_owned();
        let again = h.send(get_with(path, &[("if-none-match", &etag)])).await;
        assert_eq!(again.status, 304, "{path}");
        assert!(again.body.is_empty());
    }
    // The dashboard cannot be framed (its admin buttons); the embed page is made for it.
    let dashboard = h.get("/dashboard/", None).await;
    assert_eq!(dashboard.header("x-frame-options"), Some("DENY"));
    assert!(dashboard
        .header("content-security-policy")
        .unwrap()
        .contains("frame-ancestors 'none'"));
    let embed = h.get("/embed/p", None).await;
    assert!(embed.header("x-frame-options").is_none());
    assert!(embed
        .header("content-security-policy")
        .unwrap()
        .contains("frame-ancestors *"));

    // A page names its scripts by version: cached for a year, and any other version is
    // today's file, revalidated.
    let poll_page = h.get("/dashboard/polls/p", None).await.text();
    let script = asset_path(&poll_page, "poll.js");
    assert!(script.starts_with("/dashboard/assets/"), "{script}");
    let current = h.get(&script, None).await;
    assert_eq!(current.status, 200);
    assert_eq!(
        current.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(
        current.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    let stale = h.get("/dashboard/assets/000000000000/poll.js", None).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.header("cache-control"), Some("no-cache"));
    assert_eq!(stale.body, current.body);
    h.get("/dashboard/assets/000000000000/secrets.txt", None)
        .await
        .expect_problem(404, "not-found", None);

    // The widget script is at the address sites paste, and loads its versioned stylesheet.
    let widget = h.get("/widget.js", None).await;
    assert_eq!(widget.status, 200);
    assert_eq!(widget.header("cache-control"), Some("public, max-age=300"));
    let text = widget.text();
    let style = asset_path(&text, "widget.css");
    let css = h.get(&style, None).await;
    assert_eq!(css.header("content-type"), Some("text/css; charset=utf-8"));
    assert_eq!(css.header("access-control-allow-origin"), Some("*"));
}

#[tokio::test]
async fn unknown_paths_stay_problems() {
    let h = Harness::new();
    for path in ["/v1/nope", "/dashboard/nope", "/dashboard/polls", "/embed"] {
        h.get(path, None)
            .await
            .expect_problem(404, "no-route", None);
    }
}

#[tokio::test]
async fn the_ballot_is_public_and_holds_only_what_voters_see() {
    let h = Harness::new();
    h.create(json!({"id": "b", "title": "T", "question": "Q?", "kind": "multi", "max_choices": 2,
        "campaign": "secret-campaign", "dimensions": ["plan"], "results_visibility": "after_close",
        "allowed_origins": ["https://shop.example"],
        "options": [{"id": "x", "label": "X"}, {"id": "y", "label": "Y"}, {"id": "z", "label": "Z"}]}))
        .await;
    let ballot: Value = h.get("/v1/polls/b/ballot", None).await.json(200);
    assert_eq!(
        ballot,
        json!({"poll_id": "b", "title": "T", "question": "Q?", "kind": "multi", "max_choices": 2,
            "options": [{"id": "x", "label": "X"}, {"id": "y", "label": "Y"}, {"id": "z", "label": "Z"}],
            "status": "open", "results_visibility": "after_close", "dedupe": "per_voter",
            "require_token": false})
    );
    h.create(json!({"id": "n", "title": "T", "question": "Q?", "kind": "nps"}))
        .await;
    let nps: Value = h.get("/v1/polls/n/ballot", None).await.json(200);
    assert_eq!(nps["scale"], json!({"min": 0, "max": 10}));
    h.get("/v1/polls/none/ballot", None)
        .await
        .expect_problem(404, "not-found", None);
}

#[tokio::test]
async fn allowed_origins_round_trip_through_create_and_patch() {
    let h = Harness::new();
    let created = h
        .create(
            json!({"id": "o", "title": "T", "question": "Q?", "kind": "nps",
            "allowed_origins": ["HTTPS://Shop.Example:443"]}),
        )
        .await;
    assert_eq!(created.poll.allowed_origins, ["https://shop.example"]);
    let patched: Value = h
        .admin(
            Method::PATCH,
            "/v1/polls/o",
            Some(json!({"allowed_origins": ["https://a.example", "http://127.0.0.2:8000"]})),
        )
        .await
        .json(200);
    assert_eq!(
        patched["allowed_origins"],
        json!(["https://a.example", "http://127.0.0.2:8000"])
    );
    let read: Value = h.admin(Method::GET, "/v1/polls/o", None).await.json(200);
    assert_eq!(read["allowed_origins"], patched["allowed_origins"]);
    h.admin(
        Method::PATCH,
        "/v1/polls/o",
        Some(json!({"allowed_origins": ["https://a.example/path"]})),
    )
    .await
    .expect_problem(422, "invalid-field", Some("allowed_origins[0]"));
}

#[tokio::test]
async fn pages_of_listed_origins_read_results_and_live_totals_others_are_refused() {
    let h = Harness::new();
    h.create(
        json!({"id": "w", "title": "T", "question": "Q", "kind": "single",
        "allowed_origins": ["https://shop.example"],
        "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]}),
    )
    .await;
    for path in [
        "/v1/polls/w/results",
        "/v1/polls/w/ballot",
        "/v1/live?polls=w",
    ] {
        let answer = h
            .send(get_with(path, &[("origin", "https://shop.example")]))
            .await;
        assert_eq!(answer.status, 200, "{path}");
        assert_eq!(
            answer.header("access-control-allow-origin"),
            Some("https://shop.example"),
            "{path}"
        );
        assert!(answer.header("access-control-allow-credentials").is_none());
        assert_eq!(answer.header("vary"), Some("origin"));
        let refused = h
            .send(get_with(path, &[("origin", "https://evil.example")]))
            .await;
        refused.expect_problem(403, "origin-not-allowed", None);
        assert!(refused.header("access-control-allow-origin").is_none());
        // Servers and tally's own pages send no Origin, or their own.
        let plain = h.get(path, None).await;
        assert_eq!(plain.status, 200, "{path}");
        assert!(plain.header("access-control-allow-origin").is_none());
    }
    let preflight = h
        .send(
            Request::builder()
                .method(Method::OPTIONS)
                .uri("/v1/polls/w/live")
                .header("origin", "https://shop.example")
                .header("access-control-request-method", "GET")
                .header("access-control-request-headers", "last-event-id")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(preflight.status, 204);
    assert_eq!(
        preflight.header("access-control-allow-headers"),
        Some("last-event-id")
    );
    // A multi-poll stream across origins needs every poll to list the origin.
    h.ab_poll("unlisted", "live").await;
    h.send(get_with(
        "/v1/live?polls=w,unlisted",
        &[("origin", "https://shop.example")],
    ))
    .await
    .expect_problem(403, "origin-not-allowed", None);
    // Keys are never sent across origins: the preflight does not allow Authorization.
    assert!(!preflight
        .header("access-control-allow-headers")
        .unwrap()
        .contains("authorization"));
}

/// Publishes totals of `poll` at `as_of` with `ballots` (all for `a` but one) until `stream`
/// shows an event (the query service subscribes to the feed in the background).
async fn publish_until_seen(
    h: &Harness,
    stream: &mut common::SseReader,
    poll: &str,
    as_of: u64,
    ballots: u64,
) -> common::SseEvent {
    let poll = h.store.registry.get(poll).await.unwrap().expect("the poll");
    let tally = Tally {
        ballots,
        unique_voters: ballots,
        counts: [("a".to_owned(), ballots - 1), ("b".to_owned(), 1)].into(),
        as_of,
    };
    let results = Results::new(&poll, &tally, now_ms());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        h.store.live.publish(&results).await.unwrap();
        if let Ok(event) = tokio::time::timeout(Duration::from_millis(100), stream.next()).await {
            return event;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no event after publishing totals"
        );
    }
}

#[tokio::test]
async fn one_stream_carries_many_polls_and_resumes_from_its_event_id() {
    let h = Harness::new();
    h.ab_poll("one", "live").await;
    h.ab_poll("two", "live").await;
    let first = h
        .put_votes(vec![
            ballot("one", "u1", "a", "DE", T0),
            ballot("one", "u2", "b", "DE", T0),
        ])
        .await;

    let answer = h.get("/v1/live?polls=one,two", None).await;
    assert_eq!(answer.header("cache-control"), Some("no-cache"));
    let mut stream = answer.events();
    let snapshot = stream.next_within(Duration::from_secs(5)).await;
    assert_eq!(snapshot.event, "snapshot");
    assert_eq!(snapshot.id, Some(format!("{first}.0")));
    let data: Value = serde_json::from_str(&snapshot.data).unwrap();
    let polls = data["polls"].as_array().unwrap();
    assert_eq!(
        polls
            .iter()
            .map(|p| (p["poll_id"].clone(), p["total_votes"].clone()))
            .collect::<Vec<_>>(),
        [(json!("one"), json!(2)), (json!("two"), json!(0))]
    );

    // Newer totals of one poll come as `totals` with that poll alone, and the id moves.
    let totals = publish_until_seen(&h, &mut stream, "two", 7, 3).await;
    assert_eq!(totals.event, "totals");
    assert_eq!(totals.id, Some(format!("{first}.7")));
    let data: Value = serde_json::from_str(&totals.data).unwrap();
    assert_eq!(data["polls"].as_array().unwrap().len(), 1);
    assert_eq!(data["polls"][0]["poll_id"], "two");
    assert_eq!(data["polls"][0]["total_votes"], 3);

    // Resuming at that id sends nothing old; resuming behind it sends what is newer.
    let behind = h
        .send(get_with(
            "/v1/live?polls=one,two",
            &[("last-event-id", &format!("{first}.0"))],
        ))
        .await
        .events()
        .next_within(Duration::from_secs(5))
        .await;
    assert_eq!(
        (behind.event.as_str(), behind.id.clone()),
        ("totals", Some(format!("{first}.7")))
    );
    let data: Value = serde_json::from_str(&behind.data).unwrap();
    assert_eq!(data["polls"].as_array().unwrap().len(), 1, "{data}");
    let mut current = h
        .send(get_with(
            "/v1/live?polls=one,two",
            &[("last-event-id", &format!("{first}.7"))],
        ))
        .await
        .events();
    let next = publish_until_seen(&h, &mut current, "two", 9, 4).await;
    assert_eq!(
        (next.event.as_str(), next.id),
        ("totals", Some(format!("{first}.9")))
    );

    // Closing one poll says so on the stream, which goes on.
    h.admin(Method::POST, "/v1/polls/one/close", None).await;
    let closed = stream.next_within(Duration::from_secs(5)).await;
    assert_eq!(closed.event, "closed");
    assert_eq!(
        serde_json::from_str::<Value>(&closed.data).unwrap(),
        json!({"poll_id": "one", "status": "closed"})
    );
}

#[tokio::test]
async fn the_multi_poll_stream_refuses_what_it_cannot_carry() {
    let h = Harness::new();
    h.ab_poll("open-poll", "live").await;
    h.ab_poll("internal", "private").await;
    h.get("/v1/live", None)
        .await
        .expect_problem(422, "invalid-field", Some("polls"));
    let many: Vec<String> = (0..=tally_query::MAX_STREAM_POLLS)
        .map(|i| format!("p{i}"))
        .collect();
    h.get(&format!("/v1/live?polls={}", many.join(",")), None)
        .await
        .expect_problem(422, "invalid-field", Some("polls"));
    h.get("/v1/live?polls=open-poll,missing", None)
        .await
        .expect_problem(404, "not-found", None);
    // Every poll must be one the client may see; an analyst key sees them all.
    h.get("/v1/live?polls=open-poll,internal", None)
        .await
        .expect_problem(401, "unauthorized", None);
    let answer = h
        .get("/v1/live?polls=open-poll,internal", Some(ANALYST_KEY))
        .await;
    assert_eq!(answer.status, 200);
    for bad in ["1.2", "a", "", "-1"] {
        h.send(get_with(
            "/v1/live?polls=open-poll",
            &[("last-event-id", bad)],
        ))
        .await
        .expect_problem(400, "invalid-last-event-id", None);
    }
}
