//! The audit log's on-disk format: JSON lines, hash-chained, with signed checkpoints.
//!
//! Every line is a JSON object with a `type` (`header`, `request`, `event`, `gap`,
//! `checkpoint`), a `seq`, the previous line's hash `prev` and its own `hash`:
//!
//! ```text
//! hash = SHA-256( prev (32 bytes) || canonical(line without "hash") )
//! ```
//!
//! `canonical` is the JSON text with object keys sorted at every level and no whitespace.
//! The first line of a log is a `header` with a random `genesis` that is its `prev`; a
//! later file (rotation, restart after a clean stop, a replaced file) starts with a
//! `header` that `continues` the previous hash. A `checkpoint` signs the chain head with
//! the audit key in the HSM:
//!
//! ```text
//! signature = Ed25519( "keyvault.audit.checkpoint.v1" || head (32) || seq (u64 BE) || final (1 byte) )
//! ```
//!
//! A `final` checkpoint closes a segment (clean stop, rotation): only a continuation
//! header may follow it.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub const FORMAT_VERSION: u64 = 1;
pub const CHECKPOINT_DOMAIN: &[u8] = b"keyvault.audit.checkpoint.v1";

/// The canonical form: keys sorted at every level, no whitespace.
pub fn canonical(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            // serde_json's map is ordered by key (no `preserve_order` in this build):
            // then its own order is the canonical one and nothing is collected. Sorted
            // explicitly otherwise, so the form never depends on a feature flag.
            if map.keys().is_sorted() {
                write_members(map.iter(), out);
            } else {
                let mut members: Vec<(&String, &Value)> = map.iter().collect();
                members.sort_unstable_by_key(|(k, _)| *k);
                write_members(members.into_iter(), out);
            }
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("scalar to JSON"),
    }
}

/// An object's members, in the order given (sorted by key), as canonical JSON.
fn write_members<'a, K: AsRef<str> + 'a>(members: impl Iterator<Item = (K, &'a Value)>, out: &mut Vec<u8>) {
    out.push(b'{');
    for (i, (k, v)) in members.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // Invariant: serializing a string to a Vec cannot fail.
        serde_json::to_writer(&mut *out, k.as_ref()).expect("string to JSON");
        out.push(b':');
        write_canonical(v, out);
    }
    out.push(b'}');
}

pub fn entry_hash(prev: &[u8; 32], canonical: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(canonical);
    h.finalize().into()
}

/// The message a checkpoint signs.
pub fn checkpoint_message(head: &[u8; 32], seq: u64, is_final: bool) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 41);
    m.extend_from_slice(CHECKPOINT_DOMAIN);
    m.extend_from_slice(head);
    m.extend_from_slice(&seq.to_be_bytes());
    m.push(u8::from(is_final));
    m
}

/// Chain `entry` as number `seq` after `prev`: the line (with its newline) and the new
/// head. The line is the canonical form of the entry with its `seq` and `prev` (any
/// `seq`, `prev` or `hash` it had replaced), and `"hash"` appended as the last member:
/// the verifier removes it and canonicalizes again, so only the hashed form must be
/// canonical (and the writer canonicalizes once per entry, without copying it).
pub fn seal(entry: &Map<String, Value>, seq: u64, prev: &[u8; 32]) -> (Vec<u8>, [u8; 32]) {
    let prev_hex = Value::String(hex::encode(prev));
    let seq = Value::from(seq);
    let mut members: Vec<(&str, &Value)> = Vec::with_capacity(entry.len() + 2);
    members.extend(entry.iter().map(|(k, v)| (k.as_str(), v)).filter(|(k, _)| !matches!(*k, "hash" | "prev" | "seq")));
    members.push(("prev", &prev_hex));
    members.push(("seq", &seq));
    members.sort_unstable_by_key(|(k, _)| *k);
    let mut line = Vec::with_capacity(512);
    write_members(members.into_iter(), &mut line);
    let hash = entry_hash(prev, &line);
    // Invariant: the canonical form of an object ends with '}'.
    line.pop();
    line.extend_from_slice(b",\"hash\":\"");
    line.extend_from_slice(hex::encode(hash).as_bytes());
    line.extend_from_slice(b"\"}\n");
    (line, hash)
}

pub fn decode_hash(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_sorts_keys_at_every_level() {
        let v: Value = serde_json::from_str(r#"{"b":1,"a":{"d":[{"z":1,"y":2}],"c":"x"}}"#).unwrap();
        assert_eq!(canonical(&v), br#"{"a":{"c":"x","d":[{"y":2,"z":1}]},"b":1}"#.to_vec());
    }

    /// The verifier re-serializes what it parsed: the canonical form must survive a
    /// round trip for every number (serde_json's `float_roundtrip`; without it some
    /// floats came back one unit off and a correctly built entry failed to verify:
    /// found by the audit_log fuzz target, fuzz/regressions/audit_log/).
    #[test]
    fn canonical_form_survives_a_round_trip_for_every_float() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = f64::from_bits(x);
            if !f.is_finite() {
                continue;
            }
            let v = serde_json::json!({ "n": f });
            let once = canonical(&v);
            let again: Value = serde_json::from_slice(&once).unwrap();
            assert_eq!(canonical(&again), once, "{f:e}");
        }
    }

    #[test]
    fn seal_chains() {
        let mut e = Map::new();
        e.insert("type".into(), "request".into());
        let (line, h1) = seal(&e, 1, &[0u8; 32]);
        let parsed: Map<String, Value> = serde_json::from_slice(&line).unwrap();
        assert_eq!(parsed["hash"], hex::encode(h1));
        let (_, h2) = seal(&e, 2, &h1);
        assert_ne!(h1, h2);
    }

    /// The sealed line is exactly what the verifier recomputes: the canonical form of
    /// the entry with `seq` and `prev` set and `hash` removed (members before, between
    /// and after the two, nested objects, stale `seq`/`prev`/`hash` members replaced).
    #[test]
    fn seal_writes_the_canonical_form_the_verifier_recomputes() {
        let entry: Map<String, Value> = serde_json::from_str(
            r#"{"type":"request","a":1,"q":{"z":[1,{"y":"\u0001","b":null}],"c":true},"r":"é\"","zz":-1.5e300,
                "seq":99,"prev":"old","hash":"old"}"#,
        )
        .unwrap();
        let prev = [7u8; 32];
        let (line, hash) = seal(&entry, 42, &prev);
        let mut parsed: Map<String, Value> = serde_json::from_slice(&line).unwrap();
        assert_eq!(parsed.remove("hash"), Some(Value::String(hex::encode(hash))));
        assert_eq!(parsed["seq"], 42);
        assert_eq!(parsed["prev"], hex::encode(prev));
        let recomputed = canonical(&Value::Object(parsed));
        assert_eq!(entry_hash(&prev, &recomputed), hash);
        assert!(line.starts_with(&recomputed[..recomputed.len() - 1]));
        assert_eq!(line.last(), Some(&b'\n'));
    }
}
