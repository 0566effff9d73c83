//! A quinn client with its own `ClientConfig` (its roots, ALPN and transport: keep-alive, idle
//! timeout), made migratable: `MigratingClient::connect` instead of `Endpoint::connect`. The
//! keep-alive keeps an idle connection open between moves; during a move's freeze nothing
//! answers, so what carries the connection through it is the idle timeout, which must
//! outlast the longest freeze (the overlap's 10 s cap) plus 5 s, or `connect` refuses it.
//!
//! Talks to the `own_server_config` example:
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

use cwrapper::quinn;
use cwrapper::quinn::rustls::pki_types::CertificateDer;
use cwrapper::{ClientOptions, MigratingClient};

/// The protocol of the `own_server_config` example.
pub const ALPN: &[u8] = b"upper/1";

/// The application's own configuration: TLS 1.3 trusting `roots`, its ALPN, and its
/// transport: a keep-alive every `keep_alive` (none: `None`) and an idle timeout of `idle`.
pub fn client_config(
    roots: &[CertificateDer<'static>],
    keep_alive: Option<Duration>,
    idle: Duration,
) -> Result<quinn::ClientConfig, Box<dyn Error>> {
    let mut store = quinn::rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone())?;
    }
    let provider = Arc::new(quinn::rustls::crypto::ring::default_provider());
    let mut tls = quinn::rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&quinn::rustls::version::TLS13])?
        .with_root_certificates(store)
        .with_no_client_auth();
    // The marked form first: it tells swrapper that this client opens the control stream.
    tls.alpn_protocols = cwrapper::alpn_with_control(&[ALPN])?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(keep_alive)
        .max_idle_timeout(Some(idle.try_into()?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The wrapper's options around the application's configuration.
pub fn options(server: SocketAddr, config: quinn::ClientConfig) -> ClientOptions {
    ClientOptions::with_client_config(server, "localhost", config, "keep-alive-example")
}

/// One request of the application: a fresh bidirectional stream, the text, the answer.
pub async fn request(client: &MigratingClient, text: &str) -> Result<String, Box<dyn Error>> {
    let (mut send, mut recv) = client.connection().open_bi().await?;
    send.write_all(text.as_bytes()).await?;
    send.finish()?;
    let answer = recv.read_to_end(64 * 1024).await?;
    Ok(String::from_utf8(answer)?)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let server: SocketAddr = args.next().as_deref().unwrap_or("127.0.0.1:4433").parse()?;
    let cert = args.next().unwrap_or_else(|| "cert.pem".to_owned());
    let roots = cwrapper::load_certs(Path::new(&cert))?;
    let config = client_config(
        &roots,
        Some(Duration::from_secs(5)),
        Duration::from_secs(30),
    )?;
    let client = MigratingClient::connect(options(server, config)).await?;
    println!("{}", request(&client, "hello").await?);
    // Idle for longer than the idle timeout: the keep-alive holds the connection open, and a
    // move meanwhile is followed (printed at the end).
    tokio::time::sleep(Duration::from_secs(40)).await;
    println!("{}", request(&client, "still here").await?);
    for seen in client.status().migrations {
        println!("followed migration {} to {}", seen.id, seen.new_addr);
    }
    client.close("done").await;
    Ok(())
}
