//! `plain-echo-server --listen 0.0.0.0:4242`: a QUIC echo server that knows nothing of this
//! project (see the crate's documentation).

use clap::Parser;

/// A plain QUIC echo server (quinn, self-signed certificate for localhost, ALPN plain-echo).
#[derive(Debug, Parser)]
struct Args {
    /// Where to listen (bind the wildcard address to be movable behind a front).
    #[arg(long, default_value = "0.0.0.0:4242")]
    listen: std::net::SocketAddr,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // One thread: CRIU seizes and dumps it faster.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(plain_quic::serve(args.listen))
}
