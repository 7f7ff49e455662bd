//! TLS: the server configuration (rustls, TLS 1.2 and 1.3, AEAD suites only) and the
//! development certificates of `keyvault dev`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};

/// The crypto provider of every TLS endpoint: aws-lc-rs. rustls implements AEAD suites
/// only (AES-GCM, ChaCha20-Poly1305), for TLS 1.2 and 1.3 alike.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Read a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| {
            Error::Config(format!(
                "cannot read certificates from {}: {e}",
                path.display()
            ))
        })?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Config(format!("bad PEM in {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "no certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

/// Read a PEM private key (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        Error::Config(format!(
            "cannot read a private key from {}: {e}",
            path.display()
        ))
    })
}

/// The server configuration for a certificate chain and key.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>> {
    let certs = load_certs(cert_file)?;
    let key = load_key(key_file)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            Error::Config(format!(
                "TLS certificate {} / key {}: {e}",
                cert_file.display(),
                key_file.display()
            ))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Files of the development PKI under a `keyvault dev` data directory.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl DevPki {
    pub fn in_dir(dir: &Path) -> Self {
        DevPki {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca-key.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
        }
    }

    /// Create the CA and a server certificate for `localhost` and 127.0.0.1 if missing.
    pub fn ensure(&self) -> Result<()> {
        if self.ca_cert.exists() && self.server_cert.exists() && self.server_key.exists() {
            return Ok(());
        }
        if let Some(dir) = self.ca_cert.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::Config(format!("cannot create {}: {e}", dir.display())))?;
        }
        let err =
            |e: rcgen::Error| Error::Internal(format!("generating development certificates: {e}"));
        let ca_key = rcgen::KeyPair::generate().map_err(err)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "KeyVault development CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).map_err(err)?;

        let server_key = rcgen::KeyPair::generate().map_err(err)?;
        let mut params = rcgen::CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])
        .map_err(err)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let server = params.signed_by(&server_key, &ca).map_err(err)?;

        write_private(&self.ca_key, &ca_key_pem(&ca))?;
        write_file(&self.ca_cert, &ca.pem())?;
        write_private(&self.server_key, &server_key.serialize_pem())?;
        write_file(&self.server_cert, &server.pem())?;
        Ok(())
    }
}

fn ca_key_pem(ca: &rcgen::CertifiedIssuer<'_, rcgen::KeyPair>) -> String {
    ca.key().serialize_pem()
}

fn write_file(path: &Path, content: &str) -> Result<()> {
    std::fs::write(path, content)
        .map_err(|e| Error::Config(format!("cannot write {}: {e}", path.display())))
}

/// Write a file readable by its owner only.
pub fn write_private(path: &Path, content: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Config(format!("cannot write {}: {e}", path.display())))?;
    f.write_all(content.as_bytes())
        .map_err(|e| Error::Config(format!("cannot write {}: {e}", path.display())))
}
