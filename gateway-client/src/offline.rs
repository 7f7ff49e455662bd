//! Offline verification of KeyVault tokens: a gateway checks a token's signature against
//! KeyVault's published keys (`GET /v1/auth/jwks`), its times, issuer and audience, its
//! binding to the client certificate presented (`cnf.x5t#S256`, RFC 8705), and the
//! revocations it has polled (`GET /v1/auth/revocations`), without a round trip per
//! request; and reads the attributes the token's role gave it (`attr`).
//!
//! What it cannot know: a revocation newer than its last poll (the kill switch reaches it
//! within the poll interval; a verifier whose last poll is older than
//! `max_revocation_age` refuses every token instead of trusting an old list), and a renewal (a renewed token keeps its string, and its
//! own `exp`: offline it expires then). Short token lifetimes bound both: a unit that
//! talks to offline gateways logs in again instead of renewing
//! ([`crate::ClientBuilder::renew_by_login`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use keyvault_api::auth::{Attributes, Jwks, RevocationFeed};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::client::{Client, Credential, data};
use crate::error::{Error, Result};

/// The records the verifier asks for in one page of the revocation feed, by default.
pub const REVOCATION_POLL_PAGE: u32 = 1000;

/// Why a token was refused offline.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("malformed token")]
    Malformed,
    #[error("signed by a key KeyVault does not publish")]
    UnknownKey,
    #[error("bad signature")]
    BadSignature,
    #[error("expired")]
    Expired,
    #[error("not yet valid")]
    NotYetValid,
    #[error("issued by another issuer")]
    WrongIssuer,
    #[error("not meant for this audience")]
    WrongAudience,
    #[error("bound to another client certificate")]
    CertificateMismatch,
    #[error("revoked")]
    Revoked,
}

/// How tokens are checked.
#[derive(Debug, Clone)]
pub struct OfflineConfig {
    /// KeyVault's `tokens.issuer` (default `keyvault`).
    pub issuer: String,
    /// When set, a token must name this audience (its role's `token_audiences`).
    pub audience: Option<String>,
    /// Clock difference allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// The JWKS is fetched again on an unknown key id at most this often.
    pub min_jwks_refresh: Duration,
    /// Poll the revocation feed this often (`None`: only by
    /// [`TokenVerifier::refresh_revocations`]).
    pub revocation_poll: Option<Duration>,
    /// The records asked for in one page of the revocation feed (1 to 10,000; a poll reads
    /// every page).
    pub revocation_page: u32,
    /// The oldest revocation list `verify` trusts: once the last poll that read the whole
    /// feed began longer ago than this (KeyVault out of reach, the client's token refused),
    /// every token is refused with [`Error::Transport`] until a poll succeeds again, so
    /// that a gateway cut off from KeyVault does not accept revoked tokens until they
    /// expire (fail closed). `None`: the last list is trusted however old (fail open).
    pub max_revocation_age: Option<Duration>,
}

impl Default for OfflineConfig {
    fn default() -> Self {
        OfflineConfig {
            issuer: "keyvault".into(),
            audience: None,
            leeway: Duration::from_secs(5),
            min_jwks_refresh: Duration::from_secs(10),
            revocation_poll: Some(Duration::from_secs(10)),
            revocation_page: REVOCATION_POLL_PAGE,
            max_revocation_age: Some(Duration::from_secs(60)),
        }
    }
}

/// A token that passed, and what it says.
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub subject: String,
    pub accessor: String,
    pub method: String,
    pub role: Option<String>,
    pub policies: Vec<String>,
    /// Unix seconds.
    pub expires_at: u64,
    pub audiences: Vec<String>,
    /// SHA-256 (hex) of the client certificate it is bound to.
    pub bound_certificate_sha256: Option<String>,
    pub spiffe_id: Option<String>,
    /// The role's token attributes.
    pub attributes: Attributes,
}

#[derive(Deserialize)]
struct Cnf {
    #[serde(rename = "x5t#S256")]
    x5t_s256: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    acc: String,
    #[serde(default)]
    meth: String,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    pol: Vec<String>,
    #[serde(default)]
    cnf: Option<Cnf>,
    #[serde(default)]
    spiffe: Option<String>,
    #[serde(default)]
    idg: BTreeMap<String, u64>,
    #[serde(default)]
    par: Option<String>,
    #[serde(default)]
    anc: Vec<String>,
    #[serde(default)]
    attr: Attributes,
    #[serde(default)]
    aud: Vec<String>,
}

/// What the feed said: revoked accessors (until when) and identity generations.
#[derive(Default)]
struct Revoked {
    accessors: HashMap<String, u64>,
    identities: HashMap<(String, String), u64>,
    /// The `since` of the next poll.
    next_since: u64,
    /// When the last poll that read every page began.
    polled_at: Option<Instant>,
}

/// Verifies KeyVault tokens offline. Keep one per process (`Arc`).
pub struct TokenVerifier {
    client: Client,
    config: OfflineConfig,
    keys: RwLock<HashMap<String, Arc<DecodingKey>>>,
    last_jwks: Mutex<Option<Instant>>,
    revoked: RwLock<Revoked>,
    poller: Mutex<Option<tokio::task::AbortHandle>>,
}

impl fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenVerifier").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Drop for TokenVerifier {
    fn drop(&mut self) {
        if let Some(h) = self.poller.lock().unwrap_or_else(|p| p.into_inner()).take() {
            h.abort();
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl TokenVerifier {
    /// Fetch the keys and the revocations once, then poll the feed in the background. The
    /// client's token needs `read` on `auth/revocations`.
    pub async fn new(client: Client, config: OfflineConfig) -> Result<Arc<Self>> {
        if let (Some(every), Some(max)) = (config.revocation_poll, config.max_revocation_age)
            && every >= max
        {
            return Err(Error::Config(format!(
                "revocation_poll ({} ms) must be shorter than max_revocation_age ({} ms): every token would be refused between polls",
                every.as_millis(),
                max.as_millis()
            )));
        }
        let v = Arc::new(TokenVerifier {
            client,
            config,
            keys: RwLock::new(HashMap::new()),
            last_jwks: Mutex::new(None),
            revoked: RwLock::new(Revoked::default()),
            poller: Mutex::new(None),
        });
        v.refresh_keys().await?;
        v.refresh_revocations().await?;
        if let Some(every) = v.config.revocation_poll {
            let weak = Arc::downgrade(&v);
            let h = tokio::spawn(poll(weak, every)).abort_handle();
            *v.poller.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
        }
        Ok(v)
    }

    async fn refresh_keys(&self) -> Result<()> {
        *self.last_jwks.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let reply = self.client.send("GET", "auth/jwks", None, Credential::None).await?;
        let jwks: Jwks = serde_json::from_slice(&reply).map_err(|_| Error::Decode("JWKS".into()))?;
        let mut keys = HashMap::new();
        for k in jwks.keys {
            if k.kty != "OKP" || k.crv != "Ed25519" {
                continue;
            }
            let Ok(raw) = URL_SAFE_NO_PAD.decode(&k.x) else { continue };
            if raw.len() == 32 {
                keys.insert(k.kid, Arc::new(DecodingKey::from_ed_der(&raw)));
            }
        }
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        Ok(())
    }

    /// Poll the revocation feed now, every page of it (`revocation_page` records each);
    /// nothing is applied unless every page was read.
    pub async fn refresh_revocations(&self) -> Result<()> {
        let began = Instant::now();
        let since = self.revoked.read().unwrap_or_else(|p| p.into_inner()).next_since;
        let mut accessors = Vec::new();
        let mut identities = Vec::new();
        let mut first_now = None;
        let mut after: Option<String> = None;
        loop {
            let mut path = format!("auth/revocations?since={since}&limit={}", self.config.revocation_page);
            if let Some(a) = &after {
                path.push_str("&after=");
                path.extend(percent_encoding::utf8_percent_encode(a, percent_encoding::NON_ALPHANUMERIC));
            }
            let reply = self.client.send("GET", &path, None, Credential::Token).await?;
            let feed: RevocationFeed = data(&reply)?;
            first_now.get_or_insert(feed.now);
            accessors.extend(feed.accessors);
            identities.extend(feed.identities);
            match feed.next {
                // A cursor that does not move would loop for ever.
                Some(next) if after.as_ref() != Some(&next) => after = Some(next),
                Some(_) => return Err(Error::Decode("revocation feed: a page named itself as the next".into())),
                None => break,
            }
        }
        let now = unix_now();
        let mut r = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        for a in accessors {
            r.accessors.insert(a.accessor, a.until);
        }
        for i in identities {
            let slot = r.identities.entry((i.kind, i.id)).or_insert(0);
            *slot = (*slot).max(i.generation);
        }
        forget_expired(&mut r.accessors, now, self.config.leeway);
        r.polled_at = Some(r.polled_at.map_or(began, |t| t.max(began)));
        // Replicas' clocks differ: ask again for the last minute (from the first page's
        // clock: what was revoked while later pages were read is read again next time).
        r.next_since = first_now.unwrap_or(now).saturating_sub(60);
        Ok(())
    }

    fn key(&self, kid: &str) -> Option<Arc<DecodingKey>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).get(kid).cloned()
    }

    /// Check `token` as presented with `client_cert_der` (the DER of the client
    /// certificate of the connection, if any): [`Error::Token`] with the reason when it
    /// fails.
    pub async fn verify(&self, token: &str, client_cert_der: Option<&[u8]>) -> Result<VerifiedToken> {
        let reject = |r: Rejection| Error::Token(r);
        if token.len() > 16 * 1024 {
            return Err(reject(Rejection::Malformed));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| reject(Rejection::Malformed))?;
        if header.alg != Algorithm::EdDSA {
            return Err(reject(Rejection::Malformed));
        }
        let kid = header.kid.ok_or(reject(Rejection::Malformed))?;
        let key = match self.key(&kid) {
            Some(k) => k,
            None => {
                // A new signing key since the last fetch (a rotation), at a bounded rate.
                let due = self
                    .last_jwks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_none_or(|t| t.elapsed() >= self.config.min_jwks_refresh);
                if due {
                    self.refresh_keys().await?;
                }
                self.key(&kid).ok_or(reject(Rejection::UnknownKey))?
            }
        };
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.config.leeway.as_secs();
        match &self.config.audience {
            Some(a) => {
                validation.set_audience(&[a]);
                // jsonwebtoken checks `aud` only when a token has one: a token of a role
                // with no audiences would pass a gateway that requires its own.
                validation.set_required_spec_claims(&["exp", "nbf", "iss", "sub", "aud"]);
            }
            None => validation.validate_aud = false,
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                reject(match e.kind() {
                    K::InvalidSignature => Rejection::BadSignature,
                    K::ExpiredSignature => Rejection::Expired,
                    K::ImmatureSignature => Rejection::NotYetValid,
                    K::InvalidIssuer => Rejection::WrongIssuer,
                    K::InvalidAudience => Rejection::WrongAudience,
                    K::MissingRequiredClaim(c) if c == "aud" => Rejection::WrongAudience,
                    _ => Rejection::Malformed,
                })
            })?
            .claims;
        let bound = match &claims.cnf {
            Some(cnf) => {
                let presented = client_cert_der.map(|der| URL_SAFE_NO_PAD.encode(Sha256::digest(der)));
                if presented.as_deref() != Some(cnf.x5t_s256.as_str()) {
                    return Err(reject(Rejection::CertificateMismatch));
                }
                let raw = URL_SAFE_NO_PAD.decode(&cnf.x5t_s256).map_err(|_| reject(Rejection::Malformed))?;
                Some(hex::encode(raw))
            }
            None => None,
        };
        self.check_revocations_fresh()?;
        if self.revoked_token(&claims, bound.as_deref()) {
            return Err(reject(Rejection::Revoked));
        }
        Ok(VerifiedToken {
            subject: claims.sub,
            accessor: claims.acc,
            method: claims.meth,
            role: claims.role,
            policies: claims.pol,
            expires_at: claims.exp,
            audiences: claims.aud,
            bound_certificate_sha256: bound,
            spiffe_id: claims.spiffe,
            attributes: claims.attr,
        })
    }

    /// [`Error::Transport`] if the revocation list is older than `max_revocation_age`.
    fn check_revocations_fresh(&self) -> Result<()> {
        let Some(max) = self.config.max_revocation_age else { return Ok(()) };
        let polled_at = self.revoked.read().unwrap_or_else(|p| p.into_inner()).polled_at;
        match polled_at.map(|t| t.elapsed()) {
            Some(age) if age <= max => Ok(()),
            age => Err(Error::Transport(format!(
                "the revocation feed was last read {} ago, longer than max_revocation_age ({} s): no token is accepted until it is read again",
                age.map_or("never".to_owned(), |a| format!("{} s", a.as_secs())),
                max.as_secs()
            ))),
        }
    }

    /// Revoked by accessor (its own, its parent's or an ancestor's), or one of its
    /// identities revoked after it was issued (a newer generation).
    fn revoked_token(&self, c: &Claims, cert_hex: Option<&str>) -> bool {
        let r = self.revoked.read().unwrap_or_else(|p| p.into_inner());
        let accessors: HashSet<&str> =
            std::iter::once(c.acc.as_str()).chain(c.par.as_deref()).chain(c.anc.iter().map(String::as_str)).collect();
        if accessors.iter().any(|a| r.accessors.contains_key(*a)) {
            return true;
        }
        let user = c.sub.strip_prefix("userpass:").filter(|_| c.meth == "userpass");
        let ids = [("role", c.role.as_deref()), ("user", user), ("cert", cert_hex), ("spiffe", c.spiffe.as_deref())];
        ids.iter().filter_map(|(k, v)| v.map(|v| (*k, v))).any(|(kind, id)| {
            let current = r.identities.get(&(kind.to_owned(), id.to_owned())).copied().unwrap_or(0);
            current > c.idg.get(kind).copied().unwrap_or(0)
        })
    }
}

/// Forget revoked accessors whose tokens have all expired: past `until`, with the clock
/// difference `verify` allows on `exp` (`leeway`) and a minute more.
fn forget_expired(accessors: &mut HashMap<String, u64>, now: u64, leeway: Duration) {
    let keep_for = leeway.as_secs().saturating_add(60);
    accessors.retain(|_, until| until.saturating_add(keep_for) >= now);
}

async fn poll(weak: Weak<TokenVerifier>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(v) = weak.upgrade() else { return };
        if let Err(e) = v.refresh_revocations().await {
            tracing::warn!(error = %e, "KeyVault revocation feed not read; keeping the last one");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A revoked accessor is kept as long as a token of it could still pass `verify`:
    /// past its `until` by the leeway (before: a fixed minute, so a leeway over a minute
    /// let a revoked token pass again).
    #[test]
    fn a_revoked_accessor_outlives_the_leeway() {
        let now = 1_000_000;
        for leeway in [0, 5, 60, 300, 3600] {
            let leeway = Duration::from_secs(leeway);
            let mut a: HashMap<String, u64> = HashMap::new();
            // `until` such that a token of it still passes `verify` now: exp + leeway >= now.
            let until = now - leeway.as_secs();
            a.insert("live".into(), until);
            a.insert("gone".into(), now - leeway.as_secs() - 61);
            forget_expired(&mut a, now, leeway);
            assert!(a.contains_key("live"), "leeway {leeway:?}");
            assert!(!a.contains_key("gone"), "leeway {leeway:?}");
        }
    }
}
