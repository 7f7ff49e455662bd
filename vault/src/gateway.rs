//! Gateway signature checks (DESIGN §2 journey 2): is a producer's signed request genuine,
//! fresh, not replayed, and within its tenant mapping?
//!
//! The producer signs `"{timestamp}.{nonce}." + raw_body` with Ed25519. Checks, in order:
//! identity known and its certificate fingerprint pinned (401 `identity_mismatch`, or 401
//! `revoked_identity` after the kill switch), timestamp within the producer's skew (401
//! `timestamp_out_of_skew`), signature valid under an active key (401 `invalid_signature`),
//! nonce unused within its TTL (409 `replay`; recorded only once the signature is valid,
//! with insert-if-absent in the store so that a replay is refused on any replica), and for
//! producers with `operator_tenants`, the body's signed metadata matches its top level and
//! the operator's tenant (403 `tenant_mapping_violation`). A malformed item is 400.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::auth::revocation::{Identity, Revocations};
use crate::error::{Error, Result};
use crate::store::{Store, decode_json, encode_json, scan_all};
use crate::transit::Transit;
use crate::unix_now;

const PREFIX: &str = "gateway/producers/";
pub const MAX_BATCH: usize = 1000;
const MAX_SKEW: u64 = 300;

/// One signing key of a producer. Several at once give a dual-validation window during a
/// key rotation; `not_after` closes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProducerKey {
    pub key_id: String,
    /// Base64 of the 32-byte Ed25519 public key.
    pub public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
}

/// A registered producer (`POST /v1/gateway/producers/<identity>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Producer {
    /// SHA-256 fingerprints (hex) of the client certificates this producer presents.
    pub cert_sha256: Vec<String>,
    #[serde(default)]
    pub keys: Vec<ProducerKey>,
    /// A named Ed25519 transit key in this HSM instead of (or besides) `keys`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transit_key: Option<String>,
    /// operator id → tenant id; when set, bodies must carry matching signed metadata.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub operator_tenants: BTreeMap<String, String>,
    #[serde(default = "default_skew")]
    pub clock_skew_seconds: u64,
    #[serde(default = "default_nonce_ttl")]
    pub nonce_ttl_seconds: u64,
    /// Set by the kill switch: every request of this producer is refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
}

fn default_skew() -> u64 {
    30
}
fn default_nonce_ttl() -> u64 {
    120
}

/// Producer identities: 1-256 characters, no whitespace or control characters (SPIFFE IDs
/// are fine).
pub fn validate_identity(identity: &str) -> Result<()> {
    let ok =
        !identity.is_empty() && identity.len() <= 256 && !identity.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok { Ok(()) } else { Err(Error::invalid("invalid producer identity")) }
}

fn decode_public_key(b64: &str) -> Option<VerifyingKey> {
    let raw: [u8; 32] = STANDARD.decode(b64).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&raw).ok()
}

impl Producer {
    fn validate(mut self) -> Result<Self> {
        if self.cert_sha256.is_empty() {
            return Err(Error::invalid("a producer needs at least one pinned cert_sha256"));
        }
        self.cert_sha256 =
            self.cert_sha256.iter().map(|f| crate::auth::cert::normalize_fingerprint(f)).collect::<Result<_>>()?;
        if self.keys.is_empty() && self.transit_key.is_none() {
            return Err(Error::invalid("a producer needs keys or a transit_key"));
        }
        for k in &self.keys {
            if k.key_id.is_empty() || k.key_id.len() > 128 {
                return Err(Error::invalid("key_id must be 1-128 characters"));
            }
            if decode_public_key(&k.public_key).is_none() {
                return Err(Error::invalid(format!(
                    "key {}: public_key must be the base64 of a 32-byte Ed25519 key",
                    k.key_id
                )));
            }
        }
        if let Some(t) = &self.transit_key {
            crate::transit::validate_key_name(t)?;
        }
        if !(1..=MAX_SKEW).contains(&self.clock_skew_seconds) {
            return Err(Error::invalid(format!("clock_skew_seconds must be 1-{MAX_SKEW}")));
        }
        // A nonce must be remembered for as long as its timestamp can be accepted.
        if self.nonce_ttl_seconds < 2 * self.clock_skew_seconds {
            return Err(Error::invalid("nonce_ttl_seconds must be at least twice clock_skew_seconds"));
        }
        self.disabled = false;
        Ok(self)
    }
}

/// Accepts a timestamp as decimal text (the header value) or a JSON number.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Timestamp {
    Text(String),
    Number(u64),
}

/// One check: the five header values and the body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyItem {
    #[serde(default)]
    pub identity: Option<String>,
    #[serde(default)]
    pub cert_sha256: Option<String>,
    #[serde(default)]
    pub timestamp: Option<Timestamp>,
    #[serde(default)]
    pub nonce: Option<String>,
    #[serde(default)]
    pub signature: Option<String>,
    /// Base64 of the raw body.
    #[serde(default)]
    pub body: Option<String>,
}

/// The verdict on one item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub valid: bool,
    pub reason: Option<&'static str>,
    pub key_id: Option<String>,
    pub status: u16,
    #[serde(skip)]
    pub identity: Option<String>,
}

impl Verdict {
    fn reject(status: u16, reason: &'static str, identity: Option<&str>) -> Self {
        Verdict { valid: false, reason: Some(reason), key_id: None, status, identity: identity.map(str::to_owned) }
    }
}

/// A producer and its keys that are active now, `(key_id, key)`.
type ActiveProducer = (Producer, Vec<(String, VerifyingKey)>);

/// A parsed, well-formed item.
struct Parsed {
    identity: String,
    cert: String,
    ts_text: String,
    ts: u64,
    nonce: String,
    signature: Signature,
    body: Vec<u8>,
}

fn parse(item: &VerifyItem) -> Option<Parsed> {
    let identity = item.identity.clone().filter(|i| validate_identity(i).is_ok())?;
    let cert = crate::auth::cert::normalize_fingerprint(item.cert_sha256.as_deref()?).ok()?;
    let ts_text = match item.timestamp.as_ref()? {
        Timestamp::Text(t) => t.clone(),
        Timestamp::Number(n) => n.to_string(),
    };
    if ts_text.is_empty() || ts_text.len() > 12 || !ts_text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let ts = ts_text.parse().ok()?;
    let nonce = item.nonce.clone().filter(|n| (16..=256).contains(&n.len()) && !n.chars().any(char::is_control))?;
    let sig = STANDARD.decode(item.signature.as_deref()?).ok()?;
    let signature = Signature::from_slice(&sig).ok()?;
    let body = STANDARD.decode(item.body.as_deref()?).ok()?;
    Some(Parsed { identity, cert, ts_text, ts, nonce, signature, body })
}

/// The tenant rule: `signed_metadata.{tenant_id, operator_id, campaign_id}` equal the
/// top-level fields, and the operator belongs to the tenant.
fn tenant_ok(body: &[u8], tenants: &BTreeMap<String, String>) -> bool {
    let Ok(serde_json::Value::Object(b)) = serde_json::from_slice::<serde_json::Value>(body) else { return false };
    let Some(serde_json::Value::Object(meta)) = b.get("signed_metadata") else { return false };
    let field =
        |m: &serde_json::Map<String, serde_json::Value>, k: &str| m.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let (Some(tenant), Some(operator), Some(campaign)) =
        (field(&b, "tenant_id"), field(&b, "operator_id"), field(&b, "campaign_id"))
    else {
        return false;
    };
    field(meta, "tenant_id").as_ref() == Some(&tenant)
        && field(meta, "operator_id").as_ref() == Some(&operator)
        && field(meta, "campaign_id").as_ref() == Some(&campaign)
        && tenants.get(&operator) == Some(&tenant)
}

#[derive(Debug)]
pub struct Gateway {
    store: Arc<dyn Store>,
}

impl Gateway {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Gateway { store }
    }

    fn key(identity: &str) -> String {
        format!("{PREFIX}{identity}")
    }

    pub async fn put_producer(&self, identity: &str, p: Producer) -> Result<()> {
        validate_identity(identity)?;
        self.store.put(&Self::key(identity), &encode_json(&p.validate()?)).await?;
        Ok(())
    }

    pub async fn producer(&self, identity: &str) -> Result<Option<Producer>> {
        validate_identity(identity)?;
        let k = Self::key(identity);
        match self.store.get(&k).await? {
            Some(raw) => Ok(Some(decode_json(&k, &raw)?)),
            None => Ok(None),
        }
    }

    pub async fn delete_producer(&self, identity: &str) -> Result<()> {
        validate_identity(identity)?;
        if !self.store.delete(&Self::key(identity)).await? {
            return Err(Error::NotFound(format!("no producer {identity}")));
        }
        Ok(())
    }

    pub async fn list_producers(&self) -> Result<Vec<String>> {
        let names: Vec<String> = scan_all(self.store.as_ref(), PREFIX)
            .await?
            .into_iter()
            .map(|(k, _)| k[PREFIX.len()..].to_owned())
            .collect();
        if names.is_empty() {
            return Err(Error::NotFound("no producers".into()));
        }
        Ok(names)
    }

    /// The kill switch: disable every producer that pins `fingerprint` (or is `identity`).
    pub async fn disable_matching(&self, fingerprint: Option<&str>, identity: Option<&str>) -> Result<usize> {
        let mut n = 0;
        for (k, raw) in scan_all(self.store.as_ref(), PREFIX).await? {
            let mut p: Producer = decode_json(&k, &raw)?;
            let hit = fingerprint.is_some_and(|f| p.cert_sha256.iter().any(|c| c == f))
                || identity == Some(&k[PREFIX.len()..]);
            if hit && !p.disabled {
                p.disabled = true;
                if self.store.compare_and_swap(&k, Some(&raw), Some(&encode_json(&p))).await? {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Check a batch of items; one verdict per item, in order.
    pub async fn verify(
        &self,
        items: &[VerifyItem],
        transit: &Transit,
        revocations: &Revocations,
    ) -> Result<Vec<Verdict>> {
        if items.len() > MAX_BATCH {
            return Err(Error::invalid(format!("at most {MAX_BATCH} items per batch")));
        }
        let now = unix_now();
        let mut producers: HashMap<String, Option<ActiveProducer>> = HashMap::new();
        let mut verdicts: Vec<Option<Verdict>> = Vec::with_capacity(items.len());
        // (item index, nonce key, ttl) of items whose signature verified.
        let mut pending: Vec<(usize, String, u64)> = Vec::new();
        let mut parsed_items = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let Some(p) = parse(item) else {
                verdicts.push(Some(Verdict::reject(400, "malformed_request", item.identity.as_deref())));
                parsed_items.push(None);
                continue;
            };
            if !producers.contains_key(&p.identity) {
                let entry = match self.producer(&p.identity).await? {
                    Some(prod) => {
                        let mut keys: Vec<(String, VerifyingKey)> = prod
                            .keys
                            .iter()
                            .filter(|k| k.not_after.is_none_or(|na| na > now))
                            .filter_map(|k| decode_public_key(&k.public_key).map(|vk| (k.key_id.clone(), vk)))
                            .collect();
                        if let Some(t) = &prod.transit_key
                            && let Ok(tk) = transit.get(t).await
                            && let Ok(pks) = Transit::public_keys(&tk)
                        {
                            keys.extend(pks.into_iter().map(|(v, vk)| (format!("transit:{t}:v{v}"), vk)));
                        }
                        Some((prod, keys))
                    }
                    None => None,
                };
                producers.insert(p.identity.clone(), entry);
            }
            let id = Some(p.identity.as_str());
            let Some(Some((prod, keys))) = producers.get(&p.identity) else {
                verdicts.push(Some(Verdict::reject(401, "identity_mismatch", id)));
                parsed_items.push(None);
                continue;
            };
            if !prod.cert_sha256.contains(&p.cert) {
                verdicts.push(Some(Verdict::reject(401, "identity_mismatch", id)));
                parsed_items.push(None);
                continue;
            }
            let revoked = prod.disabled
                || revocations
                    .identity_revocation(&Identity::Certificate(p.cert.clone()))
                    .await?
                    .is_some_and(|(_, b)| b)
                || (p.identity.starts_with("spiffe://")
                    && revocations
                        .identity_revocation(&Identity::Spiffe(p.identity.clone()))
                        .await?
                        .is_some_and(|(_, b)| b));
            if revoked {
                verdicts.push(Some(Verdict::reject(401, "revoked_identity", id)));
                parsed_items.push(None);
                continue;
            }
            if now.abs_diff(p.ts) > prod.clock_skew_seconds {
                verdicts.push(Some(Verdict::reject(401, "timestamp_out_of_skew", id)));
                parsed_items.push(None);
                continue;
            }
            let mut message = Vec::with_capacity(p.ts_text.len() + p.nonce.len() + 2 + p.body.len());
            message.extend_from_slice(p.ts_text.as_bytes());
            message.push(b'.');
            message.extend_from_slice(p.nonce.as_bytes());
            message.push(b'.');
            message.extend_from_slice(&p.body);
            let Some(key_id) =
                keys.iter().find(|(_, vk)| vk.verify_strict(&message, &p.signature).is_ok()).map(|(k, _)| k.clone())
            else {
                verdicts.push(Some(Verdict::reject(401, "invalid_signature", id)));
                parsed_items.push(None);
                continue;
            };
            let nonce_key = format!(
                "gateway/nonce/{}/{}",
                hex::encode(Sha256::digest(p.identity.as_bytes())),
                hex::encode(Sha256::digest(p.nonce.as_bytes()))
            );
            pending.push((i, nonce_key, prod.nonce_ttl_seconds));
            verdicts.push(None);
            parsed_items.push(Some((p, key_id)));
        }
        // Register the nonces of every item whose signature verified, durably, at once.
        let inserts: Vec<(String, Vec<u8>, Option<Duration>)> =
            pending.iter().map(|(_, k, ttl)| (k.clone(), Vec::new(), Some(Duration::from_secs(*ttl)))).collect();
        let fresh = self.store.insert_if_absent_many(&inserts).await?;
        for ((i, _, _), fresh) in pending.iter().zip(fresh) {
            let Some((p, key_id)) = parsed_items[*i].take() else { continue };
            let id = Some(p.identity.as_str());
            let verdict = if !fresh {
                Verdict::reject(409, "replay", id)
            } else {
                let tenants =
                    producers.get(&p.identity).and_then(|e| e.as_ref()).map(|(prod, _)| &prod.operator_tenants);
                match tenants {
                    Some(t) if !t.is_empty() && !tenant_ok(&p.body, t) => {
                        Verdict::reject(403, "tenant_mapping_violation", id)
                    }
                    _ => Verdict {
                        valid: true,
                        reason: None,
                        key_id: Some(key_id),
                        status: 200,
                        identity: Some(p.identity.clone()),
                    },
                }
            };
            verdicts[*i] = Some(verdict);
        }
        // Invariant: every index got a verdict above (rejected in the loop, or decided here).
        Ok(verdicts.into_iter().map(|v| v.expect("every item has a verdict")).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_rule() {
        let tenants: BTreeMap<String, String> = [("op-001".to_owned(), "t-1".to_owned())].into();
        let ok = br#"{"tenant_id":"t-1","operator_id":"op-001","campaign_id":"c","signed_metadata":{"tenant_id":"t-1","operator_id":"op-001","campaign_id":"c"}}"#;
        assert!(tenant_ok(ok, &tenants));
        let cross = br#"{"tenant_id":"t-2","operator_id":"op-001","campaign_id":"c","signed_metadata":{"tenant_id":"t-2","operator_id":"op-001","campaign_id":"c"}}"#;
        assert!(!tenant_ok(cross, &tenants));
        let mismatch = br#"{"tenant_id":"t-1","operator_id":"op-001","campaign_id":"c","signed_metadata":{"tenant_id":"t-1","operator_id":"op-001","campaign_id":"d"}}"#;
        assert!(!tenant_ok(mismatch, &tenants));
        assert!(!tenant_ok(b"not json", &tenants));
    }
}
