//! Plain QUIC clients (their own rustls config, the application's ALPN, no control marker)
//! against a real swrapper server over loopback: they get the application at once with all
//! their streams, take a slot, and an announce lists them as unable to follow.

// Test helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cwrapper::{ClientOptions, MigratingClient};
use demo_echo::{EchoReply, EchoRequest};
use migration_core::MigrationId;
use swrapper::quinn::rustls::pki_types::CertificateDer;
use swrapper::quinn::{self, rustls};
use swrapper::{AppConnection, MigratableServer, MigrationHandle, ServerOptions};
use test_support::eventually;
use tokio::sync::mpsc;
use wrapper_support::Identity;

/// Bound on every wait.
const LIMIT: Duration = Duration::from_secs(10);

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A swrapper server whose application reports each connection (and when it arrived) and
/// echoes the raw bytes of every bidirectional stream.
struct Server {
    handle: MigrationHandle,
    roots: Vec<CertificateDer<'static>>,
    apps: mpsc::UnboundedReceiver<(Instant, AppConnection)>,
}

fn start(max_sessions: usize, hello_timeout: Duration) -> Server {
    let (identity, _) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
    let roots = identity.certs.clone();
    let mut opts = ServerOptions::new(localhost(), identity, vec![demo_echo::ALPN.to_vec()]);
    opts.max_sessions = max_sessions;
    opts.hello_timeout = hello_timeout;
    let server = MigratableServer::bind(opts).unwrap();
    let handle = server.handle();
    let (tx, apps) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(app) = server.accept().await {
            let _ = tx.send((Instant::now(), app.clone()));
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = app.connection.accept_bi().await {
                    tokio::spawn(async move {
                        let bytes = recv.read_to_end(1 << 16).await.unwrap_or_default();
                        let _ = send.write_all(&bytes).await;
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    Server {
        handle,
        roots,
        apps,
    }
}

/// A plain QUIC client: its own rustls config offering only the application's ALPN.
async fn plain_client(
    roots: &[CertificateDer<'static>],
    server: SocketAddr,
) -> Result<(quinn::Endpoint, quinn::Connection), quinn::ConnectionError> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    tls.alpn_protocols = vec![demo_echo::ALPN.to_vec()];
    let mut endpoint = quinn::Endpoint::client(localhost()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    )));
    let conn = endpoint.connect(server, "localhost").unwrap().await?;
    Ok((endpoint, conn))
}

/// Writes `bytes` on a new bidirectional stream, finishes it, returns what came back.
async fn round_trip(conn: &quinn::Connection, bytes: &[u8]) -> Vec<u8> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    tokio::time::timeout(LIMIT, recv.read_to_end(1 << 16))
        .await
        .unwrap()
        .unwrap()
}

async fn next_app(server: &mut Server) -> (Instant, AppConnection) {
    tokio::time::timeout(LIMIT, server.apps.recv())
        .await
        .unwrap()
        .unwrap()
}

/// (a) The application gets a plain client at once (not after the hello deadline), and the
/// client's first bidirectional stream reaches it intact.
#[tokio::test]
async fn a_plain_client_gets_the_application_at_once_with_its_first_stream() {
    let mut server = start(8, Duration::from_secs(30));
    let (_ep, conn) = plain_client(&server.roots, server.handle.local_addr())
        .await
        .unwrap();
    let connected = Instant::now();
    let (arrived, app) = next_app(&mut server).await;
    // The hello timeout is 30 s: anything under 3 s means no wait for a Hello.
    assert!(
        arrived.saturating_duration_since(connected) < Duration::from_secs(3),
        "the app got the plain client after {:?}",
        arrived.saturating_duration_since(connected)
    );
    assert!(app.plain && app.client_id.is_none());
    assert_eq!(
        swrapper::app_alpn(&app.connection).as_deref(),
        Some(demo_echo::ALPN)
    );
    // Stream 0, the one a wrapper-aware client would give the wrapper, is the app's.
    let payload = b"first request stream, bytes intact \x00\xff".to_vec();
    assert_eq!(round_trip(&conn, &payload).await, payload);
    assert_eq!(round_trip(&conn, b"second").await, b"second");
    let sessions = server.handle.sessions();
    assert_eq!(sessions.len(), 1);
    assert!(sessions[0].plain && !sessions[0].control_open);
    assert!(conn.close_reason().is_none());
}

/// (b) A plain client takes a slot: with one slot, a second connection is refused; once the
/// plain client leaves, a new one is accepted.
#[tokio::test]
async fn a_plain_client_counts_against_the_session_limit() {
    let mut server = start(1, Duration::from_secs(30));
    let addr = server.handle.local_addr();
    let (ep1, first) = plain_client(&server.roots, addr).await.unwrap();
    let (_, app) = next_app(&mut server).await;
    assert!(app.plain);
    assert_eq!(server.handle.connections(), 1);
    let (_ep2, second) = plain_client(&server.roots, addr).await.unwrap();
    let reason = tokio::time::timeout(LIMIT, second.closed()).await.unwrap();
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, swrapper::CONN_FULL);
        }
        other => panic!("expected a CONN_FULL close, got {other:?}"),
    }
    assert_eq!(server.handle.refused_connections(), 1);
    first.close(0u32.into(), b"bye");
    ep1.wait_idle().await;
    eventually("the plain client's slot is free", || {
        server.handle.connections() == 0
    })
    .await
    .unwrap();
    let (_ep3, third) = plain_client(&server.roots, addr).await.unwrap();
    let (_, app) = next_app(&mut server).await;
    assert!(app.plain);
    assert_eq!(round_trip(&third, b"in").await, b"in");
}

/// (c) An announce with a cwrapper client and a plain client: the cwrapper client acks, the
/// plain one is listed as unable to follow, the report is not complete, and the round ends
/// with the ack (it does not wait for the plain client).
#[tokio::test]
async fn an_announce_lists_the_plain_client_as_cannot_follow() {
    let mut server = start(8, Duration::from_secs(30));
    let addr = server.handle.local_addr();
    let (_ep, plain) = plain_client(&server.roots, addr).await.unwrap();
    let (_, plain_app) = next_app(&mut server).await;
    let aware = MigratingClient::connect(ClientOptions::new(
        addr,
        "localhost",
        server.roots.clone(),
        vec![demo_echo::ALPN.to_vec()],
        "aware",
    ))
    .await
    .unwrap();
    let (_, aware_app) = next_app(&mut server).await;
    assert!(!aware_app.plain);
    assert_eq!(aware_app.client_id.as_deref(), Some("aware"));
    // Both see the application's ALPN, marker stripped.
    assert_eq!(
        swrapper::app_alpn(&aware_app.connection).as_deref(),
        Some(demo_echo::ALPN)
    );
    let deadline = Duration::from_secs(5);
    let started = Instant::now();
    // The same address: the cwrapper client swaps to where it already is.
    let report = server
        .handle
        .announce(MigrationId::from_bytes([9; 16]), addr, deadline)
        .await
        .unwrap();
    assert!(
        started.elapsed() < deadline,
        "the round waited for the plain client"
    );
    assert_eq!(
        report.acked,
        vec![(aware_app.session.0, "aware".to_owned())]
    );
    assert!(report.missing.is_empty());
    assert_eq!(report.cannot_follow, vec![plain_app.session.0]);
    assert!(!report.complete());
    server.handle.resumed().unwrap();
    // Both keep working.
    assert_eq!(round_trip(&plain, b"after").await, b"after");
    assert_eq!(
        round_trip(aware.connection(), b"aware after").await,
        b"aware after"
    );
}

/// (d) The demo echo server (`swrapper::serve_echo`, ALPN `demo_echo::ALPN`) answers a plain
/// quinn client's echo request on its first stream.
#[tokio::test]
async fn the_demo_echo_serves_a_plain_client() {
    let (identity, _) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
    let roots = identity.certs.clone();
    let mut opts = ServerOptions::new(localhost(), identity, vec![demo_echo::ALPN.to_vec()]);
    opts.hello_timeout = Duration::from_secs(30);
    let server = MigratableServer::bind(opts).unwrap();
    let addr = server.local_addr();
    tokio::spawn(async move {
        while let Some(app) = server.accept().await {
            tokio::spawn(swrapper::serve_echo(app));
        }
    });
    let (_ep, conn) = plain_client(&roots, addr).await.unwrap();
    for seq in 0..3u64 {
        let req = EchoRequest {
            seq,
            payload: format!("plain {seq}").into_bytes(),
        };
        let reply = EchoReply::decode(&round_trip(&conn, &req.encode().unwrap()).await).unwrap();
        assert_eq!(reply.payload, req.payload);
        assert_eq!(reply.served, seq + 1);
    }
}
