//! Caller-provided time.
//!
//! This crate never reads a clock. Every input that needs the time takes a [`Timestamp`]: a count
//! of microseconds since an epoch the caller chooses (the orchestrator uses the Unix epoch, the
//! server wrapper may use its process start). All arithmetic saturates; nothing here can panic.

use std::fmt;
use std::ops::Add;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A point in time: microseconds since an epoch chosen by the caller.
///
/// Timestamps from different epochs must not be mixed; the type cannot check that.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The epoch itself.
    pub const ZERO: Self = Self(0);

    /// A timestamp `micros` microseconds after the epoch.
    pub const fn from_micros(micros: u64) -> Self {
        Self(micros)
    }

    /// A timestamp `millis` milliseconds after the epoch (saturating at `u64::MAX` microseconds).
    pub const fn from_millis(millis: u64) -> Self {
        Self(millis.saturating_mul(1_000))
    }

    /// Microseconds since the epoch.
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// Time elapsed from `earlier` to `self`, or zero if `earlier` is later than `self`.
    pub const fn saturating_duration_since(self, earlier: Self) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }

    /// `self + duration`, saturating at the largest representable timestamp.
    ///
    /// Sub-microsecond parts of `duration` are truncated.
    pub fn saturating_add(self, duration: Duration) -> Self {
        Self(self.0.saturating_add(duration_to_micros(duration)))
    }
}

impl Add<Duration> for Timestamp {
    type Output = Self;

    /// Saturating addition; see [`Timestamp::saturating_add`].
    fn add(self, rhs: Duration) -> Self {
        self.saturating_add(rhs)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}us", self.0)
    }
}

/// Whole microseconds in `d`, saturating at `u64::MAX`.
pub(crate) fn duration_to_micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Serde helpers that write a [`Duration`] as a whole number of microseconds.
pub(crate) mod micros {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    use super::duration_to_micros;

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(duration_to_micros(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_micros)
    }

    /// The same for `Option<Duration>`.
    pub(crate) mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        use super::duration_to_micros;

        pub(crate) fn serialize<S: Serializer>(
            d: &Option<Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_some(&duration_to_micros(*d)),
                None => s.serialize_none(),
            }
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Duration>, D::Error> {
            Option::<u64>::deserialize(d).map(|o| o.map(Duration::from_micros))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn constructors_agree() {
        assert_eq!(Timestamp::from_millis(3), Timestamp::from_micros(3_000));
        assert_eq!(Timestamp::from_micros(7).as_micros(), 7);
        assert_eq!(Timestamp::from_millis(u64::MAX).as_micros(), u64::MAX);
    }

    #[test]
    fn duration_since_saturates_at_zero() {
        let a = Timestamp::from_micros(10);
        let b = Timestamp::from_micros(25);
        assert_eq!(b.saturating_duration_since(a), Duration::from_micros(15));
        assert_eq!(a.saturating_duration_since(b), Duration::ZERO);
    }

    #[test]
    fn add_saturates_and_truncates() {
        let t = Timestamp::from_micros(u64::MAX - 1);
        assert_eq!((t + Duration::from_secs(1)).as_micros(), u64::MAX);
        assert_eq!((t + Duration::MAX).as_micros(), u64::MAX);
        assert_eq!(
            (Timestamp::ZERO + Duration::from_nanos(1_999)).as_micros(),
            1,
            "sub-microsecond part is truncated"
        );
    }

    #[test]
    fn serializes_as_plain_number() {
        let json = serde_json::to_string(&Timestamp::from_micros(42)).unwrap();
        assert_eq!(json, "42");
        let back: Timestamp = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Timestamp::from_micros(42));
    }

    #[test]
    fn negative_json_is_an_error() {
        assert!(serde_json::from_str::<Timestamp>("-1").is_err());
    }

    proptest! {
        #[test]
        fn add_then_since_round_trips(base in 0u64..u64::MAX / 2, d in 0u64..u64::MAX / 2) {
            let t = Timestamp::from_micros(base);
            let later = t + Duration::from_micros(d);
            prop_assert_eq!(later.saturating_duration_since(t), Duration::from_micros(d));
        }

        #[test]
        fn serde_round_trip(micros in any::<u64>()) {
            let t = Timestamp::from_micros(micros);
            let back: Timestamp = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
            prop_assert_eq!(back, t);
        }
    }
}
