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
    Authenticator, LoginOutcome, LoginRequest, RoleAdmin, RoleStore, StoredRole, parse_body, parse_role_body,
    role_view, validate_name, vault_duration,
};
use crate::error::{AuthFailure, Error, Result};
use crate::keys::{KeyNames, SharedKeyring, keyed_hash};
use crate::store::{Store, decode_json, encode_json, scan_all};
use crate::unix_now;

pub const METHOD: &str = "approle";

/// AppRole's own role settings, as written (the token settings are common to every method).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    #[serde(default, with = "vault_duration", skip_serializing_if = "Option::is_none")]
    pub secret_id_ttl: Option<Duration>,
}

/// What is stored besides the token settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppRoleData {
    role_id: String,
    #[serde(default, with = "vault_duration")]
    secret_id_ttl: Option<Duration>,
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
        f.debug_struct("NewSecretId").field("accessor", &self.accessor).finish_non_exhaustive()
    }
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

fn role_id_key(role_id: &str) -> String {
    format!("auth/approle/role-id/{role_id}")
}
fn secret_id_prefix(name: &str) -> String {
    format!("auth/approle/secret-id/{name}/")
}

pub(crate) fn random_hex<const N: usize>() -> Result<String> {
    Ok(hex::encode(crate::barrier::random::<N>()?))
}

#[derive(Debug)]
pub struct AppRole {
    store: Arc<dyn Store>,
    roles: RoleStore<AppRoleData>,
    keys: Arc<dyn KeyStore>,
    names: KeyNames,
    keyring: SharedKeyring,
}

fn invalid() -> Error {
    Error::Unauthenticated(AuthFailure::InvalidCredentials)
}

impl AppRole {
    pub fn new(store: Arc<dyn Store>, keys: Arc<dyn KeyStore>, names: KeyNames, keyring: SharedKeyring) -> Self {
        AppRole { roles: RoleStore::new(store.clone(), METHOD), store, keys, names, keyring }
    }

    /// Create or update a role. A new role gets a random role id; an update keeps it.
    pub async fn write(&self, name: &str, config: RoleConfig, token: super::TokenSettings) -> Result<()> {
        let existing = self.roles.load(name).await?;
        let role_id = match &existing {
            Some(r) => r.config.role_id.clone(),
            None => uuid::Uuid::new_v4().to_string(),
        };
        self.roles
            .save(
                name,
                &StoredRole {
                    config: AppRoleData { role_id: role_id.clone(), secret_id_ttl: config.secret_id_ttl },
                    token,
                },
            )
            .await?;
        if existing.is_none() {
            self.store.put(&role_id_key(&role_id), name.as_bytes()).await?;
        }
        Ok(())
    }

    pub async fn role_id(&self, name: &str) -> Result<String> {
        Ok(self.roles.require(name).await?.config.role_id)
    }

    /// Keyed hash of a secret id, bound to its role, computed inside the token.
    async fn secret_id_hmac(&self, role: &str, secret_id: &SecretString) -> Result<[u8; 32]> {
        keyed_hash(
            &self.keys,
            &self.names,
            &self.keyring,
            "keyvault.approle.secret-id.v1",
            &[role.as_bytes(), secret_id.expose_secret().as_bytes()],
        )
        .await
    }

    /// Generate a secret id for a role: 256 random bits, returned once.
    pub async fn new_secret_id(&self, name: &str) -> Result<NewSecretId> {
        let role = self.roles.require(name).await?;
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
        let key = format!("{}{mac}", secret_id_prefix(name));
        if !self.store.insert_if_absent(&key, &encode_json(&entry), ttl).await? {
            return Err(Error::Internal("secret id collision".into()));
        }
        Ok(NewSecretId { secret_id, accessor, ttl })
    }
}

#[async_trait]
impl RoleAdmin for AppRole {
    fn method(&self) -> &'static str {
        METHOD
    }

    async fn write_role(&self, name: &str, body: &[u8]) -> Result<()> {
        let (config, token) = parse_role_body::<RoleConfig>(body)?;
        self.write(name, config, token).await
    }

    async fn read_role(&self, name: &str) -> Result<serde_json::Value> {
        let mut view = role_view(&self.roles.require(name).await?);
        // The role id is read through its own endpoint, as in Vault.
        if let Some(v) = view.as_object_mut() {
            v.remove("role_id");
        }
        Ok(view)
    }

    async fn delete_role(&self, name: &str) -> Result<()> {
        let role = self.roles.delete(name).await?;
        for (k, _) in scan_all(self.store.as_ref(), &secret_id_prefix(name)).await? {
            self.store.delete(&k).await?;
        }
        self.store.delete(&role_id_key(&role.config.role_id)).await?;
        Ok(())
    }

    async fn list_roles(&self) -> Result<Vec<String>> {
        self.roles.names().await
    }
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
                let role = self.roles.load(&name).await?.ok_or_else(invalid)?;
                (name, role)
            }
            (None, Some(role_id)) => {
                if role_id.len() > 128 {
                    return Err(invalid());
                }
                let name = self.store.get(&role_id_key(&role_id)).await?.ok_or_else(invalid)?;
                let name = String::from_utf8(name).map_err(|_| invalid())?;
                let role = self.roles.load(&name).await?.ok_or_else(invalid)?;
                if !bool::from(role.config.role_id.as_bytes().ct_eq(role_id.as_bytes())) {
                    return Err(invalid());
                }
                (name, role)
            }
            _ => {
                return Err(Error::invalid("give either role (short form) or role_id, and secret_id"));
            }
        };
        if body.secret_id.expose_secret().len() > 256 {
            return Err(invalid());
        }
        let mac = self.secret_id_hmac(&name, &body.secret_id).await?;
        let key = format!("{}{}", secret_id_prefix(&name), hex::encode(mac));
        let raw = self.store.get(&key).await?.ok_or_else(invalid)?;
        let stored: StoredSecretId = decode_json(&key, &raw)?;
        let stored_mac = hex::decode(&stored.hmac).map_err(|_| Error::Internal("stored secret id hmac".into()))?;
        if !bool::from(stored_mac.as_slice().ct_eq(&mac)) {
            return Err(invalid());
        }
        if stored.expires.is_some_and(|e| e <= unix_now()) {
            return Err(invalid());
        }
        Ok(LoginOutcome::for_role(METHOD, &name, &role.token))
    }
}
