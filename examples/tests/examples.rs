//! Runs each example's core over loopback, with real quinn connections, and checks what it
//! promises. The examples are compiled in here from their own files, so what is tested is
//! what a reader sees.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

#[allow(dead_code, unreachable_pub)]
#[path = "../client_keep_alive.rs"]
mod client_keep_alive;
#[allow(dead_code, unreachable_pub)]
#[path = "../h3_file_server.rs"]
mod h3_file_server;
#[allow(dead_code, unreachable_pub)]
#[path = "../in_process_move.rs"]
mod in_process_move;
#[allow(dead_code, unreachable_pub)]
#[path = "../own_server_config.rs"]
mod own_server_config;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Buf as _;
use cwrapper::{ClientError, ClientOptions, MigratingClient, OverlapLimits};
use swrapper::{ConfigError, Identity, MigratableServer, MigrationHandle, ServerOptions};

/// Bound on every test.
const LIMIT: Duration = Duration::from_secs(60);

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn identity() -> (
    Identity,
    Vec<cwrapper::quinn::rustls::pki_types::CertificateDer<'static>>,
) {
    let (identity, _) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
    let roots = identity.certs.clone();
    (identity, roots)
}

async fn upper(client: &MigratingClient, text: &str) -> String {
    client_keep_alive::request(client, text).await.unwrap()
}

/// A move as the examples describe it: announce, freeze, unpark at `to`, resumed.
async fn move_to(handle: &MigrationHandle, to: SocketAddr) {
    let id = swrapper::random_migration_id().unwrap();
    let report = handle
        .announce(id, to, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(report.complete(), "{report:?}");
    handle.park().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(handle.unpark(Some(to)).unwrap(), to);
    assert_eq!(handle.resumed().unwrap(), 1);
}

fn free_address() -> SocketAddr {
    std::net::UdpSocket::bind(loopback())
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_server_config_keeps_its_stream_limit_and_validates_addresses() {
    tokio::time::timeout(LIMIT, async {
        let (identity, roots) = identity();
        let config = own_server_config::server_config(identity).unwrap();
        let server = own_server_config::bind(loopback(), config).unwrap();
        let handle = server.handle();
        let addr = server.local_addr();
        assert_eq!(server.endpoint().local_addr().unwrap(), addr);
        tokio::spawn(own_server_config::serve(server));

        let config = client_keep_alive::client_config(
            &roots,
            Some(Duration::from_secs(5)),
            Duration::from_secs(30),
        )
        .unwrap();
        let client = MigratingClient::connect(client_keep_alive::options(addr, config))
            .await
            .unwrap();
        assert_eq!(upper(&client, "hello").await, "HELLO");
        // The Retry before the handshake made no second handshake.
        assert_eq!(handle.handshakes(), 1);

        // The application's limit holds: APP_STREAMS requests at once, the control stream
        // aside; the next one waits until one of them is done.
        let conn = client.connection();
        let mut open = Vec::new();
        for _ in 0..own_server_config::APP_STREAMS {
            open.push(conn.open_bi().await.unwrap());
        }
        let blocked = tokio::time::timeout(Duration::from_millis(300), conn.open_bi()).await;
        assert!(
            blocked.is_err(),
            "a stream beyond the application's limit opened: the wrapper lost its config"
        );
        let (mut send, mut recv) = open.pop().unwrap();
        send.write_all(b"done").await.unwrap();
        send.finish().unwrap();
        assert_eq!(recv.read_to_end(64).await.unwrap(), b"DONE");
        let next = tokio::time::timeout(Duration::from_secs(5), conn.open_bi()).await;
        assert!(next.is_ok(), "no stream after one was done");
        client.close("done").await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_keep_alive_holds_an_idle_connection_that_dies_without() {
    tokio::time::timeout(LIMIT, async {
        let (identity, roots) = identity();
        // The wrapper's default server config: a 30 s idle timeout and no keep-alive of its
        // own, so only the client's keep-alive can hold the connection open.
        let server = MigratableServer::bind(ServerOptions::new(
            loopback(),
            identity,
            vec![client_keep_alive::ALPN.to_vec()],
        ))
        .unwrap();
        let handle = server.handle();
        let addr = server.local_addr();
        tokio::spawn(own_server_config::serve(server));

        // A 6 s idle timeout, so that the test waits little; it must then outlast a freeze of
        // at most 1 s (the overlap cap) plus the 5 s margin.
        let idle = Duration::from_secs(6);
        let short_freeze = OverlapLimits::new(Duration::from_secs(1), 16 << 20);
        let connect = |keep_alive: Option<Duration>| {
            let config = client_keep_alive::client_config(&roots, keep_alive, idle).unwrap();
            let mut opts = client_keep_alive::options(addr, config);
            opts.overlap_limits = short_freeze;
            MigratingClient::connect(opts)
        };
        let kept = connect(Some(Duration::from_secs(1))).await.unwrap();
        let idle_one = connect(None).await.unwrap();
        assert_eq!(upper(&kept, "a").await, "A");
        assert_eq!(upper(&idle_one, "b").await, "B");

        tokio::time::sleep(idle + Duration::from_secs(2)).await;
        assert_eq!(upper(&kept, "still here").await, "STILL HERE");
        assert_eq!(
            idle_one.connection().close_reason(),
            Some(cwrapper::quinn::ConnectionError::TimedOut),
            "the connection without keep-alive outlived its idle timeout"
        );

        // The same 6 s with the default overlap cap (10 s) cannot carry a move: refused
        // before anything is sent.
        let config =
            client_keep_alive::client_config(&roots, Some(Duration::from_secs(1)), idle).unwrap();
        let before = handle.handshakes();
        let err = MigratingClient::connect(client_keep_alive::options(addr, config))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Config(ConfigError::IdleTimeoutTooShort { idle: i, needed, .. })
                    if i == idle && needed == Duration::from_secs(15)
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("at least 15s"), "{err}");
        assert_eq!(handle.handshakes(), before);
        kept.close("done").await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_move_keeps_one_connection_through_a_move_and_an_abort() {
    let outcome = tokio::time::timeout(LIMIT, in_process_move::run())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        outcome.answers,
        ["BEFORE", "AFTER THE MOVE", "AFTER THE ABORT"]
    );
    assert_ne!(outcome.moved_to, outcome.first);
    assert_eq!(outcome.peer_after_move, outcome.moved_to);
    assert_eq!(outcome.peer_after_abort, outcome.moved_to);
    assert!(outcome.second_announce_refused, "{outcome:?}");
    assert_eq!(outcome.handshakes, 1, "{outcome:?}");
    assert!(outcome.same_connection, "{outcome:?}");
    // Move 1's Migrate, move 2's Migrate (elsewhere), then its MigrateAborted back.
    assert_eq!(outcome.seen.len(), 3, "{outcome:?}");
    assert_eq!(outcome.seen[0], (outcome.moved_to, false));
    assert!(!outcome.seen[1].1 && outcome.seen[1].0 != outcome.moved_to);
    assert_eq!(outcome.seen[2], (outcome.moved_to, true));
}

/// One GET on an HTTP/3 connection: the status and the body.
async fn get(
    send: &mut h3::client::SendRequest<h3_quinn::OpenStreams, bytes::Bytes>,
    path: &str,
) -> (http::StatusCode, Vec<u8>) {
    let request = http::Request::get(format!("https://localhost{path}"))
        .body(())
        .unwrap();
    let mut stream = send.send_request(request).await.unwrap();
    stream.finish().await.unwrap();
    let response = stream.recv_response().await.unwrap();
    let mut body = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.unwrap() {
        while chunk.has_remaining() {
            let part = chunk.chunk();
            body.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    (response.status(), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_file_server_serves_the_same_bytes_before_and_after_a_move() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        // 300 KiB that no two offsets repeat in a way a short or shifted body could match.
        let data: Vec<u8> = (0u32..300 * 1024)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        std::fs::write(dir.path().join("data.bin"), &data).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub").join("small.txt"), b"small").unwrap();

        let (identity, roots) = identity();
        let server = h3_file_server::bind(loopback(), identity).unwrap();
        let handle = server.handle();
        let first = server.local_addr();
        tokio::spawn(h3_file_server::serve(
            server,
            dir.path().to_path_buf(),
            None,
        ));

        let client = MigratingClient::connect(ClientOptions::new(
            first,
            "localhost",
            roots,
            vec![h3_file_server::ALPN.to_vec()],
            "h3-test",
        ))
        .await
        .unwrap();
        let connection = client.connection().stable_id();
        let (mut driver, mut send) =
            h3::client::new(h3_quinn::Connection::new(client.connection().clone()))
                .await
                .unwrap();
        tokio::spawn(async move { driver.wait_idle().await });

        let (status, body) = get(&mut send, "/data.bin").await;
        assert_eq!(status, http::StatusCode::OK);
        assert!(body == data, "body of {} bytes differs", body.len());
        assert_eq!(get(&mut send, "/sub/small.txt").await.1, b"small");
        for missing in ["/nothing", "/sub", "/", "/../data.bin", "/sub/../data.bin"] {
            assert_eq!(
                get(&mut send, missing).await.0,
                http::StatusCode::NOT_FOUND,
                "{missing}"
            );
        }

        let to = free_address();
        move_to(&handle, to).await;
        let (status, body) = get(&mut send, "/data.bin").await;
        assert_eq!(status, http::StatusCode::OK);
        assert!(
            body == data,
            "after the move: body of {} bytes differs",
            body.len()
        );
        assert_eq!(client.peer(), to);
        assert_eq!(client.connection().stable_id(), connection);
        assert_eq!(handle.handshakes(), 1);
    })
    .await
    .unwrap();
}

/// A stock HTTP/3 client (its own rustls config offering only `h3`, no wrapper) gets files
/// from the h3 example: the wrapper hands its connection to h3 at once, first stream included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_file_server_serves_a_plain_http3_client() {
    use cwrapper::quinn;
    use std::sync::Arc;
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hello.txt"), b"hello, plain client").unwrap();
        // Four of the server's 64 KiB steps, paced below at 1 MiB/s.
        let paced: Vec<u8> = (0u32..256 * 1024).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("paced.bin"), &paced).unwrap();
        let (identity, roots) = identity();
        let mut server_opts = ServerOptions::with_server_config(
            loopback(),
            h3_file_server::server_config(identity).unwrap(),
        );
        // Far beyond the test's own patience: the client must not wait for it.
        server_opts.hello_timeout = Duration::from_secs(30);
        let server = MigratableServer::bind(server_opts).unwrap();
        let addr = server.local_addr();
        tokio::spawn(h3_file_server::serve(
            server,
            dir.path().to_path_buf(),
            Some(1024 * 1024),
        ));

        let mut store = quinn::rustls::RootCertStore::empty();
        for r in roots {
            store.add(r).unwrap();
        }
        let mut tls = quinn::rustls::ClientConfig::builder_with_provider(Arc::new(
            quinn::rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&quinn::rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
        tls.alpn_protocols = vec![h3_file_server::ALPN.to_vec()];
        let mut endpoint = quinn::Endpoint::client(loopback()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        )));
        let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
        let started = std::time::Instant::now();
        let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn))
            .await
            .unwrap();
        tokio::spawn(async move { driver.wait_idle().await });
        // The first request is on the client's first bidirectional stream.
        let (status, body) = get(&mut send, "/hello.txt").await;
        assert_eq!(status, http::StatusCode::OK);
        assert_eq!(body, b"hello, plain client");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            get(&mut send, "/nothing").await.0,
            http::StatusCode::NOT_FOUND
        );
        // Paced: the last step leaves no earlier than 256 KiB / (1 MiB/s) = 250 ms after the
        // first (a lower bound only: a slow machine takes longer, never shorter).
        let paced_from = std::time::Instant::now();
        let (status, body) = get(&mut send, "/paced.bin").await;
        assert_eq!(status, http::StatusCode::OK);
        assert!(body == paced, "paced body of {} bytes differs", body.len());
        assert!(
            paced_from.elapsed() >= Duration::from_millis(240),
            "{:?}",
            paced_from.elapsed()
        );
    })
    .await
    .unwrap();
}

#[test]
fn the_file_server_serves_plain_names_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a"), b"a").unwrap();
    std::os::unix::fs::symlink(dir.path().join("a"), dir.path().join("link")).unwrap();
    let root = dir.path();
    assert_eq!(h3_file_server::file_for(root, "/a"), Some(root.join("a")));
    for bad in ["a", "/", "/link", "/./a", "/../a", "//etc/passwd", "/b"] {
        assert_eq!(h3_file_server::file_for(root, bad), None, "{bad}");
    }
    assert!(Path::new(root).join("link").exists());
}
