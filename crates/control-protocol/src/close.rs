//! QUIC application error codes for closing the control stream.

use std::fmt;

/// The application error code a wrapper passes to `SendStream::reset` / `RecvStream::stop`
/// (or a connection close) when it abandons the control stream.
///
/// The numbers are part of the protocol: never renumber a variant, only add new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
#[non_exhaustive]
pub enum CloseCode {
    /// Orderly close, nothing went wrong.
    Normal = 0,
    /// The peer sent bytes that are not a valid control message.
    ProtocolViolation = 1,
    /// The peer speaks no protocol version this side speaks.
    UnsupportedVersion = 2,
    /// The peer announced a frame larger than the control stream allows.
    FrameTooLarge = 3,
    /// A valid message that this side may not receive now (wrong direction or out of order).
    UnexpectedMessage = 4,
    /// This side failed for a reason of its own.
    Internal = 5,
}

/// A number that names no [`CloseCode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown control stream close code {0}")]
pub struct UnknownCloseCode(pub u32);

impl CloseCode {
    /// Every code, in numeric order.
    pub const ALL: [CloseCode; 6] = [
        CloseCode::Normal,
        CloseCode::ProtocolViolation,
        CloseCode::UnsupportedVersion,
        CloseCode::FrameTooLarge,
        CloseCode::UnexpectedMessage,
        CloseCode::Internal,
    ];

    /// The code with this number, as read from a peer's reset or stop.
    pub fn from_u32(code: u32) -> Result<Self, UnknownCloseCode> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_u32() == code)
            .ok_or(UnknownCloseCode(code))
    }

    /// The number sent on the wire.
    pub const fn as_u32(self) -> u32 {
        self as u32
    }
}

impl From<CloseCode> for u32 {
    fn from(code: CloseCode) -> u32 {
        code.as_u32()
    }
}

impl TryFrom<u32> for CloseCode {
    type Error = UnknownCloseCode;

    fn try_from(code: u32) -> Result<Self, Self::Error> {
        Self::from_u32(code)
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?} ({})", self.as_u32())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_fixed_and_round_trip() {
        let expected = [0, 1, 2, 3, 4, 5];
        for (code, n) in CloseCode::ALL.into_iter().zip(expected) {
            assert_eq!(code.as_u32(), n);
            assert_eq!(CloseCode::from_u32(n), Ok(code));
            assert_eq!(CloseCode::try_from(n), Ok(code));
        }
    }

    #[test]
    fn unknown_number_is_a_typed_error() {
        assert_eq!(CloseCode::from_u32(6), Err(UnknownCloseCode(6)));
        assert_eq!(
            CloseCode::from_u32(u32::MAX),
            Err(UnknownCloseCode(u32::MAX))
        );
    }
}
