//! What the bench client (`bench_client`) records, and the pure computations over it: the
//! pause around a move, the steady goodput of a bulk stream and how long it takes to get back
//! to it. Times are wall-clock microseconds since the Unix epoch (so that they line up with
//! control's MoveReport timestamps); the client derives them from one `SystemTime` reading and
//! a monotonic clock, so they never step backwards during a run.
//!
//! ```text
//!  bulk:    bytes per bucket (1 ms)  ▁▁▇▇▇▇▇▇▇▇▇▇▇▇▁▁▁▁▁▁▁▁▁▂▄▆▇▇▇▇▇
//!                                    └ steady: median ┘ move│ from └ recovered: a 10 ms
//!                                      of the last 500 ms   (Resumed,   window >= 90% of
//!                                                            or first    steady
//!                                                            byte after
//!                                                            the gap)
//!  latency: echo completions         ●●●●●●●●●●●         ●●●●●●●●  pause: the longest gap
//!                                               seen ▲ resumed ▲        between completions
//! ```

use serde::{Deserialize, Serialize};

/// Errors of a timeline read back from a report.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimelineError {
    /// A bucket width of zero.
    #[error("bucket width must be at least 1 µs")]
    ZeroWidth,
    /// Buckets out of order, or not on the grid of the first one.
    #[error("bucket at {at_us} µs is out of order or off the {width_us} µs grid")]
    OffGrid {
        /// The bucket's start.
        at_us: u64,
        /// The grid's width.
        width_us: u64,
    },
    /// A timeline that spans more buckets than is reasonable to hold.
    #[error("timeline of {buckets} buckets is too long")]
    TooLong {
        /// Buckets it would take.
        buckets: u64,
    },
}

/// Most buckets a timeline holds (an hour of 1 ms buckets).
pub const MAX_BUCKETS: u64 = 3_600_000;

/// Bytes received per fixed-width bucket, dense from `start_us`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    /// Start of the first bucket (wall-clock µs).
    pub start_us: u64,
    /// Width of a bucket (µs).
    pub width_us: u64,
    /// Bytes per bucket.
    pub bytes: Vec<u64>,
}

impl Buckets {
    /// An empty timeline from `start_us`.
    pub fn new(start_us: u64, width_us: u64) -> Result<Self, TimelineError> {
        if width_us == 0 {
            return Err(TimelineError::ZeroWidth);
        }
        Ok(Self {
            start_us,
            width_us,
            bytes: Vec::new(),
        })
    }

    /// Counts `n` bytes received at `at_us` (before the start: in the first bucket). Beyond
    /// [`MAX_BUCKETS`] the bytes go to the last bucket.
    pub fn add(&mut self, at_us: u64, n: u64) {
        let i = (at_us.saturating_sub(self.start_us) / self.width_us).min(MAX_BUCKETS - 1);
        let i = i as usize;
        if self.bytes.len() <= i {
            self.bytes.resize(i + 1, 0);
        }
        self.bytes[i] += n;
    }

    /// Extends the timeline with empty buckets up to `at_us` (the end of a run).
    pub fn extend_to(&mut self, at_us: u64) {
        let n = (at_us.saturating_sub(self.start_us) / self.width_us).min(MAX_BUCKETS) as usize;
        if self.bytes.len() < n {
            self.bytes.resize(n, 0);
        }
    }

    /// Start of bucket `i`.
    pub fn at(&self, i: usize) -> u64 {
        self.start_us + i as u64 * self.width_us
    }

    /// The buckets that hold bytes, as `[start_us, bytes]` pairs (the report's form).
    pub fn sparse(&self) -> Vec<[u64; 2]> {
        self.bytes
            .iter()
            .enumerate()
            .filter(|(_, b)| **b > 0)
            .map(|(i, b)| [self.at(i), *b])
            .collect()
    }

    /// The timeline back from its sparse form, from `start_us` to `end_us`.
    pub fn from_sparse(
        start_us: u64,
        end_us: u64,
        width_us: u64,
        pairs: &[[u64; 2]],
    ) -> Result<Self, TimelineError> {
        let mut b = Self::new(start_us, width_us)?;
        let span = end_us.saturating_sub(start_us) / width_us;
        if span > MAX_BUCKETS {
            return Err(TimelineError::TooLong { buckets: span });
        }
        let mut last = None;
        for &[at_us, n] in pairs {
            let off = at_us.checked_sub(start_us);
            let on_grid = off.is_some_and(|o| o % width_us == 0 && o / width_us < MAX_BUCKETS);
            if !on_grid || last.is_some_and(|l| at_us <= l) {
                return Err(TimelineError::OffGrid { at_us, width_us });
            }
            last = Some(at_us);
            b.add(at_us, n);
        }
        b.extend_to(end_us);
        Ok(b)
    }

    /// Rate of bucket `i`, bytes per second.
    fn rate(&self, i: usize) -> f64 {
        self.bytes[i] as f64 * 1e6 / self.width_us as f64
    }

    /// Index of the bucket holding `t_us` (may be past the end).
    fn index(&self, t_us: u64) -> usize {
        (t_us.saturating_sub(self.start_us) / self.width_us) as usize
    }
}

/// The steady goodput before `before_us`: the median rate (bytes per second) of the buckets
/// that lie wholly in `[before_us - span_us, before_us)`. `None` when that span does not lie
/// wholly inside the timeline (the stream had not run that long).
pub fn steady_goodput(b: &Buckets, before_us: u64, span_us: u64) -> Option<f64> {
    let from_us = before_us.checked_sub(span_us)?;
    if from_us < b.start_us || span_us < b.width_us {
        return None;
    }
    // First bucket starting at or after from_us; last one ending at or before before_us.
    let first = b.index(from_us + b.width_us - 1);
    let end = b.index(before_us);
    if end > b.bytes.len() || first >= end {
        return None;
    }
    let mut rates: Vec<f64> = (first..end).map(|i| b.rate(i)).collect();
    rates.sort_by(f64::total_cmp);
    Some(rates[rates.len() / 2])
}

/// How long after `from_us` the stream is back to `target` bytes per second: the time from
/// `from_us` to the end of the first window of `window_us` (sliding by one bucket, starting at
/// the bucket that holds `from_us`) whose mean rate reaches `target`. `None`: never, within
/// the timeline.
pub fn recovery_us(b: &Buckets, from_us: u64, window_us: u64, target: f64) -> Option<u64> {
    let w = (window_us.div_ceil(b.width_us)).max(1) as usize;
    let first = b.index(from_us);
    if first + w > b.bytes.len() {
        return None;
    }
    let needed = target * (w as u64 * b.width_us) as f64 / 1e6;
    let mut sum: u64 = b.bytes[first..first + w].iter().sum();
    let mut i = first;
    loop {
        if sum as f64 >= needed {
            return Some(b.at(i + w).saturating_sub(from_us));
        }
        if i + w >= b.bytes.len() {
            return None;
        }
        sum = sum - b.bytes[i] + b.bytes[i + w];
        i += 1;
    }
}

/// Start of the first bucket with bytes after the longest run of empty buckets that begins at
/// or after `after_us`: where a stream comes back after a pause. `None` without such a run
/// followed by bytes.
pub fn first_bytes_after_gap(b: &Buckets, after_us: u64) -> Option<u64> {
    let mut best: Option<(usize, usize)> = None; // (gap length, first bucket after it)
    let mut run = 0usize;
    for i in b.index(after_us)..b.bytes.len() {
        if b.bytes[i] == 0 {
            run += 1;
        } else {
            if run > 0 && best.is_none_or(|(len, _)| run > len) {
                best = Some((run, i));
            }
            run = 0;
        }
    }
    best.map(|(_, i)| b.at(i))
}

/// The longest pause between two successive completions (sorted, µs) that ends after `from_us`
/// and begins before `until_us`: `(last before, first after)`.
pub fn longest_gap(completions: &[u64], from_us: u64, until_us: u64) -> Option<(u64, u64)> {
    completions
        .windows(2)
        .map(|w| (w[0], w[1]))
        .filter(|&(a, z)| z > from_us && a < until_us)
        .max_by_key(|&(a, z)| z.saturating_sub(a))
}

/// One bulk recovery, as the report gives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recovery {
    /// What interrupted the stream: `migration` or `reconnect`.
    pub event: String,
    /// When recovery was measured from (wall-clock µs).
    pub from_unix_us: Option<u64>,
    /// What `from_unix_us` is: `resumed` (the server's Resumed), `first_byte_after_gap` or
    /// `first_byte` (of the new connection's stream).
    pub from: String,
    /// Time from `from_unix_us` until a window was back to the fraction of the steady goodput;
    /// `None`: never within the run (or no steady goodput to compare with).
    pub recovery_ms: Option<f64>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// 1 ms buckets from t = 1_000_000 µs: `steady` bytes per bucket for 600 ms, 200 ms of
    /// nothing, then a ramp of 10 ms steps of `ramp` (fractions of steady), then steady.
    fn synthetic(steady: u64, ramp: &[f64], tail_ms: usize) -> Buckets {
        let mut b = Buckets::new(1_000_000, 1000).unwrap();
        let mut t = 1_000_000;
        let mut push = |n: u64| {
            b.add(t, n);
            b.extend_to(t + 1000);
            t += 1000;
        };
        for _ in 0..600 {
            push(steady);
        }
        for _ in 0..200 {
            push(0);
        }
        for f in ramp {
            for _ in 0..10 {
                push((steady as f64 * f) as u64);
            }
        }
        for _ in 0..tail_ms {
            push(steady);
        }
        b
    }

    #[test]
    fn steady_goodput_is_the_median_of_the_last_span() {
        let mut b = synthetic(1000, &[], 0);
        // One outlier bucket does not move the median.
        b.bytes[590] = 1_000_000;
        let g = steady_goodput(&b, 1_600_000, 500_000).unwrap();
        assert!((g - 1e6).abs() < 1.0, "{g}");
        // Not 500 ms of stream before t: no steady figure.
        assert_eq!(steady_goodput(&b, 1_400_000, 500_000), None);
        assert_eq!(steady_goodput(&b, 100, 500_000), None);
        // Past the end of the timeline.
        assert_eq!(steady_goodput(&b, 9_000_000, 500_000), None);
    }

    #[test]
    fn recovery_is_the_end_of_the_first_window_at_the_target() {
        // Back at t = 1.8 s: 10 ms at 50%, 10 ms at 80%, then full.
        let b = synthetic(1000, &[0.5, 0.8], 100);
        let steady = steady_goodput(&b, 1_600_000, 500_000).unwrap();
        let from = first_bytes_after_gap(&b, 1_600_000).unwrap();
        assert_eq!(from, 1_800_000);
        // The first 10 ms window at >= 90% holds at least 9000 bytes: k full buckets after
        // 10 - k of the 80% ones, (10-k)*800 + k*1000 >= 9000, k >= 5; it ends 25 ms in.
        let r = recovery_us(&b, from, 10_000, 0.9 * steady).unwrap();
        assert_eq!(r, 20_000 + 5_000);
        // At once when the stream comes back at full rate.
        let b = synthetic(1000, &[], 100);
        assert_eq!(recovery_us(&b, 1_800_000, 10_000, 0.9e6), Some(10_000));
    }

    #[test]
    fn a_stream_that_never_recovers_gives_none() {
        let b = synthetic(1000, &[0.5, 0.5, 0.5, 0.5, 0.5], 0);
        let steady = steady_goodput(&b, 1_600_000, 500_000).unwrap();
        assert_eq!(recovery_us(&b, 1_800_000, 10_000, 0.9 * steady), None);
        // A window that does not fit in the timeline.
        assert_eq!(recovery_us(&b, 99_000_000, 10_000, 1.0), None);
        // A stream that never comes back at all.
        let b = synthetic(1000, &[], 0);
        assert_eq!(first_bytes_after_gap(&b, 1_600_000), None);
        assert_eq!(recovery_us(&b, 1_600_000, 10_000, 0.9e6), None);
    }

    #[test]
    fn the_longest_gap_is_found_around_the_move() {
        let c = [10, 20, 30, 500, 510, 520, 2000, 2010];
        assert_eq!(longest_gap(&c, 25, 515), Some((30, 500)));
        assert_eq!(longest_gap(&c, 600, 10_000), Some((520, 2000)));
        assert_eq!(longest_gap(&c, 5000, 10_000), None);
        assert_eq!(longest_gap(&[], 0, 10), None);
    }

    #[test]
    fn the_sparse_form_round_trips_and_bad_ones_are_refused() {
        let b = synthetic(1000, &[0.5], 5);
        let end = b.at(b.bytes.len());
        let back = Buckets::from_sparse(b.start_us, end, b.width_us, &b.sparse()).unwrap();
        assert_eq!(back, b);
        assert_eq!(Buckets::new(0, 0).unwrap_err(), TimelineError::ZeroWidth);
        assert!(matches!(
            Buckets::from_sparse(0, 10_000, 1000, &[[1500, 1]]),
            Err(TimelineError::OffGrid { at_us: 1500, .. })
        ));
        assert!(matches!(
            Buckets::from_sparse(5000, 10_000, 1000, &[[1000, 1]]),
            Err(TimelineError::OffGrid { .. })
        ));
        assert!(matches!(
            Buckets::from_sparse(0, 10_000, 1000, &[[2000, 1], [1000, 1]]),
            Err(TimelineError::OffGrid { at_us: 1000, .. })
        ));
        assert!(matches!(
            Buckets::from_sparse(0, u64::MAX, 1, &[]),
            Err(TimelineError::TooLong { .. })
        ));
    }
}
