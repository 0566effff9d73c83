//! Address forms: plain, as an IPv4 or IPv6 socket can send to, as quinn's endpoint reports.
//!
//! An IPv6 socket (dual-stack) sends to and receives from IPv4 peers as IPv4-mapped IPv6
//! addresses (`::ffff:a.b.c.d`); an IPv4 socket knows only plain IPv4. quinn's endpoint keeps
//! the form of the socket it started on, while the shims may swap in a socket of the other
//! family, so every address crossing the shim is converted here.

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

/// The address in its plain form: an IPv4-mapped IPv6 address becomes IPv4; anything else is
/// returned unchanged.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::V4(SocketAddrV4::new(ip, v6.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// `addr` in the form a socket bound to `local` can send to: IPv4-mapped for an IPv6 socket,
/// plain for an IPv4 socket. `None` for a real IPv6 destination from an IPv4 socket.
pub fn to_socket_family(addr: SocketAddr, local: SocketAddr) -> Option<SocketAddr> {
    match (local, canonical(addr)) {
        (SocketAddr::V6(_), SocketAddr::V4(v4)) => Some(SocketAddr::V6(SocketAddrV6::new(
            v4.ip().to_ipv6_mapped(),
            v4.port(),
            0,
            0,
        ))),
        (SocketAddr::V4(_), SocketAddr::V6(_)) => None,
        (_, plain) => match addr {
            // Keep flow info and scope id of a real IPv6 address.
            SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_none() => Some(addr),
            _ => Some(plain),
        },
    }
}

/// `addr` in the form quinn's endpoint expects: IPv4-mapped if the endpoint began on an IPv6
/// socket ([`Caps::initial_v6`](crate::Caps::initial_v6)), plain otherwise.
pub fn to_endpoint_family(addr: SocketAddr, initial_v6: bool) -> SocketAddr {
    match (initial_v6, canonical(addr)) {
        (true, SocketAddr::V4(v4)) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        (true, SocketAddr::V6(_)) => addr,
        (false, plain) => plain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    fn v4(a: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::from(a), port))
    }

    #[test]
    fn canonical_unmaps_v4_mapped() {
        let mapped = SocketAddr::from((Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped(), 7));
        assert_eq!(canonical(mapped), v4([10, 1, 2, 3], 7));
        let real = SocketAddr::from((Ipv6Addr::LOCALHOST, 7));
        assert_eq!(canonical(real), real);
    }

    #[test]
    fn v6_destination_unreachable_from_v4_socket() {
        let real = SocketAddr::from((Ipv6Addr::LOCALHOST, 7));
        assert_eq!(to_socket_family(real, v4([127, 0, 0, 1], 1)), None);
    }

    #[test]
    fn mapped_destination_sent_plain_from_v4_socket() {
        let mapped = SocketAddr::from((Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped(), 7));
        assert_eq!(
            to_socket_family(mapped, v4([0, 0, 0, 0], 0)),
            Some(v4([10, 1, 2, 3], 7))
        );
    }

    #[test]
    fn real_v6_keeps_scope_id() {
        let scoped = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 7, 0, 3));
        let local = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
        assert_eq!(to_socket_family(scoped, local), Some(scoped));
    }

    proptest! {
        #[test]
        fn family_round_trip(a in any::<[u8; 4]>(), port in any::<u16>(), local_v6 in any::<bool>()) {
            let addr = v4(a, port);
            let local = if local_v6 {
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
            } else {
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
            };
            let sendable = to_socket_family(addr, local);
            prop_assert_eq!(sendable.map(|s| s.is_ipv6()), Some(local_v6));
            prop_assert_eq!(sendable.map(canonical), Some(addr));
            let reported = to_endpoint_family(addr, local_v6);
            prop_assert_eq!(reported.is_ipv6(), local_v6);
            prop_assert_eq!(canonical(reported), addr);
        }

        #[test]
        fn real_v6_kept(segments in any::<[u16; 8]>(), port in any::<u16>()) {
            let ip = Ipv6Addr::from(segments);
            prop_assume!(ip.to_ipv4_mapped().is_none());
            let addr = SocketAddr::from((IpAddr::V6(ip), port));
            let local = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
            prop_assert_eq!(to_socket_family(addr, local), Some(addr));
            prop_assert_eq!(to_endpoint_family(addr, true), addr);
            prop_assert_eq!(canonical(addr), addr);
        }
    }
}
