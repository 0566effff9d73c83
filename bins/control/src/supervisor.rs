//! The supervisor: the server's long-lived parent, left running by `control up`.
//!
//! ```text
//!  control up ──spawns──► control supervise (setsid, child subreaper)
//!                              ├─ child: nsenter --net=A -- swrapper ...   (the server)
//!                              │    (--pid-namespace: nsenter -- unshare --pid --fork setsid
//!                              │     swrapper: the server is PID 1 of its own pid namespace)
//!                              │    dumped by criu: it exits, and is reaped at once (SIGCHLD)
//!                              ├─ PrepareRestore: nsenter --net=B -- criu swrk (waits)
//!                              └─ Restore: the worker restores (rst_sibling: the restored
//!                                   server is the supervisor's child), or, without a worker,
//!                                   nsenter --net=B -- criu restore -d ... (re-parented to
//!                                   the supervisor, a child subreaper)
//!  control migrate ──unix socket (one JSON line each way)──► PrepareRestore { netns } /
//!                                   Restore { netns, dir } / DiscardRestore / Exit
//!                                   (RestoreLazy: post-copy; Restart: the benchmarks'
//!                                   reconnect baseline)
//! ```
//!
//! The supervisor keeps at most one restore worker (`criu_rpc.rs`), started by
//! `PrepareRestore` before the freeze. A `Restore` into the worker's namespace uses it; any
//! other `Restore` kills it and runs the command line (a warning says why), as does one whose
//! worker died. A new `PrepareRestore`, a `DiscardRestore` (a rollback) or the supervisor's
//! exit kill and reap an unused worker. The supervisor's reaper tells the worker when it
//! collected it, so that a reaped worker's PID is never signalled.
//!
//! CRIU restores the server under its old PID, so that PID must be free: the dumped process
//! must have been reaped. A process whose parent is init waits for this machine's init (about
//! 1.5 s here); the supervisor reaps it within a millisecond, whichever `control` command
//! drives the move. It runs criu restore itself so that the restored process is its child
//! again (a child subreaper adopts its descendants' orphans), ready for the next move.

use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use admin_api::CriuTiming;
use anyhow::{Context, Result, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::criu;
use crate::criu_rpc::Worker;
use crate::kdat;

/// The socket's file name in the state directory.
pub(crate) const SOCKET: &str = "supervisor.sock";

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 << 10;

/// What control asks of the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) enum SupervisorRequest {
    /// Whether it runs (answered `Pong`).
    Ping,
    /// `criu restore --restore-detached` of `dir` inside `netns`, as the supervisor's child.
    Restore {
        /// The network namespace to restore into.
        netns: PathBuf,
        /// The image set.
        dir: PathBuf,
        /// criu's log file name inside `dir`.
        log_name: String,
    },
    /// The reconnect baseline of the benchmarks: end the server `pid` (SIGKILL; it must be
    /// this supervisor's descendant) and start a fresh one, with the same command line, in
    /// `netns`. Its clients lose their connections.
    Restart {
        /// The running server.
        pid: i32,
        /// Where the new one starts.
        netns: PathBuf,
    },
    /// Start a restore worker in `netns` (replacing an unused one), for the next `Restore`.
    PrepareRestore {
        /// The network namespace the next restore goes to.
        netns: PathBuf,
    },
    /// Kill and reap the prepared restore worker, if any.
    DiscardRestore,
    /// Post-copy (`postcopy`): `criu restore --lazy-pages --restore-detached` of `dir` inside
    /// `netns`, as the supervisor's child; the lazy-pages daemon fills its memory.
    RestoreLazy {
        /// The network namespace to restore into.
        netns: PathBuf,
        /// The image set (everything but the memory).
        dir: PathBuf,
        /// criu's log file name inside `dir`.
        log_name: String,
    },
    /// Stop supervising (the server is not touched).
    Exit,
}

/// The supervisor's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) enum SupervisorReply {
    /// Answer to `Ping`: the supervisor's PID.
    Pong {
        /// Its PID.
        pid: i32,
    },
    /// The server was restored.
    Restored {
        /// Its PID.
        pid: i32,
        /// criu's timing.
        timing: CriuTiming,
    },
    /// A restore worker waits.
    Prepared {
        /// Its PID.
        pid: i32,
    },
    /// Answer to `DiscardRestore`: whether a worker was discarded.
    Discarded {
        /// Whether there was one.
        had_worker: bool,
    },
    /// The request failed.
    Failed {
        /// Why.
        error: String,
    },
    /// Answer to `Restart`: the new server's PID.
    Started {
        /// Its PID.
        pid: i32,
    },
    /// Answer to `Exit`.
    Exiting,
}

/// Asks the supervisor listening at `socket` and returns its reply.
pub(crate) fn ask(
    socket: &Path,
    request: &SupervisorRequest,
    limit: Duration,
) -> Result<SupervisorReply> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "the supervisor does not answer at {} (is the deployment up? `control status`)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(limit))?;
    stream.set_write_timeout(Some(limit))?;
    let mut line = serde_json::to_vec(request).context("encoding the request")?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .context("writing to the supervisor")?;
    let mut answer = String::new();
    BufReader::new(bounded(stream))
        .read_line(&mut answer)
        .context("reading the supervisor's answer")?;
    if answer.is_empty() {
        bail!("the supervisor closed the connection without answering");
    }
    serde_json::from_str(&answer).context("the supervisor's answer is not valid")
}

/// Sends a request without waiting for the answer (the recovery tests kill control while the
/// supervisor works on it).
pub(crate) fn send(socket: &Path, request: &SupervisorRequest) -> Result<()> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("the supervisor does not answer at {}", socket.display()))?;
    let mut line = serde_json::to_vec(request).context("encoding the request")?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .context("writing to the supervisor")?;
    // Kept open by leaking it: closing it before the supervisor read the line is fine too,
    // but an open socket is what a killed control leaves.
    std::mem::forget(stream);
    Ok(())
}

/// Reads at most [`MAX_REQUEST`] bytes from a stream.
fn bounded(stream: UnixStream) -> std::io::Take<UnixStream> {
    std::io::Read::take(stream, MAX_REQUEST)
}

/// What the supervisor starts.
#[derive(Debug, Clone)]
pub(crate) struct ServerCommand {
    /// The network namespace the server starts in.
    pub(crate) netns: PathBuf,
    /// The server's program and arguments.
    pub(crate) argv: Vec<OsString>,
    /// The server's log (stdout and stderr).
    pub(crate) log: PathBuf,
    /// Start it as PID 1 of its own pid namespace (`unshare --pid --fork`), which post-copy
    /// moves need (`postcopy`).
    pub(crate) pid_namespace: bool,
    /// Start nothing: the server arrives by a restore (the target of a cross-host move).
    pub(crate) idle: bool,
}

/// What a spawned supervisor starts.
#[derive(Debug)]
pub(crate) enum Start<'a> {
    /// This server command (as its own session leader; in its own pid namespace if asked).
    Server {
        argv: &'a [OsString],
        pid_namespace: bool,
    },
    /// Nothing: it waits for a restore (`supervise --idle`).
    Idle,
}

/// Starts `control supervise` (this executable) in its own session, answering at `socket`,
/// its log in `log`, as this process's child: a thread reaps it should it end while this
/// process runs; after that, init adopts it. Returns its PID.
pub(crate) fn spawn(
    socket: &Path,
    netns: &Path,
    server_log: &Path,
    log: &Path,
    start: Start<'_>,
) -> Result<i32> {
    use std::os::unix::process::CommandExt as _;
    let exe = std::env::current_exe().context("locating this executable")?;
    let log = crate::secure::open_log(log)?;
    let mut cmd = Command::new(exe);
    cmd.arg("supervise")
        .arg("--socket")
        .arg(socket)
        .arg("--netns")
        .arg(netns)
        .arg("--server-log")
        .arg(server_log);
    match start {
        Start::Idle => {
            cmd.arg("--idle");
        }
        Start::Server {
            argv,
            pid_namespace,
        } => {
            if pid_namespace {
                cmd.arg("--pid-namespace");
            }
            cmd.arg("--").args(argv);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of this process.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().context("starting the supervisor")?;
    let pid = i32::try_from(child.id()).context("PID out of range")?;
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    Ok(pid)
}

/// Runs the supervisor until asked to exit or terminated: starts the server, reaps every
/// child as soon as it exits, answers requests on `socket`.
pub(crate) fn serve(socket: &Path, server: &ServerCommand) -> Result<()> {
    nix::sys::prctl::set_child_subreaper(true).context("becoming a child subreaper")?;
    // SIGCHLD, SIGTERM and SIGINT are read from a signalfd, so they are blocked here; every
    // child gets an empty signal mask back (`unblock_all_signals`) before it execs.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    mask.thread_block().context("blocking SIGCHLD")?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .context("creating a signalfd")?;
    let listener = bind(socket)?;
    if server.idle {
        info!("supervisor: idle, waiting for a restore");
    } else {
        let pid = start_server(server)?;
        info!(pid, "supervisor: server started");
    }
    let mut prepared: Option<Prepared> = None;
    loop {
        let (sig_ready, conn_ready) = {
            let mut fds = [
                PollFd::new(signals.as_fd(), PollFlags::POLLIN),
                PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e).context("poll"),
            }
            let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if sig_ready {
            while let Ok(Some(info)) = signals.read_signal() {
                let sig = i32::try_from(info.ssi_signo).unwrap_or(0);
                if sig == Signal::SIGTERM as i32 || sig == Signal::SIGINT as i32 {
                    info!("supervisor: terminated");
                    drop(prepared.take());
                    reap_all(&mut prepared);
                    return Ok(());
                }
            }
            reap_all(&mut prepared);
        }
        if conn_ready {
            match listener.accept() {
                Ok((stream, _)) => {
                    if handle(stream, server, &mut prepared) {
                        info!("supervisor: asked to exit");
                        drop(prepared.take());
                        reap_all(&mut prepared);
                        return Ok(());
                    }
                }
                Err(e) => warn!("supervisor: accept failed: {e}"),
            }
            // A restore's criu ran as a child; whatever exited meanwhile is reaped now.
            reap_all(&mut prepared);
        }
    }
}

fn bind(socket: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    // A socket left by a supervisor that died is replaced; anything else is not.
    match std::fs::symlink_metadata(socket) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(socket)
                .with_context(|| format!("removing the stale {}", socket.display()))?;
        }
        Ok(_) => bail!("{} exists and is not a socket", socket.display()),
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", socket.display()))?;
    Ok(listener)
}

/// Starts the server as this process's child, as its own session leader so that CRIU can
/// dump it alone.
fn start_server(server: &ServerCommand) -> Result<i32> {
    use std::os::unix::process::CommandExt as _;
    let out = crate::secure::open_log(&server.log)?;
    let Some((program, args)) = server.argv.split_first() else {
        bail!("no server command");
    };
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", server.netns.display()))
        .arg("--");
    if server.pid_namespace {
        // unshare forks the server as PID 1 of a new pid namespace and waits for it (the
        // server's host PID is unshare's child: `postcopy::server_host_pid`); setsid makes
        // the server its own session leader inside it, which criu needs to dump it alone.
        cmd.args(["unshare", "--pid", "--fork", "setsid"]);
    }
    cmd.arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: setsid and pthread_sigmask are async-signal-safe and touch no memory of this
    // process.
    unsafe {
        cmd.pre_exec(|| {
            unblock_all_signals()?;
            // No descriptor of the supervisor's beyond stdio reaches the server (criu would
            // have to dump it, and one of another mount namespace it cannot).
            nix::libc::close_range(3, u32::MAX, nix::libc::CLOSE_RANGE_CLOEXEC as i32);
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().context("starting the server")?;
    // nsenter execs the server: the child's PID is the server's. The child is reaped by the
    // loop, not through `child`.
    i32::try_from(child.id()).context("PID out of range")
}

/// Gives the calling thread an empty signal mask: for a child about to exec, which would
/// otherwise inherit the supervisor's blocked SIGCHLD/SIGTERM/SIGINT (the server could not be
/// told to announce, criu would not see its children exit).
pub(crate) fn unblock_all_signals() -> std::io::Result<()> {
    nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&SigSet::empty()),
        None,
    )
    .map_err(std::io::Error::from)
}

/// A restore worker waiting in a network namespace.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// Where it runs.
    netns: PathBuf,
    /// The worker.
    worker: Worker,
}

/// Reaps every child that has exited; a prepared worker among them is told.
fn reap_all(prepared: &mut Option<Prepared>) {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => {
                if let Some(p) = prepared.as_mut()
                    && status.pid().map(nix::unistd::Pid::as_raw) == Some(p.worker.pid())
                {
                    warn!(
                        ?status,
                        "supervisor: the prepared restore worker exited unused"
                    );
                    p.worker.mark_reaped(format!("{status:?}"));
                } else {
                    info!(?status, "supervisor: reaped");
                }
            }
        }
    }
}

/// Whether `pid` descends from this process (its parent, or its parent's parent, ...).
fn is_descendant(pid: i32) -> bool {
    let me = nix::unistd::getpid().as_raw();
    let mut p = pid;
    // A process tree here is shallow (nsenter/unshare, the server); the bound stops a loop.
    for _ in 0..16 {
        let Some(parent) = parent_of(p) else {
            return false;
        };
        if parent == me {
            return true;
        }
        if parent <= 1 {
            return false;
        }
        p = parent;
    }
    false
}

/// The parent PID from `/proc/<pid>/stat` (the field after the command name, which may hold
/// spaces and parentheses: parsed from the last `)`).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Ends the server `pid` and starts a fresh one in `netns`.
fn restart(server: &ServerCommand, pid: i32, netns: &Path) -> Result<i32> {
    if server.pid_namespace {
        // The PID start_server returns is unshare's there, not the server's.
        bail!("a restart is for the default layout only, not a server in its own pid namespace");
    }
    if !is_descendant(pid) {
        bail!("process {pid} is not supervised here; not ending it");
    }
    let target = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(target, Signal::SIGKILL)
        .with_context(|| format!("ending the server {pid}"))?;
    // Reaped here when it is our child; a deeper descendant is reaped by its own parent.
    if parent_of(pid) == Some(nix::unistd::getpid().as_raw()) {
        let _ = waitpid(target, None);
    }
    start_server(&ServerCommand {
        netns: netns.to_path_buf(),
        ..server.clone()
    })
}

/// root's kdat cache folder for the restores.
fn root_kdat() -> Option<PathBuf> {
    kdat::for_account(0, 0)
}

/// `PrepareRestore`: a new worker in `netns`, replacing any unused one.
fn prepare(netns: PathBuf, prepared: &mut Option<Prepared>) -> SupervisorReply {
    if let Some(old) = prepared.take() {
        info!(
            pid = old.worker.pid(),
            "supervisor: an unused restore worker is replaced"
        );
    }
    let kdat = root_kdat();
    match criu::restore_worker(&netns, kdat.as_deref()) {
        Ok(worker) => {
            let pid = worker.pid();
            info!(pid, netns = %netns.display(), "supervisor: restore worker waits");
            *prepared = Some(Prepared { netns, worker });
            SupervisorReply::Prepared { pid }
        }
        Err(e) => SupervisorReply::Failed {
            error: format!("{e}"),
        },
    }
}

/// `Restore`: through the prepared worker when it waits in `args.netns`, else the command
/// line.
fn restore(
    netns: PathBuf,
    dir: PathBuf,
    log_name: String,
    prepared: &mut Option<Prepared>,
) -> (SupervisorReply, Option<Worker>) {
    let worker = match prepared.take() {
        Some(p) if p.netns == netns => Ok(p.worker),
        Some(p) => Err(format!(
            "the prepared worker waits in {}, the restore goes to {}",
            p.netns.display(),
            netns.display()
        )),
        None => Err("no restore worker was prepared".to_owned()),
    };
    let args = criu::RestoreArgs {
        netns,
        dir,
        log_name,
        kdat: root_kdat(),
    };
    match criu::restore_via_deferred(worker, &args) {
        Ok((pid, timing, spent)) => (SupervisorReply::Restored { pid, timing }, spent),
        Err(e) => (
            SupervisorReply::Failed {
                error: format!("{e:#}"),
            },
            None,
        ),
    }
}

/// Answers one connection; `true` when asked to exit.
fn handle(stream: UnixStream, server: &ServerCommand, prepared: &mut Option<Prepared>) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let read = stream
        .try_clone()
        .map(|s| BufReader::new(bounded(s)).read_line(&mut line));
    let request: Result<SupervisorRequest, String> = match read {
        Ok(Ok(_)) => serde_json::from_str(&line).map_err(|e| format!("bad request: {e}")),
        Ok(Err(e)) | Err(e) => Err(format!("reading the request: {e}")),
    };
    // A restore worker that answered: reaped after the answer is sent, so that criu's
    // clean-up is not part of the freeze.
    let mut spent = None;
    let (reply, exit) = match request {
        Ok(SupervisorRequest::Ping) => (
            SupervisorReply::Pong {
                pid: nix::unistd::getpid().as_raw(),
            },
            false,
        ),
        Ok(SupervisorRequest::Exit) => (SupervisorReply::Exiting, true),
        Ok(SupervisorRequest::Restore {
            netns,
            dir,
            log_name,
        }) => {
            let (reply, worker) = restore(netns, dir, log_name, prepared);
            spent = worker;
            (reply, false)
        }
        Ok(SupervisorRequest::PrepareRestore { netns }) => (prepare(netns, prepared), false),
        Ok(SupervisorRequest::DiscardRestore) => {
            let had_worker = prepared.take().is_some();
            (SupervisorReply::Discarded { had_worker }, false)
        }
        Ok(SupervisorRequest::Restart { pid, netns }) => match restart(server, pid, &netns) {
            Ok(pid) => (SupervisorReply::Started { pid }, false),
            Err(e) => (
                SupervisorReply::Failed {
                    error: format!("{e:#}"),
                },
                false,
            ),
        },
        Ok(SupervisorRequest::RestoreLazy {
            netns,
            dir,
            log_name,
        }) => match crate::postcopy::restore(&netns, &dir, &log_name) {
            Ok((pid, timing)) => (SupervisorReply::Restored { pid, timing }, false),
            Err(e) => (
                SupervisorReply::Failed {
                    error: format!("{e:#}"),
                },
                false,
            ),
        },
        Err(error) => (SupervisorReply::Failed { error }, false),
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    let mut stream = stream;
    if let Err(e) = stream.write_all(&out) {
        warn!("supervisor: answering failed: {e}");
    }
    drop(stream);
    drop(spent);
    exit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> ServerCommand {
        ServerCommand {
            netns: "/nonexistent/netns".into(),
            argv: vec!["/bin/false".into()],
            log: "/nonexistent/log".into(),
            pid_namespace: false,
            idle: false,
        }
    }

    #[test]
    fn a_restart_of_a_process_not_supervised_here_is_refused() {
        // PID 1 is nobody's descendant: it must not be killed, and the answer says why.
        let (a, mut b) = UnixStream::pair().unwrap();
        let req = serde_json::to_string(&SupervisorRequest::Restart {
            pid: 1,
            netns: "/nonexistent".into(),
        })
        .unwrap();
        b.write_all(format!("{req}\n").as_bytes()).unwrap();
        assert!(!handle(a, &server(), &mut None));
        let mut answer = String::new();
        BufReader::new(b).read_line(&mut answer).unwrap();
        let reply: SupervisorReply = serde_json::from_str(&answer).unwrap();
        assert!(
            matches!(&reply, SupervisorReply::Failed { error } if error.contains("not supervised here")),
            "{reply:?}"
        );
        assert_eq!(parent_of(1), Some(0));
        assert!(!is_descendant(1));
        assert_eq!(parent_of(-5), None);
    }

    #[test]
    fn requests_and_replies_round_trip_and_garbage_is_refused() {
        let r = SupervisorRequest::Restore {
            netns: "/run/netns/x".into(),
            dir: "/tmp/d".into(),
            log_name: "restore.log".into(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<SupervisorRequest>(&text).unwrap(), r);
        assert!(serde_json::from_str::<SupervisorRequest>("{\"Restore\":{}}").is_err());
        assert!(serde_json::from_str::<SupervisorRequest>("\u{0}\u{1}").is_err());
    }

    #[test]
    fn a_garbage_request_gets_a_typed_failure_and_the_supervisor_goes_on() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"this is not json\n").unwrap();
        let exit = handle(a, &server(), &mut None);
        assert!(!exit);
        let mut answer = String::new();
        BufReader::new(b).read_line(&mut answer).unwrap();
        let reply: SupervisorReply = serde_json::from_str(&answer).unwrap();
        assert!(
            matches!(&reply, SupervisorReply::Failed { error } if error.contains("bad request")),
            "{reply:?}"
        );
    }

    #[test]
    fn ping_and_exit_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SOCKET);
        let listener = bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let mut none = None;
            let (s, _) = listener.accept().unwrap();
            assert!(!handle(s, &server(), &mut none));
            let (s, _) = listener.accept().unwrap();
            assert!(!handle(s, &server(), &mut none));
            let (s, _) = listener.accept().unwrap();
            assert!(handle(s, &server(), &mut none));
        });
        let me = nix::unistd::getpid().as_raw();
        assert_eq!(
            ask(&path, &SupervisorRequest::Ping, Duration::from_secs(5)).unwrap(),
            SupervisorReply::Pong { pid: me }
        );
        assert_eq!(
            ask(
                &path,
                &SupervisorRequest::DiscardRestore,
                Duration::from_secs(5)
            )
            .unwrap(),
            SupervisorReply::Discarded { had_worker: false }
        );
        assert_eq!(
            ask(&path, &SupervisorRequest::Exit, Duration::from_secs(5)).unwrap(),
            SupervisorReply::Exiting
        );
        t.join().unwrap();
        // Not a socket: refused rather than removed.
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(bind(&file).is_err());
        assert!(file.exists());
        // Nobody listening: a clear error.
        let err = ask(
            &dir.path().join("none.sock"),
            &SupervisorRequest::Ping,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("does not answer"), "{err:#}");
    }
}
