//! The admin commands: `login`, `secret`, `transit`, `policy`, `role`, `token`, on top of
//! the `keyvault-client` crate. Text for people, `--format json` for scripts; any failure
//! exits non-zero with the server's message.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Args, Subcommand, ValueEnum};
use keyvault_client::{Auth, Client, ExposeSecret};
use serde_json::{Map, Value, json};
use zeroize::Zeroizing;

use super::EndpointArgs;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people.
    Text,
    /// One JSON document on stdout, for scripts.
    Json,
}

/// Where the server is, and how to print.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    #[command(flatten)]
    pub endpoint: EndpointArgs,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

impl ClientArgs {
    fn client(&self) -> Result<Client> {
        self.endpoint.clone().endpoint()?.client()
    }
}

fn print_json(v: &Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// `key: value` lines, keys sorted; values that are not strings as JSON.
fn print_map(m: &Map<String, Value>) {
    let sorted: BTreeMap<&String, &Value> = m.iter().collect();
    for (k, v) in sorted {
        match v {
            Value::String(s) => println!("{k}: {s}"),
            other => println!("{k}: {other}"),
        }
    }
}

/// `LIST` a path and print its keys, one per line (or `{"keys": [...]}`).
async fn list_keys(c: &ClientArgs, path: &str) -> Result<()> {
    let keys: keyvault_api::KeyList = c.client()?.request_data("LIST", path, None::<&()>).await?;
    match c.format {
        Format::Text => keys.keys.iter().for_each(|k| println!("{k}")),
        Format::Json => print_json(&json!({ "keys": keys.keys }))?,
    }
    Ok(())
}

/// Bytes from a file, or from stdin for `-`.
fn read_input(path: &PathBuf) -> Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::new());
    if path.as_os_str() == "-" {
        std::io::stdin().read_to_end(&mut buf).context("reading stdin")?;
    } else {
        *buf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(buf)
}

/// `key=value` pairs as a JSON object: `key=@file` reads a file, a value that starts with
/// `[` or `{` is JSON, anything else a string; a lone `-` reads a JSON object from stdin.
fn fields(pairs: &[String]) -> Result<Map<String, Value>> {
    if pairs == ["-"] {
        let text = read_input(&PathBuf::from("-"))?;
        return match serde_json::from_slice(&text) {
            Ok(Value::Object(m)) => Ok(m),
            _ => bail!("stdin: a JSON object is expected"),
        };
    }
    let mut out = Map::new();
    for (i, p) in pairs.iter().enumerate() {
        // Not repeated in the error: a value typed without its key may be the secret.
        let (k, v) = p.split_once('=').ok_or_else(|| anyhow!("argument {}: key=value expected", i + 1))?;
        let value = if let Some(file) = v.strip_prefix('@') {
            let bytes = read_input(&PathBuf::from(file))?;
            Value::String(String::from_utf8(bytes.to_vec()).map_err(|_| anyhow!("{file}: not UTF-8"))?)
        } else if v.starts_with('[') || v.starts_with('{') {
            serde_json::from_str(v).map_err(|_| anyhow!("{k}: the value is not valid JSON"))?
        } else {
            Value::String(v.to_owned())
        };
        out.insert(k.to_owned(), value);
    }
    Ok(out)
}

// ---- login ----

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Method {
    Approle,
    Cert,
    Userpass,
    Kubernetes,
    Bootstrap,
}

/// Log in and print the token (use it as `KEYVAULT_TOKEN`, or in a `--token-file`).
#[derive(Args, Debug)]
pub struct LoginArgs {
    #[command(flatten)]
    pub c: ClientArgs,
    #[arg(long, value_enum)]
    pub method: Method,
    /// Where the method is mounted, if not at its default path (e.g. `auth/approle2`).
    #[arg(long)]
    pub mount: Option<String>,
    /// AppRole: the role id.
    #[arg(long)]
    pub role_id: Option<String>,
    /// AppRole: a file holding the secret id.
    #[arg(long)]
    pub secret_id_file: Option<PathBuf>,
    /// cert and kubernetes: the role.
    #[arg(long)]
    pub role: Option<String>,
    /// userpass: the user.
    #[arg(long)]
    pub username: Option<String>,
    /// userpass: a file holding the password.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// kubernetes: the service account token file.
    #[arg(long, default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token")]
    pub jwt_file: PathBuf,
    /// bootstrap: a file holding the one-time bootstrap token.
    #[arg(long)]
    pub bootstrap_token_file: Option<PathBuf>,
    /// Print the token alone (for `KEYVAULT_TOKEN=$(keyvault login ...)`).
    #[arg(long)]
    pub token_only: bool,
}

fn secret_file(path: &Option<PathBuf>, what: &str) -> Result<Zeroizing<String>> {
    let p = path.as_ref().ok_or_else(|| anyhow!("--{what} is required for this method"))?;
    let text = read_input(p)?;
    let s = std::str::from_utf8(&text).map_err(|_| anyhow!("{}: not UTF-8", p.display()))?;
    Ok(Zeroizing::new(s.trim().to_owned()))
}

pub async fn login(a: LoginArgs) -> Result<()> {
    let need =
        |v: &Option<String>, what: &str| v.clone().ok_or_else(|| anyhow!("--{what} is required for this method"));
    let auth = match a.method {
        Method::Approle => {
            let sid = secret_file(&a.secret_id_file, "secret-id-file")?;
            Auth::approle(need(&a.role_id, "role-id")?, sid.as_str())
        }
        Method::Cert => Auth::cert(a.role.as_deref()),
        Method::Userpass => {
            Auth::userpass(need(&a.username, "username")?, secret_file(&a.password_file, "password-file")?.as_str())
        }
        Method::Kubernetes => Auth::kubernetes(need(&a.role, "role")?, a.jwt_file.clone()),
        Method::Bootstrap => Auth::bootstrap(secret_file(&a.bootstrap_token_file, "bootstrap-token-file")?.as_str()),
    };
    let auth = match &a.mount {
        Some(m) => auth.at_mount(m),
        None => auth,
    };
    let client = a.c.endpoint.clone().endpoint()?.builder()?.auth(auth).build()?;
    let reply = client.login_now().await?;
    if a.token_only {
        println!("{}", reply.client_token.expose());
        return Ok(());
    }
    match a.c.format {
        Format::Json => print_json(&serde_json::to_value(&reply)?)?,
        Format::Text => {
            println!("token: {}", reply.client_token.expose());
            println!("accessor: {}", reply.accessor);
            println!("policies: {}", reply.policies.join(", "));
            println!("ttl: {}s", reply.lease_duration);
            if let Some(x5t) = &reply.bound_certificate_x5t_s256 {
                println!("bound to certificate x5t#S256: {x5t}");
            }
        }
    }
    Ok(())
}

// ---- secrets ----

#[derive(Subcommand, Debug)]
pub enum SecretCommand {
    /// Read a secret: every field, or one with `--field` (printed alone, for scripts).
    Get {
        #[command(flatten)]
        c: ClientArgs,
        /// e.g. `secret/app/db` or `kv/app/db` (KV version 2 paths are found out).
        path: String,
        #[arg(long)]
        field: Option<String>,
    },
    /// Write a secret: `key=value` pairs (`key=@file`), or `-` for a JSON object on stdin.
    Put {
        #[command(flatten)]
        c: ClientArgs,
        path: String,
        #[arg(required = true)]
        pairs: Vec<String>,
    },
    /// The names under a prefix (`name/` for a folder).
    List {
        #[command(flatten)]
        c: ClientArgs,
        prefix: String,
    },
    /// Delete a secret (on KV version 2, its latest version).
    Delete {
        #[command(flatten)]
        c: ClientArgs,
        path: String,
    },
}

pub async fn secret(cmd: SecretCommand) -> Result<()> {
    match cmd {
        SecretCommand::Get { c, path, field } => {
            let client = c.client()?;
            let fields = client.secret_fields(&path).await?;
            if let Some(f) = field {
                let v = fields.get(&f).ok_or_else(|| anyhow!("{path} has no field {f:?}"))?;
                match c.format {
                    Format::Text => println!("{}", v.expose_secret()),
                    Format::Json => print_json(&json!({ f: v.expose_secret() }))?,
                }
                return Ok(());
            }
            let map: Map<String, Value> =
                fields.iter().map(|(k, v)| (k.clone(), Value::String(v.expose_secret().to_owned()))).collect();
            match c.format {
                Format::Text => print_map(&map),
                Format::Json => print_json(&json!({ "data": map }))?,
            }
        }
        SecretCommand::Put { c, path, pairs } => {
            let data = fields(&pairs)?;
            c.client()?.put(&path, &data).await?;
            match c.format {
                Format::Text => println!("written: {path}"),
                Format::Json => print_json(&json!({ "path": path }))?,
            }
        }
        SecretCommand::List { c, prefix } => {
            let keys = c.client()?.list(&prefix).await?;
            match c.format {
                Format::Text => keys.iter().for_each(|k| println!("{k}")),
                Format::Json => print_json(&json!({ "keys": keys }))?,
            }
        }
        SecretCommand::Delete { c, path } => {
            c.client()?.delete(&path).await?;
            match c.format {
                Format::Text => println!("deleted: {path}"),
                Format::Json => print_json(&json!({ "path": path }))?,
            }
        }
    }
    Ok(())
}

// ---- transit ----

#[derive(Subcommand, Debug)]
pub enum TransitCommand {
    /// Create a named key in the HSM.
    CreateKey {
        #[command(flatten)]
        c: ClientArgs,
        name: String,
        /// `aes256-gcm96` or `ed25519`.
        #[arg(long = "type", default_value = "aes256-gcm96")]
        key_type: String,
    },
    /// A new version of a key.
    Rotate {
        #[command(flatten)]
        c: ClientArgs,
        name: String,
    },
    /// Encrypt the bytes of a file (`-`: stdin); prints `vault:v<N>:...`.
    Encrypt {
        #[command(flatten)]
        c: ClientArgs,
        key: String,
        #[arg(long, default_value = "-")]
        input: PathBuf,
    },
    /// Decrypt; the plaintext's bytes go to stdout (`--format json`: base64).
    Decrypt {
        #[command(flatten)]
        c: ClientArgs,
        key: String,
        ciphertext: String,
    },
    /// Sign the bytes of a file (`-`: stdin) with an Ed25519 key.
    Sign {
        #[command(flatten)]
        c: ClientArgs,
        key: String,
        #[arg(long, default_value = "-")]
        input: PathBuf,
    },
    /// Check a signature over the bytes of a file (`-`: stdin); prints `valid: true|false`.
    Verify {
        #[command(flatten)]
        c: ClientArgs,
        key: String,
        signature: String,
        #[arg(long, default_value = "-")]
        input: PathBuf,
    },
}

pub async fn transit(cmd: TransitCommand) -> Result<()> {
    let out = |c: &ClientArgs, key: &str, value: Value| -> Result<()> {
        match c.format {
            Format::Text => match &value {
                Value::String(s) => println!("{s}"),
                other => println!("{key}: {other}"),
            },
            Format::Json => print_json(&json!({ key: value }))?,
        }
        Ok(())
    };
    match cmd {
        TransitCommand::CreateKey { c, name, key_type } => {
            let v = c
                .client()?
                .request("POST", &format!("transit/keys/{name}"), Some(&json!({ "type": key_type })))
                .await?;
            match c.format {
                Format::Text => println!("created: transit/keys/{name} ({key_type})"),
                Format::Json => print_json(&v.map(|v| v["data"].clone()).unwrap_or_default())?,
            }
        }
        TransitCommand::Rotate { c, name } => {
            let v = c.client()?.request("POST", &format!("transit/keys/{name}/rotate"), Some(&json!({}))).await?;
            let latest = v.as_ref().map(|v| v["data"]["latest_version"].clone()).unwrap_or_default();
            out(&c, "latest_version", latest)?;
        }
        TransitCommand::Encrypt { c, key, input } => {
            let ct = c.client()?.encrypt(&key, &read_input(&input)?).await?;
            out(&c, "ciphertext", Value::String(ct))?;
        }
        TransitCommand::Decrypt { c, key, ciphertext } => {
            let pt = c.client()?.decrypt(&key, &ciphertext).await?;
            match c.format {
                Format::Text => std::io::stdout().lock().write_all(&pt)?,
                Format::Json => print_json(&json!({ "plaintext": B64.encode(&pt[..]) }))?,
            }
        }
        TransitCommand::Sign { c, key, input } => {
            let sig = c.client()?.sign(&key, &read_input(&input)?).await?;
            out(&c, "signature", Value::String(sig))?;
        }
        TransitCommand::Verify { c, key, signature, input } => {
            let valid = c.client()?.verify(&key, &read_input(&input)?, &signature).await?;
            out(&c, "valid", Value::Bool(valid))?;
        }
    }
    Ok(())
}

// ---- policies ----

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Write a policy from an HCL or JSON file (`-`: stdin).
    Write {
        #[command(flatten)]
        c: ClientArgs,
        name: String,
        file: PathBuf,
    },
    /// Print a policy's text.
    Read {
        #[command(flatten)]
        c: ClientArgs,
        name: String,
    },
    List {
        #[command(flatten)]
        c: ClientArgs,
    },
}

pub async fn policy(cmd: PolicyCommand) -> Result<()> {
    match cmd {
        PolicyCommand::Write { c, name, file } => {
            let text = read_input(&file)?;
            let text = std::str::from_utf8(&text).map_err(|_| anyhow!("{}: not UTF-8", file.display()))?;
            c.client()?.request("PUT", &format!("sys/policies/acl/{name}"), Some(&json!({ "policy": text }))).await?;
            match c.format {
                Format::Text => println!("written: policy {name}"),
                Format::Json => print_json(&json!({ "name": name }))?,
            }
        }
        PolicyCommand::Read { c, name } => {
            let v =
                c.client()?.request("GET", &format!("sys/policies/acl/{name}"), None::<&()>).await?.unwrap_or_default();
            match c.format {
                Format::Text => println!("{}", v["data"]["policy"].as_str().unwrap_or_default().trim_end()),
                Format::Json => print_json(&v["data"])?,
            }
        }
        PolicyCommand::List { c } => list_keys(&c, "sys/policies/acl").await?,
    }
    Ok(())
}

// ---- roles ----

#[derive(Subcommand, Debug)]
pub enum RoleCommand {
    /// Create or update a role of an auth method: `key=value` pairs (lists as JSON, e.g.
    /// `token_policies='["app"]'`), or `-` for a JSON object on stdin.
    Write {
        #[command(flatten)]
        c: ClientArgs,
        /// `approle`, `cert` or `kubernetes` (or where one is mounted).
        method: String,
        name: String,
        #[arg(required = true)]
        pairs: Vec<String>,
    },
    Read {
        #[command(flatten)]
        c: ClientArgs,
        method: String,
        name: String,
    },
    List {
        #[command(flatten)]
        c: ClientArgs,
        method: String,
    },
    /// An AppRole role's role id.
    RoleId {
        #[command(flatten)]
        c: ClientArgs,
        name: String,
        #[arg(long, default_value = "approle")]
        mount: String,
    },
    /// A new secret id for an AppRole role (shown once: redirect it to a file).
    SecretId {
        #[command(flatten)]
        c: ClientArgs,
        name: String,
        #[arg(long, default_value = "approle")]
        mount: String,
    },
}

fn role_path(method: &str) -> String {
    format!("auth/{}/role", method.trim_matches('/').trim_start_matches("auth/"))
}

pub async fn role(cmd: RoleCommand) -> Result<()> {
    match cmd {
        RoleCommand::Write { c, method, name, pairs } => {
            let data = fields(&pairs)?;
            c.client()?.request("POST", &format!("{}/{name}", role_path(&method)), Some(&data)).await?;
            match c.format {
                Format::Text => println!("written: {}/{name}", role_path(&method)),
                Format::Json => print_json(&json!({ "path": format!("{}/{name}", role_path(&method)) }))?,
            }
        }
        RoleCommand::Read { c, method, name } => {
            let v = c
                .client()?
                .request("GET", &format!("{}/{name}", role_path(&method)), None::<&()>)
                .await?
                .unwrap_or_default();
            match c.format {
                Format::Text => print_map(v["data"].as_object().unwrap_or(&Map::new())),
                Format::Json => print_json(&v["data"])?,
            }
        }
        RoleCommand::RoleId { c, name, mount } => {
            let r: keyvault_api::auth::RoleId =
                c.client()?.request_data("GET", &format!("{}/{name}/role-id", role_path(&mount)), None::<&()>).await?;
            match c.format {
                Format::Text => println!("{}", r.role_id),
                Format::Json => print_json(&json!({ "role_id": r.role_id }))?,
            }
        }
        RoleCommand::SecretId { c, name, mount } => {
            let s: keyvault_api::auth::SecretId = c
                .client()?
                .request_data("POST", &format!("{}/{name}/secret-id", role_path(&mount)), Some(&json!({})))
                .await?;
            match c.format {
                Format::Text => println!("{}", s.secret_id.expose()),
                Format::Json => print_json(&serde_json::to_value(&s)?)?,
            }
        }
        RoleCommand::List { c, method } => list_keys(&c, &role_path(&method)).await?,
    }
    Ok(())
}

// ---- tokens ----

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// The token's details (the token itself is never printed), or another's by accessor.
    Lookup {
        #[command(flatten)]
        c: ClientArgs,
        #[arg(long)]
        accessor: Option<String>,
    },
    /// Renew the token (`--increment 30m`: the new lifetime asked for).
    Renew {
        #[command(flatten)]
        c: ClientArgs,
        #[arg(long)]
        increment: Option<String>,
    },
    /// Revoke the token, or another by accessor.
    Revoke {
        #[command(flatten)]
        c: ClientArgs,
        #[arg(long)]
        accessor: Option<String>,
    },
}

pub async fn token(cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Lookup { c, accessor } => {
            let client = c.client()?;
            let v = match &accessor {
                Some(a) => {
                    client.request("POST", "auth/token/lookup-accessor", Some(&json!({ "accessor": a }))).await?
                }
                None => client.request("GET", "auth/token/lookup-self", None::<&()>).await?,
            }
            .unwrap_or_default();
            let mut data = v["data"].as_object().cloned().unwrap_or_default();
            // The token is a credential: a terminal or a script's log is no place for it.
            data.remove("id");
            match c.format {
                Format::Text => print_map(&data),
                Format::Json => print_json(&Value::Object(data))?,
            }
        }
        TokenCommand::Renew { c, increment } => {
            let body = match increment {
                Some(i) => json!({ "increment": i }),
                None => json!({}),
            };
            let v = c.client()?.request("POST", "auth/token/renew-self", Some(&body)).await?.unwrap_or_default();
            let ttl = v["auth"]["lease_duration"].clone();
            match c.format {
                Format::Text => println!("renewed: {ttl}s left"),
                Format::Json => print_json(&json!({ "ttl": ttl }))?,
            }
        }
        TokenCommand::Revoke { c, accessor } => {
            let client = c.client()?;
            match &accessor {
                Some(a) => {
                    client.request("POST", "auth/token/revoke-accessor", Some(&json!({ "accessor": a }))).await?
                }
                None => client.request("POST", "auth/token/revoke-self", Some(&json!({}))).await?,
            };
            match c.format {
                Format::Text => println!("revoked"),
                Format::Json => print_json(&json!({ "revoked": true }))?,
            }
        }
    }
    Ok(())
}
