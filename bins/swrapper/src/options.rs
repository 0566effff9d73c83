//! How a [`MigratableServer`](crate::MigratableServer) is set up: the application's own quinn
//! configuration or one the wrapper builds, the session limits, and a say on every incoming
//! connection before its handshake.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use wrapper_support::quic::Side;
use wrapper_support::{ConfigError, DEFAULT_MAX_FREEZE, Identity, TlsError, TransportFacts};

/// How the server is set up.
///
/// ```text
///  ServerOptions::new(listen, identity, alpn)          the wrapper builds the quinn config
///  ServerOptions::with_server_config(listen, config)   the application's own quinn config
///     .filter_incoming(|incoming| IncomingAction::..)  optional: refuse / retry / ignore
/// ```
#[derive(Debug)]
pub struct ServerOptions {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The quinn server configuration, or what to build one from.
    pub quic: ServerQuic,
    /// Most connections held at once: wrapper-aware ones (registered or still to say Hello)
    /// and plain QUIC clients alike.
    pub max_sessions: usize,
    /// How long a new wrapper-aware connection (marker ALPN) has to open its control stream
    /// and say Hello; a plain QUIC client has no such deadline.
    pub hello_timeout: Duration,
    /// The longest freeze a move of this server may cause (the clients' overlap cap): the
    /// idle timeout must exceed it by [`IDLE_MARGIN`](crate::IDLE_MARGIN). Default
    /// [`DEFAULT_MAX_FREEZE`] (10 s, cwrapper's default cap).
    pub max_freeze: Duration,
    /// The endpoint's configuration (connection ids, largest UDP payload, QUIC versions);
    /// quinn's default unless set.
    pub endpoint_config: quinn::EndpointConfig,
    /// Decides on each incoming connection before its handshake; every one is accepted
    /// without.
    pub incoming_filter: Option<IncomingFilter>,
}

/// Where the server's quinn configuration comes from.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServerQuic {
    /// The wrapper builds it: TLS 1.3 (ring) with `identity`, offering `alpn`, quinn's
    /// default transport but for the idle timeout.
    Generated {
        /// Certificate chain and key.
        identity: Identity,
        /// ALPN protocols offered.
        alpn: Vec<Vec<u8>>,
        /// Connection idle timeout; must outlast the longest freeze.
        idle_timeout: Duration,
    },
    /// The application's own (its TLS, ALPN, transport: stream limits, keep-alive, idle
    /// timeout, ...), used as given: the wrapper adds nothing to it and only checks it (see
    /// [`ServerOptions::check`]).
    Own(quinn::ServerConfig),
}

impl ServerOptions {
    /// Options with the defaults of the demo: a configuration built from `identity` and `alpn`
    /// with a 30 s idle timeout, 1024 sessions, 5 s for Hello.
    pub fn new(listen: SocketAddr, identity: Identity, alpn: Vec<Vec<u8>>) -> Self {
        Self::with_quic(
            listen,
            ServerQuic::Generated {
                identity,
                alpn,
                idle_timeout: Duration::from_secs(30),
            },
        )
    }

    /// Options that serve with the application's own quinn configuration: its TLS (and
    /// ALPN), its `TransportConfig`, its validation tokens. One thing is the wrapper's: the
    /// config's ALPN list must be [`alpn_with_control`](crate::alpn_with_control)`(&[your
    /// ALPNs])` (each marked form first, then the plain ones), or every cwrapper client is
    /// treated as a plain QUIC client (and refuses the server: `ServerWithoutControl`); and [`MigratableServer::bind`](crate::MigratableServer::bind)
    /// refuses, with a [`ConfigError`], a configuration that cannot carry a move: an idle
    /// timeout shorter than [`ServerOptions::max_freeze`] + [`IDLE_MARGIN`](crate::IDLE_MARGIN)
    /// (15 s by default), or no bidirectional stream for clients (the control stream takes
    /// one of `max_concurrent_bidi_streams`: allow one more than the application needs).
    pub fn with_server_config(listen: SocketAddr, config: quinn::ServerConfig) -> Self {
        Self::with_quic(listen, ServerQuic::Own(config))
    }

    fn with_quic(listen: SocketAddr, quic: ServerQuic) -> Self {
        Self {
            listen,
            quic,
            max_sessions: 1024,
            hello_timeout: Duration::from_secs(5),
            max_freeze: DEFAULT_MAX_FREEZE,
            endpoint_config: quinn::EndpointConfig::default(),
            incoming_filter: None,
        }
    }

    /// Has `filter` decide on every incoming connection before its handshake (see
    /// [`IncomingAction`]).
    pub fn filter_incoming(
        mut self,
        filter: impl Fn(&quinn::Incoming) -> IncomingAction + Send + Sync + 'static,
    ) -> Self {
        self.incoming_filter = Some(IncomingFilter(Arc::new(filter)));
        self
    }

    /// Whether the quinn configuration can carry a move (what `bind` checks), and what the
    /// wrapper read from it.
    pub fn check(&self) -> Result<TransportFacts, ConfigError> {
        let facts = match &self.quic {
            ServerQuic::Generated { idle_timeout, .. } => {
                let mut facts = TransportFacts::of_transport(&quinn::TransportConfig::default())?;
                facts.idle_timeout = Some(*idle_timeout).filter(|d| !d.is_zero());
                facts
            }
            ServerQuic::Own(config) => TransportFacts::of_server(config)?,
        };
        facts.check(Side::Server, self.max_freeze)?;
        Ok(facts)
    }
}

impl ServerQuic {
    /// The quinn server configuration: the application's, or one built from the identity.
    pub(crate) fn into_config(self) -> Result<quinn::ServerConfig, TlsError> {
        match self {
            ServerQuic::Generated {
                identity,
                alpn,
                idle_timeout,
            } => {
                let transport = wrapper_support::tls::transport_config(idle_timeout)?;
                let alpn: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
                wrapper_support::tls::server_config(identity, &alpn, transport)
            }
            ServerQuic::Own(config) => Ok(config),
        }
    }
}

/// What the wrapper does with an incoming connection (the answer of an
/// [`ServerOptions::filter_incoming`] filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IncomingAction {
    /// Handshake, then the control stream, then [`accept`](crate::MigratableServer::accept).
    Accept,
    /// Refuse it (`CONNECTION_REFUSED`), statelessly.
    Refuse,
    /// Validate the client's address first with a stateless Retry; the filter then sees the
    /// connection again, its address validated. An address that is already validated
    /// (`remote_address_validated()`, so `may_retry()` is false) is accepted.
    Retry,
    /// Drop it silently.
    Ignore,
}

/// A filter on incoming connections (see [`ServerOptions::filter_incoming`]).
#[derive(Clone)]
pub struct IncomingFilter(pub(crate) Arc<dyn Fn(&quinn::Incoming) -> IncomingAction + Send + Sync>);

impl fmt::Debug for IncomingFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IncomingFilter(..)")
    }
}
