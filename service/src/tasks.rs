//! The one owner of a process's background tasks.
//!
//! Nothing in tally starts a task from a constructor: a component hands its background work
//! to the process's [`Tasks`] (the poll cache's registry watch, the live hub's feed
//! follower, the limiter sweeper, the warehouse flusher, the window engine thread, the
//! processor's partition workers). Each task is given the process's cancellation token and
//! must return soon after it fires; [`Tasks::shutdown`] fires it and waits for every task,
//! so a clean exit never leaves a half-done flush or batch behind.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Background tasks of one process, stopped together. Cheap to clone: clones share the
/// same tasks and token.
#[derive(Clone, Default)]
pub struct Tasks {
    cancel: CancellationToken,
    tracker: TaskTracker,
    running: Arc<Running>,
}

#[derive(Default)]
struct Running {
    next: AtomicU64,
    names: Mutex<BTreeMap<u64, &'static str>>,
}

/// Removes a task's name from the running set when the task ends, however it ends.
struct NameGuard {
    running: Arc<Running>,
    id: u64,
}

impl Drop for NameGuard {
    fn drop(&mut self) {
        if let Ok(mut names) = self.running.names.lock() {
            names.remove(&self.id);
        }
    }
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// The token every task watches; fired by [`Tasks::shutdown`] (or [`Tasks::cancel`]).
    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// True once shutdown has begun.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    fn register(&self, name: &'static str) -> NameGuard {
        let id = self.running.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut names) = self.running.names.lock() {
            names.insert(id, name);
        }
        NameGuard {
            running: self.running.clone(),
            id,
        }
    }

    /// Runs `task(token)` on the runtime until it returns; it must return soon after the
    /// token fires.
    pub fn spawn<F, Fut>(&self, name: &'static str, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let guard = self.register(name);
        let future = task(self.cancel.clone());
        self.tracker.spawn(async move {
            let _guard = guard;
            future.await;
        });
    }

    /// Runs `work(token)` on a thread of its own (for work that must not share the
    /// runtime's threads, such as a query engine); shutdown waits for it like for a task.
    pub fn spawn_thread<F>(&self, name: &'static str, work: F) -> std::io::Result<()>
    where
        F: FnOnce(CancellationToken) + Send + 'static,
    {
        let guard = self.register(name);
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let token = self.cancel.clone();
        std::thread::Builder::new()
            .name(format!("tally-{name}"))
            .spawn(move || {
                // Dropped when the work ends or panics: either way the waiter hears of it.
                let _done = done;
                work(token);
            })?;
        self.tracker.spawn(async move {
            let _guard = guard;
            let _ = finished.await;
        });
        Ok(())
    }

    /// Fires the token without waiting.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Fires the token and waits up to `grace` for every task to end. Returns whether all
    /// did; the ones that did not are logged by name.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            return true;
        }
        let names: Vec<&'static str> = self
            .running
            .names
            .lock()
            .map(|names| names.values().copied().collect())
            .unwrap_or_default();
        tracing::warn!(
            ?names,
            grace_seconds = grace.as_secs_f64(),
            "background tasks did not stop in time"
        );
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_waits_for_every_task_and_thread() {
        let tasks = Tasks::new();
        let finished = Arc::new(AtomicU64::new(0));
        for _ in 0..3 {
            let finished = finished.clone();
            tasks.spawn("worker", move |cancel| async move {
                cancel.cancelled().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                finished.fetch_add(1, Ordering::SeqCst);
            });
        }
        let from_thread = finished.clone();
        tasks
            .spawn_thread("engine", move |cancel| {
                while !cancel.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                from_thread.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        assert_eq!(finished.load(Ordering::SeqCst), 0);
        assert!(tasks.shutdown(Duration::from_secs(5)).await);
        assert_eq!(finished.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn shutdown_gives_up_on_a_task_that_ignores_the_token() {
        let tasks = Tasks::new();
        tasks.spawn("stubborn", |_cancel| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        assert!(!tasks.shutdown(Duration::from_millis(50)).await);
    }
}
