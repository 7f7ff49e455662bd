//! TLS certificate auth, its domain part (the engine is `engines/auth/cert.rs`): a role names the client certificates it accepts, by SHA-256
//! fingerprint pin, subject CN, DNS SAN or URI SAN (SPIFFE IDs included), and the CA that
//! must have issued them (Vault's `certificate`). The certificate
//! itself was verified by the TLS handshake (chain to the client CA bundle, validity,
//! CRLs); this method decides which role it is.
//!
//! Tokens from this method are always bound to the certificate (RFC 8705). A role with
//! `allow_direct` also authorizes requests that carry no token at all: the connection's
//! certificate is the credential (login and act in one request).

use std::sync::Arc;

use super::{RoleStore, StoredRole};
use crate::error::{Error, Result};
use crate::store::Store;
use crate::tls::ClientCert;

pub const METHOD: &str = "cert";

/// Which certificates a role accepts. Every category that is set must match (a pin, or
/// a CN, or a DNS SAN, or a URI SAN of the lists); at least one category must be set.
pub use keyvault_api::auth::CertRole as CertRoleConfig;

/// Normalize a fingerprint to 64 lower-case hex characters.
pub fn normalize_fingerprint(fp: &str) -> Result<String> {
    let hex: String = fp.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(Error::invalid("a certificate SHA-256 fingerprint is 64 hex characters"))
    }
}

/// What a role's `certificate` (Vault's field) requires of a client certificate.
#[derive(Debug, PartialEq, Eq)]
enum Anchor {
    /// Issued by this CA: the client certificate's issuer name (DER) is its subject.
    /// (The handshake verified the chain to a CA of the listener's bundle; of those, the
    /// one with this name.)
    IssuedBy(Vec<u8>),
    /// A certificate that is not a CA: the client certificate must be this one (SHA-256).
    Exactly(String),
}

fn anchor(pem: &str) -> Result<Anchor> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let bad = |why: &str| Error::invalid(format!("certificate: {why}"));
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| bad("not a PEM certificate"))?;
    let (_, x) = X509Certificate::from_der(der.as_ref()).map_err(|_| bad("not an X.509 certificate"))?;
    if x.is_ca() {
        Ok(Anchor::IssuedBy(x.subject().as_raw().to_vec()))
    } else {
        Ok(Anchor::Exactly(ClientCert::from_der(der.as_ref()).sha256_hex))
    }
}

/// Check a role's constraints: fingerprints normalized, `certificate` a certificate, at
/// least one category set.
pub fn normalize(mut role: CertRoleConfig) -> Result<CertRoleConfig> {
    role.certificate_sha256 =
        role.certificate_sha256.iter().map(|f| normalize_fingerprint(f)).collect::<Result<_>>()?;
    role.certificate = role.certificate.map(|p| p.trim().to_owned()).filter(|p| !p.is_empty());
    if let Some(pem) = &role.certificate {
        anchor(pem)?;
    }
    let set = role.certificate.is_some()
        || !role.certificate_sha256.is_empty()
        || !role.allowed_common_names.is_empty()
        || !role.allowed_dns_sans.is_empty()
        || !role.allowed_uri_sans.is_empty();
    if !set {
        return Err(Error::invalid(
            "a cert role needs at least one of certificate, certificate_sha256, allowed_common_names, allowed_dns_sans, allowed_uri_sans",
        ));
    }
    Ok(role)
}

/// Whether `c` meets every constraint `role` sets. A certificate with more than one
/// SPIFFE ID matches no role: an X.509 SVID has exactly one, and the kill switch revokes
/// a certificate by the one it names ([`ClientCert::spiffe_id`]), so a second one could
/// log in to a role that the revoked ID no longer may.
pub fn matches(role: &CertRoleConfig, c: &ClientCert) -> bool {
    if c.uri_sans.iter().filter(|u| u.starts_with("spiffe://")).count() > 1 {
        return false;
    }
    let pin = role.certificate_sha256.is_empty() || role.certificate_sha256.contains(&c.sha256_hex);
    let cn = role.allowed_common_names.is_empty()
        || c.common_name.as_ref().is_some_and(|cn| role.allowed_common_names.contains(cn));
    let dns = role.allowed_dns_sans.is_empty() || c.dns_sans.iter().any(|d| role.allowed_dns_sans.contains(d));
    let uri = role.allowed_uri_sans.is_empty()
        || c.uri_sans.iter().any(|u| role.allowed_uri_sans.iter().any(|p| crate::prefix_glob_matches(p, u)));
    // The role's `certificate` is parsed last, only for a certificate its other
    // constraints already accept (a direct request tries every role).
    let issued = || match role.certificate.as_deref().map(anchor) {
        None => true,
        Some(Ok(Anchor::IssuedBy(subject))) => c.issuer_der == subject,
        Some(Ok(Anchor::Exactly(sha256))) => c.sha256_hex == sha256,
        Some(Err(_)) => false,
    };
    pin && cn && dns && uri && issued()
}

#[derive(Debug)]
pub struct CertAuth {
    pub(crate) roles: RoleStore<CertRoleConfig>,
}

impl CertAuth {
    pub fn new(store: Arc<dyn Store>) -> Self {
        CertAuth { roles: RoleStore::new(store, METHOD) }
    }

    /// The first role (by name) that allows direct requests and accepts `cert`.
    pub async fn direct_role(&self, cert: &ClientCert) -> Result<Option<(String, StoredRole<CertRoleConfig>)>> {
        Ok(self.roles.all().await?.into_iter().find(|(_, r)| r.config.allow_direct && matches(&r.config, cert)))
    }

    /// Remove a fingerprint pin from every role (the kill switch). A role whose only pin
    /// it was is deleted: without its pins it would accept any certificate that meets its
    /// other constraints (its names and SANs), more than it accepted before. A role
    /// changed between the scan and its change is read again and judged on what it is
    /// now (before, such a change made the kill switch 409 half way, or a delete removed
    /// whatever the role had become).
    pub async fn remove_pin(&self, fingerprint: &str) -> Result<usize> {
        let mut changed = 0;
        for (name, raw, role) in self.roles.all_raw().await? {
            let mut current = Some((raw, role));
            let mut attempts = 0;
            while let Some((raw, mut role)) = current.take() {
                let before = role.config.certificate_sha256.len();
                role.config.certificate_sha256.retain(|f| f != fingerprint);
                if role.config.certificate_sha256.len() == before {
                    break;
                }
                let done = if role.config.certificate_sha256.is_empty() || normalize(role.config.clone()).is_err() {
                    self.roles.delete_exact(&name, raw).await
                } else {
                    self.roles.save(&name, &role, Some(&raw)).await
                };
                match done {
                    Ok(()) => changed += 1,
                    Err(Error::Conflict(_)) if attempts < 100 => {
                        attempts += 1;
                        current = self.roles.load_raw(&name).await?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A role rewritten between the kill switch's scan and its change loses the pin all
    /// the same, and keeps the rewrite (before: 409, and the kill switch stopped half way).
    #[tokio::test]
    async fn the_kill_switch_removes_a_pin_from_a_role_changed_under_it() {
        use crate::test_support::{PauseAt, TestStore};
        let dir = tempfile::tempdir().unwrap();
        let sled: Arc<dyn Store> = Arc::new(crate::store::SledStore::open(dir.path()).unwrap());
        let plain = CertAuth::new(sled.clone());
        let store = Arc::new(TestStore::holding(sled.clone(), PauseAt::BeforeSwap, &plain.roles.key("web")));
        let held = Arc::new(CertAuth::new(store.clone()));
        let (x, y) = ("ab".repeat(32), "cd".repeat(32));
        let role = |cn: &str| StoredRole {
            config: CertRoleConfig {
                certificate_sha256: vec![x.clone(), y.clone()],
                allowed_common_names: vec![cn.into()],
                ..Default::default()
            },
            token: Default::default(),
        };
        plain.roles.save("web", &role("web"), None).await.unwrap();
        store.arm();
        let kill = tokio::spawn({
            let (held, x) = (held.clone(), x.clone());
            async move { held.remove_pin(&x).await }
        });
        store.reached.notified().await;
        let (raw, _) = plain.roles.load_raw("web").await.unwrap().unwrap();
        plain.roles.save("web", &role("web2"), Some(&raw)).await.unwrap();
        store.go.notify_one();
        assert_eq!(kill.await.unwrap().unwrap(), 1);
        let now = plain.roles.require("web").await.unwrap();
        assert_eq!(now.config.certificate_sha256, std::slice::from_ref(&y), "the pin is gone");
        assert_eq!(now.config.allowed_common_names, ["web2"], "the rewrite is kept");
    }

    fn cert() -> ClientCert {
        ClientCert {
            sha256_hex: "ab".repeat(32),
            x5t_s256: String::new(),
            common_name: Some("api".into()),
            dns_sans: vec!["api.payments.svc".into()],
            uri_sans: vec!["spiffe://corp/ns/payments/sa/api".into()],
            issuer_der: Vec::new(),
            serial: vec![1],
            not_after: i64::MAX,
        }
    }

    #[test]
    fn constraints_are_anded_across_categories() {
        let c = cert();
        let by_uri =
            CertRoleConfig { allowed_uri_sans: vec!["spiffe://corp/ns/payments/*".into()], ..Default::default() };
        assert!(matches(&by_uri, &c));
        let exact =
            CertRoleConfig { allowed_uri_sans: vec!["spiffe://corp/ns/payments/sa/web".into()], ..Default::default() };
        assert!(!matches(&exact, &c));
        let both = CertRoleConfig {
            allowed_common_names: vec!["api".into()],
            certificate_sha256: vec!["cd".repeat(32)],
            ..Default::default()
        };
        assert!(!matches(&both, &c), "CN matches but the pin does not");
        let pin = normalize(CertRoleConfig { certificate_sha256: vec!["AB:".repeat(31) + "AB"], ..Default::default() })
            .unwrap();
        assert!(matches(&pin, &c));
        assert!(normalize(CertRoleConfig::default()).is_err(), "no constraint at all is refused");
        assert!(normalize_fingerprint("xyz").is_err());
    }

    #[test]
    fn a_certificate_with_two_spiffe_ids_matches_no_role() {
        let mut c = cert();
        c.uri_sans = vec!["spiffe://corp/x".into(), "spiffe://corp/ns/payments/sa/api".into()];
        let by_uri =
            CertRoleConfig { allowed_uri_sans: vec!["spiffe://corp/ns/payments/*".into()], ..Default::default() };
        assert!(!matches(&by_uri, &c));
        let by_pin = CertRoleConfig { certificate_sha256: vec!["ab".repeat(32)], ..Default::default() };
        assert!(!matches(&by_pin, &c));
        // One SPIFFE ID beside other URIs is fine.
        c.uri_sans = vec!["https://corp/x".into(), "spiffe://corp/ns/payments/sa/api".into()];
        assert!(matches(&by_uri, &c));
    }
}
