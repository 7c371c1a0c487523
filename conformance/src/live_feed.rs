//! The [`LiveFeed`] guarantee: published totals reach subscribers.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use tally_core::ports::LiveFeed;
use tally_core::results::{Results, Tally};

use crate::sample_poll;

/// One `#[tokio::test]` per guarantee of this module, in a module named `$suite`, each on a
/// fresh feed from `$factory` (see the crate documentation):
/// `live_feed_suite!(local_live_feed, { … (Arc::new(feed), guard) });`
#[macro_export]
macro_rules! live_feed_suite {
    ($suite:ident, $factory:block) => {
        $crate::__suite!(
            $suite,
            $factory,
            live_feed {
                published_totals_reach_subscribers,
            }
        );
    };
}

pub async fn published_totals_reach_subscribers(feed: Arc<dyn LiveFeed>) {
    let mut subscription = feed.subscribe().await.expect("subscribe");
    let poll = sample_poll("conf-live");
    let tally = Tally {
        ballots: 1,
        unique_voters: 1,
        counts: [("a".to_owned(), 1)].into(),
        as_of: 5,
    };
    let results = Results::new(&poll, &tally, 0);
    feed.publish(&results).await.expect("publish");
    let received = tokio::time::timeout(Duration::from_secs(5), subscription.next())
        .await
        .expect("delivered in time")
        .expect("stream open");
    assert_eq!(received, results);
}
