//! The sealed streaming transfer of a CRIU image set between two agents, over one quinn stream.
//!
//! ```text
//!  source agent                                                       target agent
//!  dir ─► Chunker::write_frames ─► ChannelWriter ═bounded═► SendStream ─QUIC─► RecvStream ═══►
//!         (3 threads: read |       (blocking thread:      (async:           (async: wire
//!          zstd if it pays +        payloads ≥ 64 KiB      write_chunk)       bound, TTFB)
//!          seal in place | put)     passed on uncopied)
//!
//!  ═bounded═► ChannelReader ─► frame body ─► Reassembler::read_until_end ─► dest.partial-*
//!             (blocking thread: open in place, decompress if compressed ─2─►       │
//!              a writing thread: create, write)                                     │
//!                              end record verified + stream finished ─► rename ─► dest
//!  any failure: dest.partial-* removed, the peer told why (STOP_SENDING / RESET_STREAM code)
//! ```
//!
//! The stream is migration-wire's format version 2: sealed, so its chunks carry no SHA-256 of
//! their own (each chunk's AEAD tag, over the chunk and its descriptor, proves it; the sealed
//! end record binds every descriptor in order).
//!
//! [`send_image_set`] runs migration-wire's [`Chunker`] on a blocking thread (its
//! `write_frames` pipelines reading, compressing and sealing, and handing frames over on three
//! threads) into a [`FrameSink`] whose buffers (a chunk's sealed payload as the chunker made it,
//! or gathered small frames) cross a bounded channel to the async side, which hands them to
//! quinn without copying. [`receive_image_set`] does the reverse into a [`Reassembler`], which
//! stages the files and renames the directory into place only after a verified end record; here
//! the rename also waits for the stream's FIN, so bytes after the end record are refused too.
//! Memory stays a few chunks on each side (plus quinn's windows, see [`tune_for_bulk`]),
//! whatever the size of the image set, and reading the images overlaps with sending them.
//!
//! Every failure is a [`StreamError`] that says which one happened (corrupted or forged data,
//! wrong key, link gone, the peer's abort and its reason, a size bound, local I/O), and the peer
//! learns the reason as the stream's error code ([`AbortCode`]).
//!
//! [`measure::measure_loopback`] compares, over one loopback quinn connection, a plain copy (no
//! compression, no sealing), sealed + zstd and sealed only; [`measure::plain_send`] and
//! [`measure::plain_receive`] are the plain copy's two halves, for a measurement between two hosts.

// The agent (issue 10) is the caller; until it lands only the tests use this module.
#![cfg_attr(not(test), allow(dead_code))]

pub(crate) mod measure;

use std::io::{self, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use admin_api::TransferStats;
use migration_crypto::{Key, KeyId, OpenError, Opener, SEAL_OVERHEAD, SealError, Sealer};
use migration_wire::{
    ChunkError, Chunker, ChunkerConfig, Compression, FrameSink, MAX_CHUNK_SIZE, ReassembleError,
    Reassembler, ReassemblerConfig, StreamSummary,
};
use tokio::sync::mpsc;

/// Buffers queued between a blocking thread and the async side, each way.
const QUEUE_DEPTH: usize = 4;
/// Size at which the sending adapter hands a buffer of gathered writes over.
const SEND_BUFFER: usize = 1 << 20;
/// A frame payload at least this large is handed to quinn in its own buffer, as the chunker
/// made it, instead of being copied into a [`SEND_BUFFER`].
const HAND_OVER_MIN: usize = 64 << 10;
/// Bytes the receiving side gathers before it hands them over (the rest at the FIN).
const RECEIVE_BATCH: usize = 256 << 10;
/// Largest receive window of one stream (flow control credit): 1 GB/s over 16 ms, so that a
/// receiver descheduled for a few milliseconds on a busy host does not stall the sender. The
/// window actually set is also bounded by the receiving socket's buffer ([`tune_for_bulk`]).
pub(crate) const STREAM_RECEIVE_WINDOW: u64 = 16 << 20;
/// Bytes quinn keeps from the application's writes, unacknowledged or not yet sent.
pub(crate) const SEND_WINDOW: u64 = 32 << 20;
/// Largest UDP payload MTU discovery probes for: loopback and jumbo-frame links get up to
/// it, an Ethernet link of 1500 bytes settles where quinn's default would. Not 8952 (a 9000
/// byte jumbo frame): quinn sends up to 10 datagrams in one segmentation-offload `sendmsg`,
/// whose total must stay under 64 KiB; a bigger batch fails with EMSGSIZE, which quinn-udp
/// drops silently (it takes it for a lost MTU probe), and the losses then make quinn's black
/// hole detector fall back to 1200-byte datagrams for the rest of the connection.
pub(crate) const MTU_UPPER_BOUND: u16 = 6500;

/// What one transfer does.
#[derive(Debug, Clone)]
pub(crate) struct StreamConfig {
    /// Plaintext bytes per chunk (sender), 1 to [`MAX_CHUNK_SIZE`].
    pub(crate) chunk_size: usize,
    /// Compression of the chunks (sender).
    pub(crate) compression: Compression,
    /// Largest image set accepted, in plaintext bytes (receiver). The bytes on the wire are
    /// bounded too, by [`max_wire_bytes`] of it.
    pub(crate) max_total_bytes: u64,
    /// Fault injection (sender): flip (xor 0xff) the byte at this offset of the sealed stream
    /// as it leaves, so that the receiver must detect it. Beyond the stream's end: no effect.
    pub(crate) corrupt_at: Option<u64>,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            chunk_size: migration_wire::DEFAULT_CHUNK_SIZE,
            compression: Compression::Zstd { level: 1 },
            max_total_bytes: 16 << 30,
            corrupt_at: None,
        }
    }
}

/// The bound on the bytes of a stream whose plaintext is at most `max_total` bytes: the
/// plaintext, 1/8 for framing, sealing and zstd's expansion of incompressible chunks, and
/// 64 MiB for the per-file overhead of many small files.
pub(crate) fn max_wire_bytes(max_total: u64) -> u64 {
    max_total
        .saturating_add(max_total / 8)
        .saturating_add(64 << 20)
}

/// Why a stream was abandoned, carried as its QUIC error code (STOP_SENDING from the
/// receiver, RESET_STREAM from the sender).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AbortCode {
    /// The receiver found a chunk or the end record corrupted or forged.
    Corrupted,
    /// The stream is sealed under another key than the receiver's.
    WrongKey,
    /// The stream exceeds the receiver's size bound.
    TooLarge,
    /// The receiver failed locally (writing the destination).
    ReceiverFailed,
    /// The sender failed locally (reading the image set, sealing).
    SenderFailed,
    /// The transfer was cancelled (its future dropped).
    Cancelled,
    /// A code this module does not know (quinn stops a dropped stream with 0).
    Other(u64),
}

impl AbortCode {
    fn code(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(match self {
            Self::Corrupted => 1,
            Self::WrongKey => 2,
            Self::TooLarge => 3,
            Self::ReceiverFailed => 4,
            Self::SenderFailed => 5,
            Self::Cancelled => 6,
            // Never sent; a u64 from the wire is below 2^62, so it fits.
            Self::Other(n) => return quinn::VarInt::from_u64(n).unwrap_or(quinn::VarInt::MAX),
        })
    }

    fn from_code(code: quinn::VarInt) -> Self {
        match code.into_inner() {
            1 => Self::Corrupted,
            2 => Self::WrongKey,
            3 => Self::TooLarge,
            4 => Self::ReceiverFailed,
            5 => Self::SenderFailed,
            6 => Self::Cancelled,
            n => Self::Other(n),
        }
    }
}

impl std::fmt::Display for AbortCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self {
            Self::Corrupted => "the receiver found corrupted or forged data",
            Self::WrongKey => "the receiver holds another key",
            Self::TooLarge => "the stream exceeds the receiver's bound",
            Self::ReceiverFailed => "the receiver failed locally",
            Self::SenderFailed => "the sender failed locally",
            Self::Cancelled => "the transfer was cancelled",
            Self::Other(n) => return write!(f, "unknown reason (code {n})"),
        };
        write!(f, "{what} (code {})", self.code())
    }
}

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    /// The stream failed verification: a chunk's AEAD tag or digest, the framing, the order of
    /// the chunks or the end record is wrong, or the stream finished before its end record.
    /// Corrupted in transit or forged; nothing was written to the destination.
    #[error("the image stream is corrupted or forged: {0}")]
    Corrupted(#[source] ReassembleError),
    /// The stream is sealed under another key than the receiver's: the agents did not agree
    /// on the same key.
    #[error("the image stream is sealed with key {found}, the receiver holds key {expected}")]
    WrongKey {
        /// The receiver's key.
        expected: KeyId,
        /// The key the stream names.
        found: KeyId,
    },
    /// The connection was lost mid-transfer: closed by the peer or locally, reset, timed out.
    #[error("the link to the peer is gone mid-transfer: {0}")]
    LinkGone(#[source] quinn::ConnectionError),
    /// The peer abandoned the stream (the receiver stopped it, or the sender reset it) and
    /// said why.
    #[error("the peer aborted the image stream: {0}")]
    PeerAborted(AbortCode),
    /// The image set's plaintext exceeds `max_total_bytes`.
    #[error("the image set exceeds the bound of {max} bytes")]
    TooLarge {
        /// The bound.
        max: u64,
    },
    /// The bytes on the wire exceed [`max_wire_bytes`] of `max_total_bytes`.
    #[error("the image stream exceeds the bound of {max} bytes on the wire")]
    WireTooLarge {
        /// The bound.
        max: u64,
    },
    /// Reading the image set failed on the sending side (a file vanished, a symlink out of the
    /// directory, permissions, compression).
    #[error("reading the image set: {0}")]
    Source(#[source] ChunkError),
    /// Writing the destination failed on the receiving side (it exists, a symlink above it,
    /// the disk is full).
    #[error("writing the image set: {0}")]
    Destination(#[source] ReassembleError),
    /// The configuration is invalid (chunk size, compression level).
    #[error("invalid stream configuration: {0}")]
    Config(#[source] ChunkError),
    /// Sealing failed (no random salt for the stream).
    #[error("sealing the image set: {0}")]
    Seal(#[source] SealError),
    /// A bug or a dying runtime: a worker thread panicked or was cancelled, or quinn refused
    /// an operation on the stream.
    #[error("internal failure of the transfer: {0}")]
    Internal(String),
}

impl StreamError {
    /// The code that tells the peer why this side gave up.
    fn abort_code(&self, sending: bool) -> AbortCode {
        match self {
            Self::Corrupted(_) => AbortCode::Corrupted,
            Self::WrongKey { .. } => AbortCode::WrongKey,
            Self::TooLarge { .. } | Self::WireTooLarge { .. } => AbortCode::TooLarge,
            _ if sending => AbortCode::SenderFailed,
            _ => AbortCode::ReceiverFailed,
        }
    }
}

/// What the sender measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SendStats {
    /// Bytes of the image files.
    pub(crate) raw_bytes: u64,
    /// Files sent.
    pub(crate) files: u64,
    /// Chunks sent.
    pub(crate) chunks: u64,
    /// Bytes of the stream (compressed, sealed, framed), as handed to quinn.
    pub(crate) wire_bytes: u64,
    /// Call -> the peer acknowledged every byte of the finished stream.
    pub(crate) wall: Duration,
    /// Call -> the first bytes handed to quinn.
    pub(crate) first_byte: Option<Duration>,
}

/// What the receiver measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ReceiveStats {
    /// Bytes of the image files written.
    pub(crate) raw_bytes: u64,
    /// Files written.
    pub(crate) files: u64,
    /// Chunks received.
    pub(crate) chunks: u64,
    /// Compressed payload bytes (the sealed payloads without their sealing overhead); equal to
    /// `raw_bytes` when the stream is not compressed.
    pub(crate) compressed_bytes: u64,
    /// Bytes of the stream (compressed, sealed, framed) read from quinn.
    pub(crate) wire_bytes: u64,
    /// Call -> the directory renamed into place.
    pub(crate) wall: Duration,
    /// Call -> the first bytes received.
    pub(crate) first_byte: Option<Duration>,
}

/// Plaintext megabytes (10^6 bytes) per second over `wall`.
pub(crate) fn mb_per_s(bytes: u64, wall: Duration) -> f64 {
    let s = wall.as_secs_f64();
    if s > 0.0 { bytes as f64 / s / 1e6 } else { 0.0 }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl SendStats {
    /// Plaintext MB/s over the wall time.
    pub(crate) fn mb_per_s(&self) -> f64 {
        mb_per_s(self.raw_bytes, self.wall)
    }

    /// For a report (the compressed size is the receiver's to measure).
    pub(crate) fn to_transfer_stats(self) -> TransferStats {
        TransferStats {
            bytes: self.raw_bytes,
            wire_bytes: self.wire_bytes,
            files: self.files,
            ms: ms(self.wall),
            compressed_bytes: None,
            chunks: Some(self.chunks),
            first_byte_ms: self.first_byte.map(ms),
        }
    }
}

impl ReceiveStats {
    /// Plaintext MB/s over the wall time.
    pub(crate) fn mb_per_s(&self) -> f64 {
        mb_per_s(self.raw_bytes, self.wall)
    }

    /// For a report.
    pub(crate) fn to_transfer_stats(self) -> TransferStats {
        TransferStats {
            bytes: self.raw_bytes,
            wire_bytes: self.wire_bytes,
            files: self.files,
            ms: ms(self.wall),
            compressed_bytes: Some(self.compressed_bytes),
            chunks: Some(self.chunks),
            first_byte_ms: self.first_byte.map(ms),
        }
    }
}

/// Kernel buffers asked for on a bulk transfer's UDP socket (the kernel doubles what it grants,
/// for its bookkeeping).
pub(crate) const SOCKET_BUFFER: usize = 32 << 20;

/// An endpoint configuration whose largest UDP payload is [`MTU_UPPER_BOUND`]: each side
/// advertises it, and MTU discovery never probes beyond what the peer advertised (quinn's
/// default, 1472, would cap every link at Ethernet's size).
pub(crate) fn bulk_endpoint_config() -> quinn::EndpointConfig {
    let mut cfg = quinn::EndpointConfig::default();
    // MTU_UPPER_BOUND is within 1200..=65527, which is all the setter checks.
    let _ = cfg.max_udp_payload_size(MTU_UPPER_BOUND);
    cfg
}

/// A UDP socket bound to `addr` for bulk transfers, and the receive buffer the kernel granted
/// it (as `SO_RCVBUF` reports it), for [`tune_for_bulk`].
///
/// Asks for [`SOCKET_BUFFER`] bytes each way with `SO_RCVBUFFORCE` / `SO_SNDBUFFORCE`
/// (CAP_NET_ADMIN, which the agents have as root), else with `SO_RCVBUF` / `SO_SNDBUF`, which
/// the kernel caps at `net.core.rmem_max` / `wmem_max`. Datagrams that find the buffer full
/// are dropped, quinn takes the drops for congestion, and its black hole detector, seeing
/// large datagrams lost, falls back to 1200-byte ones: the buffer must hold what the flow
/// control window lets the sender have in flight.
pub(crate) fn bulk_socket(addr: std::net::SocketAddr) -> io::Result<(std::net::UdpSocket, usize)> {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    let socket = std::net::UdpSocket::bind(addr)?;
    if setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        setsockopt(&socket, sockopt::RcvBuf, &SOCKET_BUFFER).map_err(io::Error::from)?;
    }
    if setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        setsockopt(&socket, sockopt::SndBuf, &SOCKET_BUFFER).map_err(io::Error::from)?;
    }
    let granted = getsockopt(&socket, sockopt::RcvBuf).map_err(io::Error::from)?;
    Ok((socket, granted))
}

/// The stream receive window for a socket granted `receive_buffer` bytes: half of it (the
/// kernel counts its own overhead per datagram in the buffer), at most
/// [`STREAM_RECEIVE_WINDOW`], at least 64 KiB.
pub(crate) fn stream_window_for(receive_buffer: usize) -> u64 {
    (receive_buffer as u64 / 2).clamp(64 << 10, STREAM_RECEIVE_WINDOW)
}

/// Sets a bulk transfer's windows and MTU discovery on the agents' transport configuration
/// (which holds their own idle timeout), for an endpoint whose socket was granted
/// `receive_buffer` bytes ([`bulk_socket`]): stream receive window
/// [`stream_window_for`]`(receive_buffer)`, connection receive window twice that, send window
/// [`SEND_WINDOW`], MTU discovery up to [`MTU_UPPER_BOUND`].
pub(crate) fn tune_for_bulk(t: &mut quinn::TransportConfig, receive_buffer: usize) {
    let window = stream_window_for(receive_buffer);
    // Both are at most 32 MiB, far below 2^62.
    t.stream_receive_window(quinn::VarInt::from_u64(window).unwrap_or(quinn::VarInt::MAX));
    t.receive_window(quinn::VarInt::from_u64(2 * window).unwrap_or(quinn::VarInt::MAX));
    t.send_window(SEND_WINDOW);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtu));
}

// ---------------------------------------------------------------------------------------------
// Sending.

/// A [`quinn::SendStream`] that is reset with [`AbortCode::Cancelled`] when dropped unfinished:
/// quinn finishes a dropped stream, which the receiver would take for a complete one.
struct SendGuard {
    send: quinn::SendStream,
    done: bool,
}

impl SendGuard {
    fn reset(&mut self, why: AbortCode) {
        self.done = true;
        // Fails only if the stream was finished or reset already: nothing left to do then.
        let _ = self.send.reset(why.code());
    }
}

impl Drop for SendGuard {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.send.reset(AbortCode::Cancelled.code());
        }
    }
}

/// The sending channel's end on a blocking thread: a [`FrameSink`] that hands each payload of
/// [`HAND_OVER_MIN`] bytes or more over in the chunker's own buffer (quinn takes it without a
/// copy), and a `Write` that gathers everything else into buffers of [`SEND_BUFFER`] bytes. It
/// blocks while [`QUEUE_DEPTH`] buffers are queued.
struct ChannelWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
    /// Stream offset of `buf[0]`.
    offset: u64,
    corrupt_at: Option<u64>,
}

impl ChannelWriter {
    fn new(tx: mpsc::Sender<Vec<u8>>, corrupt_at: Option<u64>) -> Self {
        Self {
            tx,
            buf: Vec::with_capacity(SEND_BUFFER),
            offset: 0,
            corrupt_at,
        }
    }

    /// Hands the gathered bytes over.
    fn ship(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let gathered = if self.buf.len() >= SEND_BUFFER / 2 {
            std::mem::replace(&mut self.buf, Vec::with_capacity(SEND_BUFFER))
        } else {
            // A few frame heads before a payload handed over whole: copied out, so that quinn
            // does not hold a whole SEND_BUFFER for them until they are acknowledged.
            let small = self.buf.clone();
            self.buf.clear();
            small
        };
        self.send(gathered)
    }

    /// Hands `buf`, the stream's next bytes, over (corrupting the chosen byte on the way).
    fn send(&mut self, mut buf: Vec<u8>) -> io::Result<()> {
        let len = buf.len() as u64;
        if let Some(at) = self.corrupt_at
            && (self.offset..self.offset + len).contains(&at)
        {
            // `at - offset < len`, a usize.
            buf[(at - self.offset) as usize] ^= 0xff;
        }
        self.offset += len;
        self.tx
            .blocking_send(buf)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the stream writer stopped"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = SEND_BUFFER - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= SEND_BUFFER {
            self.ship()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.ship()
    }
}

impl FrameSink for ChannelWriter {
    fn put(&mut self, head: &[u8], payload: &mut Vec<u8>) -> io::Result<()> {
        self.write_all(head)?;
        if payload.len() < HAND_OVER_MIN {
            return self.write_all(payload);
        }
        // The heads gathered so far (this frame's last), then the payload as it is.
        self.ship()?;
        self.send(std::mem::take(payload))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.ship()
    }
}

/// What the async side of a sending pump saw.
struct Pumped {
    wire_bytes: u64,
    first_byte: Option<Duration>,
    /// quinn's error, if writing failed.
    write_error: Option<quinn::WriteError>,
}

/// Runs `produce` on a blocking thread, writing into a [`ChannelWriter`], and writes what it
/// produces to `send`. Returns when both are done: `produce`'s result comes back after the
/// thread ended.
async fn pump_out<T, E>(
    send: &mut quinn::SendStream,
    corrupt_at: Option<u64>,
    start: Instant,
    produce: impl FnOnce(&mut ChannelWriter) -> Result<T, E> + Send + 'static,
) -> (Pumped, Result<Result<T, E>, StreamError>)
where
    T: Send + 'static,
    E: Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE_DEPTH);
    let worker = tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter::new(tx, corrupt_at);
        produce(&mut w)
    });
    let mut pumped = Pumped {
        wire_bytes: 0,
        first_byte: None,
        write_error: None,
    };
    while let Some(buf) = rx.recv().await {
        pumped.first_byte.get_or_insert_with(|| start.elapsed());
        pumped.wire_bytes += buf.len() as u64;
        // Vec -> Bytes without a copy; quinn keeps it until acknowledged.
        if let Err(e) = send.write_chunk(buf.into()).await {
            pumped.write_error = Some(e);
            break;
        }
    }
    // Wakes a producer blocked on a full queue: its next send fails and it stops.
    drop(rx);
    let produced = worker
        .await
        .map_err(|e| StreamError::Internal(format!("the sending thread: {e}")));
    (pumped, produced)
}

fn write_error(e: quinn::WriteError) -> StreamError {
    match e {
        quinn::WriteError::Stopped(code) => StreamError::PeerAborted(AbortCode::from_code(code)),
        quinn::WriteError::ConnectionLost(e) => StreamError::LinkGone(e),
        e => StreamError::Internal(format!("writing the stream: {e}")),
    }
}

/// Waits until the peer acknowledged every byte of the finished stream (not that it accepted
/// the image set: the receiver's verdict is [`receive_image_set`]'s result).
async fn finish(guard: &mut SendGuard) -> Result<(), StreamError> {
    guard.done = true;
    guard
        .send
        .finish()
        .map_err(|e| StreamError::Internal(format!("finishing the stream: {e}")))?;
    match guard.send.stopped().await {
        Ok(None) => Ok(()),
        Ok(Some(code)) => Err(StreamError::PeerAborted(AbortCode::from_code(code))),
        Err(quinn::StoppedError::ConnectionLost(e)) => Err(StreamError::LinkGone(e)),
        Err(e) => Err(StreamError::Internal(format!("finishing the stream: {e}"))),
    }
}

fn chunk_error(e: ChunkError) -> StreamError {
    match e {
        ChunkError::Seal(e) => StreamError::Seal(e),
        ChunkError::InvalidChunkSize { .. } => StreamError::Config(e),
        ChunkError::Failed => StreamError::Internal(e.to_string()),
        e => StreamError::Source(e),
    }
}

/// Streams the image set under `dir`, zstd-compressed (per `cfg`) and sealed under `key`, to
/// `send`, then finishes the stream and waits until the peer acknowledged every byte.
///
/// On failure the stream is reset with the reason's [`AbortCode`] (also when the future is
/// dropped: [`AbortCode::Cancelled`]). `Ok` means the bytes arrived, not that the receiver
/// accepted them: that is [`receive_image_set`]'s result on the other side.
pub(crate) async fn send_image_set(
    dir: &Path,
    key: &Key,
    send: quinn::SendStream,
    cfg: &StreamConfig,
) -> Result<SendStats, StreamError> {
    let start = Instant::now();
    let mut guard = SendGuard { send, done: false };
    let prepared = Sealer::new(key)
        .map_err(StreamError::Seal)
        .and_then(|sealer| {
            Chunker::new(
                dir,
                ChunkerConfig {
                    chunk_size: cfg.chunk_size,
                    compression: cfg.compression,
                    sealer: Some(sealer),
                },
            )
            .map_err(|e| match e {
                ChunkError::Compress(_) | ChunkError::InvalidChunkSize { .. } => {
                    StreamError::Config(e)
                }
                e => chunk_error(e),
            })
        });
    let chunker = match prepared {
        Ok(c) => c,
        Err(e) => {
            guard.reset(e.abort_code(true));
            return Err(e);
        }
    };
    let (pumped, produced) = pump_out(&mut guard.send, cfg.corrupt_at, start, move |w| {
        chunker.write_frames(w)
    })
    .await;
    let result = match (pumped.write_error, produced) {
        // quinn's error first: the chunker then only saw its writer fail.
        (Some(e), _) => Err(write_error(e)),
        (None, Err(e)) => Err(e),
        (None, Ok(Err(e))) => Err(chunk_error(e)),
        (None, Ok(Ok(summary))) => Ok(summary),
    };
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            guard.reset(e.abort_code(true));
            return Err(e);
        }
    };
    finish(&mut guard).await?;
    Ok(SendStats {
        raw_bytes: summary.bytes,
        files: summary.files,
        chunks: summary.chunks,
        wire_bytes: pumped.wire_bytes,
        wall: start.elapsed(),
        first_byte: pumped.first_byte,
    })
}

// ---------------------------------------------------------------------------------------------
// Receiving.

/// What the async side hands the blocking one.
enum Piece<B> {
    /// Stream bytes, in order: quinn's chunks, gathered up to [`RECEIVE_BATCH`] bytes so that
    /// the blocking thread wakes once per batch, not once per packet.
    Data(Vec<B>),
    /// The stream finished cleanly after the bytes before.
    Fin,
}

/// The `Read` end of the receiving channel, on a blocking thread. Reads 0 (end of file) only
/// after the stream's FIN; a channel closed without it (the link failed, the stream was reset,
/// a bound was hit) is an error of kind `BrokenPipe`.
struct ChannelReader<B> {
    rx: mpsc::Receiver<Piece<B>>,
    /// The batch being read, reversed (the next buffer last).
    batch: Vec<B>,
    /// Bytes of the batch's last buffer already read.
    pos: usize,
    finished: bool,
}

impl<B: AsRef<[u8]>> Read for ChannelReader<B> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(cur) = self.batch.last() {
                let rest = &cur.as_ref()[self.pos..];
                if !rest.is_empty() {
                    let n = rest.len().min(out.len());
                    out[..n].copy_from_slice(&rest[..n]);
                    self.pos += n;
                    return Ok(n);
                }
                self.batch.pop();
                self.pos = 0;
                continue;
            }
            if self.finished {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Piece::Data(mut batch)) => {
                    batch.reverse();
                    self.batch = batch;
                    self.pos = 0;
                }
                Some(Piece::Fin) => {
                    self.finished = true;
                }
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the stream ended without its FIN",
                    ));
                }
            }
        }
    }
}

/// Why the async side of a receiving pump stopped before the FIN.
enum Cut {
    /// quinn's error.
    Read(quinn::ReadError),
    /// More than this many bytes arrived.
    WireBound(u64),
    /// The consumer stopped reading (it failed, or it needs no more).
    ConsumerGone,
}

/// What the async side of a receiving pump saw.
struct Drained {
    wire_bytes: u64,
    first_byte: Option<Duration>,
    cut: Option<Cut>,
}

/// Forwards `recv`'s bytes to `consume` on a blocking thread (as a `Read` that ends at the
/// stream's FIN), at most `max_wire` of them. Returns when both are done.
async fn pump_in<T: Send + 'static>(
    recv: &mut quinn::RecvStream,
    max_wire: u64,
    start: Instant,
    consume: impl FnOnce(&mut dyn Read) -> T + Send + 'static,
) -> (Drained, Result<T, StreamError>) {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let worker = tokio::task::spawn_blocking(move || {
        let mut r = ChannelReader {
            rx,
            batch: Vec::new(),
            pos: 0,
            finished: false,
        };
        consume(&mut r)
    });
    let mut drained = Drained {
        wire_bytes: 0,
        first_byte: None,
        cut: None,
    };
    let mut batch = Vec::new();
    let mut batched = 0;
    loop {
        let next = tokio::select! {
            // The consumer failed: stop reading now, so that the sender is told at once.
            () = tx.closed() => {
                drained.cut = Some(Cut::ConsumerGone);
                break;
            }
            // Cancel-safe: a chunk read is either returned or left in quinn.
            next = recv.read_chunk(usize::MAX, true) => next,
        };
        let fin = match next {
            Ok(Some(chunk)) => {
                drained.first_byte.get_or_insert_with(|| start.elapsed());
                drained.wire_bytes += chunk.bytes.len() as u64;
                if drained.wire_bytes > max_wire {
                    drained.cut = Some(Cut::WireBound(max_wire));
                    break;
                }
                batched += chunk.bytes.len();
                batch.push(chunk.bytes);
                false
            }
            Ok(None) => true,
            Err(e) => {
                drained.cut = Some(Cut::Read(e));
                break;
            }
        };
        if (fin || batched >= RECEIVE_BATCH) && !batch.is_empty() {
            batched = 0;
            if tx
                .send(Piece::Data(std::mem::take(&mut batch)))
                .await
                .is_err()
            {
                drained.cut = Some(Cut::ConsumerGone);
                break;
            }
        }
        if fin {
            if tx.send(Piece::Fin).await.is_err() {
                drained.cut = Some(Cut::ConsumerGone);
            }
            break;
        }
    }
    // Without a FIN sent, the consumer's next read fails and it stops.
    drop(tx);
    let consumed = worker
        .await
        .map_err(|e| StreamError::Internal(format!("the receiving thread: {e}")));
    (drained, consumed)
}

/// What the reassembling thread counted.
#[derive(Debug, Default, Clone, Copy)]
struct Counted {
    chunks: u64,
    compressed: u64,
}

/// The reassembling thread: frames -> items -> the reassembler; after the end record, the
/// stream must finish (no byte may follow) before the directory is renamed into place.
/// Returning drops the reassembler, which removes its staging directory unless it finished.
fn reassemble(
    mut re: Reassembler,
    r: &mut dyn Read,
) -> (Counted, Result<StreamSummary, ReassembleError>) {
    let mut counted = Counted::default();
    let res = (|| {
        // Verified and written straight from the frame buffers, on this thread and a writing
        // one.
        re.read_until_end(&mut *r, |payload| {
            counted.chunks += 1;
            counted.compressed += payload.saturating_sub(SEAL_OVERHEAD) as u64;
        })?;
        // The end record is verified; the stream must end right after it.
        let mut probe = [0u8; 1];
        match r.read(&mut probe) {
            Ok(0) => re.finish(),
            Ok(_) => Err(ReassembleError::AfterEnd),
            Err(e) => Err(ReassembleError::Read(e)),
        }
    })();
    (counted, res)
}

/// Whether a reassembler's error only says that its input stopped (the cause is then the
/// async side's).
fn input_ended(e: &ReassembleError) -> bool {
    matches!(e, ReassembleError::Truncated | ReassembleError::Read(_))
}

fn reassemble_error(e: ReassembleError) -> StreamError {
    match e {
        ReassembleError::Open(OpenError::WrongKey { expected, found }) => {
            StreamError::WrongKey { expected, found }
        }
        ReassembleError::TotalTooLarge { max } => StreamError::TooLarge { max },
        ReassembleError::DestinationExists { .. }
        | ReassembleError::SymlinkInDestination { .. }
        | ReassembleError::Io { .. } => StreamError::Destination(e),
        ReassembleError::Failed => StreamError::Internal(e.to_string()),
        e => StreamError::Corrupted(e),
    }
}

fn read_error(e: quinn::ReadError) -> StreamError {
    match e {
        quinn::ReadError::Reset(code) => StreamError::PeerAborted(AbortCode::from_code(code)),
        quinn::ReadError::ConnectionLost(e) => StreamError::LinkGone(e),
        e => StreamError::Internal(format!("reading the stream: {e}")),
    }
}

/// The error of a receiving pump: the consumer's, unless it only saw its input stop, in which
/// case the async side's reason (link gone, reset, bound) explains it.
fn receive_error(cut: Option<Cut>, consumer: ReassembleError) -> StreamError {
    if !input_ended(&consumer) {
        return reassemble_error(consumer);
    }
    match cut {
        Some(Cut::Read(e)) => read_error(e),
        Some(Cut::WireBound(max)) => StreamError::WireTooLarge { max },
        // FIN without the end record (Truncated), or a consumer that stopped by itself.
        Some(Cut::ConsumerGone) | None => StreamError::Corrupted(consumer),
    }
}

/// Receives an image set sealed under `key` from `recv` into the new directory `dest`.
///
/// The files are staged next to `dest` and renamed into place only after the end record
/// verified and the stream finished; on any error neither `dest` nor the staging directory
/// exists afterwards, and the sender is told why (STOP_SENDING with the [`AbortCode`]). At
/// most `cfg.max_total_bytes` of plaintext and [`max_wire_bytes`] of it on the wire are
/// accepted. Dropping the future stops the stream; the staging directory is then removed by
/// the reassembling thread when it notices, shortly after.
pub(crate) async fn receive_image_set(
    mut recv: quinn::RecvStream,
    key: &Key,
    dest: &Path,
    cfg: &StreamConfig,
) -> Result<ReceiveStats, StreamError> {
    let start = Instant::now();
    let reassembler = Reassembler::new(
        dest,
        ReassemblerConfig {
            opener: Some(Opener::new(key)),
            max_chunk: MAX_CHUNK_SIZE,
            max_total_bytes: Some(cfg.max_total_bytes),
        },
    );
    let reassembler = match reassembler {
        Ok(r) => r,
        Err(e) => {
            let e = reassemble_error(e);
            let _ = recv.stop(e.abort_code(false).code());
            return Err(e);
        }
    };
    let max_wire = max_wire_bytes(cfg.max_total_bytes);
    let (drained, consumed) = pump_in(&mut recv, max_wire, start, move |r| {
        reassemble(reassembler, r)
    })
    .await;
    let result = match consumed {
        Err(e) => Err(e),
        Ok((counted, Ok(summary))) => Ok((counted, summary)),
        Ok((_, Err(e))) => Err(receive_error(drained.cut, e)),
    };
    match result {
        Ok((counted, summary)) => Ok(ReceiveStats {
            raw_bytes: summary.bytes,
            files: summary.files,
            chunks: counted.chunks,
            compressed_bytes: counted.compressed,
            wire_bytes: drained.wire_bytes,
            wall: start.elapsed(),
            first_byte: drained.first_byte,
        }),
        Err(e) => {
            // Fails only if the stream is gone already (finished, reset): nothing to tell.
            let _ = recv.stop(e.abort_code(false).code());
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::measure::{SplitMix, agreed_key, list_files, loopback_pair};
    use super::*;
    use migration_wire::frame;
    use std::fs;
    use std::path::PathBuf;

    /// Every test is bounded in time.
    const LIMIT: Duration = Duration::from_secs(60);

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = SplitMix(seed);
        let mut v = vec![0u8; len];
        rng.fill(&mut v);
        v
    }

    /// A small tree: compressible, random, empty, nested.
    pub(super) fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::write(root.join("inventory.img"), b"criu inventory v1").unwrap();
        fs::write(root.join("pages-1.img"), b"page ".repeat(300_000)).unwrap();
        fs::write(root.join("random.img"), pattern(700_001, 7)).unwrap();
        fs::write(root.join("empty.img"), b"").unwrap();
        fs::create_dir_all(root.join("nested/deeper")).unwrap();
        fs::write(root.join("nested/core-1.img"), pattern(4096, 8)).unwrap();
        fs::write(root.join("nested/deeper/mm-1.img"), vec![0u8; 1 << 20]).unwrap();
        dir
    }

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

    /// Nothing of `dest` is left: neither it nor a staging directory next to it.
    fn assert_nothing_left(dest: &Path) {
        assert!(!dest.exists(), "{} exists", dest.display());
        let name = dest.file_name().unwrap().to_string_lossy().into_owned();
        let leftovers: Vec<_> = fs::read_dir(dest.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&name))
            .collect();
        assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    }

    fn small_chunks() -> StreamConfig {
        StreamConfig {
            chunk_size: 64 << 10,
            ..StreamConfig::default()
        }
    }

    /// Sends `src` with (`key`, `cfg`) and receives with (`rkey`, `rcfg`) over a fresh
    /// loopback connection; returns both results.
    async fn run(
        src: &Path,
        dest: &Path,
        key: &Key,
        cfg: &StreamConfig,
        rkey: &Key,
        rcfg: &StreamConfig,
    ) -> (
        Result<SendStats, StreamError>,
        Result<ReceiveStats, StreamError>,
    ) {
        let link = loopback_pair().await.unwrap();
        let (conn, peer) = (link.conn.clone(), link.peer.clone());
        let send = conn.open_uni().await.unwrap();
        let (src2, key2, cfg2) = (src.to_owned(), key.clone(), cfg.clone());
        let sender = tokio::spawn(async move { send_image_set(&src2, &key2, send, &cfg2).await });
        let recv = peer.accept_uni().await.unwrap();
        let received = receive_image_set(recv, rkey, dest, rcfg).await;
        let sent = sender.await.unwrap();
        link.close().await;
        (sent, received)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tree_round_trips_byte_for_byte() {
        tokio::time::timeout(LIMIT, async {
            let src = tree();
            let out = tempfile::tempdir().unwrap();
            let dest = out.path().join("images");
            let key = agreed_key(b"round trip").unwrap();
            let cfg = small_chunks();
            let (sent, received) = run(src.path(), &dest, &key, &cfg, &key, &cfg).await;
            let sent = sent.unwrap();
            let received = received.unwrap();
            assert_eq!(contents(src.path()), contents(&dest));
            let raw = 17 + 1_500_000 + 700_001 + 4096 + (1 << 20);
            assert_eq!(sent.raw_bytes, raw);
            assert_eq!(received.raw_bytes, raw);
            assert_eq!((sent.files, received.files), (6, 6));
            assert_eq!(sent.chunks, received.chunks);
            assert_eq!(sent.wire_bytes, received.wire_bytes);
            // Text and zeros compress; the random file does not; sealing adds its overhead.
            assert!(received.compressed_bytes < raw / 2, "{received:?}");
            assert!(received.compressed_bytes > 700_000, "{received:?}");
            assert!(
                received.wire_bytes > received.compressed_bytes,
                "{received:?}"
            );
            assert!(sent.first_byte.is_some() && received.first_byte.is_some());
            let report = received.to_transfer_stats();
            assert_eq!(report.compressed_bytes, Some(received.compressed_bytes));
            assert_eq!(report.chunks, Some(received.chunks));
            assert!(report.mb_per_s() > 0.0 && received.mb_per_s() > 0.0);
            let report = sent.to_transfer_stats();
            assert_eq!((report.bytes, report.compressed_bytes), (raw, None));
            assert!(sent.mb_per_s() > 0.0);
            // Nothing but the destination was created next to it.
            assert_eq!(fs::read_dir(out.path()).unwrap().count(), 1);
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_uncompressed_stream_round_trips_too() {
        tokio::time::timeout(LIMIT, async {
            let src = tree();
            let out = tempfile::tempdir().unwrap();
            let dest = out.path().join("images");
            let key = agreed_key(b"uncompressed").unwrap();
            let cfg = StreamConfig {
                compression: Compression::None,
                ..small_chunks()
            };
            let (sent, received) = run(src.path(), &dest, &key, &cfg, &key, &cfg).await;
            sent.unwrap();
            let received = received.unwrap();
            assert_eq!(contents(src.path()), contents(&dest));
            assert_eq!(received.compressed_bytes, received.raw_bytes);
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupted_byte_is_refused_and_nothing_is_left() {
        tokio::time::timeout(LIMIT, async {
            let src = tree();
            let key = agreed_key(b"corrupt").unwrap();
            let clean = tempfile::tempdir().unwrap();
            let (sent, _) = run(
                src.path(),
                &clean.path().join("images"),
                &key,
                &small_chunks(),
                &key,
                &small_chunks(),
            )
            .await;
            let len = sent.unwrap().wire_bytes;
            // Early (inside the first payload), in the middle, and in the end record's seal.
            for at in [200u64, len / 2, len - 20] {
                let out = tempfile::tempdir().unwrap();
                let dest = out.path().join("images");
                let cfg = StreamConfig {
                    corrupt_at: Some(at),
                    ..small_chunks()
                };
                let (sent, received) =
                    run(src.path(), &dest, &key, &cfg, &key, &small_chunks()).await;
                let err = received.unwrap_err();
                assert!(matches!(err, StreamError::Corrupted(_)), "at {at}: {err:?}");
                assert_nothing_left(&dest);
                // The sender either learned the verdict or had delivered everything already.
                match sent {
                    Ok(_) | Err(StreamError::PeerAborted(AbortCode::Corrupted)) => {}
                    Err(e) => panic!("at {at}: sender {e:?}"),
                }
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_closed_mid_transfer_is_link_gone_and_nothing_is_left() {
        tokio::time::timeout(LIMIT, async {
            let src = tree();
            let out = tempfile::tempdir().unwrap();
            let dest = out.path().join("images");
            let key = agreed_key(b"link gone").unwrap();
            let link = loopback_pair().await.unwrap();
            let (conn, peer) = (link.conn.clone(), link.peer.clone());
            // A sender that writes the first 300 kB of a real stream, then closes the
            // connection.
            let mut wire = Vec::new();
            let mut c = Chunker::new(
                src.path(),
                ChunkerConfig {
                    chunk_size: 64 << 10,
                    compression: Compression::Zstd { level: 1 },
                    sealer: Some(Sealer::new(&key).unwrap()),
                },
            )
            .unwrap();
            while let Some(item) = c.next_item().unwrap() {
                frame::encode(&item, frame::DEFAULT_MAX_FRAME, &mut wire).unwrap();
            }
            assert!(wire.len() > 600_000, "{}", wire.len());
            let mut send = conn.open_uni().await.unwrap();
            let conn2 = conn.clone();
            let sender = tokio::spawn(async move {
                send.write_all(&wire[..300_000]).await.unwrap();
                // Let the bytes reach the receiver before the connection goes.
                tokio::time::sleep(Duration::from_millis(200)).await;
                conn2.close(7u32.into(), b"sender gone");
            });
            let recv = peer.accept_uni().await.unwrap();
            let err = receive_image_set(recv, &key, &dest, &StreamConfig::default())
                .await
                .unwrap_err();
            sender.await.unwrap();
            assert!(
                matches!(
                    &err,
                    StreamError::LinkGone(quinn::ConnectionError::ApplicationClosed(c))
                        if c.error_code == 7u32.into()
                ),
                "{err:?}"
            );
            assert_nothing_left(&dest);
            link.close().await;
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sender_sees_link_gone_when_the_receivers_side_closes() {
        tokio::time::timeout(LIMIT, async {
            let src = tree();
            let key = agreed_key(b"link gone, sender").unwrap();
            let link = loopback_pair().await.unwrap();
            let (conn, peer) = (link.conn.clone(), link.peer.clone());
            let send = conn.open_uni().await.unwrap();
            let src2 = src.path().to_owned();
            let sender =
                tokio::spawn(
                    async move { send_image_set(&src2, &key, send, &small_chunks()).await },
                );
            // The receiver takes the stream, reads a little, and its agent goes away.
            let mut recv = peer.accept_uni().await.unwrap();
            let _ = recv.read_chunk(1000, true).await.unwrap();
            peer.close(9u32.into(), b"receiver gone");
            let err = sender.await.unwrap().unwrap_err();
            assert!(matches!(err, StreamError::LinkGone(_)), "{err:?}");
            link.close().await;
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_key_is_refused_and_nothing_is_left() {
        tokio::time::timeout(LIMIT, async {
            let src = tree();
            let out = tempfile::tempdir().unwrap();
            let dest = out.path().join("images");
            let key = agreed_key(b"migration 1").unwrap();
            let other = agreed_key(b"migration 2").unwrap();
            let cfg = small_chunks();
            let (sent, received) = run(src.path(), &dest, &key, &cfg, &other, &cfg).await;
            let err = received.unwrap_err();
            assert!(
                matches!(err, StreamError::WrongKey { expected, found }
                    if expected == other.id() && found == key.id()),
                "{err:?}"
            );
            assert_nothing_left(&dest);
            // The sender learns the reason if the stop reaches it before the peer has received
            // every byte (a small set fits in the window: then it only knows it was delivered).
            match sent {
                Ok(_) | Err(StreamError::PeerAborted(AbortCode::WrongKey)) => {}
                Err(e) => panic!("sender {e:?}"),
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_sender_is_told_why_the_receiver_refused() {
        tokio::time::timeout(LIMIT, async {
            // Larger than the flow control window: the sender cannot deliver it all before the
            // receiver's STOP_SENDING arrives.
            let src = tempfile::tempdir().unwrap();
            let window = stream_window_for(usize::MAX) as usize;
            fs::write(src.path().join("pages-1.img"), vec![0u8; 3 * window]).unwrap();
            let out = tempfile::tempdir().unwrap();
            let dest = out.path().join("images");
            let (key, other) = (agreed_key(b"a").unwrap(), agreed_key(b"b").unwrap());
            let cfg = StreamConfig {
                compression: Compression::None,
                ..StreamConfig::default()
            };
            let (sent, received) = run(src.path(), &dest, &key, &cfg, &other, &cfg).await;
            let err = received.unwrap_err();
            assert!(matches!(err, StreamError::WrongKey { .. }), "{err:?}");
            let err = sent.unwrap_err();
            assert!(
                matches!(err, StreamError::PeerAborted(AbortCode::WrongKey)),
                "{err:?}"
            );
            assert_eq!(
                err.to_string(),
                "the peer aborted the image stream: the receiver holds another key (code 2)"
            );
            assert_nothing_left(&dest);
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_bigger_than_the_bound_is_refused() {
        tokio::time::timeout(LIMIT, async {
            let src = tree();
            let out = tempfile::tempdir().unwrap();
            let dest = out.path().join("images");
            let key = agreed_key(b"too large").unwrap();
            let rcfg = StreamConfig {
                max_total_bytes: 1_000_000,
                ..small_chunks()
            };
            let (sent, received) = run(src.path(), &dest, &key, &small_chunks(), &key, &rcfg).await;
            let err = received.unwrap_err();
            assert!(
                matches!(err, StreamError::TooLarge { max: 1_000_000 }),
                "{err:?}"
            );
            assert_nothing_left(&dest);
            match sent {
                Ok(_) | Err(StreamError::PeerAborted(AbortCode::TooLarge)) => {}
                Err(e) => panic!("sender {e:?}"),
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_beyond_the_wire_bound_are_refused() {
        tokio::time::timeout(LIMIT, async {
            let out = tempfile::tempdir().unwrap();
            let dest = out.path().join("images");
            let key = agreed_key(b"wire bound").unwrap();
            let link = loopback_pair().await.unwrap();
            let (conn, peer) = (link.conn.clone(), link.peer.clone());
            let mut send = conn.open_uni().await.unwrap();
            // A peer that sends only garbage that never frames: the wire bound stops it, not
            // the frame bound (the length prefix announces a frame within it).
            let sender = tokio::spawn(async move {
                let mut junk = vec![0u8; 1 << 20];
                junk[..4].copy_from_slice(&(1u32 << 20).to_be_bytes());
                for _ in 0..80 {
                    if send.write_all(&junk).await.is_err() {
                        return;
                    }
                }
            });
            let recv = peer.accept_uni().await.unwrap();
            let cfg = StreamConfig {
                max_total_bytes: 0,
                ..StreamConfig::default()
            };
            let err = receive_image_set(recv, &key, &dest, &cfg)
                .await
                .unwrap_err();
            // Either bound may speak first: the frame is refused as corrupt once read whole,
            // or the wire bound (64 MiB for a 0-byte set) is reached before.
            assert!(
                matches!(
                    err,
                    StreamError::Corrupted(_) | StreamError::WireTooLarge { .. }
                ),
                "{err:?}"
            );
            assert_nothing_left(&dest);
            sender.await.unwrap();
            link.close().await;
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_finished_before_its_end_record_is_corrupted() {
        tokio::time::timeout(LIMIT, async {
            let src = tree();
            let out = tempfile::tempdir().unwrap();
            let dest = out.path().join("images");
            let key = agreed_key(b"truncated").unwrap();
            let mut wire = Vec::new();
            let mut c = Chunker::new(
                src.path(),
                ChunkerConfig {
                    chunk_size: 64 << 10,
                    compression: Compression::Zstd { level: 1 },
                    sealer: Some(Sealer::new(&key).unwrap()),
                },
            )
            .unwrap();
            while let Some(item) = c.next_item().unwrap() {
                frame::encode(&item, frame::DEFAULT_MAX_FRAME, &mut wire).unwrap();
            }
            let link = loopback_pair().await.unwrap();
            let (conn, peer) = (link.conn.clone(), link.peer.clone());
            let mut send = conn.open_uni().await.unwrap();
            let cut = wire.len() - 10;
            let sender = tokio::spawn(async move {
                send.write_all(&wire[..cut]).await.unwrap();
                send.finish().unwrap();
                let _ = send.stopped().await;
            });
            let recv = peer.accept_uni().await.unwrap();
            let err = receive_image_set(recv, &key, &dest, &StreamConfig::default())
                .await
                .unwrap_err();
            assert!(
                matches!(err, StreamError::Corrupted(ReassembleError::Truncated)),
                "{err:?}"
            );
            assert_nothing_left(&dest);
            sender.await.unwrap();
            link.close().await;
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_image_set_is_a_source_error_and_the_receiver_told() {
        tokio::time::timeout(LIMIT, async {
            let out = tempfile::tempdir().unwrap();
            let dest = out.path().join("images");
            let missing = out.path().join("no-such-dir");
            let key = agreed_key(b"missing").unwrap();
            let cfg = StreamConfig::default();
            let (sent, received) = run(&missing, &dest, &key, &cfg, &key, &cfg).await;
            let err = sent.unwrap_err();
            assert!(matches!(err, StreamError::Source(_)), "{err:?}");
            let err = received.unwrap_err();
            assert!(
                matches!(err, StreamError::PeerAborted(AbortCode::SenderFailed)),
                "{err:?}"
            );
            assert_nothing_left(&dest);
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_existing_destination_is_refused_untouched() {
        tokio::time::timeout(LIMIT, async {
            let src = tree();
            let out = tempfile::tempdir().unwrap();
            let dest = out.path().join("images");
            fs::create_dir(&dest).unwrap();
            fs::write(dest.join("keep"), b"mine").unwrap();
            let key = agreed_key(b"exists").unwrap();
            let cfg = small_chunks();
            let (sent, received) = run(src.path(), &dest, &key, &cfg, &key, &cfg).await;
            let err = received.unwrap_err();
            assert!(matches!(err, StreamError::Destination(_)), "{err:?}");
            assert_eq!(fs::read(dest.join("keep")).unwrap(), b"mine");
            match sent {
                Ok(_) | Err(StreamError::PeerAborted(AbortCode::ReceiverFailed)) => {}
                Err(e) => panic!("sender {e:?}"),
            }
        })
        .await
        .unwrap();
    }

    #[test]
    fn abort_codes_round_trip_and_explain_themselves() {
        for c in [
            AbortCode::Corrupted,
            AbortCode::WrongKey,
            AbortCode::TooLarge,
            AbortCode::ReceiverFailed,
            AbortCode::SenderFailed,
            AbortCode::Cancelled,
            AbortCode::Other(0),
            AbortCode::Other(77),
        ] {
            assert_eq!(AbortCode::from_code(c.code()), c);
        }
        assert_eq!(
            AbortCode::Corrupted.to_string(),
            "the receiver found corrupted or forged data (code 1)"
        );
        assert_eq!(AbortCode::Other(0).to_string(), "unknown reason (code 0)");
    }
}
