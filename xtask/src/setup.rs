//! `cargo xtask setup`: installs what the end-to-end migration needs on a Debian-like machine.
//!
//! ```text
//!  preflight ── root? apt-get/dpkg? codename, arch ──(fails: list what is needed, change nothing)
//!      │
//!  survey ───── dpkg-query (missing packages), `criu --version` + `criu check`
//!      │
//!  fetch ────── CRIU >= 4.2 needed? system apt source -> temporary `Suites: sid` file,
//!      │        private apt lists/cache in a temp dir, `apt-get download` (system untouched)
//!  install ──── apt-get install the missing packages (+ the libraries sid's criu needs)
//!      │        dpkg-deb -x into a staged prefix, test it, rename into place, write the wrapper
//!  sysctl ───── fs.pipe-max-size >= 4 MiB (post-copy moves), persisted in /etc/sysctl.d/
//!  verify ───── one line per component (version, time), `criu check`, dirty tracking,
//!               podman smoke run of a busybox image imported from a local tar
//! ```
//!
//! Why CRIU comes from sid: on these machines (kernel 6.18) Debian 12's CRIU 3.17 fails
//! `criu check` and 4.1 cannot dump a UDP socket; 4.2.1 from sid works but needs glibc >= 2.38, so
//! it runs with its own glibc from a private prefix through a wrapper script (see
//! `/work/shared/notes/criu-podman.md`, or the project's notes on CRIU and podman). The mirror is
//! never named here: it is read from the machine's own apt configuration at run time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// Where CRIU from sid and its own glibc are unpacked.
const PREFIX: &str = "/opt/quic-live-migrate/criu";
/// The wrapper script; /usr/local/sbin comes before /usr/sbin in Debian's default PATH.
const WRAPPER: &str = "/usr/local/sbin/criu";
/// The oldest CRIU that dumps a bound UDP socket on this kernel.
const MIN_CRIU: Version = Version {
    major: 4,
    minor: 2,
    patch: 0,
};
/// The throwaway image of the smoke run.
const SMOKE_IMAGE: &str = "localhost/qlm-smoke:latest";
/// Installed from the system's own release. netavark and iptables give rootful podman its
/// bridge network and port maps (they are only recommended/suggested by podman); nftables
/// (`nft`) and iptables (`iptables-nft`, the hold's NFQUEUE rule) make udp-shim-front's stable
/// service address.
const SYSTEM_PACKAGES: &[&str] = &[
    "podman",
    "runc",
    "netavark",
    "iptables",
    "nftables",
    "iproute2",
    "util-linux",
    "busybox-static",
];
/// Downloaded from sid and unpacked into [`PREFIX`]: criu, its glibc, and the libraries the
/// release lacks (libnet9) or has too old (libnl-3-200: 3.7 loads but warns on every run).
const SID_PACKAGES: &[&str] = &["criu", "libcompel1", "libc6", "libnet9", "libnl-3-200"];
/// Tools the setup itself needs before it can do anything.
const REQUIRED_TOOLS: &[&str] = &["apt-get", "apt-cache", "dpkg", "dpkg-deb", "dpkg-query"];

const REQUIREMENTS: &str = "\
`cargo xtask setup` must run as root on a Debian-like system (apt-get, dpkg) to install:
  - podman and runc (podman's default runtime crun fails on these hosts), netavark, iptables
  - nftables (nft: the front address's stateless NAT, udp-shim-front)
  - CRIU >= 4.2 (it needs glibc >= 2.38 libraries; on older releases it is fetched from Debian
    sid into /opt/quic-live-migrate/criu and run through the wrapper /usr/local/sbin/criu)
  - iproute2 (ip netns), util-linux (nsenter), busybox-static (a static shell for images)
Install these by other means, or run the setup as root on such a system.";

/// Command-line options of `cargo xtask setup`.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub(crate) struct Options {
    /// Only report what is present and what is missing; change nothing.
    #[arg(long = "check")]
    pub(crate) check_only: bool,
    /// Fetch and install CRIU from sid even if a working one is present.
    #[arg(long, conflicts_with = "check_only")]
    pub(crate) reinstall_criu: bool,
    /// Install only when something is missing, and skip the verification (what `ci` and
    /// `e2e-migrate` run before they need podman or CRIU).
    #[arg(long, conflicts_with_all = ["check_only", "reinstall_criu"])]
    pub(crate) if_needed: bool,
}

/// Runs the checks and installs only when something is missing; quiet when all is there.
/// For other xtask commands (e.g. the end-to-end migration) before they need podman or CRIU.
pub(crate) fn ensure(root: &Path) -> Result<()> {
    if Host::detect().is_ok() {
        let survey = Survey::take()?;
        if survey.complete() {
            return Ok(());
        }
        println!("xtask setup: something is missing; installing");
    }
    run(root, &Options::default())
}

/// `cargo xtask setup`: check, install what is missing, verify.
pub(crate) fn run(root: &Path, opts: &Options) -> Result<()> {
    let started = Instant::now();
    let host = Host::detect()?;
    println!(
        "xtask setup: {} ({}), architecture {}",
        host.codename, host.pretty_name, host.arch.dpkg
    );
    let survey = Survey::take()?;
    survey.print();
    if opts.check_only {
        if survey.complete() {
            println!("xtask setup: everything is present (--check: nothing verified further)");
            return Ok(());
        }
        bail!("something is missing (see above); run `cargo xtask setup` as root to install it");
    }
    let criu_wanted = opts.reinstall_criu || !survey.criu.is_good();
    let mut to_install: Vec<String> = survey.missing.clone();
    let work = WorkDir::create()?;
    let fetched = if criu_wanted {
        let t = Instant::now();
        let source = system_debian_source(&host.codename)?;
        let fetched = fetch_sid_criu(&work.path, &source)?;
        println!(
            "xtask setup: fetched criu {} from sid in {:.1} s",
            fetched.version,
            t.elapsed().as_secs_f64()
        );
        let libs = resolve_system_libs(&fetched.system_deps)?;
        let present = installed_packages(&libs)?;
        for lib in libs {
            if !present.contains(&lib) && !to_install.contains(&lib) {
                to_install.push(lib);
            }
        }
        Some(fetched)
    } else {
        None
    };
    if to_install.is_empty() {
        println!("xtask setup: all packages already installed");
    } else {
        let t = Instant::now();
        apt_install(&to_install)?;
        println!(
            "xtask setup: installed {} in {:.1} s",
            to_install.join(", "),
            t.elapsed().as_secs_f64()
        );
    }
    if let Some(fetched) = &fetched {
        let t = Instant::now();
        install_criu(fetched, &host.arch)?;
        println!(
            "xtask setup: installed criu {} in {PREFIX}, wrapper {WRAPPER}, in {:.1} s",
            fetched.version,
            t.elapsed().as_secs_f64()
        );
    }
    ensure_server_user()?;
    ensure_pipe_max_size()?;
    let verified = verify(root, &work.path);
    work.remove()?;
    verified?;
    println!(
        "xtask setup: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Host detection and survey

/// The machine's Debian architecture and where its glibc lives.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Arch {
    /// `dpkg --print-architecture`, e.g. `amd64`.
    dpkg: String,
    /// The multiarch triplet, e.g. `x86_64-linux-gnu`.
    triplet: &'static str,
    /// The dynamic loader's file name, e.g. `ld-linux-x86-64.so.2`.
    loader: &'static str,
}

impl Arch {
    fn from_dpkg(name: &str) -> Option<Self> {
        let (triplet, loader) = match name {
            "amd64" => ("x86_64-linux-gnu", "ld-linux-x86-64.so.2"),
            "arm64" => ("aarch64-linux-gnu", "ld-linux-aarch64.so.1"),
            _ => return None,
        };
        Some(Self {
            dpkg: name.to_owned(),
            triplet,
            loader,
        })
    }
}

#[derive(Debug)]
struct Host {
    codename: String,
    pretty_name: String,
    arch: Arch,
}

impl Host {
    /// The preflight checks; fails with [`REQUIREMENTS`] before anything is changed.
    fn detect() -> Result<Self> {
        let mut problems = Vec::new();
        match fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| parse_euid(&s))
        {
            Some(0) => {}
            Some(uid) => problems.push(format!("not running as root (effective uid {uid})")),
            None => problems.push("cannot read the effective uid from /proc/self/status".into()),
        }
        for tool in REQUIRED_TOOLS {
            if find_in_path(tool).is_none() {
                problems.push(format!("`{tool}` not found in PATH"));
            }
        }
        let os_release = fs::read_to_string("/etc/os-release").unwrap_or_default();
        let codename = parse_codename(&os_release);
        if codename.is_none() {
            problems.push("no release codename in /etc/os-release".into());
        }
        let mut arch = None;
        if find_in_path("dpkg").is_some() {
            let out = capture("dpkg", &["--print-architecture"])?;
            let name = out.stdout.trim().to_owned();
            arch = Arch::from_dpkg(&name);
            if arch.is_none() {
                problems.push(format!(
                    "architecture `{name}` is not supported (amd64 and arm64 are)"
                ));
            }
        }
        match (codename, arch) {
            (Some(codename), Some(arch)) if problems.is_empty() => Ok(Self {
                codename,
                pretty_name: os_release_field(&os_release, "PRETTY_NAME")
                    .unwrap_or_else(|| "unknown release".into()),
                arch,
            }),
            _ => bail!(
                "{REQUIREMENTS}\nThis machine:\n  - {}",
                problems.join("\n  - ")
            ),
        }
    }
}

/// What CRIU the machine has.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CriuState {
    /// No `criu` in PATH.
    Missing,
    /// `criu --version` failed or printed no version.
    Broken { path: PathBuf, output: String },
    /// Older than [`MIN_CRIU`].
    TooOld { path: PathBuf, version: Version },
    /// New enough, but `criu check` does not say "Looks good".
    CheckFails {
        path: PathBuf,
        version: Version,
        output: String,
    },
    /// New enough and `criu check` passes.
    Good { path: PathBuf, version: Version },
}

impl CriuState {
    fn probe() -> Result<Self> {
        let Some(path) = find_in_path("criu") else {
            return Ok(Self::Missing);
        };
        let shown = path.display().to_string();
        let out = capture(&shown, &["--version"])?;
        let version = match (out.ok, parse_criu_version(&out.combined())) {
            (true, Some(v)) => v,
            _ => {
                return Ok(Self::Broken {
                    path,
                    output: tail(&out.combined(), 5),
                });
            }
        };
        if version < MIN_CRIU {
            return Ok(Self::TooOld { path, version });
        }
        let check = capture(&shown, &["check"])?;
        if check.ok && check.combined().contains("Looks good") {
            Ok(Self::Good { path, version })
        } else {
            Ok(Self::CheckFails {
                path,
                version,
                output: tail(&check.combined(), 8),
            })
        }
    }

    fn is_good(&self) -> bool {
        matches!(self, Self::Good { .. })
    }

    fn describe(&self) -> String {
        match self {
            Self::Missing => "missing (no `criu` in PATH)".into(),
            Self::Broken { path, output } => {
                format!("{} does not run: {output}", path.display())
            }
            Self::TooOld { path, version } => {
                format!("{} is {version}, older than {MIN_CRIU}", path.display())
            }
            Self::CheckFails {
                path,
                version,
                output,
            } => format!(
                "{} is {version} but `criu check` fails:\n{output}",
                path.display()
            ),
            Self::Good { path, version } => {
                format!("{version} at {}, `criu check` looks good", path.display())
            }
        }
    }
}

/// What is installed and what is missing.
#[derive(Debug)]
struct Survey {
    missing: Vec<String>,
    criu: CriuState,
    /// The unprivileged account the demo server runs as exists.
    server_user: bool,
    /// `fs.pipe-max-size`, when readable (post-copy moves need [`MIN_PIPE_MAX_SIZE`]).
    pipe_max_size: Option<u64>,
    /// The setting is persisted in [`SYSCTL_FILE`].
    pipe_max_size_persisted: bool,
}

impl Survey {
    fn take() -> Result<Self> {
        let installed = installed_packages(SYSTEM_PACKAGES)?;
        let missing = SYSTEM_PACKAGES
            .iter()
            .filter(|p| !installed.contains(**p))
            .map(|p| (*p).to_owned())
            .collect();
        Ok(Self {
            missing,
            criu: CriuState::probe()?,
            server_user: user_exists(SERVER_USER),
            pipe_max_size: read_pipe_max_size(Path::new(PIPE_MAX_SIZE)).ok(),
            pipe_max_size_persisted: persisted(Path::new(SYSCTL_FILE)),
        })
    }

    fn complete(&self) -> bool {
        self.missing.is_empty()
            && self.criu.is_good()
            && self.server_user
            && self.pipe_max_size.is_some_and(|v| v >= MIN_PIPE_MAX_SIZE)
            && self.pipe_max_size_persisted
    }

    fn print(&self) {
        if self.missing.is_empty() {
            println!(
                "xtask setup: packages present: {}",
                SYSTEM_PACKAGES.join(", ")
            );
        } else {
            println!("xtask setup: packages missing: {}", self.missing.join(", "));
        }
        println!("xtask setup: criu: {}", self.criu.describe());
        println!(
            "xtask setup: server account `{SERVER_USER}`: {}",
            if self.server_user {
                "present"
            } else {
                "missing"
            }
        );
        println!(
            "xtask setup: fs.pipe-max-size: {}",
            match self.pipe_max_size {
                Some(v) if v >= MIN_PIPE_MAX_SIZE => format!("{v} (post-copy moves possible)"),
                Some(v) => format!("{v}, below the {MIN_PIPE_MAX_SIZE} post-copy moves need"),
                None => format!("unreadable ({PIPE_MAX_SIZE})"),
            }
        );
        if !self.pipe_max_size_persisted {
            println!(
                "xtask setup: {SYSCTL_FILE}: missing (the setting would not survive a reboot)"
            );
        }
    }
}

/// `fs.pipe-max-size`.
const PIPE_MAX_SIZE: &str = "/proc/sys/fs/pipe-max-size";
/// What post-copy moves need (`control migrate --memory post-copy`): criu keeps the dumped
/// memory in pipes it grows up to 4 MiB, and root here lacks CAP_SYS_RESOURCE, so the sysctl
/// bounds it.
const MIN_PIPE_MAX_SIZE: u64 = 4 << 20;
/// Where the setting is persisted (read by systemd-sysctl / `sysctl --system` at boot).
const SYSCTL_FILE: &str = "/etc/sysctl.d/60-quic-live-migrate.conf";

/// Reads `fs.pipe-max-size` from `path`.
fn read_pipe_max_size(path: &Path) -> Result<u64> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_pipe_max_size(&text)
}

fn parse_pipe_max_size(text: &str) -> Result<u64> {
    text.trim()
        .parse::<u64>()
        .with_context(|| format!("fs.pipe-max-size is not a number: `{}`", text.trim()))
}

/// Whether `file` holds exactly the setting [`sysctl_file_content`] writes.
fn persisted(file: &Path) -> bool {
    fs::read_to_string(file).ok().as_deref() == Some(sysctl_file_content().as_str())
}

/// The content of [`SYSCTL_FILE`].
fn sysctl_file_content() -> String {
    format!(
        "# quic-live-migrate (cargo xtask setup): criu's post-copy page pipes need\n\
         # fs.pipe-max-size >= {MIN_PIPE_MAX_SIZE} (root lacks CAP_SYS_RESOURCE here).\n\
         fs.pipe-max-size = {MIN_PIPE_MAX_SIZE}\n"
    )
}

/// Raises `fs.pipe-max-size` to at least [`MIN_PIPE_MAX_SIZE`] now (never lowers it) and,
/// when it had to raise it, persists it in [`SYSCTL_FILE`]; idempotent.
fn ensure_pipe_max_size() -> Result<()> {
    ensure_pipe_max_size_at(Path::new(PIPE_MAX_SIZE), Path::new(SYSCTL_FILE))
}

/// [`ensure_pipe_max_size`] with the sysctl at `path` and the persisted setting at `file`.
fn ensure_pipe_max_size_at(path: &Path, file: &Path) -> Result<()> {
    let now = read_pipe_max_size(path)?;
    if now < MIN_PIPE_MAX_SIZE {
        fs::write(path, MIN_PIPE_MAX_SIZE.to_string())
            .with_context(|| format!("writing {MIN_PIPE_MAX_SIZE} to {}", path.display()))?;
        let after = read_pipe_max_size(path)?;
        if after < MIN_PIPE_MAX_SIZE {
            bail!("fs.pipe-max-size is still {after} after writing {MIN_PIPE_MAX_SIZE}");
        }
        println!("xtask setup: raised fs.pipe-max-size from {now} to {after}");
    }
    // Persisted only when this set-up had to raise it: a value that was already high enough
    // comes from the machine's own configuration, which a file of ours could lower at boot.
    let want = sysctl_file_content();
    if now < MIN_PIPE_MAX_SIZE && !persisted(file) {
        fs::write(file, &want).with_context(|| format!("writing {}", file.display()))?;
        fs::set_permissions(file, fs::Permissions::from_mode(0o644))
            .with_context(|| format!("making {} world-readable", file.display()))?;
        println!(
            "xtask setup: wrote {} (fs.pipe-max-size kept across reboots)",
            file.display()
        );
    }
    Ok(())
}

/// The unprivileged account `control up` runs the demo server as (no home, no shell, no
/// password): the network-facing process holds no root privileges.
pub(crate) const SERVER_USER: &str = "qlm-server";

/// Whether the account `name` exists.
fn user_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["passwd", name])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Creates the server's account when missing.
fn ensure_server_user() -> Result<()> {
    if user_exists(SERVER_USER) {
        return Ok(());
    }
    let status = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            SERVER_USER,
        ])
        .status()
        .context("running useradd")?;
    if !status.success() {
        bail!("useradd {SERVER_USER} failed ({status})");
    }
    println!("xtask setup: created the system account `{SERVER_USER}` for the demo server");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Installing

/// Which of `names` dpkg has installed.
fn installed_packages<S: AsRef<str>>(names: &[S]) -> Result<BTreeSet<String>> {
    if names.is_empty() {
        return Ok(BTreeSet::new());
    }
    let mut args = vec!["-W", "-f", "${Package} ${db:Status-Abbrev}\\n"];
    args.extend(names.iter().map(AsRef::as_ref));
    // dpkg-query exits 1 when some package is unknown; its stdout is still right.
    Ok(parse_installed(&capture("dpkg-query", &args)?.stdout))
}

fn apt_install(packages: &[String]) -> Result<()> {
    let lists_empty = fs::read_dir("/var/lib/apt/lists")
        .map(|d| {
            !d.flatten()
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
        .unwrap_or(true);
    if lists_empty {
        println!("xtask setup: the system's package lists are empty; running apt-get update");
        run_streamed(apt_get().arg("update"))?;
    }
    println!(
        "xtask setup: installing {} (apt can take minutes)",
        packages.join(" ")
    );
    let install = || {
        let mut cmd = apt_get();
        cmd.args([
            "install",
            "-y",
            "--no-install-recommends",
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
        ])
        .args(packages);
        run_streamed(&mut cmd)
    };
    if let Err(first) = install() {
        if lists_empty {
            return Err(first);
        }
        println!(
            "xtask setup: install failed ({first:#}); refreshing the package lists and retrying once"
        );
        run_streamed(apt_get().arg("update"))?;
        install()?;
    }
    Ok(())
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// CRIU's packages downloaded from sid into a temporary directory.
#[derive(Debug)]
struct Fetched {
    debs: Vec<PathBuf>,
    version: String,
    /// Dependencies of sid's criu that the system's release must provide.
    system_deps: Vec<String>,
}

/// Reads the machine's apt sources and picks its Debian entry.
fn system_debian_source(codename: &str) -> Result<AptSource> {
    let mut files = Vec::new();
    let main = Path::new("/etc/apt/sources.list");
    if let Ok(text) = fs::read_to_string(main) {
        files.push((main.display().to_string(), text));
    }
    let mut parts: Vec<PathBuf> = fs::read_dir("/etc/apt/sources.list.d")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    parts.sort();
    for p in parts {
        let name = p.display().to_string();
        if name.ends_with(".list") || name.ends_with(".sources") {
            let text = fs::read_to_string(&p).with_context(|| format!("reading {name}"))?;
            files.push((name, text));
        }
    }
    pick_debian_source(&files, codename).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Downloads [`SID_PACKAGES`] with a private apt state: the system's lists, cache and sources
/// are not touched, everything lives in `work` and goes with it.
fn fetch_sid_criu(work: &Path, source: &AptSource) -> Result<Fetched> {
    let sources = work.join("sid.sources");
    fs::write(&sources, source.sid_stanza()).context("writing the temporary sources file")?;
    for d in ["parts", "lists/partial", "archives/partial", "debs"] {
        fs::create_dir_all(work.join(d)).with_context(|| format!("creating {d}"))?;
    }
    let mut private = Vec::new();
    {
        for (k, v) in [
            ("Dir::Etc::SourceList", sources.display().to_string()),
            (
                "Dir::Etc::SourceParts",
                work.join("parts").display().to_string(),
            ),
            (
                "Dir::State::Lists",
                work.join("lists").display().to_string(),
            ),
            (
                "Dir::Cache::Archives",
                work.join("archives").display().to_string(),
            ),
            ("Dir::State::Status", "/var/lib/dpkg/status".to_owned()),
            // No binary caches: they would otherwise land in /var/cache/apt.
            ("Dir::Cache::pkgcache", String::new()),
            ("Dir::Cache::srcpkgcache", String::new()),
            // The temp dir is root's; apt's sandbox user could not write into it.
            ("APT::Sandbox::User", "root".to_owned()),
            // Only the package index is needed, not appstream metadata.
            (
                "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled",
                "false".to_owned(),
            ),
        ] {
            private.push("-o".to_owned());
            private.push(format!("{k}={v}"));
        }
    }
    println!(
        "xtask setup: fetching CRIU from sid; private apt state (`apt-get <private>` below): {}",
        private.join(" ")
    );
    let mut update = apt_get();
    update.args(&private).arg("update");
    let said = run_streamed_as(&mut update, "apt-get <private> update")?;
    // apt-get update exits 0 even when no index could be fetched.
    let fetched_index = fs::read_dir(work.join("lists"))
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
        .unwrap_or(false);
    if !fetched_index {
        bail!(
            "`apt-get <private> update` fetched no package index for sid:\n{}",
            said.join("\n")
        );
    }
    let mut download = apt_get();
    download
        .args(&private)
        .arg("download")
        .args(SID_PACKAGES.iter().map(|p| format!("{p}/sid")))
        .current_dir(work.join("debs"));
    run_streamed_as(&mut download, "apt-get <private> download")?;
    let mut debs: Vec<PathBuf> = fs::read_dir(work.join("debs"))
        .context("listing the downloaded packages")?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    debs.sort();
    let criu_deb = debs
        .iter()
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("criu_"))
        })
        .context("apt-get download did not produce criu_*.deb")?;
    let deb = criu_deb.display().to_string();
    let version = checked("dpkg-deb", &["-f", &deb, "Version"])?
        .trim()
        .to_owned();
    let depends = checked("dpkg-deb", &["-f", &deb, "Depends"])?;
    let system_deps = parse_depends(&depends)
        .into_iter()
        .filter(|d| !SID_PACKAGES.contains(&d.as_str()))
        .collect();
    Ok(Fetched {
        debs,
        version,
        system_deps,
    })
}

/// Maps sid's dependency names onto packages of the system's release (sid renamed some
/// libraries with a `t64` suffix: libgnutls30t64 is bookworm's libgnutls30).
fn resolve_system_libs(deps: &[String]) -> Result<Vec<String>> {
    if deps.is_empty() {
        return Ok(Vec::new());
    }
    let mut names: Vec<String> = deps.to_vec();
    names.extend(
        deps.iter()
            .filter_map(|d| d.strip_suffix("t64").map(str::to_owned)),
    );
    let args: Vec<&str> = std::iter::once("policy")
        .chain(names.iter().map(String::as_str))
        .collect();
    let policy = parse_policy(&capture("apt-cache", &args)?.stdout);
    let available = |n: &str| policy.get(n).is_some_and(Option::is_some);
    let mut out = Vec::new();
    let mut lacking = Vec::new();
    for d in deps {
        if available(d) {
            out.push(d.clone());
        } else if let Some(old) = d.strip_suffix("t64").filter(|o| available(o)) {
            out.push(old.to_owned());
        } else {
            lacking.push(d.clone());
        }
    }
    if !lacking.is_empty() {
        bail!(
            "sid's criu needs {}, which this release does not provide (add them to SID_PACKAGES \
             in xtask/src/setup.rs)",
            lacking.join(", ")
        );
    }
    Ok(out)
}

/// Unpacks into a staged prefix, tests it there, then moves it into place and writes the
/// wrapper; a failure leaves the previous installation as it was.
fn install_criu(fetched: &Fetched, arch: &Arch) -> Result<()> {
    let prefix = Path::new(PREFIX);
    let staged = PathBuf::from(format!("{PREFIX}.new"));
    let result = stage_criu(fetched, arch, &staged);
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&staged);
        return Err(e);
    }
    let loader_rel = find_loader(&staged, arch)?;
    if prefix.exists() {
        fs::remove_dir_all(prefix).with_context(|| format!("removing the old {PREFIX}"))?;
    }
    fs::rename(&staged, prefix).with_context(|| format!("moving the staged CRIU to {PREFIX}"))?;
    let script = wrapper_script(prefix, &loader_rel, arch, &fetched.version);
    let wrapper = Path::new(WRAPPER);
    if let Some(dir) = wrapper.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = PathBuf::from(format!("{WRAPPER}.new"));
    fs::write(&tmp, script).with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", tmp.display()))?;
    fs::rename(&tmp, wrapper).with_context(|| format!("installing {WRAPPER}"))?;
    Ok(())
}

fn stage_criu(fetched: &Fetched, arch: &Arch, staged: &Path) -> Result<()> {
    if staged.exists() {
        fs::remove_dir_all(staged).with_context(|| format!("removing {}", staged.display()))?;
    }
    fs::create_dir_all(staged).with_context(|| format!("creating {}", staged.display()))?;
    let dest = staged.display().to_string();
    for deb in &fetched.debs {
        checked("dpkg-deb", &["-x", &deb.display().to_string(), &dest])?;
    }
    let loader = staged.join(find_loader(staged, arch)?);
    let loader = loader.display().to_string();
    let libs = library_path(staged, arch);
    let criu = staged.join("usr/sbin/criu").display().to_string();
    let listed = checked(&loader, &["--library-path", &libs, "--list", &criu])?;
    let missing: Vec<&str> = listed
        .lines()
        .filter(|l| l.contains("not found"))
        .map(str::trim)
        .collect();
    if !missing.is_empty() {
        bail!(
            "sid's criu misses libraries with the system's ones:\n  {}",
            missing.join("\n  ")
        );
    }
    let out = checked(&loader, &["--library-path", &libs, &criu, "--version"])?;
    match parse_criu_version(&out) {
        Some(v) if v >= MIN_CRIU => Ok(()),
        Some(v) => bail!("sid's criu is {v}, older than {MIN_CRIU}"),
        None => bail!("the staged criu printed no version: {}", tail(&out, 5)),
    }
}

/// The loader inside the prefix, relative to it (sid's libc6 is merged-/usr).
fn find_loader(prefix: &Path, arch: &Arch) -> Result<PathBuf> {
    let candidates = [
        format!("usr/lib/{}/{}", arch.triplet, arch.loader),
        format!("lib/{}/{}", arch.triplet, arch.loader),
        format!("usr/lib64/{}", arch.loader),
        format!("lib64/{}", arch.loader),
        format!("lib/{}", arch.loader),
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|rel| prefix.join(rel).exists())
        .with_context(|| {
            format!(
                "no {} in the unpacked libc6 under {}",
                arch.loader,
                prefix.display()
            )
        })
}

/// The prefix's library directories first, then the system's.
fn library_path(prefix: &Path, arch: &Arch) -> String {
    let t = arch.triplet;
    [
        prefix.join(format!("usr/lib/{t}")).display().to_string(),
        prefix.join(format!("lib/{t}")).display().to_string(),
        format!("/lib/{t}"),
        format!("/usr/lib/{t}"),
        "/lib".to_owned(),
        "/usr/lib".to_owned(),
    ]
    .join(":")
}

/// The `criu` wrapper: sid's criu run by its own loader and glibc.
fn wrapper_script(prefix: &Path, loader_rel: &Path, arch: &Arch, version: &str) -> String {
    format!(
        "#!/bin/sh\n\
         # Written by `cargo xtask setup` (quic-live-migrate): CRIU {version} from Debian sid,\n\
         # run with its own glibc so that the system's libraries stay as they are.\n\
         # To uninstall, remove this file and {prefix}.\n\
         exec {loader} --library-path {libs} {prefix}/usr/sbin/criu \"$@\"\n",
        prefix = prefix.display(),
        loader = prefix.join(loader_rel).display(),
        libs = library_path(prefix, arch),
    )
}

// ---------------------------------------------------------------------------------------------
// Verification

fn verify(root: &Path, work: &Path) -> Result<()> {
    println!("xtask setup: verifying");
    let mut failures = Vec::new();
    let mut line = |name: &str, started: Instant, result: Result<String>| {
        let secs = started.elapsed().as_secs_f64();
        match result {
            Ok(detail) => println!("  {name:<16} {detail:<60} {secs:>6.2} s"),
            Err(e) => {
                println!("  {name:<16} FAILED {secs:>6.2} s");
                failures.push(format!("{name}: {e:#}"));
            }
        }
    };
    let t = Instant::now();
    line("podman", t, first_line("podman", &["--version"]));
    let t = Instant::now();
    line("runc", t, first_line("runc", &["--version"]));
    let t = Instant::now();
    line("iproute2", t, first_line("ip", &["-V"]));
    let t = Instant::now();
    line("nsenter", t, first_line("nsenter", &["--version"]));
    let t = Instant::now();
    line("busybox", t, busybox_version());
    let t = Instant::now();
    line("criu", t, verify_criu());
    let t = Instant::now();
    line("criu dirty-track", t, dirty_tracking());
    let t = Instant::now();
    line("podman smoke run", t, smoke_run(root, work));
    if failures.is_empty() {
        Ok(())
    } else {
        bail!("verification failed:\n{}", failures.join("\n"))
    }
}

fn first_line(program: &str, args: &[&str]) -> Result<String> {
    let out = checked(program, args)?;
    Ok(out.lines().next().unwrap_or_default().trim().to_owned())
}

fn busybox_version() -> Result<String> {
    let path = find_in_path("busybox").context("no `busybox` in PATH")?;
    let out = capture(&path.display().to_string(), &["--help"])?;
    out.combined()
        .lines()
        .find(|l| l.starts_with("BusyBox v"))
        .map(|l| {
            let l = l.trim().trim_end_matches(" multi-call binary.");
            format!("{l} ({})", path.display())
        })
        .context("`busybox --help` printed no version")
}

fn verify_criu() -> Result<String> {
    match CriuState::probe()? {
        CriuState::Good { path, version } => {
            let wrapper = if path == Path::new(WRAPPER) {
                format!(", wrapper -> {PREFIX}")
            } else {
                String::new()
            };
            Ok(format!(
                "{version} ({}{wrapper}), check: Looks good",
                path.display()
            ))
        }
        other => {
            let hint = match other {
                CriuState::TooOld { ref path, .. } | CriuState::CheckFails { ref path, .. }
                    if path != Path::new(WRAPPER) && Path::new(WRAPPER).exists() =>
                {
                    format!(
                        "\n(the wrapper {WRAPPER} exists: put its directory before {} in PATH)",
                        path.parent().unwrap_or(Path::new("/")).display()
                    )
                }
                _ => String::new(),
            };
            bail!("criu {}{hint}", other.describe())
        }
    }
}

fn dirty_tracking() -> Result<String> {
    let out = capture("criu", &["check", "--feature", "mem_dirty_track"])?;
    Ok(match parse_dirty_track(&out.combined(), out.ok) {
        DirtyTrack::On => "ON (iterative pre-copy possible)".to_owned(),
        DirtyTrack::Off => "OFF (expected on this kernel: no iterative pre-copy)".to_owned(),
        DirtyTrack::Unknown => format!("unknown: {}", tail(&out.combined(), 3)),
    })
}

/// Imports a one-binary busybox image from a local tar (no registry), runs it, removes it.
fn smoke_run(root: &Path, work: &Path) -> Result<String> {
    let busybox = find_in_path("busybox").context("no `busybox` in PATH")?;
    let rootfs = work.join("rootfs");
    let bin = rootfs.join("bin");
    fs::create_dir_all(&bin).context("creating the smoke rootfs")?;
    fs::copy(&busybox, bin.join("busybox")).context("copying busybox")?;
    fs::set_permissions(bin.join("busybox"), fs::Permissions::from_mode(0o755))
        .context("making busybox executable")?;
    for applet in ["sh", "sleep", "true"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet))
            .with_context(|| format!("linking {applet}"))?;
    }
    let tar = work.join("smoke.tar");
    let (tar_s, rootfs_s) = (tar.display().to_string(), rootfs.display().to_string());
    checked("tar", &["-C", &rootfs_s, "-cf", &tar_s, "."])?;
    checked("podman", &["import", "--quiet", &tar_s, SMOKE_IMAGE])?;
    let mut cmd = Command::new("podman");
    cmd.args([
        "run",
        "--rm",
        "--runtime",
        "runc",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1000:1000",
        SMOKE_IMAGE,
        "/bin/true",
    ])
    .current_dir(root);
    let ran = run_captured(&mut cmd);
    let removed = checked("podman", &["rmi", "--force", SMOKE_IMAGE]);
    ran?;
    removed?;
    Ok(format!(
        "{SMOKE_IMAGE}: /bin/true ran (runc, local image, removed)"
    ))
}

// ---------------------------------------------------------------------------------------------
// Running commands

/// A command's outcome, with its output as (lossy) text.
#[derive(Debug)]
struct Captured {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Captured {
    fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs a command to completion; a non-zero exit is reported in `ok`, not as an error.
fn capture(program: &str, args: &[&str]) -> Result<Captured> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{program}`"))?;
    Ok(Captured {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs a command and returns its stdout; a failure names the command and its stderr tail.
fn checked(program: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_captured(&mut cmd)
}

fn run_captured(cmd: &mut Command) -> Result<String> {
    let shown = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let text = if stderr.trim().is_empty() {
            String::from_utf8_lossy(&out.stdout).into_owned()
        } else {
            stderr.into_owned()
        };
        bail!("`{shown}` failed ({}):\n{}", out.status, tail(&text, 15));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a slow command, echoing its output (indented) as it comes, for progress.
fn run_streamed(cmd: &mut Command) -> Result<()> {
    let shown = describe(cmd);
    run_streamed_as(cmd, &shown).map(drop)
}

/// [`run_streamed`], with `shown` naming the command; returns the last lines it printed
/// (stderr's if any, else stdout's).
fn run_streamed_as(cmd: &mut Command, shown: &str) -> Result<Vec<String>> {
    println!("xtask setup: $ {shown}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let (out_tail, err_tail) = std::thread::scope(|s| {
        let err = s.spawn(|| pump(stderr, "    ! "));
        let out = pump(stdout, "    ");
        (out, err.join().unwrap_or_default())
    });
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    let lines: Vec<String> = if err_tail.is_empty() {
        out_tail
    } else {
        err_tail
    }
    .into_iter()
    .collect();
    if !status.success() {
        bail!("`{shown}` failed ({status}):\n{}", lines.join("\n"));
    }
    Ok(lines)
}

/// Echoes lines with a prefix and keeps the last 15.
fn pump<R: Read>(reader: Option<R>, prefix: &str) -> VecDeque<String> {
    let mut last = VecDeque::new();
    let Some(reader) = reader else {
        return last;
    };
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    while let Ok(n) = reader.read_until(b'\n', &mut buf) {
        if n == 0 {
            break;
        }
        let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
        buf.clear();
        println!("{prefix}{line}");
        if last.len() == 15 {
            last.pop_front();
        }
        last.push_back(line);
    }
    last
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The temporary directory of one run; removed by [`WorkDir::remove`] or, on an early error,
/// when dropped.
#[derive(Debug)]
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// A new directory with an unpredictable name, mode 0700, made by this call: an existing
    /// path (someone else's directory or symlink in the shared temporary folder) is never
    /// adopted or removed.
    fn create() -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt as _;
        let mut random = [0u8; 8];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut random))
            .context("reading /dev/urandom")?;
        let suffix: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let path = std::env::temp_dir().join(format!("xtask-setup-{suffix}"));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating the private {}", path.display()))?;
        Ok(Self { path })
    }

    fn remove(self) -> Result<()> {
        let path = self.path.clone();
        std::mem::forget(self);
        fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// Pure parsing (unit-tested below)

/// A CRIU version; ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Version {
    major: u32,
    minor: u32,
    patch: u32,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The version in `criu --version` output ("Version: 4.2.1" or "Version: 4.2"), or in a bare
/// "4.2.1". `None` when no line holds one.
fn parse_criu_version(text: &str) -> Option<Version> {
    text.lines().find_map(|line| {
        let line = line.trim();
        let rest = line.strip_prefix("Version:").map_or(line, str::trim);
        parse_version_token(rest.split_whitespace().next()?)
    })
}

fn parse_version_token(token: &str) -> Option<Version> {
    // "4.2.1", "4.2", or with a suffix: "4.3-rc1", "4.2.1+ds" (the suffix is ignored).
    let end = token
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(token.len());
    let mut parts = token[..end].split('.');
    let number = |s: &str| -> Option<u32> {
        if s.is_empty() {
            return None;
        }
        s.parse().ok()
    };
    let major = number(parts.next()?)?;
    let minor = number(parts.next()?)?;
    let patch = match parts.next() {
        None => 0,
        Some(p) => number(p)?,
    };
    Some(Version {
        major,
        minor,
        patch,
    })
}

/// Whether this process runs as root (effective uid 0).
pub(crate) fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_euid(&s))
        == Some(0)
}

/// The effective uid from `/proc/self/status` ("Uid:\treal\teffective\tsaved\tfs").
fn parse_euid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn os_release_field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches(['"', '\'']).to_owned())
    })
}

/// `VERSION_CODENAME` from /etc/os-release, else the word in parentheses of `VERSION`.
fn parse_codename(os_release: &str) -> Option<String> {
    if let Some(c) = os_release_field(os_release, "VERSION_CODENAME").filter(|c| !c.is_empty()) {
        return Some(c);
    }
    let version = os_release_field(os_release, "VERSION")?;
    let (_, rest) = version.split_once('(')?;
    let (name, _) = rest.split_once(')')?;
    let name = name.trim();
    (!name.is_empty() && !name.contains(char::is_whitespace)).then(|| name.to_owned())
}

/// Package names whose dpkg status is "ii" in `dpkg-query -W -f '${Package} ${db:Status-Abbrev}\n'`.
fn parse_installed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next()?;
            (w.next()? == "ii").then(|| name.to_owned())
        })
        .collect()
}

/// Package -> candidate version (None for "(none)") from `apt-cache policy a b ...`.
fn parse_policy(text: &str) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            current = line
                .strip_suffix(':')
                .filter(|n| !n.is_empty() && !n.contains(' '))
                .map(str::to_owned);
            if let Some(name) = &current {
                out.insert(name.clone(), None);
            }
        } else if let (Some(name), Some(v)) = (
            &current,
            line.trim().strip_prefix("Candidate:").map(str::trim),
        ) {
            out.insert(
                name.clone(),
                (v != "(none)" && !v.is_empty()).then(|| v.to_owned()),
            );
        }
    }
    out
}

/// Package names of a Debian `Depends` field: first alternative, without version or arch.
fn parse_depends(field: &str) -> Vec<String> {
    field
        .split(',')
        .filter_map(|dep| {
            let first = dep.split('|').next()?.trim();
            let name = first.split(['(', ' ', '[', '<']).next()?.trim();
            let name = name.split(':').next()?;
            (!name.is_empty()).then(|| name.to_owned())
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DirtyTrack {
    On,
    Off,
    Unknown,
}

/// Reads `criu check --feature mem_dirty_track` ("Dirty tracking is OFF" exits non-zero).
fn parse_dirty_track(output: &str, success: bool) -> DirtyTrack {
    if output.contains("is OFF") {
        DirtyTrack::Off
    } else if output.contains("is ON") || (success && !output.contains("Error")) {
        DirtyTrack::On
    } else {
        DirtyTrack::Unknown
    }
}

/// One `deb` entry of the apt configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct AptSource {
    uris: Vec<String>,
    suites: Vec<String>,
    components: Vec<String>,
    /// A keyring path, or an inline key block (deb822 continuation lines kept verbatim).
    signed_by: Option<String>,
    architectures: Option<String>,
    trusted: Option<String>,
}

impl AptSource {
    /// The same archive with `Suites: sid` and `Components: main`, as a deb822 stanza.
    fn sid_stanza(&self) -> String {
        let mut s = format!(
            "Types: deb\nURIs: {}\nSuites: sid\nComponents: main\n",
            self.uris.join(" ")
        );
        for (k, v) in [
            ("Signed-By", &self.signed_by),
            ("Architectures", &self.architectures),
            ("Trusted", &self.trusted),
        ] {
            if let Some(v) = v {
                s.push_str(&format!("{k}: {v}\n"));
            }
        }
        s
    }
}

/// Why no Debian entry could be taken from the apt configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SourcesError {
    /// No enabled `deb` entry has the release's codename among its suites and `main` among its
    /// components.
    NoDebianEntry {
        /// The release codename looked for.
        codename: String,
        /// The files that were read.
        files: Vec<String>,
    },
}

impl fmt::Display for SourcesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDebianEntry { codename, files } => write!(
                f,
                "no Debian apt source found: no enabled `deb` entry with suite `{codename}` and \
                 component `main` in {}; CRIU >= 4.2 is fetched from the same archive's `sid`",
                if files.is_empty() {
                    "/etc/apt (no sources files)".to_owned()
                } else {
                    files.join(", ")
                }
            ),
        }
    }
}

impl std::error::Error for SourcesError {}

/// Parses deb822 `.sources` text: stanzas split by blank lines, `#` comment lines,
/// continuation lines (leading space) appended to the field before.
fn parse_deb822(text: &str) -> Vec<AptSource> {
    let mut stanzas: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for line in text.lines() {
        let Some(current) = stanzas.last_mut() else {
            continue;
        };
        if line.trim().is_empty() {
            if !current.is_empty() {
                stanzas.push(Vec::new());
            }
        } else if line.starts_with('#') {
            continue;
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = current.last_mut() {
                value.push('\n');
                value.push_str(line);
            }
        } else if let Some((k, v)) = line.split_once(':') {
            current.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    stanzas
        .iter()
        .filter_map(|fields| {
            let get = |key: &str| {
                fields
                    .iter()
                    .rev()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.clone())
            };
            let words = |key: &str| -> Vec<String> {
                get(key)
                    .map(|v| v.split_whitespace().map(str::to_owned).collect())
                    .unwrap_or_default()
            };
            if !words("types").iter().any(|t| t == "deb")
                || get("enabled").is_some_and(|e| e.eq_ignore_ascii_case("no"))
            {
                return None;
            }
            let source = AptSource {
                uris: words("uris"),
                suites: words("suites"),
                components: words("components"),
                signed_by: get("signed-by"),
                architectures: get("architectures"),
                trusted: get("trusted"),
            };
            (!source.uris.is_empty() && !source.suites.is_empty()).then_some(source)
        })
        .collect()
}

/// Parses one-line `deb [opt=val ...] URI SUITE COMPONENT...` entries (`deb-src` is skipped).
fn parse_one_line(text: &str) -> Vec<AptSource> {
    text.lines()
        .filter_map(|raw| {
            let line = raw.split('#').next()?.trim();
            let rest = line.strip_prefix("deb")?;
            if !rest.starts_with(char::is_whitespace) {
                return None; // deb-src, or garbage
            }
            let rest = rest.trim_start();
            let (options, rest) = match rest.strip_prefix('[') {
                Some(r) => r.split_once(']')?,
                None => ("", rest),
            };
            let mut source = AptSource::default();
            for opt in options.split_whitespace() {
                let Some((k, v)) = opt.split_once('=') else {
                    continue;
                };
                match k {
                    "signed-by" => source.signed_by = Some(v.to_owned()),
                    "arch" => source.architectures = Some(v.replace(',', " ")),
                    "trusted" => source.trusted = Some(v.to_owned()),
                    _ => {}
                }
            }
            let mut words = rest.split_whitespace();
            source.uris = vec![words.next()?.to_owned()];
            source.suites = vec![words.next()?.to_owned()];
            source.components = words.map(str::to_owned).collect();
            Some(source)
        })
        .collect()
}

/// Picks the Debian entry of the release: a `deb` entry whose suites include `codename`
/// itself (not `-security`/`-updates`) with component `main`. Preferred: one from a file named
/// `debian.sources`, then one signed by the Debian archive keyring; else the first.
/// `files` holds (path, content); `.sources` files are deb822, the others one-line.
fn pick_debian_source(
    files: &[(String, String)],
    codename: &str,
) -> Result<AptSource, SourcesError> {
    let mut best: Option<(u8, AptSource)> = None;
    for (name, text) in files {
        let deb822 = name.ends_with(".sources");
        let entries = if deb822 {
            parse_deb822(text)
        } else {
            parse_one_line(text)
        };
        for e in entries {
            if !e.suites.iter().any(|s| s == codename) || !e.components.iter().any(|c| c == "main")
            {
                continue;
            }
            let mut score = 0;
            if name.rsplit('/').next() == Some("debian.sources") {
                score += 2;
            }
            if e.signed_by
                .as_deref()
                .is_some_and(|s| s.contains("debian-archive-keyring"))
            {
                score += 1;
            }
            if best.as_ref().is_none_or(|(b, _)| score > *b) {
                best = Some((score, e));
            }
        }
    }
    best.map(|(_, e)| e)
        .ok_or_else(|| SourcesError::NoDebianEntry {
            codename: codename.to_owned(),
            files: files.iter().map(|(n, _)| n.clone()).collect(),
        })
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_work_directory_is_private_and_new_each_time() {
        let a = WorkDir::create().unwrap();
        let b = WorkDir::create().unwrap();
        assert_ne!(a.path, b.path);
        let mode = fs::metadata(&a.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        let path = a.path.clone();
        a.remove().unwrap();
        assert!(!path.exists());
        let path = b.path.clone();
        drop(b);
        assert!(!path.exists());
    }

    #[test]
    fn pipe_max_size_parses_and_the_sysctl_file_sets_enough() {
        assert_eq!(parse_pipe_max_size("1048576\n").unwrap(), 1 << 20);
        for bad in ["", "x", "-4", "4 MiB"] {
            let e = parse_pipe_max_size(bad).unwrap_err();
            assert!(format!("{e:#}").contains("not a number"), "{bad:?}: {e:#}");
        }
        let text = sysctl_file_content();
        let line = text
            .lines()
            .find(|l| l.starts_with("fs.pipe-max-size"))
            .unwrap();
        let value = parse_pipe_max_size(line.split('=').nth(1).unwrap()).unwrap();
        assert!(value >= MIN_PIPE_MAX_SIZE, "{line}");
        assert!(SYSCTL_FILE.starts_with("/etc/sysctl.d/") && SYSCTL_FILE.ends_with(".conf"));
        assert!(read_pipe_max_size(Path::new("/nonexistent/pipe-max-size")).is_err());
    }

    #[test]
    fn pipe_max_size_is_raised_never_lowered_and_persisted_once() {
        let dir = WorkDir::create().unwrap();
        let sysctl = dir.path.join("pipe-max-size");
        let file = dir.path.join("60-quic-live-migrate.conf");
        fs::write(&sysctl, "1048576\n").unwrap();
        ensure_pipe_max_size_at(&sysctl, &file).unwrap();
        assert_eq!(read_pipe_max_size(&sysctl).unwrap(), MIN_PIPE_MAX_SIZE);
        assert!(persisted(&file));
        let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        // Idempotent: a second run changes nothing; a larger value is kept.
        let before = fs::metadata(&file).unwrap().modified().unwrap();
        fs::write(&sysctl, "16777216").unwrap();
        ensure_pipe_max_size_at(&sysctl, &file).unwrap();
        assert_eq!(read_pipe_max_size(&sysctl).unwrap(), 16 << 20);
        assert_eq!(fs::metadata(&file).unwrap().modified().unwrap(), before);
        // A machine whose value is already high enough gets no file of ours (it could lower
        // the machine's own, larger setting at boot).
        let other = dir.path.join("other.conf");
        ensure_pipe_max_size_at(&sysctl, &other).unwrap();
        assert!(!other.exists());
        // A damaged sysctl value is an error, not a write.
        fs::write(&sysctl, "garbage").unwrap();
        assert!(ensure_pipe_max_size_at(&sysctl, &file).is_err());
        assert_eq!(fs::read_to_string(&sysctl).unwrap(), "garbage");
        dir.remove().unwrap();
    }

    #[test]
    fn an_account_that_does_not_exist_is_missing() {
        assert!(user_exists("root"));
        assert!(!user_exists("no-such-user-qlm-test"));
    }

    use super::*;

    const DEB822: &str = "\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

    fn v(major: u32, minor: u32, patch: u32) -> Version {
        Version {
            major,
            minor,
            patch,
        }
    }

    #[test]
    fn deb822_picks_the_release_stanza_not_security() {
        let files = vec![(
            "/etc/apt/sources.list.d/debian.sources".to_owned(),
            DEB822.to_owned(),
        )];
        let s = pick_debian_source(&files, "bookworm").unwrap();
        assert_eq!(s.uris, ["http://mirror.example/debian"]);
        assert_eq!(
            s.signed_by.as_deref(),
            Some("/usr/share/keyrings/debian-archive-keyring.gpg")
        );
        let stanza = s.sid_stanza();
        assert_eq!(
            stanza,
            "Types: deb\nURIs: http://mirror.example/debian\nSuites: sid\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        );
    }

    #[test]
    fn deb822_security_only_is_no_debian_entry() {
        let security_only = DEB822.split("\n\n").nth(1).unwrap().to_owned();
        let files = vec![("x.sources".to_owned(), security_only)];
        assert_eq!(
            pick_debian_source(&files, "bookworm"),
            Err(SourcesError::NoDebianEntry {
                codename: "bookworm".into(),
                files: vec!["x.sources".into()],
            })
        );
    }

    #[test]
    fn deb822_skips_disabled_src_and_keeps_inline_keys() {
        let text = "\
Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://off.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb
URIs: http://a.example/debian http://b.example/debian
Suites: bookworm
Components: main contrib
Architectures: amd64
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 abc
 -----END PGP PUBLIC KEY BLOCK-----
";
        let all = parse_deb822(text);
        assert_eq!(all.len(), 1);
        let s = pick_debian_source(&[("a.sources".into(), text.into())], "bookworm").unwrap();
        assert_eq!(s.uris.len(), 2);
        assert_eq!(s.architectures.as_deref(), Some("amd64"));
        let stanza = s.sid_stanza();
        assert!(stanza.contains("Signed-By: \n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n"));
        assert!(stanza.contains("Architectures: amd64\n"));
        // The written stanza parses back to the same archive with suite sid.
        let back = parse_deb822(&stanza);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].uris, s.uris);
        assert_eq!(back[0].suites, ["sid"]);
        assert_eq!(back[0].signed_by, s.signed_by);
    }

    #[test]
    fn the_debian_file_wins_over_a_third_party_one() {
        let third =
            "Types: deb\nURIs: http://vendor.example/apt\nSuites: bookworm\nComponents: main\n";
        let files = vec![
            (
                "/etc/apt/sources.list.d/a-vendor.sources".to_owned(),
                third.to_owned(),
            ),
            (
                "/etc/apt/sources.list.d/debian.sources".to_owned(),
                DEB822.to_owned(),
            ),
        ];
        let s = pick_debian_source(&files, "bookworm").unwrap();
        assert_eq!(s.uris, ["http://mirror.example/debian"]);
    }

    #[test]
    fn one_line_format() {
        let text = "\
# a comment
deb-src http://mirror.example/debian bookworm main
deb http://mirror.example/debian-security bookworm-security main
deb [arch=amd64,arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian bookworm main contrib # trailing
deb http://mirror.example/debian bookworm-updates main
";
        let all = parse_one_line(text);
        assert_eq!(all.len(), 3);
        let s = pick_debian_source(&[("/etc/apt/sources.list".into(), text.into())], "bookworm")
            .unwrap();
        assert_eq!(s.uris, ["http://mirror.example/debian"]);
        assert_eq!(s.components, ["main", "contrib"]);
        assert_eq!(s.architectures.as_deref(), Some("amd64 arm64"));
        assert_eq!(
            s.signed_by.as_deref(),
            Some("/usr/share/keyrings/debian-archive-keyring.gpg")
        );
        assert!(s.sid_stanza().contains("Suites: sid\nComponents: main\n"));
    }

    #[test]
    fn no_debian_entry_is_a_typed_error_with_a_clear_message() {
        let files = vec![
            (
                "/etc/apt/sources.list".to_owned(),
                "deb http://vendor.example/x nodistro main\n".to_owned(),
            ),
            (
                "/etc/apt/sources.list.d/n.sources".to_owned(),
                String::new(),
            ),
        ];
        let err = pick_debian_source(&files, "bookworm").unwrap_err();
        assert!(
            matches!(&err, SourcesError::NoDebianEntry { codename, files } if codename == "bookworm" && files.len() == 2)
        );
        let msg = err.to_string();
        assert!(msg.contains("suite `bookworm`"), "{msg}");
        assert!(msg.contains("/etc/apt/sources.list.d/n.sources"), "{msg}");
        assert!(matches!(
            pick_debian_source(&[], "bookworm"),
            Err(SourcesError::NoDebianEntry { .. })
        ));
    }

    #[test]
    fn versions() {
        assert_eq!(parse_criu_version("4.2.1"), Some(v(4, 2, 1)));
        assert_eq!(parse_criu_version("3.17.1"), Some(v(3, 17, 1)));
        assert_eq!(parse_criu_version("Version: 4.2\n"), Some(v(4, 2, 0)));
        assert_eq!(
            parse_criu_version("warning: x\nVersion: 4.2.1\nGitID: v4.2.1-3-gabc\n"),
            Some(v(4, 2, 1))
        );
        assert_eq!(parse_criu_version("Version: 4.3-rc1"), Some(v(4, 3, 0)));
        for garbage in [
            "",
            "garbage",
            "Version:",
            "Version: x.y",
            "4",
            "4.",
            ".2",
            "4..1",
            "99999999999.1",
            "-4.2",
            "GitID: v4.2",
        ] {
            assert_eq!(parse_criu_version(garbage), None, "{garbage:?}");
        }
        assert!(v(4, 2, 1) >= MIN_CRIU);
        assert!(v(4, 2, 0) >= MIN_CRIU);
        assert!(v(4, 1, 9) < MIN_CRIU);
        assert!(v(3, 17, 1) < MIN_CRIU);
        assert!(v(10, 0, 0) > MIN_CRIU);
        assert_eq!(v(4, 2, 1).to_string(), "4.2.1");
    }

    #[test]
    fn euid_codename_and_installed() {
        assert_eq!(parse_euid("Name:\tx\nUid:\t1000\t0\t0\t0\n"), Some(0));
        assert_eq!(parse_euid("Uid:\t0\t1000\t0\t0\n"), Some(1000));
        assert_eq!(parse_euid("Uid:\n"), None);
        assert_eq!(
            parse_codename(
                "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_CODENAME=bookworm\n"
            ),
            Some("bookworm".into())
        );
        assert_eq!(
            parse_codename("VERSION=\"12 (bookworm)\"\n"),
            Some("bookworm".into())
        );
        assert_eq!(parse_codename("NAME=x\n"), None);
        let installed = parse_installed("podman ii \nrunc un \niproute2 ii \n");
        assert_eq!(
            installed.into_iter().collect::<Vec<_>>(),
            ["iproute2", "podman"]
        );
    }

    #[test]
    fn policy_and_depends() {
        let policy = parse_policy(
            "libgnutls30:\n  Installed: 3.7.9\n  Candidate: 3.7.9-2\n  Version table:\n \
             *** 3.7.9-2 500\nlibfoo:\n  Installed: (none)\n  Candidate: (none)\n",
        );
        assert_eq!(policy.get("libgnutls30"), Some(&Some("3.7.9-2".to_owned())));
        assert_eq!(policy.get("libfoo"), Some(&None));
        assert_eq!(policy.get("libbar"), None);
        assert_eq!(
            parse_depends(
                "libbsd0 (>= 0.6.0), libc6 (>= 2.38), libgnutls30t64 (>= 3.8.1), a | b, \
                 python3:any, libcompel1 (= 4.2.1-1)"
            ),
            [
                "libbsd0",
                "libc6",
                "libgnutls30t64",
                "a",
                "python3",
                "libcompel1"
            ]
        );
        assert!(parse_depends("").is_empty());
    }

    #[test]
    fn dirty_tracking_output() {
        let off =
            "Warn  (criu/cr-check.c:824): Dirty tracking is OFF. Memory snapshot will not work.";
        assert_eq!(parse_dirty_track(off, false), DirtyTrack::Off);
        assert_eq!(
            parse_dirty_track("Dirty tracking is ON\n", true),
            DirtyTrack::On
        );
        assert_eq!(parse_dirty_track("", true), DirtyTrack::On);
        assert_eq!(
            parse_dirty_track("Error: no such feature", false),
            DirtyTrack::Unknown
        );
    }

    #[test]
    fn wrapper_runs_criu_through_the_private_loader() {
        let arch = Arch::from_dpkg("amd64").unwrap();
        let s = wrapper_script(
            Path::new("/opt/p"),
            Path::new("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
            &arch,
            "4.2.1-1",
        );
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains(
            "\nexec /opt/p/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path \
             /opt/p/usr/lib/x86_64-linux-gnu:/opt/p/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu:\
             /usr/lib/x86_64-linux-gnu:/lib:/usr/lib /opt/p/usr/sbin/criu \"$@\"\n"
        ));
        assert_eq!(Arch::from_dpkg("mips"), None);
    }

    #[test]
    fn options() {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            o: Options,
        }
        let parse = |a: &[&str]| {
            <Cli as clap::Parser>::try_parse_from(std::iter::once(&"setup").chain(a)).map(|c| c.o)
        };
        assert_eq!(parse(&[]).unwrap(), Options::default());
        assert!(parse(&["--check"]).unwrap().check_only);
        assert!(parse(&["--reinstall-criu"]).unwrap().reinstall_criu);
        assert!(parse(&["--if-needed"]).unwrap().if_needed);
        for bad in [
            &["--bogus"][..],
            &["--check", "--reinstall-criu"],
            &["--if-needed", "--check"],
            &["--if-needed", "--reinstall-criu"],
            &["extra"],
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}: {err}");
        }
    }

    /// Arbitrary text never panics a parser (a deterministic stand-in for proptest, which
    /// xtask does not depend on).
    #[test]
    fn parsers_do_not_panic_on_arbitrary_text() {
        let alphabet: Vec<char> = "ab:# \t\n[]=.()|,-0123456789debVrsionSuts\u{e9}\u{0}"
            .chars()
            .collect();
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..3000 {
            let len = (state % 80) as usize;
            let text: String = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    alphabet[(state % alphabet.len() as u64) as usize]
                })
                .collect();
            let _ = parse_deb822(&text);
            let _ = parse_one_line(&text);
            let _ = pick_debian_source(&[("f.sources".into(), text.clone())], "b");
            let _ = parse_criu_version(&text);
            let _ = parse_euid(&text);
            let _ = parse_codename(&text);
            let _ = parse_installed(&text);
            let _ = parse_policy(&text);
            let _ = parse_depends(&text);
            let _ = parse_dirty_track(&text, false);
            state = state.wrapping_add(1);
        }
    }
}
