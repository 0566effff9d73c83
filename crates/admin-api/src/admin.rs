//! The server's admin directory: requests from control, events from the server.
//!
//! One file per kind. A request is consumed by the server when it reads it; an event is
//! consumed by control when it reads it. Every request and every event after `ready` names
//! its migration, and a reader that expects migration X refuses an event about migration Y
//! ([`AdminError::Stale`]) instead of taking it for the answer.
//!
//! One file is a record rather than an answer: `downtime.json` ([`DowntimeLog`]), the
//! downtimes the server's clients reported for its last few migrations, by migration id. The
//! server rewrites it (atomically, as every file) as reports arrive, outside its migrations;
//! control reads it without consuming it ([`AdminDir::downtimes`], [`AdminDir::wait_downtimes`])
//! and picks the migration it asks about, so a leftover can never be mistaken for an answer
//! and [`AdminDir::clear`] leaves it.
//!
//! Every file operation is made relative to a descriptor of the directory, opened once
//! (`openat`, `renameat`, `unlinkat`; files are opened with `O_NOFOLLOW`): a server that
//! opened its admin directory and then dropped its privileges keeps using it although it
//! can no longer reach it by path (its parent is root's, mode 0700), and a path swapped
//! meanwhile does not redirect it. Files are created exclusively with mode 0600; a file
//! written by root in a directory owned by another user is given to that user (`fchown`),
//! so that the server running as the directory's owner can read control's requests.

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{Mode, fstat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, unlinkat};

use migration_core::MigrationId;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Largest admin file read (a report of thousands of sessions fits easily).
const MAX_FILE: u64 = 16 << 20;

/// Errors reading or writing the admin directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The admin directory does not exist or is not a directory.
    #[error("admin directory {0} is not a directory")]
    NotADirectory(PathBuf),
    /// A file could not be read, written, renamed or removed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A file is not the JSON of its kind (it was removed all the same).
    #[error("{path} is not a valid {kind}: {source}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What it should have held.
        kind: &'static str,
        /// Why it does not.
        #[source]
        source: serde_json::Error,
    },
    /// A file is larger than any valid one.
    #[error("{path} is {len} bytes, more than the {max} an admin file may have")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// An event about another migration than the one awaited: left over from an earlier
    /// migration, or written by something else.
    #[error("stale {kind} event: it names migration {found}, expected {expected}")]
    Stale {
        /// The event's kind.
        kind: &'static str,
        /// The migration it names (`none` when it names none).
        found: String,
        /// The migration awaited (`none` when none is).
        expected: String,
    },
    /// The server answered, with an error.
    #[error("the server reported ({kind}): {message}")]
    ServerReported {
        /// The event's kind.
        kind: &'static str,
        /// What it said.
        message: String,
    },
    /// No answer in time.
    #[error("the server wrote no {file} within {limit:?}")]
    Timeout {
        /// The file awaited.
        file: &'static str,
        /// How long it was awaited.
        limit: Duration,
    },
}

/// A request control writes for the server (read when it gets the matching signal).
pub trait Request: Serialize + DeserializeOwned {
    /// Its file name in the admin directory.
    const FILE: &'static str;
    /// What it is, for messages.
    const KIND: &'static str;
    /// The migration it belongs to.
    fn migration_id(&self) -> MigrationId;
}

/// An event the server writes for control.
pub trait ServerEvent: Serialize + DeserializeOwned {
    /// Its file name in the admin directory.
    const FILE: &'static str;
    /// What it is, for messages.
    const KIND: &'static str;
}

/// How the server prepares its clients for a move.
///
/// In JSON and on command lines: `"one"` or `"two"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phases {
    /// The seed's single phase: `Migrate` to every client, wait for the acks, park. Clients
    /// keep sending during the freeze; what they send then is lost and retried after it.
    #[default]
    One,
    /// Two phases: `Quiesce` (clients finish their in-flight requests, open no new ones and
    /// answer `Quiesced`), then `Migrate` and the acks, then park; `Resumed` after the
    /// restore releases them. Nothing is in flight during the freeze.
    Two,
}

impl Phases {
    /// The name used in JSON and on command lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Phases::One => "one",
            Phases::Two => "two",
        }
    }

    /// How many rounds the server runs before it parks (each waits at most its deadline).
    pub fn rounds(self) -> u32 {
        match self {
            Phases::One => 1,
            Phases::Two => 2,
        }
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A phase count that is neither `one` nor `two`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown migration mode `{0}`: expected `one` or `two`")]
pub struct UnknownPhases(pub String);

impl std::str::FromStr for Phases {
    type Err = UnknownPhases;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "one" => Ok(Phases::One),
            "two" => Ok(Phases::Two),
            other => Err(UnknownPhases(other.to_owned())),
        }
    }
}

/// SIGTERM: announce the move to `new_addr` to every client, wait for their acks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The migration.
    pub migration_id: MigrationId,
    /// Where the clients are sent.
    pub new_addr: SocketAddr,
    /// How long the server waits for the acks, in milliseconds (at least 1); in two-phase
    /// mode also the quiesce round's, unless `quiesce_deadline_ms` is given.
    pub deadline_ms: u64,
    /// Single- or two-phase (absent in requests written before the mode existed: one).
    #[serde(default)]
    pub phases: Phases,
    /// Two-phase: how long the server waits for the clients' `Quiesced`, in milliseconds
    /// (absent: `deadline_ms`). Every quiesced client is held until the slowest answers or
    /// this passes, so it is kept short.
    #[serde(default)]
    pub quiesce_deadline_ms: Option<u64>,
}

impl Request for MigrateRequest {
    const FILE: &'static str = "migrate.json";
    const KIND: &'static str = "migrate request";
    fn migration_id(&self) -> MigrationId {
        self.migration_id
    }
}

/// SIGUSR1: the move failed; send the clients back to `fallback_addr` and serve again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AbortRequest {
    /// The migration that failed.
    pub migration_id: MigrationId,
    /// Where the clients go back to.
    pub fallback_addr: SocketAddr,
    /// How long the server waits for the clients' acks, in milliseconds (at least 1).
    pub deadline_ms: u64,
}

impl Request for AbortRequest {
    const FILE: &'static str = "abort.json";
    const KIND: &'static str = "abort request";
    fn migration_id(&self) -> MigrationId {
        self.migration_id
    }
}

/// SIGUSR2: the process was restored; renew the socket and tell the clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    /// The migration that completed.
    pub migration_id: MigrationId,
}

impl Request for ResumeRequest {
    const FILE: &'static str = "resume.json";
    const KIND: &'static str = "resume request";
    fn migration_id(&self) -> MigrationId {
        self.migration_id
    }
}

/// The server serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    /// Its process id.
    pub pid: u32,
    /// Its socket's address.
    pub addr: SocketAddr,
}

impl ServerEvent for Ready {
    const FILE: &'static str = "ready.json";
    const KIND: &'static str = "ready";
}

/// A client of the server, as the announce report names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRef {
    /// The server's session number.
    pub session: u64,
    /// What the client called itself.
    pub client_id: String,
}

/// Who was told, who answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnounceOutcome {
    /// The address the clients were sent to.
    pub address: SocketAddr,
    /// Clients that acknowledged in time.
    pub acked: Vec<ClientRef>,
    /// Clients that did not.
    pub missing: Vec<ClientRef>,
    /// Plain QUIC clients (no control stream), by session number: they could not be told.
    /// They keep working only if their address stays (behind a front, which keeps their
    /// 4-tuple); in the announce mode the move cuts them off. Omitted when empty, so the JSON
    /// of a server without plain clients is what older readers expect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cannot_follow: Vec<u64>,
    /// From the announcement to the last ack (or the deadline), in milliseconds.
    pub elapsed_ms: f64,
}

/// Who stopped sending when asked (the quiesce round of a two-phase move).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuiesceOutcome {
    /// Clients that answered `Quiesced` in time: nothing of theirs is in flight.
    pub quiesced: Vec<ClientRef>,
    /// Clients that did not (a client that ignores `Quiesce`, a closed control stream, the
    /// deadline): they may still send during the freeze. The move went on regardless.
    pub missing: Vec<ClientRef>,
    /// Plain QUIC clients (no control stream), by session number: not asked, they may send
    /// during the freeze. Omitted when empty (see [`AnnounceOutcome::cannot_follow`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cannot_follow: Vec<u64>,
    /// From the `Quiesce` to the last `Quiesced` (or the deadline), in milliseconds.
    pub elapsed_ms: f64,
}

/// The move was announced; when `parked`, the socket is closed, ready for the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announced {
    /// The mode the server ran (one when the event predates the field).
    #[serde(default)]
    pub phases: Phases,
    /// Two-phase only: the quiesce round, before the announce.
    #[serde(default)]
    pub quiesce: Option<QuiesceOutcome>,
    /// The clients' answers to `Migrate`.
    pub outcome: AnnounceOutcome,
    /// Whether the socket is parked.
    pub parked: bool,
    /// Handshakes the server completed since it started.
    pub handshakes: u64,
}

impl ServerEvent for Announced {
    const FILE: &'static str = "announce.json";
    const KIND: &'static str = "announce";
}

/// The restored server serves again and told its clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resumed {
    /// Its new socket's address (inside its network namespace).
    pub addr: SocketAddr,
    /// Clients told `Resumed`.
    pub told: usize,
    /// Handshakes the server completed since it started (a move must not add any).
    pub handshakes: u64,
}

impl ServerEvent for Resumed {
    const FILE: &'static str = "resumed.json";
    const KIND: &'static str = "resumed";
}

/// The move was abandoned; the clients were sent back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Aborted {
    /// The clients' answers to `MigrateAborted`.
    pub outcome: AnnounceOutcome,
    /// Handshakes the server completed since it started.
    pub handshakes: u64,
}

impl ServerEvent for Aborted {
    const FILE: &'static str = "aborted.json";
    const KIND: &'static str = "aborted";
}

/// One client's downtime report, as the server received it (control-protocol's `Downtime`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportedDowntime {
    /// The server's session number.
    pub session: u64,
    /// What the client called itself.
    pub client_id: String,
    /// The pause it observed (its last reply before the move to its first reply after it),
    /// in microseconds.
    pub downtime_us: u64,
}

impl ReportedDowntime {
    /// The pause as a duration.
    pub fn downtime(&self) -> Duration {
        Duration::from_micros(self.downtime_us)
    }
}

/// The downtime reports of one migration, in the order they arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationDowntimeReports {
    /// The migration.
    pub migration_id: MigrationId,
    /// One report per client at most.
    pub reports: Vec<ReportedDowntime>,
}

/// `downtime.json`: the server's record of its clients' downtime reports for its last few
/// migrations (oldest first). Rewritten by the server, never consumed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DowntimeLog {
    /// By migration, oldest first.
    pub migrations: Vec<MigrationDowntimeReports>,
}

impl DowntimeLog {
    /// Its file name in the admin directory.
    pub const FILE: &'static str = "downtime.json";

    /// The reports of `id` (none when the log does not name it).
    pub fn reports(&self, id: MigrationId) -> &[ReportedDowntime] {
        self.migrations
            .iter()
            .find(|m| m.migration_id == id)
            .map_or(&[], |m| &m.reports)
    }
}

/// What an event file holds: the migration it answers and the outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope<T> {
    /// The migration; `None` for `ready`, or when the server could not read the request.
    pub migration_id: Option<MigrationId>,
    /// The event, or why the server could not do what was asked.
    pub result: Result<T, String>,
}

fn id_text(id: Option<MigrationId>) -> String {
    id.map_or_else(|| "none".to_owned(), |i| i.to_string())
}

/// The admin directory of one server: a descriptor of the directory, and its path for
/// messages.
#[derive(Debug, Clone)]
pub struct AdminDir {
    dir: PathBuf,
    fd: Arc<OwnedFd>,
}

fn errno_io(e: Errno) -> std::io::Error {
    std::io::Error::from(e)
}

impl AdminDir {
    /// Uses `dir`, which must be an existing directory (a symbolic link to one is followed).
    ///
    /// # Errors
    /// [`AdminError::NotADirectory`], [`AdminError::Io`].
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, AdminError> {
        Self::open_with(dir.into(), OFlag::empty())
    }

    /// Uses `dir`, which must be an existing directory and not a symbolic link (opened with
    /// `O_NOFOLLOW`): what a server does before dropping its privileges.
    ///
    /// # Errors
    /// [`AdminError::NotADirectory`] (a symbolic link too), [`AdminError::Io`].
    pub fn open_no_follow(dir: impl Into<PathBuf>) -> Result<Self, AdminError> {
        Self::open_with(dir.into(), OFlag::O_NOFOLLOW)
    }

    fn open_with(dir: PathBuf, extra: OFlag) -> Result<Self, AdminError> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | extra;
        match nix::fcntl::open(&dir, flags, Mode::empty()) {
            Ok(fd) => Self::from_dir_fd(fd, dir),
            // ENOTDIR: not a directory; ELOOP: a symbolic link under O_NOFOLLOW.
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => {
                Err(AdminError::NotADirectory(dir))
            }
            Err(e) => Err(AdminError::Io {
                path: dir,
                source: errno_io(e),
            }),
        }
    }

    /// Uses the directory open as `fd` (for example opened before dropping privileges);
    /// `path` is only used in messages.
    ///
    /// # Errors
    /// [`AdminError::NotADirectory`] when `fd` is not a directory, [`AdminError::Io`].
    pub fn from_dir_fd(fd: OwnedFd, path: impl Into<PathBuf>) -> Result<Self, AdminError> {
        let dir = path.into();
        let st = fstat(&fd).map_err(|e| AdminError::Io {
            path: dir.clone(),
            source: errno_io(e),
        })?;
        if st.st_mode & nix::libc::S_IFMT != nix::libc::S_IFDIR {
            return Err(AdminError::NotADirectory(dir));
        }
        Ok(Self {
            dir,
            fd: Arc::new(fd),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The directory's descriptor (to `fchown` or `fchmod` it, for example).
    pub fn dir_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Removes `name` from the directory; `false` when it did not exist.
    fn unlink(&self, name: &str) -> Result<bool, AdminError> {
        match unlinkat(self.fd.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(AdminError::Io {
                path: self.dir.join(name),
                source: errno_io(e),
            }),
        }
    }

    /// Writes `value` as `name` atomically: a temporary file created exclusively with mode
    /// 0600 (and given to the directory's owner when root writes in another user's
    /// directory), then renamed over `name`.
    fn write<T: Serialize>(&self, name: &str, value: &T) -> Result<(), AdminError> {
        let path = self.dir.join(name);
        let tmp = format!(".{name}.tmp");
        let io = |source| AdminError::Io {
            path: path.clone(),
            source,
        };
        let text = serde_json::to_vec_pretty(value).map_err(|e| io(std::io::Error::other(e)))?;
        // A temporary file left by a writer that died is ours to replace.
        self.unlink(&tmp)?;
        let fd = openat(
            self.fd.as_fd(),
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| io(errno_io(e)))?;
        let dir = fstat(self.fd.as_fd()).map_err(|e| io(errno_io(e)))?;
        if nix::unistd::geteuid().is_root() && dir.st_uid != 0 {
            fchown(
                &fd,
                Some(Uid::from_raw(dir.st_uid)),
                Some(Gid::from_raw(dir.st_gid)),
            )
            .map_err(|e| io(errno_io(e)))?;
        }
        let mut f = std::fs::File::from(fd);
        f.write_all(&text).map_err(io)?;
        drop(f);
        renameat(self.fd.as_fd(), tmp.as_str(), self.fd.as_fd(), name).map_err(|e| io(errno_io(e)))
    }

    /// Reads `name` and leaves it; `None` when it does not exist.
    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, AdminError> {
        self.load(name, false)
    }

    /// Reads and removes `name`; `None` when it does not exist.
    fn take(&self, name: &str) -> Result<Option<Vec<u8>>, AdminError> {
        self.load(name, true)
    }

    /// Reads `name`, removing it first when `consume`; `None` when it does not exist.
    fn load(&self, name: &str, consume: bool) -> Result<Option<Vec<u8>>, AdminError> {
        use std::io::Read as _;
        let path = self.dir.join(name);
        let io = |source| AdminError::Io {
            path: path.clone(),
            source,
        };
        // O_NOFOLLOW: a symbolic link is refused (ELOOP); O_NONBLOCK: a FIFO does not block.
        let fd = match openat(
            self.fd.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => {
                if consume {
                    // Whatever it is, it is consumed.
                    let _ = self.unlink(name);
                }
                return Err(io(errno_io(e)));
            }
        };
        let f = std::fs::File::from(fd);
        if consume {
            // Removed first: whatever it holds, it is consumed.
            self.unlink(name)?;
        }
        let meta = f.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(io(std::io::Error::other("not a regular file")));
        }
        let len = meta.len();
        if len > MAX_FILE {
            return Err(AdminError::TooLarge {
                path,
                len,
                max: MAX_FILE,
            });
        }
        let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        f.take(MAX_FILE).read_to_end(&mut bytes).map_err(io)?;
        Ok(Some(bytes))
    }

    fn parse<T: DeserializeOwned>(
        &self,
        name: &str,
        kind: &'static str,
        bytes: &[u8],
    ) -> Result<T, AdminError> {
        serde_json::from_slice(bytes).map_err(|source| AdminError::Malformed {
            path: self.dir.join(name),
            kind,
            source,
        })
    }

    /// Writes a request (replacing an unread one of the same kind).
    ///
    /// # Errors
    /// [`AdminError::Io`].
    pub fn send_request<R: Request>(&self, request: &R) -> Result<(), AdminError> {
        self.write(R::FILE, request)
    }

    /// Takes (reads and removes) the request of kind `R`; `None` when there is none.
    ///
    /// # Errors
    /// [`AdminError::Io`], [`AdminError::TooLarge`], [`AdminError::Malformed`] (the file is
    /// removed all the same).
    pub fn take_request<R: Request>(&self) -> Result<Option<R>, AdminError> {
        match self.take(R::FILE)? {
            None => Ok(None),
            Some(bytes) => self.parse(R::FILE, R::KIND, &bytes).map(Some),
        }
    }

    /// Writes an event.
    ///
    /// # Errors
    /// [`AdminError::Io`].
    pub fn post_event<E: ServerEvent>(&self, event: &Envelope<E>) -> Result<(), AdminError> {
        self.write(E::FILE, event)
    }

    /// Takes the event of kind `E` if there is one, checking that it answers `expected`.
    ///
    /// # Errors
    /// [`AdminError::Stale`] for an event about another migration (or about one when none is
    /// expected), [`AdminError::ServerReported`] when the server answered with an error, and
    /// the errors of reading the file.
    pub fn take_event<E: ServerEvent>(
        &self,
        expected: Option<MigrationId>,
    ) -> Result<Option<E>, AdminError> {
        let Some(bytes) = self.take(E::FILE)? else {
            return Ok(None);
        };
        let env: Envelope<E> = self.parse(E::FILE, E::KIND, &bytes)?;
        let stale = || AdminError::Stale {
            kind: E::KIND,
            found: id_text(env.migration_id),
            expected: id_text(expected),
        };
        match (env.migration_id, expected) {
            (Some(found), Some(want)) if found != want => return Err(stale()),
            (Some(_), None) => return Err(stale()),
            // The server could not read the request, so it could not name the migration:
            // an error without an id answers whatever was asked.
            (None, Some(_)) if env.result.is_ok() => return Err(stale()),
            _ => {}
        }
        env.result
            .map(Some)
            .map_err(|message| AdminError::ServerReported {
                kind: E::KIND,
                message,
            })
    }

    /// Waits up to `limit` for the event of kind `E` answering `expected` (see
    /// [`AdminDir::take_event`]).
    ///
    /// # Errors
    /// [`AdminError::Timeout`], and those of [`AdminDir::take_event`].
    pub fn wait_event<E: ServerEvent>(
        &self,
        expected: Option<MigrationId>,
        limit: Duration,
    ) -> Result<E, AdminError> {
        let start = Instant::now();
        loop {
            if let Some(e) = self.take_event::<E>(expected)? {
                return Ok(e);
            }
            if start.elapsed() > limit {
                return Err(AdminError::Timeout {
                    file: E::FILE,
                    limit,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Writes the server's downtime record (`downtime.json`), replacing the previous one.
    ///
    /// # Errors
    /// [`AdminError::Io`].
    pub fn post_downtimes(&self, log: &DowntimeLog) -> Result<(), AdminError> {
        self.write(DowntimeLog::FILE, log)
    }

    /// The downtimes the clients reported for migration `id`, as the server recorded them so
    /// far (read, not consumed); empty when there is no record or it does not name `id`.
    ///
    /// # Errors
    /// [`AdminError::Io`], [`AdminError::TooLarge`], [`AdminError::Malformed`].
    pub fn downtimes(&self, id: MigrationId) -> Result<Vec<ReportedDowntime>, AdminError> {
        let Some(bytes) = self.read(DowntimeLog::FILE)? else {
            return Ok(Vec::new());
        };
        let log: DowntimeLog = self.parse(DowntimeLog::FILE, "downtime record", &bytes)?;
        Ok(log.reports(id).to_vec())
    }

    /// Waits up to `limit` until at least `expected` clients reported their downtime for
    /// migration `id`, and returns the reports there are then (fewer when the limit passed:
    /// a client that reports nothing is not an error). Clients report a little after the move
    /// (their first reply after it), so call it once the move's result is known.
    ///
    /// # Errors
    /// Those of [`AdminDir::downtimes`].
    pub fn wait_downtimes(
        &self,
        id: MigrationId,
        expected: usize,
        limit: Duration,
    ) -> Result<Vec<ReportedDowntime>, AdminError> {
        let start = Instant::now();
        loop {
            let got = self.downtimes(id)?;
            if got.len() >= expected || start.elapsed() >= limit {
                return Ok(got);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Removes every request and event file left over (from an interrupted run, or written by
    /// something else); returns the names of those removed. The downtime record stays: it is
    /// read by migration id, and a reader of an earlier move may still be collecting from it.
    ///
    /// # Errors
    /// [`AdminError::Io`].
    pub fn clear(&self) -> Result<Vec<&'static str>, AdminError> {
        let mut removed = Vec::new();
        for name in [
            MigrateRequest::FILE,
            AbortRequest::FILE,
            ResumeRequest::FILE,
            Announced::FILE,
            Resumed::FILE,
            Aborted::FILE,
        ] {
            if self.unlink(name)? {
                removed.push(name);
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn id(n: u8) -> MigrationId {
        MigrationId::from_bytes([n; 16])
    }

    fn dir() -> (tempfile::TempDir, AdminDir) {
        let t = tempfile::tempdir().unwrap();
        let a = AdminDir::open(t.path()).unwrap();
        (t, a)
    }

    fn announced() -> Announced {
        Announced {
            phases: Phases::Two,
            quiesce: Some(QuiesceOutcome {
                quiesced: vec![ClientRef {
                    session: 1,
                    client_id: "car".into(),
                }],
                missing: vec![],
                cannot_follow: vec![],
                elapsed_ms: 0.5,
            }),
            outcome: AnnounceOutcome {
                address: "127.0.0.1:5243".parse().unwrap(),
                acked: vec![ClientRef {
                    session: 1,
                    client_id: "car".into(),
                }],
                missing: vec![],
                cannot_follow: vec![],
                elapsed_ms: 1.5,
            },
            parked: true,
            handshakes: 1,
        }
    }

    #[test]
    fn cannot_follow_is_additive_json() {
        // No plain client: the JSON is the one older readers (deny_unknown_fields) expect.
        let a = announced();
        let text = serde_json::to_string(&a).unwrap();
        assert!(!text.contains("cannot_follow"), "{text}");
        // JSON written before the field existed parses, with nobody unable to follow.
        let back: Announced = serde_json::from_str(&text).unwrap();
        assert_eq!(back, a);
        // With plain clients the field is there and round-trips.
        let mut b = announced();
        b.outcome.cannot_follow = vec![3, 4];
        if let Some(q) = &mut b.quiesce {
            q.cannot_follow = vec![3];
        }
        let text = serde_json::to_string(&b).unwrap();
        assert!(text.contains("\"cannot_follow\":[3,4]"), "{text}");
        assert_eq!(serde_json::from_str::<Announced>(&text).unwrap(), b);
    }

    #[test]
    fn a_request_is_private_and_consumed_when_read() {
        let (t, a) = dir();
        let req = MigrateRequest {
            migration_id: id(1),
            new_addr: "127.0.0.1:5243".parse().unwrap(),
            deadline_ms: 2000,
            phases: Phases::Two,
            quiesce_deadline_ms: None,
        };
        a.send_request(&req).unwrap();
        let mode = std::fs::metadata(t.path().join("migrate.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(a.take_request::<MigrateRequest>().unwrap(), Some(req));
        assert!(!t.path().join("migrate.json").exists());
        assert_eq!(a.take_request::<MigrateRequest>().unwrap(), None);
    }

    #[test]
    fn a_malformed_request_is_a_typed_error_and_is_removed() {
        let (t, a) = dir();
        for bad in [
            "{ not json",
            r#"{"new_addr":"127.0.0.1:1","deadline_ms":5}"#,
            r#"{"migration_id":"zz","new_addr":"127.0.0.1:1","deadline_ms":5}"#,
            r#"{"migration_id":"01010101010101010101010101010101","new_addr":"127.0.0.1:1","deadline_ms":5,"extra":1}"#,
            "",
        ] {
            std::fs::write(t.path().join("migrate.json"), bad).unwrap();
            let err = a.take_request::<MigrateRequest>().unwrap_err();
            assert!(matches!(err, AdminError::Malformed { .. }), "{bad}: {err}");
            assert!(!t.path().join("migrate.json").exists());
        }
    }

    #[test]
    fn the_mode_defaults_to_one_phase_and_refuses_unknown_values() {
        let (t, a) = dir();
        let old = r#"{"migration_id":"01010101010101010101010101010101","new_addr":"127.0.0.1:1","deadline_ms":5}"#;
        std::fs::write(t.path().join("migrate.json"), old).unwrap();
        let r = a.take_request::<MigrateRequest>().unwrap().unwrap();
        assert_eq!(
            r.phases,
            Phases::One,
            "a request without the mode is the seed's"
        );
        assert_eq!(r.quiesce_deadline_ms, None);
        let q = old.replace(
            "\"deadline_ms\":5",
            "\"deadline_ms\":5,\"quiesce_deadline_ms\":40",
        );
        std::fs::write(t.path().join("migrate.json"), &q).unwrap();
        assert_eq!(
            a.take_request::<MigrateRequest>()
                .unwrap()
                .unwrap()
                .quiesce_deadline_ms,
            Some(40)
        );
        for bad in ["-1", "\"40\"", "1.5"] {
            let text = old.replace(
                "\"deadline_ms\":5",
                &format!("\"deadline_ms\":5,\"quiesce_deadline_ms\":{bad}"),
            );
            std::fs::write(t.path().join("migrate.json"), &text).unwrap();
            let err = a.take_request::<MigrateRequest>().unwrap_err();
            assert!(matches!(err, AdminError::Malformed { .. }), "{bad}: {err}");
        }
        let two = old.replace("\"deadline_ms\":5", "\"deadline_ms\":5,\"phases\":\"two\"");
        std::fs::write(t.path().join("migrate.json"), &two).unwrap();
        assert_eq!(
            a.take_request::<MigrateRequest>().unwrap().unwrap().phases,
            Phases::Two
        );
        for bad in ["\"three\"", "2", "\"Two\"", "null"] {
            let text = old.replace(
                "\"deadline_ms\":5",
                &format!("\"deadline_ms\":5,\"phases\":{bad}"),
            );
            std::fs::write(t.path().join("migrate.json"), &text).unwrap();
            let err = a.take_request::<MigrateRequest>().unwrap_err();
            assert!(matches!(err, AdminError::Malformed { .. }), "{bad}: {err}");
        }
        // The command-line form.
        assert_eq!("two".parse::<Phases>(), Ok(Phases::Two));
        assert_eq!("one".parse::<Phases>(), Ok(Phases::One));
        let e = "both".parse::<Phases>().unwrap_err();
        assert_eq!(e, UnknownPhases("both".into()));
        assert!(e.to_string().contains("`one` or `two`"), "{e}");
        assert_eq!(Phases::Two.to_string(), "two");
        // An announce event written before the mode existed reads as one phase.
        let mut ev = serde_json::to_value(announced()).unwrap();
        let obj = ev.as_object_mut().unwrap();
        obj.remove("phases");
        obj.remove("quiesce");
        let back: Announced = serde_json::from_value(ev).unwrap();
        assert_eq!((back.phases, back.quiesce), (Phases::One, None));
    }

    #[test]
    fn an_event_for_the_awaited_migration_is_taken() {
        let (_t, a) = dir();
        a.post_event(&Envelope {
            migration_id: Some(id(1)),
            result: Ok(announced()),
        })
        .unwrap();
        assert_eq!(
            a.take_event::<Announced>(Some(id(1))).unwrap(),
            Some(announced())
        );
        assert_eq!(a.take_event::<Announced>(Some(id(1))).unwrap(), None);
    }

    #[test]
    fn a_stale_announce_of_another_migration_is_refused() {
        let (t, a) = dir();
        a.post_event(&Envelope {
            migration_id: Some(id(7)),
            result: Ok(announced()),
        })
        .unwrap();
        let err = a.take_event::<Announced>(Some(id(1))).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, AdminError::Stale { .. }), "{msg}");
        assert!(msg.contains(&id(7).to_string()), "{msg}");
        assert!(msg.contains(&id(1).to_string()), "{msg}");
        // Consumed all the same: the next reader does not see it again.
        assert!(!t.path().join("announce.json").exists());
        // An event naming no migration while one is awaited is refused too (unless it is an
        // error: the server could not read the request).
        a.post_event(&Envelope {
            migration_id: None,
            result: Ok(announced()),
        })
        .unwrap();
        assert!(matches!(
            a.take_event::<Announced>(Some(id(1))),
            Err(AdminError::Stale { .. })
        ));
        a.post_event::<Announced>(&Envelope {
            migration_id: None,
            result: Err("bad request".into()),
        })
        .unwrap();
        let err = a.take_event::<Announced>(Some(id(1))).unwrap_err();
        assert!(
            matches!(&err, AdminError::ServerReported { message, .. } if message == "bad request"),
            "{err}"
        );
        // A migration's event while none is awaited (ready) is foreign.
        a.post_event(&Envelope {
            migration_id: Some(id(2)),
            result: Ok(Ready {
                pid: 1,
                addr: "0.0.0.0:4242".parse().unwrap(),
            }),
        })
        .unwrap();
        assert!(matches!(
            a.take_event::<Ready>(None),
            Err(AdminError::Stale { .. })
        ));
    }

    #[test]
    fn an_error_from_the_server_is_reported() {
        let (_t, a) = dir();
        a.post_event::<Resumed>(&Envelope {
            migration_id: Some(id(3)),
            result: Err("rebind failed".into()),
        })
        .unwrap();
        let err = a.take_event::<Resumed>(Some(id(3))).unwrap_err();
        assert!(err.to_string().contains("rebind failed"), "{err}");
    }

    #[test]
    fn garbage_and_oversized_event_files_are_typed_errors() {
        let (t, a) = dir();
        std::fs::write(t.path().join("resumed.json"), b"\xff\x00garbage").unwrap();
        assert!(matches!(
            a.take_event::<Resumed>(Some(id(1))),
            Err(AdminError::Malformed { .. })
        ));
        let f = std::fs::File::create(t.path().join("resumed.json")).unwrap();
        f.set_len(MAX_FILE + 1).unwrap();
        assert!(matches!(
            a.take_event::<Resumed>(Some(id(1))),
            Err(AdminError::TooLarge { .. })
        ));
        assert!(!t.path().join("resumed.json").exists());
    }

    #[test]
    fn waiting_times_out_with_the_file_named() {
        let (_t, a) = dir();
        let err = a
            .wait_event::<Aborted>(Some(id(1)), Duration::from_millis(20))
            .unwrap_err();
        assert!(err.to_string().contains("aborted.json"), "{err}");
    }

    fn reported(session: u64, us: u64) -> ReportedDowntime {
        ReportedDowntime {
            session,
            client_id: format!("c{session}"),
            downtime_us: us,
        }
    }

    #[test]
    fn the_downtime_record_is_read_by_migration_and_not_consumed() {
        let (t, a) = dir();
        assert!(a.downtimes(id(1)).unwrap().is_empty(), "no record yet");
        let log = DowntimeLog {
            migrations: vec![
                MigrationDowntimeReports {
                    migration_id: id(1),
                    reports: vec![reported(1, 30_000), reported(2, 41_500)],
                },
                MigrationDowntimeReports {
                    migration_id: id(2),
                    reports: vec![reported(1, 7)],
                },
            ],
        };
        a.post_downtimes(&log).unwrap();
        let mode = std::fs::metadata(t.path().join(DowntimeLog::FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            a.downtimes(id(1)).unwrap(),
            vec![reported(1, 30_000), reported(2, 41_500)]
        );
        assert_eq!(a.downtimes(id(1)).unwrap().len(), 2, "read twice");
        assert_eq!(
            a.downtimes(id(2)).unwrap()[0].downtime(),
            Duration::from_micros(7)
        );
        assert!(a.downtimes(id(3)).unwrap().is_empty());
        // clear() leaves it: it answers no request.
        a.clear().unwrap();
        assert_eq!(a.downtimes(id(2)).unwrap().len(), 1);
        // Garbage is a typed error, and stays (the server rewrites it).
        std::fs::write(t.path().join(DowntimeLog::FILE), b"{").unwrap();
        assert!(matches!(
            a.downtimes(id(1)),
            Err(AdminError::Malformed { .. })
        ));
        assert!(t.path().join(DowntimeLog::FILE).exists());
    }

    #[test]
    fn waiting_for_downtimes_returns_what_came_by_the_limit() {
        let (_t, a) = dir();
        // Nothing: the limit passes, not an error.
        let start = Instant::now();
        assert!(
            a.wait_downtimes(id(1), 2, Duration::from_millis(50))
                .unwrap()
                .is_empty()
        );
        assert!(start.elapsed() >= Duration::from_millis(50));
        // The reports arrive while control waits.
        let writer = a.clone();
        let t = std::thread::spawn(move || {
            for n in 1..=2 {
                std::thread::sleep(Duration::from_millis(20));
                writer
                    .post_downtimes(&DowntimeLog {
                        migrations: vec![MigrationDowntimeReports {
                            migration_id: id(1),
                            reports: (1..=n).map(|s| reported(s, 10)).collect(),
                        }],
                    })
                    .unwrap();
            }
        });
        let got = a.wait_downtimes(id(1), 2, Duration::from_secs(5)).unwrap();
        t.join().unwrap();
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn clear_removes_leftovers_only() {
        let (t, a) = dir();
        std::fs::write(t.path().join("announce.json"), "{}").unwrap();
        std::fs::write(t.path().join("migrate.json"), "{}").unwrap();
        std::fs::write(t.path().join("ready.json"), "{}").unwrap();
        std::fs::write(t.path().join("notes.txt"), "mine").unwrap();
        let mut removed = a.clear().unwrap();
        removed.sort_unstable();
        assert_eq!(removed, vec!["announce.json", "migrate.json"]);
        assert!(t.path().join("notes.txt").exists());
        assert!(t.path().join("ready.json").exists());
    }

    #[test]
    fn a_missing_directory_is_refused() {
        assert!(matches!(
            AdminDir::open("/nonexistent/admin"),
            Err(AdminError::NotADirectory(_))
        ));
    }

    #[test]
    fn the_directory_is_used_through_its_descriptor_not_its_path() {
        let t = tempfile::tempdir().unwrap();
        let first = t.path().join("admin");
        std::fs::create_dir(&first).unwrap();
        let fd =
            nix::fcntl::open(&first, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty()).unwrap();
        let a = AdminDir::from_dir_fd(fd, &first).unwrap();
        // The path now leads elsewhere: the directory opened is still the one used.
        let moved = t.path().join("moved");
        std::fs::rename(&first, &moved).unwrap();
        std::fs::create_dir(&first).unwrap();
        a.send_request(&ResumeRequest {
            migration_id: id(5),
        })
        .unwrap();
        assert!(moved.join("resume.json").exists());
        assert!(!first.join("resume.json").exists());
        assert_eq!(
            a.take_request::<ResumeRequest>().unwrap(),
            Some(ResumeRequest {
                migration_id: id(5)
            })
        );
        assert_eq!(a.clear().unwrap(), Vec::<&str>::new());
    }

    #[test]
    fn symlinks_are_neither_followed_nor_opened_as_the_directory() {
        let (t, a) = dir();
        let secret = t.path().join("secret");
        std::fs::write(
            &secret,
            r#"{"migration_id":"04040404040404040404040404040404"}"#,
        )
        .unwrap();
        std::os::unix::fs::symlink(&secret, t.path().join("resume.json")).unwrap();
        let err = a.take_request::<ResumeRequest>().unwrap_err();
        assert!(matches!(err, AdminError::Io { .. }), "{err}");
        // The link is consumed, its target untouched.
        assert!(std::fs::symlink_metadata(t.path().join("resume.json")).is_err());
        assert!(secret.exists());
        let link = t.path().join("link");
        std::os::unix::fs::symlink(t.path(), &link).unwrap();
        assert!(AdminDir::open(&link).is_ok());
        assert!(matches!(
            AdminDir::open_no_follow(&link),
            Err(AdminError::NotADirectory(_))
        ));
        assert!(matches!(
            AdminDir::open(&secret),
            Err(AdminError::NotADirectory(_))
        ));
    }

    #[test]
    fn root_gives_its_files_to_the_directory_owner() {
        use std::os::unix::fs::MetadataExt as _;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP root_gives_its_files_to_the_directory_owner: needs root (chown)");
            return;
        }
        let (t, a) = dir();
        std::os::unix::fs::chown(t.path(), Some(65534), Some(65534)).unwrap();
        a.send_request(&ResumeRequest {
            migration_id: id(6),
        })
        .unwrap();
        let m = std::fs::metadata(t.path().join("resume.json")).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (65534, 65534, 0o600));
    }

    #[test]
    fn a_leftover_temporary_file_does_not_block_writing() {
        let (t, a) = dir();
        std::fs::write(t.path().join(".resume.json.tmp"), "half").unwrap();
        a.send_request(&ResumeRequest {
            migration_id: id(4),
        })
        .unwrap();
        assert_eq!(
            a.take_request::<ResumeRequest>().unwrap(),
            Some(ResumeRequest {
                migration_id: id(4)
            })
        );
    }
}
