//! The hold's bookkeeping, without I/O: which queued datagram to keep, which to drop and
//! why, which to deliver. Time comes in as an argument, so the bounds are tested in virtual
//! time; the holder thread feeds it what the kernel queued and carries out its decisions.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// The bounds of a hold, and the pace of its release. A datagram that would cross a bound is
/// dropped (its verdict is `NF_DROP` at once) and counted in [`HoldStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldLimits {
    /// Bytes held at most, counted from the IP header on (the length the kernel reports).
    pub max_bytes: u64,
    /// Datagrams held at most.
    pub max_datagrams: usize,
    /// How long one datagram is held at most; an older one is dropped, hold or not.
    pub max_hold: Duration,
    /// Datagrams delivered at once at the release, then every `release_interval` as many
    /// again, until none is left (`usize::MAX`: all at once). The server's socket must take
    /// a step without reading: a burst larger than its receive buffer is lost there (measured:
    /// 200 datagrams of 228 bytes at once, 34 lost to the default 208 KiB `SO_RCVBUF`).
    pub release_batch: usize,
    /// The pause between two release steps.
    pub release_interval: Duration,
}

impl Default for HoldLimits {
    /// 8 MiB, 8192 datagrams, 3 s: a freeze of a second or two with room to spare (the
    /// measured dump + restore is 20-200 ms, more with large memory), and several seconds of a
    /// client sending 1 MB/s. Released 64 per millisecond: 64 full-size QUIC datagrams take
    /// about 150 KB of a socket's receive buffer (default 208 KiB); 8192 are out in 128 ms.
    fn default() -> Self {
        Self {
            max_bytes: 8 << 20,
            max_datagrams: 8192,
            max_hold: Duration::from_secs(3),
            release_batch: 64,
            release_interval: Duration::from_millis(1),
        }
    }
}

/// What one hold did, returned by `Front::release`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HoldStats {
    /// Datagrams taken into the hold (also while its release ran).
    pub held: u64,
    /// Datagrams delivered at the release, in arrival order (`held` minus the time drops).
    pub delivered: u64,
    /// Datagrams dropped because `max_bytes` would have been crossed.
    pub dropped_bytes_bound: u64,
    /// Datagrams dropped because `max_datagrams` were already held.
    pub dropped_datagrams_bound: u64,
    /// Datagrams dropped after `max_hold` in the hold.
    pub dropped_time_bound: u64,
    /// Datagrams the kernel dropped before the hold saw them: its queue was full or the
    /// netlink socket could not take them (the kernel's counters, `queue_dropped +
    /// queue_user_dropped`).
    pub dropped_in_kernel: u64,
    /// The most datagrams held at once.
    pub peak_datagrams: u64,
    /// The most bytes held at once.
    pub peak_bytes: u64,
    /// Messages the queue could not use: malformed netlink messages and refused verdicts.
    pub queue_errors: u64,
    /// From `hold()` to `release()`.
    pub held_for: Duration,
    /// From `release()` to the last delivery (the paced steps).
    pub released_in: Duration,
}

/// What to do with a datagram the kernel queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// No hold: let it through at once.
    Accept,
    /// Keep it until the release.
    Hold,
    /// Drop it: it would cross a bound.
    Drop,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    id: u32,
    len: u64,
    at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No hold: everything passes.
    Passing,
    /// Holding since the instant.
    Holding(Instant),
    /// Releasing, in steps: the next one is due at `next`. Datagrams that arrive meanwhile
    /// queue behind the held ones, so the order stays the order of arrival.
    Releasing { since: Instant, next: Instant },
}

/// The hold's state: the phase, and the held datagrams in arrival order.
#[derive(Debug)]
pub(crate) struct Book {
    limits: HoldLimits,
    phase: Phase,
    held: VecDeque<Held>,
    bytes: u64,
    stats: HoldStats,
}

impl Book {
    pub(crate) fn new(limits: HoldLimits) -> Self {
        Self {
            limits,
            phase: Phase::Passing,
            held: VecDeque::new(),
            bytes: 0,
            stats: HoldStats::default(),
        }
    }

    /// Starts a hold with fresh statistics. Returns false (and changes nothing) unless
    /// passing.
    pub(crate) fn start(&mut self, now: Instant) -> bool {
        if self.phase != Phase::Passing {
            return false;
        }
        self.phase = Phase::Holding(now);
        self.stats = HoldStats::default();
        true
    }

    /// The decision for a datagram of `len` bytes queued as `id`.
    pub(crate) fn on_packet(&mut self, id: u32, len: u32, now: Instant) -> Decision {
        if self.phase == Phase::Passing {
            return Decision::Accept;
        }
        let len = u64::from(len);
        if self.held.len() >= self.limits.max_datagrams {
            self.stats.dropped_datagrams_bound += 1;
            return Decision::Drop;
        }
        if self.bytes.saturating_add(len) > self.limits.max_bytes {
            self.stats.dropped_bytes_bound += 1;
            return Decision::Drop;
        }
        self.held.push_back(Held { id, len, at: now });
        self.bytes += len;
        self.stats.held += 1;
        self.stats.peak_datagrams = self.stats.peak_datagrams.max(self.held.len() as u64);
        self.stats.peak_bytes = self.stats.peak_bytes.max(self.bytes);
        Decision::Hold
    }

    /// The ids of the datagrams held for `max_hold` or longer at `now`, oldest first: they
    /// are forgotten and counted, the caller drops them.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<u32> {
        let mut expired = Vec::new();
        while let Some(first) = self.held.front() {
            if now.saturating_duration_since(first.at) < self.limits.max_hold {
                break;
            }
            self.bytes -= first.len;
            expired.push(first.id);
            self.held.pop_front();
        }
        self.stats.dropped_time_bound += expired.len() as u64;
        expired
    }

    /// When something is due: the oldest held datagram expires, or a release step.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let expiry = self.held.front().map(|h| h.at + self.limits.max_hold);
        let step = match self.phase {
            Phase::Releasing { next, .. } => Some(next),
            _ => None,
        };
        match (expiry, step) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A queue error to count in the current hold.
    pub(crate) fn count_error(&mut self) {
        self.stats.queue_errors += 1;
    }

    /// Starts releasing at `now`; the first step is due at once. False unless holding.
    pub(crate) fn release(&mut self, now: Instant) -> bool {
        let Phase::Holding(started) = self.phase else {
            return false;
        };
        self.stats.held_for = now.saturating_duration_since(started);
        self.phase = Phase::Releasing {
            since: now,
            next: now,
        };
        true
    }

    /// The release step due at `now`, if any: the id up to which to accept (one batch
    /// verdict: the kernel takes every queued id up to it, in queue order).
    pub(crate) fn step(&mut self, now: Instant) -> Option<u32> {
        let Phase::Releasing { since, next } = self.phase else {
            return None;
        };
        if now < next {
            return None;
        }
        let n = self.limits.release_batch.max(1).min(self.held.len());
        let last = self.held.drain(..n).fold(None, |_, h| {
            self.bytes -= h.len;
            Some(h.id)
        });
        self.stats.delivered += n as u64;
        self.phase = Phase::Releasing {
            since,
            next: now + self.limits.release_interval,
        };
        last
    }

    /// Delivers everything at once (the front is closing): the id up to which to accept.
    /// A hold becomes a release that [`Book::finished`] then ends.
    pub(crate) fn step_all(&mut self, now: Instant) -> Option<u32> {
        if !self.release(now) && self.phase == Phase::Passing {
            return None;
        }
        let last = self.held.back().map(|h| h.id);
        self.stats.delivered += self.held.len() as u64;
        self.held.clear();
        self.bytes = 0;
        last
    }

    /// When a release has nothing left: its statistics, and the book passes again.
    pub(crate) fn finished(&mut self, now: Instant) -> Option<HoldStats> {
        let since = match self.phase {
            Phase::Releasing { since, .. } if self.held.is_empty() => since,
            _ => return None,
        };
        self.stats.released_in = now.saturating_duration_since(since);
        self.phase = Phase::Passing;
        Some(self.stats)
    }

    /// Datagrams held now.
    #[cfg(test)]
    fn held_len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn limits(bytes: u64, datagrams: usize, hold_ms: u64) -> HoldLimits {
        HoldLimits {
            max_bytes: bytes,
            max_datagrams: datagrams,
            max_hold: ms(hold_ms),
            release_batch: usize::MAX,
            release_interval: ms(1),
        }
    }

    /// Releases at `now` and runs every step at its due time; the accepted ids' batches and
    /// the statistics.
    fn release_all(b: &mut Book, mut now: Instant) -> (Vec<u32>, HoldStats) {
        assert!(b.release(now));
        let mut lasts = Vec::new();
        loop {
            lasts.extend(b.step(now));
            if let Some(stats) = b.finished(now) {
                return (lasts, stats);
            }
            now = b.next_deadline().expect("a step is due");
        }
    }

    #[test]
    fn passes_when_not_holding() {
        let t = Instant::now();
        let mut b = Book::new(HoldLimits::default());
        assert_eq!(b.on_packet(1, 100, t), Decision::Accept);
        assert!(!b.release(t));
        assert_eq!(b.step(t), None);
        assert_eq!(b.finished(t), None);
    }

    #[test]
    fn holds_in_order_and_delivers_up_to_the_last() {
        let t = Instant::now();
        let mut b = Book::new(limits(10_000, 10, 1000));
        assert!(b.start(t));
        assert!(!b.start(t), "a second hold is refused");
        for id in 5..9 {
            assert_eq!(b.on_packet(id, 100, t), Decision::Hold);
        }
        let (lasts, stats) = release_all(&mut b, t + ms(10));
        assert_eq!(lasts, vec![8]);
        assert_eq!((stats.held, stats.delivered), (4, 4));
        assert_eq!(stats.held_for, ms(10));
        assert_eq!((stats.peak_datagrams, stats.peak_bytes), (4, 400));
        assert_eq!(b.on_packet(9, 100, t), Decision::Accept);
        assert!(b.start(t), "a new hold after the release");
    }

    #[test]
    fn a_paced_release_keeps_arrivals_behind_the_held() {
        let t = Instant::now();
        let mut b = Book::new(HoldLimits {
            release_batch: 2,
            ..limits(10_000, 10, 1000)
        });
        b.start(t);
        for id in 0..5 {
            b.on_packet(id, 10, t);
        }
        assert!(b.release(t));
        assert!(!b.start(t), "no hold while releasing");
        assert_eq!(b.step(t), Some(1));
        assert_eq!(b.step(t), None, "the next step is not due yet");
        assert_eq!(b.next_deadline(), Some(t + ms(1)));
        // Arrives during the release: held behind the rest.
        assert_eq!(b.on_packet(5, 10, t), Decision::Hold);
        assert_eq!(b.step(t + ms(1)), Some(3));
        assert_eq!(b.finished(t + ms(1)), None);
        assert_eq!(b.step(t + ms(2)), Some(5));
        let stats = b.finished(t + ms(2)).unwrap();
        assert_eq!((stats.held, stats.delivered), (6, 6));
        assert_eq!(stats.released_in, ms(2));
        assert_eq!(b.on_packet(6, 10, t), Decision::Accept);
    }

    #[test]
    fn count_and_byte_bounds_drop_and_count() {
        let t = Instant::now();
        let mut b = Book::new(limits(250, 3, 1000));
        b.start(t);
        assert_eq!(b.on_packet(1, 100, t), Decision::Hold);
        assert_eq!(b.on_packet(2, 100, t), Decision::Hold);
        assert_eq!(b.on_packet(3, 100, t), Decision::Drop); // 300 > 250 bytes
        assert_eq!(b.on_packet(4, 50, t), Decision::Hold); // exactly 250
        assert_eq!(b.on_packet(5, 1, t), Decision::Drop); // 3 datagrams held
        let (lasts, s) = release_all(&mut b, t);
        assert_eq!(lasts, vec![4]);
        assert_eq!(
            (
                s.held,
                s.delivered,
                s.dropped_bytes_bound,
                s.dropped_datagrams_bound
            ),
            (3, 3, 1, 1)
        );
    }

    #[test]
    fn time_bound_expires_the_oldest_first() {
        let t = Instant::now();
        let mut b = Book::new(limits(10_000, 10, 100));
        b.start(t);
        b.on_packet(1, 10, t);
        b.on_packet(2, 10, t + ms(50));
        assert_eq!(b.next_deadline(), Some(t + ms(100)));
        assert!(b.expire(t + ms(99)).is_empty());
        assert_eq!(b.expire(t + ms(100)), vec![1]);
        assert_eq!(b.held_len(), 1);
        b.on_packet(3, 10, t + ms(120));
        assert_eq!(b.expire(t + ms(160)), vec![2]);
        let (lasts, s) = release_all(&mut b, t + ms(160));
        assert_eq!(lasts, vec![3]);
        assert_eq!((s.held, s.delivered, s.dropped_time_bound), (3, 1, 2));
    }

    #[test]
    fn closing_delivers_everything_at_once() {
        let t = Instant::now();
        let mut b = Book::new(HoldLimits {
            release_batch: 1,
            ..limits(10_000, 10, 1000)
        });
        b.start(t);
        for id in 0..3 {
            b.on_packet(id, 10, t);
        }
        assert_eq!(b.finished(t), None, "a hold does not finish by itself");
        assert_eq!(b.step_all(t + ms(5)), Some(2));
        let s = b.finished(t + ms(5)).unwrap();
        assert_eq!((s.delivered, s.held_for), (3, ms(5)));
        assert_eq!(b.step_all(t), None);
    }

    #[test]
    fn a_flood_stays_within_the_bounds() {
        let t = Instant::now();
        let mut b = Book::new(limits(1 << 20, 100, 1000));
        b.start(t);
        for id in 0..100_000u32 {
            b.on_packet(id, 1200, t);
            assert!(b.held_len() <= 100);
        }
        let (_, s) = release_all(&mut b, t);
        assert_eq!(
            s.held + s.dropped_datagrams_bound + s.dropped_bytes_bound,
            100_000
        );
        assert!(s.peak_bytes <= 1 << 20);
    }
}
