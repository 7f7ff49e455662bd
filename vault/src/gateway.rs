//! Gateway signature checks (docs/architecture.md, "Key operations"): is a producer's
//! signed request genuine, fresh, not replayed, and within its tenant mapping?
//!
//! The producer signs `"keyvault/gateway/request/v1\n{timestamp}.{nonce}." + raw_body` with
//! Ed25519 ([`keyvault_api::gateway::signing_input`]; producers registered before the tag
//! also accept the input without it). Checks, in order:
//! identity known and its certificate fingerprint pinned (401 `identity_mismatch`, or 401
//! `revoked_identity` after the kill switch), timestamp within the producer's skew (401
//! `timestamp_out_of_skew`), signature valid under an active key (401 `invalid_signature`),
//! nonce unused within its TTL (409 `replay`; recorded only once the signature is valid,
//! with insert-if-absent in the store so that a replay is refused on any replica), and for
//! producers with `operator_tenants`, the body's signed metadata matches its top level and
//! the operator's tenant (403 `tenant_mapping_violation`). A malformed item is 400.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::auth::revocation::{Identity, Revocations};
use crate::error::{Error, Result};
use crate::store::{Store, decode_json, encode_json, scan_all};
use crate::transit::Transit;
use crate::unix_now;

const PREFIX: &str = "gateway/producers/";
pub use keyvault_api::gateway::{
    MAX_BATCH, Producer, ProducerKey, SigningInput, Timestamp, VerifyItem, signing_input, untagged_signing_input,
    valid_nonce,
};

const MAX_SKEW: u64 = 300;
/// The longest a nonce is remembered (a day).
const MAX_NONCE_TTL: u64 = 24 * 3600;

/// Producer identities: 1-256 characters, no whitespace or control characters (SPIFFE IDs
/// are fine).
pub fn validate_identity(identity: &str) -> Result<()> {
    let ok =
        !identity.is_empty() && identity.len() <= 256 && !identity.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok { Ok(()) } else { Err(Error::invalid("invalid producer identity")) }
}

/// A producer's public key; weak (small-order) keys are refused, so that batch and
/// strict verification agree on every key a producer can register.
fn decode_public_key(b64: &str) -> Option<VerifyingKey> {
    let raw: [u8; 32] = STANDARD.decode(b64).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&raw).ok().filter(|k| !k.is_weak())
}

/// Check and normalize a producer before it is stored.
pub(crate) fn validate_producer(mut p: Producer) -> Result<Producer> {
    if p.cert_sha256.is_empty() {
        return Err(Error::invalid("a producer needs at least one pinned cert_sha256"));
    }
    p.cert_sha256 = p.cert_sha256.iter().map(|f| crate::auth::cert::normalize_fingerprint(f)).collect::<Result<_>>()?;
    if p.keys.is_empty() && p.transit_key.is_none() {
        return Err(Error::invalid("a producer needs keys or a transit_key"));
    }
    for k in &p.keys {
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
    if let Some(t) = &p.transit_key {
        crate::transit::validate_key_name(t)?;
    }
    if !(1..=MAX_SKEW).contains(&p.clock_skew_seconds) {
        return Err(Error::invalid(format!("clock_skew_seconds must be 1-{MAX_SKEW}")));
    }
    // A nonce must be remembered for as long as its timestamp can be accepted: from
    // `now - skew` to `now + skew` in whole seconds, so 2 x skew + 1 seconds at least.
    let min_ttl = 2 * p.clock_skew_seconds + 1;
    if !(min_ttl..=MAX_NONCE_TTL).contains(&p.nonce_ttl_seconds) {
        return Err(Error::invalid(format!(
            "nonce_ttl_seconds must be between 2 x clock_skew_seconds + 1 ({min_ttl}) and {MAX_NONCE_TTL}"
        )));
    }
    p.disabled = false;
    Ok(p)
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

/// The statuses a rejected single item answers (with its verdict as `data`): malformed
/// 400, not authentic 401, outside its tenant 403, a replay 409. Declared in the OpenAPI
/// document (docs/openapi.yaml).
pub const VERDICT_STATUSES: &[&str] = &["400", "401", "403", "409"];

impl Verdict {
    fn reject(status: u16, reason: &'static str, identity: Option<&str>) -> Self {
        debug_assert!(VERDICT_STATUSES.contains(&status.to_string().as_str()), "undeclared verdict status {status}");
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
    if !keyvault_api::gateway::valid_timestamp(&ts_text) {
        return None;
    }
    let ts = ts_text.parse().ok()?;
    let nonce = item.nonce.clone().filter(|n| valid_nonce(n))?;
    let sig = STANDARD.decode(item.signature.as_deref()?).ok()?;
    let signature = Signature::from_slice(&sig).ok()?;
    let body = STANDARD.decode(item.body.as_deref()?).ok()?;
    Some(Parsed { identity, cert, ts_text, ts, nonce, signature, body })
}

/// The tenant rule: `signed_metadata.{tenant_id, operator_id, campaign_id}` equal the
/// top-level fields, and the operator belongs to the tenant. A body with a duplicate key
/// anywhere fails it: a parser downstream that takes the first of two `tenant_id`s would
/// see another tenant than this check.
fn tenant_ok(body: &[u8], tenants: &BTreeMap<String, String>) -> bool {
    let Ok(serde_json::Value::Object(b)) = crate::json::from_slice_strict::<serde_json::Value>(body) else {
        return false;
    };
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

/// Decoded producer keys kept by this many base64 texts at most; past that the map starts
/// over. Keys come from producer records (written by admins), never from a request.
const DECODED_KEYS_MAX: usize = 4096;

#[derive(Debug)]
pub struct Gateway {
    store: Arc<dyn Store>,
    /// Public keys already decoded and checked, by their base64 text. Decoding a key is a
    /// point decompression (about as costly as a third of a signature check); the producer
    /// record is still read on every check, so an edit or a disable applies at once.
    decoded: Mutex<HashMap<String, VerifyingKey>>,
    /// Added to every nonce's lifetime: twice the most a replica's clock may be off the
    /// store's (`[tokens] max_clock_offset`). A nonce expires by the store's clock, a
    /// timestamp is judged by the replica's: without the margin, a replay could reach a
    /// replica running behind just after the nonce expired and still be in its window.
    clock_margin: Duration,
}

impl Gateway {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Gateway { store, decoded: Mutex::new(HashMap::new()), clock_margin: Duration::ZERO }
    }

    /// With a margin for replica clocks that may be `max_offset` off the store's.
    pub fn with_clock_offset(mut self, max_offset: Duration) -> Self {
        self.clock_margin = max_offset.saturating_mul(2);
        self
    }

    /// How long a nonce of a producer with `nonce_ttl_seconds` is remembered.
    fn nonce_ttl(&self, nonce_ttl_seconds: u64) -> Duration {
        Duration::from_secs(nonce_ttl_seconds) + Duration::from_secs(self.clock_margin.as_secs_f64().ceil() as u64)
    }

    /// [`decode_public_key`], remembered. Only valid keys are kept.
    fn public_key(&self, b64: &str) -> Option<VerifyingKey> {
        if let Some(k) = self.decoded.lock().unwrap_or_else(|p| p.into_inner()).get(b64) {
            return Some(*k);
        }
        let k = decode_public_key(b64)?;
        let mut map = self.decoded.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= DECODED_KEYS_MAX {
            map.clear();
        }
        map.insert(b64.to_owned(), k);
        Some(k)
    }

    fn key(identity: &str) -> String {
        format!("{PREFIX}{identity}")
    }

    /// Register or replace a producer if its stored bytes are still `expected` (`None`: it
    /// must not exist); 409 otherwise.
    /// A write that leaves out `signing_input` gets `tagged` for a new producer, and keeps
    /// what the replaced one had.
    pub async fn put_producer(&self, identity: &str, mut p: Producer, expected: Option<&[u8]>) -> Result<()> {
        validate_identity(identity)?;
        if p.signing_input.is_none() {
            p.signing_input = Some(match expected {
                Some(raw) => Self::accepts(&decode_json::<Producer>(&Self::key(identity), raw)?),
                None => SigningInput::Tagged,
            });
        }
        let new = encode_json(&validate_producer(p)?);
        if !self.store.compare_and_swap(&Self::key(identity), expected, Some(&new)).await? {
            return Err(Error::Conflict(format!("producer {identity} changed concurrently; retry")));
        }
        Ok(())
    }

    /// The stored bytes of a producer (the existence check of a write).
    pub async fn producer_raw(&self, identity: &str) -> Result<Option<Vec<u8>>> {
        validate_identity(identity)?;
        Ok(self.store.get(&Self::key(identity)).await?)
    }

    /// A producer as stored, with the signing inputs it accepts filled in.
    pub async fn producer(&self, identity: &str) -> Result<Option<Producer>> {
        validate_identity(identity)?;
        let k = Self::key(identity);
        match self.store.get(&k).await? {
            Some(raw) => {
                let mut p: Producer = decode_json(&k, &raw)?;
                p.signing_input = Some(Self::accepts(&p));
                Ok(Some(p))
            }
            None => Ok(None),
        }
    }

    /// The signing inputs a stored producer accepts: one stored without a choice was
    /// registered before the tag, and accepts the untagged input too.
    fn accepts(p: &Producer) -> SigningInput {
        p.signing_input.unwrap_or(SigningInput::TaggedOrUntagged)
    }

    pub async fn delete_producer(&self, identity: &str) -> Result<()> {
        validate_identity(identity)?;
        if !self.store.delete(&Self::key(identity)).await? {
            return Err(Error::NotFound(format!("no producer {identity}")));
        }
        Ok(())
    }

    pub async fn list_producers(&self) -> Result<Vec<String>> {
        let names = crate::store::list_names(self.store.as_ref(), PREFIX).await?;
        if names.is_empty() {
            return Err(Error::NotFound("no producers".into()));
        }
        Ok(names)
    }

    /// The kill switch: disable every producer that pins `fingerprint` (or is `identity`).
    /// A producer changed between the scan and its disable is read again and judged on
    /// what it is now (before, the lost compare-and-swap was passed over, and a producer
    /// re-registered at that moment stayed enabled while the kill switch answered 200).
    pub async fn disable_matching(&self, fingerprint: Option<&str>, identity: Option<&str>) -> Result<usize> {
        let mut n = 0;
        for (k, first) in scan_all(self.store.as_ref(), PREFIX).await? {
            let mut raw = Some(first);
            let mut attempts = 0;
            while let Some(current) = raw {
                let mut p: Producer = decode_json(&k, &current)?;
                let hit = fingerprint.is_some_and(|f| p.cert_sha256.iter().any(|c| c == f))
                    || identity == Some(&k[PREFIX.len()..]);
                if !hit || p.disabled {
                    break;
                }
                p.disabled = true;
                if self.store.compare_and_swap(&k, Some(&current), Some(&encode_json(&p))).await? {
                    n += 1;
                    break;
                }
                attempts += 1;
                if attempts >= 100 {
                    return Err(Error::Conflict(format!(
                        "producer {} kept changing; the kill switch did not disable it: retry",
                        &k[PREFIX.len()..]
                    )));
                }
                raw = self.store.get(&k).await?;
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
        let mut revoked_cache: HashMap<(String, String), bool> = HashMap::new();
        let mut verdicts: Vec<Option<Verdict>> = vec![None; items.len()];
        // Items that passed identity and skew: (index, item, signed message).
        let mut candidates: Vec<(usize, Parsed, Vec<u8>)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let Some(p) = parse(item) else {
                verdicts[i] = Some(Verdict::reject(400, "malformed_request", item.identity.as_deref()));
                continue;
            };
            if !producers.contains_key(&p.identity) {
                let entry = self.active_producer(&p.identity, now, transit).await?;
                producers.insert(p.identity.clone(), entry);
            }
            let id = Some(p.identity.as_str());
            let Some(Some((prod, _))) = producers.get(&p.identity) else {
                verdicts[i] = Some(Verdict::reject(401, "identity_mismatch", id));
                continue;
            };
            if !prod.cert_sha256.contains(&p.cert) {
                verdicts[i] = Some(Verdict::reject(401, "identity_mismatch", id));
                continue;
            }
            let pair = (p.identity.clone(), p.cert.clone());
            let revoked = match revoked_cache.get(&pair) {
                Some(r) => *r,
                None => {
                    let r = prod.disabled
                        || revocations.identity_state(&Identity::Certificate(p.cert.clone())).await?.blocks_logins
                        || (p.identity.starts_with("spiffe://")
                            && revocations.identity_state(&Identity::Spiffe(p.identity.clone())).await?.blocks_logins);
                    revoked_cache.insert(pair, r);
                    r
                }
            };
            if revoked {
                verdicts[i] = Some(Verdict::reject(401, "revoked_identity", id));
                continue;
            }
            if now.abs_diff(p.ts) > prod.clock_skew_seconds {
                verdicts[i] = Some(Verdict::reject(401, "timestamp_out_of_skew", id));
                continue;
            }
            let message = signing_input(&p.ts_text, &p.nonce, &p.body);
            candidates.push((i, p, message));
        }
        let mut key_ids = verify_signatures(&candidates, &producers);
        // A producer registered before the tag may still have signers that sign without
        // it: an item that did not verify is checked against that input too.
        for ((_, p, _), key_id) in candidates.iter().zip(key_ids.iter_mut()) {
            if key_id.is_some() {
                continue;
            }
            let Some(Some((prod, keys))) = producers.get(&p.identity) else { continue };
            if Self::accepts(prod) == SigningInput::TaggedOrUntagged {
                let message = untagged_signing_input(&p.ts_text, &p.nonce, &p.body);
                *key_id = key_that_verifies(keys, &message, &p.signature);
            }
        }
        // Register the nonces of every item whose signature verified, durably, at once:
        // under the key that verified it, which decides, and under its producer. The
        // signed input names no producer, so producers that share a key (one unit moving
        // to a new identity, or two naming one transit key) would each accept the same
        // signed request once if nonces were only the producer's. The producer's record
        // is what replicas of before this rule write and read; here its value is the
        // verifying key's hash. Found taken while the key's record was new, it is a
        // replay if an older replica wrote it (empty) or another key of the producer did
        // (a rotation window); if it names this key, a concurrent copy wrote it and lost
        // the key's record, so this one is not a replay.
        let mut pending = Vec::new();
        for ((i, p, _), key_id) in candidates.into_iter().zip(key_ids) {
            match key_id {
                None => verdicts[i] = Some(Verdict::reject(401, "invalid_signature", Some(&p.identity))),
                Some(k) => pending.push((i, p, k)),
            }
        }
        let inserts: Vec<(String, Vec<u8>, Option<Duration>)> = pending
            .iter()
            .flat_map(|(_, p, (_, vk))| {
                let entry = producers.get(&p.identity).and_then(|e| e.as_ref());
                let ttl = entry.map(|(prod, _)| prod.nonce_ttl_seconds).unwrap_or(120);
                let nonce = hex::encode(Sha256::digest(p.nonce.as_bytes()));
                let key_hash = hex::encode(Sha256::digest(vk.as_bytes()));
                let by_producer =
                    format!("gateway/nonce/{}/{nonce}", hex::encode(Sha256::digest(p.identity.as_bytes())));
                let by_key = format!("gateway/nonce-by-key/{key_hash}/{nonce}");
                // The producer's skew may be raised later (edits apply at once), up to
                // MAX_SKEW: its timestamp could then be accepted until ts + MAX_SKEW, so
                // the nonce is remembered at least that long, whatever its TTL says now.
                // (Accepted while |now - ts| <= skew: still at ts + MAX_SKEW, so one more.)
                let outlive = p.ts.saturating_add(MAX_SKEW + 1).saturating_sub(now);
                let ttl = Some(self.nonce_ttl(ttl.max(outlive)));
                [(by_key, Vec::new(), ttl), (by_producer, key_hash.into_bytes(), ttl)]
            })
            .collect();
        let inserted = self.store.insert_if_absent_many(&inserts).await?;
        let mut fresh = Vec::with_capacity(pending.len());
        for (records, both) in inserts.chunks(2).zip(inserted.chunks(2)) {
            fresh.push(match both {
                [true, true] => true,
                [true, _] => self.store.get(&records[1].0).await?.is_some_and(|v| v == records[1].1),
                _ => false,
            });
        }
        for ((i, p, (key_id, _)), fresh) in pending.into_iter().zip(fresh) {
            let id = Some(p.identity.as_str());
            let tenants = producers.get(&p.identity).and_then(|e| e.as_ref()).map(|(prod, _)| &prod.operator_tenants);
            verdicts[i] = Some(if !fresh {
                Verdict::reject(409, "replay", id)
            } else if tenants.is_some_and(|t| !t.is_empty() && !tenant_ok(&p.body, t)) {
                Verdict::reject(403, "tenant_mapping_violation", id)
            } else {
                Verdict {
                    valid: true,
                    reason: None,
                    key_id: Some(key_id),
                    status: 200,
                    identity: Some(p.identity.clone()),
                }
            });
        }
        // Invariant: every index got a verdict above (rejected in the first pass, or
        // decided after the signature check).
        Ok(verdicts.into_iter().map(|v| v.expect("every item has a verdict")).collect())
    }

    /// A producer with the keys that are active at `now` (its own, and its transit key's
    /// versions at or above `min_decryption_version`).
    async fn active_producer(&self, identity: &str, now: u64, transit: &Transit) -> Result<Option<ActiveProducer>> {
        let Some(prod) = self.producer(identity).await? else { return Ok(None) };
        let mut keys: Vec<(String, VerifyingKey)> = prod
            .keys
            .iter()
            .filter(|k| k.not_after.is_none_or(|na| na > now))
            .filter_map(|k| self.public_key(&k.public_key).map(|vk| (k.key_id.clone(), vk)))
            .collect();
        if let Some(t) = &prod.transit_key
            && let Ok(tk) = transit.get(t).await
            && let Ok(pks) = Transit::public_keys(&tk)
        {
            keys.extend(pks.into_iter().map(|(v, vk)| (format!("transit:{t}:v{v}"), vk)));
        }
        Ok(Some((prod, keys)))
    }
}

/// The key (id and key) that verifies each candidate, if any. Items of a producer with one active
/// key are checked together with `verify_batch` (about 2.4x the rate of one by one); if the
/// batch fails, or a producer has several keys (a rotation window), each item is checked
/// on its own with `verify_strict`, so a bad item only costs its own verdict.
fn verify_signatures(
    candidates: &[(usize, Parsed, Vec<u8>)],
    producers: &HashMap<String, Option<ActiveProducer>>,
) -> Vec<Option<(String, VerifyingKey)>> {
    let keys_of = |id: &str| producers.get(id).and_then(|e| e.as_ref()).map(|(_, k)| k.as_slice()).unwrap_or(&[]);
    let mut out: Vec<Option<Option<(String, VerifyingKey)>>> = vec![None; candidates.len()];
    let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
    for (n, (_, p, _)) in candidates.iter().enumerate() {
        if keys_of(&p.identity).len() == 1 {
            groups.entry(p.identity.as_str()).or_default().push(n);
        }
    }
    for (id, members) in groups {
        if members.len() < 2 {
            continue;
        }
        let (key_id, vk) = &keys_of(id)[0];
        let messages: Vec<&[u8]> = members.iter().map(|n| candidates[*n].2.as_slice()).collect();
        let signatures: Vec<Signature> = members.iter().map(|n| candidates[*n].1.signature).collect();
        let vks = vec![*vk; members.len()];
        if ed25519_dalek::verify_batch(&messages, &signatures, &vks).is_ok() {
            for n in members {
                out[n] = Some(Some((key_id.clone(), *vk)));
            }
        }
    }
    candidates
        .iter()
        .zip(out)
        .map(|((_, p, message), decided)| {
            decided.unwrap_or_else(|| key_that_verifies(keys_of(&p.identity), message, &p.signature))
        })
        .collect()
}

/// The id of the first of `keys` under which `signature` of `message` verifies (strictly).
/// The key (its id, and the key itself) that verifies `signature` over `message`.
fn key_that_verifies(
    keys: &[(String, VerifyingKey)],
    message: &[u8],
    signature: &Signature,
) -> Option<(String, VerifyingKey)> {
    keys.iter().find(|(_, vk)| vk.verify_strict(message, signature).is_ok()).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A producer stored before the tag (no `signing_input`) accepts both inputs, and a
    /// write that replaces it without the field keeps that; a new one accepts the tagged.
    #[tokio::test]
    async fn producers_stored_before_the_tag_keep_accepting_the_untagged_input() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SledStore::open(dir.path()).unwrap());
        let g = Gateway::new(store.clone());
        let vk = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        let old = serde_json::json!({"cert_sha256": ["ab".repeat(32)],
            "keys": [{"key_id": "k", "public_key": STANDARD.encode(vk.as_bytes())}],
            "clock_skew_seconds": 30, "nonce_ttl_seconds": 120});
        let raw = serde_json::to_vec(&old).unwrap();
        store.put(&Gateway::key("before"), &raw).await.unwrap();
        let stored = g.producer("before").await.unwrap().unwrap();
        assert_eq!(stored.signing_input, Some(SigningInput::TaggedOrUntagged));
        let mut replaced: Producer = serde_json::from_value(old).unwrap();
        replaced.clock_skew_seconds = 20;
        g.put_producer("before", replaced.clone(), Some(&raw)).await.unwrap();
        let after = g.producer("before").await.unwrap().unwrap();
        assert_eq!((after.signing_input, after.clock_skew_seconds), (Some(SigningInput::TaggedOrUntagged), 20));
        g.put_producer("new", replaced, None).await.unwrap();
        assert_eq!(g.producer("new").await.unwrap().unwrap().signing_input, Some(SigningInput::Tagged));
    }

    /// A producer re-registered between the kill switch's scan and its disable is
    /// disabled all the same (the write changes its bytes; the kill switch reads it again).
    #[tokio::test]
    async fn the_kill_switch_disables_a_producer_changed_under_it() {
        use crate::test_support::{PauseAt, TestStore};
        let dir = tempfile::tempdir().unwrap();
        let sled: Arc<dyn Store> = Arc::new(crate::store::SledStore::open(dir.path()).unwrap());
        let store = Arc::new(TestStore::holding(sled.clone(), PauseAt::BeforeSwap, &Gateway::key("p")));
        let g = Arc::new(Gateway::new(store.clone()));
        let vk = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        let (x, y) = ("ab".repeat(32), "cd".repeat(32));
        let producer = |skew: u64| -> Producer {
            serde_json::from_value(serde_json::json!({"cert_sha256": [x, y],
                "keys": [{"key_id": "k", "public_key": STANDARD.encode(vk.as_bytes())}],
                "clock_skew_seconds": skew, "nonce_ttl_seconds": 120}))
            .unwrap()
        };
        let plain = Gateway::new(sled.clone());
        plain.put_producer("p", producer(30), None).await.unwrap();
        store.arm();
        let kill = tokio::spawn({
            let (g, x) = (g.clone(), x.clone());
            async move { g.disable_matching(Some(&x), None).await }
        });
        store.reached.notified().await;
        let raw = plain.producer_raw("p").await.unwrap();
        plain.put_producer("p", producer(20), raw.as_deref()).await.unwrap();
        store.go.notify_one();
        assert_eq!(kill.await.unwrap().unwrap(), 1);
        let p = plain.producer("p").await.unwrap().unwrap();
        assert!(p.disabled && p.clock_skew_seconds == 20, "the re-registered producer is disabled");
    }

    #[test]
    fn decoded_keys_are_remembered_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let g = Gateway::new(Arc::new(crate::store::SledStore::open(dir.path()).unwrap()));
        let vk = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        let b64 = STANDARD.encode(vk.as_bytes());
        assert_eq!(g.public_key(&b64), Some(vk));
        assert_eq!(g.public_key(&b64), Some(vk), "a remembered key is the same key");
        // Invalid and weak keys are refused every time and never remembered.
        let weak = STANDARD.encode([0u8; 32]);
        assert_eq!(g.public_key(&weak), None);
        assert_eq!(g.public_key("not base64"), None);
        assert_eq!(g.decoded.lock().unwrap().len(), 1);
        for i in 0..DECODED_KEYS_MAX as u32 + 10 {
            let mut seed = [0u8; 32];
            seed[..4].copy_from_slice(&i.to_le_bytes());
            let k = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
            assert_eq!(g.public_key(&STANDARD.encode(k.as_bytes())), Some(k));
            assert!(g.decoded.lock().unwrap().len() <= DECODED_KEYS_MAX);
        }
    }

    /// A nonce outlives every moment at which its timestamp is within the skew on some
    /// replica: with replicas up to `d` off the store's clock in either direction, that is
    /// 2 x skew + 1 + 2d seconds of the store's clock.
    #[test]
    fn nonces_are_remembered_for_the_skew_window_plus_the_replicas_clock_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::SledStore::open(dir.path()).unwrap());
        let skew = 30u64;
        let producer_ttl = 2 * skew + 1;
        for offset_ms in [0u64, 500, 2000, 2500] {
            let g = Gateway::new(store.clone()).with_clock_offset(Duration::from_millis(offset_ms));
            let ttl = g.nonce_ttl(producer_ttl);
            // Accepted on a replica d ahead at the earliest store time, replayed on one d
            // behind at the latest: the nonce must still be there.
            let d = Duration::from_millis(offset_ms);
            let window = Duration::from_secs(2 * skew) + 2 * d;
            assert!(ttl > window, "offset {offset_ms} ms: {ttl:?} <= {window:?}");
        }
    }

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
