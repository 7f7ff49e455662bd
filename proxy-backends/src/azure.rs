//! Azure Key Vault secrets as a [`SecretBackend`], over its REST API (api-version
//! [`API_VERSION`], pinned): get (latest or a version), set, list (following `nextLink`),
//! delete, with an OAuth2 client-credentials token from Microsoft Entra ID, cached and
//! refreshed before it expires.
//!
//! Key Vault names allow letters, digits and `-` only; a KeyVault path maps to a name by
//! joining its segments with `--` (`db/password` is `db--password`), and `--` splits a name
//! back into folders when listing. A secret value that is a JSON object maps to its fields,
//! any other value to `.data.value`; writing exactly `{"value": "..."}` stores the plain
//! string.
//!
//! No emulator of Key Vault exists; the tests run this adapter against a fake of the
//! secrets API and the token endpoint written from Microsoft's API reference.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::{BackendError, Capabilities, SecretBackend, SecretData, SecretValue, Version};

/// The Key Vault REST API version this adapter speaks.
pub const API_VERSION: &str = "7.4";

/// `[[mounts]] type = "azure"`, `[mounts.options]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// `https://<name>.vault.azure.net`
    pub vault_url: String,
    pub tenant_id: String,
    pub client_id: String,
    /// The application's client secret; or, instead, a certificate registered with the
    /// application and its private key (PEM): the token request then carries a client
    /// assertion signed with the key (RS256, `x5t#S256` naming the certificate).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub client_certificate_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Default `https://login.microsoftonline.com` (sovereign clouds have others).
    #[serde(default = "default_authority")]
    pub authority_host: String,
    /// CA certificates (PEM) for both hosts, instead of the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_authority() -> String {
    "https://login.microsoftonline.com".into()
}

struct Token {
    value: SecretString,
    refresh_at: Instant,
}

/// How the application proves itself to Entra ID.
enum Credential {
    Secret(SecretString),
    /// The private key (PEM, zeroized on drop) and the certificate's SHA-256 thumbprint.
    Certificate {
        key_pem: Zeroizing<Vec<u8>>,
        x5t_s256: String,
    },
}

/// A Key Vault's secrets.
pub struct Azure {
    http: reqwest::Client,
    vault: String,
    token_url: String,
    scope: String,
    client_id: String,
    credential: Credential,
    token: tokio::sync::Mutex<Option<Token>>,
}

impl std::fmt::Debug for Azure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Azure").field("vault", &self.vault).field("client_id", &self.client_id).finish_non_exhaustive()
    }
}

/// A path's Key Vault name (`a/b` is `a--b`); names allow `[0-9A-Za-z-]`, 1 to 127.
/// Key Vault's names are case-insensitive, so paths must be lower case: `PROD/db` would
/// name the secret `prod/db` is, past a policy written for `prod/*` (one secret, one
/// path).
fn name_of(path: &str) -> Result<String, BackendError> {
    let name = path.trim_matches('/').split('/').collect::<Vec<_>>().join("--");
    let ok = !name.is_empty()
        && name.len() <= 127
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && path.split('/').all(|s| !s.is_empty() && !s.contains("--") && !s.starts_with('-') && !s.ends_with('-'));
    if !ok {
        return Err(BackendError::Invalid(format!(
            "{path:?} cannot be an Azure Key Vault name: segments of lower-case letters, digits and single dashes \
             (Key Vault's names are case-insensitive), 127 characters in all"
        )));
    }
    Ok(name)
}

/// An error reply of Key Vault or Entra ID.
fn azure_error(status: StatusCode, body: &[u8], what: &str) -> BackendError {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    // The most specific code: `innererror.code` (e.g. ObjectIsDeletedButRecoverable).
    let code = v["error"]["innererror"]["code"]
        .as_str()
        .or(v["error"]["code"].as_str())
        .or(v["error"].as_str())
        .unwrap_or_default()
        .to_owned();
    let msg: String = v["error"]["message"]
        .as_str()
        .or(v["error_description"].as_str())
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    match status.as_u16() {
        404 => BackendError::NotFound,
        401 | 403 => BackendError::Denied(format!("{what}: {status} {code}: {msg}")),
        409 => BackendError::Conflict(format!("{what}: {code}: {msg}")),
        429 | 500..=599 => BackendError::Unavailable(format!("{what}: {status} {code}")),
        _ => BackendError::Invalid(format!("{what}: {status} {code}: {msg}")),
    }
}

#[derive(Deserialize)]
struct TokenReply {
    access_token: String,
    #[serde(default)]
    expires_in: u64,
}

#[derive(Deserialize)]
struct Bundle {
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    attributes: Option<Attributes>,
}

#[derive(Deserialize)]
struct Attributes {
    #[serde(default)]
    created: Option<u64>,
}

impl Drop for Bundle {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        if let Some(v) = self.value.as_mut() {
            v.zeroize();
        }
    }
}

impl Azure {
    pub fn new(config: AzureConfig) -> Result<Self, BackendError> {
        let invalid = BackendError::Invalid;
        let vault = config.vault_url.trim_end_matches('/').to_owned();
        let authority = config.authority_host.trim_end_matches('/').to_owned();
        for (what, url) in [("vault_url", &vault), ("authority_host", &authority)] {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(invalid(format!("{what} {url:?}: give https://host")));
            }
        }
        let tenant_ok = !config.tenant_id.is_empty()
            && config.tenant_id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'));
        if !tenant_ok {
            return Err(invalid(format!("tenant_id {:?}", config.tenant_id)));
        }
        let credential = match (&config.client_secret_file, &config.client_certificate_file, &config.client_key_file) {
            (Some(f), None, None) => {
                let secret = Zeroizing::new(
                    std::fs::read_to_string(f)
                        .map_err(|e| invalid(format!("client_secret_file {}: {e}", f.display())))?,
                );
                Credential::Secret(SecretString::from(secret.trim().to_owned()))
            }
            (None, Some(cert), Some(key)) => {
                use base64::Engine;
                use rustls_pki_types::pem::PemObject;
                use sha2::Digest;
                let der = rustls_pki_types::CertificateDer::from_pem_file(cert)
                    .map_err(|e| invalid(format!("client_certificate_file {}: {e}", cert.display())))?;
                let key_pem = Zeroizing::new(
                    std::fs::read(key).map_err(|e| invalid(format!("client_key_file {}: {e}", key.display())))?,
                );
                jsonwebtoken::EncodingKey::from_rsa_pem(&key_pem)
                    .map_err(|_| invalid(format!("client_key_file {}: not an RSA private key (PEM)", key.display())))?;
                let x5t_s256 =
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(der.as_ref()));
                Credential::Certificate { key_pem, x5t_s256 }
            }
            _ => {
                return Err(invalid("give client_secret_file, or client_certificate_file with client_key_file".into()));
            }
        };
        // Key Vault's audience is the vault's cloud (vault.azure.net in the public one).
        let host = vault.split("://").nth(1).unwrap_or_default();
        let scope = match host.split_once('.') {
            Some((_, cloud)) if cloud.starts_with("vault.") => format!("https://{cloud}/.default"),
            _ => "https://vault.azure.net/.default".to_owned(),
        };
        Ok(Azure {
            http: crate::http::client(config.ca_file.as_deref())?,
            token_url: format!("{authority}/{}/oauth2/v2.0/token", config.tenant_id),
            scope,
            vault,
            client_id: config.client_id,
            credential,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// The access token: the cached one until 5 minutes (or a fifth of its life) before
    /// it expires, then a new one.
    async fn token(&self) -> Result<SecretString, BackendError> {
        let mut slot = self.token.lock().await;
        if let Some(t) = slot.as_ref()
            && Instant::now() < t.refresh_at
        {
            return Ok(t.value.clone());
        }
        let what = "Entra ID token";
        let proof = match &self.credential {
            Credential::Secret(s) => ("client_secret", Zeroizing::new(s.expose_secret().to_owned())),
            Credential::Certificate { key_pem, x5t_s256 } => ("client_assertion", self.assertion(key_pem, x5t_s256)?),
        };
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.as_str()),
            (proof.0, proof.1.as_str()),
            ("scope", self.scope.as_str()),
        ];
        if proof.0 == "client_assertion" {
            form.push(("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"));
        }
        let body = Zeroizing::new(
            form.iter()
                .map(|(k, v)| {
                    format!("{k}={}", percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC))
                })
                .collect::<Vec<_>>()
                .join("&"),
        );
        let resp = self
            .http
            .post(&self.token_url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| crate::http::transport_error(&e, what))?;
        let status = resp.status();
        let bytes = crate::http::read_limited(resp, what).await?;
        if !status.is_success() {
            return Err(azure_error(status, &bytes, what));
        }
        let t: TokenReply =
            serde_json::from_slice(&bytes).map_err(|_| BackendError::Unavailable(format!("{what}: bad reply")))?;
        let life = crate::upstream_life(t.expires_in.max(1));
        let early = (life / 5).min(Duration::from_secs(300));
        let token = SecretString::from(t.access_token);
        tracing::debug!(lifetime_secs = life.as_secs(), "Entra ID token obtained");
        *slot = Some(Token { value: token.clone(), refresh_at: Instant::now() + life - early });
        Ok(token)
    }

    /// A client assertion: a JWT for the token endpoint, signed with the certificate's
    /// key, valid 10 minutes, used once.
    fn assertion(&self, key_pem: &[u8], x5t_s256: &str) -> Result<Zeroizing<String>, BackendError> {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(key_pem)
            .map_err(|_| BackendError::Invalid("the client key is not an RSA private key".into()))?;
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.x5t_s256 = Some(x5t_s256.to_owned());
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let mut jti = [0u8; 16];
        getrandom::fill(&mut jti).map_err(|_| BackendError::Unavailable("no randomness".into()))?;
        let claims = json!({
            "aud": self.token_url, "iss": self.client_id, "sub": self.client_id,
            "jti": jti.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "nbf": now, "iat": now, "exp": now + 600,
        });
        jsonwebtoken::encode(&header, &claims, &key)
            .map(Zeroizing::new)
            .map_err(|e| BackendError::Invalid(format!("signing the client assertion: {e}")))
    }

    /// A call to the vault with the bearer token; a 401 drops the token and tries once more.
    async fn call(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<&Zeroizing<Vec<u8>>>,
        what: &str,
    ) -> Result<(StatusCode, Zeroizing<Vec<u8>>), BackendError> {
        for attempt in 0..2 {
            let token = self.token().await?;
            let mut r = self.http.request(method.clone(), url).bearer_auth(token.expose_secret());
            if let Some(b) = body {
                r = r.header("Content-Type", "application/json").body(b.to_vec());
            }
            let resp = r.send().await.map_err(|e| crate::http::transport_error(&e, what))?;
            let status = resp.status();
            let bytes = crate::http::read_limited(resp, what).await?;
            if status == StatusCode::UNAUTHORIZED && attempt == 0 {
                *self.token.lock().await = None;
                continue;
            }
            return Ok((status, bytes));
        }
        Err(BackendError::Unavailable(format!("{what}: refused twice")))
    }

    fn secret_url(&self, name: &str, version: Option<&str>) -> String {
        match version {
            Some(v) => format!("{}/secrets/{name}/{v}?api-version={API_VERSION}", self.vault),
            None => format!("{}/secrets/{name}?api-version={API_VERSION}", self.vault),
        }
    }
}

#[async_trait]
impl SecretBackend for Azure {
    fn kind(&self) -> &'static str {
        "azure"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            versions: false,
            version_ids: true,
            version_stages: false,
            writes: true,
            deletes: true,
            list: true,
        }
    }

    async fn read(&self, path: &str, version: &Version) -> Result<SecretValue, BackendError> {
        let what = "Azure get secret";
        let name = name_of(path)?;
        let url = match version {
            Version::Latest => self.secret_url(&name, None),
            Version::Id(v) if !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric()) => {
                self.secret_url(&name, Some(v))
            }
            Version::Id(_) => return Err(BackendError::Invalid("a Key Vault version is letters and digits".into())),
            Version::Number(_) | Version::Stage(_) => {
                return Err(BackendError::Unsupported("numbered versions and stages (use version_id)"));
            }
        };
        let (status, body) = self.call(reqwest::Method::GET, &url, None, what).await?;
        if !status.is_success() {
            return Err(azure_error(status, &body, what));
        }
        let b: Bundle =
            serde_json::from_slice(&body).map_err(|_| BackendError::Unavailable(format!("{what}: bad reply")))?;
        let data = SecretData::from_text(b.value.as_deref().ok_or(BackendError::NotFound)?);
        let version_id = b.id.as_deref().and_then(|id| id.rsplit('/').next()).map(str::to_owned);
        let created_time =
            b.attributes.as_ref().and_then(|a| a.created).and_then(|secs| crate::rfc3339_of_unix(secs as f64));
        Ok(SecretValue { data, version: None, version_id, created_time })
    }

    async fn write(&self, path: &str, data: &SecretData, _expected: Option<u64>) -> Result<Option<u64>, BackendError> {
        let what = "Azure set secret";
        let name = name_of(path)?;
        let value = data.to_text()?;
        // Refused here, before a deleted secret is recovered for it: a write that Key
        // Vault then refuses would leave the deleted (perhaps leaked) value current again.
        if value.len() > MAX_SECRET_VALUE {
            return Err(BackendError::Invalid(format!(
                "Azure Key Vault keeps at most {MAX_SECRET_VALUE} bytes per secret (this one has {})",
                value.len()
            )));
        }
        let body = Zeroizing::new(serde_json::to_vec(&json!({ "value": value.as_str() })).unwrap_or_default());
        let (status, reply) = self.call(reqwest::Method::PUT, &self.secret_url(&name, None), Some(&body), what).await?;
        if status.is_success() {
            return Ok(None);
        }
        // Deleted but not purged (soft delete): recover the name, then set it.
        let err = azure_error(status, &reply, what);
        if !matches!(&err, BackendError::Conflict(m) if m.contains("ObjectIsDeletedButRecoverable")) {
            return Err(err);
        }
        let recover = format!("{}/deletedsecrets/{name}/recover?api-version={API_VERSION}", self.vault);
        let (s, r) = self.call(reqwest::Method::POST, &recover, None, "Azure recover secret").await?;
        if !s.is_success() {
            return Err(azure_error(s, &r, "Azure recover secret"));
        }
        // Recovered for this write only: if the write fails, the secret is deleted again
        // (its old value must not become current because of a write that did not happen).
        let set = match self.call(reqwest::Method::PUT, &self.secret_url(&name, None), Some(&body), what).await {
            Ok((status, _)) if status.is_success() => return Ok(None),
            Ok((status, reply)) => azure_error(status, &reply, what),
            Err(e) => e,
        };
        if let Err(d) = self.delete(path).await {
            tracing::error!(secret = %name, error = %d, "Azure: a secret recovered for a write that failed could not be deleted again; delete it by hand");
        }
        Err(set)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let what = "Azure list secrets";
        let folder = prefix.trim_matches('/');
        let under = if folder.is_empty() { String::new() } else { format!("{}--", name_of(folder)?) };
        let mut names = std::collections::BTreeSet::new();
        let mut url = format!("{}/secrets?api-version={API_VERSION}&maxresults=25", self.vault);
        for _ in 0..10_000 {
            let (status, body) = self.call(reqwest::Method::GET, &url, None, what).await?;
            if !status.is_success() {
                return Err(azure_error(status, &body, what));
            }
            let v: Value =
                serde_json::from_slice(&body).map_err(|_| BackendError::Unavailable(format!("{what}: bad reply")))?;
            for item in v["value"].as_array().into_iter().flatten() {
                // Listed in lower case, the one spelling a path may have ([`name_of`]).
                let Some(name) = item["id"].as_str().and_then(|id| id.rsplit('/').next()) else { continue };
                let name = name.to_ascii_lowercase();
                let Some(rest) = name.strip_prefix(under.as_str()) else { continue };
                match rest.split_once("--") {
                    Some((dir, _)) if !dir.is_empty() => names.insert(format!("{dir}/")),
                    None if !rest.is_empty() => names.insert(rest.to_owned()),
                    _ => false,
                };
            }
            if names.len() > crate::http::MAX_LIST_NAMES {
                // The same answer every time (see `read_limited`): not a failing upstream.
                return Err(BackendError::Invalid(format!("{what}: more than {} names", crate::http::MAX_LIST_NAMES)));
            }
            // Follow nextLink only to the same vault (it carries the bearer token).
            match v["nextLink"].as_str().filter(|l| !l.is_empty()) {
                Some(next) if next.starts_with(&format!("{}/", self.vault)) => url = next.to_owned(),
                Some(_) => return Err(BackendError::Unavailable(format!("{what}: a nextLink to another host"))),
                None => return Ok(names.into_iter().collect()),
            }
        }
        Err(BackendError::Invalid(format!("{what}: too many pages")))
    }

    async fn delete(&self, path: &str) -> Result<(), BackendError> {
        let what = "Azure delete secret";
        let name = name_of(path)?;
        let (status, body) = self.call(reqwest::Method::DELETE, &self.secret_url(&name, None), None, what).await?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        Err(azure_error(status, &body, what))
    }
}

/// The most bytes of a secret's value (Azure Key Vault's limit: 25 KB).
const MAX_SECRET_VALUE: usize = 25 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_key_vault_names() {
        assert_eq!(name_of("db/password").unwrap(), "db--password");
        assert_eq!(name_of("a").unwrap(), "a");
        assert_eq!(name_of("prod-1/db").unwrap(), "prod-1--db");
        // Key Vault's names are case-insensitive: one spelling per secret.
        for bad in ["a--b", "a_b", "a/-b", "", "x.y", "PROD/db", "prod/Db"] {
            assert!(name_of(bad).is_err(), "{bad}");
        }
        assert!(name_of(&"a".repeat(128)).is_err());
    }

    #[test]
    fn errors_map_by_status() {
        assert_eq!(azure_error(StatusCode::NOT_FOUND, b"{}", "g"), BackendError::NotFound);
        let e = azure_error(StatusCode::UNAUTHORIZED, br#"{"error":{"code":"Unauthorized","message":"m"}}"#, "g");
        assert!(matches!(e, BackendError::Denied(_)));
        assert!(azure_error(StatusCode::TOO_MANY_REQUESTS, b"{}", "g").is_transient());
    }
}
