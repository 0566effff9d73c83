//! A quinn 0.11 UDP socket for a QUIC server process that moves between hosts.
//!
//! ```text
//!   quinn (server)               MigratableUdp                         kernel
//!  ───────────────      ─────────────────────────────────      ───────────────────
//!   try_send ───────▶ src_ip cleared ──▶ current socket ──────▶ generation N
//!   poll_recv ◀────── dst_ip cleared ◀── current socket ◀────── generation N
//!
//!   rebind(addr) / rebind_with(sock):  new socket ─▶ swap in (N+1) ─▶ close old ─▶ wake tasks
//!   park():    socket closed, sends dropped (Ok), receives Pending      (CRIU dump: no inet fd)
//!   unpark():  bind again (same address, or same port) in today's network namespace
//!   then:      endpoint.rebind_abstract(same Arc)  ─▶ quinn PINGs every connection
//! ```
//!
//! [`MigratableUdp`] is the server's socket, replaceable at run time without quinn ever
//! seeing an error: `try_send` returns only `Ok` or `WouldBlock`, `poll_recv` never fails and
//! stays `Pending` while parked, and the capabilities quinn reads once are fixed from the
//! first socket. A swap bumps a generation counter; a call in flight keeps the socket it
//! started on until it returns, and any read or write that meets a swap retries on the new
//! socket. The old descriptor is closed as soon as no call holds it
//! ([`MigratableUdp::open_retired_sockets`], [`MigratableUdp::wait_retired_closed`]).
//! That machinery, shared with `udp-shim-client`, lives in `udp-shim-core`.
//!
//! # Source addresses
//!
//! A quinn server connection remembers the local IP of its first datagram and sends every
//! later datagram with that source IP (`IP_PKTINFO`). After a move to a namespace with another
//! IP the kernel refuses such sends. The shim therefore clears `Transmit::src_ip` on send and
//! `RecvMeta::dst_ip` on receive, from the very first datagram: quinn never pins an IP, the
//! kernel picks the source from the route.
//!
//! # After a swap: `rebind_abstract` with the same `Arc`
//!
//! After [`MigratableUdp::rebind`], [`MigratableUdp::rebind_with`] or
//! [`MigratableUdp::unpark`], call [`refresh_endpoint`] (that is,
//! `endpoint.rebind_abstract(shim.clone())` with the SAME `Arc` the endpoint was built on).
//! quinn then calls `local_address_changed()` on every connection, which queues a PING on a
//! fresh connection ID (each client hears from the new address at once) and wakes the
//! endpoint driver. Handing quinn a *new* socket object instead makes it keep reading the old
//! one as "previous" socket: with `SO_REUSEPORT` on the same port that stalled connections in
//! a prototype, while swapping inside this wrapper and re-announcing the same `Arc` did not.
//!
//! ```no_run
//! # async fn demo(config: quinn::ServerConfig) -> Result<(), Box<dyn std::error::Error>> {
//! use std::{sync::Arc, time::Duration};
//! use udp_shim_server::{MigratableUdp, refresh_endpoint, server_endpoint};
//!
//! let shim = Arc::new(MigratableUdp::bind("0.0.0.0:4242".parse()?)?);
//! let endpoint = server_endpoint(shim.clone(), config)?;
//! // Before the checkpoint:
//! shim.park();
//! shim.wait_retired_closed(Duration::from_secs(1)).await?;
//! // ... CRIU dump, restore in another network namespace ...
//! shim.unpark()?;
//! refresh_endpoint(&endpoint, &shim)?;
//! # Ok(()) }
//! ```

use std::{
    fmt,
    fs::File,
    io::{self, IoSliceMut},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use nix::sched::{CloneFlags, setns};
use quinn::{
    AsyncUdpSocket, UdpPoller,
    udp::{RecvMeta, Transmit},
};

use udp_shim_core::{Slot, SlotError, SlotPoller, addr::to_endpoint_family};

/// Errors from creating or replacing a [`MigratableUdp`]'s socket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShimError {
    /// Called outside a Tokio runtime: the socket must be registered with its reactor.
    #[error("a Tokio runtime with I/O enabled is required")]
    NoRuntime,
    /// Binding a new socket failed.
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
    /// Retired sockets were still held open by calls in flight when the wait ended.
    #[error("{open} retired socket(s) still open after the wait")]
    RetiredStillOpen {
        /// How many retired sockets were still open.
        open: usize,
    },
}

/// A snapshot of a [`MigratableUdp`]'s counters. Counts are datagrams (a GSO/GRO batch counts
/// each datagram in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ShimStats {
    /// Datagrams handed to the kernel.
    pub sent: u64,
    /// Datagrams delivered to quinn.
    pub received: u64,
    /// Datagrams quinn sent while parked, dropped.
    pub dropped_parked: u64,
    /// Datagrams the kernel refused, dropped.
    pub dropped_send_errors: u64,
    /// Socket swaps, parks included.
    pub rebinds: u64,
    /// Parks.
    pub parks: u64,
    /// Receive errors swallowed (e.g. `ECONNREFUSED`).
    pub recv_errors: u64,
}

/// A quinn [`AsyncUdpSocket`] whose socket can be replaced, closed (parked) and re-opened at
/// run time. See the [crate docs](crate).
pub struct MigratableUdp {
    slot: Arc<Slot>,
    parks: AtomicU64,
}

impl fmt::Debug for MigratableUdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MigratableUdp")
            .field("socket", &self.slot)
            .finish_non_exhaustive()
    }
}

impl MigratableUdp {
    /// Binds a socket on `addr` and wraps it. Must be called inside a Tokio runtime with I/O
    /// enabled.
    pub fn bind(addr: SocketAddr) -> Result<Self, ShimError> {
        Self::from_std(bind(addr)?)
    }

    /// Wraps `socket`. Must be called inside a Tokio runtime with I/O enabled.
    pub fn from_std(socket: std::net::UdpSocket) -> Result<Self, ShimError> {
        Ok(Self {
            slot: Arc::new(Slot::new(socket).map_err(slot_error)?),
            parks: AtomicU64::new(0),
        })
    }

    /// Binds a new socket on `addr`, swaps it in, then closes the old one (also unparks).
    /// On error nothing changes. Returns the new local address.
    ///
    /// `addr` must be free: to re-create the socket on the address it has now, use
    /// [`MigratableUdp::recreate`]. Afterwards call [`refresh_endpoint`].
    pub fn rebind(&self, addr: SocketAddr) -> Result<SocketAddr, ShimError> {
        self.rebind_with(bind(addr)?)
    }

    /// Swaps in `socket`, created elsewhere (e.g. by [`bind_in_netns`]), then closes the old
    /// one (also unparks). On error nothing changes. Afterwards call [`refresh_endpoint`].
    pub fn rebind_with(&self, socket: std::net::UdpSocket) -> Result<SocketAddr, ShimError> {
        let sock = self.slot.prepare(socket).map_err(slot_error)?;
        let local = self.slot.swap(Some(sock));
        tracing::info!(%local, generation = self.slot.generation(), "server UDP socket swapped");
        Ok(local)
    }

    /// Closes the socket: sends are dropped (reported to quinn as sent), receives stay pending.
    /// Returns `false` if it was already parked.
    ///
    /// The descriptor closes at once unless a call in flight holds it; before a checkpoint,
    /// await [`MigratableUdp::wait_retired_closed`].
    pub fn park(&self) -> bool {
        if self.slot.is_parked() {
            return false;
        }
        self.slot.swap(None);
        self.parks.fetch_add(1, Ordering::Relaxed);
        tracing::info!(last = %self.slot.local_addr(), "server UDP socket parked");
        true
    }

    /// Binds again on the last address, in the network namespace the process lives in now.
    /// If that IP does not exist here (`EADDRNOTAVAIL`), binds the same port on the
    /// unspecified address of the same family. Does nothing if not parked. Returns the local
    /// address. Afterwards call [`refresh_endpoint`].
    pub fn unpark(&self) -> Result<SocketAddr, ShimError> {
        if !self.slot.is_parked() {
            return Ok(self.slot.local_addr());
        }
        let last = self.slot.local_addr();
        let socket = match bind(last) {
            Err(ShimError::Bind { source, .. })
                if source.kind() == io::ErrorKind::AddrNotAvailable =>
            {
                let any: IpAddr = if last.is_ipv6() {
                    Ipv6Addr::UNSPECIFIED.into()
                } else {
                    Ipv4Addr::UNSPECIFIED.into()
                };
                tracing::info!(%last, "last IP not present here; binding the same port on {any}");
                bind(SocketAddr::new(any, last.port()))?
            }
            other => other?,
        };
        self.rebind_with(socket)
    }

    /// Binds on `addr` (parked or not): the same as [`MigratableUdp::rebind`].
    pub fn unpark_at(&self, addr: SocketAddr) -> Result<SocketAddr, ShimError> {
        self.rebind(addr)
    }

    /// Re-creates the socket on its current address (fresh socket options, e.g. after a CRIU
    /// restore that brought the old socket back): park, wait up to `limit` for the old
    /// descriptor to close, unpark.
    pub async fn recreate(&self, limit: Duration) -> Result<SocketAddr, ShimError> {
        self.park();
        self.wait_retired_closed(limit).await?;
        self.unpark()
    }

    /// Whether the shim is parked.
    pub fn is_parked(&self) -> bool {
        self.slot.is_parked()
    }

    /// The current socket's address, or the last one while parked.
    pub fn local_addr(&self) -> SocketAddr {
        self.slot.local_addr()
    }

    /// The socket generation: 0 for the first socket, +1 per swap or park.
    pub fn generation(&self) -> u64 {
        self.slot.generation()
    }

    /// Retired sockets whose descriptor is still open (a call in flight holds it).
    pub fn open_retired_sockets(&self) -> usize {
        self.slot.open_retired()
    }

    /// Waits until every retired socket's descriptor is closed, polling every millisecond for
    /// up to `limit`.
    pub async fn wait_retired_closed(&self, limit: Duration) -> Result<(), ShimError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let open = self.slot.open_retired();
            if open == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ShimError::RetiredStillOpen { open });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ShimStats {
        let slot = self.slot.stats();
        ShimStats {
            sent: slot.sent,
            received: slot.received,
            dropped_parked: slot.dropped_parked,
            dropped_send_errors: slot.dropped_send_errors,
            rebinds: slot.swaps,
            parks: self.parks.load(Ordering::Relaxed),
            recv_errors: slot.recv_errors,
        }
    }
}

impl AsyncUdpSocket for MigratableUdp {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(SlotPoller::new(self.slot.clone()))
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.slot.try_send(transmit, None)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let initial_v6 = self.slot.caps().initial_v6;
        self.slot.poll_recv(cx, bufs, meta, |m| {
            m.addr = to_endpoint_family(m.addr, initial_v6);
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

/// Creates a server endpoint on `shim` (default endpoint config, Tokio runtime).
pub fn server_endpoint(
    shim: Arc<MigratableUdp>,
    config: quinn::ServerConfig,
) -> io::Result<quinn::Endpoint> {
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(config),
        shim,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Re-announces `shim` (the SAME `Arc` the endpoint runs on) after a swap:
/// `endpoint.rebind_abstract(shim.clone())`. quinn PINGs every connection on a fresh
/// connection ID from the new socket and wakes its driver. See the [crate docs](crate).
pub fn refresh_endpoint(endpoint: &quinn::Endpoint, shim: &Arc<MigratableUdp>) -> io::Result<()> {
    endpoint.rebind_abstract(shim.clone())
}

/// Binds a UDP socket inside the network namespace at `netns_path` (e.g.
/// `/var/run/netns/NAME` or `/proc/PID/ns/net`) and returns it; the calling thread's
/// namespace is untouched.
///
/// A short-lived helper thread enters the namespace (`setns(CLONE_NEWNET)`, needs
/// `CAP_SYS_ADMIN`), binds, and exits; the socket stays in that namespace for its whole life.
/// Hand it to [`MigratableUdp::rebind_with`].
pub fn bind_in_netns(netns_path: &Path, addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let namespace = File::open(netns_path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("open network namespace {}: {e}", netns_path.display()),
        )
    })?;
    let shown = netns_path.display().to_string();
    std::thread::Builder::new()
        .name("udp-shim-netns".into())
        .spawn(move || {
            setns(&namespace, CloneFlags::CLONE_NEWNET).map_err(|errno| {
                let e = io::Error::from(errno);
                io::Error::new(e.kind(), format!("setns {shown}: {e}"))
            })?;
            std::net::UdpSocket::bind(addr).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("bind {addr} in network namespace {shown}: {e}"),
                )
            })
        })?
        .join()
        .map_err(|_| io::Error::other("network namespace helper thread panicked"))?
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    fn localhost(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    fn loopback_socket() -> UdpSocket {
        UdpSocket::bind(localhost(0)).unwrap()
    }

    /// Sends as quinn does; the shim must never return an error other than `WouldBlock`.
    async fn send(shim: &Arc<MigratableUdp>, transmit: &Transmit<'_>) {
        test_support::send_as_quinn(shim, transmit)
            .await
            .expect("a shim surfaced a send error to quinn");
    }

    #[test]
    fn outside_runtime_is_no_runtime() {
        let err = MigratableUdp::from_std(loopback_socket()).unwrap_err();
        assert!(matches!(err, ShimError::NoRuntime), "{err:?}");
    }

    #[tokio::test]
    async fn rebind_to_taken_address_is_bind_error_and_changes_nothing() {
        let shim = MigratableUdp::bind(localhost(0)).unwrap();
        let before = shim.local_addr();
        let err = shim.rebind(before).unwrap_err();
        assert!(
            matches!(err, ShimError::Bind { addr, .. } if addr == before),
            "{err:?}"
        );
        assert_eq!(shim.local_addr(), before);
        assert_eq!(shim.generation(), 0);
        assert!(!shim.is_parked());
    }

    #[tokio::test]
    async fn unpark_on_taken_port_is_bind_error_and_stays_parked() {
        let shim = MigratableUdp::bind(localhost(0)).unwrap();
        let addr = shim.local_addr();
        assert!(shim.park());
        let squatter = UdpSocket::bind(addr).unwrap();
        let err = shim.unpark().unwrap_err();
        assert!(
            matches!(err, ShimError::Bind { addr: a, .. } if a == addr),
            "{err:?}"
        );
        assert!(shim.is_parked());
        drop(squatter);
        assert_eq!(shim.unpark().unwrap(), addr);
        assert!(!shim.is_parked());
    }

    #[tokio::test]
    async fn wait_with_a_held_socket_is_retired_still_open() {
        let shim = MigratableUdp::bind(localhost(0)).unwrap();
        let held = shim.slot.current().unwrap();
        shim.park();
        assert_eq!(shim.open_retired_sockets(), 1);
        let err = shim
            .wait_retired_closed(Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ShimError::RetiredStillOpen { open: 1 }),
            "{err:?}"
        );
        drop(held);
        shim.wait_retired_closed(Duration::from_millis(20))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn parked_send_is_dropped_ok_and_counted() {
        let peer = loopback_socket();
        let shim = Arc::new(MigratableUdp::bind(localhost(0)).unwrap());
        let last = shim.local_addr();
        assert!(shim.park());
        assert!(!shim.park(), "second park reported a change");
        assert_eq!(shim.local_addr(), last, "parked shim forgot its address");
        let transmit = Transmit {
            destination: peer.local_addr().unwrap(),
            ecn: None,
            contents: b"lost",
            segment_size: None,
            src_ip: None,
        };
        send(&shim, &transmit).await;
        let stats = shim.stats();
        assert_eq!((stats.dropped_parked, stats.sent, stats.parks), (1, 0, 1));
        // The port is really free while parked.
        drop(UdpSocket::bind(last).expect("parked port still bound"));
    }

    #[tokio::test]
    async fn parked_receive_stays_pending_then_follows_unpark() {
        let peer = loopback_socket();
        let shim = Arc::new(MigratableUdp::bind(localhost(0)).unwrap());
        shim.park();
        let mut storage = [0_u8; 1500];
        let mut bufs = [IoSliceMut::new(&mut storage)];
        let mut meta = [RecvMeta::default()];
        let mut recv = std::pin::pin!(std::future::poll_fn(
            |cx| shim.poll_recv(cx, &mut bufs, &mut meta)
        ));
        let early = tokio::time::timeout(Duration::from_millis(50), recv.as_mut()).await;
        assert!(early.is_err(), "parked poll_recv returned {early:?}");
        let addr = shim.unpark().unwrap();
        peer.send_to(b"back", addr).unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), recv)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(&storage[..4], b"back");
        assert_eq!(meta[0].addr, peer.local_addr().unwrap());
        assert_eq!(meta[0].dst_ip, None);
    }

    #[tokio::test]
    async fn send_clears_src_ip() {
        let peer = loopback_socket();
        let shim = Arc::new(MigratableUdp::bind(localhost(0)).unwrap());
        let transmit = Transmit {
            destination: peer.local_addr().unwrap(),
            ecn: None,
            contents: b"hello",
            // An IP this host does not own: had it been kept, the kernel would refuse.
            src_ip: Some(Ipv4Addr::new(192, 0, 2, 77).into()),
            segment_size: None,
        };
        send(&shim, &transmit).await;
        let mut buf = [0_u8; 16];
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"hello"[..], shim.local_addr()));
        assert_eq!(shim.stats().sent, 1);
    }

    #[test]
    fn bind_in_missing_netns_is_not_found() {
        let err = bind_in_netns(Path::new("/nonexistent/netns/x"), localhost(0)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn bind_in_own_netns_binds() {
        // Entering the namespace we are already in needs CAP_SYS_ADMIN; skip without it.
        match bind_in_netns(Path::new("/proc/self/ns/net"), localhost(0)) {
            Ok(socket) => assert_eq!(socket.local_addr().unwrap().ip(), Ipv4Addr::LOCALHOST),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                test_support::require(&format!("needs CAP_SYS_ADMIN (root): {e}"), false);
            }
            Err(e) => panic!("{e}"),
        }
    }
}
