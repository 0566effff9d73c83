//! The messages of control's agents: one agent per host, talking to the other hosts' agents
//! over mutual-TLS QUIC, and to the `control` command line of its own host over a unix socket.
//!
//! ```text
//!   control migrate --to b ──LocalRequest──► agent a ──PeerRequest{token, body}──► agent b
//!        (unix socket, this host)              │  ◄──────PeerReply───────────────    │
//!                                              │   image stream: Receive, then        │
//!                                              └── migration-wire chunks (sealed) ───►┘
//! ```
//!
//! Every message is one frame of `wire-frame` (a 4-byte length, then the body); the body is
//! the postcard encoding of `(VERSION, message)`. Decoding is total: a wrong version, an
//! oversized frame, trailing bytes, a name that is not a [`Name`] or any garbage give a typed
//! [`ProtocolError`], never a panic. The crate does no I/O and reads no clock: the agent reads
//! frames from its streams and hands their bodies to [`decode`].
//!
//! Each request between agents carries an HMAC migration token (migration-crypto) binding the
//! migration id, the source host and the target host, with an expiry; the target verifies it
//! before it looks at the body. A `Prepare` is accepted once per token (replay cache); the
//! later requests of the same migration carry the same token and must come over a connection
//! authenticated as the same source host.
//!
//! Growing the protocol: postcard numbers enum variants by position and fields by order, and
//! keeps no names. An addition is a new variant at the end of its enum, so that the bytes of
//! every older message stay what they were (golden tests) and an agent that predates it
//! refuses it as a request it does not know (`Refusal::Malformed`), never mis-reads it. That is
//! how post-copy came in: [`PeerBody::PreparePostCopy`], [`PeerBody::Pages`],
//! [`PeerReply::PagesReady`], [`PeerReply::ResumedResident`], [`Refusal::PostCopy`]; a cold
//! move is byte for byte the move it was. [`VERSION`] changes only for a change that cannot
//! be made so.

use std::net::SocketAddr;

use admin_api::{CriuTiming, Phases};
use migration_core::MigrationId;
use serde::{Deserialize, Serialize};

/// The protocol version, first in every message body.
pub const VERSION: u16 = 1;
/// The largest message body either side accepts (image data travels outside messages).
pub const MAX_MESSAGE: usize = 256 * 1024;
/// ALPN of the agents' QUIC connections.
pub const PEER_ALPN: &[u8] = b"qlm-agent/1";
/// The longest [`Name`].
pub const MAX_NAME: usize = 63;

/// What went wrong with a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The frame or its body is longer than [`MAX_MESSAGE`], or could not be framed.
    #[error("message framing: {0}")]
    Frame(#[from] wire_frame::FrameError),
    /// The body does not start with a version.
    #[error("the message does not start with a protocol version")]
    NoVersion,
    /// The body was made for another protocol version.
    #[error("protocol version {got}, this agent speaks {VERSION}")]
    Version {
        /// The version the peer sent.
        got: u16,
    },
}

/// A host or service name: 1 to 63 of `a-z`, `0-9` and `-`, not starting with `-`. Checked
/// when decoded, so a name from the network can go into a path or a log line as it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Name(String);

/// A string that is not a [`Name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a name (1-63 of a-z, 0-9 and '-', not starting with '-')")]
pub struct BadName(pub String);

impl Name {
    /// Checks `s`.
    pub fn new(s: &str) -> Result<Name, BadName> {
        let ok = !s.is_empty()
            && s.len() <= MAX_NAME
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(Name(s.to_owned()))
        } else {
            Err(BadName(s.chars().take(80).collect()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Name {
    type Err = BadName;
    fn from_str(s: &str) -> Result<Name, BadName> {
        Name::new(s)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Name, D::Error> {
        let s = String::deserialize(d)?;
        Name::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A request from one agent to another, on a bidirectional stream of their connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerRequest {
    /// The migration token (migration-crypto's encoding), verified before the body.
    #[serde(with = "serde_bytes")]
    pub token: Vec<u8>,
    /// What is asked.
    pub body: PeerBody,
}

/// What one agent asks another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum PeerBody {
    /// Get ready to receive a service: a slot, a restore worker, the key agreement.
    Prepare(Prepare),
    /// The rest of this stream is the migration's image set (migration-wire frames, sealed
    /// with the agreed key); answered with [`PeerReply::Received`] once it is verified.
    Receive {
        /// The migration.
        migration: MigrationId,
    },
    /// Restore the received image set into the service's slot; answered once the process
    /// runs there (its socket still parked).
    Restore {
        /// The migration.
        migration: MigrationId,
    },
    /// Have the restored server open its socket and tell its clients (`Resumed`).
    Resume {
        /// The migration.
        migration: MigrationId,
    },
    /// Give the migration up: kill what was restored, wipe the images, free the slot.
    Abort {
        /// The migration.
        migration: MigrationId,
    },
    /// The host's services and free capacity (placement).
    Status,
    /// A benchmark after a completed move: the rest of this stream is the same image set
    /// copied plainly (no compression, no sealing; QUIC's own encryption only), received into
    /// scratch storage, timed and wiped; answered with [`PeerReply::Received`].
    PlainCopy {
        /// The migration whose image set it is.
        migration: MigrationId,
    },
    /// [`PeerBody::Prepare`] for a post-copy move (the memory follows the restore over a
    /// [`PeerBody::Pages`] stream). A request of its own rather than a field of [`Prepare`]:
    /// a cold move's `Prepare` keeps its bytes, and an agent without post-copy refuses this
    /// one as unknown. The target also refuses it when it cannot run criu's lazy-pages
    /// daemon ([`Refusal::PostCopy`]).
    PreparePostCopy(Prepare),
    /// The page stream of a post-copy move prepared with [`PeerBody::PreparePostCopy`]: the
    /// target starts `criu lazy-pages --page-server` on the received image set and answers
    /// [`PeerReply::PagesReady`]; from then on the rest of the stream, both ways, is criu's
    /// page-server traffic between the source's lazy dump and that daemon, relayed as it is.
    Pages {
        /// The migration.
        migration: MigrationId,
    },
}

/// How the server's memory moves.
///
/// Deliberately exhaustive: a new mode changes what both agents do at every phase, so every
/// `match` on it should have to say what that is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Memory {
    /// All of it in the image set, during the freeze.
    #[default]
    Cold,
    /// After the restore, while the server runs, over a [`PeerBody::Pages`] stream.
    PostCopy,
}

/// A fault the target agent injects when it runs with faults allowed (tests and the
/// multi-host scenario's failure cases).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TargetFault {
    /// The target agent exits as soon as the restore is asked, before criu runs.
    DieBeforeRestore,
    /// The target agent exits while criu restores.
    DieDuringRestore,
    /// criu's restore fails (an image is hidden from it).
    RestoreFails,
}

/// [`PeerBody::Prepare`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prepare {
    /// The migration.
    pub migration: MigrationId,
    /// The service that will arrive.
    pub service: ServiceSpec,
    /// The source's X25519 public key for this migration's sealing key.
    pub seal_public: [u8; 32],
    /// The server's PID (criu restores it under the same one): how a target agent that
    /// restarted recognises a server restored before it died.
    pub server_pid: i32,
    /// Single- or two-phase (the restored server answers accordingly).
    pub phases: Phases,
    /// A fault to inject (refused unless the target allows faults).
    pub fault: Option<TargetFault>,
    /// About how many bytes the image set will take (the server's resident memory): a
    /// target without that much free storage refuses at once instead of failing mid-transfer.
    pub image_estimate: u64,
}

/// What a host needs to know to run a service it receives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// The service's name, the same on every host.
    pub name: Name,
    /// The account the server runs as (its restored credentials are in the images; the
    /// target gives it its admin folder).
    pub server_user: Option<String>,
    /// Moves the service made before this one.
    pub moves: u32,
}

/// An answer from one agent to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum PeerReply {
    /// Ready: the target's public key and the address clients will reach the service at.
    Prepared {
        /// The target's X25519 public key for this migration.
        seal_public: [u8; 32],
        /// The service's address at the target (host address and port).
        address: SocketAddr,
    },
    /// The image set arrived and verified.
    Received(TransferFigures),
    /// The process runs at the target, its socket parked.
    Restored {
        /// Its PID at the target.
        pid: i32,
        /// criu's restore.
        restore: CriuTiming,
        /// The restored process was seen in the slot's network namespace.
        placement_checked: bool,
    },
    /// The restored server serves at the target.
    Resumed {
        /// Clients the server told (`Resumed`).
        clients: u32,
        /// Handshakes the server completed since it started (a move adds none).
        handshakes: u64,
    },
    /// The migration was given up at the target.
    Aborted {
        /// What the target undid.
        undone: String,
    },
    /// The host's state.
    Status(HostStatus),
    /// The request was refused; nothing was done.
    Refused(Refusal),
    /// Answer to [`PeerBody::Pages`]: the lazy-pages daemon waits; the rest of the stream is
    /// criu's page traffic.
    PagesReady,
    /// Answer to [`PeerBody::Resume`] of a post-copy move: the restored server serves here
    /// and every page of its memory arrived (the lazy-pages daemon exited successfully).
    ResumedResident {
        /// Clients the server told (`Resumed`).
        clients: u32,
        /// Handshakes the server completed since it started.
        handshakes: u64,
        /// From the end of the restore until every page was resident, milliseconds.
        resident_after_ms: f64,
        /// Pages the lazy-pages daemon copied into the process (from its log).
        pages: Option<u64>,
    },
}

/// Figures of one image transfer, as the receiver counted them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TransferFigures {
    /// Bytes of the files (the image set as it lies on disk).
    pub raw_bytes: u64,
    /// The same after compression.
    pub compressed_bytes: u64,
    /// Bytes on the wire: compressed, sealed and framed.
    pub sealed_bytes: u64,
    /// Files.
    pub files: u64,
    /// From the first byte to the verified end, milliseconds.
    pub ms: f64,
}

/// Why a request was refused. Each is logged by the agent that refused it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The token failed verification.
    #[error("token refused: {0}")]
    Token(TokenRefusal),
    /// The peer is not on this host's allowlist.
    #[error("host {peer} is not allowed here")]
    NotAllowed {
        /// The peer's name (from its certificate).
        peer: String,
    },
    /// Too many requests from this peer.
    #[error("rate limited")]
    RateLimited,
    /// No such service here.
    #[error("no service {0} here")]
    UnknownService(String),
    /// No such migration in progress here (or prepared by another host).
    #[error("no migration {0} in progress here")]
    UnknownMigration(String),
    /// The request could not be decoded.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The request was larger than [`MAX_MESSAGE`].
    #[error("request too large")]
    Oversized,
    /// The host has no room (no free slot, or too many migrations in flight).
    #[error("busy: {0}")]
    Busy(String),
    /// The work failed.
    #[error("{phase} failed at {host}: {message}")]
    Failed {
        /// Which step.
        phase: String,
        /// Which host.
        host: String,
        /// Why.
        message: String,
    },
    /// Post-copy cannot run on this host (its sysctls, criu), or the request needs a
    /// migration prepared for post-copy; nothing was done.
    #[error("post-copy refused at {host}: {reason}")]
    PostCopy {
        /// Which host.
        host: String,
        /// Why, and what to do about it.
        reason: String,
    },
}

/// Why a token was refused (migration-crypto's `TokenError`, as the peer may see it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum TokenRefusal {
    /// Not a token.
    #[error("malformed")]
    Malformed,
    /// Its MAC does not verify.
    #[error("forged")]
    Forged,
    /// It names another source or target.
    #[error("bound to other hosts")]
    WrongBinding,
    /// Issued in the future.
    #[error("not yet valid")]
    NotYetValid,
    /// Past its expiry.
    #[error("expired")]
    Expired,
    /// Already used.
    #[error("replayed")]
    Replayed,
    /// It names another migration than the request.
    #[error("for another migration")]
    WrongMigration,
}

/// A host's state, for `control status` and for placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    /// The host.
    pub host: Name,
    /// Services running here.
    pub services: Vec<ServiceStatus>,
    /// How many more services this host can take.
    pub free_slots: u32,
    /// Migrations in flight (either direction).
    pub migrations_in_flight: u32,
    /// The last migrations this agent drove or received, newest last.
    pub recent: Vec<MoveSummary>,
}

/// The fleet as one agent sees it (`control status --fleet --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// Hosts that answered, this host first.
    pub hosts: Vec<HostStatus>,
    /// Hosts that did not, with why.
    pub unreachable: Vec<String>,
}

/// One service on a host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// The service.
    pub name: Name,
    /// Where clients reach it.
    pub address: SocketAddr,
    /// The server's PID on this host.
    pub pid: i32,
    /// Connected clients, from the server's last announce (None before any).
    pub clients: Option<u32>,
    /// Moves this service made so far.
    pub migrations: u32,
}

/// How a migration ended, in a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Outcome {
    /// The service runs at the target.
    Completed,
    /// A phase failed; the service runs at the source again.
    RolledBack,
    /// A phase failed and so did the way back, or the service ended at neither.
    Failed,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Completed => "completed",
            Outcome::RolledBack => "rolled back",
            Outcome::Failed => "failed",
        })
    }
}

/// A migration in a few figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveSummary {
    /// The migration.
    pub migration: MigrationId,
    /// The service.
    pub service: Name,
    /// From.
    pub from: Name,
    /// To.
    pub to: Name,
    /// How it ended.
    pub outcome: Outcome,
    /// The phase that failed and the host it failed at.
    pub failed: Option<(String, String)>,
    /// The freeze, milliseconds (None when the process was never frozen).
    pub freeze_ms: Option<f64>,
    /// Unix time the migration started, seconds.
    pub started_unix: u64,
}

/// A request from the command line to the agent of its host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum LocalRequest {
    /// This host, and (`all`) every peer the agent knows.
    Status {
        /// Ask the peers too.
        all: bool,
    },
    /// Start a service here.
    Start(StartService),
    /// Stop a service here and free its slot.
    Stop {
        /// The service.
        service: Name,
    },
    /// Move a service of this host to another host.
    Migrate(MigrateService),
    /// Move every service of this host elsewhere.
    Drain(Drain),
}

/// [`LocalRequest::Start`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartService {
    /// The service's name.
    pub name: Name,
    /// The host port clients reach it at (0: the agent picks a free one).
    pub port: u16,
    /// The account the server runs as.
    pub server_user: Option<String>,
    /// Extra arguments for the server (the demo server's `--ballast-mib 64`, ...).
    pub server_args: Vec<String>,
    /// Start the server as PID 1 of its own pid namespace, which post-copy moves need (with
    /// no `server_user`: criu dumps such a server only if it may mount a /proc for it). A
    /// field, like [`MigrateService::memory`]: the command line and its agent are one binary.
    pub pid_namespace: bool,
}

/// [`LocalRequest::Migrate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrateService {
    /// The service.
    pub service: Name,
    /// The target host.
    pub to: Name,
    /// Single- or two-phase.
    pub phases: Phases,
    /// A fault to inject (tests and the scenario's failure cases).
    pub fault: Option<MoveFault>,
    /// After a completed move, copy the same image set plainly to the target and report how
    /// long it took (the sealed transfer's baseline over the same link).
    pub plain_copy_after: bool,
    /// How the memory moves. A field, not a new variant: the command line and its agent are
    /// the same `control` binary of one host, never of two versions.
    pub memory: Memory,
}

/// A fault in a cross-host move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MoveFault {
    /// The source closes the link in the middle of the image transfer.
    CutLinkDuringTransfer,
    /// The source flips a byte of the sealed stream (the target must refuse it).
    CorruptChunk,
    /// The source presents a token made with another key.
    ForgedToken,
    /// A fault at the target.
    Target(TargetFault),
    /// The source's agent dies right after the dump (the server is dumped, its image set is
    /// in the source's storage): the agent started after it must finish or undo the move.
    SourceDiesAfterDump,
}

/// [`LocalRequest::Drain`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drain {
    /// Where to: these hosts (None: every allowed peer, by free capacity).
    pub targets: Option<Vec<Name>>,
    /// Moves in flight at once.
    pub concurrency: u32,
    /// Single- or two-phase.
    pub phases: Phases,
}

/// The agent's answer to the command line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum LocalReply {
    /// Hosts' states (this host first).
    Status(Vec<Result<HostStatus, String>>),
    /// The service runs.
    Started(ServiceStatus),
    /// The service was stopped.
    Stopped,
    /// A move's report, as JSON (admin-api's `MoveReport` plus the cross-host fields).
    Moved {
        /// In a few figures.
        summary: MoveSummary,
        /// The whole report, JSON.
        report_json: String,
    },
    /// A drain's moves.
    Drained(Vec<MoveSummary>),
    /// The request failed.
    Error(String),
}

/// Largest [`LocalReply`] (the agent to the command line of its own host, over a socket only
/// root can open): a move's whole report grows with its clients (about 90 bytes each), so it
/// gets more room than a peer's message.
pub const MAX_LOCAL_REPLY: usize = 16 * 1024 * 1024;

/// Appends the frame of `msg` to `out`.
pub fn encode<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    wire_frame::encode(&(VERSION, msg), MAX_MESSAGE, out)?;
    Ok(())
}

/// The frame of a [`LocalReply`] (bounded by [`MAX_LOCAL_REPLY`]).
pub fn local_reply_frame(reply: &LocalReply) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::new();
    wire_frame::encode(&(VERSION, reply), MAX_LOCAL_REPLY, &mut out)?;
    Ok(out)
}

/// Decodes a [`LocalReply`]'s frame body (bounded by [`MAX_LOCAL_REPLY`]).
pub fn decode_local_reply(body: &[u8]) -> Result<LocalReply, ProtocolError> {
    decode_bounded(body, MAX_LOCAL_REPLY)
}

/// The frame of `msg`.
pub fn to_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut out = Vec::new();
    encode(msg, &mut out)?;
    Ok(out)
}

/// Decodes a frame's body (without its length prefix).
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ProtocolError> {
    decode_bounded(body, MAX_MESSAGE)
}

fn decode_bounded<T: serde::de::DeserializeOwned>(
    body: &[u8],
    max: usize,
) -> Result<T, ProtocolError> {
    if body.len() > max {
        return Err(wire_frame::FrameError::TooLarge {
            len: body.len() as u64,
            max,
        }
        .into());
    }
    // The version first, on its own: a body of another version is refused as such even when
    // the rest would not decode.
    let version = take_version(body)?;
    if version != VERSION {
        return Err(ProtocolError::Version { got: version });
    }
    let (_, msg): (u16, T) = wire_frame::decode_body(body)?;
    Ok(msg)
}

/// The leading version of a body: postcard encodes a tuple element by element, a u16 as a
/// varint of at most three bytes.
fn take_version(body: &[u8]) -> Result<u16, ProtocolError> {
    let mut value: u32 = 0;
    for (i, &b) in body.iter().take(3).enumerate() {
        value |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return u16::try_from(value).map_err(|_| ProtocolError::NoVersion);
        }
    }
    Err(ProtocolError::NoVersion)
}

#[cfg(test)]
mod tests;
