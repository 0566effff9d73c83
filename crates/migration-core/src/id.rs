//! Identifiers: [`MigrationId`] names one migration, [`SessionId`] one client connection.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

/// Identifies one migration, end to end (orchestrator, server wrapper, clients).
///
/// 16 bytes chosen by the caller; this crate has no random number generator, so the caller
/// supplies random bytes (e.g. from the OS). Displayed and parsed as 32 lowercase hex digits;
/// serialized as that string in human-readable formats (JSON) and as 16 raw bytes otherwise.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MigrationId([u8; 16]);

impl MigrationId {
    /// Length of the textual (hex) form.
    pub const HEX_LEN: usize = 32;

    /// Wraps 16 caller-supplied bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl From<[u8; 16]> for MigrationId {
    fn from(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MigrationId({self})")
    }
}

/// Why a string is not a [`MigrationId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseMigrationIdError {
    /// The string does not have exactly 32 characters.
    #[error("migration id must be {expected} hex digits, got {len} characters")]
    WrongLength {
        /// Characters (not bytes) in the input.
        len: usize,
        /// Always [`MigrationId::HEX_LEN`].
        expected: usize,
    },
    /// A character is not a hex digit (`0-9`, `a-f`, `A-F`).
    #[error("invalid hex digit {ch:?} at position {index} in migration id")]
    InvalidDigit {
        /// Character position (0-based).
        index: usize,
        /// The offending character.
        ch: char,
    },
}

impl FromStr for MigrationId {
    type Err = ParseMigrationIdError;

    /// Parses 32 hex digits (either case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let len = s.chars().count();
        if len != Self::HEX_LEN {
            return Err(ParseMigrationIdError::WrongLength {
                len,
                expected: Self::HEX_LEN,
            });
        }
        // Exactly 32 chars; every accepted char is ASCII, so char index == byte index below.
        let mut out = [0u8; 16];
        let mut chars = s.chars().enumerate();
        for byte in &mut out {
            let mut value = 0u8;
            for _ in 0..2 {
                let Some((index, ch)) = chars.next() else {
                    // Unreachable given the length check; still an error, never a panic.
                    return Err(ParseMigrationIdError::WrongLength {
                        len,
                        expected: Self::HEX_LEN,
                    });
                };
                let digit = ch
                    .to_digit(16)
                    .ok_or(ParseMigrationIdError::InvalidDigit { index, ch })?;
                // `to_digit(16)` is < 16, so the cast is lossless.
                value = (value << 4) | digit as u8;
            }
            *byte = value;
        }
        Ok(Self(out))
    }
}

impl Serialize for MigrationId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for MigrationId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let s = String::deserialize(deserializer)?;
            s.parse().map_err(de::Error::custom)
        } else {
            <[u8; 16]>::deserialize(deserializer).map(Self)
        }
    }
}

/// Identifies one client session (one QUIC connection) held by the server wrapper.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "session {}", self.0)
    }
}

impl From<u64> for SessionId {
    fn from(v: u64) -> Self {
        Self(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ID: MigrationId = MigrationId::from_bytes([
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
        0xff,
    ]);

    #[test]
    fn display_is_lowercase_hex() {
        assert_eq!(ID.to_string(), "00112233445566778899aabbccddeeff");
        assert_eq!(
            format!("{ID:?}"),
            "MigrationId(00112233445566778899aabbccddeeff)"
        );
    }

    #[test]
    fn parse_accepts_both_cases() {
        assert_eq!(
            "00112233445566778899AABBCCDDEEFF".parse::<MigrationId>(),
            Ok(ID)
        );
        assert_eq!(
            "00112233445566778899aabbccddeeff".parse::<MigrationId>(),
            Ok(ID)
        );
    }

    #[test]
    fn parse_rejects_short_input() {
        assert_eq!(
            "0011".parse::<MigrationId>(),
            Err(ParseMigrationIdError::WrongLength {
                len: 4,
                expected: 32
            })
        );
    }

    #[test]
    fn parse_rejects_long_input() {
        let s = "0".repeat(33);
        assert_eq!(
            s.parse::<MigrationId>(),
            Err(ParseMigrationIdError::WrongLength {
                len: 33,
                expected: 32
            })
        );
    }

    #[test]
    fn parse_rejects_empty_input() {
        assert_eq!(
            "".parse::<MigrationId>(),
            Err(ParseMigrationIdError::WrongLength {
                len: 0,
                expected: 32
            })
        );
    }

    #[test]
    fn parse_rejects_non_hex_digit() {
        assert_eq!(
            "0011223344556677889900aabbccddeg".parse::<MigrationId>(),
            Err(ParseMigrationIdError::InvalidDigit { index: 31, ch: 'g' })
        );
    }

    #[test]
    fn parse_rejects_multibyte_char_without_panicking() {
        // 31 ASCII digits + one 2-byte char: 32 chars, 33 bytes.
        let s = format!("{}é", "0".repeat(31));
        assert_eq!(
            s.parse::<MigrationId>(),
            Err(ParseMigrationIdError::InvalidDigit {
                index: 31, ch: 'é'
            })
        );
    }

    #[test]
    fn parse_rejects_sign_prefix() {
        let s = format!("+{}", "0".repeat(31));
        assert_eq!(
            s.parse::<MigrationId>(),
            Err(ParseMigrationIdError::InvalidDigit { index: 0, ch: '+' })
        );
    }

    #[test]
    fn json_uses_hex_string() {
        let json = serde_json::to_string(&ID).unwrap();
        assert_eq!(json, "\"00112233445566778899aabbccddeeff\"");
        assert_eq!(serde_json::from_str::<MigrationId>(&json).unwrap(), ID);
        assert!(serde_json::from_str::<MigrationId>("\"xyz\"").is_err());
    }

    #[test]
    fn session_id_serializes_as_number() {
        assert_eq!(serde_json::to_string(&SessionId(9)).unwrap(), "9");
        assert_eq!(SessionId(9).to_string(), "session 9");
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(bytes in any::<[u8; 16]>()) {
            let id = MigrationId::from_bytes(bytes);
            prop_assert_eq!(id.to_string().parse::<MigrationId>(), Ok(id));
            prop_assert_eq!(id.as_bytes(), &bytes);
        }

        #[test]
        fn json_round_trip(bytes in any::<[u8; 16]>()) {
            let id = MigrationId::from_bytes(bytes);
            let back: MigrationId = serde_json::from_str(&serde_json::to_string(&id).unwrap()).unwrap();
            prop_assert_eq!(back, id);
        }

        #[test]
        fn parse_arbitrary_text_never_panics(s in any::<String>()) {
            // Either a valid id (then it round-trips) or a typed error.
            if let Ok(id) = s.parse::<MigrationId>() {
                prop_assert_eq!(id.to_string(), s.to_ascii_lowercase());
            }
        }

        #[test]
        fn parse_arbitrary_hexlike_text_never_panics(s in "[0-9a-fA-Fg-z+ ]{28,36}") {
            match s.parse::<MigrationId>() {
                Ok(id) => prop_assert_eq!(id.to_string(), s.to_ascii_lowercase()),
                Err(ParseMigrationIdError::WrongLength { len, .. }) => prop_assert_ne!(len, 32),
                Err(ParseMigrationIdError::InvalidDigit { ch, .. }) => prop_assert!(!ch.is_ascii_hexdigit()),
            }
        }
    }
}
