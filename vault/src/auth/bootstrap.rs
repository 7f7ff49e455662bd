//! One-time bootstrap tokens: an admin mints one for a VM or a compose unit that has no
//! other credential yet; its first login consumes it (an atomic delete in the store, so
//! of two concurrent attempts exactly one wins, on any replica) and yields an ordinary
//! short-lived token. Stored only as a keyed hash computed in the HSM, with its TTL.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keyvault_hsm::KeyStore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{Authenticator, LoginOutcome, LoginRequest, TokenSettings, parse_body, policy_list, vault_duration};
use crate::error::{AuthFailure, Error, Result};
use crate::keys::{KeyNames, SharedKeyring, keyed_hash};
use crate::store::{Store, decode_json, encode_json};

pub const METHOD: &str = "bootstrap";
/// The longest a bootstrap token may wait to be used.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// `POST /v1/auth/bootstrap/token`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MintRequest {
    /// Policies of the token the bootstrap token will be exchanged for.
    #[serde(default, with = "policy_list")]
    pub policies: Vec<String>,
    /// How long the bootstrap token may wait to be used (default 15 minutes, at most 24 h).
    #[serde(default, with = "vault_duration")]
    pub ttl: Option<Duration>,
    /// TTL of the token it is exchanged for.
    #[serde(default, with = "vault_duration")]
    pub token_ttl: Option<Duration>,
    /// A name for audit and token metadata (e.g. the VM's host name).
    #[serde(default)]
    pub display_name: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    policies: Vec<String>,
    token_ttl: Option<u64>,
    display_name: Option<String>,
    accessor: String,
}

/// A freshly minted bootstrap token, shown once.
pub struct Minted {
    pub token: SecretString,
    pub accessor: String,
    pub ttl: Duration,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted").field("accessor", &self.accessor).finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    token: SecretString,
}

#[derive(Debug)]
pub struct Bootstrap {
    store: Arc<dyn Store>,
    keys: Arc<dyn KeyStore>,
    names: KeyNames,
    keyring: SharedKeyring,
}

impl Bootstrap {
    /// Destroy the unused bootstrap tokens with this accessor (the kill switch); returns
    /// how many there were.
    pub async fn revoke_accessor(&self, accessor: &str) -> Result<usize> {
        let mut n = 0;
        for (key, raw) in crate::store::scan_all(self.store.as_ref(), "auth/bootstrap/").await? {
            let stored: Stored = decode_json(&key, &raw)?;
            if stored.accessor == accessor && self.store.compare_and_swap(&key, Some(&raw), None).await? {
                n += 1;
            }
        }
        Ok(n)
    }

    pub fn new(store: Arc<dyn Store>, keys: Arc<dyn KeyStore>, names: KeyNames, keyring: SharedKeyring) -> Self {
        Bootstrap { store, keys, names, keyring }
    }

    async fn key_of(&self, token: &SecretString) -> Result<String> {
        let mac = keyed_hash(
            &self.keys,
            &self.names,
            &self.keyring,
            "keyvault.bootstrap.v1",
            &[token.expose_secret().as_bytes()],
        )
        .await?;
        Ok(format!("auth/bootstrap/{}", hex::encode(mac)))
    }

    pub async fn mint(&self, req: MintRequest) -> Result<Minted> {
        let ttl = req.ttl.unwrap_or(Duration::from_secs(900));
        if ttl > MAX_TTL {
            return Err(Error::invalid("a bootstrap token lives at most 24h"));
        }
        if let Some(n) = &req.display_name {
            crate::validate_name("display", n)?;
        }
        let token = SecretString::from(format!("kvb.{}", super::approle::random_hex::<32>()?));
        let accessor = super::approle::random_hex::<16>()?;
        let stored = Stored {
            policies: req.policies,
            token_ttl: req.token_ttl.map(|d| d.as_secs()),
            display_name: req.display_name,
            accessor: accessor.clone(),
        };
        let key = self.key_of(&token).await?;
        if !self.store.insert_if_absent(&key, &encode_json(&stored), Some(ttl)).await? {
            return Err(Error::Internal("bootstrap token collision".into()));
        }
        Ok(Minted { token, accessor, ttl })
    }
}

#[async_trait]
impl Authenticator for Bootstrap {
    fn method(&self) -> &'static str {
        METHOD
    }

    async fn login(&self, req: LoginRequest<'_>) -> Result<LoginOutcome> {
        let body: LoginBody = parse_body(req.body)?;
        let invalid = || Error::Unauthenticated(AuthFailure::InvalidCredentials);
        if body.token.expose_secret().len() > 256 {
            return Err(invalid());
        }
        let key = self.key_of(&body.token).await?;
        let raw = self.store.get(&key).await?.ok_or_else(invalid)?;
        // Consume: of concurrent attempts, only the one whose delete removed it wins.
        if !self.store.delete(&key).await? {
            return Err(invalid());
        }
        let stored: Stored = decode_json(&key, &raw)?;
        let name = stored.display_name.clone().unwrap_or_else(|| stored.accessor.clone());
        let settings = TokenSettings {
            token_policies: stored.policies,
            token_ttl: stored.token_ttl.map(Duration::from_secs),
            token_max_ttl: None,
            bind_certificate: false,
        };
        let mut outcome = LoginOutcome::for_role(METHOD, &name, &settings);
        // A bootstrap token is not a role: no role-wide kill switch applies to it.
        outcome.role = None;
        outcome.parent = Some(stored.accessor.clone());
        outcome.metadata.insert("bootstrap_accessor".into(), stored.accessor);
        Ok(outcome)
    }
}
