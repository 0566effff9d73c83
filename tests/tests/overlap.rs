//! The client's move overlap against a real swrapper server, in one process: the overlap ends
//! only when the server confirms, on the authenticated control stream, that it runs at the new
//! address (`Resumed`); a datagram from the new address proves nothing; a move the server never
//! confirms ends at the cap in a swap back with a clear error. (Here rather than in
//! bins/cwrapper, so that neither wrapper depends on the other.)

// Test helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use cwrapper::{ClientOptions, MigratingClient, MoveError, OverlapLimits};
use demo_echo::EchoChecker;
use migration_core::MigrationId;
use swrapper::{MigratableServer, MigrationHandle, ServerOptions};
use test_support::eventually;
use wrapper_support::Identity;

/// Bound on every scenario.
const LIMIT: Duration = Duration::from_secs(30);

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A demo echo server and a client connected to it with `limits`, its control stream open.
async fn start(limits: OverlapLimits) -> (MigrationHandle, MigratingClient, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (identity, pem) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
    let cert = dir.path().join("cert.pem");
    pem.write_cert(&cert).unwrap();
    let server = MigratableServer::bind(ServerOptions::new(
        localhost(),
        identity,
        vec![demo_echo::ALPN.to_vec()],
    ))
    .unwrap();
    let handle = server.handle();
    tokio::spawn(async move {
        while let Some(app) = server.accept().await {
            tokio::spawn(swrapper::serve_echo(app));
        }
    });
    let mut opts = ClientOptions::new(
        handle.local_addr(),
        "localhost",
        wrapper_support::tls::load_certs(&cert).unwrap(),
        vec![demo_echo::ALPN.to_vec()],
        "overlap-test",
    );
    opts.overlap_limits = limits;
    let client = MigratingClient::connect(opts).await.unwrap();
    eventually("the control stream is open", || {
        handle.sessions().iter().filter(|s| s.control_open).count() == 1
    })
    .await
    .unwrap();
    (handle, client, dir)
}

async fn echoes(client: &MigratingClient, checker: &mut EchoChecker, n: usize) {
    for _ in 0..n {
        let req = checker.request(checker.next_seq().to_be_bytes().to_vec());
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            cwrapper::echo_once(client.connection(), &req),
        )
        .await
        .expect("no echo within 5 s")
        .unwrap();
        checker.check(&req, &reply).unwrap();
    }
}

/// What an attacker at the new address can send: garbage shaped like short-header packets,
/// and the client's own packets (the overlap's copies) reflected back. Returns the count.
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

/// A spoofed datagram from the new address during the overlap does not end it: the client
/// keeps talking to the old server. The real server's `Resumed` from the new address does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_datagram_from_the_new_address_does_not_end_the_overlap() {
    tokio::time::timeout(LIMIT, async {
        let (handle, client, _dir) = start(OverlapLimits::default()).await;
        let first = handle.local_addr();
        let mut checker = EchoChecker::default();
        echoes(&client, &mut checker, 3).await;

        // The new address, held by the spoofer until the server moves there.
        let new_socket = UdpSocket::bind(localhost()).unwrap();
        let to = new_socket.local_addr().unwrap();
        let report = handle
            .announce(MigrationId::from_bytes([1; 16]), to, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(report.complete(), "{report:?}");
        let shim = client.shim();
        assert_eq!((shim.peer(), shim.previous_peer()), (to, Some(first)));
        echoes(&client, &mut checker, 3).await;

        let spoofed = spoof_from(&new_socket, shim.local_addr());
        assert!(spoofed > 5, "no copy reached the new address");
        eventually("the spoofed datagrams reach quinn", || {
            shim.stats().unconfirmed_received >= spoofed
        })
        .await
        .unwrap();
        echoes(&client, &mut checker, 5).await;
        assert_eq!(
            shim.previous_peer(),
            Some(first),
            "a spoofed datagram ended the overlap"
        );
        assert_eq!(shim.stats().confirmations, 0);
        assert!(client.status().failed_moves.is_empty());
        assert!(client.connection().close_reason().is_none());

        // The server moves there for real and says so on the control stream.
        handle.park().await.unwrap();
        assert_eq!(handle.rebind_with(new_socket).unwrap(), to);
        assert_eq!(handle.resumed().unwrap(), 1);
        eventually("the move is confirmed", || shim.previous_peer().is_none())
            .await
            .unwrap();
        echoes(&client, &mut checker, 3).await;
        assert_eq!(shim.peer(), to);
        assert_eq!(shim.last_received_from(), Some(to));
        let stats = shim.stats();
        assert_eq!(
            (stats.confirmations, stats.overlap_capped),
            (1, 0),
            "{stats:?}"
        );
        assert_eq!(client.status().resumed, 1);
        assert_eq!(handle.handshakes(), 1);
        client.close("done").await;
    })
    .await
    .unwrap();
}

/// The server announces a move and never confirms it (the new address never answers): at the
/// overlap's time cap the client swaps back, says why, and stops the duplicate sends; the old
/// server, still running, keeps serving it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_never_confirmed_ends_in_a_swap_back_with_a_clear_error() {
    tokio::time::timeout(LIMIT, async {
        let cap = Duration::from_millis(400);
        let (handle, client, _dir) = start(OverlapLimits::new(cap, u64::MAX)).await;
        let first = handle.local_addr();
        let mut checker = EchoChecker::default();
        echoes(&client, &mut checker, 2).await;

        let silent = UdpSocket::bind(localhost()).unwrap();
        let nowhere = silent.local_addr().unwrap();
        let id = MigrationId::from_bytes([2; 16]);
        let report = handle
            .announce(id, nowhere, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(report.complete(), "{report:?}");
        // No traffic from the application: the control task enforces the time cap.
        let mut events = client.events();
        let status = tokio::time::timeout(
            Duration::from_secs(5),
            events.wait_for(|s| !s.failed_moves.is_empty()),
        )
        .await
        .expect("the move was not given up at its cap")
        .unwrap()
        .clone();
        let failed = &status.failed_moves[0];
        assert_eq!(failed.migration_id.as_deref(), Some(id.to_string().as_str()));
        assert!(
            matches!(failed.error, MoveError::TimeCap { new, back_to, limit, datagrams_from_new: 0, .. }
                if new == nowhere && back_to == first && limit == cap),
            "{:?}",
            failed.error
        );
        let text = failed.error.to_string();
        assert!(
            text.contains(&format!("move to {nowhere} not confirmed within"))
                && text.contains(&format!("swapped back to {first}")),
            "unclear error: {text}"
        );
        let shim = client.shim();
        assert_eq!((shim.peer(), shim.previous_peer()), (first, None));
        let before = shim.stats();
        echoes(&client, &mut checker, 5).await;
        let after = shim.stats();
        assert_eq!(after.dual_sends, before.dual_sends, "duplicates went on");
        assert_eq!(after.overlap_capped, 1);
        assert!(client.connection().close_reason().is_none());
        drop(silent);
        client.close("done").await;
    })
    .await
    .unwrap();
}
