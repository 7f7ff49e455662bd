//! `auth/token/`: the caller's own token (look it up, renew it, revoke it) and revocation
//! by accessor. Mounted by KeyVault itself.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use keyvault_api::auth::{RenewSelf, RenewToken, RevokeAccessor, TokenCreate, TokenLookup, TokenRef};

use super::EngineKind;
use crate::error::{Error, Result};
use crate::logical::openapi::Answer;
use crate::logical::{Access, Caller, Engine, EngineInfo, OpSpec, Reply, Request, Route};
use crate::policy::Capability;
use crate::shared::{Core, MAX_TOKEN_LIFETIME};
use crate::store::{encode_json, get_json};
use crate::token::{Claims, IssuedToken};
use crate::unix_now;

pub const KIND: EngineKind = EngineKind {
    info: EngineInfo {
        name: "token",
        description: "tokens: look up, renew (the same token), create child and orphan tokens, revoke; by accessor too",
        auth: true,
        routes: ROUTES,
    },
    fixed_at: Some("auth/token/"),
    once: true,
    takes_options: false,
    build: |core, _| Ok(Arc::new(TokenEngine { core: core.clone() })),
};

const ROUTES: &[Route] = &[
    Route::new(
        "lookup-self",
        "the caller's token (GET, or POST as Vault also takes it)",
        &[
            OpSpec::read(Access::AnyToken).data::<TokenLookup>(),
            OpSpec::compute(Access::AnyToken).body::<keyvault_api::Empty>().data::<TokenLookup>(),
        ],
    ),
    // A renewal is stored (every replica honours it), so it changes state.
    Route::new(
        "renew-self",
        "extend the caller's token (the same token), up to its maximum",
        &[OpSpec::write(Access::AnyToken).body::<RenewSelf>().answers(Answer::Auth)],
    ),
    Route::new(
        "renew",
        "extend another token (the same token), up to its maximum",
        &[OpSpec::write(Access::Needs(Capability::Update)).body::<RenewToken>().answers(Answer::Auth)],
    ),
    Route::new(
        "revoke-self",
        "revoke the caller's token and its renewals",
        &[OpSpec::write(Access::AnyToken).body::<keyvault_api::Empty>().answers(Answer::Empty)],
    ),
    Route::new(
        "create",
        "a child token of the caller (dies with it)",
        &[OpSpec::write(Access::Needs(Capability::Update)).body::<TokenCreate>().answers(Answer::Auth)],
    ),
    Route::new(
        "create-orphan",
        "a token with no parent",
        &[OpSpec::write(Access::Sudo(Capability::Update)).body::<TokenCreate>().answers(Answer::Auth)],
    ),
    Route::new(
        "lookup",
        "look up another token",
        &[OpSpec::compute(Access::Needs(Capability::Update)).body::<TokenRef>().data::<TokenLookup>()],
    ),
    Route::new(
        "revoke",
        "revoke another token and every token made from it",
        &[OpSpec::write(Access::Needs(Capability::Update)).body::<TokenRef>().answers(Answer::Empty)],
    ),
    Route::new(
        "lookup-accessor",
        "look up a token made by auth/token/create by its accessor",
        &[OpSpec::compute(Access::Needs(Capability::Update)).body::<RevokeAccessor>().data::<TokenLookup>()],
    ),
    Route::new(
        "revoke-accessor",
        "revoke the tokens with an accessor",
        &[OpSpec::write(Access::Needs(Capability::Update)).body::<RevokeAccessor>().answers(Answer::Empty)],
    ),
];

#[derive(Debug)]
pub struct TokenEngine {
    core: Arc<Core>,
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// A token as Vault's lookups show it; `exp`: when it expires now (after renewals).
fn lookup(caller: &Caller, token: &str, exp: u64) -> TokenLookup {
    let c = caller.claims.as_ref();
    TokenLookup {
        id: keyvault_api::Sensitive::new(token),
        accessor: c.acc.clone(),
        policies: c.pol.clone(),
        display_name: c.sub.clone(),
        meta: c.role.iter().map(|r| ("role_name".to_owned(), r.clone())).collect(),
        num_uses: 0,
        orphan: c.par.is_none() && c.anc.is_empty(),
        entity_id: String::new(),
        creation_ttl: c.exp.saturating_sub(c.iat),
        path: if c.anc.is_empty() { format!("auth/{}/login", c.meth) } else { "auth/token/create".into() },
        issue_time: rfc3339(c.iat),
        creation_time: c.iat,
        expire_time: rfc3339(exp),
        ttl: exp.saturating_sub(unix_now()),
        explicit_max_ttl: c.max_exp.map(|m| m.saturating_sub(c.iat)).unwrap_or(0),
        renewable: !caller.direct && !c.nren,
        bound_certificate_x5t_s256: c.cnf.as_ref().map(|x| x.x5t_s256.clone()),
        spiffe_id: c.spiffe.clone(),
        token_type: if caller.direct { "direct-certificate" } else { "service" }.into(),
    }
}

impl TokenEngine {
    /// Extend a token: the same token string stays valid until now + `increment` (or
    /// its original TTL), capped by its `max_exp`, on every replica (see
    /// [`crate::token::Renewals`]). Vault's clients keep the token they hold.
    /// `peer`: the renewing connection's client certificate (a certificate login's token
    /// is renewed over the certificate it is bound to; see
    /// [`super::auth::still_granted`]).
    async fn renew(
        &self,
        token: &str,
        claims: &Claims,
        increment: Option<Duration>,
        peer: Option<&crate::tls::ClientCert>,
    ) -> Result<Reply> {
        let now = unix_now();
        if increment.is_some_and(|d| d > MAX_TOKEN_LIFETIME) {
            return Err(Error::invalid(format!("increment out of range (at most {} s)", MAX_TOKEN_LIFETIME.as_secs())));
        }
        let ttl = increment.map(|d| d.as_secs()).unwrap_or(claims.exp.saturating_sub(claims.iat)).max(1);
        let wanted = now.checked_add(ttl).ok_or_else(|| Error::invalid("increment out of range"))?;
        // As in Vault: a token made not renewable says so.
        if claims.nren {
            return Err(Error::invalid("lease is not renewable"));
        }
        if claims.max_exp.unwrap_or(claims.exp) <= now {
            return Err(Error::invalid("the token has reached its maximum TTL; log in again"));
        }
        super::auth::still_granted(&self.core.store, claims, peer).await?;
        let exp = self.core.renewals.renew(claims, wanted).await?;
        tracing::info!(accessor = %claims.acc, exp, "token renewed");
        let claims = Claims { exp, ..claims.clone() };
        Ok(Reply::auth(IssuedToken { token: secrecy::SecretString::from(token.to_owned()), claims }))
    }
}

/// Where a token made by `auth/token/create` is recorded by its accessor.
fn accessor_key(accessor: &str) -> String {
    format!("auth/token/accessor/{accessor}")
}

/// The most generations of child tokens (`auth/token/create` from a child...).
const MAX_DEPTH: usize = 8;

impl TokenEngine {
    /// A token the caller makes (`create`, `create-orphan`): the caller's identities (so
    /// the kill switch reaches it) and binding, policies the caller may give, no longer
    /// than the caller could live unless an orphan.
    async fn create(&self, req: &mut Request, orphan: bool) -> Result<Reply> {
        let b: keyvault_api::auth::TokenCreate = req.data()?;
        let caller = req.caller()?;
        if caller.direct {
            return Err(Error::invalid("a direct certificate request cannot create tokens; log in first"));
        }
        if b.no_parent && !orphan {
            return Err(Error::invalid("use auth/token/create-orphan (update and sudo) for a token without a parent"));
        }
        if b.num_uses > 0 {
            return Err(Error::invalid("limited-use tokens are not supported (num_uses must be 0)"));
        }
        let parent = caller.claims.as_ref();
        let policies = b.policies.clone().unwrap_or_else(|| parent.pol.clone());
        caller.check_grant(&policies)?;
        let mut anc = Vec::new();
        if !orphan {
            anc = parent.anc.clone();
            anc.extend(parent.par.clone());
            anc.push(parent.acc.clone());
            if anc.len() > MAX_DEPTH {
                return Err(Error::invalid(format!("tokens may be nested {MAX_DEPTH} deep at most")));
            }
        }
        let now = unix_now();
        let cfg = &self.core.settings.tokens;
        let max = b.explicit_max_ttl.unwrap_or(cfg.max_ttl).min(cfg.max_ttl).as_secs();
        let ttl = b.ttl.unwrap_or(cfg.default_ttl).as_secs().min(max).max(1);
        let mut max_exp = now.saturating_add(max);
        let mut exp = now.saturating_add(ttl);
        if !orphan {
            // A child lives no longer than its parent could.
            max_exp = max_exp.min(parent.max_exp.unwrap_or(parent.exp));
            exp = exp.min(max_exp);
        }
        if exp <= now {
            return Err(Error::invalid("the parent token expires too soon to create a child"));
        }
        if b.renewable == Some(false) {
            max_exp = exp;
        }
        let claims = Claims {
            iat: now,
            nbf: now,
            exp,
            max_exp: Some(max_exp),
            jti: uuid::Uuid::new_v4().to_string(),
            acc: uuid::Uuid::new_v4().simple().to_string(),
            pol: policies,
            anc,
            par: if orphan { None } else { parent.par.clone() },
            nren: b.renewable == Some(false),
            ..parent.clone()
        };
        let token = self.core.tokens.sign_claims(claims).await?;
        // Recorded by accessor (its claims, never the token) for lookup-accessor, until it
        // can no longer be valid. Logins record nothing: a login writes nothing.
        let lives = Duration::from_secs(max_exp.saturating_sub(now).max(1));
        let key = accessor_key(&token.claims.acc);
        self.core.store.insert_if_absent(&key, &encode_json(&token.claims), Some(lives)).await?;
        tracing::info!(accessor = %token.claims.acc, parent = %parent.acc, orphan, "token created");
        req.audit_detail(format!("token {} created by {}", token.claims.acc, parent.acc));
        Ok(Reply::auth(token))
    }

    /// When a token expires now: its own `exp`, or its latest renewal's.
    async fn expiry(&self, caller: &Caller) -> Result<u64> {
        let c = caller.claims.as_ref();
        if caller.direct {
            return Ok(c.exp);
        }
        Ok(c.exp.max(self.core.renewals.valid_until(c).await?))
    }

    /// Another token, as presented in a body: signature, expiry (with renewals), not revoked.
    async fn other(&self, token: &str) -> Result<std::sync::Arc<Claims>> {
        let invalid = || Error::invalid("invalid token");
        let (claims, expired) = self.core.tokens.verify_signature(token).map_err(|_| invalid())?;
        match self.core.check_other_token(&claims, expired).await {
            Ok(()) => Ok(claims),
            Err(Error::Unauthenticated(_)) => Err(invalid()),
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl Engine for TokenEngine {
    fn info(&self) -> &'static EngineInfo {
        &KIND.info
    }

    async fn handle(&self, req: &mut Request) -> Result<Reply> {
        match req.route.pattern {
            "lookup-self" => {
                if req.operation == crate::logical::Operation::Write {
                    req.data::<keyvault_api::Empty>()?;
                }
                let token = req.token.as_deref().map(String::as_str).unwrap_or_default();
                let caller = req.caller()?;
                Reply::data(&lookup(caller, token, self.expiry(caller).await?))
            }
            "renew-self" => {
                let b: RenewSelf = req.data()?;
                let caller = req.caller()?;
                if caller.direct {
                    return Err(Error::invalid("a direct certificate request has no token to renew"));
                }
                let claims = caller.claims.clone();
                let token = req.token.clone().unwrap_or_default();
                self.renew(&token, &claims, b.increment, req.peer.client_cert.as_deref()).await
            }
            "renew" => {
                let b: keyvault_api::auth::RenewToken = req.data()?;
                let claims = self.other(b.token.expose()).await?;
                self.renew(b.token.expose(), &claims, b.increment, req.peer.client_cert.as_deref()).await
            }
            "create" => self.create(req, false).await,
            "create-orphan" => self.create(req, true).await,
            "lookup" => {
                let b: keyvault_api::auth::TokenRef = req.data()?;
                let claims = self.other(b.token.expose()).await?;
                let caller = Caller { claims, acl: Default::default(), direct: false };
                Reply::data(&lookup(&caller, b.token.expose(), self.expiry(&caller).await?))
            }
            "revoke" => {
                let b: keyvault_api::auth::TokenRef = req.data()?;
                let claims = self.other(b.token.expose()).await?;
                let until = claims.max_exp.unwrap_or(claims.exp);
                self.core.revocations.revoke_accessor(&claims.acc, until).await?;
                tracing::info!(accessor = %claims.acc, by = %req.caller()?.claims.acc, "token revoked");
                Ok(Reply::empty())
            }
            "revoke-self" => {
                req.data::<keyvault_api::Empty>()?;
                let caller = req.caller()?;
                if caller.direct {
                    return Err(Error::invalid("a direct certificate request has no token to revoke"));
                }
                let until = caller.claims.max_exp.unwrap_or(caller.claims.exp);
                self.core.revocations.revoke_accessor(&caller.claims.acc, until).await?;
                tracing::info!(accessor = %caller.claims.acc, "token revoked by its holder");
                Ok(Reply::empty())
            }
            "lookup-accessor" => {
                let b: RevokeAccessor = req.data()?;
                super::sys::validate_accessor(&b.accessor)?;
                let unknown = || {
                    Error::invalid(
                        "no valid token with this accessor is recorded (only tokens made by auth/token/create are: \
                         look a login's token up with auth/token/lookup)",
                    )
                };
                let key = accessor_key(&b.accessor);
                let claims: Claims = get_json(self.core.store.as_ref(), &key).await?.ok_or_else(unknown)?;
                match self.core.check_other_token(&claims, claims.exp <= unix_now()).await {
                    Ok(()) => {}
                    Err(Error::Unauthenticated(_)) => return Err(unknown()),
                    Err(e) => return Err(e),
                }
                let caller = Caller { claims: std::sync::Arc::new(claims), acl: Default::default(), direct: false };
                Reply::data(&lookup(&caller, "", self.expiry(&caller).await?))
            }
            "revoke-accessor" => {
                let b: RevokeAccessor = req.data()?;
                super::sys::validate_accessor(&b.accessor)?;
                self.core.revocations.revoke_accessor(&b.accessor, self.core.revocation_horizon()).await?;
                tracing::info!(accessor = %b.accessor, by = %req.caller()?.claims.acc, "token revoked by accessor");
                Ok(Reply::empty())
            }
            _ => Err(Error::UnsupportedOperation),
        }
    }
}
