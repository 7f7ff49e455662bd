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

use super::{LoginOutcome, TokenSettings};
use crate::engines::EngineKind;
use crate::error::{AuthFailure, Error, Result};
use crate::keys::{KeyNames, SharedKeyring, keyed_hash};
use crate::logical::{Access, Engine, EngineInfo, OpSpec, Reply, Request, Route};
use crate::policy::Capability;
use crate::store::{Store, decode_json, encode_json};

pub const METHOD: &str = "bootstrap";

pub const KIND: EngineKind = EngineKind {
    info: EngineInfo {
        name: METHOD,
        description: "one-time bootstrap tokens for units that have no credential yet",
        auth: true,
        routes: ROUTES,
    },
    fixed_at: None,
    once: true,
    takes_options: false,
    build: |core, _| {
        Ok(Arc::new(Bootstrap::new(core.store.clone(), core.keys.clone(), core.names.clone(), core.keyring.clone())))
    },
};

const ROUTES: &[Route] = &[
    Route::new(
        "token",
        "mint a one-time bootstrap token (shown once)",
        // Its login makes a token with no parent, which outlives the minter's own token
        // and its revocation: `sudo`, as for `auth/token/create-orphan`.
        &[OpSpec::write(Access::Sudo(Capability::Update))
            .body::<keyvault_api::auth::BootstrapMint>()
            .data::<keyvault_api::auth::BootstrapMinted>()],
    ),
    // The login consumes the bootstrap token.
    Route::new(
        "login",
        "exchange a bootstrap token for a token",
        &[OpSpec::write(Access::Login).intent_by_handler().body::<keyvault_api::auth::BootstrapLogin>()],
    ),
];
/// The longest a bootstrap token may wait to be used.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// `POST /v1/auth/bootstrap/token`.
pub use keyvault_api::auth::BootstrapMint as MintRequest;

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
impl Engine for Bootstrap {
    fn info(&self) -> &'static EngineInfo {
        &KIND.info
    }

    /// A digest of the token presented: one failing unit behind a NAT address does not
    /// lock the others out.
    async fn login_identity(&self, req: &Request) -> Option<String> {
        use sha2::Digest;
        #[derive(Deserialize)]
        struct TokenHint {
            #[serde(default)]
            token: Option<SecretString>,
        }
        let hint: TokenHint = serde_json::from_slice(&req.body).unwrap_or(TokenHint { token: None });
        hint.token.map(|t| hex::encode(sha2::Sha256::digest(t.expose_secret().as_bytes())))
    }

    /// Mint a one-time bootstrap token. Its policies must be the caller's to give.
    async fn handle(&self, req: &mut Request) -> Result<Reply> {
        let mint: MintRequest = req.data()?;
        req.caller()?.check_grant(&mint.policies)?;
        let m = self.mint(mint).await?;
        Reply::data(&keyvault_api::auth::BootstrapMinted {
            bootstrap_token: m.token.into(),
            accessor: m.accessor,
            ttl: m.ttl.as_secs(),
        })
    }

    async fn login(&self, req: &mut Request) -> Result<LoginOutcome> {
        let body: keyvault_api::auth::BootstrapLogin = req.data()?;
        let token = body.token.into_secret();
        let invalid = || Error::Unauthenticated(AuthFailure::InvalidCredentials);
        if token.expose_secret().len() > 256 {
            return Err(invalid());
        }
        let key = self.key_of(&token).await?;
        let raw = self.store.get(&key).await?.ok_or_else(invalid)?;
        // Consume: of concurrent attempts, only the one whose delete removed it wins.
        req.intent().await?;
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
            ..Default::default()
        };
        let mut outcome = LoginOutcome::for_role(METHOD, &name, &settings);
        // A bootstrap token is not a role: no role-wide kill switch applies to it.
        outcome.role = None;
        outcome.parent = Some(stored.accessor.clone());
        outcome.metadata.insert("bootstrap_accessor".into(), stored.accessor);
        Ok(outcome)
    }
}
