//! A stable service address for a UDP server that moves between network namespaces.
//!
//! ```text
//!   client ──▶ F:P (the front: a host address and port, for the service's whole life)
//!               │  host's network namespace (the rules live here)
//!               │  raw prerouting: during a hold, NFQUEUE ──▶ holder thread (bounded)
//!               │  prerouting -290: stateless NAT F:P ─▶ backend (one nft map, notrack)
//!               ▼
//!   backend A (netns A) ══switch(B), one nft transaction══▶ backend B (netns B)
//!               │  postrouting: replies from the backend leave from F:P
//!   client ◀── F:P
//! ```
//!
//! [`Front::create`] installs the NAT from the front address to a backend (an address and
//! port in a container's namespace); [`Front::switch`] repoints it in one transaction;
//! replies leave from the front, so the client's 4-tuple never changes and it needs no shim.
//! Around a move, [`Front::hold`] queues the datagrams that reach the front (the server is
//! frozen: they would be lost or answered with ICMP port unreachable), and
//! [`Front::release`] delivers them, in arrival order, to the backend the front points at
//! then: `hold`, freeze, `switch(target)`, restore, `release`. A hold is bounded in bytes,
//! datagrams and time per datagram ([`HoldLimits`]); what crosses a bound is dropped and
//! counted ([`HoldStats`]).
//!
//! The mechanism, and why (measured on kernel 6.18): this kernel has no conntrack netlink
//! (stale NAT entries cannot be flushed) and no nftables `queue` expression, so the NAT is
//! stateless (`notrack`, payload rewrites in an nftables table of the front's own) and the
//! hold is iptables-nft's `NFQUEUE` target in the raw table (priority -300), before the NAT
//! chain (-290). An accepted datagram resumes at the next hook entry, the NAT chain, which
//! maps it to the backend of that moment. The netlink side of the queue is this crate's own
//! minimal code (four nfnetlink_queue messages: bind, verdict, batch verdict, packet; the
//! `nfq` crate panics on malformed attributes and has no batch verdict): packets stay in the
//! kernel until their verdict; the holder keeps only ids, lengths and times. The release is
//! paced ([`HoldLimits::release_batch`]): a burst larger than the server socket's receive
//! buffer would be lost there.
//!
//! What a front creates is named after it and removed by [`Front::close`] or on drop: the
//! table `ip qlm_front_<name>`, the iptables chain `raw QLM_FRONT_<name>` and its jump rule,
//! and iptables-nft's `ip raw` table when the front created it and it is empty again.
//! It needs root (`CAP_NET_ADMIN`, and `CAP_SYS_ADMIN` to enter another namespace), `nft`
//! (Debian: nftables), `iptables-nft` (Debian: iptables) and IPv4 forwarding in the namespace.
//!
//! Not covered: IPv6; clients in the rules' own namespace (their datagrams take the output
//! hook, not prerouting); several front ports per table.

mod book;
mod cmd;
mod holder;
mod nfqueue;
mod rules;

use std::{
    io,
    net::SocketAddrV4,
    path::{Path, PathBuf},
};

pub use book::{HoldLimits, HoldStats};
pub use cmd::Tools;

use cmd::{Netns, Tool};
use holder::Holder;

/// What a front is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontSpec {
    /// Names the front's table and chain: 1 to 18 of `a-z`, `0-9` and `-`, not starting with
    /// `-`.
    pub name: String,
    /// The address clients use: an address of the rules' namespace (or one routed to it)
    /// and a UDP port.
    pub front: SocketAddrV4,
    /// Where the server runs now.
    pub backend: SocketAddrV4,
    /// The network namespace where the rules live (`/var/run/netns/NAME`, `/proc/PID/ns/net`);
    /// `None`: the caller's.
    pub netns: Option<PathBuf>,
    /// The bounds of every hold.
    pub hold_limits: HoldLimits,
    /// Where `nft` and `iptables-nft` are.
    pub tools: Tools,
}

impl FrontSpec {
    /// A spec with the caller's namespace, the default bounds and tools from `PATH`.
    pub fn new(name: impl Into<String>, front: SocketAddrV4, backend: SocketAddrV4) -> Self {
        Self {
            name: name.into(),
            front,
            backend,
            netns: None,
            hold_limits: HoldLimits::default(),
            tools: Tools::default(),
        }
    }
}

/// Why a front could not be created or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrontError {
    /// The name cannot name a front's table and chain.
    #[error("invalid front name {name:?}: {why}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An address cannot be a front or a backend (unspecified, broadcast, multicast, port 0,
    /// backend equal to the front).
    #[error("invalid front spec: {why}")]
    InvalidSpec {
        /// What is wrong.
        why: String,
    },
    /// A program the front needs is not there.
    #[error("`{}` ({tool}) not found: install it (Debian package {package})", path.display())]
    ToolMissing {
        /// Which tool.
        tool: &'static str,
        /// The path or name that was tried.
        path: PathBuf,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// A command failed; its standard error says why (often the kernel refused).
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line (and its input script).
        command: String,
        /// How it ended.
        status: String,
        /// Its standard error.
        stderr: String,
    },
    /// A command could not be run for another reason than a missing program.
    #[error("cannot run {command}: {source}")]
    Spawn {
        /// What was to run.
        command: String,
        /// The operating system's error.
        source: io::Error,
    },
    /// Another front of this namespace has this front address.
    #[error("{front} is already the address of the front table {table}")]
    FrontTaken {
        /// The address asked for.
        front: SocketAddrV4,
        /// The other front's table.
        table: String,
    },
    /// A front of this name exists in the namespace.
    #[error("a front named {name:?} exists already in {netns} (table ip {table})")]
    NameTaken {
        /// The name.
        name: String,
        /// Its table.
        table: String,
        /// The namespace.
        netns: String,
    },
    /// A socket of the namespace has the front's port (on its address or the wildcard).
    #[error("{front} is taken by a socket: {source}")]
    PortInUse {
        /// The front address.
        front: SocketAddrV4,
        /// The error of binding it.
        source: io::Error,
    },
    /// The namespace does not forward IPv4: no datagram could reach a backend.
    #[error("IPv4 forwarding is off in {netns} (sysctl net.ipv4.ip_forward=1)")]
    ForwardingOff {
        /// The namespace.
        netns: String,
    },
    /// The namespace could not be opened or entered.
    #[error("network namespace {}: {source}", path.display())]
    Netns {
        /// Its file.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// The netlink queue (NFQUEUE) refused or failed.
    #[error("NFQUEUE: {what}: {source}")]
    Queue {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// `hold` while a hold runs.
    #[error("front {name}: a hold runs already")]
    AlreadyHolding {
        /// The front.
        name: String,
    },
    /// `release` without a hold.
    #[error("front {name}: no hold to release")]
    NotHolding {
        /// The front.
        name: String,
    },
    /// The queue thread is gone, did not answer or panicked.
    #[error("the front's queue thread {what}")]
    Holder {
        /// What happened.
        what: &'static str,
    },
    /// A detached front cannot be taken over: its rules are gone or changed.
    #[error("front {name} cannot be taken over: {why}")]
    Gone {
        /// The front.
        name: String,
        /// What was found instead.
        why: String,
    },
}

/// What this front made, so that teardown removes exactly that.
#[derive(Debug, Default)]
struct Made {
    table: bool,
    chain: bool,
    jump: bool,
    /// iptables-nft's `ip raw` table was there before this front.
    raw_table_was_there: bool,
}

/// A front address and its NAT to the current backend. Dropping it removes everything it
/// created (errors are logged); [`Front::close`] does the same and reports them.
#[derive(Debug)]
pub struct Front {
    name: String,
    front: SocketAddrV4,
    backend: SocketAddrV4,
    netns: Netns,
    tools: Tools,
    holder: Option<Holder>,
    made: Made,
    holding: bool,
}

impl Front {
    /// Installs the front: checks the tools, the name, the address (no other front, no socket
    /// on the port) and forwarding, reserves the port, binds a queue, then creates the table
    /// and the chain. On any failure, what was made is removed.
    pub fn create(spec: FrontSpec) -> Result<Self, FrontError> {
        if let Some(why) = rules::name_problem(&spec.name) {
            return Err(FrontError::InvalidName {
                name: spec.name,
                why,
            });
        }
        check_addr("front", spec.front)?;
        check_addr("backend", spec.backend)?;
        if spec.front == spec.backend {
            return Err(FrontError::InvalidSpec {
                why: format!("the backend {} is the front itself", spec.backend),
            });
        }
        let netns = Netns::open(spec.netns.as_deref())?;
        let table = rules::table(&spec.name);
        let tools = spec.tools.clone();
        let raw_table_was_there = netns.run(|| survey(&tools, &spec, &table, &netns.shown()))?;
        let holder_netns = Netns::open(spec.netns.as_deref())?;
        let holder = Holder::start(
            holder_netns,
            spec.front,
            spec.hold_limits,
            first_queue(&spec.name),
        )?;
        let mut front = Self {
            name: spec.name,
            front: spec.front,
            backend: spec.backend,
            netns,
            tools: spec.tools,
            holder: Some(holder),
            made: Made {
                raw_table_was_there,
                ..Made::default()
            },
            holding: false,
        };
        front.install()?;
        Ok(front)
    }

    fn install(&mut self) -> Result<(), FrontError> {
        let (tools, name, front, backend) = (&self.tools, &self.name, self.front, self.backend);
        let made = &mut self.made;
        self.netns.run(|| {
            cmd::run(
                tools,
                Tool::Nft,
                &["-f", "-"],
                Some(&rules::create_script(name, front, backend)),
            )?;
            made.table = true;
            let chain = rules::chain(name);
            cmd::run(tools, Tool::Iptables, &["-t", "raw", "-N", &chain], None)?;
            made.chain = true;
            let mut jump = vec!["-t", "raw", "-I", "PREROUTING"];
            let jump_args = rules::jump_args(name, front);
            jump.extend(jump_args.iter().map(String::as_str));
            cmd::run(tools, Tool::Iptables, &jump, None)?;
            made.jump = true;
            Ok(())
        })
    }

    /// The front's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The front address.
    pub fn front(&self) -> SocketAddrV4 {
        self.front
    }

    /// The backend datagrams to the front go to now.
    pub fn backend(&self) -> SocketAddrV4 {
        self.backend
    }

    /// The NFQUEUE number the front's holds use.
    pub fn queue_number(&self) -> Option<u16> {
        self.holder.as_ref().map(Holder::queue)
    }

    /// Whether a hold runs.
    pub fn is_holding(&self) -> bool {
        self.holding
    }

    /// Points the front at `backend`, in one nftables transaction: every datagram after it
    /// goes to the new backend (held ones too, at the release), and the new backend's replies
    /// leave from the front address. The old backend's replies are no longer rewritten.
    pub fn switch(&mut self, backend: SocketAddrV4) -> Result<(), FrontError> {
        check_addr("backend", backend)?;
        if backend == self.front {
            return Err(FrontError::InvalidSpec {
                why: format!("the backend {backend} is the front itself"),
            });
        }
        let script = rules::switch_script(&self.name, self.front, backend);
        let tools = &self.tools;
        self.netns
            .run(|| cmd::run(tools, Tool::Nft, &["-f", "-"], Some(&script)))?;
        self.backend = backend;
        Ok(())
    }

    /// Starts holding: from now on, datagrams to the front are queued, within the bounds,
    /// until [`Front::release`].
    pub fn hold(&mut self) -> Result<(), FrontError> {
        let holder = self
            .holder
            .as_ref()
            .ok_or(FrontError::Holder { what: "is gone" })?;
        if self.holding || !holder.hold()? {
            return Err(FrontError::AlreadyHolding {
                name: self.name.clone(),
            });
        }
        let chain = rules::chain(&self.name);
        let mut args = vec!["-t", "raw", "-A", &chain];
        let queue = rules::queue_args(holder.queue());
        args.extend(queue.iter().map(String::as_str));
        let tools = &self.tools;
        if let Err(e) = self
            .netns
            .run(|| cmd::run(tools, Tool::Iptables, &args, None))
        {
            let _ = holder.release();
            return Err(e);
        }
        self.holding = true;
        Ok(())
    }

    /// Ends the hold: the held datagrams are delivered, in arrival order, to the backend the
    /// front points at now, [`HoldLimits::release_batch`] at a time (one batch verdict each)
    /// every [`HoldLimits::release_interval`]; datagrams that arrive meanwhile queue behind
    /// them. Returns when the last is out, after removing the queue rule; a datagram that
    /// reaches the front while the rule goes is let through at once.
    pub fn release(&mut self) -> Result<HoldStats, FrontError> {
        if !self.holding {
            return Err(FrontError::NotHolding {
                name: self.name.clone(),
            });
        }
        let holder = self
            .holder
            .as_ref()
            .ok_or(FrontError::Holder { what: "is gone" })?;
        let stats = holder.release()?;
        self.holding = false;
        let chain = rules::chain(&self.name);
        let tools = &self.tools;
        self.netns.run(|| {
            cmd::run(tools, Tool::Iptables, &["-t", "raw", "-F", &chain], None).map(drop)
        })?;
        stats.ok_or(FrontError::NotHolding {
            name: self.name.clone(),
        })
    }

    /// Removes everything the front made (a hold is released first); reports the first error.
    pub fn close(mut self) -> Result<(), FrontError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), FrontError> {
        let mut first: Option<FrontError> = None;
        let mut note = |r: Result<(), FrontError>| {
            if let Err(e) = r
                && first.is_none()
            {
                first = Some(e);
            }
        };
        if self.holding {
            note(self.release().map(drop));
            self.holding = false;
        }
        let (tools, name, front) = (&self.tools, &self.name, self.front);
        let made = &mut self.made;
        note(self.netns.run(|| {
            let chain = rules::chain(name);
            if made.jump {
                let mut args = vec!["-t", "raw", "-D", "PREROUTING"];
                let jump_args = rules::jump_args(name, front);
                args.extend(jump_args.iter().map(String::as_str));
                cmd::run(tools, Tool::Iptables, &args, None)?;
                made.jump = false;
            }
            if made.chain {
                cmd::run(tools, Tool::Iptables, &["-t", "raw", "-F", &chain], None)?;
                cmd::run(tools, Tool::Iptables, &["-t", "raw", "-X", &chain], None)?;
                made.chain = false;
                if !made.raw_table_was_there {
                    remove_raw_table_if_empty(tools)?;
                }
            }
            Ok(())
        }));
        if let Some(mut holder) = self.holder.take() {
            note(holder.stop());
        }
        if self.made.table {
            let table = rules::table(&self.name);
            let tools = &self.tools;
            note(self.netns.run(|| {
                cmd::run(tools, Tool::Nft, &["delete", "table", "ip", &table], None).map(drop)
            }));
            self.made.table = false;
        }
        first.map_or(Ok(()), Err)
    }

    /// Removes what a front named `name` left in a namespace when its process died without
    /// closing it (its table, its chain and the jump to it). Nothing there is not an error.
    pub fn remove_leftovers(
        name: &str,
        netns: Option<&Path>,
        tools: &Tools,
    ) -> Result<(), FrontError> {
        if let Some(why) = rules::name_problem(name) {
            return Err(FrontError::InvalidName {
                name: name.to_owned(),
                why,
            });
        }
        let ns = Netns::open(netns)?;
        ns.run(|| {
            let table = rules::table(name);
            let tables = cmd::run(tools, Tool::Nft, &["list", "tables"], None)?;
            if rules::front_tables(&tables).contains(&table) {
                cmd::run(tools, Tool::Nft, &["delete", "table", "ip", &table], None)?;
            }
            if !rules::has_raw_table(&tables) {
                return Ok(());
            }
            let pre = cmd::run(
                tools,
                Tool::Iptables,
                &["-t", "raw", "-S", "PREROUTING"],
                None,
            )?;
            for rule in rules::jump_rules(&pre, name) {
                let mut args = vec!["-t", "raw", "-D", "PREROUTING"];
                args.extend(rule.iter().map(String::as_str));
                cmd::run(tools, Tool::Iptables, &args, None)?;
            }
            let chain = rules::chain(name);
            let all = cmd::run(tools, Tool::Iptables, &["-t", "raw", "-S"], None)?;
            if all.lines().any(|l| l.trim() == format!("-N {chain}")) {
                cmd::run(tools, Tool::Iptables, &["-t", "raw", "-F", &chain], None)?;
                cmd::run(tools, Tool::Iptables, &["-t", "raw", "-X", &chain], None)?;
            }
            Ok(())
        })
    }
}

/// What a detached front is: its rules stay in the kernel without a process, and
/// [`Front::attach`] takes them over again (e.g. one command line installs a front, another
/// moves the server behind it, a third removes it). Plain data: the caller stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontRecord {
    /// The front's name.
    pub name: String,
    /// The front address.
    pub front: SocketAddrV4,
    /// The backend the NAT points at.
    pub backend: SocketAddrV4,
    /// The namespace of the rules (`None`: the caller's).
    pub netns: Option<PathBuf>,
    /// Whether iptables-nft's `ip raw` table was there before the front (it is removed with
    /// the front otherwise).
    pub raw_table_was_there: bool,
}

impl Front {
    /// Lets the front's rules live on without this process: the holder stops (its queue and
    /// the socket that reserved the front port are released: nothing keeps another process
    /// from binding the port meanwhile, though the NAT takes every datagram to it first), and
    /// nothing is removed when the returned record is dropped. A hold in progress is
    /// released first.
    ///
    /// A failure (of the release or of stopping the holder) is returned, but the rules stay
    /// all the same: a detach never removes the front.
    pub fn detach(mut self) -> Result<FrontRecord, FrontError> {
        let record = FrontRecord {
            name: self.name.clone(),
            front: self.front,
            backend: self.backend,
            netns: self.netns.path().map(Path::to_path_buf),
            raw_table_was_there: self.made.raw_table_was_there,
        };
        let mut first = None;
        if self.holding
            && let Err(e) = self.release()
        {
            first = Some(e);
        }
        // Nothing is torn down on drop from here on, whatever fails.
        self.made = Made::default();
        self.holding = false;
        if let Some(mut holder) = self.holder.take()
            && let Err(e) = holder.stop()
        {
            first.get_or_insert(e);
        }
        first.map_or(Ok(record), Err)
    }

    /// Takes a detached front over: its table must still be there, pointing at the
    /// recorded backend's front (anything else is [`FrontError::Gone`]); a holder starts
    /// (the front port reserved again, a queue bound). From here on it is a [`Front`] like
    /// one [`Front::create`] made: dropped, it removes everything; [`Front::detach`] again
    /// to keep it.
    pub fn attach(
        record: FrontRecord,
        hold_limits: HoldLimits,
        tools: Tools,
    ) -> Result<Self, FrontError> {
        if let Some(why) = rules::name_problem(&record.name) {
            return Err(FrontError::InvalidName {
                name: record.name,
                why,
            });
        }
        let netns = Netns::open(record.netns.as_deref())?;
        let table = rules::table(&record.name);
        let found = netns.run(|| {
            let tables = cmd::run(&tools, Tool::Nft, &["list", "tables"], None)?;
            if !rules::front_tables(&tables).contains(&table) {
                return Ok(None);
            }
            let set = cmd::run(
                &tools,
                Tool::Nft,
                &["list", "set", "ip", &table, "front"],
                None,
            )?;
            Ok(rules::front_of(&set))
        })?;
        if found != Some(record.front) {
            return Err(FrontError::Gone {
                name: record.name,
                why: match found {
                    None => "its table is not there".to_owned(),
                    Some(other) => format!("its table serves {other}, not {}", record.front),
                },
            });
        }
        // A hold its last owner did not end (it died) is ended: a detached front holds
        // nothing.
        let chain = rules::chain(&record.name);
        netns.run(|| {
            cmd::run(&tools, Tool::Iptables, &["-t", "raw", "-F", &chain], None).map(drop)
        })?;
        let holder = Holder::start(
            Netns::open(record.netns.as_deref())?,
            record.front,
            hold_limits,
            first_queue(&record.name),
        )?;
        Ok(Self {
            name: record.name,
            front: record.front,
            backend: record.backend,
            netns,
            tools,
            holder: Some(holder),
            made: Made {
                table: true,
                chain: true,
                jump: true,
                raw_table_was_there: record.raw_table_was_there,
            },
            holding: false,
        })
    }
}

impl Front {
    /// Removes a detached front for good: its leftovers ([`Front::remove_leftovers`]), and
    /// iptables-nft's `ip raw` table when the front made it (`raw_table_was_there` false)
    /// and it is empty now.
    pub fn remove_detached(record: &FrontRecord, tools: &Tools) -> Result<(), FrontError> {
        Self::remove_leftovers(&record.name, record.netns.as_deref(), tools)?;
        if record.raw_table_was_there {
            return Ok(());
        }
        let ns = Netns::open(record.netns.as_deref())?;
        ns.run(|| {
            let tables = cmd::run(tools, Tool::Nft, &["list", "tables"], None)?;
            if rules::has_raw_table(&tables) {
                remove_raw_table_if_empty(tools)?;
            }
            Ok(())
        })
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!("udp-shim-front: removing front {}: {e}", self.name);
        }
    }
}

fn check_addr(what: &str, addr: SocketAddrV4) -> Result<(), FrontError> {
    let ip = addr.ip();
    let why = if ip.is_unspecified() {
        "is unspecified"
    } else if ip.is_broadcast() {
        "is the broadcast address"
    } else if ip.is_multicast() {
        "is a multicast address"
    } else if addr.port() == 0 {
        "has port 0"
    } else {
        return Ok(());
    };
    Err(FrontError::InvalidSpec {
        why: format!("the {what} {addr} {why}"),
    })
}

/// Runs in the namespace before anything is made: the tools are there, no front has this
/// name or address, forwarding is on. Returns whether iptables-nft's raw table exists.
fn survey(tools: &Tools, spec: &FrontSpec, table: &str, shown: &str) -> Result<bool, FrontError> {
    cmd::run(tools, Tool::Iptables, &["--version"], None)?;
    let tables = cmd::run(tools, Tool::Nft, &["list", "tables"], None)?;
    for other in rules::front_tables(&tables) {
        if other == table {
            return Err(FrontError::NameTaken {
                name: spec.name.clone(),
                table: other,
                netns: shown.to_owned(),
            });
        }
        let set = cmd::run(
            tools,
            Tool::Nft,
            &["list", "set", "ip", &other, "front"],
            None,
        );
        // A table of that prefix without the set is not a front of this crate's.
        if let Ok(set) = set
            && rules::front_of(&set) == Some(spec.front)
        {
            return Err(FrontError::FrontTaken {
                front: spec.front,
                table: other,
            });
        }
    }
    let forwarding =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").map_err(|source| {
            FrontError::Spawn {
                command: "read /proc/sys/net/ipv4/ip_forward".into(),
                source,
            }
        })?;
    if forwarding.trim() != "1" {
        return Err(FrontError::ForwardingOff {
            netns: shown.to_owned(),
        });
    }
    Ok(rules::has_raw_table(&tables))
}

/// Deletes iptables-nft's `ip raw` table when it holds nothing but ACCEPT policies.
fn remove_raw_table_if_empty(tools: &Tools) -> Result<(), FrontError> {
    let listing = cmd::run(tools, Tool::Iptables, &["-t", "raw", "-S"], None)?;
    if rules::raw_table_empty(&listing) {
        cmd::run(tools, Tool::Nft, &["delete", "table", "ip", "raw"], None)?;
    }
    Ok(())
}

/// The first queue number tried for `name`: FNV-1a of the name in 32768..=65535, so fronts
/// of different names rarely try the same numbers.
fn first_queue(name: &str) -> u16 {
    let hash = name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    // The value is below 2^15: the cast cannot truncate.
    0x8000 | (hash & 0x7fff) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked() {
        let ok: SocketAddrV4 = "10.0.0.1:9000".parse().unwrap();
        assert!(check_addr("front", ok).is_ok());
        for bad in [
            "0.0.0.0:9000",
            "255.255.255.255:9000",
            "224.0.0.1:9000",
            "10.0.0.1:0",
        ] {
            assert!(matches!(
                check_addr("front", bad.parse().unwrap()),
                Err(FrontError::InvalidSpec { .. })
            ));
        }
    }

    #[test]
    fn bad_names_and_specs_are_refused_before_anything_runs() {
        let front: SocketAddrV4 = "10.0.0.1:9000".parse().unwrap();
        let backend: SocketAddrV4 = "10.0.1.2:4242".parse().unwrap();
        let err = Front::create(FrontSpec::new("Bad_Name", front, backend)).unwrap_err();
        assert!(matches!(err, FrontError::InvalidName { .. }), "{err}");
        let err = Front::create(FrontSpec::new("ok", front, front)).unwrap_err();
        assert!(matches!(err, FrontError::InvalidSpec { .. }), "{err}");
    }

    #[test]
    fn queue_numbers_are_in_the_upper_half() {
        assert!(first_queue("a") >= 0x8000);
        assert_ne!(first_queue("a"), first_queue("b"));
    }
}
