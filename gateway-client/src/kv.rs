//! Secrets: read, write, list and delete on key/value mounts, version 1 (`secret/`) and
//! version 2 (`kv/`: the client finds out and uses `data/` and `metadata/`), and proxied
//! mounts. Values come back as [`SecretString`]s or zeroizing JSON, never logged.

use std::collections::BTreeMap;

use futures_util::future::join_all;
use keyvault_api::secret::encode_segments;
use secrecy::SecretString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use crate::client::{Client, Credential, data};
use crate::error::{Error, Result};

/// A secret's fields, each zeroized on drop and redacted in `Debug`.
pub type Fields = BTreeMap<String, SecretString>;

/// A JSON value whose strings are zeroized on drop (a secret's fields pass through one).
pub(crate) struct Scrubbed(pub(crate) serde_json::Value);

impl Drop for Scrubbed {
    fn drop(&mut self) {
        keyvault_api::scrub_json(&mut self.0);
    }
}

/// Where a path lives: its mount and whether that is KV version 2.
struct Located {
    mount: String,
    rest: String,
    v2: bool,
}

impl Located {
    /// The API path (under `/v1/`) of the secret, with `v2_part` (`data/`, `metadata/`)
    /// after the mount on KV version 2; each segment percent-encoded, so that the path is
    /// the names given and nothing else (no `%2e%2e` a URL parser turns into `..`, no `?`
    /// starting a query).
    fn api_path(&self, v2_part: &str) -> String {
        let part = if self.v2 { v2_part } else { "" };
        format!("{}{part}{}", encode_segments(&self.mount), encode_segments(&self.rest))
    }
}

impl Client {
    /// The mount serving `path` (asked once per mount, then remembered).
    async fn locate(&self, path: &str) -> Result<Located> {
        let path = path.trim_matches('/');
        if path.is_empty() || path.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
            return Err(Error::Invalid(format!("path {path:?}: empty, `.` or `..` segment")));
        }
        let known = {
            let mounts = self.0.mounts.lock().unwrap_or_else(|p| p.into_inner());
            mounts
                .iter()
                .filter(|(m, _)| path.starts_with(m.as_str()) || format!("{path}/") == **m)
                .max_by_key(|(m, _)| m.len())
                .map(|(m, v2)| (m.clone(), *v2))
        };
        let (mount, v2) = match known {
            Some(k) => k,
            None => {
                #[derive(serde::Deserialize)]
                struct UiMount {
                    path: String,
                    #[serde(default)]
                    options: Option<BTreeMap<String, String>>,
                }
                let m: UiMount = self
                    .request_data("GET", &format!("sys/internal/ui/mounts/{}", encode_segments(path)), None::<&()>)
                    .await?;
                let v2 = m.options.as_ref().and_then(|o| o.get("version")).is_some_and(|v| v == "2");
                let mount = if m.path.ends_with('/') { m.path } else { format!("{}/", m.path) };
                self.0.mounts.lock().unwrap_or_else(|p| p.into_inner()).insert(mount.clone(), v2);
                (mount, v2)
            }
        };
        let rest = path.strip_prefix(mount.as_str()).unwrap_or_default().to_owned();
        Ok(Located { mount, rest, v2 })
    }

    /// The fields of the secret at `path` (`secret/app/db`, `kv/app/db`), as zeroizing
    /// JSON text of one object.
    pub async fn secret_raw(&self, path: &str) -> Result<Zeroizing<Vec<u8>>> {
        let at = self.locate(path).await?;
        let reply = self.send("GET", &at.api_path("data/"), None, Credential::Token).await?;
        let v = Scrubbed(data(&reply)?);
        let fields = if at.v2 { &v.0["data"] } else { &v.0 };
        if !fields.is_object() {
            return Err(Error::Decode(format!("{path}: no fields")));
        }
        serde_json::to_vec(fields).map(Zeroizing::new).map_err(|_| Error::Decode("fields".into()))
    }

    /// Every field of the secret at `path`, as strings (a field that is not a string is
    /// its JSON text).
    pub async fn secret_fields(&self, path: &str) -> Result<Fields> {
        let raw = self.secret_raw(path).await?;
        let mut map = Scrubbed(serde_json::from_slice(&raw).map_err(|_| Error::Decode("fields".into()))?);
        let Some(obj) = map.0.as_object_mut() else { return Err(Error::Decode("fields".into())) };
        Ok(obj
            .iter_mut()
            .map(|(k, v)| {
                let s = match v {
                    serde_json::Value::String(s) => std::mem::take(s),
                    other => other.to_string(),
                };
                (k.clone(), SecretString::from(s))
            })
            .collect())
    }

    /// The secret at `path` as one string: its `value` field, or its only field. A secret
    /// of several fields needs [`Client::secret_field`] or [`Client::secret_json`].
    pub async fn secret(&self, path: &str) -> Result<SecretString> {
        let mut fields = self.secret_fields(path).await?;
        if let Some(v) = fields.remove("value") {
            return Ok(v);
        }
        if fields.len() == 1 {
            return fields.into_values().next().ok_or_else(|| Error::Decode("no field".into()));
        }
        Err(Error::Invalid(format!(
            "{path} has {} fields and none is `value`: name one with secret_field",
            fields.len()
        )))
    }

    /// One field of the secret at `path`.
    pub async fn secret_field(&self, path: &str, field: &str) -> Result<SecretString> {
        self.secret_fields(path)
            .await?
            .remove(field)
            .ok_or_else(|| Error::Invalid(format!("{path} has no field {field:?}")))
    }

    /// The secret at `path` decoded into `T` (its fields as a JSON object). `T` should
    /// hold its secret members in [`SecretString`]s.
    pub async fn secret_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let raw = self.secret_raw(path).await?;
        serde_json::from_slice(&raw).map_err(|_| Error::Decode(format!("{path}: fields do not match the type")))
    }

    /// Read several secrets at once, concurrently (a unit's start-up): every one, in the
    /// order asked, or [`Error::Fetch`] naming each that failed and why.
    pub async fn fetch_all(&self, paths: &[&str]) -> Result<Vec<SecretString>> {
        let results = join_all(paths.iter().map(|p| self.secret(p))).await;
        let mut out = Vec::with_capacity(paths.len());
        let mut failed = Vec::new();
        for (p, r) in paths.iter().zip(results) {
            match r {
                Ok(v) => out.push(v),
                Err(e) => failed.push(((*p).to_owned(), e)),
            }
        }
        if failed.is_empty() { Ok(out) } else { Err(Error::Fetch(failed)) }
    }

    /// Write the secret at `path` (a new version on KV version 2). `fields`: anything that
    /// serializes to a JSON object.
    pub async fn put(&self, path: &str, fields: &(impl Serialize + ?Sized)) -> Result<()> {
        let at = self.locate(path).await?;
        let value = Scrubbed(serde_json::to_value(fields).map_err(|_| Error::Invalid("fields".into()))?);
        if !value.0.is_object() {
            return Err(Error::Invalid("a secret is a JSON object of fields".into()));
        }
        if at.v2 {
            #[derive(Serialize)]
            struct V2<'a> {
                data: &'a serde_json::Value,
            }
            self.call_empty("PUT", &at.api_path("data/"), Some(&V2 { data: &value.0 })).await
        } else {
            self.call_empty("PUT", &at.api_path("data/"), Some(&value.0)).await
        }
    }

    /// The names under `prefix` (`name` for a secret, `name/` for a folder); empty when
    /// there are none.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let prefix = prefix.trim_matches('/');
        let at = self.locate(prefix).await?;
        match self.request_data::<keyvault_api::KeyList>("LIST", &at.api_path("metadata/"), None::<&()>).await {
            Ok(l) => Ok(l.keys),
            Err(e) if e.is_not_found() => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Delete the secret at `path` (on KV version 2: its latest version, soft).
    pub async fn delete(&self, path: &str) -> Result<()> {
        let at = self.locate(path).await?;
        self.call_empty("DELETE", &at.api_path("data/"), None::<&()>).await
    }
}
