//! What the shim measurements share: the criterion bench `benches/shims.rs` (time) and the
//! `shim_cost` binary (instructions, under callgrind) set up the same connections and exchange
//! the same requests, so that their figures compare the same work.
//!
//! ```text
//!   client (measured)                       server task
//!   exchange: open_bi, write, finish,       answer: read to end (no copy);
//!             read_to_end                           echo (<= ECHO_MAX) or byte count (u64)
//!        │  ▲                                    ▲  │
//!   stock socket | SwappableUdp ◀─127.0.0.1─▶ stock socket | MigratableUdp
//! ```
//!
//! The criterion benches of the migration data path live in `benches/pipeline.rs`.
//!
//! [`timeline`]: what the `bench_client` program records during moves (echo latencies, bulk
//! goodput, reconnects) and the pure computations over it (pause, steady goodput, recovery).

use std::error::Error;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use udp_shim_client::SwappableUdp;
use udp_shim_server::MigratableUdp;

pub mod timeline;

/// Requests up to this size are echoed; larger ones are answered with their byte count.
pub const ECHO_MAX: usize = 64;

/// Errors of the measurements (they end the run).
pub type BoxError = Box<dyn Error + Send + Sync>;

/// Which ends of the connection run on a shim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// quinn's own socket on both ends.
    Stock,
    /// Server on `MigratableUdp`, client on `SwappableUdp` (what a migration runs).
    Shims,
    /// Only the client on its shim.
    ClientShim,
    /// Only the server on its shim.
    ServerShim,
}

impl Variant {
    /// Every variant, stock first.
    pub const ALL: [Self; 4] = [Self::Stock, Self::Shims, Self::ClientShim, Self::ServerShim];

    /// The name used in benchmark ids and on command lines.
    pub fn name(self) -> &'static str {
        match self {
            Self::Stock => "stock",
            Self::Shims => "shims",
            Self::ClientShim => "client_shim",
            Self::ServerShim => "server_shim",
        }
    }

    /// The variant with this [`Variant::name`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == s)
    }

    fn server_shim(self) -> bool {
        matches!(self, Self::Shims | Self::ServerShim)
    }

    fn client_shim(self) -> bool {
        matches!(self, Self::Shims | Self::ClientShim)
    }
}

/// Server and client configs sharing one self-signed certificate for "localhost", each with
/// the settings `transport` builds (quinn's `TransportConfig` is not `Clone`).
pub fn tls_configs(
    transport: impl Fn() -> quinn::TransportConfig,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), BoxError> {
    use wrapper_support::tls;
    let (identity, _) = wrapper_support::Identity::self_signed(&["localhost".to_owned()])?;
    let roots = identity.certs.clone();
    let server = tls::server_config(identity, &[], transport())?;
    let client = tls::client_config(&roots, &[], transport())?;
    Ok((server, client))
}

/// One connected endpoint pair of a [`Variant`], the server answering with [`answer`].
#[derive(Debug)]
pub struct Pair {
    /// The server endpoint.
    pub server: quinn::Endpoint,
    /// The client endpoint.
    pub client: quinn::Endpoint,
    /// The client's connection.
    pub connection: quinn::Connection,
    /// The server's shim, when the variant has one.
    pub server_shim: Option<Arc<MigratableUdp>>,
    /// The client's shim, when the variant has one.
    pub client_shim: Option<Arc<SwappableUdp>>,
}

impl Pair {
    /// Binds both ends on 127.0.0.1 and connects. Call inside a tokio runtime.
    pub async fn connect(
        variant: Variant,
        server_config: quinn::ServerConfig,
        client_config: quinn::ClientConfig,
    ) -> Result<Self, BoxError> {
        let any_port = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let (server, server_shim) = if variant.server_shim() {
            let shim = Arc::new(MigratableUdp::bind(any_port)?);
            let endpoint = udp_shim_server::server_endpoint(shim.clone(), server_config)?;
            (endpoint, Some(shim))
        } else {
            (quinn::Endpoint::server(server_config, any_port)?, None)
        };
        let server_addr = server.local_addr()?;
        tokio::spawn(serve(server.clone()));

        let (client, client_shim, remote) = if variant.client_shim() {
            let shim = Arc::new(SwappableUdp::bind(any_port, server_addr)?);
            let endpoint = udp_shim_client::client_endpoint(shim.clone())?;
            let fake = shim.fake_peer();
            (endpoint, Some(shim), fake)
        } else {
            (quinn::Endpoint::client(any_port)?, None, server_addr)
        };
        let connection = client
            .connect_with(client_config, remote, "localhost")?
            .await?;
        Ok(Self {
            server,
            client,
            connection,
            server_shim,
            client_shim,
        })
    }

    /// Closes the connection and both endpoints, waiting at most `drain` for the client's
    /// draining period (zero: do not wait).
    pub async fn close(&self, drain: Duration) {
        self.connection.close(0_u32.into(), b"done");
        self.client.close(0_u32.into(), b"done");
        self.server.close(0_u32.into(), b"done");
        if !drain.is_zero() {
            let _ = tokio::time::timeout(drain, self.client.wait_idle()).await;
        }
    }
}

/// Accepts connections and answers every bidirectional stream (see [`answer`]).
pub async fn serve(endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            while let Ok((send, recv)) = connection.accept_bi().await {
                tokio::spawn(answer(send, recv));
            }
        });
    }
}

/// Reads the stream to its end without copying; echoes it if it is at most [`ECHO_MAX`]
/// bytes, else answers with its length (u64, little endian).
pub async fn answer(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut head = Vec::with_capacity(ECHO_MAX);
    let mut total = 0_usize;
    loop {
        match recv.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => {
                total += chunk.bytes.len();
                let room = ECHO_MAX.saturating_sub(head.len());
                head.extend_from_slice(&chunk.bytes[..room.min(chunk.bytes.len())]);
            }
            Ok(None) => break,
            Err(_) => return,
        }
    }
    let reply = if total <= ECHO_MAX {
        head
    } else {
        (total as u64).to_le_bytes().to_vec()
    };
    if send.write_all(&reply).await.is_ok() {
        let _ = send.finish();
    }
}

/// Sends `request` on a fresh bidirectional stream and returns the whole answer.
pub async fn exchange(connection: &quinn::Connection, request: &[u8]) -> Result<Vec<u8>, BoxError> {
    let (mut send, mut recv) = connection.open_bi().await?;
    send.write_all(request).await?;
    send.finish()?;
    Ok(recv.read_to_end(ECHO_MAX).await?)
}

/// A request of `len` bytes and the answer [`answer`] gives to it.
pub fn request_and_answer(len: usize) -> (Vec<u8>, Vec<u8>) {
    let request: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let expected = if len <= ECHO_MAX {
        request.clone()
    } else {
        (len as u64).to_le_bytes().to_vec()
    };
    (request, expected)
}
