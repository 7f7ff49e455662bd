//! The development PKI of `keyvault dev`: a server CA and server certificate, and a
//! separate client CA with one client certificate, made with rcgen on first start.

use std::path::{Path, PathBuf};

use keyvault::error::{Error, Result};
use keyvault::tls::write_private;

/// Files of the development PKI under a `keyvault dev` data directory: a server CA and
/// server certificate, and a separate client CA with one client certificate.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_ca_cert: PathBuf,
    pub client_ca_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Common name and SPIFFE ID of the development client certificate.
pub const DEV_CLIENT_CN: &str = "dev-client";
pub const DEV_CLIENT_SPIFFE: &str = "spiffe://keyvault.dev/client/dev";

fn rcgen_err(e: rcgen::Error) -> Error {
    Error::Internal(format!("generating development certificates: {e}"))
}

/// A self-signed CA.
pub fn new_ca(common_name: &str) -> Result<rcgen::CertifiedIssuer<'static, rcgen::KeyPair>> {
    let key = rcgen::KeyPair::generate().map_err(rcgen_err)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(rcgen_err)?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    rcgen::CertifiedIssuer::self_signed(params, key).map_err(rcgen_err)
}

/// A leaf certificate signed by `ca`: for a server (`server = true`) or a client, with
/// DNS/IP SANs or URI SANs taken from `sans` (a `spiffe://` or other URI becomes a URI SAN).
pub fn new_leaf(
    ca: &rcgen::Issuer<'_, impl rcgen::SigningKey>,
    common_name: &str,
    sans: &[&str],
    server: bool,
) -> Result<(rcgen::Certificate, rcgen::KeyPair)> {
    let key = rcgen::KeyPair::generate().map_err(rcgen_err)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(rcgen_err)?;
    for san in sans {
        let san = if san.contains("://") {
            rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*san).map_err(rcgen_err)?)
        } else if let Ok(ip) = san.parse::<std::net::IpAddr>() {
            rcgen::SanType::IpAddress(ip)
        } else {
            rcgen::SanType::DnsName(rcgen::string::Ia5String::try_from(*san).map_err(rcgen_err)?)
        };
        params.subject_alt_names.push(san);
    }
    params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
    params.extended_key_usages = vec![if server {
        rcgen::ExtendedKeyUsagePurpose::ServerAuth
    } else {
        rcgen::ExtendedKeyUsagePurpose::ClientAuth
    }];
    let cert = params.signed_by(&key, ca).map_err(rcgen_err)?;
    Ok((cert, key))
}

impl DevPki {
    pub fn in_dir(dir: &Path) -> Self {
        DevPki {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_ca_cert: dir.join("client-ca.pem"),
            client_ca_key: dir.join("client-ca-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        }
    }

    /// Create whatever is missing: the server CA and a server certificate for `localhost`,
    /// 127.0.0.1 and ::1; the client CA and a client certificate (CN `dev-client`, SPIFFE
    /// ID `spiffe://keyvault.dev/client/dev`).
    pub fn ensure(&self) -> Result<()> {
        if let Some(dir) = self.ca_cert.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::Config(format!("cannot create {}: {e}", dir.display())))?;
        }
        if !(self.ca_cert.exists() && self.server_cert.exists() && self.server_key.exists()) {
            let ca = new_ca("KeyVault development CA")?;
            let (server, key) = new_leaf(&ca, "localhost", &["localhost", "127.0.0.1", "::1"], true)?;
            write_private(&self.ca_key, &ca.key().serialize_pem())?;
            write_file(&self.ca_cert, &ca.pem())?;
            write_private(&self.server_key, &key.serialize_pem())?;
            write_file(&self.server_cert, &server.pem())?;
        }
        if !(self.client_ca_cert.exists() && self.client_cert.exists() && self.client_key.exists()) {
            let ca = new_ca("KeyVault development client CA")?;
            let (client, key) = new_leaf(&ca, DEV_CLIENT_CN, &[DEV_CLIENT_SPIFFE], false)?;
            write_private(&self.client_ca_key, &ca.key().serialize_pem())?;
            write_file(&self.client_ca_cert, &ca.pem())?;
            write_private(&self.client_key, &key.serialize_pem())?;
            write_file(&self.client_cert, &client.pem())?;
        }
        Ok(())
    }
}

fn write_file(path: &Path, content: &str) -> Result<()> {
    std::fs::write(path, content).map_err(|e| Error::Config(format!("cannot write {}: {e}", path.display())))
}
