//! The rules a front installs, as text and argument lists (no I/O; unit-tested).
//!
//! ```text
//!  prerouting, priority raw (-300): iptables-nft's raw table
//!      ip daddr F udp dport P ─▶ jump QLM_FRONT_<name>      empty, or during a hold:
//!                                                           NFQUEUE --queue-num Q --queue-bypass
//!  prerouting, priority raw + 10 (-290): table ip qlm_front_<name>, chain pre
//!      ip daddr F udp dport P  ─▶ notrack, daddr/dport := backend (maps keyed by P)
//!      ip saddr . udp sport @backends ─▶ notrack                (replies: no conntrack entry)
//!  postrouting, priority srcnat (100): chain post
//!      ip saddr . udp sport @backends ─▶ saddr/sport := F:P      (replies leave from the front)
//! ```
//!
//! A datagram the hold accepts goes on from the hook entry after iptables' raw chain, that is
//! the `pre` chain at -290, which reads the maps as they are then: after a `switch`, the new
//! backend. No connection tracking is involved (this kernel has no conntrack netlink to flush
//! stale entries), so a switch takes effect for the very next datagram.

use std::net::SocketAddrV4;

/// nftables priority of the NAT chain: after iptables' raw table (-300), where the hold's
/// queue rule is, and before connection tracking (-200), which `notrack` must precede.
const PRE_PRIORITY: i32 = -290;

/// The longest name: iptables limits chain names to 28 characters and the chain is
/// `QLM_FRONT_<name>`.
pub(crate) const MAX_NAME: usize = 18;

/// Why a name cannot name a front, or `None` when it can.
pub(crate) fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("empty");
    }
    if name.len() > MAX_NAME {
        return Some("longer than 18 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some("only a-z, 0-9 and '-' are allowed");
    }
    if name.starts_with('-') {
        return Some("must not start with '-'");
    }
    None
}

/// The nftables table of the front `name` (family `ip`).
pub(crate) fn table(name: &str) -> String {
    format!("qlm_front_{name}")
}

/// The tables of all fronts start so.
pub(crate) const TABLE_PREFIX: &str = "qlm_front_";

/// The iptables chain (raw table) that holds the hold's queue rule.
pub(crate) fn chain(name: &str) -> String {
    format!("QLM_FRONT_{name}")
}

/// The `nft -f` script that creates the table; `create table` makes the batch fail if a
/// table of that name appeared meanwhile.
pub(crate) fn create_script(name: &str, front: SocketAddrV4, backend: SocketAddrV4) -> String {
    let t = table(name);
    let (f, p) = (front.ip(), front.port());
    let (b, bp) = (backend.ip(), backend.port());
    format!(
        "create table ip {t}
table ip {t} {{
  set front {{ type ipv4_addr . inet_service; elements = {{ {f} . {p} }} }}
  map backend_addr {{ type inet_service : ipv4_addr; elements = {{ {p} : {b} }} }}
  map backend_port {{ type inet_service : inet_service; elements = {{ {p} : {bp} }} }}
  set backends {{ type ipv4_addr . inet_service; elements = {{ {b} . {bp} }} }}
  chain pre {{
    type filter hook prerouting priority {PRE_PRIORITY}; policy accept;
    ip daddr {f} udp dport {p} notrack ip daddr set udp dport map @backend_addr udp dport set udp dport map @backend_port
    ip saddr . udp sport @backends notrack
  }}
  chain post {{
    type filter hook postrouting priority srcnat; policy accept;
    ip saddr . udp sport @backends ip saddr set {f} udp sport set {p}
  }}
}}
"
    )
}

/// The `nft -f` script that points the front at `backend`: one transaction, so a datagram
/// sees either the old mapping or the new one.
pub(crate) fn switch_script(name: &str, front: SocketAddrV4, backend: SocketAddrV4) -> String {
    let t = table(name);
    let p = front.port();
    let (b, bp) = (backend.ip(), backend.port());
    format!(
        "flush map ip {t} backend_addr
add element ip {t} backend_addr {{ {p} : {b} }}
flush map ip {t} backend_port
add element ip {t} backend_port {{ {p} : {bp} }}
flush set ip {t} backends
add element ip {t} backends {{ {b} . {bp} }}
"
    )
}

/// The match of the jump rule in iptables' raw PREROUTING (for `-I` and `-D`).
pub(crate) fn jump_args(name: &str, front: SocketAddrV4) -> Vec<String> {
    vec![
        "-d".into(),
        format!("{}/32", front.ip()),
        "-p".into(),
        "udp".into(),
        "--dport".into(),
        front.port().to_string(),
        "-j".into(),
        chain(name),
    ]
}

/// The hold's rule in the front's chain.
pub(crate) fn queue_args(queue: u16) -> Vec<String> {
    vec![
        "-j".into(),
        "NFQUEUE".into(),
        "--queue-num".into(),
        queue.to_string(),
        // When no socket is bound to the queue (the process holding it died), datagrams go
        // on to the NAT instead of being dropped.
        "--queue-bypass".into(),
    ]
}

/// The names of the fronts' tables in `nft list tables` output.
pub(crate) fn front_tables(list: &str) -> Vec<String> {
    list.lines()
        .filter_map(|l| l.trim().strip_prefix("table ip "))
        .filter(|t| t.starts_with(TABLE_PREFIX))
        .map(str::to_owned)
        .collect()
}

/// Whether `nft list tables` output has iptables-nft's `ip raw` table.
pub(crate) fn has_raw_table(list: &str) -> bool {
    list.lines().any(|l| l.trim() == "table ip raw")
}

/// The front address in `nft list set ip <table> front` output (`elements = { A . P }`).
pub(crate) fn front_of(set_listing: &str) -> Option<SocketAddrV4> {
    let (_, rest) = set_listing.split_once("elements = {")?;
    let (inner, _) = rest.split_once('}')?;
    let (ip, port) = inner.split_once(" . ")?;
    Some(SocketAddrV4::new(
        ip.trim().parse().ok()?,
        port.trim().parse().ok()?,
    ))
}

/// Whether `iptables -t raw -S` output shows no rule and no chain of its own: only the
/// built-in chains' policies, all ACCEPT.
pub(crate) fn raw_table_empty(listing: &str) -> bool {
    listing
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .all(|l| l.starts_with("-P ") && l.ends_with(" ACCEPT"))
}

/// The jump rules to `QLM_FRONT_<name>` in `iptables -t raw -S PREROUTING` output, as
/// arguments for `-D PREROUTING`.
pub(crate) fn jump_rules(listing: &str, name: &str) -> Vec<Vec<String>> {
    let target = chain(name);
    listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-A PREROUTING "))
        .filter(|rest| {
            rest.split_whitespace()
                .collect::<Vec<_>>()
                .ends_with(&["-j", &target])
        })
        .map(|rest| rest.split_whitespace().map(str::to_owned).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn names() {
        assert_eq!(name_problem("svc-1"), None);
        assert_eq!(name_problem("a23456789012345678"), None);
        assert!(name_problem("").is_some());
        assert!(name_problem("a234567890123456789").is_some());
        assert!(name_problem("Svc").is_some());
        assert!(name_problem("a_b").is_some());
        assert!(name_problem("a b").is_some());
        assert!(name_problem("-a").is_some());
        assert!(name_problem("a;flush ruleset").is_some());
        assert!(chain("a23456789012345678").len() <= 28);
    }

    #[test]
    fn scripts_name_the_addresses() {
        let s = create_script("web", addr("10.1.0.1:9000"), addr("10.1.1.2:4242"));
        assert!(s.starts_with("create table ip qlm_front_web\n"));
        assert!(s.contains("ip daddr 10.1.0.1 udp dport 9000 notrack"));
        assert!(s.contains("elements = { 9000 : 10.1.1.2 }"));
        assert!(s.contains("elements = { 9000 : 4242 }"));
        assert!(s.contains("ip saddr set 10.1.0.1 udp sport set 9000"));
        assert!(s.contains("priority -290"));
        let w = switch_script("web", addr("10.1.0.1:9000"), addr("10.1.2.2:4343"));
        assert!(w.contains("add element ip qlm_front_web backend_addr { 9000 : 10.1.2.2 }"));
        assert!(w.contains("add element ip qlm_front_web backends { 10.1.2.2 . 4343 }"));
    }

    #[test]
    fn listings() {
        let tables = "table ip raw\ntable ip qlm_front_a\ntable inet filter\ntable ip qlm_frontx\n";
        assert_eq!(front_tables(tables), vec!["qlm_front_a".to_owned()]);
        assert!(has_raw_table(tables));
        assert!(!has_raw_table("table ip rawx\n"));
        let set = "table ip qlm_front_a {\n\tset front {\n\t\ttype ipv4_addr . inet_service\n\t\telements = { 10.1.0.1 . 9000 }\n\t}\n}\n";
        assert_eq!(front_of(set), Some(addr("10.1.0.1:9000")));
        assert_eq!(front_of("set front {\n}\n"), None);
        assert!(raw_table_empty("-P PREROUTING ACCEPT\n-P OUTPUT ACCEPT\n"));
        assert!(!raw_table_empty("-P PREROUTING ACCEPT\n-N QLM_FRONT_a\n"));
        assert!(!raw_table_empty("-P PREROUTING DROP\n"));
        let pre = "-P PREROUTING ACCEPT\n-A PREROUTING -d 10.1.0.1/32 -p udp -m udp --dport 9000 -j QLM_FRONT_a\n-A PREROUTING -j QLM_FRONT_ab\n";
        assert_eq!(
            jump_rules(pre, "a"),
            vec![
                "-d 10.1.0.1/32 -p udp -m udp --dport 9000 -j QLM_FRONT_a"
                    .split(' ')
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            ]
        );
    }
}
