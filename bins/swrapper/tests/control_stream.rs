//! Bad input on the control stream: the server closes that stream with an error code, while the
//! connection and the application keep working.

// Test helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use control_protocol::{CloseCode, Message, SUPPORTED_VERSIONS};
use demo_echo::{EchoReply, EchoRequest};
use swrapper::{MigratableServer, MigrationHandle, ServerOptions};
use wrapper_support::Identity;

const LIMIT: Duration = Duration::from_secs(30);

/// A server, and a plain quinn connection to it (no control stream opened yet).
async fn setup() -> (MigrationHandle, quinn::Endpoint, quinn::Connection) {
    let (identity, _) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
    let roots = identity.certs.clone();
    let mut opts = ServerOptions::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        identity,
        vec![demo_echo::ALPN.to_vec()],
    );
    opts.hello_timeout = Duration::from_secs(2);
    let server = MigratableServer::bind(opts).unwrap();
    let handle = server.handle();
    let addr = server.local_addr();
    tokio::spawn(async move {
        while let Some(app) = server.accept().await {
            tokio::spawn(swrapper::serve_echo(app));
        }
    });
    let transport = wrapper_support::tls::transport_config(Duration::from_secs(10)).unwrap();
    let cfg = wrapper_support::tls::client_config(&roots, &[demo_echo::ALPN], transport).unwrap();
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    endpoint.set_default_client_config(cfg);
    let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
    (handle, endpoint, conn)
}

/// Sends `bytes` as the first stream and returns the code the server reset it with.
async fn control_reset_code(conn: &quinn::Connection, bytes: &[u8]) -> u64 {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let mut buf = [0u8; 64];
    loop {
        match recv.read(&mut buf).await {
            Ok(Some(_)) => continue, // e.g. a Bye before the reset
            Ok(None) => panic!("control stream finished instead of reset"),
            Err(quinn::ReadError::Reset(code)) => return code.into_inner(),
            Err(e) => panic!("unexpected read error: {e}"),
        }
    }
}

/// After the control stream was refused, the application still answers on the connection.
async fn echo_still_works(conn: &quinn::Connection) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let req = EchoRequest {
        seq: 0,
        payload: b"still here".to_vec(),
    };
    send.write_all(&req.encode().unwrap()).await.unwrap();
    send.finish().unwrap();
    let reply = EchoReply::decode(&recv.read_to_end(1 << 16).await.unwrap()).unwrap();
    assert_eq!(reply.payload, req.payload);
    assert_eq!(reply.served, 1);
    assert!(conn.close_reason().is_none());
}

fn frame(version: u16, kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    body.push(kind);
    body.extend_from_slice(payload);
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_the_control_stream_only() {
    tokio::time::timeout(LIMIT, async {
        let (handle, _ep, conn) = setup().await;
        let code = control_reset_code(&conn, &frame(1, 200, b"??")).await;
        assert_eq!(code, u64::from(CloseCode::ProtocolViolation.as_u32()));
        echo_still_works(&conn).await;
        // The session was never registered: nothing to migrate, no crash.
        assert!(handle.sessions().is_empty());
        assert_eq!(handle.handshakes(), 1);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_version_is_refused_with_its_code() {
    tokio::time::timeout(LIMIT, async {
        let (_handle, _ep, conn) = setup().await;
        let code = control_reset_code(&conn, &frame(99, 1, b"")).await;
        assert_eq!(code, u64::from(CloseCode::UnsupportedVersion.as_u32()));
        echo_still_works(&conn).await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_refused_before_it_arrives() {
    tokio::time::timeout(LIMIT, async {
        let (_handle, _ep, conn) = setup().await;
        let code = control_reset_code(&conn, &u32::MAX.to_be_bytes()).await;
        assert_eq!(code, u64::from(CloseCode::FrameTooLarge.as_u32()));
        echo_still_works(&conn).await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_message_from_the_client_is_unexpected() {
    tokio::time::timeout(LIMIT, async {
        let (_handle, _ep, conn) = setup().await;
        let mut bytes = Vec::new();
        control_protocol::encode(
            &Message::Welcome {
                version: 1,
                session_id: 1,
            },
            &mut bytes,
        )
        .unwrap();
        let code = control_reset_code(&conn, &bytes).await;
        // The server's decoder refuses a server-to-client kind from a client.
        assert_eq!(code, u64::from(CloseCode::UnexpectedMessage.as_u32()));
        echo_still_works(&conn).await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_a_good_hello_closes_the_stream_and_the_session_stays() {
    tokio::time::timeout(LIMIT, async {
        let (handle, _ep, conn) = setup().await;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let mut hello = Vec::new();
        control_protocol::encode(
            &Message::Hello {
                client_id: control_protocol::ClientId::new("raw").unwrap(),
                supported: SUPPORTED_VERSIONS,
            },
            &mut hello,
        )
        .unwrap();
        send.write_all(&hello).await.unwrap();
        // Welcome comes back.
        let mut dec = control_protocol::ControlDecoder::new(control_protocol::Role::Client);
        let mut buf = [0u8; 256];
        let welcome = loop {
            let n = recv.read(&mut buf).await.unwrap().unwrap();
            dec.push(&buf[..n]);
            if let Some(m) = dec.next().unwrap() {
                break m;
            }
        };
        assert!(matches!(welcome, Message::Welcome { version: 2, .. }));
        assert_eq!(handle.sessions().len(), 1);
        send.write_all(&[0, 0, 0, 3, 0, 1, 0]).await.unwrap(); // kind 0: reserved
        let code = loop {
            match recv.read(&mut buf).await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("finished instead of reset"),
                Err(quinn::ReadError::Reset(c)) => break c.into_inner(),
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(code, u64::from(CloseCode::ProtocolViolation.as_u32()));
        echo_still_works(&conn).await;
        // The session is still held (the connection is alive), its control stream is closed.
        for _ in 0..100 {
            if handle.sessions().first().is_some_and(|s| !s.control_open) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let sessions = handle.sessions();
        assert_eq!(sessions.len(), 1);
        assert!(!sessions[0].control_open);
        // Announcing reports that client as missing at once, without waiting for the deadline.
        let started = std::time::Instant::now();
        let report = handle
            .announce(
                migration_core::MigrationId::from_bytes([5; 16]),
                SocketAddr::from(([127, 0, 0, 1], 9)),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!(report.missing.len(), 1);
        assert!(report.acked.is_empty());
        assert!(started.elapsed() < Duration::from_secs(2));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_byes_are_counted_not_logged_or_answered() {
    tokio::time::timeout(LIMIT, async {
        let (handle, _ep, conn) = setup().await;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let mut bytes = Vec::new();
        control_protocol::encode(
            &Message::Hello {
                client_id: control_protocol::ClientId::new("chatty").unwrap(),
                supported: SUPPORTED_VERSIONS,
            },
            &mut bytes,
        )
        .unwrap();
        for _ in 0..1000 {
            control_protocol::encode(
                &Message::Bye {
                    reason: control_protocol::ByeReason::new("bye").unwrap(),
                },
                &mut bytes,
            )
            .unwrap();
        }
        send.write_all(&bytes).await.unwrap();
        for _ in 0..500 {
            if handle.repeats() == 999 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(handle.repeats(), 999);
        let sessions = handle.sessions();
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].repeats, 999);
        // The client said Bye: it cannot be told about a move, and nothing was answered but
        // the Welcome.
        assert!(!sessions[0].control_open);
        let mut dec = control_protocol::ControlDecoder::new(control_protocol::Role::Client);
        let mut buf = [0u8; 256];
        let n = recv.read(&mut buf).await.unwrap().unwrap();
        dec.push(&buf[..n]);
        assert!(matches!(dec.next().unwrap(), Some(Message::Welcome { .. })));
        assert!(dec.next().unwrap().is_none());
        echo_still_works(&conn).await;
    })
    .await
    .unwrap();
}

/// A server with `max_sessions` slots and `hello` to say Hello, and a client endpoint that
/// trusts it.
async fn small_server(
    max_sessions: usize,
    hello: Duration,
) -> (MigrationHandle, SocketAddr, quinn::Endpoint) {
    let (identity, _) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
    let roots = identity.certs.clone();
    let mut opts = ServerOptions::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        identity,
        vec![demo_echo::ALPN.to_vec()],
    );
    opts.max_sessions = max_sessions;
    opts.hello_timeout = hello;
    let server = MigratableServer::bind(opts).unwrap();
    let handle = server.handle();
    let addr = server.local_addr();
    tokio::spawn(async move {
        while let Some(app) = server.accept().await {
            tokio::spawn(swrapper::serve_echo(app));
        }
    });
    let transport = wrapper_support::tls::transport_config(Duration::from_secs(10)).unwrap();
    let cfg = wrapper_support::tls::client_config(&roots, &[demo_echo::ALPN], transport).unwrap();
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    endpoint.set_default_client_config(cfg);
    (handle, addr, endpoint)
}

/// How the server closed `conn`: (application code, reason).
async fn closed_by_server(conn: &quinn::Connection) -> (u64, String) {
    match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(c) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        e => panic!("closed otherwise: {e}"),
    }
}

/// Opens the control stream, says Hello and returns the first message of the server.
async fn hello(conn: &quinn::Connection, name: &str) -> Message {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut bytes = Vec::new();
    control_protocol::encode(
        &Message::Hello {
            client_id: control_protocol::ClientId::new(name).unwrap(),
            supported: SUPPORTED_VERSIONS,
        },
        &mut bytes,
    )
    .unwrap();
    send.write_all(&bytes).await.unwrap();
    let mut dec = control_protocol::ControlDecoder::new(control_protocol::Role::Client);
    let mut buf = [0u8; 256];
    loop {
        let n = recv.read(&mut buf).await.unwrap().unwrap();
        dec.push(&buf[..n]);
        if let Some(m) = dec.next().unwrap() {
            // Keep the stream open: dropping it would finish our side.
            std::mem::forget((send, recv));
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_holds_a_slot_until_its_hello_deadline_closes_it() {
    tokio::time::timeout(LIMIT, async {
        let (handle, addr, ep) = small_server(1, Duration::from_millis(400)).await;
        let silent = ep.connect(addr, "localhost").unwrap().await.unwrap();
        let started = std::time::Instant::now();
        // Wait until the server has taken the silent connection's slot.
        while handle.connections() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The only slot is taken by a connection that said nothing: a second one is refused.
        let second = ep.connect(addr, "localhost").unwrap().await.unwrap();
        assert_eq!(
            closed_by_server(&second).await,
            (1, "server full".to_owned())
        );
        assert_eq!(handle.refused_connections(), 1);
        assert!(handle.sessions().is_empty());
        // The silent one is closed at its hello deadline, and its slot is freed.
        assert_eq!(
            closed_by_server(&silent).await,
            (2, "no Hello in time".to_owned())
        );
        assert!(
            started.elapsed() >= Duration::from_millis(350),
            "{:?}",
            started.elapsed()
        );
        for _ in 0..200 {
            if handle.connections() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(handle.connections(), 0);
        // A client that says Hello gets the slot.
        let good = ep.connect(addr, "localhost").unwrap().await.unwrap();
        assert!(matches!(
            hello(&good, "good").await,
            Message::Welcome { .. }
        ));
        assert_eq!(handle.sessions().len(), 1);
        echo_still_works(&good).await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_but_silent_control_stream_is_closed_at_the_hello_deadline() {
    tokio::time::timeout(LIMIT, async {
        let (handle, addr, ep) = small_server(4, Duration::from_millis(300)).await;
        let conn = ep.connect(addr, "localhost").unwrap().await.unwrap();
        // The control stream is opened (one byte of a frame header), but no Hello follows.
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&[0]).await.unwrap();
        assert_eq!(
            closed_by_server(&conn).await,
            (2, "no Hello in time".to_owned())
        );
        for _ in 0..200 {
            if handle.connections() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(handle.connections(), 0);
    })
    .await
    .unwrap();
}
