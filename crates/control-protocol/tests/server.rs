//! `ServerControl` against real `ClientControl`s, in virtual time: bytes move only when the
//! test says so, and time only advances when the test says so.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use control_protocol::{
    ByeReason, ClientControl, ClientEvent, ClientId, ClientState, CloseCode, ControlDecoder,
    DowntimeRefused, Ignored, MAX_DOWNTIME_US, Message, MessageKind, ObservedDowntime, Refusal,
    Role, RoundKind, RoundReport, SUPPORTED_VERSIONS, ServerConfig, ServerControl, ServerError,
    ServerEvent, ServerOutput, VersionRange, encode,
};
use migration_core::{MigrationId, SessionId, SessionState, Timestamp};
use proptest::prelude::*;

const M1: MigrationId = MigrationId::from_bytes([1; 16]);
const M2: MigrationId = MigrationId::from_bytes([2; 16]);
const DEADLINE: Duration = Duration::from_millis(100);
const HELLO: Duration = Duration::from_millis(500);

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn ms(n: u64) -> Timestamp {
    Timestamp::from_millis(n)
}

fn frame(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode(msg, &mut out).unwrap();
    out
}

/// One simulated client: its state machine, what the server sent it (decoded, not yet
/// handled), and what it wrote but the test has not delivered yet.
struct Client {
    control: ClientControl,
    decoder: ControlDecoder,
    inbox: Vec<Message>,
    outbox: Vec<u8>,
    events: Vec<ClientEvent>,
}

/// The server and its clients; the test moves bytes and time.
struct World {
    server: ServerControl,
    now: Timestamp,
    clients: BTreeMap<SessionId, Client>,
    events: Vec<ServerEvent>,
    closed: BTreeMap<SessionId, CloseCode>,
    outputs: usize,
}

impl World {
    fn new(max_sessions: usize) -> Self {
        Self::with_config(ServerConfig::new(max_sessions, HELLO))
    }

    fn with_config(config: ServerConfig) -> Self {
        Self {
            server: ServerControl::new(config),
            now: ms(0),
            clients: BTreeMap::new(),
            events: Vec::new(),
            closed: BTreeMap::new(),
            outputs: 0,
        }
    }

    /// Connects a client and delivers its Hello (and the Welcome back).
    fn connect(&mut self, name: &str) -> SessionId {
        let s = self.server.on_connect(self.now).unwrap();
        let mut outbox = Vec::new();
        let control = ClientControl::new(
            ClientId::new(name).unwrap(),
            SUPPORTED_VERSIONS,
            &mut outbox,
        )
        .unwrap();
        self.clients.insert(
            s,
            Client {
                control,
                decoder: ControlDecoder::new(Role::Client),
                inbox: Vec::new(),
                outbox,
                events: Vec::new(),
            },
        );
        self.flush(s);
        self.handle(s);
        s
    }

    /// Moves every server output to its destination.
    fn drain(&mut self) {
        while let Some(out) = self.server.poll_output() {
            self.outputs += 1;
            match out {
                ServerOutput::Transmit { session, bytes } => {
                    assert!(
                        !self.closed.contains_key(&session),
                        "bytes after a close to {session}"
                    );
                    // Sessions the test drives by hand have no simulated client.
                    let Some(c) = self.clients.get_mut(&session) else {
                        continue;
                    };
                    c.decoder.push(&bytes);
                    while let Some(m) = c.decoder.next().unwrap() {
                        c.inbox.push(m);
                    }
                }
                ServerOutput::Close { session, code } => {
                    assert!(
                        self.closed.insert(session, code).is_none(),
                        "closed {session} twice"
                    );
                }
                ServerOutput::Finish { .. } => {}
                ServerOutput::Event(e) => self.events.push(e),
                other => panic!("unknown output {other:?}"),
            }
        }
    }

    /// Delivers what the client wrote to the server.
    fn flush(&mut self, s: SessionId) {
        let bytes = std::mem::take(&mut self.clients.get_mut(&s).unwrap().outbox);
        self.server.on_bytes(s, &bytes, self.now);
        self.drain();
    }

    /// The client handles its inbox like cwrapper: swaps at once and answers into its outbox
    /// (not delivered until `flush`).
    fn handle(&mut self, s: SessionId) {
        let c = self.clients.get_mut(&s).unwrap();
        for m in std::mem::take(&mut c.inbox) {
            let Ok(ev) = c.control.on_message(m, &mut c.outbox) else {
                continue;
            };
            match &ev {
                ClientEvent::SwapPeer { migration_id, .. }
                | ClientEvent::SwapBack { migration_id, .. } => {
                    c.control.swapped(*migration_id, &mut c.outbox).unwrap();
                }
                ClientEvent::Quiesce { migration_id, .. } => {
                    c.control.quiesced(*migration_id, &mut c.outbox).unwrap();
                }
                _ => {}
            }
            c.events.push(ev);
        }
    }

    fn advance(&mut self, to: Timestamp) {
        self.now = to;
        self.server.handle_timeout(to);
        self.drain();
    }

    fn take_events(&mut self) -> Vec<ServerEvent> {
        std::mem::take(&mut self.events)
    }

    fn report(&mut self, kind: RoundKind) -> Option<RoundReport> {
        let mut found = None;
        for e in &self.events {
            let r = match e {
                ServerEvent::QuiesceComplete(r)
                | ServerEvent::AnnounceComplete(r)
                | ServerEvent::AbortComplete(r) => r,
                _ => continue,
            };
            if r.kind == kind {
                assert!(found.is_none(), "two {kind} reports");
                found = Some(r.clone());
            }
        }
        found
    }

    fn announce(&mut self, id: MigrationId) -> Vec<SessionId> {
        let told = self
            .server
            .announce(id, addr(9), DEADLINE, self.now)
            .unwrap();
        self.drain();
        told
    }

    /// The client reports a pause of `ms` for `id` into its outbox (not delivered until
    /// `flush`).
    fn report_downtime(
        &mut self,
        s: SessionId,
        id: MigrationId,
        ms: u64,
    ) -> Result<(), DowntimeRefused> {
        let c = self.clients.get_mut(&s).unwrap();
        c.control.report_downtime(id, pause(ms), &mut c.outbox)
    }

    /// A whole move: announce, every client acks, resumed, every client sees it.
    fn move_once(&mut self, id: MigrationId) {
        let told = self.announce(id);
        for &x in &told {
            self.handle(x);
            self.flush(x);
        }
        self.server.resumed(self.now).unwrap();
        self.drain();
        for x in told {
            self.handle(x);
        }
    }

    /// The downtime reports among the events so far: (session, client, migration, ms).
    fn downtimes(&self) -> Vec<(SessionId, String, MigrationId, u64)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                ServerEvent::DowntimeReported {
                    session,
                    client_id,
                    migration_id,
                    downtime,
                } => Some((
                    *session,
                    client_id.as_str().to_owned(),
                    *migration_id,
                    downtime.as_micros() / 1000,
                )),
                _ => None,
            })
            .collect()
    }

    /// The ignored downtime reports among the events so far.
    fn ignored_downtimes(&self) -> Vec<(SessionId, Ignored)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                ServerEvent::Ignored {
                    session,
                    kind: MessageKind::Downtime,
                    why,
                } => Some((*session, why.clone())),
                _ => None,
            })
            .collect()
    }
}

fn pause(ms: u64) -> ObservedDowntime {
    ObservedDowntime::new(Duration::from_millis(ms)).unwrap()
}

/// A `Downtime` frame as any client could write it, whatever its state machine allows.
fn downtime_frame(id: MigrationId, ms: u64) -> Vec<u8> {
    frame(&Message::Downtime {
        migration_id: id,
        downtime: pause(ms),
    })
}

fn ids(list: &[(SessionId, ClientId)]) -> Vec<SessionId> {
    list.iter().map(|(s, _)| *s).collect()
}

fn three() -> (World, [SessionId; 3]) {
    let mut w = World::new(8);
    let s = [w.connect("a"), w.connect("b"), w.connect("c")];
    for x in s {
        assert!(matches!(
            w.clients[&x].events[..],
            [ClientEvent::Welcomed { version: 2, session_id }] if session_id == x.0
        ));
    }
    w.take_events();
    (w, s)
}

fn permutations(items: &[usize]) -> Vec<Vec<usize>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut all = Vec::new();
    for (i, first) in items.iter().enumerate() {
        let mut rest = items.to_vec();
        rest.remove(i);
        for mut p in permutations(&rest) {
            p.insert(0, *first);
            all.push(p);
        }
    }
    all
}

#[test]
fn every_ack_order_of_three_clients_completes_the_announce() {
    let orders = permutations(&[0, 1, 2]);
    assert_eq!(orders.len(), 6);
    for order in orders {
        let (mut w, s) = three();
        assert_eq!(w.announce(M1), s.to_vec());
        for x in s {
            w.handle(x);
            assert!(matches!(
                w.clients[&x].events.last(),
                Some(ClientEvent::SwapPeer { migration_id: M1, new_addr, .. }) if *new_addr == addr(9)
            ));
        }
        for (n, &i) in order.iter().enumerate() {
            w.now = ms(10 * (n as u64 + 1));
            w.flush(s[i]);
            let report = w.report(RoundKind::Announce);
            if n < 2 {
                assert!(report.is_none(), "{order:?}: complete after {} acks", n + 1);
                assert_eq!(w.server.round(), Some((RoundKind::Announce, M1)));
            } else {
                let r = report.unwrap_or_else(|| panic!("{order:?}: no report"));
                assert_eq!(ids(&r.acked), s.to_vec(), "{order:?}");
                assert!(r.missing.is_empty() && !r.deadline_passed);
                assert_eq!((r.started, r.ended), (ms(0), ms(30)));
            }
        }
        assert!(w.server.poll_timeout().is_none(), "nothing left to time");
        assert!(w.closed.is_empty());
    }
}

#[test]
fn missing_acks_are_reported_at_the_deadline_and_late_acks_are_ignored() {
    let (mut w, s) = three();
    w.announce(M1);
    for x in s {
        w.handle(x);
    }
    w.flush(s[1]);
    assert_eq!(w.server.poll_timeout(), Some(ms(100)));
    w.advance(ms(99));
    assert!(w.report(RoundKind::Announce).is_none());
    w.advance(ms(100));
    let r = w.report(RoundKind::Announce).unwrap();
    assert_eq!(ids(&r.acked), vec![s[1]]);
    assert_eq!(ids(&r.missing), vec![s[0], s[2]]);
    assert!(r.deadline_passed);
    assert!(matches!(
        w.server.session(s[0]).unwrap().state,
        SessionState::TimedOut { .. }
    ));
    // The late ack, and a duplicate: ignored, not closed, reported once.
    w.take_events();
    w.flush(s[0]);
    w.server
        .on_bytes(s[1], &frame(&Message::Ack { migration_id: M1 }), w.now);
    w.drain();
    assert!(w.closed.is_empty());
    let ignored: Vec<_> = w
        .take_events()
        .into_iter()
        .filter(|e| {
            matches!(
                e,
                ServerEvent::Ignored {
                    why: Ignored::Registry(_),
                    ..
                }
            )
        })
        .collect();
    assert_eq!(ignored.len(), 2, "{ignored:?}");
}

#[test]
fn garbage_mid_migration_closes_only_that_stream() {
    let (mut w, s) = three();
    w.announce(M1);
    for x in s {
        w.handle(x);
    }
    w.flush(s[0]);
    w.server.on_bytes(s[1], &[0, 0, 0, 3, 0, 1, 200], w.now);
    w.drain();
    assert_eq!(
        w.closed.iter().collect::<Vec<_>>(),
        [(&s[1], &CloseCode::ProtocolViolation)]
    );
    assert!(w.report(RoundKind::Announce).is_none());
    w.flush(s[2]);
    let r = w.report(RoundKind::Announce).unwrap();
    assert_eq!(ids(&r.acked), vec![s[0], s[2]]);
    assert_eq!(ids(&r.missing), vec![s[1]]);
    assert!(!r.deadline_passed, "no need to wait for a closed stream");
    // The session is still held (its connection lives) but cannot hear.
    let v = w.server.session(s[1]).unwrap();
    assert!(!v.control_open);
    // Its ack, arriving anyway, changes nothing.
    w.flush(s[1]);
    assert_eq!(w.closed.len(), 1);
}

#[test]
fn a_client_connecting_during_a_migration_is_told_and_waited_for() {
    let mut w = World::new(8);
    let a = w.connect("a");
    w.take_events();
    w.announce(M1);
    w.handle(a);
    w.flush(a);
    assert!(w.report(RoundKind::Announce).is_some(), "a alone acked");
    w.take_events();

    // A joiner after the round: told Migrate at once, with the round's patience.
    w.now = ms(40);
    let late = w.connect("late");
    assert!(matches!(
        w.clients[&late].events[..],
        [
            ClientEvent::Welcomed { .. },
            ClientEvent::SwapPeer {
                migration_id: M1,
                deadline_ms: 100,
                ..
            }
        ]
    ));
    assert!(w.events.iter().any(|e| matches!(
        e,
        ServerEvent::JoinedMigration { session, told: MessageKind::Migrate, .. } if *session == late
    )));
    w.flush(late);
    assert!(matches!(
        w.server.session(late).unwrap().state,
        SessionState::Acked { .. }
    ));
    assert_eq!(w.server.resumed(w.now).unwrap(), 2, "both hear Resumed");

    // A joiner while the round waits: it joins the round, with the original deadline.
    let mut w = World::new(8);
    let a = w.connect("a");
    let b = w.connect("b");
    w.announce(M2);
    w.now = ms(30);
    let j = w.connect("joiner");
    assert!(matches!(
        w.clients[&j].events[..],
        [
            ClientEvent::Welcomed { .. },
            ClientEvent::SwapPeer {
                deadline_ms: 70,
                ..
            }
        ]
    ));
    for x in [a, b] {
        w.handle(x);
        w.flush(x);
    }
    assert!(
        w.report(RoundKind::Announce).is_none(),
        "waits for the joiner"
    );
    w.flush(j);
    let r = w.report(RoundKind::Announce).unwrap();
    assert_eq!(ids(&r.acked), vec![a, b, j]);

    // A joiner that never acks is missing at the original deadline, not later.
    let mut w = World::new(8);
    let a = w.connect("a");
    w.announce(M1);
    w.now = ms(60);
    let silent = w.connect("silent");
    w.handle(a);
    w.flush(a);
    assert_eq!(w.server.poll_timeout(), Some(ms(100)));
    w.advance(ms(100));
    let r = w.report(RoundKind::Announce).unwrap();
    assert_eq!(ids(&r.missing), vec![silent]);
}

#[test]
fn abort_after_partial_acks_counts_the_acks_each_session_owes() {
    let (mut w, s) = three();
    w.announce(M1);
    w.handle(s[0]);
    w.flush(s[0]); // a acked the Migrate; b and c have not even read it yet.
    w.take_events();
    let told = w.server.abort(addr(1), DEADLINE, ms(20)).unwrap();
    w.now = ms(20);
    w.drain();
    assert_eq!(told, s.to_vec());
    // The announce round was cut short and reported.
    let r = w.report(RoundKind::Announce).unwrap();
    assert_eq!(ids(&r.acked), vec![s[0]]);
    assert_eq!(ids(&r.missing), vec![s[1], s[2]]);
    assert!(!r.deadline_passed);
    // b reads Migrate then MigrateAborted: acks twice. The first ack is the Migrate's.
    for x in [s[0], s[1]] {
        w.handle(x);
    }
    assert!(matches!(
        w.clients[&s[1]].events[..],
        [
            _,
            ClientEvent::SwapPeer { .. },
            ClientEvent::SwapBack { .. }
        ]
    ));
    w.flush(s[0]);
    let b = w.clients.get_mut(&s[1]).unwrap();
    let all = std::mem::take(&mut b.outbox);
    let half = all.len() / 2;
    let b_answered = |w: &World| {
        w.events.iter().any(|e| {
            matches!(e, ServerEvent::Answered { session, kind: MessageKind::Ack, .. } if *session == s[1])
        })
    };
    w.server.on_bytes(s[1], &all[..half], w.now);
    w.drain();
    assert!(
        !b_answered(&w),
        "b's first ack is the Migrate's; it owes a second"
    );
    w.server.on_bytes(s[1], &all[half..], w.now);
    w.drain();
    assert!(b_answered(&w), "b's second ack answers the abort");
    assert!(w.report(RoundKind::Abort).is_none(), "c has not answered");
    // The announce's ack deadline (100) still times the registry; the abort's is 20 + 100.
    assert_eq!(w.server.poll_timeout(), Some(ms(100)));
    w.advance(ms(100));
    assert!(w.report(RoundKind::Abort).is_none());
    assert_eq!(w.server.poll_timeout(), Some(ms(120)));
    w.advance(ms(120));
    let r = w.report(RoundKind::Abort).unwrap();
    assert_eq!(ids(&r.acked), vec![s[0], s[1]]);
    assert_eq!(ids(&r.missing), vec![s[2]]);
    assert!(r.deadline_passed);
    assert_eq!(w.server.active_migration(), None);
    assert!(
        w.server
            .sessions()
            .iter()
            .all(|v| v.state == SessionState::Connected)
    );
    assert!(matches!(
        w.server.abort(addr(1), DEADLINE, w.now),
        Err(ServerError::NoMigration)
    ));
    // The next migration starts cleanly.
    assert_eq!(w.announce(M2), s.to_vec());
}

#[test]
fn resumed_tells_every_told_session_and_ends_the_migration() {
    let (mut w, s) = three();
    assert!(matches!(
        w.server.resumed(w.now),
        Err(ServerError::NoMigration)
    ));
    w.announce(M1);
    for x in s {
        w.handle(x);
        w.flush(x);
    }
    // A client whose stream broke cannot be told.
    w.server.on_stream_error(s[2], w.now);
    w.drain();
    assert_eq!(w.closed.get(&s[2]), Some(&CloseCode::Internal));
    assert_eq!(w.server.resumed(ms(50)).unwrap(), 2);
    w.drain();
    for x in [s[0], s[1]] {
        w.handle(x);
        assert!(matches!(
            w.clients[&x].events.last(),
            Some(ClientEvent::Resumed { migration_id: M1 })
        ));
    }
    assert_eq!(w.server.active_migration(), None);
    assert!(matches!(
        w.server.announce(M1, addr(9), DEADLINE, w.now),
        Ok(told) if told.len() == 2
    ));
    assert!(matches!(
        w.server.announce(M2, addr(9), DEADLINE, w.now),
        Err(ServerError::MigrationInProgress {
            active: M1,
            requested: M2
        })
    ));
}

#[test]
fn quiesce_then_announce() {
    let (mut w, s) = three();
    assert_eq!(w.server.quiesce(M1, DEADLINE, w.now).unwrap(), s.to_vec());
    w.drain();
    assert!(matches!(
        w.server.announce(M1, addr(9), DEADLINE, w.now),
        Err(ServerError::RoundInProgress {
            kind: RoundKind::Quiesce,
            ..
        })
    ));
    for x in s {
        w.handle(x);
        w.flush(x);
    }
    let r = w.report(RoundKind::Quiesce).unwrap();
    assert_eq!(ids(&r.acked), s.to_vec());
    assert!(matches!(
        w.server.resumed(w.now),
        Err(ServerError::NotAnnounced(M1))
    ));
    assert!(matches!(
        w.server.announce(M2, addr(9), DEADLINE, w.now),
        Err(ServerError::MigrationInProgress { .. })
    ));
    w.announce(M1);
    for x in s {
        w.handle(x);
        w.flush(x);
    }
    assert!(w.report(RoundKind::Announce).unwrap().complete());
}

/// The ignored answers a `Quiesced` can be, by kind and reason.
fn ignored_quiesced(w: &World) -> Vec<(SessionId, Ignored)> {
    w.events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::Ignored {
                session,
                kind: MessageKind::Quiesced,
                why,
            } => Some((*session, why.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn bad_quiesced_answers_are_ignored_with_a_reason_never_closed() {
    let (mut w, s) = three();
    let quiesced = |id| frame(&Message::Quiesced { migration_id: id });
    // Before any Quiesce: no migration.
    w.server.on_bytes(s[0], &quiesced(M1), w.now);
    w.drain();
    assert_eq!(
        ignored_quiesced(&w),
        vec![(
            s[0],
            Ignored::WrongMigration {
                active: None,
                got: M1
            }
        )]
    );
    w.take_events();
    w.server.quiesce(M1, DEADLINE, w.now).unwrap();
    w.drain();
    // Another migration's id: ignored, and it does not count for M1.
    w.server.on_bytes(s[1], &quiesced(M2), w.now);
    w.drain();
    assert_eq!(
        ignored_quiesced(&w),
        vec![(
            s[1],
            Ignored::WrongMigration {
                active: Some(M1),
                got: M2
            }
        )]
    );
    // The right one, twice: counted once; the second answers nothing ("not asked"), and as
    // a's ignored Quiesced was already reported in this migration's span it is only counted.
    let repeats = w.server.session(s[0]).unwrap().repeats;
    w.server.on_bytes(s[0], &quiesced(M1), w.now);
    w.server.on_bytes(s[0], &quiesced(M1), w.now);
    w.drain();
    assert_eq!(w.server.session(s[0]).unwrap().repeats, repeats + 1);
    // b's wrong id again: counted, not reported a second time.
    w.server.on_bytes(s[1], &quiesced(M2), w.now);
    w.drain();
    assert_eq!(ignored_quiesced(&w).len(), 1, "{:?}", ignored_quiesced(&w));
    assert_eq!(w.server.session(s[1]).unwrap().repeats, 1);
    let answered: Vec<SessionId> = w
        .events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::Answered {
                session,
                kind: MessageKind::Quiesced,
                ..
            } => Some(*session),
            _ => None,
        })
        .collect();
    assert_eq!(answered, vec![s[0]]);
    assert!(w.report(RoundKind::Quiesce).is_none(), "b and c still owe");
    assert!(w.closed.is_empty(), "never a reason to close");
    w.advance(ms(100));
    let r = w.report(RoundKind::Quiesce).unwrap();
    assert_eq!(ids(&r.acked), vec![s[0]]);
    assert_eq!(ids(&r.missing), vec![s[1], s[2]]);
    // A Quiesced during the announce round answers nothing.
    w.take_events();
    w.announce(M1);
    w.server.on_bytes(s[2], &quiesced(M1), w.now);
    w.drain();
    assert_eq!(ignored_quiesced(&w), vec![(s[2], Ignored::NotAsked)]);
    assert!(w.closed.is_empty());
}

#[test]
fn a_client_that_ignores_quiesce_is_missing_and_the_move_goes_on() {
    let (mut w, s) = three();
    let [a, b, mute] = s;
    w.server.quiesce(M1, DEADLINE, w.now).unwrap();
    w.drain();
    for x in [a, b] {
        w.handle(x);
        w.flush(x);
    }
    assert!(
        w.report(RoundKind::Quiesce).is_none(),
        "waits for the mute one"
    );
    assert_eq!(w.server.poll_timeout(), Some(ms(100)));
    w.advance(ms(100));
    let q = w.report(RoundKind::Quiesce).unwrap();
    assert_eq!(ids(&q.acked), vec![a, b]);
    assert_eq!(ids(&q.missing), vec![mute]);
    assert!(q.deadline_passed);
    // The announce round goes on with everyone, the mute one included (it can still hear).
    assert_eq!(
        w.server.announce(M1, addr(9), DEADLINE, w.now).unwrap(),
        s.to_vec()
    );
    w.drain();
    for x in [a, b] {
        w.handle(x);
        w.flush(x);
    }
    w.advance(ms(200));
    let r = w.report(RoundKind::Announce).unwrap();
    assert_eq!(ids(&r.acked), vec![a, b]);
    assert_eq!(ids(&r.missing), vec![mute]);
    // After the restore: Resumed releases every told client.
    assert_eq!(w.server.resumed(ms(250)).unwrap(), 3);
    w.drain();
    for x in [a, b] {
        w.handle(x);
        assert!(matches!(
            &w.clients[&x].events[..],
            [
                ClientEvent::Welcomed { .. },
                ClientEvent::Quiesce {
                    migration_id: M1,
                    ..
                },
                ClientEvent::SwapPeer {
                    migration_id: M1,
                    ..
                },
                ClientEvent::Resumed { migration_id: M1 }
            ]
        ));
        assert_eq!(w.clients[&x].control.state(), ClientState::Idle);
    }
    assert_eq!(w.server.active_migration(), None);
}

#[test]
fn an_abort_during_the_quiesce_releases_the_clients() {
    let (mut w, s) = three();
    w.server.quiesce(M1, DEADLINE, w.now).unwrap();
    w.drain();
    for x in s {
        w.handle(x);
        w.flush(x);
    }
    assert!(w.report(RoundKind::Quiesce).unwrap().complete());
    for x in s {
        assert_eq!(w.clients[&x].control.state(), ClientState::Quiesced);
    }
    // The move fails before Migrate: every quiesced client is told to carry on.
    assert_eq!(
        w.server.abort(addr(1), DEADLINE, w.now).unwrap(),
        s.to_vec()
    );
    w.drain();
    for x in s {
        w.handle(x);
        assert!(matches!(
            w.clients[&x].events.last(),
            Some(ClientEvent::SwapBack { migration_id: M1, fallback_addr }) if *fallback_addr == addr(1)
        ));
        assert_eq!(w.clients[&x].control.state(), ClientState::Idle);
        w.flush(x);
    }
    assert!(w.report(RoundKind::Abort).unwrap().complete());
    assert_eq!(w.server.active_migration(), None);
}

#[test]
fn hello_timeout_closes_silent_connections() {
    let mut w = World::new(8);
    let silent = w.server.on_connect(ms(0)).unwrap();
    w.now = ms(10);
    let talker = w.connect("talker");
    assert_eq!(w.server.poll_timeout(), Some(ms(500)));
    w.advance(ms(499));
    assert!(w.closed.is_empty());
    w.advance(ms(500));
    assert_eq!(
        w.closed.iter().collect::<Vec<_>>(),
        [(&silent, &CloseCode::ProtocolViolation)]
    );
    assert!(
        w.events
            .iter()
            .any(|e| matches!(e, ServerEvent::HelloTimeout { session } if *session == silent))
    );
    // A Hello after the deadline is not read; the talker is unaffected.
    w.advance(ms(600));
    let mut hello = Vec::new();
    ClientControl::new(ClientId::new("x").unwrap(), SUPPORTED_VERSIONS, &mut hello).unwrap();
    w.server.on_bytes(silent, &hello, w.now);
    w.drain();
    assert!(w.server.session(silent).is_none());
    assert!(w.server.session(talker).is_some());
    assert_eq!(w.server.poll_timeout(), None);
}

#[test]
fn session_limit_refuses_the_connection_beyond_it() {
    let mut w = World::new(2);
    let a = w.connect("a");
    w.connect("b");
    assert_eq!(w.server.on_connect(w.now), Err(Refusal::Full { max: 2 }));
    // Nothing was kept or said for the refused connection.
    assert_eq!(w.server.connections(), 2);
    w.drain();
    assert_eq!(w.server.sessions().len(), 2);
    w.server.on_disconnect(a, w.now);
    let d = w.connect("d");
    assert!(w.server.session(d).is_some());
    assert_eq!(w.server.connections(), 2);
}

#[test]
fn connections_that_never_say_hello_count_against_the_limit() {
    let mut w = World::new(2);
    let silent: Vec<SessionId> = (0..2)
        .map(|_| w.server.on_connect(ms(0)).unwrap())
        .collect();
    // The registry is empty, yet the server is full: silent connections hold their slots.
    assert!(w.server.sessions().is_empty());
    assert_eq!(w.server.on_connect(ms(1)), Err(Refusal::Full { max: 2 }));
    // Their hello deadline passes: their control streams are closed and the wrapper is told
    // (HelloTimeout), but the slots stay taken until the connections are gone.
    w.advance(ms(500));
    for s in &silent {
        assert_eq!(w.closed.get(s), Some(&CloseCode::ProtocolViolation));
        assert!(
            w.events
                .iter()
                .any(|e| matches!(e, ServerEvent::HelloTimeout { session } if session == s))
        );
    }
    assert_eq!(w.server.on_connect(w.now), Err(Refusal::Full { max: 2 }));
    // The wrapper closes them (as it must on HelloTimeout): the slots are free again.
    for s in silent {
        w.server.on_disconnect(s, w.now);
    }
    assert_eq!(w.server.connections(), 0);
    let a = w.connect("a");
    let b = w.connect("b");
    assert!(w.server.session(a).is_some() && w.server.session(b).is_some());
    assert_eq!(w.server.on_connect(w.now), Err(Refusal::Full { max: 2 }));
}

#[test]
fn a_refused_connection_during_a_flood_costs_nothing() {
    // Many connection attempts beyond the limit: each is refused at once; no output, no
    // timer, no memory is kept for them.
    let mut w = World::new(1);
    let a = w.connect("a");
    w.drain();
    let outputs = w.outputs;
    for i in 0..10_000 {
        assert!(w.server.on_connect(ms(i)).is_err());
    }
    w.drain();
    assert_eq!(w.outputs, outputs);
    assert_eq!(w.server.connections(), 1);
    assert_eq!(w.server.poll_timeout(), None);
    assert!(w.server.session(a).is_some());
}

#[test]
fn version_negotiation() {
    let mut w = World::new(4);
    let s = w.server.on_connect(w.now).unwrap();
    let hello = |min, max| {
        frame(&Message::Hello {
            client_id: ClientId::new("v").unwrap(),
            supported: VersionRange::new(min, max).unwrap(),
        })
    };
    w.server.on_bytes(s, &hello(3, 5), w.now);
    w.drain();
    assert_eq!(w.closed.get(&s), Some(&CloseCode::UnsupportedVersion));
    assert!(w.events.iter().any(|e| matches!(
        e,
        ServerEvent::Refused {
            refusal: Refusal::NoCommonVersion { .. },
            ..
        }
    )));
    let s = w.server.on_connect(w.now).unwrap();
    w.server.on_bytes(s, &hello(1, 3), w.now);
    assert!(w.server.poll_output().is_some_and(|o| matches!(
        o,
        ServerOutput::Transmit { bytes, .. } if bytes == frame(&Message::Welcome { version: 2, session_id: s.0 })
    )));
    // A version 1 client (the Hello of the crate before `Downtime`) gets version 1.
    w.drain();
    let s = w.server.on_connect(w.now).unwrap();
    w.server.on_bytes(s, &hello(1, 1), w.now);
    assert!(w.server.poll_output().is_some_and(|o| matches!(
        o,
        ServerOutput::Transmit { bytes, .. } if bytes == frame(&Message::Welcome { version: 1, session_id: s.0 })
    )));
}

#[test]
fn every_client_reports_its_downtime_once_the_move_is_resumed() {
    let (mut w, s) = three();
    w.move_once(M1);
    w.take_events();
    for (i, &x) in s.iter().enumerate() {
        w.report_downtime(x, M1, 30 + i as u64).unwrap();
        w.flush(x);
    }
    assert_eq!(
        w.downtimes(),
        vec![
            (s[0], "a".to_owned(), M1, 30),
            (s[1], "b".to_owned(), M1, 31),
            (s[2], "c".to_owned(), M1, 32),
        ]
    );
    // Each client's state machine refuses a second report itself ...
    assert!(matches!(
        w.report_downtime(s[0], M1, 99),
        Err(DowntimeRefused::AlreadyReported { .. })
    ));
    // ... and a client that sends one anyway is counted, reported once, never closed.
    w.take_events();
    let repeats = w.server.repeats();
    for _ in 0..1000 {
        w.server.on_bytes(s[0], &downtime_frame(M1, 99), w.now);
    }
    w.drain();
    assert!(w.downtimes().is_empty(), "a repeat is not a second report");
    assert!(matches!(
        &w.events[..],
        [ServerEvent::Repeated { session, kind: MessageKind::Downtime }] if *session == s[0]
    ));
    assert_eq!(w.server.repeats(), repeats + 999);
    assert!(w.closed.is_empty());
}

#[test]
fn a_report_before_the_outcome_or_for_another_migration_is_ignored() {
    let (mut w, s) = three();
    w.announce(M1);
    for x in s {
        w.handle(x);
        w.flush(x);
    }
    w.take_events();
    // The move is under way: not finished, whatever the client says.
    w.server.on_bytes(s[0], &downtime_frame(M1, 5), w.now);
    // A migration that never happened.
    w.server.on_bytes(s[1], &downtime_frame(M2, 5), w.now);
    w.drain();
    assert_eq!(
        w.ignored_downtimes(),
        vec![
            (s[0], Ignored::NotFinished),
            (
                s[1],
                Ignored::WrongMigration {
                    active: Some(M1),
                    got: M2
                }
            )
        ]
    );
    assert!(w.downtimes().is_empty());
    assert!(w.closed.is_empty(), "never a reason to close");
    // The early report did not use up the session's report.
    w.server.resumed(w.now).unwrap();
    w.drain();
    for x in s {
        w.handle(x);
    }
    w.report_downtime(s[0], M1, 12).unwrap();
    w.flush(s[0]);
    assert_eq!(w.downtimes(), vec![(s[0], "a".to_owned(), M1, 12)]);
    // A client that connected after the move was never told about it.
    w.take_events();
    let late = w.connect("late");
    w.server.on_bytes(late, &downtime_frame(M1, 5), w.now);
    w.drain();
    assert_eq!(
        w.ignored_downtimes(),
        vec![(
            late,
            Ignored::WrongMigration {
                active: None,
                got: M1
            }
        )]
    );
    assert!(w.closed.is_empty());
}

#[test]
fn clients_report_their_downtime_after_an_abort() {
    let (mut w, s) = three();
    w.announce(M1);
    for x in s {
        w.handle(x);
        w.flush(x);
    }
    w.server.abort(addr(1), DEADLINE, w.now).unwrap();
    w.drain();
    // a swaps back and reports before the others have acked: the outcome is decided.
    w.handle(s[0]);
    w.report_downtime(s[0], M1, 21).unwrap();
    w.flush(s[0]);
    assert!(w.report(RoundKind::Abort).is_none(), "b and c still owe");
    for x in [s[1], s[2]] {
        w.handle(x);
        w.report_downtime(x, M1, 22).unwrap();
        w.flush(x);
    }
    assert!(w.report(RoundKind::Abort).unwrap().complete());
    assert_eq!(
        w.downtimes(),
        vec![
            (s[0], "a".to_owned(), M1, 21),
            (s[1], "b".to_owned(), M1, 22),
            (s[2], "c".to_owned(), M1, 22),
        ]
    );
}

#[test]
fn only_the_last_eight_migrations_can_be_reported() {
    let mut w = World::new(4);
    let a = w.connect("a");
    for n in 0..9u8 {
        w.move_once(MigrationId::from_bytes([n + 10; 16]));
    }
    w.take_events();
    // The first move is forgotten by the server; the last one is not.
    w.server.on_bytes(
        a,
        &downtime_frame(MigrationId::from_bytes([10; 16]), 1),
        w.now,
    );
    w.report_downtime(a, MigrationId::from_bytes([18; 16]), 2)
        .unwrap();
    w.flush(a);
    assert!(matches!(
        &w.ignored_downtimes()[..],
        [(_, Ignored::WrongMigration { active: None, .. })]
    ));
    assert_eq!(w.downtimes().len(), 1);
}

#[test]
fn a_downtime_above_an_hour_closes_only_that_stream() {
    let (mut w, s) = three();
    w.move_once(M1);
    let mut body = vec![0, 2, MessageKind::Downtime.as_u8()];
    body.extend_from_slice(M1.as_bytes());
    body.extend_from_slice(&postcard_u64(MAX_DOWNTIME_US + 1));
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&body);
    w.server.on_bytes(s[0], &bytes, w.now);
    w.drain();
    assert_eq!(
        w.closed.iter().collect::<Vec<_>>(),
        [(&s[0], &CloseCode::ProtocolViolation)]
    );
    for x in [s[1], s[2]] {
        w.report_downtime(x, M1, 3).unwrap();
        w.flush(x);
    }
    assert_eq!(w.downtimes().len(), 2);
}

/// `v` as a postcard varint.
fn postcard_u64(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

#[test]
fn a_version_1_server_never_gets_a_downtime_report() {
    let mut config = ServerConfig::new(4, HELLO);
    config.supported = VersionRange::single(1);
    let mut w = World::with_config(config);
    let a = w.connect("a");
    assert!(matches!(
        w.clients[&a].events[..],
        [ClientEvent::Welcomed { version: 1, .. }]
    ));
    w.move_once(M1);
    assert!(matches!(
        w.report_downtime(a, M1, 3),
        Err(DowntimeRefused::NotNegotiated { version: Some(1) })
    ));
    assert!(w.clients[&a].outbox.is_empty());
}

#[test]
fn wrong_direction_and_out_of_order_messages_close_with_unexpected() {
    let mut w = World::new(4);
    let s = w.server.on_connect(w.now).unwrap();
    w.server
        .on_bytes(s, &frame(&Message::Ack { migration_id: M1 }), w.now);
    w.drain();
    assert_eq!(w.closed.get(&s), Some(&CloseCode::UnexpectedMessage));
    let a = w.connect("a");
    let migrate = frame(&Message::Migrate {
        migration_id: M1,
        new_addr: addr(1),
        deadline_ms: 1,
        token: None,
    });
    w.server.on_bytes(a, &migrate, w.now);
    w.drain();
    assert_eq!(w.closed.get(&a), Some(&CloseCode::UnexpectedMessage));
    // A Hello that differs from the first is not a repeat.
    let b = w.connect("b");
    w.server.on_bytes(
        b,
        &frame(&Message::Hello {
            client_id: ClientId::new("someone-else").unwrap(),
            supported: SUPPORTED_VERSIONS,
        }),
        w.now,
    );
    w.drain();
    assert_eq!(w.closed.get(&b), Some(&CloseCode::UnexpectedMessage));
}

#[test]
fn an_ack_naming_another_migration_is_ignored() {
    let (mut w, s) = three();
    w.announce(M1);
    w.take_events();
    for x in s {
        w.server
            .on_bytes(x, &frame(&Message::Ack { migration_id: M2 }), w.now);
    }
    w.drain();
    assert!(w.closed.is_empty(), "not a reason to close");
    assert!(w.report(RoundKind::Announce).is_none(), "not counted");
    assert!(w.events.iter().all(|e| matches!(
        e,
        ServerEvent::Ignored {
            kind: MessageKind::Ack,
            why: Ignored::WrongMigration {
                active: Some(M1),
                got: M2
            },
            ..
        }
    )));
    assert_eq!(w.events.len(), 3);
    for x in s {
        w.handle(x);
        w.flush(x);
    }
    assert!(w.report(RoundKind::Announce).unwrap().complete());
}

#[test]
fn a_flood_of_repeats_gives_bounded_outputs() {
    let mut w = World::new(4);
    let a = w.connect("flood");
    let b = w.connect("hellos");
    let c = w.connect("acks");
    w.announce(M1);
    w.take_events();
    let before = w.outputs;

    let bye = frame(&Message::Bye {
        reason: ByeReason::new("bye").unwrap(),
    });
    let mut byes = Vec::new();
    for _ in 0..100_000 {
        byes.extend_from_slice(&bye);
    }
    for chunk in byes.chunks(4096) {
        w.server.on_bytes(a, chunk, w.now);
    }
    let hello = frame(&Message::Hello {
        client_id: ClientId::new("hellos").unwrap(),
        supported: SUPPORTED_VERSIONS,
    });
    let hellos = hello.repeat(100_000);
    w.server.on_bytes(b, &hellos, w.now);
    let dup = frame(&Message::Ack { migration_id: M2 }).repeat(100_000);
    w.server.on_bytes(c, &dup, w.now);
    w.drain();

    assert!(w.closed.is_empty());
    // One event per session and kind: the Bye, the first repeated Hello, the first ignored ack.
    let events = w.take_events();
    assert_eq!(w.outputs - before, 3, "{events:?}");
    assert!(matches!(events[0], ServerEvent::ClientBye { session, .. } if session == a));
    assert!(matches!(
        events[1],
        ServerEvent::Repeated { session, kind: MessageKind::Hello } if session == b
    ));
    assert!(matches!(events[2], ServerEvent::Ignored { session, .. } if session == c));
    assert_eq!(w.server.repeats(), 3 * 100_000 - 3);
    assert_eq!(w.server.session(a).unwrap().repeats, 99_999);
    // The client that said Bye cannot be waited for.
    assert!(!w.server.session(a).unwrap().control_open);
    for x in [b, c] {
        w.handle(x);
        w.flush(x);
    }
    let r = w.report(RoundKind::Announce).unwrap();
    assert_eq!(ids(&r.missing), vec![a]);
}

#[test]
fn a_client_that_finishes_its_stream_gets_a_finish_and_is_missing() {
    let (mut w, s) = three();
    w.server.on_stream_finished(s[0], w.now);
    let outs: Vec<_> = std::iter::from_fn(|| w.server.poll_output()).collect();
    assert!(matches!(outs[0], ServerOutput::Finish { session } if session == s[0]));
    let told = w.announce(M1);
    assert_eq!(told, vec![s[1], s[2]]);
    // Finishing inside a frame is a truncated stream: closed with its code.
    let t = w.server.on_connect(w.now).unwrap();
    w.server.on_bytes(t, &[0, 0, 0, 9, 0], w.now);
    w.server.on_stream_finished(t, w.now);
    w.drain();
    assert_eq!(w.closed.get(&t), Some(&CloseCode::ProtocolViolation));
}

#[test]
fn disconnecting_during_a_round_drops_the_session_from_it() {
    let (mut w, s) = three();
    w.announce(M1);
    for x in [s[0], s[1]] {
        w.handle(x);
        w.flush(x);
    }
    w.server.on_disconnect(s[2], w.now);
    w.drain();
    let r = w.report(RoundKind::Announce).unwrap();
    assert_eq!(ids(&r.acked), vec![s[0], s[1]]);
    assert!(r.missing.is_empty());
    // Bytes for a forgotten session are ignored.
    w.server.on_bytes(s[2], b"anything", w.now);
    assert!(w.server.poll_output().is_none());
}

#[test]
fn announce_with_nobody_to_tell_completes_at_once() {
    let mut w = World::new(4);
    assert!(w.announce(M1).is_empty());
    let r = w.report(RoundKind::Announce).unwrap();
    assert!(r.acked.is_empty() && r.missing.is_empty() && !r.deadline_passed);
}

/// A plain QUIC client (no marker ALPN): a slot, no control stream.
fn plain(w: &mut World) -> SessionId {
    let s = w.server.on_connect_plain(w.now).unwrap();
    w.drain();
    s
}

#[test]
fn a_plain_session_takes_a_slot_until_it_disconnects() {
    let mut w = World::new(2);
    let p = plain(&mut w);
    let a = w.connect("a");
    assert_eq!(w.server.connections(), 2);
    // Full, for both kinds of connection.
    assert_eq!(w.server.on_connect(w.now), Err(Refusal::Full { max: 2 }));
    assert_eq!(
        w.server.on_connect_plain(w.now),
        Err(Refusal::Full { max: 2 })
    );
    // It is listed, as plain.
    let views = w.server.sessions();
    assert_eq!(views.len(), 2);
    let v = w.server.session(p).unwrap();
    assert!(v.plain && !v.control_open && v.client_id.as_str().is_empty());
    assert_eq!(v.state, SessionState::Connected);
    assert!(!w.server.session(a).unwrap().plain);
    assert_eq!(w.server.plain_sessions(), 1);
    // Disconnecting frees its slot.
    w.server.on_disconnect(p, w.now);
    assert_eq!(w.server.connections(), 1);
    assert!(w.server.session(p).is_none());
    let q = plain(&mut w);
    assert!(w.server.session(q).unwrap().plain);
}

#[test]
fn a_plain_session_has_no_hello_deadline_and_ignores_stream_events() {
    let mut w = World::new(4);
    let p = plain(&mut w);
    // Nothing to time out: no deadline is armed, and an hour later it is still there.
    assert_eq!(w.server.poll_timeout(), None);
    w.advance(ms(3_600_000));
    assert!(w.closed.is_empty());
    assert!(w.take_events().is_empty());
    assert!(w.server.session(p).is_some());
    // A confused wrapper's reports about a stream it does not have change nothing.
    w.server.on_bytes(
        p,
        &frame(&Message::Bye {
            reason: ByeReason::truncating("x"),
        }),
        w.now,
    );
    w.server.on_bytes(p, b"garbage", w.now);
    w.server.on_stream_finished(p, w.now);
    w.server.on_stream_error(p, w.now);
    w.drain();
    assert!(w.closed.is_empty());
    assert!(w.take_events().is_empty());
    assert!(w.server.session(p).unwrap().plain);
}

#[test]
fn plain_sessions_cannot_follow_and_the_round_does_not_wait_for_them() {
    let (mut w, s) = three();
    let p = plain(&mut w);
    let gone = plain(&mut w);
    let told = w.announce(M1);
    assert_eq!(told, s.to_vec());
    // A plain client that connects during the round is listed too; one that leaves during
    // it is not (its connection is gone anyway, as for the aware ones).
    let late = plain(&mut w);
    w.server.on_disconnect(gone, w.now);
    for x in s {
        w.handle(x);
        w.flush(x);
    }
    // Ended by the last ack, long before the deadline: the plain ones are not waited for.
    let r = w.report(RoundKind::Announce).unwrap();
    assert_eq!(ids(&r.acked), s.to_vec());
    assert!(r.missing.is_empty());
    assert_eq!(r.cannot_follow, vec![p, late]);
    assert!(!r.deadline_passed);
    assert_eq!(r.ended, w.now);
    assert!(!r.complete());
    // Nothing was sent to them.
    assert!(!w.closed.contains_key(&p));
}

#[test]
fn plain_sessions_are_listed_in_quiesce_and_abort_reports() {
    let mut w = World::new(4);
    let a = w.connect("a");
    let p = plain(&mut w);
    w.server.quiesce(M1, DEADLINE, w.now).unwrap();
    w.drain();
    w.handle(a);
    w.flush(a);
    let q = w.report(RoundKind::Quiesce).unwrap();
    assert_eq!(ids(&q.acked), vec![a]);
    assert_eq!(q.cannot_follow, vec![p]);
    assert!(!q.complete());
    w.server.abort(addr(1), DEADLINE, w.now).unwrap();
    w.drain();
    w.handle(a);
    w.flush(a);
    let r = w.report(RoundKind::Abort).unwrap();
    assert_eq!(ids(&r.acked), vec![a]);
    assert_eq!(r.cannot_follow, vec![p]);
    assert!(!r.complete());
}

#[test]
fn a_round_of_plain_sessions_only_ends_at_once_and_is_not_complete() {
    let mut w = World::new(4);
    let p = plain(&mut w);
    assert!(w.announce(M1).is_empty());
    let r = w.report(RoundKind::Announce).unwrap();
    assert!(r.acked.is_empty() && r.missing.is_empty() && !r.deadline_passed);
    assert_eq!(r.cannot_follow, vec![p]);
    assert!(!r.complete());
}

#[derive(Debug, Clone)]
enum Op {
    Bytes(usize, Vec<u8>),
    Report(usize, bool),
    Finish(usize),
    Disconnect(usize),
    Announce,
    Abort,
    Resumed,
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..3, proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(s, b)| Op::Bytes(s, b)),
        1 => (0usize..3, any::<bool>()).prop_map(|(s, m1)| Op::Report(s, m1)),
        1 => (0usize..3).prop_map(Op::Finish),
        1 => (0usize..3).prop_map(Op::Disconnect),
        1 => Just(Op::Announce),
        1 => Just(Op::Abort),
        1 => Just(Op::Resumed),
        1 => (0u64..200).prop_map(Op::Advance),
    ]
}

proptest! {
    /// Arbitrary bytes (after a valid Hello or instead of it) never panic, at most one close
    /// per session, and outputs stay bounded by what the server itself did.
    #[test]
    fn arbitrary_bytes_never_panic(
        hello_first in any::<bool>(),
        ops in proptest::collection::vec(op(), 0..40),
    ) {
        let mut server = ServerControl::new(ServerConfig::new(2, HELLO));
        let mut now = ms(0);
        // The third connection is beyond the limit: refused at once; what it would send is
        // sent to a session the server does not know.
        let mut sessions: Vec<SessionId> =
            (0..3).filter_map(|_| server.on_connect(now).ok()).collect();
        prop_assert_eq!(sessions.len(), 2);
        sessions.push(SessionId(u64::MAX));
        if hello_first {
            for s in &sessions {
                server.on_bytes(*s, &frame(&Message::Hello {
                    client_id: ClientId::new("p").unwrap(),
                    supported: SUPPORTED_VERSIONS,
                }), now);
            }
        }
        let mut closes = BTreeMap::new();
        let mut outputs = 0usize;
        for op in ops {
            match op {
                Op::Bytes(i, b) => server.on_bytes(sessions[i], &b, now),
                Op::Report(i, m1) => {
                    let id = if m1 { M1 } else { M2 };
                    server.on_bytes(sessions[i], &downtime_frame(id, 7), now);
                }
                Op::Finish(i) => server.on_stream_finished(sessions[i], now),
                Op::Disconnect(i) => server.on_disconnect(sessions[i], now),
                Op::Announce => { let _ = server.announce(M1, addr(9), DEADLINE, now); }
                Op::Abort => { let _ = server.abort(addr(1), DEADLINE, now); }
                Op::Resumed => { let _ = server.resumed(now); }
                Op::Advance(d) => {
                    now = now + Duration::from_millis(d);
                    server.handle_timeout(now);
                    // Every deadline up to `now` has been applied.
                    prop_assert!(server.poll_timeout().is_none_or(|t| t > now));
                }
            }
            while let Some(o) = server.poll_output() {
                outputs += 1;
                if let ServerOutput::Close { session, .. } = o {
                    prop_assert!(closes.insert(session, ()).is_none(), "closed twice");
                }
            }
        }
        prop_assert!(server.sessions().len() <= 2);
        // Per operation the server emits a handful of outputs, never one per byte.
        prop_assert!(outputs <= 3 * 8 + 40 * 12, "{outputs} outputs");
    }
}
