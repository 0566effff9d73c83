use super::*;
use proptest::prelude::*;

fn id(b: u8) -> MigrationId {
    MigrationId::from_bytes([b; 16])
}

fn name(s: &str) -> Name {
    Name::new(s).expect("a valid name")
}

fn body_of(frame: &[u8]) -> &[u8] {
    &frame[wire_frame::LEN_PREFIX..]
}

fn a_prepare() -> Prepare {
    Prepare {
        migration: id(1),
        service: ServiceSpec {
            name: name("edge-1"),
            server_user: Some("qlm-server".into()),
            moves: 2,
        },
        seal_public: [9; 32],
        server_pid: 77,
        phases: Phases::Two,
        fault: Some(TargetFault::RestoreFails),
        image_estimate: 5 << 20,
    }
}

fn requests() -> Vec<PeerRequest> {
    let bodies = vec![
        PeerBody::Prepare(a_prepare()),
        PeerBody::Receive { migration: id(2) },
        PeerBody::Restore { migration: id(3) },
        PeerBody::Resume { migration: id(4) },
        PeerBody::Abort { migration: id(5) },
        PeerBody::Status,
        PeerBody::PlainCopy { migration: id(6) },
        PeerBody::PreparePostCopy(a_prepare()),
        PeerBody::Pages { migration: id(7) },
    ];
    bodies
        .into_iter()
        .map(|body| PeerRequest {
            token: vec![1, 2, 3],
            body,
        })
        .collect()
}

#[test]
fn peer_requests_round_trip() {
    for r in requests() {
        let frame = to_frame(&r).unwrap();
        let back: PeerRequest = decode(body_of(&frame)).unwrap();
        assert_eq!(back, r);
    }
}

#[test]
fn replies_round_trip() {
    let replies = vec![
        PeerReply::Prepared {
            seal_public: [3; 32],
            address: "10.233.0.12:4300".parse().unwrap(),
        },
        PeerReply::Received(TransferFigures {
            raw_bytes: 10,
            compressed_bytes: 5,
            sealed_bytes: 7,
            files: 2,
            ms: 1.5,
        }),
        PeerReply::Restored {
            pid: 42,
            restore: CriuTiming::default(),
            placement_checked: true,
        },
        PeerReply::Resumed {
            clients: 100,
            handshakes: 100,
        },
        PeerReply::Aborted {
            undone: "slot".into(),
        },
        PeerReply::Refused(Refusal::Token(TokenRefusal::Replayed)),
        PeerReply::Refused(Refusal::PostCopy {
            host: "b".into(),
            reason: "fs.pipe-max-size".into(),
        }),
        PeerReply::PagesReady,
        PeerReply::ResumedResident {
            clients: 3,
            handshakes: 3,
            resident_after_ms: 812.5,
            pages: Some(16_384),
        },
        PeerReply::Refused(Refusal::Failed {
            phase: "restoring".into(),
            host: "b".into(),
            message: "criu".into(),
        }),
        PeerReply::Status(HostStatus {
            host: name("b"),
            services: vec![ServiceStatus {
                name: name("s1"),
                address: "10.233.0.12:4300".parse().unwrap(),
                pid: 7,
                clients: Some(3),
                migrations: 2,
            }],
            free_slots: 4,
            migrations_in_flight: 1,
            recent: vec![MoveSummary {
                migration: id(8),
                service: name("s1"),
                from: name("a"),
                to: name("b"),
                outcome: Outcome::RolledBack,
                failed: Some(("transferring".into(), "b".into())),
                freeze_ms: Some(30.0),
                started_unix: 1,
            }],
        }),
    ];
    for r in replies {
        let frame = to_frame(&r).unwrap();
        assert_eq!(decode::<PeerReply>(body_of(&frame)).unwrap(), r);
    }
}

#[test]
fn local_messages_round_trip() {
    let reqs = vec![
        LocalRequest::Status { all: true },
        LocalRequest::Start(StartService {
            name: name("s"),
            port: 0,
            server_user: None,
            server_args: vec!["--ballast-mib".into(), "8".into()],
            pid_namespace: true,
        }),
        LocalRequest::Stop { service: name("s") },
        LocalRequest::Migrate(MigrateService {
            service: name("s"),
            to: name("c"),
            phases: Phases::One,
            fault: Some(MoveFault::Target(TargetFault::DieDuringRestore)),
            plain_copy_after: true,
            memory: Memory::PostCopy,
        }),
        LocalRequest::Drain(Drain {
            targets: None,
            concurrency: 2,
            phases: Phases::Two,
        }),
    ];
    for r in reqs {
        let frame = to_frame(&r).unwrap();
        assert_eq!(decode::<LocalRequest>(body_of(&frame)).unwrap(), r);
    }
}

#[test]
fn names_are_checked() {
    for good in ["a", "host-b", "s0", &"x".repeat(MAX_NAME)] {
        assert!(Name::new(good).is_ok(), "{good}");
    }
    for bad in [
        "",
        "-a",
        "A",
        "a b",
        "a/b",
        "..",
        "a\0",
        "é",
        &"x".repeat(MAX_NAME + 1),
    ] {
        assert_eq!(Name::new(bad), Err(BadName(bad.chars().take(80).collect())));
    }
}

#[test]
fn a_bad_name_from_the_network_is_refused() {
    // Encode a Stop with a raw string in place of the name.
    #[derive(Serialize)]
    enum Raw {
        #[allow(dead_code)]
        Status {
            all: bool,
        },
        #[allow(dead_code)]
        Start(u8),
        Stop {
            service: String,
        },
    }
    let frame = to_frame(&Raw::Stop {
        service: "../etc".into(),
    })
    .unwrap();
    let err = decode::<LocalRequest>(body_of(&frame)).unwrap_err();
    assert!(
        matches!(err, ProtocolError::Frame(wire_frame::FrameError::Decode(_))),
        "{err:?}"
    );
    // postcard keeps no message text; the typed error is what the agent logs and answers.
}

#[test]
fn another_version_is_refused_as_such() {
    let mut body = Vec::new();
    wire_frame::encode(&(VERSION + 1, PeerBody::Status), MAX_MESSAGE, &mut body).unwrap();
    let err = decode::<PeerBody>(body_of(&body)).unwrap_err();
    assert!(
        matches!(err, ProtocolError::Version { got } if got == VERSION + 1),
        "{err:?}"
    );
    // A version that does not even fit a u16.
    let err = decode::<PeerBody>(&[0xff, 0xff, 0x7f, 0]).unwrap_err();
    assert!(matches!(err, ProtocolError::NoVersion), "{err:?}");
    assert!(matches!(
        decode::<PeerBody>(&[]).unwrap_err(),
        ProtocolError::NoVersion
    ));
}

#[test]
fn trailing_bytes_and_truncation_are_refused() {
    let frame = to_frame(&requests()[0]).unwrap();
    let mut longer = body_of(&frame).to_vec();
    longer.push(0);
    assert!(matches!(
        decode::<PeerRequest>(&longer).unwrap_err(),
        ProtocolError::Frame(wire_frame::FrameError::TrailingBytes(1))
    ));
    let body = body_of(&frame);
    for cut in 1..body.len() {
        assert!(decode::<PeerRequest>(&body[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn oversized_is_refused_both_ways() {
    let big = PeerRequest {
        token: vec![0; MAX_MESSAGE + 1],
        body: PeerBody::Status,
    };
    assert!(matches!(
        to_frame(&big).unwrap_err(),
        ProtocolError::Frame(wire_frame::FrameError::TooLarge { .. })
    ));
    let body = vec![0u8; MAX_MESSAGE + 1];
    assert!(matches!(
        decode::<PeerRequest>(&body).unwrap_err(),
        ProtocolError::Frame(wire_frame::FrameError::TooLarge { .. })
    ));
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<PeerRequest>(&bytes);
        let _ = decode::<PeerReply>(&bytes);
        let _ = decode::<LocalRequest>(&bytes);
        let _ = decode::<LocalReply>(&bytes);
    }

    #[test]
    fn versioned_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut body = vec![VERSION as u8];
        body.extend_from_slice(&bytes);
        let _ = decode::<PeerRequest>(&body);
        let _ = decode::<LocalRequest>(&body);
    }
}

#[test]
fn a_local_reply_may_exceed_a_peer_message_but_stays_bounded() {
    let big = LocalReply::Error("x".repeat(MAX_MESSAGE + 10));
    assert!(
        to_frame(&big).is_err(),
        "a peer message is bounded by MAX_MESSAGE"
    );
    let frame = local_reply_frame(&big).unwrap();
    assert_eq!(decode_local_reply(&frame[4..]).unwrap(), big);
    // Peers' decoding keeps its own bound.
    assert!(decode::<LocalReply>(&frame[4..]).is_err());
    let too_big = LocalReply::Error("x".repeat(MAX_LOCAL_REPLY));
    assert!(local_reply_frame(&too_big).is_err());
    let body = vec![0u8; MAX_LOCAL_REPLY + 1];
    assert!(matches!(
        decode_local_reply(&body),
        Err(ProtocolError::Frame(_))
    ));
    // Garbage of a plausible size is a typed error too.
    assert!(decode_local_reply(&[0xff; 64]).is_err());
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Post-copy came in as new variants at the end of their enums: a cold move's messages are
/// byte for byte what they were before it (these bytes were taken before the change).
#[test]
fn a_cold_moves_messages_keep_their_bytes() {
    let prepare = PeerRequest {
        token: vec![1, 2, 3],
        body: PeerBody::Prepare(a_prepare()),
    };
    assert_eq!(hex(body_of(&to_frame(&prepare).unwrap())), GOLDEN_PREPARE);
    let resumed = PeerReply::Resumed {
        clients: 100,
        handshakes: 100,
    };
    assert_eq!(hex(body_of(&to_frame(&resumed).unwrap())), GOLDEN_RESUMED);
    // The new ones: the variant's position is its number.
    let pages = PeerRequest {
        token: vec![],
        body: PeerBody::Pages { migration: id(7) },
    };
    assert_eq!(
        hex(body_of(&to_frame(&pages).unwrap())),
        format!("0100{:02x}{}", 8, "07".repeat(16)),
    );
    assert_eq!(
        hex(body_of(&to_frame(&PeerReply::PagesReady).unwrap())),
        "0107"
    );
}

/// Taken from the encoding before post-copy (commit adf81a1).
const GOLDEN_PREPARE: &str = "0103010203000101010101010101010101010101010106656467652d31010a716c6d2d7365727665720209090909090909090909090909090909090909090909090909090909090909099a010101028080c002";
const GOLDEN_RESUMED: &str = "01036464";

/// An agent that predates post-copy (its `PeerBody` ends at `PlainCopy`) refuses the new
/// requests as malformed instead of mis-reading them.
#[test]
fn an_agent_without_post_copy_refuses_its_requests() {
    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    enum OldBody {
        Prepare(Prepare),
        Receive { migration: MigrationId },
        Restore { migration: MigrationId },
        Resume { migration: MigrationId },
        Abort { migration: MigrationId },
        Status,
        PlainCopy { migration: MigrationId },
    }
    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct OldRequest {
        #[serde(with = "serde_bytes")]
        token: Vec<u8>,
        body: OldBody,
    }
    for body in [
        PeerBody::PreparePostCopy(a_prepare()),
        PeerBody::Pages { migration: id(7) },
    ] {
        let frame = to_frame(&PeerRequest {
            token: vec![1],
            body,
        })
        .unwrap();
        let err = decode::<OldRequest>(body_of(&frame)).unwrap_err();
        assert!(
            matches!(err, ProtocolError::Frame(wire_frame::FrameError::Decode(_))),
            "{err:?}"
        );
    }
    // The cold Prepare still reads.
    let frame = to_frame(&requests()[0]).unwrap();
    assert!(decode::<OldRequest>(body_of(&frame)).is_ok());
}

/// Bad bytes in the new messages are typed errors: a memory mode that does not exist, a
/// truncated Pages request, an unknown reply variant.
#[test]
fn bad_post_copy_bytes_are_refused() {
    let local = LocalRequest::Migrate(MigrateService {
        service: name("s"),
        to: name("c"),
        phases: Phases::One,
        fault: None,
        plain_copy_after: false,
        memory: Memory::Cold,
    });
    let frame = to_frame(&local).unwrap();
    let mut body = body_of(&frame).to_vec();
    // The memory mode is the last byte: 0 cold, 1 post-copy, nothing else.
    assert_eq!(body.last(), Some(&0));
    *body.last_mut().unwrap() = 2;
    assert!(matches!(
        decode::<LocalRequest>(&body).unwrap_err(),
        ProtocolError::Frame(wire_frame::FrameError::Decode(_))
    ));
    *body.last_mut().unwrap() = 1;
    assert!(matches!(
        decode::<LocalRequest>(&body).unwrap(),
        LocalRequest::Migrate(MigrateService {
            memory: Memory::PostCopy,
            ..
        })
    ));
    let pages = to_frame(&PeerRequest {
        token: vec![],
        body: PeerBody::Pages { migration: id(7) },
    })
    .unwrap();
    let pages = body_of(&pages);
    for cut in 1..pages.len() {
        assert!(
            decode::<PeerRequest>(&pages[..cut]).is_err(),
            "cut at {cut}"
        );
    }
    // A reply variant past the last one.
    assert!(decode::<PeerReply>(&[1, 0x7f]).is_err());
}
