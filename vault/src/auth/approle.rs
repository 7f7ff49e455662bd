//! AppRole: machine login with a role id and a secret id (Vault's shapes).
//!
//! Secret ids are 256 random bits. They are stored only as HMAC-SHA256 computed inside the
//! token (key `approle-hmac`), bound to the role name, and compared in constant time. A
//! keyed hash is the right tool here: the secret is high-entropy, so a slow password hash
//! would add nothing but a denial-of-service lever on login.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keyvault_hsm::KeyStore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::{
    Authenticator, LoginOutcome, LoginRequest, parse_body, policy_list, validate_name,
    vault_duration,
};
use crate::error::{AuthFailure, Error, Result};
use crate::hsm_call;
use crate::keys::{KeyNames, SharedKeyring};
use crate::store::{Store, decode_json, encode_json, get_json, scan_all};
use crate::unix_now;

pub const METHOD: &str = "approle";

/// A role's configuration, as written by `POST /v1/auth/approle/role/<name>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    #[serde(default, with = "policy_list")]
    pub token_policies: Vec<String>,
    #[serde(
        default,
        with = "vault_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub token_ttl: Option<Duration>,
    #[serde(
        default,
        with = "vault_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub token_max_ttl: Option<Duration>,
    #[serde(
        default,
        with = "vault_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub secret_id_ttl: Option<Duration>,
}

/// What is stored for a role.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredRole {
    role_id: String,
    config: RoleConfig,
}

/// What is stored for a secret id (under a key derived from its HMAC).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredSecretId {
    hmac: String,
    accessor: String,
    created: u64,
    expires: Option<u64>,
}

/// A freshly generated secret id: shown once, never stored.
pub struct NewSecretId {
    pub secret_id: SecretString,
    pub accessor: String,
    pub ttl: Option<Duration>,
}

impl std::fmt::Debug for NewSecretId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSecretId")
            .field("accessor", &self.accessor)
            .finish_non_exhaustive()
    }
}

/// Role as `GET .../role/<name>` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RoleView {
    pub token_policies: Vec<String>,
    pub token_ttl: u64,
    pub token_max_ttl: u64,
    pub secret_id_ttl: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    role_id: Option<String>,
    secret_id: SecretString,
}

fn role_key(name: &str) -> String {
    format!("auth/approle/role/{name}")
}
fn role_id_key(role_id: &str) -> String {
    format!("auth/approle/role-id/{role_id}")
}
fn secret_id_prefix(name: &str) -> String {
    format!("auth/approle/secret-id/{name}/")
}

#[derive(Debug)]
pub struct AppRole {
    store: Arc<dyn Store>,
    keys: Arc<dyn KeyStore>,
    names: KeyNames,
    keyring: SharedKeyring,
}

fn random_hex<const N: usize>() -> Result<String> {
    Ok(hex::encode(crate::barrier::random::<N>()?))
}

impl AppRole {
    pub fn new(
        store: Arc<dyn Store>,
        keys: Arc<dyn KeyStore>,
        names: KeyNames,
        keyring: SharedKeyring,
    ) -> Self {
        AppRole {
            store,
            keys,
            names,
            keyring,
        }
    }

    async fn load(&self, name: &str) -> Result<Option<StoredRole>> {
        Ok(get_json(self.store.as_ref(), &role_key(name)).await?)
    }

    /// Create or update a role. A new role gets a random role id.
    pub async fn write_role(&self, name: &str, config: RoleConfig) -> Result<()> {
        validate_name("role", name)?;
        if let (Some(ttl), Some(max)) = (config.token_ttl, config.token_max_ttl)
            && ttl > max
        {
            return Err(Error::invalid("token_ttl must not exceed token_max_ttl"));
        }
        super::claim_role_name(self.store.as_ref(), name, METHOD).await?;
        let existing = self.load(name).await?;
        let role_id = match &existing {
            Some(r) => r.role_id.clone(),
            None => uuid::Uuid::new_v4().to_string(),
        };
        let raw = encode_json(&StoredRole {
            role_id: role_id.clone(),
            config,
        });
        if existing.is_none() {
            self.store
                .put(&role_id_key(&role_id), name.as_bytes())
                .await?;
        }
        self.store.put(&role_key(name), &raw).await?;
        Ok(())
    }

    pub async fn read_role(&self, name: &str) -> Result<RoleView> {
        validate_name("role", name)?;
        let r = self
            .load(name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no role {name}")))?;
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs()).unwrap_or(0);
        Ok(RoleView {
            token_policies: r.config.token_policies,
            token_ttl: secs(r.config.token_ttl),
            token_max_ttl: secs(r.config.token_max_ttl),
            secret_id_ttl: secs(r.config.secret_id_ttl),
        })
    }

    pub async fn delete_role(&self, name: &str) -> Result<()> {
        validate_name("role", name)?;
        let r = self
            .load(name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no role {name}")))?;
        for (k, _) in scan_all(self.store.as_ref(), &secret_id_prefix(name)).await? {
            self.store.delete(&k).await?;
        }
        self.store.delete(&role_key(name)).await?;
        self.store.delete(&role_id_key(&r.role_id)).await?;
        super::release_role_name(self.store.as_ref(), name).await
    }

    pub async fn list_roles(&self) -> Result<Vec<String>> {
        let prefix = "auth/approle/role/";
        let names: Vec<String> = scan_all(self.store.as_ref(), prefix)
            .await?
            .into_iter()
            .map(|(k, _)| k[prefix.len()..].to_owned())
            .collect();
        if names.is_empty() {
            return Err(Error::NotFound("no roles".into()));
        }
        Ok(names)
    }

    pub async fn role_id(&self, name: &str) -> Result<String> {
        validate_name("role", name)?;
        Ok(self
            .load(name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no role {name}")))?
            .role_id)
    }

    /// Keyed hash of a secret id, bound to its role, computed inside the token.
    async fn secret_id_hmac(&self, role: &str, secret_id: &SecretString) -> Result<[u8; 32]> {
        let mut msg = zeroize::Zeroizing::new(Vec::with_capacity(role.len() + 96));
        msg.extend_from_slice(b"keyvault.approle.secret-id.v1\0");
        msg.extend_from_slice(role.as_bytes());
        msg.push(0);
        msg.extend_from_slice(secret_id.expose_secret().as_bytes());
        let label = self
            .names
            .approle_hmac(self.keyring.load().approle_hmac.active);
        hsm_call(&self.keys, move |k| k.hmac_sha256(&label, &msg)).await
    }

    /// Generate a secret id for a role: 256 random bits, returned once.
    pub async fn new_secret_id(&self, name: &str) -> Result<NewSecretId> {
        validate_name("role", name)?;
        let role = self
            .load(name)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no role {name}")))?;
        let secret_id = SecretString::from(random_hex::<32>()?);
        let accessor = random_hex::<16>()?;
        let mac = hex::encode(self.secret_id_hmac(name, &secret_id).await?);
        let ttl = role.config.secret_id_ttl;
        let entry = StoredSecretId {
            hmac: mac.clone(),
            accessor: accessor.clone(),
            created: unix_now(),
            expires: ttl.map(|t| unix_now() + t.as_secs()),
        };
        let raw = encode_json(&entry);
        let key = format!("{}{mac}", secret_id_prefix(name));
        if !self.store.insert_if_absent(&key, &raw, ttl).await? {
            return Err(Error::Internal("secret id collision".into()));
        }
        Ok(NewSecretId {
            secret_id,
            accessor,
            ttl,
        })
    }
}

fn invalid() -> Error {
    Error::Unauthenticated(AuthFailure::InvalidCredentials)
}

#[async_trait]
impl Authenticator for AppRole {
    fn method(&self) -> &'static str {
        METHOD
    }

    async fn login(&self, req: LoginRequest<'_>) -> Result<LoginOutcome> {
        let body: LoginBody = parse_body(req.body)?;
        let (name, role) = match (body.role, body.role_id) {
            (Some(name), None) => {
                validate_name("role", &name)?;
                let role = self.load(&name).await?.ok_or_else(invalid)?;
                (name, role)
            }
            (None, Some(role_id)) => {
                if role_id.len() > 128 {
                    return Err(invalid());
                }
                let name = self
                    .store
                    .get(&role_id_key(&role_id))
                    .await?
                    .ok_or_else(invalid)?;
                let name = String::from_utf8(name).map_err(|_| invalid())?;
                let role = self.load(&name).await?.ok_or_else(invalid)?;
                if !bool::from(role.role_id.as_bytes().ct_eq(role_id.as_bytes())) {
                    return Err(invalid());
                }
                (name, role)
            }
            _ => {
                return Err(Error::invalid(
                    "give either role (short form) or role_id, and secret_id",
                ));
            }
        };
        if body.secret_id.expose_secret().len() > 256 {
            return Err(invalid());
        }
        let mac = self.secret_id_hmac(&name, &body.secret_id).await?;
        let key = format!("{}{}", secret_id_prefix(&name), hex::encode(mac));
        let raw = self.store.get(&key).await?.ok_or_else(invalid)?;
        let stored: StoredSecretId = decode_json(&key, &raw)?;
        let stored_mac = hex::decode(&stored.hmac)
            .map_err(|_| Error::Internal("stored secret id hmac".into()))?;
        if !bool::from(stored_mac.as_slice().ct_eq(&mac)) {
            return Err(invalid());
        }
        if stored.expires.is_some_and(|e| e <= unix_now()) {
            return Err(invalid());
        }
        Ok(LoginOutcome {
            sub: format!("approle:{name}"),
            method: METHOD,
            role: Some(name.clone()),
            policies: role.config.token_policies,
            ttl: role.config.token_ttl,
            max_ttl: role.config.token_max_ttl,
            metadata: [("role_name".to_owned(), name)].into(),
        })
    }
}
