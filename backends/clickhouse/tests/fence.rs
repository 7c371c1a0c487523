//! Fencing on the real ClickHouse server: once a newer owner fenced a partition, the older
//! owner's inserts into every partitioned table are refused and write nothing, while its
//! other partitions and the newer owner's inserts go through — with every column intact
//! through the fenced path (arrays, nulls, dimensions, times, text that needs escaping),
//! and read back whole by vote id (how a late retry on a purged poll is answered).
//! Every test here needs a clickhouse-server (`needs_clickhouse`).

use std::collections::BTreeMap;

use tally_clickhouse::{ClickHouseConfig, ClickHouseWarehouse};
use tally_core::ports::{StoredVote, Warehouse, WindowRow};
use tally_core::rollup::{RollupLevel, RollupRow};
use tally_core::segment::Segment;
use tally_core::vote::Vote;
use tally_core::ErrorKind;
use tally_testkit::require;

/// An answer with what could break an encoding: quotes, escapes, a line break, non-ASCII,
/// and what a multipart delimiter starts with.
const CHOICE: &str = "blue\"\n\\é\r\n--tally-batch-";

fn vote(seq: u64, voter: &str) -> StoredVote {
    let segment = Segment {
        country: "DE".into(),
        custom: BTreeMap::from([("store".into(), "it's #42\t".into())]),
        ..Default::default()
    };
    let vote = Vote {
        vote_id: format!("v-{seq}"),
        poll_id: "poll-1".into(),
        voter_key: voter.into(),
        choice: vec!["red".into(), CHOICE.into()],
        value: None,
        segment,
        received_at: 1_700_000_000_123 + seq as i64,
    };
    StoredVote { seq, vote }
}

async fn warehouse(database: &str) -> ClickHouseWarehouse {
    let clickhouse = tally_testkit::clickhouse()
        .await
        .expect("clickhouse-server");
    ClickHouseWarehouse::new(&ClickHouseConfig {
        url: clickhouse.url.clone(),
        database: database.to_owned(),
        user: None,
        password: None,
        analyst_user: None,
        analyst_password: None,
        sharding: None,
        replicated: false,
    })
    .expect("warehouse")
}

/// Panics unless `result` is the fence's refusal.
fn assert_fenced(result: tally_core::Result<()>, what: &str) {
    match result {
        Ok(()) => panic!("{what}: written where the fence should refuse it"),
        Err(err) => assert_eq!(err.kind(), ErrorKind::Conflict, "{what}: {}", err.chain()),
    }
}

async fn query(sql: &str) -> String {
    tally_testkit::clickhouse()
        .await
        .expect("clickhouse-server")
        .query(sql)
        .await
        .expect("query")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn needs_clickhouse_an_older_owner_writes_nothing_once_fenced() {
    require!(ClickHouse);
    let database = tally_testkit::unique_name("fence");
    let old = warehouse(&database).await;
    old.migrate().await.expect("migrate");
    let new = warehouse(&database).await;

    old.fence(0, 5).await.expect("the first owner fences");
    old.fence(1, 6).await.expect("and owns another partition");
    old.insert_votes(0, &[vote(1, "a"), vote(2, "")])
        .await
        .expect("the owner writes");
    let stored = query(&format!(
        "SELECT seq, vote_id, voter_key, choice, value, country, dim_keys, dim_values, \
         toUnixTimestamp(received_at), received_ms FROM {database}.votes ORDER BY seq FORMAT JSONCompact"
    ))
    .await;
    let stored: serde_json::Value = serde_json::from_str(&stored).expect("json");
    let expected = |seq: u64, voter: &str| {
        serde_json::json!([
            seq.to_string(),
            format!("v-{seq}"),
            voter,
            ["red", CHOICE],
            null,
            "DE",
            ["store"],
            ["it's #42\t"],
            1_700_000_000,
            (1_700_000_000_123 + seq).to_string()
        ])
    };
    assert_eq!(
        stored["data"],
        serde_json::json!([expected(1, "a"), expected(2, "")]),
        "every column arrives intact through the fenced insert"
    );

    new.fence(0, 9).await.expect("a newer owner fences");
    assert_fenced(old.insert_votes(0, &[vote(3, "b")]).await, "votes");
    let window = WindowRow {
        poll_id: "poll-1".into(),
        window_start: 1_700_000_000,
        window_seconds: 10,
        option: "red".into(),
        votes: 1,
        last_seq: 3,
    };
    assert_fenced(
        old.insert_windows(0, std::slice::from_ref(&window)).await,
        "windows",
    );
    let rollup = RollupRow {
        poll_id: "poll-1".into(),
        dims: String::new(),
        bucket_start: 1_700_000_000 - 1_700_000_000 % 60,
        bucket_seconds: 60,
        segment: Segment {
            country: "DE".into(),
            ..Default::default()
        },
        ballots: 1,
        answers: vec!["red".into()],
        answer_votes: vec![1],
        last_seq: 3,
    };
    for level in RollupLevel::ALL {
        assert_fenced(
            old.insert_rollups(0, level, std::slice::from_ref(&rollup))
                .await,
            level.table(),
        );
    }
    assert_eq!(
        old.watermarks(0).await.expect("watermarks").votes,
        2,
        "the refused insert wrote nothing"
    );
    assert_eq!(
        query(&format!(
            "SELECT (SELECT count() FROM {database}.vote_windows) + \
             (SELECT count() FROM {database}.segment_rollups) + \
             (SELECT count() FROM {database}.segment_rollups_fresh)"
        ))
        .await
        .trim(),
        "0"
    );

    old.insert_votes(1, &[vote(1, "c")])
        .await
        .expect("a partition still owned is written");
    new.insert_votes(0, &[vote(3, "b")])
        .await
        .expect("the newer owner writes");
    new.insert_windows(0, &[window]).await.expect("windows");
    let mut rollup = rollup;
    rollup.segment.custom = BTreeMap::from([("store".into(), "#7".into())]);
    rollup.answers = vec!["blue".into(), "red".into()];
    rollup.answer_votes = vec![300, 1];
    new.insert_rollups(0, RollupLevel::Fresh, &[rollup])
        .await
        .expect("rollups");
    assert_eq!(new.watermarks(0).await.expect("watermarks").votes, 3);
    let rows = query(&format!(
        "SELECT poll_id, toUnixTimestamp(window_start), window_seconds, option, votes, last_seq \
         FROM {database}.vote_windows FORMAT JSONCompact"
    ))
    .await;
    let rows: serde_json::Value = serde_json::from_str(&rows).expect("json");
    assert_eq!(
        rows["data"],
        serde_json::json!([["poll-1", 1_700_000_000, 10, "red", "1", "3"]])
    );
    let rows = query(&format!(
        "SELECT poll_id, toUnixTimestamp(bucket_start), bucket_seconds, country, device, dim_keys, \
         dim_values, ballots, answers, answer_votes, last_seq \
         FROM {database}.segment_rollups_fresh FORMAT JSONCompact"
    ))
    .await;
    let rows: serde_json::Value = serde_json::from_str(&rows).expect("json");
    assert_eq!(
        rows["data"],
        serde_json::json!([[
            "poll-1",
            1_699_999_980,
            60,
            "DE",
            "",
            ["store"],
            ["#7"],
            "1",
            ["blue", "red"],
            ["300", "1"],
            "3"
        ]])
    );

    let again = old
        .fence(0, 5)
        .await
        .expect_err("an older epoch cannot fence again");
    assert_eq!(again.kind(), ErrorKind::Conflict);
    assert!(
        again.chain().to_string().contains("partition_fences"),
        "{}",
        again.chain()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn needs_clickhouse_a_counted_vote_is_read_back_whole_by_its_id() {
    require!(ClickHouse);
    let database = tally_testkit::unique_name("lookup");
    let warehouse = warehouse(&database).await;
    warehouse.migrate().await.expect("migrate");
    warehouse.fence(0, 1).await.expect("fence");
    let mut rated = vote(3, "r");
    rated.vote.choice = vec!["4".into()];
    rated.vote.value = Some(4);
    let votes = [vote(1, "a"), vote(2, ""), rated];
    warehouse.insert_votes(0, &votes).await.expect("insert");
    for stored in &votes {
        let found = warehouse
            .counted_vote("poll-1", &stored.vote.vote_id)
            .await
            .expect("look up")
            .expect("a counted vote is found");
        assert_eq!(found.seq, stored.seq);
        assert_eq!(found.vote, stored.vote, "read back as it was counted");
    }
    for (poll, id) in [
        ("poll-1", "v-9"),
        ("poll-2", "v-1"),
        ("poll-1", "v-1' OR 1=1 --"),
    ] {
        let found = warehouse.counted_vote(poll, id).await.expect("look up");
        assert!(found.is_none(), "{poll}/{id} was never counted");
    }
}
