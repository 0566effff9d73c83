//! The page relay of a post-copy move across hosts: criu's page traffic carried inside the
//! agents' mutually-authenticated QUIC connection, never as plain TCP between hosts.
//!
//! ```text
//!  source host                                              target host
//!  criu dump --lazy-pages                                   criu lazy-pages --page-server
//!   --ps-socket 3                                            --ps-socket 3
//!      │ fd 3                                                    │ fd 3
//!      ▼                                                         ▼
//!  unix socket pair ◄─► source agent ══ QUIC bidi stream ══► target agent ◄─► unix socket pair
//!                       (relay)        (PeerBody::Pages)      (relay)
//! ```
//!
//! criu already talks to its page server over a unix socket (`--ps-socket`), so nothing of
//! criu needs a network address: each agent holds the other end of its criu's socket pair and
//! [`relay`] copies both directions between that end and one QUIC stream.
//!
//! Decisions:
//! - Half-closes travel: the unix side's EOF finishes the QUIC send side, the QUIC side's end
//!   shuts the unix side's write half down. criu's page protocol ends with each side closing,
//!   and a half-closed socket must not read as a failure.
//! - An error on either side ends both, and the QUIC stream is *reset* (and its receive side
//!   stopped), never merely dropped: quinn finishes a dropped send stream, which the peer would
//!   take for a clean end of the pages. A truncated page stream must look like a failure.
//! - Fixed-size buffers, one per direction; a read is written out before the next read, so
//!   memory does not grow with the pages (QUIC's flow control holds the sender back).
//! - No timeout here: the caller bounds the whole transfer (it knows how long the pages may
//!   take) and drops the future to stop it.
//! - The unix socket is borrowed, and an error leaves it open: at the source, criu's lazy
//!   dump takes its page socket's close for the end of the transfer and kills the frozen
//!   source, whereas a killed dump lets it go on. So the source agent kills the dump first
//!   and only then lets the socket go.

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Size of each direction's buffer.
const BUF: usize = 64 * 1024;
/// The application error code the relay resets (and stops) the QUIC stream with on failure.
pub(crate) const RELAY_FAILED: u32 = 0x5052; // "PR"

/// Bytes the relay moved, per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RelayFigures {
    /// From the local unix socket to the peer (the QUIC stream).
    pub(crate) to_peer: u64,
    /// From the peer to the local unix socket.
    pub(crate) from_peer: u64,
}

/// Why the relay stopped before both directions ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum RelayError {
    /// Reading the local criu's socket failed.
    #[error("reading the local page socket: {0}")]
    LocalRead(std::io::Error),
    /// Writing to the local criu's socket failed (it closed early, typically).
    #[error("writing to the local page socket: {0}")]
    LocalWrite(std::io::Error),
    /// Reading the peer's stream failed (reset, connection lost).
    #[error("reading the page stream from the peer agent: {0}")]
    PeerRead(#[from] quinn::ReadError),
    /// Writing the peer's stream failed (stopped, connection lost).
    #[error("writing the page stream to the peer agent: {0}")]
    PeerWrite(#[from] quinn::WriteError),
    /// The QUIC send side could not be finished.
    #[error("finishing the page stream to the peer agent: {0}")]
    PeerFinish(#[from] quinn::ClosedStream),
    /// The owner stopped the relay ([`relay_until`]).
    #[error("the page relay was stopped")]
    Stopped,
    /// The local criu closed its socket and had failed ([`relay_gated`]): its end is not
    /// passed on as the stream's clean end.
    #[error("the local criu failed (its page socket closed with it)")]
    LocalFailed,
}

/// Copies both directions between `local` and (`send`, `recv`) until both have ended; see the
/// module's decisions. On success, the figures; on failure, the first error (the stream reset
/// and stopped, `local` closed).
///
/// Everything is borrowed: the target's request handler keeps its send side afterwards (to
/// wait for the peer to have read the end), and the caller decides when the unix socket
/// closes (see the module's decisions).
pub(crate) async fn relay(
    local: &mut tokio::net::UnixStream,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<RelayFigures, RelayError> {
    relay_gated(local, send, recv, async { true }).await
}

/// [`relay`], with the local side's end judged first: when the unix socket reads EOF,
/// `local_end_ok` says whether the local criu ended well (the target agent asks whether its
/// lazy-pages daemon exited 0). Only then is the QUIC stream finished; otherwise it is reset
/// ([`RelayError::LocalFailed`]). At the source, a lazy dump that sees its page socket close
/// kills the frozen source, whereas a reset leaves the source agent free to stop the dump
/// first (which lets the source go on): a daemon that died must not look like one that
/// finished.
pub(crate) async fn relay_gated(
    local: &mut tokio::net::UnixStream,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    local_end_ok: impl std::future::Future<Output = bool>,
) -> Result<RelayFigures, RelayError> {
    let (mut local_read, mut local_write) = local.split();
    let mut figures = RelayFigures::default();
    let copied = {
        let up = up(&mut local_read, send, &mut figures.to_peer, local_end_ok);
        let down = down(recv, &mut local_write, &mut figures.from_peer);
        tokio::try_join!(up, down)
    };
    match copied {
        Ok(((), ())) => Ok(figures),
        Err(e) => {
            // Reset, not finish (see the module's decisions); either may be over already.
            let code = quinn::VarInt::from_u32(RELAY_FAILED);
            let _ = send.reset(code);
            let _ = recv.stop(code);
            Err(e)
        }
    }
}

/// [`relay`] until `stop` completes, whichever ends first. Stopped, the stream is reset (and
/// its receive side stopped) like on an error, never finished: dropping the relay instead
/// would drop the quinn send stream, which finishes it, and the peer's criu would take the
/// truncated page stream for its clean end.
pub(crate) async fn relay_until(
    local: &mut tokio::net::UnixStream,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    stop: impl std::future::Future<Output = ()>,
) -> Result<RelayFigures, RelayError> {
    {
        // The relay's borrows end with this block, before the reset below.
        let relayed = relay(local, send, recv);
        tokio::pin!(relayed);
        tokio::pin!(stop);
        tokio::select! {
            r = &mut relayed => return r,
            () = &mut stop => {}
        }
    }
    let code = quinn::VarInt::from_u32(RELAY_FAILED);
    let _ = send.reset(code);
    let _ = recv.stop(code);
    Err(RelayError::Stopped)
}

/// Local socket to the peer; the local EOF finishes the stream.
async fn up(
    local: &mut tokio::net::unix::ReadHalf<'_>,
    send: &mut quinn::SendStream,
    count: &mut u64,
    local_end_ok: impl std::future::Future<Output = bool>,
) -> Result<(), RelayError> {
    let mut buf = vec![0u8; BUF];
    loop {
        let n = local.read(&mut buf).await.map_err(RelayError::LocalRead)?;
        if n == 0 {
            if !local_end_ok.await {
                return Err(RelayError::LocalFailed);
            }
            send.finish()?;
            return Ok(());
        }
        send.write_all(&buf[..n]).await?;
        *count += n as u64;
    }
}

/// The peer to the local socket; the stream's end shuts the local write half down.
async fn down(
    recv: &mut quinn::RecvStream,
    local: &mut tokio::net::unix::WriteHalf<'_>,
    count: &mut u64,
) -> Result<(), RelayError> {
    let mut buf = vec![0u8; BUF];
    loop {
        let Some(n) = recv.read(&mut buf).await? else {
            local.shutdown().await.map_err(RelayError::LocalWrite)?;
            return Ok(());
        };
        local
            .write_all(&buf[..n])
            .await
            .map_err(RelayError::LocalWrite)?;
        *count += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::net::UnixStream;

    const LIMIT: Duration = Duration::from_secs(30);

    /// Deterministic pseudo-random bytes (xorshift64*), so that a mismatch is reproducible.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect()
    }

    /// Two agents' endpoints (the fleet's real mutual-TLS configurations) on loopback, port 0,
    /// and one bidirectional stream between them: (source's send, recv), (target's send,
    /// recv). The source writes one byte first (as the Pages request's frame would be) so
    /// that the target accepts the stream.
    struct Link {
        _dir: tempfile::TempDir,
        _endpoints: (quinn::Endpoint, quinn::Endpoint),
        conns: (quinn::Connection, quinn::Connection),
    }

    async fn link() -> Link {
        let dir = tempfile::tempdir().unwrap();
        // fleet_init makes its folder.
        let fleet = crate::agent::tls::tests::fleet(
            &dir.path().join("fleet"),
            &[("a", "127.0.0.1"), ("b", "127.0.0.1")],
        );
        let (server_cfg, _) = crate::agent::tls::configs(&fleet[1], 1 << 20).unwrap();
        let server = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let (_, client_cfg) = crate::agent::tls::configs(&fleet[0], 1 << 20).unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(client_cfg);
        let accepting = {
            let server = server.clone();
            tokio::spawn(async move { server.accept().await.unwrap().await.unwrap() })
        };
        let name = crate::agent::tls::server_name(&agent_protocol::Name::new("b").unwrap());
        let a = client.connect(addr, &name).unwrap().await.unwrap();
        let b = accepting.await.unwrap();
        Link {
            _dir: dir,
            _endpoints: (client, server),
            conns: (a, b),
        }
    }

    type Streams = (quinn::SendStream, quinn::RecvStream);

    /// The relay, its unix end closed when it ends (the target's way).
    async fn owned_relay(
        mut local: UnixStream,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<RelayFigures, RelayError> {
        relay(&mut local, &mut send, &mut recv).await
    }

    async fn stream(link: &Link) -> (Streams, Streams) {
        let (mut send, recv) = link.conns.0.open_bi().await.unwrap();
        send.write_all(b"P").await.unwrap();
        let (b_send, mut b_recv) = link.conns.1.accept_bi().await.unwrap();
        let mut first = [0u8; 1];
        b_recv.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"P");
        ((send, recv), (b_send, b_recv))
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// Writes `data` into `end`, half-closes it, and reads what comes back until EOF.
    async fn exchange(end: UnixStream, data: Vec<u8>) -> Vec<u8> {
        let (mut r, mut w) = end.into_split();
        let writing = tokio::spawn(async move {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
            w
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        drop(writing.await.unwrap());
        got
    }

    /// Several MiB of pseudo-random bytes each way, at once, arrive intact, and each relay
    /// counts them per direction.
    #[test]
    fn bytes_cross_both_ways_intact_and_are_counted() {
        runtime().block_on(async {
            let link = link().await;
            let ((a_send, a_recv), (b_send, b_recv)) = stream(&link).await;
            let (a_criu, a_agent) = UnixStream::pair().unwrap();
            let (b_criu, b_agent) = UnixStream::pair().unwrap();
            let a = tokio::spawn(owned_relay(a_agent, a_send, a_recv));
            let b = tokio::spawn(owned_relay(b_agent, b_send, b_recv));
            let (to_b, to_a) = (noise(5 << 20, 1), noise(3 << 20 | 17, 2));
            let (got_b, got_a) = tokio::time::timeout(LIMIT, async {
                tokio::join!(
                    exchange(b_criu, to_a.clone()),
                    exchange(a_criu, to_b.clone())
                )
            })
            .await
            .unwrap();
            assert!(got_b == to_b, "the bytes to b changed on the way");
            assert!(got_a == to_a, "the bytes to a changed on the way");
            let fa = a.await.unwrap().unwrap();
            let fb = b.await.unwrap().unwrap();
            assert_eq!(
                fa,
                RelayFigures {
                    to_peer: to_b.len() as u64,
                    from_peer: to_a.len() as u64
                }
            );
            assert_eq!(
                fb,
                RelayFigures {
                    to_peer: to_a.len() as u64,
                    from_peer: to_b.len() as u64
                }
            );
        });
    }

    /// One side's EOF reaches the other side's criu as an EOF while the opposite direction
    /// still carries bytes (criu's page server answers after its peer stopped asking).
    #[test]
    fn a_half_close_is_propagated_and_the_other_direction_goes_on() {
        runtime().block_on(async {
            let link = link().await;
            let ((a_send, a_recv), (b_send, b_recv)) = stream(&link).await;
            let (a_criu, a_agent) = UnixStream::pair().unwrap();
            let (b_criu, b_agent) = UnixStream::pair().unwrap();
            let a = tokio::spawn(owned_relay(a_agent, a_send, a_recv));
            let b = tokio::spawn(owned_relay(b_agent, b_send, b_recv));
            let (mut a_r, mut a_w) = a_criu.into_split();
            let (mut b_r, mut b_w) = b_criu.into_split();
            a_w.write_all(b"request").await.unwrap();
            a_w.shutdown().await.unwrap();
            // b sees the bytes, then the end, before it wrote anything itself.
            let mut got = Vec::new();
            tokio::time::timeout(LIMIT, b_r.read_to_end(&mut got))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, b"request");
            // The other direction still works after the half-close.
            let answer = noise(300_000, 3);
            b_w.write_all(&answer).await.unwrap();
            b_w.shutdown().await.unwrap();
            let mut back = Vec::new();
            tokio::time::timeout(LIMIT, a_r.read_to_end(&mut back))
                .await
                .unwrap()
                .unwrap();
            assert!(back == answer);
            let fa = a.await.unwrap().unwrap();
            assert_eq!((fa.to_peer, fa.from_peer), (7, 300_000));
            let fb = b.await.unwrap().unwrap();
            assert_eq!((fb.to_peer, fb.from_peer), (300_000, 7));
        });
    }

    /// The peer resets the stream (its relay failed): this relay ends with a typed error and
    /// its criu's socket is closed, not left waiting.
    #[test]
    fn a_reset_stream_ends_the_relay_with_an_error() {
        runtime().block_on(async {
            let link = link().await;
            let ((a_send, a_recv), (mut b_send, mut b_recv)) = stream(&link).await;
            let (a_criu, a_agent) = UnixStream::pair().unwrap();
            // The source's way: the relay keeps the socket; its owner closes it later.
            let a = tokio::spawn(async move {
                let (mut local, mut send, mut recv) = (a_agent, a_send, a_recv);
                let r = relay(&mut local, &mut send, &mut recv).await;
                (r, local)
            });
            let (mut a_r, mut a_w) = a_criu.into_split();
            a_w.write_all(&noise(100_000, 4)).await.unwrap();
            b_send.reset(quinn::VarInt::from_u32(7)).unwrap();
            b_recv.stop(quinn::VarInt::from_u32(7)).unwrap();
            let (e, local) = tokio::time::timeout(LIMIT, a).await.unwrap().unwrap();
            let e = e.unwrap_err();
            // After the error criu's socket is still open (criu would not see an end yet)...
            a_w.write_all(b"still open").await.unwrap();
            // ... until its owner lets it go.
            drop(local);
            assert!(
                matches!(
                    e,
                    RelayError::PeerRead(quinn::ReadError::Reset(c)) if c.into_inner() == 7
                ) || matches!(
                    e,
                    RelayError::PeerWrite(quinn::WriteError::Stopped(c)) if c.into_inner() == 7
                ),
                "{e:?}"
            );
            assert!(e.to_string().contains("peer agent"), "{e}");
            // criu's end sees its socket closed.
            let mut rest = Vec::new();
            let read = tokio::time::timeout(LIMIT, a_r.read_to_end(&mut rest))
                .await
                .unwrap();
            assert!(read.is_ok_and(|n| n == 0) || rest.is_empty());
        });
    }

    /// The source agent stops its relay (a rollback): the target's relay sees a reset, not a
    /// finished stream, and the source's socket stays open for its owner.
    #[test]
    fn a_stopped_relay_resets_the_stream_and_keeps_the_socket() {
        runtime().block_on(async {
            let link = link().await;
            let ((a_send, a_recv), (b_send, b_recv)) = stream(&link).await;
            let (a_criu, a_agent) = UnixStream::pair().unwrap();
            let (_b_criu, b_agent) = UnixStream::pair().unwrap();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let a = tokio::spawn(async move {
                let (mut local, mut send, mut recv) = (a_agent, a_send, a_recv);
                let r = relay_until(&mut local, &mut send, &mut recv, async {
                    let _ = stop_rx.await;
                })
                .await;
                (r, local)
            });
            let b = tokio::spawn(owned_relay(b_agent, b_send, b_recv));
            let (_a_r, mut a_w) = a_criu.into_split();
            a_w.write_all(&noise(200_000, 6)).await.unwrap();
            stop_tx.send(()).unwrap();
            let (ra, local) = tokio::time::timeout(LIMIT, a).await.unwrap().unwrap();
            assert!(matches!(ra, Err(RelayError::Stopped)), "{ra:?}");
            a_w.write_all(b"still open").await.unwrap();
            drop(local);
            let eb = tokio::time::timeout(LIMIT, b)
                .await
                .unwrap()
                .unwrap()
                .unwrap_err();
            assert!(
                matches!(
                    eb,
                    RelayError::PeerRead(quinn::ReadError::Reset(c))
                        if c.into_inner() == u64::from(RELAY_FAILED)
                ) || matches!(
                    eb,
                    RelayError::PeerWrite(quinn::WriteError::Stopped(c))
                        if c.into_inner() == u64::from(RELAY_FAILED)
                ),
                "{eb:?}"
            );
        });
    }

    /// The target's daemon closes its socket having failed: the source's relay sees a reset,
    /// not a clean end, and its socket stays open (its agent stops the dump first); one that
    /// ended well is passed on as the end.
    #[test]
    fn a_failed_local_criu_is_not_passed_on_as_a_clean_end() {
        runtime().block_on(async {
            for ok in [false, true] {
                let link = link().await;
                let ((a_send, a_recv), (b_send, b_recv)) = stream(&link).await;
                let (a_criu, a_agent) = UnixStream::pair().unwrap();
                let (b_criu, b_agent) = UnixStream::pair().unwrap();
                let a = tokio::spawn(async move {
                    let (mut local, mut send, mut recv) = (a_agent, a_send, a_recv);
                    let r = relay(&mut local, &mut send, &mut recv).await;
                    (r, local)
                });
                let b = tokio::spawn(async move {
                    let (mut local, mut send, mut recv) = (b_agent, b_send, b_recv);
                    relay_gated(&mut local, &mut send, &mut recv, async move { ok }).await
                });
                // The daemon writes a request, then dies (its socket closes).
                let (_b_r, mut b_w) = b_criu.into_split();
                b_w.write_all(b"pages please").await.unwrap();
                drop(b_w);
                let (mut a_r, mut a_w) = a_criu.into_split();
                if ok {
                    let mut got = vec![0u8; 12];
                    tokio::time::timeout(LIMIT, a_r.read_exact(&mut got))
                        .await
                        .unwrap()
                        .unwrap();
                    assert_eq!(&got, b"pages please");
                    // The end arrives as an end; the dump then ends its side.
                    let mut rest = Vec::new();
                    tokio::time::timeout(LIMIT, a_r.read_to_end(&mut rest))
                        .await
                        .unwrap()
                        .unwrap();
                    assert!(rest.is_empty());
                    a_w.shutdown().await.unwrap();
                    let (ra, _) = tokio::time::timeout(LIMIT, a).await.unwrap().unwrap();
                    assert_eq!(ra.unwrap().from_peer, 12);
                    let fb = tokio::time::timeout(LIMIT, b).await.unwrap().unwrap();
                    assert_eq!(fb.unwrap().to_peer, 12);
                } else {
                    // A reset may drop what was in flight: only the end matters here.
                    let eb = tokio::time::timeout(LIMIT, b).await.unwrap().unwrap();
                    assert!(matches!(eb, Err(RelayError::LocalFailed)), "{eb:?}");
                    let (ra, local) = tokio::time::timeout(LIMIT, a).await.unwrap().unwrap();
                    assert!(
                        matches!(
                            ra,
                            Err(RelayError::PeerRead(quinn::ReadError::Reset(_))
                                | RelayError::PeerWrite(quinn::WriteError::Stopped(_)))
                        ),
                        "{ra:?}"
                    );
                    // The source's criu saw no end: its socket is open until its owner drops it.
                    a_w.write_all(b"x").await.unwrap();
                    drop(local);
                }
            }
        });
    }

    /// The target's criu closes its socket early while pages are still on their way: its
    /// relay fails writing to it, resets the stream, and the source's relay fails too, instead
    /// of taking the truncated stream for a finished one.
    #[test]
    fn the_local_criu_closing_early_fails_both_relays() {
        runtime().block_on(async {
            let link = link().await;
            let ((a_send, a_recv), (b_send, b_recv)) = stream(&link).await;
            let (a_criu, a_agent) = UnixStream::pair().unwrap();
            let (b_criu, b_agent) = UnixStream::pair().unwrap();
            drop(b_criu);
            let a = tokio::spawn(owned_relay(a_agent, a_send, a_recv));
            let b = tokio::spawn(owned_relay(b_agent, b_send, b_recv));
            let (_a_r, mut a_w) = a_criu.into_split();
            // The source's criu keeps writing; a failed write here is the relay closing it.
            let writer = tokio::spawn(async move {
                let chunk = noise(1 << 20, 5);
                for _ in 0..8 {
                    if a_w.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                let _ = a_w.shutdown().await;
            });
            let eb = tokio::time::timeout(LIMIT, b)
                .await
                .unwrap()
                .unwrap()
                .unwrap_err();
            assert!(matches!(eb, RelayError::LocalWrite(_)), "{eb:?}");
            let ea = tokio::time::timeout(LIMIT, a)
                .await
                .unwrap()
                .unwrap()
                .unwrap_err();
            assert!(
                matches!(
                    ea,
                    RelayError::PeerWrite(quinn::WriteError::Stopped(c))
                        if c.into_inner() == u64::from(RELAY_FAILED)
                ) || matches!(
                    ea,
                    RelayError::PeerRead(quinn::ReadError::Reset(c))
                        if c.into_inner() == u64::from(RELAY_FAILED)
                ),
                "{ea:?}"
            );
            let _ = tokio::time::timeout(LIMIT, writer).await;
        });
    }
}
