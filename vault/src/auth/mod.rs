//! Authentication methods (docs/architecture.md, "Identity"). Each method is an
//! [`Engine`](crate::logical::Engine) in its own file, mounted under `auth/`; its login
//! route checks credentials and yields a [`LoginOutcome`], which the pipeline turns into a
//! signed token. What every method with roles shares is here: [`RoleStore`],
//! [`RoleAdmin`] and [`handle_role`].
//!
//! Role names are one namespace across methods (the short form `POST /v1/auth` with
//! `{"role": ...}` finds the method from the role), kept in `auth/roles/<name>`.

use std::collections::BTreeMap;
use std::time::Duration;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::logical::{Operation, Params, Reply, Request};
use crate::store::{Store, decode_json, encode_json, scan_all};

pub mod approle;
pub mod bootstrap;
pub mod cert;
pub mod kubernetes;
pub mod limiter;
pub mod revocation;
pub mod userpass;

/// What a successful login establishes.
#[derive(Debug, Clone)]
pub struct LoginOutcome {
    /// Token subject: `approle:<role>`, `userpass:<user>`, `cert:<role>`, ...
    pub sub: String,
    pub method: &'static str,
    pub role: Option<String>,
    pub policies: Vec<String>,
    /// Token TTL asked for by the role (the server's default when `None`).
    pub ttl: Option<Duration>,
    /// Ceiling for this role's tokens (the server's maximum applies as well).
    pub max_ttl: Option<Duration>,
    /// The role requires the token to be bound to the client certificate of the login.
    pub bind_certificate: bool,
    pub metadata: BTreeMap<String, String>,
    /// The userpass user who logged in (an identity of the kill switch).
    pub user: Option<String>,
    /// The accessor of the one-time credential used (a bootstrap token).
    pub parent: Option<String>,
}

impl LoginOutcome {
    /// The outcome of a login to role `name` of `method`.
    pub fn for_role(method: &'static str, name: &str, t: &TokenSettings) -> Self {
        LoginOutcome {
            sub: format!("{method}:{name}"),
            method,
            role: Some(name.to_owned()),
            policies: t.token_policies.clone(),
            ttl: t.token_ttl,
            max_ttl: t.token_max_ttl,
            bind_certificate: t.bind_certificate,
            metadata: [("role_name".to_owned(), name.to_owned())].into(),
            user: None,
            parent: None,
        }
    }
}

pub use keyvault_api::auth::{TOKEN_FIELDS, TokenSettings};
pub use keyvault_api::{policy_list, vault_duration};

/// The rule of every role's token settings.
pub fn validate_token_settings(t: &TokenSettings) -> Result<()> {
    if let (Some(ttl), Some(max)) = (t.token_ttl, t.token_max_ttl)
        && ttl > max
    {
        return Err(Error::invalid("token_ttl must not exceed token_max_ttl"));
    }
    Ok(())
}

/// The role a login body claims (`role`, `name` or `role_id`), for the rate limiter;
/// nothing is checked here, and a body that does not parse claims nothing.
pub fn claimed_role(body: &[u8]) -> Option<String> {
    #[derive(Deserialize, Default)]
    struct Hint {
        #[serde(default)]
        role: Option<String>,
        #[serde(default)]
        role_id: Option<String>,
        #[serde(default)]
        name: Option<String>,
    }
    let hint: Hint = serde_json::from_slice(body).unwrap_or_default();
    hint.role.or(hint.name).or(hint.role_id)
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
    pub async fn save(&self, name: &str, role: &StoredRole<T>, expected: Option<&[u8]>) -> Result<()> {
        validate_name("role", name)?;
        validate_token_settings(&role.token)?;
        claim_role_name(self.store.as_ref(), name, self.method).await?;
        if !self.store.compare_and_swap(&self.key(name), expected, Some(&encode_json(role))).await? {
            return Err(Error::Conflict(format!("{} role {name} changed concurrently; retry", self.method)));
        }
        Ok(())
    }

    /// Delete a role and release its name; returns what was stored.
    pub async fn delete(&self, name: &str) -> Result<StoredRole<T>> {
        let role = self.require(name).await?;
        self.store.delete(&self.key(name)).await?;
        release_role_name(self.store.as_ref(), name).await?;
        Ok(role)
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

/// Role administration, the same for every method with roles (`auth/<mount>/role/<name>`).
#[async_trait]
pub trait RoleAdmin: Send + Sync {
    /// The method's own role fields (besides [`TokenSettings`]).
    type Config: serde::de::DeserializeOwned + Send;
    /// The stored bytes of role `name`, if it exists (the existence check that decides
    /// between `create` and `update`, and what the write then expects to replace).
    async fn current(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// Create (`expected == None`) or update a role, if what is stored is still
    /// `expected`; 409 otherwise.
    async fn write_role(
        &self,
        name: &str,
        config: Self::Config,
        token: TokenSettings,
        expected: Option<&[u8]>,
    ) -> Result<()>;
    /// The role as `GET` shows it.
    async fn read_role(&self, name: &str) -> Result<Reply>;
    async fn delete_role(&self, name: &str) -> Result<()>;
    async fn list_roles(&self) -> Result<Vec<String>>;
}

/// A role as `GET` shows it: the token settings (in seconds) and the method's fields.
#[derive(Debug, Serialize)]
pub struct RoleView<'a, T: Serialize> {
    #[serde(flatten)]
    pub token: keyvault_api::auth::TokenSettingsView,
    #[serde(flatten)]
    pub config: &'a T,
}

impl<'a, T: Serialize> RoleView<'a, T> {
    pub fn of(role: &'a StoredRole<T>) -> Self {
        RoleView { token: (&role.token).into(), config: &role.config }
    }
}

/// Role names: the common name rule, checked before authorization.
pub fn role_name(_: Operation, p: &mut Params) -> Result<()> {
    validate_name("role", p.get("name").unwrap_or_default())
}

/// The routes of role administration, under `prefix/` (`role/`).
#[macro_export]
macro_rules! role_routes {
    ($prefix:literal, $policy:literal) => {
        [
            $crate::logical::Route::new(
                $prefix,
                "list roles",
                &[$crate::logical::OpSpec::list($crate::logical::Access::Needs($crate::policy::Capability::List))],
            )
            .policy($policy),
            $crate::logical::Route::new(
                concat!($prefix, "/{name}"),
                "create or update (`create` or `update`), read, delete a role",
                &[
                    $crate::logical::OpSpec::write($crate::logical::Access::CreateOrUpdate),
                    $crate::logical::OpSpec::read($crate::logical::Access::Needs($crate::policy::Capability::Read)),
                    $crate::logical::OpSpec::delete($crate::logical::Access::Needs($crate::policy::Capability::Delete)),
                ],
            )
            .policy(concat!($policy, "/{name}"))
            .normalize($crate::auth::role_name),
        ]
    };
}

/// Serve a role route: a write parses the body (method fields and token fields; unknown
/// fields are warnings) and checks that the policies it assigns are the caller's to give
/// ([`Caller::check_grant`](crate::logical::Caller::check_grant)).
pub async fn handle_role<R: RoleAdmin>(admin: &R, req: &mut Request) -> Result<Reply> {
    let name = req.param("name").to_owned();
    match req.operation {
        Operation::List => Reply::keys(admin.list_roles().await?),
        Operation::Read => admin.read_role(&name).await,
        Operation::Write => {
            let (config, token) = parse_role_body::<R::Config>(req)?;
            req.caller()?.check_grant(&token.token_policies)?;
            admin.write_role(&name, config, token, req.existing.as_deref()).await?;
            Ok(Reply::empty())
        }
        Operation::Delete => {
            admin.delete_role(&name).await?;
            Ok(Reply::empty())
        }
    }
}

fn role_index_key(name: &str) -> String {
    format!("auth/roles/{name}")
}

/// Claim `name` for `method` in the shared role namespace (idempotent for the same method).
pub async fn claim_role_name(store: &dyn Store, name: &str, method: &str) -> Result<()> {
    if store.insert_if_absent(&role_index_key(name), method.as_bytes(), None).await? {
        return Ok(());
    }
    match store.get(&role_index_key(name)).await? {
        Some(m) if m == method.as_bytes() => Ok(()),
        Some(_) => Err(Error::Conflict(format!("role name {name:?} is used by another auth method"))),
        // Deleted in between: try once more.
        None => {
            if store.insert_if_absent(&role_index_key(name), method.as_bytes(), None).await? {
                Ok(())
            } else {
                Err(Error::Conflict(format!("role name {name:?} is being created concurrently")))
            }
        }
    }
}

pub async fn release_role_name(store: &dyn Store, name: &str) -> Result<()> {
    store.delete(&role_index_key(name)).await?;
    Ok(())
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

/// Parse a role's body: the method's own fields into `T`, the common token fields into
/// [`TokenSettings`]; fields of neither are named in the reply's warnings.
pub fn parse_role_body<T: serde::de::DeserializeOwned>(req: &mut Request) -> Result<(T, TokenSettings)> {
    let mut own: serde_json::Map<String, serde_json::Value> = parse_body(&req.body)?;
    let mut token = serde_json::Map::new();
    for f in TOKEN_FIELDS {
        if let Some(v) = own.remove(f) {
            token.insert(f.to_owned(), v);
        }
    }
    let token: TokenSettings = serde_json::from_value(serde_json::Value::Object(token)).map_err(|e| json_error(&e))?;
    let own = serde_json::to_vec(&own).map_err(|e| Error::Internal(format!("JSON encoding: {e}")))?;
    let own: T = crate::logical::parse_data(&own, &mut req.warnings)?;
    validate_token_settings(&token)?;
    Ok((own, token))
}

/// Parse a JSON request body into `T`, with messages that never quote the input. A body
/// that repeats a key in any object is refused (see [`crate::json`]).
pub fn parse_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T> {
    crate::json::check_no_duplicate_keys(body).map_err(|e| json_error(&e))?;
    serde_json::from_slice(body).map_err(|e| json_error(&e))
}

/// A client-facing message for a JSON error. Unknown and missing fields are named (field
/// names are not secret, and the message is what the user needs); every other error is
/// reduced to its category, because serde_json quotes offending values, which may be
/// credentials.
pub fn json_error(e: &serde_json::Error) -> Error {
    let msg = e.to_string();
    let safe =
        msg.starts_with("unknown field") || msg.starts_with("missing field") || crate::json::is_duplicate_key_error(e);
    if safe {
        let msg = msg.split(" at line ").next().unwrap_or(&msg);
        Error::invalid(format!("invalid request body: {msg}"))
    } else if e.classify() == serde_json::error::Category::Data {
        Error::invalid("invalid request body: a field has the wrong type or value")
    } else {
        Error::invalid(format!("invalid request body: {}", crate::secrets::json_error_category(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("600").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("ten minutes").is_err());
    }

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
