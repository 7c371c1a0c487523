//! Analysts' SQL (`POST /v1/sql`) and exports (`GET /v1/polls/{id}/export`) in-process
//! (`router().oneshot()`) on the embedded back ends: who may use them, every answer format
//! read back by a parser, every refusal of issue 15 (and that it changed nothing), SQL
//! counts equal to /results at the same `as_of`, and a runaway query stopped within its
//! time limit with the service still answering. tests/e2e/sql.rs proves the same through
//! real processes on both deployments.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::TimestampMillisecondType;
use axum::body::{Body, Bytes};
use axum::http::{header, Method, Request};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{json, Value};
use tally_core::analyst::SqlLimits;
use tally_core::auth::{ApiKeys, Role};
use tally_core::results::Results;
use tally_core::segment::Segment;
use tally_core::vote::Vote;

use common::{ballot, Answer, Harness, ADMIN_KEY, ANALYST_KEY};

const INGEST_KEY: &str = "ingest-key-for-sql-tests";
/// Epoch ms of a whole minute in the past, where test votes are received.
const T0: i64 = 1_700_000_040_000;

/// A harness with an ingest key too, and `limits` for SQL.
fn harness(limits: SqlLimits) -> Harness {
    Harness::with_config(|config| {
        config.keys = ApiKeys::new(&[
            (Role::Admin, &[ADMIN_KEY.to_owned()]),
            (Role::Analyst, &[ANALYST_KEY.to_owned()]),
            (Role::Ingest, &[INGEST_KEY.to_owned()]),
        ])
        .unwrap();
        config.sql_limits = limits;
    })
}

/// `POST /v1/sql` with `query`, the key, and an `Accept` header when given.
async fn sql(h: &Harness, query: &str, key: Option<&str>, accept: Option<&str>) -> Answer {
    let mut request = Request::builder()
        .method(Method::POST)
        .uri("/v1/sql")
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    if let Some(accept) = accept {
        request = request.header(header::ACCEPT, accept);
    }
    let body = json!({ "query": query }).to_string();
    h.send(request.body(Body::from(body)).unwrap()).await
}

/// The JSON answer of an analyst query, checked to be one.
async fn sql_json(h: &Harness, query: &str) -> Value {
    let answer = sql(h, query, Some(ANALYST_KEY), None).await;
    let doc: Value = answer.json(200);
    assert_eq!(
        answer.header("tally-as-of"),
        Some(doc["as_of"].to_string().as_str()),
        "the header and the document name one position"
    );
    doc
}

/// The rows of a JSON answer.
async fn rows(h: &Harness, query: &str) -> Vec<Vec<Value>> {
    serde_json::from_value(sql_json(h, query).await["rows"].clone()).unwrap()
}

/// A poll `p` (options `a`/`A`, `b`/`B`, dimension `plan`) with 31 ballots: 20 for `a`
/// (from DE), 11 for `b` (from FR), every third one on plan `pro`. Returns the last sequence.
async fn with_ballots(h: &Harness) -> u64 {
    h.create(
        json!({"id": "p", "title": "Spring", "question": "Which?", "kind": "single",
        "dimensions": ["plan"],
        "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]}),
    )
    .await;
    let votes: Vec<Vote> = (0..31)
        .map(|i| {
            let (choice, country) = if i < 20 { ("a", "DE") } else { ("b", "FR") };
            let mut vote = ballot("p", &format!("v{i}"), choice, country, T0 + i * 1000);
            if i % 3 == 0 {
                vote.segment = Segment {
                    country: country.into(),
                    custom: [("plan".to_owned(), "pro".to_owned())].into(),
                    ..Default::default()
                };
            }
            vote
        })
        .collect();
    h.put_votes(votes).await
}

/// Waits until the query service has recorded poll `p` for the analyst tables.
async fn until_polls_recorded(h: &Harness) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = rows(h, "SELECT count(*) FROM poll_options WHERE poll_id = 'p'").await;
        if found == vec![vec![json!(2)]] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "poll p never recorded: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sql_and_export_admit_analyst_and_admin_keys_only() {
    let h = harness(SqlLimits::default());
    with_ballots(&h).await;
    for (key, status) in [
        (None, 401),
        (Some("not-a-key-of-this-service"), 401),
        (Some(INGEST_KEY), 403),
        (Some(ANALYST_KEY), 200),
        (Some(ADMIN_KEY), 200),
    ] {
        let answer = sql(&h, "SELECT count(*) FROM ballots", key, None).await;
        assert_eq!(
            answer.status.as_u16(),
            status,
            "sql with {key:?}: {}",
            answer.text()
        );
        let answer = h.get("/v1/polls/p/export?format=csv", key).await;
        assert_eq!(
            answer.status.as_u16(),
            status,
            "export with {key:?}: {}",
            answer.text()
        );
        if status != 200 {
            answer.problem();
        }
    }
}

#[tokio::test]
async fn the_json_answer_has_columns_rows_as_of_rows_read_and_elapsed_ms() {
    let h = harness(SqlLimits::default());
    let last = with_ballots(&h).await;
    let doc = sql_json(
        &h,
        "SELECT country, count(*) AS n, min(received_at) AS first FROM ballots GROUP BY country ORDER BY country",
    )
    .await;
    assert_eq!(
        doc["columns"],
        json!([{"name": "country", "type": "string"}, {"name": "n", "type": "int64"},
               {"name": "first", "type": "timestamp"}])
    );
    assert_eq!(doc["rows"][0][0], json!("DE"));
    assert_eq!(doc["rows"][0][1], json!(20));
    assert_eq!(doc["rows"][1], json!(["FR", 11, "2023-11-14T22:14:20Z"]));
    assert_eq!(doc["as_of"], json!(last));
    assert_eq!(doc["rows_read"], json!(31), "{doc}");
    assert!(doc["elapsed_ms"].is_u64(), "{doc}");
    let keys: Vec<&String> = doc.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 5, "{keys:?}");
}

/// A minimal RFC 4180 reader for the tests: fields, quoted fields with doubled quotes, CRLF.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => assert_eq!(chars.next(), Some('\n'), "CR without LF"),
            (false, '\n') => panic!("a bare LF ends a line: {text:?}"),
            (false, c) => field.push(c),
        }
        if !quoted && c == '\r' {
            row.push(std::mem::take(&mut field));
            rows.push(std::mem::take(&mut row));
        }
    }
    assert!(
        field.is_empty() && row.is_empty(),
        "the last line ends in CRLF"
    );
    rows
}

fn parquet(body: &Bytes) -> (Vec<RecordBatch>, BTreeMap<String, String>) {
    let builder = ParquetRecordBatchReaderBuilder::try_new(body.clone()).expect("a parquet file");
    let metadata: BTreeMap<String, String> = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .into_iter()
        .flatten()
        .filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?)))
        .collect();
    let batches = builder
        .build()
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    (batches, metadata)
}

#[tokio::test]
async fn every_answer_format_parses() {
    let h = harness(SqlLimits::default());
    let last = with_ballots(&h).await;
    let query =
        "SELECT vote_id, country, choices, received_at FROM ballots WHERE seq <= 2 ORDER BY seq";

    let answer = sql(&h, query, Some(ANALYST_KEY), Some("text/csv")).await;
    assert_eq!(answer.status.as_u16(), 200, "{}", answer.text());
    assert!(answer
        .header("content-type")
        .unwrap()
        .starts_with("text/csv"));
    assert_eq!(
        answer.header("tally-as-of"),
        Some(last.to_string().as_str())
    );
    assert_eq!(
        parse_csv(&answer.text()),
        vec![
            vec!["vote_id", "country", "choices", "received_at"],
            vec!["p-v0", "DE", "[\"a\"]", "2023-11-14T22:14:00Z"],
            vec!["p-v1", "DE", "[\"a\"]", "2023-11-14T22:14:01Z"],
        ]
    );

    let answer = sql(&h, query, Some(ANALYST_KEY), Some("application/x-ndjson")).await;
    assert_eq!(answer.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<Value> = answer
        .text()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        lines,
        vec![
            json!({"vote_id": "p-v0", "country": "DE", "choices": ["a"], "received_at": "2023-11-14T22:14:00Z"}),
            json!({"vote_id": "p-v1", "country": "DE", "choices": ["a"], "received_at": "2023-11-14T22:14:01Z"}),
        ]
    );

    for accept in ["application/vnd.apache.parquet", "application/parquet"] {
        let answer = sql(&h, query, Some(ANALYST_KEY), Some(accept)).await;
        assert_eq!(answer.status.as_u16(), 200, "{}", answer.text());
        assert_eq!(
            answer.header("content-type"),
            Some("application/vnd.apache.parquet")
        );
        let (batches, metadata) = parquet(&answer.body);
        assert_eq!(metadata.get("tally.as_of"), Some(&last.to_string()));
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        assert_eq!(rows, 2);
        let ids = batches[0].column(0).as_string::<i32>();
        assert_eq!((ids.value(0), ids.value(1)), ("p-v0", "p-v1"));
    }

    let answer = sql(&h, query, Some(ANALYST_KEY), Some("application/xml")).await;
    let problem = answer.expect_problem(406, "not-acceptable", None);
    assert!(problem.detail.contains("text/csv"), "{problem:?}");
}

#[tokio::test]
async fn every_refused_statement_is_a_4xx_problem_and_changes_nothing() {
    let h = harness(SqlLimits::default());
    with_ballots(&h).await;
    until_polls_recorded(&h).await;
    let before = (
        rows(&h, "SELECT count(*) FROM ballots").await,
        rows(&h, "SELECT poll_id, title, version FROM polls").await,
        h.all_polls().await.len(),
    );
    let refused = [
        "INSERT INTO ballots (poll_id) VALUES ('p')",
        "INSERT INTO votes SELECT * FROM votes",
        "ALTER TABLE ballots ADD COLUMN x String",
        "DROP TABLE ballots",
        "DROP TABLE polls",
        "CREATE TABLE x (a INT)",
        "CREATE VIEW v AS SELECT * FROM ballots",
        "SET readonly = 0",
        "SYSTEM SHUTDOWN",
        "KILL QUERY WHERE 1",
        "SELECT 1; DROP TABLE ballots",
        "SELECT count(*) FROM ballots; SELECT 1",
        "SELECT * FROM url('http://127.0.0.1:9/x', CSV, 'a String')",
        "SELECT * FROM file('/etc/passwd', CSV, 'a String')",
        "SELECT * FROM remote('127.0.0.1', system.one)",
        "SELECT * FROM numbers(1e12)",
        "SELECT count(*) FROM numbers(1000000000000)",
        "SELECT * FROM ballots INTO OUTFILE '/tmp/tally-out.csv'",
        "SELECT count(*) FROM ballots SETTINGS readonly = 0",
        "SELECT count(*) FROM ballots SETTINGS max_execution_time = 100000",
        "SELECT * FROM system.tables",
        "SELECT * FROM votes",
        "COPY (SELECT * FROM ballots) TO '/tmp/tally-out.csv'",
        "EXPLAIN ANALYZE SELECT * FROM ballots",
        "DELETE FROM ballots",
        "UPDATE polls SET title = 'x'",
        "TRUNCATE TABLE ballots",
    ];
    for statement in refused {
        let answer = sql(&h, statement, Some(ANALYST_KEY), None).await;
        let problem = answer.problem();
        assert!(
            (400..500).contains(&problem.status),
            "{statement}: {problem:?}"
        );
        assert!(
            ["sql-not-allowed", "sql-invalid"].contains(&problem.slug()),
            "{statement}: {problem:?}"
        );
    }
    for not_allowed in [
        "INSERT INTO ballots (poll_id) VALUES ('p')",
        "DROP TABLE ballots",
        "SET readonly = 0",
        "SELECT 1; DROP TABLE ballots",
        "SELECT * FROM url('http://127.0.0.1:9/x', CSV, 'a String')",
        "SELECT count(*) FROM ballots SETTINGS readonly = 0",
    ] {
        sql(&h, not_allowed, Some(ANALYST_KEY), None)
            .await
            .expect_problem(403, "sql-not-allowed", None);
    }
    let after = (
        rows(&h, "SELECT count(*) FROM ballots").await,
        rows(&h, "SELECT poll_id, title, version FROM polls").await,
        h.all_polls().await.len(),
    );
    assert_eq!(before, after);
    assert!(!std::path::Path::new("/tmp/tally-out.csv").exists());
}

#[tokio::test]
async fn a_bad_body_is_a_problem_naming_what_to_fix() {
    let h = harness(SqlLimits::default());
    let post = |body: String| {
        Request::builder()
            .method(Method::POST)
            .uri("/v1/sql")
            .header(header::AUTHORIZATION, format!("Bearer {ANALYST_KEY}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    for body in [
        json!({"query": "SELECT 1", "settings": {"readonly": 0}}).to_string(),
        json!({"sql": "SELECT 1"}).to_string(),
        json!({"query": 5}).to_string(),
        "{\"query\": \"SELECT 1\"".to_owned(),
    ] {
        let answer = h.send(post(body.clone())).await;
        let problem = answer.problem();
        assert!((400..500).contains(&problem.status), "{body}: {problem:?}");
    }
    let answer = h.send(post(json!({"query": "   "}).to_string())).await;
    answer.problem();
    let long = format!("SELECT 1 FROM polls WHERE title = '{}'", "x".repeat(40_000));
    let answer = h.send(post(json!({ "query": long }).to_string())).await;
    assert_eq!(answer.status.as_u16(), 413, "{}", answer.text());
    answer.problem();
    let answer = sql(&h, "SELEC count(*) FROM ballots", Some(ANALYST_KEY), None).await;
    answer.expect_problem(400, "sql-invalid", None);
    let answer = sql(&h, "SELECT nope FROM ballots", Some(ANALYST_KEY), None).await;
    let problem = answer.expect_problem(400, "sql-invalid", None);
    assert!(problem.detail.contains("nope"), "{problem:?}");
}

#[tokio::test]
async fn sql_counts_per_option_equal_results_at_the_same_as_of() {
    let h = harness(SqlLimits::default());
    let last = with_ballots(&h).await;
    until_polls_recorded(&h).await;
    let results: Results = h
        .get("/v1/polls/p/results", Some(ANALYST_KEY))
        .await
        .json(200);
    let doc = sql_json(
        &h,
        "SELECT o.option_id, o.label, count(a.vote_id) AS n FROM poll_options o \
         LEFT JOIN answers a ON a.poll_id = o.poll_id AND a.option_id = o.option_id \
         WHERE o.poll_id = 'p' GROUP BY o.option_id, o.label, o.position ORDER BY o.position",
    )
    .await;
    assert_eq!(doc["as_of"], json!(results.as_of));
    assert_eq!(results.as_of, last);
    let from_results: Vec<Value> = results
        .options
        .iter()
        .map(|o| json!([o.id, o.label, o.count]))
        .collect();
    assert_eq!(doc["rows"], Value::Array(from_results));
    assert_eq!(
        rows(&h, "SELECT count(*) FROM ballots WHERE poll_id = 'p'").await,
        vec![vec![json!(results.total_votes)]]
    );
    assert_eq!(
        rows(&h, "SELECT d.value, count(*) FROM ballot_dimensions d WHERE d.dimension = 'plan' GROUP BY d.value").await,
        vec![vec![json!("pro"), json!(11)]]
    );
}

#[tokio::test]
async fn a_limit_hit_is_a_problem_naming_the_limit() {
    let h = harness(SqlLimits {
        max_rows: 10,
        ..SqlLimits::default()
    });
    with_ballots(&h).await;
    let answer = sql(&h, "SELECT vote_id FROM ballots", Some(ANALYST_KEY), None).await;
    let problem = answer.expect_problem(422, "sql-limit-exceeded", None);
    assert!(problem.detail.contains("max_rows"), "{problem:?}");
    let answer = sql(
        &h,
        "SELECT vote_id FROM ballots LIMIT 10",
        Some(ANALYST_KEY),
        None,
    )
    .await;
    assert_eq!(answer.status.as_u16(), 200, "{}", answer.text());
}

#[tokio::test]
async fn a_runaway_query_stops_within_its_time_limit_and_the_service_still_answers() {
    let limit = Duration::from_secs(1);
    let h = harness(SqlLimits {
        max_time: limit,
        ..SqlLimits::default()
    });
    with_ballots(&h).await;
    // Over a billion rows in 40 branches of 31^5 (see the warehouse conformance suite).
    let narrow = "(SELECT log_partition FROM ballots)";
    let pair = format!("(SELECT 1 AS one FROM {narrow} a CROSS JOIN {narrow} b)");
    let four = format!("(SELECT 1 AS one FROM {pair} a CROSS JOIN {pair} b)");
    let branch =
        format!("SELECT sum(l.one + r.log_partition * 0) AS s FROM {four} l CROSS JOIN {narrow} r");
    let runaway = format!(
        "SELECT sum(s) FROM ({}) x",
        vec![branch; 40].join(" UNION ALL ")
    );
    let started = Instant::now();
    let answer = sql(&h, &runaway, Some(ANALYST_KEY), None).await;
    let took = started.elapsed();
    let problem = answer.expect_problem(422, "sql-limit-exceeded", None);
    assert!(problem.detail.contains("max_time"), "{problem:?}");
    assert!(
        took < limit + Duration::from_secs(5),
        "stopped after {took:?}"
    );
    assert_eq!(
        rows(&h, "SELECT count(*) FROM ballots").await,
        vec![vec![json!(31)]],
        "the next query is answered"
    );
    let health = h.get("/healthz", None).await;
    assert_eq!(health.status.as_u16(), 200);
}

#[tokio::test]
async fn an_export_is_every_ballot_with_labels_in_each_format() {
    let h = harness(SqlLimits::default());
    let last = with_ballots(&h).await;

    let answer = h
        .get("/v1/polls/p/export?format=csv", Some(ANALYST_KEY))
        .await;
    assert_eq!(answer.status.as_u16(), 200, "{}", answer.text());
    assert_eq!(
        answer.header("tally-as-of"),
        Some(last.to_string().as_str())
    );
    assert!(answer
        .header("content-disposition")
        .is_some_and(|d| d.contains(&format!("p-as-of-{last}.csv"))));
    let table = parse_csv(&answer.text());
    assert_eq!(
        table[0],
        [
            "vote_id",
            "seq",
            "received_at",
            "voter_key",
            "option_id",
            "label",
            "campaign",
            "channel",
            "source",
            "medium",
            "country",
            "device",
            "plan",
            "as_of"
        ]
    );
    let mut by_vote: BTreeMap<String, Vec<String>> = table[1..]
        .iter()
        .map(|row| (row[0].clone(), row.clone()))
        .collect();
    assert_eq!(by_vote.len(), 31);
    let v0 = by_vote.remove("p-v0").unwrap();
    assert_eq!(
        v0,
        [
            "p-v0",
            "1",
            "2023-11-14T22:14:00Z",
            "key-v0",
            "a",
            "A",
            "",
            "",
            "",
            "",
            "DE",
            "",
            "pro",
            last.to_string().as_str()
        ]
    );
    let v25 = by_vote.remove("p-v25").unwrap();
    assert_eq!(
        (
            v25[4].as_str(),
            v25[5].as_str(),
            v25[10].as_str(),
            v25[12].as_str()
        ),
        ("b", "B", "FR", "")
    );

    let answer = h
        .get("/v1/polls/p/export?format=ndjson", Some(ANALYST_KEY))
        .await;
    assert_eq!(answer.status.as_u16(), 200, "{}", answer.text());
    let lines: Vec<Value> = answer
        .text()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 31);
    assert!(lines.iter().all(|l| l["as_of"] == last), "{lines:?}");
    let a = lines
        .iter()
        .filter(|l| l["option_id"] == "a" && l["label"] == "A")
        .count();
    assert_eq!(a, 20);

    let answer = h
        .get("/v1/polls/p/export?format=parquet", Some(ANALYST_KEY))
        .await;
    assert_eq!(answer.status.as_u16(), 200, "{}", answer.text());
    let (batches, metadata) = parquet(&answer.body);
    assert_eq!(metadata.get("tally.as_of"), Some(&last.to_string()));
    let mut received = Vec::new();
    for batch in &batches {
        let column = batch
            .column_by_name("received_at")
            .unwrap()
            .as_primitive::<TimestampMillisecondType>();
        received.extend(column.iter().flatten());
    }
    received.sort_unstable();
    assert_eq!(received, (0..31).map(|i| T0 + i * 1000).collect::<Vec<_>>());
}

#[tokio::test]
async fn an_export_of_a_multi_poll_lists_choices_and_labels() {
    let h = harness(SqlLimits::default());
    h.create(
        json!({"id": "m", "title": "T", "question": "Q", "kind": "multi", "max_choices": 2,
        "options": [{"id": "x", "label": "X, the first"}, {"id": "y", "label": "Y \"quoted\""}]}),
    )
    .await;
    let mut vote = ballot("m", "u1", "x", "DE", T0);
    vote.choice = vec!["x".into(), "y".into()];
    h.put_votes(vec![vote]).await;
    let answer = h
        .get("/v1/polls/m/export?format=csv", Some(ANALYST_KEY))
        .await;
    let table = parse_csv(&answer.text());
    assert_eq!(&table[0][4..6], ["choices", "labels"]);
    assert_eq!(table[1][4], "[\"x\",\"y\"]");
    let labels: Vec<String> = serde_json::from_str(&table[1][5]).unwrap();
    assert_eq!(labels, ["X, the first", "Y \"quoted\""]);
}

#[tokio::test]
async fn export_refusals_name_what_to_fix() {
    let h = harness(SqlLimits::default());
    with_ballots(&h).await;
    let answer = h
        .get("/v1/polls/p/export?format=xlsx", Some(ANALYST_KEY))
        .await;
    let problem = answer.problem();
    assert!(problem.detail.contains("parquet"), "{problem:?}");
    let answer = h
        .get("/v1/polls/p/export?format=csv&limit=5", Some(ANALYST_KEY))
        .await;
    assert_eq!(answer.status.as_u16(), 400, "{}", answer.text());
    let answer = h.get("/v1/polls/nope/export", Some(ANALYST_KEY)).await;
    assert_eq!(answer.status.as_u16(), 404, "{}", answer.text());
}

#[test]
fn the_csv_reader_of_these_tests_reads_quotes_and_crlf() {
    assert_eq!(
        parse_csv("a,\"b,\"\"c\"\"\"\r\n,\r\n"),
        vec![vec!["a", "b,\"c\""], vec!["", ""]]
    );
}
