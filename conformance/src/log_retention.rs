//! The [`LogRetention`](tally_core::ports::LogRetention) guarantees, for a vote log whose
//! entries cost a broker memory (see [`VoteLog::retention`]); a log that keeps every entry
//! has none to prove.

use std::sync::Arc;

use tally_core::poll::Dedupe;
use tally_core::ports::{Appended, VoteLog};

use crate::vote;
use crate::vote_log::{append_first, first_vote, second_vote, POLL};

/// One `#[tokio::test]` per guarantee of this module, in a module named `$suite`, each on a
/// fresh log from `$factory` (see the crate documentation).
#[macro_export]
macro_rules! log_retention_suite {
    ($suite:ident, $factory:block) => {
        $crate::__suite!(
            $suite,
            $factory,
            log_retention {
                a_purged_poll_leaves_the_log_up_to_its_bound,
            }
        );
    };
}

/// A finished poll leaves the log: its tip is its newest entry, a purge removes its
/// entries up to the bound and no other poll's, and the purged keys are free.
pub async fn a_purged_poll_leaves_the_log_up_to_its_bound(log: Arc<dyn VoteLog>) {
    let retention = log
        .retention()
        .expect("a log run by this suite lets finished polls go");
    const OTHER: &str = "conf-log-kept";
    let (at, other_at) = (log.partition_of(POLL), log.partition_of(OTHER));
    assert_eq!(
        retention.poll_tip(POLL, at).await.expect("tip"),
        None,
        "empty"
    );
    let (first, key) = first_vote();
    let seq1 = append_first(log.as_ref(), &first, &key).await;
    let kept = vote(OTHER, "o-1", "k1", "a", 1_000);
    let kept_key = kept.unique_key(Dedupe::PerVoter);
    let kept_seq = append_first(log.as_ref(), &kept, &kept_key).await;
    let late = vote(POLL, "v-3", "k3", "a", 1_002);
    let late_key = late.unique_key(Dedupe::PerVoter);
    let seq3 = append_first(log.as_ref(), &late, &late_key).await;
    assert_eq!(retention.poll_tip(POLL, at).await.expect("tip"), Some(seq3));
    assert_eq!(
        retention.poll_tip(OTHER, other_at).await.expect("tip"),
        Some(kept_seq)
    );

    // Up to the first vote only: the one after the bound stays.
    let purged = retention.purge_poll(POLL, at, seq1).await.expect("purge");
    assert_eq!(purged, 1, "one entry up to the bound");
    assert_eq!(log.find(&first, &key).await.expect("find"), None, "purged");
    assert!(
        log.find(&late, &late_key).await.expect("find").is_some(),
        "an entry after the bound stays"
    );
    assert_eq!(retention.poll_tip(POLL, at).await.expect("tip"), Some(seq3));
    let purged = retention.purge_poll(POLL, at, seq3).await.expect("purge");
    assert_eq!(purged, 1);
    assert_eq!(
        retention.poll_tip(POLL, at).await.expect("tip"),
        None,
        "all gone"
    );
    assert_eq!(
        retention.poll_tip(OTHER, other_at).await.expect("tip"),
        Some(kept_seq),
        "another poll keeps its entries"
    );
    assert!(log.find(&kept, &kept_key).await.expect("find").is_some());
    // The purged key is free again: why only a poll that takes no vote may be purged.
    let Ok(Appended::Accepted {
        duplicate: false, ..
    }) = log.append(&second_vote(), &key).await
    else {
        panic!("a purged key takes a vote again");
    };
}
