//! The query HTTP API in-process (`router().oneshot()`) on the embedded back ends: the role
//! matrix of every route, poll management through its lifecycle, results visibility, the
//! parameter errors of breakdowns and time series, live streams and token minting. The
//! end-to-end suites (`tests/e2e/roles.rs`, `management.rs`, `visibility.rs`, `tokens.rs`,
//! `bad_input.rs`) prove the same through real processes; these run in seconds.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request};
use serde_json::{json, Value};
use tally_core::api::{BreakdownDoc, PollDoc, PollPage, Readiness, TimeseriesDoc, TokenIssued};
use tally_core::poll::PollStatus;
use tally_core::ports::{LiveFeed, PollRegistry};
use tally_core::results::{Results, Tally};
use tally_core::time::{format_ms, now_ms};
use tally_core::token;

use common::{ballot, Harness, ADMIN_KEY, ANALYST_KEY};

/// Epoch ms of a whole minute in the past, where test votes are received.
const T0: i64 = 1_700_000_040_000;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Needs {
    Admin,
    Analyst,
    /// Anyone, on a poll whose results are `live`; a key that is sent must be valid.
    Nobody,
}

#[tokio::test]
async fn every_route_admits_exactly_its_roles_and_a_refusal_changes_nothing() {
    let h = Harness::new();
    h.ab_poll("guarded", "live").await;
    let new_poll = json!({"id": "made-by-role", "title": "T", "question": "Q", "kind": "single",
        "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]});
    let routes: Vec<(Method, &str, Option<Value>, Needs)> = vec![
        (Method::POST, "/v1/polls", Some(new_poll), Needs::Admin),
        (Method::GET, "/v1/polls", None, Needs::Admin),
        (Method::GET, "/v1/polls/guarded", None, Needs::Admin),
        (
            Method::PATCH,
            "/v1/polls/guarded",
            Some(json!({"title": "Renamed"})),
            Needs::Admin,
        ),
        (Method::POST, "/v1/polls/guarded/close", None, Needs::Admin),
        (Method::POST, "/v1/polls/guarded/reopen", None, Needs::Admin),
        (
            Method::POST,
            "/v1/polls/guarded/tokens",
            Some(json!({"voter_id": "u1"})),
            Needs::Admin,
        ),
        (Method::DELETE, "/v1/polls/made-by-role", None, Needs::Admin),
        (
            Method::GET,
            "/v1/polls/guarded/breakdown?by=country",
            None,
            Needs::Analyst,
        ),
        (
            Method::GET,
            "/v1/polls/guarded/timeseries",
            None,
            Needs::Analyst,
        ),
        (
            Method::GET,
            "/v1/polls/guarded/results",
            None,
            Needs::Nobody,
        ),
        (Method::GET, "/v1/polls/guarded/live", None, Needs::Nobody),
    ];
    for (method, path, body, needs) in routes {
        let what = format!("{method} {path}");
        let before = h.all_polls().await;

        let refused_keys: &[(Option<&str>, u16, &str)] = match needs {
            Needs::Admin => &[
                (None, 401, "unauthorized"),
                (Some("not-a-key"), 401, "unauthorized"),
                (Some(ANALYST_KEY), 403, "forbidden"),
            ],
            Needs::Analyst => &[
                (None, 401, "unauthorized"),
                (Some("not-a-key"), 401, "unauthorized"),
            ],
            Needs::Nobody => &[(Some("not-a-key"), 401, "unauthorized")],
        };
        for (key, status, slug) in refused_keys {
            let answer = h.call(method.clone(), path, *key, body.clone()).await;
            assert_eq!(answer.status.as_u16(), *status, "{what} with {key:?}");
            assert_eq!(answer.problem().slug(), *slug, "{what} with {key:?}");
        }
        // Not a bearer key at all.
        let request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("authorization", format!("Basic {ADMIN_KEY}"))
            .header("content-type", "application/json");
        let answer = h
            .send(
                request
                    .body(Body::from(
                        body.as_ref().map(Value::to_string).unwrap_or_default(),
                    ))
                    .unwrap(),
            )
            .await;
        answer.expect_problem(401, "unauthorized", None);
        assert_eq!(
            h.all_polls().await,
            before,
            "a refused {what} changed the polls"
        );

        let allowed: &[Option<&str>] = match needs {
            Needs::Admin => &[Some(ADMIN_KEY)],
            Needs::Analyst => &[Some(ANALYST_KEY), Some(ADMIN_KEY)],
            Needs::Nobody => &[None, Some(ANALYST_KEY), Some(ADMIN_KEY)],
        };
        for key in allowed {
            let answer = h.call(method.clone(), path, *key, body.clone()).await;
            assert!(
                answer.status.is_success(),
                "{what} with {key:?}: {} {}",
                answer.status,
                answer.text()
            );
        }
    }
}

#[tokio::test]
async fn polls_are_managed_through_their_lifecycle() {
    let h = Harness::new();
    let answer = h
        .admin(
            Method::POST,
            "/v1/polls",
            Some(
                json!({"title": "Launch", "question": "Colour?", "kind": "single",
                "options": [{"id": "red", "label": "Red"}, {"id": "blue", "label": "Blue"}]}),
            ),
        )
        .await;
    let created: PollDoc = answer.json(201);
    let id = created.poll.id.clone();
    assert!(id.starts_with("p-"), "{id}");
    assert_eq!(
        answer.header("location"),
        Some(format!("/v1/polls/{id}").as_str())
    );
    assert_eq!(created.status, PollStatus::Open);
    assert!(created.poll.version > 0);
    let path = format!("/v1/polls/{id}");

    let got: PollDoc = h.admin(Method::GET, &path, None).await.json(200);
    assert_eq!(got, created);

    // Pagination: pages of 4 over 6 polls, in id order, with `next` as the cursor.
    for n in 0..5 {
        h.create(json!({"id": format!("list-{n}"), "title": "T", "question": "Q", "kind": "nps"}))
            .await;
    }
    let first: PollPage = h
        .admin(Method::GET, "/v1/polls?limit=4", None)
        .await
        .json(200);
    let ids = |page: &PollPage| -> Vec<String> {
        page.polls.iter().map(|doc| doc.poll.id.clone()).collect()
    };
    assert_eq!(ids(&first), ["list-0", "list-1", "list-2", "list-3"]);
    assert_eq!(first.next.as_deref(), Some("list-3"));
    let rest: PollPage = h
        .admin(Method::GET, "/v1/polls?limit=4&after=list-3", None)
        .await
        .json(200);
    assert_eq!(ids(&rest), ["list-4".to_owned(), id.clone()]);
    assert_eq!(rest.next, None);

    // Patch: labels change, options are added, versions grow.
    let patched: PollDoc = h
        .admin(
            Method::PATCH,
            &path,
            Some(
                json!({"title": "Launch day", "options": [{"id": "red", "label": "Scarlet"},
                {"id": "blue", "label": "Blue"}, {"id": "green", "label": "Green"}]}),
            ),
        )
        .await
        .json(200);
    assert_eq!(patched.poll.title, "Launch day");
    let options: Vec<(&str, &str)> = patched
        .poll
        .options
        .iter()
        .map(|o| (o.id.as_str(), o.label.as_str()))
        .collect();
    assert_eq!(
        options,
        [("red", "Scarlet"), ("blue", "Blue"), ("green", "Green")]
    );
    assert!(patched.poll.version > created.poll.version);

    // An option with votes cannot be removed; one without can.
    h.put_votes(vec![ballot(&id, "u1", "red", "DE", T0)]).await;
    h.admin(
        Method::PATCH,
        &path,
        Some(json!({"options": [{"id": "blue", "label": "Blue"},
            {"id": "green", "label": "Green"}]})),
    )
    .await
    .expect_problem(422, "invalid-field", Some("options"));
    let trimmed: PollDoc = h
        .admin(
            Method::PATCH,
            &path,
            Some(json!({"options": [{"id": "red", "label": "Red"},
                {"id": "blue", "label": "Blue"}]})),
        )
        .await
        .json(200);
    assert_eq!(trimmed.poll.options.len(), 2);

    // Close and reopen.
    let closed: PollDoc = h
        .admin(Method::POST, &format!("{path}/close"), None)
        .await
        .json(200);
    assert_eq!(closed.status, PollStatus::Closed);
    assert!(closed.poll.closed_at.is_some());
    let reopened: PollDoc = h
        .admin(Method::POST, &format!("{path}/reopen"), None)
        .await
        .json(200);
    assert_eq!(reopened.status, PollStatus::Open);
    assert_eq!(reopened.poll.closed_at, None);

    // A poll past its scheduled end is closed; reopening drops the end that passed.
    let ended: PollDoc = h
        .admin(
            Method::PATCH,
            &path,
            Some(json!({"closes_at": format_ms(now_ms() - 60_000)})),
        )
        .await
        .json(200);
    assert_eq!(ended.status, PollStatus::Closed);
    let reopened: PollDoc = h
        .admin(Method::POST, &format!("{path}/reopen"), None)
        .await
        .json(200);
    assert_eq!(
        (reopened.status, reopened.poll.closes_at),
        (PollStatus::Open, None)
    );

    // Archive: the poll stays readable, leaves the default listing, and cannot change.
    let archived: PollDoc = h.admin(Method::DELETE, &path, None).await.json(200);
    assert_eq!(archived.status, PollStatus::Archived);
    let again: PollDoc = h.admin(Method::DELETE, &path, None).await.json(200);
    assert_eq!(
        again.poll.archived_at, archived.poll.archived_at,
        "archiving twice keeps the first time"
    );
    let got: PollDoc = h.admin(Method::GET, &path, None).await.json(200);
    assert_eq!(got.status, PollStatus::Archived);
    let listed: PollPage = h
        .admin(Method::GET, "/v1/polls?limit=100", None)
        .await
        .json(200);
    assert!(!ids(&listed).contains(&id));
    let listed: PollPage = h
        .admin(
            Method::GET,
            "/v1/polls?limit=100&include_archived=true",
            None,
        )
        .await
        .json(200);
    assert!(ids(&listed).contains(&id));
    let before = h.all_polls().await;
    for (method, path, body) in [
        (Method::PATCH, path.clone(), Some(json!({"title": "Again"}))),
        (Method::POST, format!("{path}/close"), None),
        (Method::POST, format!("{path}/reopen"), None),
    ] {
        h.admin(method, &path, body)
            .await
            .expect_problem(409, "poll-archived", None);
    }
    assert_eq!(h.all_polls().await, before);
    let results: Results = h.get(&format!("{path}/results"), None).await.json(200);
    assert_eq!(
        (results.status, results.total_votes),
        (PollStatus::Archived, 1),
        "an archived poll's results stay readable"
    );
}

#[tokio::test]
async fn a_poll_whose_votes_left_the_log_is_never_opened_again() {
    let h = Harness::new();
    h.ab_poll("finished", "live").await;
    let path = "/v1/polls/finished";
    // Closed by its schedule: moving the end later would open it again.
    h.admin(
        Method::PATCH,
        path,
        Some(json!({"closes_at": format_ms(now_ms() - 60_000)})),
    )
    .await
    .json::<PollDoc>(200);
    // What the processor does once the poll has been closed for its grace and counted.
    let mut poll = h.store.registry.get("finished").await.unwrap().unwrap();
    poll.log_purged_at = Some(now_ms());
    let marked = h.store.registry.update(&poll).await.unwrap();

    let refused = [
        (Method::POST, format!("{path}/reopen"), None),
        (
            Method::PATCH,
            path.to_owned(),
            Some(json!({"closes_at": format_ms(now_ms() + 3_600_000)})),
        ),
    ];
    for (method, route, body) in refused {
        let answer = h.admin(method.clone(), &route, body).await;
        let problem = answer.expect_problem(409, "poll-purged", None);
        assert!(
            problem.detail.contains("create a new poll"),
            "{}",
            problem.detail
        );
    }
    let kept: PollDoc = h.admin(Method::GET, path, None).await.json(200);
    assert_eq!(kept.status, PollStatus::Closed);
    assert!(
        kept.poll.closes_at.is_some_and(|at| at < now_ms()),
        "the refusals changed nothing"
    );
    assert_eq!(kept.poll.version, marked.version);
    // What does not open it still changes: a title, an archive.
    let renamed: PollDoc = h
        .admin(Method::PATCH, path, Some(json!({"title": "Done"})))
        .await
        .json(200);
    assert_eq!(
        (renamed.poll.title.as_str(), renamed.status),
        ("Done", PollStatus::Closed)
    );
    let archived: PollDoc = h.admin(Method::DELETE, path, None).await.json(200);
    assert_eq!(archived.status, PollStatus::Archived);
}

#[tokio::test]
async fn unknown_polls_are_404_on_every_poll_route() {
    let h = Harness::new();
    for (method, path, body) in [
        (Method::GET, "/v1/polls/nope", None),
        (Method::PATCH, "/v1/polls/nope", Some(json!({"title": "T"}))),
        (Method::DELETE, "/v1/polls/nope", None),
        (Method::POST, "/v1/polls/nope/close", None),
        (Method::POST, "/v1/polls/nope/reopen", None),
        (
            Method::POST,
            "/v1/polls/nope/tokens",
            Some(json!({"voter_id": "u1"})),
        ),
        (Method::GET, "/v1/polls/nope/results", None),
        (Method::GET, "/v1/polls/nope/breakdown?by=country", None),
        (Method::GET, "/v1/polls/nope/timeseries", None),
        (Method::GET, "/v1/polls/nope/live", None),
    ] {
        let answer = h.call(method.clone(), path, Some(ADMIN_KEY), body).await;
        assert_eq!(answer.status.as_u16(), 404, "{method} {path}");
        answer.expect_problem(404, "not-found", None);
    }
}

#[tokio::test]
async fn bad_poll_definitions_edits_and_listings_name_what_to_fix_and_change_nothing() {
    let h = Harness::new();
    h.ab_poll("kept", "live").await;
    h.put_votes(vec![ballot("kept", "u1", "a", "DE", T0)]).await;
    let before = h.all_polls().await;

    let valid = json!({"title": "t", "question": "q", "kind": "nps"});
    let with = |field: &str, value: Value| {
        let mut definition = valid.clone();
        definition[field] = value;
        definition
    };
    let creates: Vec<(&str, Value, &str)> = vec![
        (
            "no options",
            json!({"title": "t", "question": "q", "kind": "single", "options": []}),
            "options",
        ),
        ("unknown kind", with("kind", json!("poll")), "kind"),
        ("bad id", with("id", json!("Bad Id")), "id"),
        ("empty title", with("title", json!("")), "title"),
        ("unknown field", with("colour", json!("red")), "colour"),
        ("title of the wrong type", with("title", json!(5)), "title"),
        (
            "standard key as dimension",
            with("dimensions", json!(["country"])),
            "dimensions[0]",
        ),
        (
            "nps with a scale",
            with("scale", json!({"min": 1, "max": 5})),
            "scale",
        ),
        ("bad time", with("opens_at", json!("tomorrow")), "opens_at"),
        (
            "closes before it opens",
            json!({"title": "t", "question": "q", "kind": "nps",
                "opens_at": "2030-01-02T00:00:00Z", "closes_at": "2030-01-01T00:00:00Z"}),
            "closes_at",
        ),
        (
            "max_choices on a single poll",
            json!({"title": "t", "question": "q", "kind": "single", "max_choices": 1,
                "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]}),
            "max_choices",
        ),
    ];
    for (name, definition, field) in creates {
        let answer = h.admin(Method::POST, "/v1/polls", Some(definition)).await;
        assert_eq!(answer.status.as_u16(), 422, "{name}: {}", answer.text());
        answer.expect_problem(422, "invalid-field", Some(field));
    }
    h.admin(Method::POST, "/v1/polls", Some(with("id", json!("kept"))))
        .await
        .expect_problem(409, "already-exists", None);
    let raw = |body: &[u8]| {
        Request::post("/v1/polls")
            .header("authorization", format!("Bearer {ADMIN_KEY}"))
            .header("content-type", "application/json")
            .body(Body::from(body.to_vec()))
            .unwrap()
    };
    h.send(raw(b"{\"title\": "))
        .await
        .expect_problem(400, "malformed-json", None);
    h.send(raw(b"{\"title\": \"\xff\"}"))
        .await
        .expect_problem(400, "invalid-utf8", None);
    let huge = format!(
        r#"{{"title":"t","question":"{}","kind":"nps"}}"#,
        "q".repeat(70 * 1024)
    );
    h.send(raw(huge.as_bytes()))
        .await
        .expect_problem(413, "body-too-large", None);

    let patches: Vec<(&str, Value, &str)> = vec![
        ("kind cannot change", json!({"kind": "multi"}), "kind"),
        ("empty title", json!({"title": " "}), "title"),
        (
            "one option",
            json!({"options": [{"id": "a", "label": "A"}]}),
            "options",
        ),
        (
            "removing a voted option",
            json!({"options": [{"id": "b", "label": "B"}, {"id": "c", "label": "C"}]}),
            "options",
        ),
        (
            "unknown visibility",
            json!({"results_visibility": "sometimes"}),
            "results_visibility",
        ),
        ("bad time", json!({"closes_at": "soon"}), "closes_at"),
    ];
    for (name, patch, field) in patches {
        let answer = h.admin(Method::PATCH, "/v1/polls/kept", Some(patch)).await;
        assert_eq!(answer.status.as_u16(), 422, "{name}: {}", answer.text());
        answer.expect_problem(422, "invalid-field", Some(field));
    }

    for (query, status, slug, field) in [
        ("limit=0", 422, "invalid-field", Some("limit")),
        ("limit=101", 422, "invalid-field", Some("limit")),
        ("limit=many", 400, "invalid-query", None),
        ("colour=red", 400, "invalid-query", None),
    ] {
        h.admin(Method::GET, &format!("/v1/polls?{query}"), None)
            .await
            .expect_problem(status, slug, field);
    }
    assert_eq!(
        h.all_polls().await,
        before,
        "a refused request changed a poll"
    );
}

#[tokio::test]
async fn live_results_are_public_and_count_the_warehouse_votes() {
    let h = Harness::new();
    h.ab_poll("open-book", "live").await;
    h.ab_poll("other", "live").await;
    let as_of = h
        .put_votes(vec![
            ballot("open-book", "u1", "a", "DE", T0),
            ballot("open-book", "u2", "a", "FR", T0 + 1_000),
            ballot("open-book", "u3", "b", "DE", T0 + 2_000),
            ballot("other", "u1", "b", "DE", T0 + 3_000),
        ])
        .await;
    let answer = h.get("/v1/polls/open-book/results", None).await;
    assert_eq!(answer.header("cache-control"), Some("no-store"));
    let results: Results = answer.json(200);
    assert_eq!(
        (
            results.poll_id.as_str(),
            results.status,
            results.total_votes,
            results.unique_voters
        ),
        ("open-book", PollStatus::Open, 3, 3)
    );
    let counts: Vec<(&str, u64)> = results
        .options
        .iter()
        .map(|o| (o.id.as_str(), o.count))
        .collect();
    assert_eq!(counts, [("a", 2), ("b", 1)]);
    assert!(results.as_of <= as_of && results.as_of > 0);
    h.get("/v1/polls/open-book/live", None).await.events();
}

#[tokio::test]
async fn after_close_results_are_shown_to_everyone_once_the_poll_closes() {
    let h = Harness::new();
    h.ab_poll("suspense", "after_close").await;
    for path in ["/v1/polls/suspense/results", "/v1/polls/suspense/live"] {
        h.get(path, None)
            .await
            .expect_problem(403, "results-hidden", None);
        assert_eq!(h.get(path, Some(ANALYST_KEY)).await.status, 200, "{path}");
    }
    h.admin(Method::POST, "/v1/polls/suspense/close", None)
        .await
        .json::<PollDoc>(200);
    let results: Results = h.get("/v1/polls/suspense/results", None).await.json(200);
    assert_eq!(results.status, PollStatus::Closed);
    h.get("/v1/polls/suspense/live", None).await.events();
}

#[tokio::test]
async fn after_vote_results_are_shown_with_the_voters_results_token() {
    let h = Harness::new();
    h.ab_poll("voters-only", "after_vote").await;
    h.ab_poll("suspense", "after_close").await;
    let in_a_day = now_ms() / 1000 + 86_400;
    let good = token::mint_results(&common::secrets(), "voters-only", in_a_day);
    for base in [
        "/v1/polls/voters-only/results",
        "/v1/polls/voters-only/live",
    ] {
        h.get(base, None)
            .await
            .expect_problem(403, "results-hidden", None);
        let refused = [
            (
                "another poll's",
                token::mint_results(&common::secrets(), "suspense", in_a_day),
            ),
            (
                "forged",
                token::mint_results(
                    &tally_core::secrets::Secrets::new(b"another-secret-entirely").unwrap(),
                    "voters-only",
                    in_a_day,
                ),
            ),
            (
                "expired",
                token::mint_results(&common::secrets(), "voters-only", now_ms() / 1000 - 1),
            ),
            ("garbage", "4102444800.00ff".to_owned()),
        ];
        for (name, results_token) in refused {
            let answer = h
                .get(&format!("{base}?results_token={results_token}"), None)
                .await;
            assert_eq!(answer.status, 403, "{name} token on {base}");
            answer.expect_problem(403, "results-hidden", None);
        }
        let answer = h.get(&format!("{base}?results_token={good}"), None).await;
        assert_eq!(answer.status, 200, "{base}: {}", answer.text());
        assert_eq!(h.get(base, Some(ANALYST_KEY)).await.status, 200);
    }
    // A token shows only its own poll.
    h.get(
        &format!("/v1/polls/suspense/results?results_token={good}"),
        None,
    )
    .await
    .expect_problem(403, "results-hidden", None);

    // Without the secret the query service cannot check a token, so it shows nothing.
    let blind = Harness::with_config(|config| config.secrets = None);
    blind.ab_poll("voters-only", "after_vote").await;
    blind
        .get(
            &format!("/v1/polls/voters-only/results?results_token={good}"),
            None,
        )
        .await
        .expect_problem(403, "results-hidden", None);
}

#[tokio::test]
async fn private_results_need_an_analyst_or_admin_key() {
    let h = Harness::new();
    h.ab_poll("internal", "private").await;
    for path in ["/v1/polls/internal/results", "/v1/polls/internal/live"] {
        h.get(path, None)
            .await
            .expect_problem(401, "unauthorized", None);
        h.get(path, Some("not-a-key"))
            .await
            .expect_problem(401, "unauthorized", None);
        for key in [ANALYST_KEY, ADMIN_KEY] {
            assert_eq!(h.get(path, Some(key)).await.status, 200, "{path}");
        }
    }
    // Made public, the results are.
    h.admin(
        Method::PATCH,
        "/v1/polls/internal",
        Some(json!({"results_visibility": "live"})),
    )
    .await
    .json::<PollDoc>(200);
    h.get("/v1/polls/internal/results", None)
        .await
        .json::<Results>(200);
}

/// A breakdown group as a test compares it: its country, votes, and count per option.
type GroupCounts = (String, u64, Vec<(String, u64)>);

#[tokio::test]
async fn breakdowns_count_each_segment_and_refuse_bad_parameters() {
    let h = Harness::new();
    h.create(
        json!({"id": "colours", "title": "T", "question": "Q", "kind": "single",
        "dimensions": ["plan"],
        "options": [{"id": "red", "label": "Red"}, {"id": "blue", "label": "Blue"}]}),
    )
    .await;
    let mut votes = Vec::new();
    for (i, (country, choice)) in [
        ("DE", "red"),
        ("DE", "red"),
        ("DE", "red"),
        ("DE", "blue"),
        ("FR", "blue"),
        ("FR", "blue"),
    ]
    .into_iter()
    .enumerate()
    {
        votes.push(ballot(
            "colours",
            &format!("u{i}"),
            choice,
            country,
            T0 + i as i64 * 1000,
        ));
    }
    let as_of = h.put_votes(votes).await;

    let doc: BreakdownDoc = h
        .get("/v1/polls/colours/breakdown?by=country", Some(ANALYST_KEY))
        .await
        .json(200);
    assert_eq!(
        (doc.by.clone(), doc.total_votes, doc.as_of),
        (vec!["country".to_owned()], 6, as_of)
    );
    let groups: Vec<GroupCounts> = doc
        .groups
        .iter()
        .map(|group| {
            (
                group.segment["country"].clone(),
                group.total_votes,
                group
                    .options
                    .iter()
                    .map(|o| (o.id.clone(), o.count))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [
            (
                "DE".to_owned(),
                4,
                vec![("red".to_owned(), 3), ("blue".to_owned(), 1)]
            ),
            (
                "FR".to_owned(),
                2,
                vec![("red".to_owned(), 0), ("blue".to_owned(), 2)]
            ),
        ]
    );
    let filtered: BreakdownDoc = h
        .get(
            "/v1/polls/colours/breakdown?by=plan&where=country:FR",
            Some(ANALYST_KEY),
        )
        .await
        .json(200);
    assert_eq!(filtered.total_votes, 2, "{filtered:?}");

    let cases = [
        ("", "by"),
        ("?by=", "by"),
        ("?by=colour", "by"),
        ("?by=country,device,channel,source", "by"),
        ("?by=country&where=country", "where"),
        ("?by=country&where=colour:red", "where"),
        ("?by=country&from=yesterday", "from"),
        ("?by=country&to=tomorrow", "to"),
    ];
    for (query, field) in cases {
        let answer = h
            .get(
                &format!("/v1/polls/colours/breakdown{query}"),
                Some(ANALYST_KEY),
            )
            .await;
        assert_eq!(answer.status.as_u16(), 422, "{query}: {}", answer.text());
        answer.expect_problem(422, "invalid-field", Some(field));
    }
    h.get(
        "/v1/polls/colours/breakdown?by=country&colour=red",
        Some(ANALYST_KEY),
    )
    .await
    .expect_problem(400, "invalid-query", None);
}

#[tokio::test]
async fn time_series_step_through_the_votes_and_refuse_bad_parameters() {
    let h = Harness::new();
    h.ab_poll("trend", "live").await;
    h.put_votes(vec![
        ballot("trend", "u1", "a", "DE", T0),
        ballot("trend", "u2", "a", "DE", T0 + 30_000),
        ballot("trend", "u3", "b", "DE", T0 + 61_000),
    ])
    .await;
    let range = format!("from={}&to={}", format_ms(T0), format_ms(T0 + 120_000));
    let doc: TimeseriesDoc = h
        .get(
            &format!("/v1/polls/trend/timeseries?step=1m&{range}"),
            Some(ANALYST_KEY),
        )
        .await
        .json(200);
    assert_eq!((doc.poll_id.as_str(), doc.step_seconds), ("trend", 60));
    let points: Vec<(String, Vec<(String, u64)>)> = doc
        .points
        .iter()
        .map(|p| (p.t.clone(), p.options.clone().into_iter().collect()))
        .collect();
    assert_eq!(
        points,
        [
            (
                format_ms(T0),
                vec![("a".to_owned(), 2), ("b".to_owned(), 0)]
            ),
            (
                format_ms(T0 + 60_000),
                vec![("a".to_owned(), 0), ("b".to_owned(), 1)]
            ),
        ],
        "every option in every step, zeros included"
    );

    let cases = [
        ("step=7x", "step"),
        ("step=0m", "step"),
        ("step=m", "step"),
        // The warehouse holds windows of WINDOW_SECONDS (10 s): a step must be a whole
        // number of them.
        ("step=7s", "step"),
        // From the epoch to now in 10 s steps is far more than 10 000 steps.
        ("step=10s&from=0", "step"),
        ("from=yesterday", "from"),
        ("to=tomorrow", "to"),
    ];
    for (query, field) in cases {
        h.get(
            &format!("/v1/polls/trend/timeseries?{query}"),
            Some(ANALYST_KEY),
        )
        .await
        .expect_problem(422, "invalid-field", Some(field));
    }
    h.get(
        "/v1/polls/trend/timeseries?step=1m&colour=red",
        Some(ANALYST_KEY),
    )
    .await
    .expect_problem(400, "invalid-query", None);
}

#[tokio::test]
async fn live_streams_a_snapshot_then_newer_totals_and_resumes_after_last_event_id() {
    let h = Harness::new();
    h.ab_poll("pulse", "live").await;
    let as_of = h
        .put_votes(vec![
            ballot("pulse", "u1", "a", "DE", T0),
            ballot("pulse", "u2", "b", "DE", T0),
        ])
        .await;

    for bad in ["abc", "-1", "1.5", ""] {
        let request = Request::get("/v1/polls/pulse/live")
            .header("last-event-id", bad)
            .body(Body::empty())
            .unwrap();
        h.send(request)
            .await
            .expect_problem(400, "invalid-last-event-id", None);
    }

    let answer = h.get("/v1/polls/pulse/live", None).await;
    assert_eq!(answer.header("cache-control"), Some("no-cache"));
    let mut stream = answer.events();
    let snapshot = stream.next_within(Duration::from_secs(5)).await;
    assert_eq!(snapshot.event, "snapshot");
    assert_eq!(snapshot.id, Some(as_of.to_string()));
    let results: Results = serde_json::from_str(&snapshot.data).unwrap();
    assert_eq!(results.total_votes, 2);

    // Newer totals from a processor reach the stream as `totals`.
    let poll = h.store.registry.get("pulse").await.unwrap().unwrap();
    let newer = |as_of: u64, ballots: u64| {
        let tally = Tally {
            ballots,
            unique_voters: ballots,
            counts: [("a".to_owned(), ballots - 1), ("b".to_owned(), 1)].into(),
            as_of,
        };
        Results::new(&poll, &tally, now_ms())
    };
    let totals = publish_until_seen(&h, &mut stream, newer(as_of + 1, 3)).await;
    assert_eq!(
        (totals.event.as_str(), totals.id.clone()),
        ("totals", Some((as_of + 1).to_string()))
    );

    // Resuming at the newest id sends no snapshot, only what comes after it.
    let request = Request::get("/v1/polls/pulse/live")
        .header("last-event-id", (as_of + 1).to_string())
        .body(Body::empty())
        .unwrap();
    let mut resumed = h.send(request).await.events();
    let next = publish_until_seen(&h, &mut resumed, newer(as_of + 2, 4)).await;
    assert_eq!(
        (next.event.as_str(), next.id.clone()),
        ("totals", Some((as_of + 2).to_string()))
    );
    // Resuming behind the newest totals sends them at once, as `totals`.
    let request = Request::get("/v1/polls/pulse/live")
        .header("last-event-id", as_of.to_string())
        .body(Body::empty())
        .unwrap();
    let behind = h
        .send(request)
        .await
        .events()
        .next_within(Duration::from_secs(5))
        .await;
    assert_eq!(
        (behind.event.as_str(), behind.id),
        ("totals", Some((as_of + 2).to_string()))
    );

    // Closing the poll tells the stream.
    h.admin(Method::POST, "/v1/polls/pulse/close", None)
        .await
        .json::<PollDoc>(200);
    let closed = resumed.next_within(Duration::from_secs(5)).await;
    assert_eq!(closed.event, "closed");
    let data: Value = serde_json::from_str(&closed.data).unwrap();
    assert_eq!(data, json!({"poll_id": "pulse", "status": "closed"}));
}

/// Publishes `results` on the live feed until `stream` shows an event: the query service
/// subscribes to the feed in a background task, and a message published before that
/// subscription is not delivered to it (the feed promises only the next full totals).
async fn publish_until_seen(
    h: &Harness,
    stream: &mut common::SseReader,
    results: Results,
) -> common::SseEvent {
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
async fn voter_tokens_are_minted_for_a_poll_and_voter() {
    let h = Harness::new();
    h.ab_poll("vip", "live").await;
    let issued: TokenIssued = h
        .admin(
            Method::POST,
            "/v1/polls/vip/tokens",
            Some(json!({"voter_id": "u1", "ttl_seconds": 600})),
        )
        .await
        .json(201);
    assert_eq!(
        (issued.poll_id.as_str(), issued.voter_id.as_str()),
        ("vip", "u1")
    );
    let now = now_ms() / 1000;
    let (secrets, scheme) = (
        common::secrets(),
        tally_core::secrets::PseudonymScheme::PerPoll,
    );
    token::verify(
        &secrets,
        scheme,
        Some(&issued.token),
        "vip",
        Some("u1"),
        now,
    )
    .unwrap();
    assert!(token::verify(
        &secrets,
        scheme,
        Some(&issued.token),
        "vip",
        Some("u2"),
        now
    )
    .is_err());
    let expiry: i64 = issued.token.split('.').nth(1).unwrap().parse().unwrap();
    assert!(issued.token.starts_with("v2."), "{}", issued.token);
    assert!(
        (now + 595..=now + 605).contains(&expiry),
        "{expiry} vs {now}"
    );
    assert_eq!(issued.expires_at, format_ms(expiry * 1000));

    let default_ttl: TokenIssued = h
        .admin(
            Method::POST,
            "/v1/polls/vip/tokens",
            Some(json!({"voter_id": "u1"})),
        )
        .await
        .json(201);
    let expiry: i64 = default_ttl
        .token
        .split('.')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (now + 86_395..=now + 86_405).contains(&expiry),
        "a day by default"
    );

    for (body, field) in [
        (json!({"voter_id": "u1", "ttl_seconds": 0}), "ttl_seconds"),
        (
            json!({"voter_id": "u1", "ttl_seconds": 90 * 86_400 + 1}),
            "ttl_seconds",
        ),
        (json!({"voter_id": ""}), "voter_id"),
        (json!({"voter_id": "v".repeat(257)}), "voter_id"),
        (json!({"voter_id": 7}), "voter_id"),
        (json!({"voter_id": "u1", "poll": "vip"}), "poll"),
    ] {
        h.admin(Method::POST, "/v1/polls/vip/tokens", Some(body))
            .await
            .expect_problem(422, "invalid-field", Some(field));
    }

    let unable = Harness::with_config(|config| config.secrets = None);
    unable.ab_poll("vip", "live").await;
    unable
        .admin(
            Method::POST,
            "/v1/polls/vip/tokens",
            Some(json!({"voter_id": "u1"})),
        )
        .await
        .expect_problem(501, "token-minting-disabled", None);
}

#[tokio::test]
async fn unknown_routes_and_methods_get_problem_json() {
    let h = Harness::new();
    h.get("/v2/anything", Some(ADMIN_KEY))
        .await
        .expect_problem(404, "no-route", None);
    h.get("/v1/polls/a/b/c", Some(ADMIN_KEY))
        .await
        .expect_problem(404, "no-route", None);
    for (method, path) in [
        (Method::PUT, "/v1/polls"),
        (Method::POST, "/v1/polls/x"),
        (Method::GET, "/v1/polls/x/close"),
        (Method::POST, "/v1/polls/x/results"),
        (Method::DELETE, "/v1/polls/x/live"),
    ] {
        h.call(method, path, Some(ADMIN_KEY), None)
            .await
            .expect_problem(405, "method-not-allowed", None);
    }
    let ready: Readiness = h.get("/readyz", None).await.json(200);
    assert!(ready.ready);
    assert_eq!(
        ready.checks.keys().collect::<Vec<_>>(),
        ["poll_registry", "warehouse"]
    );
}

/// The routes pages on other sites read (results, ballot, live, the multi-poll stream) are
/// behind the per-address guard like every other route, once per request: one address's
/// requests to all of them, preflights included, draw on one quota, one request each, and
/// another address keeps its own.
#[tokio::test]
async fn the_widget_routes_share_the_per_address_quota_one_request_each() {
    use axum::extract::ConnectInfo;
    use axum::http::header;
    let h = common::Harness::with_config(|config| {
        config.rate_per_ip = tally_service::limits::Rate::parse("5/min").unwrap();
    });
    h.create(
        json!({"id": "shop", "title": "T", "question": "Q", "kind": "single",
        "results_visibility": "live", "allowed_origins": ["https://shop.example"],
        "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]}),
    )
    .await;
    let from = |address: &str, method: Method, path: &str, origin: bool| {
        let mut request = Request::builder().method(method).uri(path);
        if origin {
            request = request
                .header(header::ORIGIN, "https://shop.example")
                .header(header::ACCESS_CONTROL_REQUEST_METHOD, "GET");
        }
        let mut request = request.body(Body::empty()).unwrap();
        let peer: std::net::SocketAddr = format!("{address}:40000").parse().unwrap();
        request.extensions_mut().insert(ConnectInfo(peer));
        request
    };
    let quota = [
        (Method::GET, "/v1/polls/shop/results", false),
        (Method::OPTIONS, "/v1/polls/shop/results", true),
        (Method::GET, "/v1/polls/shop/ballot", true),
        (Method::GET, "/v1/polls/shop/live", false),
        (Method::GET, "/v1/live?polls=shop", true),
    ];
    for (spent, (method, path, origin)) in quota.into_iter().enumerate() {
        let answer = h
            .send(from("192.0.2.1", method.clone(), path, origin))
            .await;
        assert!(
            answer.status.is_success(),
            "{method} {path}: {}",
            answer.status
        );
        assert_eq!(
            answer.header("ratelimit-limit"),
            Some("5"),
            "{method} {path}"
        );
        let remaining = (4 - spent).to_string();
        assert_eq!(
            answer.header("ratelimit-remaining"),
            Some(remaining.as_str()),
            "{method} {path} draws one request from the quota"
        );
        if origin {
            assert_eq!(
                answer.header("access-control-allow-origin"),
                Some("https://shop.example")
            );
        }
    }
    for (method, path) in [
        (Method::GET, "/v1/polls/shop/results"),
        (Method::GET, "/v1/live?polls=shop"),
        (Method::GET, "/v1/polls"),
    ] {
        h.send(from("192.0.2.1", method, path, false))
            .await
            .expect_problem(429, "rate-limited", None);
    }
    let other = h
        .send(from(
            "192.0.2.2",
            Method::GET,
            "/v1/polls/shop/ballot",
            true,
        ))
        .await;
    assert_eq!(other.status, 200, "another address has its own quota");
    assert_eq!(other.header("ratelimit-remaining"), Some("4"));
}
