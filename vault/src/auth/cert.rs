//! TLS certificate auth: a role names the client certificates it accepts, by SHA-256
//! fingerprint pin, subject CN, DNS SAN or URI SAN (SPIFFE IDs included). The certificate
//! itself was verified by the TLS handshake (chain to the client CA bundle, validity,
//! CRLs); this method decides which role it is.
//!
//! Tokens from this method are always bound to the certificate (RFC 8705). A role with
//! `allow_direct` also authorizes requests that carry no token at all: the connection's
//! certificate is the credential (login and act in one request).

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{
    Authenticator, LoginOutcome, LoginRequest, RoleAdmin, RoleStore, StoredRole, parse_body, parse_role_body,
    role_view, validate_name,
};
use crate::error::{AuthFailure, Error, Result};
use crate::store::Store;
use crate::tls::ClientCert;

pub const METHOD: &str = "cert";

/// Which certificates a role accepts. Every category that is set must match (a pin, or
/// a CN, or a DNS SAN, or a URI SAN of the lists); at least one category must be set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertRoleConfig {
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

/// Normalize a fingerprint to 64 lower-case hex characters.
pub fn normalize_fingerprint(fp: &str) -> Result<String> {
    let hex: String = fp.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(Error::invalid("a certificate SHA-256 fingerprint is 64 hex characters"))
    }
}

fn uri_matches(pattern: &str, uri: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => uri.starts_with(prefix),
        None => pattern == uri,
    }
}

impl CertRoleConfig {
    fn normalize(mut self) -> Result<Self> {
        self.certificate_sha256 =
            self.certificate_sha256.iter().map(|f| normalize_fingerprint(f)).collect::<Result<_>>()?;
        let set = !self.certificate_sha256.is_empty()
            || !self.allowed_common_names.is_empty()
            || !self.allowed_dns_sans.is_empty()
            || !self.allowed_uri_sans.is_empty();
        if !set {
            return Err(Error::invalid(
                "a cert role needs at least one of certificate_sha256, allowed_common_names, allowed_dns_sans, allowed_uri_sans",
            ));
        }
        Ok(self)
    }

    pub fn matches(&self, c: &ClientCert) -> bool {
        let pin = self.certificate_sha256.is_empty() || self.certificate_sha256.contains(&c.sha256_hex);
        let cn = self.allowed_common_names.is_empty()
            || c.common_name.as_ref().is_some_and(|cn| self.allowed_common_names.contains(cn));
        let dns = self.allowed_dns_sans.is_empty() || c.dns_sans.iter().any(|d| self.allowed_dns_sans.contains(d));
        let uri = self.allowed_uri_sans.is_empty()
            || c.uri_sans.iter().any(|u| self.allowed_uri_sans.iter().any(|p| uri_matches(p, u)));
        pin && cn && dns && uri
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    /// Vault's field name.
    #[serde(default)]
    name: Option<String>,
    /// The short form's field name.
    #[serde(default)]
    role: Option<String>,
}

#[derive(Debug)]
pub struct CertAuth {
    roles: RoleStore<CertRoleConfig>,
}

impl CertAuth {
    pub fn new(store: Arc<dyn Store>) -> Self {
        CertAuth { roles: RoleStore::new(store, METHOD) }
    }

    /// The first role (by name) that allows direct requests and accepts `cert`.
    pub async fn direct_role(&self, cert: &ClientCert) -> Result<Option<(String, StoredRole<CertRoleConfig>)>> {
        Ok(self.roles.all().await?.into_iter().find(|(_, r)| r.config.allow_direct && r.config.matches(cert)))
    }

    /// Remove a fingerprint pin from every role (the kill switch). A role left with no
    /// constraint at all is deleted rather than left matching nothing by accident.
    pub async fn remove_pin(&self, fingerprint: &str) -> Result<usize> {
        let mut changed = 0;
        for (name, raw, mut role) in self.roles.all_raw().await? {
            let before = role.config.certificate_sha256.len();
            role.config.certificate_sha256.retain(|f| f != fingerprint);
            if role.config.certificate_sha256.len() == before {
                continue;
            }
            changed += 1;
            match role.config.clone().normalize() {
                Ok(_) => self.roles.save(&name, &role, Some(&raw)).await?,
                Err(_) => {
                    self.roles.delete(&name).await?;
                }
            }
        }
        Ok(changed)
    }
}

#[async_trait]
impl RoleAdmin for CertAuth {
    fn method(&self) -> &'static str {
        METHOD
    }

    async fn current(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.roles.load_raw(name).await?.map(|(raw, _)| raw))
    }

    async fn write_role(&self, name: &str, body: &[u8], expected: Option<&[u8]>) -> Result<()> {
        let (config, token) = parse_role_body::<CertRoleConfig>(body)?;
        self.roles.save(name, &StoredRole { config: config.normalize()?, token }, expected).await
    }

    async fn read_role(&self, name: &str) -> Result<serde_json::Value> {
        Ok(role_view(&self.roles.require(name).await?))
    }

    async fn delete_role(&self, name: &str) -> Result<()> {
        self.roles.delete(name).await.map(drop)
    }

    async fn list_roles(&self) -> Result<Vec<String>> {
        self.roles.names().await
    }
}

#[async_trait]
impl Authenticator for CertAuth {
    fn method(&self) -> &'static str {
        METHOD
    }

    async fn login(&self, req: LoginRequest<'_>) -> Result<LoginOutcome> {
        let body: LoginBody = parse_body(if req.body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { req.body })?;
        let cert = req.client_cert.ok_or(Error::Unauthenticated(AuthFailure::CertificateRequired))?;
        let invalid = || Error::Unauthenticated(AuthFailure::InvalidCredentials);
        let (name, role) = match body.name.or(body.role) {
            Some(name) => {
                validate_name("role", &name)?;
                let role = self.roles.load(&name).await?.ok_or_else(invalid)?;
                (name, role)
            }
            None => self.roles.all().await?.into_iter().find(|(_, r)| r.config.matches(cert)).ok_or_else(invalid)?,
        };
        if !role.config.matches(cert) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cert() -> ClientCert {
        ClientCert {
            sha256_hex: "ab".repeat(32),
            x5t_s256: String::new(),
            common_name: Some("api".into()),
            dns_sans: vec!["api.payments.svc".into()],
            uri_sans: vec!["spiffe://corp/ns/payments/sa/api".into()],
            issuer_der: Vec::new(),
            serial: vec![1],
        }
    }

    #[test]
    fn constraints_are_anded_across_categories() {
        let c = cert();
        let by_uri =
            CertRoleConfig { allowed_uri_sans: vec!["spiffe://corp/ns/payments/*".into()], ..Default::default() };
        assert!(by_uri.matches(&c));
        let exact =
            CertRoleConfig { allowed_uri_sans: vec!["spiffe://corp/ns/payments/sa/web".into()], ..Default::default() };
        assert!(!exact.matches(&c));
        let both = CertRoleConfig {
            allowed_common_names: vec!["api".into()],
            certificate_sha256: vec!["cd".repeat(32)],
            ..Default::default()
        };
        assert!(!both.matches(&c), "CN matches but the pin does not");
        let pin = CertRoleConfig { certificate_sha256: vec!["AB:".repeat(31) + "AB"], ..Default::default() }
            .normalize()
            .unwrap();
        assert!(pin.matches(&c));
        assert!(CertRoleConfig::default().normalize().is_err(), "no constraint at all is refused");
        assert!(normalize_fingerprint("xyz").is_err());
    }
}
