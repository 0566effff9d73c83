//! Lower-case hex formatting for ids and digests.

use std::fmt;

/// Writes `bytes` as lower-case hex.
pub(crate) fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}
