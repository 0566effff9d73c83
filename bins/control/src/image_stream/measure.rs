//! Measuring the image stream against a plain copy over the same quinn link.
//!
//! ```text
//!  synthetic CRIU-like set ──► for each run, each mode (order rotating):
//!      plain copy   : plain_send ──quinn stream──► plain_receive     (raw bytes, no digest)
//!      sealed+zstd  : send_image_set ──quinn stream──► receive_image_set
//!      sealed only  : the same, Compression::None
//!  ──► MB/s (sender's call -> receiver's rename), CPU s/GB, bytes raw/compressed/sealed
//! ```
//!
//! [`measure_loopback`] runs both sides in this process over one loopback connection set up as
//! the agents' ([`loopback_pair`]); [`plain_send`] and [`plain_receive`] are the baseline's two
//! halves, for a measurement between two hosts.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use migration_crypto::Key;
use migration_wire::Compression;

use super::{
    Cut, ReceiveStats, SendGuard, SendStats, StreamConfig, StreamError, bulk_endpoint_config,
    bulk_socket, finish, mb_per_s, pump_in, pump_out, read_error, receive_image_set,
    send_image_set, stream_window_for, tune_for_bulk, write_error,
};

// ---------------------------------------------------------------------------------------------
// The plain copy.

/// Buffer of the plain copy's reads and writes: as large as a chunk, so that it makes as few
/// system calls as the image stream.
const COPY_BUFFER: usize = 1 << 20;

/// `io::copy` through `buf` (std's uses 8 KiB).
fn copy_with(buf: &mut [u8], r: &mut impl Read, w: &mut impl Write) -> io::Result<u64> {
    let mut total = 0;
    loop {
        let n = match r.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// The regular files under `dir`, relative, sorted, depth first.
pub(crate) fn list_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(dir.join(&rel))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        entries.sort();
        for name in entries.into_iter().rev() {
            let path = rel.join(name);
            let meta = fs::symlink_metadata(dir.join(&path))?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The plain copy's sender: for each regular file, `u16` path length, the path, `u64` size,
/// then the raw bytes; no compression, no sealing, no digest. The baseline that the sealed
/// transfer is compared with, over the same link.
pub(crate) async fn plain_send(
    dir: &Path,
    send: quinn::SendStream,
) -> Result<SendStats, StreamError> {
    let start = Instant::now();
    let mut guard = SendGuard { send, done: false };
    let dir = dir.to_owned();
    let (pumped, produced) = pump_out(&mut guard.send, None, start, move |w| {
        let mut buf = vec![0u8; COPY_BUFFER];
        let mut raw = 0u64;
        let files = list_files(&dir)?;
        for rel in &files {
            let mut f = File::open(dir.join(rel))?;
            let size = f.metadata()?.len();
            let name = rel.to_string_lossy();
            let name_len = u16::try_from(name.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path too long"))?;
            w.write_all(&name_len.to_be_bytes())?;
            w.write_all(name.as_bytes())?;
            w.write_all(&size.to_be_bytes())?;
            raw += copy_with(&mut buf, &mut (&mut f).take(size), w)?;
        }
        w.flush()?;
        Ok::<_, io::Error>((files.len() as u64, raw))
    })
    .await;
    let (files, raw) = match (pumped.write_error, produced) {
        (Some(e), _) => Err(write_error(e)),
        (None, Err(e)) => Err(e),
        (None, Ok(Err(e))) => Err(StreamError::Internal(format!("plain copy: {e}"))),
        (None, Ok(Ok(done))) => Ok(done),
    }
    .inspect_err(|e| guard.reset(e.abort_code(true)))?;
    finish(&mut guard).await?;
    Ok(SendStats {
        raw_bytes: raw,
        files,
        chunks: 0,
        wire_bytes: pumped.wire_bytes,
        wall: start.elapsed(),
        first_byte: pumped.first_byte,
    })
}

/// The plain copy's receiver: writes the files [`plain_send`] sends under `dest` (which must
/// not exist). A baseline for measurements: it trusts the sender's paths only as far as
/// refusing absolute ones and `..`.
pub(crate) async fn plain_receive(
    mut recv: quinn::RecvStream,
    dest: &Path,
    max_total_bytes: u64,
) -> Result<ReceiveStats, StreamError> {
    let start = Instant::now();
    fs::create_dir(dest).map_err(|e| StreamError::Internal(format!("plain copy: {e}")))?;
    let dest_owned = dest.to_owned();
    let max_wire = super::max_wire_bytes(max_total_bytes);
    let (drained, consumed) = pump_in(&mut recv, max_wire, start, move |r| {
        let mut buf = vec![0u8; COPY_BUFFER];
        let mut raw = 0u64;
        let mut files = 0u64;
        loop {
            let mut len = [0u8; 2];
            match r.read_exact(&mut len) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
            let mut name = vec![0u8; usize::from(u16::from_be_bytes(len))];
            r.read_exact(&mut name)?;
            let mut size = [0u8; 8];
            r.read_exact(&mut size)?;
            let size = u64::from_be_bytes(size);
            let rel = PathBuf::from(String::from_utf8_lossy(&name).into_owned());
            if !rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
            {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "unsafe path"));
            }
            let path = dest_owned.join(&rel);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            let mut f = File::create(&path)?;
            let n = copy_with(&mut buf, &mut r.take(size), &mut f)?;
            if n != size {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short file"));
            }
            raw += n;
            files += 1;
        }
        Ok((files, raw))
    })
    .await;
    let done = match consumed {
        Err(e) => Err(e),
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => Err(match drained.cut {
            Some(Cut::Read(e)) => read_error(e),
            Some(Cut::WireBound(max)) => StreamError::WireTooLarge { max },
            _ => StreamError::Internal(format!("plain copy: {e}")),
        }),
    };
    let (files, raw) = match done {
        Ok(d) => d,
        Err(e) => {
            let _ = recv.stop(e.abort_code(false).code());
            let _ = fs::remove_dir_all(dest);
            return Err(e);
        }
    };
    Ok(ReceiveStats {
        raw_bytes: raw,
        files,
        chunks: 0,
        compressed_bytes: raw,
        wire_bytes: drained.wire_bytes,
        wall: start.elapsed(),
        first_byte: drained.first_byte,
    })
}

// ---------------------------------------------------------------------------------------------
// Measuring.

/// What a measured transfer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Raw file bytes over the stream: no compression, no sealing, no digests.
    Plain,
    /// The image stream, zstd level 1, sealed.
    SealedZstd,
    /// The image stream, uncompressed, sealed.
    Sealed,
}

impl Mode {
    pub(crate) const ALL: [Mode; 3] = [Mode::Plain, Mode::SealedZstd, Mode::Sealed];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain copy",
            Self::SealedZstd => "sealed + zstd-1",
            Self::Sealed => "sealed only",
        }
    }
}

/// The runs of one mode.
#[derive(Debug, Clone)]
pub(crate) struct Measurement {
    /// What was measured.
    pub(crate) mode: Mode,
    /// Plaintext MB/s of each run (sender's call -> receiver's rename), in run order.
    pub(crate) mb_per_s: Vec<f64>,
    /// CPU seconds of this process (both sides, every thread) of each run, in run order.
    pub(crate) cpu_s: Vec<f64>,
    /// The last run's receiver figures.
    pub(crate) last: ReceiveStats,
}

impl Measurement {
    /// Median of the runs.
    pub(crate) fn median(&self) -> f64 {
        admin_api::median(self.mb_per_s.clone()).unwrap_or(0.0)
    }

    /// Median CPU seconds per GB (10^9 bytes) of plaintext.
    pub(crate) fn cpu_s_per_gb(&self) -> f64 {
        let gb = self.last.raw_bytes as f64 / 1e9;
        admin_api::median(self.cpu_s.clone()).map_or(0.0, |s| if gb > 0.0 { s / gb } else { 0.0 })
    }
}

/// CPU time of this process so far (user + system, every thread), from `/proc/self/stat`;
/// `None` where it cannot be read.
fn process_cpu() -> Option<Duration> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; the fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(Duration::from_millis((utime + stime) * 10))
}

/// One transfer of `src` into `dest` over a fresh stream of `conn` (the sender's side) and
/// `peer` (the receiver's), both in this process; the wall time runs from the sender's call to
/// the receiver's return.
pub(crate) async fn transfer_once(
    mode: Mode,
    conn: &quinn::Connection,
    peer: &quinn::Connection,
    src: &Path,
    dest: &Path,
    key: &Key,
) -> Result<(Duration, ReceiveStats), StreamError> {
    let mut cfg = StreamConfig::default();
    if mode == Mode::Sealed {
        cfg.compression = Compression::None;
    }
    let start = Instant::now();
    let send = conn.open_uni().await.map_err(StreamError::LinkGone)?;
    let (src, dest_owned, key_owned, cfg_owned) =
        (src.to_owned(), dest.to_owned(), key.clone(), cfg.clone());
    let sender = tokio::spawn(async move {
        match mode {
            Mode::Plain => plain_send(&src, send).await,
            _ => send_image_set(&src, &key_owned, send, &cfg_owned).await,
        }
    });
    let recv = peer.accept_uni().await.map_err(StreamError::LinkGone)?;
    let received = match mode {
        Mode::Plain => plain_receive(recv, &dest_owned, cfg.max_total_bytes).await,
        _ => receive_image_set(recv, key, &dest_owned, &cfg).await,
    };
    let wall = start.elapsed();
    let sent = sender
        .await
        .map_err(|e| StreamError::Internal(format!("the sending task: {e}")))?;
    let received = received?;
    sent?;
    Ok((wall, received))
}

/// What the link did over a whole measurement (the sending connection's view).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinkFacts {
    /// The path MTU quinn ended with (UDP payload bytes).
    pub(crate) mtu: u16,
    /// Packets quinn declared lost.
    pub(crate) lost_packets: u64,
    /// Congestion events.
    pub(crate) congestion_events: u64,
    /// The receive buffer the kernel granted each socket (`SO_RCVBUF`).
    pub(crate) receive_buffer: usize,
    /// The stream receive window that follows from it.
    pub(crate) stream_window: u64,
}

/// A measurement: each mode's runs and what the link did.
#[derive(Debug, Clone)]
pub(crate) struct Measured {
    /// One entry per mode, in [`Mode::ALL`]'s order.
    pub(crate) modes: Vec<Measurement>,
    /// The link over all runs.
    pub(crate) link: LinkFacts,
}

/// Measures [`Mode::ALL`] `runs` times each, interleaved (the order rotates every run), over
/// one loopback quinn connection set up as `setup` says ([`LinkSetup::Tuned`]: as the
/// agents'), with a key from [`migration_crypto::KeyAgreement`]. Each run's destination under
/// `scratch` is removed after it.
pub(crate) async fn measure_loopback(
    src: &Path,
    scratch: &Path,
    runs: usize,
    setup: LinkSetup,
) -> anyhow::Result<Measured> {
    use anyhow::Context as _;
    let Loopback {
        client,
        server,
        conn,
        peer,
        receive_buffer,
    } = loopback_pair_with(setup).await?;
    let key = agreed_key(b"measure_loopback")?;
    let mut out: Vec<Measurement> = Vec::new();
    for run in 0..runs {
        for i in 0..Mode::ALL.len() {
            let mode = Mode::ALL[(i + run) % Mode::ALL.len()];
            let dest = scratch.join(format!("run-{run}-{i}"));
            let cpu_before = process_cpu();
            let (wall, stats) = transfer_once(mode, &conn, &peer, src, &dest, &key)
                .await
                .with_context(|| format!("{} run {run}", mode.name()))?;
            let cpu = match (cpu_before, process_cpu()) {
                (Some(a), Some(b)) => b.saturating_sub(a).as_secs_f64(),
                _ => 0.0,
            };
            fs::remove_dir_all(&dest).with_context(|| format!("removing {}", dest.display()))?;
            let figure = mb_per_s(stats.raw_bytes, wall);
            match out.iter_mut().find(|m| m.mode == mode) {
                Some(m) => {
                    m.mb_per_s.push(figure);
                    m.cpu_s.push(cpu);
                    m.last = stats;
                }
                None => out.push(Measurement {
                    mode,
                    mb_per_s: vec![figure],
                    cpu_s: vec![cpu],
                    last: stats,
                }),
            }
        }
    }
    let path = conn.stats().path;
    let link = LinkFacts {
        mtu: path.current_mtu,
        lost_packets: path.lost_packets,
        congestion_events: path.congestion_events,
        receive_buffer,
        stream_window: match setup {
            LinkSetup::Tuned => stream_window_for(receive_buffer),
            // quinn's default (12.5 MB/s over 100 ms).
            LinkSetup::Defaults => 1_250_000,
        },
    };
    conn.close(quinn::VarInt::from_u32(0), b"done");
    client.wait_idle().await;
    server.close(quinn::VarInt::from_u32(0), b"done");
    out.sort_by_key(|m| Mode::ALL.iter().position(|x| *x == m.mode));
    Ok(Measured { modes: out, link })
}

/// Both sides of a [`migration_crypto::KeyAgreement`], as two agents would run it.
pub(crate) fn agreed_key(context: &[u8]) -> anyhow::Result<Key> {
    use migration_crypto::KeyAgreement;
    let (a, b) = (KeyAgreement::generate()?, KeyAgreement::generate()?);
    let (pa, pb) = (a.public_key(), b.public_key());
    let key = a.agree(&pb, context)?;
    let other = b.agree(&pa, context)?;
    anyhow::ensure!(
        key.id() == other.id(),
        "the two sides derived different keys"
    );
    Ok(key)
}

/// Two endpoints on 127.0.0.1 (ephemeral ports) connected as two agents would be:
/// [`bulk_socket`]s, [`bulk_endpoint_config`], transports tuned by [`tune_for_bulk`], TLS 1.3
/// with a self-signed certificate (wrapper-support's helpers; the agents add client
/// authentication, which changes nothing on the data path).
#[derive(Debug)]
pub(crate) struct Loopback {
    /// The sending side's endpoint.
    pub(crate) client: quinn::Endpoint,
    /// The receiving side's endpoint.
    pub(crate) server: quinn::Endpoint,
    /// The sending side's connection.
    pub(crate) conn: quinn::Connection,
    /// The receiving side's connection.
    pub(crate) peer: quinn::Connection,
    /// The receive buffer the server's socket was granted.
    pub(crate) receive_buffer: usize,
}

impl Loopback {
    /// Closes both connections and endpoints.
    pub(crate) async fn close(self) {
        self.conn.close(quinn::VarInt::from_u32(0), b"done");
        self.client.wait_idle().await;
        self.server.close(quinn::VarInt::from_u32(0), b"done");
    }
}

/// How a [`Loopback`] is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkSetup {
    /// As the agents: [`bulk_socket`], [`bulk_endpoint_config`], [`tune_for_bulk`].
    Tuned,
    /// quinn's and the kernel's defaults (but the idle timeout): the "before" of the tuning.
    Defaults,
}

/// Sets up a [`Loopback`] as the agents would ([`LinkSetup::Tuned`]).
pub(crate) async fn loopback_pair() -> anyhow::Result<Loopback> {
    loopback_pair_with(LinkSetup::Tuned).await
}

/// Sets up a [`Loopback`].
pub(crate) async fn loopback_pair_with(setup: LinkSetup) -> anyhow::Result<Loopback> {
    use anyhow::Context as _;
    use wrapper_support::tls;
    const ALPN: &[u8] = b"qlm-image-stream-test";
    let transport = |receive_buffer| -> anyhow::Result<quinn::TransportConfig> {
        let mut t = tls::transport_config(Duration::from_secs(30))?;
        if setup == LinkSetup::Tuned {
            tune_for_bulk(&mut t, receive_buffer);
        }
        Ok(t)
    };
    let socket = |addr| -> anyhow::Result<(std::net::UdpSocket, usize)> {
        match setup {
            LinkSetup::Tuned => Ok(bulk_socket(addr)?),
            LinkSetup::Defaults => {
                use nix::sys::socket::{getsockopt, sockopt};
                let socket = std::net::UdpSocket::bind(addr)?;
                let granted = getsockopt(&socket, sockopt::RcvBuf)?;
                Ok((socket, granted))
            }
        }
    };
    let endpoint_config = || match setup {
        LinkSetup::Tuned => bulk_endpoint_config(),
        LinkSetup::Defaults => quinn::EndpointConfig::default(),
    };
    let (identity, _) = tls::Identity::self_signed(&["localhost".to_owned()])?;
    let roots = identity.certs.clone();
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let (server_socket, receive_buffer) = socket(loopback).context("server socket")?;
    let (client_socket, client_buffer) = socket(loopback).context("client socket")?;
    let runtime = std::sync::Arc::new(quinn::TokioRuntime);
    let server = quinn::Endpoint::new(
        endpoint_config(),
        Some(tls::server_config(
            identity,
            &[ALPN],
            transport(receive_buffer)?,
        )?),
        server_socket,
        runtime.clone(),
    )
    .context("server endpoint")?;
    let addr = server.local_addr()?;
    let mut client = quinn::Endpoint::new(endpoint_config(), None, client_socket, runtime)
        .context("client endpoint")?;
    client.set_default_client_config(tls::client_config(
        &roots,
        &[ALPN],
        transport(client_buffer)?,
    )?);
    let connecting = client.connect(addr, "localhost")?;
    let accept = async {
        let incoming = server.accept().await.context("server endpoint closed")?;
        anyhow::Ok(incoming.await?)
    };
    let (conn, peer) = tokio::join!(connecting, accept);
    Ok(Loopback {
        client,
        server,
        conn: conn?,
        peer: peer?,
        receive_buffer,
    })
}

/// Writes a synthetic CRIU-like image set of about `total` bytes under `dir` (created): a
/// large `pages-1.img` (85 %), a `pages-2.img` (8 %), and the rest as many small `*.img`
/// (cores, mm, pagemaps, fdinfo; one empty). Pages are 4 KiB, each random (40 %), text-like
/// (30 %) or zero (30 %), from a PRNG seeded with `seed`; with `incompressible`, all random
/// (as a server's pseudo-random ballast).
pub(crate) fn write_synthetic_image_set(
    dir: &Path,
    total: u64,
    seed: u64,
    incompressible: bool,
) -> io::Result<()> {
    const PAGE: usize = 4096;
    fs::create_dir_all(dir)?;
    let mut rng = SplitMix(seed);
    let mut page = vec![0u8; PAGE];
    let mut write = |name: &str, len: u64, rng: &mut SplitMix| -> io::Result<()> {
        let mut f = io::BufWriter::with_capacity(1 << 20, File::create(dir.join(name))?);
        let mut left = len;
        while left > 0 {
            let n = left.min(PAGE as u64) as usize;
            match rng.next() % 10 {
                _ if incompressible => rng.fill(&mut page[..n]),
                0..=3 => rng.fill(&mut page[..n]),
                4..=6 => text_like(rng, &mut page[..n]),
                _ => page[..n].fill(0),
            }
            f.write_all(&page[..n])?;
            left -= n as u64;
        }
        f.flush()
    };
    let pages1 = total / 100 * 85 / PAGE as u64 * PAGE as u64;
    let pages2 = total / 100 * 8 / PAGE as u64 * PAGE as u64;
    write("pages-1.img", pages1, &mut rng)?;
    write("pages-2.img", pages2, &mut rng)?;
    let mut left = total.saturating_sub(pages1 + pages2);
    let mut i = 0u64;
    write("ipcns-var-9.img", 0, &mut rng)?;
    while left > 0 {
        let len = left.min(512 + rng.next() % (256 << 10));
        let name = match i % 4 {
            0 => format!("core-{}.img", 100 + i),
            1 => format!("pagemap-{i}.img"),
            2 => format!("mm-{i}.img"),
            _ => format!("fdinfo-{i}.img"),
        };
        write(&name, len, &mut rng)?;
        left -= len;
        i += 1;
    }
    Ok(())
}

/// A small deterministic PRNG (SplitMix64) for synthetic data.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn fill(&mut self, out: &mut [u8]) {
        for c in out.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Words from a small vocabulary, as in heaps of strings and structures.
fn text_like(rng: &mut SplitMix, out: &mut [u8]) {
    const WORDS: &[&[u8]] = &[
        b"connection ",
        b"stream ",
        b"quic ",
        b"handshake ",
        b"0x7ffd3a2c ",
        b"GET /index.html HTTP/1.1\r\n",
        b"migration ",
        b"checkpoint ",
        b"{\"id\":",
        b"42,",
        b"\"peer\":\"10.0.0.2:4433\"} ",
        b"\0\0\0\x01",
        b"tokio-runtime-worker ",
        b"rustls ",
    ];
    let mut at = 0;
    while at < out.len() {
        let w = WORDS[(rng.next() % WORDS.len() as u64) as usize];
        let n = w.len().min(out.len() - at);
        out[at..at + n].copy_from_slice(&w[..n]);
        at += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every test is bounded in time.
    const LIMIT: Duration = Duration::from_secs(60);

    /// Relative path -> content of every regular file under `root`.
    fn contents(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        list_files(root)
            .unwrap()
            .into_iter()
            .map(|rel| {
                let data = fs::read(root.join(&rel)).unwrap();
                (rel, data)
            })
            .collect()
    }

    /// Bytes of every relative path's name under `root`.
    fn names(root: &Path) -> u64 {
        list_files(root)
            .unwrap()
            .iter()
            .map(|p| p.to_string_lossy().len() as u64)
            .sum()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_plain_copy_round_trips() {
        tokio::time::timeout(LIMIT, async {
            let src = super::super::tests::tree();
            let out = tempfile::tempdir().unwrap();
            let dest = out.path().join("plain");
            let link = loopback_pair().await.unwrap();
            let key = agreed_key(b"plain").unwrap();
            let (_, stats) =
                transfer_once(Mode::Plain, &link.conn, &link.peer, src.path(), &dest, &key)
                    .await
                    .unwrap();
            assert_eq!(contents(src.path()), contents(&dest));
            assert_eq!(stats.files, 6);
            assert_eq!(
                stats.raw_bytes,
                stats.wire_bytes - 6 * 10 - names(src.path())
            );
            link.close().await;
        })
        .await
        .unwrap();
    }

    #[test]
    fn the_synthetic_set_looks_like_criu_images() {
        let dir = tempfile::tempdir().unwrap();
        let set = dir.path().join("set");
        write_synthetic_image_set(&set, 4 << 20, 1, false).unwrap();
        let files = list_files(&set).unwrap();
        let total: u64 = files
            .iter()
            .map(|f| fs::metadata(set.join(f)).unwrap().len())
            .sum();
        assert_eq!(total, 4 << 20);
        assert!(files.len() > 3, "{files:?}");
        let pages = fs::read(set.join("pages-1.img")).unwrap();
        assert!(pages.len() as u64 > (4 << 20) * 8 / 10);
        let zero_pages = pages
            .chunks(4096)
            .filter(|p| p.iter().all(|b| *b == 0))
            .count();
        let share = zero_pages as f64 / (pages.len() / 4096) as f64;
        assert!((0.2..0.4).contains(&share), "{share}");
        assert_eq!(fs::metadata(set.join("ipcns-var-9.img")).unwrap().len(), 0);
        // Deterministic.
        let again = dir.path().join("again");
        write_synthetic_image_set(&again, 4 << 20, 1, false).unwrap();
        assert_eq!(fs::read(again.join("pages-1.img")).unwrap(), pages);
    }

    /// The throughput figures: `cargo test --release -p control --bin control
    /// image_stream::measure::tests::throughput -- --ignored --nocapture` (QLM_STREAM_MIB,
    /// default 256; QLM_STREAM_RUNS, default 3; QLM_STREAM_DEFAULTS=1 measures quinn's and the
    /// kernel's defaults first; QLM_STREAM_INCOMPRESSIBLE=1 makes every page random, as a
    /// ballast). The set is written under the system's temporary directory and
    /// removed afterwards.
    #[test]
    #[ignore = "a measurement, not a check: prints MB/s (run in release)"]
    fn throughput() {
        let mib: u64 = std::env::var("QLM_STREAM_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256);
        let runs: usize = std::env::var("QLM_STREAM_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3);
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("set");
        let incompressible = std::env::var_os("QLM_STREAM_INCOMPRESSIBLE").is_some();
        write_synthetic_image_set(&src, mib << 20, 42, incompressible).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut setups = vec![LinkSetup::Tuned];
        if std::env::var_os("QLM_STREAM_DEFAULTS").is_some() {
            setups.insert(0, LinkSetup::Defaults);
        }
        for setup in setups {
            let measured = rt
                .block_on(measure_loopback(&src, dir.path(), runs, setup))
                .unwrap();
            print_measured(&src, mib, runs, setup, &measured);
        }
    }

    fn print_measured(src: &Path, mib: u64, runs: usize, setup: LinkSetup, measured: &Measured) {
        let link = measured.link;
        println!(
            "{mib} MiB synthetic image set ({} files), {runs} runs per mode, interleaved; \
             loopback quinn ({setup:?}): MTU {}, {} packets lost, {} congestion events, \
             receive buffer {} B, stream window {} B",
            list_files(src).unwrap().len(),
            link.mtu,
            link.lost_packets,
            link.congestion_events,
            link.receive_buffer,
            link.stream_window,
        );
        let plain = measured
            .modes
            .iter()
            .find(|m| m.mode == Mode::Plain)
            .map_or(0.0, Measurement::median);
        for m in &measured.modes {
            let runs: Vec<String> = m.mb_per_s.iter().map(|v| format!("{v:.0}")).collect();
            println!(
                "{:<16} median {:>4.0} MB/s ({}), {:.2}x plain, CPU {:.2} s/GB; bytes raw {} \
                 compressed {} sealed {}; first byte after {:.1} ms",
                m.mode.name(),
                m.median(),
                runs.join(", "),
                if plain > 0.0 { m.median() / plain } else { 0.0 },
                m.cpu_s_per_gb(),
                m.last.raw_bytes,
                m.last.compressed_bytes,
                m.last.wire_bytes,
                m.last.first_byte.unwrap_or_default().as_secs_f64() * 1e3,
            );
        }
    }
}
