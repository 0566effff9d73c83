//! The demo echo service's client side (feature `demo`): one request per stream.

/// Errors of one echo exchange.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EchoError {
    /// No stream could be opened (the connection is gone).
    #[error("open stream: {0}")]
    Open(#[from] quinn::ConnectionError),
    /// The request could not be written.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream was already closed.
    #[error("finish: {0}")]
    Closed(#[from] quinn::ClosedStream),
    /// The reply could not be read.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadToEndError),
    /// The request or the reply does not encode or decode.
    #[error(transparent)]
    Codec(#[from] demo_echo::EchoError),
}

/// One request of the demo echo service on a fresh bidirectional stream.
pub async fn echo_once(
    conn: &quinn::Connection,
    req: &demo_echo::EchoRequest,
) -> Result<demo_echo::EchoReply, EchoError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&req.encode()?).await?;
    send.finish()?;
    let bytes = recv.read_to_end(demo_echo::MAX_FRAME).await?;
    Ok(demo_echo::EchoReply::decode(&bytes)?)
}
