//! The ingest HTTP API in-process (`router().oneshot()`) on the embedded back ends: every bad
//! vote and batch gets its problem+json and stores nothing (the log's tip does not move),
//! good votes get the typed 202, and the rate limits, voter tokens and browser cookie rules
//! hold at the HTTP layer. The end-to-end suites (`tests/e2e/bad_input.rs`, `tokens.rs`,
//! `limits.rs`) prove the same through real processes; these run in about a second.

mod common;

use axum::body::Body;
use axum::http::{Method, Request};
use futures::stream;
use serde_json::json;
use tally_core::api::{Accepted, BatchResult, LineResult, Readiness, VoteStatus};
use tally_core::poll::Poll;
use tally_core::ports::PollRegistry;
use tally_core::problem::TYPE_BASE;
use tally_core::secrets::PseudonymScheme;
use tally_core::time::now_ms;
use tally_core::token;
use tally_ingest::limits::{LimitConfig, Rate};

use common::{batch, from_peer, vote, vote_json, voter_key, with_header, Harness};

fn closed(poll: &mut Poll) {
    poll.closed_at = Some(now_ms() - 1_000);
}

/// Limits that are all off, with `change` applied.
fn limits(change: impl FnOnce(&mut LimitConfig)) -> LimitConfig {
    let mut limits = LimitConfig {
        per_ip: None,
        per_voter: None,
        per_poll: None,
        new_voters_per_ip: None,
        ..LimitConfig::default()
    };
    change(&mut limits);
    limits
}

fn rate(text: &str) -> Option<Rate> {
    Rate::parse(text).unwrap()
}

#[tokio::test]
async fn a_vote_is_accepted_once_and_a_retry_with_its_vote_id_gets_the_same_answer() {
    let h = Harness::new();
    h.colour_poll("launch", |_| {}).await;
    let body = json!({"voter_id": "u1", "choice": "red", "vote_id": "v-1",
        "segment": {"country": "de", "channel": "email"}});

    let first = h.send(vote_json("launch", body.clone())).await;
    let accepted: Accepted = first.json(202);
    assert_eq!(
        accepted,
        Accepted {
            vote_id: "v-1".into(),
            status: VoteStatus::Accepted,
            results_token: None,
        }
    );
    assert_eq!(h.tip(), 1);

    let retry: Accepted = h.send(vote_json("launch", body)).await.json(202);
    assert_eq!(retry, accepted, "a retry is answered like the first try");
    assert_eq!(h.tip(), 1, "a retry stores nothing");

    let votes = h.logged_votes().await;
    assert_eq!(votes.len(), 1);
    let stored = &votes[0];
    assert_eq!(
        (
            stored.vote_id.as_str(),
            stored.poll_id.as_str(),
            stored.choice.clone(),
            stored.segment.country.as_str(),
            stored.segment.channel.as_str(),
        ),
        ("v-1", "launch", vec!["red".to_owned()], "DE", "email")
    );
    assert_eq!(
        stored.voter_key,
        voter_key("launch", "u1"),
        "the voter is stored as its keyed hash"
    );
}

#[tokio::test]
async fn a_vote_without_vote_id_gets_a_fresh_server_id() {
    let h = Harness::new();
    h.poll(
        json!({"id": "open-mic", "title": "T", "question": "Q", "kind": "nps", "dedupe": "none"}),
        |_| {},
    )
    .await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let accepted: Accepted = h
            .send(vote_json("open-mic", json!({"choice": 9})))
            .await
            .json(202);
        assert!(!accepted.vote_id.is_empty());
        ids.push(accepted.vote_id);
    }
    assert_ne!(ids[0], ids[1]);
    assert_eq!(
        h.tip(),
        2,
        "two anonymous votes on a dedupe:none poll both count"
    );
}

#[tokio::test]
async fn an_after_vote_poll_answers_with_a_results_token_for_that_poll() {
    let h = Harness::new();
    h.colour_poll("voters-only", |poll| {
        poll.results_visibility = tally_core::poll::ResultsVisibility::AfterVote;
    })
    .await;
    let accepted: Accepted = h
        .send(vote_json(
            "voters-only",
            json!({"voter_id": "u1", "choice": "blue"}),
        ))
        .await
        .json(202);
    let results_token = accepted.results_token.expect("a results token");
    let now = now_ms() / 1000;
    let (secrets, scheme) = (common::secrets(), PseudonymScheme::PerPoll);
    assert!(token::verify_results(
        &secrets,
        scheme,
        &results_token,
        "voters-only",
        now
    ));
    assert!(!token::verify_results(
        &secrets,
        scheme,
        &results_token,
        "another-poll",
        now
    ));
}

/// A bad vote and the problem it must get.
struct Case {
    name: &'static str,
    poll: &'static str,
    body: Vec<u8>,
    status: u16,
    slug: &'static str,
    field: Option<&'static str>,
}

/// A vote `body` for poll `poll`; say what it gets with [`Case::is`] or [`Case::names`].
fn on(poll: &'static str, name: &'static str, body: impl AsRef<[u8]>) -> Case {
    Case {
        name,
        poll,
        body: body.as_ref().to_vec(),
        status: 0,
        slug: "",
        field: None,
    }
}

/// A vote `body` for the open poll `bad`.
fn bad(name: &'static str, body: impl AsRef<[u8]>) -> Case {
    on("bad", name, body)
}

impl Case {
    /// The vote gets problem `status` / `slug` with no field.
    fn is(self, status: u16, slug: &'static str) -> Case {
        Case {
            status,
            slug,
            ..self
        }
    }

    /// The vote gets 422 `invalid-field` naming `field`.
    fn names(self, field: &'static str) -> Case {
        Case {
            status: 422,
            slug: "invalid-field",
            field: Some(field),
            ..self
        }
    }
}

#[tokio::test]
async fn every_bad_vote_gets_its_problem_and_stores_nothing() {
    let h = Harness::new();
    h.colour_poll("bad", |_| {}).await;
    h.colour_poll("shut", closed).await;
    h.colour_poll("ended", |poll| poll.closes_at = Some(now_ms() - 1_000))
        .await;
    h.colour_poll("later", |poll| {
        poll.opens_at = Some(now_ms() + 3_600_000);
    })
    .await;
    h.colour_poll("gone", |poll| poll.archived_at = Some(now_ms() - 1_000))
        .await;
    h.poll(
        json!({"id": "score", "title": "T", "question": "Q", "kind": "nps"}),
        |_| {},
    )
    .await;
    let long = "x".repeat(200);
    let ballot = br#"{"voter_id":"u1","choice":"red"}"#;
    let cases = [
        bad("malformed json", b"{\"voter_id\": ").is(400, "malformed-json"),
        bad("empty body", b"").is(400, "malformed-json"),
        bad("not an object", br#""red""#).names("body"),
        bad(
            "choice of the wrong type",
            br#"{"voter_id":"u1","choice":5}"#,
        )
        .names("choice"),
        bad(
            "voter_id of the wrong type",
            br#"{"voter_id":12,"choice":"red"}"#,
        )
        .names("voter_id"),
        bad(
            "segment of the wrong type",
            br#"{"voter_id":"u1","choice":"red","segment":"de"}"#,
        )
        .names("segment"),
        bad(
            "unknown field",
            br#"{"voter_id":"u1","choice":"red","colour":"x"}"#,
        )
        .names("colour"),
        bad("missing choice", br#"{"voter_id":"u1"}"#).names("body"),
        bad(
            "invalid utf-8",
            b"{\"voter_id\":\"\xff\xfe\",\"choice\":\"red\"}",
        )
        .is(400, "invalid-utf8"),
        on(
            "nope",
            "unknown poll",
            br#"{"voter_id":"u1","choice":"red"}"#,
        )
        .is(404, "not-found"),
        bad("unknown option", br#"{"voter_id":"u1","choice":"purple"}"#).names("choice"),
        on(
            "score",
            "score out of range",
            br#"{"voter_id":"u1","choice":11}"#,
        )
        .names("choice"),
        bad(
            "unknown segment key",
            br#"{"voter_id":"u1","choice":"red","segment":{"colour":"x"}}"#,
        )
        .names("segment.colour"),
        bad(
            "segment value of the wrong type",
            br#"{"voter_id":"u1","choice":"red","segment":{"device":3}}"#,
        )
        .names("segment.device"),
        bad(
            "bad country",
            br#"{"voter_id":"u1","choice":"red","segment":{"country":"Germany"}}"#,
        )
        .names("segment.country"),
        bad(
            "segment value too long",
            format!(r#"{{"voter_id":"u1","choice":"red","segment":{{"source":"{long}"}}}}"#),
        )
        .names("segment.source"),
        bad(
            "vote_id with spaces",
            br#"{"voter_id":"u1","choice":"red","vote_id":"has spaces"}"#,
        )
        .names("vote_id"),
        bad(
            "vote_id too long",
            format!(
                r#"{{"voter_id":"u1","choice":"red","vote_id":"{}"}}"#,
                "v".repeat(65)
            ),
        )
        .names("vote_id"),
        bad("empty voter_id", br#"{"voter_id":"","choice":"red"}"#).names("voter_id"),
        bad(
            "poll_id differs from the path",
            br#"{"poll_id":"shut","voter_id":"u1","choice":"red"}"#,
        )
        .names("poll_id"),
        on("shut", "closed poll", ballot).is(409, "poll-closed"),
        on("ended", "poll past its closes_at", ballot).is(409, "poll-closed"),
        on("later", "scheduled poll", ballot).is(409, "poll-not-open"),
        on("gone", "archived poll", ballot).is(410, "poll-archived"),
    ];
    for case in cases {
        let answer = h.send(vote(case.poll, case.body)).await;
        assert_eq!(answer.status.as_u16(), case.status, "{}", case.name);
        let problem = answer.problem();
        assert_eq!(
            (problem.slug(), problem.field.as_deref()),
            (case.slug, case.field),
            "{}: {problem:?}",
            case.name
        );
        assert_eq!(h.tip(), 0, "{} stored a vote", case.name);
    }

    let problem = h
        .send(vote_json(
            "bad",
            json!({"voter_id": "u1", "choice": "purple"}),
        ))
        .await
        .problem();
    assert!(
        problem.detail.contains("red, blue"),
        "an unknown option is explained with the known ones: {}",
        problem.detail
    );

    // The voter of the barrage still has their one vote.
    h.send(vote_json("bad", json!({"voter_id": "u1", "choice": "red"})))
        .await
        .json::<Accepted>(202);
    assert_eq!(h.tip(), 1);
}

/// Known bug, left for the hardening work: `tally_core::problem::parse_json` retries a body
/// that failed to parse with `serde_path_to_error` to name the field at fault, but never
/// checks the end of input there, so a valid vote followed by anything is accepted (202).
#[tokio::test]
async fn a_vote_with_trailing_garbage_is_malformed_json() {
    let h = Harness::new();
    h.colour_poll("bad", |_| {}).await;
    h.send(vote("bad", r#"{"voter_id":"u1","choice":"red"} x"#))
        .await
        .expect_problem(400, "malformed-json", None);
    assert_eq!(h.tip(), 0);
}

#[tokio::test]
async fn require_token_polls_refuse_missing_forged_expired_and_foreign_tokens() {
    let h = Harness::new();
    for id in ["vip", "other"] {
        h.colour_poll(id, |poll| poll.require_token = true).await;
    }
    let in_ten_minutes = now_ms() / 1000 + 600;
    let good = token::mint(&common::secrets().token_key(), "vip", "u1", in_ten_minutes);

    h.send(vote_json("vip", json!({"voter_id": "u1", "choice": "red"})))
        .await
        .expect_problem(401, "token-required", None);
    let refused = [
        (
            "forged",
            token::mint(b"not-the-server-token-key", "vip", "u1", in_ten_minutes),
            "u1",
        ),
        (
            "expired",
            token::mint(
                &common::secrets().token_key(),
                "vip",
                "u1",
                now_ms() / 1000 - 1,
            ),
            "u1",
        ),
        (
            "another poll's",
            token::mint(
                &common::secrets().token_key(),
                "other",
                "u1",
                in_ten_minutes,
            ),
            "u1",
        ),
        ("another voter's", good.clone(), "u2"),
        ("garbage", "12.zz".to_owned(), "u1"),
        ("without a dot", "nodot".to_owned(), "u1"),
    ];
    for (name, voter_token, voter) in refused {
        let problem = h
            .send(vote_json(
                "vip",
                json!({"voter_id": voter, "choice": "red", "token": voter_token}),
            ))
            .await
            .expect_problem(403, "invalid-token", Some("token"));
        assert!(!problem.detail.is_empty(), "{name}");
    }
    h.send(vote_json("vip", json!({"choice": "red", "token": good})))
        .await
        .expect_problem(403, "invalid-token", Some("token"));
    assert_eq!(h.tip(), 0, "no refused token stored a vote");

    h.send(vote_json(
        "vip",
        json!({"voter_id": "u1", "choice": "red", "token": good}),
    ))
    .await
    .json::<Accepted>(202);
    assert_eq!(h.tip(), 1);
}

#[tokio::test]
async fn a_vote_body_over_the_limit_is_413_declared_or_streamed() {
    let h = Harness::new();
    h.colour_poll("bad", |_| {}).await;
    let padding = " ".repeat(17 * 1024);
    let oversized = format!(r#"{{"voter_id":"u1","choice":"red"}}{padding}"#);
    h.send(vote("bad", oversized))
        .await
        .expect_problem(413, "body-too-large", None);

    // No length known in advance, as with a chunked upload: counted as it streams.
    let chunks = (0..64).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1024]));
    h.send(vote("bad", Body::from_stream(stream::iter(chunks))))
        .await
        .expect_problem(413, "body-too-large", None);

    // Just under the limit is read (and is then an ordinary vote).
    let fits = format!(
        r#"{{"voter_id":"u1","choice":"red"}}{}"#,
        " ".repeat(15 * 1024)
    );
    h.send(vote("bad", fits)).await.json::<Accepted>(202);
    assert_eq!(h.tip(), 1);
}

#[tokio::test]
async fn bad_batches_get_their_problem_and_store_nothing() {
    let h = Harness::with_config(|config| {
        config.max_batch_lines = 3;
        config.max_batch_bytes = 1024;
    });
    h.colour_poll("bad", |_| {}).await;
    let line = |voter: &str| format!(r#"{{"poll_id":"bad","voter_id":"{voter}","choice":"red"}}"#);
    let four_lines = ["a", "b", "c", "d"].map(line).join("\n");
    let cases: [(&str, Body, u16, &str); 6] = [
        ("empty", Body::empty(), 400, "empty-batch"),
        (
            "only blank lines",
            Body::from("\n  \n\n"),
            400,
            "empty-batch",
        ),
        (
            "invalid utf-8",
            Body::from(&b"\xff\n"[..]),
            400,
            "invalid-utf8",
        ),
        (
            "over the line limit",
            Body::from(four_lines),
            413,
            "batch-too-large",
        ),
        (
            "over the byte limit",
            Body::from(format!("{}\n{}", line("a"), " ".repeat(1100))),
            413,
            "body-too-large",
        ),
        (
            "over the byte limit, streamed",
            Body::from_stream(stream::iter(
                (0..4).map(|_| Ok::<_, std::io::Error>(vec![b'\n'; 512])),
            )),
            413,
            "body-too-large",
        ),
    ];
    for (name, body, status, slug) in cases {
        let answer = h.send(batch(body)).await;
        assert_eq!(answer.status.as_u16(), status, "{name}");
        assert_eq!(answer.problem().slug(), slug, "{name}");
    }
    assert_eq!(h.tip(), 0);

    // Blank lines do not count towards the limit.
    let three_lines = format!("{}\n\n{}\n\n{}\n", line("a"), line("b"), line("c"));
    let result: BatchResult = h.send(batch(three_lines)).await.json(200);
    assert_eq!((result.accepted, result.rejected), (3, 0));
    assert_eq!(h.tip(), 3);
}

/// A batch line's outcome: its number, status, vote id, problem slug and field.
type LineOutcome<'a> = (
    usize,
    u16,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
);

fn outcome(line: &LineResult) -> LineOutcome<'_> {
    (
        line.line,
        line.status,
        line.vote_id.as_deref(),
        line_slug(line),
        line.problem.as_ref().and_then(|p| p.field.as_deref()),
    )
}

/// The slug of a batch line's problem `type`.
fn line_slug(line: &LineResult) -> Option<&str> {
    line.problem
        .as_ref()
        .map(|p| p.kind.strip_prefix(TYPE_BASE).unwrap_or(&p.kind))
}

#[tokio::test]
async fn a_mixed_batch_answers_each_line_in_order_and_stores_only_the_good_ones() {
    let h = Harness::new();
    h.colour_poll("launch", |_| {}).await;
    h.colour_poll("shut", closed).await;
    let body = [
        r#"{"poll_id":"launch","voter_id":"b1","choice":"red","vote_id":"b-1"}"#,
        r#"{"poll_id":"#,
        r#"{"poll_id":"launch","voter_id":"b3","choice":"purple"}"#,
        "",
        r#"{"voter_id":"b5","choice":"red"}"#,
        r#"{"poll_id":"nope","voter_id":"b6","choice":"red"}"#,
        r#"{"poll_id":"shut","voter_id":"b7","choice":"red"}"#,
        r#"{"poll_id":"launch","voter_id":"b8","choice":"blue","vote_id":"b-8"}"#,
        r#"{"poll_id":"launch","voter_id":"b1","choice":"blue"}"#,
        r#"{"poll_id":"launch","voter_id":7,"choice":"red"}"#,
    ]
    .join("\n");
    let answer = h.send(batch(body)).await;
    assert_eq!(answer.header("cache-control"), Some("no-store"));
    let result: BatchResult = answer.json(200);

    let outcomes: Vec<LineOutcome> = result.results.iter().map(outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            (1, 202, Some("b-1"), None, None),
            (2, 400, None, Some("malformed-json"), None),
            (3, 422, None, Some("invalid-field"), Some("choice")),
            (5, 422, None, Some("invalid-field"), Some("poll_id")),
            (6, 404, None, Some("not-found"), None),
            (7, 409, None, Some("poll-closed"), None),
            (8, 202, Some("b-8"), None, None),
            (9, 409, None, Some("already-voted"), None),
            (10, 422, None, Some("invalid-field"), Some("voter_id")),
        ]
    );
    assert_eq!((result.accepted, result.rejected), (2, 7));
    let stored: Vec<String> = h
        .logged_votes()
        .await
        .into_iter()
        .map(|vote| vote.vote_id)
        .collect();
    assert_eq!(stored, ["b-1", "b-8"]);
}

#[tokio::test]
async fn the_per_address_limit_answers_429_with_retry_after_before_reading_the_body() {
    let h = Harness::with_config(|config| {
        config.limits = limits(|l| l.per_ip = rate("2/min"));
    });
    h.poll(
        json!({"id": "open-mic", "title": "T", "question": "Q", "kind": "nps", "dedupe": "none"}),
        |_| {},
    )
    .await;
    let ballot = || vote_json("open-mic", json!({"choice": 9}));

    for remaining in ["1", "0"] {
        let answer = h.send(from_peer(ballot(), "192.0.2.1:4000")).await;
        assert_eq!(answer.header("ratelimit-limit"), Some("2"));
        assert_eq!(answer.header("ratelimit-remaining"), Some(remaining));
        answer.json::<Accepted>(202);
    }
    assert_eq!(h.tip(), 2);

    // The third request from the address, on another port, with a body that is not even
    // JSON: refused by the limit before the body is looked at.
    let answer = h
        .send(from_peer(vote("open-mic", "{"), "192.0.2.1:4001"))
        .await;
    let problem = answer.expect_problem(429, "rate-limited", None);
    let retry_after: u32 = answer.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(problem.retry_after, Some(retry_after));
    assert_eq!(answer.header("ratelimit-limit"), Some("2"));
    assert_eq!(answer.header("ratelimit-remaining"), Some("0"));
    assert_eq!(
        answer.header("ratelimit-reset"),
        Some(retry_after.to_string().as_str())
    );

    // A batch from the address is refused too, and an X-Forwarded-For from a peer that is
    // not a trusted proxy does not move the client elsewhere.
    h.send(from_peer(
        batch(r#"{"poll_id":"open-mic","choice":9}"#),
        "192.0.2.1:4002",
    ))
    .await
    .expect_problem(429, "rate-limited", None);
    h.send(with_header(
        from_peer(ballot(), "192.0.2.1:4003"),
        "x-forwarded-for",
        "198.51.100.7",
    ))
    .await
    .expect_problem(429, "rate-limited", None);
    assert_eq!(h.tip(), 2, "refused requests store nothing");

    // Other addresses have their own allowance; hosts of one IPv6 /64 share one.
    h.send(from_peer(ballot(), "192.0.2.2:4000"))
        .await
        .json::<Accepted>(202);
    for host in ["[2001:db8::1]:1", "[2001:db8::2]:1"] {
        h.send(from_peer(ballot(), host))
            .await
            .json::<Accepted>(202);
    }
    h.send(from_peer(ballot(), "[2001:db8::3]:1"))
        .await
        .expect_problem(429, "rate-limited", None);
    // Without a peer address (a router served without connect info) there is no key.
    h.send(ballot()).await.json::<Accepted>(202);
    assert_eq!(h.tip(), 6);
}

#[tokio::test]
async fn forwarded_for_names_the_client_only_behind_a_trusted_proxy() {
    let h = Harness::with_config(|config| {
        config.limits = limits(|l| {
            l.per_ip = rate("1/min");
            l.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
        });
    });
    h.poll(
        json!({"id": "open-mic", "title": "T", "question": "Q", "kind": "nps", "dedupe": "none"}),
        |_| {},
    )
    .await;
    let via_proxy = |client: &str| {
        with_header(
            from_peer(vote_json("open-mic", json!({"choice": 9})), "10.0.0.2:80"),
            "x-forwarded-for",
            client,
        )
    };
    h.send(via_proxy("198.51.100.1"))
        .await
        .json::<Accepted>(202);
    h.send(via_proxy("198.51.100.2"))
        .await
        .json::<Accepted>(202);
    h.send(via_proxy("198.51.100.1"))
        .await
        .expect_problem(429, "rate-limited", None);
    // A client cannot hide behind an address it writes itself to the left of its own.
    h.send(via_proxy("203.0.113.9, 198.51.100.2"))
        .await
        .expect_problem(429, "rate-limited", None);
    assert_eq!(h.tip(), 2);
}

#[tokio::test]
async fn the_per_voter_limit_answers_429_for_votes_and_batch_lines() {
    let h = Harness::with_config(|config| {
        config.limits = limits(|l| l.per_voter = rate("2/min"));
    });
    h.poll(
        json!({"id": "open-mic", "title": "T", "question": "Q", "kind": "nps", "dedupe": "none"}),
        |_| {},
    )
    .await;
    let ballot = |voter: &str| vote_json("open-mic", json!({"voter_id": voter, "choice": 7}));
    for _ in 0..2 {
        h.send(ballot("loud")).await.json::<Accepted>(202);
    }
    let answer = h.send(ballot("loud")).await;
    answer.expect_problem(429, "rate-limited", None);
    assert!(answer.header("retry-after").is_some());
    h.send(ballot("quiet")).await.json::<Accepted>(202);

    let result: BatchResult = h
        .send(batch(
            r#"{"poll_id":"open-mic","voter_id":"loud","choice":7}
{"poll_id":"open-mic","voter_id":"calm","choice":7}"#,
        ))
        .await
        .json(200);
    let statuses: Vec<(u16, Option<&str>)> = result
        .results
        .iter()
        .map(|line| (line.status, line_slug(line)))
        .collect();
    assert_eq!(statuses, [(429, Some("rate-limited")), (202, None)]);
    assert_eq!(h.tip(), 4);
}

#[tokio::test]
async fn the_per_poll_limit_answers_429_for_that_poll_only() {
    let h = Harness::with_config(|config| {
        config.limits = limits(|l| l.per_poll = rate("2/min"));
    });
    h.colour_poll("hot", |_| {}).await;
    h.colour_poll("cold", |_| {}).await;
    for voter in ["a", "b"] {
        h.send(vote_json(
            "hot",
            json!({"voter_id": voter, "choice": "red"}),
        ))
        .await
        .json::<Accepted>(202);
    }
    h.send(vote_json("hot", json!({"voter_id": "c", "choice": "red"})))
        .await
        .expect_problem(429, "rate-limited", None);
    h.send(vote_json("cold", json!({"voter_id": "c", "choice": "red"})))
        .await
        .json::<Accepted>(202);
    assert_eq!(h.tip(), 3);
}

/// The `tally_voter` id a `Set-Cookie` value carries, after checking its attributes.
fn voter_cookie(set_cookie: &str, secure: bool) -> String {
    let (pair, attributes) = set_cookie.split_once("; ").unwrap();
    let id = pair
        .strip_prefix(&format!("{}=", tally_ingest::VOTER_COOKIE))
        .unwrap();
    assert!(
        id.len() >= 16 && id.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{set_cookie}"
    );
    let expected = if secure {
        "Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax; Secure"
    } else {
        "Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax"
    };
    assert_eq!(attributes, expected);
    id.to_owned()
}

#[tokio::test]
async fn a_browser_without_voter_id_is_given_a_voter_cookie_and_keeps_it() {
    let h = Harness::new();
    // The page that embeds the widget is on another site, which the poll lists.
    h.colour_poll("widget", |poll| {
        poll.allowed_origins = vec!["https://shop.example".to_owned()]
    })
    .await;
    let browser_vote = || {
        with_header(
            vote_json("widget", json!({"choice": "red"})),
            "origin",
            "https://shop.example",
        )
    };

    let answer = h.send(browser_vote()).await;
    let cookie = voter_cookie(answer.header("set-cookie").expect("a cookie"), false);
    answer.json::<Accepted>(202);
    let stored = h.logged_votes().await;
    assert_eq!(
        stored[0].voter_key,
        voter_key(&stored[0].poll_id, &cookie),
        "the cookie is the voter"
    );

    // Brought back, the cookie is the same voter: no new cookie, and the vote is its second.
    let answer = h
        .send(with_header(
            browser_vote(),
            "cookie",
            &format!("theme=dark; tally_voter={cookie}"),
        ))
        .await;
    assert_eq!(answer.header("set-cookie"), None);
    answer.expect_problem(409, "already-voted", None);
    // An API client that keeps the cookie (and sends no Origin) is that voter too.
    let answer = h
        .send(with_header(
            vote_json("widget", json!({"choice": "blue"})),
            "cookie",
            &format!("tally_voter={cookie}"),
        ))
        .await;
    answer.expect_problem(409, "already-voted", None);

    // Sec-Fetch-Mode marks a browser as well as Origin does; a new browser is a new voter.
    let answer = h
        .send(with_header(
            vote_json("widget", json!({"choice": "blue"})),
            "sec-fetch-mode",
            "cors",
        ))
        .await;
    let other = voter_cookie(answer.header("set-cookie").expect("a cookie"), false);
    assert_ne!(other, cookie);
    answer.json::<Accepted>(202);
    assert_eq!(h.tip(), 2);
}

#[tokio::test]
async fn an_api_client_without_voter_id_is_told_to_send_one() {
    let h = Harness::new();
    // The page that embeds the widget is on another site, which the poll lists.
    h.colour_poll("widget", |poll| {
        poll.allowed_origins = vec!["https://shop.example".to_owned()]
    })
    .await;
    let answer = h.send(vote_json("widget", json!({"choice": "red"}))).await;
    assert_eq!(answer.header("set-cookie"), None);
    answer.expect_problem(422, "invalid-field", Some("voter_id"));

    // A cookie ingest could not have set (too short) is no voter either.
    let answer = h
        .send(with_header(
            vote_json("widget", json!({"choice": "red"})),
            "cookie",
            "tally_voter=short",
        ))
        .await;
    assert_eq!(answer.header("set-cookie"), None);
    answer.expect_problem(422, "invalid-field", Some("voter_id"));

    // A browser that sends a voter_id is that voter, and gets no cookie.
    let answer = h
        .send(with_header(
            vote_json("widget", json!({"voter_id": "crm-17", "choice": "red"})),
            "origin",
            "https://shop.example",
        ))
        .await;
    assert_eq!(answer.header("set-cookie"), None);
    answer.json::<Accepted>(202);
    assert_eq!(
        h.logged_votes().await[0].voter_key,
        voter_key("widget", "crm-17")
    );
    assert_eq!(h.tip(), 1);
}

#[tokio::test]
async fn the_voter_cookie_is_secure_only_over_tls_reported_by_a_trusted_proxy() {
    let h = Harness::with_config(|config| {
        config.limits = limits(|l| l.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()]);
    });
    // The page that embeds the widget is on another site, which the poll lists.
    h.colour_poll("widget", |poll| {
        poll.allowed_origins = vec!["https://shop.example".to_owned()]
    })
    .await;
    let https_vote = |peer: &str| {
        let request = with_header(
            vote_json("widget", json!({"choice": "red"})),
            "origin",
            "https://shop.example",
        );
        with_header(from_peer(request, peer), "x-forwarded-proto", "https")
    };
    let answer = h.send(https_vote("10.0.0.2:443")).await;
    voter_cookie(answer.header("set-cookie").unwrap(), true);
    let answer = h.send(https_vote("198.51.100.1:443")).await;
    voter_cookie(answer.header("set-cookie").unwrap(), false);
}

#[tokio::test]
async fn unknown_routes_and_methods_get_problem_json() {
    let h = Harness::new();
    let request = |method: Method, path: &str| {
        Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap()
    };
    h.send(request(Method::GET, "/v2/anything"))
        .await
        .expect_problem(404, "no-route", None);
    h.send(request(Method::GET, "/v1/polls/bad"))
        .await
        .expect_problem(404, "no-route", None);
    for (method, path) in [
        (Method::PUT, "/v1/polls/bad/votes"),
        (Method::GET, "/v1/polls/bad/votes"),
        (Method::GET, "/v1/votes:batch"),
        (Method::DELETE, "/v1/votes:batch"),
    ] {
        h.send(request(method, path))
            .await
            .expect_problem(405, "method-not-allowed", None);
    }
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let h = Harness::new();
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    assert_eq!(h.send(get("/healthz")).await.status, 200);
    let ready: Readiness = h.send(get("/readyz")).await.json(200);
    assert!(ready.ready);
    assert_eq!(
        ready.checks.keys().collect::<Vec<_>>(),
        ["poll_registry", "vote_log"]
    );
}

#[tokio::test]
async fn a_late_retry_on_a_closed_poll_gets_the_original_answer_and_anything_else_poll_closed() {
    let h = Harness::new();
    h.colour_poll("late", |_| {}).await;
    let body = json!({"voter_id": "u1", "choice": "red", "vote_id": "v-1"});
    let accepted: Accepted = h.send(vote_json("late", body.clone())).await.json(202);

    let mut poll = h.store.registry.get("late").await.unwrap().unwrap();
    closed(&mut poll);
    h.store.registry.update(&poll).await.unwrap();
    // The ingest's cache hears of the close through the registry's watch.
    let newcomer = json!({"voter_id": "u2", "choice": "red"});
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.send(vote_json("late", newcomer.clone())).await.status != 409 {
        assert!(
            std::time::Instant::now() < deadline,
            "the close never reached ingest"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The newcomer's votes went in before the close was heard: the tip says how many.
    let tip = h.tip();

    let retry: Accepted = h.send(vote_json("late", body.clone())).await.json(202);
    assert_eq!(retry, accepted, "a late retry gets the original answer");
    for (refused, why) in [
        (
            json!({"voter_id": "u1", "choice": "blue", "vote_id": "v-1"}),
            "the same vote id with another ballot",
        ),
        (
            json!({"voter_id": "u1", "choice": "red", "vote_id": "v-2"}),
            "another vote id of the voter",
        ),
        (
            json!({"voter_id": "u3", "choice": "red", "vote_id": "v-3"}),
            "a new voter's vote with its own id",
        ),
        (
            json!({"voter_id": "u4", "choice": "red"}),
            "a vote without an id",
        ),
    ] {
        let problem = h.send(vote_json("late", refused)).await.problem();
        assert_eq!(
            (problem.status, problem.slug()),
            (409, "poll-closed"),
            "{why}"
        );
    }
    // The same in a batch: the retry's line is 202, the others poll-closed.
    let result: BatchResult = h
        .send(batch(
            r#"{"poll_id":"late","voter_id":"u1","choice":"red","vote_id":"v-1"}
{"poll_id":"late","voter_id":"u5","choice":"red","vote_id":"v-5"}"#,
        ))
        .await
        .json(200);
    let lines: Vec<(u16, Option<String>)> = result
        .results
        .iter()
        .map(|line| {
            (
                line.status,
                line.problem
                    .as_ref()
                    .map(|p| p.kind.trim_start_matches(TYPE_BASE).to_owned()),
            )
        })
        .collect();
    assert_eq!(lines, [(202, None), (409, Some("poll-closed".to_owned()))]);
    assert_eq!(h.tip(), tip, "nothing was appended after the close");
}
