//! An agent's configuration file, and `control fleet-init`, which makes one per host with a
//! fleet CA, each host's certificate, the fleet's token key and the service certificate.
//!
//! ```text
//!  fleet-init --out F --host a=10.233.0.11 --host b=10.233.0.12 ...
//!   F/ca.pem                    the fleet CA (public; what clients and agents trust)
//!   F/<host>/agent.json         this file's format (`Config`)
//!   F/<host>/agent-cert.pem     the host's agent certificate (DNS name <host>.agents.qlm)
//!   F/<host>/agent-key.pem      its key (0600)
//!   F/<host>/token.key          the fleet's HMAC token key (0600, the same on every host)
//!   F/<host>/service-cert.pem   the services' certificate (every host address), and
//!   F/<host>/service-key.pem    its key (0600): a service may start on any host
//! ```
//!
//! The CA's private key is not written: adding a host means a new fleet-init. Every folder is
//! 0700 and every key 0600, created exclusively.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use agent_protocol::Name;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::secure;

/// The DNS name in a host's agent certificate.
pub(crate) fn agent_dns(host: &Name) -> String {
    format!("{host}.agents.qlm")
}

/// Default UDP port of the agents' QUIC endpoint.
pub(crate) const AGENT_PORT: u16 = 7443;
/// Where every agent keeps its private storage: the same path on every host, since a
/// restored server reopens its files (log, admin folder) by path.
pub(crate) const DEFAULT_STORAGE: &str = "/var/lib/quic-live-migrate/agent";

/// An agent's configuration (`agent.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// This host's name.
    pub(crate) host: Name,
    /// This host's address (services are reached at it; the agent listens on it).
    pub(crate) address: IpAddr,
    /// The agents' UDP port.
    pub(crate) agent_port: u16,
    /// The other hosts' agents.
    pub(crate) peers: BTreeMap<Name, SocketAddr>,
    /// The hosts this one may send services to and receive them from.
    pub(crate) allow: Vec<Name>,
    /// The fleet CA (PEM).
    pub(crate) ca: PathBuf,
    /// This agent's certificate and key (PEM).
    pub(crate) cert: PathBuf,
    /// Its key.
    pub(crate) key: PathBuf,
    /// The fleet's token key (32 raw bytes).
    pub(crate) token_key: PathBuf,
    /// The services' certificate and key (PEM).
    pub(crate) service_cert: PathBuf,
    /// Its key.
    pub(crate) service_key: PathBuf,
    /// Host ports for services: `[first, last]`.
    pub(crate) service_ports: (u16, u16),
    /// Most services this host runs at once.
    pub(crate) max_services: u32,
    /// Metrics and health (HTTP) on this local address.
    pub(crate) metrics: SocketAddr,
    /// Requests per second each peer may make (token bucket), and the burst.
    pub(crate) peer_rate: (u32, u32),
    /// How long a token is valid, seconds.
    pub(crate) token_lifetime_s: u64,
    /// How long an inbound migration may go without a request from its source before this
    /// agent gives it up (its source's agent died and did not come back), seconds.
    #[serde(default = "default_inbound_stale_s")]
    pub(crate) inbound_stale_s: u64,
}

fn default_inbound_stale_s() -> u64 {
    120
}

impl Config {
    /// Loads and checks `path`.
    pub(crate) fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the agent configuration {}", path.display()))?;
        let config: Config = serde_json::from_str(&text)
            .with_context(|| format!("{} is not an agent configuration", path.display()))?;
        config
            .check()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(config)
    }

    /// What a configuration must hold.
    pub(crate) fn check(&self) -> Result<()> {
        if self.peers.contains_key(&self.host) {
            bail!("host {} lists itself as a peer", self.host);
        }
        for a in &self.allow {
            if !self.peers.contains_key(a) {
                bail!("allowed host {a} is not among the peers");
            }
        }
        let (first, last) = self.service_ports;
        if first == 0 || first > last {
            bail!("service ports {first}-{last}: not a range of ports");
        }
        if self.max_services == 0 {
            bail!("max_services is 0");
        }
        if self.peer_rate.0 == 0 || self.peer_rate.1 == 0 {
            bail!("peer_rate must allow at least one request");
        }
        if self.token_lifetime_s == 0 || self.token_lifetime_s > 3600 {
            bail!("token_lifetime_s must be 1..=3600");
        }
        if !(5..=86_400).contains(&self.inbound_stale_s) {
            bail!("inbound_stale_s must be 5..=86400");
        }
        Ok(())
    }

    /// This agent's QUIC address.
    pub(crate) fn listen(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.agent_port)
    }
}

/// One host of `fleet-init`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostArg {
    pub(crate) name: Name,
    pub(crate) address: IpAddr,
}

impl std::str::FromStr for HostArg {
    type Err = String;
    fn from_str(s: &str) -> Result<HostArg, String> {
        let (name, addr) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected NAME=ADDRESS, e.g. a=10.233.0.11"))?;
        let name = Name::new(name).map_err(|e| e.to_string())?;
        let address = addr
            .parse()
            .map_err(|e| format!("{addr:?} is not an IP address: {e}"))?;
        Ok(HostArg { name, address })
    }
}

/// `control fleet-init`.
#[derive(Debug, Clone)]
pub(crate) struct FleetInit {
    pub(crate) out: PathBuf,
    pub(crate) hosts: Vec<HostArg>,
    pub(crate) service_ports: (u16, u16),
    pub(crate) max_services: u32,
    pub(crate) metrics_port: u16,
    pub(crate) inbound_stale_s: u64,
}

fn pem_key(key: &rcgen::KeyPair) -> String {
    key.serialize_pem()
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    let mut f = secure::create_private(path)?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

fn write_public(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut f = secure::create_private(path)?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes the fleet's folder; refuses an existing one.
pub(crate) fn fleet_init(args: &FleetInit) -> Result<()> {
    if args.hosts.len() < 2 {
        bail!("a fleet needs at least two hosts (--host NAME=ADDRESS, repeated)");
    }
    let mut seen = std::collections::BTreeSet::new();
    for h in &args.hosts {
        if !seen.insert(&h.name) {
            bail!("host {} is given twice", h.name);
        }
    }
    if args.out.exists() {
        bail!(
            "{} exists: fleet-init writes a new folder (remove it first)",
            args.out.display()
        );
    }
    secure::private_dir(&args.out)?;

    let ca_key = rcgen::KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "quic-live-migrate fleet CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
    write_public(&args.out.join("ca.pem"), &ca.pem())?;

    // The services' certificate: every host address, so that a client verifies the server
    // wherever it runs, plus "localhost".
    let mut service_names: Vec<String> = args.hosts.iter().map(|h| h.address.to_string()).collect();
    service_names.push("localhost".into());
    let service_key = rcgen::KeyPair::generate()?;
    let mut service_params = rcgen::CertificateParams::new(service_names)?;
    service_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let service_cert = service_params.signed_by(&service_key, &ca)?;

    let token_key = migration_crypto::TokenKey::generate()?;

    for h in &args.hosts {
        let dir = args.out.join(h.name.as_str());
        secure::private_dir(&dir)?;
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![agent_dns(&h.name)])?;
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(h.address));
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("agent {}", h.name));
        let cert = params.signed_by(&key, &ca)?;
        write_public(&dir.join("ca.pem"), &ca.pem())?;
        write_public(&dir.join("agent-cert.pem"), &cert.pem())?;
        write_private(&dir.join("agent-key.pem"), pem_key(&key).as_bytes())?;
        migration_crypto::write_token_key_file(&dir.join("token.key"), &token_key)?;
        write_public(&dir.join("service-cert.pem"), &service_cert.pem())?;
        write_private(
            &dir.join("service-key.pem"),
            pem_key(&service_key).as_bytes(),
        )?;
        let peers: BTreeMap<Name, SocketAddr> = args
            .hosts
            .iter()
            .filter(|p| p.name != h.name)
            .map(|p| (p.name.clone(), SocketAddr::new(p.address, AGENT_PORT)))
            .collect();
        let config = Config {
            host: h.name.clone(),
            address: h.address,
            agent_port: AGENT_PORT,
            allow: peers.keys().cloned().collect(),
            peers,
            ca: dir.join("ca.pem"),
            cert: dir.join("agent-cert.pem"),
            key: dir.join("agent-key.pem"),
            token_key: dir.join("token.key"),
            service_cert: dir.join("service-cert.pem"),
            service_key: dir.join("service-key.pem"),
            service_ports: args.service_ports,
            max_services: args.max_services,
            metrics: SocketAddr::from(([127, 0, 0, 1], args.metrics_port)),
            peer_rate: (50, 100),
            token_lifetime_s: 120,
            inbound_stale_s: args.inbound_stale_s,
        };
        config.check()?;
        let json = serde_json::to_string_pretty(&config)?;
        write_public(&dir.join("agent.json"), &json)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent.json: a valid one, with `overrides` (`(key, JSON value)`) replacing or
    /// adding fields.
    fn text(overrides: &[(&str, &str)]) -> String {
        let mut fields: Vec<(&str, &str)> = vec![
            ("host", r#""a""#),
            ("address", r#""10.0.0.1""#),
            ("agent_port", "7000"),
            ("peers", r#"{ "b": "10.0.0.2:7000" }"#),
            ("allow", r#"["b"]"#),
            ("ca", r#""/f/ca.pem""#),
            ("cert", r#""/f/cert.pem""#),
            ("key", r#""/f/key.pem""#),
            ("token_key", r#""/f/token.key""#),
            ("service_cert", r#""/f/sc.pem""#),
            ("service_key", r#""/f/sk.pem""#),
            ("service_ports", "[4300, 4399]"),
            ("max_services", "8"),
            ("metrics", r#""127.0.0.1:9464""#),
            ("peer_rate", "[50, 100]"),
            ("token_lifetime_s", "120"),
        ];
        for (k, v) in overrides {
            match fields.iter_mut().find(|(key, _)| key == k) {
                Some(f) => f.1 = v,
                None => fields.push((k, v)),
            }
        }
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!(r#""{k}": {v}"#))
            .collect();
        format!("{{{}}}", body.join(", "))
    }

    fn load(json: &str) -> Result<Config> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("agent.json");
        std::fs::write(&path, json)?;
        Config::load(&path)
    }

    #[test]
    fn the_stale_limit_defaults_and_is_bounded() {
        assert_eq!(load(&text(&[])).unwrap().inbound_stale_s, 120);
        assert_eq!(
            load(&text(&[("inbound_stale_s", "30")]))
                .unwrap()
                .inbound_stale_s,
            30
        );
        for bad in [0u64, 4, 86_401] {
            let e = format!(
                "{:#}",
                load(&text(&[("inbound_stale_s", &bad.to_string())])).unwrap_err()
            );
            assert!(
                e.contains("inbound_stale_s must be 5..=86400"),
                "{bad}: {e}"
            );
        }
        let e = format!(
            "{:#}",
            load(&text(&[("inbound_stale_s", r#""soon""#)])).unwrap_err()
        );
        assert!(e.contains("is not an agent configuration"), "{e}");
    }

    #[test]
    fn bad_configurations_are_refused_with_the_reason() {
        let cases = [
            (
                "peers",
                r#"{ "a": "10.0.0.1:7000" }"#,
                "lists itself as a peer",
            ),
            ("allow", r#"["z"]"#, "allowed host z is not among the peers"),
            ("service_ports", "[4399, 4300]", "not a range of ports"),
            ("max_services", "0", "max_services is 0"),
            ("token_lifetime_s", "7200", "token_lifetime_s must be"),
            ("surprise", "1", "unknown field"),
        ];
        for (field, value, want) in cases {
            let e = format!("{:#}", load(&text(&[(field, value)])).unwrap_err());
            assert!(e.contains(want), "{field}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("agent.json");
        std::fs::write(&garbage, b"\xff\xfe not json").unwrap();
        assert!(Config::load(&garbage).is_err());
        assert!(Config::load(&dir.path().join("absent.json")).is_err());
    }
}
