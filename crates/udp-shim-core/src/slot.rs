//! [`Slot`]: the current socket (or none while parked) behind a read/write lock.
//!
//! Every swap bumps a generation counter, wakes the last task that polled for receive, and
//! notifies every writability future so that no task stays registered on a retired socket.
//! A retired socket is closed as soon as the last in-flight user drops its `Arc`.

use std::{
    fmt,
    io::{self, IoSliceMut},
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::{io::Interest, sync::Notify};

use crate::{SlotError, addr::to_socket_family};

/// The kernel's cap on datagrams coalesced by UDP GRO (`UDP_GRO_CNT_MAX`).
const KERNEL_GRO_MAX: usize = 64;

/// How many consecutive receive errors `poll_recv` swallows before yielding.
const MAX_ERRORS_IN_A_ROW: u32 = 32;

/// How many receive batches `poll_recv` reads before yielding, when all were filtered out.
const MAX_FILTERED_BATCHES: u32 = 64;

/// A socket registered with Tokio and set up by quinn-udp, ready to be swapped into its
/// [`Slot`] (from [`Slot::prepare`]), or the slot's current socket (from [`Slot::current`]).
///
/// Holding an `Arc` of a swapped-out socket keeps its descriptor open; it closes when the
/// last holder drops it.
#[derive(Debug)]
pub struct PreparedSocket {
    pub(crate) io: tokio::net::UdpSocket,
    state: UdpSocketState,
    pub(crate) generation: u64,
    local: SocketAddr,
    /// Declared last: fields drop in order, so it is set once `io` (the descriptor) is closed.
    closed: ClosedFlag,
}

impl PreparedSocket {
    /// The address the socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The slot generation this socket was swapped in at; 0 for the slot's first socket and
    /// for a socket not swapped in yet.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// Set when dropped; tells that a [`PreparedSocket`]'s descriptor really is closed.
#[derive(Debug, Default)]
struct ClosedFlag(Arc<AtomicBool>);

impl Drop for ClosedFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Capabilities reported to quinn, fixed from the slot's first socket: quinn reads them once
/// and sizes its buffers by them, so they never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Caps {
    /// For `AsyncUdpSocket::max_transmit_segments` (GSO). A later socket that cannot offload
    /// a batch this large sends it one datagram at a time.
    pub max_transmit_segments: usize,
    /// For `AsyncUdpSocket::max_receive_segments` (GRO). Below the kernel's maximum, later
    /// sockets get GRO turned off.
    pub max_receive_segments: usize,
    /// For `AsyncUdpSocket::may_fragment`.
    pub may_fragment: bool,
    /// Whether the first socket was IPv6: quinn's endpoint then uses IPv6 addresses (see
    /// [`to_endpoint_family`](crate::addr::to_endpoint_family)).
    pub initial_v6: bool,
}

/// A snapshot of a [`Slot`]'s counters. Counts are datagrams, not transmits: a GSO or GRO
/// batch counts each datagram in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SlotStats {
    /// Datagrams handed to the kernel.
    pub sent: u64,
    /// Datagrams delivered to quinn (accepted by `keep` in [`Slot::poll_recv`]).
    pub received: u64,
    /// Datagrams received but refused by `keep`, dropped.
    pub dropped_filtered: u64,
    /// Datagrams sent while parked, dropped.
    pub dropped_parked: u64,
    /// Datagrams the kernel refused, or whose destination the socket's family cannot reach,
    /// dropped.
    pub dropped_send_errors: u64,
    /// Receive errors swallowed (e.g. `ECONNREFUSED`).
    pub recv_errors: u64,
    /// Calls to [`Slot::swap`], parks included.
    pub swaps: u64,
}

/// The live counters behind [`SlotStats`].
#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    dropped_filtered: AtomicU64,
    dropped_parked: AtomicU64,
    dropped_send_errors: AtomicU64,
    recv_errors: AtomicU64,
    swaps: AtomicU64,
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
}

#[derive(Debug)]
struct Current {
    sock: Option<Arc<PreparedSocket>>,
    last_local: SocketAddr,
}

/// A replaceable socket for a quinn `AsyncUdpSocket`: holds the current socket, or none while
/// parked, and implements sending, receiving and writability on whichever socket is current.
/// See the [crate docs](crate).
pub struct Slot {
    current: RwLock<Current>,
    generation: AtomicU64,
    recv_waker: Mutex<Option<Waker>>,
    pub(crate) swapped: Notify,
    /// Closed flags of swapped-out sockets that may still be open.
    retired: Mutex<Vec<Arc<AtomicBool>>>,
    caps: Caps,
    counters: Counters,
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot")
            .field("local", &self.local_addr())
            .field("parked", &self.is_parked())
            .field("generation", &self.generation())
            .field("caps", &self.caps)
            .finish_non_exhaustive()
    }
}

impl Slot {
    /// Wraps `socket` as generation 0 and fixes the capabilities reported to quinn from it.
    ///
    /// Must be called inside a Tokio runtime with I/O enabled ([`SlotError::NoRuntime`]).
    pub fn new(socket: std::net::UdpSocket) -> Result<Self, SlotError> {
        let (sock, caps) = prepare(socket, None)?;
        Ok(Self {
            current: RwLock::new(Current {
                last_local: sock.local,
                sock: Some(Arc::new(sock)),
            }),
            generation: AtomicU64::new(0),
            recv_waker: Mutex::new(None),
            swapped: Notify::new(),
            retired: Mutex::new(Vec::new()),
            caps,
            counters: Counters::default(),
        })
    }

    /// The capabilities fixed from the first socket.
    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// Prepares `socket` for this slot (same capability limits) without swapping it in: on
    /// error the slot is untouched. Must be called inside a Tokio runtime with I/O enabled.
    pub fn prepare(&self, socket: std::net::UdpSocket) -> Result<PreparedSocket, SlotError> {
        prepare(socket, Some(self.caps)).map(|(sock, _)| sock)
    }

    /// The current socket, `None` while parked. Holding it keeps its descriptor open after a
    /// swap (see [`Slot::open_retired`]).
    pub fn current(&self) -> Option<Arc<PreparedSocket>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .sock
            .clone()
    }

    /// The generation: 0 for the first socket, +1 per [`Slot::swap`] (parks included).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Whether there is no current socket.
    pub fn is_parked(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .sock
            .is_none()
    }

    /// The current socket's address, or the last one while parked.
    pub fn local_addr(&self) -> SocketAddr {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .last_local
    }

    /// Swaps `new` in (or parks when `None`), then drops the old socket (its descriptor closes
    /// as soon as no in-flight call holds it), wakes the receive task and every writer.
    /// Returns the address now reported by [`Slot::local_addr`].
    pub fn swap(&self, new: Option<PreparedSocket>) -> SocketAddr {
        let (old, local) = {
            let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
            let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
            let new = new.map(|mut sock| {
                sock.generation = generation;
                Arc::new(sock)
            });
            if let Some(sock) = &new {
                current.last_local = sock.local;
            }
            (
                std::mem::replace(&mut current.sock, new),
                current.last_local,
            )
        };
        if let Some(old) = old {
            let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
            retired.retain(|closed| !closed.load(Ordering::Acquire));
            retired.push(old.closed.0.clone());
            drop(retired);
            // Closes the descriptor unless a call in flight still holds it.
            drop(old);
        }
        add(&self.counters.swaps, 1);
        self.wake_receiver();
        self.swapped.notify_waiters();
        local
    }

    /// Swapped-out sockets whose descriptor is still open (held by a call in flight, or by
    /// an `Arc` from [`Slot::current`]).
    pub fn open_retired(&self) -> usize {
        let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        retired.retain(|closed| !closed.load(Ordering::Acquire));
        retired.len()
    }

    /// Wakes the task that last polled for receive, e.g. after the `keep` filter of
    /// [`Slot::poll_recv`] changed its mind.
    pub fn wake_receiver(&self) {
        let waker = self
            .recv_waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SlotStats {
        let c = &self.counters;
        SlotStats {
            sent: get(&c.sent),
            received: get(&c.received),
            dropped_filtered: get(&c.dropped_filtered),
            dropped_parked: get(&c.dropped_parked),
            dropped_send_errors: get(&c.dropped_send_errors),
            recv_errors: get(&c.recv_errors),
            swaps: get(&c.swaps),
        }
    }

    fn register_receiver(&self, cx: &Context<'_>) {
        let mut slot = self
            .recv_waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &*slot {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => *slot = Some(cx.waker().clone()),
        }
    }

    /// Sends `transmit` to `destination` (or to `transmit.destination` when `None`), converted
    /// to the current socket's address family, with `src_ip` cleared (the kernel picks the
    /// source from the route).
    ///
    /// Returns only `Ok` or `WouldBlock`: a datagram that cannot be sent is dropped and counted
    /// (while parked, on a kernel error, or for an IPv6 destination from an IPv4 socket).
    pub fn try_send(
        &self,
        transmit: &Transmit<'_>,
        destination: Option<SocketAddr>,
    ) -> io::Result<()> {
        let datagrams = transmit_datagrams(transmit);
        let Some(sock) = self.current() else {
            add(&self.counters.dropped_parked, datagrams);
            return Ok(());
        };
        let wanted = destination.unwrap_or(transmit.destination);
        let Some(destination) = to_socket_family(wanted, sock.local) else {
            tracing::debug!(%wanted, local = %sock.local, "destination not reachable from this socket family; dropped");
            add(&self.counters.dropped_send_errors, datagrams);
            return Ok(());
        };
        let outgoing = Transmit {
            destination,
            ecn: transmit.ecn,
            contents: transmit.contents,
            segment_size: transmit.segment_size,
            src_ip: None,
        };
        match transmit.segment_size {
            Some(size) if size > 0 && datagrams > sock.state.max_gso_segments() => {
                self.send_split(&sock, &outgoing, size)
            }
            _ => match send_one(&sock, &outgoing) {
                Ok(()) => {
                    add(&self.counters.sent, datagrams);
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
                Err(e) => {
                    self.send_failed(&e, destination, datagrams);
                    Ok(())
                }
            },
        }
    }

    /// Sends a GSO batch one datagram at a time (the current socket cannot offload it).
    fn send_split(
        &self,
        sock: &PreparedSocket,
        batch: &Transmit<'_>,
        size: usize,
    ) -> io::Result<()> {
        let total = transmit_datagrams(batch);
        for (index, chunk) in batch.contents.chunks(size).enumerate() {
            let single = Transmit {
                destination: batch.destination,
                ecn: batch.ecn,
                contents: chunk,
                segment_size: None,
                src_ip: None,
            };
            match send_one(sock, &single) {
                Ok(()) => add(&self.counters.sent, 1),
                // Nothing sent yet: quinn retries the whole batch later.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && index == 0 => return Err(e),
                Err(e) => {
                    // Part of the batch is out: drop the rest, QUIC recovers the loss.
                    self.send_failed(&e, batch.destination, total - index);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn send_failed(&self, error: &io::Error, destination: SocketAddr, datagrams: usize) {
        tracing::debug!(%destination, %error, datagrams, "UDP send failed; datagrams dropped");
        add(&self.counters.dropped_send_errors, datagrams);
    }

    /// Receives datagrams from the current socket. `keep` sees every datagram's metadata, may
    /// rewrite it (e.g. the source address quinn sees), and returns whether quinn gets it;
    /// accepted datagrams are moved to the front of `bufs` and `meta` (no copy).
    ///
    /// Never returns an error, stays `Pending` while parked, follows swaps.
    pub fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        mut keep: impl FnMut(&mut RecvMeta) -> bool,
    ) -> Poll<io::Result<usize>> {
        // Register first: a swap after this point is guaranteed to wake us.
        self.register_receiver(cx);
        let mut errors_in_a_row = 0_u32;
        let mut filtered_batches = 0_u32;
        loop {
            let Some(sock) = self.current() else {
                return Poll::Pending;
            };
            match sock.io.poll_recv_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => {
                    if sock.generation != self.generation() {
                        continue;
                    }
                    // The reactor is gone (runtime shutting down): nothing to read, ever.
                    tracing::debug!(%error, "UDP receive readiness failed");
                    return Poll::Pending;
                }
                Poll::Ready(Ok(())) => {}
            }
            let received = sock.io.try_io(Interest::READABLE, || {
                sock.state.recv((&sock.io).into(), bufs, meta)
            });
            match received {
                Ok(count) => {
                    errors_in_a_row = 0;
                    let kept = self.filter(bufs, meta, count, &mut keep);
                    if kept > 0 {
                        return Poll::Ready(Ok(kept));
                    }
                    filtered_batches += 1;
                    if filtered_batches >= MAX_FILTERED_BATCHES {
                        // Do not starve other tasks under a flood of foreign datagrams.
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                }
                // Readiness cleared by try_io: the next poll_recv_ready registers us.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) if sock.generation != self.generation() => {
                    // The socket was swapped under us: retry on the new one.
                }
                Err(error) => {
                    // ECONNREFUSED from an ICMP error, and the like: transient for QUIC.
                    add(&self.counters.recv_errors, 1);
                    tracing::debug!(%error, "UDP receive error swallowed");
                    errors_in_a_row += 1;
                    if errors_in_a_row >= MAX_ERRORS_IN_A_ROW {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    /// Keeps the accepted datagrams at the front (swapping buffer slices, no copy).
    fn filter(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        count: usize,
        keep: &mut impl FnMut(&mut RecvMeta) -> bool,
    ) -> usize {
        let count = count.min(meta.len()).min(bufs.len());
        let mut kept = 0;
        for index in 0..count {
            let datagrams = meta_datagrams(&meta[index]);
            if keep(&mut meta[index]) {
                if index != kept {
                    meta.swap(index, kept);
                    bufs.swap(index, kept);
                }
                kept += 1;
                add(&self.counters.received, datagrams);
            } else {
                add(&self.counters.dropped_filtered, datagrams);
            }
        }
        kept
    }
}

fn send_one(sock: &PreparedSocket, transmit: &Transmit<'_>) -> io::Result<()> {
    sock.io.try_io(Interest::WRITABLE, || {
        sock.state.try_send((&sock.io).into(), transmit)
    })
}

/// Wraps a std socket for quinn: quinn-udp options, tokio registration, GRO kept within `caps`.
fn prepare(
    socket: std::net::UdpSocket,
    caps: Option<Caps>,
) -> Result<(PreparedSocket, Caps), SlotError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(SlotError::NoRuntime);
    }
    let state =
        UdpSocketState::new((&socket).into()).map_err(|source| SlotError::Setup { source })?;
    let local = socket
        .local_addr()
        .map_err(|source| SlotError::Setup { source })?;
    let caps = caps.unwrap_or(Caps {
        max_transmit_segments: state.max_gso_segments(),
        max_receive_segments: state.gro_segments(),
        may_fragment: state.may_fragment(),
        initial_v6: local.is_ipv6(),
    });
    if caps.max_receive_segments < KERNEL_GRO_MAX {
        // quinn sized its receive buffers for fewer coalesced datagrams than the kernel may
        // deliver at once (quinn-udp enables UDP_GRO regardless): turn GRO off on this socket.
        disable_gro(&socket);
    }
    let io =
        tokio::net::UdpSocket::from_std(socket).map_err(|source| SlotError::Setup { source })?;
    Ok((
        PreparedSocket {
            io,
            state,
            generation: 0,
            local,
            closed: ClosedFlag::default(),
        },
        caps,
    ))
}

#[cfg(target_os = "linux")]
fn disable_gro(socket: &std::net::UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt::UdpGroSegment};
    if let Err(error) = setsockopt(socket, UdpGroSegment, &false) {
        tracing::debug!(%error, "could not disable UDP_GRO");
    }
}

#[cfg(not(target_os = "linux"))]
fn disable_gro(_socket: &std::net::UdpSocket) {}

/// Datagrams in a transmit (a GSO batch holds several).
fn transmit_datagrams(transmit: &Transmit<'_>) -> usize {
    match transmit.segment_size {
        Some(size) if size > 0 => transmit.contents.len().div_ceil(size).max(1),
        _ => 1,
    }
}

/// Datagrams described by one receive metadata entry (GRO coalesces several).
fn meta_datagrams(meta: &RecvMeta) -> usize {
    if meta.stride == 0 {
        1
    } else {
        meta.len.div_ceil(meta.stride).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::Ipv4Addr, time::Duration};

    fn localhost(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    fn loopback_socket() -> std::net::UdpSocket {
        std::net::UdpSocket::bind(localhost(0)).unwrap()
    }

    #[test]
    fn outside_runtime_is_no_runtime() {
        let err = Slot::new(loopback_socket()).unwrap_err();
        assert!(matches!(err, SlotError::NoRuntime), "{err:?}");
    }

    #[tokio::test]
    async fn non_udp_descriptor_is_setup_error() {
        // A Unix datagram socket has no IP address: quinn-udp or local_addr refuses it.
        let (unix, _other) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let fake = std::net::UdpSocket::from(std::os::fd::OwnedFd::from(unix));
        let err = Slot::new(fake).unwrap_err();
        assert!(matches!(err, SlotError::Setup { .. }), "{err:?}");
    }

    #[test]
    fn datagram_counts() {
        let contents = [0_u8; 2500];
        let t = Transmit {
            destination: localhost(1),
            ecn: None,
            contents: &contents,
            segment_size: Some(1200),
            src_ip: None,
        };
        assert_eq!(transmit_datagrams(&t), 3);
        let meta = RecvMeta {
            addr: localhost(1),
            len: 2400,
            stride: 1200,
            ecn: None,
            dst_ip: None,
        };
        assert_eq!(meta_datagrams(&meta), 2);
    }

    #[tokio::test]
    async fn gso_batch_is_split_into_single_datagrams() {
        let peer = loopback_socket();
        let slot = Slot::new(loopback_socket()).unwrap();
        let sock = slot.current().unwrap();
        sock.io.writable().await.unwrap();
        let contents = [7_u8; 250];
        let batch = Transmit {
            destination: peer.local_addr().unwrap(),
            ecn: None,
            contents: &contents,
            segment_size: Some(100),
            src_ip: None,
        };
        slot.send_split(&sock, &batch, 100).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0_u8; 512];
        let sizes: Vec<usize> = (0..3).map(|_| peer.recv(&mut buf).unwrap()).collect();
        assert_eq!(sizes, [100, 100, 50]);
        assert_eq!(slot.stats().sent, 3);
    }

    #[tokio::test]
    async fn swap_bumps_generation_and_closes_old_socket() {
        let slot = Slot::new(loopback_socket()).unwrap();
        let old = slot.local_addr();
        let fresh = slot.prepare(loopback_socket()).unwrap();
        assert_eq!(fresh.generation(), 0);
        let new = slot.swap(Some(fresh));
        assert_ne!(new, old);
        assert_eq!(slot.generation(), 1);
        assert_eq!(slot.current().unwrap().generation(), 1);
        assert_eq!(slot.current().unwrap().local_addr(), new);
        assert_eq!(slot.open_retired(), 0);
        drop(std::net::UdpSocket::bind(old).expect("old socket still bound"));
        assert_eq!(slot.swap(None), new, "parked slot forgot its address");
        assert!(slot.is_parked());
        assert_eq!(slot.generation(), 2);
        assert_eq!(slot.stats().swaps, 2);
    }

    #[tokio::test]
    async fn held_socket_stays_open_until_dropped() {
        let slot = Slot::new(loopback_socket()).unwrap();
        let held = slot.current().unwrap();
        slot.swap(None);
        assert_eq!(slot.open_retired(), 1);
        drop(held);
        assert_eq!(slot.open_retired(), 0);
    }

    #[tokio::test]
    async fn parked_send_is_dropped_and_counted() {
        let slot = Slot::new(loopback_socket()).unwrap();
        slot.swap(None);
        let contents = [0_u8; 300];
        let batch = Transmit {
            destination: localhost(9),
            ecn: None,
            contents: &contents,
            segment_size: Some(100),
            src_ip: None,
        };
        slot.try_send(&batch, None).unwrap();
        let stats = slot.stats();
        assert_eq!((stats.dropped_parked, stats.sent), (3, 0));
    }

    #[tokio::test]
    async fn v6_destination_from_v4_socket_is_dropped_and_counted() {
        let slot = Slot::new(loopback_socket()).unwrap();
        let transmit = Transmit {
            destination: localhost(9),
            ecn: None,
            contents: b"x",
            segment_size: None,
            src_ip: None,
        };
        let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 9));
        slot.try_send(&transmit, Some(v6)).unwrap();
        assert_eq!(slot.stats().dropped_send_errors, 1);
    }

    #[tokio::test]
    async fn keep_filter_rewrites_and_drops() {
        let peer = loopback_socket();
        let stranger = loopback_socket();
        let slot = Slot::new(loopback_socket()).unwrap();
        stranger.send_to(b"drop me", slot.local_addr()).unwrap();
        peer.send_to(b"keep me", slot.local_addr()).unwrap();
        let friend = peer.local_addr().unwrap();
        let shown = localhost(4242);
        let mut storage = [[0_u8; 1500]; 2];
        let [a, b] = &mut storage;
        let mut bufs = [IoSliceMut::new(a), IoSliceMut::new(b)];
        let mut meta = [RecvMeta::default(); 2];
        let got = std::future::poll_fn(|cx| {
            slot.poll_recv(cx, &mut bufs, &mut meta, |m| {
                if m.addr != friend {
                    return false;
                }
                m.addr = shown;
                true
            })
        });
        let n = tokio::time::timeout(Duration::from_secs(5), got)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(&bufs[0][..meta[0].len], b"keep me");
        assert_eq!(meta[0].addr, shown);
        let stats = slot.stats();
        assert_eq!((stats.received, stats.dropped_filtered), (1, 1));
    }
}
