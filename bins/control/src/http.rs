//! The agent's observability endpoint: `GET /metrics` and `GET /healthz` over HTTP/1.1 on a
//! local port.
//!
//! ```text
//!  TcpListener ─accept─► a free slot? ── no ──► closed at once (at most 32 connections)
//!                             │ yes
//!                             ▼
//!                 hyper HTTP/1.1: head ≤ 8 KiB within 2 s, one request,
//!                 `Connection: close`, the whole connection within 5 s
//!                             │
//!        GET /metrics ──► Metrics::encode ──► 200, OpenMetrics text
//!        GET /healthz ──► health()        ──► 200 "ok" | 503 "unhealthy"
//!        other path 404; other method on a known path 405 (HEAD is served as GET)
//! ```
//!
//! hyper parses the bytes (a request it cannot parse, or whose head is too large, gets its 400
//! or 431 and the connection closes); this module bounds what a client can hold: a connection
//! slot for at most [`Limits::connection_deadline`], and no slot at all when all are taken.
//! [`serve`] runs until the caller's shutdown future completes.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::metrics::{self, Metrics};

/// The largest request head read (hyper's smallest read buffer, 8 KiB); a larger one is
/// answered 431 and closed.
pub(crate) const MAX_HEAD: usize = 8 * 1024;

/// The most headers a request may carry.
const MAX_HEADERS: usize = 32;

/// The longest detail text of `/healthz`, in bytes.
const MAX_DETAIL: usize = 1024;

/// How long to wait after a failed `accept` (e.g. out of descriptors) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What `/healthz` reports, from the caller's health callback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Health {
    /// Healthy: 200, else 503.
    pub(crate) ok: bool,
    /// One line for a person (newlines and control characters become spaces; at most 1 KiB
    /// is sent).
    pub(crate) detail: String,
}

impl Health {
    /// Healthy, with a detail (may be empty).
    pub(crate) fn ok(detail: impl Into<String>) -> Self {
        Self {
            ok: true,
            detail: detail.into(),
        }
    }

    /// Unhealthy, and why.
    pub(crate) fn failing(detail: impl Into<String>) -> Self {
        Self {
            ok: false,
            detail: detail.into(),
        }
    }
}

/// What one client can hold of the server.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Connections served at once; one more is closed as soon as it is accepted.
    pub(crate) max_connections: usize,
    /// Time from accept to the request head's end.
    pub(crate) head_timeout: Duration,
    /// Time from accept to the connection's end, whatever it is doing (e.g. not reading the
    /// response).
    pub(crate) connection_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 32,
            head_timeout: Duration::from_secs(2),
            connection_deadline: Duration::from_secs(5),
        }
    }
}

/// Serves `/metrics` and `/healthz` on `listener` with the default [`Limits`] until `shutdown`
/// completes; then stops accepting, drops the open connections and returns.
///
/// `health` is called once per `/healthz` request on a tokio worker: it must answer at once
/// (read a snapshot or an atomic), never block.
///
/// For example, with a tokio watch channel as the signal:
/// `tokio::spawn(http::serve(listener, metrics.clone(), || Health::ok(""), async move {
/// let _ = stop_rx.changed().await; }))`.
pub(crate) async fn serve<H, F>(listener: TcpListener, metrics: Metrics, health: H, shutdown: F)
where
    H: Fn() -> Health + Send + Sync + 'static,
    F: Future<Output = ()>,
{
    serve_with(listener, metrics, health, Limits::default(), shutdown).await;
}

/// [`serve`] with other limits.
pub(crate) async fn serve_with<H, F>(
    listener: TcpListener,
    metrics: Metrics,
    health: H,
    limits: Limits,
    shutdown: F,
) where
    H: Fn() -> Health + Send + Sync + 'static,
    F: Future<Output = ()>,
{
    let state = Arc::new(State { metrics, health });
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        tracing::debug!(%peer, "observability: every connection slot is taken; closed");
                        drop(stream);
                        continue;
                    };
                    let state = Arc::clone(&state);
                    connections.spawn(async move {
                        connection(stream, state, limits).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!("observability: accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    // Only a panic: tasks are aborted at shutdown, after this loop.
                    tracing::error!("observability: a connection task failed: {e}");
                    #[cfg(test)]
                    tests::PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }
    connections.shutdown().await;
}

#[derive(Debug)]
struct State<H> {
    metrics: Metrics,
    health: H,
}

/// One connection: one request, within the limits.
async fn connection<H>(stream: TcpStream, state: Arc<State<H>>, limits: Limits)
where
    H: Fn() -> Health + Send + Sync + 'static,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_HEADERS)
        .keep_alive(false);
    let service = service_fn(move |request: Request<Incoming>| {
        let response = respond(&state, &request);
        async move { Ok::<_, Infallible>(response) }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(limits.connection_deadline, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("observability: connection ended: {e}"),
        Err(_) => tracing::debug!("observability: connection past its deadline; closed"),
    }
}

fn respond<H>(state: &State<H>, request: &Request<Incoming>) -> Response<String>
where
    H: Fn() -> Health,
{
    let known = matches!(request.uri().path(), "/metrics" | "/healthz");
    if !known {
        return text(StatusCode::NOT_FOUND, "not found\n".to_owned());
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".to_owned(),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    if request.uri().path() == "/metrics" {
        let mut response = text(StatusCode::OK, state.metrics.encode());
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(metrics::CONTENT_TYPE),
        );
        return response;
    }
    let health = (state.health)();
    let detail = one_line(&health.detail);
    let (status, word) = if health.ok {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
    };
    let body = if detail.is_empty() {
        format!("{word}\n")
    } else {
        format!("{word}: {detail}\n")
    };
    text(status, body)
}

/// A plain-text response that closes the connection.
fn text(status: StatusCode, body: String) -> Response<String> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `detail` on one line of at most [`MAX_DETAIL`] bytes (cut at a character boundary).
fn one_line(detail: &str) -> String {
    let mut out = String::with_capacity(detail.len().min(MAX_DETAIL));
    for c in detail.trim().chars() {
        if out.len() + c.len_utf8() > MAX_DETAIL {
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Instant;

    use migration_core::Phase;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::sync::watch;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::metrics::parse::{samples, value};
    use crate::metrics::{
        MigrationOutcome, MigrationResult, Refusal, RequestOutcome, Role, TransferBytes,
    };

    /// Connection tasks that panicked, in any test of this process.
    pub(super) static PANICS: AtomicUsize = AtomicUsize::new(0);

    /// Every test's bound on one exchange.
    const EXCHANGE: Duration = Duration::from_secs(10);

    struct Server {
        addr: SocketAddr,
        stop: watch::Sender<()>,
        task: JoinHandle<()>,
    }

    impl Server {
        async fn start<H>(metrics: Metrics, health: H) -> Self
        where
            H: Fn() -> Health + Send + Sync + 'static,
        {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("local_addr");
            let (stop, mut stopped) = watch::channel(());
            let task = tokio::spawn(serve(listener, metrics, health, async move {
                let _ = stopped.changed().await;
            }));
            Self { addr, stop, task }
        }

        async fn stop(self) {
            self.stop.send(()).expect("the server is listening");
            tokio::time::timeout(EXCHANGE, self.task)
                .await
                .expect("the server stops at once")
                .expect("the server task ends cleanly");
        }
    }

    /// What came back on a connection: the status and the body, or `None` when the server
    /// closed it without a response.
    #[derive(Debug)]
    struct Reply {
        status: Option<u16>,
        head: String,
        body: String,
    }

    /// Sends `raw` and reads to the end (every response closes the connection), within
    /// [`EXCHANGE`]. A write the server refused by closing reads as no response.
    async fn exchange(addr: SocketAddr, raw: &[u8]) -> Reply {
        tokio::time::timeout(EXCHANGE, async {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let _ = stream.write_all(raw).await;
            read_reply(&mut stream).await
        })
        .await
        .expect("the exchange ended in time")
    }

    async fn read_reply(stream: &mut TcpStream) -> Reply {
        let mut bytes = Vec::new();
        // A reset (the server closed with unread bytes) ends the reply like an EOF.
        let _ = stream.read_to_end(&mut bytes).await;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .map_or((text.clone(), String::new()), |(h, b)| {
                (h.to_owned(), b.to_owned())
            });
        let status = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok());
        Reply { status, head, body }
    }

    async fn get(addr: SocketAddr, path: &str) -> Reply {
        exchange(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
        )
        .await
    }

    fn header<'a>(reply: &'a Reply, name: &str) -> Option<&'a str> {
        reply.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn healthy() -> Health {
        Health::ok("")
    }

    #[tokio::test]
    async fn metrics_show_two_migrations_and_a_refusal() {
        let metrics = Metrics::new();
        let server = Server::start(metrics.clone(), healthy).await;
        metrics.record_migration(&MigrationOutcome {
            result: MigrationResult::Completed,
            role: Role::Source,
            freeze: Some(Duration::from_millis(27)),
            transfer: Some(Duration::from_millis(140)),
            bytes: TransferBytes {
                raw: 1 << 20,
                compressed: 300_000,
                sealed: 300_512,
            },
            clients_acked: 2,
            clients_missing: 0,
            rollback_phase: None,
        });
        metrics.record_client_downtimes(&[Duration::from_millis(35), Duration::from_millis(41)]);
        metrics.record_migration(&MigrationOutcome {
            result: MigrationResult::RolledBack,
            role: Role::Source,
            freeze: Some(Duration::from_millis(90)),
            transfer: None,
            bytes: TransferBytes::default(),
            clients_acked: 1,
            clients_missing: 1,
            rollback_phase: Some(Phase::Transferring),
        });
        metrics.record_client_downtimes(&[Duration::from_millis(120)]);
        metrics.record_request("move", RequestOutcome::Ok);
        metrics.record_request("move", RequestOutcome::Refused(Refusal::BadToken));

        let reply = get(server.addr, "/metrics").await;
        assert_eq!(reply.status, Some(200), "{reply:?}");
        assert_eq!(header(&reply, "content-type"), Some(metrics::CONTENT_TYPE));
        assert_eq!(header(&reply, "connection"), Some("close"));
        let s = samples(&reply.body);
        let v = |name: &str, labels: &[(&str, &str)]| {
            value(&s, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?}"))
        };
        let migrations = "qlm_agent_migrations_total";
        assert_eq!(
            v(migrations, &[("result", "completed"), ("role", "source")]),
            1.0
        );
        assert_eq!(
            v(migrations, &[("result", "rolled_back"), ("role", "source")]),
            1.0
        );
        assert_eq!(
            v(migrations, &[("result", "failed"), ("role", "source")]),
            0.0
        );
        assert_eq!(
            v("qlm_agent_rollbacks_total", &[("phase", "transferring")]),
            1.0
        );
        assert_eq!(v("qlm_agent_freeze_seconds_count", &[]), 2.0);
        assert_eq!(v("qlm_agent_freeze_seconds_bucket", &[("le", "0.03")]), 1.0);
        assert_eq!(v("qlm_agent_freeze_seconds_bucket", &[("le", "0.1")]), 2.0);
        assert_eq!(v("qlm_agent_transfer_seconds_count", &[]), 1.0);
        assert_eq!(v("qlm_agent_client_downtime_seconds_count", &[]), 3.0);
        assert_eq!(
            v(
                "qlm_agent_client_downtime_seconds_bucket",
                &[("le", "0.04")]
            ),
            1.0
        );
        assert_eq!(
            v(
                "qlm_agent_client_downtime_seconds_bucket",
                &[("le", "0.05")]
            ),
            2.0
        );
        assert_eq!(
            v("qlm_agent_transfer_bytes_total", &[("kind", "raw")]),
            1_048_576.0
        );
        assert_eq!(
            v("qlm_agent_transfer_bytes_total", &[("kind", "sealed")]),
            300_512.0
        );
        assert_eq!(v("qlm_agent_clients_acked_total", &[]), 3.0);
        assert_eq!(v("qlm_agent_clients_missing_total", &[]), 1.0);
        assert_eq!(
            v(
                "qlm_agent_requests_total",
                &[("request", "move"), ("outcome", "refused")]
            ),
            1.0
        );
        assert_eq!(
            v("qlm_agent_refusals_total", &[("reason", "bad_token")]),
            1.0
        );
        assert_eq!(v("qlm_agent_refusals_total", &[("reason", "expired")]), 0.0);

        // HEAD: the same head, no body.
        let head = exchange(
            server.addr,
            b"HEAD /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n",
        )
        .await;
        assert_eq!(head.status, Some(200), "{head:?}");
        assert!(head.body.is_empty(), "{head:?}");
        server.stop().await;
    }

    #[tokio::test]
    async fn healthz_follows_the_callback() {
        let ok = Arc::new(AtomicBool::new(true));
        let flag = Arc::clone(&ok);
        let server = Server::start(Metrics::new(), move || {
            if flag.load(Ordering::Relaxed) {
                Health::ok("")
            } else {
                Health::failing("criu worker gone\nsecond line")
            }
        })
        .await;
        let reply = get(server.addr, "/healthz").await;
        assert_eq!(reply.status, Some(200), "{reply:?}");
        assert_eq!(reply.body, "ok\n");
        assert_eq!(header(&reply, "connection"), Some("close"));
        ok.store(false, Ordering::Relaxed);
        let reply = get(server.addr, "/healthz").await;
        assert_eq!(reply.status, Some(503), "{reply:?}");
        assert_eq!(reply.body, "unhealthy: criu worker gone second line\n");
        server.stop().await;
    }

    #[tokio::test]
    async fn unknown_paths_are_404_and_other_methods_405() {
        let server = Server::start(Metrics::new(), healthy).await;
        for path in ["/", "/metrics/", "/health", "/../metrics"] {
            let reply = get(server.addr, path).await;
            assert_eq!(reply.status, Some(404), "{path}: {reply:?}");
        }
        // A query string does not change the resource.
        assert_eq!(get(server.addr, "/healthz?x=1").await.status, Some(200));
        for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
            let reply = exchange(
                server.addr,
                format!("{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                    .as_bytes(),
            )
            .await;
            assert_eq!(reply.status, Some(405), "{method}: {reply:?}");
            assert_eq!(header(&reply, "allow"), Some("GET, HEAD"));
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn garbage_is_refused_and_the_server_serves_on() {
        let server = Server::start(Metrics::new(), healthy).await;
        let inputs: Vec<Vec<u8>> = vec![
            b"\x00\x01\x02\xff\xfe\r\n\r\n".to_vec(),
            (0..=255u8).cycle().take(4096).collect(),
            b"GET /metrics HTTP/9.9\r\n\r\n".to_vec(),
            b"GET /metrics\r\n\r\n".to_vec(),
            b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
            b"GET /metrics HTTP/1.1\r\nBad Header\r\n\r\n".to_vec(),
            b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
            b"GET /metrics HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".to_vec(),
            b"\r\n\r\n\r\n".to_vec(),
            "GET /m\u{e9}trics HTTP/1.1\r\n\r\n".as_bytes().to_vec(),
        ];
        for raw in &inputs {
            let reply = exchange(server.addr, raw).await;
            // Either a 4xx or closed with no response; never a hang, never a 5xx.
            assert!(
                reply.status.is_none_or(|s| (400..500).contains(&s)),
                "{raw:?}: {reply:?}"
            );
        }
        // A header-limit breach: more headers than allowed.
        let mut many = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for i in 0..(MAX_HEADERS + 8) {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let reply = exchange(server.addr, &many).await;
        assert!(
            reply.status.is_none_or(|s| (400..500).contains(&s)),
            "{reply:?}"
        );
        // Random bytes (a fixed xorshift sequence, so a failure replays), some after a valid
        // request line.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..64 {
            let len = usize::try_from(next() % 2048).expect("small") + 1;
            let mut raw: Vec<u8> = if i % 2 == 0 {
                Vec::new()
            } else {
                b"GET /metrics HTTP/1.1\r\n".to_vec()
            };
            raw.extend((0..len).map(|_| next().to_le_bytes()[0]));
            let reply = exchange(server.addr, &raw).await;
            assert!(
                reply.status.is_none_or(|s| (400..500).contains(&s)),
                "input {i}: {raw:?}: {reply:?}"
            );
        }
        assert_eq!(get(server.addr, "/healthz").await.status, Some(200));
        assert_eq!(
            PANICS.load(Ordering::Relaxed),
            0,
            "a connection task panicked"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn a_100_kib_request_line_is_refused() {
        let server = Server::start(Metrics::new(), healthy).await;
        let mut raw = b"GET /".to_vec();
        raw.resize(100 * 1024, b'a');
        raw.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\n\r\n");
        let started = Instant::now();
        let reply = exchange(server.addr, &raw).await;
        // hyper answers 431 once its 8 KiB buffer is full; the client may see a reset instead
        // when the server closes with the rest unread.
        assert!(
            reply
                .status
                .is_none_or(|s| s == 431 || s == 414 || s == 400),
            "{reply:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2), "not at once");
        // Headers just over the limit, too.
        let mut raw = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
        raw.resize(MAX_HEAD + 100, b'b');
        raw.extend_from_slice(b"\r\n\r\n");
        let reply = exchange(server.addr, &raw).await;
        assert!(reply.status.is_none_or(|s| s == 431), "{reply:?}");
        assert_eq!(get(server.addr, "/healthz").await.status, Some(200));
        server.stop().await;
    }

    #[tokio::test]
    async fn an_unfinished_request_times_out_and_others_are_served() {
        let server = Server::start(Metrics::new(), healthy).await;
        let mut slow = TcpStream::connect(server.addr).await.expect("connect");
        let started = Instant::now();
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        let mut silent = TcpStream::connect(server.addr).await.expect("connect");
        // Meanwhile, others are served.
        for _ in 0..3 {
            assert_eq!(get(server.addr, "/healthz").await.status, Some(200));
        }
        // The unfinished head is cut off after the head timeout (hyper answers 408 or just
        // closes), the silent connection too.
        for stream in [&mut slow, &mut silent] {
            let reply = tokio::time::timeout(EXCHANGE, read_reply(stream))
                .await
                .expect("closed in time");
            assert!(reply.status.is_none_or(|s| s == 408), "{reply:?}");
        }
        let waited = started.elapsed();
        let limits = Limits::default();
        assert!(
            waited >= limits.head_timeout - Duration::from_millis(100),
            "closed too early: {waited:?}"
        );
        assert!(
            waited < limits.connection_deadline + Duration::from_secs(1),
            "closed too late: {waited:?}"
        );
        assert_eq!(get(server.addr, "/healthz").await.status, Some(200));
        server.stop().await;
    }

    #[tokio::test]
    async fn connections_past_the_limit_are_closed_at_once() {
        let server = Server::start(Metrics::new(), healthy).await;
        let limits = Limits::default();
        // Connections are accepted in the order they were established: these take every slot.
        let mut holders = Vec::new();
        for _ in 0..limits.max_connections {
            holders.push(TcpStream::connect(server.addr).await.expect("connect"));
        }
        let started = Instant::now();
        let reply = get(server.addr, "/healthz").await;
        assert_eq!(reply.status, None, "served past the limit: {reply:?}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "not closed at once: {:?}",
            started.elapsed()
        );
        // The holders' head timeout frees the slots.
        let mut answered = false;
        let deadline = Instant::now() + limits.connection_deadline + Duration::from_secs(2);
        while Instant::now() < deadline {
            if get(server.addr, "/healthz").await.status == Some(200) {
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(answered, "the slots were never freed");
        drop(holders);
        server.stop().await;
    }

    #[tokio::test]
    async fn two_hundred_simultaneous_connections_leave_it_serving() {
        let server = Server::start(Metrics::new(), healthy).await;
        let limits = Limits::default();
        let addr = server.addr;
        let mut streams = Vec::new();
        for _ in 0..200 {
            streams.push(TcpStream::connect(addr).await.expect("connect"));
        }
        let mut exchanges = JoinSet::new();
        for mut stream in streams {
            exchanges.spawn(async move {
                let _ = stream
                    .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await;
                read_reply(&mut stream).await
            });
        }
        let replies = tokio::time::timeout(EXCHANGE, exchanges.join_all())
            .await
            .expect("every connection was answered or closed in time");
        let served = replies.iter().filter(|r| r.status == Some(200)).count();
        let closed = replies.iter().filter(|r| r.status.is_none()).count();
        assert_eq!(served + closed, 200, "{replies:?}");
        // The first connections accepted hold every slot, and each had its request.
        assert!(served >= limits.max_connections, "served {served}");
        for reply in replies.iter().filter(|r| r.status == Some(200)) {
            assert!(reply.body.ends_with("# EOF\n"));
        }
        // Every slot is free again (each served connection ended before its client's EOF).
        let mut answered = false;
        for _ in 0..20 {
            if get(addr, "/healthz").await.status == Some(200) {
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(answered, "the server stopped answering");
        server.stop().await;
    }

    #[tokio::test]
    async fn shutdown_closes_the_port_and_open_connections() {
        let server = Server::start(Metrics::new(), healthy).await;
        let addr = server.addr;
        let mut open = TcpStream::connect(addr).await.expect("connect");
        // Let the server accept it.
        assert_eq!(get(addr, "/healthz").await.status, Some(200));
        let started = Instant::now();
        server.stop().await;
        let reply = tokio::time::timeout(EXCHANGE, read_reply(&mut open))
            .await
            .expect("closed at shutdown");
        assert_eq!(reply.status, None);
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    }

    #[test]
    fn details_are_one_bounded_line() {
        assert_eq!(one_line("  a\r\nb\tc  "), "a  b c");
        let long = "é".repeat(MAX_DETAIL);
        let cut = one_line(&long);
        assert!(cut.len() <= MAX_DETAIL && cut.len() >= MAX_DETAIL - 1);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
