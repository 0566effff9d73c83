//! The ballast: resident memory (RSS from /proc/.../statm, in this process and in the swrapper
//! binary before it is ready), pages really rewritten at the requested rate (the writer's count
//! of slices and bytes over 1 s, pages whose content changed, and the kernel's soft-dirty bits
//! where the kernel tracks them), and the flags' bad input.

// Test helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Seek, SeekFrom};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use swrapper::ballast::{Ballast, MIB};

/// The tests measure this process's memory: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .unwrap()
        .unwrap() as u64
}

/// Resident bytes of a process, from /proc/<pid>/statm (second field, in pages).
fn rss(pid: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap();
    let pages: u64 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * page_size()
}

#[test]
fn the_ballast_is_resident() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let before = rss("self");
    let ballast = Ballast::allocate(64).unwrap();
    let after = rss("self");
    let grown = after.saturating_sub(before);
    assert!(
        grown >= 62 * MIB,
        "RSS grew by {} MiB for a 64 MiB ballast",
        grown / MIB
    );
    drop(ballast);
    assert!(rss("self") < after - 32 * MIB, "the ballast was not freed");
}

/// Pages of `range` whose soft-dirty bit is set (bit 55 of /proc/self/pagemap), or None when
/// the kernel does not track soft-dirty pages.
fn soft_dirty_pages(range: (usize, usize)) -> Option<u64> {
    let page = page_size() as usize;
    let (first, last) = (range.0 / page, (range.0 + range.1 - 1) / page);
    let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
    f.seek(SeekFrom::Start((first * 8) as u64)).unwrap();
    let mut buf = vec![0u8; (last - first + 1) * 8];
    f.read_exact(&mut buf).unwrap();
    let dirty = buf
        .chunks_exact(8)
        .filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) & (1 << 55) != 0)
        .count() as u64;
    Some(dirty)
}

/// Whether writing a page after clearing the soft-dirty bits sets its bit again (the kernel
/// has CONFIG_MEM_SOFT_DIRTY, as CRIU's incremental dumps need).
fn soft_dirty_tracked() -> bool {
    let mut probe = vec![1u8; 4 * page_size() as usize];
    if !clear_soft_dirty() {
        return false;
    }
    let range = (probe.as_ptr() as usize, probe.len());
    if soft_dirty_pages(range) != Some(0) {
        return false;
    }
    for b in probe.iter_mut().step_by(64) {
        *b = 2;
    }
    std::hint::black_box(&probe);
    soft_dirty_pages(range).is_some_and(|n| n >= 3)
}

fn clear_soft_dirty() -> bool {
    std::fs::write("/proc/self/clear_refs", "4").is_ok()
}

#[test]
fn dirtying_rewrites_pages_at_the_requested_rate() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    const RATE: u64 = 32;
    let mut ballast = Ballast::allocate(128).unwrap();
    let stats = ballast.stats();
    // Does this kernel track soft-dirty pages? A page written after a clear must show it.
    let tracked = soft_dirty_tracked();
    let before = ballast.page_digests().unwrap();
    ballast.start_dirtying(RATE).unwrap();
    assert_eq!(
        ballast.page_digests(),
        None,
        "no reading while the writer runs"
    );
    std::thread::sleep(Duration::from_millis(100));
    let (slices0, bytes0) = (stats.slices(), stats.bytes());
    if tracked {
        assert!(clear_soft_dirty());
    }
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let dirty_pages = soft_dirty_pages(ballast.range());
    let secs = t0.elapsed().as_secs_f64();
    let (slices, bytes) = (stats.slices() - slices0, stats.bytes() - bytes0);
    let rate = bytes as f64 / MIB as f64 / secs;
    assert!(
        (RATE as f64 * 0.5..=RATE as f64 * 1.5).contains(&rate),
        "{rate:.1} MiB/s rewritten for {RATE} asked ({slices} slices in {secs:.2} s)"
    );
    // One slice per 10 ms tick.
    assert!(
        (50..=150).contains(&slices),
        "{slices} slices in {secs:.2} s"
    );
    // The pages really changed: as many as were rewritten over the whole run (the 100 ms
    // lead-in included), give or take the slices in flight when it stopped.
    ballast.stop_dirtying();
    let total = stats.bytes();
    let after = ballast.page_digests().unwrap();
    let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count() as u64 * 4096;
    assert!(
        changed >= total / 2 && changed <= total * 3 / 2 + MIB,
        "{} MiB of pages changed, {} MiB rewritten by the count",
        changed / MIB,
        total / MIB
    );
    if tracked {
        let dirty = dirty_pages.unwrap() * page_size();
        let expected = (RATE as f64 * secs * MIB as f64) as u64;
        assert!(
            dirty >= expected / 2 && dirty <= expected * 3 / 2 + 4 * MIB,
            "{} MiB of pages soft-dirty in {secs:.2} s, {RATE} MiB/s asked",
            dirty / MIB
        );
    } else {
        eprintln!("SKIP: soft-dirty page tracking unavailable; checked the writer's count only");
    }
    drop(ballast);
}

#[test]
fn the_binary_holds_its_ballast_before_it_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_swrapper"))
        .args(["--listen", "127.0.0.1:0", "--log", "warn"])
        .args(["--ballast-mib", "96", "--dirty-mib-per-s", "10"])
        .arg("--cert-out")
        .arg(dir.path().join("cert.pem"))
        .arg("--admin-dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let admin = admin_api::AdminDir::open(dir.path()).unwrap();
    let ready = admin.wait_event::<admin_api::Ready>(None, Duration::from_secs(30));
    let resident = rss(&child.id().to_string());
    let _ = child.kill();
    let _ = child.wait();
    let ready = ready.unwrap();
    assert_eq!(ready.pid, child.id());
    assert!(
        resident >= 96 * MIB,
        "swrapper --ballast-mib 96 holds {} MiB when ready",
        resident / MIB
    );
}

fn swrapper(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_swrapper"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("SWRAPPER_BALLAST_MIB")
        .env_remove("SWRAPPER_DIRTY_MIB_PER_S")
        .output()
        .unwrap()
}

#[test]
fn absurd_ballasts_are_refused() {
    let err = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    // ~95 TiB: more than any machine this runs on.
    let o = swrapper(&["--ballast-mib", "100000000"]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(err(&o).contains("MemTotal"), "{}", err(&o));
    let o = swrapper(&["--ballast-mib", "18446744073709551615"]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(err(&o).contains("overflows"), "{}", err(&o));
    let o = swrapper(&["--ballast-mib", "-1"]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    let o = swrapper(&["--ballast-mib", "lots"]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(err(&o).contains("--ballast-mib"), "{}", err(&o));
    let o = swrapper(&["--dirty-mib-per-s", "5"]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(err(&o).contains("needs a ballast"), "{}", err(&o));
    let o = swrapper(&["--ballast-mib", "1", "--dirty-mib-per-s", "101"]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(err(&o).contains("at most 100"), "{}", err(&o));
    let o = Command::new(env!("CARGO_BIN_EXE_swrapper"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    for needle in ["--ballast-mib", "--dirty-mib-per-s", "MemTotal"] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}
