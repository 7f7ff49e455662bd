//! Certificates for the tests: CAs, client and server certificates, CRLs (rcgen).

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// A certificate and its key, PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// SHA-256 of the DER certificate, lower-case hex.
    pub sha256_hex: String,
}

impl Issued {
    /// `cert || key`, the form `reqwest::Identity::from_pem` takes.
    pub fn identity_pem(&self) -> Vec<u8> {
        format!("{}{}", self.cert_pem, self.key_pem).into_bytes()
    }
}

pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

fn leaf_params(cn: &str, sans: &[&str], serial: u64, server: bool) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    for san in sans {
        params.subject_alt_names.push(if san.contains("://") {
            SanType::URI((*san).try_into().unwrap())
        } else if let Ok(ip) = san.parse() {
            SanType::IpAddress(ip)
        } else {
            SanType::DnsName((*san).try_into().unwrap())
        });
    }
    params.distinguished_name.push(DnType::CommonName, cn);
    params.serial_number = Some(SerialNumber::from(serial));
    params.extended_key_usages =
        vec![if server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth }];
    params.not_before = OffsetDateTime::now_utc() - Duration::days(1);
    params.not_after = OffsetDateTime::now_utc() + Duration::days(30);
    params
}

fn issued(cert: &rcgen::Certificate, key: &KeyPair) -> Issued {
    Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        sha256_hex: keyvault::tls::ClientCert::from_der(cert.der()).sha256_hex,
    }
}

impl TestCa {
    pub fn new(cn: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        TestCa { issuer: CertifiedIssuer::self_signed(params, key).unwrap() }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A client (or server) certificate valid from yesterday for 30 days.
    pub fn leaf(&self, cn: &str, sans: &[&str], serial: u64, server: bool) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = leaf_params(cn, sans, serial, server).signed_by(&key, &self.issuer).unwrap();
        issued(&cert, &key)
    }

    /// A client certificate whose validity ended yesterday.
    pub fn expired(&self, cn: &str, serial: u64) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params = leaf_params(cn, &[], serial, false);
        params.not_before = OffsetDateTime::now_utc() - Duration::days(30);
        params.not_after = OffsetDateTime::now_utc() - Duration::days(1);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        issued(&cert, &key)
    }

    /// A client certificate whose validity ends `secs` seconds from now.
    pub fn expiring(&self, cn: &str, serial: u64, secs: i64) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params = leaf_params(cn, &[], serial, false);
        params.not_after = OffsetDateTime::now_utc() + Duration::seconds(secs);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        issued(&cert, &key)
    }

    /// A CRL (PEM) revoking the given serial numbers.
    pub fn crl(&self, revoked: &[u64]) -> String {
        self.crl_until(revoked, OffsetDateTime::now_utc() + Duration::days(7))
    }

    /// A CRL (PEM) revoking the given serial numbers, whose nextUpdate is `next_update`.
    pub fn crl_until(&self, revoked: &[u64], next_update: OffsetDateTime) -> String {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: (now - Duration::minutes(5)).min(next_update - Duration::days(1)),
            next_update,
            crl_number: SerialNumber::from(now.unix_timestamp() as u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now - Duration::minutes(1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer).unwrap().pem().unwrap()
    }
}

/// A self-signed client certificate (no CA vouches for it).
pub fn self_signed(cn: &str) -> Issued {
    let key = KeyPair::generate().unwrap();
    let cert = leaf_params(cn, &[], 99, false).self_signed(&key).unwrap();
    issued(&cert, &key)
}
