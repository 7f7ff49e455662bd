//! Authentication methods (DESIGN §7). Each method is an [`Authenticator`]; a successful
//! login yields a [`LoginOutcome`], which `vault` turns into a signed token.
//!
//! Role names are one namespace across methods (the short form `POST /v1/auth` with
//! `{"role": ...}` finds the method from the role), kept in `auth/roles/<name>`.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};
use crate::store::{Store, decode_json, encode_json, scan_all};
use crate::tls::ClientCert;
use std::sync::Arc;

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

/// The token settings every role carries (Vault's names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    #[serde(default, with = "policy_list")]
    pub token_policies: Vec<String>,
    #[serde(default, with = "vault_duration", skip_serializing_if = "Option::is_none")]
    pub token_ttl: Option<Duration>,
    #[serde(default, with = "vault_duration", skip_serializing_if = "Option::is_none")]
    pub token_max_ttl: Option<Duration>,
    /// Tokens of this role must be bound to a client certificate (RFC 8705): a login
    /// without one is refused.
    #[serde(default)]
    pub bind_certificate: bool,
}

impl TokenSettings {
    pub fn validate(&self) -> Result<()> {
        if let (Some(ttl), Some(max)) = (self.token_ttl, self.token_max_ttl)
            && ttl > max
        {
            return Err(Error::invalid("token_ttl must not exceed token_max_ttl"));
        }
        Ok(())
    }

    /// How `GET` of a role shows them.
    pub fn view(&self) -> serde_json::Value {
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs()).unwrap_or(0);
        serde_json::json!({
            "token_policies": self.token_policies,
            "token_ttl": secs(self.token_ttl),
            "token_max_ttl": secs(self.token_max_ttl),
            "bind_certificate": self.bind_certificate,
        })
    }
}

/// A login request as the HTTP layer hands it over. `body` holds credentials: it is
/// zeroized by the caller after the call.
#[derive(Debug, Clone, Copy)]
pub struct LoginRequest<'a> {
    /// A name from the URL (the user of `/v1/auth/userpass/login/<user>`).
    pub name: Option<&'a str>,
    pub body: &'a [u8],
    /// The verified client certificate of the connection, if any.
    pub client_cert: Option<&'a ClientCert>,
}

#[async_trait]
pub trait Authenticator: Send + Sync + std::fmt::Debug {
    /// The method's mount name: `approle`, `userpass`.
    fn method(&self) -> &'static str;

    /// Check the credentials. Any wrong or unknown credential is
    /// `Error::Unauthenticated(AuthFailure::InvalidCredentials)`: the caller must not
    /// learn whether a role exists.
    async fn login(&self, req: LoginRequest<'_>) -> Result<LoginOutcome>;
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
        role.token.validate()?;
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

/// Role administration, the same for every method with roles (`/v1/auth/<method>/role/<name>`).
#[async_trait]
pub trait RoleAdmin: Send + Sync + std::fmt::Debug {
    fn method(&self) -> &'static str;
    /// The stored bytes of role `name`, if it exists (the existence check that decides
    /// between `create` and `update`, and what the write then expects to replace).
    async fn current(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// Create (`expected == None`) or update a role from a request body (method fields and
    /// token fields), if what is stored is still `expected`; 409 otherwise.
    async fn write_role(&self, name: &str, body: &[u8], expected: Option<&[u8]>) -> Result<()>;
    async fn read_role(&self, name: &str) -> Result<serde_json::Value>;
    async fn delete_role(&self, name: &str) -> Result<()>;
    async fn list_roles(&self) -> Result<Vec<String>>;
}

/// Merge a method's own role view with its token settings' view.
pub fn role_view<T: Serialize>(role: &StoredRole<T>) -> serde_json::Value {
    let mut view = role.token.view();
    if let (Some(v), Ok(serde_json::Value::Object(own))) = (view.as_object_mut(), serde_json::to_value(&role.config)) {
        v.extend(own);
    }
    view
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
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s)
        .map_err(|_| Error::invalid(format!("invalid duration {s:?} (use e.g. 600, \"90s\", \"10m\", \"1h\")")))
}

/// Serde adapter for optional Vault-style durations (number of seconds, or a string).
pub mod vault_duration {
    use super::*;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Duration>, D::Error> {
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(Raw::Secs(0)) => Ok(None),
            Some(Raw::Secs(s)) => Ok(Some(Duration::from_secs(s))),
            Some(Raw::Text(t)) => match super::parse_duration(&t).map_err(serde::de::Error::custom)? {
                d if d.is_zero() => Ok(None),
                d => Ok(Some(d)),
            },
        }
    }

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_u64(d.map(|d| d.as_secs()).unwrap_or(0))
    }
}

/// Policies as Vault accepts them: a list, or one comma-separated string.
pub mod policy_list {
    use super::*;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
        // Vault's rule: policy names are case-insensitive (kept in lower case) and the
        // surrounding spaces of a comma-separated list are not part of them.
        let list: Vec<String> = match Option::<Raw>::deserialize(d)? {
            None => Vec::new(),
            Some(Raw::List(l)) => l.into_iter().map(|p| p.trim().to_ascii_lowercase()).collect(),
            Some(Raw::Text(t)) => {
                t.split(',').map(|p| p.trim().to_ascii_lowercase()).filter(|p| !p.is_empty()).collect()
            }
        };
        for p in &list {
            crate::policy::validate_name(p).map_err(serde::de::Error::custom)?;
        }
        Ok(list)
    }

    pub fn serialize<S: serde::Serializer>(l: &[String], s: S) -> std::result::Result<S::Ok, S::Error> {
        l.serialize(s)
    }
}

/// The policies a role body asks for (`token_policies`), for the grant check before the
/// write (the body is parsed in full, and refused if malformed, by the method).
pub fn requested_policies(body: &[u8]) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Only {
        #[serde(default, with = "policy_list")]
        token_policies: Vec<String>,
    }
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { body };
    let mut map: serde_json::Map<String, serde_json::Value> = parse_body(body)?;
    let only = serde_json::Map::from_iter(map.remove("token_policies").map(|v| ("token_policies".to_owned(), v)));
    let only: Only = serde_json::from_value(serde_json::Value::Object(only)).map_err(|e| json_error(&e))?;
    Ok(only.token_policies)
}

/// Parse a role's body: the method's own fields into `T`, the common token fields into
/// [`TokenSettings`]; unknown fields in either are refused. (serde cannot combine
/// `flatten` with `deny_unknown_fields`, hence the split by hand.)
pub fn parse_role_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<(T, TokenSettings)> {
    const TOKEN_FIELDS: [&str; 4] = ["token_policies", "token_ttl", "token_max_ttl", "bind_certificate"];
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { body };
    let mut own: serde_json::Map<String, serde_json::Value> = parse_body(body)?;
    let mut token = serde_json::Map::new();
    for f in TOKEN_FIELDS {
        if let Some(v) = own.remove(f) {
            token.insert(f.to_owned(), v);
        }
    }
    let token: TokenSettings = serde_json::from_value(serde_json::Value::Object(token)).map_err(|e| json_error(&e))?;
    let own: T = serde_json::from_value(serde_json::Value::Object(own)).map_err(|e| json_error(&e))?;
    token.validate()?;
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
