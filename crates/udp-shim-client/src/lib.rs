//! A quinn 0.11 UDP socket for a QUIC client whose server moves between hosts.
//!
//! ```text
//!   quinn (client)                 SwappableUdp                        network
//!  ───────────────        ───────────────────────────────       ──────────────────
//!   try_send(to fake) ──▶ destination := real peer,      ──▶ current local socket
//!                         src_ip cleared                         ──▶ real peer
//!   poll_recv ◀── from fake ◀── only datagrams from the real ◀── current local socket
//!                              peer; others dropped + counted
//!
//!   set_peer(new) ───────▶ real peer swapped, receive task woken; an *overlap* starts:
//!                          datagrams also go to (and come from) the previous peer
//!   confirm_peer(new) ───▶ the wrapper vouches for `new` (an authenticated message from the
//!                          server says it runs there): the overlap ends, previous peer dropped
//!   cap (time or bytes) ─▶ no confirmation in time: swap back to the previous peer,
//!                          MoveError in move_outcomes()
//!   rebind_local(addr) ──▶ local socket replaced (old closed), never an error to quinn
//! ```
//!
//! quinn-proto drops, on the client side, every datagram whose source differs from the path's
//! remote address: a quinn client never accepts a new server address. [`SwappableUdp`] hides
//! the server's moves: quinn always talks to one fixed *fake peer* ([`SwappableUdp::fake_peer`]),
//! while the shim sends to, and accepts datagrams only from, the current *real peer*
//! ([`SwappableUdp::set_peer`]).
//!
//! # The move overlap: bounded and authenticated
//!
//! The server announces its move while it still runs at the old address, and keeps running
//! there until it is frozen: the client's answer and traffic must still reach it there. So
//! after `set_peer(new)` every transmission goes to the previous peer *and* to `new`, and
//! datagrams from either are delivered to quinn. That overlap ends in exactly one of three
//! ways ([`MoveOutcome`]):
//!
//! - **Confirmed** by [`SwappableUdp::confirm_peer`]. The shim cannot decrypt QUIC, so it never
//!   decides on its own that the server is at `new`: a datagram from `new` is delivered to
//!   quinn (which authenticates it, or drops it if it does not decrypt) and counted
//!   ([`ShimStats::unconfirmed_received`]), but it does not end the overlap. The wrapper, which
//!   holds the quinn connection, calls `confirm_peer(new)` when quinn hands it an
//!   *authenticated* statement from the server that it runs at `new`: in this project the
//!   control stream's `Resumed` for the migration that named `new` (stream data, so
//!   AEAD-protected with the connection's 1-RTT keys: no one without those keys can produce
//!   it, and quinn's packet-number check refuses a replay). The overlap ends at once if a
//!   datagram from `new` has already been delivered during this overlap (the usual case:
//!   `Resumed` itself arrives from `new`, and the shim delivered that datagram before quinn
//!   could decrypt it), otherwise at the first datagram from `new` (the server has already
//!   vouched for the address; the datagram ties the move to a working path).
//! - **Reverted**: `set_peer(previous)` (an aborted move) ends it at once.
//! - **Abandoned** at its cap ([`OverlapLimits`]: a time limit since `set_peer` and a limit
//!   of bytes duplicated to `new`, whichever comes first): the shim swaps back to the
//!   previous peer, stops the duplicate sends, drops datagrams from `new` from then on, and
//!   publishes a [`MoveError`] saying which cap was reached and how many datagrams came from
//!   `new`. The time cap is enforced on the next send or receive, or when the wrapper calls
//!   [`SwappableUdp::check_overlap`] (at [`SwappableUdp::overlap_deadline`]).
//!
//! **The transport's pause** ([`SwappableUdp::last_move_gap`]). A confirmed move also gives
//! the pause as the socket saw it: from the last datagram the previous peer delivered during
//! the overlap (or the overlap's start, when it delivered none) to the confirmation. It is
//! what a client that measures nothing itself can report as its downtime (cwrapper does, when
//! the application reports nothing); it is not authenticated (a datagram spoofed from the
//! previous address would lengthen it), so it is a figure for metrics, never a decision.
//! Only datagrams during an overlap are timed, so the receive path costs nothing more
//! outside a move.
//!
//! Why a spoofed datagram cannot end the overlap: the only inputs that end it are the
//! wrapper's `confirm_peer` (driven by data quinn authenticated), an explicit `set_peer`, or
//! the cap. Garbage, a replayed or forged packet from `new` is delivered to quinn, which drops
//! what does not decrypt (it does not close the connection for it); the client keeps sending
//! to and accepting from the old server meanwhile.
//!
//! The shim keeps the rules a custom quinn socket must keep: `try_send` returns only `Ok` or
//! `WouldBlock` (any other failure drops the datagram and counts it), `poll_recv` never returns
//! an error (transient ones such as `ECONNREFUSED` are swallowed and counted), and the
//! capabilities quinn reads once (`max_receive_segments`, `may_fragment`,
//! `max_transmit_segments`) are fixed from the first socket. That machinery, shared with
//! `udp-shim-server`, lives in `udp-shim-core`.
//!
//! ```no_run
//! # async fn demo(server: std::net::SocketAddr, config: quinn::ClientConfig) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use udp_shim_client::{SwappableUdp, client_endpoint};
//!
//! let shim = Arc::new(SwappableUdp::bind("0.0.0.0:0".parse()?, server)?);
//! let endpoint = client_endpoint(shim.clone())?;
//! let connection = endpoint.connect_with(config, shim.fake_peer(), "localhost")?.await?;
//! // ... the server says it moves to `new_addr`:
//! # let new_addr = server;
//! shim.set_peer(new_addr)?;
//! // ... and later, over the authenticated connection, that it runs there:
//! shim.confirm_peer(new_addr)?;
//! # drop(connection);
//! # Ok(()) }
//! ```

pub mod probe;

use std::{
    fmt,
    io::{self, IoSliceMut},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    pin::Pin,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use quinn::{
    AsyncUdpSocket, UdpPoller,
    udp::{RecvMeta, Transmit},
};
use tokio::sync::watch;

use udp_shim_core::{
    Slot, SlotError, SlotPoller,
    addr::{canonical, to_endpoint_family},
};

/// Errors from creating or reconfiguring a [`SwappableUdp`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShimError {
    /// Called outside a Tokio runtime: the socket must be registered with its reactor.
    #[error("a Tokio runtime with I/O enabled is required")]
    NoRuntime,
    /// Binding a new local socket failed.
    #[error("cannot bind UDP socket to {addr}: {source}")]
    Bind {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The operating system's error.
        source: io::Error,
    },
    /// Preparing a socket for quinn failed (socket options, non-blocking mode, registration).
    #[error("cannot prepare UDP socket for quinn: {source}")]
    Setup {
        /// The underlying error.
        source: io::Error,
    },
    /// The address cannot be a peer: its port is 0 or its IP is unspecified.
    #[error("{addr} cannot be a peer address (port 0 or unspecified IP)")]
    InvalidPeer {
        /// The rejected address.
        addr: SocketAddr,
    },
    /// An IPv6 peer (or fake peer) cannot be reached from an IPv4 local socket.
    #[error("peer {peer} is unreachable from local socket {local} (address family)")]
    FamilyMismatch {
        /// The peer address.
        peer: SocketAddr,
        /// The local socket's address.
        local: SocketAddr,
    },
    /// [`SwappableUdp::confirm_peer`] named an address that is not the current peer (the move
    /// was abandoned at its cap, reverted, or replaced by another move meanwhile).
    #[error("cannot confirm {peer}: the current peer is {current}")]
    NotCurrentPeer {
        /// The address the caller vouched for.
        peer: SocketAddr,
        /// The current real peer.
        current: SocketAddr,
    },
}

/// Why an unconfirmed move was given up: its overlap reached a cap of [`OverlapLimits`]. The
/// shim has swapped back to `back_to` and stopped sending to `new`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MoveError {
    /// The overlap lasted its time cap without a confirmation.
    #[error(
        "move to {new} not confirmed within {limit:?} ({datagrams_from_new} datagrams from it, \
         none vouched for by the server); swapped back to {back_to}"
    )]
    TimeCap {
        /// The address of the move given up.
        new: SocketAddr,
        /// The peer the shim went back to.
        back_to: SocketAddr,
        /// The time cap reached.
        limit: Duration,
        /// Datagrams from `new` delivered to quinn during the overlap (zero: it never answered).
        datagrams_from_new: u64,
    },
    /// The bytes duplicated to the new address reached their cap without a confirmation.
    #[error(
        "move to {new} not confirmed after {limit} bytes duplicated to it ({datagrams_from_new} \
         datagrams from it, none vouched for by the server); swapped back to {back_to}"
    )]
    ByteCap {
        /// The address of the move given up.
        new: SocketAddr,
        /// The peer the shim went back to.
        back_to: SocketAddr,
        /// The byte cap reached.
        limit: u64,
        /// Datagrams from `new` delivered to quinn during the overlap (zero: it never answered).
        datagrams_from_new: u64,
    },
}

impl MoveError {
    /// The address of the move given up.
    pub fn new_peer(&self) -> SocketAddr {
        match self {
            Self::TimeCap { new, .. } | Self::ByteCap { new, .. } => *new,
        }
    }

    /// The peer the shim went back to.
    pub fn back_to(&self) -> SocketAddr {
        match self {
            Self::TimeCap { back_to, .. } | Self::ByteCap { back_to, .. } => *back_to,
        }
    }
}

/// How the last move's overlap ended ([`SwappableUdp::move_outcomes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MoveOutcome {
    /// No overlap has ended yet.
    Idle,
    /// Confirmed: the wrapper vouched for `peer` and a datagram from it was delivered; the
    /// previous peer is dropped.
    Confirmed {
        /// The new peer.
        peer: SocketAddr,
    },
    /// Reverted by `set_peer(peer)` back to the previous peer (an aborted move).
    Reverted {
        /// The peer moved back to.
        peer: SocketAddr,
    },
    /// Given up at a cap: swapped back.
    Abandoned(MoveError),
}

/// The transport's pause across a confirmed move ([`SwappableUdp::last_move_gap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct MoveGap {
    /// The peer moved to.
    pub peer: SocketAddr,
    /// The peer moved from.
    pub previous: SocketAddr,
    /// The last datagram from `previous` during the overlap (its start if none came) to the
    /// confirmation.
    pub gap: Duration,
    /// When the move was confirmed.
    pub confirmed_at: Instant,
}

/// What [`SwappableUdp::confirm_peer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Confirmation {
    /// The overlap ended now: the previous peer is dropped.
    Confirmed,
    /// Nothing from the new peer was delivered yet: the first datagram from it ends the
    /// overlap (unless a cap ends it first).
    AwaitingDatagram,
    /// No overlap: the address was already the settled peer.
    AlreadySettled,
}

/// Caps on a move's overlap (see the [crate docs](crate)): whichever is reached first without a
/// confirmation ends the overlap with a swap back.
///
/// Defaults ([`OverlapLimits::default`]):
/// - **10 s** ([`OverlapLimits::DEFAULT_MAX_DURATION`]). The overlap lasts from `Migrate` to
///   the server's `Resumed` from its new address: the announce round (the demo's ack deadline
///   is 2 s), the freeze and dump (about 130 ms, up to about 1 s for a large process), the
///   transfer and the restore. 10 s covers that several times over on one host or a LAN, is
///   far below quinn's 30 s idle timeout (so after a swap back the connection is still alive
///   if the old server is), and matches cwrapper's default recovery deadline.
/// - **16 MiB** ([`OverlapLimits::DEFAULT_MAX_DUPLICATED_BYTES`]) sent to the new address. A
///   client sending at 5 MB/s fills it in about 3 s, the length of a typical overlap; during
///   the freeze a QUIC client sends little (its window is full of unacknowledged packets). It
///   bounds what a move that never answers can spray at an address of a shared host. Bulk
///   senders that keep sending during the whole overlap should raise it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct OverlapLimits {
    /// Longest overlap, from `set_peer` on.
    pub max_duration: Duration,
    /// Most bytes (datagram payloads) sent to the new peer during one overlap.
    pub max_duplicated_bytes: u64,
}

impl OverlapLimits {
    /// The default time cap: 10 s (see the type's docs).
    pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(10);
    /// The default byte cap: 16 MiB (see the type's docs).
    pub const DEFAULT_MAX_DUPLICATED_BYTES: u64 = 16 * 1024 * 1024;

    /// Limits of `max_duration` and `max_duplicated_bytes`.
    pub const fn new(max_duration: Duration, max_duplicated_bytes: u64) -> Self {
        Self {
            max_duration,
            max_duplicated_bytes,
        }
    }
}

impl Default for OverlapLimits {
    fn default() -> Self {
        Self::new(
            Self::DEFAULT_MAX_DURATION,
            Self::DEFAULT_MAX_DUPLICATED_BYTES,
        )
    }
}

/// A snapshot of a [`SwappableUdp`]'s counters. Counts are datagrams (a GSO/GRO batch counts
/// each datagram in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ShimStats {
    /// Datagrams handed to the kernel.
    pub sent: u64,
    /// Datagrams from the real peer delivered to quinn.
    pub received: u64,
    /// Datagrams from any other source, dropped.
    pub dropped_foreign: u64,
    /// Datagrams quinn sent that the kernel refused (or that no socket could reach), dropped.
    pub dropped_send_errors: u64,
    /// Peer swaps ([`SwappableUdp::set_peer`]).
    pub swaps: u64,
    /// Moves confirmed ([`SwappableUdp::confirm_peer`] and a datagram from the new peer).
    pub confirmations: u64,
    /// Transmissions also sent to the previous peer while a move was unconfirmed.
    pub dual_sends: u64,
    /// Bytes sent to a new peer while its move was unconfirmed (what the byte cap counts).
    pub duplicated_bytes: u64,
    /// Datagrams from a new peer delivered to quinn while its move was unconfirmed: genuine or
    /// spoofed, the shim cannot tell; quinn drops those that do not decrypt.
    pub unconfirmed_received: u64,
    /// Overlaps that reached a cap of [`OverlapLimits`] and ended in a swap back.
    pub overlap_capped: u64,
    /// Local socket replacements ([`SwappableUdp::rebind_local`]).
    pub local_rebinds: u64,
    /// Receive errors swallowed (e.g. `ECONNREFUSED` after an ICMP port unreachable).
    pub recv_errors: u64,
}

/// A quinn [`AsyncUdpSocket`] whose real peer and local socket can be swapped at run time
/// while quinn keeps seeing one fixed fake peer. See the [crate docs](crate).
pub struct SwappableUdp {
    slot: Arc<Slot>,
    peers: RwLock<Peers>,
    fake_peer: SocketAddr,
    /// The fake peer in the form quinn's endpoint uses (IPv4-mapped on an IPv6 endpoint).
    reported_fake: SocketAddr,
    swaps: AtomicU64,
    confirmations: AtomicU64,
    dual_sends: AtomicU64,
    duplicated_bytes: AtomicU64,
    unconfirmed_received: AtomicU64,
    overlap_capped: AtomicU64,
    /// How the last overlap ended.
    outcome: watch::Sender<MoveOutcome>,
    /// The source of the last datagram delivered to quinn.
    last_from: RwLock<Option<SocketAddr>>,
    /// What the overlap times count from.
    epoch: Instant,
    /// During an overlap: the last datagram from the previous peer, in nanoseconds since
    /// `epoch` (0: none yet).
    previous_rx_ns: AtomicU64,
    /// The last confirmed move's pause.
    last_gap: RwLock<Option<MoveGap>>,
}

/// The real peer, and during a move the overlap with the peer it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Peers {
    current: SocketAddr,
    /// Set while a move to `current` is unconfirmed.
    overlap: Option<Overlap>,
    limits: OverlapLimits,
}

/// An unconfirmed move: datagrams go to both peers and are accepted from both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Overlap {
    /// The last confirmed peer (the one the server most likely still runs at).
    previous: SocketAddr,
    started: Instant,
    /// Bytes sent to the new peer so far.
    duplicated_bytes: u64,
    /// Datagrams from the new peer delivered to quinn so far.
    from_new: u64,
    /// The wrapper vouched for the new peer ([`SwappableUdp::confirm_peer`]) before any
    /// datagram from it was delivered: the first one ends the overlap.
    vouched: bool,
}

/// Which cap an overlap reached.
#[derive(Debug, Clone, Copy)]
enum Cap {
    Time,
    Bytes,
}

impl Overlap {
    fn new(previous: SocketAddr, started: Instant) -> Self {
        Self {
            previous,
            started,
            duplicated_bytes: 0,
            from_new: 0,
            vouched: false,
        }
    }

    fn reached(&self, limits: OverlapLimits, now: Instant) -> Option<Cap> {
        if now.saturating_duration_since(self.started) >= limits.max_duration {
            Some(Cap::Time)
        } else if self.duplicated_bytes >= limits.max_duplicated_bytes {
            Some(Cap::Bytes)
        } else {
            None
        }
    }
}

impl fmt::Debug for SwappableUdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwappableUdp")
            .field("peer", &self.peer())
            .field("previous_peer", &self.previous_peer())
            .field("fake_peer", &self.fake_peer)
            .field("socket", &self.slot)
            .finish_non_exhaustive()
    }
}

impl SwappableUdp {
    /// Default fake peer for an IPv4 local socket: `192.0.2.1:443` (TEST-NET-1, RFC 5737).
    ///
    /// Documentation addresses are never routed, and the shim never sends to the fake peer
    /// anyway (every datagram goes to the real peer); it only shows up in quinn's view of the
    /// connection (`Connection::remote_address`).
    pub const DEFAULT_FAKE_PEER_V4: SocketAddr =
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 443));

    /// Default fake peer for an IPv6 local socket: `[2001:db8::1]:443` (RFC 3849).
    pub const DEFAULT_FAKE_PEER_V6: SocketAddr = SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
        443,
        0,
        0,
    ));

    /// Wraps `socket`, sending to `peer`, with the default fake peer of the socket's family
    /// and the default [`OverlapLimits`].
    ///
    /// Must be called inside a Tokio runtime with I/O enabled.
    pub fn new(socket: std::net::UdpSocket, peer: SocketAddr) -> Result<Self, ShimError> {
        let local = socket
            .local_addr()
            .map_err(|source| ShimError::Setup { source })?;
        let fake_peer = if local.is_ipv6() {
            Self::DEFAULT_FAKE_PEER_V6
        } else {
            Self::DEFAULT_FAKE_PEER_V4
        };
        Self::with_fake_peer(socket, peer, fake_peer)
    }

    /// Wraps `socket`, sending to `peer`, with quinn seeing `fake_peer` as its remote.
    ///
    /// Must be called inside a Tokio runtime with I/O enabled.
    pub fn with_fake_peer(
        socket: std::net::UdpSocket,
        peer: SocketAddr,
        fake_peer: SocketAddr,
    ) -> Result<Self, ShimError> {
        let local = socket
            .local_addr()
            .map_err(|source| ShimError::Setup { source })?;
        check_peer(fake_peer, local)?;
        check_peer(peer, local)?;
        let slot = Slot::new(socket).map_err(slot_error)?;
        let reported_fake = to_endpoint_family(fake_peer, slot.caps().initial_v6);
        Ok(Self {
            slot: Arc::new(slot),
            peers: RwLock::new(Peers {
                current: peer,
                overlap: None,
                limits: OverlapLimits::default(),
            }),
            fake_peer,
            reported_fake,
            swaps: AtomicU64::new(0),
            confirmations: AtomicU64::new(0),
            dual_sends: AtomicU64::new(0),
            duplicated_bytes: AtomicU64::new(0),
            unconfirmed_received: AtomicU64::new(0),
            overlap_capped: AtomicU64::new(0),
            outcome: watch::Sender::new(MoveOutcome::Idle),
            last_from: RwLock::new(None),
            epoch: Instant::now(),
            previous_rx_ns: AtomicU64::new(0),
            last_gap: RwLock::new(None),
        })
    }

    /// Binds a new socket on `local` and wraps it (see [`SwappableUdp::new`]).
    pub fn bind(local: SocketAddr, peer: SocketAddr) -> Result<Self, ShimError> {
        Self::new(bind(local)?, peer)
    }

    /// The address to give quinn's `Endpoint::connect`: quinn's view of the server, fixed for
    /// the life of the shim.
    pub fn fake_peer(&self) -> SocketAddr {
        self.fake_peer
    }

    fn peers(&self) -> Peers {
        *self.peers.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn peers_mut(&self) -> std::sync::RwLockWriteGuard<'_, Peers> {
        self.peers.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current real peer.
    pub fn peer(&self) -> SocketAddr {
        self.peers().current
    }

    /// During a move, the peer being replaced: datagrams still go to it and are accepted from
    /// it until the move is confirmed, reverted or abandoned at its cap. `None` otherwise.
    pub fn previous_peer(&self) -> Option<SocketAddr> {
        self.peers().overlap.map(|o| o.previous)
    }

    /// The caps of an overlap (applied to the one under way too).
    pub fn set_overlap_limits(&self, limits: OverlapLimits) {
        self.peers_mut().limits = limits;
    }

    /// The caps of an overlap.
    pub fn overlap_limits(&self) -> OverlapLimits {
        self.peers().limits
    }

    /// When the overlap under way reaches its time cap (`None` when there is none). Call
    /// [`SwappableUdp::check_overlap`] then: without traffic nothing else enforces it.
    pub fn overlap_deadline(&self) -> Option<Instant> {
        let peers = self.peers();
        peers.overlap.map(|o| o.started + peers.limits.max_duration)
    }

    /// Enforces the overlap's caps now: if one is reached, swaps back to the previous peer and
    /// returns why (also published on [`SwappableUdp::move_outcomes`]).
    pub fn check_overlap(&self) -> Option<MoveError> {
        let now = Instant::now();
        let mut peers = self.peers_mut();
        let overlap = peers.overlap?;
        let cap = overlap.reached(peers.limits, now)?;
        Some(self.abandon(&mut peers, overlap, cap))
    }

    /// How the last overlap ended; the receiver sees every later end. A wrapper watches it
    /// for [`MoveOutcome::Abandoned`], the only end it does not cause itself.
    pub fn move_outcomes(&self) -> watch::Receiver<MoveOutcome> {
        self.outcome.subscribe()
    }

    /// Moves to a new real peer: from now on datagrams go to `peer`, and until the move is
    /// confirmed ([`SwappableUdp::confirm_peer`]) they also go to the previous peer, and
    /// datagrams from either are accepted, within the caps of [`OverlapLimits`]. Datagrams
    /// from anyone else are dropped and counted. Wakes the endpoint's receive task. Returns
    /// the peer replaced.
    ///
    /// Why both: the server announces its move while it still runs at the old address, and
    /// keeps running there until it is frozen. The client's `Ack`, and all traffic until the
    /// freeze, must still reach it there. Moving back to the previous peer (an aborted move)
    /// ends the overlap at once ([`MoveOutcome::Reverted`]). A second move before the first
    /// was confirmed keeps the last confirmed peer as the previous one and starts a new
    /// overlap (with fresh caps).
    pub fn set_peer(&self, peer: SocketAddr) -> Result<SocketAddr, ShimError> {
        check_peer(peer, self.slot.local_addr())?;
        let now = Instant::now();
        let old = {
            let mut peers = self.peers_mut();
            let old = peers.current;
            let settled = peers.overlap.map_or(old, |o| o.previous);
            let ending = peers.overlap.take();
            peers.current = peer;
            if canonical(settled) != canonical(peer) {
                peers.overlap = Some(Overlap::new(settled, now));
                self.previous_rx_ns.store(0, Ordering::Relaxed);
            } else if ending.is_some() {
                self.outcome.send_replace(MoveOutcome::Reverted { peer });
            }
            old
        };
        self.swaps.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%old, new = %peer, "real peer swapped");
        self.slot.wake_receiver();
        Ok(old)
    }

    /// The wrapper vouches that the server runs at `peer`, the current peer: call it when
    /// quinn delivered an authenticated message from the server saying so (the control
    /// stream's `Resumed` for the migration that named `peer`, or `MigrateAborted` naming it).
    /// Never call it on the strength of a datagram's source address: that is what a spoofer
    /// controls.
    ///
    /// Ends the overlap now if a datagram from `peer` was already delivered during it,
    /// otherwise at the first one (within the caps). Refused if `peer` is not the current peer
    /// (the move was abandoned, reverted or replaced meanwhile).
    pub fn confirm_peer(&self, peer: SocketAddr) -> Result<Confirmation, ShimError> {
        let mut peers = self.peers_mut();
        if canonical(peers.current) != canonical(peer) {
            return Err(ShimError::NotCurrentPeer {
                peer,
                current: peers.current,
            });
        }
        let Some(overlap) = peers.overlap.as_mut() else {
            return Ok(Confirmation::AlreadySettled);
        };
        if overlap.from_new == 0 {
            overlap.vouched = true;
            tracing::debug!(%peer, "new peer vouched for; the first datagram from it confirms");
            return Ok(Confirmation::AwaitingDatagram);
        }
        self.confirm(&mut peers);
        Ok(Confirmation::Confirmed)
    }

    /// Ends the overlap: the current peer is confirmed.
    fn confirm(&self, peers: &mut Peers) {
        if let Some(o) = peers.overlap.take() {
            let now = Instant::now();
            let last_previous = match self.previous_rx_ns.load(Ordering::Relaxed) {
                0 => o.started,
                ns => (self.epoch + Duration::from_nanos(ns)).max(o.started),
            };
            *self
                .last_gap
                .write()
                .unwrap_or_else(PoisonError::into_inner) = Some(MoveGap {
                peer: peers.current,
                previous: o.previous,
                gap: now.saturating_duration_since(last_previous),
                confirmed_at: now,
            });
            self.confirmations.fetch_add(1, Ordering::Relaxed);
            self.outcome.send_replace(MoveOutcome::Confirmed {
                peer: peers.current,
            });
            tracing::debug!(peer = %peers.current, previous = %o.previous, "move confirmed; previous peer dropped");
        }
    }

    /// Ends the overlap at a cap: back to the previous peer.
    fn abandon(&self, peers: &mut Peers, overlap: Overlap, cap: Cap) -> MoveError {
        let new = peers.current;
        let back_to = overlap.previous;
        peers.current = back_to;
        peers.overlap = None;
        let datagrams_from_new = overlap.from_new;
        let error = match cap {
            Cap::Time => MoveError::TimeCap {
                new,
                back_to,
                limit: peers.limits.max_duration,
                datagrams_from_new,
            },
            Cap::Bytes => MoveError::ByteCap {
                new,
                back_to,
                limit: peers.limits.max_duplicated_bytes,
                datagrams_from_new,
            },
        };
        self.overlap_capped.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("{error}");
        self.outcome
            .send_replace(MoveOutcome::Abandoned(error.clone()));
        error
    }

    /// The pause of the last confirmed move as the socket saw it: the last datagram from the
    /// previous peer during the overlap (the overlap's start if none came) to the
    /// confirmation. `None` before the first confirmed move. Not authenticated: a figure to
    /// report, not to decide on (see the [crate docs](crate)).
    pub fn last_move_gap(&self) -> Option<MoveGap> {
        *self.last_gap.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes a datagram from the previous peer during an overlap.
    fn note_previous_rx(&self) {
        let ns = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_nanos();
        // At least 1: 0 means "none".
        let ns = u64::try_from(ns).unwrap_or(u64::MAX).max(1);
        self.previous_rx_ns.store(ns, Ordering::Relaxed);
    }

    /// The address the last datagram handed to quinn came from: the server's real address as
    /// the client last heard it (`None` before the first one).
    pub fn last_received_from(&self) -> Option<SocketAddr> {
        *self
            .last_from
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn note_received_from(&self, from: SocketAddr) {
        let changed = *self
            .last_from
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            != Some(from);
        if changed {
            *self
                .last_from
                .write()
                .unwrap_or_else(PoisonError::into_inner) = Some(from);
        }
    }

    /// Whether a datagram from `from` goes to quinn. During an overlap a datagram from the
    /// new peer is counted (and confirms the move if the wrapper already vouched for it); it
    /// never confirms by itself.
    fn accept_from(&self, from: SocketAddr, datagrams: u64) -> bool {
        let peers = self.peers();
        let is_current = canonical(from) == canonical(peers.current);
        let Some(overlap) = peers.overlap else {
            return is_current;
        };
        let is_previous = canonical(from) == canonical(overlap.previous);
        if !is_current {
            if is_previous {
                self.note_previous_rx();
            }
            return is_previous;
        }
        let mut peers = self.peers_mut();
        // Re-read under the write lock: a set_peer or a cap may have raced.
        if canonical(peers.current) != canonical(from) {
            let previous = peers
                .overlap
                .is_some_and(|o| canonical(o.previous) == canonical(from));
            if previous {
                self.note_previous_rx();
            }
            return previous;
        }
        let limits = peers.limits;
        let Some(overlap) = peers.overlap.as_mut() else {
            return true;
        };
        if let Some(cap) = overlap.reached(limits, Instant::now()) {
            let overlap = *overlap;
            self.abandon(&mut peers, overlap, cap);
            // `from` is no longer a peer.
            return false;
        }
        overlap.from_new = overlap.from_new.saturating_add(datagrams);
        self.unconfirmed_received
            .fetch_add(datagrams, Ordering::Relaxed);
        if overlap.vouched {
            self.confirm(&mut peers);
        }
        true
    }

    /// Replaces the local socket with a new one bound to `addr` (the client changed network).
    /// On error nothing changes. Returns the new local address.
    ///
    /// Afterwards call `endpoint.rebind_abstract(shim.clone())` with this same `Arc`: quinn then
    /// moves every connection to a fresh connection ID and sends a PING, so the server
    /// validates the new path at once.
    pub fn rebind_local(&self, addr: SocketAddr) -> Result<SocketAddr, ShimError> {
        self.rebind_local_with(bind(addr)?)
    }

    /// Replaces the local socket with `socket`, created elsewhere. See
    /// [`SwappableUdp::rebind_local`].
    pub fn rebind_local_with(&self, socket: std::net::UdpSocket) -> Result<SocketAddr, ShimError> {
        let local = socket
            .local_addr()
            .map_err(|source| ShimError::Setup { source })?;
        let peers = self.peers();
        check_family(peers.current, local)?;
        if let Some(o) = peers.overlap {
            check_family(o.previous, local)?;
        }
        let sock = self.slot.prepare(socket).map_err(slot_error)?;
        let new = self.slot.swap(Some(sock));
        tracing::debug!(local = %new, "client local socket replaced");
        Ok(new)
    }

    /// The current local socket's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.slot.local_addr()
    }

    /// Retired local sockets whose descriptor is still open (a call in flight holds it); it
    /// closes as soon as that call returns.
    pub fn open_retired_sockets(&self) -> usize {
        self.slot.open_retired()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ShimStats {
        let slot = self.slot.stats();
        ShimStats {
            sent: slot.sent,
            received: slot.received,
            dropped_foreign: slot.dropped_filtered,
            dropped_send_errors: slot.dropped_send_errors + slot.dropped_parked,
            swaps: self.swaps.load(Ordering::Relaxed),
            confirmations: self.confirmations.load(Ordering::Relaxed),
            dual_sends: self.dual_sends.load(Ordering::Relaxed),
            duplicated_bytes: self.duplicated_bytes.load(Ordering::Relaxed),
            unconfirmed_received: self.unconfirmed_received.load(Ordering::Relaxed),
            overlap_capped: self.overlap_capped.load(Ordering::Relaxed),
            local_rebinds: slot.swaps,
            recv_errors: slot.recv_errors,
        }
    }

    /// Counts a copy sent to the new peer of the overlap under way.
    fn note_duplicated(&self, to: SocketAddr, bytes: usize) {
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        let mut peers = self.peers_mut();
        if canonical(peers.current) != canonical(to) {
            return;
        }
        if let Some(o) = peers.overlap.as_mut() {
            o.duplicated_bytes = o.duplicated_bytes.saturating_add(bytes);
            self.duplicated_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }
}

impl AsyncUdpSocket for SwappableUdp {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(SlotPoller::new(self.slot.clone()))
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let peers = self.peers();
        let Some(overlap) = peers.overlap else {
            return self.slot.try_send(transmit, Some(peers.current));
        };
        // A cap reached: swap back, then send to the peer that is current from now on.
        if overlap.reached(peers.limits, Instant::now()).is_some() {
            self.check_overlap();
            return self.slot.try_send(transmit, Some(self.peer()));
        }
        // The server most likely still runs at the previous peer: it goes first, and a full
        // socket buffer (WouldBlock) makes quinn retry the whole transmission.
        self.slot.try_send(transmit, Some(overlap.previous))?;
        self.dual_sends.fetch_add(1, Ordering::Relaxed);
        // The copy to the new peer is best effort: quinn retransmits what is lost.
        match self.slot.try_send(transmit, Some(peers.current)) {
            Ok(()) => {
                self.note_duplicated(peers.current, transmit.contents.len());
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let fake = self.reported_fake;
        self.slot.poll_recv(cx, bufs, meta, |m| {
            // Read per datagram: a set_peer racing with this call takes effect at once.
            let datagrams = u64::try_from(m.len.div_ceil(m.stride.max(1))).unwrap_or(1);
            if !self.accept_from(m.addr, datagrams) {
                tracing::trace!(from = %m.addr, "datagram from a foreign source dropped");
                return false;
            }
            self.note_received_from(m.addr);
            m.addr = fake;
            m.dst_ip = None;
            true
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.slot.local_addr())
    }

    fn max_transmit_segments(&self) -> usize {
        self.slot.caps().max_transmit_segments
    }

    fn max_receive_segments(&self) -> usize {
        self.slot.caps().max_receive_segments
    }

    fn may_fragment(&self) -> bool {
        self.slot.caps().may_fragment
    }
}

/// Creates a client-only quinn endpoint on `shim` (default endpoint config, Tokio runtime).
/// Connect with `endpoint.connect_with(config, shim.fake_peer(), server_name)`.
pub fn client_endpoint(shim: Arc<SwappableUdp>) -> io::Result<quinn::Endpoint> {
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        shim,
        Arc::new(quinn::TokioRuntime),
    )
}

fn bind(addr: SocketAddr) -> Result<std::net::UdpSocket, ShimError> {
    std::net::UdpSocket::bind(addr).map_err(|source| ShimError::Bind { addr, source })
}

/// The slot's errors are this crate's variants of the same name.
fn slot_error(error: SlotError) -> ShimError {
    match error {
        SlotError::NoRuntime => ShimError::NoRuntime,
        SlotError::Setup { source } => ShimError::Setup { source },
    }
}

fn check_peer(peer: SocketAddr, local: SocketAddr) -> Result<(), ShimError> {
    if peer.port() == 0 || peer.ip().is_unspecified() {
        return Err(ShimError::InvalidPeer { addr: peer });
    }
    check_family(peer, local)
}

fn check_family(peer: SocketAddr, local: SocketAddr) -> Result<(), ShimError> {
    if local.is_ipv4() && canonical(peer).is_ipv6() {
        return Err(ShimError::FamilyMismatch { peer, local });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::UdpSocket, time::Duration};

    fn localhost(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    fn loopback_socket() -> UdpSocket {
        UdpSocket::bind(localhost(0)).unwrap()
    }

    /// Sends as quinn does; the shim must never return an error other than `WouldBlock`.
    async fn send(shim: &Arc<SwappableUdp>, transmit: &Transmit<'_>) {
        test_support::send_as_quinn(shim, transmit)
            .await
            .expect("a shim surfaced a send error to quinn");
    }

    #[test]
    fn outside_runtime_is_no_runtime() {
        let err = SwappableUdp::new(loopback_socket(), localhost(9)).unwrap_err();
        assert!(matches!(err, ShimError::NoRuntime), "{err:?}");
    }

    #[tokio::test]
    async fn port_zero_peer_is_invalid() {
        let err = SwappableUdp::new(loopback_socket(), localhost(0)).unwrap_err();
        assert!(matches!(err, ShimError::InvalidPeer { addr } if addr == localhost(0)));
    }

    #[tokio::test]
    async fn unspecified_peer_is_invalid() {
        let shim = SwappableUdp::new(loopback_socket(), localhost(9)).unwrap();
        let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 9));
        let err = shim.set_peer(unspecified).unwrap_err();
        assert!(matches!(err, ShimError::InvalidPeer { addr } if addr == unspecified));
        assert_eq!(
            shim.peer(),
            localhost(9),
            "failed set_peer changed the peer"
        );
        assert_eq!(shim.stats().swaps, 0);
    }

    #[tokio::test]
    async fn v6_peer_from_v4_socket_is_family_mismatch() {
        let shim = SwappableUdp::new(loopback_socket(), localhost(9)).unwrap();
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, 9));
        let err = shim.set_peer(v6).unwrap_err();
        assert!(matches!(err, ShimError::FamilyMismatch { peer, .. } if peer == v6));
    }

    #[tokio::test]
    async fn v6_fake_peer_with_v4_socket_is_family_mismatch() {
        let err = SwappableUdp::with_fake_peer(
            loopback_socket(),
            localhost(9),
            SwappableUdp::DEFAULT_FAKE_PEER_V6,
        )
        .unwrap_err();
        assert!(matches!(err, ShimError::FamilyMismatch { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn bind_failure_is_bind_error() {
        let taken = loopback_socket();
        let addr = taken.local_addr().unwrap();
        let shim = SwappableUdp::new(loopback_socket(), localhost(9)).unwrap();
        let before = shim.local_addr();
        let err = shim.rebind_local(addr).unwrap_err();
        assert!(
            matches!(err, ShimError::Bind { addr: a, .. } if a == addr),
            "{err:?}"
        );
        assert_eq!(
            shim.local_addr(),
            before,
            "failed rebind changed the socket"
        );
    }

    #[tokio::test]
    async fn default_fake_peer_follows_family() {
        let shim = SwappableUdp::new(loopback_socket(), localhost(9)).unwrap();
        assert_eq!(shim.fake_peer(), SwappableUdp::DEFAULT_FAKE_PEER_V4);
        if let Ok(v6) = UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)) {
            let peer = SocketAddr::from((Ipv6Addr::LOCALHOST, 9));
            let shim = SwappableUdp::new(v6, peer).unwrap();
            assert_eq!(shim.fake_peer(), SwappableUdp::DEFAULT_FAKE_PEER_V6);
        }
    }

    #[tokio::test]
    async fn send_goes_to_real_peer_and_strips_src_ip() {
        let peer = loopback_socket();
        let shim =
            Arc::new(SwappableUdp::new(loopback_socket(), peer.local_addr().unwrap()).unwrap());
        let transmit = Transmit {
            destination: shim.fake_peer(),
            ecn: None,
            contents: b"hello",
            segment_size: None,
            // A source IP this host does not own: had it been kept, the kernel would refuse.
            src_ip: Some(Ipv4Addr::new(192, 0, 2, 77).into()),
        };
        send(&shim, &transmit).await;
        let mut buf = [0_u8; 16];
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(from, shim.local_addr());
        assert_eq!(shim.stats().sent, 1);
    }

    #[tokio::test]
    async fn oversize_send_is_dropped_and_counted_not_an_error() {
        let peer = loopback_socket();
        let shim =
            Arc::new(SwappableUdp::new(loopback_socket(), peer.local_addr().unwrap()).unwrap());
        let contents = vec![0_u8; 70_000];
        let transmit = Transmit {
            destination: shim.fake_peer(),
            ecn: None,
            contents: &contents,
            segment_size: None,
            src_ip: None,
        };
        send(&shim, &transmit).await;
        let stats = shim.stats();
        assert_eq!(stats.dropped_send_errors, 1);
        assert_eq!(stats.sent, 0);
    }

    /// A connected socket reports the ICMP port unreachable of a send as `ECONNREFUSED` on
    /// the next receive: poll_recv must swallow it and deliver the next datagram.
    #[tokio::test]
    async fn connection_refused_is_swallowed() {
        let closed = loopback_socket();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let socket = loopback_socket();
        socket.connect(closed_addr).unwrap();
        let shim = Arc::new(SwappableUdp::new(socket, closed_addr).unwrap());
        let transmit = Transmit {
            destination: shim.fake_peer(),
            ecn: None,
            contents: b"anyone?",
            segment_size: None,
            src_ip: None,
        };
        send(&shim, &transmit).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The peer comes back on the same port and answers: the pending ECONNREFUSED is read
        // first, then the answer.
        let revived = UdpSocket::bind(closed_addr).unwrap();
        revived.send_to(b"late reply", shim.local_addr()).unwrap();
        let mut storage = [0_u8; 1500];
        let mut bufs = [IoSliceMut::new(&mut storage)];
        let mut meta = [RecvMeta::default()];
        let got = std::future::poll_fn(|cx| shim.poll_recv(cx, &mut bufs, &mut meta));
        let n = tokio::time::timeout(Duration::from_secs(5), got)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(&bufs[0][..meta[0].len], b"late reply");
        assert_eq!(shim.stats().recv_errors, 1);
        assert_eq!(shim.stats().received, 1);
    }

    #[tokio::test]
    async fn foreign_datagram_dropped_peer_datagram_reported_from_fake() {
        let peer = loopback_socket();
        let stranger = loopback_socket();
        let shim = SwappableUdp::new(loopback_socket(), peer.local_addr().unwrap()).unwrap();
        stranger.send_to(b"intruder", shim.local_addr()).unwrap();
        peer.send_to(b"friend", shim.local_addr()).unwrap();
        let mut storage = [[0_u8; 1500]; 2];
        let [a, b] = &mut storage;
        let mut bufs = [IoSliceMut::new(a), IoSliceMut::new(b)];
        let mut meta = [RecvMeta::default(); 2];
        let got = std::future::poll_fn(|cx| shim.poll_recv(cx, &mut bufs, &mut meta));
        let n = tokio::time::timeout(Duration::from_secs(5), got)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(&bufs[0][..meta[0].len], b"friend");
        assert_eq!(meta[0].addr, shim.fake_peer());
        assert_eq!(meta[0].dst_ip, None);
        let stats = shim.stats();
        assert_eq!((stats.received, stats.dropped_foreign), (1, 1));
    }

    /// Receives one datagram through the shim (as quinn would), with a 5 s bound.
    async fn recv_one(shim: &SwappableUdp) -> (Vec<u8>, SocketAddr) {
        let mut storage = [0_u8; 1500];
        let mut bufs = [IoSliceMut::new(&mut storage)];
        let mut meta = [RecvMeta::default()];
        let got = std::future::poll_fn(|cx| shim.poll_recv(cx, &mut bufs, &mut meta));
        let n = tokio::time::timeout(Duration::from_secs(5), got)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1);
        (bufs[0][..meta[0].len].to_vec(), meta[0].addr)
    }

    fn read_from(sock: &UdpSocket) -> Option<Vec<u8>> {
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0_u8; 1500];
        sock.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
    }

    fn transmit_of(shim: &SwappableUdp, contents: &'static [u8]) -> Transmit<'static> {
        Transmit {
            destination: shim.fake_peer(),
            ecn: None,
            contents,
            segment_size: None,
            src_ip: None,
        }
    }

    #[tokio::test]
    async fn during_a_move_both_peers_get_datagrams_until_the_move_is_confirmed() {
        let old = loopback_socket();
        let new = loopback_socket();
        let stranger = loopback_socket();
        let shim =
            Arc::new(SwappableUdp::new(loopback_socket(), old.local_addr().unwrap()).unwrap());
        let new_addr = new.local_addr().unwrap();
        assert_eq!(shim.set_peer(new_addr).unwrap(), old.local_addr().unwrap());
        assert_eq!(shim.previous_peer(), Some(old.local_addr().unwrap()));
        send(&shim, &transmit_of(&shim, b"ack")).await;
        assert_eq!(read_from(&old).as_deref(), Some(&b"ack"[..]));
        assert_eq!(read_from(&new).as_deref(), Some(&b"ack"[..]));
        // The old server still answers until it freezes: accepted, reported from the fake peer.
        old.send_to(b"from old", shim.local_addr()).unwrap();
        let (data, from) = recv_one(&shim).await;
        assert_eq!(
            (data.as_slice(), from),
            (&b"from old"[..], shim.fake_peer())
        );
        assert!(
            shim.previous_peer().is_some(),
            "the old peer does not confirm the move"
        );
        // A stranger is still refused.
        stranger.send_to(b"intruder", shim.local_addr()).unwrap();
        // A datagram from the new address is delivered (quinn judges it) but confirms nothing:
        // the shim cannot tell the restored server from a spoofer.
        new.send_to(b"from new", shim.local_addr()).unwrap();
        let (data, from) = recv_one(&shim).await;
        assert_eq!(
            (data.as_slice(), from),
            (&b"from new"[..], shim.fake_peer())
        );
        assert_eq!(shim.previous_peer(), Some(old.local_addr().unwrap()));
        assert_eq!(shim.last_received_from(), Some(new_addr));
        send(&shim, &transmit_of(&shim, b"still both")).await;
        assert_eq!(read_from(&old).as_deref(), Some(&b"still both"[..]));
        assert_eq!(read_from(&new).as_deref(), Some(&b"still both"[..]));
        // The wrapper vouches for the new peer (an authenticated Resumed): confirmed at once,
        // since a datagram from it was delivered.
        assert_eq!(
            shim.confirm_peer(new_addr).unwrap(),
            Confirmation::Confirmed
        );
        assert_eq!(shim.previous_peer(), None);
        assert_eq!(
            *shim.move_outcomes().borrow(),
            MoveOutcome::Confirmed { peer: new_addr }
        );
        // From now on only the new peer gets datagrams and only its datagrams are accepted.
        send(&shim, &transmit_of(&shim, b"after")).await;
        assert_eq!(read_from(&new).as_deref(), Some(&b"after"[..]));
        assert_eq!(read_from(&old), None);
        old.send_to(b"late", shim.local_addr()).unwrap();
        new.send_to(b"fresh", shim.local_addr()).unwrap();
        let (data, _) = recv_one(&shim).await;
        assert_eq!(data, b"fresh");
        assert_eq!(
            shim.confirm_peer(new_addr).unwrap(),
            Confirmation::AlreadySettled
        );
        let stats = shim.stats();
        assert_eq!(stats.swaps, 1);
        assert_eq!(stats.confirmations, 1);
        assert_eq!(stats.dual_sends, 2);
        assert_eq!(stats.duplicated_bytes, 3 + 10);
        assert_eq!(stats.unconfirmed_received, 1);
        assert_eq!(stats.overlap_capped, 0);
        assert_eq!(
            stats.dropped_foreign, 2,
            "the stranger and the late old datagram"
        );
    }

    #[tokio::test]
    async fn a_confirmed_move_gives_the_pause_from_the_previous_peers_last_datagram() {
        let old = loopback_socket();
        let new = loopback_socket();
        let shim = SwappableUdp::new(loopback_socket(), old.local_addr().unwrap()).unwrap();
        let new_addr = new.local_addr().unwrap();
        assert_eq!(shim.last_move_gap(), None);
        shim.set_peer(new_addr).unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        // The old server's last word before its freeze.
        old.send_to(b"last from old", shim.local_addr()).unwrap();
        recv_one(&shim).await;
        let last_old = Instant::now();
        tokio::time::sleep(Duration::from_millis(60)).await;
        new.send_to(b"first from new", shim.local_addr()).unwrap();
        recv_one(&shim).await;
        assert_eq!(shim.last_move_gap(), None, "not before the confirmation");
        shim.confirm_peer(new_addr).unwrap();
        let g = shim.last_move_gap().unwrap();
        assert_eq!((g.peer, g.previous), (new_addr, old.local_addr().unwrap()));
        // From the old peer's last datagram (not the overlap's start) to the confirmation.
        assert!(g.gap >= Duration::from_millis(60), "{g:?}");
        assert!(
            g.gap <= last_old.elapsed() + Duration::from_millis(5),
            "{g:?}"
        );
        // A move whose previous peer said nothing during the overlap counts from its start.
        let started = Instant::now();
        shim.set_peer(old.local_addr().unwrap()).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        old.send_to(b"back", shim.local_addr()).unwrap();
        recv_one(&shim).await;
        shim.confirm_peer(old.local_addr().unwrap()).unwrap();
        let g2 = shim.last_move_gap().unwrap();
        assert_eq!(g2.peer, old.local_addr().unwrap());
        assert!(g2.gap >= Duration::from_millis(20), "{g2:?}");
        assert!(g2.gap <= started.elapsed(), "{g2:?}");
    }

    #[tokio::test]
    async fn vouched_before_any_datagram_the_first_one_from_the_new_peer_confirms() {
        let old = loopback_socket();
        let new = loopback_socket();
        let shim = SwappableUdp::new(loopback_socket(), old.local_addr().unwrap()).unwrap();
        let new_addr = new.local_addr().unwrap();
        shim.set_peer(new_addr).unwrap();
        // Vouching for another address is refused and changes nothing.
        let err = shim.confirm_peer(old.local_addr().unwrap()).unwrap_err();
        assert!(matches!(err, ShimError::NotCurrentPeer { .. }), "{err:?}");
        assert_eq!(
            shim.confirm_peer(new_addr).unwrap(),
            Confirmation::AwaitingDatagram
        );
        assert!(shim.previous_peer().is_some());
        // The old peer's datagrams do not complete it.
        old.send_to(b"old", shim.local_addr()).unwrap();
        recv_one(&shim).await;
        assert!(shim.previous_peer().is_some());
        new.send_to(b"new", shim.local_addr()).unwrap();
        recv_one(&shim).await;
        assert_eq!(shim.previous_peer(), None);
        assert_eq!(shim.stats().confirmations, 1);
    }

    #[tokio::test]
    async fn an_overlap_at_its_time_cap_swaps_back_and_stops_duplicating() {
        let old = loopback_socket();
        let new = loopback_socket();
        let shim =
            Arc::new(SwappableUdp::new(loopback_socket(), old.local_addr().unwrap()).unwrap());
        shim.set_overlap_limits(OverlapLimits::new(Duration::from_millis(100), u64::MAX));
        let (old_addr, new_addr) = (old.local_addr().unwrap(), new.local_addr().unwrap());
        let mut outcomes = shim.move_outcomes();
        shim.set_peer(new_addr).unwrap();
        let deadline = shim.overlap_deadline().unwrap();
        assert!(shim.check_overlap().is_none(), "not yet");
        send(&shim, &transmit_of(&shim, b"one")).await;
        assert_eq!(read_from(&old).as_deref(), Some(&b"one"[..]));
        assert_eq!(read_from(&new).as_deref(), Some(&b"one"[..]));
        tokio::time::sleep_until(deadline.into()).await;
        let err = shim.check_overlap().expect("the time cap is reached");
        assert!(
            matches!(err, MoveError::TimeCap { new, back_to, datagrams_from_new: 0, .. }
                if new == new_addr && back_to == old_addr),
            "{err:?}"
        );
        assert!(err.to_string().contains("not confirmed within"), "{err}");
        assert!(outcomes.has_changed().unwrap());
        assert_eq!(
            *outcomes.borrow_and_update(),
            MoveOutcome::Abandoned(err.clone())
        );
        assert_eq!((shim.peer(), shim.previous_peer()), (old_addr, None));
        // Duplicates stop; the new address is a stranger again.
        let before = shim.stats();
        send(&shim, &transmit_of(&shim, b"two")).await;
        assert_eq!(read_from(&old).as_deref(), Some(&b"two"[..]));
        assert_eq!(read_from(&new), None);
        new.send_to(b"late", shim.local_addr()).unwrap();
        old.send_to(b"old", shim.local_addr()).unwrap();
        assert_eq!(recv_one(&shim).await.0, b"old");
        let after = shim.stats();
        assert_eq!(after.dual_sends, before.dual_sends);
        assert_eq!(after.overlap_capped, 1);
        assert_eq!(after.dropped_foreign, 1);
        // Too late to vouch for it.
        assert!(shim.confirm_peer(new_addr).is_err());
        assert_eq!(shim.check_overlap(), None);
    }

    #[tokio::test]
    async fn an_overlap_at_its_byte_cap_swaps_back_on_the_next_send() {
        let old = loopback_socket();
        let new = loopback_socket();
        let shim =
            Arc::new(SwappableUdp::new(loopback_socket(), old.local_addr().unwrap()).unwrap());
        shim.set_overlap_limits(OverlapLimits::new(Duration::from_secs(60), 8));
        let (old_addr, new_addr) = (old.local_addr().unwrap(), new.local_addr().unwrap());
        shim.set_peer(new_addr).unwrap();
        // A datagram from the new address (spoofed or not) does not stop the count.
        new.send_to(b"hi", shim.local_addr()).unwrap();
        recv_one(&shim).await;
        send(&shim, &transmit_of(&shim, b"12345")).await;
        send(&shim, &transmit_of(&shim, b"6789")).await;
        assert_eq!(shim.stats().duplicated_bytes, 9);
        assert_eq!(read_from(&new).as_deref(), Some(&b"12345"[..]));
        assert_eq!(read_from(&new).as_deref(), Some(&b"6789"[..]));
        // Over the cap: this one goes to the old peer only.
        send(&shim, &transmit_of(&shim, b"three")).await;
        assert_eq!(read_from(&new), None);
        assert_eq!((shim.peer(), shim.previous_peer()), (old_addr, None));
        let MoveOutcome::Abandoned(err) = shim.move_outcomes().borrow().clone() else {
            panic!("not abandoned");
        };
        assert!(
            matches!(
                err,
                MoveError::ByteCap {
                    limit: 8,
                    datagrams_from_new: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        let stats = shim.stats();
        assert_eq!((stats.dual_sends, stats.overlap_capped), (2, 1));
    }

    #[tokio::test]
    async fn moving_back_ends_the_overlap_and_a_second_move_keeps_the_last_confirmed_peer() {
        let (a, b, c) = (localhost(7001), localhost(7002), localhost(7003));
        let shim = SwappableUdp::new(loopback_socket(), a).unwrap();
        shim.set_peer(b).unwrap();
        shim.set_peer(c).unwrap();
        // b was never confirmed: a is still the one to keep.
        assert_eq!((shim.peer(), shim.previous_peer()), (c, Some(a)));
        // An aborted move: back to a, the last confirmed peer; no overlap left.
        shim.set_peer(a).unwrap();
        assert_eq!((shim.peer(), shim.previous_peer()), (a, None));
        assert_eq!(
            *shim.move_outcomes().borrow(),
            MoveOutcome::Reverted { peer: a }
        );
        // Setting the same peer again changes nothing.
        shim.set_peer(a).unwrap();
        assert_eq!(shim.previous_peer(), None);
    }
}
