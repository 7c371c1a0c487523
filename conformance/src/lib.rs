//! Conformance suites: what every implementation of a back-end trait must guarantee, as one
//! public async function per guarantee in the trait's module ([`vote_log`],
//! [`log_retention`], [`poll_registry`], [`warehouse`], [`live_feed`]). Each function takes
//! a fresh back end (an empty stream, bucket, database), sets up what it needs with its own
//! poll ids, and panics with a message naming the broken guarantee.
//!
//! A back-end crate runs a suite by declaring it once in a test file:
//!
//! ```ignore
//! tally_conformance::vote_log_suite!(needs_nats_jetstream_vote_log, {
//!     require!(NatsServer);
//!     let server = NatsServer::start().await.expect("nats-server");
//!     let log = JetStreamLog::open(/* … */).await.expect("open log");
//!     (Arc::new(log), server)
//! });
//! ```
//!
//! which expands to a module of that name holding one `#[tokio::test]` per guarantee, so a
//! broken guarantee fails its own test and hides none of the others. The block is the
//! factory: it is written into each test function and runs first, so a `require!` in it
//! returns from the test (a skip) before any server starts. It evaluates to the back end
//! (an `Arc` of the implementation, or already an `Arc<dyn Trait>`) and a guard the test
//! keeps alive until the back end is dropped (the server, the temporary directory, or `()`).
//! Test names are the module name plus the guarantee, so a module named `needs_nats_…`
//! keeps saying what its tests need.

pub mod live_feed;
pub mod log_retention;
pub mod poll_registry;
pub mod rows;
pub mod vote_log;
pub mod warehouse;

use tally_core::poll::{NewPoll, Poll};
use tally_core::segment::Segment;
use tally_core::vote::Vote;

/// A poll with options `a` and `b`, valid for every back end.
pub fn sample_poll(id: &str) -> Poll {
    let new: NewPoll = serde_json::from_value(serde_json::json!({
        "id": id, "title": "T", "question": "Q?", "kind": "single",
        "options": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}]
    }))
    .expect("sample poll");
    new.into_poll(tally_core::time::now_ms(), || unreachable!())
        .expect("valid poll")
}

/// A single-choice vote with no segment, received at `at` (epoch ms): the sample vote of
/// the suites, and of back-end tests beside them.
pub fn vote(poll: &str, vote_id: &str, voter_key: &str, choice: &str, at: i64) -> Vote {
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

/// The expansion of the `*_suite!` macros: a module `$suite` with one test per guarantee of
/// `$crate::$module`, each starting with its own run of `$factory`.
#[doc(hidden)]
#[macro_export]
macro_rules! __suite {
    ($suite:ident, $factory:block, $module:ident { $($guarantee:ident),+ $(,)? }) => {
        mod $suite {
            // The factory's names (helpers, `require!`, server types) are the test file's.
            #[allow(unused_imports)]
            use super::*;

            $(
                #[tokio::test]
                async fn $guarantee() {
                    // Named, not `_`: the guard lives to the end of the test, after the
                    // back end the guarantee consumed.
                    let (backend, _guard) = $factory;
                    $crate::$module::$guarantee(backend).await;
                }
            )+
        }
    };
}

#[cfg(test)]
mod tests {
    /// A guarantee written as a function but left out of its suite macro would never run:
    /// every `pub async fn` of a suite module must be named in that module's macro.
    #[test]
    fn every_guarantee_is_in_its_suite_macro() {
        let modules = [
            ("vote_log_suite", include_str!("vote_log.rs")),
            ("poll_registry_suite", include_str!("poll_registry.rs")),
            ("warehouse_suite", include_str!("warehouse.rs")),
            ("live_feed_suite", include_str!("live_feed.rs")),
            ("log_retention_suite", include_str!("log_retention.rs")),
        ];
        for (suite, source) in modules {
            let start = source
                .find(&format!("macro_rules! {suite} "))
                .unwrap_or_else(|| panic!("{suite} is defined next to its guarantees"));
            let end = start + source[start..].find("\n}\n").expect("end of the macro");
            let listed: Vec<&str> = source[start..end]
                .lines()
                .map(|line| line.trim().trim_end_matches(','))
                .collect();
            let guarantees: Vec<&str> = source
                .lines()
                .filter_map(|line| line.strip_prefix("pub async fn "))
                .map(|rest| rest.split('(').next().expect("a name"))
                .collect();
            assert!(!guarantees.is_empty(), "{suite} has guarantees");
            for guarantee in guarantees {
                assert!(
                    listed.contains(&guarantee),
                    "{suite}! does not run `{guarantee}`"
                );
            }
        }
    }
}
