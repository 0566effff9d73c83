//! `shim_cost`: a fixed amount of QUIC work over loopback, for counting instructions.
//!
//! ```text
//!   --count N exchanges (one fresh bidirectional stream each)
//!   client task                               server task
//!   open_bi, write, finish, read_to_end       read to end (no copy); reply: echo (rtt)
//!        │  ▲                                      ▲  │           or byte count (bulk)
//!   quinn client Endpoint                     quinn server Endpoint
//!        │  ▲                                      ▲  │
//!   stock socket | SwappableUdp ◀─127.0.0.1─▶ stock socket | MigratableUdp
//!   └───────────── one thread: Tokio current_thread runtime ─────────────┘
//! ```
//!
//! Run under `valgrind --tool=callgrind` by `cargo xtask shim-cost`, twice per variant with two
//! counts: the difference of the two instruction counts divided by the difference of the counts
//! is the cost of one exchange, without the set-up (certificate, TLS handshake, runtime). The
//! same workload as the criterion bench `benches/shims.rs`, on one thread so that the count does
//! not depend on how threads interleave.
//!
//! ```text
//! shim_cost --variant stock|shims|client_shim|server_shim --mode rtt|bulk --count N
//! ```
//!
//! - `rtt`: 32 bytes on a fresh stream, echoed back (one round trip each).
//! - `bulk`: 256 KiB on a fresh stream; the server answers with the byte count (u64 LE).
//!
//! Exits 0 when every answer was right; prints one summary line on stdout (with quinn's UDP
//! I/O counts, since callgrind does not see the kernel's share of the work).

use std::process::ExitCode;
use std::time::Duration;

use migration_benches::{BoxError, Pair, Variant, exchange, request_and_answer};

/// Bytes per round-trip request (and echo).
const PING: usize = 32;
/// Bytes per bulk transfer.
const BULK: usize = 256 * 1024;
/// Flow-control window (connection and stream) of both ends: see [`transport`].
const WINDOW: u32 = 96 * 1024;

const USAGE: &str =
    "usage: shim_cost --variant stock|shims|client_shim|server_shim --mode rtt|bulk --count N";

/// The exchange repeated `count` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Rtt,
    Bulk,
}

impl Mode {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "rtt" => Some(Self::Rtt),
            "bulk" => Some(Self::Bulk),
            _ => None,
        }
    }

    /// The request and the answer expected for it.
    fn request_and_answer(self) -> (Vec<u8>, Vec<u8>) {
        request_and_answer(match self {
            Self::Rtt => PING,
            Self::Bulk => BULK,
        })
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Args {
    variant: Variant,
    mode: Mode,
    count: u64,
}

impl Args {
    fn parse(args: &[String]) -> Result<Self, String> {
        let (mut variant, mut mode, mut count) = (None, None, None);
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let value = |v: Option<&String>| v.cloned().ok_or(format!("{a} needs a value"));
            match a.as_str() {
                "--variant" => {
                    let v = value(it.next())?;
                    variant = Some(Variant::parse(&v).ok_or(format!("unknown variant `{v}`"))?);
                }
                "--mode" => {
                    let v = value(it.next())?;
                    mode = Some(Mode::parse(&v).ok_or(format!("unknown mode `{v}`"))?);
                }
                "--count" => {
                    let v = value(it.next())?;
                    count = Some(
                        v.parse::<u64>()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or(format!("--count {v}: need a number > 0"))?,
                    );
                }
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        Ok(Self {
            variant: variant.ok_or("--variant is required")?,
            mode: mode.ok_or("--mode is required")?,
            count: count.ok_or("--count is required")?,
        })
    }
}

/// Congestion window far above anything sent: quinn does not pace a window above `u32::MAX`.
const NO_PACING_WINDOW: u64 = 1 << 33;

/// quinn's default transport config, with two changes that take the clock out of the work done
/// (the same for every variant; the socket's work per datagram is what is compared):
///
/// - A flow-control window (connection and stream) below the loopback socket's receive buffer
///   (212992 bytes by default). With one thread the client writes until flow control or
///   congestion control stops it before the server reads anything; with quinn's default windows
///   (1.25 MB per stream) a bulk transfer overflows the server's socket buffer, and how many
///   datagrams the kernel drops depends on the pacer, that is on the clock: loss recovery then
///   adds work that varies between two identical runs. Unread bytes never exceed the window.
/// - No pacing and no congestion limit (initial window [`NO_PACING_WINDOW`]): the pacer releases
///   packets by elapsed time, so under callgrind (about 50 times slower, and slower still when
///   the machine is busy) the number of send calls and ACKs per transfer varied by 40% between
///   identical runs, and the instruction count by 2-3%. Flow control, which is driven by events
///   only, is then the sole limit.
fn transport() -> quinn::TransportConfig {
    let mut congestion = quinn::congestion::CubicConfig::default();
    congestion.initial_window(NO_PACING_WINDOW);
    let mut t = quinn::TransportConfig::default();
    t.receive_window(WINDOW.into())
        .stream_receive_window(WINDOW.into())
        .congestion_controller_factory(std::sync::Arc::new(congestion));
    t
}

/// Connects the variant's endpoints, runs the exchanges, closes; returns the summary line.
async fn run(args: &Args) -> Result<String, BoxError> {
    let (server_config, client_config) = migration_benches::tls_configs(transport)?;
    let pair = Pair::connect(args.variant, server_config, client_config).await?;
    let connection = &pair.connection;

    let (request, expected) = args.mode.request_and_answer();
    for i in 0..args.count {
        let answer = exchange(connection, &request).await?;
        if answer != expected {
            return Err(format!(
                "exchange {i}: unexpected answer of {} bytes (expected {})",
                answer.len(),
                expected.len()
            )
            .into());
        }
    }

    let stats = connection.stats();
    let mut summary = format!(
        "shim_cost: ok: {:?} {:?} x{}: client udp tx {} datagrams in {} I/Os, rx {} datagrams in {} I/Os; \
         lost packets {}",
        args.variant,
        args.mode,
        args.count,
        stats.udp_tx.datagrams,
        stats.udp_tx.ios,
        stats.udp_rx.datagrams,
        stats.udp_rx.ios,
        stats.path.lost_packets,
    );
    if let Some(shim) = &pair.client_shim {
        summary.push_str(&format!("; client shim {:?}", shim.stats()));
    }
    if let Some(shim) = &pair.server_shim {
        summary.push_str(&format!("; server shim {:?}", shim.stats()));
    }
    // No wait for the draining period: it is timer-driven, and nothing after this is measured
    // differently between two counts.
    pair.close(Duration::ZERO).await;
    Ok(summary)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match Args::parse(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("shim_cost: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // One thread: the instruction count must not depend on how threads interleave.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shim_cost: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&args)) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shim_cost: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn arguments_parse() {
        let a = Args::parse(&args("--variant client_shim --mode bulk --count 20")).unwrap();
        assert_eq!(
            a,
            Args {
                variant: Variant::ClientShim,
                mode: Mode::Bulk,
                count: 20
            }
        );
    }

    #[test]
    fn bad_arguments_are_refused() {
        for bad in [
            "--variant nope --mode rtt --count 1",
            "--variant stock --mode ping --count 1",
            "--variant stock --mode rtt --count 0",
            "--variant stock --mode rtt --count x",
            "--variant stock --mode rtt",
            "--variant stock --mode rtt --count 1 --extra",
            "--variant",
        ] {
            assert!(Args::parse(&args(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_variant_completes_round_trips_and_a_bulk_transfer() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for variant in Variant::ALL {
            for (mode, count) in [(Mode::Rtt, 3), (Mode::Bulk, 1)] {
                let summary = rt
                    .block_on(run(&Args {
                        variant,
                        mode,
                        count,
                    }))
                    .unwrap();
                assert!(summary.starts_with("shim_cost: ok"), "{summary}");
            }
        }
    }
}
