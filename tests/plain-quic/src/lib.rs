//! A QUIC echo service that knows nothing of this project: plain quinn, no shim, no control
//! stream, no admin folder. The stable-address scenario of `cargo xtask e2e-migrate` moves
//! [`serve`]'s process behind a front address and talks to it with [`run_client`]: what any
//! unmodified server and client would be.
//!
//! ```text
//!  client ── one connection ──► server (0.0.0.0:PORT)
//!     every interval: open a bidirectional stream, send N bytes (its sequence number and a
//!     pattern), finish ─► the server echoes them and finishes ─► the client checks every byte
//! ```
//!
//! The server prints one line per accepted connection (`accepted <remote>`): the scenario
//! counts handshakes from its log. The client writes a JSON report ([`ClientReport`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The application protocol's ALPN.
pub const ALPN: &[u8] = b"plain-echo";
/// How long the client waits for its handshake.
pub const CONNECT_LIMIT: Duration = Duration::from_secs(5);
/// Largest request the server echoes.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Serves echoes on `listen` until the process ends, with a self-signed certificate for
/// `localhost` (clients of the scenario skip verification: they test transport, not PKI).
pub async fn serve(listen: SocketAddr) -> Result<()> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let key =
        quinn::rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let mut tls = quinn::rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(30).try_into()?));
    config.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::server(config, listen)?;
    println!("listening on {}", endpoint.local_addr()?);
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    println!("handshake failed: {e}");
                    return;
                }
            };
            println!("accepted {}", conn.remote_address());
            loop {
                let (mut send, mut recv) = match conn.accept_bi().await {
                    Ok(s) => s,
                    Err(e) => {
                        println!("connection ended: {e}");
                        return;
                    }
                };
                tokio::spawn(async move {
                    if let Ok(data) = recv.read_to_end(MAX_REQUEST).await {
                        let _ = send.write_all(&data).await;
                        let _ = send.finish();
                    }
                });
            }
        });
    }
    Ok(())
}

/// What the client saw.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClientReport {
    /// The server address it dialled (and kept).
    pub target: SocketAddr,
    /// Connections it made (it never makes a second one: 1 or 0).
    pub connections: u64,
    /// Echoes that came back with every byte right.
    pub echoes: u64,
    /// Echoes whose bytes were wrong.
    pub corrupted: u64,
    /// Gaps between consecutive completed echoes longer than `gap_threshold_ms`, in order:
    /// `[at_ms since start, length_ms]`.
    pub gaps: Vec<(f64, f64)>,
    /// The threshold, milliseconds.
    pub gap_threshold_ms: f64,
    /// When the echoes began (the gaps' zero), Unix time in milliseconds.
    pub started_unix_ms: f64,
    /// Why it stopped, if not asked to.
    pub error: Option<String>,
}

/// A client's settings.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub target: SocketAddr,
    pub interval: Duration,
    pub size: usize,
    pub gap_threshold: Duration,
}

/// Runs echoes over one connection until `stop` resolves or the connection fails; the
/// report either way.
pub async fn run_client(
    s: &ClientSettings,
    stop: impl std::future::Future<Output = ()>,
) -> ClientReport {
    let mut report = ClientReport {
        target: s.target,
        connections: 0,
        echoes: 0,
        corrupted: 0,
        gaps: Vec::new(),
        gap_threshold_ms: s.gap_threshold.as_secs_f64() * 1e3,
        started_unix_ms: 0.0,
        error: None,
    };
    if let Err(e) = client_inner(s, stop, &mut report).await {
        report.error = Some(format!("{e:#}"));
    }
    report
}

async fn client_inner(
    s: &ClientSettings,
    stop: impl std::future::Future<Output = ()>,
    report: &mut ClientReport,
) -> Result<()> {
    if s.size < 8 || s.size > MAX_REQUEST {
        bail!("--size must be 8..={MAX_REQUEST}");
    }
    let mut tls = quinn::rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert::new()))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(30).try_into()?));
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    config.transport_config(Arc::new(transport));
    let bind: SocketAddr = if s.target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(config);
    let conn = tokio::time::timeout(CONNECT_LIMIT, endpoint.connect(s.target, "localhost")?)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {} within {CONNECT_LIMIT:?}", s.target))?
        .with_context(|| format!("connecting to {}", s.target))?;
    report.connections = 1;
    let started = Instant::now();
    report.started_unix_ms = unix_ms();
    let mut last: Option<Instant> = None;
    let mut tick = tokio::time::interval(s.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    let mut seq: u64 = 0;
    loop {
        tokio::select! {
            () = &mut stop => return Ok(()),
            _ = tick.tick() => {}
        }
        seq += 1;
        let request = payload(seq, s.size);
        let echoed = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&request).await?;
            send.finish()?;
            anyhow::Ok(recv.read_to_end(MAX_REQUEST).await?)
        };
        // One echo at a time: its wait is the pause a request sees.
        let got = tokio::select! {
            () = &mut stop => return Ok(()),
            got = echoed => got.context("an echo failed")?,
        };
        let now = Instant::now();
        if got == request {
            report.echoes += 1;
        } else {
            report.corrupted += 1;
        }
        if let Some(prev) = last {
            let gap = now - prev;
            if gap > s.gap_threshold {
                report.gaps.push((
                    (prev - started).as_secs_f64() * 1e3,
                    gap.as_secs_f64() * 1e3,
                ));
            }
        }
        last = Some(now);
    }
}

/// Now, Unix time in milliseconds.
pub fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Request `seq`: its number, then a pattern derived from it.
pub fn payload(seq: u64, size: usize) -> Vec<u8> {
    let mut v = seq.to_be_bytes().to_vec();
    v.extend((0..size.saturating_sub(8)).map(|i| (seq as usize).wrapping_add(i) as u8));
    v
}

/// Accepts any server certificate (the scenario's server makes a new one each start).
#[derive(Debug)]
struct AnyCert(Arc<quinn::rustls::crypto::CryptoProvider>);

impl AnyCert {
    fn new() -> Self {
        Self(Arc::new(quinn::rustls::crypto::ring::default_provider()))
    }
}

impl quinn::rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &quinn::rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[quinn::rustls::pki_types::CertificateDer<'_>],
        _server_name: &quinn::rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: quinn::rustls::pki_types::UnixTime,
    ) -> Result<quinn::rustls::client::danger::ServerCertVerified, quinn::rustls::Error> {
        Ok(quinn::rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &quinn::rustls::pki_types::CertificateDer<'_>,
        dss: &quinn::rustls::DigitallySignedStruct,
    ) -> Result<quinn::rustls::client::danger::HandshakeSignatureValid, quinn::rustls::Error> {
        quinn::rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &quinn::rustls::pki_types::CertificateDer<'_>,
        dss: &quinn::rustls::DigitallySignedStruct,
    ) -> Result<quinn::rustls::client::danger::HandshakeSignatureValid, quinn::rustls::Error> {
        quinn::rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<quinn::rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_differ_by_sequence_and_carry_it() {
        let a = payload(1, 64);
        let b = payload(2, 64);
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert_eq!(u64::from_be_bytes(a[..8].try_into().unwrap()), 1);
    }

    #[tokio::test]
    async fn echoes_over_loopback_with_one_connection_and_bad_sizes_refused() {
        let port = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().port()
        };
        let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let server = tokio::spawn(serve(listen));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let settings = ClientSettings {
            target: listen,
            interval: Duration::from_millis(5),
            size: 200,
            gap_threshold: Duration::from_millis(500),
        };
        let report = run_client(&settings, tokio::time::sleep(Duration::from_millis(400))).await;
        assert_eq!(report.error, None);
        assert_eq!(report.connections, 1);
        assert!(report.echoes > 5, "{report:?}");
        assert_eq!(report.corrupted, 0);
        let bad = ClientSettings {
            size: 4,
            ..settings.clone()
        };
        let report = run_client(&bad, std::future::pending()).await;
        assert!(report.error.is_some_and(|e| e.contains("--size")));
        // Nobody there: a clear error, no connection.
        let nobody = ClientSettings {
            target: "127.0.0.1:9".parse().unwrap(),
            ..settings
        };
        let report = run_client(&nobody, tokio::time::sleep(Duration::from_secs(20))).await;
        assert_eq!(report.connections, 0);
        assert!(report.error.is_some());
        server.abort();
    }
}
