//! Whether a QUIC endpoint answers at an address, without a handshake.
//!
//! A long-header packet of a version no endpoint speaks (`0x?a?a?a?a`, reserved by RFC 9000
//! section 15 to exercise version negotiation), padded to 1200 bytes, must be answered with a
//! Version Negotiation packet (RFC 9000 section 6.1) by any QUIC server listening there. It
//! creates no connection state on the server and counts as no handshake, so an orchestrator
//! can check which of two addresses serves after a move without disturbing the service.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// The probe's version: reserved, never negotiated.
const PROBE_VERSION: u32 = 0x1a2a_3a4a;
/// A client Initial is at least this long; servers ignore shorter unknown-version packets.
const PROBE_LEN: usize = 1200;

/// What answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProbeAnswer {
    /// A Version Negotiation packet naming the probe's connection ids: a QUIC endpoint.
    VersionNegotiation,
    /// ICMP port unreachable: nothing listens there.
    Refused,
    /// Nothing (or nothing that was a QUIC answer to this probe) within the wait.
    Silent,
}

/// The probe datagram for connection ids `dcid` and `scid`.
pub fn probe_packet(dcid: [u8; 8], scid: [u8; 8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(PROBE_LEN);
    p.push(0xc0);
    p.extend_from_slice(&PROBE_VERSION.to_be_bytes());
    p.push(8);
    p.extend_from_slice(&dcid);
    p.push(8);
    p.extend_from_slice(&scid);
    p.resize(PROBE_LEN, 0);
    p
}

/// Whether `reply` is a Version Negotiation answering a probe sent with `dcid`/`scid`: a long
/// header, version 0, its destination id our source id and its source id our destination id.
pub fn is_version_negotiation(reply: &[u8], dcid: [u8; 8], scid: [u8; 8]) -> bool {
    let Some((&first, rest)) = reply.split_first() else {
        return false;
    };
    if first & 0x80 == 0 || rest.len() < 4 || rest[..4] != [0, 0, 0, 0] {
        return false;
    }
    let rest = &rest[4..];
    let Some((&dlen, rest)) = rest.split_first() else {
        return false;
    };
    let Some((their_dcid, rest)) = rest.split_at_checked(usize::from(dlen)) else {
        return false;
    };
    let Some((&slen, rest)) = rest.split_first() else {
        return false;
    };
    let Some((their_scid, _versions)) = rest.split_at_checked(usize::from(slen)) else {
        return false;
    };
    their_dcid == scid && their_scid == dcid
}

/// Sends a probe to `addr` and waits up to `wait` for the answer.
///
/// # Errors
/// Creating or connecting the local socket failed.
pub fn quic_probe(addr: SocketAddr, wait: Duration) -> io::Result<ProbeAnswer> {
    let local: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(addr)?;
    let ids = ids();
    let (dcid, scid) = (ids[0], ids[1]);
    if let Err(e) = socket.send(&probe_packet(dcid, scid)) {
        return if e.kind() == io::ErrorKind::ConnectionRefused {
            Ok(ProbeAnswer::Refused)
        } else {
            Err(e)
        };
    }
    let end = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(ProbeAnswer::Silent);
        }
        socket.set_read_timeout(Some(left))?;
        match socket.recv(&mut buf) {
            Ok(n) if is_version_negotiation(&buf[..n], dcid, scid) => {
                return Ok(ProbeAnswer::VersionNegotiation);
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Ok(ProbeAnswer::Refused);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(ProbeAnswer::Silent);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Two connection ids, distinct per call (not secret: they only match answers to probes).
fn ids() -> [[u8; 8]; 2] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let a = (u64::from(std::process::id()) << 32 | u64::from(nanos)) ^ n;
    [a.to_be_bytes(), (!a).rotate_left(17).to_be_bytes()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_is_a_padded_long_header_of_a_reserved_version() {
        let p = probe_packet([1; 8], [2; 8]);
        assert_eq!(p.len(), PROBE_LEN);
        assert_eq!(p[0] & 0x80, 0x80);
        assert_eq!(p[1..5], [0x1a, 0x2a, 0x3a, 0x4a]);
        assert_eq!(p[5], 8);
    }

    #[test]
    fn version_negotiation_is_recognised_and_anything_else_is_not() {
        let (d, s) = ([1; 8], [2; 8]);
        let mut vn = vec![0x80, 0, 0, 0, 0, 8];
        vn.extend_from_slice(&s);
        vn.push(8);
        vn.extend_from_slice(&d);
        vn.extend_from_slice(&1u32.to_be_bytes());
        assert!(is_version_negotiation(&vn, d, s));
        // Ids swapped the wrong way: an answer to some other probe.
        assert!(!is_version_negotiation(&vn, s, d));
        // Not version 0.
        let mut v1 = vn.clone();
        v1[4] = 1;
        assert!(!is_version_negotiation(&v1, d, s));
        // Short header, truncated, empty.
        let mut short = vn.clone();
        short[0] = 0x40;
        assert!(!is_version_negotiation(&short, d, s));
        for n in 0..vn.len() - 4 {
            assert!(!is_version_negotiation(&vn[..n], d, s), "{n}");
        }
        // A length pointing past the end.
        let mut long = vn.clone();
        long[5] = 200;
        assert!(!is_version_negotiation(&long, d, s));
    }

    #[test]
    fn a_closed_port_is_refused_and_a_silent_one_is_silent() {
        // A port nobody listens on (bound, then closed) answers with ICMP port unreachable.
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        assert_eq!(
            quic_probe(addr, Duration::from_millis(500)).unwrap(),
            ProbeAnswer::Refused
        );
        // A socket that reads and never answers.
        let mute = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            quic_probe(mute.local_addr().unwrap(), Duration::from_millis(100)).unwrap(),
            ProbeAnswer::Silent
        );
    }

    #[test]
    fn a_quinn_server_answers_the_probe() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (config, _) = test_support::tls::configs(b"probe").unwrap();
            let server = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = server.local_addr().unwrap();
            let answer = tokio::task::spawn_blocking(move || {
                quic_probe(addr, Duration::from_secs(2)).unwrap()
            })
            .await
            .unwrap();
            assert_eq!(answer, ProbeAnswer::VersionNegotiation);
            // No connection was made.
            assert_eq!(server.open_connections(), 0);
        });
    }
}
