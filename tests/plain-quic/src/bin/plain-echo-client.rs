//! `plain-echo-client --target ADDR --json FILE`: echoes over one plain QUIC connection until
//! SIGINT or SIGTERM, then writes its report (see the crate's documentation).

use std::time::Duration;

use anyhow::Context;
use clap::Parser;

/// A plain QUIC echo client (quinn, no shim): one connection, one echo at a time.
#[derive(Debug, Parser)]
struct Args {
    /// The server.
    #[arg(long)]
    target: std::net::SocketAddr,
    /// Where to write the JSON report when stopped.
    #[arg(long)]
    json: std::path::PathBuf,
    /// Milliseconds between echoes.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    interval_ms: u64,
    /// Bytes per echo (8 to 65536).
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Gaps between echoes longer than this are reported, milliseconds.
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..))]
    gap_ms: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let settings = plain_quic::ClientSettings {
        target: args.target,
        interval: Duration::from_millis(args.interval_ms),
        size: args.size,
        gap_threshold: Duration::from_millis(args.gap_ms),
    };
    let report = rt.block_on(async {
        let stop = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        plain_quic::run_client(&settings, stop).await
    });
    std::fs::write(&args.json, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    if let Some(e) = &report.error {
        anyhow::bail!("{e}");
    }
    Ok(())
}
