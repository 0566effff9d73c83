//! The demo echo service (feature `demo`): what the demo binary serves, and what the tests
//! and benchmarks move.

use std::sync::{Arc, Mutex};

use tracing::{debug, info, warn};

use crate::AppConnection;

/// The demo service on one connection: every bidirectional stream the client opens is one
/// request. An echo request is answered with the connection's counter; a bulk request with
/// its stream of pattern bytes, as fast as QUIC's flow and congestion control let it (see
/// [`demo_echo`]). A bulk stream does not hold up the echoes: each stream has its own task.
pub async fn serve_echo(app: AppConnection) {
    let state = Arc::new(Mutex::new(demo_echo::EchoState::default()));
    let conn = app.connection;
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                info!(session = app.session.0, "echo connection ended: {e}");
                return;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let bytes = match recv.read_to_end(demo_echo::MAX_FRAME).await {
                Ok(b) => b,
                Err(e) => {
                    warn!("echo request unreadable: {e}");
                    let _ = send.reset(quinn::VarInt::from_u32(1));
                    return;
                }
            };
            let req = match demo_echo::DemoRequest::decode(&bytes) {
                Ok(demo_echo::DemoRequest::Bulk(bulk)) => {
                    serve_bulk(send, bulk).await;
                    return;
                }
                Ok(demo_echo::DemoRequest::Echo(req)) => Ok(req),
                Ok(other) => {
                    warn!(?other, "demo request of an unknown kind");
                    let _ = send.reset(quinn::VarInt::from_u32(2));
                    return;
                }
                Err(e) => Err(e),
            };
            let reply =
                req.and_then(|req| state.lock().unwrap_or_else(|p| p.into_inner()).handle(req));
            match reply.and_then(|r| r.encode()) {
                Ok(out) => {
                    if send.write_all(&out).await.is_ok() {
                        let _ = send.finish();
                    }
                }
                Err(e) => {
                    warn!("bad echo request: {e}");
                    let _ = send.reset(quinn::VarInt::from_u32(2));
                }
            }
        });
    }
}

/// Bytes written per `write_all` of a bulk stream.
const BULK_CHUNK: usize = 64 * 1024;

/// Writes a bulk stream: `len` pattern bytes then FIN, or, without `len`, until the client
/// stops the stream (or the connection ends).
async fn serve_bulk(mut send: quinn::SendStream, req: demo_echo::BulkRequest) {
    let mut buf = vec![0u8; BULK_CHUNK];
    let mut offset = 0u64;
    loop {
        let n = match req.len {
            Some(len) => {
                let left = len - offset;
                if left == 0 {
                    let _ = send.finish();
                    debug!(bytes = offset, "bulk stream done");
                    return;
                }
                left.min(BULK_CHUNK as u64) as usize
            }
            None => BULK_CHUNK,
        };
        let chunk = &mut buf[..n];
        demo_echo::bulk_fill(offset, chunk);
        if let Err(e) = send.write_all(chunk).await {
            // The usual end of an unbounded stream: the client stopped it.
            debug!(bytes = offset, "bulk stream ended: {e}");
            return;
        }
        offset += n as u64;
    }
}
