//! TLS: the server configuration (rustls, TLS 1.2 and 1.3, AEAD suites only) and the
//! development certificates of `keyvault dev`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::sync::Mutex;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::error::{Error, Result};

/// The crypto provider of every TLS endpoint: aws-lc-rs. rustls implements AEAD suites
/// only (AES-GCM, ChaCha20-Poly1305), for TLS 1.2 and 1.3 alike.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Read a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::Config(format!("cannot read certificates from {}: {e}", path.display())))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Config(format!("bad PEM in {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Config(format!("no certificate in {}", path.display())));
    }
    Ok(certs)
}

/// Read a PEM private key (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| Error::Config(format!("cannot read a private key from {}: {e}", path.display())))
}

/// Whether and how clients present certificates on a listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// No client certificates are asked for.
    #[default]
    Off,
    /// Clients may present one (verified if they do); auth endpoints stay reachable without.
    Optional,
    /// Every connection must present a valid client certificate.
    Required,
}

/// The files a listener's TLS configuration is built from (and reloaded from).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub crls: Vec<PathBuf>,
    pub client_auth: ClientAuth,
}

impl TlsFiles {
    /// Every file whose change triggers a reload.
    pub fn watched(&self) -> Vec<PathBuf> {
        let mut v = vec![self.cert.clone(), self.key.clone()];
        v.extend(self.client_ca.iter().cloned());
        v.extend(self.crls.iter().cloned());
        v
    }
}

/// Read PEM certificate revocation lists.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    let crls: Vec<_> = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| Error::Config(format!("cannot read CRLs from {}: {e}", path.display())))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Config(format!("bad PEM in {}: {e}", path.display())))?;
    if crls.is_empty() {
        return Err(Error::Config(format!("no CRL in {}", path.display())));
    }
    Ok(crls)
}

/// The server configuration: certificate chain and key, and for mutual TLS the client CA
/// bundle and CRLs (chain, validity period and revocation of the end-entity certificate
/// are checked by rustls/webpki; a certificate not issued by the CA bundle, a self-signed
/// one, an expired one or a revoked one fails the handshake). With the client verifier it
/// was built with, which [`ConnectionTrust`] asks again after a reload.
pub fn server_config(files: &TlsFiles) -> Result<(Arc<ServerConfig>, Option<ClientVerifier>)> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    let mut client_verifier = None;
    let builder = match (files.client_auth, &files.client_ca) {
        (ClientAuth::Off, None) => builder.with_no_client_auth(),
        (ClientAuth::Off, Some(_)) => {
            return Err(Error::Config("listener.client_ca_file is set but listener.client_auth is \"off\"".into()));
        }
        (_, None) => {
            return Err(Error::Config("listener.client_auth needs listener.client_ca_file".into()));
        }
        (mode, Some(ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in load_certs(ca)? {
                roots.add(c).map_err(|e| Error::Config(format!("client CA bundle {}: {e}", ca.display())))?;
            }
            let mut crls = Vec::new();
            for f in &files.crls {
                crls.extend(load_crls(f)?);
            }
            let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .with_crls(crls)
                // Intermediate CAs need not publish CRLs; the client's own certificate is
                // what gets revoked. With CRLs configured, an end-entity certificate whose
                // issuer has no CRL fails (unknown status is not accepted).
                .only_check_end_entity_revocation();
            if mode == ClientAuth::Optional {
                v = v.allow_unauthenticated();
            }
            let verifier = v.build().map_err(|e| Error::Config(format!("client certificate verifier: {e}")))?;
            client_verifier = Some(verifier.clone());
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        Error::Config(format!("TLS certificate {} / key {}: {e}", files.cert.display(), files.key.display()))
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(config), client_verifier))
}

/// The certificates the loaded CRLs revoke, as (issuer name DER, serial number bytes):
/// consulted on every request, so that a CRL reload reaches connections opened before it
/// (the handshake only checks the CRLs of its own moment).
#[derive(Debug, Default)]
pub struct RevokedCerts(std::collections::HashSet<(Vec<u8>, Vec<u8>)>);

impl RevokedCerts {
    /// Parse the CRLs of a listener (the same files the handshake verifier uses).
    pub fn from_files(files: &[PathBuf]) -> Result<Self> {
        use x509_parser::prelude::FromDer;
        let mut set = std::collections::HashSet::new();
        for f in files {
            for der in load_crls(f)? {
                let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der.as_ref())
                    .map_err(|e| Error::Config(format!("CRL in {}: {e}", f.display())))?;
                let issuer = crl.issuer().as_raw().to_vec();
                // A CRL past its nextUpdate may miss revocations made since: it is still
                // used (refusing every client because the publisher is late would stop the
                // fleet), and the operator is told at every load.
                if let Some(next) = crl.next_update()
                    && next.timestamp() < crate::unix_now() as i64
                {
                    tracing::warn!(
                        file = %f.display(),
                        next_update = %next,
                        "a CRL is past its nextUpdate: certificates revoked since it was issued are not refused; publish a fresh one and reload (SIGHUP)"
                    );
                }
                for r in crl.iter_revoked_certificates() {
                    set.insert((issuer.clone(), r.raw_serial().to_vec()));
                }
            }
        }
        Ok(RevokedCerts(set))
    }

    pub fn contains(&self, cert: &ClientCert) -> bool {
        !self.0.is_empty() && self.0.contains(&(cert.issuer_der.clone(), cert.serial.clone()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A listener's client certificate verifier.
pub type ClientVerifier = Arc<dyn ClientCertVerifier>;

/// What a client certificate is judged by after its handshake, as of the listener's
/// current TLS configuration: the certificates its CRLs revoke, and its client verifier
/// (the client CA bundle and CRLs), numbered by the reload that made them.
#[derive(Debug)]
pub struct ClientTrust {
    pub revoked: RevokedCerts,
    verifier: Option<ClientVerifier>,
    /// 0 at start, one more at every successful reload.
    pub generation: u64,
}

/// The live [`ClientTrust`], shared by the listener and every connection's
/// [`ConnectionTrust`].
pub type SharedTrust = Arc<ArcSwap<ClientTrust>>;

/// A connection's standing under the listener's current [`ClientTrust`], checked on every
/// request (see [`crate::logical::Peer::check_certificate`]): a reload reaches
/// connections opened before it (kept alive, HTTP/2), not only new handshakes. The CRLs
/// are looked up every time; the chain is verified again by the current client verifier
/// once per reload, so a CA removed from the bundle ends its certificates' connections.
#[derive(Debug, Clone)]
pub struct ConnectionTrust {
    shared: SharedTrust,
    /// The client's chain as presented in the handshake (end entity first).
    chain: Arc<[CertificateDer<'static>]>,
    /// The generation whose verifier last accepted the chain.
    verified_at: Arc<std::sync::atomic::AtomicU64>,
}

/// Why a connection's certificate no longer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Trusted,
    /// In the current CRLs.
    Revoked,
    /// The current client CA bundle (or CRLs) no longer verify its chain.
    Untrusted,
}

impl ConnectionTrust {
    /// `generation`: that of the [`ClientTrust`] read *before* the configuration the
    /// handshake used (a reload in between costs one needless verification, never a
    /// missed one: [`TlsReloader::reload`] stores the configuration first).
    pub fn new(shared: SharedTrust, generation: u64, chain: Vec<CertificateDer<'static>>) -> Self {
        ConnectionTrust {
            shared,
            chain: chain.into(),
            verified_at: Arc::new(std::sync::atomic::AtomicU64::new(generation)),
        }
    }

    /// Whether `cert` (this connection's end entity) still stands.
    pub fn standing(&self, cert: &ClientCert) -> Standing {
        use std::sync::atomic::Ordering;
        let trust = self.shared.load();
        if trust.revoked.contains(cert) {
            return Standing::Revoked;
        }
        if self.verified_at.load(Ordering::Acquire) == trust.generation {
            return Standing::Trusted;
        }
        let (Some(verifier), Some((end_entity, intermediates))) = (&trust.verifier, self.chain.split_first()) else {
            return Standing::Trusted;
        };
        match verifier.verify_client_cert(end_entity, intermediates, rustls_pki_types::UnixTime::now()) {
            Ok(_) => {
                self.verified_at.store(trust.generation, Ordering::Release);
                Standing::Trusted
            }
            Err(e) => {
                tracing::debug!(error = %e, "a connection's client certificate fails the reloaded verifier");
                Standing::Untrusted
            }
        }
    }
}

/// A file's identity and size as seen by the last (re)load.
type Stamp = Option<(std::time::SystemTime, u64, u64)>;

fn stamp(p: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len(), m.ino()))
}

/// The live TLS configuration of a listener, rebuilt from its files on SIGHUP or when a
/// file changes. New connections use the new configuration; open ones keep their
/// session, so a reload drops nothing, but their client certificate is judged by the new
/// CRLs and CA bundle at their next request ([`ConnectionTrust`]). A broken new file
/// keeps the old configuration and logs why.
#[derive(Debug)]
pub struct TlsReloader {
    files: TlsFiles,
    current: Arc<ArcSwap<ServerConfig>>,
    trust: SharedTrust,
    stamps: Mutex<Vec<Stamp>>,
}

impl TlsReloader {
    pub fn new(files: TlsFiles) -> Result<Arc<Self>> {
        let (config, verifier) = server_config(&files)?;
        let revoked = RevokedCerts::from_files(&files.crls)?;
        let stamps = files.watched().iter().map(|p| stamp(p)).collect();
        Ok(Arc::new(TlsReloader {
            files,
            current: Arc::new(ArcSwap::new(config)),
            trust: Arc::new(ArcSwap::from_pointee(ClientTrust { revoked, verifier, generation: 0 })),
            stamps: Mutex::new(stamps),
        }))
    }

    /// What open connections' certificates are judged by (see [`ConnectionTrust`]).
    pub fn trust(&self) -> SharedTrust {
        self.trust.clone()
    }

    /// The configuration handle the listener reads for every new connection.
    pub fn current(&self) -> Arc<ArcSwap<ServerConfig>> {
        self.current.clone()
    }

    /// Rebuild from the files. On failure the running configuration stays.
    pub fn reload(&self, why: &str) -> bool {
        let stamps: Vec<Stamp> = self.files.watched().iter().map(|p| stamp(p)).collect();
        match server_config(&self.files).and_then(|c| Ok((c, RevokedCerts::from_files(&self.files.crls)?))) {
            Ok(((config, verifier), revoked)) => {
                // The configuration first, then the trust: a connection reads them in the
                // other order (see [`ConnectionTrust::new`]).
                self.current.store(config);
                let generation = self.trust.load().generation + 1;
                self.trust.store(Arc::new(ClientTrust { revoked, verifier, generation }));
                *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) = stamps;
                tracing::info!(trigger = why, "TLS configuration reloaded");
                true
            }
            Err(e) => {
                // Remember the stamps anyway: retry when the files change again, not every poll.
                *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) = stamps;
                tracing::error!(trigger = why, error = %e, "TLS reload failed; keeping the previous configuration");
                false
            }
        }
    }

    fn changed(&self) -> bool {
        let now: Vec<Stamp> = self.files.watched().iter().map(|p| stamp(p)).collect();
        *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) != now
    }

    /// Reload on SIGHUP, and when a watched file changes (checked every `poll`).
    pub fn spawn_watchers(self: &Arc<Self>, poll: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(poll);
            loop {
                let sighup = async {
                    match hup.as_mut() {
                        Some(s) => s.recv().await,
                        None => std::future::pending().await,
                    }
                };
                // File reads happen on a blocking thread, never on a runtime worker.
                tokio::select! {
                    _ = sighup => {
                        let m = me.clone();
                        let _ = tokio::task::spawn_blocking(move || m.reload("SIGHUP")).await;
                    }
                    _ = tick.tick() => {
                        let m = me.clone();
                        if tokio::task::spawn_blocking(move || m.changed()).await.unwrap_or(false) {
                            // Give a writer a moment to finish (files replaced one by one).
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                            let m = me.clone();
                            let _ = tokio::task::spawn_blocking(move || m.reload("file change")).await;
                        }
                    }
                }
            }
        })
    }
}

/// What KeyVault knows about a client certificate that passed the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// SHA-256 of the DER certificate, lower-case hex (the pin format).
    pub sha256_hex: String,
    /// The same digest, base64url without padding (RFC 8705 `x5t#S256`).
    pub x5t_s256: String,
    pub common_name: Option<String>,
    pub dns_sans: Vec<String>,
    pub uri_sans: Vec<String>,
    /// Issuer name (DER) and serial number, to look the certificate up in CRLs.
    pub issuer_der: Vec<u8>,
    pub serial: Vec<u8>,
    /// The end of its validity (unix seconds), checked on every request: a connection
    /// (kept alive, or resumed without a new verification) outlives its certificate's
    /// validity otherwise. `i64::MIN` if the certificate could not be read (fail closed).
    pub not_after: i64,
}

impl ClientCert {
    pub fn from_der(der: &[u8]) -> Self {
        use base64::Engine;
        use sha2::{Digest, Sha256};
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let digest = Sha256::digest(der);
        let mut c = ClientCert {
            sha256_hex: hex::encode(digest),
            x5t_s256: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest),
            common_name: None,
            dns_sans: Vec::new(),
            uri_sans: Vec::new(),
            issuer_der: Vec::new(),
            serial: Vec::new(),
            not_after: i64::MIN,
        };
        // The handshake already verified the certificate; a parse failure here only
        // means no name-based identities.
        if let Ok((_, x)) = X509Certificate::from_der(der) {
            c.issuer_der = x.issuer().as_raw().to_vec();
            c.serial = x.raw_serial().to_vec();
            c.not_after = x.validity().not_after.timestamp();
            c.common_name = x.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned);
            if let Ok(Some(san)) = x.subject_alternative_name() {
                for name in &san.value.general_names {
                    match name {
                        GeneralName::DNSName(d) => c.dns_sans.push((*d).to_owned()),
                        GeneralName::URI(u) => c.uri_sans.push((*u).to_owned()),
                        _ => {}
                    }
                }
            }
        }
        c
    }

    /// The SPIFFE ID: the URI SAN with the `spiffe://` scheme, if any.
    pub fn spiffe_id(&self) -> Option<&str> {
        self.uri_sans.iter().map(String::as_str).find(|u| u.starts_with("spiffe://"))
    }
}

/// Create `dir` (and its missing parents) readable by its owner only (0700). One that
/// exists keeps its mode. `what` names it in the error (`audit`, `storage`).
pub fn create_private_dir(dir: &Path, what: &str) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::Config(format!("cannot create {what} directory {}: {e}", dir.display())))
}

/// Write a file readable by its owner only.
///
/// Written to a new file beside it (created 0600, never through a symlink: `O_EXCL`),
/// synced, then renamed over `path`: a file that was there keeps neither its mode nor
/// its place if it was a symlink, and a crash leaves the old file or the new one whole.
pub fn write_private(path: &Path, content: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |e: std::io::Error| Error::Config(format!("cannot write {}: {e}", path.display()));
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".new-{}", std::process::id()));
    let tmp = path.with_file_name(name);
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(content.as_bytes()).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Config(format!("cannot write {} (through {}): {e}", path.display(), tmp.display())));
    }
    // The rename itself made durable.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(failed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private file is the owner's only even where a file was there before, and a
    /// symlink at its place is replaced, not written through.
    #[test]
    fn a_private_file_is_never_written_through_a_link_or_left_open() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
        let was_open = dir.path().join("pin");
        std::fs::write(&was_open, "old").unwrap();
        std::fs::set_permissions(&was_open, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&was_open, "new").unwrap();
        assert_eq!((std::fs::read_to_string(&was_open).unwrap().as_str(), mode(&was_open)), ("new", 0o600));
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, "not yours").unwrap();
        let link = dir.path().join("key.pem");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        write_private(&link, "secret").unwrap();
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "not yours");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_file());
        assert_eq!(mode(&link), 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3, "no temporary file left");
    }
}
