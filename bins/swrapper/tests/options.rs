//! The application's own quinn configuration: what `bind` refuses (typed, with what to set),
//! and the incoming filter and endpoint access with real quinn clients on loopback.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use swrapper::quinn;
use swrapper::{
    ConfigError, Identity, IncomingAction, MigratableServer, ServerError, ServerOptions, ServerQuic,
};

const ALPN: &[u8] = b"options-test";
const LIMIT: Duration = Duration::from_secs(30);

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A server configuration as an application builds it, with `transport`.
fn app_config(transport: quinn::TransportConfig) -> (quinn::ServerConfig, Vec<Vec<u8>>) {
    let (identity, _) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
    let roots: Vec<Vec<u8>> = identity.certs.iter().map(|c| c.to_vec()).collect();
    let mut config = quinn::ServerConfig::with_single_cert(identity.certs, identity.key).unwrap();
    config.transport_config(Arc::new(transport));
    (config, roots)
}

fn idle(d: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(d.try_into().unwrap()));
    t
}

fn bind_err(opts: ServerOptions) -> ServerError {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    match MigratableServer::bind(opts) {
        Ok(_) => panic!("bind accepted a configuration that cannot carry a move"),
        Err(e) => e,
    }
}

#[test]
fn an_idle_timeout_shorter_than_a_freeze_is_refused() {
    let (config, _) = app_config(idle(Duration::from_secs(5)));
    let err = bind_err(ServerOptions::with_server_config(loopback(), config));
    assert!(
        matches!(
            err,
            ServerError::Config(ConfigError::IdleTimeoutTooShort { idle, needed, max_freeze })
                if idle == Duration::from_secs(5)
                    && needed == Duration::from_secs(15)
                    && max_freeze == swrapper::DEFAULT_MAX_FREEZE
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("idle timeout 5s is too short"), "{text}");
    assert!(text.contains("max_idle_timeout"), "{text}");

    // The configuration the wrapper builds is checked the same way.
    let (identity, _) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
    let mut opts = ServerOptions::new(loopback(), identity, vec![ALPN.to_vec()]);
    if let ServerQuic::Generated { idle_timeout, .. } = &mut opts.quic {
        *idle_timeout = Duration::from_secs(14);
    }
    assert!(matches!(
        opts.check(),
        Err(ConfigError::IdleTimeoutTooShort { .. })
    ));

    // What passes: 15 s, no idle timeout at all, or a shorter freeze declared.
    for transport in [idle(Duration::from_secs(15)), {
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(None);
        t
    }] {
        let (config, _) = app_config(transport);
        ServerOptions::with_server_config(loopback(), config)
            .check()
            .unwrap();
    }
    let (config, _) = app_config(idle(Duration::from_secs(5)));
    let mut opts = ServerOptions::with_server_config(loopback(), config);
    opts.max_freeze = Duration::ZERO;
    let facts = opts.check().unwrap();
    assert_eq!(facts.idle_timeout, Some(Duration::from_secs(5)));
}

#[test]
fn a_server_without_bidirectional_streams_is_refused() {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(0u32.into());
    let (config, _) = app_config(t);
    let err = bind_err(ServerOptions::with_server_config(loopback(), config));
    assert!(
        matches!(err, ServerError::Config(ConfigError::NoBidiStreams)),
        "{err:?}"
    );
    assert!(err.to_string().contains("control stream"), "{err}");
}

/// A plain quinn client endpoint trusting `roots`.
fn client(roots: &[Vec<u8>]) -> quinn::Endpoint {
    let roots: Vec<_> = roots
        .iter()
        .map(|r| quinn::rustls::pki_types::CertificateDer::from(r.clone()))
        .collect();
    let mut store = quinn::rustls::RootCertStore::empty();
    for r in roots {
        store.add(r).unwrap();
    }
    let mut endpoint = quinn::Endpoint::client(loopback()).unwrap();
    endpoint.set_default_client_config(
        quinn::ClientConfig::with_root_certificates(Arc::new(store)).unwrap(),
    );
    endpoint
}

/// Whether each connection the filter saw had its address validated, in order.
type Seen = Arc<Mutex<Vec<bool>>>;

/// A server whose filter records whether each incoming address was validated, and answers
/// `action` for it.
fn filtered(
    action: impl Fn(&quinn::Incoming) -> IncomingAction + Send + Sync + 'static,
) -> (MigratableServer, Vec<Vec<u8>>, Seen) {
    let (config, roots) = app_config(quinn::TransportConfig::default());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let opts = ServerOptions::with_server_config(loopback(), config).filter_incoming(move |i| {
        log.lock().unwrap().push(i.remote_address_validated());
        action(i)
    });
    (MigratableServer::bind(opts).unwrap(), roots, seen)
}

#[tokio::test]
async fn a_retry_filter_validates_the_address_then_accepts() {
    tokio::time::timeout(LIMIT, async {
        let (server, roots, seen) = filtered(|_| IncomingAction::Retry);
        let handle = server.handle();
        let addr = server.local_addr();
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        let endpoint = client(&roots);
        let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
        // Unvalidated first (a Retry went out), then validated (accepted).
        assert_eq!(*seen.lock().unwrap(), [false, true]);
        // The server's side of the handshake completes on its own task.
        while handle.handshakes() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(handle.handshakes(), 1);
        assert_eq!(handle.endpoint().open_connections(), 1);
        assert_eq!(handle.endpoint().local_addr().unwrap(), addr);
        conn.close(0u32.into(), b"");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_refusing_filter_refuses_and_an_ignoring_one_stays_silent() {
    tokio::time::timeout(LIMIT, async {
        let (server, roots, seen) = filtered(|_| IncomingAction::Refuse);
        let handle = server.handle();
        let addr = server.local_addr();
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        let endpoint = client(&roots);
        let err = endpoint
            .connect(addr, "localhost")
            .unwrap()
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                quinn::ConnectionError::ConnectionClosed(c)
                    if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
            ),
            "{err:?}"
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert_eq!(handle.handshakes(), 0);

        let (server, roots, seen) = filtered(|_| IncomingAction::Ignore);
        let addr = server.local_addr();
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        let connecting = client(&roots).connect(addr, "localhost").unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(500), connecting)
                .await
                .is_err(),
            "an ignored connection got an answer"
        );
        assert!(!seen.lock().unwrap().is_empty());
    })
    .await
    .unwrap();
}
