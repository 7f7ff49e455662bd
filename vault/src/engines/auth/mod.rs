//! The auth methods, one file each, mounted under `auth/`: their login route checks
//! credentials and yields a [`LoginOutcome`], which the pipeline turns into a signed token.
//! What every method with roles shares is here: [`RoleAdmin`], the role routes and
//! [`handle_role`].

use async_trait::async_trait;
use serde::Serialize;

pub use crate::auth::{
    ClaimedRole, LoginClaim, LoginOutcome, RoleStore, StoredRole, TokenSettings, policy_list, validate_name,
    vault_duration,
};
use crate::error::{Error, Result};
use crate::logical::{Operation, Params, Reply, Request};

pub mod approle;
pub mod bootstrap;
pub mod cert;
pub mod kubernetes;
pub mod userpass;

/// Whether the role or user a token was issued by still grants it, as a renewal needs
/// (as in Vault: "role does not exist during renewal", "policies have changed"): it
/// exists, and its policies still include every policy of the token. Tokens of other
/// methods (bootstrap, token create) have nothing to check here, nor a child token (made
/// by `auth/token/create`: it carries its parent's method and role, but its policies were
/// granted by its parent, and Vault renews it through the token store). 400 otherwise:
/// the caller logs in again, and gets what the role grants now.
///
/// A certificate login's token is renewed by its holder only, over the certificate it is
/// bound to (`peer`: the renewing connection's), and that certificate must still meet
/// the role's constraints (its pins, names, SANs and `certificate`), as Vault's cert
/// method checks at renewal: a role narrowed by an admin to exclude a certificate ends
/// that certificate's tokens at their current expiry.
pub async fn still_granted(
    store: &std::sync::Arc<dyn crate::store::Store>,
    claims: &crate::token::Claims,
    peer: Option<&crate::tls::ClientCert>,
) -> Result<()> {
    if claims.par.is_some() {
        return Ok(());
    }
    let role = || claims.role.as_deref();
    let current = match claims.meth.as_str() {
        crate::auth::cert::METHOD => {
            let Some(name) = role() else { return Ok(()) };
            let holder = peer.filter(|c| claims.cnf.as_ref().is_some_and(|b| b.x5t_s256 == c.x5t_s256));
            let Some(cert) = holder else {
                return Err(Error::invalid(
                    "a certificate login's token is renewed by its holder, over the certificate it is bound to",
                ));
            };
            let roles: RoleStore<crate::auth::cert::CertRoleConfig> =
                RoleStore::new(store.clone(), crate::auth::cert::METHOD);
            match roles.load(name).await? {
                Some(r) if !crate::auth::cert::matches(&r.config, cert) => {
                    return Err(Error::invalid(
                        "the certificate no longer meets the role this token was issued by; log in again",
                    ));
                }
                r => r.map(|r| r.token.token_policies),
            }
        }
        approle::METHOD | kubernetes::METHOD => {
            let Some(name) = role() else { return Ok(()) };
            let method = if claims.meth == approle::METHOD { approle::METHOD } else { kubernetes::METHOD };
            let roles: RoleStore<serde_json::Value> = RoleStore::new(store.clone(), method);
            roles.load(name).await?.map(|r| r.token.token_policies)
        }
        crate::auth::userpass::METHOD => {
            let Some(name) = claims.sub.strip_prefix("userpass:") else { return Ok(()) };
            userpass::UserPass::new(store.clone()).current_policies(name).await?
        }
        _ => return Ok(()),
    };
    match current {
        None => Err(Error::invalid("the role or user this token was issued by no longer exists; log in again")),
        Some(now) if !claims.pol.iter().all(|p| now.contains(p)) => {
            Err(Error::invalid("the policies of the role or user this token was issued by have changed; log in again"))
        }
        Some(_) => Ok(()),
    }
}

/// Role administration, the same for every method with roles (`auth/<mount>/role/<name>`).
#[async_trait]
pub trait RoleAdmin: Send + Sync {
    /// The method's own role fields (besides [`TokenSettings`]).
    type Config: serde::de::DeserializeOwned + Send;
    /// The stored bytes of role `name`, if it exists (the existence check that decides
    /// between `create` and `update`, and what the write then expects to replace).
    async fn current(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// Create (`expected == None`) or update a role, if what is stored is still
    /// `expected`; 409 otherwise.
    async fn write_role(
        &self,
        name: &str,
        config: Self::Config,
        token: TokenSettings,
        expected: Option<&[u8]>,
    ) -> Result<()>;
    /// The role as `GET` shows it.
    async fn read_role(&self, name: &str) -> Result<Reply>;
    async fn delete_role(&self, name: &str) -> Result<()>;
    async fn list_roles(&self) -> Result<Vec<String>>;
}

/// A role as `GET` shows it: the token settings (in seconds) and the method's fields.
#[derive(Debug, Serialize)]
pub struct RoleView<'a, T: Serialize> {
    #[serde(flatten)]
    pub token: keyvault_api::auth::TokenSettingsView,
    #[serde(flatten)]
    pub config: &'a T,
}

impl<'a, T: Serialize> RoleView<'a, T> {
    pub fn of(role: &'a StoredRole<T>) -> Self {
        RoleView { token: (&role.token).into(), config: &role.config }
    }
}

/// Role names: the common name rule, checked before authorization.
pub fn role_name(_: Operation, p: &mut Params) -> Result<()> {
    validate_name("role", p.get("name").unwrap_or_default())
}

/// The routes of role administration, under `prefix/` (`role/`); `$fields` is the
/// method's own role fields (beside the token settings every role has).
#[macro_export]
macro_rules! role_routes {
    ($prefix:literal, $policy:literal, $fields:ty) => {
        [
            $crate::logical::Route::new(
                $prefix,
                "list roles",
                &[$crate::logical::OpSpec::list($crate::logical::Access::Needs($crate::policy::Capability::List))],
            )
            .policy($policy),
            $crate::logical::Route::new(
                concat!($prefix, "/{name}"),
                "create or update (`create` or `update`), read, delete a role",
                &[
                    $crate::logical::OpSpec::write($crate::logical::Access::CreateOrUpdate)
                        .body_both::<keyvault_api::auth::TokenSettings, $fields>()
                        .answers($crate::logical::openapi::Answer::Empty),
                    $crate::logical::OpSpec::read($crate::logical::Access::Needs($crate::policy::Capability::Read))
                        .data_both::<keyvault_api::auth::TokenSettingsView, $fields>(),
                    $crate::logical::OpSpec::delete($crate::logical::Access::Needs($crate::policy::Capability::Delete))
                        .answers($crate::logical::openapi::Answer::Empty),
                ],
            )
            .policy(concat!($policy, "/{name}"))
            .normalize($crate::engines::auth::role_name)
            .names($crate::NAME_PATTERN),
        ]
    };
}

/// Serve a role route: a write parses the body (method fields and token fields; unknown
/// fields are warnings) and checks that the policies it assigns are the caller's to give
/// ([`Caller::check_grant`](crate::logical::Caller::check_grant)).
pub async fn handle_role<R: RoleAdmin>(admin: &R, req: &mut Request) -> Result<Reply> {
    let name = req.param("name").to_owned();
    match req.operation {
        Operation::List => Reply::keys(admin.list_roles().await?),
        Operation::Read => admin.read_role(&name).await,
        Operation::Write => {
            let (config, token) = parse_role_body::<R::Config>(req)?;
            req.caller()?.check_settings_grant(&token)?;
            admin.write_role(&name, config, token, req.existing.as_deref()).await?;
            Ok(Reply::empty())
        }
        Operation::Delete => {
            admin.delete_role(&name).await?;
            Ok(Reply::empty())
        }
        Operation::Patch => Err(Error::UnsupportedOperation),
    }
}

/// Vault's role fields that restrict who logs in or what a token may do, which KeyVault
/// does not enforce. Given a value that would restrict (anything but `null`, `""`, `[]`,
/// `{}`, `false` or `0`, the values tools send for "unset"), a role write is refused
/// (400): a field that only warned would leave the role open to whom its author meant to
/// shut out (`allowed_organizational_units`, `token_bound_cidrs`, `token_num_uses`).
const UNENFORCED_RESTRICTIONS: &[&str] = &[
    "allowed_names",
    "allowed_email_sans",
    "allowed_organizational_units",
    "required_extensions",
    "allowed_metadata_extensions",
    "ocsp_enabled",
    "ocsp_ca_certificates",
    "bound_cidrs",
    "bound_cidr_list",
    "secret_id_bound_cidrs",
    "token_bound_cidrs",
    "token_num_uses",
    "token_explicit_max_ttl",
    "bound_service_account_namespace_selector",
    // Vault's older names of `token_ttl` and `token_max_ttl`: dropped, tokens would live
    // the method's default, longer than written.
    "ttl",
    "max_ttl",
];

/// The same for a secret id (`role/<name>/secret-id`): Vault's own `num_uses`, `ttl` and
/// CIDR bounds of one secret id, which KeyVault does not take (its secret ids have the
/// role's `secret_id_num_uses` and `secret_id_ttl`). Dropped, a "single use, one minute"
/// secret id would have the role's, maybe unlimited, uses and lifetime.
pub const UNENFORCED_SECRET_ID_RESTRICTIONS: &[&str] =
    &["num_uses", "ttl", "cidr_list", "token_bound_cidrs", "metadata_restrictions"];

/// Whether a JSON value says "unset" rather than restricting something.
fn is_unset(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        // The CLI sends `key=value` as text: `false`, `0`, `0s` are unset too.
        Value::String(s) => {
            let s = s.trim();
            s.is_empty() || s.eq_ignore_ascii_case("false") || matches!(s, "0" | "0s" | "0m" | "0h")
        }
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// 400 if `body` gives one of [`UNENFORCED_RESTRICTIONS`] a value that would restrict.
pub fn refuse_unenforced_restrictions(body: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    refuse_unenforced(body, UNENFORCED_RESTRICTIONS)
}

/// 400 if `body` gives one of `fields` a value that would restrict.
pub fn refuse_unenforced(body: &serde_json::Map<String, serde_json::Value>, fields: &[&str]) -> Result<()> {
    for f in fields {
        if body.get(*f).is_some_and(|v| !is_unset(v)) {
            return Err(Error::invalid(format!(
                "{f}: KeyVault does not enforce this restriction, so it cannot be given \
                 (docs/api.md, \"Authentication\"); leave it unset"
            )));
        }
    }
    Ok(())
}

/// Parse a role's body: the method's own fields into `T`, the common token fields into
/// [`TokenSettings`]; fields of neither are named in the reply's warnings, but a Vault
/// restriction KeyVault does not enforce ([`UNENFORCED_RESTRICTIONS`]) is refused.
pub fn parse_role_body<T: serde::de::DeserializeOwned>(req: &mut Request) -> Result<(T, TokenSettings)> {
    let mut own: serde_json::Map<String, serde_json::Value> = crate::json::parse_body(&req.body)?;
    refuse_unenforced_restrictions(&own)?;
    let mut token = serde_json::Map::new();
    for f in crate::auth::TOKEN_FIELDS {
        if let Some(v) = own.remove(f) {
            token.insert(f.to_owned(), v);
        }
    }
    let token: TokenSettings =
        serde_json::from_value(serde_json::Value::Object(token)).map_err(|e| crate::json::json_error(&e))?;
    let own = serde_json::to_vec(&own).map_err(|e| Error::Internal(format!("JSON encoding: {e}")))?;
    let own: T = crate::logical::parse_data(&own, &mut req.warnings)?;
    crate::auth::validate_token_settings(&token)?;
    Ok((own, token))
}
