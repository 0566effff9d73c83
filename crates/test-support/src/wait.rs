//! Time limits for tests.

use std::time::Duration;

/// The bound a whole test should stay within (wrap its body in `tokio::time::timeout`).
pub const TEST_LIMIT: Duration = Duration::from_secs(20);

/// How long [`eventually`] waits.
pub const EVENTUALLY_LIMIT: Duration = Duration::from_secs(5);

/// A condition did not hold in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timed out after {limit:?} waiting for: {what}")]
pub struct TimedOut {
    /// What was awaited, as the caller described it.
    pub what: String,
    /// How long it was awaited.
    pub limit: Duration,
}

/// Waits until `done()` holds, checking every 5 ms, for up to [`EVENTUALLY_LIMIT`].
pub async fn eventually(what: &str, done: impl FnMut() -> bool) -> Result<(), TimedOut> {
    eventually_within(EVENTUALLY_LIMIT, what, done).await
}

/// Waits until `done()` holds, checking every 5 ms, for up to `limit`. `done` is always
/// checked at least once, and once more at the deadline.
pub async fn eventually_within(
    limit: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> Result<(), TimedOut> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if done() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(TimedOut {
                what: what.to_owned(),
                limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn never_true_is_timed_out() {
        let err = eventually_within(Duration::from_millis(20), "never", || false)
            .await
            .unwrap_err();
        assert_eq!(
            err,
            TimedOut {
                what: "never".into(),
                limit: Duration::from_millis(20)
            }
        );
    }

    #[tokio::test]
    async fn becomes_true_is_ok() {
        let mut calls = 0;
        eventually("third call", || {
            calls += 1;
            calls >= 3
        })
        .await
        .unwrap();
        assert_eq!(calls, 3);
    }
}
