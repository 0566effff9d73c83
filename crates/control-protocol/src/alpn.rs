//! The marker ALPN: how a server wrapper tells a wrapper-aware client (cwrapper, which opens
//! the control stream) from a plain QUIC client, without reading a byte of the connection.
//!
//! ```text
//!  app ALPNs [h3, h3-29] ──with_control()──► [qlm1+h3, qlm1+h3-29, h3, h3-29]
//!  negotiated qlm1+h3 ──split()──► Negotiated { aware: true,  app: h3 }   control stream 0
//!  negotiated h3      ──split()──► Negotiated { aware: false, app: h3 }   plain client
//!  app ALPNs []       ──with_control()──► [qlm1]   (the bare marker: app ALPN empty)
//! ```
//!
//! Why ALPN and not a preamble on the first stream: applications such as `h3-quinn` take the
//! raw `quinn::Connection`, so any bytes the wrapper consumed from a stream would be hidden
//! from them only if the wrapper owned every stream. The ALPN is decided in the handshake,
//! before the first stream exists, and costs the application nothing.
//!
//! Why the marked forms come first: a rustls server picks the first protocol of *its own*
//! list that the client offered (this is checked by a loopback handshake in swrapper's
//! tests). A server listing `qlm1+x` before `x` thus negotiates `qlm1+x` with a client that
//! offers both (cwrapper) and `x` with a client that offers only `x` (a plain client). A
//! client lists them in the same order; its order does not decide, the server's does.
//!
//! Why `qlm1+`: `qlm` is the project's prefix (`qlm-echo/1`, `qlm-agent/1`), `1` the version
//! of the control protocol's framing, and `+` a byte no registered ALPN identifier uses, so a
//! marked identifier cannot be confused with an IANA one. An application ALPN that already
//! starts with the marker is refused ([`AlpnError::Reserved`]), so [`split`] is exact.
//!
//! An empty application list gives the bare marker `qlm1` alone (and [`split`] returns an
//! empty application ALPN for it). A QUIC server that lists any protocol must refuse a client
//! that offers none (RFC 9001, section 8.1), so a server without an application ALPN serves
//! only wrapper-aware clients; give the application an ALPN to serve plain clients as well.

/// The bare marker: what a wrapper-aware peer offers for an application without an ALPN.
pub const CONTROL_ALPN: &[u8] = b"qlm1";

/// The prefix of a marked application ALPN: `qlm1+` then the application's.
pub const CONTROL_PREFIX: &[u8] = b"qlm1+";

/// The longest ALPN identifier TLS carries (a one-byte length).
pub const MAX_ALPN: usize = 255;

/// Why an application ALPN list cannot be marked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AlpnError {
    /// An entry is empty (TLS forbids empty protocol names).
    #[error("application ALPN #{index} is empty")]
    Empty {
        /// Its position in the list.
        index: usize,
    },
    /// An entry is too long to carry the marker: with the prefix it exceeds 255 bytes.
    #[error(
        "application ALPN #{index} is {len} bytes; with the {}-byte marker it exceeds the {MAX_ALPN} TLS allows",
        CONTROL_PREFIX.len()
    )]
    TooLong {
        /// Its position in the list.
        index: usize,
        /// Its length.
        len: usize,
    },
    /// An entry already is the marker or starts with it: it would be taken for a marked one.
    #[error("application ALPN #{index} starts with the reserved marker qlm1")]
    Reserved {
        /// Its position in the list.
        index: usize,
    },
}

/// What a negotiated ALPN says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated<'a> {
    /// The client offered the marker: it opens the control stream (stream 0).
    pub aware: bool,
    /// The application's ALPN, the marker stripped (empty for the bare marker or no ALPN).
    pub app: &'a [u8],
}

/// The ALPN list a wrapper-aware peer offers for an application offering `app_alpns`: every
/// marked form first, in order, then the plain ones (see the module doc for why).
///
/// # Errors
/// [`AlpnError`] for an empty entry, one too long to mark, or one that is already marked.
pub fn with_control(app_alpns: &[&[u8]]) -> Result<Vec<Vec<u8>>, AlpnError> {
    if app_alpns.is_empty() {
        return Ok(vec![CONTROL_ALPN.to_vec()]);
    }
    let mut marked = Vec::with_capacity(app_alpns.len() * 2);
    for (index, a) in app_alpns.iter().enumerate() {
        if a.is_empty() {
            return Err(AlpnError::Empty { index });
        }
        if a.starts_with(CONTROL_ALPN) {
            return Err(AlpnError::Reserved { index });
        }
        if a.len() + CONTROL_PREFIX.len() > MAX_ALPN {
            return Err(AlpnError::TooLong {
                index,
                len: a.len(),
            });
        }
        let mut m = CONTROL_PREFIX.to_vec();
        m.extend_from_slice(a);
        marked.push(m);
    }
    marked.extend(app_alpns.iter().map(|a| a.to_vec()));
    Ok(marked)
}

/// The inverse of [`with_control`] for the one ALPN negotiated: whether it is marked, and the
/// application's ALPN. Any bytes are accepted: an unmarked ALPN is a plain client's.
pub fn split(negotiated: &[u8]) -> Negotiated<'_> {
    if negotiated == CONTROL_ALPN {
        return Negotiated {
            aware: true,
            app: &[],
        };
    }
    match negotiated.strip_prefix(CONTROL_PREFIX) {
        Some(app) => Negotiated { aware: true, app },
        None => Negotiated {
            aware: false,
            app: negotiated,
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn marked_forms_come_first_in_order() {
        let l = with_control(&[b"h3", b"h3-29"]).unwrap();
        assert_eq!(
            l,
            vec![
                b"qlm1+h3".to_vec(),
                b"qlm1+h3-29".to_vec(),
                b"h3".to_vec(),
                b"h3-29".to_vec()
            ]
        );
        assert_eq!(with_control(&[]).unwrap(), vec![b"qlm1".to_vec()]);
    }

    #[test]
    fn split_tells_marked_from_plain() {
        assert_eq!(
            split(b"qlm1+h3"),
            Negotiated {
                aware: true,
                app: b"h3"
            }
        );
        assert_eq!(
            split(b"qlm1"),
            Negotiated {
                aware: true,
                app: b""
            }
        );
        assert_eq!(
            split(b"h3"),
            Negotiated {
                aware: false,
                app: b"h3"
            }
        );
        assert_eq!(
            split(b""),
            Negotiated {
                aware: false,
                app: b""
            }
        );
        // Only the exact bare marker or the prefix marks: `qlm10` is some other protocol.
        assert!(!split(b"qlm10").aware);
    }

    #[test]
    fn bad_entries_are_typed_errors() {
        assert_eq!(
            with_control(&[b"h3", b""]),
            Err(AlpnError::Empty { index: 1 })
        );
        let long = [b'a'; MAX_ALPN - CONTROL_PREFIX.len() + 1];
        assert_eq!(
            with_control(&[&long]),
            Err(AlpnError::TooLong {
                index: 0,
                len: long.len()
            })
        );
        let longest = [b'a'; MAX_ALPN - CONTROL_PREFIX.len()];
        assert_eq!(with_control(&[&longest]).unwrap()[0].len(), MAX_ALPN);
        assert_eq!(
            with_control(&[b"x", b"qlm1+h3"]),
            Err(AlpnError::Reserved { index: 1 })
        );
        assert_eq!(
            with_control(&[b"qlm1"]),
            Err(AlpnError::Reserved { index: 0 })
        );
        let e = with_control(&[&long]).unwrap_err().to_string();
        assert!(e.contains("exceeds the 255"), "{e}");
    }

    proptest! {
        #[test]
        fn split_inverts_with_control(
            apps in proptest::collection::vec(
                proptest::collection::vec(any::<u8>(), 1..=MAX_ALPN - CONTROL_PREFIX.len()),
                0..6,
            )
        ) {
            let refs: Vec<&[u8]> = apps.iter().map(Vec::as_slice).collect();
            match with_control(&refs) {
                Ok(list) => {
                    if apps.is_empty() {
                        prop_assert_eq!(list.len(), 1);
                        prop_assert_eq!(split(&list[0]), Negotiated { aware: true, app: b"" });
                    } else {
                        prop_assert_eq!(list.len(), apps.len() * 2);
                        for (i, a) in apps.iter().enumerate() {
                            let m = split(&list[i]);
                            prop_assert!(m.aware);
                            prop_assert_eq!(m.app, a.as_slice());
                            let p = split(&list[apps.len() + i]);
                            prop_assert!(!p.aware);
                            prop_assert_eq!(p.app, a.as_slice());
                        }
                    }
                }
                Err(AlpnError::Reserved { index }) => {
                    prop_assert!(apps[index].starts_with(CONTROL_ALPN));
                }
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }

        #[test]
        fn split_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let n = split(&bytes);
            prop_assert!(n.app.len() <= bytes.len());
        }
    }
}
