//! What a move needs from an application's own quinn configuration, and the check of it.
//!
//! ```text
//!  quinn::ServerConfig / ClientConfig ──TransportFacts::of_server / of_client──► TransportFacts
//!        (the app's)                     (idle timeout, keep-alive, bidi streams)
//!  TransportFacts ──check(side, max_freeze)──► Ok | ConfigError (typed, says what to set)
//! ```
//!
//! A move freezes the server: while CRIU holds it, and until it runs again at its new address,
//! it neither sends nor answers. QUIC's idle timer keeps running on both sides meanwhile
//! (the restored server's monotonic clock shows the freeze too), and keep-alive cannot help:
//! nothing answers a PING while the server is frozen. So the idle timeout (the smaller of both
//! sides', 0 or none meaning no limit) must outlast the longest freeze the wrappers wait for,
//! the client's overlap cap ([`DEFAULT_MAX_FREEZE`], 10 s by default), with [`IDLE_MARGIN`]
//! to spare, so that a client that gave a move up at the cap and swapped back still has a
//! connection to the old server. Keep-alive is the application's affair: it keeps an idle
//! connection open between moves, and it is fine without (a long idle timeout).
//!
//! The server also needs one bidirectional stream per connection for the control stream,
//! which the client opens first: a `max_concurrent_bidi_streams` of 0 would leave the client
//! unable to say Hello.
//!
//! quinn 0.11 has no getters on `TransportConfig`, and a `ClientConfig` does not even hand
//! its transport out, so the facts are read from their `Debug` output (which names every
//! field). The parser is tested against quinn's own output, so a quinn release that prints
//! them otherwise fails this crate's tests rather than a user's move; at run time an
//! unreadable field is refused ([`ConfigError::Unreadable`]), never guessed.

use std::time::Duration;

/// The longest freeze the wrappers wait for by default: the client's overlap cap (cwrapper's
/// `OverlapLimits::DEFAULT_MAX_DURATION`), from `Migrate` to the server's `Resumed` at its new
/// address (announce round, freeze, transfer, restore). A server wrapper's default too.
pub const DEFAULT_MAX_FREEZE: Duration = Duration::from_secs(10);

/// What the idle timeout must exceed the longest freeze by: after a client gave a move up at
/// its cap and swapped back, its connection must still be alive to hear from the old server.
pub const IDLE_MARGIN: Duration = Duration::from_secs(5);

/// The smallest idle timeout that survives a freeze of `max_freeze`: `max_freeze` +
/// [`IDLE_MARGIN`] (15 s for the default freeze).
pub fn min_idle_timeout(max_freeze: Duration) -> Duration {
    max_freeze.saturating_add(IDLE_MARGIN)
}

/// Which wrapper checks a configuration: the server also needs a bidirectional stream for the
/// control stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Side {
    /// swrapper, checking a `quinn::ServerConfig`.
    Server,
    /// cwrapper, checking a `quinn::ClientConfig`.
    Client,
}

/// Why an application's quinn configuration cannot carry a move.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The idle timeout would close the connection during a move's freeze.
    #[error(
        "idle timeout {idle:?} is too short for a move: it must be at least {needed:?} (the \
         longest freeze, {max_freeze:?}, plus {IDLE_MARGIN:?}); set \
         TransportConfig::max_idle_timeout to {needed:?} or more, or to None (keep-alive does \
         not help: nothing answers while the server is frozen)"
    )]
    IdleTimeoutTooShort {
        /// The configured idle timeout.
        idle: Duration,
        /// The least that works.
        needed: Duration,
        /// The longest freeze it was checked against.
        max_freeze: Duration,
    },
    /// The server lets clients open no bidirectional stream, so no client could open the
    /// control stream.
    #[error(
        "max_concurrent_bidi_streams is 0: clients could not open the control stream (the \
         first bidirectional stream of every wrapper-aware connection); allow one more than \
         the application needs"
    )]
    NoBidiStreams,
    /// A setting could not be read from quinn's `Debug` output (a quinn release that prints
    /// it otherwise than 0.11.x).
    #[error(
        "cannot read `{field}` from this quinn's TransportConfig (its Debug output is not the \
         one quinn 0.11 prints), so a move cannot be checked: {found:?}"
    )]
    Unreadable {
        /// The field sought.
        field: &'static str,
        /// What followed it, or a note that it is missing.
        found: String,
    },
}

/// The settings of a quinn `TransportConfig` that a move depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransportFacts {
    /// The idle timeout this side advertises; `None`: no limit (quinn's `None` or 0).
    pub idle_timeout: Option<Duration>,
    /// The keep-alive interval; `None`: no keep-alive (quinn's default).
    pub keep_alive: Option<Duration>,
    /// How many bidirectional streams the peer may open at once.
    pub max_concurrent_bidi_streams: u64,
}

impl TransportFacts {
    /// The facts of a transport configuration.
    pub fn of_transport(transport: &quinn::TransportConfig) -> Result<Self, ConfigError> {
        Self::parse(&format!("{transport:?}"))
    }

    /// The facts of a server configuration's transport.
    pub fn of_server(config: &quinn::ServerConfig) -> Result<Self, ConfigError> {
        Self::of_transport(&config.transport)
    }

    /// The facts of a client configuration's transport (quinn does not hand it out; its
    /// `Debug` output holds it).
    pub fn of_client(config: &quinn::ClientConfig) -> Result<Self, ConfigError> {
        Self::parse(&format!("{config:?}"))
    }

    /// Reads the facts from quinn's `Debug` output of a `TransportConfig` (or of a
    /// configuration that holds one).
    fn parse(debug: &str) -> Result<Self, ConfigError> {
        let idle = field(debug, "max_idle_timeout")?;
        let idle_timeout = match option(idle) {
            None => None,
            Some(ms) => match ms.parse::<u64>() {
                Ok(0) => None,
                Ok(ms) => Some(Duration::from_millis(ms)),
                Err(_) => return Err(unreadable("max_idle_timeout", idle)),
            },
        };
        let keep = field(debug, "keep_alive_interval")?;
        let keep_alive = match option(keep) {
            None => None,
            Some(d) => {
                Some(parse_duration(d).ok_or_else(|| unreadable("keep_alive_interval", keep))?)
            }
        };
        let bidi = field(debug, "max_concurrent_bidi_streams")?;
        let max_concurrent_bidi_streams = bidi
            .parse::<u64>()
            .map_err(|_| unreadable("max_concurrent_bidi_streams", bidi))?;
        Ok(Self {
            idle_timeout,
            keep_alive,
            max_concurrent_bidi_streams,
        })
    }

    /// Whether these settings can carry a move whose freeze lasts up to `max_freeze`, on the
    /// side `side`. Only this side's settings are known: the connection's idle timeout is
    /// the smaller of both sides', so the peer must meet the same rule (the other wrapper
    /// checks it).
    pub fn check(&self, side: Side, max_freeze: Duration) -> Result<(), ConfigError> {
        let needed = min_idle_timeout(max_freeze);
        if let Some(idle) = self.idle_timeout
            && idle < needed
        {
            return Err(ConfigError::IdleTimeoutTooShort {
                idle,
                needed,
                max_freeze,
            });
        }
        if side == Side::Server && self.max_concurrent_bidi_streams == 0 {
            return Err(ConfigError::NoBidiStreams);
        }
        Ok(())
    }
}

fn unreadable(field: &'static str, found: &str) -> ConfigError {
    ConfigError::Unreadable {
        field,
        found: found.chars().take(80).collect(),
    }
}

/// The value printed after `name: ` up to the next `,` or `}` at the same depth.
fn field<'a>(debug: &'a str, name: &'static str) -> Result<&'a str, ConfigError> {
    let key = format!("{name}: ");
    let start = debug
        .match_indices(&key)
        // A whole field name, not the tail of a longer one.
        .find(|(i, _)| {
            !debug[..*i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
        .map(|(i, _)| i + key.len())
        .ok_or_else(|| ConfigError::Unreadable {
            field: name,
            found: "no such field".to_owned(),
        })?;
    let rest = &debug[start..];
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '{' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            '}' if depth == 0 => return Ok(rest[..i].trim()),
            '}' => depth -= 1,
            ',' if depth == 0 => return Ok(rest[..i].trim()),
            _ => {}
        }
    }
    Ok(rest.trim())
}

/// `None` -> `None`, `Some(x)` -> `Some("x")`; anything else is taken as a bare value.
fn option(value: &str) -> Option<&str> {
    if value == "None" {
        return None;
    }
    Some(
        value
            .strip_prefix("Some(")
            .and_then(|v| v.strip_suffix(')'))
            .unwrap_or(value),
    )
}

/// Parses `Duration`'s `Debug` form: `5s`, `1.5s`, `250ms`, `10µs`, `7ns`.
fn parse_duration(text: &str) -> Option<Duration> {
    let (number, nanos_per_unit) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1_000_000u128)
    } else if let Some(n) = text.strip_suffix("µs") {
        (n, 1_000)
    } else if let Some(n) = text.strip_suffix("ns") {
        (n, 1)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1_000_000_000)
    } else {
        return None;
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) || fraction.len() > 9 {
        return None;
    }
    let whole: u128 = whole.parse().ok()?;
    let mut nanos = whole.checked_mul(nanos_per_unit)?;
    if !fraction.is_empty() {
        let digits: u128 = fraction.parse().ok()?;
        let scale = 10u128.pow(u32::try_from(fraction.len()).ok()?);
        nanos = nanos.checked_add(digits.checked_mul(nanos_per_unit)? / scale)?;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
    let sub = u32::try_from(nanos % 1_000_000_000).ok()?;
    Some(Duration::new(secs, sub))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn transport(
        idle: Option<Duration>,
        keep: Option<Duration>,
        bidi: u32,
    ) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.max_idle_timeout(idle.map(|d| quinn::IdleTimeout::try_from(d).unwrap()))
            .keep_alive_interval(keep)
            .max_concurrent_bidi_streams(bidi.into());
        t
    }

    #[test]
    fn quinn_defaults_are_read() {
        let f = TransportFacts::of_transport(&quinn::TransportConfig::default()).unwrap();
        assert_eq!(f.idle_timeout, Some(Duration::from_secs(30)));
        assert_eq!(f.keep_alive, None);
        assert_eq!(f.max_concurrent_bidi_streams, 100);
        f.check(Side::Server, DEFAULT_MAX_FREEZE).unwrap();
    }

    #[test]
    fn set_values_are_read_from_transport_server_and_client_configs() {
        let cases = [
            (
                Some(Duration::from_millis(15_500)),
                Some(Duration::from_millis(1500)),
                7,
            ),
            (
                Some(Duration::from_secs(600)),
                Some(Duration::from_micros(250)),
                0,
            ),
            (None, Some(Duration::from_nanos(1_000_000_007)), 1),
            (Some(Duration::ZERO), None, 1 << 20),
            (
                Some(Duration::from_secs(1)),
                Some(Duration::from_secs(3600)),
                3,
            ),
        ];
        let (identity, _) = crate::Identity::self_signed(&["localhost".to_owned()]).unwrap();
        let roots = identity.certs.clone();
        for (idle, keep, bidi) in cases {
            let want = TransportFacts {
                // 0 means no limit in QUIC.
                idle_timeout: idle.filter(|d| !d.is_zero()),
                keep_alive: keep,
                max_concurrent_bidi_streams: u64::from(bidi),
            };
            let t = transport(idle, keep, bidi);
            assert_eq!(TransportFacts::of_transport(&t).unwrap(), want);

            let mut server = crate::tls::server_config(
                crate::Identity {
                    certs: identity.certs.clone(),
                    key: identity.key.clone_key(),
                },
                &[b"x"],
                transport(idle, keep, bidi),
            )
            .unwrap();
            assert_eq!(TransportFacts::of_server(&server).unwrap(), want);
            server.transport_config(Arc::new(transport(None, None, 5)));
            assert_eq!(
                TransportFacts::of_server(&server)
                    .unwrap()
                    .max_concurrent_bidi_streams,
                5
            );

            let client =
                crate::tls::client_config(&roots, &[b"x"], transport(idle, keep, bidi)).unwrap();
            assert_eq!(
                TransportFacts::of_client(&client).unwrap(),
                want,
                "{client:?}"
            );
        }
    }

    #[test]
    fn a_short_idle_timeout_is_refused_with_what_to_set() {
        let f = TransportFacts::of_transport(&transport(
            Some(Duration::from_secs(5)),
            Some(Duration::from_secs(1)),
            10,
        ))
        .unwrap();
        let err = f.check(Side::Client, DEFAULT_MAX_FREEZE).unwrap_err();
        assert_eq!(
            err,
            ConfigError::IdleTimeoutTooShort {
                idle: Duration::from_secs(5),
                needed: Duration::from_secs(15),
                max_freeze: DEFAULT_MAX_FREEZE,
            }
        );
        let text = err.to_string();
        assert!(text.contains("at least 15s"), "{text}");
        assert!(text.contains("max_idle_timeout"), "{text}");
        // Exactly the minimum is enough; a shorter freeze allows a shorter timeout.
        let at_min = TransportFacts {
            idle_timeout: Some(Duration::from_secs(15)),
            ..f
        };
        at_min.check(Side::Server, DEFAULT_MAX_FREEZE).unwrap();
        f.check(Side::Client, Duration::ZERO).unwrap();
        // No idle timeout at all, with or without keep-alive.
        for keep_alive in [None, Some(Duration::from_secs(1))] {
            TransportFacts {
                idle_timeout: None,
                keep_alive,
                ..f
            }
            .check(Side::Client, DEFAULT_MAX_FREEZE)
            .unwrap();
        }
    }

    #[test]
    fn a_server_without_bidi_streams_is_refused_a_client_is_not() {
        let f = TransportFacts::of_transport(&transport(None, None, 0)).unwrap();
        assert_eq!(
            f.check(Side::Server, DEFAULT_MAX_FREEZE),
            Err(ConfigError::NoBidiStreams)
        );
        assert!(
            ConfigError::NoBidiStreams
                .to_string()
                .contains("control stream")
        );
        f.check(Side::Client, DEFAULT_MAX_FREEZE).unwrap();
    }

    #[test]
    fn unreadable_output_is_an_error_not_a_guess() {
        for text in [
            "",
            "TransportConfig { max_concurrent_bidi_streams: 1 }",
            "TransportConfig { max_concurrent_bidi_streams: 1, max_idle_timeout: Some(soon), keep_alive_interval: None }",
            "TransportConfig { max_concurrent_bidi_streams: 1, max_idle_timeout: None, keep_alive_interval: Some(5 parsecs) }",
            "TransportConfig { max_concurrent_bidi_streams: many, max_idle_timeout: None, keep_alive_interval: None }",
            "TransportConfig { not_max_idle_timeout: None, max_concurrent_bidi_streams: 1, keep_alive_interval: None }",
        ] {
            let err = TransportFacts::parse(text).unwrap_err();
            assert!(
                matches!(err, ConfigError::Unreadable { .. }),
                "{text}: {err:?}"
            );
        }
    }

    #[test]
    fn durations_parse_as_debug_prints_them() {
        for d in [
            Duration::ZERO,
            Duration::from_nanos(7),
            Duration::from_micros(10),
            Duration::from_micros(1_001),
            Duration::from_millis(250),
            Duration::from_millis(1_500),
            Duration::new(5, 1),
            Duration::from_secs(86_400),
        ] {
            assert_eq!(parse_duration(&format!("{d:?}")), Some(d), "{d:?}");
        }
        for bad in ["", "s", "1.s5", "-1s", "1h", "1.0000000001s", "µs"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
