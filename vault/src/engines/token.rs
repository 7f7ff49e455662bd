//! `auth/token/`: the caller's own token (look it up, renew it, revoke it) and revocation
//! by accessor. Mounted by KeyVault itself.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use keyvault_api::auth::{RenewSelf, RevokeAccessor, TokenLookup};

use super::EngineKind;
use crate::error::{Error, Result};
use crate::logical::{Access, Caller, Engine, EngineInfo, OpSpec, Reply, Request, Route};
use crate::policy::Capability;
use crate::shared::{Core, MAX_TOKEN_LIFETIME};
use crate::token::Claims;
use crate::unix_now;

pub const KIND: EngineKind = EngineKind {
    info: EngineInfo {
        name: "token",
        description: "the caller's own token: look up, renew, revoke; revocation by accessor",
        auth: true,
        routes: ROUTES,
    },
    fixed_at: Some("auth/token/"),
    once: true,
    takes_options: false,
    build: |core, _| Ok(Arc::new(TokenEngine { core: core.clone() })),
};

const ROUTES: &[Route] = &[
    Route::new("lookup-self", "the caller's token, without the token itself", &[OpSpec::read(Access::AnyToken)]),
    Route::new(
        "renew-self",
        "a new token with a later expiry, up to its maximum",
        &[OpSpec::compute(Access::AnyToken)],
    ),
    Route::new("revoke-self", "revoke the caller's token and its renewals", &[OpSpec::write(Access::AnyToken)]),
    Route::new(
        "revoke-accessor",
        "revoke the tokens with an accessor",
        &[OpSpec::write(Access::Needs(Capability::Update))],
    ),
];

#[derive(Debug)]
pub struct TokenEngine {
    core: Arc<Core>,
}

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

fn lookup(caller: &Caller, token: &str) -> TokenLookup {
    let c = caller.claims.as_ref();
    TokenLookup {
        id: keyvault_api::Sensitive::new(token),
        accessor: c.acc.clone(),
        policies: c.pol.clone(),
        display_name: c.sub.clone(),
        meta: c.role.iter().map(|r| ("role_name".to_owned(), r.clone())).collect(),
        num_uses: 0,
        orphan: c.par.is_none(),
        entity_id: String::new(),
        creation_ttl: c.exp.saturating_sub(c.iat),
        path: format!("auth/{}/login", c.meth),
        issue_time: rfc3339(c.iat),
        creation_time: c.iat,
        expire_time: rfc3339(c.exp),
        ttl: c.exp.saturating_sub(unix_now()),
        explicit_max_ttl: c.max_exp.map(|m| m.saturating_sub(c.iat)).unwrap_or(0),
        renewable: !caller.direct && c.max_exp.is_some_and(|m| m > c.exp),
        bound_certificate_x5t_s256: c.cnf.as_ref().map(|x| x.x5t_s256.clone()),
        spiffe_id: c.spiffe.clone(),
        token_type: if caller.direct { "direct-certificate" } else { "service" }.into(),
    }
}

impl TokenEngine {
    /// A new token for the caller's, with a later expiry (up to its `max_exp`); same
    /// accessor, same binding. The old token stays valid until its own expiry.
    async fn renew_self(&self, req: &mut Request) -> Result<Reply> {
        let b: RenewSelf = req.data()?;
        let caller = req.caller()?;
        if caller.direct {
            return Err(Error::invalid("a direct certificate request has no token to renew"));
        }
        let c = caller.claims.as_ref();
        let now = unix_now();
        let max_exp = c.max_exp.unwrap_or(c.exp);
        if b.increment.is_some_and(|d| d > MAX_TOKEN_LIFETIME) {
            return Err(Error::invalid(format!("increment out of range (at most {} s)", MAX_TOKEN_LIFETIME.as_secs())));
        }
        let ttl = b.increment.map(|d| d.as_secs()).unwrap_or(c.exp.saturating_sub(c.iat)).max(1);
        let exp = now.checked_add(ttl).ok_or_else(|| Error::invalid("increment out of range"))?.min(max_exp);
        if exp <= now {
            return Err(Error::invalid("the token has reached its maximum TTL; log in again"));
        }
        let claims = Claims { iat: now, nbf: now, exp, ..c.clone() };
        let token = self.core.tokens.sign_claims(claims).await?;
        tracing::info!(accessor = %token.claims.acc, exp, "token renewed");
        Ok(Reply::auth(token))
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
                let token = req.token.as_deref().map(String::as_str).unwrap_or_default();
                Reply::data(&lookup(req.caller()?, token))
            }
            "renew-self" => self.renew_self(req).await,
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
