//! KeyVault's wire types: the request and reply bodies of every endpoint (Vault's shapes
//! where the API overlaps Vault's), secret paths, and the gateway contract's signing
//! input. The server, its command line, the tests and the benchmarks all use these; a
//! client crate can too. Serde only: nothing here depends on the server.
//!
//! Request bodies do not refuse unknown fields: the server names them in the reply's
//! `warnings`, as Vault does (see docs/api.md).

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

pub mod auth;
pub mod gateway;
pub mod kv2;
pub mod secret;
pub mod sys;
pub mod transit;

pub use secret::{PathError, SecretPath, SecretPrefix};

/// The envelope of every Vault-shaped reply: `data` (or `auth` for a login) and the
/// request's `warnings`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Envelope<T> {
    #[serde(default)]
    pub request_id: String,
    #[serde(default)]
    pub lease_id: String,
    #[serde(default)]
    pub renewable: bool,
    #[serde(default)]
    pub lease_duration: u64,
    pub data: Option<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warnings: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<auth::Auth>,
}

/// The body of every error reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub errors: Vec<String>,
}

/// The `data` of every listing (`LIST` or `GET ...?list=true`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyList {
    pub keys: Vec<String>,
}

/// A body with no fields (actions such as `sys/rotate`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Empty {}

/// A secret string on the wire (a password, a token, a plaintext): zeroized on drop and
/// redacted in `Debug`; serialized as the plain string, since carrying it is the point.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Sensitive(secrecy::SecretString);

impl Sensitive {
    pub fn new(value: impl Into<String>) -> Self {
        Sensitive(secrecy::SecretString::from(value.into()))
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        secrecy::ExposeSecret::expose_secret(&self.0)
    }

    /// The secret as a [`secrecy::SecretString`] (no copy).
    pub fn into_secret(self) -> secrecy::SecretString {
        self.0
    }
}

impl From<secrecy::SecretString> for Sensitive {
    fn from(s: secrecy::SecretString) -> Self {
        Sensitive(s)
    }
}

impl std::fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Sensitive {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.expose())
    }
}

/// Zeroize every string of a JSON value in place (the fields of a secret met in a parsed
/// body or reply; keys are field names, not secrets, and stay).
pub fn scrub_json(v: &mut serde_json::Value) {
    use zeroize::Zeroize;
    match v {
        serde_json::Value::String(s) => s.zeroize(),
        serde_json::Value::Array(a) => a.iter_mut().for_each(scrub_json),
        serde_json::Value::Object(o) => o.values_mut().for_each(scrub_json),
        _ => {}
    }
}

/// Names of roles, users and policies: 1-128 characters of `[A-Za-z0-9._-]`, so they are
/// safe in storage keys, policy paths and log lines.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parse a duration as Vault accepts it: seconds (`"600"`) or a humane string (`"10m"`,
/// `"1h 30m"`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(secs));
    }
    humantime::parse_duration(t).map_err(|_| format!("invalid duration {t:?} (use e.g. 600, \"90s\", \"10m\", \"1h\")"))
}

/// Serde adapter for optional Vault-style durations: a number of seconds or a string;
/// absent, `null`, `0` and `"0s"` are `None`. Serialized as seconds (0 for `None`).
pub mod vault_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<Raw>::deserialize(d)? {
            None | Some(Raw::Secs(0)) => Ok(None),
            Some(Raw::Secs(s)) => Ok(Some(Duration::from_secs(s))),
            Some(Raw::Text(t)) => match super::parse_duration(&t).map_err(serde::de::Error::custom)? {
                d if d.is_zero() => Ok(None),
                d => Ok(Some(d)),
            },
        }
    }

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.map(|d| d.as_secs()).unwrap_or(0))
    }
}

/// Policies as Vault accepts them: a list, or one comma-separated string. Names are
/// case-insensitive (kept in lower case), surrounding spaces are not part of them, and
/// each must be a valid name ([`valid_name`]).
pub mod policy_list {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        let list: Vec<String> = match Option::<Raw>::deserialize(d)? {
            None => Vec::new(),
            Some(Raw::List(l)) => l.into_iter().map(|p| p.trim().to_ascii_lowercase()).collect(),
            Some(Raw::Text(t)) => {
                t.split(',').map(|p| p.trim().to_ascii_lowercase()).filter(|p| !p.is_empty()).collect()
            }
        };
        if list.iter().any(|p| !super::valid_name(p)) {
            return Err(serde::de::Error::custom("invalid policy name: use 1-128 characters of [A-Za-z0-9._-]"));
        }
        Ok(list)
    }

    pub fn serialize<S: Serializer>(l: &[String], s: S) -> Result<S::Ok, S::Error> {
        l.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("600").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("ten minutes").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sensitive_values_are_redacted_in_debug_only() {
        let s = Sensitive::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"hunter2\"");
        let back: Sensitive = serde_json::from_str("\"hunter2\"").unwrap();
        assert_eq!(back.expose(), "hunter2");
    }
}

/// OpenAPI schemas of the wire types whose JSON is not what their Rust type says (a
/// secret string, Vault's durations and policy lists), for `#[schema(value_type = ...)]`.
#[cfg(feature = "openapi")]
pub mod schema {
    use std::borrow::Cow;

    use utoipa::openapi::RefOr;
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};

    fn string() -> ObjectBuilder {
        ObjectBuilder::new().schema_type(Type::String)
    }

    impl utoipa::PartialSchema for super::Sensitive {
        fn schema() -> RefOr<Schema> {
            string()
                .description(Some("A secret (a password, a token, a plaintext): never logged, zeroized after use."))
                .into()
        }
    }

    impl utoipa::ToSchema for super::Sensitive {
        fn name() -> Cow<'static, str> {
            "Sensitive".into()
        }
    }

    /// Vault's durations: a number of seconds, or a string such as `"90s"`, `"10m"`,
    /// `"1h"`; `0` means none. Replies give seconds.
    #[derive(Debug)]
    pub struct Duration;

    impl utoipa::PartialSchema for Duration {
        fn schema() -> RefOr<Schema> {
            OneOfBuilder::new()
                .item(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)))
                .item(string().pattern(Some(r"^[0-9]{1,9}(s|m|h|d)?$")))
                .description(Some("Seconds, or a duration such as \"90s\", \"10m\", \"1h\"; 0: none."))
                .into()
        }
    }

    impl utoipa::ToSchema for Duration {
        fn name() -> Cow<'static, str> {
            "Duration".into()
        }
    }

    /// Policy names as Vault takes them: a list, or one comma-separated string. Replies
    /// give a list.
    #[derive(Debug)]
    pub struct PolicyList;

    impl utoipa::PartialSchema for PolicyList {
        fn schema() -> RefOr<Schema> {
            let name = || string().pattern(Some(r"^[A-Za-z0-9._-]{1,128}$"));
            OneOfBuilder::new()
                .item(ArrayBuilder::new().items(name()))
                .item(string().pattern(Some(r"^[A-Za-z0-9._-]{1,128}(,[A-Za-z0-9._-]{1,128})*$")))
                .description(Some("Policy names: a list, or one comma-separated string."))
                .into()
        }
    }

    impl utoipa::ToSchema for PolicyList {
        fn name() -> Cow<'static, str> {
            "PolicyNames".into()
        }
    }
}
