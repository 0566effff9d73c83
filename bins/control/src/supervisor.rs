//! The supervisor: the server's long-lived parent, left running by `control up`.
//!
//! ```text
//!  control up ──spawns──► control supervise (setsid, child subreaper)
//!                              ├─ child: nsenter --net=A -- swrapper ...   (the server)
//!                              │    (--pid-namespace: nsenter -- unshare --pid --fork setsid
//!                              │     swrapper: the server is PID 1 of its own pid namespace)
//!                              │    dumped by criu: it exits, and is reaped at once (SIGCHLD)
//!                              └─ on request: nsenter --net=B -- criu restore -d ...
//!                                   the restored server is re-parented to the supervisor
//!  control migrate ──unix socket (one JSON line each way)──► Restore { netns, dir } / Exit
//!                                                            (RestoreLazy: post-copy)
//! ```
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
    /// The request failed.
    Failed {
        /// Why.
        error: String,
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
#[derive(Debug)]
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
    let pid = start_server(server)?;
    info!(pid, "supervisor: server started");
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
                    reap_all();
                    return Ok(());
                }
            }
            reap_all();
        }
        if conn_ready {
            match listener.accept() {
                Ok((stream, _)) => {
                    if handle(stream) {
                        info!("supervisor: asked to exit");
                        reap_all();
                        return Ok(());
                    }
                }
                Err(e) => warn!("supervisor: accept failed: {e}"),
            }
            // A restore's criu ran as a child; whatever exited meanwhile is reaped now.
            reap_all();
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

/// Reaps every child that has exited.
fn reap_all() {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => info!(?status, "supervisor: reaped"),
        }
    }
}

/// Answers one connection; `true` when asked to exit.
fn handle(stream: UnixStream) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let read = stream
        .try_clone()
        .map(|s| BufReader::new(bounded(s)).read_line(&mut line));
    let request: Result<SupervisorRequest, String> = match read {
        Ok(Ok(_)) => serde_json::from_str(&line).map_err(|e| format!("bad request: {e}")),
        Ok(Err(e)) | Err(e) => Err(format!("reading the request: {e}")),
    };
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
        }) => match criu::restore(&netns, &dir, &log_name) {
            Ok((pid, timing)) => (SupervisorReply::Restored { pid, timing }, false),
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
    exit
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let exit = handle(a);
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
            let (s, _) = listener.accept().unwrap();
            assert!(!handle(s));
            let (s, _) = listener.accept().unwrap();
            assert!(handle(s));
        });
        let me = nix::unistd::getpid().as_raw();
        assert_eq!(
            ask(&path, &SupervisorRequest::Ping, Duration::from_secs(5)).unwrap(),
            SupervisorReply::Pong { pid: me }
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
