//! The [`VoteLog`] guarantees: durable appends, one entry per uniqueness key, idempotent vote
//! ids, ordered resumable reads, and many appends answered each on its own terms.

use std::sync::Arc;
use std::time::Duration;

use tally_core::poll::Dedupe;
use tally_core::ports::{spread_key, spread_partitions, Appended, LogEntry, VoteLog};
use tally_core::vote::Vote;
use tally_core::wire;

use crate::vote;

/// One `#[tokio::test]` per guarantee of this module, in a module named `$suite`, each on a
/// fresh log from `$factory` (see the crate documentation):
/// `vote_log_suite!(embedded_vote_log, { … (Arc::new(log), guard) });`
#[macro_export]
macro_rules! vote_log_suite {
    ($suite:ident, $factory:block) => {
        $crate::__suite!(
            $suite,
            $factory,
            vote_log {
                a_first_vote_is_accepted_as_new,
                retry_returns_the_original,
                second_vote_of_a_voter_is_refused,
                concurrent_distinct_votes_all_land,
                the_reader_returns_every_vote_once,
                entries_come_in_sequence_order,
                reads_resume_after_a_position,
                batches_respect_their_maximum,
                a_reachable_log_checks_ok,
                append_many_of_nothing_answers_nothing,
                append_many_answers_each_vote_on_its_own_terms,
                a_vote_sent_twice_in_one_call_is_stored_once,
                append_many_gives_each_new_vote_its_own_sequence,
                append_many_stores_each_new_vote_once,
                find_answers_as_append_would_and_appends_nothing,
                a_spread_polls_votes_are_kept_once_per_voter_on_its_partitions,
            }
        );
    };
}

pub(crate) const POLL: &str = "conf-log";
/// Votes of `dedupe: none` appended concurrently, all to [`POLL`].
const CONCURRENT: usize = 200;
const MANY_POLL: &str = "conf-log-many";
/// More votes than one reply subscription of the JetStream log takes, so its parts are
/// covered too.
const MANY: usize = 4_500;

/// A voter's first vote and its uniqueness key.
pub(crate) fn first_vote() -> (Vote, String) {
    let first = vote(POLL, "v-1", "k1", "a", 1_000);
    let key = first.unique_key(Dedupe::PerVoter);
    (first, key)
}

/// Another vote of the voter of [`first_vote`]: the same uniqueness key.
pub(crate) fn second_vote() -> Vote {
    vote(POLL, "v-2", "k1", "b", 1_001)
}

/// Votes of `dedupe: none`: every vote id is its own key.
fn open_votes() -> Vec<Vote> {
    (0..CONCURRENT as i64)
        .map(|i| vote(POLL, &format!("n-{i}"), "", "a", 2_000 + i))
        .collect()
}

/// Appends a vote that must be new; returns its sequence.
pub(crate) async fn append_first(log: &dyn VoteLog, first: &Vote, key: &str) -> u64 {
    let Ok(Appended::Accepted {
        seq,
        duplicate: false,
    }) = log.append(first, key).await
    else {
        panic!("a first vote must be accepted as new");
    };
    seq
}

/// Appends [`open_votes`] all at once; every one must be new. Returns their sequences.
async fn append_concurrently(log: &Arc<dyn VoteLog>, votes: &[Vote]) -> Vec<u64> {
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
    seqs
}

/// Reads a partition after `after` until `expected` entries came (or 20 s passed), then
/// waits a little more: nothing beyond what is expected may show up.
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
    let extra = reader
        .next_batch(1000, Duration::from_millis(300))
        .await
        .expect("read a batch");
    entries.extend(extra);
    entries
}

/// A log holding a first vote and [`CONCURRENT`] open votes of [`POLL`], as read back.
struct Filled {
    first: Vote,
    seq1: u64,
    votes: Vec<Vote>,
    entries: Vec<LogEntry>,
}

async fn filled(log: &Arc<dyn VoteLog>) -> Filled {
    let (first, key) = first_vote();
    let seq1 = append_first(log.as_ref(), &first, &key).await;
    let votes = open_votes();
    append_concurrently(log, &votes).await;
    let entries = read_all(log.as_ref(), log.partition_of(POLL), 0, 1 + CONCURRENT).await;
    Filled {
        first,
        seq1,
        votes,
        entries,
    }
}

/// `append_many` of [`MANY`] new votes of [`MANY_POLL`], then a retry of the first vote, the
/// voter's second vote and the first of the new votes again, after the first vote was
/// appended alone.
struct ManyAppended {
    seq1: u64,
    many: Vec<(Vote, String)>,
    answers: Vec<Appended>,
}

async fn many_appended(log: &dyn VoteLog) -> ManyAppended {
    let (first, key) = first_vote();
    let seq1 = append_first(log, &first, &key).await;
    let mut many: Vec<(Vote, String)> = (0..MANY as i64)
        .map(|i| {
            let v = vote(
                MANY_POLL,
                &format!("m-{i}"),
                &format!("mk{i}"),
                "a",
                3_000 + i,
            );
            let key = v.unique_key(Dedupe::PerVoter);
            (v, key)
        })
        .collect();
    many.push((first, key.clone()));
    many.push((second_vote(), key));
    many.push(many[0].clone());
    let answers = log.append_many(&many).await;
    assert_eq!(answers.len(), many.len(), "one answer per vote");
    let answers = answers
        .into_iter()
        .map(|a| a.expect("append many"))
        .collect();
    ManyAppended {
        seq1,
        many,
        answers,
    }
}

/// The two answers of the vote sent twice in one call: one new, one duplicate of it.
fn sent_twice(answers: &[Appended]) -> [Appended; 2] {
    [answers[0], answers[MANY + 2]]
}

/// The sequence of the vote sent twice in one call: the answer that says it is new.
fn twice_seq(answers: &[Appended]) -> u64 {
    let twice = sent_twice(answers);
    let Some(Appended::Accepted { seq, .. }) = twice.iter().find(|a| {
        matches!(
            a,
            Appended::Accepted {
                duplicate: false,
                ..
            }
        )
    }) else {
        panic!("a vote sent twice in one call is stored once: {twice:?}");
    };
    *seq
}

pub async fn a_first_vote_is_accepted_as_new(log: Arc<dyn VoteLog>) {
    let (first, key) = first_vote();
    append_first(log.as_ref(), &first, &key).await;
}

pub async fn retry_returns_the_original(log: Arc<dyn VoteLog>) {
    let (first, key) = first_vote();
    let seq1 = append_first(log.as_ref(), &first, &key).await;
    let again = log.append(&first, &key).await.expect("append a retry");
    assert_eq!(
        again,
        Appended::Accepted {
            seq: seq1,
            duplicate: true
        },
        "a retry with the same vote_id returns the original"
    );
}

pub async fn second_vote_of_a_voter_is_refused(log: Arc<dyn VoteLog>) {
    let (first, key) = first_vote();
    append_first(log.as_ref(), &first, &key).await;
    assert_eq!(
        log.append(&second_vote(), &key).await.expect("append"),
        Appended::AlreadyVoted,
        "second vote of a voter is refused"
    );
}

/// `dedupe: none`: every vote id is its own key; concurrent appends all land.
pub async fn concurrent_distinct_votes_all_land(log: Arc<dyn VoteLog>) {
    let mut seqs = append_concurrently(&log, &open_votes()).await;
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(
        seqs.len(),
        CONCURRENT,
        "every accepted vote has its own sequence"
    );
}

pub async fn the_reader_returns_every_vote_once(log: Arc<dyn VoteLog>) {
    let Filled {
        first,
        seq1,
        votes,
        entries,
    } = filled(&log).await;
    assert_eq!(
        entries.len(),
        1 + CONCURRENT,
        "the reader returns every accepted vote exactly once"
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
}

pub async fn entries_come_in_sequence_order(log: Arc<dyn VoteLog>) {
    let Filled { entries, .. } = filled(&log).await;
    assert!(
        entries.windows(2).all(|w| w[0].seq < w[1].seq),
        "entries come in sequence order"
    );
}

/// Resuming after a position skips everything up to it.
pub async fn reads_resume_after_a_position(log: Arc<dyn VoteLog>) {
    let Filled { entries, .. } = filled(&log).await;
    let resume_after = entries[100].seq;
    let rest = read_all(log.as_ref(), log.partition_of(POLL), resume_after, 100).await;
    assert_eq!(
        rest.len(),
        100,
        "a reader opened after a sequence starts right after it"
    );
    assert_eq!(rest[0].seq, entries[101].seq);
}

/// A reader hands out at most the batch size asked for, and takes a commit of what it
/// handed out.
pub async fn batches_respect_their_maximum(log: Arc<dyn VoteLog>) {
    append_concurrently(&log, &open_votes()).await;
    let mut reader = log.reader(log.partition_of(POLL), 0).await.expect("reader");
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
}

pub async fn a_reachable_log_checks_ok(log: Arc<dyn VoteLog>) {
    log.check().await.expect("a reachable log checks ok");
}

pub async fn append_many_of_nothing_answers_nothing(log: Arc<dyn VoteLog>) {
    assert!(
        log.append_many(&[]).await.is_empty(),
        "no votes, no answers"
    );
}

/// Many at once: each vote on its own terms, the answers in order.
pub async fn append_many_answers_each_vote_on_its_own_terms(log: Arc<dyn VoteLog>) {
    let ManyAppended { seq1, answers, .. } = many_appended(log.as_ref()).await;
    assert_eq!(
        answers[MANY],
        Appended::Accepted {
            seq: seq1,
            duplicate: true
        },
        "a retry among many returns the original"
    );
    assert_eq!(
        answers[MANY + 1],
        Appended::AlreadyVoted,
        "a voter's second vote among many is refused"
    );
    for answer in &answers[1..MANY] {
        assert!(
            matches!(
                answer,
                Appended::Accepted {
                    duplicate: false,
                    ..
                }
            ),
            "distinct new votes among many must be accepted, got {answer:?}"
        );
    }
}

pub async fn a_vote_sent_twice_in_one_call_is_stored_once(log: Arc<dyn VoteLog>) {
    let ManyAppended { answers, .. } = many_appended(log.as_ref()).await;
    let twice_seq = twice_seq(&answers);
    let twice = sent_twice(&answers);
    assert!(
        twice.contains(&Appended::Accepted {
            seq: twice_seq,
            duplicate: true
        }),
        "the same vote twice in one call: one new, one duplicate of it, got {twice:?}"
    );
}

pub async fn append_many_gives_each_new_vote_its_own_sequence(log: Arc<dyn VoteLog>) {
    let ManyAppended { answers, .. } = many_appended(log.as_ref()).await;
    let mut new_seqs: Vec<u64> = answers[1..MANY]
        .iter()
        .map(|a| match a {
            Appended::Accepted {
                seq,
                duplicate: false,
            } => *seq,
            other => panic!("distinct new votes among many must be accepted, got {other:?}"),
        })
        .chain([twice_seq(&answers)])
        .collect();
    new_seqs.sort_unstable();
    new_seqs.dedup();
    assert_eq!(new_seqs.len(), MANY, "each new vote has its own sequence");
}

pub async fn append_many_stores_each_new_vote_once(log: Arc<dyn VoteLog>) {
    let ManyAppended { seq1, many, .. } = many_appended(log.as_ref()).await;
    // The first vote was appended before the many: when both polls share a partition, the
    // many come after it.
    let many_partition = log.partition_of(MANY_POLL);
    let after = if many_partition == log.partition_of(POLL) {
        seq1
    } else {
        0
    };
    let stored = read_all(log.as_ref(), many_partition, after, MANY).await;
    let mut stored_ids: Vec<String> = stored
        .iter()
        .map(|e| wire::decode(&e.payload).expect("decode").vote_id)
        .collect();
    stored_ids.sort();
    let mut sent_ids: Vec<String> = many[..MANY]
        .iter()
        .map(|(v, _)| v.vote_id.clone())
        .collect();
    sent_ids.sort();
    assert_eq!(stored_ids, sent_ids, "the log holds each new vote once");
}

pub async fn find_answers_as_append_would_and_appends_nothing(log: Arc<dyn VoteLog>) {
    let (first, key) = first_vote();
    assert_eq!(
        log.find(&first, &key).await.expect("find"),
        None,
        "a free key holds nothing"
    );
    let seq = append_first(log.as_ref(), &first, &key).await;
    assert_eq!(
        log.find(&first, &key).await.expect("find"),
        Some(Appended::Accepted {
            seq,
            duplicate: true
        }),
        "a retry of the stored vote finds the original"
    );
    let second = second_vote();
    assert_eq!(
        log.find(&second, &key).await.expect("find"),
        Some(Appended::AlreadyVoted),
        "another vote of the voter finds the voter has voted"
    );
    let mut changed = first.clone();
    changed.choice = vec!["b".into()];
    assert_eq!(
        log.find(&changed, &key).await.expect("find"),
        Some(Appended::VoteIdConflict),
        "the same vote id with another ballot is a conflict"
    );
    // Finding appended nothing: the partition holds the first vote only.
    let stored = read_all(log.as_ref(), log.partition_of(POLL), 0, 1).await;
    assert_eq!(stored.len(), 1, "find appends nothing");
}

/// A poll spread over four partitions: each voter's votes go to one of its partitions (all
/// of them used when the log has as many), where the second vote is refused and a retry
/// finds the first, and each partition's reader sees exactly the votes placed on it.
pub async fn a_spread_polls_votes_are_kept_once_per_voter_on_its_partitions(log: Arc<dyn VoteLog>) {
    const SPREAD_POLL: &str = "conf-log-spread";
    const VOTERS: usize = 40;
    let partitions = spread_partitions(SPREAD_POLL, 4, log.partitions());
    let mut placed: std::collections::BTreeMap<u16, Vec<String>> = Default::default();
    for i in 0..VOTERS {
        let first = vote(SPREAD_POLL, &format!("s-{i}"), &format!("k{i}"), "a", 1_000);
        let key = spread_key(4, &first.unique_key(Dedupe::PerVoter));
        let at = log.placement(SPREAD_POLL, &key);
        assert!(partitions.contains(&at), "{key} placed on {at}");
        let answer = log.append(&first, &key).await.expect("append");
        assert!(
            matches!(
                answer,
                Appended::Accepted {
                    duplicate: false,
                    ..
                }
            ),
            "{answer:?}"
        );
        let second = vote(
            SPREAD_POLL,
            &format!("s2-{i}"),
            &format!("k{i}"),
            "b",
            2_000,
        );
        let answer = log.append(&second, &key).await.expect("append");
        assert_eq!(answer, Appended::AlreadyVoted, "the voter's second vote");
        let found = log.find(&first, &key).await.expect("find");
        assert!(
            matches!(
                found,
                Some(Appended::Accepted {
                    duplicate: true,
                    ..
                })
            ),
            "{found:?}"
        );
        placed.entry(at).or_default().push(first.vote_id.clone());
    }
    assert_eq!(
        placed.len(),
        partitions.len(),
        "every partition of the spread takes votes: {placed:?}"
    );
    for partition in 0..log.partitions() {
        let want = placed.get(&partition).cloned().unwrap_or_default();
        let entries = read_all(log.as_ref(), partition, 0, want.len()).await;
        let mut got: Vec<String> = entries
            .iter()
            .map(|entry| wire::decode(&entry.payload).expect("decode").vote_id)
            .collect();
        got.sort_unstable();
        let mut want = want;
        want.sort_unstable();
        assert_eq!(got, want, "partition {partition}");
    }
}
