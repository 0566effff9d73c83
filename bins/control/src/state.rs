//! What `control up` set up, kept in the state directory so that later commands (and
//! `control down` after a failure) know what to drive and what to remove.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// Version of the state file layout.
const STATE_VERSION: u32 = 2;

/// One of the two containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Side {
    /// The source container (host port `SRC_PORT`).
    A,
    /// The target container (host port `DST_PORT`).
    B,
}

impl Side {
    pub(crate) fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::A => "A",
            Side::B => "B",
        })
    }
}

/// A container that provides a network namespace and a host port map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Container {
    pub(crate) name: String,
    /// Its network namespace (podman's SandboxKey).
    pub(crate) netns: PathBuf,
    /// The host UDP port mapped to its port 4242.
    pub(crate) host_port: u16,
}

/// The deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct State {
    pub(crate) version: u32,
    /// The container image.
    pub(crate) image: String,
    pub(crate) a: Container,
    pub(crate) b: Container,
    /// The server process (the same PID after every restore).
    pub(crate) server_pid: i32,
    /// The server's parent, which reaps it and restores it (`control supervise`).
    pub(crate) supervisor_pid: i32,
    /// Where the server runs now.
    pub(crate) side: Side,
    /// Certificate the clients trust.
    pub(crate) cert: PathBuf,
    /// The server's admin directory (signals' inputs and outputs).
    pub(crate) admin_dir: PathBuf,
    /// The server's log.
    pub(crate) server_log: PathBuf,
    /// Where CRIU image sets go, one directory per migration.
    pub(crate) images_dir: PathBuf,
    /// Migrations done so far.
    pub(crate) migrations: u32,
    /// The server runs as PID 1 of its own pid namespace (`up --pid-namespace`); absent in
    /// state files written before it existed.
    #[serde(default)]
    pub(crate) pid_namespace: bool,
    /// The stable service address, when the deployment has one (`up --front`).
    #[serde(default)]
    pub(crate) front: Option<FrontState>,
    /// The user's server command (`up -- COMMAND`), when it is not the demo server: it knows
    /// nothing of the moves (no announce, no resume request).
    #[serde(default)]
    pub(crate) server_command: Option<Vec<String>>,
}

/// A deployment's front: one address for the clients, NAT to the container the server runs
/// in (`udp-shim-front`; its rules stay in the kernel between commands).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FrontState {
    /// The front's name (its nftables table is `qlm_front_<name>`).
    pub(crate) name: String,
    /// The address clients use.
    pub(crate) front: std::net::SocketAddrV4,
    /// The service's own address, on the loopback of both containers: the front's NAT sends
    /// every datagram there and a host route (`S/32 via` the current container) picks the
    /// container. The server sees the same local address before and after a move (a QUIC
    /// stack that pins its connections' local address, as quinn does, keeps working).
    pub(crate) service: std::net::Ipv4Addr,
    /// The containers' own addresses on podman's network, port 4242 (the probes' targets,
    /// and the host route's gateways).
    pub(crate) a: std::net::SocketAddrV4,
    pub(crate) b: std::net::SocketAddrV4,
    /// Whether iptables-nft's raw table predates the front.
    pub(crate) raw_table_was_there: bool,
}

impl FrontState {
    pub(crate) fn backend(&self, side: Side) -> std::net::SocketAddrV4 {
        match side {
            Side::A => self.a,
            Side::B => self.b,
        }
    }

    /// Where the front's NAT sends datagrams: the service address, port 4242.
    pub(crate) fn service_addr(&self) -> std::net::SocketAddrV4 {
        std::net::SocketAddrV4::new(self.service, crate::podman::CONTAINER_PORT)
    }

    /// The record to take the front over with.
    pub(crate) fn record(&self) -> udp_shim_front::FrontRecord {
        udp_shim_front::FrontRecord {
            name: self.name.clone(),
            front: self.front,
            backend: self.service_addr(),
            netns: None,
            raw_table_was_there: self.raw_table_was_there,
        }
    }
}

impl State {
    pub(crate) fn new_version() -> u32 {
        STATE_VERSION
    }

    /// The server's program name (argv\[0\]'s file name, what [`crate::sys::process_runs`]
    /// checks).
    pub(crate) fn server_comm(&self) -> String {
        match self.server_command.as_ref().and_then(|c| c.first()) {
            Some(program) => crate::deploy::comm_of(std::ffi::OsStr::new(program)),
            None => "swrapper".to_owned(),
        }
    }

    /// Whether the server is the user's (it knows nothing of the moves).
    pub(crate) fn plain_server(&self) -> bool {
        self.server_command.is_some()
    }

    pub(crate) fn container(&self, side: Side) -> &Container {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }

    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("state.json")
    }

    /// Whether a deployment's state exists in `state_dir`.
    pub(crate) fn exists(state_dir: &Path) -> bool {
        Self::path(state_dir).exists()
    }

    /// Loads the state; a clear error when nothing is up or the file is damaged.
    pub(crate) fn load(state_dir: &Path) -> Result<Self> {
        let path = Self::path(state_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!(
                    "nothing is up: no {} (run `control up` first)",
                    path.display()
                )
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let state: State = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is damaged; remove the deployment with `control down`",
                path.display()
            )
        })?;
        if state.version != STATE_VERSION {
            bail!(
                "{} has layout version {}, this control understands {STATE_VERSION}; \
                 remove the deployment with the control that made it",
                path.display(),
                state.version
            );
        }
        Ok(state)
    }

    /// Saves atomically (write, then rename).
    pub(crate) fn save(&self, state_dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).context("encoding the state")?;
        crate::secure::write_private(&Self::path(state_dir), text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> State {
        State {
            version: STATE_VERSION,
            image: "localhost/qlm-server:latest".into(),
            a: Container {
                name: "qlm-a".into(),
                netns: "/run/netns/a".into(),
                host_port: 5242,
            },
            b: Container {
                name: "qlm-b".into(),
                netns: "/run/netns/b".into(),
                host_port: 5243,
            },
            server_pid: 1234,
            supervisor_pid: 1233,
            side: Side::A,
            cert: dir.join("cert.pem"),
            admin_dir: dir.join("admin"),
            server_log: dir.join("server.log"),
            images_dir: dir.join("images"),
            migrations: 0,
            pid_namespace: false,
            front: None,
            server_command: None,
        }
    }

    #[test]
    fn the_servers_program_name_is_the_demos_or_the_commands() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = sample(dir.path());
        assert_eq!(s.server_comm(), "swrapper");
        assert!(!s.plain_server());
        s.server_command = Some(vec!["/opt/x/plain-echo-server".into(), "--listen".into()]);
        assert_eq!(s.server_comm(), "plain-echo-server");
        assert!(s.plain_server());
        s.save(dir.path()).unwrap();
        assert_eq!(State::load(dir.path()).unwrap(), s);
    }

    #[test]
    fn a_front_round_trips_and_names_each_sides_backend() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = sample(dir.path());
        let front = FrontState {
            name: "d12345678".into(),
            front: "10.235.0.1:5300".parse().unwrap(),
            service: "10.236.1.2".parse().unwrap(),
            a: "10.88.0.2:4242".parse().unwrap(),
            b: "10.88.0.3:4242".parse().unwrap(),
            raw_table_was_there: false,
        };
        assert_eq!(front.backend(Side::B), front.b);
        let r = front.record();
        assert_eq!(
            (r.front, r.backend, r.netns),
            (front.front, "10.236.1.2:4242".parse().unwrap(), None)
        );
        s.front = Some(front);
        s.save(dir.path()).unwrap();
        assert_eq!(State::load(dir.path()).unwrap(), s);
        // A state written before fronts existed has none.
        let mut v = serde_json::to_value(sample(dir.path())).unwrap();
        v.as_object_mut().unwrap().remove("front");
        std::fs::write(dir.path().join("state.json"), v.to_string()).unwrap();
        assert_eq!(State::load(dir.path()).unwrap().front, None);
        // A damaged front is refused with the rest of the state.
        let mut v = serde_json::to_value(&s).unwrap();
        v["front"]["front"] = "not an address".into();
        std::fs::write(dir.path().join("state.json"), v.to_string()).unwrap();
        assert!(State::load(dir.path()).is_err());
    }

    #[test]
    fn round_trip_and_sides() {
        let dir = tempfile::tempdir().unwrap();
        let s = sample(dir.path());
        s.save(dir.path()).unwrap();
        assert!(State::exists(dir.path()));
        assert_eq!(State::load(dir.path()).unwrap(), s);
        assert_eq!(s.container(Side::B).host_port, 5243);
        assert_eq!(Side::A.other(), Side::B);
    }

    #[test]
    fn missing_damaged_and_foreign_state_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = format!("{:#}", State::load(dir.path()).unwrap_err());
        assert!(err.contains("nothing is up"), "{err}");
        std::fs::write(dir.path().join("state.json"), "{ not json").unwrap();
        let err = format!("{:#}", State::load(dir.path()).unwrap_err());
        assert!(err.contains("damaged"), "{err}");
        let mut s = serde_json::to_value(sample(dir.path())).unwrap();
        s["version"] = 99.into();
        std::fs::write(dir.path().join("state.json"), s.to_string()).unwrap();
        let err = format!("{:#}", State::load(dir.path()).unwrap_err());
        assert!(err.contains("layout version 99"), "{err}");
        let mut s = serde_json::to_value(sample(dir.path())).unwrap();
        s["surprise"] = 1.into();
        std::fs::write(dir.path().join("state.json"), s.to_string()).unwrap();
        assert!(State::load(dir.path()).is_err());
    }
}
