//! Any query string on the breakdown, time-series, results and live routes: the answer is a
//! success or a problem+json 4xx naming a field — never a 5xx, never a panic — and the
//! router keeps answering. Query strings are built from the parameters these routes take
//! and values meant to hurt: huge and negative numbers, times far out of range, filters of
//! many alternatives, escapes, unknown keys, percent-encoded bytes and multi-byte text.

mod common;

use std::time::Duration;

use axum::http::Method;
use proptest::prelude::*;
use serde_json::json;

use common::{ballot, Harness, ANALYST_KEY};

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("-9223372036854775808".to_owned()),
        Just("9223372036854775807".to_owned()),
        Just("1767225600000000".to_owned()),
        Just("2027-03-01T10:00:00Z".to_owned()),
        Just("0000-01-01T00:00:00Z".to_owned()),
        Just("1m".to_owned()),
        Just("0s".to_owned()),
        Just("4294967296s".to_owned()),
        Just("country:DE".to_owned()),
        Just("country:DE\\,FR".to_owned()),
        Just("country:DE\\".to_owned()),
        Just("%00%ff%c3%28".to_owned()),
        Just("device,country,plan,campaign".to_owned()),
        "[a-z:,\\\\%0-9-]{0,40}",
        "\\PC{0,12}",
        (1usize..400).prop_map(|n| (0..n)
            .map(|i| format!("country:{i}"))
            .collect::<Vec<_>>()
            .join(",")),
    ]
}

fn key() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("by"),
        Just("where"),
        Just("from"),
        Just("to"),
        Just("step"),
        Just("results_token"),
        Just("colour"),
    ]
}

fn query_string() -> impl Strategy<Value = String> {
    proptest::collection::vec((key(), value()), 0..5).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(key, value)| {
                format!(
                    "{key}={}",
                    value
                        .replace(' ', "%20")
                        .replace('#', "%23")
                        .replace('&', "%26")
                )
            })
            .collect::<Vec<_>>()
            .join("&")
    })
}

fn route() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("breakdown"),
        Just("timeseries"),
        Just("results"),
        Just("live"),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    #[test]
    fn no_query_string_breaks_an_analytics_route(cases in proptest::collection::vec((route(), query_string()), 1..8)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let h = Harness::new();
            h.create(json!({"id": "fuzzed", "title": "T", "question": "Q", "kind": "single",
                "dimensions": ["plan"],
                "options": [{"id": "red", "label": "Red"}, {"id": "blue", "label": "Blue"}]}))
                .await;
            h.put_votes(vec![ballot("fuzzed", "v1", "red", "DE", 1_700_000_000_000)]).await;
            for (route, query) in cases {
                let path = format!("/v1/polls/fuzzed/{route}?{query}");
                let Ok(uri) = path.parse::<axum::http::Uri>() else { continue };
                let answer = tokio::time::timeout(
                    Duration::from_secs(20),
                    h.call(Method::GET, &uri.to_string(), Some(ANALYST_KEY), None),
                )
                .await
                .unwrap_or_else(|_| panic!("{path} did not answer in 20 s"));
                let status = answer.status.as_u16();
                assert!(status < 500, "{path} answered {status}: {}", answer.text());
                if status >= 400 {
                    let problem = answer.problem();
                    assert!(!problem.detail.is_empty(), "{path}: a problem without detail");
                }
            }
            // Still answering after whatever came before.
            let health = h.get("/healthz", None).await;
            assert_eq!(health.status.as_u16(), 200);
        });
    }
}
