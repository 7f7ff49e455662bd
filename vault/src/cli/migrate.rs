//! `keyvault operator migrate`: copy every secret under a prefix from one mount to another
//! on a running server (embedded `secret/` or `kv/`, or a proxied mount), through the
//! API, so that moving units between the embedded store and an external vault is a
//! change of configuration. Each copy is read back and compared; a secret already equal
//! at the destination is skipped, so a run that stopped half way resumes by running it
//! again. The latest version of each secret is copied, or with `--all-versions` (both
//! mounts keeping numbered versions: KV version 2, or a proxied mount whose upstream
//! does) every live version, oldest first.
//!
//! A secret that exists at the destination with another value is left alone and named
//! (the run then fails): it was written there by someone else, perhaps after the
//! applications moved, and copying over it would put an older value back. `--overwrite`
//! copies over it. A new secret is written to KV version 2 with `cas: 0`, so a writer
//! that creates it meanwhile is not overwritten either.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use keyvault_client::Client;
use serde_json::Value;

/// A call's reply, `None` on 404.
async fn fetch(c: &Client, method: &str, path: &str, body: Option<&Value>) -> Result<Option<Value>> {
    match c.request(method, path, body).await {
        Ok(v) => Ok(Some(v.unwrap_or(Value::Null))),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(anyhow!("{method} /v1/{path}: {e}")),
    }
}

/// How one mount is addressed: KV version 1 paths, or version 2's `data/` and `metadata/`.
#[derive(Debug, Clone)]
struct Mount {
    path: String,
    v2: bool,
    /// Keeps numbered versions: KV version 2, or a proxied mount that says
    /// `versions = "numbered"` (reads take `?version=N`, each write makes a version).
    numbered: bool,
}

fn enc(names: &str) -> String {
    keyvault_api::secret::encode_segments(names)
}

impl Mount {
    fn list_path(&self, prefix: &str) -> String {
        // Names as names: each segment percent-encoded (a secret named `%2e%2e` or `a?b`
        // is that secret, not another path or a query).
        let p = if prefix.is_empty() { String::new() } else { format!("{}/", enc(prefix.trim_end_matches('/'))) };
        if self.v2 { format!("{}/metadata/{p}", self.path) } else { format!("{}/{p}", self.path) }
    }

    fn data_path(&self, name: &str) -> String {
        let name = enc(name);
        if self.v2 { format!("{}/data/{name}", self.path) } else { format!("{}/{name}", self.path) }
    }

    /// The secret's fields from a read's reply.
    fn fields(&self, v: &Value) -> Result<Value> {
        let data = if self.v2 { &v["data"]["data"] } else { &v["data"] };
        match data {
            Value::Object(_) => Ok(data.clone()),
            _ => bail!("a read reply without data"),
        }
    }

    fn write_body(&self, fields: &Value) -> Value {
        if self.v2 { serde_json::json!({ "data": fields }) } else { fields.clone() }
    }
}

/// Learn a mount's KV version the way Vault's tools do. `path` must be the mount itself,
/// not a folder inside one (that is `--prefix`).
async fn mount(c: &Client, path: &str) -> Result<Mount> {
    let path = path.trim_matches('/').to_owned();
    if keyvault_api::secret::SecretPath::parse(&path).is_err() {
        bail!("mount {path:?}: not a mount path");
    }
    let v = fetch(c, "GET", &format!("sys/internal/ui/mounts/{path}"), None)
        .await?
        .ok_or_else(|| anyhow!("mount {path}: not found"))?;
    if v["data"]["type"] != "kv" {
        bail!("mount {path} is not a key/value store");
    }
    let served_by = v["data"]["path"].as_str().unwrap_or_default().trim_matches('/');
    if served_by != path {
        bail!("{path} is inside the mount {served_by}/: give --from/--to {served_by} and --prefix for the folder");
    }
    let options = &v["data"]["options"];
    let v2 = options["version"] == "2";
    Ok(Mount { v2, numbered: v2 || options["versions"] == "numbered", path })
}

/// Every secret name under `prefix` (depth first).
async fn walk(c: &Client, m: &Mount, prefix: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut folders = vec![prefix.trim_matches('/').to_owned()];
    while let Some(folder) = folders.pop() {
        let Some(v) = fetch(c, "LIST", &m.list_path(&folder), None).await? else { continue };
        for k in v["data"]["keys"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            // Read and written with the operator's token: an entry that is not a name
            // (`..`, which a URL resolves) would address another path.
            if keyvault_api::secret::check_listing_entry(k).is_err() {
                bail!("the listing of {}/{folder} names {k:?}, which is not a secret name; nothing was copied", m.path);
            }
            let full = if folder.is_empty() { k.to_owned() } else { format!("{folder}/{k}") };
            match full.strip_suffix('/') {
                Some(f) => folders.push(f.to_owned()),
                None => out.push(full),
            }
        }
    }
    out.sort();
    Ok(out)
}

/// What happened to one secret.
enum Outcome {
    /// This many versions written.
    Copied(u64),
    Equal,
    /// The destination holds another value: left alone (without `--overwrite`).
    Differs,
}

/// The fields of the latest version, or `None` when there is none.
async fn latest(c: &Client, m: &Mount, name: &str) -> Result<Option<Value>> {
    match fetch(c, "GET", &m.data_path(name), None).await? {
        Some(v) => m.fields(&v).map(Some),
        None => Ok(None),
    }
}

/// Whether a KV version 2 secret has metadata with any version (deleted ones too).
/// Without `read` on the metadata (403) it is not known: `false`, and the write's
/// `cas: 0` is what refuses a secret that exists there.
async fn has_versions(c: &Client, m: &Mount, name: &str) -> Result<bool> {
    let path = format!("{}/metadata/{}", m.path, enc(name));
    match c.request("GET", &path, None::<&Value>).await {
        Ok(v) => Ok(v.is_some_and(|v| v["data"]["current_version"].as_u64().unwrap_or(0) > 0)),
        Err(e) if e.is_not_found() || e.status() == Some(403) => Ok(false),
        Err(e) => Err(anyhow!("GET /v1/{path}: {e}")),
    }
}

/// The live versions of a secret, oldest first (deleted and destroyed ones skipped): from
/// KV version 2's metadata, or 1 to the latest by `?version=N` on a proxied mount.
async fn history(c: &Client, m: &Mount, name: &str) -> Result<Vec<Value>> {
    let numbers: Vec<u64> = if m.v2 {
        let Some(v) = fetch(c, "GET", &format!("{}/metadata/{}", m.path, enc(name)), None).await? else {
            return Ok(Vec::new());
        };
        let mut n: Vec<u64> = v["data"]["versions"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, meta)| meta["deletion_time"].as_str().is_none_or(str::is_empty) && meta["destroyed"] != true)
            .filter_map(|(k, _)| k.parse().ok())
            .collect();
        n.sort_unstable();
        n
    } else {
        let Some(v) = fetch(c, "GET", &m.data_path(name), None).await? else { return Ok(Vec::new()) };
        match v["metadata"]["version"].as_u64() {
            Some(n) if n > 0 => (1..=n).collect(),
            _ => return Ok(vec![m.fields(&v)?]),
        }
    };
    let mut out = Vec::with_capacity(numbers.len());
    for n in numbers {
        // None: deleted since it was listed, or deleted upstream.
        if let Some(v) = fetch(c, "GET", &format!("{}?version={n}", m.data_path(name)), None).await? {
            out.push(m.fields(&v)?);
        }
    }
    Ok(out)
}

/// Write one version. `new`: the secret is absent at the destination, and a KV version 2
/// destination is told so (`cas: 0`: refused if someone created it meanwhile).
async fn write(c: &Client, to: &Mount, name: &str, fields: &Value, new: bool) -> Result<()> {
    let mut body = to.write_body(fields);
    if to.v2 && new {
        body["options"] = serde_json::json!({ "cas": 0 });
    }
    c.request("PUT", &to.data_path(name), Some(&body)).await.with_context(|| format!("write {}/{name}", to.path))?;
    Ok(())
}

/// Copy the latest version, unless the destination's latest is equal, or differs and
/// `overwrite` is off.
async fn copy_latest(c: &Client, from: &Mount, to: &Mount, name: &str, opts: &Options) -> Result<Outcome> {
    let Some(fields) = latest(c, from, name).await? else {
        bail!("read {}/{name}: gone since it was listed", from.path);
    };
    let there = latest(c, to, name).await?;
    if there.as_ref() == Some(&fields) {
        return Ok(Outcome::Equal);
    }
    // A KV version 2 secret whose latest version was deleted there reads 404 but is
    // not new: someone deleted it, and a copy would bring a value back.
    let new = there.is_none() && !(to.v2 && has_versions(c, to, name).await?);
    if !new && !opts.overwrite {
        return Ok(Outcome::Differs);
    }
    if opts.dry_run {
        return Ok(Outcome::Copied(1));
    }
    if let Err(e) = write(c, to, name, &fields, new).await {
        // `cas: 0` refused: the secret appeared there meanwhile (or was there, deleted,
        // unseen without `read` on its metadata). Judged as it is now, not the run's end.
        let status = e.downcast_ref::<keyvault_client::Error>().and_then(keyvault_client::Error::status);
        if !new || !matches!(status, Some(400 | 409)) {
            return Err(e);
        }
        return Ok(if latest(c, to, name).await?.as_ref() == Some(&fields) {
            Outcome::Equal
        } else {
            Outcome::Differs
        });
    }
    if latest(c, to, name).await?.as_ref() != Some(&fields) {
        bail!("{}/{name}: the copy read back differs", to.path);
    }
    Ok(Outcome::Copied(1))
}

/// Copy every live version the destination lacks. The destination's live versions must
/// be the first of the source's (none, or a run that stopped half way): any other
/// history there, or a secret whose every version was deleted there, is left alone and
/// reported (`--overwrite` does not apply: versions are appended, never replaced).
async fn copy_history(c: &Client, from: &Mount, to: &Mount, name: &str, dry_run: bool) -> Result<Outcome> {
    let source = history(c, from, name).await?;
    if source.is_empty() {
        bail!("read {}/{name}: gone since it was listed", from.path);
    }
    let have = history(c, to, name).await?;
    let diverged = have.len() > source.len() || source[..have.len()] != have[..];
    if diverged || (have.is_empty() && to.v2 && has_versions(c, to, name).await?) {
        return Ok(Outcome::Differs);
    }
    let missing = &source[have.len()..];
    if missing.is_empty() {
        return Ok(Outcome::Equal);
    }
    if !dry_run {
        for (i, fields) in missing.iter().enumerate() {
            write(c, to, name, fields, have.is_empty() && i == 0).await?;
        }
        if history(c, to, name).await? != source {
            bail!("{}/{name}: the versions read back differ", to.path);
        }
    }
    Ok(Outcome::Copied(missing.len() as u64))
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Secrets written to (or, in a dry run, that would be).
    pub copied: u64,
    /// Versions written (equal to `copied` unless `--all-versions`).
    pub versions: u64,
    /// Secrets already equal at the destination.
    pub equal: u64,
    /// Secrets left alone because the destination holds another value (at most 20 named).
    pub differ: u64,
    pub differ_names: Vec<String>,
}

/// How a run copies.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Every live version, not only the latest.
    pub all_versions: bool,
    /// Count; write nothing.
    pub dry_run: bool,
    /// Copy the latest version over a different value at the destination.
    pub overwrite: bool,
    /// Connections working at once.
    pub workers: usize,
}

/// Copy every secret under `prefix` of `from` into `to`.
pub async fn run(client: &Client, from: &str, to: &str, prefix: &str, opts: Options) -> Result<Summary> {
    let Options { all_versions, dry_run, workers, .. } = opts;
    let (from, to) = (mount(client, from).await?, mount(client, to).await?);
    let inside = |a: &str, b: &str| a.strip_prefix(b).is_some_and(|rest| rest.starts_with('/'));
    if from.path == to.path || inside(&from.path, &to.path) || inside(&to.path, &from.path) {
        bail!("--from and --to are the same mount, or one is inside the other");
    }
    if all_versions && !(from.numbered && to.numbered) {
        let which = if from.numbered { &to.path } else { &from.path };
        bail!(
            "--all-versions needs both mounts to keep numbered versions; {which}/ does not (copy the latest version only)"
        );
    }
    let names = walk(client, &from, prefix).await?;
    let total = names.len() as u64;
    eprintln!(
        "{} {total} secrets ({}) from {}/ (KV v{}) to {}/ (KV v{})",
        if dry_run { "would copy" } else { "copying" },
        if all_versions { "every live version" } else { "latest versions" },
        from.path,
        if from.v2 { 2 } else { 1 },
        to.path,
        if to.v2 { 2 } else { 1 }
    );
    let queue = Arc::new(std::sync::Mutex::new(names));
    let counters = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let [copied, versions, equal, done] = [0, 1, 2, 3];
    let differ: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let mut tasks: tokio::task::JoinSet<Result<()>> = tokio::task::JoinSet::new();
    for _ in 0..workers.max(1) {
        let (queue, c, differ) = (queue.clone(), counters.clone(), differ.clone());
        let (from, to, cl) = (from.clone(), to.clone(), client.clone());
        tasks.spawn(async move {
            loop {
                let Some(name) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop() else { return Ok(()) };
                let outcome = if all_versions {
                    copy_history(&cl, &from, &to, &name, dry_run).await?
                } else {
                    copy_latest(&cl, &from, &to, &name, &opts).await?
                };
                match outcome {
                    Outcome::Copied(n) => {
                        c[copied].fetch_add(1, Ordering::Relaxed);
                        c[versions].fetch_add(n, Ordering::Relaxed);
                    }
                    Outcome::Equal => {
                        c[equal].fetch_add(1, Ordering::Relaxed);
                    }
                    Outcome::Differs => differ.lock().unwrap_or_else(|p| p.into_inner()).push(name),
                }
                let n = c[done].fetch_add(1, Ordering::Relaxed) + 1;
                if n % 100 == 0 || n == total {
                    eprint!(
                        "\r  {n}/{total} done ({} copied, {} already equal)",
                        c[copied].load(Ordering::Relaxed),
                        c[equal].load(Ordering::Relaxed)
                    );
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| anyhow!("migration worker: {e}"))??;
    }
    if total > 0 {
        eprintln!();
    }
    let get = |i: usize| counters[i].load(Ordering::Relaxed);
    let mut differ_names = std::mem::take(&mut *differ.lock().unwrap_or_else(|p| p.into_inner()));
    differ_names.sort();
    let differ = differ_names.len() as u64;
    differ_names.truncate(20);
    Ok(Summary { copied: get(copied), versions: get(versions), equal: get(equal), differ, differ_names })
}
