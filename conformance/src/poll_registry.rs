//! The [`PollRegistry`] guarantees: create-once, conditional updates, ordered pagination, and
//! a watch that starts with the current state.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use tally_core::poll::Poll;
use tally_core::ports::{BoxStream, PollChange, PollRegistry};
use tally_core::{Error, Result};

use crate::sample_poll;

/// One `#[tokio::test]` per guarantee of this module, in a module named `$suite`, each on a
/// fresh registry from `$factory` (see the crate documentation):
/// `poll_registry_suite!(embedded_registry, { … (Arc::new(registry), guard) });`
#[macro_export]
macro_rules! poll_registry_suite {
    ($suite:ident, $factory:block) => {
        $crate::__suite!(
            $suite,
            $factory,
            poll_registry {
                a_stored_poll_has_a_version,
                ids_are_unique,
                get_returns_the_stored_poll,
                get_of_a_missing_poll_is_none,
                updates_grow_the_version,
                a_stale_version_is_refused,
                list_pages_in_id_order,
                the_watch_starts_with_current_versions,
                the_watch_delivers_changes,
                a_reachable_registry_checks_ok,
            }
        );
    };
}

/// Polls `conf-a` (created, then retitled "New title"), `conf-b`, `conf-c` and `conf-d`.
async fn four_polls(registry: &dyn PollRegistry) {
    let created = registry
        .create(&sample_poll("conf-a"))
        .await
        .expect("create");
    let mut edited = created;
    edited.title = "New title".into();
    registry.update(&edited).await.expect("update");
    for id in ["conf-b", "conf-c", "conf-d"] {
        registry.create(&sample_poll(id)).await.expect("create");
    }
}

/// The next change of a watch, within 10 s; `expect` names what was awaited.
async fn next_change(
    watch: &mut BoxStream<Result<PollChange>>,
    expect: &str,
) -> Result<PollChange> {
    let Some(change) = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect(expect)
    else {
        panic!("the watch ended: {expect}");
    };
    change
}

pub async fn a_stored_poll_has_a_version(registry: Arc<dyn PollRegistry>) {
    let created = registry
        .create(&sample_poll("conf-a"))
        .await
        .expect("create");
    assert!(created.version > 0, "a stored poll has a version");
}

pub async fn ids_are_unique(registry: Arc<dyn PollRegistry>) {
    registry
        .create(&sample_poll("conf-a"))
        .await
        .expect("create");
    assert!(
        matches!(
            registry.create(&sample_poll("conf-a")).await,
            Err(Error::AlreadyExists(_))
        ),
        "ids are unique"
    );
}

pub async fn get_returns_the_stored_poll(registry: Arc<dyn PollRegistry>) {
    let created = registry
        .create(&sample_poll("conf-a"))
        .await
        .expect("create");
    let fetched = registry.get("conf-a").await.expect("get").expect("found");
    assert_eq!(fetched, created);
}

pub async fn get_of_a_missing_poll_is_none(registry: Arc<dyn PollRegistry>) {
    registry
        .create(&sample_poll("conf-a"))
        .await
        .expect("create");
    assert_eq!(registry.get("conf-missing").await.expect("get"), None);
}

/// An update conditional on the current version replaces the poll and grows its version.
pub async fn updates_grow_the_version(registry: Arc<dyn PollRegistry>) {
    let created = registry
        .create(&sample_poll("conf-a"))
        .await
        .expect("create");
    let mut edited = created.clone();
    edited.title = "New title".into();
    let updated = registry.update(&edited).await.expect("update");
    assert!(updated.version > created.version, "versions grow");
    assert_eq!(
        registry
            .get("conf-a")
            .await
            .expect("get")
            .expect("found")
            .title,
        "New title"
    );
}

pub async fn a_stale_version_is_refused(registry: Arc<dyn PollRegistry>) {
    let created = registry
        .create(&sample_poll("conf-a"))
        .await
        .expect("create");
    let mut edited = created;
    edited.title = "New title".into();
    registry.update(&edited).await.expect("update");
    assert!(
        matches!(registry.update(&edited).await, Err(Error::Conflict(_))),
        "a stale version is refused"
    );
}

pub async fn list_pages_in_id_order(registry: Arc<dyn PollRegistry>) {
    four_polls(registry.as_ref()).await;
    let ids = |page: Vec<Poll>| -> Vec<String> { page.into_iter().map(|p| p.id).collect() };
    let page = ids(registry.list(None, 2).await.expect("list"));
    assert_eq!(page, vec!["conf-a", "conf-b"]);
    let page = ids(registry.list(Some("conf-b"), 10).await.expect("list"));
    assert_eq!(page, vec!["conf-c", "conf-d"]);
}

pub async fn the_watch_starts_with_current_versions(registry: Arc<dyn PollRegistry>) {
    four_polls(registry.as_ref()).await;
    let mut watch = registry.watch().await.expect("watch");
    let mut seen = BTreeMap::new();
    while seen.len() < 4 {
        let change = next_change(&mut watch, "watch delivers current polls").await;
        if let Ok(PollChange::Put(poll)) = change {
            seen.insert(poll.id.clone(), poll);
        }
    }
    assert_eq!(
        seen["conf-a"].title, "New title",
        "the watch starts with current versions"
    );
}

pub async fn the_watch_delivers_changes(registry: Arc<dyn PollRegistry>) {
    four_polls(registry.as_ref()).await;
    let mut watch = registry.watch().await.expect("watch");
    let mut closing = registry.get("conf-b").await.expect("get").expect("found");
    closing.closed_at = Some(1);
    registry.update(&closing).await.expect("update");
    loop {
        let change = next_change(&mut watch, "watch delivers changes").await;
        if let Ok(PollChange::Put(poll)) = change {
            if poll.id == "conf-b" && poll.closed_at.is_some() {
                break;
            }
        }
    }
}

pub async fn a_reachable_registry_checks_ok(registry: Arc<dyn PollRegistry>) {
    registry.check().await.expect("check");
}
