//! The foundation crates together, as a migration between two hosts uses them: migration-core
//! drives the phases, migration-crypto authorises the move (token) and seals the image set,
//! migration-wire carries it, control-protocol tells the client.

// Test helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use control_protocol::{ControlDecoder, Message, Role, Token};
use migration_core::{Event, Migration, MigrationId, Phase, Timestamp};
use migration_crypto::{
    Key, Opener, Sealer, TokenClaims, TokenError, TokenKey, TokenVerifier, issue_token,
};
use migration_wire::compress::Compression;
use migration_wire::{Chunker, ChunkerConfig, ReassembleError, Reassembler, ReassemblerConfig};

const SOURCE: &str = "host-a";
const TARGET: &str = "host-b";

/// A small directory shaped like a CRIU image set.
fn image_set(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let pages: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.join("pages-1.img"), &pages).unwrap();
    for i in 0..5 {
        std::fs::write(dir.join(format!("core-{i}.img")), vec![i as u8; 700]).unwrap();
    }
    std::fs::write(dir.join("inventory.img"), b"").unwrap();
}

fn same_tree(a: &Path, b: &Path) {
    let mut names: Vec<_> = std::fs::read_dir(a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    let mut other: Vec<_> = std::fs::read_dir(b)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    other.sort();
    assert_eq!(names, other);
    for n in names {
        assert_eq!(
            std::fs::read(a.join(&n)).unwrap(),
            std::fs::read(b.join(&n)).unwrap()
        );
    }
}

fn stream(dir: &Path, key: &Key) -> Vec<u8> {
    let mut out = Vec::new();
    Chunker::new(
        dir,
        ChunkerConfig {
            chunk_size: 64 * 1024,
            compression: Compression::Zstd { level: 1 },
            sealer: Some(Sealer::new(key).unwrap()),
        },
    )
    .unwrap()
    .write_to(&mut out)
    .unwrap();
    out
}

fn receiver(dest: &Path, key: &Key) -> Reassembler {
    Reassembler::new(
        dest,
        ReassemblerConfig {
            opener: Some(Opener::new(key)),
            max_chunk: 64 * 1024,
            max_total_bytes: Some(1 << 30),
        },
    )
    .unwrap()
}

#[test]
fn an_image_set_moves_sealed_and_authorised_and_the_client_is_told() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("dump");
    image_set(&src);
    let id = MigrationId::from_bytes([7; 16]);
    let t = |ms: u64| Timestamp::from_millis(1_000_000 + ms);
    let mut m = Migration::new(id, t(0));
    m.on_event(Event::Start, t(0)).unwrap();

    // The orchestrator authorises the move; the target checks the token before accepting.
    // Both sides hold the same token key (distributed out of band).
    let token_key = TokenKey::from_bytes(&KEY_BYTES).unwrap();
    let now = 1_700_000_000;
    let token = issue_token(
        &token_key,
        &TokenClaims {
            migration_id: *id.as_bytes(),
            source: SOURCE.into(),
            target: TARGET.into(),
            issued_at: now,
            expires_at: now + 60,
        },
    )
    .unwrap();
    let mut verifier = TokenVerifier::new(
        TokenKey::from_bytes(&KEY_BYTES).unwrap(),
        16,
        Duration::from_secs(2),
    );

    // The client is told, with the token, on its control stream.
    let new_addr: SocketAddr = "127.0.0.1:5243".parse().unwrap();
    let mut wire = Vec::new();
    control_protocol::encode(
        &Message::Migrate {
            migration_id: id,
            new_addr,
            deadline_ms: 2000,
            token: Some(Token::new(token.as_bytes().to_vec()).unwrap()),
        },
        &mut wire,
    )
    .unwrap();
    let mut client = ControlDecoder::new(Role::Client);
    client.push(&wire);
    let Some(Message::Migrate {
        migration_id,
        token: Some(seen),
        ..
    }) = client.next().unwrap()
    else {
        panic!("no Migrate decoded");
    };
    assert_eq!(migration_id, id);
    assert_eq!(seen.as_bytes(), token.as_bytes());

    m.on_event(Event::BeginDump, t(10)).unwrap();
    m.on_event(
        Event::DumpDone {
            image_bytes: Some(302_000),
        },
        t(60),
    )
    .unwrap();

    // The image set crosses, sealed; the target verifies the token first.
    let claims = verifier
        .verify(token.as_bytes(), SOURCE, TARGET, now + 1)
        .unwrap();
    assert_eq!(claims.migration_id, *id.as_bytes());
    let key = Key::generate().unwrap();
    let bytes = stream(&src, &key);
    let dest = tmp.path().join("restored");
    receiver(&dest, &key).read_from(bytes.as_slice()).unwrap();
    same_tree(&src, &dest);
    m.on_event(Event::TransferDone, t(80)).unwrap();
    m.on_event(Event::RestoreDone, t(130)).unwrap();
    m.on_event(Event::ResumeDone, t(140)).unwrap();
    assert_eq!(m.phase(), Phase::Completed);
    let report = m.report();
    // Dump start (10) to the restored process running (130).
    assert_eq!(report.freeze_time, Some(Duration::from_millis(120)));
    assert_eq!(report.transfer_time, Some(Duration::from_millis(20)));
    assert_eq!(report.image_bytes, Some(302_000));

    // The same token again is a replay.
    assert!(matches!(
        verifier.verify(token.as_bytes(), SOURCE, TARGET, now + 2),
        Err(TokenError::Replayed)
    ));
}

/// The token key both sides share in this test.
const KEY_BYTES: [u8; 32] = [42; 32];

#[test]
fn a_tampered_image_set_is_refused_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("dump");
    image_set(&src);
    let key = Key::generate().unwrap();
    let mut bytes = stream(&src, &key);
    // Flip one byte well inside a payload.
    let i = bytes.len() / 2;
    bytes[i] ^= 0x40;
    let dest = tmp.path().join("restored");
    let err = receiver(&dest, &key)
        .read_from(bytes.as_slice())
        .unwrap_err();
    assert!(
        matches!(err, ReassembleError::Open(_) | ReassembleError::Frame(_)),
        "{err:?}"
    );
    assert!(!dest.exists(), "a partial image set was left behind");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("restored"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Under another key, the stream is refused before anything is written.
    let other = Key::generate().unwrap();
    let clean = stream(&src, &key);
    let err = receiver(&dest, &other)
        .read_from(clean.as_slice())
        .unwrap_err();
    assert!(matches!(err, ReassembleError::Open(_)), "{err:?}");
    assert!(!dest.exists());
}
