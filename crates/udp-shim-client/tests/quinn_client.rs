//! The client shim against real quinn servers on loopback.

// A test crate: helpers outside #[test] fns unwrap too, a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::Arc,
    time::Duration,
};

use test_support::{Accepted, Echo, TEST_LIMIT, configs, eventually, spawn_echo_server};
use udp_shim_client::{
    Confirmation, MoveError, MoveOutcome, OverlapLimits, SwappableUdp, client_endpoint,
};

fn any_localhost() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

struct Setup {
    server: quinn::Endpoint,
    accepted: Accepted,
    shim: Arc<SwappableUdp>,
    client: quinn::Endpoint,
    connection: quinn::Connection,
}

async fn connect() -> Setup {
    let (server_config, client_config) = configs(b"echo").unwrap();
    let server = quinn::Endpoint::server(server_config, any_localhost()).unwrap();
    let accepted = spawn_echo_server(server.clone());
    let shim = Arc::new(SwappableUdp::bind(any_localhost(), server.local_addr().unwrap()).unwrap());
    let client = client_endpoint(shim.clone()).unwrap();
    let connection = client
        .connect_with(client_config, shim.fake_peer(), "localhost")
        .unwrap()
        .await
        .unwrap();
    assert_eq!(connection.remote_address(), shim.fake_peer());
    Setup {
        server,
        accepted,
        shim,
        client,
        connection,
    }
}

/// A plain quinn server moves to another port (quinn's own `rebind`); the client follows with
/// `set_peer` and quinn never notices. A plain quinn server has no control stream, so the test
/// stands in for the wrapper's authenticated `Resumed` and vouches for the new address.
#[tokio::test]
async fn follows_a_moved_server() {
    tokio::time::timeout(TEST_LIMIT, async {
        let s = connect().await;
        let id = s.connection.stable_id();
        let mut echo = Echo::open(&s.connection).await.unwrap();
        echo.rounds(3).await.unwrap();

        let new_socket = UdpSocket::bind(any_localhost()).unwrap();
        let new_addr = new_socket.local_addr().unwrap();
        let old = s.shim.set_peer(new_addr).unwrap();
        assert_eq!(old, s.server.local_addr().unwrap());
        s.server.rebind(new_socket).unwrap();
        echo.rounds(3).await.unwrap();
        assert_eq!(
            s.shim.previous_peer(),
            Some(old),
            "only a vouch ends the overlap"
        );
        assert_eq!(
            s.shim.confirm_peer(new_addr).unwrap(),
            Confirmation::Confirmed
        );
        assert_eq!(s.shim.previous_peer(), None);
        echo.rounds(2).await.unwrap();

        assert_eq!(s.connection.stable_id(), id);
        assert!(s.connection.close_reason().is_none());
        assert_eq!(s.accepted.lock().unwrap().len(), 1);
        let stats = s.shim.stats();
        assert_eq!(stats.swaps, 1);
        assert_eq!(stats.confirmations, 1);
        assert!(stats.received > 0 && stats.sent > 0, "{stats:?}");
        assert_eq!(stats.dropped_send_errors, 0);
        drop(s.client);
    })
    .await
    .unwrap();
}

/// Datagrams from anyone but the real peer are dropped and counted; the connection goes on.
#[tokio::test]
async fn foreign_datagrams_are_dropped_and_counted() {
    tokio::time::timeout(TEST_LIMIT, async {
        let s = connect().await;
        let mut echo = Echo::open(&s.connection).await.unwrap();
        echo.rounds(2).await.unwrap();
        assert_eq!(s.shim.stats().dropped_foreign, 0);

        let stranger = UdpSocket::bind(any_localhost()).unwrap();
        for i in 0..5_u8 {
            // Looks like a QUIC short-header packet; it must never reach quinn.
            let mut garbage = vec![0x40 | i; 1200];
            garbage[1..9].copy_from_slice(&[i; 8]);
            stranger.send_to(&garbage, s.shim.local_addr()).unwrap();
        }
        eventually("5 foreign datagrams dropped", || {
            s.shim.stats().dropped_foreign >= 5
        })
        .await
        .unwrap();
        echo.rounds(2).await.unwrap();
        assert_eq!(s.shim.stats().dropped_foreign, 5);
        assert!(s.connection.close_reason().is_none());
    })
    .await
    .unwrap();
}

/// The client changes its local socket; with `rebind_abstract(same Arc)` quinn pings on a new
/// connection ID and the server validates the new path. The old socket is really closed.
#[tokio::test]
async fn local_rebind_keeps_the_connection() {
    tokio::time::timeout(TEST_LIMIT, async {
        let s = connect().await;
        let id = s.connection.stable_id();
        let mut echo = Echo::open(&s.connection).await.unwrap();
        echo.rounds(2).await.unwrap();

        let old_local = s.shim.local_addr();
        let new_local = s.shim.rebind_local(any_localhost()).unwrap();
        assert_ne!(new_local, old_local);
        s.client.rebind_abstract(s.shim.clone()).unwrap();
        echo.rounds(3).await.unwrap();

        assert_eq!(s.connection.stable_id(), id);
        let server_side = s.accepted.lock().unwrap()[0].clone();
        eventually("server sees the new client address", || {
            server_side.remote_address() == new_local
        })
        .await
        .unwrap();
        eventually("old local socket closed", || {
            s.shim.open_retired_sockets() == 0
        })
        .await
        .unwrap();
        drop(UdpSocket::bind(old_local).expect("old local port still bound"));
        assert_eq!(s.shim.stats().local_rebinds, 1);
        assert_eq!(s.accepted.lock().unwrap().len(), 1);
    })
    .await
    .unwrap();
}

/// Sends, from `spoofer` (bound at the new address of a move), what an attacker there can
/// send: garbage shaped like short-header packets, and the client's own packets (the copies
/// the overlap sends there) reflected back. Returns how many it sent.
fn spoof_from(spoofer: &UdpSocket, client: SocketAddr) -> u64 {
    let mut sent = 0;
    for i in 0..5_u8 {
        let mut garbage = vec![0x40 | i; 1200];
        garbage[1..9].copy_from_slice(&[i; 8]);
        spoofer.send_to(&garbage, client).unwrap();
        sent += 1;
    }
    spoofer
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0_u8; 2048];
    while let Ok(n) = spoofer.recv(&mut buf) {
        spoofer.send_to(&buf[..n], client).unwrap();
        sent += 1;
    }
    sent
}

/// During the overlap, datagrams from the new address that quinn does not authenticate
/// (garbage, the client's own packets reflected) neither end the overlap nor disturb the
/// connection: the client keeps talking to the old server. When the real server then moves
/// there and the wrapper vouches for it, the move is confirmed.
#[tokio::test]
async fn a_spoofed_datagram_from_the_new_address_does_not_confirm_the_move() {
    tokio::time::timeout(TEST_LIMIT, async {
        let s = connect().await;
        let mut echo = Echo::open(&s.connection).await.unwrap();
        echo.rounds(2).await.unwrap();

        let new_socket = UdpSocket::bind(any_localhost()).unwrap();
        let new_addr = new_socket.local_addr().unwrap();
        let old = s.shim.set_peer(new_addr).unwrap();
        // Traffic during the overlap: copies reach the new address, the spoofer reflects them.
        echo.rounds(3).await.unwrap();
        let spoofed = spoof_from(&new_socket, s.shim.local_addr());
        assert!(spoofed > 5, "no copy reached the new address");
        eventually("the spoofed datagrams are delivered to quinn", || {
            s.shim.stats().unconfirmed_received >= spoofed
        })
        .await
        .unwrap();
        // quinn dropped them; the client still talks to the old server, on both paths.
        echo.rounds(5).await.unwrap();
        assert!(s.connection.close_reason().is_none());
        assert_eq!(s.shim.previous_peer(), Some(old));
        assert_eq!(s.shim.peer(), new_addr);
        let stats = s.shim.stats();
        assert_eq!(
            (stats.confirmations, stats.overlap_capped),
            (0, 0),
            "{stats:?}"
        );
        assert_eq!(*s.shim.move_outcomes().borrow(), MoveOutcome::Idle);
        assert!(stats.dual_sends > 0);

        // The real server moves there: quinn authenticates its packets; the wrapper's vouch
        // (here the test's) confirms.
        s.server.rebind(new_socket).unwrap();
        echo.rounds(3).await.unwrap();
        assert_eq!(
            s.shim.confirm_peer(new_addr).unwrap(),
            Confirmation::Confirmed
        );
        assert_eq!(s.shim.previous_peer(), None);
        echo.rounds(3).await.unwrap();
        assert_eq!(s.shim.last_received_from(), Some(new_addr));
        assert_eq!(s.shim.stats().confirmations, 1);
        assert_eq!(s.accepted.lock().unwrap().len(), 1);
        assert!(s.connection.close_reason().is_none());
    })
    .await
    .unwrap();
}

/// Keeps echoing until the shim publishes an abandoned move (the caps are enforced on sends).
async fn echo_until_abandoned(s: &Setup, echo: &mut Echo) -> MoveError {
    let mut outcomes = s.shim.move_outcomes();
    loop {
        echo.rounds(1).await.unwrap();
        if let MoveOutcome::Abandoned(e) = outcomes.borrow_and_update().clone() {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// After an overlap ended at a cap: the client is back on the old server, no copy goes to the
/// silent address any more, and the connection works.
async fn assert_swapped_back(s: &Setup, echo: &mut Echo, old: SocketAddr, silent: &UdpSocket) {
    assert_eq!((s.shim.peer(), s.shim.previous_peer()), (old, None));
    // Drain what reached the silent address before the cap.
    silent
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = [0_u8; 2048];
    while silent.recv(&mut buf).is_ok() {}
    let before = s.shim.stats();
    echo.rounds(5).await.unwrap();
    let after = s.shim.stats();
    assert_eq!(after.dual_sends, before.dual_sends, "duplicates went on");
    assert_eq!(after.duplicated_bytes, before.duplicated_bytes);
    assert!(after.sent > before.sent);
    assert!(
        silent.recv(&mut buf).is_err(),
        "a datagram reached the silent address"
    );
    assert_eq!(after.overlap_capped, 1);
    assert_eq!(after.confirmations, 0);
    assert!(s.connection.close_reason().is_none());
}

/// A new address that never answers: the overlap reaches its time cap, the client swaps back
/// with a clear error and stops the duplicate sends.
#[tokio::test]
async fn an_overlap_that_reaches_its_time_cap_swaps_back() {
    tokio::time::timeout(TEST_LIMIT, async {
        let s = connect().await;
        let mut echo = Echo::open(&s.connection).await.unwrap();
        echo.rounds(2).await.unwrap();
        s.shim
            .set_overlap_limits(OverlapLimits::new(Duration::from_millis(300), u64::MAX));
        let silent = UdpSocket::bind(any_localhost()).unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let old = s.shim.set_peer(silent_addr).unwrap();
        let started = std::time::Instant::now();
        let err = echo_until_abandoned(&s, &mut echo).await;
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(
            matches!(err, MoveError::TimeCap { new, back_to, datagrams_from_new: 0, .. }
                if new == silent_addr && back_to == old),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&format!("move to {silent_addr} not confirmed within"))
                && text.contains(&format!("swapped back to {old}")),
            "unclear error: {text}"
        );
        assert!(s.shim.stats().dual_sends > 0);
        assert_swapped_back(&s, &mut echo, old, &silent).await;
    })
    .await
    .unwrap();
}

/// The same with the byte cap: the copies to the silent address stop at the cap.
#[tokio::test]
async fn an_overlap_that_reaches_its_byte_cap_swaps_back() {
    tokio::time::timeout(TEST_LIMIT, async {
        let s = connect().await;
        let mut echo = Echo::open(&s.connection).await.unwrap();
        echo.rounds(2).await.unwrap();
        const CAP: u64 = 4 * 1024;
        s.shim
            .set_overlap_limits(OverlapLimits::new(Duration::from_secs(60), CAP));
        let silent = UdpSocket::bind(any_localhost()).unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let old = s.shim.set_peer(silent_addr).unwrap();
        let err = echo_until_abandoned(&s, &mut echo).await;
        assert!(
            matches!(err, MoveError::ByteCap { new, back_to, limit: CAP, .. }
                if new == silent_addr && back_to == old),
            "{err:?}"
        );
        assert!(err.to_string().contains("bytes duplicated"), "{err}");
        let duplicated = s.shim.stats().duplicated_bytes;
        // At most one transmission (a GSO batch at most 64 KiB) past the cap.
        assert!(
            (CAP..CAP + 65_536).contains(&duplicated),
            "{duplicated} bytes duplicated for a cap of {CAP}"
        );
        assert_swapped_back(&s, &mut echo, old, &silent).await;
    })
    .await
    .unwrap();
}
