//! The migration engine: a loop over migration-core's phases.
//!
//! ```text
//!  Migration::phase() ──► run the phase ──Ok(event)──► Migration::on_event ──► next phase
//!                              │                         (a refused event is an error: a bug)
//!                              └─Err──► MigrationPolicy::on_failure(phase) ──► Recovery
//!                                         ResumeSource    : abort request, the source serves
//!                                         RestoreOnSource : criu restore at the source, abort
//!                                         Abort           : stop, report
//! ```
//!
//! | phase        | what runs                                                              |
//! |--------------|------------------------------------------------------------------------|
//! | Preparing    | stale admin files cleared, migrate request + SIGTERM, wait `announce`  |
//! | Quiescing    | the server parked its socket after the acks: nothing more to wait for  |
//! | Dumping      | pre-dump rounds (when the kernel tracks dirty memory), final dump      |
//! | Transferring | the dumped PID is gone (reaped by the supervisor); sealed transfer     |
//! | Restoring    | criu restore in the target's namespace, run by the supervisor          |
//! | Resuming     | the process is observed in the target's namespace; resume request +    |
//! |              | SIGUSR2, wait `resumed`; the source's address answers nothing, the     |
//! |              | target's answers QUIC                                                  |
//!
//! Once the result is known (and the images and the journal are gone), the clients' downtime
//! reports are collected from the server's `downtime.json` for up to [`DOWNTIME_WAIT`] and go
//! into the report's timeline (`client_downtime`, median, max).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use admin_api::{
    AbortRequest, Aborted, AdminDir, Announced, MigrateRequest, MoveReport, MoveResult, Phases,
    Placement, PortProbe, ResumeRequest, Resumed, ServerEvent,
};
use anyhow::{Context, Result, anyhow, bail};
use migration_core::{
    Event, MigrationId, MigrationPolicy, Phase, PreDumpDecision, PreDumpPolicy, Recovery,
    SessionId, Timestamp,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{info, warn};

use crate::criu_rpc::Worker;
use crate::interrupt::{self, Point};
use crate::journal::{self, Journal};
use crate::postcopy::{self, Memory};
use crate::state::{Container, Side, State};
use crate::supervisor::{self, SupervisorReply, SupervisorRequest};
use crate::{criu, images, kdat, secure, sys, transfer};

/// How the image set reaches the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Transfer {
    /// Same host: restore from the directory it was dumped into.
    Local,
    /// Through migration-wire: chunked, zstd level 1, sealed with AES-256-GCM, reassembled.
    Sealed,
}

/// A fault to inject, for testing the recoveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The final dump fails (its image directory is a regular file): the source goes on.
    Dump,
    /// The restore at the target fails (its pstree image is hidden): restored at the source.
    Restore,
    /// The restore "succeeds" in the source's namespace instead of the target's: a broken
    /// move that the observations must catch (the move is reported failed).
    RestoreInSource,
}

/// How to run one migration.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Recovery, deadlines and pre-dump.
    pub(crate) policy: MigrationPolicy,
    /// Single- or two-phase preparation of the clients (the server's rounds).
    pub(crate) phases: Phases,
    /// Two phases: how long the server waits for the clients' `Quiesced`.
    pub(crate) quiesce_deadline: Duration,
    /// How images reach the target.
    pub(crate) transfer: Transfer,
    /// How the memory moves (post-copy: `postcopy`).
    pub(crate) memory: Memory,
    /// Keep the image set after a completed move.
    pub(crate) keep_images: bool,
    /// Behind a front: hold the datagrams that arrive during the freeze (else only switch).
    pub(crate) front_hold: bool,
    /// Fault injection.
    pub(crate) fault: Option<Fault>,
}

/// How long the server may take beyond the ack deadline to write `announce`.
const ANNOUNCE_SLACK: Duration = Duration::from_secs(5);
/// How long a resume or an abort may take.
const EVENT_LIMIT: Duration = Duration::from_secs(5);
/// How long a restore through the supervisor may take.
// The supervisor may run the worker to its limit and then the command line: control waits
// longer than both, so that it never gives up (and restores at the source) while the
// supervisor still restores at the target.
const RESTORE_LIMIT: Duration = Duration::from_secs(2 * criu::WORKER_LIMIT.as_secs() + 30);
/// How long the dumped PID may take to be reaped.
const REAP_LIMIT: Duration = Duration::from_secs(5);
/// How long a probe of an address waits for a QUIC answer.
const PROBE_WAIT: Duration = Duration::from_millis(300);
/// How long the clients' downtime reports are awaited after a move's result is known: each
/// client reports at its first reply after the move (cwrapper: its first echo, or the
/// transport's pause 1 s after `Resumed` when its application reports nothing).
pub(crate) const DOWNTIME_WAIT: Duration = Duration::from_secs(2);

pub(crate) fn now() -> Timestamp {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    Timestamp::from_micros(micros)
}

pub(crate) fn random_id() -> Result<MigrationId> {
    use std::io::Read as _;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(MigrationId::from_bytes(b))
}

fn signal(pid: i32, sig: Signal) -> Result<()> {
    kill(Pid::from_raw(pid), sig).with_context(|| format!("sending {sig} to the server ({pid})"))
}

/// Checks made before anything is touched: a failure here leaves everything as it was.
pub(crate) fn preflight(state_dir: &Path, state: &State, opts: &Options) -> Result<()> {
    let dst = state.container(state.side.other());
    let src = state.container(state.side);
    if !crate::podman::is_running(&dst.name) {
        bail!(
            "container {} ({}) is not running; the server in {} stays where it is",
            dst.name,
            state.side.other(),
            src.name
        );
    }
    if !sys::process_runs(state.server_pid, &state.server_comm()) {
        bail!(
            "the server (PID {}) is not running; see {} (or `control down` and `control up`)",
            state.server_pid,
            state.server_log.display()
        );
    }
    let socket = state_dir.join(supervisor::SOCKET);
    match supervisor::ask(&socket, &SupervisorRequest::Ping, Duration::from_secs(5)) {
        Ok(SupervisorReply::Pong { pid }) if pid == state.supervisor_pid => {}
        Ok(other) => bail!("the supervisor answered {other:?} to a ping"),
        Err(e) => {
            return Err(e).context(
                "the server's supervisor is gone; the server cannot be restored without it \
                 (`control down`, then `control up`)",
            );
        }
    }
    // Post-copy hook: its preconditions refuse the move before anything is touched.
    if opts.memory == Memory::PostCopy {
        postcopy::refusal(
            state.server_pid,
            opts.transfer,
            Path::new(postcopy::PIPE_MAX_SIZE),
        )?;
    }
    images::check_dir(&state.images_dir)
}

/// One migration, from the side the server is on to the other one. Returns the report
/// whatever the result; `Err` only for what is not a migration outcome (a bug, or a failure
/// to record the new state).
pub(crate) fn migrate(state_dir: &Path, state: &mut State, opts: &Options) -> Result<MoveReport> {
    preflight(state_dir, state, opts)?;
    let id = random_id()?;
    let images = state.images_dir.join(id.to_string());
    secure::private_dir(&images)?;
    let src = state.container(state.side).clone();
    let dst = state.container(state.side.other()).clone();
    let mut machine = migration_core::Migration::new(id, now());
    let mut engine = Engine {
        admin: AdminDir::open(&state.admin_dir)?,
        supervisor: state_dir.join(supervisor::SOCKET),
        id,
        report: {
            // The addresses the probes check. Behind a front, the containers' own: the
            // front's stateless NAT leaves the backend's replies untracked, which the host
            // ports' port maps (conntrack) then cannot translate back.
            let (source_addr, target_addr) = match &state.front {
                Some(f) => (
                    SocketAddr::V4(f.backend(state.side)),
                    SocketAddr::V4(f.backend(state.side.other())),
                ),
                None => (
                    SocketAddr::from(([127, 0, 0, 1], src.host_port)),
                    SocketAddr::from(([127, 0, 0, 1], dst.host_port)),
                ),
            };
            let mut r = MoveReport::new(
                id,
                (src.name.clone(), dst.name.clone()),
                (source_addr, target_addr),
                machine.report(),
            );
            r.images_dir = Some(images.clone());
            r.front = state.front.is_some();
            r
        },
        opts,
        pid: state.server_pid,
        src,
        dst,
        images,
        dump_dir: None,
        restore_dir: None,
        started: Instant::now(),
        state_dir: state_dir.to_path_buf(),
        sides: (state.side, state.side.other()),
        dump_as: dump_as(state.server_pid),
        dump_kdat: None,
        dump_worker: None,
        spent_dump_worker: None,
        restore_prepared: false,
        page_flow: None,
        restored_at: None,
        source_pid: state.server_pid,
        front: match &state.front {
            Some(f) => Some(crate::front::MovingFront::attach(f, state.side)?),
            None => None,
        },
        plain: state.plain_server(),
        comm: state.server_comm(),
    };
    info!(%id, from = %engine.src.name, to = %engine.dst.name, "migration starts");
    engine.journal(Phase::Idle)?;
    let driven = drive(
        &mut machine,
        &opts.policy,
        &mut engine,
        &now,
        &interrupt::interrupted,
    )?;
    engine.report.recovery = driven.recovery;
    engine.report.failure = driven.failure;
    // The server's PID after the move (the same after a restore; recorded for `status`).
    state.server_pid = engine.pid;
    if machine.phase() == Phase::Completed {
        state.side = state.side.other();
        state.migrations += 1;
    }
    state.save(state_dir)?;
    let admin = engine.admin.clone();
    let mut report = engine.finish(&machine);
    journal::remove(state_dir)?;
    // The move is over (images gone, journal removed); the clients report their pause a
    // little after it. Bounded, and skipped when nobody was told the outcome.
    let expected = clients_told(&report);
    if expected > 0 {
        for d in collect_downtimes(&admin, id, expected) {
            machine.report_downtime(SessionId(d.session), d.downtime());
        }
        report.timeline = machine.report();
    }
    Ok(report)
}

/// How many clients were told the move's outcome, so may report their downtime: those told
/// `Resumed` after a completed move, those that acknowledged `MigrateAborted` after a
/// rollback.
pub(crate) fn clients_told(report: &MoveReport) -> usize {
    match report.result {
        MoveResult::Completed => report.resumed.as_ref().map_or(0, |r| r.told),
        _ => report.aborted.as_ref().map_or(0, |a| a.outcome.acked.len()),
    }
}

/// The downtimes the clients of migration `id` report, awaited until `expected` came or
/// [`DOWNTIME_WAIT`] passed (a client that reports nothing, an old one, is not an error).
pub(crate) fn collect_downtimes(
    admin: &AdminDir,
    id: MigrationId,
    expected: usize,
) -> Vec<admin_api::ReportedDowntime> {
    let started = Instant::now();
    match admin.wait_downtimes(id, expected, DOWNTIME_WAIT) {
        Ok(got) => {
            info!(
                %id,
                reported = got.len(),
                expected,
                ms = format_args!("{:.0}", started.elapsed().as_secs_f64() * 1e3),
                "client downtimes collected"
            );
            got
        }
        Err(e) => {
            warn!(%id, "reading the clients' downtimes: {e}");
            Vec::new()
        }
    }
}

/// The work of each phase and of the recoveries: what the loop in [`drive`] runs. The engine
/// does it with criu, signals and the supervisor; a test double checks the loop's logic.
pub(crate) trait Work {
    /// Runs the work of `phase` and returns the event it ends with; `step` feeds events that
    /// happen on the way (pre-dump rounds).
    fn run(&mut self, phase: Phase, step: &mut dyn FnMut(Event) -> Result<()>) -> Result<Event>;
    /// [`Recovery::ResumeSource`]: the source process still runs; it serves again and its
    /// clients are sent back.
    fn resume_source(&mut self) -> Result<()>;
    /// [`Recovery::RestoreOnSource`]: the source process was dumped; it is restored at the
    /// source, serves again and its clients are sent back.
    fn restore_on_source(&mut self) -> Result<()>;
}

/// What the loop decided.
#[derive(Debug, Default)]
pub(crate) struct Driven {
    /// The recovery chosen after a failure.
    pub(crate) recovery: Option<Recovery>,
    /// What failed, and how the recovery went.
    pub(crate) failure: Option<String>,
}

/// Feeds `event`; an event the machine refuses is a bug of the engine, and an error.
fn feed(
    machine: &mut migration_core::Migration,
    event: Event,
    clock: &dyn Fn() -> Timestamp,
) -> Result<()> {
    let kind = event.kind();
    let from = machine.phase();
    machine.on_event(event, clock()).map(|_| ()).map_err(|e| {
        anyhow!("engine bug: in phase {from}, the state machine refused {kind:?}: {e}")
    })
}

/// The phase loop: runs the work of the phase the machine is in until it is terminal; on a
/// failure, runs the recovery `policy` chooses for the failed phase (one path for every phase).
///
/// `interrupted` is asked before the work of every phase up to `Restoring`: once true (SIGINT
/// or SIGTERM), that phase fails without running and is recovered like any failure. From
/// `Resuming` on the process already runs at the target, and finishing the move is the
/// quickest way back to a running service.
pub(crate) fn drive(
    machine: &mut migration_core::Migration,
    policy: &MigrationPolicy,
    work: &mut dyn Work,
    clock: &dyn Fn() -> Timestamp,
    interrupted: &dyn Fn() -> bool,
) -> Result<Driven> {
    let mut driven = Driven::default();
    feed(machine, Event::Start, clock)?;
    while !machine.is_terminal() {
        let phase = machine.phase();
        let outcome = match phase {
            Phase::Preparing
            | Phase::Quiescing
            | Phase::Dumping
            | Phase::Transferring
            | Phase::Restoring
            | Phase::Resuming => {
                if phase != Phase::Resuming && interrupted() {
                    Err(anyhow!("interrupted by a signal (SIGINT or SIGTERM)"))
                } else {
                    let mut step = |e: Event| feed(machine, e, clock);
                    work.run(phase, &mut step)
                }
            }
            other => bail!("engine bug: no work for phase {other}"),
        };
        let error = match outcome {
            Ok(event) => {
                feed(machine, event, clock)?;
                continue;
            }
            Err(e) => e,
        };
        let reason = format!("{phase} failed: {error:#}");
        let recovery = policy.on_failure(phase);
        warn!("{reason}; recovery: {recovery:?}");
        driven.recovery = Some(recovery);
        driven.failure = Some(reason.clone());
        feed(machine, recovery.failure_event(reason.clone()), clock)?;
        let outcome = match recovery {
            Recovery::ResumeSource => work.resume_source(),
            Recovery::RestoreOnSource => work.restore_on_source(),
            // Abort, and any recovery this engine does not know: stop, undo nothing.
            _ => continue,
        };
        match outcome {
            Ok(()) => {
                info!("rolled back: the server serves from the source again");
                feed(machine, Event::RollbackSucceeded, clock)?;
            }
            Err(e) => {
                let msg = format!("{e:#}");
                warn!("the rollback failed too: {msg}");
                driven.failure = Some(format!("{reason}; rollback failed too: {msg}"));
                feed(machine, Event::RollbackFailed { reason: msg }, clock)?;
            }
        }
    }
    Ok(driven)
}

struct Engine<'a> {
    admin: AdminDir,
    supervisor: PathBuf,
    id: MigrationId,
    report: MoveReport,
    opts: &'a Options,
    /// The server's PID.
    pid: i32,
    src: Container,
    dst: Container,
    /// This migration's image directory.
    images: PathBuf,
    /// The final dump, once written.
    dump_dir: Option<PathBuf>,
    /// What the target restores from.
    restore_dir: Option<PathBuf>,
    started: Instant,
    /// Where the journal goes.
    state_dir: PathBuf,
    /// (from, to).
    sides: (Side, Side),
    /// Whom the dump runs as (the server's account).
    dump_as: Option<criu::DumpAs>,
    /// That account's kdat cache folder.
    dump_kdat: Option<PathBuf>,
    /// The final dump's worker, started before the clients are told (`Err`: why none runs).
    dump_worker: Option<Result<Worker, String>>,
    /// The dump worker after its answer: reaped once the server runs again (criu's clean-up
    /// is not part of the freeze).
    spent_dump_worker: Option<Worker>,
    /// Whether the supervisor was asked for a restore worker not used yet.
    restore_prepared: bool,
    /// Post-copy: the source's page server and the lazy-pages daemon, from the dump until
    /// every page is resident.
    page_flow: Option<postcopy::PageFlow>,
    /// When the restore at the target returned (post-copy: "resident after" counts from it).
    restored_at: Option<Instant>,
    /// The server's PID at the source (post-copy: the frozen source stays until every page
    /// arrived, and runs again when the transfer fails).
    source_pid: i32,
    /// The deployment's front (`up --front`), taken over for this move.
    front: Option<crate::front::MovingFront>,
    /// The server is the user's (`up -- COMMAND`): no announce, no resume or abort request.
    plain: bool,
    /// The server's program name (see `State::server_comm`).
    comm: String,
}

impl Engine<'_> {
    /// Records, before it starts, the phase about to run.
    fn journal(&self, phase: Phase) -> Result<()> {
        journal::write(
            &self.state_dir,
            &Journal {
                migration_id: self.id,
                phase,
                from: self.sides.0,
                to: self.sides.1,
                server_pid: self.pid,
                images: self.images.clone(),
                keep_images: self.opts.keep_images,
            },
        )
    }

    fn wait<E: ServerEvent>(&self, limit: Duration) -> Result<E> {
        let id = self.id;
        self.admin
            .wait_event::<E>(Some(id), limit)
            .map_err(anyhow::Error::from)
    }

    /// Preparing: the server tells every client and waits for the acks, then parks. A server
    /// of the user's is not told anything: its clients keep the front address.
    fn announce(&mut self) -> Result<Event> {
        if self.plain {
            let root_kdat = kdat::for_account(0, 0);
            self.report.dirty_tracking =
                criu::dirty_tracking_supported(root_kdat.as_deref()).unwrap_or(false);
            self.start_workers();
            return Ok(Event::BeginDump);
        }
        let removed = self.admin.clear()?;
        if !removed.is_empty() {
            warn!(
                ?removed,
                "removed admin files left over from an earlier run"
            );
        }
        // Asked before the clients are told: criu's start-up costs tens of milliseconds,
        // which must not fall between the server parking and the dump.
        let root_kdat = kdat::for_account(0, 0);
        self.report.dirty_tracking =
            criu::dirty_tracking_supported(root_kdat.as_deref()).unwrap_or(false);
        self.start_workers();
        let deadline = self.opts.policy.ack_deadline;
        let phases = self.opts.phases;
        self.report.phases = phases;
        self.admin.send_request(&MigrateRequest {
            migration_id: self.id,
            // Behind a front the clients' address stays: their shim swaps to the same one.
            new_addr: self
                .front
                .as_ref()
                .map_or(self.report.target_addr, |f| SocketAddr::V4(f.address())),
            deadline_ms: u64::try_from(deadline.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            phases,
            quiesce_deadline_ms: Some(
                u64::try_from(self.opts.quiesce_deadline.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            ),
        })?;
        signal(self.pid, Signal::SIGTERM)?;
        // Each of the server's rounds (quiesce, announce) waits at most the deadline.
        let announced: Announced = self.wait(deadline * phases.rounds() + ANNOUNCE_SLACK)?;
        info!(
            acked = announced.outcome.acked.len(),
            missing = announced.outcome.missing.len(),
            ms = format_args!("{:.1}", announced.outcome.elapsed_ms),
            "clients told"
        );
        // Plain QUIC clients could not be told. Not a reason to stop or roll back: nothing
        // would tell them either way, and the wrapper-aware clients are ready to follow.
        let plain = announced.outcome.cannot_follow.len();
        if plain > 0 && self.front.is_some() {
            info!(
                plain,
                "plain QUIC clients: kept by the front (their address stays)"
            );
        } else if plain > 0 {
            warn!(
                plain,
                "plain QUIC clients (no control stream) cannot follow this move: they keep \
                 working only if their address stays, i.e. behind a --front"
            );
        }
        let parked = announced.parked;
        self.report.announce = Some(announced);
        interrupt::fault(Point::Announced);
        Ok(if parked {
            Event::BeginQuiesce
        } else {
            Event::BeginDump
        })
    }

    /// Starts criu's workers before the freeze: the dump's here (in the source's namespace, as
    /// the server's account), the restore's at the supervisor (in the target's namespace).
    /// A worker that does not start is not an error: the command line runs instead.
    fn start_workers(&mut self) {
        if self.opts.memory == Memory::PostCopy {
            // Post-copy runs criu's lazy dump, the lazy-pages daemon and the lazy restore
            // from the command line (`postcopy`): no worker would be used.
            return;
        }
        let (uid, gid) = self.dump_as.map_or((0, 0), |u| (u.uid, u.gid));
        self.dump_kdat = kdat::for_account(uid, gid);
        self.dump_worker = Some(
            criu::dump_worker(&self.src.netns, self.dump_as, self.dump_kdat.as_deref())
                .map_err(|e| e.to_string()),
        );
        if let Some(Err(e)) = &self.dump_worker {
            warn!("no criu dump worker: {e}");
        }
        let request = SupervisorRequest::PrepareRestore {
            netns: self.dst.netns.clone(),
        };
        match supervisor::ask(&self.supervisor, &request, EVENT_LIMIT) {
            Ok(SupervisorReply::Prepared { pid }) => {
                info!(pid, "criu restore worker waits at the supervisor");
                self.restore_prepared = true;
            }
            Ok(SupervisorReply::Failed { error }) => {
                warn!("no criu restore worker: {error}");
            }
            Ok(other) => warn!("no criu restore worker: the supervisor answered {other:?}"),
            Err(e) => warn!("no criu restore worker: {e:#}"),
        }
    }

    /// Dumping: pre-dump rounds while the kernel tracks dirty memory, then the final dump.
    fn dump(&mut self, step: &mut dyn FnMut(Event) -> Result<()>) -> Result<Event> {
        if self.opts.memory == Memory::PostCopy {
            return self.dump_lazy();
        }
        let policy: &PreDumpPolicy = &self.opts.policy.predump;
        let mut parent: Option<String> = None;
        let (mut last, mut prev) = (None, None);
        loop {
            let rounds = u32::try_from(self.report.predump_rounds.len()).unwrap_or(u32::MAX);
            match policy.next_step(rounds, last, prev, self.report.dirty_tracking) {
                PreDumpDecision::Another => {}
                PreDumpDecision::FinalDump(reason) => {
                    info!(?reason, rounds, "final dump");
                    self.report.predump_stop = Some(reason);
                    break;
                }
            }
            let dir = self.images.join(format!("pre{rounds}"));
            secure::private_dir(&dir)?;
            let root_kdat = kdat::for_account(0, 0);
            match criu::pre_dump(
                self.pid,
                &self.src.netns,
                &dir,
                parent.as_deref(),
                root_kdat.as_deref(),
            ) {
                Ok(t) => {
                    let bytes = sys::dir_size(&dir);
                    step(Event::PreDumpRound { image_bytes: bytes })?;
                    self.report.predump_rounds.push((bytes, t));
                    prev = last;
                    last = Some(bytes);
                    parent = Some(format!("../pre{rounds}"));
                }
                Err(e) => {
                    warn!("pre-dump failed, going on with a full dump: {e:#}");
                    parent = None;
                    break;
                }
            }
        }
        if !self.report.dirty_tracking {
            info!(
                "the kernel does not track dirty memory (criu check --feature mem_dirty_track): \
                 no pre-dump, the final dump copies everything"
            );
        }
        let dir = self.images.join("final");
        if self.opts.fault == Some(Fault::Dump) {
            warn!("fault injection: the dump will fail");
            std::fs::write(&dir, b"")?;
        } else {
            secure::private_dir(&dir)?;
        }
        let args = criu::DumpArgs {
            pid: self.pid,
            netns: self.src.netns.clone(),
            dir: dir.clone(),
            parent,
            user: self.dump_as,
            kdat: self.dump_kdat.clone(),
        };
        if interrupt::kill_armed(Point::Dumping) {
            // The recovery test: criu runs on while control dies.
            let _child = criu::dump_command(&args)
                .spawn()
                .context("starting criu dump")?;
            interrupt::fault(Point::Dumping);
        }
        let worker = self
            .dump_worker
            .take()
            .unwrap_or_else(|| Err("no dump worker was started".to_owned()));
        self.front_freeze()?;
        let (timing, spent) = criu::dump_via_deferred(worker, &args)?;
        self.spent_dump_worker = spent;
        interrupt::fault(Point::Dumped);
        let bytes = sys::dir_size(&dir);
        self.report.dump = Some(timing);
        self.report.image_bytes = Some(bytes);
        self.dump_dir = Some(dir);
        Ok(Event::DumpDone {
            image_bytes: Some(bytes),
        })
    }

    /// Transferring: the source process is gone (its PID free for the restore), and the
    /// image set reaches the target.
    fn transfer(&mut self) -> Result<Event> {
        if self.page_flow.is_some() {
            // Post-copy: the source stays frozen while it serves pages; nothing to move.
            self.restore_dir.clone_from(&self.dump_dir);
            return Ok(Event::TransferDone);
        }
        sys::reap(self.pid, REAP_LIMIT)?;
        let dump_dir = self.dump_dir.clone().context("no dump to transfer")?;
        self.restore_dir = Some(match self.opts.transfer {
            Transfer::Local => dump_dir,
            Transfer::Sealed => {
                let dest = self.images.join("transferred");
                let stats = transfer::sealed(&dump_dir, &dest)?;
                self.report.transfer = Some(stats);
                dest
            }
        });
        Ok(Event::TransferDone)
    }

    /// Restoring: criu restore in the target's network namespace, run by the supervisor.
    fn restore(&mut self) -> Result<Event> {
        let dir = self
            .restore_dir
            .clone()
            .context("nothing to restore from")?;
        let hidden = if self.opts.fault == Some(Fault::Restore) {
            warn!("fault injection: the restore in the target will fail");
            let from = dir.join("pstree.img");
            let to = dir.join("pstree.img.hidden");
            std::fs::rename(&from, &to).with_context(|| format!("hiding {}", from.display()))?;
            Some((to, from))
        } else {
            None
        };
        let netns = if self.opts.fault == Some(Fault::RestoreInSource) {
            warn!("fault injection: restoring into the source's namespace instead of the target's");
            self.src.netns.clone()
        } else {
            self.dst.netns.clone()
        };
        // Whatever happens next, the supervisor's worker is used or dropped by this request.
        self.restore_prepared = false;
        if interrupt::kill_armed(Point::Restoring) {
            // The recovery test: the supervisor restores while control dies.
            supervisor::send(
                &self.supervisor,
                &SupervisorRequest::Restore {
                    netns: netns.clone(),
                    dir: dir.clone(),
                    log_name: "restore.log".to_owned(),
                },
            )?;
            interrupt::fault(Point::Restoring);
        }
        let restored = self.restore_in(&netns, &dir, "restore.log");
        if let Some((hidden, original)) = hidden {
            std::fs::rename(hidden, original).context("putting pstree.img back")?;
        }
        let (pid, timing) = restored?;
        self.restored_at = Some(Instant::now());
        self.pid = pid;
        self.report.restore = Some(timing);
        Ok(Event::RestoreDone)
    }

    fn restore_in(
        &self,
        netns: &Path,
        dir: &Path,
        log_name: &str,
    ) -> Result<(i32, admin_api::CriuTiming)> {
        if self.page_flow.is_some() {
            return restore_lazy_via_supervisor(&self.supervisor, netns, dir, log_name);
        }
        restore_via_supervisor(&self.supervisor, netns, dir, log_name)
    }

    /// Resuming: the process is where it should be, renews its socket and tells the clients;
    /// then the source's address must answer nothing and the target's must answer QUIC.
    fn resume(&mut self) -> Result<Event> {
        let placement = observe_placement(self.pid, &self.dst)?;
        let right = placement.is_right();
        self.report.placement = Some(placement);
        if !right {
            bail!(
                "the restored server (PID {}) is not in {}'s network namespace",
                self.pid,
                self.dst.name
            );
        }
        if !self.plain {
            let resumed = ask_resume(&self.admin, self.pid, self.id)?;
            self.report.resumed = Some(resumed);
        }
        // After the server's new socket exists (its rebind; a server of the user's runs on
        // the socket criu restored): the held datagrams reach it.
        if let Some(f) = &mut self.front {
            f.settle_at(self.sides.1)?;
        }
        let source = probe(self.report.source_addr);
        let target = probe(self.report.target_addr);
        self.report.source_probe = Some(source);
        self.report.target_probe = Some(target);
        if source == PortProbe::Answered {
            bail!(
                "the source's address {} still answers QUIC after the move",
                self.report.source_addr
            );
        }
        if target != PortProbe::Answered {
            bail!(
                "the target's address {} does not answer QUIC after the move ({target:?})",
                self.report.target_addr
            );
        }
        self.wait_resident()?;
        Ok(Event::ResumeDone)
    }

    /// The process was dumped: bring it back in the source's namespace from its own images.
    fn restore_at_source(&mut self) -> Result<()> {
        if let Some(flow) = self.page_flow.take() {
            return self.source_after_lazy_abort(flow);
        }
        let dir = self
            .dump_dir
            .clone()
            .context("no image set to restore at the source")?;
        // A restore that failed may have left the PID taken by a half-restored task.
        sys::reap(self.pid, REAP_LIMIT)?;
        let (pid, timing) = self
            .restore_in(&self.src.netns.clone(), &dir, "rollback-restore.log")
            .context("restoring the server in the source again")?;
        self.pid = pid;
        self.report.rollback_restore = Some(timing);
        let placement = observe_placement(pid, &self.src)?;
        if !placement.is_right() {
            bail!(
                "the server restored for the rollback is not in {}'s namespace",
                self.src.name
            );
        }
        Ok(())
    }

    /// Behind a front: datagrams are held from the freeze on and go to the target.
    fn front_freeze(&mut self) -> Result<()> {
        let to = self.sides.1;
        let hold = self.opts.front_hold;
        if let Some(f) = &mut self.front {
            f.freeze_to(to, hold)?;
        }
        Ok(())
    }

    /// The server serves from the source again and sends its clients back there.
    fn send_back(&mut self) -> Result<()> {
        // Behind a front: it points at the source again, and what it held goes there.
        let from = self.sides.0;
        if let Some(f) = &mut self.front
            && let Err(e) = f.settle_at(from)
        {
            warn!("pointing the front back at the source: {e:#}; trying again");
            std::thread::sleep(Duration::from_millis(200));
            // Failing twice fails the rollback, and says so: the route would still point at
            // the target.
            f.settle_at(from)
                .context("pointing the front back at the source")?;
        }
        if self.plain {
            // Its clients never left the front.
            return Ok(());
        }
        let aborted = ask_abort(
            &self.admin,
            self.pid,
            self.id,
            self.report.source_addr,
            self.opts.policy.ack_deadline,
        )?;
        self.report.aborted = Some(aborted);
        Ok(())
    }

    fn finish(mut self, machine: &migration_core::Migration) -> MoveReport {
        // Post-copy: a move that failed after its restore (placement, resume, probes) still
        // has pages in flight: they are waited for (or the restored server is killed when
        // they cannot arrive) before the image set goes, and the criu processes are reaped.
        if self.page_flow.is_some()
            && let Err(e) = self.wait_resident()
        {
            warn!("post-copy after a failed move: {e:#}");
        }
        // Unused workers (a move that stopped before its dump or restore) are killed.
        drop(self.dump_worker.take());
        drop(self.spent_dump_worker.take());
        if self.restore_prepared {
            match supervisor::ask(
                &self.supervisor,
                &SupervisorRequest::DiscardRestore,
                EVENT_LIMIT,
            ) {
                Ok(SupervisorReply::Discarded { .. }) => {}
                Ok(other) => warn!("discarding the restore worker: answered {other:?}"),
                Err(e) => warn!("discarding the restore worker: {e:#}"),
            }
        }
        let completed = machine.phase() == Phase::Completed;
        let rolled_back = machine
            .failure()
            .is_some_and(migration_core::FailureReason::rolled_back);
        self.report.result = if completed {
            MoveResult::Completed
        } else if rolled_back {
            MoveResult::RolledBack
        } else {
            MoveResult::Failed
        };
        // The image set holds the server's memory (its TLS keys with it): removed whatever
        // the result, unless asked to keep it (then still 0700, as `kept-<id>`).
        self.report.images_dir = images::dispose(&self.images, self.opts.keep_images);
        self.report.wall_ms = self.started.elapsed().as_secs_f64() * 1e3;
        self.report.timeline = machine.report();
        self.report
    }
}

// ---- post-copy hooks (`postcopy.rs`): the engine's side of `--memory post-copy` ----------
impl Engine<'_> {
    /// Dumping, post-copy: the lazy dump (everything but the memory) and the lazy-pages
    /// daemon, joined by a socket pair; the source stays frozen, its pages pinned.
    fn dump_lazy(&mut self) -> Result<Event> {
        let dir = self.images.join("final");
        if self.opts.fault == Some(Fault::Dump) {
            warn!("fault injection: the dump will fail");
            std::fs::write(&dir, b"")?;
        } else {
            secure::private_dir(&dir)?;
        }
        // No kill points here: recovering a post-copy move whose control was killed is not
        // handled yet (see ARCHITECTURE.md).
        self.front_freeze()?;
        let started = postcopy::start(self.pid, &self.src.netns, &dir, self.dump_as)?;
        self.page_flow = Some(started.flow);
        let bytes = sys::dir_size(&dir);
        self.report.dump = Some(started.dump);
        self.report.image_bytes = Some(bytes);
        self.dump_dir = Some(dir);
        Ok(Event::DumpDone {
            image_bytes: Some(bytes),
        })
    }

    /// Rolling back before the restore used the pages: the dump is stopped, which lets the
    /// frozen source go on; it must run again where it was.
    fn source_after_lazy_abort(&mut self, flow: postcopy::PageFlow) -> Result<()> {
        // A failed lazy restore may have left a half-restored process: it has no memory.
        if self.pid != self.source_pid && sys::process_runs(self.pid, &self.comm) {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
        flow.abort();
        self.pid = self.source_pid;
        if !sys::process_runs(self.pid, &self.comm) {
            bail!(
                "the source's server (PID {}) did not survive the stopped post-copy dump",
                self.pid
            );
        }
        let placement = observe_placement(self.pid, &self.src)?;
        if !placement.is_right() {
            bail!(
                "the source's server is not in {}'s namespace",
                self.src.name
            );
        }
        Ok(())
    }

    /// Resuming, post-copy: waits until every page is resident. A failed transfer after the
    /// restore leaves the restored server with incomplete memory: it is killed (better than
    /// running on zero-filled pages), and the move fails loudly; when criu let the source run
    /// again, its clients are sent back to it.
    fn wait_resident(&mut self) -> Result<()> {
        let Some(flow) = self.page_flow.take() else {
            return Ok(());
        };
        let restored_at = self.restored_at.unwrap_or_else(Instant::now);
        let report = flow.wait_resident(restored_at);
        let error = report.error.clone();
        self.report.post_copy = Some(report);
        let Some(error) = error else {
            return Ok(());
        };
        tracing::error!(
            "POST-COPY PAGE TRANSFER FAILED after the restore: the restored server's memory is \
             incomplete; killing it (PID {}). {error}",
            self.pid
        );
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        let mut outcome = format!(
            "post-copy page transfer failed after the restore; the restored server (PID {}) \
             was killed, its memory being incomplete",
            self.pid
        );
        if sys::process_runs(self.source_pid, &self.comm) {
            self.pid = self.source_pid;
            match self.send_back() {
                Ok(()) => outcome.push_str(
                    "; the source's server runs again (criu unfroze it) and its clients were \
                     sent back",
                ),
                Err(e) => outcome.push_str(&format!(
                    "; the source's server runs again but sending the clients back failed: {e:#}"
                )),
            }
        } else {
            outcome.push_str(
                "; the source's server is gone too: THE SERVICE IS DOWN (`control down`, \
                 `control up`)",
            );
        }
        bail!("{outcome}: {error}")
    }
}

impl Work for Engine<'_> {
    fn run(&mut self, phase: Phase, step: &mut dyn FnMut(Event) -> Result<()>) -> Result<Event> {
        self.journal(phase)?;
        match phase {
            Phase::Preparing => self.announce(),
            Phase::Quiescing => Ok(Event::BeginDump),
            Phase::Dumping => self.dump(step),
            Phase::Transferring => self.transfer(),
            Phase::Restoring => self.restore(),
            Phase::Resuming => self.resume(),
            other => bail!("engine bug: no work for phase {other}"),
        }
    }

    fn resume_source(&mut self) -> Result<()> {
        self.journal(Phase::RollingBack)?;
        self.send_back()
    }

    fn restore_on_source(&mut self) -> Result<()> {
        self.journal(Phase::RollingBack)?;
        self.restore_at_source()?;
        self.send_back()
    }
}

/// The server's credentials, read from `/proc`: a server that is not root is dumped as itself.
fn dump_as(pid: i32) -> Option<criu::DumpAs> {
    let (uid, gid) = sys::process_ids(pid)?;
    (uid != 0).then_some(criu::DumpAs { uid, gid })
}

/// `criu restore` of `dir` into `netns`, run by the supervisor at `socket`: the restored PID
/// and criu's timing.
pub(crate) fn restore_via_supervisor(
    socket: &Path,
    netns: &Path,
    dir: &Path,
    log_name: &str,
) -> Result<(i32, admin_api::CriuTiming)> {
    let request = SupervisorRequest::Restore {
        netns: netns.to_path_buf(),
        dir: dir.to_path_buf(),
        log_name: log_name.to_owned(),
    };
    match supervisor::ask(socket, &request, RESTORE_LIMIT)? {
        SupervisorReply::Restored { pid, timing } => Ok((pid, timing)),
        SupervisorReply::Failed { error } => Err(anyhow!("{error}")),
        other => bail!("the supervisor answered {other:?} to a restore"),
    }
}

/// Post-copy: `criu restore --lazy-pages` of `dir` into `netns`, run by the supervisor at
/// `socket`.
pub(crate) fn restore_lazy_via_supervisor(
    socket: &Path,
    netns: &Path,
    dir: &Path,
    log_name: &str,
) -> Result<(i32, admin_api::CriuTiming)> {
    let request = SupervisorRequest::RestoreLazy {
        netns: netns.to_path_buf(),
        dir: dir.to_path_buf(),
        log_name: log_name.to_owned(),
    };
    match supervisor::ask(socket, &request, RESTORE_LIMIT)? {
        SupervisorReply::Restored { pid, timing } => Ok((pid, timing)),
        SupervisorReply::Failed { error } => Err(anyhow!("{error}")),
        other => bail!("the supervisor answered {other:?} to a lazy restore"),
    }
}

/// Resume request + SIGUSR2: the restored server renews its socket and tells its clients.
pub(crate) fn ask_resume(admin: &AdminDir, pid: i32, id: MigrationId) -> Result<Resumed> {
    admin.send_request(&ResumeRequest { migration_id: id })?;
    signal(pid, Signal::SIGUSR2)?;
    Ok(admin.wait_event::<Resumed>(Some(id), EVENT_LIMIT)?)
}

/// Abort request + SIGUSR1: the server serves again (unparked) and sends its clients back to
/// `fallback`.
pub(crate) fn ask_abort(
    admin: &AdminDir,
    pid: i32,
    id: MigrationId,
    fallback: SocketAddr,
    ack_deadline: Duration,
) -> Result<Aborted> {
    admin.send_request(&AbortRequest {
        migration_id: id,
        fallback_addr: fallback,
        deadline_ms: u64::try_from(ack_deadline.as_millis())
            .unwrap_or(u64::MAX)
            .max(1),
    })?;
    signal(pid, Signal::SIGUSR1)?;
    Ok(admin.wait_event::<Aborted>(Some(id), ack_deadline + EVENT_LIMIT)?)
}

/// Where process `pid` runs, against where `expected` is.
pub(crate) fn observe_placement(pid: i32, expected: &Container) -> Result<Placement> {
    Ok(Placement {
        pid,
        netns_inode: sys::netns_inode(Path::new(&format!("/proc/{pid}/ns/net")))?,
        expected_netns_inode: sys::netns_inode(&expected.netns)?,
        expected_container: expected.name.clone(),
    })
}

/// What answers QUIC at `addr`.
pub(crate) fn probe(addr: SocketAddr) -> PortProbe {
    match udp_shim_client::probe::quic_probe(addr, PROBE_WAIT) {
        Ok(udp_shim_client::probe::ProbeAnswer::VersionNegotiation) => PortProbe::Answered,
        Ok(udp_shim_client::probe::ProbeAnswer::Refused) => PortProbe::Refused,
        Ok(_) | Err(_) => PortProbe::Silent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration_core::FailureReason;

    /// A test double of the engine's work: fails at one phase (and the recovery, if asked),
    /// and records what ran.
    #[derive(Default)]
    struct Script {
        fail_at: Option<Phase>,
        fail_recovery: bool,
        /// Returns this event instead of the right one at this phase (an engine bug).
        wrong_event_at: Option<Phase>,
        predump_rounds: u32,
        ran: Vec<String>,
    }

    impl Work for Script {
        fn run(
            &mut self,
            phase: Phase,
            step: &mut dyn FnMut(Event) -> Result<()>,
        ) -> Result<Event> {
            self.ran.push(phase.to_string());
            if self.fail_at == Some(phase) {
                bail!("injected failure");
            }
            if self.wrong_event_at == Some(phase) {
                return Ok(Event::ResumeDone);
            }
            Ok(match phase {
                Phase::Preparing => Event::BeginQuiesce,
                Phase::Quiescing => Event::BeginDump,
                Phase::Dumping => {
                    for _ in 0..self.predump_rounds {
                        step(Event::PreDumpRound { image_bytes: 10 })?;
                    }
                    Event::DumpDone {
                        image_bytes: Some(5),
                    }
                }
                Phase::Transferring => Event::TransferDone,
                Phase::Restoring => Event::RestoreDone,
                Phase::Resuming => Event::ResumeDone,
                other => bail!("no work for {other}"),
            })
        }

        fn resume_source(&mut self) -> Result<()> {
            self.ran.push("resume_source".into());
            if self.fail_recovery {
                bail!("the source does not answer");
            }
            Ok(())
        }

        fn restore_on_source(&mut self) -> Result<()> {
            self.ran.push("restore_on_source".into());
            if self.fail_recovery {
                bail!("criu restore failed at the source");
            }
            Ok(())
        }
    }

    fn clock() -> Timestamp {
        Timestamp::from_micros(1)
    }

    fn run(
        script: &mut Script,
        policy: &MigrationPolicy,
    ) -> (migration_core::Migration, Result<Driven>) {
        let mut m = migration_core::Migration::new(MigrationId::from_bytes([3; 16]), clock());
        let r = drive(&mut m, policy, script, &clock, &|| false);
        (m, r)
    }

    #[test]
    fn the_happy_path_visits_every_phase_once_and_completes() {
        let mut s = Script {
            predump_rounds: 2,
            ..Script::default()
        };
        let (m, r) = run(&mut s, &MigrationPolicy::default());
        let d = r.unwrap();
        assert_eq!(m.phase(), Phase::Completed);
        assert!(d.recovery.is_none() && d.failure.is_none());
        assert_eq!(
            s.ran,
            [
                "preparing",
                "quiescing",
                "dumping",
                "transferring",
                "restoring",
                "resuming"
            ]
        );
        assert_eq!(m.predump_rounds().len(), 2);
    }

    #[test]
    fn every_failed_phase_gets_the_recovery_the_policy_chooses() {
        let policy = MigrationPolicy::default();
        for phase in [
            Phase::Preparing,
            Phase::Quiescing,
            Phase::Dumping,
            Phase::Transferring,
            Phase::Restoring,
            Phase::Resuming,
        ] {
            for fail_recovery in [false, true] {
                let mut s = Script {
                    fail_at: Some(phase),
                    fail_recovery,
                    ..Script::default()
                };
                let (m, r) = run(&mut s, &policy);
                let d = r.unwrap();
                let want = policy.on_failure(phase);
                assert_eq!(d.recovery, Some(want), "{phase}");
                assert_eq!(m.phase(), Phase::Failed, "{phase}");
                // The recovery that ran, and nothing after the failed phase.
                let last = s.ran.last().unwrap().clone();
                let failure = m.failure().unwrap();
                match want {
                    Recovery::ResumeSource => assert_eq!(last, "resume_source", "{phase}"),
                    Recovery::RestoreOnSource => {
                        assert_eq!(last, "restore_on_source", "{phase}");
                    }
                    _ => {
                        assert_eq!(last, phase.to_string(), "{phase}");
                        assert!(!FailureReason::rolled_back(failure), "{phase}");
                    }
                }
                assert_eq!(
                    s.ran.iter().filter(|p| **p == phase.to_string()).count(),
                    1,
                    "{phase}: {:?}",
                    s.ran
                );
                let text = d.failure.unwrap();
                assert!(text.contains("injected failure"), "{text}");
                if want != Recovery::Abort {
                    assert_eq!(
                        FailureReason::rolled_back(failure),
                        !fail_recovery,
                        "{phase}"
                    );
                    assert_eq!(
                        text.contains("rollback failed too"),
                        fail_recovery,
                        "{text}"
                    );
                }
            }
        }
    }

    #[test]
    fn an_interrupt_rolls_back_at_the_next_boundary_but_not_once_resuming() {
        use std::cell::Cell;
        // Interrupted while dumping: the transfer never runs; the source is restored.
        let calls = Cell::new(0);
        let interrupted = || {
            calls.set(calls.get() + 1);
            calls.get() > 3 // Preparing, Quiescing, Dumping run; Transferring is refused.
        };
        let mut s = Script::default();
        let mut m = migration_core::Migration::new(MigrationId::from_bytes([4; 16]), clock());
        let d = drive(
            &mut m,
            &MigrationPolicy::default(),
            &mut s,
            &clock,
            &interrupted,
        )
        .unwrap();
        assert_eq!(
            s.ran,
            ["preparing", "quiescing", "dumping", "restore_on_source"]
        );
        assert_eq!(d.recovery, Some(Recovery::RestoreOnSource));
        assert!(d.failure.unwrap().contains("interrupted by a signal"));
        assert_eq!(m.phase(), Phase::Failed);
        // Interrupted once the process runs at the target: the move is finished.
        let mut s = Script::default();
        let mut m = migration_core::Migration::new(MigrationId::from_bytes([5; 16]), clock());
        let late = Cell::new(0);
        let interrupted = || {
            late.set(late.get() + 1);
            late.get() > 5
        };
        drive(
            &mut m,
            &MigrationPolicy::default(),
            &mut s,
            &clock,
            &interrupted,
        )
        .unwrap();
        assert_eq!(m.phase(), Phase::Completed);
    }

    #[test]
    fn without_rollback_every_failure_is_given_up() {
        let policy = MigrationPolicy {
            rollback_on_failure: false,
            ..MigrationPolicy::default()
        };
        let mut s = Script {
            fail_at: Some(Phase::Restoring),
            ..Script::default()
        };
        let (m, r) = run(&mut s, &policy);
        assert_eq!(r.unwrap().recovery, Some(Recovery::Abort));
        assert_eq!(m.phase(), Phase::Failed);
        assert_eq!(s.ran.last().unwrap(), "restoring");
    }

    fn report_with(result: MoveResult, told: usize, abort_acks: usize) -> MoveReport {
        let id = MigrationId::from_bytes([5; 16]);
        let addr: SocketAddr = "127.0.0.1:5242".parse().unwrap();
        let mut r = MoveReport::new(
            id,
            ("a".into(), "b".into()),
            (addr, addr),
            migration_core::Migration::new(id, Timestamp::from_micros(0)).report(),
        );
        r.result = result;
        r.resumed = Some(Resumed {
            addr,
            told,
            handshakes: 1,
        });
        let client = |n: usize| admin_api::ClientRef {
            session: n as u64,
            client_id: format!("c{n}"),
        };
        r.aborted = Some(Aborted {
            outcome: admin_api::AnnounceOutcome {
                address: addr,
                acked: (0..abort_acks).map(client).collect(),
                missing: vec![client(99)],
                cannot_follow: vec![],
                elapsed_ms: 1.0,
            },
            handshakes: 1,
        });
        r
    }

    #[test]
    fn the_clients_told_the_outcome_are_the_ones_awaited() {
        assert_eq!(clients_told(&report_with(MoveResult::Completed, 3, 1)), 3);
        assert_eq!(clients_told(&report_with(MoveResult::RolledBack, 3, 2)), 2);
        let mut r = report_with(MoveResult::Failed, 3, 2);
        r.aborted = None;
        assert_eq!(clients_told(&r), 0);
    }

    #[test]
    fn downtimes_are_collected_for_the_migration_and_fed_to_the_timeline() {
        use admin_api::{DowntimeLog, MigrationDowntimeReports, ReportedDowntime};
        let t = tempfile::tempdir().unwrap();
        let admin = AdminDir::open(t.path()).unwrap();
        let id = MigrationId::from_bytes([6; 16]);
        let reported = |session: u64, ms: u64| ReportedDowntime {
            session,
            client_id: format!("c{session}"),
            downtime_us: ms * 1000,
        };
        admin
            .post_downtimes(&DowntimeLog {
                migrations: vec![
                    // An earlier move's: not this one's.
                    MigrationDowntimeReports {
                        migration_id: MigrationId::from_bytes([1; 16]),
                        reports: vec![reported(1, 500)],
                    },
                    MigrationDowntimeReports {
                        migration_id: id,
                        reports: vec![reported(1, 30), reported(2, 50)],
                    },
                ],
            })
            .unwrap();
        let started = Instant::now();
        let got = collect_downtimes(&admin, id, 2);
        assert!(started.elapsed() < DOWNTIME_WAIT, "returned once both came");
        let mut m = migration_core::Migration::new(id, Timestamp::from_micros(0));
        for d in &got {
            m.report_downtime(SessionId(d.session), d.downtime());
        }
        let r = m.report();
        assert_eq!(r.sessions_reporting(), 2);
        assert_eq!(r.client_downtime_median, Some(Duration::from_millis(40)));
        assert_eq!(r.client_downtime_max, Some(Duration::from_millis(50)));
        // A third client never reports: what came by the bound.
        let started = Instant::now();
        assert_eq!(collect_downtimes(&admin, id, 3).len(), 2);
        assert!(started.elapsed() >= DOWNTIME_WAIT);
    }

    #[test]
    fn an_event_the_machine_refuses_is_an_error_not_a_log_line() {
        let mut s = Script {
            wrong_event_at: Some(Phase::Dumping),
            ..Script::default()
        };
        let (m, r) = run(&mut s, &MigrationPolicy::default());
        let err = format!("{:#}", r.unwrap_err());
        assert!(err.contains("engine bug"), "{err}");
        assert!(err.contains("dumping"), "{err}");
        // Nothing ran after the refusal.
        assert_eq!(s.ran.last().unwrap(), "dumping");
        assert_eq!(m.phase(), Phase::Dumping);
    }
}
