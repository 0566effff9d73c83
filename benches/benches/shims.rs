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

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use migration_benches::{BoxError, ECHO_MAX, Pair, Variant, exchange, request_and_answer};
use tokio::runtime::Runtime;

const MIB: usize = 1024 * 1024;
/// Bytes per bulk transfer.
const BULK: usize = 8 * MIB;
/// Bytes per round-trip request (and echo).
const PING: usize = 32;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Reports datagrams the shims dropped (none are expected on loopback).
fn report_drops(pair: &Pair) {
    if let Some(shim) = &pair.client_shim {
        let s = shim.stats();
        if s.dropped_foreign + s.dropped_send_errors + s.recv_errors > 0 {
            eprintln!("  client shim dropped datagrams: {s:?}");
        }
    }
    if let Some(shim) = &pair.server_shim {
        let s = shim.stats();
        if s.dropped_send_errors + s.dropped_parked + s.recv_errors > 0 {
            eprintln!("  server shim dropped datagrams: {s:?}");
        }
    }
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
    let (server_config, client_config) =
        migration_benches::tls_configs(quinn::TransportConfig::default).expect("TLS configs");
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
        report_drops(&pair);
        rt.block_on(pair.close(Duration::from_secs(2)));
    }
    g.finish();
}

fn shim_bulk(c: &mut Criterion) {
    let (request, expected) = request_and_answer(BULK);
    run_group(c, "shim_bulk", request, expected, "8MiB");
}

fn shim_rtt(c: &mut Criterion) {
    let (request, expected) = request_and_answer(PING);
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
