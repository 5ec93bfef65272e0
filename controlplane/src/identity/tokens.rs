//! Join tokens: how a peer that has no Kubernetes service account (an agent's first
//! start, a VM, an operator's CLI) proves it may get a certificate for one identity.
//!
//! An operator creates one (`tributary token create --identity spiffe://... --ttl 1h`);
//! it is printed once as `{id}.{secret}` and stored only as the SHA-256 of its secret,
//! under `/tributary/join-tokens/{id}`, with the identity it grants, its expiry and its
//! remaining uses. By default a token is **single use**; `--uses N` (at most
//! [`MAX_USES`]) allows N certificates, e.g. for an agent's replicas. Redeeming one is a
//! transaction compared on the record's mod revision, so two concurrent redemptions of
//! the last use cannot both succeed. Revoking (`tributary token revoke ID`) keeps the
//! record, so a later attempt is told it was revoked rather than that it is unknown.
//! Records are deleted a day after they expire.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tributary_store::{Compare, SharedStore, StoreError, Txn, TxnOp};

use super::SpiffeId;
use super::ca::{Signer, from_unix, hex, random_bytes, rfc3339, unix};

/// Join tokens live under this prefix, one key per token id.
pub const TOKENS_PREFIX: &str = "/tributary/join-tokens/";
/// The most certificates one token may be used for.
pub const MAX_USES: u32 = 1000;
/// The longest a token may live (`--ttl`).
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Expired records are deleted this long after their expiry.
const KEEP_EXPIRED: Duration = Duration::from_secs(24 * 3600);
const WRITE_ATTEMPTS: usize = 5;

/// What a token grants, as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    /// The SPIFFE id a certificate issued with it carries.
    pub identity: String,
    /// The remote cluster whose intermediate signs (for an agent: its own cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    pub created: u64,
    pub expires: u64,
    pub uses: u32,
    pub uses_left: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<u64>,
}

/// A token just created: the only time its secret is seen.
#[derive(Clone, Serialize, Deserialize)]
pub struct CreatedToken {
    pub id: String,
    /// `{id}.{secret}`: what the peer presents.
    pub token: String,
    pub identity: String,
    pub expires: String,
    pub uses: u32,
}

impl std::fmt::Debug for CreatedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedToken")
            .field("id", &self.id)
            .field("identity", &self.identity)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// What a valid token grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub token_id: String,
    pub identity: SpiffeId,
    pub signer: Signer,
    /// The record's mod revision when checked; [`JoinTokens::consume`] compares on it.
    revision: i64,
    record: TokenRecord,
}

/// Why a token is refused. Only `Store` may succeed on retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("join token is malformed: expected ID.SECRET as printed by `tributary token create`")]
    Malformed,
    #[error("join token {0} is unknown (never created, or deleted a day after it expired)")]
    Unknown(String),
    #[error("join token {0}: the secret does not match")]
    WrongSecret(String),
    #[error("join token {id} expired at {at}")]
    Expired { id: String, at: String },
    #[error("join token {id} was revoked at {at}")]
    Revoked { id: String, at: String },
    #[error("join token {id} was already used (it allowed {uses} certificate(s))")]
    UsedUp { id: String, uses: u32 },
    #[error("join token: {0}")]
    Invalid(String),
    #[error("join token {0} is used concurrently by others: try again")]
    Contended(String),
    #[error("join tokens: the store: {0}")]
    Store(#[from] StoreError),
}

impl TokenError {
    pub fn is_retryable(&self) -> bool {
        match self {
            TokenError::Store(e) => e.is_retryable(),
            TokenError::Contended(_) => true,
            _ => false,
        }
    }
}

fn sha256_hex(s: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref())
}

fn key(id: &str) -> String {
    format!("{TOKENS_PREFIX}{id}")
}

/// Join tokens in the store.
#[derive(Clone, Debug)]
pub struct JoinTokens {
    store: SharedStore,
    trust_domain: String,
}

impl JoinTokens {
    pub fn new(store: SharedStore, trust_domain: impl Into<String>) -> Self {
        Self {
            store,
            trust_domain: trust_domain.into(),
        }
    }

    /// Creates a token for `identity`, valid for `ttl` and `uses` certificates,
    /// signed by `cluster`'s intermediate when given (an agent's: its own cluster).
    pub async fn create(
        &self,
        identity: &str,
        ttl: Duration,
        uses: u32,
        cluster: Option<String>,
        now: SystemTime,
    ) -> Result<CreatedToken, TokenError> {
        let id = SpiffeId::parse(identity).map_err(|e| TokenError::Invalid(e.to_string()))?;
        if id.trust_domain != self.trust_domain {
            return Err(TokenError::Invalid(format!(
                "--identity {identity}: not in this mesh's trust domain {:?}",
                self.trust_domain
            )));
        }
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(TokenError::Invalid(format!(
                "--ttl {}: expected more than 0 and at most {}",
                humantime::format_duration(ttl),
                humantime::format_duration(MAX_TTL)
            )));
        }
        if uses == 0 || uses > MAX_USES {
            return Err(TokenError::Invalid(format!(
                "--uses {uses}: expected 1 to {MAX_USES}"
            )));
        }
        if let Some(c) = &cluster
            && !super::spiffe::valid_segment(c)
        {
            return Err(TokenError::Invalid(format!(
                "--cluster {c:?}: expected a cluster id of [A-Za-z0-9._-]"
            )));
        }
        let cluster = match (&id.identity, cluster) {
            (super::Identity::Agent { cluster: own }, Some(c)) if *own != c => {
                return Err(TokenError::Invalid(format!(
                    "--cluster {c} does not match the agent identity's cluster {own}"
                )));
            }
            (super::Identity::Agent { cluster: own }, _) => Some(own.clone()),
            (_, c) => c,
        };
        self.prune(now).await?;
        let token_id = hex(&random_bytes::<8>());
        let secret = hex(&random_bytes::<32>());
        let expires = now + ttl;
        let record = TokenRecord {
            identity: id.to_string(),
            cluster,
            secret_sha256: sha256_hex(&secret),
            created: unix(now),
            expires: unix(expires),
            uses,
            uses_left: uses,
            revoked: None,
        };
        let txn = Txn {
            compares: vec![Compare::absent(key(&token_id))],
            success: vec![TxnOp::put(
                key(&token_id),
                serde_json::to_vec(&record).expect("serializable"),
            )],
            failure: vec![],
        };
        if !self.store.txn(txn).await?.succeeded {
            return Err(TokenError::Contended(token_id));
        }
        tracing::info!(token = %token_id, identity = %record.identity, expires = %rfc3339(expires), uses, "join token created");
        Ok(CreatedToken {
            token: format!("{token_id}.{secret}"),
            id: token_id,
            identity: record.identity,
            expires: rfc3339(from_unix(record.expires)),
            uses,
        })
    }

    /// Deletes records that expired more than a day ago.
    async fn prune(&self, now: SystemTime) -> Result<(), TokenError> {
        let range = self.store.range(TOKENS_PREFIX).await?;
        for kv in range.kvs {
            let Ok(rec) = serde_json::from_slice::<TokenRecord>(&kv.value) else {
                continue;
            };
            if from_unix(rec.expires) + KEEP_EXPIRED < now {
                let txn = Txn {
                    compares: vec![Compare::mod_revision(kv.key.clone(), kv.mod_revision)],
                    success: vec![TxnOp::delete(kv.key)],
                    failure: vec![],
                };
                self.store.txn(txn).await?;
            }
        }
        Ok(())
    }

    /// Revokes token `id` (its id, or the whole token): it is refused from now on.
    pub async fn revoke(&self, id: &str, now: SystemTime) -> Result<(), TokenError> {
        let id = id.split('.').next().unwrap_or(id);
        for _ in 0..WRITE_ATTEMPTS {
            let (kv, _) = self.store.get(&key(id)).await?;
            let kv = kv.ok_or_else(|| TokenError::Unknown(id.to_string()))?;
            let mut rec: TokenRecord = serde_json::from_slice(&kv.value)
                .map_err(|e| TokenError::Invalid(format!("{}: {e}", kv.key)))?;
            if rec.revoked.is_some() {
                return Ok(());
            }
            rec.revoked = Some(unix(now));
            let txn = Txn {
                compares: vec![Compare::mod_revision(kv.key.clone(), kv.mod_revision)],
                success: vec![TxnOp::put(
                    kv.key,
                    serde_json::to_vec(&rec).expect("serializable"),
                )],
                failure: vec![],
            };
            if self.store.txn(txn).await?.succeeded {
                tracing::info!(token = %id, "join token revoked");
                return Ok(());
            }
        }
        Err(TokenError::Contended(id.to_string()))
    }

    /// Checks `token` at `now` without using it up: what it grants, or why not.
    pub async fn check(&self, token: &str, now: SystemTime) -> Result<Grant, TokenError> {
        let (id, secret) = token.trim().split_once('.').ok_or(TokenError::Malformed)?;
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) || secret.is_empty() {
            return Err(TokenError::Malformed);
        }
        let (kv, _) = self.store.get(&key(id)).await?;
        let kv = kv.ok_or_else(|| TokenError::Unknown(id.to_string()))?;
        let rec: TokenRecord = serde_json::from_slice(&kv.value)
            .map_err(|e| TokenError::Invalid(format!("{}: {e}", kv.key)))?;
        // Both sides are hashes of equal length; comparing them leaks nothing useful.
        if sha256_hex(secret) != rec.secret_sha256 {
            return Err(TokenError::WrongSecret(id.to_string()));
        }
        if let Some(at) = rec.revoked {
            return Err(TokenError::Revoked {
                id: id.to_string(),
                at: rfc3339(from_unix(at)),
            });
        }
        if from_unix(rec.expires) <= now {
            return Err(TokenError::Expired {
                id: id.to_string(),
                at: rfc3339(from_unix(rec.expires)),
            });
        }
        if rec.uses_left == 0 {
            return Err(TokenError::UsedUp {
                id: id.to_string(),
                uses: rec.uses,
            });
        }
        let identity = SpiffeId::parse(&rec.identity)
            .map_err(|e| TokenError::Invalid(format!("{}: {e}", kv.key)))?;
        let signer = match &rec.cluster {
            Some(c) => Signer::Cluster(c.clone()),
            None => Signer::for_identity(&identity.identity),
        };
        Ok(Grant {
            token_id: id.to_string(),
            identity,
            signer,
            revision: kv.mod_revision,
            record: rec,
        })
    }

    /// Uses up one use of a checked token. Fails if it changed since the check (used
    /// or revoked meanwhile): check again.
    pub async fn consume(&self, grant: &Grant) -> Result<(), TokenError> {
        let mut rec = grant.record.clone();
        rec.uses_left -= 1;
        let txn = Txn {
            compares: vec![Compare::mod_revision(key(&grant.token_id), grant.revision)],
            success: vec![TxnOp::put(
                key(&grant.token_id),
                serde_json::to_vec(&rec).expect("serializable"),
            )],
            failure: vec![],
        };
        if self.store.txn(txn).await?.succeeded {
            Ok(())
        } else {
            Err(TokenError::Contended(grant.token_id.clone()))
        }
    }

    /// Checks and uses up one use of `token`, retrying when others used it at once.
    pub async fn redeem(&self, token: &str, now: SystemTime) -> Result<Grant, TokenError> {
        for _ in 0..WRITE_ATTEMPTS {
            let grant = self.check(token, now).await?;
            match self.consume(&grant).await {
                Err(TokenError::Contended(_)) => continue,
                r => return r.map(|()| grant),
            }
        }
        Err(TokenError::Contended(
            token.split('.').next().unwrap_or_default().to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::tests::memory_store;

    const AGENT: &str = "spiffe://mesh.local/cluster/eu-1a";

    #[tokio::test]
    async fn a_token_is_single_use_by_default_and_grants_its_identity() {
        let tokens = JoinTokens::new(memory_store(), "mesh.local");
        let now = SystemTime::now();
        let t = tokens
            .create(AGENT, Duration::from_secs(3600), 1, None, now)
            .await
            .unwrap();
        assert!(t.token.starts_with(&format!("{}.", t.id)));
        let grant = tokens.redeem(&t.token, now).await.unwrap();
        assert_eq!(grant.identity.to_string(), AGENT);
        assert_eq!(grant.signer, Signer::Cluster("eu-1a".into()));
        let again = tokens.redeem(&t.token, now).await.unwrap_err();
        assert_eq!(
            again,
            TokenError::UsedUp {
                id: t.id.clone(),
                uses: 1
            }
        );
        assert!(again.to_string().contains("already used"), "{again}");
        // The secret is not stored, only its hash.
        let (kv, _) = tokens.store.get(&key(&t.id)).await.unwrap();
        let stored = String::from_utf8(kv.unwrap().value).unwrap();
        let secret = t.token.split_once('.').unwrap().1;
        assert!(!stored.contains(secret));
    }

    #[tokio::test]
    async fn bounded_uses_then_used_up() {
        let tokens = JoinTokens::new(memory_store(), "mesh.local");
        let now = SystemTime::now();
        let wl = "spiffe://mesh.local/env/prod/ns/shop/sa/checkout";
        let t = tokens
            .create(wl, Duration::from_secs(60), 3, Some("c2".into()), now)
            .await
            .unwrap();
        for _ in 0..3 {
            let g = tokens.redeem(&t.token, now).await.unwrap();
            assert_eq!(g.signer, Signer::Cluster("c2".into()));
        }
        assert!(matches!(
            tokens.redeem(&t.token, now).await,
            Err(TokenError::UsedUp { uses: 3, .. })
        ));
    }

    #[tokio::test]
    async fn expired_revoked_unknown_and_wrong_secret_say_why() {
        let tokens = JoinTokens::new(memory_store(), "mesh.local");
        let now = SystemTime::now();
        let t = tokens
            .create(AGENT, Duration::from_secs(60), 1, None, now)
            .await
            .unwrap();
        // Expired: at its expiry and after, with the time.
        let later = now + Duration::from_secs(61);
        let err = tokens.redeem(&t.token, later).await.unwrap_err();
        assert!(
            matches!(&err, TokenError::Expired { id, .. } if *id == t.id),
            "{err}"
        );
        assert!(err.to_string().contains("expired at 20"), "{err}");
        // An expired attempt does not use it up: still valid now.
        tokens.check(&t.token, now).await.unwrap();
        // Revoked.
        tokens.revoke(&t.id, now).await.unwrap();
        let err = tokens.redeem(&t.token, now).await.unwrap_err();
        assert!(matches!(&err, TokenError::Revoked { .. }), "{err}");
        assert!(err.to_string().contains("was revoked at"), "{err}");
        // Wrong secret, unknown id, malformed.
        let forged = format!("{}.{}", t.id, "00".repeat(32));
        assert_eq!(
            tokens.redeem(&forged, now).await.unwrap_err(),
            TokenError::WrongSecret(t.id.clone())
        );
        assert!(matches!(
            tokens.redeem("0123456789abcdef.xyz", now).await,
            Err(TokenError::Unknown(_))
        ));
        assert_eq!(
            tokens.redeem("no-dot", now).await.unwrap_err(),
            TokenError::Malformed
        );
        assert!(matches!(
            tokens.revoke("0123456789abcdef", now).await,
            Err(TokenError::Unknown(_))
        ));
    }

    #[tokio::test]
    async fn creation_checks_its_arguments_and_prunes_long_expired_tokens() {
        let tokens = JoinTokens::new(memory_store(), "mesh.local");
        let now = SystemTime::now();
        let h = Duration::from_secs(3600);
        let err = |r: Result<CreatedToken, TokenError>| r.unwrap_err().to_string();
        assert!(
            err(tokens
                .create("spiffe://other/cluster/a", h, 1, None, now)
                .await)
            .contains("trust domain")
        );
        assert!(
            err(tokens
                .create("spiffe://mesh.local/nope", h, 1, None, now)
                .await)
            .contains("names no known identity")
        );
        assert!(err(tokens.create(AGENT, Duration::ZERO, 1, None, now).await).contains("--ttl"));
        assert!(err(tokens.create(AGENT, h, 0, None, now).await).contains("--uses 0"));
        assert!(
            err(tokens.create(AGENT, h, 1, Some("other".into()), now).await)
                .contains("does not match")
        );
        let old = tokens.create(AGENT, h, 1, None, now).await.unwrap();
        let much_later = now + h + KEEP_EXPIRED + Duration::from_secs(1);
        tokens.create(AGENT, h, 1, None, much_later).await.unwrap();
        assert!(matches!(
            tokens.check(&old.token, much_later).await,
            Err(TokenError::Unknown(_))
        ));
    }

    #[tokio::test]
    async fn concurrent_redemptions_of_the_last_use_let_one_through() {
        let tokens = JoinTokens::new(memory_store(), "mesh.local");
        let now = SystemTime::now();
        let t = tokens
            .create(AGENT, Duration::from_secs(60), 1, None, now)
            .await
            .unwrap();
        let a = tokens.check(&t.token, now).await.unwrap();
        let b = tokens.check(&t.token, now).await.unwrap();
        tokens.consume(&a).await.unwrap();
        assert!(matches!(
            tokens.consume(&b).await,
            Err(TokenError::Contended(_))
        ));
        assert!(matches!(
            tokens.redeem(&t.token, now).await,
            Err(TokenError::UsedUp { .. })
        ));
    }
}
