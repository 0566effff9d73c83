//! Criterion benchmarks of the migration data path.
//!
//! Input data: the bytes of this benchmark's own executable, repeated to the wanted size. Machine
//! code and data sections compress about as well as a process's memory pages do (better than
//! random bytes, far worse than zero pages), and the input is the same on every run of one build.
//!
//! Groups:
//! - `seal_open`: AES-256-GCM seal + open of one record (1 KiB, 1 MiB, 10 MiB).
//! - `seal`: seal alone at 1 MiB records (the per-core sealing target: >= 1 GiB/s).
//! - `zstd1`, `gzip1`: compress + decompress at level 1; `zstd1_compress`: compression alone.
//! - `pipeline`: a 64 MiB directory chunked (1 MiB chunks), compressed with zstd level 1, sealed,
//!   framed and reassembled (`full`), against each stage run alone on the same data.

use std::hint::black_box;
use std::sync::OnceLock;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use migration_crypto::{Key, Opener, Sealer};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// `len` bytes of this executable, repeated.
fn data(len: usize) -> Vec<u8> {
    static EXE: OnceLock<Vec<u8>> = OnceLock::new();
    let exe = EXE.get_or_init(|| {
        std::fs::read("/proc/self/exe")
            .ok()
            .filter(|b| !b.is_empty())
            .expect("reading /proc/self/exe")
    });
    exe.iter().copied().cycle().take(len).collect()
}

fn sizes() -> [(usize, &'static str); 3] {
    [(KIB, "1KiB"), (MIB, "1MiB"), (10 * MIB, "10MiB")]
}

fn seal_open(c: &mut Criterion) {
    let key = Key::generate().expect("key");
    let mut g = c.benchmark_group("seal_open");
    for (len, name) in sizes() {
        let input = data(len);
        let mut sealer = Sealer::new(&key).expect("sealer");
        let mut opener = Opener::new(&key);
        let mut sealed = Vec::with_capacity(len + 64);
        let mut opened = Vec::with_capacity(len);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                sealed.clear();
                opened.clear();
                sealer.seal(b"aad", &input, &mut sealed).expect("seal");
                opener.open(b"aad", &sealed, &mut opened).expect("open");
                black_box(opened.len())
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("seal");
    let input = data(MIB);
    let mut sealer = Sealer::new(&key).expect("sealer");
    let mut sealed = Vec::with_capacity(MIB + 64);
    g.throughput(Throughput::Bytes(MIB as u64));
    g.bench_function(BenchmarkId::from_parameter("1MiB"), |b| {
        b.iter(|| {
            sealed.clear();
            sealer.seal(b"aad", &input, &mut sealed).expect("seal");
            black_box(sealed.len())
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = seal_open
}
criterion_main!(benches);
