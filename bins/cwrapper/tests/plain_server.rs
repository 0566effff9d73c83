//! A server that does not speak the control protocol (plain quinn, its own rustls config, no
//! marker ALPN): cwrapper refuses it with a typed error instead of opening a control stream
//! the server would take for a request.

// Test helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cwrapper::{ClientError, ClientOptions, MigratingClient};
use quinn::rustls;
use wrapper_support::Identity;

const APP: &[u8] = b"plain-app/1";

#[tokio::test]
async fn a_server_without_the_marker_is_refused_and_closed() {
    let (identity, _) = Identity::self_signed(&["localhost".to_owned()]).unwrap();
    let roots = identity.certs.clone();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(identity.certs, identity.key)
    .unwrap();
    // A plain server: only the application's ALPN.
    tls.alpn_protocols = vec![APP.to_vec()];
    let server = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
        )),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let accepted = tokio::spawn(async move {
        let conn = server.accept().await.unwrap().await.unwrap();
        // The client opens no stream: the first thing the server sees is the close.
        tokio::select! {
            s = conn.accept_bi() => s.map(|_| ()),
            e = conn.closed() => Err(e),
        }
    });
    let opts = ClientOptions::new(addr, "localhost", roots, vec![APP.to_vec()], "c1");
    let err = MigratingClient::connect(opts).await.unwrap_err();
    match &err {
        ClientError::ServerWithoutControl { negotiated } => {
            assert_eq!(negotiated.as_deref(), Some(APP));
        }
        other => panic!("expected ServerWithoutControl, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("does not speak the control protocol"),
        "{text}"
    );
    assert!(text.contains("plain-app/1"), "{text}");
    let seen = tokio::time::timeout(Duration::from_secs(5), accepted)
        .await
        .unwrap()
        .unwrap();
    match seen {
        Err(quinn::ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(c.error_code, cwrapper::CONN_NO_CONTROL);
        }
        other => panic!("the server saw {other:?} instead of the client's close"),
    }
}
