//! Waiting on a condition with a deadline, instead of sleeping and hoping.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::anyhow;

/// How often [`wait_until`] asks again.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `f` every 50 ms until it returns `Ok(true)`.
///
/// `Ok(false)` and `Err(_)` both mean "not yet". When `deadline` has passed
/// the error names `what` and carries the last error `f` returned, if any.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let started = Instant::now();
    let mut last_error: Option<anyhow::Error> = None;
    loop {
        match f().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(err) => last_error = Some(err),
        }
        if started.elapsed() >= deadline {
            return Err(match last_error {
                Some(err) => {
                    anyhow!("timed out after {deadline:?} waiting for {what}; last error: {err:#}")
                }
                None => anyhow!("timed out after {deadline:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_until_reports_what_and_last_error() {
        let mut calls = 0;
        wait_until("third call", Duration::from_secs(5), || {
            calls += 1;
            let n = calls;
            async move { Ok(n >= 3) }
        })
        .await
        .unwrap();
        assert_eq!(calls, 3);

        let err = wait_until("the impossible", Duration::from_millis(120), || async {
            Err::<bool, _>(anyhow!("still broken"))
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("the impossible"), "{err}");
        assert!(err.contains("still broken"), "{err}");
    }
}
