//! The holder: a thread inside the front's network namespace that owns the NFQUEUE socket
//! and the front port's reservation, and carries out the [`Book`]'s decisions.
//!
//! ```text
//!   Front ──Command──▶ channel + wake pipe ──▶ holder thread (in the netns)
//!                                              poll(netlink, wake, deadline of the oldest)
//!   kernel queue ──packet msg──▶ Book::on_packet ──▶ Accept: verdict now (no hold)
//!                                                  Hold:   keep (the kernel keeps the packet)
//!                                                  Drop:   verdict NF_DROP now, counted
//!   release ──▶ expired: NF_DROP; the rest: one batch NF_ACCEPT (kernel: queue order)
//! ```
//!
//! The thread exists for the front's whole life and stays bound to its queue: between holds
//! no rule sends it anything, and a datagram still queued when a hold's rule goes away is let
//! through at once. Closing the socket would make the kernel drop whatever is still queued.

use std::{
    io,
    net::SocketAddrV4,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::OFlag,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, SockaddrIn, bind,
        recv, send, setsockopt, socket, sockopt,
    },
    unistd::{pipe2, read, write},
};

use crate::{
    FrontError,
    book::{Book, Decision, HoldLimits, HoldStats},
    cmd::Netns,
    nfqueue::{self, Incoming, KernelCounters, Verdict},
};

/// Bytes of each queued packet copied to the holder: the largest IPv4 header and a UDP
/// header. The packet itself stays in the kernel until its verdict.
const COPY_RANGE: u32 = 68;
/// Room in the kernel's queue beyond `max_datagrams`, for packets not read yet.
const KERNEL_SLACK: u32 = 1024;
/// The netlink socket's receive buffer (`SO_RCVBUFFORCE`): a burst of queued packets waits
/// here until the holder reads it.
const RCVBUF: usize = 4 << 20;
/// How long to wait for the kernel's or the holder's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(5);
/// Queue numbers tried from the one derived from the name.
const QUEUE_TRIES: u16 = 64;
/// At stop: let through what is still queued until nothing came for this long.
const STOP_QUIET: Duration = Duration::from_millis(2);

enum Command {
    Hold(mpsc::Sender<bool>),
    Release(mpsc::Sender<Option<HoldStats>>),
    Stop(mpsc::Sender<()>),
}

/// The handle of the holder thread.
#[derive(Debug)]
pub(crate) struct Holder {
    commands: mpsc::Sender<Command>,
    waker: OwnedFd,
    thread: Option<JoinHandle<()>>,
    queue: u16,
    /// How long a release may take: its paced steps, and the usual wait.
    release_wait: Duration,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Hold(_) => "Hold",
            Self::Release(_) => "Release",
            Self::Stop(_) => "Stop",
        })
    }
}

impl Holder {
    /// Starts the thread in `netns`: it reserves `front` (a UDP socket bound with
    /// `IP_FREEBIND`, so no other socket takes the port while the front lives) and binds a
    /// free NFQUEUE number, trying from `first_queue` on.
    pub(crate) fn start(
        netns: Netns,
        front: SocketAddrV4,
        limits: HoldLimits,
        first_queue: u16,
    ) -> Result<Self, FrontError> {
        let (commands, inbox) = mpsc::channel();
        let (wake_read, waker) =
            pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(|e| FrontError::Queue {
                what: "pipe".into(),
                source: e.into(),
            })?;
        let (ready_tx, ready) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("udp-shim-front".into())
            .spawn(move || {
                let set_up = netns
                    .enter()
                    .and_then(|()| Loop::set_up(front, limits, first_queue, inbox, wake_read));
                match set_up {
                    Ok(mut lp) => {
                        let _ = ready_tx.send(Ok(lp.queue));
                        lp.run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|source| FrontError::Spawn {
                command: "the queue thread".into(),
                source,
            })?;
        let queue = match ready.recv_timeout(ANSWER_WAIT) {
            Ok(Ok(queue)) => queue,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                return Err(FrontError::Holder {
                    what: "did not start",
                });
            }
        };
        let steps = u32::try_from(limits.max_datagrams.div_ceil(limits.release_batch.max(1)))
            .unwrap_or(u32::MAX);
        Ok(Self {
            commands,
            waker,
            thread: Some(thread),
            queue,
            release_wait: ANSWER_WAIT.saturating_add(limits.release_interval.saturating_mul(steps)),
        })
    }

    pub(crate) fn queue(&self) -> u16 {
        self.queue
    }

    fn ask<T>(
        &self,
        wait: Duration,
        make: impl FnOnce(mpsc::Sender<T>) -> Command,
    ) -> Result<T, FrontError> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send(make(tx))
            .map_err(|_| FrontError::Holder { what: "is gone" })?;
        // A full pipe already wakes the thread: the error is not needed.
        let _ = write(&self.waker, &[1]);
        rx.recv_timeout(wait).map_err(|_| FrontError::Holder {
            what: "did not answer",
        })
    }

    /// Starts holding; false when a hold runs.
    pub(crate) fn hold(&self) -> Result<bool, FrontError> {
        self.ask(ANSWER_WAIT, Command::Hold)
    }

    /// Ends the hold: the held datagrams are delivered in order, in paced steps; returns when
    /// the last is out. `None` when no hold ran.
    pub(crate) fn release(&self) -> Result<Option<HoldStats>, FrontError> {
        self.ask(self.release_wait, Command::Release)
    }

    /// Releases a hold, lets through what is still queued, ends the thread.
    pub(crate) fn stop(&mut self) -> Result<(), FrontError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let asked = self.ask(self.release_wait, Command::Stop);
        let joined = thread
            .join()
            .map_err(|_| FrontError::Holder { what: "panicked" });
        asked.and(joined)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!("udp-shim-front: stopping the queue thread: {e}");
        }
    }
}

/// The thread's state.
struct Loop {
    netlink: OwnedFd,
    /// Holds the front port while the front lives.
    _reservation: OwnedFd,
    wake: OwnedFd,
    inbox: mpsc::Receiver<Command>,
    queue: u16,
    book: Book,
    buf: Vec<u8>,
    kernel_at_hold: KernelCounters,
    /// The caller of a release, answered when its last step is out.
    pending: Option<mpsc::Sender<Option<HoldStats>>>,
}

impl Loop {
    fn set_up(
        front: SocketAddrV4,
        limits: HoldLimits,
        first_queue: u16,
        inbox: mpsc::Receiver<Command>,
        wake: OwnedFd,
    ) -> Result<Self, FrontError> {
        let reservation = reserve(front)?;
        let queue_err = |what: &str, e: Errno| FrontError::Queue {
            what: what.to_owned(),
            source: e.into(),
        };
        let netlink = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(|e| queue_err("netlink socket", e))?;
        bind(netlink.as_raw_fd(), &NetlinkAddr::new(0, 0))
            .map_err(|e| queue_err("bind netlink socket", e))?;
        if let Err(e) = setsockopt(&netlink, sockopt::RcvBufForce, &RCVBUF) {
            tracing::warn!("udp-shim-front: SO_RCVBUFFORCE {RCVBUF}: {e}");
        }
        let max_len = u32::try_from(limits.max_datagrams)
            .unwrap_or(u32::MAX)
            .saturating_add(KERNEL_SLACK);
        let mut lp = Self {
            netlink,
            _reservation: reservation,
            wake,
            inbox,
            queue: 0,
            book: Book::new(limits),
            buf: vec![0; 65536],
            kernel_at_hold: KernelCounters::default(),
            pending: None,
        };
        let mut last = None;
        for step in 0..QUEUE_TRIES {
            let queue = first_queue.wrapping_add(step);
            let seq = u32::from(step) + 1;
            lp.send(&nfqueue::bind_config(seq, queue, COPY_RANGE, max_len))
                .map_err(|e| queue_err("send the queue's configuration", e))?;
            match lp.answer(seq)? {
                0 => {
                    lp.queue = queue;
                    return Ok(lp);
                }
                // Bound by another socket: try the next number.
                errno if errno == Errno::EBUSY as i32 => last = Some(queue),
                errno => {
                    return Err(queue_err(
                        &format!("bind queue {queue}"),
                        Errno::from_raw(errno),
                    ));
                }
            }
        }
        Err(FrontError::Queue {
            what: format!(
                "queues {first_queue}..={} are all bound by other sockets",
                last.unwrap_or(first_queue)
            ),
            source: io::Error::from(io::ErrorKind::AddrInUse),
        })
    }

    /// Waits for the answer to request `seq` (no packet can arrive before the queue is
    /// bound and a rule sends it some).
    fn answer(&mut self, seq: u32) -> Result<i32, FrontError> {
        let deadline = Instant::now() + ANSWER_WAIT;
        loop {
            let n = match recv(self.netlink.as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(FrontError::Queue {
                            what: "no answer from the kernel to the queue's configuration".into(),
                            source: io::Error::from(io::ErrorKind::TimedOut),
                        });
                    }
                    let mut fds = [PollFd::new(self.netlink.as_fd(), PollFlags::POLLIN)];
                    let _ = poll(&mut fds, timeout(Some(left)));
                    continue;
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(FrontError::Queue {
                        what: "read the queue's answer".into(),
                        source: e.into(),
                    });
                }
            };
            let answer = self.buf.get(..n).map(nfqueue::parse).unwrap_or_default();
            for incoming in answer.into_iter().flatten() {
                if let Incoming::Answer { seq: s, errno } = incoming
                    && s == seq
                {
                    return Ok(errno);
                }
            }
        }
    }

    fn send(&self, message: &[u8]) -> Result<(), Errno> {
        loop {
            match send(self.netlink.as_raw_fd(), message, MsgFlags::empty()) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn verdict(&mut self, message: &[u8]) {
        if let Err(e) = self.send(message) {
            tracing::warn!("udp-shim-front: verdict on queue {}: {e}", self.queue);
            self.book.count_error();
        }
    }

    fn run(&mut self) {
        loop {
            let wait = self
                .book
                .next_deadline()
                .map(|d| d.saturating_duration_since(Instant::now()));
            let mut fds = [
                PollFd::new(self.netlink.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, timeout(wait)) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!("udp-shim-front: poll: {e}; the queue thread stops");
                    return;
                }
            }
            self.drain();
            self.expire();
            self.steps();
            let mut byte = [0u8; 64];
            while matches!(read(&self.wake, &mut byte), Ok(n) if n > 0) {}
            while let Ok(command) = self.inbox.try_recv() {
                match command {
                    Command::Hold(reply) => {
                        let started = self.book.start(Instant::now());
                        if started {
                            self.kernel_at_hold = self.kernel_counters();
                        }
                        let _ = reply.send(started);
                    }
                    Command::Release(reply) => {
                        // What arrived before the release is part of the hold.
                        self.drain();
                        if self.book.release(Instant::now()) {
                            self.pending = Some(reply);
                            self.steps();
                        } else {
                            let _ = reply.send(None);
                        }
                    }
                    Command::Stop(reply) => {
                        self.drain();
                        if let Some(last) = self.book.step_all(Instant::now()) {
                            self.verdict(&nfqueue::verdict_batch(
                                self.queue,
                                last,
                                Verdict::Accept,
                            ));
                        }
                        self.finish();
                        self.let_through_until_quiet();
                        let _ = reply.send(());
                        return;
                    }
                }
            }
        }
    }

    /// Reads every message waiting on the socket and decides each packet.
    fn drain(&mut self) -> usize {
        let mut packets = 0;
        loop {
            let n = match recv(self.netlink.as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => return packets,
                Err(Errno::EINTR) => continue,
                // The kernel could not queue some packet messages to this socket; it dropped
                // those packets and counts them (`queue_user_dropped`), read at release.
                Err(Errno::ENOBUFS) => continue,
                Err(e) => {
                    tracing::warn!("udp-shim-front: read queue {}: {e}", self.queue);
                    self.book.count_error();
                    return packets;
                }
            };
            let messages = self.buf.get(..n).map(nfqueue::parse).unwrap_or_default();
            for message in messages {
                match message {
                    Ok(Incoming::Packet(p)) => {
                        packets += 1;
                        match self.book.on_packet(p.id, p.len, Instant::now()) {
                            Decision::Hold => {}
                            Decision::Accept => {
                                self.verdict(&nfqueue::verdict(self.queue, p.id, Verdict::Accept));
                            }
                            Decision::Drop => {
                                self.verdict(&nfqueue::verdict(self.queue, p.id, Verdict::Drop));
                            }
                        }
                    }
                    // A refused verdict (e.g. an id the kernel no longer has).
                    Ok(Incoming::Answer { errno, .. }) if errno != 0 => self.book.count_error(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!("udp-shim-front: queue {}: {e}", self.queue);
                        self.book.count_error();
                    }
                }
            }
        }
    }

    fn expire(&mut self) {
        for id in self.book.expire(Instant::now()) {
            self.verdict(&nfqueue::verdict(self.queue, id, Verdict::Drop));
        }
    }

    /// Carries out the release step due now, and answers the release once nothing is left.
    fn steps(&mut self) {
        if let Some(last) = self.book.step(Instant::now()) {
            self.verdict(&nfqueue::verdict_batch(self.queue, last, Verdict::Accept));
        }
        self.finish();
    }

    fn finish(&mut self) {
        let Some(mut stats) = self.book.finished(Instant::now()) else {
            return;
        };
        let now = self.kernel_counters();
        let before = self.kernel_at_hold;
        stats.dropped_in_kernel = (now.queue_dropped + now.user_dropped)
            .saturating_sub(before.queue_dropped + before.user_dropped);
        if let Some(reply) = self.pending.take() {
            let _ = reply.send(Some(stats));
        }
    }

    /// Lets through whatever is still queued until nothing came for [`STOP_QUIET`].
    fn let_through_until_quiet(&mut self) {
        let deadline = Instant::now() + ANSWER_WAIT;
        while Instant::now() < deadline {
            let mut fds = [PollFd::new(self.netlink.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout(Some(STOP_QUIET))) {
                Ok(0) => return,
                Ok(_) | Err(Errno::EINTR) => {
                    self.drain();
                }
                Err(_) => return,
            }
        }
    }

    /// The kernel's counters of this queue, from the thread's namespace; zeros if unreadable.
    fn kernel_counters(&self) -> KernelCounters {
        std::fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_queue")
            .ok()
            .and_then(|text| nfqueue::kernel_counters(&text, self.queue))
            .unwrap_or_default()
    }
}

/// A poll timeout rounded up to whole milliseconds; `None` waits for ever.
fn timeout(wait: Option<Duration>) -> PollTimeout {
    match wait {
        None => PollTimeout::NONE,
        Some(d) => {
            let ms = d.as_micros().div_ceil(1000);
            PollTimeout::try_from(ms.min(i32::MAX as u128)).unwrap_or(PollTimeout::MAX)
        }
    }
}

/// Binds a UDP socket to `front` with `IP_FREEBIND` (the address need not be local): fails
/// when a socket has the port on that address or on the wildcard address.
fn reserve(front: SocketAddrV4) -> Result<OwnedFd, FrontError> {
    let socket_err = |what: &str, e: Errno| FrontError::Queue {
        what: format!("{what} (the front port's reservation)"),
        source: e.into(),
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| socket_err("UDP socket", e))?;
    setsockopt(&fd, sockopt::IpFreebind, &true).map_err(|e| socket_err("IP_FREEBIND", e))?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(front)).map_err(|e| FrontError::PortInUse {
        front,
        source: e.into(),
    })?;
    Ok(fd)
}
