//! `bench_client`: a client of the demo service (swrapper) that records what a move costs it,
//! for the migration benchmark.
//!
//! ```text
//!  --mode latency   echo every --interval-ms; every echo: [t_send_unix_us, rtt_us]
//!  --mode bulk      one unbounded bulk stream (demo-echo's BulkRequest), every byte checked;
//!                   bytes per --bucket-ms (5) bucket: [bucket_start_unix_us, bytes]
//!  default          through the cwrapper library (MigratingClient): follows moves on one
//!                   connection; records each Migrate seen and each Resumed
//!  --reconnect      a plain quinn client (no shim): on connection loss or --io-timeout-ms
//!                   without an answer, a NEW connection to the next --reconnect-to address;
//!                   records each reconnect (pause, attempts) and counts handshakes
//! ```
//!
//! The JSON result (--json) is `migration_benches::timeline`'s input: pauses, steady goodput
//! and recovery are computed here too and written next to the raw timeline. Times are
//! wall-clock microseconds since the Unix epoch, taken from one `SystemTime` reading plus a
//! monotonic clock, to line up with control's MoveReport timestamps.
//!
//! The reconnect client opens the control stream and says Hello, but never acks a Migrate and
//! never follows one: its config offers the marker ALPN (it is built by wrapper-support), so
//! swrapper takes its first bidirectional stream as the control stream and would close it
//! without a Hello within the hello timeout (5 s). A plain QUIC client (no marker) would be
//! served without any of this.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use control_protocol::{ClientControl, ClientId, Role, SUPPORTED_VERSIONS};
use cwrapper::{ClientOptions, MigratingClient};
use demo_echo::{BulkRequest, EchoChecker};
use migration_benches::timeline::{self, Buckets, Recovery};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

/// Records echo latency or bulk goodput across server moves, as JSON for the benchmark.
///
/// Without --reconnect the client follows moves on its one connection (the cwrapper library);
/// with --reconnect it is a plain QUIC client that makes a new connection when the old one is
/// lost (the baseline: a server restarted elsewhere).
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// What to measure.
    #[arg(long, value_enum)]
    mode: Mode,
    /// The server's first address.
    #[arg(long)]
    target: SocketAddr,
    /// PEM certificate(s) to trust: the server's.
    #[arg(long)]
    ca: PathBuf,
    /// The name in the server's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// What the client calls itself on the control stream (default: bench-<pid>).
    #[arg(long)]
    client_id: Option<String>,
    /// How long to run, in seconds (also stops on SIGINT or SIGTERM).
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// Where to write the JSON result.
    #[arg(long)]
    json: PathBuf,
    /// latency: pause between an answer and the next echo, in milliseconds (0: none).
    #[arg(long, default_value_t = 1)]
    interval_ms: u64,
    /// Deadline of one echo (or of a bulk read) in normal operation, in milliseconds; with
    /// --reconnect, missing it counts as losing the connection.
    #[arg(long, default_value_t = 1000)]
    io_timeout_ms: u64,
    /// latency: deadline of one echo once a move was seen, until the first answer after it.
    #[arg(long, default_value_t = 50)]
    migrated_io_timeout_ms: u64,
    /// bulk: width of a goodput bucket, in milliseconds (1 to 1000). Reads arrive in bursts
    /// of up to 64 KiB, so 1 ms buckets are ragged and their median understates the goodput.
    #[arg(long, default_value_t = 5)]
    bucket_ms: u64,
    /// bulk: the span before the first move (or loss) whose median bucket is the steady
    /// goodput, in milliseconds.
    #[arg(long, default_value_t = 500)]
    steady_span_ms: u64,
    /// bulk: the sliding window that must be back to --recovery-fraction of the steady
    /// goodput, in milliseconds.
    #[arg(long, default_value_t = 10)]
    recovery_window_ms: u64,
    /// bulk: the fraction of the steady goodput that counts as recovered (0 < f <= 1).
    #[arg(long, default_value_t = 0.9)]
    recovery_fraction: f64,
    /// Reconnect baseline: a plain QUIC client that makes a new connection on loss.
    #[arg(long)]
    reconnect: bool,
    /// Where to reconnect, in turn (comma-separated; default: --target).
    #[arg(long, value_delimiter = ',', requires = "reconnect")]
    reconnect_to: Vec<SocketAddr>,
    /// Deadline of one handshake, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    connect_timeout_ms: u64,
    /// Give up when nothing was answered this long (a move or a reconnect), in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    recovery_deadline_ms: u64,
    /// Connection idle timeout in seconds; must outlast the longest freeze.
    #[arg(long, default_value_t = 30)]
    idle_timeout_s: u64,
    /// Log filter (tracing's EnvFilter syntax), logs go to stderr.
    #[arg(long, default_value = "warn")]
    log: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    /// Echo round trips.
    Latency,
    /// One bulk stream.
    Bulk,
}

impl Args {
    /// Refusals clap cannot express.
    fn check(&self) -> Result<()> {
        for (name, v) in [
            ("--duration-s", self.duration_s),
            ("--io-timeout-ms", self.io_timeout_ms),
            ("--migrated-io-timeout-ms", self.migrated_io_timeout_ms),
            ("--steady-span-ms", self.steady_span_ms),
            ("--recovery-window-ms", self.recovery_window_ms),
            ("--connect-timeout-ms", self.connect_timeout_ms),
            ("--recovery-deadline-ms", self.recovery_deadline_ms),
            ("--idle-timeout-s", self.idle_timeout_s),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if !(1..=1000).contains(&self.bucket_ms) {
            bail!("--bucket-ms {} must be between 1 and 1000", self.bucket_ms);
        }
        if self.duration_s > 3600 {
            bail!("--duration-s {} is more than an hour", self.duration_s);
        }
        if !(self.recovery_fraction > 0.0 && self.recovery_fraction <= 1.0) {
            bail!(
                "--recovery-fraction {} must be in (0, 1]",
                self.recovery_fraction
            );
        }
        Ok(())
    }

    fn reconnect_list(&self) -> Vec<SocketAddr> {
        if self.reconnect_to.is_empty() {
            vec![self.target]
        } else {
            self.reconnect_to.clone()
        }
    }
}

/// Wall-clock microseconds from one `SystemTime` reading and a monotonic clock.
#[derive(Debug, Clone, Copy)]
struct Clock {
    wall0_us: u64,
    mono0: Instant,
}

impl Clock {
    fn new() -> Self {
        let wall0_us = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Self {
            wall0_us,
            mono0: Instant::now(),
        }
    }

    fn us(&self, t: Instant) -> u64 {
        self.wall0_us + t.saturating_duration_since(self.mono0).as_micros() as u64
    }

    fn now(&self) -> u64 {
        self.us(Instant::now())
    }
}

/// A move the following client saw.
#[derive(Debug, Clone, Serialize)]
struct MigrationRecord {
    id: String,
    new_addr: SocketAddr,
    aborted: bool,
    seen_unix_us: u64,
    /// When the server's Resumed for it arrived.
    resumed_unix_us: Option<u64>,
}

/// A new connection after a loss (--reconnect).
#[derive(Debug, Clone, Serialize)]
struct ReconnectRecord {
    /// Last good answer on the old connection (or its start).
    last_good_unix_us: u64,
    /// When the loss was noticed (closed, or a deadline missed).
    lost_unix_us: u64,
    /// Why.
    cause: String,
    /// Handshake done on the new connection.
    connected_unix_us: u64,
    /// First good answer on the new connection.
    first_good_unix_us: Option<u64>,
    /// From the last good answer to the first good one on the new connection.
    pause_ms: Option<f64>,
    /// Handshakes tried, this one included.
    attempts: u64,
    /// Where it connected.
    addr: SocketAddr,
}

#[derive(Debug, Default, Serialize)]
struct LatencyReport {
    /// Answered echoes: [t_send_unix_us, rtt_us].
    echoes: Vec<[u64; 2]>,
    /// Attempts without an answer: [t_send_unix_us, waited_us].
    failures: Vec<[u64; 2]>,
    /// Per move or reconnect: the longest pause between answers around it.
    pauses: Vec<Pause>,
}

#[derive(Debug, Serialize)]
struct Pause {
    event: String,
    last_before_unix_us: u64,
    first_after_unix_us: u64,
    pause_ms: f64,
}

#[derive(Debug, Default, Serialize)]
struct BulkReport {
    bucket_us: u64,
    /// Buckets that received bytes: [bucket_start_unix_us, bytes].
    buckets: Vec<[u64; 2]>,
    /// Bytes received and checked against the pattern.
    verified_bytes: u64,
    /// Bulk streams opened (one per connection).
    streams: u64,
    /// Median rate of the --steady-span-ms before the first move or loss, bytes per second.
    steady_goodput_bps: Option<f64>,
    recoveries: Vec<Recovery>,
}

#[derive(Debug, Serialize)]
struct Report {
    mode: Mode,
    reconnect: bool,
    target: SocketAddr,
    started_unix_us: u64,
    ended_unix_us: u64,
    /// Handshakes the client completed (one per connection).
    handshakes: u64,
    migrations: Vec<MigrationRecord>,
    reconnects: Vec<ReconnectRecord>,
    latency: Option<LatencyReport>,
    bulk: Option<BulkReport>,
    /// Every answer checked (echo order and counter, every bulk byte) and no error.
    verified: bool,
    error: Option<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    args.check()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .with_context(|| format!("invalid --log filter `{}`", args.log))?,
        )
        .with_writer(std::io::stderr)
        .init();
    let roots = wrapper_support::tls::load_certs(&args.ca)
        .with_context(|| format!("--ca {}", args.ca.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let report = rt.block_on(run(&args, roots))?;
    let text = serde_json::to_string(&report).context("encoding the result")?;
    std::fs::write(&args.json, &text)
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!(
        "bench_client: {:?}{}, {} handshakes, {} moves, {} reconnects, verified: {}{}",
        args.mode,
        if args.reconnect { " (reconnect)" } else { "" },
        report.handshakes,
        report.migrations.len(),
        report.reconnects.len(),
        report.verified,
        report
            .error
            .as_ref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    if !report.verified {
        std::process::exit(1);
    }
    Ok(())
}

/// One connection, following moves or plain.
enum Conn {
    Following(MigratingClient),
    Plain {
        connection: quinn::Connection,
        /// Kept open: the control stream's send half (Hello written).
        _control: quinn::SendStream,
        /// This connection's own endpoint (socket).
        _endpoint: quinn::Endpoint,
    },
}

impl Conn {
    fn connection(&self) -> &quinn::Connection {
        match self {
            Self::Following(c) => c.connection(),
            Self::Plain { connection, .. } => connection,
        }
    }

    async fn close(self) {
        match self {
            Self::Following(c) => c.close("bench done").await,
            Self::Plain { connection, .. } => {
                connection.close(quinn::VarInt::from_u32(0), b"bench done")
            }
        }
    }
}

/// What the run shares between its loop and the client's watcher.
struct Run<'a> {
    args: &'a Args,
    roots: Vec<quinn::rustls::pki_types::CertificateDer<'static>>,
    clock: Clock,
    client_id: String,
    /// --reconnect: where plain endpoints bind and their client configuration. Every
    /// connection gets a new endpoint (a new socket and source port), as a reconnecting
    /// client would: a NAT entry left stale by a restore on the server's side (podman's
    /// port map here) then does not catch the new connection too.
    endpoint: Option<(SocketAddr, quinn::ClientConfig)>,
    migrations: Arc<Mutex<Vec<MigrationRecord>>>,
    /// The connection in use: closed explicitly when the run is stopped (a stopped loop
    /// drops its connection without a CONNECTION_CLOSE reaching the server, which would keep
    /// the session until its idle timeout and make the next move wait for it).
    live: Arc<Mutex<Option<quinn::Connection>>>,
    reconnects: Vec<ReconnectRecord>,
    handshakes: u64,
    /// Next index in the reconnect list.
    next_addr: usize,
    end: Instant,
}

async fn run(
    args: &Args,
    roots: Vec<quinn::rustls::pki_types::CertificateDer<'static>>,
) -> Result<Report> {
    let clock = Clock::new();
    let started_unix_us = clock.now();
    let endpoint = if args.reconnect {
        let bind = match args.target {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        };
        let transport =
            wrapper_support::tls::transport_config(Duration::from_secs(args.idle_timeout_s))?;
        let config = wrapper_support::tls::client_config(&roots, &[demo_echo::ALPN], transport)?;
        Some((bind, config))
    } else {
        None
    };
    let mut r = Run {
        args,
        roots,
        clock,
        client_id: args
            .client_id
            .clone()
            .unwrap_or_else(|| format!("bench-{}", std::process::id())),
        endpoint,
        migrations: Arc::new(Mutex::new(Vec::new())),
        live: Arc::new(Mutex::new(None)),
        reconnects: Vec::new(),
        handshakes: 0,
        next_addr: 0,
        end: Instant::now() + Duration::from_secs(args.duration_s),
    };
    let first = r
        .connect(args.target)
        .await
        .with_context(|| format!("connecting to {}", args.target))?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let stop = async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
    };
    let (latency, bulk, error, last) = match args.mode {
        Mode::Latency => {
            let mut rep = LatencyReport::default();
            let (error, last) = tokio::select! {
                out = r.latency(first, &mut rep) => out,
                () = stop => (None, None),
            };
            (Some(rep), None, error, last)
        }
        Mode::Bulk => {
            let start = r.clock.now();
            let mut buckets = Buckets::new(start, args.bucket_ms * 1000)?;
            let mut rep = BulkReport::default();
            let (error, last) = tokio::select! {
                out = r.bulk(first, &mut buckets, &mut rep) => out,
                () = stop => (None, None),
            };
            buckets.extend_to(r.clock.now());
            rep.bucket_us = buckets.width_us;
            rep.buckets = buckets.sparse();
            (None, Some((rep, buckets)), error, last)
        }
    };
    if let Some(conn) = last {
        if let Conn::Following(c) = &conn {
            r.handshakes = u64::from(c.connection().stats().frame_rx.handshake_done);
        }
        conn.close().await;
    }
    let live = r.live.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(c) = live
        && c.close_reason().is_none()
    {
        c.close(quinn::VarInt::from_u32(0), b"bench done");
        // The endpoint's driver sends the close while the runtime runs.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ended_unix_us = r.clock.now();
    let migrations = r
        .migrations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut report = Report {
        mode: args.mode,
        reconnect: args.reconnect,
        target: args.target,
        started_unix_us,
        ended_unix_us,
        handshakes: r.handshakes,
        migrations,
        reconnects: std::mem::take(&mut r.reconnects),
        latency,
        bulk: None,
        verified: error.is_none(),
        error,
    };
    if let Some(rep) = &mut report.latency {
        latency_pauses(rep, &report.migrations, &report.reconnects, ended_unix_us);
    }
    if let Some((mut rep, buckets)) = bulk {
        bulk_recoveries(
            args,
            &mut rep,
            &buckets,
            &report.migrations,
            &report.reconnects,
        );
        report.bulk = Some(rep);
    }
    Ok(report)
}

/// How a connection's loop ended.
type Ended = (Option<String>, Option<Conn>);

impl Run<'_> {
    /// One handshake (and the control stream) to `addr`.
    async fn connect(&mut self, addr: SocketAddr) -> Result<Conn> {
        let timeout = Duration::from_millis(self.args.connect_timeout_ms);
        let conn = match &self.endpoint {
            None => {
                let config = cwrapper::client_config(
                    &self.roots,
                    &[demo_echo::ALPN],
                    Duration::from_secs(self.args.idle_timeout_s),
                )?;
                let mut opts = ClientOptions::with_client_config(
                    addr,
                    &self.args.server_name,
                    config,
                    self.client_id.clone(),
                );
                opts.connect_timeout = timeout;
                let client = MigratingClient::connect(opts).await?;
                watch_migrations(&client, self.clock, self.migrations.clone());
                Conn::Following(client)
            }
            Some((bind, config)) => {
                let mut ep =
                    quinn::Endpoint::client(*bind).context("binding the client endpoint")?;
                ep.set_default_client_config(config.clone());
                let connecting = ep.connect(addr, &self.args.server_name)?;
                let connection =
                    tokio::time::timeout(timeout, connecting)
                        .await
                        .map_err(|_| {
                            anyhow::anyhow!("no handshake with {addr} within {timeout:?}")
                        })??;
                let mut hello = Vec::new();
                ClientControl::new(
                    ClientId::new(self.client_id.clone())?,
                    SUPPORTED_VERSIONS,
                    &mut hello,
                )?;
                // Bounded too: a connection whose peer went silent right after the handshake
                // must not hold the reconnect loop.
                let (send, recv) = tokio::time::timeout(timeout, async {
                    let (mut send, recv) = connection.open_bi().await?;
                    send.write_all(&hello).await?;
                    anyhow::Ok((send, recv))
                })
                .await
                .map_err(|_| anyhow::anyhow!("no control stream to {addr} within {timeout:?}"))??;
                // Read (and log) what the server says; never answer a Migrate.
                tokio::spawn(async move {
                    let mut reader = wrapper_support::ControlReader::new(recv, Role::Client);
                    while let Ok(Some(msg)) = reader.next().await {
                        debug!(?msg, "control message (not followed)");
                    }
                });
                Conn::Plain {
                    connection,
                    _control: send,
                    _endpoint: ep,
                }
            }
        };
        self.handshakes += 1;
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.connection().clone());
        info!(%addr, "connected");
        Ok(conn)
    }

    /// After a loss: new connections to the reconnect list in turn until one handshake
    /// succeeds or the recovery deadline passes.
    async fn reconnect(
        &mut self,
        last_good_unix_us: u64,
        cause: String,
    ) -> Result<(Conn, usize), String> {
        let lost_unix_us = self.clock.now();
        let list = self.args.reconnect_list();
        let give_up = Instant::now() + Duration::from_millis(self.args.recovery_deadline_ms);
        let mut attempts = 0;
        loop {
            if Instant::now() >= give_up.min(self.end) {
                return Err(format!(
                    "no reconnect within {} ms ({attempts} handshakes tried) after: {cause}",
                    self.args.recovery_deadline_ms
                ));
            }
            let addr = list[self.next_addr % list.len()];
            self.next_addr += 1;
            attempts += 1;
            match self.connect(addr).await {
                Ok(conn) => {
                    warn!(%addr, attempts, "reconnected after: {cause}");
                    self.reconnects.push(ReconnectRecord {
                        last_good_unix_us,
                        lost_unix_us,
                        cause,
                        connected_unix_us: self.clock.now(),
                        first_good_unix_us: None,
                        pause_ms: None,
                        attempts,
                        addr,
                    });
                    return Ok((conn, self.reconnects.len() - 1));
                }
                Err(e) => {
                    debug!(%addr, "reconnect attempt failed: {e:#}");
                    // A refused handshake can fail at once: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// The first good answer on a reconnected connection.
    fn first_good(&mut self, pending: &mut Option<usize>, at_us: u64) {
        if let Some(i) = pending.take() {
            let rec = &mut self.reconnects[i];
            rec.first_good_unix_us = Some(at_us);
            rec.pause_ms = Some(at_us.saturating_sub(rec.last_good_unix_us) as f64 / 1e3);
        }
    }

    /// Whether a move was seen and the first answer after it not yet (tight deadlines).
    fn moving(&self, answered_since_us: u64) -> bool {
        self.migrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .is_some_and(|m| m.seen_unix_us >= answered_since_us)
    }

    async fn latency(&mut self, first: Conn, rep: &mut LatencyReport) -> Ended {
        let args = self.args;
        let mut conn = first;
        let mut checker = EchoChecker::default();
        let mut last_good = self.clock.now();
        let mut pending_reconnect = None;
        loop {
            if Instant::now() >= self.end {
                return (None, Some(conn));
            }
            // Two-phase moves: no request is in flight here; stop, say so, go on the instant
            // the server resumes (or the move is abandoned).
            if let Err(e) = self.hold_if_asked(&conn).await {
                return (Some(e), Some(conn));
            }
            let req = checker.request(checker.next_seq().to_be_bytes().to_vec());
            let timeout = if self.moving(last_good) {
                args.migrated_io_timeout_ms
            } else {
                args.io_timeout_ms
            };
            let sent = Instant::now();
            let sent_us = self.clock.us(sent);
            let answer = tokio::time::timeout(
                Duration::from_millis(timeout),
                cwrapper::echo_once(conn.connection(), &req),
            )
            .await;
            let done_us = self.clock.now();
            let failure = match answer {
                Ok(Ok(reply)) => {
                    if let Err(e) = checker.check(&req, &reply) {
                        return (Some(format!("echo check failed: {e}")), Some(conn));
                    }
                    rep.echoes.push([sent_us, done_us - sent_us]);
                    last_good = done_us;
                    self.first_good(&mut pending_reconnect, done_us);
                    None
                }
                Ok(Err(e)) => Some(format!("echo failed: {e}")),
                Err(_) => Some(format!("no echo within {timeout} ms")),
            };
            if let Some(why) = failure {
                rep.failures.push([sent_us, done_us - sent_us]);
                let closed = conn.connection().close_reason();
                if args.reconnect {
                    let cause = closed.map_or(why, |c| format!("connection closed: {c}"));
                    match self.reconnect(last_good, cause).await {
                        Ok((c, i)) => {
                            conn.close().await;
                            conn = c;
                            pending_reconnect = Some(i);
                            // The new connection's server counts from zero.
                            checker = EchoChecker::default();
                        }
                        Err(e) => return (Some(e), Some(conn)),
                    }
                } else if let Some(c) = closed {
                    return (Some(format!("connection closed: {c}")), None);
                } else if done_us - last_good > args.recovery_deadline_ms * 1000 {
                    return (
                        Some(format!(
                            "no echo answered for {} ms",
                            (done_us - last_good) / 1000
                        )),
                        Some(conn),
                    );
                }
                // Retry the same request at once: the server answers a retry idempotently.
                continue;
            }
            if args.interval_ms > 0 {
                let pause = tokio::time::sleep(Duration::from_millis(args.interval_ms));
                match &conn {
                    // A quiesce request cuts the idle pause short.
                    Conn::Following(c) => {
                        tokio::select! {
                            () = pause => {}
                            () = c.quiesce_wanted() => {}
                        }
                    }
                    Conn::Plain { .. } => pause.await,
                }
            }
        }
    }

    /// When the server asked the application to quiesce (two-phase moves): confirms it and
    /// waits until it is released, within the recovery deadline.
    async fn hold_if_asked(&self, conn: &Conn) -> Result<(), String> {
        let Conn::Following(c) = conn else {
            return Ok(());
        };
        if !c.quiesce_requested() {
            return Ok(());
        }
        c.confirm_quiesced();
        let limit = Duration::from_millis(self.args.recovery_deadline_ms);
        match tokio::time::timeout(limit, c.wait_released()).await {
            Ok(_) => Ok(()),
            Err(_) => Err(format!(
                "quiesced and not released within {} ms",
                self.args.recovery_deadline_ms
            )),
        }
    }

    async fn bulk(&mut self, first: Conn, buckets: &mut Buckets, rep: &mut BulkReport) -> Ended {
        let args = self.args;
        let mut conn = first;
        let mut last_good = self.clock.now();
        let mut pending_reconnect = None;
        'streams: loop {
            rep.streams += 1;
            let (mut send, mut recv) = match open_bulk(conn.connection()).await {
                Ok(s) => s,
                Err(e) if args.reconnect => {
                    match self
                        .reconnect(last_good, format!("bulk request: {e:#}"))
                        .await
                    {
                        Ok((c, i)) => {
                            conn.close().await;
                            conn = c;
                            pending_reconnect = Some(i);
                            continue 'streams;
                        }
                        Err(e) => return (Some(e), Some(conn)),
                    }
                }
                Err(e) => return (Some(format!("bulk request: {e:#}")), Some(conn)),
            };
            let mut offset = 0u64;
            loop {
                let now = Instant::now();
                if now >= self.end {
                    let _ = recv.stop(quinn::VarInt::from_u32(0));
                    let _ = send.finish();
                    return (None, Some(conn));
                }
                // A bulk client sends no application data of its own: it confirms a quiesce at
                // once and keeps reading.
                if let Conn::Following(c) = &conn
                    && matches!(c.status().quiesce, cwrapper::Quiesce::Requested { .. })
                {
                    c.confirm_quiesced();
                }
                let wait = Duration::from_millis(args.io_timeout_ms).min(self.end - now);
                let chunk = tokio::time::timeout(wait, recv.read_chunk(64 * 1024, true)).await;
                let at_us = self.clock.now();
                let timed_out = chunk.is_err();
                let failure = match chunk {
                    Ok(Ok(Some(chunk))) => {
                        if let Err(e) = demo_echo::bulk_check(offset, &chunk.bytes) {
                            return (Some(format!("bulk stream: {e}")), Some(conn));
                        }
                        let n = chunk.bytes.len() as u64;
                        offset += n;
                        rep.verified_bytes += n;
                        buckets.add(at_us, n);
                        last_good = at_us;
                        self.first_good(&mut pending_reconnect, at_us);
                        continue;
                    }
                    Ok(Ok(None)) => "the server finished an unbounded bulk stream".to_owned(),
                    Ok(Err(e)) => format!("bulk read: {e}"),
                    // The run's end, not a stall.
                    Err(_) if Instant::now() >= self.end => continue,
                    Err(_) => format!("no bulk bytes within {} ms", args.io_timeout_ms),
                };
                if args.reconnect {
                    let closed = conn.connection().close_reason();
                    let cause = closed.map_or(failure, |c| format!("connection closed: {c}"));
                    match self.reconnect(last_good, cause).await {
                        Ok((c, i)) => {
                            conn.close().await;
                            conn = c;
                            pending_reconnect = Some(i);
                            continue 'streams;
                        }
                        Err(e) => return (Some(e), Some(conn)),
                    }
                }
                // Following moves: the stream survives them; only a closed connection, an
                // error or a stall past the recovery deadline ends the run.
                let stalled = at_us - last_good > args.recovery_deadline_ms * 1000;
                if !timed_out || stalled {
                    return (Some(failure), Some(conn));
                }
            }
        }
    }
}

/// Opens a stream and asks for an unbounded bulk stream on it.
async fn open_bulk(conn: &quinn::Connection) -> Result<(quinn::SendStream, quinn::RecvStream)> {
    let (mut send, recv) = conn.open_bi().await?;
    send.write_all(&BulkRequest { len: None }.encode()?).await?;
    send.finish()?;
    Ok((send, recv))
}

/// Records every move the client sees, and when each Resumed arrives.
fn watch_migrations(
    client: &MigratingClient,
    clock: Clock,
    migrations: Arc<Mutex<Vec<MigrationRecord>>>,
) {
    let mut events = client.events();
    tokio::spawn(async move {
        let mut resumed = 0;
        loop {
            {
                let status = events.borrow_and_update().clone();
                let now = clock.now();
                let mut list = migrations.lock().unwrap_or_else(|p| p.into_inner());
                while list.len() < status.migrations.len() {
                    let m = &status.migrations[list.len()];
                    list.push(MigrationRecord {
                        id: m.id.clone(),
                        new_addr: m.new_addr,
                        aborted: m.aborted,
                        seen_unix_us: clock.us(m.at),
                        resumed_unix_us: None,
                    });
                }
                while resumed < status.resumed {
                    resumed += 1;
                    if let Some(m) = list.iter_mut().rev().find(|m| m.resumed_unix_us.is_none()) {
                        m.resumed_unix_us = Some(now);
                    }
                }
            }
            if events.changed().await.is_err() {
                return;
            }
        }
    });
}

/// The pause around each move (from its Migrate to the first answer after its Resumed) and
/// each reconnect (from the last good answer to the first on the new connection).
fn latency_pauses(
    rep: &mut LatencyReport,
    migrations: &[MigrationRecord],
    reconnects: &[ReconnectRecord],
    end_us: u64,
) {
    let done: Vec<u64> = rep.echoes.iter().map(|[t, rtt]| t + rtt).collect();
    let mut push = |event: &str, gap: Option<(u64, u64)>| {
        if let Some((a, z)) = gap {
            rep.pauses.push(Pause {
                event: event.to_owned(),
                last_before_unix_us: a,
                first_after_unix_us: z,
                pause_ms: (z - a) as f64 / 1e3,
            });
        }
    };
    for m in migrations {
        let until = m
            .resumed_unix_us
            .and_then(|r| done.iter().find(|&&d| d >= r).copied())
            .unwrap_or(end_us);
        push(
            "migration",
            timeline::longest_gap(&done, m.seen_unix_us, until),
        );
    }
    for r in reconnects {
        if let Some(first) = r.first_good_unix_us {
            push("reconnect", Some((r.last_good_unix_us, first)));
        }
    }
}

/// Steady goodput before the first move (or loss), and the recovery after each.
fn bulk_recoveries(
    args: &Args,
    rep: &mut BulkReport,
    buckets: &Buckets,
    migrations: &[MigrationRecord],
    reconnects: &[ReconnectRecord],
) {
    let first_event = migrations
        .iter()
        .map(|m| m.seen_unix_us)
        .chain(reconnects.iter().map(|r| r.last_good_unix_us))
        .min();
    let steady =
        first_event.and_then(|t| timeline::steady_goodput(buckets, t, args.steady_span_ms * 1000));
    rep.steady_goodput_bps = steady;
    let window = args.recovery_window_ms * 1000;
    let recover = |from: Option<u64>| {
        let target = steady? * args.recovery_fraction;
        timeline::recovery_us(buckets, from?, window, target).map(|us| us as f64 / 1e3)
    };
    for m in migrations {
        let (from, kind) = match m.resumed_unix_us {
            Some(t) => (Some(t), "resumed"),
            None => (
                timeline::first_bytes_after_gap(buckets, m.seen_unix_us),
                "first_byte_after_gap",
            ),
        };
        rep.recoveries.push(Recovery {
            event: "migration".to_owned(),
            from_unix_us: from,
            from: kind.to_owned(),
            recovery_ms: recover(from),
        });
    }
    for r in reconnects {
        rep.recoveries.push(Recovery {
            event: "reconnect".to_owned(),
            from_unix_us: r.first_good_unix_us,
            from: "first_byte".to_owned(),
            recovery_ms: recover(r.first_good_unix_us),
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(extra: &[&str]) -> Result<Args, String> {
        let mut argv = vec![
            "bench_client",
            "--target",
            "127.0.0.1:4242",
            "--ca",
            "ca.pem",
            "--json",
            "out.json",
        ];
        argv.extend_from_slice(extra);
        let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
        args.check().map_err(|e| e.to_string())?;
        Ok(args)
    }

    #[test]
    fn good_flags_parse() {
        let a = parse(&["--mode", "bulk"]).unwrap();
        assert_eq!(a.mode, Mode::Bulk);
        assert_eq!(a.reconnect_list(), vec![a.target]);
        let a = parse(&[
            "--mode",
            "latency",
            "--reconnect",
            "--reconnect-to",
            "127.0.0.1:1,127.0.0.1:2",
        ])
        .unwrap();
        assert_eq!(a.reconnect_list().len(), 2);
    }

    #[test]
    fn bad_flags_are_refused_with_clear_errors() {
        for (extra, needle) in [
            (&["--mode", "fast"][..], "invalid value 'fast'"),
            (&[][..], "--mode"),
            (&["--mode", "bulk", "--bucket-ms", "0"][..], "--bucket-ms 0"),
            (
                &["--mode", "bulk", "--bucket-ms", "5000"][..],
                "--bucket-ms 5000",
            ),
            (
                &["--mode", "bulk", "--duration-s", "0"][..],
                "--duration-s must be",
            ),
            (
                &["--mode", "bulk", "--duration-s", "99999"][..],
                "more than an hour",
            ),
            (
                &["--mode", "bulk", "--io-timeout-ms", "0"][..],
                "--io-timeout-ms must be",
            ),
            (
                &["--mode", "bulk", "--recovery-fraction", "1.5"][..],
                "--recovery-fraction 1.5",
            ),
            (
                &["--mode", "bulk", "--recovery-fraction", "NaN"][..],
                "--recovery-fraction NaN",
            ),
            (
                &["--mode", "bulk", "--reconnect-to", "127.0.0.1:1"][..],
                "--reconnect",
            ),
            (
                &["--mode", "bulk", "--reconnect", "--reconnect-to", "nowhere"][..],
                "invalid value 'nowhere'",
            ),
            (&["--mode", "bulk", "--interval-ms", "-1"][..], "'-1'"),
        ] {
            let err = parse(extra)
                .err()
                .unwrap_or_else(|| panic!("{extra:?} accepted"));
            assert!(err.contains(needle), "{extra:?}: {err}");
        }
    }
}
