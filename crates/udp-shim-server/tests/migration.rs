//! The server shim with real quinn connections: a quinn server on `MigratableUdp`, a quinn
//! client on `SwappableUdp`; the server moves (new port, park/unpark, another network
//! namespace) and the one connection goes on.

// A test crate: helpers outside #[test] fns unwrap too, a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    sync::Arc,
    time::Duration,
};

use test_support::{
    Accepted, Echo, Netns, TEST_LIMIT, configs, eventually, is_root, no_fork, require, require_ok,
    spawn_echo_server,
};
use udp_shim_client::{SwappableUdp, client_endpoint};
use udp_shim_server::{MigratableUdp, bind_in_netns, refresh_endpoint, server_endpoint};

const CLOSE_LIMIT: Duration = Duration::from_secs(2);

fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

struct Pair {
    server_shim: Arc<MigratableUdp>,
    server: quinn::Endpoint,
    accepted: Accepted,
    client_shim: Arc<SwappableUdp>,
    _client: quinn::Endpoint,
    connection: quinn::Connection,
}

impl Pair {
    async fn connect(server_addr: SocketAddr, client_addr: SocketAddr) -> Self {
        let (server_config, client_config) = configs(b"echo").unwrap();
        let server_shim = Arc::new(MigratableUdp::bind(server_addr).unwrap());
        let server = server_endpoint(server_shim.clone(), server_config).unwrap();
        let accepted = spawn_echo_server(server.clone());
        let client_shim =
            Arc::new(SwappableUdp::bind(client_addr, server_shim.local_addr()).unwrap());
        let client = client_endpoint(client_shim.clone()).unwrap();
        let connection = client
            .connect_with(client_config, client_shim.fake_peer(), "localhost")
            .unwrap()
            .await
            .unwrap();
        Self {
            server_shim,
            server,
            accepted,
            client_shim,
            _client: client,
            connection,
        }
    }

    /// Moves the server onto `socket`: the client learns the new address first (as the
    /// control stream would tell it), then the server swaps and re-announces the same Arc,
    /// and the client confirms the move (as the control stream's `Resumed` would make it).
    /// Asserts that the old port is really closed (checked inside `old_netns` if given).
    async fn move_server(&self, socket: UdpSocket) -> SocketAddr {
        self.move_server_from(socket, None).await
    }

    async fn move_server_from(&self, socket: UdpSocket, old_netns: Option<&Path>) -> SocketAddr {
        let old = self.server_shim.local_addr();
        let new = socket.local_addr().unwrap();
        self.client_shim.set_peer(new).unwrap();
        assert_eq!(self.server_shim.rebind_with(socket).unwrap(), new);
        refresh_endpoint(&self.server, &self.server_shim).unwrap();
        self.server_shim
            .wait_retired_closed(CLOSE_LIMIT)
            .await
            .unwrap();
        // What the client wrapper does on the server's authenticated `Resumed`: vouch for the
        // new address (the overlap then ends at its first datagram, the rebind's PING).
        self.client_shim.confirm_peer(new).unwrap();
        let rebound = {
            let _no_fork = no_fork();
            match old_netns {
                None => UdpSocket::bind(old),
                Some(netns) => bind_in_netns(netns, old),
            }
        };
        drop(rebound.expect("old server port still bound"));
        new
    }

    fn server_connection(&self) -> quinn::Connection {
        let accepted = self.accepted.lock().unwrap();
        assert_eq!(
            accepted.len(),
            1,
            "server accepted more than one connection"
        );
        accepted[0].clone()
    }
}

/// THE PROOF: one QUIC connection survives the server moving to another port, then ten more
/// moves; every echo arrives, in order, and every old port is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_survives_server_moves() {
    tokio::time::timeout(TEST_LIMIT, async {
        let pair = Pair::connect(localhost(0), localhost(0)).await;
        let id = pair.connection.stable_id();
        let client_addr = pair.client_shim.local_addr();
        let mut echo = Echo::open(&pair.connection).await.unwrap();
        echo.rounds(3).await.unwrap();

        let port2 = UdpSocket::bind(localhost(0)).unwrap();
        pair.move_server(port2).await;
        echo.rounds(3).await.unwrap();
        assert_eq!(pair.connection.stable_id(), id);
        assert_eq!(pair.server_connection().remote_address(), client_addr);

        for _ in 0..10 {
            pair.move_server(UdpSocket::bind(localhost(0)).unwrap())
                .await;
            echo.rounds(2).await.unwrap();
        }
        assert_eq!(pair.connection.stable_id(), id);
        assert!(pair.connection.close_reason().is_none());
        assert_eq!(pair.server_connection().remote_address(), client_addr);
        assert_eq!(pair.server.open_connections(), 1);
        assert_eq!(pair.server_shim.generation(), 11);
        assert_eq!(pair.client_shim.stats().swaps, 11);
        assert_eq!(pair.server_shim.stats().dropped_send_errors, 0);
    })
    .await
    .unwrap();
}

/// Parked: the port is free (a fresh socket can bind it) and the client's data waits; after
/// unpark on the same port the connection continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn park_frees_the_port_and_unpark_resumes() {
    tokio::time::timeout(TEST_LIMIT, async {
        let pair = Pair::connect(localhost(0), localhost(0)).await;
        let id = pair.connection.stable_id();
        let mut echo = Echo::open(&pair.connection).await.unwrap();
        echo.rounds(2).await.unwrap();

        let addr = pair.server_shim.local_addr();
        assert!(pair.server_shim.park());
        pair.server_shim
            .wait_retired_closed(CLOSE_LIMIT)
            .await
            .unwrap();
        drop({
            let _no_fork = no_fork();
            UdpSocket::bind(addr).expect("parked port still bound")
        });
        assert_eq!(pair.server_shim.local_addr(), addr);

        {
            let mut round = std::pin::pin!(echo.rounds(1));
            let early = tokio::time::timeout(Duration::from_millis(200), round.as_mut()).await;
            assert!(early.is_err(), "an echo came back from a parked server");
            assert_eq!(pair.server_shim.unpark().unwrap(), addr);
            refresh_endpoint(&pair.server, &pair.server_shim).unwrap();
            round.await.unwrap();
        }
        echo.rounds(2).await.unwrap();
        assert_eq!(pair.connection.stable_id(), id);
        assert_eq!(pair.server_shim.stats().parks, 1);
        pair.server_connection();
    })
    .await
    .unwrap();
}

/// The server moves into another network namespace (socket bound there by `bind_in_netns`)
/// and back; the client follows by address, the connection goes on. Root only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_survives_move_into_another_netns() {
    if !require("needs root (ip netns, veth)", is_root()) {
        return;
    }
    let Some(netns) = require_ok("creating a network namespace", Netns::create("udpshim")) else {
        return;
    };
    tokio::time::timeout(TEST_LIMIT, async {
        let start = SocketAddr::from((netns.root_ip, 0));
        let pair = Pair::connect(start, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await;
        let id = pair.connection.stable_id();
        let mut echo = Echo::open(&pair.connection).await.unwrap();
        echo.rounds(3).await.unwrap();
        let client_seen = pair.server_connection().remote_address();
        assert_eq!(client_seen.ip(), netns.root_ip);

        let inside = bind_in_netns(&netns.path(), SocketAddr::from((netns.inner_ip, 0))).unwrap();
        let new = pair.move_server(inside).await;
        assert_eq!(new.ip(), netns.inner_ip);
        echo.rounds(3).await.unwrap();

        let back = UdpSocket::bind(SocketAddr::from((netns.root_ip, 0))).unwrap();
        pair.move_server_from(back, Some(&netns.path())).await;
        echo.rounds(2).await.unwrap();

        assert_eq!(pair.connection.stable_id(), id);
        assert_eq!(pair.server_connection().remote_address(), client_seen);
        eventually("connection still open", || {
            pair.connection.close_reason().is_none()
        })
        .await
        .unwrap();
        assert_eq!(pair.server_shim.stats().dropped_send_errors, 0);
    })
    .await
    .unwrap();
    drop(netns);
}
