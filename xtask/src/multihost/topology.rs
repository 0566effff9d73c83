//! The scenario network: simulated hosts and a client site, each a network namespace with its
//! own address on one subnet, joined by a switch namespace's bridge.
//!
//! ```text
//!   qlm-mh-<tag>-client        qlm-mh-<tag>-a            qlm-mh-<tag>-b     ...
//!   qlm-mh-eth 10.233.0.2      qlm-mh-eth 10.233.0.11    qlm-mh-eth 10.233.0.12
//!        │ veth                     │ veth                    │ veth
//!   qlm-mh-client ─────────── qlm-mh-a ──────────────── qlm-mh-b      (ports of)
//!   └──────────────── bridge qlm-mh-br in qlm-mh-<tag>-sw ─────────────┘
//! ```
//!
//! Every link is made inside the namespaces (`ip -n <switch> link add ... peer ... netns
//! <node>`), so nothing of the scenario ever exists in the machine's own namespace but the
//! names under `/run/netns`: deleting the namespaces deletes every veth, and a killed run
//! leaves only namespaces, which [`Topology::cleanup_stale`] removes by their exact names.
//!
//! Inside each host: loopback up, `ip_forward` on (a host forwards to its slots, the
//! containers or namespaces behind its address, see control's `slot.rs`), `rp_filter` off. A
//! host's podman then puts its bridge and port maps inside the host's namespace.
//!
//! Link impairment. Loss: iptables' `statistic` match, in raw PREROUTING of every node,
//! drops a random share of the datagrams arriving over the node's link (forwarded traffic to
//! a host's slots included), so each datagram between two nodes is lost with that
//! probability once. Not on the way out: a datagram that netfilter drops in OUTPUT fails
//! the sender's `sendto` with EPERM, which a real lossy link never does. Delay needs `tc ... netem`; this machine's
//! kernel has no sch_netem (`Error: Specified qdisc kind is unknown.`, likewise fq, fq_codel,
//! cake and etf; only tbf and pfifo exist, which shape rates but cannot delay), so a spec
//! with a delay fails to build here, saying so, and builds where netem exists (netem on both
//! ends of each link: each link adds the delay in each direction).

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The prefix of every name the scenario network makes.
pub(crate) const PREFIX: &str = "qlm-mh-";

/// The bridge in the switch namespace.
const BRIDGE: &str = "qlm-mh-br";

/// Each node's end of its link (inside the node's namespace).
pub(crate) const NODE_IF: &str = "qlm-mh-eth";

/// The default scenario subnet.
pub(crate) const DEFAULT_SUBNET: &str = "10.233.0.0/24";

/// The client site's host number in the subnet (`.2`).
const CLIENT_HOST_NUMBER: u32 = 2;

/// The first host's host number (`.11`, then `.12`, ...).
const FIRST_HOST_NUMBER: u32 = 11;

/// Linux's limit on interface names (IFNAMSIZ - 1): the switch port `qlm-mh-<node>` must fit.
const MAX_IFNAME: usize = 15;

/// A node name's longest length (the switch port is `qlm-mh-<node>`).
const MAX_NODE_NAME: usize = MAX_IFNAME - PREFIX.len();

/// The longest scenario tag.
const MAX_TAG: usize = 24;

/// An IPv4 subnet, `a.b.c.d/n`, with `a.b.c.d` its network address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Subnet {
    network: Ipv4Addr,
    prefix_len: u8,
}

impl Subnet {
    /// The address of host number `n` (`.n` in a /24), if the subnet holds it (not the
    /// network or broadcast address).
    pub(crate) fn host(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.prefix_len));
        (n >= 1 && u64::from(n) < size - 1).then(|| Ipv4Addr::from(u32::from(self.network) + n))
    }

    pub(crate) fn prefix_len(&self) -> u8 {
        self.prefix_len
    }
}

impl FromStr for Subnet {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (addr, len) = s
            .split_once('/')
            .with_context(|| format!("subnet `{s}`: expected a.b.c.d/n"))?;
        let network: Ipv4Addr = addr
            .parse()
            .with_context(|| format!("subnet `{s}`: `{addr}` is not an IPv4 address"))?;
        let prefix_len: u8 = len
            .parse()
            .ok()
            .filter(|l| (8..=30).contains(l))
            .with_context(|| format!("subnet `{s}`: the prefix length must be 8 to 30"))?;
        let host_bits = u32::MAX >> prefix_len;
        if u32::from(network) & host_bits != 0 {
            bail!(
                "subnet `{s}`: {network} is not the network address of a /{prefix_len} (host \
                 bits set)"
            );
        }
        Ok(Subnet {
            network,
            prefix_len,
        })
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// What every link adds: a delay in each direction, and a share of the datagrams lost on
/// their way between two nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct LinkShape {
    /// Added to each direction of each link (needs tc netem; see the module doc).
    pub(crate) delay: Option<Duration>,
    /// Percent (0 to 100) of the datagrams dropped where they arrive (each datagram between
    /// two nodes once, in either direction).
    pub(crate) loss_percent: Option<f64>,
    /// The links' MTU (None: the kernel's 1500).
    pub(crate) mtu: Option<u16>,
}

/// What to build.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    /// In every namespace's name (`qlm-mh-<tag>-<node>`), so that two scenarios (or a test
    /// and a run) do not collide, and a killed run's leftovers are found by exact name.
    pub(crate) tag: String,
    /// The hosts' names, in order: `a, b, c, ...` by default; host `i` gets `.11 + i`.
    pub(crate) hosts: Vec<String>,
    /// The client site's name (`.2`).
    pub(crate) client: String,
    pub(crate) subnet: Subnet,
    pub(crate) link: LinkShape,
}

impl Spec {
    /// `hosts` hosts named `a, b, c, ...`, the client site `client`, the default subnet
    /// (10.233.0.0/24), no impairment.
    pub(crate) fn new(tag: &str, hosts: usize) -> Result<Self> {
        if hosts > 26 {
            bail!("at most 26 hosts (named a to z), not {hosts}");
        }
        Ok(Spec {
            tag: tag.to_owned(),
            hosts: (b'a'..=b'z')
                .take(hosts)
                .map(|c| char::from(c).to_string())
                .collect(),
            client: "client".to_owned(),
            subnet: DEFAULT_SUBNET.parse()?,
            link: LinkShape::default(),
        })
    }

    /// The switch namespace's name.
    pub(crate) fn switch_netns(&self) -> String {
        format!("{PREFIX}{}-sw", self.tag)
    }

    /// The namespace name of node `node` (a host or the client site).
    pub(crate) fn netns_name(&self, node: &str) -> String {
        format!("{PREFIX}{}-{node}", self.tag)
    }

    /// Every namespace name the spec makes: the switch, the hosts, the client site.
    pub(crate) fn netns_names(&self) -> Vec<String> {
        let mut v = vec![self.switch_netns()];
        v.extend(self.hosts.iter().map(|h| self.netns_name(h)));
        v.push(self.netns_name(&self.client));
        v
    }

    /// Refuses what cannot be built, before anything is made.
    fn check(&self) -> Result<()> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if !name_ok(&self.tag) || self.tag.len() > MAX_TAG {
            bail!(
                "scenario tag `{}`: use 1 to {MAX_TAG} of a-z, 0-9 and -",
                self.tag
            );
        }
        if self.hosts.is_empty() {
            bail!("a scenario network needs at least one host");
        }
        let mut seen = std::collections::BTreeSet::new();
        for node in self.hosts.iter().chain([&self.client]) {
            if !name_ok(node) || node.len() > MAX_NODE_NAME {
                bail!(
                    "node name `{node}`: use 1 to {MAX_NODE_NAME} of a-z, 0-9 and - (the switch \
                     port `{PREFIX}<node>` is an interface name, at most {MAX_IFNAME} characters)"
                );
            }
            if node == "sw" || node == "br" {
                bail!("node name `{node}` is reserved (the switch)");
            }
            if !seen.insert(node.as_str()) {
                bail!("node name `{node}` is used twice (hosts and client site must differ)");
            }
        }
        let last = FIRST_HOST_NUMBER + u32::try_from(self.hosts.len())? - 1;
        if self.subnet.host(last).is_none() || self.subnet.host(CLIENT_HOST_NUMBER).is_none() {
            bail!(
                "subnet {} is too small: the client site is .{CLIENT_HOST_NUMBER} and {} hosts \
                 need .{FIRST_HOST_NUMBER} to .{last}",
                self.subnet,
                self.hosts.len()
            );
        }
        if let Some(p) = self.link.loss_percent
            && !(0.0..=100.0).contains(&p)
        {
            bail!("link loss {p}%: must be 0 to 100");
        }
        Ok(())
    }
}

/// A host or the client site: its namespace and its address on the scenario network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    /// The node's name in the spec (`a`, `b`, ..., `client`).
    pub(crate) name: String,
    /// The namespace's name (`ip netns`, `ip -n`).
    pub(crate) netns: String,
    /// Its address on the scenario network.
    pub(crate) addr: Ipv4Addr,
}

impl Node {
    /// The namespace's file: give it to `nsenter --net=` or `setns`.
    pub(crate) fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }
}

/// A built scenario network. [`Topology::destroy`] (or dropping it) deletes every namespace
/// it made, and with them every link.
#[derive(Debug)]
pub(crate) struct Topology {
    spec: Spec,
    hosts: Vec<Node>,
    client: Node,
    /// The namespaces this value made, in order; deleted in reverse.
    made: Vec<String>,
}

impl Topology {
    /// Builds `spec`'s network. On any failure, deletes whatever it had made (and nothing it
    /// did not make: an existing namespace of the same name is left alone and named in the
    /// error) and returns the error.
    pub(crate) fn build(spec: &Spec) -> Result<Topology> {
        spec.check()?;
        let node = |name: &str, n: u32| -> Result<Node> {
            Ok(Node {
                name: name.to_owned(),
                netns: spec.netns_name(name),
                addr: spec
                    .subnet
                    .host(n)
                    .context("the subnet was checked to hold every node")?,
            })
        };
        let hosts = spec
            .hosts
            .iter()
            .zip(FIRST_HOST_NUMBER..)
            .map(|(h, n)| node(h, n))
            .collect::<Result<Vec<_>>>()?;
        let client = node(&spec.client, CLIENT_HOST_NUMBER)?;
        let mut topo = Topology {
            spec: spec.clone(),
            hosts,
            client,
            made: Vec::new(),
        };
        match topo.build_inner() {
            Ok(()) => Ok(topo),
            Err(e) => {
                let cleanup = topo.destroy_made();
                match cleanup {
                    Ok(()) => Err(e.context(format!(
                        "building the scenario network `{}` failed; what it had made is removed",
                        spec.tag
                    ))),
                    Err(c) => Err(e.context(format!(
                        "building the scenario network `{}` failed, and removing what it had \
                         made failed too: {c:#}",
                        spec.tag
                    ))),
                }
            }
        }
    }

    fn build_inner(&mut self) -> Result<()> {
        let sw = self.spec.switch_netns();
        self.add_netns(&sw)?;
        ip(&["-n", &sw, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", BRIDGE, "up"])?;
        let nodes: Vec<(Node, bool)> = self
            .hosts
            .iter()
            .map(|h| (h.clone(), true))
            .chain([(self.client.clone(), false)])
            .collect();
        for (node, is_host) in &nodes {
            self.add_netns(&node.netns)?;
            self.link(&sw, node, *is_host)?;
        }
        Ok(())
    }

    /// `ip netns add`, loopback up; recorded for the clean-up once made.
    fn add_netns(&mut self, name: &str) -> Result<()> {
        let path = PathBuf::from("/run/netns").join(name);
        if path.exists() {
            bail!(
                "network namespace {name} already exists (another scenario of the same tag, or \
                 a leftover of a killed run: `Topology::cleanup_stale` removes those); not \
                 touching it"
            );
        }
        ip(&["netns", "add", name]).with_context(|| format!("creating namespace {name}"))?;
        self.made.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// The node's veth into the switch, its address, sysctls and impairment.
    fn link(&self, sw: &str, node: &Node, is_host: bool) -> Result<()> {
        let ns = &node.netns;
        let port = format!("{PREFIX}{}", node.name);
        ip(&[
            "-n", sw, "link", "add", &port, "type", "veth", "peer", "name", NODE_IF, "netns", ns,
        ])
        .with_context(|| format!("linking {ns} to the switch"))?;
        ip(&["-n", sw, "link", "set", &port, "master", BRIDGE])?;
        if let Some(mtu) = self.spec.link.mtu {
            let mtu = mtu.to_string();
            ip(&["-n", sw, "link", "set", &port, "mtu", &mtu])?;
            ip(&["-n", ns, "link", "set", NODE_IF, "mtu", &mtu])?;
            // A bridge takes the smallest MTU of its ports; set it too.
            ip(&["-n", sw, "link", "set", BRIDGE, "mtu", &mtu])?;
        }
        ip(&["-n", sw, "link", "set", &port, "up"])?;
        let cidr = format!("{}/{}", node.addr, self.spec.subnet.prefix_len());
        ip(&["-n", ns, "addr", "add", &cidr, "dev", NODE_IF])?;
        ip(&["-n", ns, "link", "set", NODE_IF, "up"])?;
        let mut sysctls = vec![
            "net.ipv4.conf.all.rp_filter=0".to_owned(),
            "net.ipv4.conf.default.rp_filter=0".to_owned(),
            format!("net.ipv4.conf.{NODE_IF}.rp_filter=0"),
        ];
        if is_host {
            sysctls.push("net.ipv4.ip_forward=1".to_owned());
        }
        let mut args = vec!["netns", "exec", ns, "sysctl", "-q", "-w"];
        args.extend(sysctls.iter().map(String::as_str));
        ip(&args).with_context(|| format!("sysctls in {ns}"))?;
        if let Some(delay) = self.spec.link.delay {
            let d = format!("{}us", delay.as_micros());
            for (where_, dev) in [(ns.as_str(), NODE_IF), (sw, port.as_str())] {
                netem(where_, dev, &d)?;
            }
        }
        if let Some(p) = self.spec.link.loss_percent.filter(|p| *p > 0.0) {
            let prob = format!("{:.6}", p / 100.0);
            ip(&[
                "netns",
                "exec",
                ns,
                "iptables",
                "-t",
                "raw",
                "-A",
                "PREROUTING",
                "-i",
                NODE_IF,
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &prob,
                "-j",
                "DROP",
            ])
            .with_context(|| format!("link loss in {ns} (iptables statistic)"))?;
        }
        Ok(())
    }

    /// The hosts, in the spec's order.
    pub(crate) fn hosts(&self) -> &[Node] {
        &self.hosts
    }

    /// The host called `name`.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn host(&self, name: &str) -> Option<&Node> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// The client site.
    pub(crate) fn client(&self) -> &Node {
        &self.client
    }
    /// The spec it was built from.
    pub(crate) fn spec_ref(&self) -> &Spec {
        &self.spec
    }

    /// Deletes every namespace it made (and with them every link). Processes still running
    /// in a namespace keep it alive without its name: end them first.
    pub(crate) fn destroy(mut self) -> Result<()> {
        self.destroy_made()
    }

    fn destroy_made(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        while let Some(name) = self.made.pop() {
            if let Err(e) = ip(&["netns", "del", &name]) {
                errors.push(format!("{e:#}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!(
                "removing the scenario network's namespaces: {}",
                errors.join("; ")
            )
        }
    }

    /// Removes the namespaces a killed run of `spec` left, by their exact names (nothing
    /// else); returns the names it removed.
    pub(crate) fn cleanup_stale(spec: &Spec) -> Result<Vec<String>> {
        spec.check()?;
        let mut removed = Vec::new();
        for name in spec.netns_names().into_iter().rev() {
            if PathBuf::from("/run/netns").join(&name).exists() {
                ip(&["netns", "del", &name])
                    .with_context(|| format!("removing the stale namespace {name}"))?;
                removed.push(name);
            }
        }
        Ok(removed)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Err(e) = self.destroy_made() {
            eprintln!("xtask: {e:#}");
        }
    }
}

/// `tc qdisc add dev <dev> root netem delay <d>` in namespace `ns`; a kernel without netem is
/// a clear error.
fn netem(ns: &str, dev: &str, delay: &str) -> Result<()> {
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
        ])
        .args(["netem", "delay", delay])
        .output()
        .context("running tc")?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("qdisc kind is unknown") {
        bail!(
            "a link delay needs tc netem, which this kernel lacks (`tc qdisc add ... netem`: \
             {}); no other qdisc here can delay (tbf and pfifo exist; fq, fq_codel, cake and \
             etf do not). Build without a delay, or on a kernel with sch_netem.",
            err.trim()
        );
    }
    bail!("tc netem on {dev} in {ns}: {}", err.trim())
}

/// Runs `ip` with `args`; an error carries the command and its standard error.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if out.status.success() {
        Ok(())
    } else {
        bail!(
            "ip {}: {} ({})",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        )
    }
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
    use std::path::Path;

    use super::*;

    #[test]
    fn subnets_parse_and_refuse() {
        let s: Subnet = "10.233.0.0/24".parse().unwrap();
        assert_eq!(s.to_string(), "10.233.0.0/24");
        assert_eq!(s.host(2), Some(Ipv4Addr::new(10, 233, 0, 2)));
        assert_eq!(s.host(11), Some(Ipv4Addr::new(10, 233, 0, 11)));
        assert_eq!(s.host(255), None, "broadcast");
        assert_eq!(s.host(0), None, "network");
        for bad in [
            "10.233.0.0",
            "10.233.0.1/24",
            "10.233.0.0/31",
            "300.0.0.0/24",
            "x/24",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn specs_are_checked_before_anything_is_made() {
        let ok = Spec::new("t", 3).unwrap();
        ok.check().unwrap();
        assert_eq!(ok.hosts, ["a", "b", "c"]);
        assert_eq!(
            ok.netns_names(),
            [
                "qlm-mh-t-sw",
                "qlm-mh-t-a",
                "qlm-mh-t-b",
                "qlm-mh-t-c",
                "qlm-mh-t-client"
            ]
        );
        let refused = |f: &dyn Fn(&mut Spec), what: &str| {
            let mut s = ok.clone();
            f(&mut s);
            let e = format!("{:#}", s.check().unwrap_err());
            assert!(e.contains(what), "{e}");
        };
        refused(&|s| s.hosts.clear(), "at least one host");
        refused(&|s| s.hosts[1] = "a".into(), "used twice");
        refused(&|s| s.client = "c".into(), "used twice");
        refused(&|s| s.hosts[0] = "sw".into(), "reserved");
        refused(&|s| s.hosts[0] = "Big".into(), "a-z");
        refused(&|s| s.hosts[0] = "nine-long".into(), "at most 15");
        refused(&|s| s.tag = "a/b".into(), "scenario tag");
        refused(
            &|s| s.subnet = "10.233.0.0/29".parse().unwrap(),
            "too small",
        );
        refused(&|s| s.link.loss_percent = Some(120.0), "0 to 100");
        assert!(Spec::new("t", 27).is_err());
    }

    fn ready() -> bool {
        test_support::require("needs root (ip netns, veth)", test_support::is_root())
    }

    /// A tag unique to this process and test.
    fn tag(test: &str) -> String {
        format!("t{}{test}", std::process::id())
    }

    /// A UDP socket bound to `addr` inside the namespace at `netns` (made on a thread that
    /// enters it; the socket stays in that namespace).
    fn udp_in(netns: &Path, addr: SocketAddrV4) -> UdpSocket {
        let netns = netns.to_owned();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&netns).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            UdpSocket::bind(addr).unwrap()
        })
        .join()
        .unwrap()
    }

    /// Sends a datagram from namespace `from` to `to` and checks that the echo answers from
    /// `to` itself.
    fn echo_between(from: &Node, to: &Node, port: u16) {
        let server = udp_in(
            &to.netns_path(),
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
        );
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let echo = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let (n, peer) = server.recv_from(&mut buf).unwrap();
            server.send_to(&buf[..n], peer).unwrap();
            peer
        });
        let client = udp_in(&from.netns_path(), SocketAddrV4::new(from.addr, 0));
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let msg = format!("{} -> {}", from.name, to.name);
        client
            .send_to(msg.as_bytes(), SocketAddrV4::new(to.addr, port))
            .unwrap();
        let mut buf = [0u8; 64];
        let (n, src) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], msg.as_bytes());
        assert_eq!(src, SocketAddr::V4(SocketAddrV4::new(to.addr, port)));
        let peer = echo.join().unwrap();
        assert_eq!(
            peer.ip(),
            std::net::IpAddr::V4(from.addr),
            "no NAT between nodes"
        );
    }

    /// The tag's names under /run/netns, and every link with our prefix in this (the
    /// machine's) namespace, where the scenario network makes none.
    fn leftovers(tag: &str) -> Vec<String> {
        let ours = format!("{PREFIX}{tag}-");
        let mut v: Vec<String> = std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(&ours))
            .collect();
        v.sort();
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        v.extend(
            String::from_utf8_lossy(&links.stdout)
                .lines()
                .filter(|l| l.contains(PREFIX))
                .map(str::to_owned),
        );
        v
    }

    #[test]
    fn three_hosts_and_a_client_site_reach_each_other() {
        if !ready() {
            return;
        }
        let tag = tag("r");
        let spec = Spec::new(&tag, 3).unwrap();
        let topo = Topology::build(&spec).unwrap();
        assert_eq!(
            topo.hosts().iter().map(|h| h.addr).collect::<Vec<_>>(),
            [11, 12, 13].map(|n| Ipv4Addr::new(10, 233, 0, n))
        );
        assert_eq!(topo.client().addr, Ipv4Addr::new(10, 233, 0, 2));
        assert_eq!(topo.host("b").unwrap().netns, format!("qlm-mh-{tag}-b"));
        assert_eq!(
            leftovers(&tag),
            spec.netns_names()
                .iter()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>(),
            "no link in the machine's namespace"
        );
        for (i, h) in topo.hosts().iter().enumerate() {
            echo_between(topo.client(), h, 4242 + i as u16);
        }
        let hosts = topo.hosts();
        echo_between(&hosts[0], &hosts[1], 4300);
        echo_between(&hosts[2], &hosts[0], 4301);
        echo_between(&hosts[1], topo.client(), 4302);
        topo.destroy().unwrap();
        assert_eq!(leftovers(&tag), Vec::<String>::new());
    }

    #[test]
    fn a_failed_build_removes_what_it_made_and_only_that() {
        if !ready() {
            return;
        }
        let tag = tag("f");
        let spec = Spec::new(&tag, 3).unwrap();
        // Host b's namespace exists already: the build makes the switch and host a, fails
        // on b, removes the switch and a, and leaves b (not its own) alone.
        let taken = spec.netns_name("b");
        ip(&["netns", "add", &taken]).unwrap();
        let err = format!("{:#}", Topology::build(&spec).unwrap_err());
        let left = leftovers(&tag);
        ip(&["netns", "del", &taken]).unwrap();
        assert!(
            err.contains(&taken) && err.contains("already exists"),
            "{err}"
        );
        assert!(err.contains("what it had made is removed"), "{err}");
        assert_eq!(left, [taken]);

        // A bad subnet is refused before anything is made.
        let mut bad = Spec::new(&tag, 3).unwrap();
        bad.subnet = "10.233.0.0/29".parse().unwrap();
        let err = format!("{:#}", Topology::build(&bad).unwrap_err());
        assert!(err.contains("too small"), "{err}");
        assert_eq!(leftovers(&tag), Vec::<String>::new());
    }

    #[test]
    fn a_delay_needs_netem_and_loss_drops() {
        if !ready() {
            return;
        }
        let tag = tag("d");
        let mut spec = Spec::new(&tag, 1).unwrap();
        spec.link.delay = Some(Duration::from_millis(5));
        match Topology::build(&spec) {
            // This machine: no sch_netem. The failure comes after the namespaces were made.
            Err(e) => {
                let e = format!("{e:#}");
                assert!(e.contains("netem"), "{e}");
                assert_eq!(leftovers(&tag), Vec::<String>::new());
            }
            Ok(topo) => topo.destroy().unwrap(),
        }
        spec.link.delay = None;
        spec.link.loss_percent = Some(100.0);
        let topo = Topology::build(&spec).unwrap();
        let host = &topo.hosts()[0];
        let server = udp_in(
            &host.netns_path(),
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 4242),
        );
        server
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let client = udp_in(
            &topo.client().netns_path(),
            SocketAddrV4::new(topo.client().addr, 0),
        );
        client
            .send_to(b"lost", SocketAddrV4::new(host.addr, 4242))
            .unwrap();
        assert!(server.recv_from(&mut [0u8; 8]).is_err(), "100% loss");
        topo.destroy().unwrap();
        assert_eq!(leftovers(&tag), Vec::<String>::new());
    }

    #[test]
    fn stale_namespaces_are_removed_by_exact_name() {
        if !ready() {
            return;
        }
        let tag = tag("s");
        let spec = Spec::new(&tag, 2).unwrap();
        let topo = Topology::build(&spec).unwrap();
        // A killed run: the value is forgotten, its namespaces stay.
        std::mem::forget(topo);
        let other = format!("{PREFIX}{tag}-x");
        ip(&["netns", "add", &other]).unwrap();
        let removed = Topology::cleanup_stale(&spec).unwrap();
        let left = leftovers(&tag);
        ip(&["netns", "del", &other]).unwrap();
        assert_eq!(removed.len(), 4, "{removed:?}");
        assert_eq!(left, [other], "only the spec's names are removed");
        assert_eq!(
            Topology::cleanup_stale(&spec).unwrap(),
            Vec::<String>::new()
        );
    }
}
