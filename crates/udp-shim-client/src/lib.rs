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
//!   set_peer(new) ───────▶ real peer swapped atomically, receive task woken; until `new`
//!                          is heard from, datagrams also go to (and come from) the old peer
//!   rebind_local(addr) ──▶ local socket replaced (old closed), never an error to quinn
//! ```
//!
//! quinn-proto drops, on the client side, every datagram whose source differs from the path's
//! remote address: a quinn client never accepts a new server address. [`SwappableUdp`] hides
//! the server's moves: quinn always talks to one fixed *fake peer* ([`SwappableUdp::fake_peer`]),
//! while the shim sends to, and accepts datagrams only from, the current *real peer*
//! ([`SwappableUdp::set_peer`]). During a move, until the new peer is heard from, the previous
//! peer is kept too: the server announces its move before it freezes, and the client's answer
//! and traffic must still reach it at the old address until then.
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
};

use quinn::{
    AsyncUdpSocket, UdpPoller,
    udp::{RecvMeta, Transmit},
};

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
    /// Moves confirmed by a datagram from the new peer.
    pub confirmations: u64,
    /// Transmissions also sent to the previous peer while a move was unconfirmed.
    pub dual_sends: u64,
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
    /// The source of the last datagram delivered to quinn.
    last_from: RwLock<Option<SocketAddr>>,
}

/// The real peer, and during a move the peer it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Peers {
    current: SocketAddr,
    /// The last peer heard from, kept until `current` is heard from: datagrams go to both and
    /// are accepted from both meanwhile.
    previous: Option<SocketAddr>,
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

    /// Wraps `socket`, sending to `peer`, with the default fake peer of the socket's family.
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
                previous: None,
            }),
            fake_peer,
            reported_fake,
            swaps: AtomicU64::new(0),
            confirmations: AtomicU64::new(0),
            dual_sends: AtomicU64::new(0),
            last_from: RwLock::new(None),
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

    /// The current real peer.
    pub fn peer(&self) -> SocketAddr {
        self.peers().current
    }

    /// During a move, the peer being replaced: datagrams still go to it and are accepted from
    /// it until the new peer is heard from. `None` once the current peer has been heard from.
    pub fn previous_peer(&self) -> Option<SocketAddr> {
        self.peers().previous
    }

    /// Moves to a new real peer: from now on datagrams go to `peer`, and until a datagram
    /// arrives from `peer` they also go to the previous peer, and datagrams from either are
    /// accepted. Datagrams from anyone else are dropped and counted. Wakes the endpoint's
    /// receive task. Returns the peer replaced.
    ///
    /// Why both: the server announces its move while it still runs at the old address, and
    /// keeps running there until it is frozen. The client's `Ack`, and all traffic until the
    /// freeze, must still reach it there; the server's first datagram from the new address
    /// (after the restore) ends the overlap. Moving back to the previous peer (an aborted
    /// move) ends the overlap at once. A second move before the new peer was heard from keeps
    /// the last peer that was heard from as the previous one.
    pub fn set_peer(&self, peer: SocketAddr) -> Result<SocketAddr, ShimError> {
        check_peer(peer, self.slot.local_addr())?;
        let old = {
            let mut peers = self.peers.write().unwrap_or_else(PoisonError::into_inner);
            let old = peers.current;
            let heard = peers.previous.unwrap_or(old);
            peers.current = peer;
            peers.previous = (canonical(heard) != canonical(peer)).then_some(heard);
            old
        };
        self.swaps.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%old, new = %peer, "real peer swapped");
        self.slot.wake_receiver();
        Ok(old)
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

    /// A datagram came from `from`: if it is the new peer of a move, the move is confirmed.
    fn heard_from(&self, from: SocketAddr) -> bool {
        let peers = self.peers();
        if canonical(from) == canonical(peers.current) {
            if peers.previous.is_some() {
                let mut w = self.peers.write().unwrap_or_else(PoisonError::into_inner);
                if canonical(w.current) == canonical(from) && w.previous.take().is_some() {
                    self.confirmations.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = %from, "new peer heard from; previous peer dropped");
                }
            }
            return true;
        }
        peers
            .previous
            .is_some_and(|p| canonical(p) == canonical(from))
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
        if let Some(p) = peers.previous {
            check_family(p, local)?;
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
            local_rebinds: slot.swaps,
            recv_errors: slot.recv_errors,
        }
    }
}

impl AsyncUdpSocket for SwappableUdp {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(SlotPoller::new(self.slot.clone()))
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let peers = self.peers();
        if let Some(previous) = peers.previous {
            // The server most likely still runs there: it goes first, and a full socket
            // buffer (WouldBlock) makes quinn retry the whole transmission.
            self.slot.try_send(transmit, Some(previous))?;
            self.dual_sends.fetch_add(1, Ordering::Relaxed);
            // The copy to the new peer is best effort: quinn retransmits what is lost.
            return match self.slot.try_send(transmit, Some(peers.current)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                other => other,
            };
        }
        self.slot.try_send(transmit, Some(peers.current))
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
            if !self.heard_from(m.addr) {
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

    #[tokio::test]
    async fn during_a_move_both_peers_get_datagrams_until_the_new_one_answers() {
        let old = loopback_socket();
        let new = loopback_socket();
        let stranger = loopback_socket();
        let shim =
            Arc::new(SwappableUdp::new(loopback_socket(), old.local_addr().unwrap()).unwrap());
        let transmit = |contents: &'static [u8]| Transmit {
            destination: shim.fake_peer(),
            ecn: None,
            contents,
            segment_size: None,
            src_ip: None,
        };
        assert_eq!(
            shim.set_peer(new.local_addr().unwrap()).unwrap(),
            old.local_addr().unwrap()
        );
        assert_eq!(shim.previous_peer(), Some(old.local_addr().unwrap()));
        send(&shim, &transmit(b"ack")).await;
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
        // The restored server answers from the new address: the move is confirmed.
        new.send_to(b"from new", shim.local_addr()).unwrap();
        let (data, from) = recv_one(&shim).await;
        assert_eq!(
            (data.as_slice(), from),
            (&b"from new"[..], shim.fake_peer())
        );
        assert_eq!(shim.previous_peer(), None);
        // From now on only the new peer gets datagrams and only its datagrams are accepted.
        send(&shim, &transmit(b"after")).await;
        assert_eq!(read_from(&new).as_deref(), Some(&b"after"[..]));
        assert_eq!(read_from(&old), None);
        old.send_to(b"late", shim.local_addr()).unwrap();
        new.send_to(b"fresh", shim.local_addr()).unwrap();
        let (data, _) = recv_one(&shim).await;
        assert_eq!(data, b"fresh");
        let stats = shim.stats();
        assert_eq!(stats.swaps, 1);
        assert_eq!(stats.confirmations, 1);
        assert_eq!(stats.dual_sends, 1);
        assert_eq!(
            stats.dropped_foreign, 2,
            "the stranger and the late old datagram"
        );
    }

    #[tokio::test]
    async fn moving_back_ends_the_overlap_and_a_second_move_keeps_the_last_peer_heard() {
        let (a, b, c) = (localhost(7001), localhost(7002), localhost(7003));
        let shim = SwappableUdp::new(loopback_socket(), a).unwrap();
        shim.set_peer(b).unwrap();
        shim.set_peer(c).unwrap();
        // b was never heard from: a is still the one to keep.
        assert_eq!((shim.peer(), shim.previous_peer()), (c, Some(a)));
        // An aborted move: back to a, which is the peer heard from; no overlap left.
        shim.set_peer(a).unwrap();
        assert_eq!((shim.peer(), shim.previous_peer()), (a, None));
        // Setting the same peer again changes nothing.
        shim.set_peer(a).unwrap();
        assert_eq!(shim.previous_peer(), None);
    }
}
