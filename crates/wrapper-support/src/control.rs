//! The control stream over quinn: typed messages in, typed messages out.

use control_protocol::{CloseCode, ControlDecoder, DecodeError, EncodeError, Message, Role};
use quinn::VarInt;

/// Largest chunk read from the stream at once.
const READ_CHUNK: usize = 4096;

/// Errors on the control stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlStreamError {
    /// The peer sent bytes that are not a valid control message.
    #[error("invalid control message: {0}")]
    Decode(#[from] DecodeError),
    /// A message could not be encoded.
    #[error("control message does not encode: {0}")]
    Encode(#[from] EncodeError),
    /// Reading failed (connection lost, stream reset by the peer).
    #[error("reading the control stream: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing failed (connection lost, stream stopped by the peer).
    #[error("writing the control stream: {0}")]
    Write(#[from] quinn::WriteError),
}

impl ControlStreamError {
    /// The code to close the stream with, when this side should close it.
    pub fn close_code(&self) -> CloseCode {
        match self {
            ControlStreamError::Decode(e) => e.close_code(),
            _ => CloseCode::Internal,
        }
    }
}

/// The receiving half of a control stream.
#[derive(Debug)]
pub struct ControlReader {
    recv: quinn::RecvStream,
    decoder: ControlDecoder,
}

impl ControlReader {
    /// Reads what the peer of `role` sends.
    pub fn new(recv: quinn::RecvStream, role: Role) -> Self {
        Self {
            recv,
            decoder: ControlDecoder::new(role),
        }
    }

    /// The next message; `Ok(None)` once the peer finished its side cleanly.
    ///
    /// Cancel-safe: bytes already read stay buffered in the decoder.
    pub async fn next(&mut self) -> Result<Option<Message>, ControlStreamError> {
        loop {
            if let Some(msg) = self.decoder.next()? {
                return Ok(Some(msg));
            }
            match self.recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None => {
                    self.decoder.finish()?;
                    return Ok(None);
                }
            }
        }
    }

    /// Tells the peer to stop sending, with `code`.
    pub fn stop(&mut self, code: CloseCode) {
        // Err only if the stream is already stopped or finished: nothing left to do.
        let _ = self.recv.stop(VarInt::from_u32(code.as_u32()));
    }
}

/// The sending half of a control stream.
#[derive(Debug)]
pub struct ControlWriter {
    send: quinn::SendStream,
    buf: Vec<u8>,
}

impl ControlWriter {
    /// Wraps the send half.
    pub fn new(send: quinn::SendStream) -> Self {
        Self {
            send,
            buf: Vec::with_capacity(256),
        }
    }

    /// Encodes and writes one message.
    pub async fn send(&mut self, msg: &Message) -> Result<(), ControlStreamError> {
        self.buf.clear();
        control_protocol::encode(msg, &mut self.buf)?;
        self.send.write_all(&self.buf).await?;
        Ok(())
    }

    /// Abandons the stream with `code`.
    pub fn reset(&mut self, code: CloseCode) {
        // Err only if already reset or finished.
        let _ = self.send.reset(VarInt::from_u32(code.as_u32()));
    }

    /// Finishes the stream cleanly.
    pub fn finish(&mut self) {
        // Err only if already reset or finished.
        let _ = self.send.finish();
    }
}

/// Closes both halves with `code`: the connection and the other streams are untouched.
pub fn close(writer: &mut ControlWriter, reader: &mut ControlReader, code: CloseCode) {
    writer.reset(code);
    reader.stop(code);
}
