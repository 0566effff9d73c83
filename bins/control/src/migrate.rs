//! One migration: announce, (pre-)dump, transfer, restore, renew the socket; rollback when a
//! step fails. The phases are driven through migration-core's state machine, whose timeline
//! gives the report.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use migration_core::{Event, Migration, MigrationId, PreDumpDecision, PreDumpPolicy, Timestamp};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::MigrateArgs;
use crate::criu;
use crate::state::State;
use crate::sys;

/// How the image set reaches the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Transfer {
    /// Same host: restore from the directory it was dumped into.
    Local,
    /// Through migration-wire: chunked, zstd level 1, sealed with AES-256-GCM, reassembled.
    Sealed,
}

fn now() -> Timestamp {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    Timestamp::from_micros(micros)
}

fn random_id() -> Result<MigrationId> {
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Drives the machine, logging an event it refuses (a bug in this file, not a runtime
/// condition: the flow below only sends events valid in the phase it is in).
fn step(m: &mut Migration, e: Event) {
    let kind = e.kind();
    if let Err(err) = m.on_event(e, now()) {
        warn!("state machine refused {kind:?}: {err}");
    }
}

/// Waits for the server's `name.json`; an `error` in it is an error here.
fn server_event(admin: &Path, name: &str, limit: Duration) -> Result<Value> {
    let v = crate::wait_event(admin, name, limit)?;
    if let Some(e) = v.get("error") {
        bail!("the server reported: {e}");
    }
    Ok(v)
}

/// Ends the migration as failed (nothing to roll back).
fn fail(report: Value, m: &mut Migration, t0: Instant, reason: String) -> Value {
    step(
        m,
        Event::Fail {
            reason: reason.clone(),
        },
    );
    finish(report, m, t0, "failed", Some(reason))
}

/// What went wrong, and how the rollback went.
struct Failed {
    phase: &'static str,
    error: anyhow::Error,
}

pub(crate) fn migrate(state_dir: &Path, state: &mut State, args: &MigrateArgs) -> Result<Value> {
    let from = state.side;
    let to = from.other();
    let src = state.container(from).clone();
    let dst = state.container(to).clone();
    // Checks before anything is touched.
    if !crate::podman::is_running(&dst.name) {
        bail!(
            "container {} ({to}) is not running; the server in {} stays where it is",
            dst.name,
            src.name
        );
    }
    if !sys::process_runs(state.server_pid, "swrapper") {
        bail!(
            "the server (PID {}) is not running; see {} (or `control down` and `control up`)",
            state.server_pid,
            state.server_log.display()
        );
    }
    crate::check_images_dir(&state.images_dir)?;

    let id = random_id()?;
    let mut m = Migration::new(id, now());
    let images = state.images_dir.join(id.to_string());
    std::fs::create_dir_all(&images).with_context(|| format!("creating {}", images.display()))?;
    let target_addr = SocketAddr::from(([127, 0, 0, 1], dst.host_port));
    let fallback_addr = SocketAddr::from(([127, 0, 0, 1], src.host_port));
    let admin = &state.admin_dir;
    let t0 = Instant::now();
    info!(%id, from = %src.name, to = %dst.name, "migration starts");

    let mut report = json!({
        "migration_id": id.to_string(),
        "from": src.name,
        "to": dst.name,
        "target_addr": target_addr,
        "images_dir": images,
    });

    // Asked before the clients are told: criu's start-up costs tens of milliseconds, which
    // must not fall between the server parking and the dump.
    let dirty = criu::dirty_tracking_supported().unwrap_or(false);

    // 1. Announce: the server tells every client and waits for the acks, then parks.
    std::fs::write(
        admin.join("abort.json"),
        json!({ "fallback_addr": fallback_addr }).to_string(),
    )?;
    std::fs::write(
        admin.join("migrate.json"),
        json!({ "new_addr": target_addr, "migration_id": id, "deadline_ms": args.ack_deadline_ms })
            .to_string(),
    )?;
    step(&mut m, Event::Start);
    signal(state.server_pid, Signal::SIGTERM)?;
    let limit = Duration::from_millis(args.ack_deadline_ms) + Duration::from_secs(5);
    let announce = match server_event(admin, "announce", limit) {
        Ok(a) => a,
        Err(e) => return Ok(fail(report, &mut m, t0, format!("announce: {e:#}"))),
    };
    info!(
        acked = announce["acked"].as_array().map_or(0, Vec::len),
        missing = announce["missing"].as_array().map_or(0, Vec::len),
        ms = announce["elapsed_ms"].as_f64().unwrap_or(0.0),
        "clients told"
    );
    report["announce"] = announce.clone();
    if announce["parked"] == true {
        step(&mut m, Event::BeginQuiesce);
    }

    // 2. Pre-dump rounds, when the kernel can track dirty memory.
    let policy = PreDumpPolicy {
        max_rounds: args.predump_rounds,
        ..PreDumpPolicy::default()
    };
    step(&mut m, Event::BeginDump);
    let mut parent: Option<String> = None;
    let mut rounds = Vec::new();
    let (mut last, mut prev) = (None, None);
    loop {
        match policy.next_step(rounds.len() as u32, last, prev, dirty) {
            PreDumpDecision::Another => {}
            PreDumpDecision::FinalDump(reason) => {
                info!(?reason, rounds = rounds.len(), "final dump");
                report["predump_stop"] = json!(format!("{reason:?}"));
                break;
            }
        }
        let dir = images.join(format!("pre{}", rounds.len()));
        std::fs::create_dir_all(&dir)?;
        match criu::pre_dump(state.server_pid, &src.netns, &dir, parent.as_deref()) {
            Ok(t) => {
                let bytes = sys::dir_size(&dir);
                step(&mut m, Event::PreDumpRound { image_bytes: bytes });
                rounds.push(json!({ "bytes": bytes, "criu": t }));
                prev = last;
                last = Some(bytes);
                parent = Some(format!("../pre{}", rounds.len() - 1));
            }
            Err(e) => {
                warn!("pre-dump failed, going on with a full dump: {e:#}");
                parent = None;
                break;
            }
        }
    }
    report["predump_rounds"] = json!(rounds);
    if !dirty {
        info!(
            "the kernel does not track dirty memory (criu check --feature mem_dirty_track): no pre-dump, the final dump copies everything"
        );
        report["dirty_tracking"] = json!(false);
    }

    // 3. Final dump: the process is frozen, written out and killed.
    let dump_dir = images.join("final");
    if args.fail_dump {
        // Fault injection: criu cannot write its images into a regular file.
        warn!("fault injection: the dump will fail");
        std::fs::write(&dump_dir, b"")?;
    } else {
        std::fs::create_dir_all(&dump_dir)?;
    }
    let dump = criu::dump(
        state.server_pid,
        &src.netns,
        &dump_dir,
        parent
            .map(|p| format!("../{}", p.trim_start_matches("../")))
            .as_deref(),
    );
    let dump = match dump {
        Ok(t) => t,
        Err(e) => {
            // A failed dump leaves the process running: unpark it and send the clients back.
            let f = Failed {
                phase: "dump",
                error: e,
            };
            return Ok(rollback(report, &mut m, t0, state, f, None, fallback_addr));
        }
    };
    let image_bytes = sys::dir_size(&dump_dir);
    step(
        &mut m,
        Event::DumpDone {
            image_bytes: Some(image_bytes),
        },
    );
    report["dump"] = json!(dump);
    report["image_bytes"] = json!(image_bytes);
    // "Stop A": the source process must be gone, its PID free for the restore (which brings
    // the process back under the same PID), before anything else happens.
    if let Err(e) = sys::reap(state.server_pid, Duration::from_secs(5)) {
        let f = Failed {
            phase: "dump",
            error: e,
        };
        return Ok(rollback(
            report,
            &mut m,
            t0,
            state,
            f,
            Some(&dump_dir),
            fallback_addr,
        ));
    }

    // 4. Transfer.
    let restore_dir = match args.transfer {
        Transfer::Local => dump_dir.clone(),
        Transfer::Sealed => match transfer_sealed(&dump_dir, &images.join("transferred")) {
            Ok((dir, t)) => {
                report["transfer"] = t;
                dir
            }
            Err(e) => {
                let f = Failed {
                    phase: "transfer",
                    error: e,
                };
                return Ok(rollback(
                    report,
                    &mut m,
                    t0,
                    state,
                    f,
                    Some(&dump_dir),
                    fallback_addr,
                ));
            }
        },
    };
    step(&mut m, Event::TransferDone);

    // 5. Restore in the target's network namespace.
    let hidden = if args.fail_restore {
        Some(hide_pstree(&restore_dir)?)
    } else {
        None
    };
    let restored = criu::restore(&dst.netns, &restore_dir, "restore.log");
    if let Some(h) = &hidden {
        std::fs::rename(h, restore_dir.join("pstree.img")).context("putting pstree.img back")?;
    }
    let (pid, restore) = match restored {
        Ok(x) => x,
        Err(e) => {
            let f = Failed {
                phase: "restore",
                error: e,
            };
            return Ok(rollback(
                report,
                &mut m,
                t0,
                state,
                f,
                Some(&restore_dir),
                fallback_addr,
            ));
        }
    };
    step(&mut m, Event::RestoreDone);
    report["restore"] = json!(restore);
    state.server_pid = pid;
    state.side = to;
    state.save(state_dir)?;

    // 6. The restored server renews its socket in the new namespace and tells the clients.
    signal(pid, Signal::SIGUSR2)?;
    match server_event(admin, "resumed", Duration::from_secs(5)) {
        Ok(r) => {
            report["resumed"] = r;
            step(&mut m, Event::ResumeDone);
        }
        Err(e) => return Ok(fail(report, &mut m, t0, format!("resume: {e:#}"))),
    }
    state.migrations += 1;
    state.save(state_dir)?;
    if args.keep_images {
        if let Some(kept) = keep(&images) {
            report["images_dir"] = json!(kept);
        }
    } else {
        std::fs::remove_dir_all(&images).ok();
    }
    Ok(finish(report, &m, t0, "completed", None))
}

/// Moves `pstree.img` aside so that a restore fails (fault injection); returns where it went.
fn hide_pstree(dir: &Path) -> Result<PathBuf> {
    let from = dir.join("pstree.img");
    let to = dir.join("pstree.img.hidden");
    std::fs::rename(&from, &to).with_context(|| format!("hiding {}", from.display()))?;
    warn!("fault injection: the restore in the target will fail");
    Ok(to)
}

/// Rolls back after `failed`: the server runs on the source again (a failed dump left it
/// running; after a dump, it is restored in the source's namespace from `images`), unparks,
/// and tells the clients to swap back.
fn rollback(
    mut report: Value,
    m: &mut Migration,
    t0: Instant,
    state: &mut State,
    failed: Failed,
    images: Option<&Path>,
    fallback: SocketAddr,
) -> Value {
    let reason = format!("{} failed: {:#}", failed.phase, failed.error);
    warn!("{reason}; rolling back");
    step(
        m,
        Event::RollBack {
            reason: reason.clone(),
        },
    );
    let src = state.container(state.side).clone();
    let outcome = (|| -> Result<Value> {
        if let Some(dir) = images {
            let (pid, t) = criu::restore(&src.netns, dir, "rollback-restore.log")
                .context("restoring the server in the source again")?;
            state.server_pid = pid;
            report["rollback_restore"] = json!(t);
        }
        signal(state.server_pid, Signal::SIGUSR1)?;
        server_event(&state.admin_dir, "aborted", Duration::from_secs(5))
    })();
    match outcome {
        Ok(aborted) => {
            info!(%fallback, "rolled back: the server serves from the source again");
            report["aborted"] = aborted;
            step(m, Event::RollbackSucceeded);
            finish(report, m, t0, "rolled_back", Some(reason))
        }
        Err(e) => {
            let msg = format!("{reason}; rollback failed too: {e:#}");
            warn!("{msg}");
            step(
                m,
                Event::RollbackFailed {
                    reason: format!("{e:#}"),
                },
            );
            finish(report, m, t0, "failed", Some(msg))
        }
    }
}

/// Streams the image set through migration-wire (zstd, sealed) into `dest`, as between hosts.
fn transfer_sealed(src: &Path, dest: &Path) -> Result<(PathBuf, Value)> {
    use migration_wire::{
        ChunkError, Chunker, ChunkerConfig, ReassembleError, Reassembler, ReassemblerConfig,
    };
    use std::io::{BufReader, BufWriter, Write};

    /// Counts the bytes handed to the receiver.
    struct Counted<W> {
        inner: W,
        bytes: u64,
    }
    impl<W: Write> Write for Counted<W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.bytes += n as u64;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }

    const BUF: usize = 256 << 10;
    let start = Instant::now();
    let key = migration_crypto::Key::generate()?;
    let chunker = Chunker::new(
        src,
        ChunkerConfig {
            chunk_size: 1 << 20,
            compression: migration_wire::compress::Compression::Zstd { level: 1 },
            sealer: Some(migration_crypto::Sealer::new(&key)?),
        },
    )?;
    let reassembler = Reassembler::new(
        dest,
        ReassemblerConfig {
            opener: Some(migration_crypto::Opener::new(&key)),
            max_chunk: 1 << 20,
            max_total_bytes: Some(16 << 30),
        },
    )?;
    // Sender and receiver run at once, joined by a pipe as a socket would join two hosts:
    // memory stays a few chunks, and the transfer takes about as long as its slowest stage
    // instead of the sum of both sides. `write_to` reads, compresses and writes on three
    // threads; whichever side stops drops its end of the pipe, so the other one ends too.
    let (reader, writer) = std::io::pipe().context("creating the transfer pipe")?;
    let (sent, received) = std::thread::scope(|s| {
        let sender = s.spawn(move || {
            let mut w = Counted {
                inner: BufWriter::with_capacity(BUF, writer),
                bytes: 0,
            };
            chunker.write_to(&mut w).map(|summary| (summary, w.bytes))
        });
        let received = reassembler.read_from(BufReader::with_capacity(BUF, reader));
        (sender.join(), received)
    });
    let sent = sent.map_err(|_| anyhow::anyhow!("the sending thread panicked"))?;
    let (summary, wire_bytes) = match (sent, received) {
        (Ok((summary, wire_bytes)), Ok(_)) => (summary, wire_bytes),
        // The receiver stopped first: the sender only saw the pipe close.
        (Err(ChunkError::Write(_)), Err(e)) if !matches!(e, ReassembleError::Truncated) => {
            return Err(e).context("receiving the image set");
        }
        // The sender stopped first: the receiver only saw the stream end early.
        (Err(e), _) => return Err(e).context("sending the image set"),
        (Ok(_), Err(e)) => return Err(e).context("receiving the image set"),
    };
    let took = start.elapsed();
    info!(
        bytes = summary.bytes,
        wire_bytes,
        ms = format_args!("{:.1}", ms(took)),
        "image set transferred (sealed)"
    );
    Ok((
        dest.to_path_buf(),
        json!({ "bytes": summary.bytes, "wire_bytes": wire_bytes, "files": summary.files, "ms": ms(took) }),
    ))
}

/// Keeps an image set for inspection under a name that later migrations accept.
fn keep(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_string_lossy().into_owned();
    let kept = images.with_file_name(format!("{}{name}", crate::KEPT_PREFIX));
    std::fs::rename(images, &kept).ok().map(|()| kept)
}

fn finish(
    mut report: Value,
    m: &Migration,
    t0: Instant,
    result: &str,
    failure: Option<String>,
) -> Value {
    if result != "completed"
        && let Some(dir) = report["images_dir"].as_str().map(PathBuf::from)
        && let Some(kept) = keep(&dir)
    {
        report["images_dir"] = json!(kept);
    }
    report["result"] = json!(result);
    report["failure"] = json!(failure);
    report["wall_ms"] = json!(ms(t0.elapsed()));
    report["timeline"] = serde_json::to_value(m.report()).unwrap_or(Value::Null);
    report
}

/// Prints the readable summary of one migration.
pub(crate) fn print_summary(r: &Value) {
    let us = |v: &Value| v.as_u64().map(|u| u as f64 / 1e3);
    let t = &r["timeline"];
    println!(
        "migration {} {} -> {}: {}",
        r["migration_id"].as_str().unwrap_or("?"),
        r["from"].as_str().unwrap_or("?"),
        r["to"].as_str().unwrap_or("?"),
        r["result"].as_str().unwrap_or("?")
    );
    if let Some(f) = r["failure"].as_str() {
        println!("  failure: {f}");
    }
    println!(
        "  announce {:.1} ms, freeze {} ms (dump {} ms, restore {} ms), image set {} KiB",
        r["announce"]["elapsed_ms"].as_f64().unwrap_or(f64::NAN),
        us(&t["freeze_time_us"]).map_or("?".into(), |v| format!("{v:.1}")),
        r["dump"]["wall_ms"]
            .as_f64()
            .map_or("?".into(), |v| format!("{v:.1}")),
        r["restore"]["wall_ms"]
            .as_f64()
            .map_or("?".into(), |v| format!("{v:.1}")),
        r["image_bytes"]
            .as_u64()
            .map_or("?".into(), |b| (b / 1024).to_string()),
    );
    if let (Some(a), Some(b)) = (
        r["dump"]["startup_ms"].as_f64(),
        r["restore"]["startup_ms"].as_f64(),
    ) {
        println!("  criu start-up: dump {a:.1} ms, restore {b:.1} ms");
    }
}
