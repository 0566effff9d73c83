//! Tests with the real criu: a small process (a perl loop that writes a counter, as an
//! unprivileged user, its own session) dumped in one network namespace and restored in
//! another, through workers and through the command line. They need root and criu.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use admin_api::CriuRoute;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::criu::{self, DumpArgs, DumpAs, RestoreArgs};
use crate::criu_rpc::RpcError;
use crate::{kdat, sys};

/// The account the process runs as (nobody).
const USER: DumpAs = DumpAs {
    uid: 65534,
    gid: 65534,
};

fn criu_available() -> bool {
    Command::new("criu")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ready() -> bool {
    test_support::require("needs root (ip netns, criu)", test_support::is_root())
        && test_support::require(
            "needs criu (`cargo xtask setup` installs it)",
            criu_available(),
        )
}

/// Everything a test makes: two namespaces, a private work folder on /dev/shm (images, kdat
/// caches, the counter), and the process, killed when dropped.
struct World {
    a: test_support::netns::Netns,
    b: test_support::netns::Netns,
    work: tempfile::TempDir,
    pid: i32,
    /// Whether the process is in `b`.
    in_b: bool,
    round: u32,
}

impl World {
    fn new() -> Option<Self> {
        let a = test_support::require_ok(
            "a network namespace",
            test_support::netns::Netns::create("qlmh-criu"),
        )?;
        let b = test_support::require_ok(
            "a network namespace",
            test_support::netns::Netns::create("qlmh-criu"),
        )?;
        let work = tempfile::Builder::new()
            .prefix("qlmh-criu-test-")
            .tempdir_in(kdat::BASE)
            .expect("a work folder on /dev/shm");
        // The dumping account must reach its kdat folder, the counter and the images below.
        std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let counter = work.path().join("counter");
        std::fs::create_dir(&counter).unwrap();
        chown(&counter);
        let mut w = Self {
            a,
            b,
            work,
            pid: 0,
            in_b: false,
            round: 0,
        };
        w.pid = w.start();
        Some(w)
    }

    fn counter_file(&self) -> PathBuf {
        self.work.path().join("counter").join("n")
    }

    fn start(&self) -> i32 {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.a.path().display()))
            .arg("--")
            .arg("setpriv")
            .arg(format!("--reuid={}", USER.uid))
            .arg(format!("--regid={}", USER.gid))
            .arg("--clear-groups")
            .arg("perl")
            .arg("-e")
            .arg(
                "$i = 0; while (1) { $i++; open(my $f, '>', $ARGV[0]) or die; print $f $i; \
                 close $f; select(undef, undef, undef, 0.02) }",
            )
            .arg(self.counter_file())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir("/");
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            c.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let child = c.spawn().expect("starting the process");
        let pid = i32::try_from(child.id()).unwrap();
        // Reaped by PID (sys::reap), not through `child`.
        drop(child);
        self.wait_counting(pid);
        pid
    }

    fn count(&self) -> u64 {
        std::fs::read_to_string(self.counter_file())
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until the process's counter goes up: it runs.
    fn wait_counting(&self, pid: i32) {
        let before = self.count();
        let start = Instant::now();
        while self.count() <= before + 1 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "process {pid} does not count (stuck at {before})"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn here(&self) -> PathBuf {
        if self.in_b {
            self.b.path()
        } else {
            self.a.path()
        }
    }

    fn there(&self) -> PathBuf {
        if self.in_b {
            self.a.path()
        } else {
            self.b.path()
        }
    }

    /// A fresh image folder, the dumping account's.
    fn images(&mut self) -> PathBuf {
        self.round += 1;
        let dir = self.work.path().join(format!("img{}", self.round));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        chown(&dir);
        dir
    }

    fn kdat(&self, uid: u32, gid: u32) -> PathBuf {
        kdat::prepare(self.work.path(), uid, gid).expect("a kdat folder")
    }

    fn dump_args(&mut self, cache: bool) -> DumpArgs {
        DumpArgs {
            pid: self.pid,
            netns: self.here(),
            dir: self.images(),
            parent: None,
            user: Some(USER),
            kdat: cache.then(|| self.kdat(USER.uid, USER.gid)),
        }
    }

    fn restore_args(&self, dir: &Path, cache: bool) -> RestoreArgs {
        RestoreArgs {
            netns: self.there(),
            dir: dir.to_path_buf(),
            log_name: "restore.log".into(),
            kdat: cache.then(|| self.kdat(0, 0)),
        }
    }

    /// After a dump: the PID is free again, the process moved.
    fn moved(&mut self, pid: i32, dir: &Path) {
        self.pid = pid;
        self.in_b = !self.in_b;
        self.wait_counting(pid);
        let _ = std::fs::remove_dir_all(dir);
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if self.pid > 0 {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
            let _ = sys::reap(self.pid, Duration::from_secs(5));
        }
    }
}

fn chown(path: &Path) {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(USER.uid)),
        Some(nix::unistd::Gid::from_raw(USER.gid)),
    )
    .unwrap();
}

fn status_field(pid: i32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

/// Dump and restore through workers: the process runs again in the other namespace, with its
/// credentials, as this process's child (rst_sibling), and both kdat caches exist after the
/// first call.
#[test]
fn workers_dump_and_restore_a_real_process_with_the_kdat_cache() {
    if !ready() {
        return;
    }
    let Some(mut w) = World::new() else { return };
    for round in 0..2 {
        let args = w.dump_args(true);
        let dump_kdat = args.kdat.clone().unwrap();
        let restore_args = w.restore_args(&args.dir, true);
        let restore_kdat = restore_args.kdat.clone().unwrap();
        let dumper = criu::dump_worker(&args.netns, args.user, args.kdat.as_deref()).unwrap();
        let restorer = criu::restore_worker(&restore_args.netns, Some(&restore_kdat)).unwrap();
        let t = criu::dump_via(Ok(dumper), &args).unwrap();
        assert_eq!(t.route, Some(CriuRoute::Worker));
        assert!(
            t.startup_ms.is_some(),
            "{t:?}: {:?} {}",
            std::fs::read_dir(&args.dir)
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>()),
            std::fs::read_to_string(args.dir.join("dump.log"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("eiz") || l.contains("reez") || l.contains("inished"))
                .take(8)
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            dump_kdat.join(kdat::FILE).exists(),
            "the dump's kdat cache after the first call"
        );
        sys::reap(w.pid, Duration::from_secs(5)).unwrap();
        let (pid, t) = criu::restore_via(Ok(restorer), &restore_args).unwrap();
        assert_eq!(t.route, Some(CriuRoute::Worker));
        assert!(restore_kdat.join(kdat::FILE).exists());
        assert_eq!(pid, w.pid, "restored under its PID (round {round})");
        // rst_sibling: the restored process is the worker's parent's child, this process's.
        assert_eq!(
            sys::parent_pid(pid),
            Some(i32::try_from(std::process::id()).unwrap())
        );
        assert!(
            status_field(pid, "Uid:").starts_with("65534"),
            "{}",
            status_field(pid, "Uid:")
        );
        assert!(status_field(pid, "Gid:").starts_with("65534"));
        assert_eq!(
            sys::netns_inode(Path::new(&format!("/proc/{pid}/ns/net"))).unwrap(),
            sys::netns_inode(&w.there()).unwrap()
        );
        let dir = args.dir.clone();
        w.moved(pid, &dir);
    }
}

/// A real worker killed before its request is a typed error, and the command line takes over.
#[test]
fn a_real_worker_that_died_falls_back_to_the_command_line() {
    if !ready() {
        return;
    }
    let Some(mut w) = World::new() else { return };
    let args = w.dump_args(true);
    let mut dumper = criu::dump_worker(&args.netns, args.user, args.kdat.as_deref()).unwrap();
    kill(Pid::from_raw(dumper.pid()), Signal::SIGKILL).unwrap();
    let start = Instant::now();
    while dumper.alive() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(2));
    }
    // Directly: a typed error.
    let req = crate::criu_rpc::DumpRequest {
        pid: w.pid,
        dir: args.dir.clone(),
        log_name: "dump.log".into(),
        parent: None,
        unprivileged: true,
    };
    let e = dumper.dump(&req, Duration::from_secs(5)).unwrap_err();
    assert!(matches!(e, RpcError::WorkerDied { .. }), "{e}");
    // Through dump_via: the command line dumps, and says why.
    let mut dumper = criu::dump_worker(&args.netns, args.user, args.kdat.as_deref()).unwrap();
    kill(Pid::from_raw(dumper.pid()), Signal::SIGKILL).unwrap();
    while dumper.alive() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(2));
    }
    let t = criu::dump_via(Ok(dumper), &args).unwrap();
    assert_eq!(t.route, Some(CriuRoute::CommandLine));
    assert!(
        t.worker_error
            .as_deref()
            .is_some_and(|e| e.contains("died")),
        "{t:?}"
    );
    sys::reap(w.pid, Duration::from_secs(5)).unwrap();
    let restore_args = w.restore_args(&args.dir, true);
    let (pid, t) = criu::restore_via(Err("none prepared".into()), &restore_args).unwrap();
    assert_eq!(t.route, Some(CriuRoute::CommandLine));
    assert_eq!(t.worker_error.as_deref(), Some("none prepared"));
    // Restored detached: not our child (re-parented to init or a subreaper).
    w.moved(pid, &args.dir);
    // A failure criu reports is not retried on the command line: an image folder that is a
    // file.
    let mut args = w.dump_args(true);
    std::fs::remove_dir(&args.dir).unwrap();
    std::fs::write(&args.dir, b"").unwrap();
    args.pid = w.pid;
    let dumper = criu::dump_worker(&args.netns, args.user, args.kdat.as_deref()).unwrap();
    let e = criu::dump_via(Ok(dumper), &args).unwrap_err();
    assert!(format!("{e:#}").contains("criu dump failed"), "{e:#}");
    w.wait_counting(w.pid);
}

/// The figures of BENCHMARKS.md's "CRIU start-up": 12 interleaved rounds of dump + restore
/// of the small process through the command line without and with the kdat cache, and
/// through workers with it. Run alone (it makes this test process a child subreaper):
/// `cargo test -p control --bin control -- --ignored --exact
/// criu_real_tests::criu_start_up_figures --nocapture`.
#[test]
#[ignore = "a measurement; run by hand (see its doc)"]
fn criu_start_up_figures() {
    if !ready() {
        return;
    }
    // Detached restores re-parent the process to us, so that its PID is freed at once.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let Some(mut w) = World::new() else { return };
    let rounds = 12;
    let mut figures: [Vec<f64>; 3] = Default::default();
    let mut parts: [Vec<(f64, f64)>; 3] = Default::default();
    let mut startups: [Vec<(f64, f64)>; 3] = Default::default();
    // Warm both caches once.
    for _ in 0..rounds + 1 {
        for (route, figs) in figures.iter_mut().enumerate() {
            let cache = route > 0;
            let args = w.dump_args(cache);
            let restore_args = w.restore_args(&args.dir, cache);
            let workers = (route == 2).then(|| {
                (
                    criu::dump_worker(&args.netns, args.user, args.kdat.as_deref()).unwrap(),
                    criu::restore_worker(&restore_args.netns, restore_args.kdat.as_deref())
                        .unwrap(),
                )
            });
            let start = Instant::now();
            let (dt, pid, rt) = match workers {
                Some((d, r)) => {
                    let dt = criu::dump_via(Ok(d), &args).unwrap();
                    sys::reap(w.pid, Duration::from_secs(5)).unwrap();
                    let (pid, rt) = criu::restore_via(Ok(r), &restore_args).unwrap();
                    (dt, pid, rt)
                }
                None => {
                    let dt = criu::dump(&args).unwrap();
                    sys::reap(w.pid, Duration::from_secs(5)).unwrap();
                    let (pid, rt) = criu::restore(&restore_args).unwrap();
                    (dt, pid, rt)
                }
            };
            let ms = start.elapsed().as_secs_f64() * 1e3;
            if w.round > 3 {
                figs.push(ms);
                parts[route].push((dt.wall_ms, rt.wall_ms));
                startups[route].push((
                    dt.startup_ms.unwrap_or(f64::NAN),
                    rt.startup_ms.unwrap_or(f64::NAN),
                ));
            }
            w.moved(pid, &args.dir);
        }
    }
    let names = [
        "command line, no kdat cache",
        "command line, kdat cache",
        "workers, kdat cache",
    ];
    for (i, name) in names.iter().enumerate() {
        let n = figures[i].len();
        let total = admin_api::median(figures[i].clone()).unwrap_or(f64::NAN);
        let dump = admin_api::median(parts[i].iter().map(|p| p.0).collect()).unwrap_or(f64::NAN);
        let restore = admin_api::median(parts[i].iter().map(|p| p.1).collect()).unwrap_or(f64::NAN);
        let ds = admin_api::median(startups[i].iter().map(|p| p.0).collect()).unwrap_or(f64::NAN);
        let rs = admin_api::median(startups[i].iter().map(|p| p.1).collect()).unwrap_or(f64::NAN);
        println!(
            "CRIU start-up: {name}: dump + restore median {total:.1} ms (dump {dump:.1} ms, \
             restore {restore:.1} ms; start-up in the log: dump {ds:.1} ms, restore {rs:.1} ms; \
             {n} rounds)"
        );
    }
}
