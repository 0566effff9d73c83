//! The server wrapper's view of its client sessions during a migration.
//!
//! ```text
//! Connected ─tell_all─► Told{deadline} ─ack─► Acked ─quiesced─► Quiesced ─resumed─► Resumed
//!                           │                   │ (request_quiesce sets a deadline)
//!                           └──expire(now)──────┴──► TimedOut
//! reset(): every session back to Connected, no active migration.
//! ```
//!
//! Decisions worth knowing:
//! - A deadline has passed when `now >= deadline`. [`SessionRegistry::expire`] returns exactly the
//!   sessions whose (ack or quiesce) deadline has passed and marks them `TimedOut`.
//! - A late ack (`now >= deadline`, not yet expired) is refused with
//!   [`RegistryError::AckAfterDeadline`] and leaves the session `Told`, so the next `expire`
//!   still reports it; an ack from a `TimedOut` session is [`RegistryError::TimedOut`].
//! - A duplicate ack is [`RegistryError::DuplicateAck`] and changes nothing. Acks may be
//!   retransmitted, so the wrapper should log it and carry on.
//! - `pending()` is "still owed an ack": `Connected` or `Told`. Timed-out sessions are not
//!   pending (they were given up on; see `timed_out()`), so `all_acked()` means "nobody left to
//!   wait for". A session inserted during a migration is `Connected` (pending) until `tell_all`
//!   is called again with the same migration id, which tells only the sessions not yet told.
//! - Any session may report `resumed` during a migration (its connection moved with the process
//!   whether or not it acked), once.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::id::{MigrationId, SessionId};
use crate::time::Timestamp;

/// What a timed-out session failed to send in time.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Awaited {
    /// The acknowledgement of the migration notice.
    Ack,
    /// The confirmation that it stopped sending.
    Quiesce,
}

/// Where one session is in the current migration.
///
/// Deliberately exhaustive: the wrapper handles each state, and a new one should break its
/// `match`es at compile time.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SessionState {
    /// Not (yet) told about a migration.
    Connected,
    /// Told at `at`; must ack before `deadline`.
    Told {
        /// When it was told.
        at: Timestamp,
        /// Ack deadline (exclusive).
        deadline: Timestamp,
    },
    /// Acked at `at`.
    Acked {
        /// When the ack arrived.
        at: Timestamp,
        /// Set by [`SessionRegistry::request_quiesce`]: must confirm quiescing before this.
        quiesce_deadline: Option<Timestamp>,
    },
    /// Confirmed it stopped sending.
    Quiesced {
        /// When the confirmation arrived.
        at: Timestamp,
    },
    /// Talking to the restored server.
    Resumed {
        /// When it resumed.
        at: Timestamp,
    },
    /// Missed a deadline.
    TimedOut {
        /// The deadline it missed.
        at: Timestamp,
        /// What it failed to send.
        awaited: Awaited,
    },
}

impl SessionState {
    /// The deadline this session is currently held to, if any.
    pub fn deadline(&self) -> Option<Timestamp> {
        match self {
            Self::Told { deadline, .. } => Some(*deadline),
            Self::Acked {
                quiesce_deadline, ..
            } => *quiesce_deadline,
            _ => None,
        }
    }

    /// `Connected` or `Told`: still owes an ack.
    pub fn is_pending(&self) -> bool {
        matches!(self, Self::Connected | Self::Told { .. })
    }
}

/// One client session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    client_id: String,
    state: SessionState,
}

impl Session {
    /// The client's own identifier (opaque to this crate).
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Where it is in the current migration.
    pub fn state(&self) -> SessionState {
        self.state
    }
}

/// A session-registry operation that was refused; the registry is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// `insert` with the registry at its configured maximum.
    #[error("session registry full ({max} sessions)")]
    Full {
        /// The configured maximum.
        max: usize,
    },
    /// `insert` of an id already present.
    #[error("{0} is already registered")]
    DuplicateSession(SessionId),
    /// The session is not registered.
    #[error("unknown {0}")]
    UnknownSession(SessionId),
    /// The operation needs an active migration and there is none.
    #[error("no migration in progress")]
    NoMigration,
    /// `tell_all` for a different migration while one is active.
    #[error("migration {active} is in progress, cannot start {requested}")]
    MigrationInProgress {
        /// The active migration.
        active: MigrationId,
        /// The one asked for.
        requested: MigrationId,
    },
    /// An ack naming another migration than the active one.
    #[error("ack for migration {got}, but migration {expected} is in progress")]
    WrongMigration {
        /// The active migration.
        expected: MigrationId,
        /// The id in the ack.
        got: MigrationId,
    },
    /// An ack from a session that was never told (joined after `tell_all`).
    #[error("{0} acked a migration it was not told about")]
    NotTold(SessionId),
    /// A second ack (or an ack after quiesce/resume).
    #[error("{0} already acked")]
    DuplicateAck(SessionId),
    /// An ack at or after its deadline; the session stays `Told` until `expire`.
    #[error("{session} acked at or after its deadline {deadline}")]
    AckAfterDeadline {
        /// The session.
        session: SessionId,
        /// Its ack deadline.
        deadline: Timestamp,
    },
    /// An ack or quiesce from a session already marked `TimedOut`.
    #[error("{session} already timed out")]
    TimedOut {
        /// The session.
        session: SessionId,
    },
    /// `quiesced` from a session that has not acked.
    #[error("{0} reported quiesced before acking")]
    NotAcked(SessionId),
    /// A second `quiesced` (or one after `resumed`).
    #[error("{0} already quiesced")]
    DuplicateQuiesce(SessionId),
    /// `quiesced` at or after its quiesce deadline; the session stays `Acked` until `expire`.
    #[error("{session} quiesced at or after its deadline {deadline}")]
    QuiesceAfterDeadline {
        /// The session.
        session: SessionId,
        /// Its quiesce deadline.
        deadline: Timestamp,
    },
    /// A second `resumed`.
    #[error("{0} already resumed")]
    DuplicateResume(SessionId),
}

/// The client sessions a server holds, and where each is in the current migration.
///
/// Bounded by `max_sessions`. Never reads a clock: every method that needs the time takes `now`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRegistry {
    max_sessions: usize,
    migration: Option<MigrationId>,
    sessions: BTreeMap<SessionId, Session>,
}

impl SessionRegistry {
    /// An empty registry holding at most `max_sessions` sessions.
    pub fn new(max_sessions: usize) -> Self {
        Self {
            max_sessions,
            migration: None,
            sessions: BTreeMap::new(),
        }
    }

    /// The configured maximum.
    pub fn max_sessions(&self) -> usize {
        self.max_sessions
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// `true` if there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// The migration sessions were told about, until `reset`.
    pub fn active_migration(&self) -> Option<MigrationId> {
        self.migration
    }

    /// One session.
    pub fn get(&self, session: SessionId) -> Option<&Session> {
        self.sessions.get(&session)
    }

    /// Every session, by id.
    pub fn iter(&self) -> impl Iterator<Item = (SessionId, &Session)> + '_ {
        self.sessions.iter().map(|(id, s)| (*id, s))
    }

    /// Registers a new session in state `Connected`.
    ///
    /// # Errors
    /// [`RegistryError::DuplicateSession`], [`RegistryError::Full`].
    pub fn insert(
        &mut self,
        session: SessionId,
        client_id: impl Into<String>,
    ) -> Result<(), RegistryError> {
        if self.sessions.contains_key(&session) {
            return Err(RegistryError::DuplicateSession(session));
        }
        if self.sessions.len() >= self.max_sessions {
            return Err(RegistryError::Full {
                max: self.max_sessions,
            });
        }
        self.sessions.insert(
            session,
            Session {
                client_id: client_id.into(),
                state: SessionState::Connected,
            },
        );
        Ok(())
    }

    /// Forgets a session (its connection closed); returns it if it was there.
    pub fn remove(&mut self, session: SessionId) -> Option<Session> {
        self.sessions.remove(&session)
    }

    /// Starts (or continues) `migration`: every `Connected` session becomes `Told`, with an ack
    /// deadline of `now + ack_deadline`. Returns the sessions told by this call, which the
    /// wrapper must now notify.
    ///
    /// # Errors
    /// [`RegistryError::MigrationInProgress`] if another migration is active.
    pub fn tell_all(
        &mut self,
        migration: MigrationId,
        now: Timestamp,
        ack_deadline: Duration,
    ) -> Result<Vec<SessionId>, RegistryError> {
        match self.migration {
            Some(active) if active != migration => {
                return Err(RegistryError::MigrationInProgress {
                    active,
                    requested: migration,
                });
            }
            _ => self.migration = Some(migration),
        }
        let deadline = now + ack_deadline;
        let mut told = Vec::new();
        for (id, s) in &mut self.sessions {
            if s.state == SessionState::Connected {
                s.state = SessionState::Told { at: now, deadline };
                told.push(*id);
            }
        }
        Ok(told)
    }

    /// The session, if known and a migration is active.
    fn entry(&mut self, session: SessionId) -> Result<&mut Session, RegistryError> {
        let has_migration = self.migration.is_some();
        let s = self
            .sessions
            .get_mut(&session)
            .ok_or(RegistryError::UnknownSession(session))?;
        if !has_migration {
            return Err(RegistryError::NoMigration);
        }
        Ok(s)
    }

    /// Records `session`'s ack of `migration` at `now`.
    ///
    /// # Errors
    /// [`RegistryError::UnknownSession`], [`RegistryError::NoMigration`],
    /// [`RegistryError::WrongMigration`], [`RegistryError::NotTold`],
    /// [`RegistryError::AckAfterDeadline`], [`RegistryError::TimedOut`],
    /// [`RegistryError::DuplicateAck`]. On error nothing changes.
    pub fn ack(
        &mut self,
        session: SessionId,
        migration: MigrationId,
        now: Timestamp,
    ) -> Result<(), RegistryError> {
        let active = self.migration;
        let s = self.entry(session)?;
        if let Some(expected) = active.filter(|a| *a != migration) {
            return Err(RegistryError::WrongMigration {
                expected,
                got: migration,
            });
        }
        match s.state {
            SessionState::Connected => Err(RegistryError::NotTold(session)),
            SessionState::Told { deadline, .. } if now >= deadline => {
                Err(RegistryError::AckAfterDeadline { session, deadline })
            }
            SessionState::Told { .. } => {
                s.state = SessionState::Acked {
                    at: now,
                    quiesce_deadline: None,
                };
                Ok(())
            }
            SessionState::TimedOut { .. } => Err(RegistryError::TimedOut { session }),
            SessionState::Acked { .. }
            | SessionState::Quiesced { .. }
            | SessionState::Resumed { .. } => Err(RegistryError::DuplicateAck(session)),
        }
    }

    /// Holds every `Acked` session without a quiesce deadline to `now + quiesce_deadline`;
    /// returns those sessions (the wrapper asks them to quiesce).
    ///
    /// # Errors
    /// [`RegistryError::NoMigration`].
    pub fn request_quiesce(
        &mut self,
        now: Timestamp,
        quiesce_deadline: Duration,
    ) -> Result<Vec<SessionId>, RegistryError> {
        if self.migration.is_none() {
            return Err(RegistryError::NoMigration);
        }
        let deadline = now + quiesce_deadline;
        let mut asked = Vec::new();
        for (id, s) in &mut self.sessions {
            if let SessionState::Acked {
                quiesce_deadline: q @ None,
                ..
            } = &mut s.state
            {
                *q = Some(deadline);
                asked.push(*id);
            }
        }
        Ok(asked)
    }

    /// Records that `session` stopped sending.
    ///
    /// # Errors
    /// [`RegistryError::UnknownSession`], [`RegistryError::NoMigration`],
    /// [`RegistryError::NotAcked`], [`RegistryError::QuiesceAfterDeadline`],
    /// [`RegistryError::TimedOut`], [`RegistryError::DuplicateQuiesce`].
    pub fn quiesced(&mut self, session: SessionId, now: Timestamp) -> Result<(), RegistryError> {
        let s = self.entry(session)?;
        match s.state {
            SessionState::Connected | SessionState::Told { .. } => {
                Err(RegistryError::NotAcked(session))
            }
            SessionState::Acked {
                quiesce_deadline: Some(deadline),
                ..
            } if now >= deadline => Err(RegistryError::QuiesceAfterDeadline { session, deadline }),
            SessionState::Acked { .. } => {
                s.state = SessionState::Quiesced { at: now };
                Ok(())
            }
            SessionState::TimedOut { .. } => Err(RegistryError::TimedOut { session }),
            SessionState::Quiesced { .. } | SessionState::Resumed { .. } => {
                Err(RegistryError::DuplicateQuiesce(session))
            }
        }
    }

    /// Records that `session` talks to the restored server. Accepted from any state but
    /// `Resumed` while a migration is active.
    ///
    /// # Errors
    /// [`RegistryError::UnknownSession`], [`RegistryError::NoMigration`],
    /// [`RegistryError::DuplicateResume`].
    pub fn resumed(&mut self, session: SessionId, now: Timestamp) -> Result<(), RegistryError> {
        let s = self.entry(session)?;
        if let SessionState::Resumed { .. } = s.state {
            return Err(RegistryError::DuplicateResume(session));
        }
        s.state = SessionState::Resumed { at: now };
        Ok(())
    }

    /// Sessions still owing an ack (`Connected` or `Told`), by id.
    pub fn pending(&self) -> Vec<SessionId> {
        self.ids_where(|s| s.is_pending())
    }

    /// `true` iff [`pending`](Self::pending) is empty: nobody left to wait for an ack from.
    pub fn all_acked(&self) -> bool {
        self.sessions.values().all(|s| !s.state.is_pending())
    }

    /// `true` iff no session is `Connected`, `Told` or `Acked` (all quiesced, resumed or
    /// timed out).
    pub fn all_quiesced(&self) -> bool {
        self.sessions
            .values()
            .all(|s| !s.state.is_pending() && !matches!(s.state, SessionState::Acked { .. }))
    }

    /// Sessions that have not resumed yet, by id.
    pub fn not_resumed(&self) -> Vec<SessionId> {
        self.ids_where(|s| !matches!(s, SessionState::Resumed { .. }))
    }

    /// Sessions marked `TimedOut`, by id.
    pub fn timed_out(&self) -> Vec<SessionId> {
        self.ids_where(|s| matches!(s, SessionState::TimedOut { .. }))
    }

    fn ids_where(&self, f: impl Fn(&SessionState) -> bool) -> Vec<SessionId> {
        self.sessions
            .iter()
            .filter(|(_, s)| f(&s.state))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Who timed out? Marks every session whose deadline is `<= now` as `TimedOut` and returns
    /// exactly those, by id.
    pub fn expire(&mut self, now: Timestamp) -> Vec<SessionId> {
        let mut expired = Vec::new();
        for (id, s) in &mut self.sessions {
            let awaited = match s.state {
                SessionState::Told { .. } => Awaited::Ack,
                SessionState::Acked { .. } => Awaited::Quiesce,
                _ => continue,
            };
            if let Some(deadline) = s.state.deadline().filter(|d| *d <= now) {
                s.state = SessionState::TimedOut {
                    at: deadline,
                    awaited,
                };
                expired.push(*id);
            }
        }
        expired
    }

    /// The earliest pending deadline: when the wrapper should wake up and call `expire`.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.sessions
            .values()
            .filter_map(|s| s.state.deadline())
            .min()
    }

    /// Ends the migration (completed or rolled back): every session back to `Connected`.
    pub fn reset(&mut self) {
        self.migration = None;
        for s in self.sessions.values_mut() {
            s.state = SessionState::Connected;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const M1: MigrationId = MigrationId::from_bytes([1; 16]);
    const M2: MigrationId = MigrationId::from_bytes([2; 16]);

    fn t(ms: u64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    fn s(n: u64) -> SessionId {
        SessionId(n)
    }

    /// Three sessions, told about M1 at t=0 with a 100 ms ack deadline.
    fn told() -> SessionRegistry {
        let mut r = SessionRegistry::new(8);
        for n in 1..=3 {
            r.insert(s(n), format!("car-{n}")).unwrap();
        }
        assert_eq!(
            r.tell_all(M1, t(0), Duration::from_millis(100)).unwrap(),
            vec![s(1), s(2), s(3)]
        );
        r
    }

    #[test]
    fn insert_get_remove() {
        let mut r = SessionRegistry::new(2);
        assert!(r.is_empty());
        r.insert(s(1), "car-1").unwrap();
        assert_eq!(r.get(s(1)).unwrap().client_id(), "car-1");
        assert_eq!(r.get(s(1)).unwrap().state(), SessionState::Connected);
        assert_eq!(r.len(), 1);
        assert_eq!(r.remove(s(1)).unwrap().client_id(), "car-1");
        assert_eq!(r.remove(s(1)), None);
    }

    #[test]
    fn insert_when_full_is_an_error() {
        let mut r = SessionRegistry::new(1);
        r.insert(s(1), "a").unwrap();
        assert_eq!(r.insert(s(2), "b"), Err(RegistryError::Full { max: 1 }));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn duplicate_insert_is_an_error() {
        let mut r = SessionRegistry::new(4);
        r.insert(s(1), "a").unwrap();
        assert_eq!(
            r.insert(s(1), "b"),
            Err(RegistryError::DuplicateSession(s(1)))
        );
        assert_eq!(r.get(s(1)).unwrap().client_id(), "a");
    }

    #[test]
    fn happy_path() {
        let mut r = told();
        assert_eq!(r.active_migration(), Some(M1));
        assert_eq!(r.pending(), vec![s(1), s(2), s(3)]);
        assert_eq!(r.next_deadline(), Some(t(100)));
        for n in 1..=3 {
            r.ack(s(n), M1, t(10)).unwrap();
        }
        assert!(r.all_acked());
        assert_eq!(r.next_deadline(), None);
        assert_eq!(
            r.request_quiesce(t(20), Duration::from_millis(50)).unwrap(),
            vec![s(1), s(2), s(3)]
        );
        assert_eq!(r.next_deadline(), Some(t(70)));
        for n in 1..=3 {
            assert!(!r.all_quiesced());
            r.quiesced(s(n), t(30)).unwrap();
        }
        assert!(r.all_quiesced());
        for n in 1..=3 {
            r.resumed(s(n), t(200)).unwrap();
        }
        assert!(r.not_resumed().is_empty());
        r.reset();
        assert_eq!(r.active_migration(), None);
        assert!(r.iter().all(|(_, x)| x.state() == SessionState::Connected));
    }

    #[test]
    fn ack_unknown_session() {
        let mut r = told();
        assert_eq!(
            r.ack(s(9), M1, t(1)),
            Err(RegistryError::UnknownSession(s(9)))
        );
    }

    #[test]
    fn ack_without_migration() {
        let mut r = SessionRegistry::new(2);
        r.insert(s(1), "a").unwrap();
        assert_eq!(r.ack(s(1), M1, t(1)), Err(RegistryError::NoMigration));
    }

    #[test]
    fn ack_wrong_migration_id() {
        let mut r = told();
        assert_eq!(
            r.ack(s(1), M2, t(1)),
            Err(RegistryError::WrongMigration {
                expected: M1,
                got: M2
            })
        );
        assert!(r.get(s(1)).unwrap().state().is_pending());
    }

    #[test]
    fn ack_from_session_never_told() {
        let mut r = told();
        r.insert(s(4), "late").unwrap();
        assert_eq!(r.ack(s(4), M1, t(1)), Err(RegistryError::NotTold(s(4))));
        // Telling again tells only the newcomer.
        assert_eq!(
            r.tell_all(M1, t(5), Duration::from_millis(10)).unwrap(),
            vec![s(4)]
        );
        r.ack(s(4), M1, t(6)).unwrap();
    }

    #[test]
    fn duplicate_ack() {
        let mut r = told();
        r.ack(s(1), M1, t(1)).unwrap();
        let before = r.clone();
        assert_eq!(
            r.ack(s(1), M1, t(2)),
            Err(RegistryError::DuplicateAck(s(1)))
        );
        assert_eq!(r, before);
    }

    #[test]
    fn ack_at_deadline_is_late_and_session_stays_told() {
        let mut r = told();
        assert_eq!(
            r.ack(s(1), M1, t(100)),
            Err(RegistryError::AckAfterDeadline {
                session: s(1),
                deadline: t(100)
            })
        );
        assert!(matches!(
            r.get(s(1)).unwrap().state(),
            SessionState::Told { .. }
        ));
        r.ack(s(1), M1, Timestamp::from_micros(99_999)).unwrap();
    }

    #[test]
    fn ack_after_timeout() {
        let mut r = told();
        assert_eq!(r.expire(t(100)), vec![s(1), s(2), s(3)]);
        assert_eq!(
            r.ack(s(2), M1, t(101)),
            Err(RegistryError::TimedOut { session: s(2) })
        );
        assert_eq!(
            r.get(s(2)).unwrap().state(),
            SessionState::TimedOut {
                at: t(100),
                awaited: Awaited::Ack
            }
        );
        assert!(r.all_acked(), "timed-out sessions are not waited for");
        assert_eq!(r.timed_out(), vec![s(1), s(2), s(3)]);
    }

    #[test]
    fn tell_all_with_other_migration_in_progress() {
        let mut r = told();
        assert_eq!(
            r.tell_all(M2, t(1), Duration::from_millis(1)),
            Err(RegistryError::MigrationInProgress {
                active: M1,
                requested: M2
            })
        );
        r.reset();
        assert_eq!(
            r.tell_all(M2, t(1), Duration::from_millis(1))
                .unwrap()
                .len(),
            3
        );
    }

    #[test]
    fn quiesce_before_ack() {
        let mut r = told();
        assert_eq!(r.quiesced(s(1), t(1)), Err(RegistryError::NotAcked(s(1))));
    }

    #[test]
    fn quiesce_without_migration() {
        let mut r = SessionRegistry::new(1);
        r.insert(s(1), "a").unwrap();
        assert_eq!(r.quiesced(s(1), t(1)), Err(RegistryError::NoMigration));
        assert_eq!(r.resumed(s(1), t(1)), Err(RegistryError::NoMigration));
        assert_eq!(
            r.request_quiesce(t(1), Duration::from_millis(1)),
            Err(RegistryError::NoMigration)
        );
    }

    #[test]
    fn quiesce_unknown_session() {
        let mut r = told();
        assert_eq!(
            r.quiesced(s(7), t(1)),
            Err(RegistryError::UnknownSession(s(7)))
        );
        assert_eq!(
            r.resumed(s(7), t(1)),
            Err(RegistryError::UnknownSession(s(7)))
        );
    }

    #[test]
    fn duplicate_quiesce() {
        let mut r = told();
        r.ack(s(1), M1, t(1)).unwrap();
        r.quiesced(s(1), t(2)).unwrap();
        assert_eq!(
            r.quiesced(s(1), t(3)),
            Err(RegistryError::DuplicateQuiesce(s(1)))
        );
    }

    #[test]
    fn quiesce_after_deadline_then_expire() {
        let mut r = told();
        r.ack(s(1), M1, t(1)).unwrap();
        r.request_quiesce(t(10), Duration::from_millis(5)).unwrap();
        assert_eq!(
            r.quiesced(s(1), t(15)),
            Err(RegistryError::QuiesceAfterDeadline {
                session: s(1),
                deadline: t(15)
            })
        );
        assert_eq!(r.expire(t(15)), vec![s(1)]);
        assert_eq!(
            r.quiesced(s(1), t(16)),
            Err(RegistryError::TimedOut { session: s(1) })
        );
        assert_eq!(
            r.get(s(1)).unwrap().state(),
            SessionState::TimedOut {
                at: t(15),
                awaited: Awaited::Quiesce
            }
        );
    }

    #[test]
    fn duplicate_resume() {
        let mut r = told();
        r.resumed(s(3), t(5)).unwrap();
        assert_eq!(
            r.resumed(s(3), t(6)),
            Err(RegistryError::DuplicateResume(s(3)))
        );
    }

    #[test]
    fn expire_only_passed_deadlines_and_next_deadline() {
        let mut r = told();
        r.insert(s(4), "late").unwrap();
        r.tell_all(M1, t(50), Duration::from_millis(100)).unwrap();
        assert_eq!(r.next_deadline(), Some(t(100)));
        assert_eq!(r.expire(t(99)), Vec::<SessionId>::new());
        r.ack(s(1), M1, t(99)).unwrap();
        assert_eq!(r.expire(t(100)), vec![s(2), s(3)]);
        assert_eq!(r.next_deadline(), Some(t(150)));
        assert_eq!(r.pending(), vec![s(4)]);
        assert_eq!(
            r.expire(t(100)),
            Vec::<SessionId>::new(),
            "expire is idempotent"
        );
    }

    #[test]
    fn removing_a_pending_session_unblocks_all_acked() {
        let mut r = told();
        r.ack(s(1), M1, t(1)).unwrap();
        r.ack(s(2), M1, t(1)).unwrap();
        assert!(!r.all_acked());
        r.remove(s(3));
        assert!(r.all_acked());
    }

    #[test]
    fn errors_display() {
        assert_eq!(
            RegistryError::Full { max: 3 }.to_string(),
            "session registry full (3 sessions)"
        );
        assert_eq!(
            RegistryError::DuplicateAck(s(4)).to_string(),
            "session 4 already acked"
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        Remove(u64),
        TellAll(bool, u64),
        Ack(u64, bool),
        RequestQuiesce(u64),
        Quiesced(u64),
        Resumed(u64),
        Expire,
        Reset,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..6).prop_map(Op::Insert),
            (0u64..6).prop_map(Op::Remove),
            (any::<bool>(), 0u64..100).prop_map(|(m, d)| Op::TellAll(m, d)),
            (0u64..6, proptest::bool::weighted(0.9)).prop_map(|(n, m)| Op::Ack(n, m)),
            (0u64..100).prop_map(Op::RequestQuiesce),
            (0u64..6).prop_map(Op::Quiesced),
            (0u64..6).prop_map(Op::Resumed),
            Just(Op::Expire),
            Just(Op::Reset),
        ]
    }

    proptest! {
        #[test]
        fn registry_invariants(ops in proptest::collection::vec((op(), 0u64..40), 0..60)) {
            let mut r = SessionRegistry::new(4);
            let mut now = t(0);
            for (op, advance) in ops {
                now = now + Duration::from_millis(advance);
                let before = r.clone();
                let result = match op {
                    Op::Insert(n) => r.insert(s(n), "c").map(|_| ()),
                    Op::Remove(n) => { r.remove(s(n)); Ok(()) }
                    Op::TellAll(m, d) => r
                        .tell_all(if m { M1 } else { M2 }, now, Duration::from_millis(d))
                        .map(|_| ()),
                    Op::Ack(n, m) => r.ack(s(n), if m { M1 } else { M2 }, now),
                    Op::RequestQuiesce(d) => r.request_quiesce(now, Duration::from_millis(d)).map(|_| ()),
                    Op::Quiesced(n) => r.quiesced(s(n), now),
                    Op::Resumed(n) => r.resumed(s(n), now),
                    Op::Expire => {
                        let expected: Vec<SessionId> = r
                            .iter()
                            .filter(|(_, x)| x.state().deadline().is_some_and(|d| d <= now))
                            .map(|(id, _)| id)
                            .collect();
                        let got = r.expire(now);
                        prop_assert_eq!(&got, &expected);
                        for id in &got {
                            let timed_out = matches!(r.get(*id).unwrap().state(), SessionState::TimedOut { .. });
                            prop_assert!(timed_out);
                        }
                        prop_assert!(r.next_deadline().is_none_or(|d| d > now));
                        Ok(())
                    }
                    Op::Reset => { r.reset(); Ok(()) }
                };
                if result.is_err() {
                    prop_assert_eq!(&r, &before, "a refused operation changed the registry");
                }
                prop_assert!(r.len() <= r.max_sessions());
                prop_assert_eq!(r.all_acked(), r.pending().is_empty());
                let pending_by_state: Vec<SessionId> = r
                    .iter()
                    .filter(|(_, x)| matches!(x.state(), SessionState::Connected | SessionState::Told { .. }))
                    .map(|(id, _)| id)
                    .collect();
                prop_assert_eq!(r.pending(), pending_by_state);
                let min_deadline = r.iter().filter_map(|(_, x)| x.state().deadline()).min();
                prop_assert_eq!(r.next_deadline(), min_deadline);
            }
        }
    }
}
