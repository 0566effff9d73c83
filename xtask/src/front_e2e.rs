//! e2e-migrate's stable-address scenario (`control up --front`): clients in a network
//! namespace of their own reach the service at one front address for its whole life; the
//! server moves A -> B -> A ... behind it with CRIU, the front switched at each freeze, with
//! the datagrams held (and, for comparison, without holding).
//!
//! ```text
//!  netns qlm-e2e-fc (10.235.0.2) ──veth──► host 10.235.0.1:5300 (front, nftables NAT)
//!                                                │ ──► container A 10.88.x.y:4242
//!                                                └──► container B (after a move)
//! ```
//!
//! Checked: every move completes; the client keeps its one connection (one handshake on its
//! side and on the server's), its view of the server stays the front address, every echo it
//! sent came back verified; afterwards `control down` leaves no front rules. Printed: the
//! client's pause against the freeze, with and without holding.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const NETNS: &str = "qlm-e2e-fc";
const HOST_IF: &str = "qlmfc0";
const CLIENT_IF: &str = "qlmfc1";
const HOST_IP: &str = "10.235.0.1";
const CLIENT_IP: &str = "10.235.0.2";
const FRONT: &str = "10.235.0.1:5300";
/// The deployment's name (`control --name`).
pub(crate) const NAME: &str = "qlm-e2e-front";

/// One move's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct FrontMove {
    pub(crate) hold: bool,
    pub(crate) freeze_ms: Option<f64>,
    pub(crate) pause_ms: Option<f64>,
    pub(crate) handshakes: Option<u64>,
}

/// The scenario's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct FrontSummary {
    pub(crate) moves: Vec<FrontMove>,
    pub(crate) client_handshakes: u64,
    pub(crate) echoes: u64,
    /// The aioquic client's pause at each move (the unmodified part only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) aioquic_pauses_ms: Vec<Option<f64>>,
    /// Its echoes.
    pub(crate) aioquic_echoes: u64,
}

/// The client's namespace and its link; removed when dropped.
struct ClientSite;

impl ClientSite {
    fn create() -> Result<Self> {
        remove_site();
        let site = ClientSite;
        for args in [
            vec!["netns", "add", NETNS],
            vec![
                "link", "add", HOST_IF, "type", "veth", "peer", "name", CLIENT_IF,
            ],
            vec!["link", "set", CLIENT_IF, "netns", NETNS],
            vec!["addr", "add", &format!("{HOST_IP}/24"), "dev", HOST_IF],
            vec!["link", "set", HOST_IF, "up"],
            vec![
                "-n",
                NETNS,
                "addr",
                "add",
                &format!("{CLIENT_IP}/24"),
                "dev",
                CLIENT_IF,
            ],
            vec!["-n", NETNS, "link", "set", CLIENT_IF, "up"],
            vec!["-n", NETNS, "link", "set", "lo", "up"],
            vec!["-n", NETNS, "route", "add", "default", "via", HOST_IP],
        ] {
            run("ip", &args)?;
        }
        // Replies to the client leave through its link; a strict reverse-path filter on it
        // would drop the datagrams whose source the front rewrote.
        let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{HOST_IF}/rp_filter"), "0");
        Ok(site)
    }
}

impl Drop for ClientSite {
    fn drop(&mut self) {
        remove_site();
    }
}

/// After a kill: the client's namespace and the HTTP/3 part's served folder, which their
/// guards would have removed.
pub(crate) fn clean_up_after_a_kill() {
    println!("e2e: cleaning up after the stop: the network namespace {NETNS} and {H3_DIR}");
    remove_site();
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(H3_DIR));
}

fn remove_site() {
    // Removing the namespace removes its end of the link, and with it the host's end.
    let _ = Command::new("ip")
        .args(["netns", "del", NETNS])
        .stderr(Stdio::null())
        .status();
    let _ = Command::new("ip")
        .args(["link", "del", HOST_IF])
        .stderr(Stdio::null())
        .status();
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("starting {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a front's table is in the host's nftables, or a service address's route in its
/// routing table (control's service addresses are in 10.236.0.0/16).
fn front_rules_left() -> Result<bool> {
    Ok(run("nft", &["list", "tables"])?.contains("qlm_front_")
        || run("ip", &["-4", "route", "show", "10.236.0.0/16"])?.contains("10.236."))
}

/// Runs the scenario with `control` (a command builder for this deployment's name).
pub(crate) fn run_scenario(
    control: &dyn Fn() -> Command,
    bin: &Path,
    state: &Path,
    out_dir: &Path,
    moves: u32,
) -> Result<FrontSummary> {
    let mut up = control();
    up.args([
        "up",
        "--front",
        FRONT,
        "--src-port",
        "5244",
        "--dst-port",
        "5245",
    ]);
    up_moves_down(control, up, || {
        with_deployment(control, bin, state, out_dir, moves)
    })
}

/// The client's namespace, `control up` (`up`: its command), the scenario, then `control
/// down` whatever happened; nothing of the front may be left.
fn up_moves_down<T>(
    control: &dyn Fn() -> Command,
    mut up: Command,
    scenario: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let _site = ClientSite::create()?;
    let result = match up.status() {
        Ok(s) if s.success() => scenario(),
        Ok(s) => Err(anyhow::anyhow!("control up --front failed ({s})")),
        Err(e) => Err(anyhow::Error::from(e).context("starting control up --front")),
    };
    let down = control().arg("down").status();
    let left = front_rules_left();
    let summary = result?;
    if !down.as_ref().is_ok_and(|s| s.success()) {
        bail!("control down failed: {down:?}");
    }
    if left? {
        bail!("control down left the front's nftables table or route behind");
    }
    Ok(summary)
}

/// `control migrate` behind the front (`hold` or not), checked completed; its figures and
/// the wall-clock window it ran in.
fn migrate_behind_front(
    control: &dyn Fn() -> Command,
    report: &Path,
    hold: bool,
    extra: &[&str],
) -> Result<(FrontMove, (f64, f64))> {
    let mut cmd = control();
    cmd.arg("migrate").args(extra).arg("--report").arg(report);
    if !hold {
        cmd.arg("--front-no-hold");
    }
    let from = unix_ms();
    let status = cmd.status().context("control migrate")?;
    let to = unix_ms();
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(report).with_context(|| format!("reading {}", report.display()))?,
    )?;
    if !status.success() || v["result"].as_str() != Some("completed") {
        bail!(
            "a move behind the front ({}): {status}, result {}",
            report.display(),
            v["result"]
        );
    }
    let figures = FrontMove {
        hold,
        freeze_ms: v["timeline"]["freeze_time_us"].as_f64().map(|us| us / 1e3),
        pause_ms: None,
        handshakes: v["announce"]["handshakes"].as_u64(),
    };
    Ok((figures, (from, to)))
}

fn with_deployment(
    control: &dyn Fn() -> Command,
    bin: &Path,
    state: &Path,
    out_dir: &Path,
    moves: u32,
) -> Result<FrontSummary> {
    let client_json = out_dir.join("front-client.json");
    let _ = std::fs::remove_file(&client_json);
    let mut client = Client(
        Command::new("ip")
            .args(["netns", "exec", NETNS])
            .arg(bin.join("cwrapper"))
            .args(["--target", FRONT, "--stay-connected", "--interval-ms", "5"])
            .arg("--ca")
            .arg(state.join("server-cert.pem"))
            .arg("--json")
            .arg(&client_json)
            .args(["--client-id", "front-car", "--log", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting cwrapper in the client's namespace")?,
    );
    std::thread::sleep(Duration::from_millis(1500));
    let mut figures = Vec::new();
    for n in 0..moves {
        // Alternately with and without holding, so that both see the same machine.
        let hold = n % 2 == 0;
        let report = out_dir.join(format!("front-move-{}.json", n + 1));
        let (figure, _) = migrate_behind_front(control, &report, hold, &["--phases", "two"])?;
        figures.push(figure);
        std::thread::sleep(Duration::from_millis(700));
    }
    let report = client.stop(&client_json)?;
    let client_handshakes = report["handshakes"].as_u64().unwrap_or(0);
    let seen = report["migrations"].as_array().cloned().unwrap_or_default();
    if report["verified"].as_bool() != Some(true) {
        bail!(
            "the client behind the front is not verified: {}",
            report["error"]
        );
    }
    if client_handshakes != 1 || report["connections"].as_u64() != Some(1) {
        bail!(
            "the client behind the front made {client_handshakes} handshakes on {} connections",
            report["connections"]
        );
    }
    if report["target"].as_str() != Some(FRONT) {
        bail!(
            "the client's server was {} (not the front)",
            report["target"]
        );
    }
    if seen.len() != figures.len() {
        bail!("the client saw {} moves of {}", seen.len(), figures.len());
    }
    for (m, f) in seen.iter().zip(figures.iter_mut()) {
        if m["completed"].as_bool() != Some(true) || m["peer_after"].as_str() != Some(FRONT) {
            bail!("a move behind the front, as the client saw it: {m}");
        }
        f.pause_ms = m["downtime_ms"].as_f64();
    }
    if let Some(h) = figures
        .iter()
        .find_map(|f| f.handshakes.filter(|h| *h != 1))
    {
        bail!("the server counted {h} handshakes (one client, one connection)");
    }
    Ok(FrontSummary {
        moves: figures,
        client_handshakes,
        echoes: report["echoes"].as_u64().unwrap_or(0),
        aioquic_pauses_ms: Vec::new(),
        aioquic_echoes: 0,
    })
}

/// The deployment's name of the unmodified server's part.
pub(crate) const PLAIN_NAME: &str = "qlm-e2e-plain";
const PLAIN_FRONT: &str = "10.235.0.1:5301";
/// The deployment's name of the part with aioquic's server.
pub(crate) const AIOQUIC_NAME: &str = "qlm-e2e-aioquic";
const AIOQUIC_FRONT: &str = "10.235.0.1:5303";

/// Which unmodified server [`run_plain_scenario`] moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PlainServer {
    /// `plain-echo-server`: quinn, knows nothing of moves.
    Quinn,
    /// `tests/plain-quic/aioquic_echo_server.py`: aioquic (Python), the same protocol.
    Aioquic,
}

/// The unmodified part: an echo server that knows nothing of moves (`server`) started by
/// `control up --front ... -- COMMAND`, and two unmodified clients in the client's namespace
/// at once, `plain-echo-client` (plain quinn, no shim) and aioquic's echo client; the server
/// moved `moves` times, alternately holding and not.
pub(crate) fn run_plain_scenario(
    root: &Path,
    control: &dyn Fn() -> Command,
    (bin, state, out_dir): (&Path, &Path, &Path),
    moves: u32,
    server: PlainServer,
) -> Result<FrontSummary> {
    // Before `up`: nothing to undo when it fails.
    let python = ensure_aioquic(bin)?;
    let script = root.join("tests/plain-quic/aioquic_echo_client.py");
    let (front, ports, tag) = match server {
        PlainServer::Quinn => (PLAIN_FRONT, ["5246", "5247"], "plain"),
        PlainServer::Aioquic => (AIOQUIC_FRONT, ["5250", "5251"], "aioquic-server"),
    };
    let mut up = control();
    up.args([
        "up",
        "--front",
        front,
        "--src-port",
        ports[0],
        "--dst-port",
        ports[1],
    ])
    .arg("--");
    match server {
        PlainServer::Quinn => up.arg(bin.join("plain-echo-server")),
        PlainServer::Aioquic => up
            .arg(&python)
            .arg(root.join("tests/plain-quic/aioquic_echo_server.py")),
    }
    .args(["--listen", "0.0.0.0:4242"]);
    // Read before `control down` removes the state folder, log included.
    let log = state.join("server.log");
    let log_before = std::fs::metadata(&log).map_or(0, |m| m.len());
    up_moves_down(control, up, || {
        let mut summary = with_plain_deployment(
            control,
            (bin, out_dir),
            (front, tag),
            moves,
            (&python, &script),
        )?;
        // The server's side: one handshake per client in all (its log has a line per
        // accepted connection; only what this deployment wrote counts).
        let accepted = accepted_since(&log, log_before)?;
        if accepted != 2 {
            bail!(
                "the unmodified server accepted {accepted} connections (two clients, one \
                 connection each)"
            );
        }
        for f in &mut summary.moves {
            f.handshakes = Some(accepted);
        }
        Ok(summary)
    })
}

/// The `accepted ...` lines of the server's log past its first `from` bytes.
fn accepted_since(log: &Path, from: u64) -> Result<u64> {
    let text = std::fs::read(log).with_context(|| format!("the server's log {}", log.display()))?;
    let from = usize::try_from(from).unwrap_or(0).min(text.len());
    Ok(String::from_utf8_lossy(&text[from..])
        .lines()
        .filter(|l| l.starts_with("accepted "))
        .count() as u64)
}

fn with_plain_deployment(
    control: &dyn Fn() -> Command,
    (bin, out_dir): (&Path, &Path),
    (front, tag): (&str, &str),
    moves: u32,
    (python, script): (&Path, &Path),
) -> Result<FrontSummary> {
    let client_json = out_dir.join(format!("{tag}-client.json"));
    let _ = std::fs::remove_file(&client_json);
    let aioquic_json = out_dir.join(format!("{tag}-aioquic-client.json"));
    let _ = std::fs::remove_file(&aioquic_json);
    // aioquic: another QUIC stack, through the same front at the same time.
    let mut aioquic = Client(
        Command::new("ip")
            .args(["netns", "exec", NETNS])
            .arg(python)
            .arg(script)
            .args(["--target", front, "--interval-ms", "5", "--gap-ms", "20"])
            .arg("--json")
            .arg(&aioquic_json)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting the aioquic client in the client's namespace")?,
    );
    let mut client = Client(
        Command::new("ip")
            .args(["netns", "exec", NETNS])
            .arg(bin.join("plain-echo-client"))
            .args(["--target", front, "--interval-ms", "5", "--gap-ms", "20"])
            .arg("--json")
            .arg(&client_json)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting plain-echo-client in the client's namespace")?,
    );
    std::thread::sleep(Duration::from_millis(1500));
    let mut figures = Vec::new();
    let mut windows = Vec::new();
    for n in 0..moves {
        let hold = n % 2 == 0;
        let report = out_dir.join(format!("{tag}-move-{}.json", n + 1));
        // The plain server counts no handshakes in a report: its log does (below).
        let (figure, window) = migrate_behind_front(control, &report, hold, &[])?;
        figures.push(FrontMove {
            handshakes: None,
            ..figure
        });
        windows.push(window);
        std::thread::sleep(Duration::from_millis(1000));
    }
    let report = client.stop(&client_json)?;
    let aioquic_report = aioquic.stop(&aioquic_json)?;
    let pauses = pauses_per_move(&report, &windows, "plain-echo-client (quinn)")?;
    let aioquic_pauses = pauses_per_move(&aioquic_report, &windows, "the aioquic client")?;
    for (f, p) in figures.iter_mut().zip(pauses) {
        f.pause_ms = p;
    }
    Ok(FrontSummary {
        moves: figures,
        client_handshakes: 1,
        echoes: report["echoes"].as_u64().unwrap_or(0),
        aioquic_pauses_ms: aioquic_pauses,
        aioquic_echoes: aioquic_report["echoes"].as_u64().unwrap_or(0),
    })
}

/// The deployment's name of the HTTP/3 part.
pub(crate) const H3_NAME: &str = "qlm-e2e-h3";
const H3_FRONT: &str = "10.235.0.1:5302";
/// The served folder's name, under the system's temporary folder.
const H3_DIR: &str = "qlm-e2e-h3";
/// The downloaded file's size, and the pace the server sends it at: about 8 s, long enough
/// for two moves (checked: the download must span them).
pub(crate) const H3_FILE_MIB: u64 = 64;
const H3_KIB_PER_S: u64 = 8 * 1024;

/// The HTTP/3 download's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct H3Summary {
    pub(crate) moves: Vec<FrontMove>,
    pub(crate) bytes: u64,
    pub(crate) seconds: f64,
    pub(crate) server_handshakes: u64,
    pub(crate) client_handshakes: u64,
}

/// The served folder (readable by the server's account, the certificate written into it);
/// removed when dropped.
struct Served(PathBuf);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A folder under the system's temporary one holding `big.bin` (`mib` MiB of pseudo-random
/// bytes, so that nothing compresses them away), owned by `user` so that the server, which
/// runs as that account, can read it and write its certificate there; returns it with the
/// file's SHA-256.
fn served_folder(user: &str, mib: u64) -> Result<(Served, String)> {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(H3_DIR);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let served = Served(dir.clone());
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let file = dir.join("big.bin");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&file)?);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for word in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        w.write_all(&block)?;
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
    let account = nix::unistd::User::from_name(user)?
        .with_context(|| format!("no account {user} (cargo xtask setup creates it)"))?;
    nix::unistd::chown(&dir, Some(account.uid), Some(account.gid))?;
    let out = run("sha256sum", &[&file.to_string_lossy()])?;
    let digest = out
        .split_whitespace()
        .next()
        .context("sha256sum printed nothing")?
        .to_owned();
    Ok((served, digest))
}

/// The HTTP/3 part: the example file server (`examples/h3_file_server.rs`: h3 + h3-quinn on
/// the swrapper library) started by `control up --front ... -- COMMAND`, and aioquic's HTTP/3
/// client in the client's namespace downloading a 64 MiB file while the server moves A -> B
/// -> A. Checked: the body's bytes and digest, one handshake on both sides, the download
/// spanning both moves.
pub(crate) fn run_h3_scenario(
    root: &Path,
    control: &dyn Fn() -> Command,
    bin: &Path,
    state: &Path,
    out_dir: &Path,
) -> Result<H3Summary> {
    let python = ensure_aioquic(bin)?;
    let script = root.join("tests/plain-quic/aioquic_h3_get.py");
    let (served, digest) = served_folder("qlm-server", H3_FILE_MIB)?;
    let log = state.join("server.log");
    let log_before = std::fs::metadata(&log).map_or(0, |m| m.len());
    let mut up = control();
    up.args([
        "up",
        "--front",
        H3_FRONT,
        "--src-port",
        "5248",
        "--dst-port",
        "5249",
    ])
    .arg("--")
    .arg(bin.join("examples").join("h3_file_server"))
    .arg(&served.0)
    .arg("0.0.0.0:4242")
    .arg(served.0.join("cert.pem"))
    .arg(H3_KIB_PER_S.to_string());
    let summary = up_moves_down(control, up, || {
        let mut summary = with_h3_deployment(control, out_dir, (&python, &script), &digest)?;
        // The server's side (before `control down` removes its log): one line per
        // connection its application got.
        let accepted = accepted_since(&log, log_before)?;
        if accepted != 1 {
            bail!("the HTTP/3 server accepted {accepted} connections (one client, one download)");
        }
        summary.server_handshakes = accepted;
        for m in &mut summary.moves {
            m.handshakes = Some(accepted);
        }
        Ok(summary)
    })?;
    drop(served);
    Ok(summary)
}

fn with_h3_deployment(
    control: &dyn Fn() -> Command,
    out_dir: &Path,
    (python, script): (&Path, &Path),
    digest: &str,
) -> Result<H3Summary> {
    let json = out_dir.join("aioquic-h3.json");
    let _ = std::fs::remove_file(&json);
    let mut client = Command::new("ip")
        .args(["netns", "exec", NETNS])
        .arg(python)
        .arg(script)
        .args(["--target", H3_FRONT, "--path", "/big.bin", "--gap-ms", "20"])
        .arg("--json")
        .arg(&json)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map(Client)
        .context("starting aioquic's HTTP/3 client in the client's namespace")?;
    // The body flows before the first move.
    std::thread::sleep(Duration::from_millis(1000));
    let mut figures = Vec::new();
    let mut windows = Vec::new();
    for n in 0..2 {
        let report = out_dir.join(format!("h3-move-{}.json", n + 1));
        let (figure, window) = migrate_behind_front(control, &report, true, &[])?;
        figures.push(figure);
        windows.push(window);
        std::thread::sleep(Duration::from_millis(500));
    }
    let report = client.wait_report(&json, Duration::from_secs(120))?;
    if let Some(e) = report["error"].as_str() {
        bail!("aioquic's HTTP/3 download failed: {e} ({report})");
    }
    let size = H3_FILE_MIB << 20;
    if report["bytes"].as_u64() != Some(size) || report["sha256"].as_str() != Some(digest) {
        bail!(
            "aioquic's HTTP/3 download: {} bytes, digest {} (the file: {size} bytes, {digest})",
            report["bytes"],
            report["sha256"]
        );
    }
    let client_handshakes = report["handshakes"].as_u64().unwrap_or(0);
    if client_handshakes != 1 || report["connections"].as_u64() != Some(1) {
        bail!("aioquic's HTTP/3 client: {client_handshakes} handshakes ({report})");
    }
    let first = report["first_byte_unix_ms"].as_f64().unwrap_or(f64::MAX);
    let ended = report["ended_unix_ms"].as_f64().unwrap_or(0.0);
    let (moves_from, moves_to) = (windows[0].0, windows[windows.len() - 1].1);
    if first > moves_from || ended < moves_to {
        bail!(
            "the download did not span the moves (body {first:.0}..{ended:.0} ms, moves \
             {moves_from:.0}..{moves_to:.0} ms, Unix time): the file is too small or the \
             pace too fast for this machine"
        );
    }
    for (f, p) in figures.iter_mut().zip(longest_gaps(&report, &windows)) {
        f.pause_ms = p;
    }
    Ok(H3Summary {
        moves: figures,
        bytes: size,
        seconds: (ended - report["started_unix_ms"].as_f64().unwrap_or(ended)) / 1e3,
        server_handshakes: 0,
        client_handshakes,
    })
}

/// The longest gap of `report["gaps"]` (`[start after started_unix_ms, length]`, in ms) that
/// began in each window (Unix ms); `None` for a window without one.
fn longest_gaps(report: &serde_json::Value, windows: &[(f64, f64)]) -> Vec<Option<f64>> {
    let zero = report["started_unix_ms"].as_f64().unwrap_or(0.0);
    let gaps: Vec<(f64, f64)> = report["gaps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| Some((zero + g.get(0)?.as_f64()?, g.get(1)?.as_f64()?)))
        .collect();
    windows
        .iter()
        .map(|(from, to)| {
            gaps.iter()
                .filter(|(at, _)| (*from..*to).contains(at))
                .map(|(_, len)| *len)
                .reduce(f64::max)
        })
        .collect()
}

/// Checks an echo client's report (one connection, no error, every byte right) and returns
/// its pause at each move: the longest gap between echoes that began while that move's
/// `control migrate` ran (both clocks are this machine's wall clock).
fn pauses_per_move(
    report: &serde_json::Value,
    windows: &[(f64, f64)],
    who: &str,
) -> Result<Vec<Option<f64>>> {
    if let Some(e) = report["error"].as_str() {
        bail!("{who} failed: {e}");
    }
    if report["connections"].as_u64() != Some(1)
        || report["corrupted"].as_u64() != Some(0)
        || report["echoes"].as_u64().unwrap_or(0) == 0
    {
        bail!("{who}: {report}");
    }
    let pauses = longest_gaps(report, windows);
    if pauses.iter().any(Option::is_none) {
        bail!(
            "no pause of {who} was seen during a move: {}",
            report["gaps"]
        );
    }
    Ok(pauses)
}

/// A Python with aioquic, in a virtual environment beside the release binaries (made, and
/// aioquic installed from the package index pip is configured with, on first use).
fn ensure_aioquic(bin: &Path) -> Result<PathBuf> {
    let venv = bin
        .parent()
        .context("the binaries' folder has no parent")?
        .join("aioquic-venv");
    let python = venv.join("bin").join("python");
    let has = |p: &Path| {
        Command::new(p)
            .args(["-c", "import aioquic"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if python.is_file() && has(&python) {
        return Ok(python);
    }
    println!("e2e: installing aioquic into {} (pip)...", venv.display());
    run("python3", &["-m", "venv", &venv.to_string_lossy()])
        .context("making a Python virtual environment (python3 with venv)")?;
    run(
        &venv.join("bin").join("pip").to_string_lossy(),
        &["install", "-q", "aioquic>=1.2,<2"],
    )
    .context("installing aioquic")?;
    if !has(&python) {
        bail!(
            "aioquic was installed into {} but does not import",
            venv.display()
        );
    }
    Ok(python)
}

/// The client process; killed if still running when dropped.
struct Client(Child);

impl Client {
    /// Stops it (SIGINT: it writes its report) and reads its report.
    fn stop(&mut self, json: &PathBuf) -> Result<serde_json::Value> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap_or(0));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let started = Instant::now();
        while self.0.try_wait()?.is_none() {
            if started.elapsed() > Duration::from_secs(10) {
                let _ = self.0.kill();
                bail!("the client did not stop within 10 s after SIGINT");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        serde_json::from_slice(
            &std::fs::read(json).with_context(|| format!("reading {}", json.display()))?,
        )
        .context("the client's report")
    }
}

impl Client {
    /// Waits (at most `limit`) for it to end by itself, then reads its report.
    fn wait_report(&mut self, json: &Path, limit: Duration) -> Result<serde_json::Value> {
        let started = Instant::now();
        while self.0.try_wait()?.is_none() {
            if started.elapsed() > limit {
                let _ = self.0.kill();
                bail!("the client did not end within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        serde_json::from_slice(
            &std::fs::read(json).with_context(|| format!("reading {}", json.display()))?,
        )
        .context("the client's report")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// The median of `v` (None when empty).
pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(super::median(vec![]), None);
        assert_eq!(super::median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(super::median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
