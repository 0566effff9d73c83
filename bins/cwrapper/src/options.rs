//! How a [`MigratingClient`](crate::MigratingClient) is set up: the application's own quinn
//! client configuration or one the wrapper builds, and the caps of a move's overlap.

use std::net::SocketAddr;
use std::time::Duration;

use quinn::rustls::pki_types::CertificateDer;
use udp_shim_client::OverlapLimits;
use wrapper_support::quic::Side;
use wrapper_support::{ConfigError, TlsError, TransportFacts};

/// How the client is set up.
///
/// ```text
///  ClientOptions::new(server, name, roots, alpn, client_id)          the wrapper's config
///  ClientOptions::with_client_config(server, name, config, client_id) the application's own
/// ```
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The server's first address.
    pub server: SocketAddr,
    /// The name the server's certificate is issued for.
    pub server_name: String,
    /// The quinn client configuration, or what to build one from.
    pub quic: ClientQuic,
    /// What the client calls itself in Hello.
    pub client_id: String,
    /// Local address to bind (default: any address, any port, of the server's family).
    pub bind: Option<SocketAddr>,
    /// How long the handshake may take.
    pub connect_timeout: Duration,
    /// Caps on a move's overlap (duplicate sends to the new address until the server confirms
    /// it runs there): default 10 s and 16 MiB, see [`OverlapLimits`]. The time cap is the
    /// longest freeze this client waits for: the idle timeout must exceed it by
    /// [`IDLE_MARGIN`](crate::IDLE_MARGIN).
    pub overlap_limits: OverlapLimits,
    /// How long after `Resumed` the application has to report its downtime
    /// ([`MigratingClient::report_downtime`](crate::MigratingClient::report_downtime)) before
    /// the transport's pause is reported for it (default 1 s; `None`: never). See the crate
    /// doc.
    pub auto_downtime: Option<Duration>,
    /// The endpoint's configuration (connection ids, largest UDP payload, QUIC versions);
    /// quinn's default unless set.
    pub endpoint_config: quinn::EndpointConfig,
}

/// Where the client's quinn configuration comes from.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ClientQuic {
    /// The wrapper builds it: TLS 1.3 (ring) trusting `roots` only, offering `alpn`, quinn's
    /// default transport but for the idle timeout.
    Generated {
        /// Certificates to trust (the server's self-signed one, or its CA).
        roots: Vec<CertificateDer<'static>>,
        /// ALPN protocols offered.
        alpn: Vec<Vec<u8>>,
        /// Connection idle timeout; must outlast the longest freeze.
        idle_timeout: Duration,
    },
    /// The application's own (its TLS, ALPN, transport: keep-alive, idle timeout, ...), used
    /// as given: the wrapper adds nothing to it and only checks it (see
    /// [`ClientOptions::check`]).
    Own(quinn::ClientConfig),
}

impl ClientOptions {
    /// Options with the defaults of the demo: a configuration built from `roots` and `alpn`
    /// with a 30 s idle timeout, 10 s to connect.
    pub fn new(
        server: SocketAddr,
        server_name: impl Into<String>,
        roots: Vec<CertificateDer<'static>>,
        alpn: Vec<Vec<u8>>,
        client_id: impl Into<String>,
    ) -> Self {
        Self::with_quic(
            server,
            server_name.into(),
            ClientQuic::Generated {
                roots,
                alpn,
                idle_timeout: Duration::from_secs(30),
            },
            client_id.into(),
        )
    }

    /// Options that dial with the application's own quinn client configuration: its TLS
    /// (roots, ALPN, client certificate), its `TransportConfig` (keep-alive, idle timeout,
    /// windows). One thing is the wrapper's: the config's ALPN list must be
    /// [`alpn_with_control`](crate::alpn_with_control)`(&[your ALPNs])`, or the server
    /// negotiates no marker and the connect fails with `ClientError::ServerWithoutControl`; and
    /// [`MigratingClient::connect`](crate::MigratingClient::connect) refuses, with a
    /// [`ConfigError`], an idle timeout shorter than the overlap's time cap +
    /// [`IDLE_MARGIN`](crate::IDLE_MARGIN) (15 s by default).
    pub fn with_client_config(
        server: SocketAddr,
        server_name: impl Into<String>,
        config: quinn::ClientConfig,
        client_id: impl Into<String>,
    ) -> Self {
        Self::with_quic(
            server,
            server_name.into(),
            ClientQuic::Own(config),
            client_id.into(),
        )
    }

    fn with_quic(
        server: SocketAddr,
        server_name: String,
        quic: ClientQuic,
        client_id: String,
    ) -> Self {
        Self {
            server,
            server_name,
            quic,
            client_id,
            bind: None,
            connect_timeout: Duration::from_secs(10),
            overlap_limits: OverlapLimits::default(),
            auto_downtime: Some(Duration::from_secs(1)),
            endpoint_config: quinn::EndpointConfig::default(),
        }
    }

    /// Whether the quinn configuration can carry a move (what `connect` checks): its idle
    /// timeout against the overlap's time cap, the longest freeze this client waits for. Also
    /// what the wrapper read from it.
    pub fn check(&self) -> Result<TransportFacts, ConfigError> {
        let facts = match &self.quic {
            ClientQuic::Generated { idle_timeout, .. } => {
                let mut facts = TransportFacts::of_transport(&quinn::TransportConfig::default())?;
                facts.idle_timeout = Some(*idle_timeout).filter(|d| !d.is_zero());
                facts
            }
            ClientQuic::Own(config) => TransportFacts::of_client(config)?,
        };
        facts.check(Side::Client, self.overlap_limits.max_duration)?;
        Ok(facts)
    }
}

impl ClientQuic {
    /// The quinn client configuration: the application's, or one built from the roots.
    pub(crate) fn into_config(self) -> Result<quinn::ClientConfig, TlsError> {
        match self {
            ClientQuic::Generated {
                roots,
                alpn,
                idle_timeout,
            } => {
                let alpn: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
                crate::client_config(&roots, &alpn, idle_timeout)
            }
            ClientQuic::Own(config) => Ok(config),
        }
    }
}

// The demo feature brings wrapper-support's self-signed certificates, for a root to trust.
#[cfg(test)]
#[cfg(feature = "demo")]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{ClientError, MigratingClient};

    fn server() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    /// An application's own client configuration with `idle` and `keep_alive`.
    fn own(idle: Option<Duration>, keep_alive: Option<Duration>) -> quinn::ClientConfig {
        let (identity, _) =
            wrapper_support::Identity::self_signed(&["localhost".to_owned()]).unwrap();
        let mut store = quinn::rustls::RootCertStore::empty();
        store.add(identity.certs[0].clone()).unwrap();
        let mut config = quinn::ClientConfig::with_root_certificates(Arc::new(store)).unwrap();
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(idle.map(|d| d.try_into().unwrap()))
            .keep_alive_interval(keep_alive);
        config.transport_config(Arc::new(t));
        config
    }

    #[test]
    fn the_idle_timeout_is_checked_against_the_overlap_cap() {
        let short = ClientOptions::with_client_config(
            server(),
            "localhost",
            own(Some(Duration::from_secs(5)), Some(Duration::from_secs(1))),
            "c",
        );
        let err = short.check().unwrap_err();
        assert_eq!(
            err,
            ConfigError::IdleTimeoutTooShort {
                idle: Duration::from_secs(5),
                needed: Duration::from_secs(15),
                max_freeze: OverlapLimits::DEFAULT_MAX_DURATION,
            }
        );
        // The keep-alive was read from the application's config.
        let mut relaxed = short.clone();
        relaxed.overlap_limits = OverlapLimits::new(Duration::ZERO, 1);
        assert_eq!(
            relaxed.check().unwrap().keep_alive,
            Some(Duration::from_secs(1))
        );

        // Without an idle timeout, or keep-alive absent with a long one: fine.
        for config in [own(None, None), own(Some(Duration::from_secs(600)), None)] {
            ClientOptions::with_client_config(server(), "localhost", config, "c")
                .check()
                .unwrap();
        }

        // The default config (30 s) against a raised cap of 30 s: refused, 35 s needed.
        let mut raised = ClientOptions::new(server(), "localhost", Vec::new(), Vec::new(), "c");
        raised.check().unwrap();
        raised.overlap_limits = OverlapLimits::new(Duration::from_secs(30), 1);
        assert!(matches!(
            raised.check(),
            Err(ConfigError::IdleTimeoutTooShort { needed, .. }) if needed == Duration::from_secs(35)
        ));
        if let ClientQuic::Generated { idle_timeout, .. } = &mut raised.quic {
            *idle_timeout = Duration::from_secs(35);
        }
        raised.check().unwrap();
    }

    #[tokio::test]
    async fn connect_refuses_before_sending_anything() {
        let opts = ClientOptions::with_client_config(
            server(),
            "localhost",
            own(Some(Duration::from_secs(3)), None),
            "c",
        );
        let err = MigratingClient::connect(opts).await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Config(ConfigError::IdleTimeoutTooShort { .. })
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("quinn configuration: idle timeout 3s"),
            "{err}"
        );
    }
}
