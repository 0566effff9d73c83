//! The figures of `bench-migrate`, computed from what the clients and `control` recorded:
//! pure functions over timelines, so that each is unit-tested on a synthetic timeline.

use serde::Serialize;

/// Median, 95th percentile (nearest rank) and maximum of some samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Spread {
    pub(crate) n: usize,
    pub(crate) median: f64,
    pub(crate) p95: f64,
    pub(crate) max: f64,
}

impl Spread {
    /// `None` without samples; NaNs are ignored.
    pub(crate) fn of(samples: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        // Nearest rank: the smallest value with at least 95% of the samples at or below it.
        let rank = (0.95 * n as f64).ceil() as usize;
        let p95 = v[rank.clamp(1, n) - 1];
        Some(Spread {
            n,
            median,
            p95,
            max: v[n - 1],
        })
    }
}

/// One answered request of a latency client: when it was sent and answered, wall-clock
/// microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answered {
    pub(crate) sent_us: u64,
    pub(crate) answered_us: u64,
}

/// The client's pause around a move: the longest gap between two consecutive answers (by
/// answer time) from the last answer before `from_us` to the first answer after `to_us`.
/// `None` when nothing was answered after `to_us` (the client never heard from the server
/// again: no pause can be measured, the move broke it).
pub(crate) fn pause_ms(answers: &[Answered], from_us: u64, to_us: u64) -> Option<f64> {
    let mut times: Vec<u64> = answers.iter().map(|a| a.answered_us).collect();
    times.sort_unstable();
    let after = times.iter().position(|&t| t >= to_us)?;
    let before = times.iter().rposition(|&t| t <= from_us).unwrap_or(0);
    times[before..=after]
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .map(|g| g as f64 / 1e3)
}

/// Round-trip times (ms) of the requests sent in `[from_us, to_us)`: the service's latency
/// while something (pages arriving after a post-copy restore) goes on.
pub(crate) fn latencies_ms(answers: &[Answered], from_us: u64, to_us: u64) -> Vec<f64> {
    answers
        .iter()
        .filter(|a| a.sent_us >= from_us && a.sent_us < to_us)
        .map(|a| a.answered_us.saturating_sub(a.sent_us) as f64 / 1e3)
        .collect()
}

/// Bytes a bulk client received, per bucket starting at `t_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bucket {
    pub(crate) t_us: u64,
    pub(crate) bytes: u64,
}

/// Bytes per second in the window `[start, start + width)`.
fn rate(buckets: &[Bucket], start: u64, width: u64) -> f64 {
    let bytes: u64 = buckets
        .iter()
        .filter(|b| b.t_us >= start && b.t_us < start + width)
        .map(|b| b.bytes)
        .sum();
    bytes as f64 / (width as f64 / 1e6)
}

/// How long after `resume_us` a bulk stream is back to 90% of its goodput before the move:
/// the steady goodput is the median over the `window_us` windows of the `steady_us` before
/// `move_start_us`; the answer is the end of the first window after `resume_us` whose rate
/// reaches 90% of it, in milliseconds after `resume_us`. `None` when there was no steady
/// goodput to compare with, or it never came back within `limit_us`.
pub(crate) fn goodput_back_ms(
    buckets: &[Bucket],
    move_start_us: u64,
    resume_us: u64,
    window_us: u64,
    steady_us: u64,
    limit_us: u64,
) -> Option<f64> {
    if window_us == 0 {
        return None;
    }
    let first = move_start_us.saturating_sub(steady_us);
    let mut steady = Vec::new();
    let mut t = first;
    while t + window_us <= move_start_us {
        steady.push(rate(buckets, t, window_us));
        t += window_us;
    }
    let steady = Spread::of(&steady)?.median;
    if steady <= 0.0 {
        return None;
    }
    // Slide by a tenth of the window: fine enough for a 10 ms window.
    let step = (window_us / 10).max(1);
    let mut t = resume_us;
    while t <= resume_us + limit_us {
        if rate(buckets, t, window_us) >= 0.9 * steady {
            return Some((t + window_us - resume_us) as f64 / 1e3);
        }
        t += step;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_nothing_is_none_and_percentiles_are_nearest_rank() {
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[f64::NAN]), None);
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.n, s.median, s.p95, s.max), (3, 2.0, 3.0, 3.0));
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        let s = Spread::of(&v).unwrap();
        assert_eq!((s.median, s.p95, s.max), (10.5, 19.0, 20.0));
    }

    fn answers(times: &[u64]) -> Vec<Answered> {
        times
            .iter()
            .map(|&t| Answered {
                sent_us: t.saturating_sub(100),
                answered_us: t,
            })
            .collect()
    }

    #[test]
    fn the_pause_is_the_longest_gap_overlapping_the_move() {
        // Every ms, then a 40 ms gap at 10..50 ms, then a longer 60 ms gap well after the
        // window that must not count.
        let mut t: Vec<u64> = (0..=10).map(|i| i * 1000).collect();
        t.extend((50..=60).map(|i| i * 1000));
        t.extend((120..=125).map(|i| i * 1000));
        let a = answers(&t);
        // A two-phase move: the client paused inside the move's window.
        assert_eq!(pause_ms(&a, 5_000, 55_000), Some(40.0));
        // The gap started before the window (the seed's flow) and ended inside it.
        assert_eq!(pause_ms(&a, 20_000, 30_000), Some(40.0));
        // A window that sees the 60 ms gap too.
        assert_eq!(pause_ms(&a, 20_000, 100_000), Some(60.0));
        // Nothing answered after the window's end: the move broke the client.
        assert_eq!(pause_ms(&answers(&[1000, 2000]), 1500, 6000), None);
        assert_eq!(pause_ms(&[], 0, 1), None);
    }

    #[test]
    fn latencies_are_taken_by_send_time() {
        let a = [
            Answered {
                sent_us: 1000,
                answered_us: 1500,
            },
            Answered {
                sent_us: 2000,
                answered_us: 40_000,
            },
            Answered {
                sent_us: 50_000,
                answered_us: 50_100,
            },
        ];
        assert_eq!(latencies_ms(&a, 1500, 50_000), vec![38.0]);
    }

    fn steady_then_gap(back_at_us: u64, back_rate: u64) -> Vec<Bucket> {
        // 1 ms buckets of 1000 bytes (1 MB/s) for 600 ms, nothing until `back_at_us`, then
        // `back_rate` bytes per bucket.
        let mut v: Vec<Bucket> = (0..600)
            .map(|i| Bucket {
                t_us: i * 1000,
                bytes: 1000,
            })
            .collect();
        v.extend(
            (back_at_us / 1000..back_at_us / 1000 + 400).map(|i| Bucket {
                t_us: i * 1000,
                bytes: back_rate,
            }),
        );
        v
    }

    #[test]
    fn goodput_is_back_when_a_window_reaches_ninety_percent() {
        // The move starts at 600 ms, resumes at 700 ms, bytes flow again from 720 ms at the
        // old rate: the window [719, 729) holds nine full buckets, 90% of the old rate.
        let b = steady_then_gap(720_000, 1000);
        let got = goodput_back_ms(&b, 600_000, 700_000, 10_000, 500_000, 1_000_000).unwrap();
        assert!((got - 29.0).abs() < 1e-9, "{got}");
        // At 80% of the old rate it never counts as back.
        let b = steady_then_gap(720_000, 800);
        assert_eq!(
            goodput_back_ms(&b, 600_000, 700_000, 10_000, 500_000, 1_000_000),
            None
        );
        // Without traffic before the move there is nothing to compare with.
        assert_eq!(
            goodput_back_ms(&[], 600_000, 700_000, 10_000, 500_000, 1_000_000),
            None
        );
        assert_eq!(goodput_back_ms(&b, 600_000, 700_000, 0, 500_000, 1), None);
    }
}
