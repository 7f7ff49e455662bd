//! AWS Secrets Manager as a [`SecretBackend`]: `GetSecretValue` (latest, a version id, or
//! a staging label), `PutSecretValue` (and `CreateSecret` for a new name), `ListSecrets`,
//! `DeleteSecret`, over `reqwest`, each request signed with SigV4 by the `aws-sigv4` crate
//! (the official SDK builds about ten times longer on a two-core machine: docs/architecture.md).
//!
//! A secret whose `SecretString` is a JSON object maps to its fields (`.data.<key>`); any
//! other string to `.data.value`; `SecretBinary` to `.data.binary` (base64). A write of
//! exactly one string field `value` stores that string, any other object its JSON text.
//!
//! Credentials, in this order: the configuration (`access_key_id` with
//! `secret_access_key_file`), the environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), web identity (`role_arn` and
//! `web_identity_token_file`, or `AWS_ROLE_ARN` and `AWS_WEB_IDENTITY_TOKEN_FILE`: STS
//! `AssumeRoleWithWebIdentity`, assumed again before the keys expire), the shared
//! credentials file (`AWS_SHARED_CREDENTIALS_FILE` or `~/.aws/credentials`, profile
//! `AWS_PROFILE` or the configured `profile`, else `default`). Held in memory only.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::{BackendError, Capabilities, SecretBackend, SecretData, SecretValue, Version};

/// `[[mounts]] type = "aws"`, `[mounts.options]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// e.g. `eu-west-1` (default: `AWS_REGION`, then `AWS_DEFAULT_REGION`).
    #[serde(default)]
    pub region: Option<String>,
    /// Default `https://secretsmanager.<region>.amazonaws.com`; a VPC endpoint, or a
    /// local emulator in tests.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Secret names are `<prefix><path>` (e.g. `prod/`): a mount sees only its part.
    #[serde(default)]
    pub name_prefix: String,
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
    /// The shared credentials file's profile (default `AWS_PROFILE`, else `default`).
    #[serde(default)]
    pub profile: Option<String>,
    /// Web identity (EKS IRSA, any OIDC): the role to assume and the file holding the
    /// identity token (default `AWS_ROLE_ARN`, `AWS_WEB_IDENTITY_TOKEN_FILE`).
    #[serde(default)]
    pub role_arn: Option<String>,
    #[serde(default)]
    pub web_identity_token_file: Option<PathBuf>,
    /// STS for web identity (default `https://sts.<region>.amazonaws.com`).
    #[serde(default)]
    pub sts_endpoint: Option<String>,
    /// Days before a deleted secret is gone for good (7 to 30); `0` deletes at once.
    #[serde(default = "default_recovery")]
    pub recovery_window_days: u32,
    /// CA certificates (PEM) to verify the endpoint with, instead of the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_recovery() -> u32 {
    7
}

#[derive(Clone)]
struct Keys {
    access_key_id: String,
    secret: SecretString,
    session_token: Option<SecretString>,
}

/// Where the keys come from: fixed, or assumed by web identity (and renewed).
enum Source {
    Fixed(Keys),
    WebIdentity {
        role_arn: String,
        token_file: PathBuf,
        sts: String,
        /// The keys and when to assume the role again (5 minutes before they expire).
        current: tokio::sync::Mutex<Option<(Keys, std::time::Instant)>>,
    },
}

/// An AWS Secrets Manager region (or endpoint).
pub struct Aws {
    http: reqwest::Client,
    endpoint: String,
    region: String,
    prefix: String,
    recovery_days: u32,
    source: Source,
}

impl std::fmt::Debug for Aws {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aws")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("web_identity", &matches!(self.source, Source::WebIdentity { .. }))
            .finish_non_exhaustive()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `[profile]` of an INI credentials file: `aws_access_key_id`, `aws_secret_access_key`,
/// `aws_session_token`.
fn profile_keys(text: &str, profile: &str) -> Option<Keys> {
    let mut in_profile = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_profile = line.trim_matches(['[', ']']).trim() == profile;
            continue;
        }
        let Some((k, v)) = line.split_once('=').filter(|_| in_profile) else { continue };
        let v = v.trim().to_owned();
        match k.trim() {
            "aws_access_key_id" => id = Some(v),
            "aws_secret_access_key" => secret = Some(SecretString::from(v)),
            "aws_session_token" => token = Some(SecretString::from(v)),
            _ => {}
        }
    }
    Some(Keys { access_key_id: id?, secret: secret?, session_token: token })
}

fn credentials(c: &AwsConfig, region: &str) -> Result<Source, BackendError> {
    let invalid = BackendError::Invalid;
    if let (Some(id), Some(file)) = (&c.access_key_id, &c.secret_access_key_file) {
        let text = Zeroizing::new(
            std::fs::read_to_string(file)
                .map_err(|e| invalid(format!("secret_access_key_file {}: {e}", file.display())))?,
        );
        return Ok(Source::Fixed(Keys {
            access_key_id: id.clone(),
            secret: SecretString::from(text.trim().to_owned()),
            session_token: None,
        }));
    }
    if c.access_key_id.is_some() || c.secret_access_key_file.is_some() {
        return Err(invalid("give both access_key_id and secret_access_key_file, or neither".into()));
    }
    if let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        return Ok(Source::Fixed(Keys {
            access_key_id: id,
            secret: SecretString::from(secret),
            session_token: env("AWS_SESSION_TOKEN").map(SecretString::from),
        }));
    }
    let role = c.role_arn.clone().or_else(|| env("AWS_ROLE_ARN"));
    let token_file =
        c.web_identity_token_file.clone().or_else(|| env("AWS_WEB_IDENTITY_TOKEN_FILE").map(PathBuf::from));
    if let (Some(role_arn), Some(token_file)) = (role, token_file) {
        std::fs::metadata(&token_file)
            .map_err(|e| invalid(format!("web identity token file {}: {e}", token_file.display())))?;
        let sts = c
            .sts_endpoint
            .clone()
            .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com"))
            .trim_end_matches('/')
            .to_owned();
        return Ok(Source::WebIdentity { role_arn, token_file, sts, current: tokio::sync::Mutex::new(None) });
    }
    let file = env("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".aws/credentials")));
    let profile = c.profile.clone().or_else(|| env("AWS_PROFILE")).unwrap_or_else(|| "default".into());
    if let Some(file) = file
        && let Ok(text) = std::fs::read_to_string(&file).map(Zeroizing::new)
    {
        return profile_keys(&text, &profile)
            .map(Source::Fixed)
            .ok_or_else(|| invalid(format!("no credentials for profile {profile:?} in {}", file.display())));
    }
    Err(invalid(
        "no AWS credentials: configure access_key_id, set AWS_ACCESS_KEY_ID, web identity, or a credentials file"
            .into(),
    ))
}

/// The text of `<name>...</name>` in STS's XML reply (its elements hold no markup).
fn xml_field<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))? + start;
    Some(xml[start..end].trim())
}

/// An error reply of the AWS JSON protocol: `{"__type": "...#Name", "message": "..."}`.
fn aws_error(status: StatusCode, body: &[u8], what: &str) -> BackendError {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let kind = v["__type"].as_str().unwrap_or_default().rsplit('#').next().unwrap_or_default().to_owned();
    let msg: String = v["message"].as_str().or(v["Message"].as_str()).unwrap_or_default().chars().take(200).collect();
    // AWS: "...because it was marked for deletion"; moto: "...currently marked deleted".
    let deleted = msg.contains("marked for deletion") || msg.contains("marked deleted");
    match kind.as_str() {
        "ResourceNotFoundException" => BackendError::NotFound,
        "InvalidRequestException" if deleted => BackendError::NotFound,
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "IncompleteSignature"
        | "MissingAuthenticationToken" => BackendError::Denied(format!("{what}: {kind}: {msg}")),
        "ThrottlingException" | "InternalServiceError" | "ServiceUnavailable" | "RequestTimeout" => {
            BackendError::Unavailable(format!("{what}: {kind}"))
        }
        "ResourceExistsException" => BackendError::Conflict(format!("{what}: {msg}")),
        _ if status == StatusCode::NOT_FOUND => BackendError::NotFound,
        _ if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS => {
            BackendError::Unavailable(format!("{what}: {status}"))
        }
        _ => BackendError::Invalid(format!("{what}: {kind}: {msg}")),
    }
}

impl Aws {
    pub fn new(config: AwsConfig) -> Result<Self, BackendError> {
        let invalid = BackendError::Invalid;
        let region = config
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .ok_or_else(|| invalid("no region: set region, or AWS_REGION".into()))?;
        if !region.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(invalid(format!("region {region:?}")));
        }
        let endpoint = config
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://secretsmanager.{region}.amazonaws.com"))
            .trim_end_matches('/')
            .to_owned();
        if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
            return Err(invalid(format!("endpoint {endpoint:?}: give https://host")));
        }
        if config.recovery_window_days != 0 && !(7..=30).contains(&config.recovery_window_days) {
            return Err(invalid("recovery_window_days is 0 or 7 to 30".into()));
        }
        Ok(Aws {
            http: crate::http::client(config.ca_file.as_deref())?,
            source: credentials(&config, &region)?,
            endpoint,
            region,
            prefix: config.name_prefix,
            recovery_days: config.recovery_window_days,
        })
    }

    /// The keys to sign with: fixed, or assumed by web identity (again when they near
    /// their expiry; the token file is read each time: it is rotated by its issuer).
    async fn keys(&self) -> Result<Keys, BackendError> {
        let Source::WebIdentity { role_arn, token_file, sts, current } = &self.source else {
            let Source::Fixed(k) = &self.source else { unreachable!("two variants") };
            return Ok(k.clone());
        };
        let mut cur = current.lock().await;
        if let Some((k, renew_at)) = cur.as_ref()
            && std::time::Instant::now() < *renew_at
        {
            return Ok(k.clone());
        }
        let what = "AWS STS AssumeRoleWithWebIdentity";
        let token = Zeroizing::new(
            std::fs::read_to_string(token_file)
                .map_err(|e| {
                    // The path is the server's business: logged, not answered.
                    tracing::error!(file = %token_file.display(), error = %e, "{what}: the web identity token file cannot be read");
                    BackendError::Unavailable(format!("{what}: the web identity token file cannot be read (see the server log)"))
                })?,
        );
        let enc = |v: &str| percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string();
        let body = Zeroizing::new(format!(
            "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn={}&RoleSessionName=keyvault&WebIdentityToken={}",
            enc(role_arn),
            enc(token.trim())
        ));
        let resp = self
            .http
            .post(format!("{sts}/"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_string())
            .send()
            .await
            .map_err(|_| BackendError::Unavailable(format!("{what}: cannot reach the STS endpoint")))?;
        let status = resp.status();
        let xml = crate::http::read_limited(resp, what).await?;
        let xml = Zeroizing::new(String::from_utf8_lossy(&xml).into_owned());
        if !status.is_success() {
            let code = xml_field(&xml, "Code").unwrap_or_default().to_owned();
            return Err(BackendError::Denied(format!("{what}: {status} {code}")));
        }
        let field = |n: &str| {
            xml_field(&xml, n).map(str::to_owned).ok_or_else(|| BackendError::Unavailable(format!("{what}: no {n}")))
        };
        let keys = Keys {
            access_key_id: field("AccessKeyId")?,
            secret: SecretString::from(field("SecretAccessKey")?),
            session_token: Some(SecretString::from(field("SessionToken")?)),
        };
        // Assume again 5 minutes before they expire (the expiry from the reply; an hour
        // if it cannot be read).
        let life = xml_field(&xml, "Expiration")
            .and_then(|e| humantime::parse_rfc3339_weak(e).ok())
            .and_then(|t| t.duration_since(SystemTime::now()).ok())
            .unwrap_or(Duration::from_secs(3600))
            .min(crate::MAX_UPSTREAM_LIFE);
        let renew_at =
            std::time::Instant::now() + life.saturating_sub(Duration::from_secs(300)).max(Duration::from_secs(1));
        tracing::info!(role = %role_arn, expires_in_secs = life.as_secs(), "AWS credentials from web identity");
        *cur = Some((keys.clone(), renew_at));
        Ok(keys)
    }

    /// One call of the Secrets Manager JSON protocol, signed.
    async fn call(&self, action: &str, body: &Value) -> Result<(StatusCode, Zeroizing<Vec<u8>>), BackendError> {
        let what = format!("AWS {action}");
        let keys = self.keys().await?;
        let payload = Zeroizing::new(serde_json::to_vec(body).map_err(|e| BackendError::Invalid(e.to_string()))?);
        let target = format!("secretsmanager.{action}");
        let url = format!("{}/", self.endpoint);
        let headers = [("content-type", "application/x-amz-json-1.1"), ("x-amz-target", target.as_str())];
        let identity = Credentials::new(
            keys.access_key_id.clone(),
            keys.secret.expose_secret().to_owned(),
            keys.session_token.as_ref().map(|t| t.expose_secret().to_owned()),
            None,
            "keyvault",
        )
        .into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("secretsmanager")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| BackendError::Invalid(format!("{what}: signing: {e}")))?
            .into();
        let signable =
            SignableRequest::new("POST", url.as_str(), headers.iter().copied(), SignableBody::Bytes(&payload))
                .map_err(|e| BackendError::Invalid(format!("{what}: signing: {e}")))?;
        let (instructions, _) =
            sign(signable, &params).map_err(|e| BackendError::Invalid(format!("{what}: signing: {e}")))?.into_parts();
        let mut r = self.http.post(&url).body(payload.to_vec());
        for (k, v) in headers.iter().copied().chain(instructions.headers()) {
            r = r.header(k, v);
        }
        let resp = r.send().await.map_err(|e| crate::http::transport_error(&e, &what))?;
        let status = resp.status();
        let body = crate::http::read_limited(resp, &what).await?;
        if !status.is_success() {
            return Err(aws_error(status, &body, &what));
        }
        Ok((status, body))
    }

    /// The secret's name: the prefix and the path. A path must be a name's characters
    /// (`[A-Za-z0-9/_+=.@-]`): Secrets Manager takes an ARN as a `SecretId` too, and
    /// `arn:aws:...:secret:x` (a `:` no name has) would reach a secret outside the
    /// prefix, of another account where its policy allows.
    fn name(&self, path: &str) -> Result<String, BackendError> {
        secret_name(&self.prefix, path)
    }
}

/// [`Aws::name`]: `prefix` and `path`, or why `path` cannot be part of a name.
fn secret_name(prefix: &str, path: &str) -> Result<String, BackendError> {
    if path.is_empty() || !path.chars().all(|c| c.is_ascii_alphanumeric() || "/_+=.@-".contains(c)) {
        return Err(BackendError::Invalid(format!(
            "{path:?} cannot be a Secrets Manager name: letters, digits and /_+=.@- only"
        )));
    }
    Ok(format!("{prefix}{path}"))
}

#[derive(Deserialize)]
struct GetReply {
    #[serde(rename = "SecretString", default)]
    secret_string: Option<String>,
    #[serde(rename = "SecretBinary", default)]
    secret_binary: Option<String>,
    #[serde(rename = "VersionId", default)]
    version_id: Option<String>,
    #[serde(rename = "CreatedDate", default)]
    created: Option<f64>,
}

impl Drop for GetReply {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        if let Some(s) = self.secret_string.as_mut() {
            s.zeroize();
        }
        if let Some(s) = self.secret_binary.as_mut() {
            s.zeroize();
        }
    }
}

#[async_trait]
impl SecretBackend for Aws {
    fn kind(&self) -> &'static str {
        "aws"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            versions: false,
            version_ids: true,
            version_stages: true,
            writes: true,
            deletes: true,
            list: true,
        }
    }

    async fn read(&self, path: &str, version: &Version) -> Result<SecretValue, BackendError> {
        let mut req = json!({ "SecretId": self.name(path)? });
        match version {
            Version::Latest => {}
            Version::Id(id) => req["VersionId"] = json!(id),
            Version::Stage(stage) => req["VersionStage"] = json!(stage),
            Version::Number(_) => {
                return Err(BackendError::Unsupported("numbered versions (use version_id or version_stage)"));
            }
        }
        let (_, body) = self.call("GetSecretValue", &req).await?;
        let r: GetReply = serde_json::from_slice(&body)
            .map_err(|_| BackendError::Unavailable("AWS GetSecretValue: a reply not in its shape".into()))?;
        let data = match (&r.secret_string, &r.secret_binary) {
            (Some(s), _) => SecretData::from_text(s),
            (None, Some(b)) => SecretData::from_fields([("binary", b.as_str())]),
            (None, None) => return Err(BackendError::NotFound),
        };
        let created_time = r.created.and_then(crate::rfc3339_of_unix);
        Ok(SecretValue { data, version: None, version_id: r.version_id.clone(), created_time })
    }

    async fn write(&self, path: &str, data: &SecretData, _expected: Option<u64>) -> Result<Option<u64>, BackendError> {
        let value = data.to_text()?;
        // Refused here, before a deleted secret is restored for it: a write that AWS
        // then refuses would leave the deleted (perhaps leaked) value current again.
        if value.len() > MAX_SECRET_STRING {
            return Err(BackendError::Invalid(format!(
                "AWS Secrets Manager keeps at most {MAX_SECRET_STRING} bytes per secret (this one has {})",
                value.len()
            )));
        }
        let name = self.name(path)?;
        let req = json!({ "SecretId": name, "SecretString": value.as_str() });
        // New, deleted within its recovery window (the name stays taken until restored:
        // writing it again restores it), or live.
        match self.call("DescribeSecret", &json!({ "SecretId": name })).await {
            Err(BackendError::NotFound) => {
                let create = json!({ "Name": name, "SecretString": value.as_str() });
                self.call("CreateSecret", &create).await?;
                return Ok(None);
            }
            Err(e) => return Err(e),
            Ok((_, body)) => {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if v.get("DeletedDate").is_some_and(|d| !d.is_null()) {
                    self.call("RestoreSecret", &json!({ "SecretId": name })).await?;
                    // Restored for this write only: if the write fails, the secret is
                    // deleted again (its old value must not become current because of
                    // a write that did not happen).
                    if let Err(e) = self.call("PutSecretValue", &req).await {
                        if let Err(d) = self.delete(path).await {
                            tracing::error!(secret = %name, error = %d, "AWS: a secret restored for a write that failed could not be deleted again; delete it by hand");
                        }
                        return Err(e);
                    }
                    return Ok(None);
                }
            }
        }
        self.call("PutSecretValue", &req).await?;
        // The request bodies above held the value; serde_json's buffers are dropped.
        Ok(None)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let folder = prefix.trim_matches('/');
        let under = if folder.is_empty() { self.prefix.clone() } else { format!("{}{folder}/", self.prefix) };
        let mut names = std::collections::BTreeSet::new();
        let mut next: Option<String> = None;
        for _ in 0..10_000 {
            let mut req = json!({ "MaxResults": 100 });
            if !under.is_empty() {
                req["Filters"] = json!([{ "Key": "name", "Values": [under] }]);
            }
            if let Some(t) = &next {
                req["NextToken"] = json!(t);
            }
            let (_, body) = self.call("ListSecrets", &req).await?;
            let v: Value = serde_json::from_slice(&body)
                .map_err(|_| BackendError::Unavailable("AWS ListSecrets: a reply not in its shape".into()))?;
            for s in v["SecretList"].as_array().into_iter().flatten() {
                if s.get("DeletedDate").is_some_and(|d| !d.is_null()) {
                    continue;
                }
                let Some(rest) = s["Name"].as_str().and_then(|n| n.strip_prefix(under.as_str())) else { continue };
                match rest.split_once('/') {
                    Some((dir, _)) if !dir.is_empty() => names.insert(format!("{dir}/")),
                    None if !rest.is_empty() => names.insert(rest.to_owned()),
                    _ => false,
                };
            }
            if names.len() > crate::http::MAX_LIST_NAMES {
                // The same answer every time (see `read_limited`): not a failing upstream.
                return Err(BackendError::Invalid(format!(
                    "AWS ListSecrets: more than {} names",
                    crate::http::MAX_LIST_NAMES
                )));
            }
            next = v["NextToken"].as_str().filter(|t| !t.is_empty()).map(str::to_owned);
            if next.is_none() {
                break;
            }
        }
        Ok(names.into_iter().collect())
    }

    async fn delete(&self, path: &str) -> Result<(), BackendError> {
        let mut req = json!({ "SecretId": self.name(path)? });
        if self.recovery_days == 0 {
            req["ForceDeleteWithoutRecovery"] = json!(true);
        } else {
            req["RecoveryWindowInDays"] = json!(self.recovery_days);
        }
        match self.call("DeleteSecret", &req).await {
            Ok(_) | Err(BackendError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The most bytes of a `SecretString` (AWS Secrets Manager's quota).
const MAX_SECRET_STRING: usize = 65_536;

#[cfg(test)]
mod tests {
    use super::*;

    /// A path is made of a name's characters: an ARN (with `:`), which Secrets Manager
    /// would take as a `SecretId` outside the prefix, is refused.
    #[test]
    fn paths_are_names_never_arns() {
        assert_eq!(secret_name("prod/", "db/password").unwrap(), "prod/db/password");
        assert_eq!(secret_name("", "a+b=c.d@e_f-g").unwrap(), "a+b=c.d@e_f-g");
        for bad in ["arn:aws:secretsmanager:us-east-1:210987654321:secret:theirs-AbCdEf", "a b", "", "x?y", "é"] {
            assert!(matches!(secret_name("", bad), Err(BackendError::Invalid(_))), "{bad}");
        }
    }

    #[test]
    fn strings_and_json_map_to_fields_both_ways() {
        assert_eq!(SecretData::from_text("plain").field("value").unwrap().as_str(), "plain");
        assert_eq!(SecretData::from_text(r#"{"u":"x"}"#).field("u").unwrap().as_str(), "x");
        assert_eq!(SecretData::from_text("{not json").field("value").unwrap().as_str(), "{not json");
        assert_eq!(SecretData::from_fields([("value", "p")]).to_text().unwrap().as_str(), "p");
        assert_eq!(SecretData::from_fields([("a", "1")]).to_text().unwrap().as_str(), r#"{"a":"1"}"#);
    }

    #[test]
    fn sts_replies_are_read() {
        let xml = "<AssumeRoleWithWebIdentityResponse><Credentials><AccessKeyId>ASIA1</AccessKeyId>\
                   <SecretAccessKey>sk</SecretAccessKey><SessionToken>st</SessionToken>\
                   <Expiration>2030-01-01T00:00:00Z</Expiration></Credentials></AssumeRoleWithWebIdentityResponse>";
        assert_eq!(xml_field(xml, "AccessKeyId"), Some("ASIA1"));
        assert_eq!(xml_field(xml, "Expiration"), Some("2030-01-01T00:00:00Z"));
        assert_eq!(xml_field(xml, "Missing"), None);
    }

    #[test]
    fn profiles_and_errors() {
        let ini = "[default]\naws_access_key_id = A\naws_secret_access_key = S\n[other]\naws_access_key_id=B\naws_secret_access_key=T\naws_session_token=X\n";
        let k = profile_keys(ini, "other").unwrap();
        assert_eq!((k.access_key_id.as_str(), k.secret.expose_secret()), ("B", "T"));
        assert!(k.session_token.is_some());
        assert!(profile_keys(ini, "none").is_none());
        let e = aws_error(StatusCode::BAD_REQUEST, br#"{"__type":"ResourceNotFoundException","message":"x"}"#, "r");
        assert_eq!(e, BackendError::NotFound);
        let e = aws_error(StatusCode::BAD_REQUEST, br#"{"__type":"com.amazonaws#ThrottlingException"}"#, "r");
        assert!(e.is_transient());
        let e = aws_error(StatusCode::BAD_REQUEST, br#"{"__type":"UnrecognizedClientException"}"#, "r");
        assert!(matches!(e, BackendError::Denied(_)));
    }
}
