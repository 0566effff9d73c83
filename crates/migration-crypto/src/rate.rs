//! A token-bucket rate limiter driven by caller-supplied time.

use std::time::Duration;

/// Bucket units per token: the bucket counts nano-tokens so refill is exact
/// in integer arithmetic (`elapsed_ns * rate` nano-tokens per elapsed time).
const UNIT: u128 = 1_000_000_000;

/// The request was refused; try again after `retry_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limited; retry after {retry_after:?}")]
pub struct RateLimited {
    /// How long until a token is available ([`Duration::MAX`] if never:
    /// a zero rate with an empty bucket, or a zero burst).
    pub retry_after: Duration,
}

/// A token bucket: holds up to `burst` tokens, starts full, refills at
/// `rate_per_sec` tokens per second, and each [`RateLimiter::try_acquire`]
/// takes one token.
///
/// Time is an argument: `now` is any monotonic [`Duration`] since an epoch
/// of the caller's choosing (e.g. `Instant::now() - start`). Time that goes
/// backwards adds no tokens.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate_per_sec: u32,
    burst: u32,
    /// Tokens available, times [`UNIT`].
    level: u128,
    /// Time of the last refill; `None` before the first call.
    last: Option<Duration>,
}

impl RateLimiter {
    /// A full bucket of `burst` tokens refilled at `rate_per_sec`.
    /// A zero `burst` refuses everything.
    pub fn new(rate_per_sec: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            rate_per_sec,
            burst,
            level: u128::from(burst) * UNIT,
            last: None,
        }
    }

    /// Takes one token at time `now`, or says how long to wait.
    pub fn try_acquire(&mut self, now: Duration) -> Result<(), RateLimited> {
        let capacity = u128::from(self.burst) * UNIT;
        match self.last {
            Some(last) if now > last => {
                let added = (now - last)
                    .as_nanos()
                    .saturating_mul(u128::from(self.rate_per_sec));
                self.level = self.level.saturating_add(added).min(capacity);
                self.last = Some(now);
            }
            Some(_) => {}
            None => self.last = Some(now),
        }
        if self.level >= UNIT {
            self.level -= UNIT;
            return Ok(());
        }
        if self.rate_per_sec == 0 || self.burst == 0 {
            return Err(RateLimited {
                retry_after: Duration::MAX,
            });
        }
        let missing = UNIT - self.level;
        let nanos = missing.div_ceil(u128::from(self.rate_per_sec));
        // nanos <= UNIT, so it fits in a u64.
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX);
        Err(RateLimited {
            retry_after: Duration::from_nanos(nanos),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn burst_then_refusal_then_refill() {
        let mut rl = RateLimiter::new(10, 3); // one token per 100 ms
        let t0 = Duration::from_secs(1000);
        for _ in 0..3 {
            rl.try_acquire(t0).unwrap();
        }
        let err = rl.try_acquire(t0).unwrap_err();
        assert_eq!(err.retry_after, ms(100));
        // Partially refilled: 40 ms in, 60 ms to go.
        assert_eq!(rl.try_acquire(t0 + ms(40)).unwrap_err().retry_after, ms(60));
        // Exactly at retry_after, one token is back; then refused again.
        rl.try_acquire(t0 + ms(100)).unwrap();
        assert_eq!(
            rl.try_acquire(t0 + ms(100)).unwrap_err().retry_after,
            ms(100)
        );
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            rl.try_acquire(later).unwrap();
        }
        assert!(rl.try_acquire(later).is_err());
    }

    #[test]
    fn time_going_backwards_adds_nothing() {
        let mut rl = RateLimiter::new(1, 1);
        rl.try_acquire(Duration::from_secs(10)).unwrap();
        assert!(rl.try_acquire(Duration::from_secs(5)).is_err());
        assert!(rl.try_acquire(Duration::from_secs(10)).is_err());
        rl.try_acquire(Duration::from_secs(11)).unwrap();
    }

    #[test]
    fn zero_rate_and_zero_burst() {
        let mut rl = RateLimiter::new(0, 2);
        rl.try_acquire(ms(0)).unwrap();
        rl.try_acquire(ms(0)).unwrap();
        assert_eq!(
            rl.try_acquire(Duration::from_secs(1_000_000))
                .unwrap_err()
                .retry_after,
            Duration::MAX
        );
        let mut rl = RateLimiter::new(1000, 0);
        assert_eq!(
            rl.try_acquire(ms(5)).unwrap_err().retry_after,
            Duration::MAX
        );
    }

    #[test]
    fn extreme_values_do_not_panic() {
        let mut rl = RateLimiter::new(u32::MAX, u32::MAX);
        rl.try_acquire(Duration::ZERO).unwrap();
        rl.try_acquire(Duration::MAX).unwrap();
        let mut rl = RateLimiter::new(u32::MAX, 1);
        rl.try_acquire(Duration::ZERO).unwrap();
        assert_eq!(
            rl.try_acquire(Duration::ZERO).unwrap_err().retry_after,
            Duration::from_nanos(1)
        );
    }

    proptest! {
        /// Over any window, admitted requests never exceed burst + rate * elapsed,
        /// and waiting the advertised retry_after always succeeds.
        #[test]
        fn never_exceeds_budget(rate in 1u32..1000, burst in 1u32..50,
                                steps in proptest::collection::vec(0u64..50_000_000, 1..200)) {
            let mut rl = RateLimiter::new(rate, burst);
            let mut now = Duration::from_secs(1);
            let start = now;
            let mut admitted: u128 = 0;
            for step in steps {
                now += Duration::from_nanos(step);
                match rl.try_acquire(now) {
                    Ok(()) => admitted += 1,
                    Err(RateLimited { retry_after }) => {
                        prop_assert!(retry_after > Duration::ZERO);
                        let mut probe = rl.clone();
                        prop_assert!(probe.try_acquire(now + retry_after).is_ok());
                    }
                }
                let budget = u128::from(burst)
                    + (now - start).as_nanos() * u128::from(rate) / 1_000_000_000;
                prop_assert!(admitted <= budget, "admitted {} > budget {}", admitted, budget);
            }
        }
    }
}
