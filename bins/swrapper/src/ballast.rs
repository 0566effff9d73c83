//! Ballast: resident memory the server holds, so that a benchmark can move servers of a given
//! size, and a writer that keeps rewriting part of it (the pages a live process dirties while
//! it is being copied).
//!
//! ```text
//!  Ballast::allocate(N MiB)   check N against MemTotal (/proc/meminfo), allocate, write every
//!                             word (pseudo-random: the pages are resident and incompressible)
//!  Ballast::start_dirtying(R) a thread of its own: every TICK (10 ms) rewrites the next
//!                             R MiB / 100 of the ballast, round and round; counts slices, bytes
//!  drop                       stops the thread, frees the memory
//! ```
//!
//! The writer is an OS thread, not a tokio task: it never holds up the runtime that serves
//! the connections, and it touches no lock the serving path takes (its counters are atomics).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One mebibyte.
pub const MIB: u64 = 1024 * 1024;

/// How often the writer rewrites a slice.
pub const TICK: Duration = Duration::from_millis(10);

/// Ticks per second (the slice is the rate divided by this).
const TICKS_PER_S: u64 = 100;

/// Errors of the ballast.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BallastError {
    /// The size does not fit in this machine's address arithmetic.
    #[error("ballast of {mib} MiB overflows a byte count")]
    Overflow {
        /// The size asked for.
        mib: u64,
    },
    /// More memory than the machine has.
    #[error("ballast of {mib} MiB exceeds the machine's memory ({total_mib} MiB, MemTotal)")]
    TooLarge {
        /// The size asked for.
        mib: u64,
        /// The machine's memory.
        total_mib: u64,
    },
    /// /proc/meminfo could not be read.
    #[error("reading /proc/meminfo: {0}")]
    MemInfo(#[source] std::io::Error),
    /// /proc/meminfo has no usable `MemTotal:` line.
    #[error("/proc/meminfo has no `MemTotal: <n> kB` line")]
    NoMemTotal,
    /// The allocator refused.
    #[error("cannot allocate a ballast of {mib} MiB")]
    Alloc {
        /// The size asked for.
        mib: u64,
    },
    /// A dirtying rate without a ballast to dirty.
    #[error("--dirty-mib-per-s {rate} needs a ballast (--ballast-mib > 0)")]
    NothingToDirty {
        /// The rate asked for.
        rate: u64,
    },
    /// A dirtying rate above the whole ballast every tick.
    #[error(
        "--dirty-mib-per-s {rate} is more than the whole ballast ({mib} MiB) every 10 ms tick \
         (at most {max})"
    )]
    RateTooHigh {
        /// The rate asked for.
        rate: u64,
        /// The ballast's size.
        mib: u64,
        /// The largest rate accepted for this ballast.
        max: u64,
    },
    /// The writer is already running.
    #[error("the ballast is already being dirtied")]
    AlreadyDirtying,
    /// The writer thread could not be started.
    #[error("starting the dirtying thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// `MemTotal` of a /proc/meminfo text, in bytes.
pub fn parse_mem_total(meminfo: &str) -> Result<u64, BallastError> {
    let line = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .ok_or(BallastError::NoMemTotal)?;
    let mut words = line.split_whitespace();
    let kib: u64 = words
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or(BallastError::NoMemTotal)?;
    if words.next() != Some("kB") {
        return Err(BallastError::NoMemTotal);
    }
    kib.checked_mul(1024).ok_or(BallastError::NoMemTotal)
}

/// The machine's memory (`MemTotal`), in bytes.
pub fn mem_total() -> Result<u64, BallastError> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(BallastError::MemInfo)?;
    parse_mem_total(&text)
}

/// Checks a ballast size against a machine of `mem_total` bytes; the size in bytes.
pub fn check_size(mib: u64, mem_total: u64) -> Result<usize, BallastError> {
    let bytes = mib.checked_mul(MIB).ok_or(BallastError::Overflow { mib })?;
    if bytes > mem_total {
        return Err(BallastError::TooLarge {
            mib,
            total_mib: mem_total / MIB,
        });
    }
    usize::try_from(bytes).map_err(|_| BallastError::Overflow { mib })
}

/// Checks a dirtying rate (MiB per second) against a ballast of `mib` MiB; 0 is always fine.
pub fn check_rate(rate: u64, mib: u64) -> Result<(), BallastError> {
    if rate == 0 {
        return Ok(());
    }
    if mib == 0 {
        return Err(BallastError::NothingToDirty { rate });
    }
    let max = mib.saturating_mul(TICKS_PER_S);
    if rate > max {
        return Err(BallastError::RateTooHigh { rate, mib, max });
    }
    Ok(())
}

/// Counters of the writer, readable while it runs.
#[derive(Debug, Default)]
pub struct DirtyStats {
    slices: AtomicU64,
    bytes: AtomicU64,
}

impl DirtyStats {
    /// Slices rewritten so far (one per tick).
    pub fn slices(&self) -> u64 {
        self.slices.load(Ordering::Relaxed)
    }

    /// Bytes rewritten so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Where the memory is: here, or lent to the writer thread (which hands it back when stopped).
#[derive(Debug)]
enum Memory {
    Held(Vec<u64>),
    Dirtying {
        stop: Arc<AtomicBool>,
        thread: JoinHandle<Vec<u64>>,
    },
    /// Transient (while handing the memory over).
    Gone,
}

/// Resident memory held by the server, optionally rewritten at a steady rate.
#[derive(Debug)]
pub struct Ballast {
    mib: u64,
    /// Address of the first byte (for tests that inspect the pages).
    addr: usize,
    memory: Memory,
    stats: Arc<DirtyStats>,
}

impl Ballast {
    /// Allocates `mib` MiB and writes every word of it, so that it is resident when this
    /// returns. Refuses more than the machine's memory. `0` holds nothing.
    pub fn allocate(mib: u64) -> Result<Self, BallastError> {
        if mib == 0 {
            return Self::allocate_within(0, 0);
        }
        Self::allocate_within(mib, mem_total()?)
    }

    /// [`Ballast::allocate`] on a machine of `mem_total` bytes.
    pub fn allocate_within(mib: u64, mem_total: u64) -> Result<Self, BallastError> {
        let bytes = check_size(mib, mem_total)?;
        let words = bytes / 8;
        let mut memory: Vec<u64> = Vec::new();
        memory
            .try_reserve_exact(words)
            .map_err(|_| BallastError::Alloc { mib })?;
        // Pseudo-random words: every page is written (resident) and incompressible, like a
        // real heap rather than a run of one byte an image pipeline would squeeze to nothing.
        let mut x = 0x9E37_79B9_7F4A_7C15_u64;
        memory.extend((0..words).map(|_| {
            x = xorshift(x);
            x
        }));
        Ok(Self {
            mib,
            addr: memory.as_ptr() as usize,
            memory: Memory::Held(memory),
            stats: Arc::new(DirtyStats::default()),
        })
    }

    /// The ballast's size in MiB.
    pub fn mib(&self) -> u64 {
        self.mib
    }

    /// The address range of the ballast's bytes (start, length in bytes).
    pub fn range(&self) -> (usize, usize) {
        (self.addr, (self.mib * MIB) as usize)
    }

    /// The writer's counters (all 0 when it does not run).
    pub fn stats(&self) -> Arc<DirtyStats> {
        self.stats.clone()
    }

    /// Starts a thread that rewrites `rate` MiB per second of the ballast: every [`TICK`] the
    /// next `rate / 100` MiB, wrapping around. `0` starts nothing.
    pub fn start_dirtying(&mut self, rate: u64) -> Result<(), BallastError> {
        check_rate(rate, self.mib)?;
        if rate == 0 {
            return Ok(());
        }
        let memory = match std::mem::replace(&mut self.memory, Memory::Gone) {
            Memory::Held(m) => m,
            other => {
                self.memory = other;
                return Err(BallastError::AlreadyDirtying);
            }
        };
        // Bytes per tick, in words (at least one).
        let slice = ((rate * MIB / TICKS_PER_S / 8) as usize).max(1);
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, stats) = (stop.clone(), self.stats.clone());
        let spawned = std::thread::Builder::new()
            .name("ballast-dirty".to_owned())
            .spawn(move || dirty_loop(memory, slice, &stop2, &stats));
        match spawned {
            Ok(thread) => {
                self.memory = Memory::Dirtying { stop, thread };
                Ok(())
            }
            Err(e) => Err(BallastError::Thread(e)),
        }
    }

    /// Stops the writer (if it runs) and takes the memory back; the counters stay.
    pub fn stop_dirtying(&mut self) {
        if let Memory::Dirtying { stop, thread } = std::mem::replace(&mut self.memory, Memory::Gone)
        {
            stop.store(true, Ordering::Relaxed);
            thread.thread().unpark();
            // Err only if the writer panicked: its memory is gone with it.
            self.memory = thread.join().map_or(Memory::Gone, Memory::Held);
        }
    }

    /// A digest of every 4 KiB page of the ballast (to see which pages changed); `None` while
    /// the writer runs.
    pub fn page_digests(&self) -> Option<Vec<u64>> {
        match &self.memory {
            Memory::Held(m) => Some(
                m.chunks(4096 / 8)
                    .map(|p| p.iter().fold(0u64, |d, w| d.rotate_left(5) ^ w))
                    .collect(),
            ),
            _ => None,
        }
    }
}

impl Drop for Ballast {
    fn drop(&mut self) {
        self.stop_dirtying();
    }
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// The writer: a slice per tick on an absolute schedule; a late tick is not made up in a burst
/// (the schedule restarts from now), so the rate never exceeds what was asked.
fn dirty_loop(
    mut memory: Vec<u64>,
    slice: usize,
    stop: &AtomicBool,
    stats: &DirtyStats,
) -> Vec<u64> {
    let len = memory.len();
    let mut pos = 0usize;
    let mut x = 0xD1B5_4A32_D192_ED03_u64;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let mut left = slice;
        while left > 0 {
            let n = left.min(len - pos);
            for w in &mut memory[pos..pos + n] {
                x = xorshift(x);
                *w = x;
            }
            pos = (pos + n) % len;
            left -= n;
        }
        stats.slices.fetch_add(1, Ordering::Relaxed);
        stats.bytes.fetch_add((slice * 8) as u64, Ordering::Relaxed);
        next += TICK;
        let now = Instant::now();
        if next > now {
            // Woken early by the drop.
            std::thread::park_timeout(next - now);
        } else {
            next = now;
        }
    }
    memory
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn meminfo_is_parsed_and_bad_text_refused() {
        let text = "MemTotal:       24684096 kB\nMemFree:        22316220 kB\n";
        assert_eq!(parse_mem_total(text).unwrap(), 24_684_096 * 1024);
        for bad in [
            "",
            "MemFree: 1 kB\n",
            "MemTotal: lots kB\n",
            "MemTotal: 12\n",
            "MemTotal: 12 MB\n",
            "MemTotal: 99999999999999999999 kB\n",
            "MemTotal: 18446744073709551615 kB\n",
        ] {
            assert!(
                matches!(parse_mem_total(bad), Err(BallastError::NoMemTotal)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn absurd_sizes_and_rates_are_refused() {
        let gib = 1024 * MIB;
        assert!(matches!(
            check_size(u64::MAX, gib),
            Err(BallastError::Overflow { .. })
        ));
        let err = check_size(2048, gib).unwrap_err();
        assert!(matches!(
            err,
            BallastError::TooLarge {
                mib: 2048,
                total_mib: 1024
            }
        ));
        assert!(err.to_string().contains("MemTotal"), "{err}");
        assert_eq!(check_size(1024, gib).unwrap(), gib as usize);
        assert!(matches!(
            Ballast::allocate(u64::MAX / 2),
            Err(BallastError::Overflow { .. })
        ));
        check_rate(0, 0).unwrap();
        check_rate(1600, 16).unwrap();
        assert!(matches!(
            check_rate(1, 0),
            Err(BallastError::NothingToDirty { rate: 1 })
        ));
        assert!(matches!(
            check_rate(1601, 16),
            Err(BallastError::RateTooHigh { max: 1600, .. })
        ));
        let mut b = Ballast::allocate_within(1, gib).unwrap();
        assert!(matches!(
            b.start_dirtying(101),
            Err(BallastError::RateTooHigh { .. })
        ));
        b.start_dirtying(1).unwrap();
        assert!(matches!(
            b.start_dirtying(1),
            Err(BallastError::AlreadyDirtying)
        ));
    }
}
