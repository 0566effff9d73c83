//! The client shim against real quinn servers on loopback.

// A test crate: helpers outside #[test] fns unwrap too, a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::Arc,
};

use test_support::{Accepted, Echo, TEST_LIMIT, configs, eventually, spawn_echo_server};
use udp_shim_client::{SwappableUdp, client_endpoint};

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
/// `set_peer` and quinn never notices.
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

        assert_eq!(s.connection.stable_id(), id);
        assert!(s.connection.close_reason().is_none());
        assert_eq!(s.accepted.lock().unwrap().len(), 1);
        let stats = s.shim.stats();
        assert_eq!(stats.swaps, 1);
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
