//! Revocation: of single tokens (by accessor) and of whole identities (the kill switch).
//!
//! Both live in the store, so every replica sees them. A revoked accessor is kept until
//! the token could no longer be valid anyway; a token whose parent accessor is revoked
//! (the token a bootstrap login issued) is refused with it.
//!
//! An identity revocation never compares clocks. Each identity (a role, a userpass user,
//! a client certificate, a SPIFFE ID) has a *generation*, 0 until it is first revoked;
//! every token carries the generations of its identities at the moment it was issued.
//! Revoking an identity increments its generation in one compare-and-swap, so from then
//! on every token issued before is refused on every replica, whatever their clocks say,
//! and logins are refused until an admin restores the identity. Restoring lifts the
//! login block but keeps the generation: old tokens stay dead. A login that read the old
//! generation just before a revocation issues a token with that old generation, which is
//! refused at its first use.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::{Store, decode_json, encode_json, scan_all};
use crate::unix_now;

/// An identity the kill switch can revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A role of any auth method (role names are one namespace).
    Role(String),
    /// A userpass user (normalized name).
    User(String),
    /// A client certificate by SHA-256 fingerprint (64 lower-case hex).
    Certificate(String),
    /// A SPIFFE ID (URI SAN of client certificates).
    Spiffe(String),
}

impl Identity {
    fn key(&self) -> String {
        match self {
            Identity::Role(r) => format!("auth/revoked-identity/role/{r}"),
            Identity::User(u) => format!("auth/revoked-identity/user/{u}"),
            Identity::Certificate(f) => format!("auth/revoked-identity/cert/{f}"),
            Identity::Spiffe(s) => {
                format!("auth/revoked-identity/spiffe/{}", hex::encode(s.as_bytes()))
            }
        }
    }

    /// The name of this kind of identity in a token's generations (`idg` claim).
    pub fn kind(&self) -> &'static str {
        match self {
            Identity::Role(_) => "role",
            Identity::User(_) => "user",
            Identity::Certificate(_) => "cert",
            Identity::Spiffe(_) => "spiffe",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Identity::Role(r) => format!("role {r}"),
            Identity::User(u) => format!("user {u}"),
            Identity::Certificate(f) => format!("certificate {f}"),
            Identity::Spiffe(s) => format!("SPIFFE ID {s}"),
        }
    }
}

fn first_generation() -> u64 {
    // Records written before generations existed meant "revoked once".
    1
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Revoked {
    #[serde(default = "first_generation")]
    generation: u64,
    /// When, by the revoking replica's clock: for people, never compared with anything.
    revoked_at: u64,
    by: String,
    /// Lifted by an admin: logins work again, but tokens of earlier generations stay
    /// revoked (restoring an identity never resurrects its old tokens).
    #[serde(default)]
    restored: bool,
}

/// The revocation state of one identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IdentityState {
    /// Tokens carrying an older generation are refused.
    pub generation: u64,
    /// Logins and direct requests are refused.
    pub blocks_logins: bool,
}

/// The generations of a token's identities, by [`Identity::kind`] (absent: 0).
pub use crate::token::Generations;

#[derive(Debug)]
pub struct Revocations {
    store: Arc<dyn Store>,
}

const ACCESSOR_PREFIX: &str = "auth/token/revoked/";
const IDENTITY_PREFIX: &str = "auth/revoked-identity/";

fn accessor_key(accessor: &str) -> String {
    format!("{ACCESSOR_PREFIX}{accessor}")
}

/// A revoked accessor's record (empty in records of before the revocation feed).
#[derive(Debug, Default, Serialize, Deserialize)]
struct RevokedToken {
    revoked_at: u64,
    until: u64,
}

impl Revocations {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Revocations { store }
    }

    /// Revoke the token(s) with this accessor, and those issued from it, until `until`
    /// (unix seconds) has passed.
    pub async fn revoke_accessor(&self, accessor: &str, until: u64) -> Result<()> {
        let now = unix_now();
        let ttl = Duration::from_secs(until.saturating_sub(now).saturating_add(60));
        let record = RevokedToken { revoked_at: now, until };
        self.store.insert_if_absent(&accessor_key(accessor), &encode_json(&record), Some(ttl)).await?;
        Ok(())
    }

    /// What was revoked at or after `since` and still matters: the feed of gateways that
    /// verify tokens offline (`GET /v1/auth/revocations`). Expired accessor records are
    /// gone from the store already; identity revocations are listed whatever their age
    /// when `since` is 0 (a token of any age carries its generations).
    pub async fn feed(&self, since: u64) -> Result<keyvault_api::auth::RevocationFeed> {
        let now = unix_now();
        let mut accessors = Vec::new();
        for (key, raw) in scan_all(self.store.as_ref(), ACCESSOR_PREFIX).await? {
            let Some(accessor) = key.strip_prefix(ACCESSOR_PREFIX) else { continue };
            // Records of before this feed existed are empty: time unknown, always listed.
            let r: RevokedToken = if raw.is_empty() { RevokedToken::default() } else { decode_json(&key, &raw)? };
            if r.revoked_at >= since || r.revoked_at == 0 {
                accessors.push(keyvault_api::auth::RevokedAccessor {
                    accessor: accessor.to_owned(),
                    revoked_at: r.revoked_at,
                    until: r.until,
                });
            }
        }
        let mut identities = Vec::new();
        for (key, raw) in scan_all(self.store.as_ref(), IDENTITY_PREFIX).await? {
            let Some((kind, id)) = key.strip_prefix(IDENTITY_PREFIX).and_then(|r| r.split_once('/')) else { continue };
            let r: Revoked = decode_json(&key, &raw)?;
            if r.revoked_at < since {
                continue;
            }
            let id = match kind {
                "spiffe" => String::from_utf8(hex::decode(id).unwrap_or_default()).unwrap_or_default(),
                _ => id.to_owned(),
            };
            identities.push(keyvault_api::auth::RevokedIdentity {
                kind: kind.to_owned(),
                id,
                generation: r.generation,
                revoked_at: r.revoked_at,
            });
        }
        Ok(keyvault_api::auth::RevocationFeed { now, accessors, identities })
    }

    pub async fn accessor_revoked(&self, accessor: &str) -> Result<bool> {
        Ok(self.store.get(&accessor_key(accessor)).await?.is_some())
    }

    /// The kill switch: one compare-and-swap, effective for every replica at once.
    /// Returns the identity's new generation.
    pub async fn revoke_identity(&self, identity: &Identity, by: &str) -> Result<u64> {
        let key = identity.key();
        loop {
            let raw = self.store.get(&key).await?;
            let generation = match &raw {
                Some(r) => decode_json::<Revoked>(&key, r)?.generation,
                None => 0,
            }
            .checked_add(1)
            .ok_or_else(|| Error::Internal("identity generation overflow".into()))?;
            let record = Revoked { generation, revoked_at: unix_now(), by: by.to_owned(), restored: false };
            if self.store.compare_and_swap(&key, raw.as_deref(), Some(&encode_json(&record))).await? {
                return Ok(generation);
            }
        }
    }

    /// Lift an identity revocation: logins work again; tokens of earlier generations stay
    /// revoked. Returns whether the identity was revoked.
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
            record.restored = true;
            if self.store.compare_and_swap(&key, Some(&raw), Some(&encode_json(&record))).await? {
                return Ok(true);
            }
        }
    }

    /// The revocation state of `identity` (generation 0 and no block if never revoked).
    pub async fn identity_state(&self, identity: &Identity) -> Result<IdentityState> {
        let key = identity.key();
        match self.store.get(&key).await? {
            Some(raw) => {
                let r: Revoked = decode_json(&key, &raw)?;
                Ok(IdentityState { generation: r.generation, blocks_logins: !r.restored })
            }
            None => Ok(IdentityState::default()),
        }
    }
}
