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
//!   framed and reassembled (`full`, the same code path as `control`'s sealed transfer), against
//!   each stage run alone on the same data: `read_frame` (walk, read, digest, frame; through
//!   `Chunker::write_to`, so on its threads), `compress`, `seal`, `reassemble` (verify, write).

use std::hint::black_box;
use std::sync::OnceLock;
use std::time::Duration;

use std::path::{Path, PathBuf};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use migration_crypto::{Key, Opener, Sealer};
use migration_wire::compress::{Codec, Compression};
use migration_wire::{Chunker, ChunkerConfig, Reassembler, ReassemblerConfig};

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

fn compression(c: &mut Criterion) {
    let mut codec = Codec::new();
    for (name, comp) in [
        ("zstd1", Compression::Zstd { level: 1 }),
        ("gzip1", Compression::Gzip { level: 1 }),
    ] {
        let mut g = c.benchmark_group(name);
        for (len, size) in sizes() {
            let input = data(len);
            let mut packed = Vec::with_capacity(len);
            let mut unpacked = Vec::with_capacity(len);
            g.throughput(Throughput::Bytes(len as u64));
            g.bench_function(BenchmarkId::from_parameter(size), |b| {
                b.iter(|| {
                    packed.clear();
                    unpacked.clear();
                    codec.compress(comp, &input, &mut packed).expect("compress");
                    codec
                        .decompress(comp, &packed, len, &mut unpacked)
                        .expect("decompress");
                    black_box(unpacked.len())
                })
            });
        }
        g.finish();
    }
    // Compression alone at 1 MiB: the stage the pipeline spends most on.
    let mut g = c.benchmark_group("zstd1_compress");
    let input = data(MIB);
    let mut packed = Vec::with_capacity(MIB);
    g.throughput(Throughput::Bytes(MIB as u64));
    g.bench_function(BenchmarkId::from_parameter("1MiB"), |b| {
        b.iter(|| {
            packed.clear();
            codec
                .compress(Compression::Zstd { level: 1 }, &input, &mut packed)
                .expect("compress");
            black_box(packed.len())
        })
    });
    g.finish();
}

/// A scratch directory on tmpfs when there is one (CRIU images are kept there too).
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().expect("temporary directory")
}

/// A 64 MiB directory shaped like a CRIU image set: one large pages file and a few small ones.
fn image_dir(root: &Path) -> PathBuf {
    let dir = root.join("images");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(dir.join("pages-1.img"), data(60 * MIB)).expect("write");
    for i in 0..32 {
        std::fs::write(dir.join(format!("core-{i}.img")), data(128 * KIB)).expect("write");
    }
    dir
}

fn stream(dir: &Path, compression: Compression, sealer: Option<Sealer>) -> Vec<u8> {
    let cfg = ChunkerConfig {
        chunk_size: MIB,
        compression,
        sealer,
    };
    let mut out = Vec::with_capacity(80 * MIB);
    Chunker::new(dir, cfg)
        .expect("chunker")
        .write_to(&mut out)
        .expect("chunk");
    out
}

fn reassemble(input: impl std::io::Read, dest: &Path, opener: Option<Opener>) {
    let cfg = ReassemblerConfig {
        opener,
        max_chunk: MIB,
        max_total_bytes: None,
    };
    Reassembler::new(dest, cfg)
        .expect("reassembler")
        .read_from(input)
        .expect("reassemble");
    std::fs::remove_dir_all(dest).expect("cleanup");
}

fn pipeline(c: &mut Criterion) {
    let key = Key::generate().expect("key");
    let tmp = scratch();
    let dir = image_dir(tmp.path());
    let dest = tmp.path().join("out");
    let total = 64 * MIB as u64;
    let zstd = Compression::Zstd { level: 1 };
    let mut g = c.benchmark_group("pipeline");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(total));
    // Everything: the sender (read, digest, compress, seal, frame) and the receiver (open,
    // decompress, verify, write) run at once, joined by a pipe, as they would on two hosts and
    // as `control`'s `transfer_sealed` runs them: `Chunker::write_to` (reading, compressing and
    // writing on three threads) into a 256 KiB `BufWriter`, `Reassembler::read_from` out of a
    // 256 KiB `BufReader`.
    g.bench_function(BenchmarkId::new("full", "64MiB"), |b| {
        b.iter(|| {
            let (reader, writer) = std::io::pipe().expect("pipe");
            std::thread::scope(|s| {
                let sender = s.spawn(|| {
                    let cfg = ChunkerConfig {
                        chunk_size: MIB,
                        compression: zstd,
                        sealer: Some(Sealer::new(&key).expect("sealer")),
                    };
                    let w = std::io::BufWriter::with_capacity(256 * KIB, writer);
                    Chunker::new(&dir, cfg)
                        .expect("chunker")
                        .write_to(w)
                        .expect("send")
                });
                let r = std::io::BufReader::with_capacity(256 * KIB, reader);
                reassemble(r, &dest, Some(Opener::new(&key)));
                sender.join().expect("sender thread")
            })
        })
    });
    // Each stage alone on the same data.
    g.bench_function(BenchmarkId::new("read_frame", "64MiB"), |b| {
        b.iter(|| black_box(stream(&dir, Compression::None, None).len()))
    });
    let input = data(MIB);
    let mut codec = Codec::new();
    let mut packed = Vec::with_capacity(MIB);
    g.bench_function(BenchmarkId::new("compress", "64MiB"), |b| {
        b.iter(|| {
            for _ in 0..64 {
                packed.clear();
                codec.compress(zstd, &input, &mut packed).expect("compress");
            }
            black_box(packed.len())
        })
    });
    let mut sealer = Sealer::new(&key).expect("sealer");
    let mut sealed = Vec::with_capacity(MIB + 64);
    g.bench_function(BenchmarkId::new("seal", "64MiB"), |b| {
        b.iter(|| {
            for _ in 0..64 {
                sealed.clear();
                sealer.seal(b"aad", &input, &mut sealed).expect("seal");
            }
            black_box(sealed.len())
        })
    });
    let plain = stream(&dir, Compression::None, None);
    g.bench_function(BenchmarkId::new("reassemble", "64MiB"), |b| {
        b.iter(|| reassemble(plain.as_slice(), &dest, None))
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
    targets = seal_open, compression, pipeline
}
criterion_main!(benches);
