//! The source's side of a cross-host move: the engine's phase loop (`engine::drive`, the same
//! loop and policy as a move on one host) over work that talks to the target's agent.
//!
//! | phase        | here (source)                              | there (target agent)          |
//! |--------------|--------------------------------------------|-------------------------------|
//! | Preparing    | key agreement; dump worker; announce       | Prepare: slot, supervisor,    |
//! |              | (clients told the target's address), park  | restore worker                |
//! | Dumping      | criu dump into the private storage         |                               |
//! | Transferring | reap; stream the image set, sealed         | Receive: verify, reassemble   |
//! | Restoring    |                                            | Restore: criu, placement      |
//! | Resuming     | probes: source silent, target answers QUIC | Resume: socket, `Resumed`     |
//!
//! Recoveries: before the dump the source unparks and sends its clients back (and the target
//! is told to abort); after it, the target is told to abort first (so that no second copy
//! runs), then the source's own image set is restored here and the clients come back.
//!
//! Post-copy (`MoveSpec::memory`): the dump is `criu dump --lazy-pages` (the memory stays in
//! the frozen source), the image set streamed is everything but the memory, and after it a
//! Pages stream carries criu's page-server traffic between the dump's socket and the target's
//! lazy-pages daemon (`page_relay`); the target restores with `--lazy-pages` and answers the
//! resume once every page arrived (`ResumedResident`). Preconditions are checked before
//! anything is touched, here (`postcopy::refusal`: the server is PID 1 of its own pid
//! namespace, fs.pipe-max-size; the move is refused, not started) and at the target
//! (`Refusal::PostCopy`, at Prepare: rolled back like any refused Prepare). Any failure before
//! the target has every page is a rollback by *stopping the dump*: a killed criu dump lets the
//! frozen source go on, its memory intact (postcopy.rs checks this), so there is no image set
//! to restore here. A target whose pages could not all arrive kills its restored server and
//! the move fails loudly; the source, unfrozen, takes its clients back when it runs.
//!
//! The clients' downtime reports go to the agent where the server runs afterwards: the
//! target's after a completed move, this one after a rollback (in the background, once the
//! result is known). They do not reach this move's report: it is returned before they come.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use admin_api::{
    AdminDir, Announced, MigrateRequest, MoveReport, MoveResult, Phases, PortProbe, TransferStats,
};
use agent_protocol::{
    Memory, MoveFault, MoveSummary, Name, Outcome, PeerBody, PeerReply, PeerRequest, Prepare,
    Refusal, ServiceSpec,
};
use anyhow::{Context, Result, anyhow, bail};
use migration_core::{Event, MigrationId, MigrationPolicy, Phase};
use nix::sys::signal::Signal;
use tracing::{info, warn};

use super::daemon::{Agent, lock, now_unix};
use super::inbound::seal_context;
use super::page_relay::{self, RelayError, RelayFigures};
use crate::criu_rpc::Worker;
use crate::engine::{self, Work};
use crate::state::Container;
use crate::{criu, kdat, postcopy, secure, sys};

/// How long the server may take beyond the ack deadline to write `announce`.
const ANNOUNCE_SLACK: Duration = Duration::from_secs(5);
/// Limits of the requests to the target.
const PREPARE_LIMIT: Duration = Duration::from_secs(15);
const TRANSFER_LIMIT: Duration = Duration::from_secs(300);
const RESTORE_LIMIT: Duration = Duration::from_secs(2 * criu::WORKER_LIMIT.as_secs() + 40);
const RESUME_LIMIT: Duration = Duration::from_secs(15);
const ABORT_LIMIT: Duration = Duration::from_secs(15);
/// How long a target whose agent stopped answering during the restore is waited for.
const TARGET_RETURN_LIMIT: Duration = Duration::from_secs(10);
const REAP_LIMIT: Duration = Duration::from_secs(5);
/// How long the target may take to start its lazy-pages daemon (criu's readiness limit and
/// some).
const PAGES_READY_LIMIT: Duration = Duration::from_secs(70);
/// How long the page relay may take to end after the dump's page server exited.
const RELAY_END_LIMIT: Duration = Duration::from_secs(10);

/// A cross-host move to run.
#[derive(Debug, Clone)]
pub(crate) struct MoveSpec {
    pub(crate) service: Name,
    pub(crate) to: Name,
    pub(crate) phases: Phases,
    pub(crate) fault: Option<MoveFault>,
    pub(crate) policy: MigrationPolicy,
    /// After a completed move, copy the image set plainly to the target, for comparison.
    pub(crate) plain_copy_after: bool,
    /// How the memory moves.
    pub(crate) memory: Memory,
}

/// The figures of a cross-host move beyond admin-api's `MoveReport`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct CrossHost {
    pub(crate) source_host: String,
    pub(crate) target_host: String,
    /// (phase, host) of the failure.
    pub(crate) failed: Option<(String, String)>,
    pub(crate) raw_bytes: u64,
    pub(crate) compressed_bytes: u64,
    pub(crate) sealed_bytes: u64,
    pub(crate) transfer_ms: Option<f64>,
    pub(crate) send_ms: Option<f64>,
    pub(crate) target_undo: Option<String>,
    /// The same image set copied plainly over the same link after the move (`plain_copy_after`).
    pub(crate) plain_copy_ms: Option<f64>,
    pub(crate) plain_copy_bytes: Option<u64>,
    pub(crate) handshakes_after: Option<u64>,
    pub(crate) handshakes_before: Option<u64>,
    /// `cold` or `post-copy`.
    pub(crate) memory: &'static str,
    /// Post-copy: bytes of criu's page traffic the relay carried to the target (the pages)
    /// and back (the lazy-pages daemon's requests). `report.post_copy` has the target's
    /// figures (resident after, pages).
    pub(crate) page_bytes_to_target: Option<u64>,
    pub(crate) page_bytes_from_target: Option<u64>,
    /// Post-copy: what went wrong at the source after the target had every page (its dump's
    /// exit, the relay's end); the move completed regardless.
    pub(crate) page_source_note: Option<String>,
}

/// A move's full report.
#[derive(Debug, serde::Serialize)]
pub(crate) struct CrossReport {
    pub(crate) cross_host: CrossHost,
    pub(crate) report: MoveReport,
}

/// What a source agent writes of a move in flight (`<storage>/moves/<id>/journal.json`, beside
/// the image set), so that an agent started after it died finishes or undoes the move
/// ([`recover`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct MoveJournal {
    pub(crate) migration: MigrationId,
    pub(crate) service: Name,
    pub(crate) to: Name,
    /// Where the clients come back to on a rollback.
    pub(crate) source_addr: SocketAddr,
    pub(crate) server_pid: i32,
    /// The dump was started: criu (a worker that outlives this agent) may have dumped the
    /// server and ended it.
    #[serde(default)]
    pub(crate) dumping: bool,
    /// The server was dumped: it runs no more, its image set is in `set/criu`.
    pub(crate) dumped: bool,
    /// The resume was asked of the target: the service may run there.
    pub(crate) resume_asked: bool,
    /// A post-copy move: its image set holds no memory (a server dumped by it cannot be
    /// restored from it). Absent in older journals: cold.
    #[serde(default)]
    pub(crate) post_copy: bool,
}

/// The journal's file name in the move's folder.
const JOURNAL: &str = "journal.json";

impl MoveJournal {
    fn write(&self, move_dir: &std::path::Path) -> Result<()> {
        secure::write_private(&move_dir.join(JOURNAL), &serde_json::to_vec(self)?)
    }

    /// The journals under `<storage>/moves` (unreadable ones are skipped: their folders are
    /// wiped by the start-up cleanup).
    pub(crate) fn list(storage: &std::path::Path) -> Vec<MoveJournal> {
        let Ok(entries) = std::fs::read_dir(storage.join("moves")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let bytes = std::fs::read(e.path().join(JOURNAL)).ok()?;
                let j: MoveJournal = serde_json::from_slice(&bytes).ok()?;
                (j.migration.to_string() == e.file_name().to_string_lossy()).then_some(j)
            })
            .collect()
    }
}

/// Runs one move of `spec.service` from this host; blocking (run it off the runtime).
pub(crate) fn run(agent: &Arc<Agent>, spec: &MoveSpec) -> Result<(MoveSummary, CrossReport)> {
    if spec.to == agent.config.host {
        bail!("{} is this host", spec.to);
    }
    if !agent.config.allow.contains(&spec.to) {
        warn!(to = %spec.to, "REFUSED move: the target is not on this host's allowlist");
        bail!("host {} is not on this host's allowlist", spec.to);
    }
    if !agent.claim(&spec.service) {
        bail!("service {} is already moving", spec.service);
    }
    if agent.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        agent.release(&spec.service);
        bail!("this host's agent is stopping: no new move starts");
    }
    let result = run_claimed(agent, spec);
    agent.release(&spec.service);
    result
}

fn run_claimed(agent: &Arc<Agent>, spec: &MoveSpec) -> Result<(MoveSummary, CrossReport)> {
    let (pid, container, admin_dir, server_user, source_addr, moves_before) = {
        let services = lock(&agent.services);
        let s = services
            .get(&spec.service)
            .ok_or_else(|| anyhow!("no service {} on this host", spec.service))?;
        (
            s.server_pid,
            s.container(),
            s.paths.admin.clone(),
            s.server_user.clone(),
            s.address,
            s.migrations,
        )
    };
    // Post-copy's preconditions here, before anything is touched (as on one host; the target
    // checks its own when it prepares): the move is refused, not rolled back.
    if spec.memory == Memory::PostCopy
        && let Err(r) = postcopy::refusal(
            pid,
            crate::engine::Transfer::Local,
            std::path::Path::new(postcopy::PIPE_MAX_SIZE),
        )
    {
        warn!(service = %spec.service, "REFUSED post-copy move: {r}");
        bail!("post-copy refused at {}: {r}", agent.config.host);
    }
    let id = engine::random_id()?;
    let moves = agent.storage.join("moves");
    secure::private_dir(&moves)?;
    let images = moves.join(id.to_string());
    secure::private_dir(&images)?;
    let mut machine = migration_core::Migration::new(id, engine::now());
    let mut work = Outbound {
        agent: agent.clone(),
        spec: spec.clone(),
        id,
        token: agent.token_for(id, &spec.to)?,
        admin: AdminDir::open(&admin_dir)?,
        pid,
        src: container,
        server_user,
        moves: moves_before,
        images,
        dump_dir: None,
        dump_as: crate::sys::process_ids(pid)
            .and_then(|(uid, gid)| (uid != 0).then_some(criu::DumpAs { uid, gid })),
        dump_kdat: None,
        dump_worker: None,
        spent_dump_worker: None,
        key: None,
        prepared: false,
        target_addr: None,
        source_addr,
        report: MoveReport::new(
            id,
            (agent.config.host.to_string(), spec.to.to_string()),
            (source_addr, source_addr),
            machine.report(),
        ),
        cross: CrossHost {
            source_host: agent.config.host.to_string(),
            target_host: spec.to.to_string(),
            memory: match spec.memory {
                Memory::Cold => "cold",
                Memory::PostCopy => "post-copy",
            },
            ..CrossHost::default()
        },
        started: Instant::now(),
        completed_at_target: false,
        journal: MoveJournal {
            migration: id,
            service: spec.service.clone(),
            to: spec.to.clone(),
            source_addr,
            server_pid: pid,
            dumping: false,
            dumped: false,
            resume_asked: false,
            post_copy: spec.memory == Memory::PostCopy,
        },
        page_flow: None,
        page_socket: None,
        page_relay: None,
        page_relay_stop: None,
        restored_at: None,
        resume_settled: false,
    };
    info!(%id, service = %spec.service, to = %spec.to, "cross-host migration starts");
    let driven = engine::drive(&mut machine, &spec.policy, &mut work, &engine::now, &|| {
        false
    })?;
    work.report.recovery = driven.recovery;
    work.report.failure = driven.failure;
    if spec.plain_copy_after && machine.phase() == Phase::Completed {
        // Outside the freeze: the service runs at the target already.
        if let Err(e) = work.plain_copy() {
            warn!("the plain copy for comparison failed: {e:#}");
        }
    }
    Ok(work.finish(&machine))
}

struct Outbound {
    agent: Arc<Agent>,
    spec: MoveSpec,
    id: MigrationId,
    token: Vec<u8>,
    admin: AdminDir,
    pid: i32,
    src: Container,
    server_user: Option<String>,
    /// Moves the service made before this one.
    moves: u32,
    images: PathBuf,
    dump_dir: Option<PathBuf>,
    dump_as: Option<criu::DumpAs>,
    dump_kdat: Option<PathBuf>,
    dump_worker: Option<Result<Worker, String>>,
    spent_dump_worker: Option<Worker>,
    key: Option<migration_crypto::Key>,
    /// The target prepared (and must be told to abort on a failure).
    prepared: bool,
    target_addr: Option<SocketAddr>,
    source_addr: SocketAddr,
    report: MoveReport,
    cross: CrossHost,
    started: Instant,
    completed_at_target: bool,
    journal: MoveJournal,
    /// Post-copy: the lazy dump (the source frozen, serving its pages), from the dump until
    /// every page arrived or the move gave up.
    page_flow: Option<postcopy::PageFlow>,
    /// Post-copy: this agent's end of the dump's page socket, until the Pages stream opens.
    page_socket: Option<std::os::unix::net::UnixStream>,
    /// Post-copy: the relay of the Pages stream. Its output holds the dump's page socket
    /// (closing it would make the dump kill the frozen source): dropped after the dump was
    /// stopped or finished.
    page_relay: Option<RelayTask>,
    /// Post-copy: stops the relay with a reset of its stream (see `page_relay::relay_until`).
    page_relay_stop: Option<tokio::sync::oneshot::Sender<()>>,
    restored_at: Option<Instant>,
    /// Post-copy: the target's answer to the resume settled the move even though it failed
    /// (its server was lost), so no recovery is left to decide it.
    resume_settled: bool,
}

/// The source's page relay, and the page socket it keeps open past an error.
type RelayTask = tokio::task::JoinHandle<(
    Result<RelayFigures, RelayError>,
    Option<tokio::net::UnixStream>,
)>;

impl Outbound {
    fn post_copy(&self) -> bool {
        self.spec.memory == Memory::PostCopy
    }

    fn ask(&self, body: PeerBody, limit: Duration) -> Result<PeerReply> {
        let token = if self.spec.fault == Some(MoveFault::ForgedToken) {
            // A token of the right shape made with another key: the target must refuse it.
            let other = migration_crypto::TokenKey::generate()?;
            super::gate::issue(
                &other,
                self.id,
                &self.agent.config.host,
                &self.spec.to,
                now_unix(),
                Duration::from_secs(60),
            )?
            .into_bytes()
        } else if matches!(body, PeerBody::Prepare(_)) {
            self.token.clone()
        } else {
            // A fresh token for each later request of the migration (the target checks it
            // names this migration): a long transfer or restore never outlives its token.
            self.agent.token_for(self.id, &self.spec.to)?
        };
        let request = PeerRequest { token, body };
        let agent = self.agent.clone();
        let to = self.spec.to.clone();
        self.agent
            .runtime
            .block_on(async move { agent.ask(&to, &request, limit).await })
    }

    fn fail_at(&mut self, phase: &str, host: &str) {
        self.cross.failed = Some((phase.to_owned(), host.to_owned()));
    }

    /// An answer that is not the expected one, as an error naming the host.
    fn unexpected(&mut self, phase: &str, reply: PeerReply) -> anyhow::Error {
        match reply {
            PeerReply::Refused(Refusal::Failed {
                phase: p,
                host,
                message,
            }) => {
                self.fail_at(&p, &host);
                anyhow!("{p} failed at {host}: {message}")
            }
            PeerReply::Refused(r) => {
                let to = self.spec.to.to_string();
                self.fail_at(phase, &to);
                anyhow!("{to} refused: {r}")
            }
            other => {
                let to = self.spec.to.to_string();
                self.fail_at(phase, &to);
                anyhow!("{to} answered {other:?}")
            }
        }
    }

    /// Preparing: the target gets ready, then the server tells its clients and parks.
    fn prepare(&mut self) -> Result<Event> {
        // The dump lands in this host's storage first: refuse now rather than mid-dump.
        let image_estimate = sys::resident_bytes(self.pid).unwrap_or(0);
        sys::check_room(&self.images, image_estimate, "the server's dump").inspect_err(|_| {
            let here = self.agent.config.host.to_string();
            self.fail_at("preparing", &here);
        })?;
        let agreement = migration_crypto::KeyAgreement::generate()?;
        let prepare = Prepare {
            migration: self.id,
            service: ServiceSpec {
                name: self.spec.service.clone(),
                server_user: self.server_user.clone(),
                moves: self.moves,
            },
            seal_public: agreement.public_key(),
            server_pid: self.pid,
            phases: self.spec.phases,
            fault: match self.spec.fault {
                Some(MoveFault::Target(f)) => Some(f),
                _ => None,
            },
            image_estimate,
        };
        let body = match self.spec.memory {
            Memory::Cold => PeerBody::Prepare(prepare),
            Memory::PostCopy => PeerBody::PreparePostCopy(prepare),
        };
        // From here on the target may hold something of this migration (even when its answer
        // is lost): a failure tells it to abort, which is harmless if it has nothing. So may
        // an agent started here after this one died: the journal tells it.
        self.journal.write(&self.images)?;
        self.prepared = true;
        let reply = match self.ask(body, PREPARE_LIMIT) {
            Ok(r) => r,
            Err(e) => {
                let to = self.spec.to.to_string();
                self.fail_at("preparing", &to);
                return Err(e);
            }
        };
        let (public, address) = match reply {
            PeerReply::Prepared {
                seal_public,
                address,
            } => (seal_public, address),
            other => return Err(self.unexpected("preparing", other)),
        };
        self.key = Some(
            agreement
                .agree(
                    &public,
                    &seal_context(self.id, &self.agent.config.host, &self.spec.to),
                )
                .map_err(|e| anyhow!("key agreement with {}: {e}", self.spec.to))?,
        );
        // The clients will be sent there: it must be the target host's own address.
        let expected = self.agent.config.peers.get(&self.spec.to).map(|a| a.ip());
        if expected != Some(address.ip()) {
            let to = self.spec.to.to_string();
            self.fail_at("preparing", &to);
            bail!(
                "{to} offered {address} for the service, which is not its address ({expected:?})"
            );
        }
        self.target_addr = Some(address);
        self.report.target_addr = address;
        // The dump's criu worker starts before the clients are told (post-copy's lazy dump
        // is a criu of its own: postcopy::start_dump).
        let (uid, gid) = self.dump_as.map_or((0, 0), |u| (u.uid, u.gid));
        self.dump_kdat = kdat::for_account(uid, gid);
        if !self.post_copy() {
            self.dump_worker = Some(
                criu::dump_worker(&self.src.netns, self.dump_as, self.dump_kdat.as_deref())
                    .map_err(|e| e.to_string()),
            );
        }
        let removed = self.admin.clear()?;
        if !removed.is_empty() {
            warn!(
                ?removed,
                "removed admin files left over from an earlier run"
            );
        }
        let deadline = self.spec.policy.ack_deadline;
        self.report.phases = self.spec.phases;
        self.admin.send_request(&MigrateRequest {
            migration_id: self.id,
            new_addr: address,
            deadline_ms: u64::try_from(deadline.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            phases: self.spec.phases,
            quiesce_deadline_ms: Some(250),
        })?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), Signal::SIGTERM)
            .context("signalling the server")?;
        let announced: Announced = self.admin.wait_event(
            Some(self.id),
            deadline * self.spec.phases.rounds() + ANNOUNCE_SLACK,
        )?;
        info!(
            acked = announced.outcome.acked.len(),
            missing = announced.outcome.missing.len(),
            ms = format_args!("{:.1}", announced.outcome.elapsed_ms),
            "clients told"
        );
        // A move between hosts has no front: plain QUIC clients are cut off. Not a reason to
        // stop: nothing could tell them, and the wrapper-aware clients follow.
        if !announced.outcome.cannot_follow.is_empty() {
            warn!(
                plain = announced.outcome.cannot_follow.len(),
                "plain QUIC clients (no control stream) cannot follow this move"
            );
        }
        self.cross.handshakes_before = Some(announced.handshakes);
        let parked = announced.parked;
        self.report.announce = Some(announced);
        Ok(if parked {
            Event::BeginQuiesce
        } else {
            Event::BeginDump
        })
    }

    /// Dumping: the final dump into this host's private storage, the server's log with it.
    fn dump(&mut self) -> Result<Event> {
        let set = self.images.join("set");
        let dir = set.join("criu");
        secure::private_dir(&set)?;
        secure::private_dir(&dir)?;
        let args = criu::DumpArgs {
            pid: self.pid,
            netns: self.src.netns.clone(),
            dir: dir.clone(),
            parent: None,
            user: self.dump_as,
            kdat: self.dump_kdat.clone(),
        };
        self.journal.dumping = true;
        self.journal.write(&self.images)?;
        let timing = if self.post_copy() {
            self.dump_lazy(&dir).inspect_err(|_| {
                let host = self.agent.config.host.to_string();
                self.fail_at("dumping", &host);
            })?
        } else {
            let worker = self
                .dump_worker
                .take()
                .unwrap_or_else(|| Err("no dump worker was started".to_owned()));
            let (timing, spent) = criu::dump_via_deferred(worker, &args).inspect_err(|_| {
                let host = self.agent.config.host.to_string();
                self.fail_at("dumping", &host);
            })?;
            self.spent_dump_worker = spent;
            timing
        };
        let bytes = sys::dir_size(&dir);
        self.report.dump = Some(timing);
        self.report.image_bytes = Some(bytes);
        // The server's log travels with it: criu reopens it by path and checks its size.
        let files = set.join("files");
        secure::private_dir(&files)?;
        let log = self.admin_log();
        std::fs::copy(&log, files.join("server.log"))
            .with_context(|| format!("copying {}", log.display()))?;
        self.dump_dir = Some(dir);
        self.journal.dumped = true;
        self.journal.write(&self.images)?;
        if self.spec.fault == Some(MoveFault::SourceDiesAfterDump) {
            warn!("FAULT INJECTION: the source's agent dies after the dump");
            let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGKILL);
            std::process::abort();
        }
        Ok(Event::DumpDone {
            image_bytes: Some(bytes),
        })
    }

    /// Post-copy's dump: everything but the memory into `dir`; the source stays frozen, its
    /// page server on a socket pair whose other end this agent keeps for the Pages stream.
    fn dump_lazy(&mut self, dir: &std::path::Path) -> Result<admin_api::CriuTiming> {
        let (ps_dump, ours) =
            std::os::unix::net::UnixStream::pair().context("creating the page socket pair")?;
        let (dump, timing) = postcopy::start_dump(
            self.pid,
            &self.src.netns,
            dir,
            self.dump_as,
            ps_dump,
            Instant::now(),
        )?;
        self.page_flow = Some(postcopy::PageFlow::source_half(dump, dir));
        self.page_socket = Some(ours);
        Ok(timing)
    }

    /// Post-copy, after the image set arrived: the Pages stream. The target starts its
    /// lazy-pages daemon and answers `PagesReady`; the relay then runs in the background
    /// until every page has crossed.
    fn open_pages(&mut self) -> Result<()> {
        // The socket stays ours until the relay has it: on any failure before, `stop_dump`
        // kills the dump first and closes it after (a lazy dump that sees its socket close
        // first kills the frozen source, where a killed dump lets it go on).
        self.page_socket
            .as_ref()
            .context("no page socket")?
            .set_nonblocking(true)
            .context("the page socket (non-blocking)")?;
        let request = PeerRequest {
            token: self.agent.token_for(self.id, &self.spec.to)?,
            body: PeerBody::Pages { migration: self.id },
        };
        let agent = self.agent.clone();
        let to = self.spec.to.clone();
        let opened = self.agent.runtime.block_on(async move {
            let conn = agent.connection(&to).await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            super::daemon::write_frame(&mut send, &request).await?;
            let body = tokio::time::timeout(PAGES_READY_LIMIT, super::daemon::read_body(&mut recv))
                .await
                .map_err(|_| {
                    anyhow!("no answer to the page stream within {PAGES_READY_LIMIT:?}")
                })??;
            let reply: PeerReply = agent_protocol::decode(&body)?;
            anyhow::Ok((reply, send, recv))
        });
        let (reply, mut send, mut recv) = match opened {
            Ok(x) => x,
            Err(e) => {
                let to = self.spec.to.to_string();
                self.fail_at("transferring", &to);
                return Err(e.context("opening the page stream"));
            }
        };
        if reply != PeerReply::PagesReady {
            return Err(self.unexpected("transferring", reply));
        }
        let socket = self.page_socket.take().context("no page socket")?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        self.page_relay_stop = Some(stop);
        self.page_relay = Some(self.agent.runtime.spawn(async move {
            let mut local = match tokio::net::UnixStream::from_std(socket) {
                Ok(l) => l,
                Err(e) => return (Err(RelayError::LocalRead(e)), None),
            };
            // A dropped sender stops it too (the move gave up).
            let stop = async {
                let _ = stopped.await;
            };
            let relayed = page_relay::relay_until(&mut local, &mut send, &mut recv, stop).await;
            (relayed, Some(local))
        }));
        info!("post-copy: the page stream to the target is open");
        Ok(())
    }

    /// Post-copy, after the target said every page arrived: the dump's page server exits
    /// and the relay ends. The target's word decides the move (its lazy-pages daemon exited
    /// 0: the memory is complete there); a source half ending badly afterwards is a warning.
    fn wait_pages(&mut self, resident_after_ms: Option<f64>, pages: Option<u64>) {
        // The target is whole: the source's copy must never run again, whatever its dump
        // does now (a dump killed below, after a hang, would let it go on).
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), Signal::SIGKILL);
        let Some(flow) = self.page_flow.take() else {
            return;
        };
        let mine = flow.wait_resident(self.restored_at.unwrap_or_else(Instant::now));
        let relayed = self.page_relay.take().map(|h| {
            self.agent
                .runtime
                .block_on(async { tokio::time::timeout(RELAY_END_LIMIT, h).await })
        });
        let mut error = mine.error;
        match relayed {
            Some(Ok(Ok((Ok(f), _)))) => {
                self.cross.page_bytes_to_target = Some(f.to_peer);
                self.cross.page_bytes_from_target = Some(f.from_peer);
            }
            Some(Ok(Ok((Err(e), _)))) => error = Some(format!("the page relay failed: {e}")),
            Some(Ok(Err(e))) => error = Some(format!("the page relay panicked: {e}")),
            Some(Err(_)) => {
                error = Some(format!("the page relay did not end in {RELAY_END_LIMIT:?}"))
            }
            None => error = Some("no page relay ran".to_owned()),
        }
        if let Some(e) = &error {
            warn!("post-copy: the target has every page, but here: {e}");
        }
        self.cross.page_source_note = error;
        self.report.post_copy = Some(admin_api::PostCopyReport {
            transport: "agents-quic-stream".to_owned(),
            resident_after_ms,
            pages_transferred: pages,
            bytes_transferred: self.cross.page_bytes_to_target,
            error: None,
        });
    }

    /// Whether the target lists the service as its own (asked once, within the resume's
    /// short limit; no answer counts as no).
    fn target_lists_the_service(&mut self) -> bool {
        match self.ask(PeerBody::Status, RESUME_LIMIT) {
            Ok(PeerReply::Status(s)) => s.services.iter().any(|x| x.name == self.spec.service),
            Ok(other) => {
                warn!("the target's status answered {other:?}");
                false
            }
            Err(e) => {
                warn!("asking the target whether it runs the service: {e:#}");
                false
            }
        }
    }

    /// Post-copy, the resume not answered with every page resident: the restored server at
    /// the target is lost (its memory incomplete; the target killed it, and is told to give
    /// the migration up), the move fails loudly. The engine undoes nothing after a failed
    /// resume, so this does what can be done: the dump is stopped and, when the source's
    /// server runs again (criu unfreezes it when its page server fails, or when the dump is
    /// killed), its clients are sent back to it. The target's answer settled the move: no
    /// recovery is left to decide it.
    fn post_copy_lost(&mut self, e: anyhow::Error) -> anyhow::Error {
        tracing::error!(
            "POST-COPY MOVE FAILED after the restore: the restored server's memory could not \
             all arrive ({e:#}); the target gives it up"
        );
        self.stop_dump();
        self.abort_target();
        let back = match self.post_copy_back() {
            Ok(()) => "the source's server runs again and its clients were sent back".to_owned(),
            Err(b) => format!("{b:#}"),
        };
        self.report.post_copy = Some(admin_api::PostCopyReport {
            transport: "agents-quic-stream".to_owned(),
            resident_after_ms: None,
            pages_transferred: None,
            bytes_transferred: self.cross.page_bytes_to_target,
            error: Some(format!("{e:#}; {back}")),
        });
        self.resume_settled = true;
        e.context(format!(
            "post-copy page transfer failed after the restore; {back}"
        ))
    }

    /// Post-copy: stops the lazy dump (killed: criu lets the frozen source go on), then the
    /// relay (its stream reset, so that the target's daemon does not take it for the pages'
    /// end), then lets the page socket go: in that order, since the dump would kill the frozen
    /// source if it saw its socket close first. Called before the target is told to abort:
    /// the target's daemon, killed, would close its end, and that end would reach the dump.
    fn stop_dump(&mut self) {
        // The relay first (stopped, it resets the stream: the target never takes it for a
        // clean end), keeping the socket it returns; then the dump is killed; the socket is
        // closed last, when the dump can no longer see it close.
        if let Some(stop) = self.page_relay_stop.take() {
            let _ = stop.send(());
        }
        let relay_out = self.page_relay.take().map(|relay| {
            self.agent
                .runtime
                .block_on(async { tokio::time::timeout(RELAY_END_LIMIT, relay).await })
        });
        if let Some(flow) = self.page_flow.take() {
            flow.abort();
        }
        drop(relay_out);
        self.page_socket = None;
    }

    /// Post-copy's way back: the dump is stopped (killed: criu lets the frozen source go on)
    /// and the relay with it; the source's server must run again, its clients come back.
    fn post_copy_back(&mut self) -> Result<()> {
        self.stop_dump();
        let runs = lock(&self.agent.services)
            .get(&self.spec.service)
            .is_some_and(super::service::Service::server_runs);
        if !runs {
            tracing::error!(
                "POST-COPY: the source's server (PID {}) did not survive the stopped dump; the \
                 service is lost",
                self.pid
            );
            bail!(
                "post-copy: the source's server (PID {}) does not run after the stopped dump",
                self.pid
            );
        }
        self.send_back()
    }

    fn admin_log(&self) -> PathBuf {
        lock(&self.agent.services)
            .get(&self.spec.service)
            .map(|s| s.paths.log.clone())
            .unwrap_or_default()
    }

    /// Transferring: the image set, sealed with the agreed key, to the target, which
    /// verifies it before answering.
    fn transfer(&mut self) -> Result<Event> {
        // Post-copy: the source stays frozen (its memory is served from it) until every page
        // crossed; criu ends it then.
        if !self.post_copy() {
            sys::reap(self.pid, REAP_LIMIT)?;
        }
        let set = self.images.join("set");
        let key = self.key.clone().context("no agreed key")?;
        let request = PeerRequest {
            token: self.agent.token_for(self.id, &self.spec.to)?,
            body: PeerBody::Receive { migration: self.id },
        };
        let cfg = crate::image_stream::StreamConfig {
            corrupt_at: (self.spec.fault == Some(MoveFault::CorruptChunk)).then_some(4096),
            ..Default::default()
        };
        let cut = self.spec.fault == Some(MoveFault::CutLinkDuringTransfer);
        let agent = self.agent.clone();
        let to = self.spec.to.clone();
        let started = Instant::now();
        let sent = self.agent.runtime.block_on(async move {
            let conn = agent.connection(&to).await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            super::daemon::write_frame(&mut send, &request).await?;
            if cut {
                // The link goes down in the middle of the stream.
                let c = conn.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    warn!("FAULT INJECTION: the link to the target is cut during the transfer");
                    c.close(quinn::VarInt::from_u32(9), b"link cut");
                });
            }
            let send_stats = tokio::time::timeout(
                TRANSFER_LIMIT,
                crate::image_stream::send_image_set(&set, &key, send, &cfg),
            )
            .await
            .map_err(|_| anyhow!("the transfer took longer than {TRANSFER_LIMIT:?}"))?
            .map_err(|e| anyhow!(e))?;
            let body = tokio::time::timeout(TRANSFER_LIMIT, super::daemon::read_body(&mut recv))
                .await
                .map_err(|_| anyhow!("no answer to the transfer"))??;
            let reply: PeerReply = agent_protocol::decode(&body)?;
            if cut {
                agent.forget(&to).await;
            }
            anyhow::Ok((send_stats, reply))
        });
        let (send_stats, reply) = match sent {
            Ok(x) => x,
            Err(e) => {
                let to = self.spec.to.to_string();
                self.fail_at("transferring", &to);
                let agent = self.agent.clone();
                let to = self.spec.to.clone();
                self.agent
                    .runtime
                    .block_on(async move { agent.forget(&to).await });
                return Err(e.context("sending the image set"));
            }
        };
        self.cross.send_ms = Some(send_stats.wall.as_secs_f64() * 1e3);
        match reply {
            PeerReply::Received(f) => {
                self.cross.raw_bytes = f.raw_bytes;
                self.cross.compressed_bytes = f.compressed_bytes;
                self.cross.sealed_bytes = f.sealed_bytes;
                self.cross.transfer_ms = Some(started.elapsed().as_secs_f64() * 1e3);
                self.report.transfer = Some(TransferStats {
                    bytes: f.raw_bytes,
                    wire_bytes: f.sealed_bytes,
                    files: f.files,
                    ms: started.elapsed().as_secs_f64() * 1e3,
                    compressed_bytes: Some(f.compressed_bytes),
                    chunks: None,
                    first_byte_ms: None,
                });
                if self.post_copy() {
                    self.open_pages()?;
                }
                Ok(Event::TransferDone)
            }
            other => Err(self.unexpected("transferring", other)),
        }
    }

    /// Restoring: the target restores. When its agent does not answer (it died, or the link
    /// went), the target may still have restored the server: its agent is asked again for a
    /// while, since an agent started anew there answers for a server restored before (and
    /// the move completes there); only then does the move roll back.
    fn restore(&mut self) -> Result<Event> {
        let mut deadline: Option<Instant> = None;
        loop {
            let reply = self.ask(PeerBody::Restore { migration: self.id }, RESTORE_LIMIT);
            match reply {
                Ok(PeerReply::Restored { pid, restore, .. }) => {
                    info!(pid, "restored at the target");
                    self.restored_at = Some(Instant::now());
                    self.report.restore = Some(restore);
                    return Ok(Event::RestoreDone);
                }
                Ok(other) => return Err(self.unexpected("restoring", other)),
                Err(e)
                    if *deadline.get_or_insert_with(|| Instant::now() + TARGET_RETURN_LIMIT)
                        > Instant::now() =>
                {
                    warn!(
                        "the target's agent did not answer the restore ({e:#}); asking again \
                         until {TARGET_RETURN_LIMIT:?} have passed"
                    );
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => {
                    let to = self.spec.to.to_string();
                    self.fail_at("restoring", &to);
                    return Err(e);
                }
            }
        }
    }

    fn resume(&mut self) -> Result<Event> {
        self.journal.resume_asked = true;
        self.journal.write(&self.images)?;
        // Post-copy: the target answers once every page arrived.
        let limit = if self.post_copy() {
            RESUME_LIMIT + postcopy::RESIDENT_LIMIT
        } else {
            RESUME_LIMIT
        };
        match self.ask(PeerBody::Resume { migration: self.id }, limit) {
            Ok(PeerReply::Resumed {
                clients,
                handshakes,
            }) if !self.post_copy() => {
                info!(clients, handshakes, "the service runs at the target");
                self.cross.handshakes_after = Some(handshakes);
                self.completed_at_target = true;
            }
            Ok(PeerReply::ResumedResident {
                clients,
                handshakes,
                resident_after_ms,
                pages,
            }) if self.post_copy() => {
                info!(
                    clients,
                    handshakes,
                    resident_after_ms,
                    pages,
                    "the service runs at the target, every page resident"
                );
                self.cross.handshakes_after = Some(handshakes);
                self.completed_at_target = true;
                self.wait_pages(Some(resident_after_ms), pages);
            }
            Ok(other) => {
                let e = self.unexpected("resuming", other);
                if self.post_copy() {
                    return Err(self.post_copy_lost(e));
                }
                return Err(e);
            }
            Err(e) if self.post_copy() && self.target_lists_the_service() => {
                // The answer was lost, not the move: the target's daemon had every page (it
                // registers the service only then). Completed; its figures are unknown here.
                warn!(
                    "post-copy: no answer to the resume ({e:#}), but the target runs the \
                     service: completed"
                );
                self.completed_at_target = true;
                self.wait_pages(None, None);
            }
            Err(e) => {
                let to = self.spec.to.to_string();
                self.fail_at("resuming", &to);
                if self.post_copy() {
                    return Err(self.post_copy_lost(e));
                }
                return Err(e);
            }
        }
        let target = self.target_addr.context("no target address")?;
        let source = engine::probe(self.source_addr);
        let answered = engine::probe(target);
        self.report.source_probe = Some(source);
        self.report.target_probe = Some(answered);
        if source == PortProbe::Answered {
            bail!(
                "the source's address {} still answers QUIC",
                self.source_addr
            );
        }
        if answered != PortProbe::Answered {
            bail!("the target's address {target} does not answer QUIC ({answered:?})");
        }
        Ok(Event::ResumeDone)
    }

    /// The benchmark's baseline: the same image set, plainly, over the same link.
    fn plain_copy(&mut self) -> Result<()> {
        let set = self.images.join("set");
        let request = PeerRequest {
            token: self.agent.token_for(self.id, &self.spec.to)?,
            body: PeerBody::PlainCopy { migration: self.id },
        };
        let agent = self.agent.clone();
        let to = self.spec.to.clone();
        let (reply, ms) = self.agent.runtime.block_on(async move {
            let conn = agent.connection(&to).await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            super::daemon::write_frame(&mut send, &request).await?;
            let started = Instant::now();
            crate::image_stream::measure::plain_send(&set, send)
                .await
                .map_err(|e| anyhow!(e))?;
            let body = tokio::time::timeout(TRANSFER_LIMIT, super::daemon::read_body(&mut recv))
                .await
                .map_err(|_| anyhow!("no answer to the plain copy"))??;
            let ms = started.elapsed().as_secs_f64() * 1e3;
            anyhow::Ok((agent_protocol::decode::<PeerReply>(&body)?, ms))
        })?;
        match reply {
            PeerReply::Received(f) => {
                self.cross.plain_copy_ms = Some(ms);
                self.cross.plain_copy_bytes = Some(f.raw_bytes);
                Ok(())
            }
            other => bail!("the target answered {other:?} to the plain copy"),
        }
    }

    /// Tells the target to undo what it did (best effort; said in the report).
    fn abort_target(&mut self) {
        if !self.prepared {
            return;
        }
        match self.ask(PeerBody::Abort { migration: self.id }, ABORT_LIMIT) {
            Ok(PeerReply::Aborted { undone }) => {
                info!("the target undid: {undone}");
                self.cross.target_undo = Some(undone);
            }
            Ok(other) => {
                warn!("the target answered {other:?} to the abort");
                self.cross.target_undo = Some(format!("answered {other:?}"));
            }
            Err(e) => {
                warn!("the target could not be told to abort: {e:#}");
                self.cross.target_undo = Some(format!("not reached: {e:#}"));
            }
        }
        self.prepared = false;
    }

    fn send_back(&mut self) -> Result<()> {
        let aborted = engine::ask_abort(
            &self.admin,
            self.pid,
            self.id,
            self.source_addr,
            self.spec.policy.ack_deadline,
        )?;
        self.report.aborted = Some(aborted);
        Ok(())
    }

    fn finish(mut self, machine: &migration_core::Migration) -> (MoveSummary, CrossReport) {
        // Post-copy pages still pinned in a dump nobody took back (a failure the engine's
        // recovery did not reach): stopped, so that the source goes on.
        if self.page_flow.is_some() || self.page_relay.is_some() {
            warn!("post-copy: stopping a lazy dump left at the end of the move");
            self.stop_dump();
        }
        drop(self.dump_worker.take());
        drop(self.spent_dump_worker.take());
        // The target resumed the service (its answer came) even if a check after it failed:
        // the service is the target's, whatever the result says.
        let completed = machine.phase() == Phase::Completed || self.completed_at_target;
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
        // The resume was asked but no answer settled the move: the target may run the
        // service, or may not. The journal and the image set stay, and the recovery an agent
        // started anew would run decides it now (the target's status, else a rollback here).
        let undecided =
            self.journal.resume_asked && !self.resume_settled && !completed && !rolled_back;
        if undecided {
            let svc = lock(&self.agent.services).get(&self.spec.service).cloned();
            match svc {
                Some(svc) => {
                    warn!("the resume's outcome is unknown: handing the move to the recovery");
                    super::recovery::recover_all(&self.agent, vec![(self.journal.clone(), svc)]);
                    // recover_all released the name; the caller releases it again (harmless).
                    self.cross.target_undo = Some("handed to the recovery (see status)".into());
                }
                None => warn!("the resume's outcome is unknown and the service record is gone"),
            }
        } else if let Err(e) = super::service::wipe_dir(&self.images) {
            warn!("wiping the image set: {e:#}");
        }
        self.report.images_dir = None;
        self.report.wall_ms = self.started.elapsed().as_secs_f64() * 1e3;
        self.report.timeline = machine.report();
        if completed {
            // The service is the target's now: its slot, supervisor and folder here go.
            let gone = lock(&self.agent.services).remove(&self.spec.service);
            if let Some(s) = gone
                && let Err(e) = super::service::tear_down(&s.paths, &s.slot, None)
            {
                warn!("removing the moved service's slot here: {e:#}");
            }
        } else if undecided {
            // The recovery recorded where the service is.
        } else if let Some(s) = lock(&self.agent.services).get_mut(&self.spec.service) {
            // After a rollback by restore the PID is the same (criu restores it).
            s.server_pid = self.pid;
            if let Err(e) = s.save() {
                warn!("recording the service: {e:#}");
            }
        }
        if let Some(s) = lock(&self.agent.services).get_mut(&self.spec.service) {
            s.clients = self
                .report
                .announce
                .as_ref()
                .map(|a| u32::try_from(a.outcome.acked.len()).unwrap_or(u32::MAX));
        }
        let summary = MoveSummary {
            migration: self.id,
            service: self.spec.service.clone(),
            from: self.agent.config.host.clone(),
            to: self.spec.to.clone(),
            outcome: match self.report.result {
                MoveResult::Completed => Outcome::Completed,
                MoveResult::RolledBack => Outcome::RolledBack,
                _ => Outcome::Failed,
            },
            failed: if completed {
                None
            } else {
                self.cross.failed.clone()
            },
            freeze_ms: self
                .report
                .timeline
                .freeze_time
                .map(|d| d.as_secs_f64() * 1e3),
            started_unix: now_unix(),
        };
        self.agent.record(summary.clone());
        self.agent.count_services();
        let announce = self.report.announce.as_ref();
        self.agent
            .metrics
            .record_migration(&crate::metrics::MigrationOutcome {
                result: match self.report.result {
                    MoveResult::Completed => crate::metrics::MigrationResult::Completed,
                    MoveResult::RolledBack => crate::metrics::MigrationResult::RolledBack,
                    _ => crate::metrics::MigrationResult::Failed,
                },
                role: crate::metrics::Role::Source,
                freeze: self.report.timeline.freeze_time,
                transfer: self
                    .cross
                    .transfer_ms
                    .map(|ms| Duration::from_secs_f64(ms / 1e3)),
                bytes: crate::metrics::TransferBytes {
                    raw: self.cross.raw_bytes,
                    compressed: self.cross.compressed_bytes,
                    sealed: self.cross.sealed_bytes,
                },
                clients_acked: announce.map_or(0, |a| a.outcome.acked.len() as u64),
                clients_missing: announce.map_or(0, |a| a.outcome.missing.len() as u64),
                rollback_phase: machine.failure().map(|f| f.phase),
            });
        if !completed {
            // Rolled back: the server runs here again, and its clients report here (after a
            // completed move the target's agent collects them).
            super::daemon::record_downtimes_later(
                self.agent.metrics.clone(),
                self.admin.clone(),
                self.id,
                crate::engine::clients_told(&self.report),
            );
        }
        (
            summary,
            CrossReport {
                cross_host: self.cross,
                report: self.report,
            },
        )
    }
}

impl Work for Outbound {
    fn run(&mut self, phase: Phase, _step: &mut dyn FnMut(Event) -> Result<()>) -> Result<Event> {
        match phase {
            Phase::Preparing => self.prepare(),
            Phase::Quiescing => Ok(Event::BeginDump),
            Phase::Dumping => self.dump(),
            Phase::Transferring => self.transfer(),
            Phase::Restoring => self.restore(),
            Phase::Resuming => self.resume(),
            other => bail!("engine bug: no work for phase {other}"),
        }
    }

    fn resume_source(&mut self) -> Result<()> {
        if self.post_copy() {
            // A lazy dump that started keeps the source frozen until it is stopped; stopped
            // before the target's abort (see `stop_dump`).
            self.stop_dump();
            self.abort_target();
            return self.post_copy_back();
        }
        self.abort_target();
        self.send_back()
    }

    fn restore_on_source(&mut self) -> Result<()> {
        if self.post_copy() {
            // No memory in the image set here: the source itself runs on instead. The dump is
            // stopped before the target's abort (see `stop_dump`); a server the target
            // restored is parked (its clients were not told) and is killed by the abort.
            self.stop_dump();
            self.abort_target();
            return self.post_copy_back();
        }
        // The target first: no second copy may run there once the source runs again.
        self.abort_target();
        let dir = self
            .dump_dir
            .clone()
            .context("no image set to restore at the source")?;
        sys::reap(self.pid, REAP_LIMIT)?;
        let socket = lock(&self.agent.services)
            .get(&self.spec.service)
            .map(|s| s.paths.socket.clone())
            .context("the service's supervisor is gone")?;
        let (pid, timing) =
            engine::restore_via_supervisor(&socket, &self.src.netns, &dir, "rollback-restore.log")
                .context("restoring the server at the source again")?;
        self.pid = pid;
        self.report.rollback_restore = Some(timing);
        let placement = engine::observe_placement(pid, &self.src)?;
        if !placement.is_right() {
            bail!("the server restored for the rollback is not in the source's slot");
        }
        self.send_back()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_journals_in_their_own_folder_are_listed() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(MoveJournal::list(tmp.path()).is_empty());
        let moves = tmp.path().join("moves");
        let id = MigrationId::from_bytes([7; 16]);
        let j = MoveJournal {
            migration: id,
            service: Name::new("edge").unwrap(),
            to: Name::new("b").unwrap(),
            source_addr: "10.0.0.1:4300".parse().unwrap(),
            server_pid: 99,
            dumping: true,
            dumped: true,
            resume_asked: false,
            post_copy: false,
        };
        std::fs::create_dir_all(moves.join(id.to_string())).unwrap();
        j.write(&moves.join(id.to_string())).unwrap();
        // Garbage, a journal in another migration's folder, a folder without a journal.
        let garbage = moves.join(MigrationId::from_bytes([1; 16]).to_string());
        std::fs::create_dir_all(&garbage).unwrap();
        std::fs::write(garbage.join(JOURNAL), b"\x00\x01{").unwrap();
        let misplaced = moves.join(MigrationId::from_bytes([2; 16]).to_string());
        std::fs::create_dir_all(&misplaced).unwrap();
        j.write(&misplaced).unwrap();
        std::fs::create_dir_all(moves.join("empty")).unwrap();
        assert_eq!(MoveJournal::list(tmp.path()), vec![j]);
    }
}
