//! cwrapper: the demo ping/echo client that follows its server across migrations.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use admin_api::{ClientMigration, ClientReport, ClientsSummary, Phases};
use anyhow::{Context, Result, bail};
use clap::Parser;
use cwrapper::summary::{ConnectionOutcome, ConnectionResult};
use cwrapper::{ClientError, ClientOptions, ControlStatus, MigratingClient};
use demo_echo::EchoChecker;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{Instrument, debug, error_span, info, warn};

/// Most connections one process holds (`--connections`): each takes a UDP socket (a file
/// descriptor) and an echo loop, and the demo server holds 1024 sessions by default.
const MAX_CONNECTIONS: u32 = 1000;

/// Ping/echo client of the demo echo server (swrapper), through a socket that follows the
/// server when it moves.
///
/// Each echo is one request on a fresh stream, with a deadline. When the server announces a
/// migration, the deadline tightens to --migrated-io-timeout-ms so that recovery is observed
/// promptly, and the client reports the downtime: from the last successful echo before the
/// migration to the first one after, as a human line and as a JSON line on stdout, and to the
/// server on the control stream (Downtime, which the orchestrator's report and metrics
/// collect; a server of protocol version 1 gets none). Every reply is checked: sequence in order, no gap, no duplicate, and the server's per-connection counter
/// advancing by exactly one (so a server that lost its state is detected).
///
/// Two-phase migrations (the server sends Quiesce before Migrate): the client sends no new
/// echo, lets the one in flight finish, answers Quiesced, and holds until the server says
/// Resumed (or aborts the move); it then sends its next echo at once, without the
/// --interval-ms pause. Nothing is in flight during the freeze, so nothing is lost and no
/// deadline or QUIC probe timer has to expire. A quiesce request also ends an --interval-ms
/// pause early. Each migration's JSON record says which mode the server used ("phases":
/// "one" or "two"). Single-phase migrations behave as before.
///
/// During a move the client sends to the old and the new address until the server confirms,
/// on the authenticated control stream (Resumed), that it runs at the new one; a move not
/// confirmed within --overlap-max-ms or --overlap-max-bytes is given up: the client swaps back
/// and ends with an error naming the address and the cap.
///
/// Several connections (--connections N, N > 1): N independent clients in one process, each
/// with its own socket, QUIC connection, handshake, control stream and client id
/// (<client-id>-<k>, k = 0..N-1), started --stagger-ms apart; each runs the echo loop and the
/// checks above and follows moves on its own. Each prints one JSON line per migration
/// ({"event":"migration","connection":k,"client_id":"...","record":{...}}, the record as with
/// one connection). At the end the process prints one summary JSON line (also written to
/// --json): connections started, alive at the end, reconnected (must be 0), failed, and for
/// each migration every connection's downtime with their p50, p95 (nearest rank) and max.
/// --count applies to each connection; --duration-s counts from the process's start.
/// --interval-ms keeps its default: 100 connections at 10 ms (4 processes x 25, release
/// build) are about 7 700 echoes a second for about one core of two, server included; 50 ms
/// halves that but coarsens the downtime measure (it cannot be finer than the interval).
///
/// Exit status: 0 when every check passed, 1 on a failed check or an unrecoverable error
/// (with several connections: when any connection failed a check, never started or was
/// lost), 2 on a bad command line.
#[derive(Debug, Clone, Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// The server's first address.
    #[arg(long, env = "TARGET_ADDR", default_value = "127.0.0.1:5242")]
    target: SocketAddr,
    /// The name in the server's certificate.
    #[arg(long, env = "CWRAPPER_SERVER_NAME", default_value = "localhost")]
    server_name: String,
    /// PEM certificate(s) to trust: the server's (swrapper writes it to --cert-out).
    #[arg(long, env = "CWRAPPER_CA")]
    ca: PathBuf,
    /// What the client calls itself on the control stream (default: cwrapper-<pid>).
    #[arg(long, env = "CWRAPPER_CLIENT_ID")]
    client_id: Option<String>,
    /// Pause between echoes, in milliseconds.
    #[arg(long, env = "CWRAPPER_INTERVAL_MS", default_value_t = 10)]
    interval_ms: u64,
    /// Deadline of one echo in normal operation, in milliseconds.
    #[arg(long, env = "CWRAPPER_IO_TIMEOUT_MS", default_value_t = 1000)]
    io_timeout_ms: u64,
    /// Deadline of one echo once a migration was seen, until the first echo after it.
    #[arg(long, env = "CWRAPPER_MIGRATED_IO_TIMEOUT_MS", default_value_t = 50)]
    migrated_io_timeout_ms: u64,
    /// After an IO error or a missed deadline, retry on a new stream instead of ending the
    /// session (also turned on by TRANSPARENT=1).
    #[arg(long)]
    stay_connected: bool,
    /// Give up when no echo succeeded this long after a migration was seen, in milliseconds.
    #[arg(long, env = "CWRAPPER_RECOVERY_DEADLINE_MS", default_value_t = 10_000)]
    recovery_deadline_ms: u64,
    /// Stop after this many echoes (0: run until SIGINT or SIGTERM).
    #[arg(long, env = "CWRAPPER_COUNT", default_value_t = 0)]
    count: u64,
    /// Stop after this many seconds (0: no limit).
    #[arg(long, env = "CWRAPPER_DURATION_S", default_value_t = 0)]
    duration_s: u64,
    /// Write the final report (JSON) here.
    #[arg(long, env = "CWRAPPER_JSON")]
    json: Option<PathBuf>,
    /// How long the first connection (handshake) may take, in milliseconds.
    #[arg(long, env = "CWRAPPER_CONNECT_TIMEOUT_MS", default_value_t = 10_000)]
    connect_timeout_ms: u64,
    /// Longest move overlap (duplicate sends to the new address until the server confirms the
    /// move), in milliseconds.
    #[arg(long, env = "CWRAPPER_OVERLAP_MAX_MS", default_value_t = 10_000)]
    overlap_max_ms: u64,
    /// Most bytes duplicated to the new address during one move overlap.
    #[arg(long, env = "CWRAPPER_OVERLAP_MAX_BYTES", default_value_t = 16 * 1024 * 1024)]
    overlap_max_bytes: u64,
    /// Connection idle timeout in seconds; must outlast the longest freeze: at least
    /// --overlap-max-ms plus 5 s (refused otherwise).
    #[arg(long, env = "CWRAPPER_IDLE_TIMEOUT_S", default_value_t = 30)]
    idle_timeout_s: u64,
    /// Log filter (tracing's EnvFilter syntax), logs go to stderr.
    #[arg(long, env = "CWRAPPER_LOG", default_value = "info")]
    log: String,
    /// Independent connections to hold in this process (1 to 1000), each with its own
    /// socket, handshake, control stream and client id <client-id>-<k>.
    #[arg(
        long,
        env = "CWRAPPER_CONNECTIONS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_CONNECTIONS)),
        allow_negative_numbers = true
    )]
    connections: u32,
    /// With several connections: pause between starting one connection and the next, in
    /// milliseconds (spreads the handshakes, and the echoes over the interval).
    #[arg(long, env = "CWRAPPER_STAGGER_MS", default_value_t = 5)]
    stagger_ms: u64,
}

type MigrationRecord = ClientMigration;
type Report = ClientReport;

/// Which connection an echo loop drives, for its output.
#[derive(Debug)]
struct Who {
    /// Its index when the process holds several connections; `None` for the single
    /// connection, whose output is as it has always been.
    index: Option<usize>,
    /// Its client id.
    client_id: String,
}

/// The client's stop request (SIGINT or SIGTERM), shared by every connection.
#[derive(Debug, Clone)]
struct Stop(watch::Receiver<bool>);

impl Stop {
    /// Resolves once the client is asked to stop (at once if it was). Cancel-safe.
    async fn wait(&mut self) {
        // Err only if the signal task is gone without a stop: then none will come.
        if self.0.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Turns SIGINT and SIGTERM into a [`Stop`]: from now on they no longer end the process at
/// once, they end every echo loop.
fn stop_on_signals() -> Result<Stop> {
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
        let _ = tx.send(true);
        // Kept until every receiver is gone, so that none mistakes a dropped sender for "no
        // stop will come".
        tx.closed().await;
    });
    Ok(Stop(rx))
}

/// How one echo attempt ended.
enum Outcome {
    Done(Result<demo_echo::EchoReply, cwrapper::EchoError>),
    TimedOut,
    Stop,
}

/// Opens a measurement window for each migration the control task has seen since the last
/// call. An abort settles the migration it aborts (rolled back); its own record measures the
/// pause until the server answers again.
fn sync_migrations(
    status: &cwrapper::ClientStatus,
    report: &mut Report,
    window: &mut Option<(usize, u64)>,
    started: Instant,
) {
    let ms = |t: Instant| t.saturating_duration_since(started).as_secs_f64() * 1e3;
    while report.migrations.len() < status.migrations.len() {
        let m = &status.migrations[report.migrations.len()];
        if m.aborted
            && let Some((i, _)) = *window
            && report.migrations[i].id == m.id
        {
            report.migrations[i].rolled_back = true;
        }
        report.migrations.push(MigrationRecord {
            id: m.id.clone(),
            new_addr: m.new_addr,
            aborted: m.aborted,
            phases: if m.quiesced { Phases::Two } else { Phases::One },
            seen_at_ms: ms(m.at),
            last_echo_before_ms: None,
            first_echo_after_ms: None,
            downtime_ms: None,
            failed_attempts: 0,
            completed: false,
            rolled_back: false,
            peer_after: None,
        });
        *window = Some((report.migrations.len() - 1, m.resumed_before));
        info!(id = %m.id, to = %m.new_addr, "migration seen: deadlines tightened");
    }
}

fn transparent_env() -> bool {
    std::env::var("TRANSPARENT").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    args.stay_connected |= transparent_env();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .with_context(|| format!("invalid --log filter `{}`", args.log))?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    for (name, v) in [
        ("--io-timeout-ms", args.io_timeout_ms),
        ("--migrated-io-timeout-ms", args.migrated_io_timeout_ms),
        ("--recovery-deadline-ms", args.recovery_deadline_ms),
        ("--connect-timeout-ms", args.connect_timeout_ms),
        ("--overlap-max-ms", args.overlap_max_ms),
        ("--overlap-max-bytes", args.overlap_max_bytes),
    ] {
        if v == 0 {
            bail!("{name} must be at least 1");
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let (text, verified) = if args.connections == 1 {
        let report = rt.block_on(run(&args))?;
        let text = serde_json::to_string(&report).context("encoding the report")?;
        (text, report.verified)
    } else {
        let summary = rt.block_on(run_many(Arc::new(args.clone())))?;
        let text = serde_json::to_string(&summary).context("encoding the summary")?;
        (text, summary.verified)
    };
    println!("{text}");
    if let Some(path) = &args.json {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    if !verified {
        std::process::exit(1);
    }
    Ok(())
}

/// The client id of the process (connection k of several is `<it>-<k>`).
fn base_client_id(args: &Args) -> String {
    args.client_id
        .clone()
        .unwrap_or_else(|| format!("cwrapper-{}", std::process::id()))
}

/// One connection to the server, as the command line describes it.
async fn connect(
    args: &Args,
    roots: Vec<cwrapper::quinn::rustls::pki_types::CertificateDer<'static>>,
    client_id: String,
) -> Result<MigratingClient, ClientError> {
    let config = cwrapper::client_config(
        &roots,
        &[demo_echo::ALPN],
        Duration::from_secs(args.idle_timeout_s),
    )?;
    let mut opts =
        ClientOptions::with_client_config(args.target, &args.server_name, config, client_id);
    opts.connect_timeout = Duration::from_millis(args.connect_timeout_ms);
    opts.overlap_limits = cwrapper::OverlapLimits::new(
        Duration::from_millis(args.overlap_max_ms),
        args.overlap_max_bytes,
    );
    MigratingClient::connect(opts).await
}

/// The single-connection client.
async fn run(args: &Args) -> Result<Report> {
    let roots = wrapper_support::tls::load_certs(&args.ca)?;
    let client_id = base_client_id(args);
    let client = connect(args, roots, client_id.clone())
        .await
        .with_context(|| format!("connecting to {}", args.target))?;
    let started = Instant::now();
    // As always: the signals stop the client once it is connected.
    let stop = stop_on_signals()?;
    let who = Who {
        index: None,
        client_id,
    };
    let (report, _alive) = drive(args, client, stop, &who, started).await;
    Ok(report)
}

/// Several connections in one process: each connects (`--stagger-ms` after the previous one)
/// and runs the echo loop on its own; the process stops them together.
async fn run_many(args: Arc<Args>) -> Result<ClientsSummary> {
    let roots = wrapper_support::tls::load_certs(&args.ca)?;
    let base = base_client_id(&args);
    let n = args.connections as usize;
    let stop = stop_on_signals()?;
    let origin = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..n {
        let args = args.clone();
        let roots = roots.clone();
        let mut stop = stop.clone();
        let client_id = format!("{base}-{k}");
        let delay = Duration::from_millis(args.stagger_ms.saturating_mul(k as u64));
        let task = async move {
            let connecting = async {
                tokio::time::sleep(delay).await;
                connect(&args, roots, client_id.clone()).await
            };
            let connected = tokio::select! {
                biased;
                () = stop.wait() => None,
                r = connecting => Some(r),
            };
            let outcome = match connected {
                None => ConnectionOutcome::NotStarted("stopped before connecting".to_owned()),
                Some(Err(e)) => {
                    warn!("connecting to {}: {e}", args.target);
                    ConnectionOutcome::NotStarted(format!("connecting to {}: {e}", args.target))
                }
                Some(Ok(client)) => {
                    let who = Who {
                        index: Some(k),
                        client_id: client_id.clone(),
                    };
                    let (report, alive) = drive(&args, client, stop, &who, origin).await;
                    ConnectionOutcome::Ran {
                        report: Box::new(report),
                        alive,
                    }
                }
            };
            ConnectionResult {
                index: k,
                client_id,
                outcome,
            }
        };
        tasks.spawn(task.instrument(error_span!("conn", k)));
    }
    let mut results = Vec::with_capacity(n);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(r) => results.push(r),
            // Its index is missing from the results: the summary counts it as failed.
            Err(e) => warn!("a connection's task ended abnormally: {e}"),
        }
    }
    results.sort_by_key(|r| r.index);
    let summary = cwrapper::summary::summarize(args.target, &base, n, &results);
    for m in &summary.migrations {
        let figures = m.downtime.map_or_else(
            || "no downtime measured".to_owned(),
            |d| {
                format!(
                    "downtime p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms",
                    d.p50_ms, d.p95_ms, d.max_ms
                )
            },
        );
        println!(
            "[client] migration {}{} to {}: {figures} ({} of {} connections completed)",
            m.id,
            if m.aborted { " (abort)" } else { "" },
            m.new_addr,
            m.completed,
            summary.connections_started,
        );
    }
    println!(
        "[client] summary: {} connections started of {}, {} alive, {} reconnected, {} failed; \
         {} echoes, {} migrations, {} failed attempts, verified: {}",
        summary.connections_started,
        summary.connections_requested,
        summary.connections_alive,
        summary.connections_reconnected,
        summary.connections_failed,
        summary.echoes,
        summary.migrations.len(),
        summary.failed_attempts,
        summary.verified
    );
    for e in &summary.errors {
        warn!(
            connection = e.connection,
            client = e.client_id,
            "{}",
            e.error
        );
    }
    Ok(summary)
}

/// The echo loop of one connection, until the client stops or the connection fails; returns
/// its report and whether it was still alive at the end (ended by the stop, `--count` or
/// `--duration-s`, its QUIC connection open). `origin` is where the report's times count from
/// and `--duration-s` starts.
async fn drive(
    args: &Args,
    client: MigratingClient,
    mut stop: Stop,
    who: &Who,
    origin: Instant,
) -> (Report, bool) {
    let conn = client.connection().clone();
    let started = origin;
    let connected = Instant::now();
    let ms = |t: Instant| t.saturating_duration_since(started).as_secs_f64() * 1e3;
    let mut report = Report {
        target: args.target,
        stable_id: conn.stable_id() as u64,
        connections: 0,
        handshakes: 0,
        echoes: 0,
        failed_attempts: 0,
        migrations: Vec::new(),
        control: String::new(),
        foreign_datagrams_dropped: 0,
        verified: false,
        error: None,
    };
    let mut checker = EchoChecker::default();
    let mut connections = std::collections::BTreeSet::new();
    let mut last_ok: Option<Instant> = None;
    // The migration whose downtime is being measured: (index in report.migrations, the
    // number of `Resumed` seen before it).
    let mut window: Option<(usize, u64)> = None;
    // A migration whose window just closed, with its downtime (ms), to report to the server.
    let mut measured: Option<(String, f64)> = None;
    let mut events = client.events();
    let deadline = (args.duration_s > 0).then(|| started + Duration::from_secs(args.duration_s));
    let error = loop {
        if args.count > 0 && report.echoes >= args.count {
            break None;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break None;
        }
        let status = client.status();
        sync_migrations(&status, &mut report, &mut window, started);
        // A move the server never confirmed: the client went back to the old address.
        if let Some(f) = status.failed_moves.first() {
            break Some(format!(
                "migration {}: {}",
                f.migration_id.as_deref().unwrap_or("(unknown)"),
                f.error
            ));
        }
        // Two-phase migration: the server asked to stop. Echoes go one at a time, so nothing
        // is in flight here: answer Quiesced, hold, and send the next echo the instant the
        // server releases the client (Resumed, or the abort), without the interval's pause.
        if client.quiesce_requested() {
            client.confirm_quiesced();
            let hold = Duration::from_millis(args.recovery_deadline_ms);
            let released = tokio::select! {
                r = tokio::time::timeout(hold, client.wait_released()) => r,
                () = stop.wait() => break None,
            };
            match released {
                Ok(how) => info!(?how, "released: sending again"),
                Err(_) => {
                    break Some(format!(
                        "asked to quiesce, and not released (Resumed or an abort) within {} ms",
                        args.recovery_deadline_ms
                    ));
                }
            }
            continue;
        }
        let timeout = Duration::from_millis(if window.is_some() {
            args.migrated_io_timeout_ms
        } else {
            args.io_timeout_ms
        });
        let req = checker.request(checker.next_seq().to_be_bytes().to_vec());
        // The deadline tightens if a migration is announced while this echo is in flight.
        let sent_at = tokio::time::Instant::now();
        let mut deadline = sent_at + timeout;
        let echo = cwrapper::echo_once(&conn, &req);
        tokio::pin!(echo);
        let outcome = loop {
            tokio::select! {
                r = &mut echo => break Outcome::Done(r),
                () = tokio::time::sleep_until(deadline) => break Outcome::TimedOut,
                Ok(()) = events.changed() => {
                    let seen = events.borrow_and_update().migrations.len();
                    if seen > report.migrations.len() {
                        let tight = tokio::time::Instant::now()
                            + Duration::from_millis(args.migrated_io_timeout_ms);
                        deadline = deadline.min(tight);
                    }
                }
                () = stop.wait() => break Outcome::Stop,
            }
        };
        let waited = deadline.saturating_duration_since(sent_at);
        let result = match outcome {
            Outcome::Stop => break None,
            Outcome::Done(r) => Ok(r),
            Outcome::TimedOut => Err(()),
        };
        // Migrations seen while the echo was in flight open their window before the echo is
        // counted: a reply that took the whole freeze must count as the first after it.
        sync_migrations(&client.status(), &mut report, &mut window, started);
        let failure = match result {
            Ok(Ok(reply)) => {
                if let Err(e) = checker.check(&req, &reply) {
                    break Some(format!("echo check failed: {e}"));
                }
                let now = Instant::now();
                report.echoes += 1;
                // Observed from the connection the echo went over, not assumed.
                connections.insert(conn.stable_id());
                if let Some((i, resumed_before)) = window {
                    let m = &mut report.migrations[i];
                    // The downtime is the longest pause between two successful echoes while
                    // the migration is under way (the server keeps answering from its old
                    // address until it freezes).
                    let before = last_ok.map_or(m.seen_at_ms, ms);
                    let gap = ms(now) - before;
                    if m.downtime_ms.is_none_or(|d| gap > d) {
                        m.downtime_ms = Some(gap);
                        m.last_echo_before_ms = Some(before);
                        m.first_echo_after_ms = Some(ms(now));
                    }
                    // Over once the server says it runs at its new address, or the client
                    // confirmed the move there (or swapped back after an abort).
                    let shim = client.shim();
                    let moved = client.status().resumed > resumed_before
                        || (shim.previous_peer().is_none() && shim.peer() == m.new_addr);
                    if moved {
                        window = None;
                        m.completed = true;
                        m.peer_after = shim.last_received_from();
                        let d = m.downtime_ms.unwrap_or(gap);
                        measured = Some((m.id.clone(), d));
                        match who.index {
                            None => {
                                println!(
                                    "[client] migration {} to {}: downtime {d:.1} ms ({} failed attempts)",
                                    m.id, m.new_addr, m.failed_attempts
                                );
                                println!(
                                    "{}",
                                    serde_json::json!({ "event": "migration", "record": m })
                                );
                            }
                            // Many connections: the JSON line alone, naming the connection.
                            Some(k) => println!(
                                "{}",
                                serde_json::json!({
                                    "event": "migration",
                                    "connection": k,
                                    "client_id": who.client_id,
                                    "record": m,
                                })
                            ),
                        }
                    }
                }
                last_ok = Some(now);
                // The server records each connection's pause for the orchestrator.
                if let Some((id, ms)) = measured.take() {
                    let pause = Duration::from_secs_f64(ms.max(0.0) / 1e3);
                    match client.report_downtime(&id, pause).await {
                        Ok(()) => debug!(%id, ms, "downtime reported to the server"),
                        Err(e) => info!(%id, ms, "downtime not reported: {e}"),
                    }
                }
                None
            }
            Ok(Err(e)) => Some(format!("echo failed: {e:#}")),
            Err(()) => Some(format!("no echo within {waited:?}")),
        };
        if let Some(why) = failure {
            if !args.stay_connected {
                break Some(format!("{why} (use --stay-connected to retry)"));
            }
            report.failed_attempts += 1;
            if let Some(reason) = conn.close_reason() {
                break Some(format!("connection closed: {reason}"));
            }
            let now = Instant::now();
            let outage = ms(now) - ms(last_ok.unwrap_or(connected));
            match window {
                Some((i, _)) => {
                    let m = &mut report.migrations[i];
                    m.failed_attempts += 1;
                    let outage = ms(now) - last_ok.map_or(m.seen_at_ms, ms).max(m.seen_at_ms);
                    if outage > args.recovery_deadline_ms as f64 {
                        break Some(format!(
                            "server unreachable at {} for {outage:.0} ms after migration {} (deadline {} ms)",
                            m.new_addr, m.id, args.recovery_deadline_ms
                        ));
                    }
                }
                None => {
                    warn!("{why}; retrying on a new stream");
                    if outage > args.recovery_deadline_ms as f64 {
                        break Some(format!(
                            "server unreachable at {} for {outage:.0} ms (deadline {} ms)",
                            client.peer(),
                            args.recovery_deadline_ms
                        ));
                    }
                }
            }
            // Retry the same request at once: the server answers a retry idempotently.
            continue;
        }
        if args.interval_ms > 0 {
            // A quiesce request ends the pause: an idle client answers it at once.
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(args.interval_ms)) => {}
                () = client.quiesce_wanted() => {}
            }
        }
    };
    let alive = error.is_none() && conn.close_reason().is_none();
    report.control = match client.status().control {
        ControlStatus::Open { .. } => "open".to_owned(),
        ControlStatus::Connecting => "connecting".to_owned(),
        ControlStatus::Closed { reason } => format!("closed: {reason}"),
    };
    report.foreign_datagrams_dropped = client.shim().stats().dropped_foreign;
    report.stable_id = conn.stable_id() as u64;
    report.connections = connections.len() as u64;
    // The handshakes this client completed, observed on the connection itself: the server
    // confirmed it with HANDSHAKE_DONE. Not the number of those frames: the server sends the
    // frame again when it thinks the packet that carried it was lost (a late ack, on a busy
    // machine), and quinn counts every copy; a second handshake would be a second QUIC
    // connection, which `connections` counts.
    report.handshakes = u64::from(conn.stats().frame_rx.handshake_done > 0);
    let settled = |m: &MigrationRecord| m.completed || m.rolled_back;
    report.verified = error.is_none() && report.migrations.iter().all(settled);
    report.error = match (error, report.migrations.iter().find(|m| !settled(m))) {
        (Some(e), _) => Some(e),
        (None, Some(m)) => Some(format!(
            "migration {} was seen but the server was not reached at {} before the end",
            m.id, m.new_addr
        )),
        (None, None) => None,
    };
    if let Some(e) = &report.error {
        warn!("{e}");
    }
    if who.index.is_none() {
        println!(
            "[client] summary: {} echoes, {} migrations, {} failed attempts, verified: {}",
            report.echoes,
            report.migrations.len(),
            report.failed_attempts,
            report.verified
        );
    }
    client.close("client done").await;
    (report, alive)
}
