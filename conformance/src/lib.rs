//! Conformance suites: one per back-end trait, run against every implementation. Each
//! function panics with a message naming the broken guarantee. They assume a fresh back end
//! (an empty stream, bucket, database) and use their own poll ids.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use tally_core::analytics::*;
use tally_core::poll::{Dedupe, NewPoll, Poll};
use tally_core::ports::*;
use tally_core::results::Tally;
use tally_core::rollup::{RollupLevel, Rollups};
use tally_core::segment::Segment;
use tally_core::vote::Vote;
use tally_core::{wire, Error};

fn vote(poll: &str, vote_id: &str, voter_key: &str, choice: &str, at: i64) -> Vote {
    Vote {
        vote_id: vote_id.into(),
        poll_id: poll.into(),
        voter_key: voter_key.into(),
        choice: vec![choice.into()],
        value: None,
        segment: Segment::default(),
        received_at: at,
    }
}

async fn read_all(log: &dyn VoteLog, partition: u16, after: u64, expected: usize) -> Vec<LogEntry> {
    let mut reader = log.reader(partition, after).await.expect("open a reader");
    let mut entries = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while entries.len() < expected && tokio::time::Instant::now() < deadline {
        let batch = reader
            .next_batch(1000, Duration::from_millis(500))
            .await
            .expect("read a batch");
        entries.extend(batch);
    }
    // Nothing beyond what is expected may show up.
    let extra = reader
        .next_batch(1000, Duration::from_millis(300))
        .await
        .expect("read a batch");
    entries.extend(extra);
    entries
}

/// Durable appends, one entry per uniqueness key, idempotent vote ids, ordered resumable reads.
pub async fn vote_log(log: Arc<dyn VoteLog>) {
    let poll = "conf-log";
    let first = vote(poll, "v-1", "k1", "a", 1_000);
    let key = first.unique_key(Dedupe::PerVoter);
    let Ok(Appended::Accepted {
        seq: seq1,
        duplicate: false,
    }) = log.append(&first, &key).await
    else {
        panic!("a first vote must be accepted as new");
    };
    let again = log.append(&first, &key).await.expect("append a retry");
    assert_eq!(
        again,
        Appended::Accepted {
            seq: seq1,
            duplicate: true
        },
        "a retry with the same vote_id returns the original"
    );
    let other = vote(poll, "v-2", "k1", "b", 1_001);
    assert_eq!(
        log.append(&other, &key).await.expect("append"),
        Appended::AlreadyVoted,
        "second vote of a voter is refused"
    );

    // `dedupe: none`: every vote id is its own key; concurrent appends all land.
    let votes: Vec<Vote> = (0..200)
        .map(|i| vote(poll, &format!("n-{i}"), "", "a", 2_000 + i))
        .collect();
    let appends = votes.iter().map(|v| {
        let log = log.clone();
        let key = v.unique_key(Dedupe::None);
        let v = v.clone();
        async move { log.append(&v, &key).await }
    });
    let results = futures::future::join_all(appends).await;
    let mut seqs = Vec::new();
    for result in results {
        match result.expect("append") {
            Appended::Accepted {
                seq,
                duplicate: false,
            } => seqs.push(seq),
            other => panic!("concurrent distinct votes must all be accepted, got {other:?}"),
        }
    }
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 200, "every accepted vote has its own sequence");

    let partition = log.partition_of(poll);
    let entries = read_all(log.as_ref(), partition, 0, 201).await;
    assert_eq!(
        entries.len(),
        201,
        "the reader returns every accepted vote exactly once"
    );
    assert!(
        entries.windows(2).all(|w| w[0].seq < w[1].seq),
        "entries come in sequence order"
    );
    assert_eq!(entries[0].seq, seq1);
    assert_eq!(wire::decode(&entries[0].payload).expect("decode"), first);
    let mut read_ids: Vec<String> = entries[1..]
        .iter()
        .map(|e| wire::decode(&e.payload).expect("decode").vote_id)
        .collect();
    read_ids.sort();
    let mut sent_ids: Vec<String> = votes.iter().map(|v| v.vote_id.clone()).collect();
    sent_ids.sort();
    assert_eq!(read_ids, sent_ids);

    // Resuming after a position skips everything up to it.
    let resume_after = entries[100].seq;
    let rest = read_all(log.as_ref(), partition, resume_after, 100).await;
    assert_eq!(
        rest.len(),
        100,
        "a reader opened after a sequence starts right after it"
    );
    assert_eq!(rest[0].seq, entries[101].seq);
    let mut reader = log.reader(partition, 0).await.expect("reader");
    let batch = reader
        .next_batch(10, Duration::from_secs(5))
        .await
        .expect("batch");
    assert!(
        !batch.is_empty() && batch.len() <= 10,
        "batches respect their maximum"
    );
    reader
        .commit(batch.last().expect("entry").seq)
        .await
        .expect("commit");
    log.check().await.expect("a reachable log checks ok");

    // Many at once: each vote on its own terms, the answers in order. More votes than one
    // reply subscription of the JetStream log takes, so its parts are covered too.
    assert!(log.append_many(&[]).await.is_empty());
    let many_poll = "conf-log-many";
    let mut many: Vec<(Vote, String)> = (0..4_500)
        .map(|i| {
            let v = vote(
                many_poll,
                &format!("m-{i}"),
                &format!("mk{i}"),
                "a",
                3_000 + i,
            );
            let key = v.unique_key(Dedupe::PerVoter);
            (v, key)
        })
        .collect();
    many.push((first.clone(), key.clone()));
    many.push((other.clone(), key.clone()));
    many.push(many[0].clone());
    let answers = log.append_many(&many).await;
    assert_eq!(answers.len(), many.len(), "one answer per vote");
    let answers: Vec<Appended> = answers
        .into_iter()
        .map(|a| a.expect("append many"))
        .collect();
    assert_eq!(
        answers[4_500],
        Appended::Accepted {
            seq: seq1,
            duplicate: true
        },
        "a retry among many returns the original"
    );
    assert_eq!(
        answers[4_501],
        Appended::AlreadyVoted,
        "a voter's second vote among many is refused"
    );
    let twice = [answers[0], answers[4_502]];
    let Some(Appended::Accepted { seq: twice_seq, .. }) = twice
        .iter()
        .find(|a| {
            matches!(
                a,
                Appended::Accepted {
                    duplicate: false,
                    ..
                }
            )
        })
        .copied()
    else {
        panic!("a vote sent twice in one call is stored once: {twice:?}");
    };
    assert!(
        twice.contains(&Appended::Accepted {
            seq: twice_seq,
            duplicate: true
        }),
        "the same vote twice in one call: one new, one duplicate of it, got {twice:?}"
    );
    let mut new_seqs: Vec<u64> = answers[1..4_500]
        .iter()
        .map(|a| match a {
            Appended::Accepted {
                seq,
                duplicate: false,
            } => *seq,
            other => panic!("distinct new votes among many must be accepted, got {other:?}"),
        })
        .chain([twice_seq])
        .collect();
    new_seqs.sort_unstable();
    new_seqs.dedup();
    assert_eq!(new_seqs.len(), 4_500, "each new vote has its own sequence");
    let many_partition = log.partition_of(many_poll);
    let after = if many_partition == partition {
        entries.last().expect("entries").seq
    } else {
        0
    };
    let stored = read_all(log.as_ref(), many_partition, after, 4_500).await;
    let mut stored_ids: Vec<String> = stored
        .iter()
        .map(|e| wire::decode(&e.payload).expect("decode").vote_id)
        .collect();
    stored_ids.sort();
    let mut sent_ids: Vec<String> = many[..4_500]
        .iter()
        .map(|(v, _)| v.vote_id.clone())
        .collect();
    sent_ids.sort();
    assert_eq!(stored_ids, sent_ids, "the log holds each new vote once");
}

fn sample_poll(id: &str) -> Poll {
    let new: NewPoll = serde_json::from_value(serde_json::json!({
        "id": id, "title": "T", "question": "Q?", "kind": "single",
        "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]
    }))
    .expect("sample poll");
    new.into_poll(tally_core::time::now_ms(), || unreachable!())
        .expect("valid poll")
}

/// Create-once, conditional updates, ordered pagination, and a watch that starts with the
/// current state.
pub async fn poll_registry(registry: Arc<dyn PollRegistry>) {
    let created = registry
        .create(&sample_poll("conf-a"))
        .await
        .expect("create");
    assert!(created.version > 0, "a stored poll has a version");
    assert!(
        matches!(
            registry.create(&sample_poll("conf-a")).await,
            Err(Error::AlreadyExists(_))
        ),
        "ids are unique"
    );
    let fetched = registry.get("conf-a").await.expect("get").expect("found");
    assert_eq!(fetched, created);
    assert_eq!(registry.get("conf-missing").await.expect("get"), None);

    let mut edited = fetched.clone();
    edited.title = "New title".into();
    let updated = registry.update(&edited).await.expect("update");
    assert!(updated.version > created.version, "versions grow");
    assert!(
        matches!(registry.update(&edited).await, Err(Error::Conflict(_))),
        "a stale version is refused"
    );
    assert_eq!(
        registry
            .get("conf-a")
            .await
            .expect("get")
            .expect("found")
            .title,
        "New title"
    );

    for id in ["conf-b", "conf-c", "conf-d"] {
        registry.create(&sample_poll(id)).await.expect("create");
    }
    let page: Vec<String> = registry
        .list(None, 2)
        .await
        .expect("list")
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(page, vec!["conf-a", "conf-b"]);
    let page: Vec<String> = registry
        .list(Some("conf-b"), 10)
        .await
        .expect("list")
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(page, vec!["conf-c", "conf-d"]);

    let mut watch = registry.watch().await.expect("watch");
    let mut seen = BTreeMap::new();
    while seen.len() < 4 {
        let change = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("watch delivers current polls");
        if let Some(Ok(PollChange::Put(poll))) = change {
            seen.insert(poll.id.clone(), poll);
        }
    }
    assert_eq!(
        seen["conf-a"].title, "New title",
        "the watch starts with current versions"
    );
    let mut closing = registry.get("conf-b").await.expect("get").expect("found");
    closing.closed_at = Some(1);
    registry.update(&closing).await.expect("update");
    loop {
        let change = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("watch delivers changes");
        if let Some(Ok(PollChange::Put(poll))) = change {
            if poll.id == "conf-b" && poll.closed_at.is_some() {
                break;
            }
        }
    }
    registry.check().await.expect("check");
}

/// Idempotent migrations, per-table watermarks, exact tallies and breakdowns, summed windows.
pub async fn warehouse(warehouse: Arc<dyn Warehouse>) {
    warehouse.migrate().await.expect("migrate");
    assert!(
        warehouse.migrate().await.expect("migrate again").is_empty(),
        "migrations apply once"
    );
    assert_eq!(
        warehouse.watermarks(0).await.expect("watermarks"),
        Watermarks::default()
    );

    let mut votes = Vec::new();
    for i in 0..30u64 {
        let mut v = vote(
            "conf-wh",
            &format!("w-{i}"),
            &format!("k{}", i % 20),
            if i % 3 == 0 { "a" } else { "b" },
            1_700_000_000_000 + i as i64 * 10_000,
        );
        v.segment.country = if i % 2 == 0 { "DE".into() } else { "FR".into() };
        v.segment.custom.insert(
            "plan".into(),
            if i < 10 { "pro".into() } else { "free".into() },
        );
        votes.push(StoredVote {
            seq: 10 + i,
            vote: v,
        });
    }
    warehouse
        .insert_votes(0, &votes[..20])
        .await
        .expect("insert");
    warehouse
        .insert_votes(0, &votes[20..])
        .await
        .expect("insert");
    let other_partition = StoredVote {
        seq: 99,
        vote: vote("conf-other", "o-1", "x", "a", 1_700_000_000_000),
    };
    warehouse
        .insert_votes(1, &[other_partition])
        .await
        .expect("insert");
    assert_eq!(
        warehouse.watermarks(0).await.expect("watermarks"),
        Watermarks {
            votes: 39,
            windows: 0,
            rollups: 0,
            settled: 0
        }
    );
    assert_eq!(
        warehouse.watermarks(1).await.expect("watermarks").votes,
        99,
        "watermarks are per partition"
    );

    let tally = warehouse.tally("conf-wh").await.expect("tally");
    let expected = Tally {
        ballots: 30,
        unique_voters: 20,
        counts: [("a".to_owned(), 10), ("b".to_owned(), 20)].into(),
        as_of: 39,
    };
    assert_eq!(tally, expected);
    assert_eq!(
        warehouse.tally("conf-none").await.expect("tally"),
        Tally::default()
    );
    let mut keys = warehouse.voter_keys("conf-wh").await.expect("voter keys");
    keys.sort();
    assert_eq!(keys.len(), 20);

    // Breakdowns read the rollups: none yet, so nothing to show.
    let by_country = |from_ms: Option<i64>, to_ms: Option<i64>| BreakdownQuery {
        poll_id: "conf-wh".into(),
        by: vec![Dimension("country".into())],
        filters: vec![],
        from_ms,
        to_ms,
    };
    let empty = warehouse
        .breakdown(&by_country(None, None))
        .await
        .expect("breakdown");
    assert_eq!((empty.groups.len(), empty.as_of), (0, 0));
    // A fresh write, the same votes settled, then a second fresh write.
    let mut rollups = Rollups::default();
    for stored in &votes[..20] {
        rollups.add(&stored.vote, 29);
    }
    warehouse
        .insert_rollups(0, RollupLevel::Fresh, &rollups.rows())
        .await
        .expect("insert rollups");
    let first_part = || by_country(None, Some(1_700_000_235_000));
    let first = warehouse.breakdown(&first_part()).await.expect("breakdown");
    assert_eq!(first.as_of, 29, "exact as of the rollups");
    assert_eq!(
        first.groups.iter().map(|g| g.ballots).sum::<u64>(),
        20,
        "raw votes of a cut bucket count up to the rollups' position only"
    );
    warehouse
        .insert_rollups(0, RollupLevel::Settled, &rollups.rows())
        .await
        .expect("insert settled rollups");
    let settled = warehouse.breakdown(&first_part()).await.expect("breakdown");
    assert_eq!(
        settled, first,
        "settled rows replace the fresh rows they cover, not add to them"
    );
    rollups.clear();
    for stored in &votes[20..] {
        rollups.add(&stored.vote, 39);
    }
    warehouse
        .insert_rollups(0, RollupLevel::Fresh, &rollups.rows())
        .await
        .expect("insert rollups");
    let marks = warehouse.watermarks(0).await.expect("watermarks");
    assert_eq!((marks.rollups, marks.settled), (39, 29));

    // Votes are 10 s apart from a time 20 s into a minute: minute buckets start at +40 s,
    // +100 s, ...
    for (from, to, ballots, what) in [
        (None, None, 30, "all buckets"),
        (
            Some(0),
            Some(300_000),
            30,
            "the whole range, cut buckets at both ends",
        ),
        (Some(5_000), Some(25_000), 2, "inside one bucket"),
        (Some(5_000), Some(300_000), 29, "whole buckets and cut ones"),
        (Some(40_000), Some(160_000), 12, "whole buckets only"),
        (Some(40_000), Some(40_000), 0, "an empty range"),
    ] {
        let t0 = 1_700_000_000_000;
        let breakdown = warehouse
            .breakdown(&by_country(from.map(|f| t0 + f), to.map(|t| t0 + t)))
            .await
            .expect("breakdown");
        assert_eq!(breakdown.as_of, 39);
        assert_eq!(
            breakdown.groups.iter().map(|g| g.ballots).sum::<u64>(),
            ballots,
            "{what}"
        );
        let answers: u64 = breakdown
            .groups
            .iter()
            .flat_map(|g| g.counts.values())
            .sum();
        assert_eq!(answers, ballots, "{what}: one answer per ballot");
    }

    let breakdown = warehouse
        .breakdown(&BreakdownQuery {
            poll_id: "conf-wh".into(),
            by: vec![Dimension("country".into()), Dimension("plan".into())],
            filters: vec![(Dimension("plan".into()), vec!["pro".into(), "free".into()])],
            from_ms: Some(1_700_000_000_000),
            to_ms: Some(1_700_000_300_000),
        })
        .await
        .expect("breakdown");
    assert_eq!(breakdown.as_of, 39);
    let total: u64 = breakdown.groups.iter().map(|g| g.ballots).sum();
    assert_eq!(total, 30);
    let de_pro = breakdown
        .groups
        .iter()
        .find(|g| g.values == ["DE", "pro"])
        .expect("DE/pro group");
    assert_eq!(de_pro.ballots, 5);
    assert_eq!(de_pro.counts.values().sum::<u64>(), 5);
    assert!(
        breakdown
            .groups
            .windows(2)
            .all(|w| w[0].ballots >= w[1].ballots),
        "largest groups first"
    );
    let filtered = warehouse
        .breakdown(&BreakdownQuery {
            poll_id: "conf-wh".into(),
            by: vec![Dimension("country".into())],
            filters: vec![(Dimension("country".into()), vec!["DE".into()])],
            from_ms: Some(1_700_000_100_000),
            to_ms: None,
        })
        .await
        .expect("breakdown");
    assert_eq!(filtered.groups.len(), 1);
    assert_eq!(
        filtered.groups[0].ballots, 10,
        "filters and time range apply"
    );

    let rows = vec![
        WindowRow {
            poll_id: "conf-wh".into(),
            window_start: 1_700_000_000,
            window_seconds: 10,
            option: "a".into(),
            votes: 2,
            last_seq: 20,
        },
        WindowRow {
            poll_id: "conf-wh".into(),
            window_start: 1_700_000_010,
            window_seconds: 10,
            option: "b".into(),
            votes: 3,
            last_seq: 20,
        },
    ];
    warehouse
        .insert_windows(0, &rows)
        .await
        .expect("insert windows");
    let more = vec![WindowRow {
        poll_id: "conf-wh".into(),
        window_start: 1_700_000_000,
        window_seconds: 10,
        option: "a".into(),
        votes: 5,
        last_seq: 30,
    }];
    warehouse
        .insert_windows(0, &more)
        .await
        .expect("insert windows");
    assert_eq!(
        warehouse.watermarks(0).await.expect("watermarks").windows,
        30
    );
    let series = warehouse
        .timeseries(&TimeseriesQuery {
            poll_id: "conf-wh".into(),
            step_seconds: 60,
            from_ms: None,
            to_ms: None,
        })
        .await
        .expect("timeseries");
    let sums: BTreeMap<String, u64> =
        series
            .iter()
            .flat_map(|p| p.counts.clone())
            .fold(BTreeMap::new(), |mut acc, (k, v)| {
                *acc.entry(k).or_default() += v;
                acc
            });
    assert_eq!(
        sums,
        [("a".to_owned(), 7), ("b".to_owned(), 3)].into(),
        "partial window rows add up"
    );
    assert!(
        series.iter().all(|p| p.t % 60 == 0),
        "points are aligned to the step"
    );
    warehouse.check().await.expect("check");
}

/// Published totals reach subscribers.
pub async fn live_feed(feed: Arc<dyn LiveFeed>) {
    let mut subscription = feed.subscribe().await.expect("subscribe");
    let poll = sample_poll("conf-live");
    let tally = Tally {
        ballots: 1,
        unique_voters: 1,
        counts: [("a".to_owned(), 1)].into(),
        as_of: 5,
    };
    let results = tally_core::results::Results::new(&poll, &tally, 0);
    feed.publish(&results).await.expect("publish");
    let received = tokio::time::timeout(Duration::from_secs(5), subscription.next())
        .await
        .expect("delivered in time")
        .expect("stream open");
    assert_eq!(received, results);
}
