//! A quinn server that has its own `ServerConfig` (TLS, ALPN, stream limits, keep-alive, idle
//! timeout), made migratable: only the bind and the accept loop change. It also validates
//! client addresses with a stateless Retry, through the wrapper's incoming filter.
//!
//! The application: every bidirectional stream is one request, answered in upper case.
//!
//! ```sh
//! cargo run -p app-examples --example own_server_config -- 127.0.0.1:4433 cert.pem
//! cargo run -p app-examples --example client_keep_alive -- 127.0.0.1:4433 cert.pem
//! ```

use std::error::Error;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use swrapper::quinn;
use swrapper::{AppConnection, Identity, IncomingAction, MigratableServer, ServerOptions};

/// The application's protocol.
pub const ALPN: &[u8] = b"upper/1";

/// Requests the application serves at once on one connection.
pub const APP_STREAMS: u32 = 2;

/// Largest request read.
const MAX_REQUEST: usize = 64 * 1024;

/// The configuration the application had before it used the wrapper, unchanged but for two
/// things: its ALPN list gets the marked forms first (`swrapper::alpn_with_control`: how the
/// wrapper tells cwrapper clients from plain ones), and one more bidirectional stream than
/// the application serves (a cwrapper client's control stream takes the first). Its idle timeout (60 s) outlasts the longest
/// freeze (10 s) plus the margin (5 s), else `MigratableServer::bind` refuses it.
pub fn server_config(identity: Identity) -> Result<quinn::ServerConfig, Box<dyn Error>> {
    let provider = Arc::new(quinn::rustls::crypto::ring::default_provider());
    let mut tls = quinn::rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&quinn::rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.certs, identity.key)?;
    // The application's ALPN, and its marked form first for cwrapper clients (plain QUIC
    // clients negotiate the plain one and get every stream).
    tls.alpn_protocols = swrapper::alpn_with_control(&[ALPN])?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams((APP_STREAMS + 1).into())
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_idle_timeout(Some(Duration::from_secs(60).try_into()?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Binds the migratable server: the application's configuration, and a filter that has every
/// client prove its address (a Retry) before the handshake.
pub fn bind(
    listen: SocketAddr,
    config: quinn::ServerConfig,
) -> Result<MigratableServer, swrapper::ServerError> {
    let opts = ServerOptions::with_server_config(listen, config).filter_incoming(|incoming| {
        if incoming.remote_address_validated() {
            IncomingAction::Accept
        } else {
            IncomingAction::Retry
        }
    });
    MigratableServer::bind(opts)
}

/// The application's accept loop: as with a plain quinn endpoint, but each connection's
/// control stream is already taken care of.
pub async fn serve(server: MigratableServer) {
    while let Some(app) = server.accept().await {
        tokio::spawn(serve_connection(app));
    }
}

async fn serve_connection(app: AppConnection) {
    while let Ok((mut send, mut recv)) = app.connection.accept_bi().await {
        tokio::spawn(async move {
            let Ok(request) = recv.read_to_end(MAX_REQUEST).await else {
                return;
            };
            if send.write_all(&request.to_ascii_uppercase()).await.is_ok() {
                let _ = send.finish();
            }
        });
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:4433").parse()?;
    let cert_out = args.next().unwrap_or_else(|| "cert.pem".to_owned());
    let (identity, pem) = Identity::self_signed(&["localhost".to_owned()])?;
    pem.write_cert(Path::new(&cert_out))?;
    let server = bind(listen, server_config(identity)?)?;
    println!(
        "serving {} on {}; clients trust {cert_out}; Ctrl-C stops",
        String::from_utf8_lossy(ALPN),
        server.local_addr()
    );
    tokio::select! {
        () = serve(server) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
