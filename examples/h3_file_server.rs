//! An HTTP/3 file server (hyperium's `h3` over `h3-quinn`) made migratable: its quinn
//! configuration offers ALPN `h3`, and each connection the wrapper hands over becomes an
//! `h3::server::Connection`. HTTP/3 never sees the wrapper's control stream: a cwrapper client
//! negotiates the marked ALPN `qlm1+h3` and the wrapper takes its first bidirectional stream
//! before h3 accepts any; a plain HTTP/3 client negotiates `h3` and h3 gets all its streams.
//!
//! `GET /<path>` answers the file under the served directory (200), or 404 for anything else
//! (a missing file, a directory, a symlink, a path with `..`); other methods get 405.
//!
//! Files are read as they are sent (one 64 KiB chunk held per response); an optional fourth
//! argument paces each response to that many KiB per second (the end-to-end test uses it to
//! make a download last through moves). Each connection the application gets is logged as
//! `accepted ADDRESS` on standard output.
//!
//! ```sh
//! cargo run -p app-examples --example h3_file_server -- ./some-dir 127.0.0.1:4433 cert.pem [KIB_PER_S]
//! ```

use std::error::Error;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use swrapper::quinn;
use swrapper::{AppConnection, Identity, MigratableServer, ServerOptions};

/// HTTP/3's ALPN.
pub const ALPN: &[u8] = b"h3";

/// Bytes sent per DATA frame.
const CHUNK: usize = 64 * 1024;

/// The server's quinn configuration: TLS 1.3 with ALPN `h3`, and an idle timeout long enough
/// for a move (the 10 s freeze + 5 s margin: 30 s here).
pub fn server_config(identity: Identity) -> Result<quinn::ServerConfig, Box<dyn Error>> {
    let provider = Arc::new(quinn::rustls::crypto::ring::default_provider());
    let mut tls = quinn::rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&quinn::rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.certs, identity.key)?;
    tls.alpn_protocols = swrapper::alpn_with_control(&[ALPN])?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(30).try_into()?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Binds the migratable server.
pub fn bind(listen: SocketAddr, identity: Identity) -> Result<MigratableServer, Box<dyn Error>> {
    let opts = ServerOptions::with_server_config(listen, server_config(identity)?);
    Ok(MigratableServer::bind(opts)?)
}

/// Serves the files under `root` on every connection, at most `rate` bytes per second per
/// response (`None`: as fast as the connection goes).
pub async fn serve(server: MigratableServer, root: PathBuf, rate: Option<u64>) {
    let root: Arc<Path> = root.into();
    while let Some(app) = server.accept().await {
        // One line per connection the application gets: a handshake each (the end-to-end
        // test counts them).
        println!("accepted {}", app.connection.remote_address());
        let root = root.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(app, root, rate).await {
                eprintln!("connection ended: {e}");
            }
        });
    }
}

async fn serve_connection(
    app: AppConnection,
    root: Arc<Path>,
    rate: Option<u64>,
) -> Result<(), h3::error::ConnectionError> {
    let mut h3 = h3::server::Connection::new(h3_quinn::Connection::new(app.connection)).await?;
    while let Some(resolver) = h3.accept().await? {
        let root = root.clone();
        tokio::spawn(async move {
            let Ok((request, mut stream)) = resolver.resolve_request().await else {
                return;
            };
            let get = request.method() == http::Method::GET;
            let file = match file_for(&root, request.uri().path()).filter(|_| get) {
                Some(path) => tokio::fs::File::open(path).await.ok(),
                None => None,
            };
            let mut response = http::Response::new(());
            *response.status_mut() = match file {
                Some(_) => http::StatusCode::OK,
                None if !get => http::StatusCode::METHOD_NOT_ALLOWED,
                None => http::StatusCode::NOT_FOUND,
            };
            if stream.send_response(response).await.is_err() {
                return;
            }
            if let Some(file) = file
                && send_file(&mut stream, file, rate).await.is_err()
            {
                return;
            }
            let _ = stream.finish().await;
        });
    }
    Ok(())
}

/// Sends `file` as DATA frames of [`CHUNK`] bytes, read as they go (the server holds one
/// chunk per response, whatever the file's size), paced to `rate` bytes per second.
async fn send_file<S: h3::quic::SendStream<Bytes>>(
    stream: &mut h3::server::RequestStream<S, Bytes>,
    mut file: tokio::fs::File,
    rate: Option<u64>,
) -> Result<(), Box<dyn Error + Send + Sync>> {
    use tokio::io::AsyncReadExt as _;
    let started = tokio::time::Instant::now();
    let mut sent = 0u64;
    let mut buf = vec![0; CHUNK];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.send_data(Bytes::copy_from_slice(&buf[..n])).await?;
        sent += n as u64;
        if let Some(rate) = rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            tokio::time::sleep_until(started + due).await;
        }
    }
}

/// The regular file `path` names under `root`: only plain names, no `..`, no root; the file
/// itself is not a symlink.
pub fn file_for(root: &Path, path: &str) -> Option<PathBuf> {
    let relative = Path::new(path.strip_prefix('/')?);
    if relative.as_os_str().is_empty()
        || !relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    {
        return None;
    }
    let full = root.join(relative);
    std::fs::symlink_metadata(&full)
        .ok()?
        .is_file()
        .then_some(full)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    // ROOT [LISTEN [CERT_OUT [KIB_PER_S]]]
    let mut args = std::env::args().skip(1);
    let root = PathBuf::from(args.next().unwrap_or_else(|| ".".to_owned()));
    let listen: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:4433").parse()?;
    let cert_out = args.next().unwrap_or_else(|| "cert.pem".to_owned());
    let rate = match args.next() {
        Some(kib) => Some(
            kib.parse::<u64>()
                .map_err(|e| format!("KIB_PER_S {kib:?}: {e}"))?
                .saturating_mul(1024),
        ),
        None => None,
    };
    let (identity, pem) = Identity::self_signed(&["localhost".to_owned()])?;
    pem.write_cert(Path::new(&cert_out))?;
    let server = bind(listen, identity)?;
    println!(
        "serving {} over HTTP/3 on {}; clients trust {cert_out}; Ctrl-C stops",
        root.display(),
        server.local_addr()
    );
    tokio::select! {
        () = serve(server, root, rate) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
