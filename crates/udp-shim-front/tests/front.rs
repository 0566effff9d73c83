//! A front in real network namespaces with real UDP sockets (root only).
//!
//! ```text
//!   client ns (10.77.0.2) ──vc── host ns: front 10.77.0.1:9000, the rules, forwarding
//!                                  ├──va── backend A ns (10.77.1.2), echo on 0.0.0.0:4242
//!                                  └──vb── backend B ns (10.77.2.2), echo on 0.0.0.0:4242
//! ```
//!
//! Every test makes its own four namespaces (`qlm-front-t<pid>-<n><h|c|a|b>`, linked only to
//! each other, so the same addresses serve every test) and a guard deletes them, also when
//! the test fails. Every wait is bounded.

// Test helpers outside #[test] functions: clippy's allow-unwrap-in-tests does not reach them.
#![allow(clippy::unwrap_used)]

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};
use udp_shim_front::{Front, FrontError, FrontSpec, HoldLimits, Tools};

const FRONT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 9000);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const BACKEND_A: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 77, 1, 2), 4242);
const BACKEND_B: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 77, 2, 2), 4242);
/// How long a reply may take.
const REPLY_WAIT: Duration = Duration::from_secs(2);

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn tool_present(name: &str) -> bool {
    Command::new(name).arg("--version").output().is_ok()
}

/// Root, nft and iptables-nft, or skip (fail in CI).
fn ready() -> bool {
    test_support::require(
        "needs root, nft (Debian: nftables) and iptables-nft (Debian: iptables)",
        test_support::is_root() && tool_present("nft") && tool_present("iptables-nft"),
    )
}

/// The four namespaces; dropping deletes them.
struct Topo {
    base: String,
}

impl Topo {
    fn create() -> Self {
        let base = format!(
            "qlm-front-t{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let topo = Self { base };
        topo.build().expect("building the test namespaces");
        topo
    }

    fn build(&self) -> Result<(), String> {
        for n in ["h", "c", "a", "b"] {
            sh(&["ip", "netns", "add", &self.name(n)])?;
            sh(&["ip", "-n", &self.name(n), "link", "set", "lo", "up"])?;
        }
        let h = self.name("h");
        for (i, n) in ["c", "a", "b"].iter().enumerate() {
            let inner = self.name(n);
            let veth = format!("v{n}");
            sh(&[
                "ip", "-n", &h, "link", "add", &veth, "type", "veth", "peer", "name", "eth0",
                "netns", &inner,
            ])?;
            sh(&[
                "ip",
                "-n",
                &h,
                "addr",
                "add",
                &format!("10.77.{i}.1/24"),
                "dev",
                &veth,
            ])?;
            sh(&["ip", "-n", &h, "link", "set", &veth, "up"])?;
            sh(&[
                "ip",
                "-n",
                &inner,
                "addr",
                "add",
                &format!("10.77.{i}.2/24"),
                "dev",
                "eth0",
            ])?;
            sh(&["ip", "-n", &inner, "link", "set", "eth0", "up"])?;
            sh(&[
                "ip",
                "-n",
                &inner,
                "route",
                "add",
                "default",
                "via",
                &format!("10.77.{i}.1"),
            ])?;
        }
        self.forwarding(true)
    }

    fn forwarding(&self, on: bool) -> Result<(), String> {
        let value = format!("net.ipv4.ip_forward={}", u8::from(on));
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.name("h"),
            "sysctl",
            "-qw",
            &value,
        ])
        .map(drop)
    }

    fn name(&self, n: &str) -> String {
        format!("{}{n}", self.base)
    }

    fn path(&self, n: &str) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name(n)))
    }

    fn spec(&self, name: &str) -> FrontSpec {
        FrontSpec {
            netns: Some(self.path("h")),
            ..FrontSpec::new(name, FRONT, BACKEND_A)
        }
    }

    /// Runs a command in the host namespace.
    fn in_host(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["ip", "netns", "exec"];
        let h = self.name("h");
        all.push(&h);
        all.extend_from_slice(args);
        sh(&all)
    }

    /// `nft list tables` and the iptables raw table of the host namespace, for "nothing left".
    fn leftovers(&self) -> String {
        let tables = self
            .in_host(&["nft", "list", "tables"])
            .unwrap_or_else(|e| e);
        let raw = self
            .in_host(&["iptables-nft", "-t", "raw", "-S"])
            .unwrap_or_else(|e| e);
        let raw: Vec<&str> = raw.lines().filter(|l| !l.starts_with("-P ")).collect();
        format!("{}{}", tables.trim(), raw.join("\n"))
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        for n in ["h", "c", "a", "b"] {
            let _ = sh(&["ip", "netns", "del", &self.name(n)]);
        }
    }
}

/// A UDP socket bound to `addr` inside the namespace at `path`.
fn udp_in(path: &Path, addr: SocketAddrV4) -> std::io::Result<UdpSocket> {
    let ns = File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(&ns, CloneFlags::CLONE_NEWNET)?;
            UdpSocket::bind(addr)
        })
        .join()
        .expect("bind thread")
    })
}

/// What an echo server received, and from whom.
type Seen = Arc<Mutex<Vec<(Vec<u8>, SocketAddr)>>>;

/// A UDP echo server on 0.0.0.0:4242 in a backend namespace: answers `<tag>:<payload>` and
/// records what it received and from whom.
struct Echo {
    seen: Seen,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start(path: &Path, tag: &'static str) -> Self {
        let socket = udp_in(path, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 4242)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let seen: Seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    seen2.lock().unwrap().push((buf[..n].to_vec(), from));
                    let reply = [tag.as_bytes(), b":", &buf[..n]].concat();
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        Self {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn payloads(&self) -> Vec<Vec<u8>> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.seen.lock().unwrap().iter().map(|(_, a)| *a).collect()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The client's socket, in the client namespace.
fn client(topo: &Topo) -> UdpSocket {
    let socket = udp_in(&topo.path("c"), SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    socket.set_read_timeout(Some(REPLY_WAIT)).unwrap();
    socket
}

/// Receives one reply; checks that it came from the front address.
fn reply(socket: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = [0u8; 2048];
    let (n, from) = socket.recv_from(&mut buf).ok()?;
    assert_eq!(
        from,
        SocketAddr::V4(FRONT),
        "a reply must come from the front address"
    );
    Some(buf[..n].to_vec())
}

fn numbered(i: u32, size: usize) -> Vec<u8> {
    let mut p = format!("{i:06}").into_bytes();
    p.resize(size.max(6), b'.');
    p
}

fn number(payload: &[u8]) -> u32 {
    std::str::from_utf8(&payload[..6]).unwrap().parse().unwrap()
}

/// Sends `i` and expects `<tag>:<i>` back from the front.
fn round_trip(socket: &UdpSocket, i: u32, tag: &str) {
    socket.send_to(&numbered(i, 6), FRONT).unwrap();
    let got = reply(socket).unwrap_or_else(|| panic!("no reply to {i} (expected from {tag})"));
    assert_eq!(got, format!("{tag}:{i:06}").into_bytes());
}

/// Nothing arrives within `wait`.
fn silent(socket: &UdpSocket, wait: Duration) -> bool {
    socket.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 2048];
    let quiet = socket.recv_from(&mut buf).is_err();
    socket.set_read_timeout(Some(REPLY_WAIT)).unwrap();
    quiet
}

#[test]
fn the_clients_view_of_the_server_stays_the_front_across_switches() {
    if !ready() {
        return;
    }
    let topo = Topo::create();
    let a = Echo::start(&topo.path("a"), "A");
    let b = Echo::start(&topo.path("b"), "B");
    let mut front = Front::create(topo.spec("keep")).unwrap();
    let c = client(&topo);
    for i in 0..5 {
        round_trip(&c, i, "A");
    }
    front.switch(BACKEND_B).unwrap();
    assert_eq!(front.backend(), BACKEND_B);
    for i in 5..10 {
        round_trip(&c, i, "B");
    }
    front.switch(BACKEND_A).unwrap();
    for i in 10..15 {
        round_trip(&c, i, "A");
    }
    // The backends see the client's own address: the NAT rewrites only the server's side.
    let local_port = c.local_addr().unwrap().port();
    let client = SocketAddr::V4(SocketAddrV4::new(CLIENT_IP, local_port));
    assert!(
        a.peers()
            .iter()
            .chain(b.peers().iter())
            .all(|p| *p == client)
    );
    assert_eq!(a.payloads().len(), 10);
    assert_eq!(b.payloads().len(), 5);
    front.close().unwrap();
    assert_eq!(topo.leftovers(), "");
}

#[test]
fn datagrams_held_during_a_move_reach_the_new_backend_in_order() {
    if !ready() {
        return;
    }
    let topo = Topo::create();
    let a = Echo::start(&topo.path("a"), "A");
    let b = Echo::start(&topo.path("b"), "B");
    let mut front = Front::create(topo.spec("order")).unwrap();
    let c = client(&topo);
    round_trip(&c, 0, "A");
    front.hold().unwrap();
    assert!(matches!(
        front.hold(),
        Err(FrontError::AlreadyHolding { .. })
    ));
    // A's process would be frozen now; the front points at B before it is restored.
    front.switch(BACKEND_B).unwrap();
    for i in 1..=50 {
        c.send_to(&numbered(i, 100), FRONT).unwrap();
    }
    assert!(
        silent(&c, Duration::from_millis(300)),
        "nothing may be answered during the hold"
    );
    assert_eq!(a.payloads().len(), 1, "A got a held datagram");
    assert!(
        b.payloads().is_empty(),
        "B got a datagram before the release"
    );
    let stats = front.release().unwrap();
    assert_eq!((stats.held, stats.delivered), (50, 50), "{stats:?}");
    assert_eq!(
        stats.dropped_bytes_bound + stats.dropped_datagrams_bound + stats.dropped_time_bound,
        0
    );
    assert!(stats.held_for >= Duration::from_millis(300));
    let mut replies = Vec::new();
    while replies.len() < 50 {
        replies.push(reply(&c).expect("a reply to a held datagram"));
    }
    let at_b: Vec<u32> = b.payloads().iter().map(|p| number(p)).collect();
    assert_eq!(at_b, (1..=50).collect::<Vec<_>>(), "B got them in order");
    assert!(replies.iter().all(|r| r.starts_with(b"B:")));
    assert!(matches!(
        front.release(),
        Err(FrontError::NotHolding { .. })
    ));
    // After the release, datagrams go straight to B.
    round_trip(&c, 51, "B");
    drop(front);
    assert_eq!(topo.leftovers(), "");
}

/// Holds, sends `count` datagrams of `size` bytes (`pause` after the first `split`), releases.
fn bounded_hold(
    limits: HoldLimits,
    count: u32,
    size: usize,
    split: u32,
    pause: Duration,
) -> (udp_shim_front::HoldStats, Vec<u32>) {
    let topo = Topo::create();
    let b = Echo::start(&topo.path("b"), "B");
    let mut front = Front::create(FrontSpec {
        hold_limits: limits,
        ..topo.spec("bounds")
    })
    .unwrap();
    let c = client(&topo);
    front.hold().unwrap();
    front.switch(BACKEND_B).unwrap();
    for i in 0..count {
        if i == split {
            std::thread::sleep(pause);
        }
        c.send_to(&numbered(i, size), FRONT).unwrap();
    }
    // Let the holder read them all before the release.
    std::thread::sleep(Duration::from_millis(100));
    let stats = front.release().unwrap();
    let deadline = Instant::now() + REPLY_WAIT;
    while b.payloads().len() < stats.delivered as usize && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Nothing more comes.
    std::thread::sleep(Duration::from_millis(50));
    let at_b = b.payloads().iter().map(|p| number(p)).collect();
    drop(front);
    assert_eq!(topo.leftovers(), "");
    (stats, at_b)
}

#[test]
fn the_datagram_bound_drops_and_counts() {
    if !ready() {
        return;
    }
    let limits = HoldLimits {
        max_datagrams: 10,
        ..HoldLimits::default()
    };
    let (stats, at_b) = bounded_hold(limits, 30, 100, 0, Duration::ZERO);
    assert_eq!(
        (stats.held, stats.delivered, stats.dropped_datagrams_bound),
        (10, 10, 20),
        "{stats:?}"
    );
    assert_eq!(stats.peak_datagrams, 10);
    assert_eq!(at_b, (0..10).collect::<Vec<_>>());
}

#[test]
fn the_byte_bound_drops_and_counts() {
    if !ready() {
        return;
    }
    // 1000 bytes of payload + 8 (UDP) + 20 (IPv4) = 1028 bytes per datagram: 3 fit.
    let limits = HoldLimits {
        max_bytes: 3 * 1028 + 500,
        ..HoldLimits::default()
    };
    let (stats, at_b) = bounded_hold(limits, 8, 1000, 0, Duration::ZERO);
    assert_eq!(
        (stats.held, stats.delivered, stats.dropped_bytes_bound),
        (3, 3, 5),
        "{stats:?}"
    );
    assert_eq!(stats.peak_bytes, 3 * 1028);
    assert_eq!(at_b, vec![0, 1, 2]);
}

#[test]
fn the_time_bound_drops_and_counts() {
    if !ready() {
        return;
    }
    let limits = HoldLimits {
        max_hold: Duration::from_millis(150),
        ..HoldLimits::default()
    };
    // 5 datagrams, 400 ms, 3 more, then the release (100 ms later): the first 5 expired.
    let (stats, at_b) = bounded_hold(limits, 8, 100, 5, Duration::from_millis(400));
    assert_eq!(
        (stats.held, stats.delivered, stats.dropped_time_bound),
        (8, 3, 5),
        "{stats:?}"
    );
    assert_eq!(at_b, vec![5, 6, 7]);
}

#[test]
fn a_flood_during_a_hold_stays_bounded() {
    if !ready() {
        return;
    }
    let topo = Topo::create();
    let b = Echo::start(&topo.path("b"), "B");
    let limits = HoldLimits {
        max_datagrams: 200,
        max_bytes: 1 << 20,
        max_hold: Duration::from_secs(10),
        ..HoldLimits::default()
    };
    let mut front = Front::create(FrontSpec {
        hold_limits: limits,
        ..topo.spec("flood")
    })
    .unwrap();
    let queue = front.queue_number().unwrap();
    let c = client(&topo);
    front.hold().unwrap();
    front.switch(BACKEND_B).unwrap();
    let sent = 20_000u32;
    let mut kernel_peak = 0u64;
    for i in 0..sent {
        c.send_to(&numbered(i, 200), FRONT).unwrap();
        if i % 2000 == 1999 {
            kernel_peak = kernel_peak.max(kernel_queue_total(&topo, queue));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    kernel_peak = kernel_peak.max(kernel_queue_total(&topo, queue));
    let stats = front.release().unwrap();
    println!("flood of {sent}: {stats:?}, kernel queue peak {kernel_peak}");
    assert_eq!(stats.held, 200, "{stats:?}");
    assert_eq!(stats.peak_datagrams, 200);
    // The kernel keeps at most what the holder holds plus what it has not read yet.
    assert!(kernel_peak <= 200 + 1024, "kernel queue {kernel_peak}");
    let accounted = stats.held
        + stats.dropped_datagrams_bound
        + stats.dropped_bytes_bound
        + stats.dropped_in_kernel;
    assert!(accounted <= u64::from(sent), "{accounted} > {sent}");
    let deadline = Instant::now() + REPLY_WAIT;
    while b.payloads().len() < 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let at_b: Vec<u32> = b.payloads().iter().map(|p| number(p)).collect();
    assert_eq!(
        at_b,
        (0..200).collect::<Vec<_>>(),
        "the first 200, in order"
    );
}

/// `queue_total` of `queue` in the host namespace's `/proc/net/netfilter/nfnetlink_queue`.
fn kernel_queue_total(topo: &Topo, queue: u16) -> u64 {
    let text = topo
        .in_host(&["cat", "/proc/net/netfilter/nfnetlink_queue"])
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            (f.first() == Some(&u64::from(queue))).then(|| f.get(2).copied().unwrap_or(0))
        })
        .next()
        .unwrap_or(0)
}

#[test]
fn refusals_are_typed_and_leave_nothing() {
    if !ready() {
        return;
    }
    let topo = Topo::create();
    let h = topo.path("h");

    // A socket on the front address, then one on the wildcard address with that port.
    for addr in [
        FRONT,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, FRONT.port()),
    ] {
        let taken = udp_in(&h, addr).unwrap();
        let err = Front::create(topo.spec("taken")).unwrap_err();
        assert!(matches!(err, FrontError::PortInUse { .. }), "{err}");
        drop(taken);
        assert_eq!(topo.leftovers(), "");
    }

    // Another front on the same address, or with the same name.
    let first = Front::create(topo.spec("first")).unwrap();
    let err = Front::create(topo.spec("second")).unwrap_err();
    assert!(matches!(err, FrontError::FrontTaken { .. }), "{err}");
    let other = SocketAddrV4::new(*FRONT.ip(), 9001);
    let err = Front::create(FrontSpec {
        front: other,
        ..topo.spec("first")
    })
    .unwrap_err();
    assert!(matches!(err, FrontError::NameTaken { .. }), "{err}");
    // The same address on another port is another front.
    let second = Front::create(FrontSpec {
        front: other,
        ..topo.spec("second")
    })
    .unwrap();
    assert_ne!(first.queue_number(), second.queue_number());
    drop(second);
    first.close().unwrap();
    assert_eq!(topo.leftovers(), "");

    // Missing tools.
    for (tools, tool) in [
        (
            Tools {
                nft: PathBuf::from("/nonexistent/nft"),
                ..Tools::default()
            },
            "nft",
        ),
        (
            Tools {
                iptables: PathBuf::from("/nonexistent/iptables-nft"),
                ..Tools::default()
            },
            "iptables-nft",
        ),
    ] {
        let err = Front::create(FrontSpec {
            tools,
            ..topo.spec("tools")
        })
        .unwrap_err();
        match &err {
            FrontError::ToolMissing { tool: t, .. } => assert_eq!(*t, tool),
            other => panic!("expected ToolMissing for {tool}, got {other}"),
        }
        assert!(err.to_string().contains("not found"), "{err}");
    }
    // A tool that is there but not what it claims: its stderr is in the error.
    let err = Front::create(FrontSpec {
        tools: Tools {
            nft: PathBuf::from("false"),
            ..Tools::default()
        },
        ..topo.spec("tools")
    })
    .unwrap_err();
    assert!(matches!(err, FrontError::Command { .. }), "{err}");

    // Forwarding off.
    topo.forwarding(false).unwrap();
    let err = Front::create(topo.spec("fwd")).unwrap_err();
    assert!(matches!(err, FrontError::ForwardingOff { .. }), "{err}");
    topo.forwarding(true).unwrap();

    // A kernel refusal reaches the caller with nft's stderr: a backend switch on a table
    // that someone else removed.
    let mut front = Front::create(topo.spec("gone")).unwrap();
    topo.in_host(&["nft", "delete", "table", "ip", "qlm_front_gone"])
        .unwrap();
    match front.switch(BACKEND_B).unwrap_err() {
        FrontError::Command { stderr, .. } => assert!(!stderr.is_empty()),
        other => panic!("expected a command error, got {other}"),
    }
    drop(front);
    assert_eq!(topo.leftovers(), "");
    // The port is free again.
    drop(udp_in(&h, FRONT).unwrap());
}

#[test]
fn a_detached_front_serves_without_a_process_and_is_taken_over() {
    if !ready() {
        return;
    }
    let topo = Topo::create();
    let _a = Echo::start(&topo.path("a"), "A");
    let b = Echo::start(&topo.path("b"), "B");
    let record = Front::create(topo.spec("detach"))
        .unwrap()
        .detach()
        .unwrap();
    assert_eq!(record.backend, BACKEND_A);
    assert_ne!(topo.leftovers(), "", "a detached front's rules stay");
    let c = client(&topo);
    round_trip(&c, 0, "A");
    // Taken over by another owner: hold, switch, release as usual.
    let mut front = Front::attach(
        record.clone(),
        udp_shim_front::HoldLimits::default(),
        topo.spec("detach").tools,
    )
    .unwrap();
    front.hold().unwrap();
    front.switch(BACKEND_B).unwrap();
    for i in 1..=5 {
        c.send_to(&numbered(i, 100), FRONT).unwrap();
    }
    assert!(silent(&c, Duration::from_millis(100)));
    let stats = front.release().unwrap();
    assert_eq!((stats.held, stats.delivered), (5, 5), "{stats:?}");
    for _ in 1..=5 {
        assert!(reply(&c).is_some_and(|r| r.starts_with(b"B:")));
    }
    let at_b: Vec<u32> = b.payloads().iter().map(|p| number(p)).collect();
    assert_eq!(at_b, (1..=5).collect::<Vec<_>>());
    // Detached again, it remembers the new backend.
    let record = front.detach().unwrap();
    assert_eq!(record.backend, BACKEND_B);
    round_trip(&c, 6, "B");
    // A record whose front is another address is refused, and so is one whose rules went.
    let mut wrong = record.clone();
    wrong.front = std::net::SocketAddrV4::new(*FRONT.ip(), FRONT.port() + 1);
    let tools = topo.spec("detach").tools;
    assert!(matches!(
        Front::attach(wrong, udp_shim_front::HoldLimits::default(), tools.clone()),
        Err(FrontError::Gone { .. })
    ));
    Front::attach(
        record.clone(),
        udp_shim_front::HoldLimits::default(),
        tools.clone(),
    )
    .unwrap()
    .close()
    .unwrap();
    assert_eq!(topo.leftovers(), "");
    assert!(matches!(
        Front::attach(record, udp_shim_front::HoldLimits::default(), tools),
        Err(FrontError::Gone { .. })
    ));
}

#[test]
fn dropping_a_holding_front_leaves_nothing() {
    if !ready() {
        return;
    }
    let topo = Topo::create();
    let b = Echo::start(&topo.path("b"), "B");
    let mut front = Front::create(topo.spec("drop")).unwrap();
    let c = client(&topo);
    front.hold().unwrap();
    front.switch(BACKEND_B).unwrap();
    c.send_to(&numbered(7, 10), FRONT).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let listed = topo.in_host(&["nft", "list", "ruleset"]).unwrap();
    assert!(listed.contains("qlm_front_drop") && listed.contains("QLM_FRONT_drop"));
    drop(front);
    assert_eq!(topo.leftovers(), "");
    // The held datagram was delivered on the way out.
    assert_eq!(reply(&c).unwrap(), b"B:000007....".to_vec());
    assert_eq!(b.payloads().len(), 1);
    drop(udp_in(&topo.path("h"), FRONT).unwrap());
}

#[test]
fn leftovers_of_a_front_whose_process_died_are_removed() {
    if !ready() {
        return;
    }
    let topo = Topo::create();
    let mut front = Front::create(topo.spec("dead")).unwrap();
    front.hold().unwrap();
    // The process "dies": its rules stay (its queue thread lives on in this test process,
    // as a dead process's queue would be gone; --queue-bypass lets datagrams through then).
    std::mem::forget(front);
    assert_ne!(topo.leftovers(), "");
    Front::remove_leftovers("dead", Some(&topo.path("h")), &Tools::default()).unwrap();
    assert!(!topo.leftovers().contains("dead"), "{}", topo.leftovers());
    // Nothing there: not an error.
    Front::remove_leftovers("dead", Some(&topo.path("h")), &Tools::default()).unwrap();
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// `cargo test -p udp-shim-front --release -- --ignored --nocapture hold_latency`
#[test]
#[ignore = "a measurement: prints the latency hold/release adds"]
fn hold_latency() {
    if !ready() {
        return;
    }
    let topo = Topo::create();
    let _a = Echo::start(&topo.path("a"), "A");
    let _b = Echo::start(&topo.path("b"), "B");
    let mut front = Front::create(topo.spec("lat")).unwrap();
    let c = client(&topo);
    let n = 41;
    let (mut rtt, mut hold, mut switch, mut release, mut first) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut tag = "A";
    for i in 0..n {
        let t = Instant::now();
        round_trip(&c, i, tag);
        rtt.push(t.elapsed());
        let t = Instant::now();
        front.hold().unwrap();
        hold.push(t.elapsed());
        c.send_to(&numbered(1000 + i, 6), FRONT).unwrap();
        let (next, backend) = if tag == "A" {
            ("B", BACKEND_B)
        } else {
            ("A", BACKEND_A)
        };
        let t = Instant::now();
        front.switch(backend).unwrap();
        switch.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(20));
        let listener = c.try_clone().unwrap();
        let arrival = std::thread::spawn(move || reply(&listener).map(|r| (r, Instant::now())));
        let t = Instant::now();
        let stats = front.release().unwrap();
        release.push(t.elapsed());
        let (got, at) = arrival.join().unwrap().unwrap();
        first.push(at - t);
        assert_eq!(stats.delivered, 1);
        assert_eq!(got, format!("{next}:{:06}", 1000 + i).into_bytes());
        tag = next;
    }
    println!(
        "medians over {n}: round trip through the front {:?}; hold() {:?}; switch() {:?}; \
         release() {:?}; release() start to the held datagram's reply {:?}",
        median(rtt),
        median(hold),
        median(switch),
        median(release),
        median(first)
    );
}
