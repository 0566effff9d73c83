//! Criterion benchmarks of the UDP shims' cost against quinn's stock socket.
//!
//! ```text
//!   client task (measured)                  server task
//!   open_bi, write, finish, read_to_end     read to end (no copy); reply: echo (<= 64 B)
//!        │  ▲                                    ▲  │           or byte count (u64)
//!   quinn client Endpoint                   quinn server Endpoint
//!        │  ▲                                    ▲  │
//!   stock socket | SwappableUdp ◀─127.0.0.1─▶ stock socket | MigratableUdp
//! ```
//!
//! Real quinn connections over loopback, one Tokio runtime (multi-thread, 2 workers) per group.
//! Each variant gets its own server endpoint, client endpoint and connection, set up before its
//! measurement and closed after it; the measured loop runs as one task on the runtime (no
//! `block_on` per iteration), so only the connection's own work is timed.
//!
//! Variants (the same in both groups):
//! - `stock`: `Endpoint::server` / `Endpoint::client`, quinn's own std socket on both ends.
//! - `shims`: server on `MigratableUdp`, client on `SwappableUdp` (what a migration runs).
//! - `client_shim`, `server_shim`: one shim, the other end stock.
//!
//! Groups:
//! - `shim_bulk`: 8 MiB written on a fresh bidirectional stream; the server reads to the end and
//!   answers with the byte count (8 bytes), which the client awaits. `Throughput::Bytes`.
//! - `shim_rtt`: 32 bytes on a fresh bidirectional stream, echoed back (one round trip).
//!
//! Every variant uses quinn's default transport and endpoint configs. No per-operation timeout:
//! quinn's idle timeout (30 s) ends a wedged connection with an error, so a slow machine only
//! makes the numbers larger, never the bench fail.

use std::error::Error;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use quinn::rustls::{
    self, RootCertStore,
    pki_types::{CertificateDer, PrivatePkcs8KeyDer},
};
use tokio::runtime::Runtime;
use udp_shim_client::SwappableUdp;
use udp_shim_server::MigratableUdp;

const MIB: usize = 1024 * 1024;
/// Bytes per bulk transfer.
const BULK: usize = 8 * MIB;
/// Bytes per round-trip request (and echo).
const PING: usize = 32;
/// Requests up to this size are echoed; larger ones are answered with their byte count.
const ECHO_MAX: usize = 64;

type BoxError = Box<dyn Error + Send + Sync>;

/// Which ends of the connection run on a shim.
#[derive(Debug, Clone, Copy)]
enum Variant {
    Stock,
    Shims,
    ClientShim,
    ServerShim,
}

impl Variant {
    const ALL: [Self; 4] = [Self::Stock, Self::Shims, Self::ClientShim, Self::ServerShim];

    fn name(self) -> &'static str {
        match self {
            Self::Stock => "stock",
            Self::Shims => "shims",
            Self::ClientShim => "client_shim",
            Self::ServerShim => "server_shim",
        }
    }

    fn server_shim(self) -> bool {
        matches!(self, Self::Shims | Self::ServerShim)
    }

    fn client_shim(self) -> bool {
        matches!(self, Self::Shims | Self::ClientShim)
    }
}

/// Server and client configs sharing one self-signed certificate for "localhost".
fn tls_configs() -> (quinn::ServerConfig, quinn::ClientConfig) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("certificate");
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let server_crypto = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key.into())
        .expect("server certificate");
    let server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_crypto).expect("QUIC server"),
    ));

    let mut roots = RootCertStore::empty();
    roots.add(cert).expect("root certificate");
    let client_crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_crypto).expect("QUIC client"),
    ));
    (server, client)
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// One connected endpoint pair.
struct Pair {
    server: quinn::Endpoint,
    client: quinn::Endpoint,
    connection: quinn::Connection,
    server_shim: Option<Arc<MigratableUdp>>,
    client_shim: Option<Arc<SwappableUdp>>,
}

impl Pair {
    async fn connect(
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

    /// Closes the connection and both endpoints; reports datagrams the shims dropped.
    async fn close(self) {
        self.connection.close(0_u32.into(), b"done");
        self.client.close(0_u32.into(), b"done");
        self.server.close(0_u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.wait_idle()).await;
        if let Some(shim) = &self.client_shim {
            let s = shim.stats();
            if s.dropped_foreign + s.dropped_send_errors + s.recv_errors > 0 {
                eprintln!("  client shim dropped datagrams: {s:?}");
            }
        }
        if let Some(shim) = &self.server_shim {
            let s = shim.stats();
            if s.dropped_send_errors + s.dropped_parked + s.recv_errors > 0 {
                eprintln!("  server shim dropped datagrams: {s:?}");
            }
        }
    }
}

/// Accepts connections and answers every bidirectional stream (see [`answer`]).
async fn serve(endpoint: quinn::Endpoint) {
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
async fn answer(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
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
async fn exchange(connection: &quinn::Connection, request: &[u8]) -> Result<Vec<u8>, BoxError> {
    let (mut send, mut recv) = connection.open_bi().await?;
    send.write_all(request).await?;
    send.finish()?;
    Ok(recv.read_to_end(ECHO_MAX).await?)
}

/// Runs `iters` exchanges of `request` as one task on the runtime and returns their time.
/// Every answer is checked against `expected`.
fn timed(
    rt: &Runtime,
    connection: &quinn::Connection,
    request: &Arc<Vec<u8>>,
    expected: &Arc<Vec<u8>>,
    iters: u64,
) -> Duration {
    let connection = connection.clone();
    let request = request.clone();
    let expected = expected.clone();
    let task = rt.spawn(async move {
        let start = Instant::now();
        for _ in 0..iters {
            let answer = exchange(&connection, &request).await?;
            if answer != *expected {
                return Err(BoxError::from(format!(
                    "unexpected answer: {} bytes",
                    answer.len()
                )));
            }
        }
        Ok(start.elapsed())
    });
    rt.block_on(task)
        .expect("bench task panicked")
        .expect("exchange failed")
}

/// Benchmarks one request shape in group `group` for every [`Variant`].
fn run_group(c: &mut Criterion, group: &str, request: Vec<u8>, expected: Vec<u8>, size: &str) {
    let rt = runtime();
    let (server_config, client_config) = tls_configs();
    let request = Arc::new(request);
    let expected = Arc::new(expected);
    let mut g = c.benchmark_group(group);
    if request.len() > ECHO_MAX {
        g.throughput(Throughput::Bytes(request.len() as u64));
    }
    for variant in Variant::ALL {
        let pair = rt
            .block_on(Pair::connect(
                variant,
                server_config.clone(),
                client_config.clone(),
            ))
            .expect("connecting over loopback");
        g.bench_function(BenchmarkId::new(variant.name(), size), |b| {
            b.iter_custom(|iters| timed(&rt, &pair.connection, &request, &expected, iters))
        });
        rt.block_on(pair.close());
    }
    g.finish();
}

fn shim_bulk(c: &mut Criterion) {
    let request: Vec<u8> = (0..BULK).map(|i| (i % 251) as u8).collect();
    let expected = (BULK as u64).to_le_bytes().to_vec();
    run_group(c, "shim_bulk", request, expected, "8MiB");
}

fn shim_rtt(c: &mut Criterion) {
    let request: Vec<u8> = (0..PING).map(|i| i as u8).collect();
    let expected = request.clone();
    run_group(c, "shim_rtt", request, expected, "32B");
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
}

criterion_group! {
    name = benches;
    config = config();
    targets = shim_bulk, shim_rtt
}
criterion_main!(benches);
