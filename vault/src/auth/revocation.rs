//! Revocation: of single tokens (by accessor) and of whole identities (the kill switch).
//!
//! Both live in the store, so every replica sees them. A revoked accessor is kept until
//! the token could no longer be valid anyway. An identity revocation is one record, written
//! in one atomic step: from then on every token of that identity issued before it is
//! refused, and no login or direct request of that identity succeeds, until an admin
//! restores it.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::store::{Store, decode_json, encode_json};
use crate::unix_now;

/// An identity the kill switch can revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A role of any auth method (role names are one namespace).
    Role(String),
    /// A client certificate by SHA-256 fingerprint (64 lower-case hex).
    Certificate(String),
    /// A SPIFFE ID (URI SAN of client certificates).
    Spiffe(String),
}

impl Identity {
    fn key(&self) -> String {
        match self {
            Identity::Role(r) => format!("auth/revoked-identity/role/{r}"),
            Identity::Certificate(f) => format!("auth/revoked-identity/cert/{f}"),
            Identity::Spiffe(s) => {
                format!("auth/revoked-identity/spiffe/{}", hex::encode(s.as_bytes()))
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Identity::Role(r) => format!("role {r}"),
            Identity::Certificate(f) => format!("certificate {f}"),
            Identity::Spiffe(s) => format!("SPIFFE ID {s}"),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Revoked {
    revoked_at: u64,
    by: String,
    /// Lifted by an admin: logins work again, but tokens issued before `revoked_at` stay
    /// revoked (restoring an identity never resurrects its old tokens).
    #[serde(default)]
    restored: bool,
}

#[derive(Debug)]
pub struct Revocations {
    store: Arc<dyn Store>,
}

fn accessor_key(accessor: &str) -> String {
    format!("auth/token/revoked/{accessor}")
}

impl Revocations {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Revocations { store }
    }

    /// Revoke the token(s) with this accessor until `until` (unix seconds) has passed.
    pub async fn revoke_accessor(&self, accessor: &str, until: u64) -> Result<()> {
        let ttl = Duration::from_secs(until.saturating_sub(unix_now()) + 60);
        self.store.insert_if_absent(&accessor_key(accessor), b"", Some(ttl)).await?;
        Ok(())
    }

    pub async fn accessor_revoked(&self, accessor: &str) -> Result<bool> {
        Ok(self.store.get(&accessor_key(accessor)).await?.is_some())
    }

    /// The kill switch: one record, effective for every replica at once.
    pub async fn revoke_identity(&self, identity: &Identity, by: &str) -> Result<u64> {
        let revoked_at = unix_now();
        self.store
            .put(&identity.key(), &encode_json(&Revoked { revoked_at, by: by.to_owned(), restored: false }))
            .await?;
        Ok(revoked_at)
    }

    /// Lift an identity revocation: logins work again; tokens issued before the revocation
    /// stay revoked. Returns whether the identity was revoked.
    pub async fn restore_identity(&self, identity: &Identity) -> Result<bool> {
        let key = identity.key();
        loop {
            let Some(raw) = self.store.get(&key).await? else {
                return Ok(false);
            };
            let mut record: Revoked = decode_json(&key, &raw)?;
            if record.restored {
                return Ok(false);
            }
            // Tokens are stamped in whole seconds and those issued at or before
            // `revoked_at` stay refused: let that second pass, so that tokens of logins
            // after the restore are never caught by it.
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            if now.as_secs() <= record.revoked_at {
                let wait = Duration::from_secs(record.revoked_at + 1).saturating_sub(now);
                tokio::time::sleep(wait).await;
            }
            record.restored = true;
            if self.store.compare_and_swap(&key, Some(&raw), Some(&encode_json(&record))).await? {
                return Ok(true);
            }
        }
    }

    /// The revocation of `identity`, if any: when, and whether it still blocks logins.
    pub async fn identity_revocation(&self, identity: &Identity) -> Result<Option<(u64, bool)>> {
        let key = identity.key();
        match self.store.get(&key).await? {
            Some(raw) => {
                let r: Revoked = decode_json(&key, &raw)?;
                Ok(Some((r.revoked_at, !r.restored)))
            }
            None => Ok(None),
        }
    }
}
