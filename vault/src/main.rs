//! The `keyvault` command.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keyvault::config::Config;
use keyvault::keys::KeyNames;
use keyvault::service::{Builder, Init};
use keyvault_api::sys::{Retired, Rotated, RotationStatus, SetAside};
use secrecy::ExposeSecret;

mod cli;

/// mimalloc instead of glibc's allocator: a request allocates and frees many small
/// buffers across threads, and glibc's malloc/free took about 12% of a read's CPU in the
/// profile of docs/PERFORMANCE.md ("Epoch keys and metrics").
///
/// Wrapped by `zalloc`, which zeroes every block when it is freed (and the old block of a
/// reallocation): request bodies, secret values and decrypted records pass through buffers
/// of hyper, rustls and serde_json that are not ours to zeroize; this wipes them all when
/// released (docs/threat-model.md, "Memory").
#[global_allocator]
static ALLOCATOR: zalloc::ZeroizingAlloc<mimalloc::MiMalloc> = zalloc::ZeroizingAlloc(mimalloc::MiMalloc);

use cli::EndpointArgs;
use cli::bench::{self, BenchOptions, Scenario};
use cli::dev::{self, DevLayout};

#[derive(Parser)]
#[command(name = "keyvault", version, about = "Embedded secret vault and HSM-backed key service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server from a configuration file.
    Server {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Development mode: SoftHSM token, TLS, storage and keys created on the fly in one
    /// data directory; prints a root token.
    Dev {
        /// Where the token, certificates and storage live (created if missing).
        #[arg(long, default_value = "keyvault-dev")]
        data_dir: PathBuf,
        /// Address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:8200")]
        address: SocketAddr,
        /// Lifetime of the printed root token.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        root_token_ttl: Duration,
        /// Log filter (`info`, `keyvault=debug`, ...).
        #[arg(long, default_value = "info", env = "KEYVAULT_LOG")]
        log: String,
        /// Keep unwrapped data keys this long (`secrets.dek_cache_ttl`; 0s: off).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        dek_cache_ttl: Duration,
        /// Store in this PostgreSQL database (`postgres://user@host/db?host=/socket/dir`)
        /// instead of sled in the data directory (benchmarks, trying replicas).
        #[arg(long)]
        postgres: Option<String>,
        /// Where data keys are wrapped (`secrets.key_tier`): `epoch` or `token`.
        #[arg(long, default_value = "epoch")]
        key_tier: String,
        /// `fail_closed`, `buffered`, or `dangerous_off` (benchmarks only).
        #[arg(long, default_value = "fail_closed")]
        audit_mode: String,
        /// A TOML file of `[[mounts]]` entries served besides the default mounts (e.g. a
        /// proxied `hashicorp` mount to try).
        #[arg(long)]
        mounts: Option<PathBuf>,
    },
    /// Print the OpenAPI document (YAML) of the HTTP API: of the default mounts
    /// (docs/openapi.yaml), or of a configuration's mounts.
    Openapi {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Administration that needs the HSM and the store directly.
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// Load generator for any Vault-API server (see docs/PERFORMANCE.md).
    Bench(BenchArgs),
    /// The audit log: verify it, export its public key.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Log in with an auth method and print the token.
    Login(cli::admin::LoginArgs),
    /// Secrets on key/value mounts (version 1 and 2, and proxied mounts).
    Secret {
        #[command(subcommand)]
        command: cli::admin::SecretCommand,
    },
    /// Named keys in the HSM: create, rotate, encrypt, decrypt, sign, verify.
    Transit {
        #[command(subcommand)]
        command: cli::admin::TransitCommand,
    },
    /// ACL policies.
    Policy {
        #[command(subcommand)]
        command: cli::admin::PolicyCommand,
    },
    /// Roles of the auth methods.
    Role {
        #[command(subcommand)]
        command: cli::admin::RoleCommand,
    },
    /// The token in use: look it up, renew it, revoke it.
    Token {
        #[command(subcommand)]
        command: cli::admin::TokenCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check audit files (in order, oldest first) with the audit public key only. Prints
    /// `ok ...` or `ok=false file=... line=... reason=...`; exits 0 only when ok.
    Verify {
        /// The audit public key file (`keyvault audit export-key`).
        #[arg(long)]
        public_key: PathBuf,
        /// The log is still being written: accept entries after the last checkpoint.
        #[arg(long)]
        live: bool,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the audit public key (base64 Ed25519) from the HSM; needs the PIN only.
    ExportKey {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Generate the keys of a new installation inside the token and print a root token.
    Init {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        root_token_ttl: Duration,
    },
    /// The kill switch: revoke an identity's tokens, certificate pins and logins at once,
    /// on a running server (`POST /v1/sys/revoke-identity`; needs sudo on that path).
    RevokeIdentity {
        #[command(flatten)]
        endpoint: EndpointArgs,
        /// A role of any auth method.
        #[arg(long, group = "identity")]
        role: Option<String>,
        /// A client certificate's SHA-256 fingerprint (hex).
        #[arg(long, group = "identity")]
        certificate_sha256: Option<String>,
        /// A SPIFFE ID (`spiffe://...`).
        #[arg(long, group = "identity")]
        spiffe_id: Option<String>,
    },
    /// Rotate the master key on a running server (`POST /v1/sys/rotate`, sudo) and follow
    /// the background re-wrap with a progress line until it is done.
    Rotate {
        #[command(flatten)]
        endpoint: EndpointArgs,
        /// Start the rotation and return at once.
        #[arg(long)]
        no_wait: bool,
        /// After the re-wrap, destroy the master versions nothing uses any more.
        #[arg(long)]
        retire: bool,
        /// Start nothing: show the records per version and the records a rotation set
        /// aside as damaged.
        #[arg(long, conflicts_with_all = ["no_wait", "retire"])]
        report: bool,
    },
    /// Destroy the master key versions nothing uses any more, after a rotation's re-wrap
    /// (`POST /v1/sys/rotate/retire`, sudo).
    Retire {
        #[command(flatten)]
        endpoint: EndpointArgs,
    },
    /// Emergency seal of one running replica (`PUT /v1/sys/seal`, sudo): it closes its
    /// sessions with the token, forgets the PIN, key handles and caches, and answers 503
    /// until unsealed. Other replicas are not affected.
    Seal {
        #[command(flatten)]
        endpoint: EndpointArgs,
    },
    /// Unseal a sealed replica with the token's PIN, read from the PIN source of the
    /// server's configuration file (`PUT /v1/sys/unseal`; no token needed).
    Unseal {
        #[command(flatten)]
        endpoint: EndpointArgs,
        /// The server's configuration file (its `[hsm]` PIN source is read).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Copy every secret under a prefix from one key/value mount to another on a running
    /// server (embedded or proxied), reading each copy back; an equal secret at the
    /// destination is skipped, so running it again resumes a run that stopped.
    Migrate {
        #[command(flatten)]
        endpoint: EndpointArgs,
        /// The mount to copy from, e.g. `secret`.
        #[arg(long)]
        from: String,
        /// The mount to copy to, e.g. `legacy`.
        #[arg(long)]
        to: String,
        /// Only the secrets under this folder.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Copy every live version, oldest first, not only the latest (both mounts must
        /// keep numbered versions: KV version 2, or a proxied mount whose upstream does).
        #[arg(long)]
        all_versions: bool,
        /// Count what would be copied; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Copy the latest version over a secret that holds another value at the
        /// destination (left alone and named otherwise, and the run fails).
        #[arg(long)]
        overwrite: bool,
        /// Connections working at once.
        #[arg(long, default_value_t = 8)]
        workers: usize,
    },
    /// Mint a new root token (needs the HSM PIN; with sled storage, stop the server first).
    RootToken {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    endpoint: EndpointArgs,
    #[arg(long, value_enum, default_value = "read")]
    scenario: Scenario,
    /// Secret path under /v1/.
    #[arg(long, default_value = "secret/bench")]
    path: String,
    /// Cert role for `cert-login`.
    #[arg(long, default_value = "dev-client")]
    role: String,
    #[arg(long)]
    role_id: Option<String>,
    /// A file holding the AppRole secret id for `approle-login` (a secret id never goes on
    /// the command line, where other users can read it; `--setup` makes one).
    #[arg(long)]
    secret_id_file: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Stop after this many requests in all (`write`: how many secrets to create).
    #[arg(long)]
    requests: Option<u64>,
    /// `read`: spread the reads over this many secrets `<path>/00000000`.. (as `write`
    /// names them), visited in a scattered order, instead of one.
    #[arg(long)]
    spread: Option<u64>,
    /// Write the secret (and create an AppRole role for logins) before the run.
    #[arg(long)]
    setup: bool,
    /// `read` the upstream of a proxied mount directly, through the adapter KeyVault
    /// uses: a TOML file of `[[mounts]]` (as for `dev --mounts`); `--path` names the
    /// mount and the secret (`legacy/bench`). No KeyVault server is involved.
    #[arg(long)]
    upstream: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn init_logging(filter: &str, json: bool) {
    let mut filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Whatever the level asked for: tokio-postgres logs the text of every simple query at
    // debug level, and the database engine's `ALTER ROLE ... PASSWORD` is one.
    for quiet in ["tokio_postgres=info", "tokio_postgres::query=info"] {
        if let Ok(d) = quiet.parse() {
            filter = filter.add_directive(d);
        }
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    // Before anything is read: no core dumps, no ptrace attach by the same user. Every
    // command, as the CLI holds tokens and secret values too.
    if let Err(e) = keyvault::hardening::disable_dumps() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    // `keyvault dev` runs SoftHSM from its own data directory. SoftHSM reads its
    // configuration path from SOFTHSM2_CONF when the module loads; rather than mutating
    // the environment of a running process, re-execute with the variable set.
    if let Command::Dev { data_dir, postgres, .. } = &cli.command
        && let Err(e) = refuse_password_on_argv(postgres.as_deref()).and_then(|()| ensure_softhsm_env(data_dir))
    {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli));
    // Nothing may be inside the PKCS#11 library when the process exits (its destructors
    // run then): stop the runtime, then wait for the token calls in flight and admit no
    // more (keyvault::token_gate).
    runtime.shutdown_timeout(Duration::from_secs(5));
    if !keyvault::token_gate::close(Duration::from_secs(10)) {
        eprintln!("warning: a call into the PKCS#11 module did not return within 10 s; exiting without waiting for it");
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A password in `--postgres`'s URL is on the command line, which every local user can
/// read (`/proc/<pid>/cmdline`): refused before anything is made (the message does not
/// repeat the URL).
fn refuse_password_on_argv(postgres: Option<&str>) -> anyhow::Result<()> {
    if postgres.is_some_and(|url| url.parse::<tokio_postgres::Config>().is_ok_and(|c| c.get_password().is_some())) {
        anyhow::bail!(
            "--postgres: the URL holds a password, which other users can read on the command line; \
             use a socket or trust/peer authentication, or a configuration file with storage.password_file"
        );
    }
    Ok(())
}

fn ensure_softhsm_env(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let layout = DevLayout::new(data_dir)?;
    let conf = layout.write_softhsm_conf()?;
    if std::env::var_os(keyvault_hsm::softhsm::CONF_ENV).as_deref() == Some(conf.as_os_str()) {
        return Ok(());
    }
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("locating the keyvault binary")?;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(keyvault_hsm::softhsm::CONF_ENV, &conf)
        .exec();
    Err(anyhow::anyhow!("cannot re-execute with {}: {err}", keyvault_hsm::softhsm::CONF_ENV))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Server { config } => {
            let config = Config::load(&config)?;
            init_logging(&config.log.level, config.log.format == "json");
            keyvault::hardening::log(&keyvault::hardening::apply(&config.memory)?);
            let service = Builder::new(&config).build().await?;
            keyvault::http::serve(service, |addr, _| {
                tracing::info!(%addr, "KeyVault listening (TLS)");
                // On stdout too: with port 0 in the configuration, this is how a
                // supervisor (or a test) learns the port.
                println!("KeyVault listening on https://{addr}");
            })
            .await?;
            Ok(())
        }
        Command::Dev {
            data_dir,
            address,
            root_token_ttl,
            log,
            dek_cache_ttl,
            postgres,
            key_tier,
            audit_mode,
            mounts,
        } => {
            init_logging(&log, false);
            keyvault::hardening::log(&keyvault::hardening::apply(&Default::default())?);
            let started = std::time::Instant::now();
            let layout = DevLayout::new(&data_dir)?;
            let module = dev::ensure_token(&layout)?;
            layout.pki().ensure()?;
            let mut config = dev::config(&layout, module, address, dek_cache_ttl);
            config.audit.mode = serde_json::from_value(serde_json::Value::String(audit_mode.clone()))
                .map_err(|_| anyhow::anyhow!("--audit-mode: use fail_closed, buffered or dangerous_off"))?;
            if let Some(url) = postgres {
                config.storage = keyvault::config::StorageConfig::Postgres {
                    url,
                    password_file: None,
                    tls_ca_file: None,
                    pool_size: keyvault::config::default_pool_size(),
                };
            }
            config.secrets.key_tier = serde_json::from_value(serde_json::Value::String(key_tier))
                .map_err(|_| anyhow::anyhow!("--key-tier: use epoch or token"))?;
            if let Some(file) = &mounts {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Extra {
                    mounts: Vec<keyvault::config::MountConfig>,
                }
                let text = std::fs::read_to_string(file).with_context(|| format!("--mounts {}", file.display()))?;
                let extra: Extra =
                    keyvault::config::from_toml(&text).with_context(|| format!("--mounts {}", file.display()))?;
                config.mounts = keyvault::config::default_mounts().into_iter().chain(extra.mounts).collect();
            }
            let service = Builder::new(&config).init(Init::IfNew).build().await?;
            let root = service.issue_root_token(root_token_ttl).await?;
            let root = root.token.expose_secret().to_owned();
            dev::ensure_dev_client(&service, &root, &layout).await?;
            keyvault::http::serve(service, move |addr, audit| {
                if let Err(e) = std::fs::write(layout.audit_key_file(), audit.public_key_b64() + "\n") {
                    tracing::warn!(error = %e, "cannot write the audit public key file");
                }
                println!("{}", dev::banner(&layout, addr, &root, root_token_ttl));
                tracing::info!(%addr, ready_ms = started.elapsed().as_millis() as u64, "KeyVault (dev) listening");
            })
            .await?;
            Ok(())
        }
        Command::Openapi { config } => {
            let mounts = match config {
                Some(path) => keyvault::config::Config::load(&path)?.mounts,
                None => keyvault::config::default_mounts(),
            };
            let table = keyvault::service::describe_mounts(&mounts)?;
            let doc = keyvault::logical::openapi::yaml(&table).map_err(keyvault::error::Error::Internal)?;
            match std::io::Write::write_all(&mut std::io::stdout().lock(), doc.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
        Command::Operator { command } => operator(command).await,
        Command::Bench(a) => bench_cmd(a).await,
        Command::Audit { command } => audit_cmd(command).await,
        Command::Login(a) => client_cmd(cli::admin::login(a)).await,
        Command::Secret { command } => client_cmd(cli::admin::secret(command)).await,
        Command::Transit { command } => client_cmd(cli::admin::transit(command)).await,
        Command::Policy { command } => client_cmd(cli::admin::policy(command)).await,
        Command::Role { command } => client_cmd(cli::admin::role(command)).await,
        Command::Token { command } => client_cmd(cli::admin::token(command)).await,
    }
}

async fn operator(command: OperatorCommand) -> anyhow::Result<()> {
    match command {
        OperatorCommand::Init { config, root_token_ttl } => {
            let config = Config::load(&config)?;
            init_logging(&config.log.level, config.log.format == "json");
            let service = Builder::admin(&config).init(Init::Always).build().await?;
            let root = service.issue_root_token(root_token_ttl).await?;
            println!(
                "KeyVault initialized: master key v1, token-signing key v1 and AppRole HMAC key v1 are in the token."
            );
            println!(
                "Root token (expires in {}): {}",
                humantime::format_duration(root_token_ttl),
                root.token.expose_secret()
            );
            println!("Use it to create policies, roles and admin users, then let it expire.");
            Ok(())
        }
        OperatorCommand::RevokeIdentity { endpoint, role, certificate_sha256, spiffe_id } => {
            init_logging("warn", false);
            let target =
                keyvault_api::sys::IdentityTarget { role, certificate_sha256, spiffe_id, ..Default::default() };
            let revoked: keyvault_api::sys::Revoked =
                endpoint.endpoint()?.client()?.request_data("POST", "sys/revoke-identity", Some(&target)).await?;
            println!("revoked {} at {}", revoked.identity, revoked.revoked_at);
            Ok(())
        }
        OperatorCommand::Rotate { endpoint, report: true, .. } => {
            init_logging("warn", false);
            let e = endpoint.endpoint()?.client()?;
            let d: RotationStatus = e.request_data("GET", "sys/rotate/status", None::<&()>).await?;
            println!(
                "active master key v{}, {}; records by version {}; {} remaining to re-wrap; {} set aside",
                d.active_version,
                d.state,
                serde_json::to_string(&d.records_by_version)?,
                d.records_remaining,
                d.set_aside
            );
            let r: SetAside = e.request_data("GET", "sys/rotate/set-aside", None::<&()>).await?;
            for rec in r.records {
                let key = rec.key.replace('\x1f', " version ");
                let under = rec.counted_under.map(|v| v.to_string()).unwrap_or_else(|| "?".into());
                println!("set aside: {key} (counted under v{under}): {}", rec.reason);
            }
            Ok(())
        }
        OperatorCommand::Rotate { endpoint, no_wait, retire, .. } => {
            init_logging("warn", false);
            let e = endpoint.endpoint()?.client()?;
            let rotated: Rotated = e
                .request_data("POST", "sys/rotate", Some(&serde_json::json!({})))
                .await
                .context("POST /v1/sys/rotate")?;
            println!("master key v{} is active; re-wrapping stored data keys", rotated.version);
            if no_wait {
                return Ok(());
            }
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let d: RotationStatus = e.request_data("GET", "sys/rotate/status", None::<&()>).await?;
                let (done, remaining) = (d.records_done, d.records_remaining);
                let total = done + remaining;
                let pct = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
                eprint!(
                    "\r{:>6.1}%  {done}/{total} records  {:.0}/s  versions in use {:?}   ",
                    pct, d.rate_per_second, d.versions_in_use
                );
                if d.state == "idle" {
                    eprintln!();
                    break;
                }
            }
            println!("re-wrap finished");
            if retire {
                let r: Retired = e.request_data("POST", "sys/rotate/retire", Some(&serde_json::json!({}))).await?;
                println!("retired master key versions {:?}", r.retired);
            }
            Ok(())
        }
        OperatorCommand::Retire { endpoint } => {
            init_logging("warn", false);
            let r: Retired = endpoint
                .endpoint()?
                .client()?
                .request_data("POST", "sys/rotate/retire", Some(&serde_json::json!({})))
                .await
                .context("POST /v1/sys/rotate/retire")?;
            println!("retired master key versions {:?}", r.retired);
            Ok(())
        }
        OperatorCommand::Seal { endpoint } => {
            init_logging("warn", false);
            endpoint.endpoint()?.client()?.request("PUT", "sys/seal", Some(&serde_json::json!({}))).await?;
            println!("sealed: every request but health, seal status and unseal is refused until unsealed");
            Ok(())
        }
        OperatorCommand::Unseal { endpoint, config } => {
            init_logging("warn", false);
            // Checked before the PIN is read: it goes only to a server named for KeyVault,
            // never to the Vault server `VAULT_ADDR` may name for the operator's other tools.
            if endpoint.family() == cli::EnvFamily::Vault {
                anyhow::bail!(
                    "unseal sends the token's PIN: name the server with --address or KEYVAULT_ADDR \
                     (VAULT_ADDR is not used for it)"
                );
            }
            let config = Config::load(&config)?;
            let pin = config.hsm.pin_source()?.read()?;
            let body = keyvault_api::sys::UnsealRequest { key: Some(pin.into()), ..Default::default() };
            // No token: a sealed server checks none; the PIN is the credential.
            let mut e = endpoint.endpoint()?;
            e.token = None;
            let reply = e.client()?.request("PUT", "sys/unseal", Some(&body)).await?.unwrap_or_default();
            let s: keyvault_api::sys::SealStatus = serde_json::from_value(reply)?;
            println!("sealed: {}", s.sealed);
            Ok(())
        }
        OperatorCommand::Migrate { endpoint, from, to, prefix, all_versions, dry_run, overwrite, workers } => {
            init_logging("warn", false);
            let opts = cli::migrate::Options { all_versions, dry_run, overwrite, workers };
            let s = cli::migrate::run(&migration_client(endpoint)?, &from, &to, &prefix, opts).await?;
            let verb = if dry_run { "would copy" } else { "copied" };
            let versions = if all_versions { format!(" ({} versions)", s.versions) } else { String::new() };
            println!("{verb} {} secrets{versions} from {from} to {to}; {} already equal", s.copied, s.equal);
            if s.differ > 0 {
                anyhow::bail!(
                    "{} secrets hold another value at {to} and {} left alone (--overwrite copies over them{}): {}{}",
                    s.differ,
                    if dry_run { "would be" } else { "were" },
                    if all_versions { ", but not with --all-versions" } else { "" },
                    s.differ_names.join(", "),
                    if s.differ > s.differ_names.len() as u64 { ", ..." } else { "" }
                );
            }
            Ok(())
        }
        OperatorCommand::RootToken { config, ttl } => {
            let config = Config::load(&config)?;
            init_logging(&config.log.level, config.log.format == "json");
            let service = Builder::admin(&config).build().await?;
            let root = service.issue_root_token(ttl).await?;
            println!("{}", root.token.expose_secret());
            Ok(())
        }
    }
}

async fn audit_cmd(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify { public_key, live, files } => {
            let key = keyvault::audit::verify::read_public_key(&public_key).map_err(anyhow::Error::msg)?;
            let report = keyvault::audit::verify::verify(&files, &key, live)?;
            println!("{report}");
            if matches!(report, keyvault::audit::verify::Report::Ok { .. }) { Ok(()) } else { std::process::exit(1) }
        }
        AuditCommand::ExportKey { config } => {
            let config = Config::load(&config)?;
            init_logging("warn", false);
            let keys = keyvault::service::open_keystore(&config)?;
            let names = KeyNames::new(&config.hsm.key_prefix)?;
            let label = names.audit_signing();
            let public = keyvault::hsm_call(&keys, move |k| k.ed25519_public_key(&label)).await?;
            use base64::Engine;
            println!("{}", base64::engine::general_purpose::STANDARD.encode(public));
            Ok(())
        }
    }
}

async fn bench_cmd(a: BenchArgs) -> anyhow::Result<()> {
    init_logging("warn", false);
    let mut o = BenchOptions {
        endpoint: a.endpoint.endpoint()?,
        scenario: a.scenario,
        path: a.path,
        role: a.role,
        role_id: a.role_id,
        secret_id: match &a.secret_id_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("--secret-id-file {}: {e}", f.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        },
        connections: a.connections,
        duration: a.duration,
        warmup: a.warmup,
        requests: a.requests,
        spread: a.spread.filter(|n| *n > 0),
        upstream: None,
    };
    if let Some(file) = &a.upstream {
        #[derive(serde::Deserialize)]
        struct Mounts {
            mounts: Vec<keyvault::config::MountConfig>,
        }
        let text = std::fs::read_to_string(file).with_context(|| format!("--upstream {}", file.display()))?;
        let mounts: Mounts =
            keyvault::config::from_toml(&text).with_context(|| format!("--upstream {}", file.display()))?;
        let found = mounts
            .mounts
            .iter()
            .filter_map(|m| {
                let mp = m.path.trim_matches('/');
                o.path.strip_prefix(mp).and_then(|r| r.strip_prefix('/')).map(|rest| (m, rest.to_owned()))
            })
            .max_by_key(|(m, _)| m.path.len());
        let Some((mount, rest)) = found else {
            anyhow::bail!("--path {}: no mount of {} serves it", o.path, file.display());
        };
        o.upstream = Some((keyvault::engines::proxy::adapter(mount)?, rest));
    }
    if a.setup
        && let Some((role_id, secret_id)) = bench::setup(&o).await?
    {
        o.role_id = Some(role_id);
        o.secret_id = Some(secret_id);
    }
    let report = bench::run(o).await?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}

/// An admin command: quiet logging (warnings only, never request bodies).
async fn client_cmd(f: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    init_logging("warn", false);
    f.await
}

/// The client `operator migrate` uses: the caller's token, and `Cache-Control: no-cache`
/// so that a proxied mount answers from its upstream, not its cache.
fn migration_client(endpoint: EndpointArgs) -> anyhow::Result<keyvault_client::Client> {
    let e = endpoint.endpoint()?;
    let mut b = e.builder()?.header("cache-control", "no-cache");
    if let Some(a) = e.auth() {
        b = b.auth(a);
    }
    Ok(b.build()?)
}
