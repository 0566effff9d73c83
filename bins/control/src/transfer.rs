//! The sealed transfer of an image set through migration-wire, as between two hosts.

use std::path::Path;
use std::time::{Duration, Instant};

use admin_api::TransferStats;
use anyhow::{Context, Result};
use tracing::info;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Streams the image set through migration-wire (zstd, sealed) into `dest`, as between hosts.
pub(crate) fn sealed(src: &Path, dest: &Path) -> Result<TransferStats> {
    use migration_wire::{
        ChunkError, Chunker, ChunkerConfig, ReassembleError, Reassembler, ReassemblerConfig,
    };
    use std::io::{BufReader, BufWriter, Write};

    /// Counts the bytes handed to the receiver.
    struct Counted<W> {
        inner: W,
        bytes: u64,
    }
    impl<W: Write> Write for Counted<W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.bytes += n as u64;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }

    const BUF: usize = 256 << 10;
    let start = Instant::now();
    let key = migration_crypto::Key::generate()?;
    let chunker = Chunker::new(
        src,
        ChunkerConfig {
            chunk_size: 1 << 20,
            compression: migration_wire::compress::Compression::Zstd { level: 1 },
            sealer: Some(migration_crypto::Sealer::new(&key)?),
        },
    )?;
    let reassembler = Reassembler::new(
        dest,
        ReassemblerConfig {
            opener: Some(migration_crypto::Opener::new(&key)),
            max_chunk: 1 << 20,
            max_total_bytes: Some(16 << 30),
        },
    )?;
    // Sender and receiver run at once, joined by a pipe as a socket would join two hosts:
    // memory stays a few chunks, and the transfer takes about as long as its slowest stage
    // instead of the sum of both sides. `write_to` reads, compresses and writes on three
    // threads; whichever side stops drops its end of the pipe, so the other one ends too.
    let (reader, writer) = std::io::pipe().context("creating the transfer pipe")?;
    let (sent, received) = std::thread::scope(|s| {
        let sender = s.spawn(move || {
            let mut w = Counted {
                inner: BufWriter::with_capacity(BUF, writer),
                bytes: 0,
            };
            chunker.write_to(&mut w).map(|summary| (summary, w.bytes))
        });
        let received = reassembler.read_from(BufReader::with_capacity(BUF, reader));
        (sender.join(), received)
    });
    let sent = sent.map_err(|_| anyhow::anyhow!("the sending thread panicked"))?;
    let (summary, wire_bytes) = match (sent, received) {
        (Ok((summary, wire_bytes)), Ok(_)) => (summary, wire_bytes),
        // The receiver stopped first: the sender only saw the pipe close.
        (Err(ChunkError::Write(_)), Err(e)) if !matches!(e, ReassembleError::Truncated) => {
            return Err(e).context("receiving the image set");
        }
        // The sender stopped first: the receiver only saw the stream end early.
        (Err(e), _) => return Err(e).context("sending the image set"),
        (Ok(_), Err(e)) => return Err(e).context("receiving the image set"),
    };
    let took = start.elapsed();
    info!(
        bytes = summary.bytes,
        wire_bytes,
        ms = format_args!("{:.1}", ms(took)),
        "image set transferred (sealed)"
    );
    Ok(TransferStats {
        bytes: summary.bytes,
        wire_bytes,
        files: summary.files,
        ms: ms(took),
        chunks: Some(summary.chunks),
        ..TransferStats::default()
    })
}
