//! `/v1/auth/...`: logins (every method), the roles and users they log in as, one-time
//! bootstrap tokens, and the token's own lifecycle.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Sensitive, policy_list, vault_duration};

/// The `auth` block of a login (and renewal) reply: the token and what it carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Auth {
    pub client_token: Sensitive,
    pub accessor: String,
    pub policies: Vec<String>,
    #[cfg_attr(feature = "openapi", schema(value_type = crate::schema::PolicyList))]
    pub token_policies: Vec<String>,
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Seconds left.
    pub lease_duration: u64,
    pub renewable: bool,
    pub token_type: String,
    pub orphan: bool,
    /// RFC 8705: the thumbprint of the client certificate the token is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_certificate_x5t_s256: Option<String>,
}

/// The token settings every role carries (Vault's names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenSettings {
    #[serde(default, with = "policy_list")]
    #[cfg_attr(feature = "openapi", schema(value_type = crate::schema::PolicyList))]
    pub token_policies: Vec<String>,
    #[serde(default, with = "vault_duration", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<crate::schema::Duration>))]
    pub token_ttl: Option<Duration>,
    #[serde(default, with = "vault_duration", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<crate::schema::Duration>))]
    pub token_max_ttl: Option<Duration>,
    /// Tokens of this role must be bound to a client certificate (RFC 8705): a login
    /// without one is refused.
    #[serde(default)]
    pub bind_certificate: bool,
    /// Attributes carried by this role's tokens in the `attr` claim, for gateways that
    /// verify tokens offline (e.g. `tenant_id`, `tier`, `capabilities`). Bounded by
    /// [`check_attributes`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub token_attributes: Attributes,
    /// Audiences of this role's tokens (the `aud` claim): the gateways meant to accept
    /// them. At most 8, each 1-128 printable ASCII characters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_audiences: Vec<String>,
}

/// The fields of [`TokenSettings`], which every role body may carry besides its
/// method's own.
pub const TOKEN_FIELDS: [&str; 6] =
    ["token_policies", "token_ttl", "token_max_ttl", "bind_certificate", "token_attributes", "token_audiences"];

/// One token attribute: a string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum AttributeValue {
    One(String),
    Many(Vec<String>),
}

/// Token attributes by name (the `attr` claim).
pub type Attributes = BTreeMap<String, AttributeValue>;

/// At most this many attributes per role.
pub const MAX_ATTRIBUTES: usize = 16;
/// At most this many bytes of JSON for all of a role's attributes (they ride in every
/// token).
pub const MAX_ATTRIBUTES_BYTES: usize = 2048;

/// The bounds of token attributes and audiences: names of 1-64 characters of
/// `[a-z0-9_]`; values of 1-256 characters without control characters whose
/// `/`-separated parts are none of ``, `.` and `..` (a value is granted by its path,
/// `sys/token-attributes/grant/<name>/<value>`, and one that a consumer could normalise
/// into another could pass a grant meant for a prefix of it); lists of 1-32 values;
/// [`MAX_ATTRIBUTES`] names and [`MAX_ATTRIBUTES_BYTES`] of JSON in all.
pub fn check_attributes(attributes: &Attributes, audiences: &[String]) -> Result<(), String> {
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(format!("at most {MAX_ATTRIBUTES} token_attributes"));
    }
    let value_ok = |v: &str| {
        (1..=256).contains(&v.len())
            && !v.chars().any(char::is_control)
            && (!v.contains('/') || v.split('/').all(|part| !matches!(part, "" | "." | "..")))
    };
    for (name, value) in attributes {
        if name.is_empty()
            || name.len() > 64
            || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(format!("token attribute name {name:?}: 1-64 characters of [a-z0-9_]"));
        }
        let ok = match value {
            AttributeValue::One(v) => value_ok(v),
            AttributeValue::Many(l) => (1..=32).contains(&l.len()) && l.iter().all(|v| value_ok(v)),
        };
        if !ok {
            return Err(format!(
                "token attribute {name}: values of 1-256 characters (no empty, `.` or `..` part between `/`), \
                 lists of 1-32 values"
            ));
        }
    }
    let bytes = serde_json::to_vec(attributes).map(|v| v.len()).unwrap_or(usize::MAX);
    if bytes > MAX_ATTRIBUTES_BYTES {
        return Err(format!("token_attributes: {bytes} bytes of JSON, at most {MAX_ATTRIBUTES_BYTES}"));
    }
    if audiences.len() > 8
        || audiences.iter().any(|a| a.is_empty() || a.len() > 128 || !a.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err("token_audiences: at most 8, each 1-128 printable ASCII characters".into());
    }
    Ok(())
}

/// A role as `GET` shows it: the token settings in seconds, and the method's own fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenSettingsView {
    pub token_policies: Vec<String>,
    pub token_ttl: u64,
    pub token_max_ttl: u64,
    pub bind_certificate: bool,
    #[serde(default)]
    pub token_attributes: Attributes,
    #[serde(default)]
    pub token_audiences: Vec<String>,
}

impl From<&TokenSettings> for TokenSettingsView {
    fn from(t: &TokenSettings) -> Self {
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs()).unwrap_or(0);
        TokenSettingsView {
            token_policies: t.token_policies.clone(),
            token_ttl: secs(t.token_ttl),
            token_max_ttl: secs(t.token_max_ttl),
            bind_certificate: t.bind_certificate,
            token_attributes: t.token_attributes.clone(),
            token_audiences: t.token_audiences.clone(),
        }
    }
}

// ---- logins ----

/// `POST /v1/auth` (the short form): `{"role": ...}` and the credentials of the role's
/// method, e.g. `{"role": "web", "secret_id": "..."}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RoleHint {
    #[serde(default)]
    pub role: Option<String>,
}

/// `POST /v1/auth/approle/login`: the role (by name, or by role id) and a secret id.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AppRoleLogin {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_id: Option<String>,
    pub secret_id: Sensitive,
}

/// `POST /v1/auth/userpass/login/<user>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserpassLogin {
    pub password: Sensitive,
}

/// `POST /v1/auth/cert/login` (over mutual TLS): optionally the role to log in as.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CertLogin {
    /// Vault's field name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The short form's field name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// `POST /v1/auth/kubernetes/login`: a role and the pod's service-account token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KubernetesLogin {
    pub role: String,
    pub jwt: Sensitive,
}

/// `POST /v1/auth/bootstrap/login`: the one-time bootstrap token (consumed).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BootstrapLogin {
    pub token: Sensitive,
}

// ---- AppRole ----

/// AppRole's own role fields (`POST /v1/auth/approle/role/<name>`, with [`TokenSettings`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AppRoleRole {
    /// How long a secret id of this role stays valid. Default 7 days; `0` means never.
    #[serde(default = "default_secret_id_ttl", with = "vault_duration")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<crate::schema::Duration>))]
    pub secret_id_ttl: Option<Duration>,
    /// How many logins a secret id allows; `0`: any number.
    #[serde(default)]
    pub secret_id_num_uses: u64,
}

/// The default lifetime of a secret id: a week.
pub const DEFAULT_SECRET_ID_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

fn default_secret_id_ttl() -> Option<Duration> {
    Some(DEFAULT_SECRET_ID_TTL)
}

impl Default for AppRoleRole {
    fn default() -> Self {
        AppRoleRole { secret_id_ttl: default_secret_id_ttl(), secret_id_num_uses: 0 }
    }
}

/// `GET /v1/auth/approle/role/<name>/role-id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RoleId {
    pub role_id: String,
}

/// `POST /v1/auth/approle/role/<name>/secret-id`: a new secret id, shown once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SecretId {
    pub secret_id: Sensitive,
    pub secret_id_accessor: String,
    /// Seconds; 0: never expires.
    pub secret_id_ttl: u64,
    /// 0: any number of logins.
    pub secret_id_num_uses: u64,
}

// ---- cert ----

/// Which certificates a cert role accepts (`/v1/auth/cert/certs/<name>`, with
/// [`TokenSettings`]). Every category that is set must match; at least one must be set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CertRole {
    /// Vault's `certificate` (PEM): a CA certificate that must have issued the client
    /// certificate itself (its issuer name is the CA's subject), or a certificate that is
    /// not a CA, which the client certificate must be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// SHA-256 fingerprints of accepted certificates (hex; `:` separators allowed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificate_sha256: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_common_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_dns_sans: Vec<String>,
    /// Exact URIs, or prefixes ending in `*` (`spiffe://corp/ns/payments/*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_uri_sans: Vec<String>,
    /// Requests over mTLS with a matching certificate and no token are authorized with
    /// this role's policies.
    #[serde(default)]
    pub allow_direct: bool,
}

// ---- kubernetes ----

/// `POST /v1/auth/kubernetes/config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KubernetesConfig {
    /// The `iss` of the cluster's service-account tokens.
    pub issuer: String,
    /// The cluster's public keys, inline: a JWKS or PEM public keys, at most 64 KiB.
    pub public_keys: String,
    /// Accepted audiences; a role may narrow them to one.
    pub audiences: Vec<String>,
}

/// A Kubernetes role: which service accounts in which namespaces it accepts (`*`: any).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KubernetesRole {
    pub bound_service_account_names: Vec<String>,
    pub bound_service_account_namespaces: Vec<String>,
    /// The audience this role's tokens must carry (one of the mount's audiences).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
}

// ---- userpass ----

/// `POST /v1/auth/userpass/users/<user>`. As in Vault, an update changes only the fields
/// it gives; `password` is required when creating.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserWrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Sensitive>,
    #[serde(default, deserialize_with = "some_policies", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<crate::schema::PolicyList>))]
    pub token_policies: Option<Vec<String>>,
    #[serde(default, deserialize_with = "some_duration", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<crate::schema::Duration>))]
    pub token_ttl: Option<Option<Duration>>,
    #[serde(default, deserialize_with = "some_duration", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<crate::schema::Duration>))]
    pub token_max_ttl: Option<Option<Duration>>,
}

fn some_policies<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    policy_list::deserialize(d).map(Some)
}

fn some_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<Duration>>, D::Error> {
    vault_duration::deserialize(d).map(Some)
}

/// A user as `GET` shows it (never the hash).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserView {
    pub token_policies: Vec<String>,
    pub token_ttl: u64,
    pub token_max_ttl: u64,
}

// ---- bootstrap tokens ----

/// `POST /v1/auth/bootstrap/token`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BootstrapMint {
    /// Policies of the token the bootstrap token will be exchanged for.
    #[serde(default, with = "policy_list")]
    #[cfg_attr(feature = "openapi", schema(value_type = crate::schema::PolicyList))]
    pub policies: Vec<String>,
    /// How long the bootstrap token may wait to be used (default 15 minutes, at most 24 h).
    #[serde(default, with = "vault_duration")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<crate::schema::Duration>))]
    pub ttl: Option<Duration>,
    /// TTL of the token it is exchanged for.
    #[serde(default, with = "vault_duration")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<crate::schema::Duration>))]
    pub token_ttl: Option<Duration>,
    /// A name for audit and token metadata (e.g. the VM's host name).
    #[serde(default)]
    pub display_name: Option<String>,
}

/// A freshly minted bootstrap token, shown once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BootstrapMinted {
    pub bootstrap_token: Sensitive,
    pub accessor: String,
    /// Seconds it may wait to be used.
    pub ttl: u64,
}

// ---- the token's own lifecycle ----

/// `GET /v1/auth/token/lookup-self` (and `lookup`, `lookup-accessor`), Vault's shape.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenLookup {
    /// The token itself (`lookup-self` only: the caller's own; empty for a lookup by
    /// accessor, as in Vault).
    pub id: Sensitive,
    pub accessor: String,
    pub policies: Vec<String>,
    pub display_name: String,
    /// String values only (Vault's clients decode it as a map of strings).
    pub meta: std::collections::BTreeMap<String, String>,
    pub num_uses: u64,
    pub orphan: bool,
    pub entity_id: String,
    pub creation_ttl: u64,
    pub path: String,
    pub issue_time: String,
    pub creation_time: u64,
    pub expire_time: String,
    pub ttl: u64,
    pub explicit_max_ttl: u64,
    pub renewable: bool,
    pub bound_certificate_x5t_s256: Option<String>,
    pub spiffe_id: Option<String>,
    /// `service`, or `direct-certificate` for a request authenticated by its client
    /// certificate alone.
    #[serde(rename = "type")]
    pub token_type: String,
}

/// `POST /v1/auth/token/renew-self`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RenewSelf {
    /// Requested new TTL from now (capped by the token's maximum).
    #[serde(default, with = "vault_duration")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<crate::schema::Duration>))]
    pub increment: Option<Duration>,
}

/// `POST /v1/auth/token/create` and `create-orphan`: a token for something the caller
/// starts (Vault's fields). Its policies must be the caller's to give; it lives no longer
/// than its parent could, and dies with it (not an orphan's).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenCreate {
    /// Default: the caller's policies.
    #[serde(default, deserialize_with = "optional_policies", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<crate::schema::PolicyList>))]
    pub policies: Option<Vec<String>>,
    #[serde(default, with = "vault_duration")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<crate::schema::Duration>))]
    pub ttl: Option<Duration>,
    #[serde(default, with = "vault_duration")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<crate::schema::Duration>))]
    pub explicit_max_ttl: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub meta: std::collections::BTreeMap<String, String>,
    /// Only through `create-orphan` here.
    #[serde(default)]
    pub no_parent: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewable: Option<bool>,
    /// Limited-use tokens are not supported: 0 only.
    #[serde(default)]
    pub num_uses: u64,
}

fn optional_policies<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    policy_list::deserialize(d).map(Some)
}

/// `POST /v1/auth/token/lookup` and `revoke`: another token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenRef {
    pub token: Sensitive,
}

/// `POST /v1/auth/token/renew`: another token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RenewToken {
    pub token: Sensitive,
    #[serde(default, with = "vault_duration")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<crate::schema::Duration>))]
    pub increment: Option<Duration>,
}

/// `POST /v1/auth/token/revoke-accessor`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RevokeAccessor {
    #[serde(default)]
    pub accessor: String,
}

/// `GET /v1/auth/jwks`: the keys that verify KeyVault's tokens (no token needed).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// One token-verification key (RFC 8037: an Ed25519 OKP key).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub alg: String,
    #[serde(rename = "use")]
    pub usage: String,
    pub kid: String,
    /// The public key, base64url without padding.
    pub x: String,
}

/// `GET /v1/auth/revocations?since=<unix seconds>`: what a gateway verifying tokens
/// offline must refuse besides expired tokens. Revoked accessors stay listed until the
/// tokens they name could no longer be valid anyway; identity revocations (the kill
/// switch) are listed with their generation: a token whose `idg` generation for that
/// identity is lower is revoked.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RevocationFeed {
    /// The server's clock when the feed was read: the next poll's `since` (minus a margin
    /// for replicas' clocks).
    pub now: u64,
    pub accessors: Vec<RevokedAccessor>,
    pub identities: Vec<RevokedIdentity>,
    /// More records follow: ask again with the same `since` and this as `after`. Absent on
    /// the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// One revoked token accessor (tokens issued from it, `par` and `anc`, are revoked too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RevokedAccessor {
    pub accessor: String,
    /// Unix seconds, by the revoking replica's clock (0: not recorded).
    pub revoked_at: u64,
    /// Listed until then.
    pub until: u64,
}

/// One identity revoked by the kill switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RevokedIdentity {
    /// `role`, `user`, `cert` (the certificate's SHA-256, hex) or `spiffe`.
    pub kind: String,
    pub id: String,
    pub generation: u64,
    pub revoked_at: u64,
}

/// The query of `GET /v1/auth/revocations`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RevocationsQuery {
    /// Only what was revoked at or after this time (unix seconds; default: everything).
    #[serde(default)]
    pub since: u64,
    /// The `next` of the previous page (opaque).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// At most this many stored records are read for the page (1 to
    /// [`REVOCATION_PAGE_MAX`]); a page may hold fewer entries and still have a `next`.
    /// Without it the whole feed is answered in one reply if it is at most
    /// [`REVOCATION_PAGE_MAX`] records, and refused (400) otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// The largest page of `GET /v1/auth/revocations`, in stored records.
pub const REVOCATION_PAGE_MAX: u32 = 10_000;
