//! `auth/` itself: the short login form `POST /v1/auth` `{"role": ...}` (the pipeline
//! sends it to the method that owns the role) and `GET /v1/auth/jwks`, the keys that
//! verify KeyVault's tokens. Mounted by KeyVault itself, under every auth method's mount;
//! not listed by `sys/auth`.

use std::sync::Arc;

use async_trait::async_trait;

use super::EngineKind;
use crate::error::{Error, Result};
use crate::logical::openapi::{Answer, schema_of};
use crate::logical::{Access, Engine, EngineInfo, OpSpec, Reply, Request, Route};
use crate::policy::Capability;
use crate::shared::Core;

pub const KIND: EngineKind = EngineKind {
    info: EngineInfo {
        name: "login",
        description: "the short login form and the token-verification keys",
        auth: true,
        routes: ROUTES,
    },
    fixed_at: Some("auth/"),
    once: true,
    takes_options: false,
    build: |core, _| Ok(Arc::new(Login { core: core.clone() })),
};

const ROUTES: &[Route] = &[
    // A login may consume a credential (a limited secret id); the method's handler
    // records the audit intent before it does.
    Route::new(
        "",
        "log in with `role` and the credentials of its method",
        &[OpSpec::write(Access::LoginByRole).intent_by_handler().body::<keyvault_api::auth::RoleHint>()],
    ),
    Route::new(
        "jwks",
        "the token-verification keys (JWK set, no token)",
        &[OpSpec::read(Access::Public).answers(Answer::Bare(schema_of::<keyvault_api::auth::Jwks>))],
    ),
    Route::new(
        "revocations",
        "revoked token accessors and identities, for gateways that verify tokens offline (`?since=`)",
        &[OpSpec::read(Access::Needs(Capability::Read))
            .query::<keyvault_api::auth::RevocationsQuery>()
            .data::<keyvault_api::auth::RevocationFeed>()],
    ),
];

#[derive(Debug)]
pub struct Login {
    core: Arc<Core>,
}

#[async_trait]
impl Engine for Login {
    fn info(&self) -> &'static EngineInfo {
        &KIND.info
    }

    async fn handle(&self, req: &mut Request) -> Result<Reply> {
        match req.route.pattern {
            "jwks" => Reply::bare(&self.core.tokens.jwks()),
            "revocations" => {
                let q: keyvault_api::auth::RevocationsQuery = req.query()?;
                Reply::data(&self.core.revocations.feed(&q).await?)
            }
            _ => Err(Error::UnsupportedOperation),
        }
    }
}
