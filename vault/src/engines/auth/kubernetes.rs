//! Kubernetes service-account auth: a pod presents its projected service-account token;
//! KeyVault verifies it in process against the cluster's public keys (a JWKS or PEM
//! document given inline in the configuration request: no request ever names a file on
//! the server), with issuer, audience and expiry, and maps the service account to a role
//! bound to namespaces and service-account names. When the cluster rotates its keys, the
//! admin posts the new document (both keys during the overlap).
//!
//! No call to the Kubernetes API (TokenReview) is made: the cluster's signing keys are
//! enough to verify, and KeyVault keeps working when the API server is unreachable. The
//! trade: a service account deleted in the cluster keeps working until its token expires
//! (projected tokens live one hour by default).

use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;

use super::{LoginOutcome, RoleAdmin, RoleStore, RoleView, StoredRole, validate_name};
use crate::engines::EngineKind;
use crate::error::{AuthFailure, Error, Result};
use crate::logical::{Access, Engine, EngineInfo, OpSpec, Operation, Reply, Request, Route};
use crate::policy::Capability;
use crate::store::{Store, encode_json, get_json};

pub const METHOD: &str = "kubernetes";

pub const KIND: EngineKind = EngineKind {
    info: EngineInfo {
        name: METHOD,
        description: "Kubernetes service-account tokens, verified against the cluster's public keys",
        auth: true,
        routes: ROUTES,
    },
    fixed_at: None,
    once: true,
    takes_options: false,
    build: |core, _| Ok(Arc::new(KubernetesAuth::new(core.store.clone()))),
};

const ROLES: [Route; 2] = crate::role_routes!("role", "role", keyvault_api::auth::KubernetesRole);

const ROUTES: &[Route] = &[
    Route::new(
        "login",
        "log in with a role and a service-account token",
        &[OpSpec::compute(Access::Login).body::<keyvault_api::auth::KubernetesLogin>()],
    ),
    Route::new(
        "config",
        "the cluster's issuer, public keys and audiences",
        &[
            OpSpec::read(Access::Needs(Capability::Read)).data::<keyvault_api::auth::KubernetesConfig>(),
            // The issuer and keys decide who logs in as every role of the method: `sudo`,
            // and the grants of every role (docs/api.md).
            OpSpec::write(Access::Sudo(Capability::Update))
                .body::<keyvault_api::auth::KubernetesConfig>()
                .answers(crate::logical::openapi::Answer::Empty),
        ],
    ),
    ROLES[0],
    ROLES[1],
];
const CONFIG_KEY: &str = "auth/kubernetes/config";
const MAX_JWT_LEN: usize = 16 * 1024;
/// The largest public key document accepted (a JWKS of a few dozen keys).
pub const MAX_PUBLIC_KEYS_LEN: usize = 64 * 1024;

/// The auth mount's configuration (`POST /v1/auth/kubernetes/config`): the issuer, the
/// cluster's public keys inline (a JWKS or PEM keys, at most [`MAX_PUBLIC_KEYS_LEN`]
/// bytes), the accepted audiences.
pub use keyvault_api::auth::KubernetesConfig as KubeConfig;
/// A role: which service accounts in which namespaces it accepts (`*` for any).
pub use keyvault_api::auth::KubernetesRole as KubeRoleConfig;

#[derive(Deserialize)]
struct SaClaims {
    sub: String,
    #[serde(rename = "kubernetes.io", default)]
    kubernetes: Option<KubeInfo>,
}

#[derive(Deserialize)]
struct KubeInfo {
    namespace: String,
    serviceaccount: NameOnly,
}

#[derive(Deserialize)]
struct NameOnly {
    name: String,
}

/// A verification key from the file.
struct PublicKey {
    kid: Option<String>,
    family: AlgorithmFamily,
    key: DecodingKey,
}

/// The parsed keys of one public key document, by its digest.
#[derive(Default)]
struct KeyCache {
    digest: [u8; 32],
    keys: Arc<Vec<PublicKey>>,
}

#[derive(Debug)]
pub struct KubernetesAuth {
    store: Arc<dyn Store>,
    roles: RoleStore<KubeRoleConfig>,
    cache: RwLock<KeyCache>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache").field("keys", &self.keys.len()).finish()
    }
}

/// Parse a JWKS or PEM public keys. Errors describe the problem, never echo the input.
fn parse_keys(text: &str) -> Result<Vec<PublicKey>> {
    let bad = |why: &str| Error::invalid(format!("public_keys: {why}"));
    if text.len() > MAX_PUBLIC_KEYS_LEN {
        return Err(bad("longer than 64 KiB"));
    }
    let mut keys = Vec::new();
    if text.trim_start().starts_with('{') {
        let set: jsonwebtoken::jwk::JwkSet =
            crate::json::from_slice_strict(text.as_bytes()).map_err(|_| bad("not a valid JWKS document"))?;
        for jwk in &set.keys {
            let key = DecodingKey::from_jwk(jwk).map_err(|_| bad("a JWK is not a usable public key"))?;
            keys.push(PublicKey { kid: jwk.common.key_id.clone(), family: key.family(), key });
        }
    } else {
        for block in
            text.split_inclusive("-----END PUBLIC KEY-----").filter(|b| b.contains("-----BEGIN PUBLIC KEY-----"))
        {
            let pem = block.trim().as_bytes();
            let key = DecodingKey::from_rsa_pem(pem)
                .or_else(|_| DecodingKey::from_ec_pem(pem))
                .or_else(|_| DecodingKey::from_ed_pem(pem))
                .map_err(|_| bad("a PEM block is not an RSA, EC or Ed25519 public key"))?;
            keys.push(PublicKey { kid: None, family: key.family(), key });
        }
    }
    if keys.is_empty() {
        return Err(bad("no public key found (give a JWKS or PEM public keys)"));
    }
    Ok(keys)
}

/// The signature algorithms accepted for service-account tokens (never `none` or HMAC).
fn allowed(alg: Algorithm) -> bool {
    matches!(
        alg,
        Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512
            | Algorithm::ES256
            | Algorithm::ES384
            | Algorithm::EdDSA
    )
}

fn bound(list: &[String], value: &str) -> bool {
    list.iter().any(|v| v == "*" || v == value)
}

impl KubernetesAuth {
    pub fn new(store: Arc<dyn Store>) -> Self {
        KubernetesAuth { roles: RoleStore::new(store.clone(), METHOD), store, cache: RwLock::new(KeyCache::default()) }
    }

    pub async fn write_config(&self, config: KubeConfig) -> Result<()> {
        if config.issuer.is_empty() || config.audiences.is_empty() {
            return Err(Error::invalid("issuer and at least one audience are required"));
        }
        // Refuse keys that cannot be used now rather than failing every login later.
        parse_keys(&config.public_keys)?;
        self.store.put(CONFIG_KEY, &encode_json(&config)).await?;
        Ok(())
    }

    pub async fn read_config(&self) -> Result<KubeConfig> {
        get_json(self.store.as_ref(), CONFIG_KEY)
            .await?
            .ok_or_else(|| Error::NotFound("the kubernetes auth method is not configured".into()))
    }

    /// The parsed keys of the configured document (parsed once per document).
    fn keys(&self, document: &str) -> Result<Arc<Vec<PublicKey>>> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(document.as_bytes()).into();
        {
            let c = self.cache.read().unwrap_or_else(|p| p.into_inner());
            if c.digest == digest && !c.keys.is_empty() {
                return Ok(c.keys.clone());
            }
        }
        let keys = Arc::new(parse_keys(document)?);
        *self.cache.write().unwrap_or_else(|p| p.into_inner()) = KeyCache { digest, keys: keys.clone() };
        Ok(keys)
    }
}

#[async_trait]
impl RoleAdmin for KubernetesAuth {
    type Config = KubeRoleConfig;

    async fn current(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.roles.load_raw(name).await?.map(|(raw, _)| raw))
    }

    async fn write_role(
        &self,
        name: &str,
        config: KubeRoleConfig,
        token: super::TokenSettings,
        expected: Option<&[u8]>,
    ) -> Result<()> {
        if config.bound_service_account_names.is_empty() || config.bound_service_account_namespaces.is_empty() {
            return Err(Error::invalid(
                "bound_service_account_names and bound_service_account_namespaces are required (\"*\" for any)",
            ));
        }
        // A role narrows the mount's audiences, never widens them: setting those takes
        // `sudo` and a grant of everything, writing a role does not. (Checked at login
        // too, against the configuration then.)
        if let Some(a) = &config.audience {
            match get_json::<KubeConfig>(self.store.as_ref(), CONFIG_KEY).await? {
                Some(c) if !c.audiences.contains(a) => {
                    return Err(Error::invalid(format!(
                        "audience {a:?} is not one of the mount's audiences (auth/kubernetes/config)"
                    )));
                }
                _ => {}
            }
        }
        self.roles.save(name, &StoredRole { config, token }, expected).await
    }

    async fn read_role(&self, name: &str) -> Result<Reply> {
        Reply::data(&RoleView::of(&self.roles.require(name).await?))
    }

    async fn delete_role(&self, name: &str) -> Result<()> {
        self.roles.delete(name).await.map(drop)
    }

    async fn list_roles(&self) -> Result<Vec<String>> {
        self.roles.names().await
    }
}

#[async_trait]
impl Engine for KubernetesAuth {
    fn info(&self) -> &'static EngineInfo {
        &KIND.info
    }

    async fn existence(&self, req: &Request) -> Result<Option<Vec<u8>>> {
        self.current(req.param("name")).await
    }

    async fn login_identity(&self, req: &Request) -> Option<String> {
        super::LoginClaim::parse(&req.body).role()
    }

    async fn handle(&self, req: &mut Request) -> Result<Reply> {
        match (req.route.pattern, req.operation) {
            ("config", Operation::Read) => Reply::data(&self.read_config().await?),
            ("config", _) => {
                let config = req.data()?;
                // Whoever sets the keys can sign a login for any role, now and later: the
                // caller must be able to grant anything a role can carry.
                req.caller()?.check_any_grant()?;
                self.write_config(config).await?;
                Ok(Reply::empty())
            }
            _ => super::handle_role(self, req).await,
        }
    }

    async fn login(&self, req: &mut Request) -> Result<LoginOutcome> {
        let body: keyvault_api::auth::KubernetesLogin = req.data()?;
        validate_name("role", &body.role)?;
        let invalid = || Error::Unauthenticated(AuthFailure::InvalidCredentials);
        let jwt = body.jwt.expose();
        if jwt.len() > MAX_JWT_LEN {
            return Err(invalid());
        }
        let config = self.read_config().await?;
        let role = self.roles.load(&body.role).await?.ok_or_else(invalid)?;
        let header = jsonwebtoken::decode_header(jwt).map_err(|_| invalid())?;
        if !allowed(header.alg) {
            return Err(invalid());
        }
        let keys = self.keys(&config.public_keys)?;
        let audiences: Vec<&str> = match &role.config.audience {
            // One of the mount's audiences as they are now, or none (a role written before
            // the mount's audiences changed).
            Some(a) if config.audiences.contains(a) => vec![a.as_str()],
            Some(_) => return Err(invalid()),
            None => config.audiences.iter().map(String::as_str).collect(),
        };
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 5;
        let candidates = keys.iter().filter(|k| {
            k.family == header.alg.family() && (header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
        });
        let claims = candidates
            .filter_map(|k| jsonwebtoken::decode::<SaClaims>(jwt, &k.key, &validation).ok())
            .map(|d| d.claims)
            .next()
            .ok_or_else(invalid)?;
        let (namespace, name) = match claims.kubernetes {
            Some(k) => (k.namespace, k.serviceaccount.name),
            None => {
                let mut parts = claims.sub.strip_prefix("system:serviceaccount:").ok_or_else(invalid)?.splitn(2, ':');
                match (parts.next(), parts.next()) {
                    (Some(ns), Some(n)) => (ns.to_owned(), n.to_owned()),
                    _ => return Err(invalid()),
                }
            }
        };
        if !bound(&role.config.bound_service_account_namespaces, &namespace)
            || !bound(&role.config.bound_service_account_names, &name)
        {
            return Err(invalid());
        }
        let mut outcome = LoginOutcome::for_role(METHOD, &body.role, &role.token);
        outcome.metadata.insert("service_account_namespace".into(), namespace);
        outcome.metadata.insert("service_account_name".into(), name);
        Ok(outcome)
    }
}
