//! A minimal echo service over quinn: a server that echoes every bidirectional stream, and a
//! client stream that checks every echo, in order.

use std::sync::{Arc, Mutex, PoisonError};

/// Connections the echo server accepted, in order (lock it to look).
pub type Accepted = Arc<Mutex<Vec<quinn::Connection>>>;

/// Errors from an [`Echo`] stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EchoError {
    /// Opening the bidirectional stream failed.
    #[error("cannot open a stream: {0}")]
    Open(#[from] quinn::ConnectionError),
    /// Writing a message failed.
    #[error("cannot write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading the echo failed, or the stream ended before it was complete.
    #[error("cannot read the echo: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// The echo differs from what was sent: out of order or corrupted.
    #[error("echo {index} differs: sent {sent:?}, got {got:?}")]
    Mismatch {
        /// The message's number on this stream (0 for the first).
        index: usize,
        /// What was sent.
        sent: String,
        /// What came back.
        got: Vec<u8>,
    },
}

/// Accepts connections on `endpoint` (a spawned Tokio task, until the endpoint closes) and
/// echoes every bidirectional stream of each, chunk by chunk, finishing the send side when
/// the receive side ends. Returns the list of accepted connections.
pub fn spawn_echo_server(endpoint: quinn::Endpoint) -> Accepted {
    let accepted: Accepted = Arc::default();
    let list = accepted.clone();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(connection) = incoming.await else {
                continue;
            };
            list.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(connection.clone());
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                    tokio::spawn(async move {
                        while let Ok(Some(chunk)) = recv.read_chunk(usize::MAX, true).await {
                            if send.write_all(&chunk.bytes).await.is_err() {
                                return;
                            }
                        }
                        // The peer may be gone already: nothing left to tell it.
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    accepted
}

/// One bidirectional stream that sends numbered messages and checks every echo, in order.
#[derive(Debug)]
pub struct Echo {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    next: usize,
}

impl Echo {
    /// Opens a bidirectional stream on `connection`.
    pub async fn open(connection: &quinn::Connection) -> Result<Self, EchoError> {
        let (send, recv) = connection.open_bi().await?;
        Ok(Self {
            send,
            recv,
            next: 0,
        })
    }

    /// Messages sent and echoed back so far.
    pub fn completed(&self) -> usize {
        self.next
    }

    /// Sends `count` numbered messages (`echo-NNNNNN\n`), each awaited back and compared
    /// before the next is sent.
    pub async fn rounds(&mut self, count: usize) -> Result<(), EchoError> {
        for _ in 0..count {
            let message = format!("echo-{:06}\n", self.next);
            self.send.write_all(message.as_bytes()).await?;
            let mut back = vec![0_u8; message.len()];
            self.recv.read_exact(&mut back).await?;
            if back != message.as_bytes() {
                return Err(EchoError::Mismatch {
                    index: self.next,
                    sent: message,
                    got: back,
                });
            }
            self.next += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::configs;
    use std::net::{Ipv4Addr, SocketAddr};

    /// A server on loopback running `serve` on every stream; a client connection to it.
    async fn pair(
        serve: Option<fn(quinn::SendStream, quinn::RecvStream)>,
    ) -> (quinn::Connection, Accepted, quinn::Endpoint) {
        let (server_config, client_config) = configs(b"echo").unwrap();
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let server = quinn::Endpoint::server(server_config, any).unwrap();
        let addr = server.local_addr().unwrap();
        let accepted = match serve {
            None => spawn_echo_server(server),
            Some(serve) => {
                tokio::spawn(async move {
                    let connection = server.accept().await.unwrap().await.unwrap();
                    while let Ok((send, recv)) = connection.accept_bi().await {
                        serve(send, recv);
                    }
                });
                Accepted::default()
            }
        };
        let mut client = quinn::Endpoint::client(any).unwrap();
        client.set_default_client_config(client_config);
        let connection = client.connect(addr, "localhost").unwrap().await.unwrap();
        (connection, accepted, client)
    }

    #[tokio::test]
    async fn echoes_in_order() {
        let (connection, accepted, _client) = pair(None).await;
        let mut echo = Echo::open(&connection).await.unwrap();
        echo.rounds(3).await.unwrap();
        echo.rounds(2).await.unwrap();
        assert_eq!(echo.completed(), 5);
        assert_eq!(accepted.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn corrupted_echo_is_mismatch() {
        let (connection, _, _client) = pair(Some(|mut send, mut recv| {
            tokio::spawn(async move {
                while let Ok(Some(chunk)) = recv.read_chunk(usize::MAX, true).await {
                    let _ = send.write_all(&chunk.bytes.to_ascii_uppercase()).await;
                }
            });
        }))
        .await;
        let mut echo = Echo::open(&connection).await.unwrap();
        let err = echo.rounds(1).await.unwrap_err();
        assert!(
            matches!(&err, EchoError::Mismatch { index: 0, got, .. } if got == b"ECHO-000000\n"),
            "{err:?}"
        );
        assert_eq!(echo.completed(), 0);
    }

    #[tokio::test]
    async fn stream_finished_early_is_read_error() {
        let (connection, _, _client) = pair(Some(|mut send, recv| {
            tokio::spawn(async move {
                // Dropping the receive side would stop the client's writes instead.
                let _recv = recv;
                send.finish().unwrap();
                // Keep the stream alive until the client saw the finish.
                let _ = send.stopped().await;
            });
        }))
        .await;
        let mut echo = Echo::open(&connection).await.unwrap();
        let err = echo.rounds(1).await.unwrap_err();
        assert!(
            matches!(
                err,
                EchoError::Read(quinn::ReadExactError::FinishedEarly(0))
            ),
            "{err:?}"
        );
    }
}
