//! The control messages and their kind bytes.

use std::fmt;
use std::net::SocketAddr;

use crate::types::{ByeReason, ClientId, MigrationId, ObservedDowntime, Role, Token, VersionRange};

/// One control message. Which side may send it is given by [`MessageKind::sent_by`].
///
/// The usual sequences (all on the first bidirectional stream of a connection):
///
/// ```text
///  client                                   server
///    | Hello{client_id, supported}  ──────►   |
///    |   ◄──────  Welcome{version, session_id} |
///    |   ◄──────  Quiesce{id, deadline_ms}     |  (optional first phase)
///    | Quiesced{id}                 ──────►   |
///    |   ◄──────  Migrate{id, new_addr, ..}    |
///    | (swap peer) Ack{id}          ──────►   |  checkpoint, move, restore, rebind
///    |   ◄──────  Resumed{id}                  |
///  or, when the move fails after Migrate:
///    |   ◄──────  MigrateAborted{id, fallback} |
///    | (swap back) Ack{id}          ──────►   |
///  then, version 2 sessions, once per migration:
///    | (first reply after the move)            |
///    | Downtime{id, downtime}       ──────►   |  recorded for the orchestrator
/// ```
///
/// `Downtime` is the only version 2 message: a client sends it only when the `Welcome` chose
/// version 2 (a version 1 server would close the stream over a kind it does not know), and
/// only for a migration that is over for it (`Resumed`, or the swap back acknowledged).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Client → server, first message on the stream.
    Hello {
        /// The client's name for itself.
        client_id: ClientId,
        /// The protocol versions the client speaks.
        supported: VersionRange,
    },
    /// Server → client, the answer to `Hello`.
    Welcome {
        /// The version the server chose from the client's range.
        version: u16,
        /// The server's identifier of this session (for logs and correlation).
        session_id: u64,
    },
    /// Server → client: the server is about to move; send to `new_addr` from now on.
    Migrate {
        /// The migration.
        migration_id: MigrationId,
        /// Where the server will be reachable after the move.
        new_addr: SocketAddr,
        /// How long the server waits for the `Ack`, in milliseconds from receipt.
        deadline_ms: u32,
        /// Opaque bytes for the client, if the server has any.
        token: Option<Token>,
    },
    /// Client → server: "I saw this `Migrate` (or `MigrateAborted`) and swapped my peer".
    /// It does not mean the service is back.
    Ack {
        /// The migration acknowledged.
        migration_id: MigrationId,
    },
    /// Server → client: stop sending application data and let what is in flight drain.
    Quiesce {
        /// The migration being prepared.
        migration_id: MigrationId,
        /// How long the server waits for `Quiesced`, in milliseconds from receipt.
        deadline_ms: u32,
    },
    /// Client → server: application data is stopped and drained.
    Quiesced {
        /// The migration being prepared.
        migration_id: MigrationId,
    },
    /// Server → client: the server runs again at its new address; application data may flow.
    Resumed {
        /// The migration that completed.
        migration_id: MigrationId,
    },
    /// Server → client: the move failed; swap back to `fallback_addr` and carry on.
    MigrateAborted {
        /// The migration that was rolled back.
        migration_id: MigrationId,
        /// Where the server is reachable again.
        fallback_addr: SocketAddr,
    },
    /// Client → server (version 2): the pause this client observed for this migration, from
    /// its last reply before the move to its first reply after it. At most once per migration,
    /// after `Resumed` or after acknowledging `MigrateAborted`.
    Downtime {
        /// The migration measured.
        migration_id: MigrationId,
        /// The pause, at most an hour.
        downtime: ObservedDowntime,
    },
    /// Either direction: the sender is closing the control stream.
    Bye {
        /// Why, for logs.
        reason: ByeReason,
    },
}

impl Message {
    /// The kind byte this message is sent with.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Hello { .. } => MessageKind::Hello,
            Message::Welcome { .. } => MessageKind::Welcome,
            Message::Migrate { .. } => MessageKind::Migrate,
            Message::Ack { .. } => MessageKind::Ack,
            Message::Quiesce { .. } => MessageKind::Quiesce,
            Message::Quiesced { .. } => MessageKind::Quiesced,
            Message::Resumed { .. } => MessageKind::Resumed,
            Message::MigrateAborted { .. } => MessageKind::MigrateAborted,
            Message::Downtime { .. } => MessageKind::Downtime,
            Message::Bye { .. } => MessageKind::Bye,
        }
    }

    /// The migration this message is about, if any.
    pub fn migration_id(&self) -> Option<MigrationId> {
        match self {
            Message::Migrate { migration_id, .. }
            | Message::Ack { migration_id }
            | Message::Quiesce { migration_id, .. }
            | Message::Quiesced { migration_id }
            | Message::Resumed { migration_id }
            | Message::MigrateAborted { migration_id, .. }
            | Message::Downtime { migration_id, .. } => Some(*migration_id),
            Message::Hello { .. } | Message::Welcome { .. } | Message::Bye { .. } => None,
        }
    }
}

/// The kind byte of a frame. `0` is reserved so that a zeroed buffer never decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum MessageKind {
    /// [`Message::Hello`].
    Hello = 1,
    /// [`Message::Welcome`].
    Welcome = 2,
    /// [`Message::Migrate`].
    Migrate = 3,
    /// [`Message::Ack`].
    Ack = 4,
    /// [`Message::Quiesce`].
    Quiesce = 5,
    /// [`Message::Quiesced`].
    Quiesced = 6,
    /// [`Message::Resumed`].
    Resumed = 7,
    /// [`Message::MigrateAborted`].
    MigrateAborted = 8,
    /// [`Message::Bye`].
    Bye = 9,
    /// [`Message::Downtime`] (version 2).
    Downtime = 10,
}

impl MessageKind {
    /// Every kind, in kind-byte order.
    pub const ALL: [MessageKind; 10] = [
        MessageKind::Hello,
        MessageKind::Welcome,
        MessageKind::Migrate,
        MessageKind::Ack,
        MessageKind::Quiesce,
        MessageKind::Quiesced,
        MessageKind::Resumed,
        MessageKind::MigrateAborted,
        MessageKind::Bye,
        MessageKind::Downtime,
    ];

    /// The kind with this byte, `None` for an unknown byte.
    pub fn from_u8(byte: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_u8() == byte)
    }

    /// The kind byte.
    pub const fn as_u8(self) -> u8 {
        self as u8
    }

    /// The protocol version that introduced this kind: its frames carry that version in their
    /// header, and a frame of an older version with this kind byte is an unknown kind (as it
    /// is to a peer of that version).
    pub const fn since(self) -> u16 {
        match self {
            MessageKind::Downtime => 2,
            MessageKind::Hello
            | MessageKind::Welcome
            | MessageKind::Migrate
            | MessageKind::Ack
            | MessageKind::Quiesce
            | MessageKind::Quiesced
            | MessageKind::Resumed
            | MessageKind::MigrateAborted
            | MessageKind::Bye => 1,
        }
    }

    /// Whether `role` may send messages of this kind.
    pub const fn sent_by(self, role: Role) -> bool {
        match self {
            MessageKind::Hello
            | MessageKind::Ack
            | MessageKind::Quiesced
            | MessageKind::Downtime => matches!(role, Role::Client),
            MessageKind::Welcome
            | MessageKind::Migrate
            | MessageKind::Quiesce
            | MessageKind::Resumed
            | MessageKind::MigrateAborted => matches!(role, Role::Server),
            MessageKind::Bye => true,
        }
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_bytes_round_trip_and_zero_is_reserved() {
        for k in MessageKind::ALL {
            assert_eq!(MessageKind::from_u8(k.as_u8()), Some(k));
        }
        assert_eq!(MessageKind::from_u8(0), None);
        assert_eq!(MessageKind::from_u8(11), None);
    }

    #[test]
    fn only_downtime_is_version_2() {
        for k in MessageKind::ALL {
            let want = if k == MessageKind::Downtime { 2 } else { 1 };
            assert_eq!(k.since(), want, "{k}");
            assert!(crate::SUPPORTED_VERSIONS.contains(k.since()), "{k}");
        }
    }

    #[test]
    fn every_kind_has_a_sender_and_only_bye_has_two() {
        for k in MessageKind::ALL {
            let c = k.sent_by(Role::Client);
            let s = k.sent_by(Role::Server);
            assert!(c || s, "{k} has no sender");
            assert_eq!(c && s, k == MessageKind::Bye, "{k}");
        }
    }
}
