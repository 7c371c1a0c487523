//! The back-end conformance suites against the embedded implementations, plus what only an
//! embedded store has to prove: its state survives reopening the data directory.

use std::sync::Arc;
use std::time::Duration;

use tally_core::ports::{PollRegistry, StoredVote, VoteLog, Warehouse, Watermarks};
use tally_core::segment::Segment;
use tally_core::vote::Vote;
use tally_embedded::{Options, WarehouseOptions};

fn open(dir: &std::path::Path, partitions: u16) -> tally_embedded::Embedded {
    tally_embedded::open(
        dir,
        Options {
            partitions,
            ..Default::default()
        },
    )
    .expect("open the store")
}

tally_conformance::vote_log_suite!(embedded_vote_log, {
    let dir = tempfile::tempdir().unwrap();
    (open(dir.path(), 1).log, dir)
});

tally_conformance::vote_log_suite!(partitioned_embedded_vote_log, {
    let dir = tempfile::tempdir().unwrap();
    (open(dir.path(), 4).log, dir)
});

// Every other append makes the log merge its pending keys into its index: the suite must
// hold for keys on either side of a merge.
tally_conformance::vote_log_suite!(embedded_vote_log_merging_often, {
    let dir = tempfile::tempdir().unwrap();
    let store = tally_embedded::open(
        dir.path(),
        Options {
            partitions: 2,
            log_merge_at: 2,
            ..Default::default()
        },
    )
    .expect("open the store");
    (store.log, dir)
});

tally_conformance::poll_registry_suite!(embedded_registry, {
    let dir = tempfile::tempdir().unwrap();
    (open(dir.path(), 1).registry, dir)
});

tally_conformance::live_feed_suite!(local_live_feed, {
    let dir = tempfile::tempdir().unwrap();
    (open(dir.path(), 1).live, dir)
});

tally_conformance::warehouse_suite!(parquet_warehouse, {
    let dir = tempfile::tempdir().unwrap();
    (open(dir.path(), 1).warehouse, dir)
});

// Every insert flushed at once and merged after three files: the suite must hold when the
// data is spread over Parquet files as well as when it sits in memory.
tally_conformance::warehouse_suite!(parquet_warehouse_when_every_insert_is_a_file, {
    let dir = tempfile::tempdir().unwrap();
    let warehouse = tally_embedded::ParquetWarehouse::open(
        dir.path(),
        WarehouseOptions {
            flush_rows: 1,
            compact_at: 3,
            ..Default::default()
        },
    )
    .unwrap();
    (Arc::new(warehouse), dir)
});

fn vote(i: u64) -> Vote {
    Vote {
        vote_id: format!("v-{i}"),
        poll_id: "durable".into(),
        voter_key: format!("k{i}"),
        choice: vec![if i.is_multiple_of(2) { "a" } else { "b" }.into()],
        value: None,
        segment: Segment::default(),
        received_at: 1_700_000_000_000 + i as i64,
    }
}

/// Appends [`vote`]`(i)` for each `i`, one voter each.
async fn append_votes(store: &tally_embedded::Embedded, votes: std::ops::Range<u64>) {
    for i in votes {
        let v = vote(i);
        store
            .log
            .append(&v, &v.unique_key(tally_core::poll::Dedupe::PerVoter))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn the_log_and_registry_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), 2);
        append_votes(&store, 0..10).await;
        store
            .registry
            .create(&tally_conformance::sample_poll("durable-poll"))
            .await
            .unwrap();
    }
    // The file is closed when the store is dropped: it opens again at once.
    let store = open(dir.path(), 2);
    let v = vote(3);
    let again = store
        .log
        .append(&v, &v.unique_key(tally_core::poll::Dedupe::PerVoter))
        .await
        .unwrap();
    assert!(
        matches!(
            again,
            tally_core::ports::Appended::Accepted {
                duplicate: true,
                ..
            }
        ),
        "a retried vote resolves to its original entry after a restart, got {again:?}"
    );
    let partition = store.log.partition_of("durable");
    let mut reader = store.log.reader(partition, 0).await.unwrap();
    let entries = reader
        .next_batch(100, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(entries.len(), 10);
    let polls = tally_core::ports::PollRegistry::list(&*store.registry, None, 100)
        .await
        .unwrap();
    assert!(!polls.is_empty(), "polls survive");
    drop((store, reader));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = tally_embedded::open(
        dir.path(),
        Options {
            partitions: 3,
            ..Default::default()
        },
    );
    let message = refused
        .err()
        .map(|e| e.chain().to_string())
        .unwrap_or_default();
    assert!(
        message.contains("--partitions 2"),
        "a store keeps its partition count: {message}"
    );
}

/// The vote log writes uniqueness keys into its index in bulk; a key is never free again,
/// whether it was merged into the index, still pending when the store closed, or both
/// (some of each), and whatever the voter's partition.
#[tokio::test]
async fn keys_hold_across_index_merges_and_reopening() {
    use tally_core::poll::Dedupe;
    use tally_core::ports::Appended;
    let dir = tempfile::tempdir().unwrap();
    let open_merging = || {
        tally_embedded::open(
            dir.path(),
            Options {
                partitions: 2,
                // A merge begins at 8 pending keys and writes one after each commit.
                log_merge_at: 8,
                ..Default::default()
            },
        )
        .expect("open the store")
    };
    let taken = |answer: Appended| {
        matches!(
            answer,
            Appended::Accepted {
                duplicate: true,
                ..
            }
        )
    };
    let other_vote = |i: u64| Vote {
        vote_id: format!("other-{i}"),
        ..vote(i)
    };
    {
        let store = open_merging();
        // The 8th vote begins a merge: after the 10th, 3 of its keys are in the index and 5
        // wait for their turn, the 9th and 10th are pending; each is refused at once.
        append_votes(&store, 0..10).await;
        // Newest first: the merge writes keys in key order, one per commit.
        for i in (0..10).rev() {
            let v = vote(i);
            let again = store
                .log
                .append(&v, &v.unique_key(Dedupe::PerVoter))
                .await
                .unwrap();
            assert!(taken(again), "vote {i} again: {again:?}");
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let store = open_merging();
    for i in 0..10 {
        let v = vote(i);
        let key = v.unique_key(Dedupe::PerVoter);
        let found = store.log.find(&v, &key).await.unwrap();
        assert!(
            found.is_some_and(taken),
            "vote {i} found after reopening: {found:?}"
        );
        let again = store.log.append(&v, &key).await.unwrap();
        assert!(taken(again), "vote {i} again after reopening: {again:?}");
        let other = other_vote(i);
        let second = store.log.append(&other, &key).await.unwrap();
        assert_eq!(second, Appended::AlreadyVoted, "a second vote of voter {i}");
    }
    // New voters still count, and cross another merge.
    append_votes(&store, 10..30).await;
    let mut entries = 0;
    for partition in 0..2 {
        let mut reader = store.log.reader(partition, 0).await.unwrap();
        entries += reader
            .next_batch(100, Duration::from_millis(100))
            .await
            .unwrap()
            .len();
    }
    assert_eq!(entries, 30, "one entry per voter");
}

#[tokio::test]
async fn only_flushed_rows_survive_a_crash_and_the_watermark_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let rows = |from: u64, to: u64| -> Vec<StoredVote> {
        (from..to)
            .map(|i| StoredVote {
                seq: i,
                vote: vote(i),
            })
            .collect()
    };
    {
        let warehouse = tally_embedded::ParquetWarehouse::open(
            dir.path(),
            WarehouseOptions {
                flush_rows: 50,
                ..Default::default()
            },
        )
        .unwrap();
        warehouse.insert_votes(0, &rows(1, 61)).await.unwrap();
        warehouse.insert_votes(0, &rows(61, 71)).await.unwrap();
        assert_eq!(warehouse.watermarks(0).await.unwrap().votes, 70);
        assert_eq!(warehouse.tally("durable").await.unwrap().ballots, 70);
        // Dropped without flush_all: as after kill -9, the tail is gone.
    }
    let warehouse =
        tally_embedded::ParquetWarehouse::open(dir.path(), WarehouseOptions::default()).unwrap();
    assert_eq!(
        warehouse.watermarks(0).await.unwrap(),
        Watermarks {
            votes: 60,
            windows: 0,
            rollups: 0,
            settled: 0
        },
        "the watermark falls back to the last flushed file"
    );
    assert_eq!(warehouse.tally("durable").await.unwrap().ballots, 60);
    // The processor re-inserts the lost suffix: counted once.
    warehouse.insert_votes(0, &rows(61, 71)).await.unwrap();
    warehouse.flush_all().await.unwrap();
    drop(warehouse);
    let warehouse =
        tally_embedded::ParquetWarehouse::open(dir.path(), WarehouseOptions::default()).unwrap();
    let tally = warehouse.tally("durable").await.unwrap();
    assert_eq!((tally.ballots, tally.as_of), (70, 70));
}

#[tokio::test]
async fn a_merge_interrupted_before_deleting_its_inputs_counts_once() {
    let dir = tempfile::tempdir().unwrap();
    let votes_dir = dir.path().join("votes");
    let batch = |start: u64| -> Vec<StoredVote> {
        (start..start + 10)
            .map(|i| StoredVote {
                seq: i,
                vote: vote(i),
            })
            .collect()
    };
    let options = WarehouseOptions {
        flush_rows: 10,
        compact_at: 6,
        ..Default::default()
    };
    let kept = tempfile::tempdir().unwrap();
    {
        let warehouse =
            tally_embedded::ParquetWarehouse::open(dir.path(), options.clone()).unwrap();
        for start in (1..=41).step_by(10) {
            warehouse.insert_votes(0, &batch(start)).await.unwrap();
        }
        assert_eq!(warehouse.file_count(), 5, "one file per flush");
        // Keep a copy of an input, to put back as if a crash came before its deletion.
        let input = std::fs::read_dir(&votes_dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        std::fs::copy(input.path(), kept.path().join(input.file_name())).unwrap();
        // The sixth flush merges all six files into one.
        warehouse.insert_votes(0, &batch(51)).await.unwrap();
        assert_eq!(warehouse.file_count(), 1, "six small files merge into one");
        assert_eq!(warehouse.tally("durable").await.unwrap().ballots, 60);
    }
    assert_eq!(
        std::fs::read_dir(&votes_dir).unwrap().count(),
        1,
        "merged inputs are deleted"
    );
    for entry in std::fs::read_dir(kept.path()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), votes_dir.join(entry.file_name())).unwrap();
    }
    std::fs::write(
        votes_dir.join("p00000-00000000000000000061-00000000000000000070.parquet.tmp"),
        b"half a file",
    )
    .unwrap();
    let warehouse =
        tally_embedded::ParquetWarehouse::open(dir.path(), WarehouseOptions::default()).unwrap();
    let tally = warehouse.tally("durable").await.unwrap();
    assert_eq!(
        (tally.ballots, tally.as_of),
        (60, 60),
        "the leftover input is not counted again"
    );
    assert_eq!(warehouse.watermarks(0).await.unwrap().votes, 60);
    assert_eq!(
        std::fs::read_dir(&votes_dir).unwrap().count(),
        1,
        "leftovers are cleaned up"
    );
}

/// A flush that fails (disk full, directory gone) does not fail the insert that triggered
/// it — the rows are in the tail — so the processor never re-inserts them; a later flush
/// writes them once.
#[tokio::test]
async fn a_failed_flush_neither_loses_nor_repeats_rows() {
    let dir = tempfile::tempdir().unwrap();
    let votes_dir = dir.path().join("votes");
    let warehouse = tally_embedded::ParquetWarehouse::open(
        dir.path(),
        WarehouseOptions {
            flush_rows: 10,
            ..Default::default()
        },
    )
    .unwrap();
    std::fs::remove_dir_all(&votes_dir).unwrap();
    std::fs::write(&votes_dir, b"not a directory").unwrap();
    let rows: Vec<StoredVote> = (1..=20)
        .map(|i| StoredVote {
            seq: i,
            vote: vote(i),
        })
        .collect();
    warehouse
        .insert_votes(0, &rows)
        .await
        .expect("the insert succeeds even though its flush cannot");
    assert_eq!(warehouse.tally("durable").await.unwrap().ballots, 20);
    assert!(
        warehouse.flush_all().await.is_err(),
        "the flush itself reports the failure"
    );
    std::fs::remove_file(&votes_dir).unwrap();
    std::fs::create_dir(&votes_dir).unwrap();
    warehouse.flush_all().await.unwrap();
    drop(warehouse);
    let warehouse =
        tally_embedded::ParquetWarehouse::open(dir.path(), WarehouseOptions::default()).unwrap();
    let tally = warehouse.tally("durable").await.unwrap();
    assert_eq!((tally.ballots, tally.as_of), (20, 20));
}

/// Settled rollup files add up the rows of one segment and bucket: however many writes a
/// file covers, it holds one row per poll, bucket and segment, and breakdowns stay exact.
#[tokio::test]
async fn rollup_files_hold_one_row_per_segment_and_bucket() {
    use tally_core::analytics::{BreakdownQuery, Dimension};
    use tally_core::rollup::{RollupLevel, Rollups};

    let dir = tempfile::tempdir().unwrap();
    let warehouse = tally_embedded::ParquetWarehouse::open(
        dir.path(),
        WarehouseOptions {
            compact_at: 4,
            ..Default::default()
        },
    )
    .unwrap();
    // 12 flushes of 10 votes each, all in one minute and two countries.
    let mut seq = 0;
    // The rows of one write: two whole segments and the cube's.
    let mut per_write = 0;
    for flush in 0..12 {
        let mut rollups = Rollups::default();
        for _ in 0..10 {
            seq += 1;
            let mut v = vote(seq);
            v.segment.country = if seq % 2 == 0 { "DE" } else { "FR" }.into();
            rollups.add(&v, seq);
        }
        let rows = rollups.rows();
        assert_eq!(rows.iter().filter(|r| r.dims.is_empty()).count(), 2);
        per_write = rows.len();
        warehouse
            .insert_rollups(0, RollupLevel::Settled, &rollups.rows())
            .await
            .unwrap();
        if flush % 2 == 1 {
            warehouse.flush_all().await.unwrap();
        }
    }
    warehouse.flush_all().await.unwrap();
    let mut on_disk = 0;
    for entry in std::fs::read_dir(dir.path().join(RollupLevel::Settled.table())).unwrap() {
        let file = std::fs::File::open(entry.unwrap().path()).unwrap();
        on_disk += parquet::file::reader::SerializedFileReader::new(file)
            .map(|r| {
                use parquet::file::reader::FileReader;
                r.metadata().file_metadata().num_rows()
            })
            .unwrap();
    }
    // Six files of two flushes each; four of them merged into one: three files, each
    // holding the rows of one write.
    assert_eq!(
        on_disk,
        3 * per_write as i64,
        "each file holds one row per segment"
    );
    assert_eq!(warehouse.watermarks(0).await.unwrap().settled, 120);
    let breakdown = warehouse
        .breakdown(&BreakdownQuery {
            poll_id: "durable".into(),
            by: vec![Dimension("country".into())],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(breakdown.as_of, 120);
    let ballots: Vec<(String, u64)> = breakdown
        .groups
        .iter()
        .map(|g| (g.values[0].clone(), g.ballots))
        .collect();
    assert_eq!(ballots, [("DE".to_owned(), 60), ("FR".to_owned(), 60)]);
    let de = &breakdown.groups[0].counts;
    assert_eq!(de.values().sum::<u64>(), 60);
}

/// Dropping the store closes its file there and then, marked clean: opened again at once,
/// redb finds nothing to repair (a repair reads and checks every page of the file, which on a
/// store of millions of votes is a slow start).
#[tokio::test]
async fn a_dropped_store_is_closed_at_once_and_clean() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 2);
    append_votes(&store, 0..100).await;
    drop(store);
    let repaired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = repaired.clone();
    let reopened = redb::Database::builder()
        .set_repair_callback(move |_| seen.store(true, std::sync::atomic::Ordering::SeqCst))
        .create(dir.path().join("tally.redb"));
    assert!(
        reopened.is_ok(),
        "the file is free again: {:?}",
        reopened.err()
    );
    assert!(
        !repaired.load(std::sync::atomic::Ordering::SeqCst),
        "a store closed by dropping it needs no repair"
    );
}

/// A store written before the cube (rollup files of whole segments only, without the
/// `dims` column) is given its cube when it opens: breakdowns the cube answers count every
/// vote, and the files now hold the column.
#[tokio::test]
async fn rollup_files_written_before_the_cube_get_it_when_the_store_opens() {
    use arrow::array::{Array, StringArray};
    use tally_core::analytics::{BreakdownQuery, Dimension};
    use tally_core::rollup::{RollupLevel, Rollups};

    let dir = tempfile::tempdir().unwrap();
    let options = WarehouseOptions {
        flush_rows: 1,
        ..Default::default()
    };
    {
        let warehouse =
            tally_embedded::ParquetWarehouse::open(dir.path(), options.clone()).unwrap();
        let rows = |range: std::ops::Range<u64>, covered: u64| {
            let mut rollups = Rollups::default();
            for i in range {
                let mut v = vote(i);
                v.segment.country = if i % 2 == 0 { "DE" } else { "FR" }.into();
                if i % 3 != 0 {
                    v.segment
                        .custom
                        .insert("store".into(), format!("s{}", i % 4));
                }
                rollups.add(&v, covered);
            }
            rollups.rows()
        };
        for (level, range, covered) in [
            (RollupLevel::Fresh, 1..13, 12),
            (RollupLevel::Settled, 1..13, 12),
            (RollupLevel::Fresh, 13..25, 24),
        ] {
            warehouse
                .insert_rollups(0, level, &rows(range, covered))
                .await
                .unwrap();
        }
        warehouse.flush_all().await.unwrap();
    }
    // Rewrite every rollup file as an earlier version wrote it.
    let mut rewritten = 0;
    for level in RollupLevel::ALL {
        for entry in std::fs::read_dir(dir.path().join(level.table())).unwrap() {
            let path = entry.unwrap().path();
            let file = std::fs::File::open(&path).unwrap();
            let batches: Vec<arrow::array::RecordBatch> =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                    .unwrap()
                    .build()
                    .unwrap()
                    .map(|b| b.unwrap())
                    .collect();
            let dims = batches[0].schema().index_of("dims").unwrap();
            let old: Vec<arrow::array::RecordBatch> = batches
                .iter()
                .map(|batch| {
                    let column = batch
                        .column(dims)
                        .as_any()
                        .downcast_ref::<StringArray>()
                        .unwrap();
                    let whole: arrow::array::BooleanArray = (0..column.len())
                        .map(|i| Some(column.value(i).is_empty()))
                        .collect();
                    let batch = arrow::compute::filter_record_batch(batch, &whole).unwrap();
                    let keep: Vec<usize> =
                        (0..batch.num_columns()).filter(|c| *c != dims).collect();
                    batch.project(&keep).unwrap()
                })
                .collect();
            let out = std::fs::File::create(&path).unwrap();
            let mut writer =
                parquet::arrow::ArrowWriter::try_new(out, old[0].schema(), None).unwrap();
            for batch in &old {
                writer.write(batch).unwrap();
            }
            writer.close().unwrap();
            rewritten += 1;
        }
    }
    assert_eq!(rewritten, 3);
    let warehouse = tally_embedded::ParquetWarehouse::open(dir.path(), options).unwrap();
    let breakdown = |by: &str| {
        let warehouse = warehouse.clone();
        let by = by.to_owned();
        async move {
            let breakdown = warehouse
                .breakdown(&BreakdownQuery {
                    poll_id: "durable".into(),
                    by: vec![Dimension(by)],
                    ..Default::default()
                })
                .await
                .unwrap();
            assert_eq!(breakdown.as_of, 24);
            let mut groups: Vec<(String, u64)> = breakdown
                .groups
                .into_iter()
                .map(|g| (g.values[0].clone(), g.ballots))
                .collect();
            groups.sort();
            groups
        }
    };
    assert_eq!(
        breakdown("country").await,
        [("DE".to_owned(), 12), ("FR".to_owned(), 12)]
    );
    // 1..25: multiples of 3 have no store; the rest s0..s3 by i % 4.
    let stores = breakdown("store").await;
    let expected = |value: &str| {
        (1..25u64)
            .filter(|i| match value {
                "" => i % 3 == 0,
                store => i % 3 != 0 && format!("s{}", i % 4) == store,
            })
            .count() as u64
    };
    assert_eq!(stores.len(), 5, "{stores:?}");
    for (store, ballots) in &stores {
        assert_eq!(*ballots, expected(store), "{store}");
    }
    for level in RollupLevel::ALL {
        for entry in std::fs::read_dir(dir.path().join(level.table())).unwrap() {
            let file = std::fs::File::open(entry.unwrap().path()).unwrap();
            let builder =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                    .unwrap();
            assert!(builder.schema().column_with_name("dims").is_some());
        }
    }
}
