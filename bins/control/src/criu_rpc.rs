//! criu RPC workers: `criu swrk <fd>` started before the freeze, asked for one dump or one
//! restore over a socket pair when the time comes.
//!
//! ```text
//!  control / supervisor                              criu swrk 3  (nsenter --net=NS [setpriv])
//!   Worker::spawn(prefix) ── socketpair(SEQPACKET) ──► waits in recv()
//!   ...announce, park...
//!   Worker::dump/restore ── criu_req (protobuf) ───► dump / restore (log in the image dir)
//!                         ◄── criu_resp ─────────── success, pid, cr_errmsg; then it exits
//! ```
//!
//! A worker pays criu's process start-up before the freeze instead of in it; with the kdat
//! cache (`kdat.rs`) the kernel probes go too. One request per worker: criu ends after
//! answering (no `keep_open`). The messages are the part of criu's `images/rpc.proto` used
//! here, written by hand as prost structs (no protoc, no build script); field numbers and
//! types are criu's.
//!
//! Measured on this host (criu 4.2.1, a `sh` sleep loop as an unprivileged user, netns A ->
//! B, 12 interleaved dump + restore pairs, medians; `cargo test -p control --
//! --ignored --nocapture criu_start_up_figures`): see BENCHMARKS.md, "CRIU start-up".

use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, recv, send, socketpair};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use prost::Message as _;

/// Longest answer accepted from criu (its answers are a few dozen bytes).
pub(crate) const MAX_RESPONSE: usize = 64 << 10;
/// How long a worker may take to exit after it answered.
const EXIT_LIMIT: Duration = Duration::from_secs(2);

/// criu's `criu_req_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub(crate) enum ReqType {
    /// No request.
    Empty = 0,
    /// Dump.
    Dump = 1,
    /// Restore.
    Restore = 2,
    /// Check.
    Check = 3,
    /// Pre-dump.
    PreDump = 4,
    /// Page server.
    PageServer = 5,
    /// A notification from criu (action scripts), answered by the client.
    Notify = 6,
    /// Version.
    Version = 10,
}

/// criu's `criu_opts`: the options used here.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct CriuOpts {
    /// An image directory fd of the client, or -1 to use `images_dir`.
    #[prost(int32, required, tag = "1")]
    pub(crate) images_dir_fd: i32,
    /// The task to dump.
    #[prost(int32, optional, tag = "2")]
    pub(crate) pid: Option<i32>,
    /// Leave the task running after the dump.
    #[prost(bool, optional, tag = "3")]
    pub(crate) leave_running: Option<bool>,
    /// Log verbosity (criu's `-v`).
    #[prost(int32, optional, tag = "9")]
    pub(crate) log_level: Option<i32>,
    /// Log file name, in the work directory (the image directory).
    #[prost(string, optional, tag = "10")]
    pub(crate) log_file: Option<String>,
    /// Send NOTIFY messages for action scripts.
    #[prost(bool, optional, tag = "12")]
    pub(crate) notify_scripts: Option<bool>,
    /// The parent image directory (`--prev-images-dir`), relative to the image directory.
    #[prost(string, optional, tag = "14")]
    pub(crate) parent_img: Option<String>,
    /// `--track-mem`.
    #[prost(bool, optional, tag = "15")]
    pub(crate) track_mem: Option<bool>,
    /// Restore the task as a sibling of the worker (the worker's parent gets it as a child).
    #[prost(bool, optional, tag = "26")]
    pub(crate) rst_sibling: Option<bool>,
    /// `--unprivileged` (also: the kdat cache in `$XDG_RUNTIME_DIR`).
    #[prost(bool, optional, tag = "67")]
    pub(crate) unprivileged: Option<bool>,
    /// The image directory by path (criu >= 3.19).
    #[prost(string, optional, tag = "68")]
    pub(crate) images_dir: Option<String>,
}

/// criu's `criu_dump_resp`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct DumpResp {
    /// Set when the dump was of the calling process, restored since.
    #[prost(bool, optional, tag = "1")]
    pub(crate) restored: Option<bool>,
}

/// criu's `criu_restore_resp`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RestoreResp {
    /// The restored root task.
    #[prost(int32, required, tag = "1")]
    pub(crate) pid: i32,
}

/// criu's `criu_notify`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Notify {
    /// The action script's name.
    #[prost(string, optional, tag = "1")]
    pub(crate) script: Option<String>,
    /// A task's PID.
    #[prost(int32, optional, tag = "2")]
    pub(crate) pid: Option<i32>,
}

/// criu's `criu_req`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct CriuReq {
    /// What is asked ([`ReqType`]).
    #[prost(enumeration = "ReqType", required, tag = "1")]
    pub(crate) r#type: i32,
    /// Its options.
    #[prost(message, optional, tag = "2")]
    pub(crate) opts: Option<CriuOpts>,
    /// The answer to a NOTIFY.
    #[prost(bool, optional, tag = "3")]
    pub(crate) notify_success: Option<bool>,
    /// Keep serving after this request.
    #[prost(bool, optional, tag = "4")]
    pub(crate) keep_open: Option<bool>,
}

/// criu's `criu_resp`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct CriuResp {
    /// What it answers ([`ReqType`]).
    #[prost(enumeration = "ReqType", required, tag = "1")]
    pub(crate) r#type: i32,
    /// Whether the request succeeded.
    #[prost(bool, required, tag = "2")]
    pub(crate) success: bool,
    /// A dump's answer.
    #[prost(message, optional, tag = "3")]
    pub(crate) dump: Option<DumpResp>,
    /// A restore's answer.
    #[prost(message, optional, tag = "4")]
    pub(crate) restore: Option<RestoreResp>,
    /// A notification.
    #[prost(message, optional, tag = "5")]
    pub(crate) notify: Option<Notify>,
    /// criu's errno.
    #[prost(int32, optional, tag = "7")]
    pub(crate) cr_errno: Option<i32>,
    /// criu's error message.
    #[prost(string, optional, tag = "9")]
    pub(crate) cr_errmsg: Option<String>,
}

/// What went wrong with a worker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum RpcError {
    /// The worker could not be started.
    #[error("starting the criu worker: {0}")]
    Spawn(#[source] std::io::Error),
    /// The worker exited (or closed its socket) before answering.
    #[error(
        "the criu worker (PID {pid}) died before answering ({status}){}",
        if *request_sent { "; it had the request" } else { "" }
    )]
    WorkerDied {
        /// Its PID.
        pid: i32,
        /// How it ended, as far as known.
        status: String,
        /// Whether it died after it had the request: then it may have done part of the work
        /// (a dump that killed the task, a restore that forked it), and running the command
        /// line after it would do it twice.
        request_sent: bool,
    },
    /// Writing the request or reading the answer failed.
    #[error("talking to the criu worker: {0}")]
    Io(#[source] std::io::Error),
    /// The answer is longer than [`MAX_RESPONSE`].
    #[error("the criu worker's answer is {len} bytes, more than the {max} accepted")]
    Oversized {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The answer is not a `criu_resp`.
    #[error("the criu worker's answer does not decode: {0}")]
    Undecodable(#[source] prost::DecodeError),
    /// The answer is of another type than the request.
    #[error("the criu worker answered a request of type {got} to one of type {expected:?}")]
    WrongType {
        /// The request's type.
        expected: ReqType,
        /// The answer's type number.
        got: i32,
    },
    /// A successful answer lacks what it must carry.
    #[error("the criu worker's answer lacks {0}")]
    Incomplete(&'static str),
    /// criu reported that the request failed.
    #[error("criu {what} failed (errno {errno:?}: {message}); log {}", log.display())]
    Failed {
        /// What was asked.
        what: &'static str,
        /// criu's errno.
        errno: Option<i32>,
        /// criu's message (`cr_errmsg`), or a placeholder.
        message: String,
        /// criu's log.
        log: PathBuf,
    },
    /// No answer in time (the worker was killed).
    #[error("the criu worker gave no answer within {0:?} (killed)")]
    Timeout(Duration),
}

impl RpcError {
    /// Whether the worker could not do the work at all (not started, or gone before
    /// answering): the command line may then do it instead.
    pub(crate) fn worker_unusable(&self) -> bool {
        matches!(
            self,
            Self::Spawn(_)
                | Self::WorkerDied {
                    request_sent: false,
                    ..
                }
        )
    }
}

/// Decodes one answer of criu to a request of type `expected`, answering nothing: a
/// NOTIFY is returned as is (`r#type == Notify`) for the caller to answer.
pub(crate) fn decode_response(bytes: &[u8], expected: ReqType) -> Result<CriuResp, RpcError> {
    if bytes.len() > MAX_RESPONSE {
        return Err(RpcError::Oversized {
            len: bytes.len(),
            max: MAX_RESPONSE,
        });
    }
    let resp = CriuResp::decode(bytes).map_err(RpcError::Undecodable)?;
    if resp.r#type != expected as i32 && resp.r#type != ReqType::Notify as i32 {
        return Err(RpcError::WrongType {
            expected,
            got: resp.r#type,
        });
    }
    Ok(resp)
}

/// What a dump needs.
#[derive(Debug, Clone)]
pub(crate) struct DumpRequest {
    /// The task.
    pub(crate) pid: i32,
    /// The image directory.
    pub(crate) dir: PathBuf,
    /// The log file name inside `dir`.
    pub(crate) log_name: String,
    /// The previous images (relative to `dir`), with memory tracking.
    pub(crate) parent: Option<String>,
    /// `--unprivileged`.
    pub(crate) unprivileged: bool,
}

/// What a restore needs.
#[derive(Debug, Clone)]
pub(crate) struct RestoreRequest {
    /// The image directory.
    pub(crate) dir: PathBuf,
    /// The log file name inside `dir`.
    pub(crate) log_name: String,
    /// `--unprivileged`.
    pub(crate) unprivileged: bool,
    /// Make the restored task the worker's sibling (a child of the worker's parent).
    pub(crate) sibling: bool,
}

fn path_text(p: &Path) -> Result<String, RpcError> {
    p.to_str().map(str::to_owned).ok_or_else(|| {
        RpcError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not UTF-8", p.display()),
        ))
    })
}

impl DumpRequest {
    fn to_req(&self) -> Result<CriuReq, RpcError> {
        Ok(CriuReq {
            r#type: ReqType::Dump as i32,
            opts: Some(CriuOpts {
                images_dir_fd: -1,
                images_dir: Some(path_text(&self.dir)?),
                pid: Some(self.pid),
                log_level: Some(4),
                log_file: Some(self.log_name.clone()),
                track_mem: self.parent.as_ref().map(|_| true),
                parent_img: self.parent.clone(),
                unprivileged: Some(self.unprivileged),
                ..CriuOpts::default()
            }),
            ..CriuReq::default()
        })
    }
}

impl RestoreRequest {
    fn to_req(&self) -> Result<CriuReq, RpcError> {
        Ok(CriuReq {
            r#type: ReqType::Restore as i32,
            opts: Some(CriuOpts {
                images_dir_fd: -1,
                images_dir: Some(path_text(&self.dir)?),
                log_level: Some(4),
                log_file: Some(self.log_name.clone()),
                rst_sibling: Some(self.sibling),
                unprivileged: Some(self.unprivileged),
                ..CriuOpts::default()
            }),
            ..CriuReq::default()
        })
    }
}

/// A `criu swrk` process waiting for one request.
#[derive(Debug)]
pub(crate) struct Worker {
    pid: i32,
    sock: OwnedFd,
    /// Set once the worker was reaped (by us, or reported by the supervisor's reaper): its PID
    /// is then never signalled again.
    reaped: Option<String>,
    /// Whether it answered its request (it then exits by itself).
    answered: bool,
    /// A request was written to it.
    sent: bool,
}

impl Worker {
    /// Starts `criu swrk <fd>` from `prefix`, a command whose program runs criu with its
    /// arguments still to come (criu.rs's `nsenter ... [setpriv ...] criu`, with its
    /// environment, umask, signal mask and process group). Returns once it runs; it waits for
    /// a request.
    pub(crate) fn spawn(mut prefix: Command) -> Result<Self, RpcError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| RpcError::Spawn(e.into()))?;
        let fd = theirs.as_raw_fd();
        prefix
            .arg("swrk")
            .arg(fd.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: fcntl is async-signal-safe; it only clears close-on-exec on the worker's end
        // of the pair, in the child.
        unsafe {
            prefix.pre_exec(move || {
                nix::fcntl::fcntl(
                    std::os::fd::BorrowedFd::borrow_raw(fd),
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                )
                .map(|_| ())
                .map_err(std::io::Error::from)
            });
        }
        let child = prefix.spawn().map_err(RpcError::Spawn)?;
        drop(theirs);
        let pid =
            i32::try_from(child.id()).map_err(|e| RpcError::Spawn(std::io::Error::other(e)))?;
        // The child is reaped through its PID (waitpid), not through `child`.
        drop(child);
        Ok(Self {
            pid,
            sock: ours,
            reaped: None,
            answered: false,
            sent: false,
        })
    }

    /// The worker's PID.
    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    /// Tells the worker that a reaper collected it (the supervisor reaps every child).
    pub(crate) fn mark_reaped(&mut self, status: String) {
        self.reaped = Some(status);
    }

    /// Whether the worker still waits (not exited).
    pub(crate) fn alive(&mut self) -> bool {
        self.try_reap();
        self.reaped.is_none()
    }

    /// The final dump of `req.pid`: on success the task is gone. One request per worker; the
    /// worker ends when dropped (waited for after an answer, killed otherwise).
    pub(crate) fn dump(&mut self, req: &DumpRequest, limit: Duration) -> Result<(), RpcError> {
        let log = req.dir.join(&req.log_name);
        let resp = self.call(&req.to_req()?, ReqType::Dump, limit)?;
        check(resp, "dump", log).map(|_| ())
    }

    /// A restore; returns the restored PID. One request per worker, as for [`Self::dump`].
    pub(crate) fn restore(
        &mut self,
        req: &RestoreRequest,
        limit: Duration,
    ) -> Result<i32, RpcError> {
        let log = req.dir.join(&req.log_name);
        let resp = self.call(&req.to_req()?, ReqType::Restore, limit)?;
        let resp = check(resp, "restore", log)?;
        match resp.restore {
            Some(RestoreResp { pid }) if pid > 0 => Ok(pid),
            _ => Err(RpcError::Incomplete("the restored PID")),
        }
    }

    /// Sends `req`, answers NOTIFYs, returns criu's answer (the worker exits after it: it is
    /// reaped when dropped, so that its exit is not waited for in the freeze).
    fn call(
        &mut self,
        req: &CriuReq,
        expected: ReqType,
        limit: Duration,
    ) -> Result<CriuResp, RpcError> {
        let deadline = Instant::now() + limit;
        if self.answered {
            return Err(RpcError::Io(std::io::Error::other(
                "this worker already answered its one request",
            )));
        }
        if !self.alive() {
            return Err(self.died());
        }
        self.send(req)?;
        loop {
            let bytes = self.receive(deadline, limit)?;
            let resp = decode_response(&bytes, expected)?;
            if resp.r#type == ReqType::Notify as i32 {
                // Only with notify_scripts, which is not asked; answered all the same, or criu
                // would wait for ever.
                self.send(&CriuReq {
                    r#type: ReqType::Notify as i32,
                    notify_success: Some(true),
                    ..CriuReq::default()
                })?;
                continue;
            }
            self.answered = true;
            return Ok(resp);
        }
    }

    fn send(&mut self, req: &CriuReq) -> Result<(), RpcError> {
        let bytes = req.encode_to_vec();
        match send(self.sock.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) if n == bytes.len() => {
                self.sent = true;
                Ok(())
            }
            Ok(n) => Err(RpcError::Io(std::io::Error::other(format!(
                "sent {n} of {} bytes",
                bytes.len()
            )))),
            Err(nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET) => Err(self.died()),
            Err(e) => Err(RpcError::Io(e.into())),
        }
    }

    /// One message from the worker, waiting until `deadline`.
    fn receive(&mut self, deadline: Instant, limit: Duration) -> Result<Vec<u8>, RpcError> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.kill();
                return Err(RpcError::Timeout(limit));
            }
            let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => break,
                Err(e) => return Err(RpcError::Io(e.into())),
            }
        }
        let mut buf = vec![0u8; MAX_RESPONSE];
        // MSG_TRUNC: the datagram's real length, even when longer than the buffer.
        match recv(self.sock.as_raw_fd(), &mut buf, MsgFlags::MSG_TRUNC) {
            Ok(0) => Err(self.died()),
            Ok(n) if n > MAX_RESPONSE => Err(RpcError::Oversized {
                len: n,
                max: MAX_RESPONSE,
            }),
            Ok(n) => {
                buf.truncate(n);
                Ok(buf)
            }
            Err(nix::errno::Errno::ECONNRESET) => Err(self.died()),
            Err(e) => Err(RpcError::Io(e.into())),
        }
    }

    /// The worker is gone: its exit status, when it can be had.
    fn died(&mut self) -> RpcError {
        let start = Instant::now();
        while self.reaped.is_none() && start.elapsed() < Duration::from_millis(200) {
            self.try_reap();
            if self.reaped.is_none() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let status = self
            .reaped
            .clone()
            .unwrap_or_else(|| "its socket closed; still running".to_owned());
        if self.reaped.is_none() {
            self.kill();
        }
        RpcError::WorkerDied {
            pid: self.pid,
            status,
            request_sent: self.sent,
        }
    }

    fn try_reap(&mut self) {
        if self.reaped.is_some() {
            return;
        }
        match waitpid(Pid::from_raw(self.pid), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => self.reaped = Some(format!("{status:?}")),
            // Not our child any more: someone reaped it.
            Err(e) => self.reaped = Some(format!("reaped elsewhere ({e})")),
        }
    }

    /// Waits a little for the worker to exit after its answer; kills it past that.
    fn finish(&mut self) {
        let start = Instant::now();
        while start.elapsed() < EXIT_LIMIT {
            self.try_reap();
            if self.reaped.is_some() {
                return;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        tracing::warn!(
            pid = self.pid,
            "the criu worker did not exit after answering"
        );
        self.kill();
    }

    /// Kills and reaps the worker (only while it is known not to be reaped: its PID is ours).
    fn kill(&mut self) {
        self.try_reap();
        if self.reaped.is_some() {
            return;
        }
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        match waitpid(Pid::from_raw(self.pid), None) {
            Ok(s) => self.reaped = Some(format!("{s:?}")),
            Err(e) => self.reaped = Some(format!("reaped elsewhere ({e})")),
        }
    }
}

impl Drop for Worker {
    /// A worker that answered is waited for (briefly); an unused one is killed. Both reaped.
    fn drop(&mut self) {
        if self.answered {
            self.finish();
        } else {
            self.kill();
        }
    }
}

fn check(resp: CriuResp, what: &'static str, log: PathBuf) -> Result<CriuResp, RpcError> {
    if resp.success {
        return Ok(resp);
    }
    Err(RpcError::Failed {
        what,
        errno: resp.cr_errno,
        message: resp
            .cr_errmsg
            .clone()
            .unwrap_or_else(|| "no message; see the log".to_owned()),
        log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(t: ReqType, success: bool) -> CriuResp {
        CriuResp {
            r#type: t as i32,
            success,
            ..CriuResp::default()
        }
    }

    #[test]
    fn a_request_encodes_to_criu_field_numbers() {
        let req = DumpRequest {
            pid: 7,
            dir: "/d".into(),
            log_name: "dump.log".into(),
            parent: None,
            unprivileged: true,
        }
        .to_req()
        .unwrap();
        let bytes = req.encode_to_vec();
        // type = DUMP (field 1, varint 1), then opts (field 2, length-delimited).
        assert_eq!(&bytes[..3], &[0x08, 0x01, 0x12]);
        let opts = CriuOpts::decode(&bytes[4..]).unwrap();
        assert_eq!(opts.images_dir_fd, -1);
        assert_eq!(opts.images_dir.as_deref(), Some("/d"));
        assert_eq!(opts.pid, Some(7));
        assert_eq!(opts.unprivileged, Some(true));
        assert_eq!(opts.track_mem, None);
        // images_dir is field 68: a two-byte key (68 << 3 | 2 = 546 = 0xa2 0x04).
        assert!(bytes.windows(2).any(|w| w == [0xa2, 0x04]), "{bytes:02x?}");
        assert_eq!(CriuReq::decode(&bytes[..]).unwrap(), req);
    }

    #[test]
    fn answers_decode_and_a_wrong_type_is_refused() {
        let mut ok = resp(ReqType::Restore, true);
        ok.restore = Some(RestoreResp { pid: 42 });
        let got = decode_response(&ok.encode_to_vec(), ReqType::Restore).unwrap();
        assert_eq!(got.restore, Some(RestoreResp { pid: 42 }));
        let e = decode_response(&ok.encode_to_vec(), ReqType::Dump).unwrap_err();
        assert!(
            matches!(
                e,
                RpcError::WrongType {
                    expected: ReqType::Dump,
                    got: 2
                }
            ),
            "{e}"
        );
        // A NOTIFY passes, for the caller to answer.
        let n =
            decode_response(&resp(ReqType::Notify, true).encode_to_vec(), ReqType::Dump).unwrap();
        assert_eq!(n.r#type, ReqType::Notify as i32);
        // An unknown type number is a wrong type, not a panic.
        let odd = CriuResp {
            r#type: 999,
            ..resp(ReqType::Dump, true)
        };
        assert!(matches!(
            decode_response(&odd.encode_to_vec(), ReqType::Dump),
            Err(RpcError::WrongType { got: 999, .. })
        ));
    }

    #[test]
    fn garbage_truncated_and_oversized_answers_are_typed_errors() {
        for garbage in [&[0xff_u8, 0xff, 0xff][..], &[0x0a], &[0x12, 0x05, 0x01]] {
            let e = decode_response(garbage, ReqType::Dump).unwrap_err();
            assert!(matches!(e, RpcError::Undecodable(_)), "{garbage:?}: {e}");
        }
        let mut ok = resp(ReqType::Dump, false);
        ok.cr_errmsg = Some("a long message ".repeat(4));
        let bytes = ok.encode_to_vec();
        for cut in 1..bytes.len() {
            // Every prefix either decodes (a shorter but well-formed message) or is refused.
            let _ = decode_response(&bytes[..cut], ReqType::Dump);
        }
        assert!(matches!(
            decode_response(&bytes[..bytes.len() - 3], ReqType::Dump),
            Err(RpcError::Undecodable(_))
        ));
        let big = vec![0u8; MAX_RESPONSE + 1];
        assert!(matches!(
            decode_response(&big, ReqType::Dump),
            Err(RpcError::Oversized { .. })
        ));
        // Never panics on arbitrary bytes.
        let mut x: u32 = 0x1234_5678;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x.to_le_bytes()[0]
                })
                .collect();
            let _ = decode_response(&bytes, ReqType::Restore);
        }
    }

    /// A stand-in worker: `bash -c SCRIPT sh swrk <fd>`, so the script sees the socket as
    /// `$2` (bash: dash redirects only fds 0-9).
    fn fake(script: &str) -> Worker {
        let mut c = Command::new("bash");
        c.arg("-c").arg(script).arg("sh");
        Worker::spawn(c).unwrap()
    }

    fn dump_req() -> DumpRequest {
        DumpRequest {
            pid: 1,
            dir: "/nonexistent".into(),
            log_name: "dump.log".into(),
            parent: None,
            unprivileged: true,
        }
    }

    const LIMIT: Duration = Duration::from_secs(10);

    #[test]
    fn a_worker_that_dies_is_a_typed_error_and_allows_the_command_line_only_before_the_request() {
        // Dies before the request.
        let mut w = fake("exit 3");
        let start = Instant::now();
        while w.alive() && start.elapsed() < LIMIT {
            std::thread::sleep(Duration::from_millis(5));
        }
        let e = w.dump(&dump_req(), LIMIT).unwrap_err();
        assert!(matches!(e, RpcError::WorkerDied { .. }), "{e}");
        assert!(e.worker_unusable());
        assert!(e.to_string().contains("died"), "{e}");
        // Dies after reading the request, without answering: it may have done part of the
        // work, so the command line must not run after it.
        let mut w = fake("dd bs=64k count=1 <&\"$2\" >/dev/null 2>&1; exit 0");
        let e = w.dump(&dump_req(), LIMIT).unwrap_err();
        assert!(
            matches!(
                e,
                RpcError::WorkerDied {
                    request_sent: true,
                    ..
                }
            ),
            "{e}"
        );
        assert!(!e.worker_unusable(), "no second dump after a half-done one");
        assert!(e.to_string().contains("it had the request"), "{e}");
        // A program that does not exist.
        let e = Worker::spawn(Command::new("/nonexistent/criu")).unwrap_err();
        assert!(
            matches!(e, RpcError::Spawn(_)) && e.worker_unusable(),
            "{e}"
        );
    }

    #[test]
    fn a_worker_that_answers_garbage_or_failure_or_nothing_is_a_typed_error() {
        let mut w = fake("printf '\\377\\377\\377' >&\"$2\"; sleep 0.2");
        let e = w.dump(&dump_req(), LIMIT).unwrap_err();
        assert!(matches!(e, RpcError::Undecodable(_)), "{e}");
        assert!(!e.worker_unusable());
        // RESTORE answered to a DUMP.
        let mut w = fake("printf '\\010\\002\\020\\001' >&\"$2\"; sleep 0.2");
        let e = w.dump(&dump_req(), LIMIT).unwrap_err();
        assert!(matches!(e, RpcError::WrongType { .. }), "{e}");
        // criu's failure, with its message and the log's path.
        let mut w = fake("printf '\\010\\001\\020\\000\\112\\004boom' >&\"$2\"; sleep 0.2");
        let e = w.dump(&dump_req(), LIMIT).unwrap_err();
        assert!(
            matches!(&e, RpcError::Failed { message, .. } if message == "boom"),
            "{e}"
        );
        assert!(e.to_string().contains("/nonexistent/dump.log"), "{e}");
        // A successful restore answer without a PID.
        let mut w = fake("printf '\\010\\002\\020\\001' >&\"$2\"; sleep 0.2");
        let r = RestoreRequest {
            dir: "/nonexistent".into(),
            log_name: "restore.log".into(),
            unprivileged: true,
            sibling: true,
        };
        let e = w.restore(&r, LIMIT).unwrap_err();
        assert!(matches!(e, RpcError::Incomplete(_)), "{e}");
        // No answer in time: killed.
        let mut w = fake("sleep 30");
        let pid = w.pid();
        let start = Instant::now();
        let e = w.dump(&dump_req(), Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, RpcError::Timeout(_)), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "killed and reaped"
        );
    }

    #[test]
    fn an_unused_worker_is_killed_and_reaped_when_dropped() {
        let w = fake("sleep 30");
        let pid = w.pid();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        drop(w);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
