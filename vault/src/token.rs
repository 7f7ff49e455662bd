//! Access tokens: JWTs (EdDSA) signed inside the token (the HSM) by the token-signing key,
//! verified in process with `jsonwebtoken` against public keys read once from the token.
//!
//! The signing input is built here (base64url of the JSON header and claims, RFC 7515
//! §7.1) because the private key never leaves the HSM and `jsonwebtoken` signs only with
//! keys it holds; verification, the security-critical parsing, is `jsonwebtoken`'s.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use keyvault_hsm::KeyStore;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{AuthFailure, Error, Result};
use crate::keys::{KeyNames, KeyVersion, SharedKeyring};
use crate::{hsm_call, unix_now};

/// Seconds of clock difference between replicas that token checks allow.
const LEEWAY: u64 = 5;

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The generations of a token's identities (role, user, certificate, SPIFFE ID) when it
/// was issued: a later revocation of any of them raises its generation past these.
pub type Generations = std::collections::BTreeMap<String, u64>;

/// RFC 8705 confirmation claim: the SHA-256 thumbprint of the client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

/// The claims KeyVault puts in its tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// Who: `root`, `approle:<role>`, `userpass:<user>`.
    pub sub: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    /// Token id, unique per token (revocation lists it).
    pub jti: String,
    /// Accessor: names the token in audit logs and admin calls without being usable.
    pub acc: String,
    /// Policy names, resolved on every request.
    pub pol: Vec<String>,
    /// The auth method that issued it.
    pub meth: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The latest expiry a renewal may reach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
    /// The SPIFFE ID of the client certificate of the login, for the kill switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe: Option<String>,
    /// The generations of the token's identities when it was issued (kill switch; see
    /// `auth::revocation`). Absent kinds are generation 0.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub idg: Generations,
    /// The accessor of the credential this token was issued for (a bootstrap token):
    /// revoking it revokes this token too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub par: Option<String>,
    /// The accessors of the tokens this one descends from (`auth/token/create`), oldest
    /// first: revoking any of them revokes this token too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anc: Vec<String>,
    /// Made not renewable (a root token, a token whose maximum is its TTL, or one created
    /// with `renewable: false`): a renewal is refused, as Vault does.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nren: bool,
    /// The role's token attributes, for gateways that verify tokens offline.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub attr: keyvault_api::auth::Attributes,
    /// The role's audiences: the gateways meant to accept the token offline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aud: Vec<String>,
}

/// What to put in a new token.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    pub sub: String,
    pub method: String,
    pub role: Option<String>,
    pub policies: Vec<String>,
    pub ttl_secs: u64,
    pub max_ttl_secs: u64,
    pub cnf: Option<Confirmation>,
    pub spiffe: Option<String>,
    pub generations: Generations,
    pub parent: Option<String>,
    pub attributes: keyvault_api::auth::Attributes,
    pub audiences: Vec<String>,
}

/// A freshly signed token. The token string is a bearer credential.
pub struct IssuedToken {
    pub token: SecretString,
    pub claims: Claims,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken").field("accessor", &self.claims.acc).finish_non_exhaustive()
    }
}

/// Verified tokens, by SHA-256 of the token string. A hit replaces an Ed25519 verification
/// (~42 µs) by a hash and a map lookup (~1 µs); it only ever holds tokens whose signature
/// verified, and expiry is checked again on every hit, so it accepts nothing that a full
/// verification would refuse. It is emptied when a verification key is no longer loaded
/// (a retired signing version) and at an emergency seal; `generation` counts those, so
/// that a verification that began before one does not put its token back after it.
struct VerifiedCache {
    map: RwLock<HashMap<[u8; 32], Arc<Claims>>>,
    capacity: usize,
    generation: std::sync::atomic::AtomicU64,
}

impl VerifiedCache {
    fn get(&self, digest: &[u8; 32], now: u64) -> Option<Arc<Claims>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.get(digest).filter(|c| c.exp > now).cloned()
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Remember a token verified with the keys of `generation` (none if it has passed).
    fn insert(&self, digest: [u8; 32], claims: Arc<Claims>, now: u64, generation: u64) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if self.generation() != generation {
            return;
        }
        if map.len() >= self.capacity {
            map.retain(|_, c| c.exp > now);
            if map.len() >= self.capacity {
                map.clear();
            }
        }
        map.insert(digest, claims);
    }

    /// Forget every token; the number forgotten.
    fn clear(&self) -> usize {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let n = map.len();
        map.clear();
        n
    }
}

/// Issues and verifies access tokens.
pub struct TokenIssuer {
    keys: Arc<dyn KeyStore>,
    names: KeyNames,
    keyring: SharedKeyring,
    issuer: String,
    /// Decoding keys by `kid` (`v1`, `v2`, ...), loaded from the token's public keys.
    verifiers: RwLock<HashMap<String, Arc<DecodingKey>>>,
    /// The same public keys, raw, for `GET /v1/auth/jwks`.
    public_keys: RwLock<Vec<(String, [u8; 32])>>,
    cache: VerifiedCache,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer").field("issuer", &self.issuer).finish_non_exhaustive()
    }
}

fn kid(v: KeyVersion) -> String {
    v.to_string()
}

impl TokenIssuer {
    /// Read the public halves of every live signing key version from the token.
    pub async fn new(keys: Arc<dyn KeyStore>, names: KeyNames, keyring: SharedKeyring, issuer: String) -> Result<Self> {
        let issuer = TokenIssuer {
            keys,
            names,
            keyring,
            issuer,
            verifiers: RwLock::new(HashMap::new()),
            public_keys: RwLock::new(Vec::new()),
            cache: VerifiedCache {
                map: RwLock::new(HashMap::new()),
                capacity: 100_000,
                generation: Default::default(),
            },
        };
        issuer.load_public_keys().await?;
        Ok(issuer)
    }

    /// Forget every verified token (emergency seal): each is verified afresh after.
    pub fn forget_verified(&self) -> usize {
        self.cache.clear()
    }

    /// (Re)load the verification keys of the keyring's signing versions.
    pub async fn load_public_keys(&self) -> Result<()> {
        let versions = self.keyring.load().token_signing.versions.clone();
        let mut loaded = HashMap::new();
        let mut raw = Vec::new();
        for v in versions {
            let label = self.names.token_signing(v);
            let public = hsm_call(&self.keys, move |k| k.ed25519_public_key(&label)).await?;
            loaded.insert(kid(v), Arc::new(DecodingKey::from_ed_der(&public)));
            raw.push((kid(v), public));
        }
        let dropped = {
            let mut verifiers = self.verifiers.write().unwrap_or_else(|p| p.into_inner());
            let dropped = verifiers.keys().any(|k| !loaded.contains_key(k));
            *verifiers = loaded;
            dropped
        };
        *self.public_keys.write().unwrap_or_else(|p| p.into_inner()) = raw;
        // A version no longer loaded (retired) verifies nothing: nor do the tokens it
        // signed that were verified before (emptied after the keys are replaced, so a
        // verification under the old keys cannot put one back: see `VerifiedCache`).
        if dropped {
            let n = self.cache.clear();
            tracing::info!(forgotten = n, "token-signing keys retired: verified tokens forgotten");
        }
        Ok(())
    }

    /// Reload the verification keys if the keyring's signing versions are not the ones
    /// loaded (the keyring was followed, or a version added or retired).
    pub async fn sync_public_keys(&self) -> Result<()> {
        let wanted: Vec<String> = self.keyring.load().token_signing.versions.iter().map(|v| kid(*v)).collect();
        let loaded: Vec<String> =
            self.public_keys.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, _)| k.clone()).collect();
        if wanted != loaded {
            self.load_public_keys().await?;
        }
        Ok(())
    }

    /// The token-verification keys as a JWK set (RFC 8037 OKP keys).
    pub fn jwks(&self) -> keyvault_api::auth::Jwks {
        let keys = self
            .public_keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(kid, pk)| keyvault_api::auth::Jwk {
                kty: "OKP".into(),
                crv: "Ed25519".into(),
                alg: "EdDSA".into(),
                usage: "sig".into(),
                kid: kid.clone(),
                x: URL_SAFE_NO_PAD.encode(pk),
            })
            .collect();
        keyvault_api::auth::Jwks { keys }
    }

    /// Sign a new token with the active signing key, inside the HSM.
    pub async fn issue(&self, spec: TokenSpec) -> Result<IssuedToken> {
        let now = unix_now();
        let ttl = spec.ttl_secs.min(spec.max_ttl_secs).max(1);
        let (Some(exp), Some(max_exp)) = (now.checked_add(ttl), now.checked_add(spec.max_ttl_secs.max(ttl))) else {
            return Err(Error::invalid("token lifetime out of range"));
        };
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: spec.sub,
            iat: now,
            nbf: now,
            exp,
            jti: uuid::Uuid::new_v4().to_string(),
            acc: uuid::Uuid::new_v4().simple().to_string(),
            pol: spec.policies,
            meth: spec.method,
            role: spec.role,
            max_exp: Some(max_exp),
            cnf: spec.cnf,
            spiffe: spec.spiffe,
            idg: spec.generations,
            par: spec.parent,
            anc: Vec::new(),
            nren: max_exp <= exp,
            attr: spec.attributes,
            aud: spec.audiences,
        };
        let token = self.sign(&claims).await?;
        Ok(IssuedToken { token, claims })
    }

    /// Sign given claims (a renewal: same id and accessor, new times).
    pub async fn sign_claims(&self, claims: Claims) -> Result<IssuedToken> {
        let token = self.sign(&claims).await?;
        Ok(IssuedToken { token, claims })
    }

    /// Sign `claims` with the active signing key inside the HSM.
    async fn sign(&self, claims: &Claims) -> Result<SecretString> {
        let version = self.keyring.load().token_signing.active;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid(version));
        let mut token = String::with_capacity(512);
        URL_SAFE_NO_PAD.encode_string(to_json(&header)?, &mut token);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(to_json(claims)?, &mut token);
        let label = self.names.token_signing(version);
        let input = token.clone().into_bytes();
        let signature = hsm_call(&self.keys, move |k| k.sign_ed25519(&label, &input)).await?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut token);
        Ok(SecretString::from(token))
    }

    /// Verify a token in process: signature under a known signing key, issuer, expiry.
    pub fn verify(&self, token: &str) -> Result<Arc<Claims>, AuthFailure> {
        let (claims, expired) = self.verify_signature(token)?;
        if expired {
            return Err(AuthFailure::Expired);
        }
        Ok(claims)
    }

    /// Verify a token's signature, issuer and `nbf`, and say whether its own `exp` has
    /// passed (a renewed token outlives it: see [`Renewals`]).
    pub fn verify_signature(&self, token: &str) -> Result<(Arc<Claims>, bool), AuthFailure> {
        if token.is_empty() {
            return Err(AuthFailure::MissingToken);
        }
        if token.len() > MAX_TOKEN_LEN || !token.is_ascii() {
            return Err(AuthFailure::MalformedToken);
        }
        let now = unix_now();
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(c) = self.cache.get(&digest, now) {
            return Ok((c, false));
        }
        // Read before the key: a retire after this point makes the insert below a no-op.
        let generation = self.cache.generation();
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthFailure::MalformedToken)?;
        if header.alg != Algorithm::EdDSA {
            return Err(AuthFailure::MalformedToken);
        }
        let kid = header.kid.ok_or(AuthFailure::MalformedToken)?;
        let key = self
            .verifiers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&kid)
            .cloned()
            .ok_or(AuthFailure::UnknownSigningKey)?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&self.issuer]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "sub"]);
        validation.validate_nbf = true;
        // `aud` names the gateways meant to accept a token offline; KeyVault accepts its
        // own tokens whatever their audience.
        validation.validate_aud = false;
        // Expiry is judged below, so that a renewed token's claims can be read.
        validation.validate_exp = false;
        // Replicas' clocks may differ a little; tokens live minutes.
        validation.leeway = LEEWAY;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthFailure::Expired,
            ErrorKind::InvalidSignature => AuthFailure::BadSignature,
            _ => AuthFailure::MalformedToken,
        })?;
        let claims = Arc::new(data.claims);
        let expired = claims.exp.saturating_add(LEEWAY) < now;
        if !expired {
            self.cache.insert(digest, claims.clone(), now, generation);
        }
        Ok((claims, expired))
    }
}

/// Renewals: a renewed token keeps its string (Vault's clients keep using the token they
/// hold) and is valid past its own `exp` until the renewal's, never past its `max_exp`.
/// A renewal is a record `auth/renewals/<accessor>/<expiry>`, kept until that expiry (one
/// record per renewal, each with its own time to live: concurrent renewals on several
/// replicas need no compare-and-swap, and the latest expiry wins); a renewal removes the
/// ones it supersedes. It is read only for a token whose own `exp` has passed, and then kept in memory
/// until the expiry it names (a later renewal on another replica only extends it, so a
/// cached value is never too generous): checking an unexpired token reads nothing. A
/// verifier outside KeyVault (with the JWKS) sees the JWT's own `exp`, not the renewal.
#[derive(Debug)]
pub struct Renewals {
    store: Arc<dyn crate::store::Store>,
    cache: RwLock<HashMap<String, u64>>,
    capacity: usize,
}

fn renewal_prefix(accessor: &str) -> String {
    format!("auth/renewals/{accessor}/")
}

impl Renewals {
    pub fn new(store: Arc<dyn crate::store::Store>) -> Self {
        Renewals { store, cache: RwLock::new(HashMap::new()), capacity: 100_000 }
    }

    /// Until when the token with `claims` is valid: its own `exp`, or a later renewal.
    pub async fn valid_until(&self, claims: &Claims) -> Result<u64> {
        let now = unix_now();
        let cap = claims.max_exp.unwrap_or(claims.exp);
        if let Some(until) = self.cache.read().unwrap_or_else(|p| p.into_inner()).get(&claims.acc).copied()
            && until > now
        {
            return Ok(until.min(cap));
        }
        let until = self.stored(&claims.acc).await?.unwrap_or(claims.exp);
        if until > now {
            self.remember(&claims.acc, until, now);
        }
        Ok(until.max(claims.exp).min(cap))
    }

    /// Keep `accessor`'s expiry in memory, within `capacity` entries: when full, the past
    /// ones go, then all.
    fn remember(&self, accessor: &str, until: u64, now: u64) {
        let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= self.capacity && !cache.contains_key(accessor) {
            cache.retain(|_, u| *u > now);
            if cache.len() >= self.capacity {
                cache.clear();
            }
        }
        cache.insert(accessor.to_owned(), until);
    }

    /// The latest renewal stored for `accessor`.
    async fn stored(&self, accessor: &str) -> Result<Option<u64>> {
        let prefix = renewal_prefix(accessor);
        let names = crate::store::list_names(self.store.as_ref(), &prefix).await?;
        Ok(names.iter().filter_map(|n| n.parse::<u64>().ok()).max())
    }

    /// Extend the token with `claims` to `until` (capped by its `max_exp`; never
    /// shortened). Returns the expiry in force. The renewals it extends are removed once
    /// it is stored, so a token holds a record or two however often it is renewed (one
    /// renewal per second of its lifetime would otherwise leave thousands, each read by
    /// every later renewal).
    pub async fn renew(&self, claims: &Claims, until: u64) -> Result<u64> {
        let until = until.min(claims.max_exp.unwrap_or(claims.exp));
        let prefix = renewal_prefix(&claims.acc);
        let earlier: Vec<u64> = crate::store::list_names(self.store.as_ref(), &prefix)
            .await?
            .iter()
            .filter_map(|n| n.parse::<u64>().ok())
            .collect();
        let current = earlier.iter().copied().max().unwrap_or(0).max(claims.exp);
        if until <= current {
            return Ok(current);
        }
        let ttl = std::time::Duration::from_secs(until.saturating_sub(unix_now()) + 60);
        let key = format!("{prefix}{until:020}");
        self.store.insert_if_absent(&key, b"", Some(ttl)).await?;
        self.remember(&claims.acc, until, unix_now());
        // Now superseded (a concurrent renewal to a later expiry keeps its own record). At
        // most 64 per renewal: a token that gathered many under an older version loses
        // them over its next renewals (or they expire), not in one request.
        for old in earlier.into_iter().take(64) {
            if let Err(e) = self.store.delete(&format!("{prefix}{old:020}")).await {
                tracing::warn!(accessor = %claims.acc, error = %e, "removing a superseded token renewal failed (it expires by itself)");
            }
        }
        Ok(until)
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::Internal(format!("JSON encoding: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{self, KeyNames};
    use crate::store::SledStore;
    use keyvault_hsm::softhsm::testing;
    use secrecy::ExposeSecret;

    async fn issuer() -> (tempfile::TempDir, TokenIssuer) {
        let t = testing::token();
        let keys: Arc<dyn KeyStore> = t.store.clone();
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let names = KeyNames::new("keyvault").unwrap();
        let ring = keys::initialize(&store, &keys, &names).await.unwrap();
        let keyring = crate::keys::SharedKeyring::new(ring, Arc::new(store));
        (dir, TokenIssuer::new(keys, names, keyring, "keyvault".into()).await.unwrap())
    }

    fn spec(ttl: u64) -> TokenSpec {
        TokenSpec {
            sub: "approle:web".into(),
            method: "approle".into(),
            role: Some("web".into()),
            policies: vec!["web".into()],
            ttl_secs: ttl,
            max_ttl_secs: 3600,
            cnf: None,
            spiffe: None,
            generations: Default::default(),
            parent: None,
            attributes: Default::default(),
            audiences: Vec::new(),
        }
    }

    /// A token verified (and so remembered) under a signing version that is then retired
    /// is refused at once, on a replica that follows the keyring too. Before, the
    /// remembered token passed until it expired, the cache filled, or a seal.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_token_of_a_retired_signing_version_is_refused_though_verified_before() {
        let (_dir, issuer) = issuer().await;
        let old = issuer.issue(spec(3600)).await.unwrap();
        let old = old.token.expose_secret().to_owned();
        issuer.verify(&old).unwrap();
        issuer.verify(&old).unwrap();
        issuer.keyring.add_version(&issuer.keys, &issuer.names, crate::keys::Family::TokenSigning).await.unwrap();
        issuer.sync_public_keys().await.unwrap();
        let new = issuer.issue(spec(3600)).await.unwrap();
        let new = new.token.expose_secret().to_owned();
        issuer.verify(&new).unwrap();
        assert!(issuer.verify(&old).is_ok(), "an older live version still verifies");
        let v1 = crate::keys::KeyVersion::new(1).unwrap();
        assert!(
            issuer
                .keyring
                .retire_version(&issuer.keys, &issuer.names, crate::keys::Family::TokenSigning, v1)
                .await
                .unwrap()
        );
        issuer.sync_public_keys().await.unwrap();
        assert_eq!(issuer.verify(&old).unwrap_err(), AuthFailure::UnknownSigningKey);
        assert!(issuer.verify(&new).is_ok(), "the active version's tokens pass");
    }

    /// The renewal cache keeps to its capacity on renewals too (before, only a read that
    /// missed it checked the bound, so renewals of many tokens grew it past it).
    #[tokio::test]
    async fn the_renewal_cache_keeps_its_bound_on_renewals() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn crate::store::Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let r = Renewals { capacity: 4, ..Renewals::new(store) };
        let now = unix_now();
        for i in 0..20 {
            let claims: Claims = serde_json::from_value(serde_json::json!({
                "iss": "keyvault", "sub": "approle:web", "iat": now, "nbf": now, "exp": now + 10,
                "jti": "j", "acc": format!("acc-{i}"), "pol": [], "meth": "approle", "max_exp": now + 100_000
            }))
            .unwrap();
            assert_eq!(r.renew(&claims, now + 100).await.unwrap(), now + 100);
            assert!(r.cache.read().unwrap().len() <= 4, "after {} renewals", i + 1);
        }
    }

    /// A token renewed again and again keeps one renewal record, the latest, and is
    /// valid until it.
    #[tokio::test]
    async fn renewals_keep_one_record_per_token() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn crate::store::Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let r = Renewals::new(store.clone());
        let now = unix_now();
        let claims: Claims = serde_json::from_value(serde_json::json!({
            "iss": "keyvault", "sub": "approle:web", "iat": now, "nbf": now, "exp": now + 10,
            "jti": "j", "acc": "acc-renewed", "pol": [], "meth": "approle", "max_exp": now + 100_000
        }))
        .unwrap();
        for i in 1..=200 {
            assert_eq!(r.renew(&claims, now + 10 + i).await.unwrap(), now + 10 + i);
        }
        let left = crate::store::list_names(store.as_ref(), &renewal_prefix("acc-renewed")).await.unwrap();
        assert_eq!(left, vec![format!("{:020}", now + 210)]);
        assert_eq!(Renewals::new(store).valid_until(&claims).await.unwrap(), now + 210);
    }

    /// Sixteen renewals of one token at once, each to its own expiry: the latest holds
    /// (no renewal removes a record it did not supersede), on a fresh reader too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sixteen_concurrent_renewals_keep_the_latest() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn crate::store::Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let r = Arc::new(Renewals::new(store.clone()));
        let now = unix_now();
        let claims: Claims = serde_json::from_value(serde_json::json!({
            "iss": "keyvault", "sub": "approle:web", "iat": now, "nbf": now, "exp": now + 10,
            "jti": "j", "acc": "acc-raced", "pol": [], "meth": "approle", "max_exp": now + 100_000
        }))
        .unwrap();
        for round in 0..5u64 {
            let tasks: Vec<_> = (1..=16u64)
                .map(|i| {
                    let (r, claims) = (r.clone(), claims.clone());
                    tokio::spawn(async move { r.renew(&claims, now + 100 * round + 10 + i).await.unwrap() })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            let latest = now + 100 * round + 26;
            assert_eq!(Renewals::new(store.clone()).valid_until(&claims).await.unwrap(), latest, "round {round}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn issued_tokens_verify_and_carry_claims() {
        let (_d, iss) = issuer().await;
        let t = iss.issue(spec(600)).await.unwrap();
        let c = iss.verify(t.token.expose_secret()).unwrap();
        assert_eq!(c.sub, "approle:web");
        assert_eq!(c.pol, vec!["web".to_owned()]);
        assert_eq!(c.exp - c.iat, 600);
        // Verified a second time from the cache, same claims.
        assert_eq!(iss.verify(t.token.expose_secret()).unwrap(), c);
        let header = jsonwebtoken::decode_header(t.token.expose_secret()).unwrap();
        assert_eq!(header.alg, Algorithm::EdDSA);
        assert_eq!(header.kid.as_deref(), Some("v1"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forged_expired_and_malformed_tokens_are_refused() {
        let (_d, iss) = issuer().await;
        let good = iss.issue(spec(600)).await.unwrap();
        let good = good.token.expose_secret().to_owned();
        let (head_claims, sig) = good.rsplit_once('.').unwrap();

        // Signature bytes changed.
        let mut sig_bytes = URL_SAFE_NO_PAD.decode(sig).unwrap();
        sig_bytes[10] ^= 1;
        let forged = format!("{head_claims}.{}", URL_SAFE_NO_PAD.encode(&sig_bytes));
        assert_eq!(iss.verify(&forged), Err(AuthFailure::BadSignature));

        // Claims changed (policy escalation), signature kept.
        let (head, claims) = head_claims.split_once('.').unwrap();
        let mut c: Claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
        c.pol = vec!["root".into()];
        let escalated = format!("{head}.{}.{sig}", URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap()));
        assert_eq!(iss.verify(&escalated), Err(AuthFailure::BadSignature));

        // alg: none and HS256 headers are refused before any key is used.
        for alg in ["none", "HS256"] {
            let h = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","typ":"JWT","kid":"v1"}}"#));
            let t = format!("{h}.{claims}.{sig}");
            assert_eq!(iss.verify(&t), Err(AuthFailure::MalformedToken), "{alg}");
        }

        // Expired: signed by the real key, exp in the past beyond the leeway.
        let now = unix_now();
        let mut expired = iss.verify(&good).unwrap().as_ref().clone();
        expired.iat = now - 100;
        expired.nbf = now - 100;
        expired.exp = now - 30;
        let t = iss.sign(&expired).await.unwrap();
        assert_eq!(iss.verify(t.expose_secret()), Err(AuthFailure::Expired));

        // Not yet valid.
        let mut future = expired.clone();
        future.nbf = now + 600;
        future.exp = now + 1200;
        let t = iss.sign(&future).await.unwrap();
        assert_eq!(iss.verify(t.expose_secret()), Err(AuthFailure::MalformedToken));

        // Another issuer.
        let mut other = expired.clone();
        other.exp = now + 600;
        other.iss = "someone-else".into();
        let t = iss.sign(&other).await.unwrap();
        assert_eq!(iss.verify(t.expose_secret()), Err(AuthFailure::MalformedToken));

        // Unknown key id.
        let h = URL_SAFE_NO_PAD.encode(r#"{"alg":"EdDSA","typ":"JWT","kid":"v9"}"#);
        assert_eq!(iss.verify(&format!("{h}.{claims}.{sig}")), Err(AuthFailure::UnknownSigningKey));

        for junk in ["", "abc", "a.b.c", &"x".repeat(MAX_TOKEN_LEN + 1), "é.é.é"] {
            assert!(iss.verify(junk).is_err(), "{junk:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_token_of_another_installation_is_refused() {
        let (_d1, a) = issuer().await;
        let (_d2, b) = issuer().await;
        let t = a.issue(spec(600)).await.unwrap();
        assert_eq!(b.verify(t.token.expose_secret()), Err(AuthFailure::BadSignature));
    }
}
