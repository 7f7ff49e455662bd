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
use crate::store::Store;

pub mod approle;
pub mod userpass;

/// What a successful login establishes.
#[derive(Debug, Clone)]
pub struct LoginOutcome {
    /// Token subject: `approle:<role>`, `userpass:<user>`.
    pub sub: String,
    pub method: &'static str,
    pub role: Option<String>,
    pub policies: Vec<String>,
    /// Token TTL asked for by the role (the server's default when `None`).
    pub ttl: Option<Duration>,
    /// Ceiling for this role's tokens (the server's maximum applies as well).
    pub max_ttl: Option<Duration>,
    pub metadata: BTreeMap<String, String>,
}

/// A login request as the HTTP layer hands it over. `body` holds credentials: it is
/// zeroized by the caller after the call.
#[derive(Debug)]
pub struct LoginRequest<'a> {
    /// A name from the URL (the user of `/v1/auth/userpass/login/<user>`).
    pub name: Option<&'a str>,
    pub body: &'a [u8],
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

fn role_index_key(name: &str) -> String {
    format!("auth/roles/{name}")
}

/// Claim `name` for `method` in the shared role namespace (idempotent for the same method).
pub async fn claim_role_name(store: &dyn Store, name: &str, method: &str) -> Result<()> {
    if store
        .insert_if_absent(&role_index_key(name), method.as_bytes(), None)
        .await?
    {
        return Ok(());
    }
    match store.get(&role_index_key(name)).await? {
        Some(m) if m == method.as_bytes() => Ok(()),
        Some(_) => Err(Error::Conflict(format!(
            "role name {name:?} is used by another auth method"
        ))),
        // Deleted in between: try once more.
        None => {
            if store
                .insert_if_absent(&role_index_key(name), method.as_bytes(), None)
                .await?
            {
                Ok(())
            } else {
                Err(Error::Conflict(format!(
                    "role name {name:?} is being created concurrently"
                )))
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
    Ok(store
        .get(&role_index_key(name))
        .await?
        .and_then(|m| String::from_utf8(m).ok()))
}

/// Parse a Vault-style duration: seconds as a number, or a string such as `"90s"`, `"10m"`,
/// `"1h"` (also plain digits as a string).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|_| {
        Error::invalid(format!(
            "invalid duration {s:?} (use e.g. 600, \"90s\", \"10m\", \"1h\")"
        ))
    })
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

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<Option<Duration>, D::Error> {
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(Raw::Secs(0)) => Ok(None),
            Some(Raw::Secs(s)) => Ok(Some(Duration::from_secs(s))),
            Some(Raw::Text(t)) => {
                match super::parse_duration(&t).map_err(serde::de::Error::custom)? {
                    d if d.is_zero() => Ok(None),
                    d => Ok(Some(d)),
                }
            }
        }
    }

    pub fn serialize<S: serde::Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
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

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<Vec<String>, D::Error> {
        let list = match Option::<Raw>::deserialize(d)? {
            None => Vec::new(),
            Some(Raw::List(l)) => l,
            Some(Raw::Text(t)) => t
                .split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
        };
        for p in &list {
            crate::policy::validate_name(p).map_err(serde::de::Error::custom)?;
        }
        Ok(list)
    }

    pub fn serialize<S: serde::Serializer>(
        l: &[String],
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        l.serialize(s)
    }
}

/// Parse a JSON request body into `T`, with messages that never quote the input.
pub fn parse_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| json_error(&e))
}

/// A client-facing message for a JSON error. Unknown and missing fields are named (field
/// names are not secret, and the message is what the user needs); every other error is
/// reduced to its category, because serde_json quotes offending values, which may be
/// credentials.
pub fn json_error(e: &serde_json::Error) -> Error {
    let msg = e.to_string();
    let safe = msg.starts_with("unknown field") || msg.starts_with("missing field");
    if safe {
        let msg = msg.split(" at line ").next().unwrap_or(&msg);
        Error::invalid(format!("invalid request body: {msg}"))
    } else if e.classify() == serde_json::error::Category::Data {
        Error::invalid("invalid request body: a field has the wrong type or value")
    } else {
        Error::invalid(format!(
            "invalid request body: {}",
            crate::secrets::json_error_category(e)
        ))
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
        let e = parse_body::<T>(br#"{"a": "s3cret"}"#)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cret"), "{e}");
        let e = parse_body::<T>(br#"{"b": 1}"#).unwrap_err().to_string();
        assert!(e.contains("unknown field `b`"), "{e}");
    }
}
