//! Where the warehouse's queries run: a Tokio runtime of their own, apart from the one that
//! serves requests.
//!
//! DataFusion plans and executes a query with plain CPU work, and spawns the tasks of its
//! plan on whatever runtime it runs in. On a runtime of its own that work never stalls
//! request handling, and whatever goes wrong in it stays in it: a query that panics is one
//! `Failed` error for its caller (a 500 for one request), not a dead worker. The planner's
//! recursion grows its stack on demand (DataFusion's `recursive_protection`), so a deep
//! expression is slow at worst, never a stack overflow.

use std::future::Future;

use tally_core::{Error, Result};
use tokio::runtime::{Handle, Runtime};
use tokio_util::task::AbortOnDropHandle;

/// What a failed query is reported as.
const WHAT: &str = "embedded warehouse query";

/// The stack of a query thread: a main thread's, four times a worker's. The planner grows
/// its own stack as it recurses, but the derived `Clone` and `Drop` of DataFusion's
/// expression trees recurse unprotected (our statements keep them shallow: see
/// `sql::segment_filter`). Untouched pages cost no memory.
const QUERY_STACK_BYTES: usize = 8 * 1024 * 1024;

/// The query runtime. Dropping it stops its threads without waiting for them.
pub(super) struct Executor {
    handle: Handle,
    /// Taken only by `drop`.
    runtime: Option<Runtime>,
}

impl Executor {
    /// A runtime with one worker per core, on threads named `warehouse-query`.
    pub(super) fn start() -> Result<Executor> {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("warehouse-query")
            .thread_stack_size(QUERY_STACK_BYTES)
            .enable_all()
            .build()
            .map_err(|err| Error::failed("starting the warehouse query runtime", err))?;
        Ok(Executor {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    /// Runs `query` on the query runtime and answers what it answers. A panic in it is a
    /// `Failed` error carrying the panic's message. Dropping the returned future (a client
    /// gone, a timeout) cancels the query.
    pub(super) async fn run<T, F>(&self, query: F) -> Result<T>
    where
        F: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let task = AbortOnDropHandle::new(self.handle.spawn(query));
        match task.await {
            Ok(answer) => answer,
            Err(err) if err.is_panic() => Err(Error::failed(
                WHAT,
                format!("the query panicked: {}", panic_message(err.into_panic())),
            )),
            // Cancelled: only the runtime's shutdown cancels a task someone still awaits.
            Err(err) => Err(Error::unavailable(WHAT, err)),
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        // Not a plain drop: that blocks until the workers stop, which is forbidden (and
        // panics) when the last handle on the warehouse goes away inside async code.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The message a panic was raised with, when it was raised with one.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        return (*message).to_owned();
    }
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(_) => "(no message)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_core::error::ErrorKind;

    #[tokio::test]
    async fn queries_run_on_the_query_threads() {
        let executor = Executor::start().unwrap();
        let thread = executor
            .run(async { Ok(std::thread::current().name().map(str::to_owned)) })
            .await
            .unwrap();
        assert_eq!(thread.as_deref(), Some("warehouse-query"));
    }

    #[tokio::test]
    async fn a_panicking_query_is_a_failed_query_and_the_next_one_runs() {
        let executor = Executor::start().unwrap();
        let err = executor
            .run(async {
                if std::hint::black_box(true) {
                    panic!("planner bug");
                }
                Ok(())
            })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Failed);
        assert!(
            err.chain().to_string().contains("planner bug"),
            "the panic's message is the cause: {}",
            err.chain()
        );
        assert_eq!(executor.run(async { Ok(7) }).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn dropping_the_executor_inside_async_code_does_not_panic() {
        let executor = Executor::start().unwrap();
        executor.run(async { Ok(()) }).await.unwrap();
        drop(executor);
    }
}
