//! Field types of the control messages: identifiers, the version range, and the bounded
//! strings and byte strings whose limits are part of the protocol.

use std::fmt;

/// Longest [`ClientId`], in bytes of UTF-8.
pub const MAX_CLIENT_ID: usize = 128;
/// Longest [`Token`], in bytes.
pub const MAX_TOKEN: usize = 512;
/// Longest [`ByeReason`], in bytes of UTF-8.
pub const MAX_BYE_REASON: usize = 256;
/// Longest [`ObservedDowntime`] a client may report: one hour, in microseconds. A pause that
/// long is not a move any more (the QUIC connection's idle timeout is far shorter), so a
/// larger value can only be a bug or garbage.
pub const MAX_DOWNTIME_US: u64 = 3_600_000_000;

/// Which end of the control stream a value belongs to.
///
/// Deliberately exhaustive: a control stream has exactly two ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The client wrapper (cwrapper), which opened the stream.
    Client,
    /// The server wrapper (swrapper), inside the process that gets migrated.
    Server,
}

impl Role {
    /// The other end.
    pub fn peer(self) -> Role {
        match self {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Client => "client",
            Role::Server => "server",
        })
    }
}

/// Identifies one migration; every message about that migration carries it (the type is
/// migration-core's, so the wrappers and the orchestrator share one identifier).
pub use migration_core::MigrationId;

/// A non-empty, inclusive range of protocol versions, `min <= max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VersionRange {
    min: u16,
    max: u16,
}

/// A version range whose minimum is above its maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("version range {min}..={max} is empty")]
pub struct InvalidVersionRange {
    /// The minimum given.
    pub min: u16,
    /// The maximum given.
    pub max: u16,
}

impl VersionRange {
    /// The range `min..=max`; refused when it would be empty.
    pub const fn new(min: u16, max: u16) -> Result<Self, InvalidVersionRange> {
        if min <= max {
            Ok(Self { min, max })
        } else {
            Err(InvalidVersionRange { min, max })
        }
    }

    /// The range holding `version` alone.
    pub const fn single(version: u16) -> Self {
        Self {
            min: version,
            max: version,
        }
    }

    /// Lowest version in the range.
    pub const fn min(&self) -> u16 {
        self.min
    }

    /// Highest version in the range.
    pub const fn max(&self) -> u16 {
        self.max
    }

    /// Whether `version` lies in the range.
    pub const fn contains(&self, version: u16) -> bool {
        self.min <= version && version <= self.max
    }

    /// The highest version both ranges hold, the one a server picks for its `Welcome`.
    pub fn highest_common(&self, other: &VersionRange) -> Option<u16> {
        let top = self.max.min(other.max);
        (top >= self.min.max(other.min)).then_some(top)
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.min, self.max)
    }
}

/// The pause a client observed across one migration (its last reply before the move to its
/// first reply after it), in whole microseconds, at most [`MAX_DOWNTIME_US`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObservedDowntime(u64);

/// A downtime above [`MAX_DOWNTIME_US`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a downtime of {micros} us exceeds the maximum of {max} us", max = MAX_DOWNTIME_US)]
pub struct DowntimeTooLong {
    /// The value given, in microseconds (saturated at `u64::MAX`).
    pub micros: u64,
}

impl ObservedDowntime {
    /// Refuses a value above [`MAX_DOWNTIME_US`].
    pub const fn from_micros(micros: u64) -> Result<Self, DowntimeTooLong> {
        if micros > MAX_DOWNTIME_US {
            Err(DowntimeTooLong { micros })
        } else {
            Ok(Self(micros))
        }
    }

    /// `d` truncated to whole microseconds; refused above [`MAX_DOWNTIME_US`].
    pub fn new(d: std::time::Duration) -> Result<Self, DowntimeTooLong> {
        Self::from_micros(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    /// The value in microseconds.
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// The value as a duration.
    pub const fn as_duration(self) -> std::time::Duration {
        std::time::Duration::from_micros(self.0)
    }
}

impl fmt::Display for ObservedDowntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.3} ms", self.0 as f64 / 1e3)
    }
}

/// The bounded fields of the control messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Field {
    /// `Hello::client_id`, at most [`MAX_CLIENT_ID`] bytes.
    ClientId,
    /// `Migrate::token`, at most [`MAX_TOKEN`] bytes.
    Token,
    /// `Bye::reason`, at most [`MAX_BYE_REASON`] bytes.
    ByeReason,
}

impl Field {
    /// The largest length the protocol allows for this field, in bytes.
    pub const fn max_len(self) -> usize {
        match self {
            Field::ClientId => MAX_CLIENT_ID,
            Field::Token => MAX_TOKEN,
            Field::ByeReason => MAX_BYE_REASON,
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::ClientId => "client id",
            Field::Token => "migration token",
            Field::ByeReason => "bye reason",
        })
    }
}

/// A value longer than its field allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{field} of {len} bytes exceeds the maximum of {max} bytes")]
pub struct LengthError {
    /// Which field.
    pub field: Field,
    /// The length given, in bytes.
    pub len: usize,
    /// The maximum for that field, in bytes.
    pub max: usize,
}

fn check(field: Field, len: usize) -> Result<(), LengthError> {
    let max = field.max_len();
    if len > max {
        Err(LengthError { field, len, max })
    } else {
        Ok(())
    }
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a character boundary.
fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The client's name for itself, at most [`MAX_CLIENT_ID`] bytes (used for logs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientId(String);

impl ClientId {
    /// Refuses an id longer than [`MAX_CLIENT_ID`] bytes.
    pub fn new(id: impl Into<String>) -> Result<Self, LengthError> {
        let id = id.into();
        check(Field::ClientId, id.len())?;
        Ok(Self(id))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Opaque bytes the server hands the client with a `Migrate`, at most [`MAX_TOKEN`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Token(Vec<u8>);

impl Token {
    /// Refuses a token longer than [`MAX_TOKEN`] bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, LengthError> {
        let bytes = bytes.into();
        check(Field::Token, bytes.len())?;
        Ok(Self(bytes))
    }

    /// The token bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The token bytes, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// Why a side says `Bye`, at most [`MAX_BYE_REASON`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ByeReason(String);

impl ByeReason {
    /// Refuses a reason longer than [`MAX_BYE_REASON`] bytes.
    pub fn new(reason: impl Into<String>) -> Result<Self, LengthError> {
        let reason = reason.into();
        check(Field::ByeReason, reason.len())?;
        Ok(Self(reason))
    }

    /// Keeps the longest prefix of `reason` that fits, cut on a character boundary; handy for
    /// passing on an error message of any length.
    pub fn truncating(reason: &str) -> Self {
        Self(truncate_str(reason, MAX_BYE_REASON).to_owned())
    }

    /// The reason.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ByeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_fields_refuse_one_byte_too_many() {
        assert!(ClientId::new("a".repeat(MAX_CLIENT_ID)).is_ok());
        assert_eq!(
            ClientId::new("a".repeat(MAX_CLIENT_ID + 1)),
            Err(LengthError {
                field: Field::ClientId,
                len: MAX_CLIENT_ID + 1,
                max: MAX_CLIENT_ID
            })
        );
        assert!(Token::new(vec![0; MAX_TOKEN]).is_ok());
        assert_eq!(
            Token::new(vec![0; MAX_TOKEN + 1]).unwrap_err().field,
            Field::Token
        );
        assert_eq!(
            ByeReason::new("x".repeat(MAX_BYE_REASON + 1))
                .unwrap_err()
                .field,
            Field::ByeReason
        );
    }

    #[test]
    fn downtime_is_bounded_to_an_hour() {
        use std::time::Duration;
        assert_eq!(
            ObservedDowntime::from_micros(MAX_DOWNTIME_US).map(ObservedDowntime::as_micros),
            Ok(MAX_DOWNTIME_US)
        );
        assert_eq!(
            ObservedDowntime::from_micros(MAX_DOWNTIME_US + 1),
            Err(DowntimeTooLong {
                micros: MAX_DOWNTIME_US + 1
            })
        );
        assert_eq!(
            ObservedDowntime::new(Duration::from_secs(3601)),
            Err(DowntimeTooLong {
                micros: 3_601_000_000
            })
        );
        assert_eq!(
            ObservedDowntime::new(Duration::MAX),
            Err(DowntimeTooLong { micros: u64::MAX })
        );
        // Truncated to whole microseconds.
        let d = ObservedDowntime::new(Duration::from_nanos(42_999)).unwrap();
        assert_eq!(d.as_micros(), 42);
        assert_eq!(d.as_duration(), Duration::from_micros(42));
        assert_eq!(d.to_string(), "0.042 ms");
    }

    #[test]
    fn truncating_reason_cuts_on_a_char_boundary() {
        // 'é' is two bytes: 255 ASCII bytes then 'é' would end at byte 257.
        let long = format!("{}é tail", "a".repeat(MAX_BYE_REASON - 1));
        let r = ByeReason::truncating(&long);
        assert_eq!(r.as_str(), "a".repeat(MAX_BYE_REASON - 1));
        assert_eq!(ByeReason::truncating("short").as_str(), "short");
    }

    #[test]
    fn version_ranges() {
        assert_eq!(
            VersionRange::new(3, 2),
            Err(InvalidVersionRange { min: 3, max: 2 })
        );
        let a = VersionRange::new(1, 4).unwrap();
        let b = VersionRange::new(3, 9).unwrap();
        assert_eq!(a.highest_common(&b), Some(4));
        assert_eq!(b.highest_common(&a), Some(4));
        assert_eq!(
            a.highest_common(&VersionRange::single(5)),
            None,
            "disjoint ranges share nothing"
        );
        assert!(a.contains(1) && a.contains(4) && !a.contains(5) && !a.contains(0));
    }

    #[test]
    fn migration_id_displays_as_hex() {
        let mut b = [0u8; 16];
        b[0] = 0xab;
        b[15] = 0x01;
        assert_eq!(
            MigrationId::from_bytes(b).to_string(),
            "ab000000000000000000000000000001"
        );
    }
}
