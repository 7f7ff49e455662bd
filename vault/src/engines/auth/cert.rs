//! TLS certificate auth, the engine (mounted at `auth/cert/`): roles (at `role/`, and at
//! Vault's `certs/`, authorized as `role/`) and the login. Matching a certificate to a
//! role is `crate::auth::cert`. Tokens from this method are always bound to the
//! certificate (RFC 8705).

use std::sync::Arc;

use async_trait::async_trait;

use super::{LoginOutcome, RoleAdmin, RoleView, StoredRole, validate_name};
use crate::auth::cert::{CertAuth, CertRoleConfig, METHOD, matches, normalize};
use crate::engines::EngineKind;
use crate::error::{AuthFailure, Error, Result};
use crate::logical::{Access, Engine, EngineInfo, OpSpec, Reply, Request, Route};

pub const KIND: EngineKind = EngineKind {
    info: EngineInfo {
        name: METHOD,
        description: "TLS client certificates: pins, CNs, DNS and URI SANs (SPIFFE IDs)",
        auth: true,
        routes: ROUTES,
    },
    fixed_at: None,
    once: true,
    takes_options: false,
    build: |core, _| Ok(Arc::new(CertEngine(CertAuth::new(core.store.clone())))),
};

const ROLES: [Route; 2] = crate::role_routes!("role", "role", keyvault_api::auth::CertRole);
/// Vault's path for cert roles, an alias authorized as `role/...` (so that a policy on
/// either path means the same thing, denials included).
const CERTS: [Route; 2] = crate::role_routes!("certs", "role", keyvault_api::auth::CertRole);

const ROUTES: &[Route] = &[
    Route::new(
        "login",
        "log in with the connection's client certificate",
        &[OpSpec::compute(Access::Login).body::<keyvault_api::auth::CertLogin>()],
    ),
    ROLES[0],
    ROLES[1],
    CERTS[0],
    CERTS[1],
];

/// The cert method's engine.
#[derive(Debug)]
pub struct CertEngine(CertAuth);

#[async_trait]
impl RoleAdmin for CertEngine {
    type Config = CertRoleConfig;

    async fn current(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.0.roles.load_raw(name).await?.map(|(raw, _)| raw))
    }

    async fn write_role(
        &self,
        name: &str,
        config: CertRoleConfig,
        token: super::TokenSettings,
        expected: Option<&[u8]>,
    ) -> Result<()> {
        self.0.roles.save(name, &StoredRole { config: normalize(config)?, token }, expected).await
    }

    async fn read_role(&self, name: &str) -> Result<Reply> {
        Reply::data(&RoleView::of(&self.0.roles.require(name).await?))
    }

    async fn delete_role(&self, name: &str) -> Result<()> {
        self.0.roles.delete(name).await.map(drop)
    }

    async fn list_roles(&self) -> Result<Vec<String>> {
        self.0.roles.names().await
    }
}

#[async_trait]
impl Engine for CertEngine {
    fn info(&self) -> &'static EngineInfo {
        &KIND.info
    }

    async fn existence(&self, req: &Request) -> Result<Option<Vec<u8>>> {
        self.current(req.param("name")).await
    }

    async fn login_identity(&self, req: &Request) -> Option<String> {
        super::LoginClaim::parse(&req.body).cert()
    }

    async fn handle(&self, req: &mut Request) -> Result<Reply> {
        super::handle_role(self, req).await
    }

    async fn login(&self, req: &mut Request) -> Result<LoginOutcome> {
        let body: keyvault_api::auth::CertLogin = req.data()?;
        let cert = req.peer.client_cert.clone().ok_or(Error::Unauthenticated(AuthFailure::CertificateRequired))?;
        let invalid = || Error::Unauthenticated(AuthFailure::InvalidCredentials);
        let (name, role) = match body.name.or(body.role) {
            Some(name) => {
                validate_name("role", &name)?;
                let role = self.0.roles.load(&name).await?.ok_or_else(invalid)?;
                (name, role)
            }
            None => {
                self.0.roles.all().await?.into_iter().find(|(_, r)| matches(&r.config, &cert)).ok_or_else(invalid)?
            }
        };
        if !matches(&role.config, &cert) {
            return Err(invalid());
        }
        let mut outcome = LoginOutcome::for_role(METHOD, &name, &role.token);
        outcome.bind_certificate = true;
        if let Some(cn) = &cert.common_name {
            outcome.metadata.insert("common_name".into(), cn.clone());
        }
        Ok(outcome)
    }
}
