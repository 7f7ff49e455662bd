//! Strict JSON for request bodies: a document with the same key twice in one object is
//! refused. serde_json keeps the last of two keys; other parsers keep the first. A body
//! that one component reads one way and another component (a signature check, a
//! downstream consumer of a stored secret) reads the other way is the ambiguity this
//! closes, for every request body KeyVault parses.

use std::collections::HashSet;
use std::fmt;

use serde::de::{DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::error::{Error, Result};

/// Walks a document and fails on the first object with a repeated key.
struct NoDuplicates;

impl<'de> DeserializeSeed<'de> for NoDuplicates {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NoDuplicates {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(NoDuplicates)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key) {
                // The key is not quoted: it may be part of a secret value's structure.
                return Err(serde::de::Error::custom(DUPLICATE));
            }
            map.next_value_seed(NoDuplicates)?;
        }
        Ok(())
    }
}

const DUPLICATE: &str = "duplicate key in a JSON object";

/// Fail if the document repeats a key in any object (or is not JSON).
pub fn check_no_duplicate_keys(bytes: &[u8]) -> serde_json::Result<()> {
    let mut d = serde_json::Deserializer::from_slice(bytes);
    NoDuplicates.deserialize(&mut d)?;
    d.end()
}

/// Whether a serde_json error is the duplicate-key refusal of this module.
pub fn is_duplicate_key_error(e: &serde_json::Error) -> bool {
    e.to_string().starts_with(DUPLICATE)
}

/// `serde_json::from_slice`, refusing repeated keys first.
pub fn from_slice_strict<T: DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<T> {
    check_no_duplicate_keys(bytes)?;
    serde_json::from_slice(bytes)
}

/// Parse a JSON request body into `T`, with messages that never quote the input. A body
/// that repeats a key in any object is refused (see [`crate::json`]).
pub fn parse_body<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T> {
    check_no_duplicate_keys(body).map_err(|e| json_error(&e))?;
    serde_json::from_slice(body).map_err(|e| json_error(&e))
}

/// A client-facing message for a JSON error. Unknown and missing fields are named (field
/// names are not secret, and the message is what the user needs); every other error is
/// reduced to its category, because serde_json quotes offending values, which may be
/// credentials.
pub fn json_error(e: &serde_json::Error) -> Error {
    let msg = e.to_string();
    let safe = msg.starts_with("unknown field") || msg.starts_with("missing field") || is_duplicate_key_error(e);
    if safe {
        let msg = msg.split(" at line ").next().unwrap_or(&msg);
        Error::invalid(format!("invalid request body: {msg}"))
    } else if e.classify() == serde_json::error::Category::Data {
        Error::invalid("invalid request body: a field has the wrong type or value")
    } else {
        Error::invalid(format!("invalid request body: {}", json_error_category(e)))
    }
}

/// A JSON parse error's category only: serde_json's full message can quote the input,
/// which may be a secret.
pub fn json_error_category(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "malformed JSON",
        serde_json::error::Category::Data => "not a JSON object",
        serde_json::error::Category::Eof => "truncated JSON",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_keys_are_refused_at_any_depth() {
        assert!(check_no_duplicate_keys(br#"{"a":1,"b":{"c":[{"d":1,"e":2}]}}"#).is_ok());
        for bad in [
            &br#"{"tenant_id":"t-2","tenant_id":"t-1"}"#[..],
            br#"{"a":{"x":1,"x":2}}"#,
            br#"[{"k":1},{"k":1,"k":2}]"#,
            br#"{"a":1,"\u0061":2}"#,
        ] {
            let e = check_no_duplicate_keys(bad).unwrap_err();
            assert!(is_duplicate_key_error(&e), "{e}");
        }
        assert!(check_no_duplicate_keys(b"{").is_err());
        assert!(check_no_duplicate_keys(b"{} x").is_err(), "trailing garbage");
    }
}
