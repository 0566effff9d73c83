//! Self-signed TLS 1.3 configs for "localhost", for a quinn server and client on loopback.

use std::sync::Arc;

use quinn::{
    crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig},
    rustls::{
        self, RootCertStore,
        pki_types::{CertificateDer, PrivatePkcs8KeyDer},
    },
};

/// Errors from building the test TLS configs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// rcgen could not generate the self-signed certificate.
    #[error("cannot generate a self-signed certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused the certificate, key or protocol versions.
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The rustls config has no cipher suite usable for QUIC's initial packets.
    #[error("no initial cipher suite for QUIC: {0}")]
    NoInitialCipherSuite(#[from] NoInitialCipherSuite),
}

/// A server config and a client config sharing one fresh self-signed certificate for
/// "localhost" (ring provider, TLS 1.3 only), both offering only `alpn`. The client trusts
/// exactly that certificate: connect with server name "localhost".
pub fn configs(alpn: &[u8]) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TlsError> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let mut server_crypto = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key.into())?;
    server_crypto.alpn_protocols = vec![alpn.to_vec()];
    let server =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_crypto)?));

    let mut roots = RootCertStore::empty();
    roots.add(cert)?;
    let mut client_crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_crypto.alpn_protocols = vec![alpn.to_vec()];
    let client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_crypto)?));
    Ok((server, client))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr};

    #[tokio::test]
    async fn configs_connect_and_agree_on_alpn() {
        let (server_config, client_config) = configs(b"test-alpn").unwrap();
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let server = quinn::Endpoint::server(server_config, any).unwrap();
        let mut client = quinn::Endpoint::client(any).unwrap();
        client.set_default_client_config(client_config);
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move { server.accept().await.unwrap().await.unwrap() });
        let connection = client.connect(addr, "localhost").unwrap().await.unwrap();
        let alpn = connection
            .handshake_data()
            .unwrap()
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .unwrap()
            .protocol;
        assert_eq!(alpn.as_deref(), Some(&b"test-alpn"[..]));
        accept.await.unwrap();
    }

    #[tokio::test]
    async fn wrong_server_name_is_refused() {
        let (server_config, client_config) = configs(b"x").unwrap();
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let server = quinn::Endpoint::server(server_config, any).unwrap();
        let mut client = quinn::Endpoint::client(any).unwrap();
        client.set_default_client_config(client_config);
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            if let Some(incoming) = server.accept().await {
                let _ = incoming.await;
            }
        });
        let err = client
            .connect(addr, "example.com")
            .unwrap()
            .await
            .unwrap_err();
        assert!(
            matches!(err, quinn::ConnectionError::TransportError(_)),
            "{err:?}"
        );
    }
}
