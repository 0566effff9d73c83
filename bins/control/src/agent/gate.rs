//! What a request from another agent must pass before its body is looked at: the peer (named
//! by its certificate) on this host's allowlist, its rate, and the migration token (MAC,
//! binding to this source and this target, expiry, and for the first request of a migration
//! the replay cache). Clock readings are passed in.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use agent_protocol::{Name, PeerBody, PeerRequest, Refusal, TokenRefusal};
use migration_core::MigrationId;
use migration_crypto::{
    MigrationToken, RateLimiter, TokenClaims, TokenError, TokenKey, TokenVerifier,
};

/// Tokens remembered against replay.
const REPLAY_CAPACITY: usize = 4096;
/// Clock skew tolerated between hosts.
const LEEWAY: Duration = Duration::from_secs(5);

/// The checks, for one agent.
#[derive(Debug)]
pub(crate) struct Gate {
    host: Name,
    allow: BTreeSet<Name>,
    verifier: TokenVerifier,
    rate: (u32, u32),
    limiters: HashMap<Name, RateLimiter>,
    max_lifetime_s: u64,
}

impl Gate {
    pub(crate) fn new(
        host: Name,
        allow: impl IntoIterator<Item = Name>,
        key: TokenKey,
        rate: (u32, u32),
        max_lifetime: Duration,
    ) -> Gate {
        Gate {
            host,
            allow: allow.into_iter().collect(),
            verifier: TokenVerifier::new(key, REPLAY_CAPACITY, LEEWAY),
            rate,
            limiters: HashMap::new(),
            max_lifetime_s: max_lifetime.as_secs(),
        }
    }

    /// Whether `peer` may talk to this host at all (checked when it connects, too).
    pub(crate) fn allows(&self, peer: &Name) -> bool {
        self.allow.contains(peer)
    }

    /// Checks `request` from `peer` at `now_unix` (seconds; tokens) and `mono` (the agent's
    /// monotonic clock; rates).
    pub(crate) fn admit(
        &mut self,
        peer: &Name,
        request: &PeerRequest,
        now_unix: u64,
        mono: Duration,
    ) -> Result<TokenClaims, Refusal> {
        if !self.allows(peer) {
            return Err(Refusal::NotAllowed {
                peer: peer.to_string(),
            });
        }
        let (per_sec, burst) = self.rate;
        self.limiters
            .entry(peer.clone())
            .or_insert_with(|| RateLimiter::new(per_sec, burst))
            .try_acquire(mono)
            .map_err(|_| Refusal::RateLimited)?;
        let token = &request.token;
        let (source, target) = (peer.as_str(), self.host.as_str());
        // The first request of a migration (and a status request, which stands alone) spends
        // its token; the later ones of the same migration show it again.
        let (claims, migration) = match &request.body {
            PeerBody::Prepare(p) | PeerBody::PreparePostCopy(p) => (
                self.verifier.verify(token, source, target, now_unix),
                Some(p.migration),
            ),
            // A status request changes nothing: a replay does no harm, and keeping it out of
            // the replay cache keeps frequent status calls from filling it.
            PeerBody::Status => (self.verifier.check(token, source, target, now_unix), None),
            PeerBody::Receive { migration }
            | PeerBody::Restore { migration }
            | PeerBody::Resume { migration }
            | PeerBody::Abort { migration }
            | PeerBody::PlainCopy { migration }
            | PeerBody::Pages { migration } => (
                self.verifier.check(token, source, target, now_unix),
                Some(*migration),
            ),
            _ => {
                return Err(Refusal::Malformed(
                    "a request this agent does not know".into(),
                ));
            }
        };
        let claims = claims.map_err(|e| Refusal::Token(refusal_of(&e)))?;
        // A token valid for longer than this fleet issues them would sit in the replay cache
        // for as long: refused, so that no peer can fill the cache for good.
        if claims.expires_at.saturating_sub(claims.issued_at) > self.max_lifetime_s {
            return Err(Refusal::Token(TokenRefusal::Malformed));
        }
        if let Some(m) = migration
            && claims.migration_id != *m.as_bytes()
        {
            return Err(Refusal::Token(TokenRefusal::WrongMigration));
        }
        Ok(claims)
    }
}

/// migration-crypto's error as the peer is told it.
pub(crate) fn refusal_of(e: &TokenError) -> TokenRefusal {
    match e {
        TokenError::Forged => TokenRefusal::Forged,
        TokenError::WrongBinding { .. } => TokenRefusal::WrongBinding,
        TokenError::NotYetValid { .. } => TokenRefusal::NotYetValid,
        TokenError::Expired { .. } => TokenRefusal::Expired,
        // A full replay cache refuses like a replay: the request cannot be proven fresh.
        TokenError::Replayed | TokenError::ReplayCacheFull { .. } => TokenRefusal::Replayed,
        _ => TokenRefusal::Malformed,
    }
}

/// A token for `migration` from `source` to `target`, valid `lifetime` from `now_unix`.
pub(crate) fn issue(
    key: &TokenKey,
    migration: MigrationId,
    source: &Name,
    target: &Name,
    now_unix: u64,
    lifetime: Duration,
) -> anyhow::Result<MigrationToken> {
    Ok(migration_crypto::issue_token(
        key,
        &TokenClaims {
            migration_id: *migration.as_bytes(),
            source: source.to_string(),
            target: target.to_string(),
            issued_at: now_unix,
            expires_at: now_unix.saturating_add(lifetime.as_secs()),
        },
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_protocol::{Prepare, ServiceSpec};

    const NOW: u64 = 1_800_000_000;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn key() -> TokenKey {
        TokenKey::from_bytes(&[0x11; 32]).unwrap()
    }

    fn gate() -> Gate {
        Gate::new(
            name("b"),
            [name("a"), name("c")],
            key(),
            (10, 3),
            Duration::from_secs(120),
        )
    }

    fn prepare(m: MigrationId, token: Vec<u8>) -> PeerRequest {
        PeerRequest {
            token,
            body: PeerBody::Prepare(Prepare {
                migration: m,
                service: ServiceSpec {
                    name: name("s"),
                    server_user: None,
                    moves: 0,
                },
                seal_public: [0; 32],
                server_pid: 1,
                phases: admin_api::Phases::One,
                fault: None,
                image_estimate: 0,
            }),
        }
    }

    fn token(m: MigrationId, src: &str, dst: &str, at: u64) -> Vec<u8> {
        issue(
            &key(),
            m,
            &name(src),
            &name(dst),
            at,
            Duration::from_secs(60),
        )
        .unwrap()
        .into_bytes()
    }

    #[test]
    fn a_good_prepare_passes_once_and_its_migration_goes_on() {
        let mut g = gate();
        let m = MigrationId::from_bytes([1; 16]);
        let t = token(m, "a", "b", NOW);
        g.admit(&name("a"), &prepare(m, t.clone()), NOW, Duration::ZERO)
            .unwrap();
        // Replayed Prepare: refused.
        assert_eq!(
            g.admit(
                &name("a"),
                &prepare(m, t.clone()),
                NOW,
                Duration::from_secs(1)
            )
            .unwrap_err(),
            Refusal::Token(TokenRefusal::Replayed)
        );
        // The migration's later requests show the same token.
        for body in [
            PeerBody::Receive { migration: m },
            PeerBody::Restore { migration: m },
            PeerBody::Resume { migration: m },
        ] {
            let r = PeerRequest {
                token: t.clone(),
                body,
            };
            g.admit(&name("a"), &r, NOW + 1, Duration::from_secs(2))
                .unwrap();
        }
        // ... but not for another migration.
        let other = PeerRequest {
            token: t,
            body: PeerBody::Restore {
                migration: MigrationId::from_bytes([2; 16]),
            },
        };
        assert_eq!(
            g.admit(&name("a"), &other, NOW + 1, Duration::from_secs(3))
                .unwrap_err(),
            Refusal::Token(TokenRefusal::WrongMigration)
        );
    }

    /// A post-copy move's requests pass the gate like a cold move's: its Prepare spends the
    /// token once, its page stream shows the same token and must name the same migration.
    #[test]
    fn a_post_copy_prepare_and_its_page_stream_are_gated_like_the_others() {
        let mut g = gate();
        let m = MigrationId::from_bytes([4; 16]);
        let t = token(m, "a", "b", NOW);
        let PeerBody::Prepare(p) = prepare(m, t.clone()).body else {
            unreachable!("prepare() makes a Prepare")
        };
        let lazy = PeerRequest {
            token: t.clone(),
            body: PeerBody::PreparePostCopy(p),
        };
        g.admit(&name("a"), &lazy, NOW, Duration::ZERO).unwrap();
        assert_eq!(
            g.admit(&name("a"), &lazy, NOW, Duration::from_secs(1))
                .unwrap_err(),
            Refusal::Token(TokenRefusal::Replayed)
        );
        let pages = |migration| PeerRequest {
            token: t.clone(),
            body: PeerBody::Pages { migration },
        };
        g.admit(&name("a"), &pages(m), NOW + 1, Duration::from_secs(2))
            .unwrap();
        assert_eq!(
            g.admit(
                &name("a"),
                &pages(MigrationId::from_bytes([5; 16])),
                NOW + 1,
                Duration::from_secs(3)
            )
            .unwrap_err(),
            Refusal::Token(TokenRefusal::WrongMigration)
        );
        // From a host the token does not name.
        assert_eq!(
            g.admit(&name("c"), &pages(m), NOW + 1, Duration::from_secs(4))
                .unwrap_err(),
            Refusal::Token(TokenRefusal::WrongBinding)
        );
    }

    #[test]
    fn forged_expired_misbound_and_garbage_tokens_are_refused() {
        let mut g = gate();
        let m = MigrationId::from_bytes([3; 16]);
        let other_key = TokenKey::from_bytes(&[0x22; 32]).unwrap();
        let forged = issue(
            &other_key,
            m,
            &name("a"),
            &name("b"),
            NOW,
            Duration::from_secs(60),
        )
        .unwrap()
        .into_bytes();
        let cases = [
            (forged, TokenRefusal::Forged),
            (token(m, "a", "b", NOW - 3600), TokenRefusal::Expired),
            (token(m, "a", "c", NOW), TokenRefusal::WrongBinding),
            // A token of host c presented by host a.
            (token(m, "c", "b", NOW), TokenRefusal::WrongBinding),
            (token(m, "a", "b", NOW + 3600), TokenRefusal::NotYetValid),
            (vec![1, 2, 3], TokenRefusal::Malformed),
            (Vec::new(), TokenRefusal::Malformed),
        ];
        for (i, (t, want)) in cases.into_iter().enumerate() {
            let mono = Duration::from_secs(i as u64);
            assert_eq!(
                g.admit(&name("a"), &prepare(m, t), NOW, mono).unwrap_err(),
                Refusal::Token(want),
                "case {i}"
            );
        }
    }

    #[test]
    fn a_token_living_longer_than_the_fleet_issues_is_refused_and_status_spends_nothing() {
        let mut g = gate();
        let m = MigrationId::from_bytes([5; 16]);
        let long = issue(
            &key(),
            m,
            &name("a"),
            &name("b"),
            NOW,
            Duration::from_secs(86_400),
        )
        .unwrap()
        .into_bytes();
        assert_eq!(
            g.admit(&name("a"), &prepare(m, long), NOW, Duration::ZERO)
                .unwrap_err(),
            Refusal::Token(TokenRefusal::Malformed)
        );
        let t = token(m, "a", "b", NOW);
        let status = PeerRequest {
            token: t,
            body: PeerBody::Status,
        };
        g.admit(&name("a"), &status, NOW, Duration::from_secs(1))
            .unwrap();
        g.admit(&name("a"), &status, NOW, Duration::from_secs(2))
            .unwrap();
    }

    #[test]
    fn a_peer_off_the_allowlist_is_refused_before_its_token_is_read() {
        let mut g = gate();
        let m = MigrationId::from_bytes([4; 16]);
        assert_eq!(
            g.admit(
                &name("d"),
                &prepare(m, token(m, "d", "b", NOW)),
                NOW,
                Duration::ZERO
            )
            .unwrap_err(),
            Refusal::NotAllowed { peer: "d".into() }
        );
        assert!(!g.allows(&name("d")));
        assert!(g.allows(&name("c")));
    }

    #[test]
    fn a_flood_is_rate_limited_per_peer() {
        let mut g = gate();
        let refused = (0..20u8)
            .filter(|i| {
                let m = MigrationId::from_bytes([*i; 16]);
                let r = g.admit(
                    &name("a"),
                    &prepare(m, token(m, "a", "b", NOW)),
                    NOW,
                    Duration::ZERO,
                );
                r == Err(Refusal::RateLimited)
            })
            .count();
        // A burst of 3 passes; the rest of the same instant is refused.
        assert_eq!(refused, 17);
        // Another peer has its own bucket.
        let m = MigrationId::from_bytes([99; 16]);
        g.admit(
            &name("c"),
            &prepare(m, token(m, "c", "b", NOW)),
            NOW,
            Duration::ZERO,
        )
        .unwrap();
        // Time refills it.
        let m = MigrationId::from_bytes([98; 16]);
        g.admit(
            &name("a"),
            &prepare(m, token(m, "a", "b", NOW)),
            NOW,
            Duration::from_secs(1),
        )
        .unwrap();
    }
}
