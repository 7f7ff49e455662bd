//! `keyvault dev`: a working KeyVault in one command, for a newcomer's laptop.
//!
//! Everything lives in one data directory: a SoftHSM token directory created on first
//! start (random PINs; the user PIN in a 0600 file), a development CA and server
//! certificate, sled storage, the keys generated inside the token. A root token is
//! printed at every start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyvault_hsm::softhsm;
use secrecy::ExposeSecret;

use keyvault::config::{
    Config, HsmConfig, ListenerConfig, LogConfig, SecretsConfig, StorageConfig, TokenConfig, WrapSetting,
};
use keyvault::error::{Error, Result};
use keyvault::logical::Operation;
use keyvault::service::Service;
use keyvault::tls::ClientAuth;

use super::dev_pki::DevPki;

pub const DEV_TOKEN_LABEL: &str = "keyvault-dev";

/// Where `keyvault dev` keeps its files.
#[derive(Debug, Clone)]
pub struct DevLayout {
    pub data_dir: PathBuf,
}

impl DevLayout {
    pub fn new(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| Error::Config(format!("cannot create data directory {}: {e}", data_dir.display())))?;
        let data_dir = data_dir
            .canonicalize()
            .map_err(|e| Error::Config(format!("data directory {}: {e}", data_dir.display())))?;
        restrict(&data_dir)?;
        Ok(DevLayout { data_dir })
    }
    pub fn softhsm_dir(&self) -> PathBuf {
        self.data_dir.join("softhsm")
    }
    pub fn token_dir(&self) -> PathBuf {
        self.softhsm_dir().join("tokens")
    }
    pub fn pin_file(&self) -> PathBuf {
        self.data_dir.join("hsm-pin")
    }
    pub fn storage_dir(&self) -> PathBuf {
        self.data_dir.join("storage")
    }
    pub fn audit_log(&self) -> PathBuf {
        self.data_dir.join("audit").join("audit.log")
    }
    pub fn audit_key_file(&self) -> PathBuf {
        self.data_dir.join("audit").join("audit-key.pub")
    }
    pub fn tls_dir(&self) -> PathBuf {
        self.data_dir.join("tls")
    }
    pub fn pki(&self) -> DevPki {
        DevPki::in_dir(&self.tls_dir())
    }

    /// Write the SoftHSM configuration for this data directory (before the module loads).
    pub fn write_softhsm_conf(&self) -> Result<PathBuf> {
        std::fs::create_dir_all(self.softhsm_dir()).map_err(|e| Error::Config(e.to_string()))?;
        softhsm::write_config(&self.softhsm_dir())
            .map_err(|e| Error::Config(format!("cannot write SoftHSM configuration: {e}")))
    }
}

fn restrict(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::Config(format!("cannot restrict {}: {e}", dir.display())))
}

/// First start: create the token and its PIN file. Later starts: nothing to do.
pub fn ensure_token(layout: &DevLayout) -> Result<PathBuf> {
    let module = softhsm::find_module().ok_or_else(|| {
        Error::Config("SoftHSM2 is not installed: run `sudo apt-get install -y softhsm2` (Debian/Ubuntu)".into())
    })?;
    if !layout.pin_file().exists() {
        let so_pin = softhsm::random_pin()?;
        let pin = softhsm::random_pin()?;
        softhsm::init_token(&module, DEV_TOKEN_LABEL, &so_pin, &pin)?;
        keyvault::tls::write_private(&layout.pin_file(), pin.expose_secret())?;
    }
    Ok(module)
}

/// The configuration `keyvault dev` runs with.
pub fn config(layout: &DevLayout, module: PathBuf, address: SocketAddr, dek_cache_ttl: Duration) -> Config {
    let pki = layout.pki();
    Config {
        listener: ListenerConfig {
            client_auth: ClientAuth::Optional,
            client_ca_file: Some(pki.client_ca_cert),
            ..ListenerConfig::new(address, pki.server_cert, pki.server_key)
        },
        storage: StorageConfig::Sled { path: layout.storage_dir() },
        hsm: HsmConfig {
            module,
            token_label: DEV_TOKEN_LABEL.into(),
            pin_file: Some(layout.pin_file()),
            pin_env: None,
            key_prefix: "keyvault".into(),
            max_sessions: 4,
            workers: 2,
            wrap_mechanism: WrapSetting::Auto,
            call_timeout: std::time::Duration::from_secs(10),
            session_copies: keyvault_hsm::DEFAULT_SESSION_COPIES,
        },
        tokens: TokenConfig::default(),
        secrets: SecretsConfig { dek_cache_ttl, ..SecretsConfig::default() },
        log: LogConfig::default(),
        auth: Default::default(),
        audit: keyvault::audit::AuditConfig::at(layout.audit_log()),
        rotation: Default::default(),
        telemetry: Default::default(),
        memory: Default::default(),
        mounts: keyvault::config::default_mounts(),
    }
}

/// The development client identity: a policy `dev-client` over `secret/*` and a cert role
/// `dev-client` pinned to the development client certificate, allowing direct requests.
/// Created on first start, through the pipeline with the root token; left alone
/// afterwards (an admin may have changed them).
pub async fn ensure_dev_client(service: &Service, root: &str, layout: &DevLayout) -> Result<()> {
    let policy = format!("sys/policies/acl/{DEV_CLIENT_ROLE}");
    match service.request(Operation::Read, &policy, Some(root), &serde_json::Value::Null).await {
        Ok(_) => return Ok(()),
        Err(Error::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    let text = r#"path "secret/*" { capabilities = ["create", "read", "update", "delete", "list"] }"#;
    let body = keyvault_api::sys::PolicyWrite { policy: Some(text.into()) };
    service.request(Operation::Write, &policy, Some(root), &to_value(&body)?).await?;
    let certs = keyvault::tls::load_certs(&layout.pki().client_cert)?;
    let fp = keyvault::tls::ClientCert::from_der(&certs[0]).sha256_hex;
    #[derive(serde::Serialize)]
    struct Role {
        #[serde(flatten)]
        role: keyvault_api::auth::CertRole,
        #[serde(flatten)]
        token: keyvault_api::auth::TokenSettings,
    }
    let role = Role {
        role: keyvault_api::auth::CertRole { certificate_sha256: vec![fp], allow_direct: true, ..Default::default() },
        token: keyvault_api::auth::TokenSettings { token_policies: vec![DEV_CLIENT_ROLE.into()], ..Default::default() },
    };
    let path = format!("auth/cert/role/{DEV_CLIENT_ROLE}");
    service.request(Operation::Write, &path, Some(root), &to_value(&role)?).await?;
    Ok(())
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Error::Internal(format!("JSON encoding: {e}")))
}

pub const DEV_CLIENT_ROLE: &str = "dev-client";

/// The banner printed once the server listens. The root token is printed on purpose:
/// this is development mode. It goes to stdout, never to the log.
pub fn banner(layout: &DevLayout, addr: SocketAddr, root_token: &str, ttl: Duration) -> String {
    let pki = layout.pki();
    let url = format!("https://{addr}");
    format!(
        "\nKeyVault is running in development mode. Do not use it for real secrets.\n\n\
         \x20 Address:        {url}\n\
         \x20 CA certificate: {ca}\n\
         \x20 Root token:     {root_token}   (expires in {ttl})\n\
         \x20 Data directory: {data}\n\
         \x20 Audit log:      {audit} (verify: keyvault audit verify --public-key {audit_key} {audit})\n\
         \x20 SoftHSM tokens: {tokens}\n\n\
         Try it:\n\
         \x20 export KEYVAULT_ADDR={url} KEYVAULT_CACERT={ca} KEYVAULT_TOKEN={root_token}\n\
         \x20 curl -s --cacert $KEYVAULT_CACERT -H \"X-Vault-Token: $KEYVAULT_TOKEN\" -X PUT --json '{{\"value\":\"s3cret\"}}' $KEYVAULT_ADDR/v1/secret/db/password\n\
         \x20 curl -s --cacert $KEYVAULT_CACERT -H \"X-Vault-Token: $KEYVAULT_TOKEN\" $KEYVAULT_ADDR/v1/secret/db/password | jq -r .data.value\n\n\
         Mutual TLS (client CA {client_ca}; client certificate {client_cert}, key {client_key}):\n\
         \x20 export KEYVAULT_CLIENT_CERT={client_cert} KEYVAULT_CLIENT_KEY={client_key}\n\
         \x20 curl -s --cacert $KEYVAULT_CACERT --cert $KEYVAULT_CLIENT_CERT --key $KEYVAULT_CLIENT_KEY --json '{{\"name\":\"dev-client\"}}' $KEYVAULT_ADDR/v1/auth/cert/login | jq -r .auth.client_token\n\
         \x20 curl -s --cacert $KEYVAULT_CACERT --cert $KEYVAULT_CLIENT_CERT --key $KEYVAULT_CLIENT_KEY $KEYVAULT_ADDR/v1/secret/db/password | jq -r .data.value   # no token: the certificate is the credential\n",
        ca = pki.ca_cert.display(),
        client_ca = pki.client_ca_cert.display(),
        client_cert = pki.client_cert.display(),
        client_key = pki.client_key.display(),
        data = layout.data_dir.display(),
        audit = layout.audit_log().display(),
        audit_key = layout.audit_key_file().display(),
        tokens = layout.token_dir().display(),
        ttl = humantime::format_duration(ttl),
    )
}
