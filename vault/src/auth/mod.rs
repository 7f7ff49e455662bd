//! Identity (docs/architecture.md, "Identity"): what authentication needs below the
//! engines. The roles every method stores ([`RoleStore`], one role namespace across
//! methods), the login limiter, revocations and the kill switch's identities, certificate
//! matching (for cert logins and direct requests), user names. The auth methods
//! themselves are engines, one file each, in `engines/auth/`.
//!
//! Role names are one namespace across methods (the short form `POST /v1/auth` with
//! `{"role": ...}` finds the method from the role), kept in `auth/roles/<name>`.

use std::time::Duration;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::{Store, TxOp, TxOutcome, decode_json, encode_json, scan_all};

pub mod cert;
pub mod limiter;
pub mod revocation;
pub mod userpass;

pub use crate::logical::LoginOutcome;

pub use keyvault_api::auth::{TOKEN_FIELDS, TokenSettings};
pub use keyvault_api::{policy_list, vault_duration};

/// The rule of every role's token settings.
pub fn validate_token_settings(t: &TokenSettings) -> Result<()> {
    if let (Some(ttl), Some(max)) = (t.token_ttl, t.token_max_ttl)
        && ttl > max
    {
        return Err(Error::invalid("token_ttl must not exceed token_max_ttl"));
    }
    keyvault_api::auth::check_attributes(&t.token_attributes, &t.token_audiences).map_err(Error::invalid)
}

/// The fields a login body may name its role by, for the rate limiter; nothing is checked
/// here. Each method counts by the fields its login reads ([`LoginClaim::approle`], ...):
/// a field it ignores must not give the same guesses a fresh counter. Only string values
/// count (the body is read as any JSON object: a field of another type elsewhere in it
/// must not make the whole claim vanish); a body that is not a JSON object claims
/// nothing, and its login fails before any credential is looked at.
#[derive(Debug, Default)]
pub struct LoginClaim {
    role: Option<String>,
    role_id: Option<String>,
    name: Option<String>,
}

impl LoginClaim {
    pub fn parse(body: &[u8]) -> LoginClaim {
        let Ok(fields) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body) else {
            return LoginClaim::default();
        };
        let text = |k: &str| fields.get(k).and_then(serde_json::Value::as_str).map(str::to_owned);
        LoginClaim { role: text("role"), role_id: text("role_id"), name: text("name") }
    }

    /// AppRole: `role`, or `role_id` (a body with both is refused before any guess).
    pub fn approle_by(self) -> Option<ClaimedRole> {
        match (self.role, self.role_id) {
            (Some(name), _) => Some(ClaimedRole::Name(name)),
            (None, Some(id)) => Some(ClaimedRole::Id(id)),
            (None, None) => None,
        }
    }

    /// Kubernetes: `role`.
    pub fn role(self) -> Option<String> {
        self.role
    }

    /// Certificates: `name` (Vault's field), else `role` (the short form's), as the login
    /// reads them.
    pub fn cert(self) -> Option<String> {
        self.name.or(self.role)
    }
}

/// How an AppRole login names its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimedRole {
    Name(String),
    Id(String),
}

pub use crate::validate_name;

/// A role as stored: the method's own settings and the common token settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredRole<T> {
    pub config: T,
    pub token: TokenSettings,
}

/// The roles of one method, under `auth/<method>/role/<name>`.
#[derive(Debug)]
pub struct RoleStore<T> {
    store: Arc<dyn Store>,
    method: &'static str,
    _config: std::marker::PhantomData<fn() -> T>,
}

impl<T: Serialize + serde::de::DeserializeOwned> RoleStore<T> {
    pub fn new(store: Arc<dyn Store>, method: &'static str) -> Self {
        RoleStore { store, method, _config: std::marker::PhantomData }
    }

    fn prefix(&self) -> String {
        format!("auth/{}/role/", self.method)
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix())
    }

    pub async fn load(&self, name: &str) -> Result<Option<StoredRole<T>>> {
        Ok(self.load_raw(name).await?.map(|(_, r)| r))
    }

    /// The role and its stored bytes (what a later [`RoleStore::save`] expects to replace).
    pub async fn load_raw(&self, name: &str) -> Result<Option<(Vec<u8>, StoredRole<T>)>> {
        validate_name("role", name)?;
        let key = self.key(name);
        match self.store.get(&key).await? {
            Some(raw) => {
                let role = decode_json(&key, &raw)?;
                Ok(Some((raw, role)))
            }
            None => Ok(None),
        }
    }

    pub async fn require(&self, name: &str) -> Result<StoredRole<T>> {
        self.load(name).await?.ok_or_else(|| Error::NotFound(format!("no {} role {name}", self.method)))
    }

    /// Create or replace a role (claiming its name in the shared role namespace), if what
    /// is stored is still `expected` (`None`: the role must not exist). Of concurrent
    /// writers exactly one wins; the others get 409 and change nothing.
    ///
    /// The role and its name in the namespace are written in one transaction (and
    /// [`RoleStore::delete`] removes both in one): a delete racing a save can never leave
    /// a role whose name another method may then take.
    pub async fn save(&self, name: &str, role: &StoredRole<T>, expected: Option<&[u8]>) -> Result<()> {
        validate_name("role", name)?;
        validate_token_settings(&role.token)?;
        let index = role_index_key(name);
        let method = self.method.as_bytes().to_vec();
        let claim = match self.store.get(&index).await? {
            None => TxOp::Insert { key: index, value: method },
            Some(m) if m == method => TxOp::Swap { key: index, expected: m, new: Some(method) },
            Some(_) => return Err(Error::Conflict(format!("role name {name:?} is used by another auth method"))),
        };
        let value = encode_json(role);
        let write = match expected {
            None => TxOp::Insert { key: self.key(name), value },
            Some(old) => TxOp::Swap { key: self.key(name), expected: old.to_vec(), new: Some(value) },
        };
        match self.store.transact(vec![claim, write]).await? {
            TxOutcome::Committed => Ok(()),
            _ => Err(Error::Conflict(format!("{} role {name} changed concurrently; retry", self.method))),
        }
    }

    /// Delete a role and release its name (in one transaction); returns what was stored.
    pub async fn delete(&self, name: &str) -> Result<StoredRole<T>> {
        let (raw, role) =
            self.load_raw(name).await?.ok_or_else(|| Error::NotFound(format!("no {} role {name}", self.method)))?;
        self.delete_exact(name, raw).await?;
        Ok(role)
    }

    /// Delete a role and release its name if what is stored is still `raw`; 409 if it
    /// changed.
    pub async fn delete_exact(&self, name: &str, raw: Vec<u8>) -> Result<()> {
        let index = role_index_key(name);
        // The name first, then the role: the order `save` takes them in (PostgreSQL locks
        // rows in the order a transaction writes them; two orders could deadlock).
        let mut ops = Vec::with_capacity(2);
        if let Some(m) = self.store.get(&index).await?
            && m == self.method.as_bytes()
        {
            ops.push(TxOp::Swap { key: index, expected: m, new: None });
        }
        ops.push(TxOp::Swap { key: self.key(name), expected: raw, new: None });
        match self.store.transact(ops).await? {
            TxOutcome::Committed => Ok(()),
            _ => Err(Error::Conflict(format!("{} role {name} changed concurrently; retry", self.method))),
        }
    }

    pub async fn all(&self) -> Result<Vec<(String, StoredRole<T>)>> {
        Ok(self.all_raw().await?.into_iter().map(|(name, _, role)| (name, role)).collect())
    }

    /// Every role with its stored bytes.
    pub async fn all_raw(&self) -> Result<Vec<(String, Vec<u8>, StoredRole<T>)>> {
        let prefix = self.prefix();
        let mut out = Vec::new();
        for (k, raw) in scan_all(self.store.as_ref(), &prefix).await? {
            let role = decode_json(&k, &raw)?;
            out.push((k[prefix.len()..].to_owned(), raw, role));
        }
        Ok(out)
    }

    pub async fn names(&self) -> Result<Vec<String>> {
        let prefix = self.prefix();
        let names = crate::store::list_names(self.store.as_ref(), &prefix).await?;
        if names.is_empty() {
            return Err(Error::NotFound(format!("no {} roles", self.method)));
        }
        Ok(names)
    }
}

fn role_index_key(name: &str) -> String {
    format!("auth/roles/{name}")
}

/// The method that owns role `name`, if any.
pub async fn role_method(store: &dyn Store, name: &str) -> Result<Option<String>> {
    Ok(store.get(&role_index_key(name)).await?.and_then(|m| String::from_utf8(m).ok()))
}

/// Parse a Vault-style duration: seconds as a number, or a string such as `"90s"`, `"10m"`,
/// `"1h"` (also plain digits as a string).
pub fn parse_duration(s: &str) -> Result<Duration> {
    keyvault_api::parse_duration(s).map_err(Error::invalid)
}

pub use crate::json::{json_error, parse_body};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_errors_name_fields_not_values() {
        #[derive(Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct T {
            a: u32,
        }
        let e = parse_body::<T>(br#"{"a": "s3cret"}"#).unwrap_err().to_string();
        assert!(!e.contains("s3cret"), "{e}");
        let e = parse_body::<T>(br#"{"b": 1}"#).unwrap_err().to_string();
        assert!(e.contains("unknown field `b`"), "{e}");
    }
}
