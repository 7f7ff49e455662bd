//! The configuration file (`keyvault server --config keyvault.toml`), documented with an
//! annotated example in docs/configuration.md and deploy/keyvault.example.toml.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyvault_hsm::{PinSource, WrapMechanism, WrapPreference};
use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};
use crate::tls::{ClientAuth, TlsFiles};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listener: ListenerConfig,
    pub storage: StorageConfig,
    pub hsm: HsmConfig,
    #[serde(default)]
    pub tokens: TokenConfig,
    #[serde(default)]
    pub secrets: SecretsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    pub audit: crate::audit::AuditConfig,
    #[serde(default)]
    pub rotation: RotationConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// `[memory]`: memory locking (docs/configuration.md).
    #[serde(default)]
    pub memory: crate::hardening::MemoryConfig,
    /// Where the engines and auth methods are mounted (`[[mounts]]`); when absent, the
    /// defaults of [`default_mounts`]. When given, it is the whole list.
    #[serde(default = "default_mounts")]
    pub mounts: Vec<MountConfig>,
}

/// One `[[mounts]]` entry: an engine or auth method of a kind at a path. Auth methods are
/// mounted under `auth/`, everything else elsewhere; `sys/` and `auth/token/` are fixed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountConfig {
    /// The mount path, e.g. `"secret"` or `"auth/approle"` (a trailing `/` is optional).
    pub path: String,
    /// The kind: `kv`, `kv-v2`, `transit`, `gateway`, `approle`, `userpass`, `cert`,
    /// `kubernetes`, `bootstrap`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Settings of this mount, for the kinds that take any (`[mounts.options]`); a kind
    /// that takes none refuses them.
    #[serde(default)]
    pub options: toml::Table,
}

/// Today's mounts: what an installation serves when its configuration names none.
pub fn default_mounts() -> Vec<MountConfig> {
    [
        ("secret", "kv"),
        ("kv", "kv-v2"),
        ("transit", "transit"),
        ("gateway", "gateway"),
        ("auth/approle", "approle"),
        ("auth/userpass", "userpass"),
        ("auth/cert", "cert"),
        ("auth/kubernetes", "kubernetes"),
        ("auth/bootstrap", "bootstrap"),
    ]
    .into_iter()
    .map(|(path, kind)| MountConfig { path: path.into(), kind: kind.into(), options: Default::default() })
    .collect()
}

/// `[telemetry]`: the metrics endpoint (`/v1/sys/metrics`, `/metrics`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Serve the metrics without a token (Vault's listener option of the same name).
    /// Off: a token with `read` on `sys/metrics` is needed.
    #[serde(default)]
    pub unauthenticated_metrics_access: bool,
}

/// `[rotation]`: automatic master key rotation, like Vault's keyring.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationConfig {
    /// Rotate when the active master key version is older than this.
    #[serde(default, deserialize_with = "optional_duration")]
    pub master_max_age: Option<Duration>,
    /// Rotate after this many records were sealed under the active version (AES-GCM with
    /// random IVs stays far from its 2^32 limit with the default).
    #[serde(default = "default_max_encryptions")]
    pub master_max_encryptions: Option<u64>,
    /// How often each replica checks the two limits above.
    #[serde(default = "default_check_interval", deserialize_with = "duration")]
    pub check_interval: Duration,
}

fn default_max_encryptions() -> Option<u64> {
    Some(1 << 30)
}

fn default_check_interval() -> Duration {
    Duration::from_secs(10)
}

impl Default for RotationConfig {
    fn default() -> Self {
        RotationConfig {
            master_max_age: None,
            master_max_encryptions: default_max_encryptions(),
            check_interval: default_check_interval(),
        }
    }
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// `[auth]`: settings shared by the auth methods.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Brute-force protection of logins.
    #[serde(default)]
    pub rate_limit: crate::auth::limiter::LimitConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address to listen on; port 0 picks a free port (printed at start).
    pub address: SocketAddr,
    /// PEM certificate chain of the server.
    pub tls_cert_file: PathBuf,
    /// PEM private key of the server (PKCS#8, SEC1 or PKCS#1).
    pub tls_key_file: PathBuf,
    /// Largest request body accepted; larger ones get 413.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// Mutual TLS: `off`, `optional` (auth endpoints reachable without a client
    /// certificate) or `required`.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// PEM bundle of the CAs that issue client certificates.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// PEM CRL files checked for client certificates (reloaded with the rest).
    #[serde(default)]
    pub crl_files: Vec<PathBuf>,
    /// A TLS handshake must complete within this.
    #[serde(default = "default_handshake_timeout", deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    /// An HTTP/1.1 request's headers must arrive within this.
    #[serde(default = "default_header_timeout", deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// A request's body must arrive within this (408 otherwise).
    #[serde(default = "default_body_timeout", deserialize_with = "duration")]
    pub body_timeout: Duration,
    /// A connection with no request in flight and no bytes moving is closed after this.
    #[serde(default = "default_idle_timeout", deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Open connections in all (lowered to fit the open-file limit).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Open connections from one source address (an IPv6 /64).
    #[serde(default = "default_max_connections_per_address")]
    pub max_connections_per_address: usize,
    /// Request bodies being received at once, in bytes, across all connections (a
    /// request waits for room, up to `body_timeout`, then gets 503).
    #[serde(default = "default_max_body_bytes_in_flight")]
    pub max_body_bytes_in_flight: usize,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_connections_per_address() -> usize {
    256
}
fn default_max_body_bytes_in_flight() -> usize {
    256 * 1024 * 1024
}

impl ListenerConfig {
    /// A listener with the default bounds.
    pub fn new(address: SocketAddr, tls_cert_file: PathBuf, tls_key_file: PathBuf) -> Self {
        ListenerConfig {
            address,
            tls_cert_file,
            tls_key_file,
            max_request_bytes: default_max_request_bytes(),
            client_auth: ClientAuth::Off,
            client_ca_file: None,
            crl_files: Vec::new(),
            handshake_timeout: default_handshake_timeout(),
            header_timeout: default_header_timeout(),
            body_timeout: default_body_timeout(),
            idle_timeout: default_idle_timeout(),
            max_connections: default_max_connections(),
            max_connections_per_address: default_max_connections_per_address(),
            max_body_bytes_in_flight: default_max_body_bytes_in_flight(),
        }
    }

    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.tls_cert_file.clone(),
            key: self.tls_key_file.clone(),
            client_ca: self.client_ca_file.clone(),
            crls: self.crl_files.clone(),
            client_auth: self.client_auth,
        }
    }
}

fn default_max_request_bytes() -> usize {
    1024 * 1024
}

/// The storage engine, chosen by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum StorageConfig {
    /// Embedded, one process: a data directory.
    Sled { path: PathBuf },
    /// PostgreSQL, shared by several replicas.
    Postgres {
        /// `postgres://user@host:port/db` (put the password in `password_file`, not here).
        url: String,
        /// File holding the database password (mode 0600).
        #[serde(default)]
        password_file: Option<PathBuf>,
        /// CA of the database server's certificate: TLS is then required and verified.
        #[serde(default)]
        tls_ca_file: Option<PathBuf>,
        #[serde(default = "default_pool_size")]
        pool_size: usize,
    },
}

/// The default `storage.pool_size`.
pub fn default_pool_size() -> usize {
    16
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmConfig {
    /// Path of the PKCS#11 module.
    pub module: PathBuf,
    /// Label of the token (never a slot number).
    pub token_label: String,
    /// File holding the user PIN (mode 0600). Exactly one of `pin_file`, `pin_env`.
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN (set by your supervisor).
    #[serde(default)]
    pub pin_env: Option<String>,
    /// Prefix of KeyVault's key labels in the token.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Most PKCS#11 sessions open at once.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// Threads that make the calls into the token (docs/architecture.md, "Token workers").
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// How long a request waits for one token call before it is answered 503 (a hung
    /// module or network HSM must not hold requests, and their connections, forever).
    #[serde(default = "default_call_timeout", deserialize_with = "crate::deserialize_duration")]
    pub call_timeout: Duration,
    /// `auto` (AES-GCM if the token has it, else AES key wrap with padding),
    /// `aes-gcm` or `aes-key-wrap-pad`.
    #[serde(default)]
    pub wrap_mechanism: WrapSetting,
    /// Most keys used through a session copy inside the token (0: none; docs/architecture.md,
    /// "Session copies").
    #[serde(default = "default_session_copies")]
    pub session_copies: usize,
}

fn default_key_prefix() -> String {
    "keyvault".into()
}
fn default_max_sessions() -> usize {
    4
}
fn default_workers() -> usize {
    2
}
fn default_session_copies() -> usize {
    keyvault_hsm::DEFAULT_SESSION_COPIES
}
fn default_call_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum WrapSetting {
    #[default]
    Auto,
    AesGcm,
    AesKeyWrapPad,
}

impl HsmConfig {
    pub fn pin_source(&self) -> Result<PinSource> {
        match (&self.pin_file, &self.pin_env) {
            (Some(f), None) => Ok(PinSource::File(f.clone())),
            (None, Some(e)) => Ok(PinSource::Env(e.clone())),
            _ => Err(Error::Config("[hsm] needs exactly one of pin_file or pin_env".into())),
        }
    }

    pub fn wrap_preference(&self) -> WrapPreference {
        match self.wrap_mechanism {
            WrapSetting::Auto => WrapPreference::Auto,
            WrapSetting::AesGcm => WrapPreference::Only(WrapMechanism::AesGcm),
            WrapSetting::AesKeyWrapPad => WrapPreference::Only(WrapMechanism::AesKeyWrapPad),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// TTL of tokens whose role sets none.
    #[serde(default = "default_ttl", deserialize_with = "duration")]
    pub default_ttl: Duration,
    /// No token lives longer than this, whatever its role says.
    #[serde(default = "default_max_ttl", deserialize_with = "duration")]
    pub max_ttl: Duration,
    /// The `iss` claim.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// How far this replica's clock may be from the storage's (PostgreSQL's clock, which
    /// all replicas share) before it refuses to serve (503). Token expiry and the
    /// gateway's skew window read the local clock; revocations never compare clocks.
    #[serde(default = "default_max_clock_offset", deserialize_with = "duration")]
    pub max_clock_offset: Duration,
}

fn default_ttl() -> Duration {
    Duration::from_secs(600)
}
fn default_max_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_clock_offset() -> Duration {
    Duration::from_secs(2)
}
fn default_issuer() -> String {
    "keyvault".into()
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            default_ttl: default_ttl(),
            max_ttl: default_max_ttl(),
            issuer: default_issuer(),
            max_clock_offset: default_max_clock_offset(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsConfig {
    /// Versions kept per secret; older ones are destroyed on write.
    #[serde(default = "default_max_versions")]
    pub max_versions: usize,
    /// Keep unwrapped data keys in memory this long after use, so that repeated reads of a
    /// record skip the token. "0s" (the default) keeps a data key only while it is used.
    #[serde(default = "zero", deserialize_with = "duration")]
    pub dek_cache_ttl: Duration,
    /// Most data keys cached at once.
    #[serde(default = "default_dek_cache_capacity")]
    pub dek_cache_capacity: usize,
    /// Where data keys of new records are wrapped: `"epoch"` (the default: in process, by
    /// the master version's epoch key, which the token unwraps once) or `"token"` (inside
    /// the token, one call per read and write). See docs/architecture.md.
    #[serde(default)]
    pub key_tier: crate::barrier::KeyTier,
}

fn zero() -> Duration {
    Duration::ZERO
}
fn default_dek_cache_capacity() -> usize {
    100_000
}

fn default_max_versions() -> usize {
    10
}

impl Default for SecretsConfig {
    fn default() -> Self {
        SecretsConfig {
            max_versions: default_max_versions(),
            dek_cache_ttl: zero(),
            dek_cache_capacity: default_dek_cache_capacity(),
            key_tier: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, `keyvault=debug,info`, ...
    #[serde(default = "default_level")]
    pub level: String,
    /// `text` or `json`.
    #[serde(default = "default_format")]
    pub format: String,
}

fn default_level() -> String {
    "info".into()
}
fn default_format() -> String {
    "text".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: default_level(), format: default_format() }
    }
}

use crate::deserialize_duration as duration;

impl Config {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read config file {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Self> {
        let config: Config = from_toml(text)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        self.hsm.pin_source()?;
        if self.tokens.default_ttl > self.tokens.max_ttl {
            return Err(Error::Config("tokens.default_ttl exceeds tokens.max_ttl".into()));
        }
        if self.tokens.default_ttl.is_zero() {
            return Err(Error::Config("tokens.default_ttl must be positive".into()));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(Error::Config("log.format must be \"text\" or \"json\"".into()));
        }
        let l = &self.listener;
        for (name, d) in [
            ("handshake_timeout", l.handshake_timeout),
            ("header_timeout", l.header_timeout),
            ("body_timeout", l.body_timeout),
            ("idle_timeout", l.idle_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::Config(format!("listener.{name} must be positive")));
            }
        }
        if l.max_connections == 0 || l.max_connections_per_address == 0 {
            return Err(Error::Config("listener.max_connections(_per_address) must be positive".into()));
        }
        if l.max_body_bytes_in_flight < l.max_request_bytes {
            return Err(Error::Config("listener.max_body_bytes_in_flight must be at least max_request_bytes".into()));
        }
        if self.listener.max_request_bytes < 1024 {
            return Err(Error::Config("listener.max_request_bytes must be at least 1024".into()));
        }
        // Zero here does not mean "no limit": a zero window forgets every failure at once
        // (no brute-force limit at all), and zero rotation limits start a rotation after
        // every rotation.
        let limit = &self.auth.rate_limit;
        if limit.window < Duration::from_secs(1) {
            return Err(Error::Config("auth.rate_limit.window must be at least 1s".into()));
        }
        if limit.failures_per_role_and_address == 0 || limit.failures_per_address == 0 {
            return Err(Error::Config("auth.rate_limit failure counts must be positive".into()));
        }
        let rotation = &self.rotation;
        if rotation.master_max_age.is_some_and(|d| d < Duration::from_secs(60)) {
            return Err(Error::Config("rotation.master_max_age must be at least 1m".into()));
        }
        if rotation.master_max_encryptions.is_some_and(|n| n == 0 || n > MAX_ENCRYPTIONS_PER_KEY) {
            return Err(Error::Config(format!(
                "rotation.master_max_encryptions must be between 1 and {MAX_ENCRYPTIONS_PER_KEY} (AES-GCM with random nonces: 2^32 per key)"
            )));
        }
        Ok(())
    }
}

/// The most encryptions one AES-GCM key with random 96-bit nonces may make (NIST SP
/// 800-38D: 2^32).
const MAX_ENCRYPTIONS_PER_KEY: u64 = 1 << 32;

/// Parse a TOML document (the configuration file, `--mounts`, `--upstream`). Its errors
/// name the line, the column and what is wrong, never the text there: the `toml` crate's
/// own message quotes the offending line, which may hold a PIN, a password or an
/// upstream token that was put in the wrong place, and this error goes to the journal.
pub fn from_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| {
        let at = e.span().map(|s| {
            let before = text.get(..s.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: ")
        });
        Error::Config(format!("{}{}", at.unwrap_or_default(), without_values(e.message())))
    })
}

/// A TOML value's deserialization error (a mount's options), without the values it
/// quotes (see [`from_toml`]).
pub fn value_error(e: &toml::de::Error) -> String {
    without_values(e.message())
}

/// A parse or type error's message with the values it quotes left out (serde's "invalid
/// type: string \"…\", expected …" names the value it found); field names stay.
fn without_values(message: &str) -> String {
    for lead in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(lead) {
            let kind = rest.split([' ', ',']).next().unwrap_or_default();
            let expected = rest.rfind(", expected").map_or("", |i| &rest[i..]);
            return format!("{lead}{kind}{expected}");
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        let expected = rest.rfind("`, expected").map_or("", |i| &rest[i + 1..]);
        return format!("unknown variant{expected}");
    }
    // Anything else quoted in double quotes (a custom message about a value).
    let mut out = String::with_capacity(message.len());
    let mut inside = false;
    let mut escaped = false;
    for ch in message.chars() {
        if inside {
            match (escaped, ch) {
                (false, '\\') => escaped = true,
                (false, '"') => {
                    inside = false;
                    out.push_str("…\"");
                }
                _ => escaped = false,
            }
        } else {
            out.push(ch);
            inside = ch == '"';
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../deploy/keyvault.example.toml");

    #[test]
    fn example_config_parses() {
        let c = Config::parse(EXAMPLE).unwrap();
        assert_eq!(c.tokens.default_ttl, Duration::from_secs(600));
        assert!(matches!(c.storage, StorageConfig::Sled { .. }));
        assert_eq!(c.hsm.wrap_mechanism, WrapSetting::Auto);
    }

    #[test]
    fn mistakes_are_reported() {
        let base = EXAMPLE.replace("pin_file", "# pin_file");
        let err = Config::parse(&base).unwrap_err().to_string();
        assert!(err.contains("exactly one of pin_file or pin_env"), "{err}");
        let err = Config::parse(&format!("{EXAMPLE}\n[bogus]\nx = 1\n")).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
        let err =
            Config::parse(&EXAMPLE.replace("default_ttl = \"10m\"", "default_ttl = \"2h\"")).unwrap_err().to_string();
        assert!(err.contains("exceeds"), "{err}");
    }

    /// A parse error names where, never what: a secret typed into the wrong place (or
    /// with a typo in its key) is not printed back into the journal.
    #[test]
    fn a_parse_error_does_not_repeat_the_text() {
        const SECRET: &str = "8f3a-secret-pin-9c1d";
        let cases = [
            // An unknown key (a typo, or a PIN put inline).
            EXAMPLE.replace("pin_file =", &format!("pin = \"{SECRET}\"\npin_file =")),
            // A value of the wrong type.
            EXAMPLE.replace("default_ttl = \"10m\"", &format!("default_ttl = [\"{SECRET}\"]")),
            EXAMPLE.replace("default_ttl = \"10m\"", "default_ttl = 918273645"),
            EXAMPLE.replace("default_ttl = \"10m\"", &format!("default_ttl = \"{SECRET}\"")),
            // Broken syntax on the secret's line.
            format!("{EXAMPLE}\n[extra]\ntoken = \"{SECRET}"),
            format!("{EXAMPLE}\n{SECRET} {SECRET}\n"),
        ];
        for (i, text) in cases.iter().enumerate() {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(!err.contains(SECRET) && !err.contains("918273645"), "case {i}: {err}");
            assert!(err.contains("line "), "case {i}: {err}");
        }
        let err = Config::parse(&cases[0]).unwrap_err().to_string();
        assert!(err.contains("unknown field `pin`"), "{err}");
    }

    /// Zero limits are refused, not taken as "no limit".
    #[test]
    fn zero_limits_are_refused() {
        for (line, replacement, says) in [
            ("window = \"1m\"", "window = \"0s\"", "window"),
            ("window = \"1m\"", "window = \"500ms\"", "window"),
            ("failures_per_address = 20", "failures_per_address = 0", "failure counts"),
            ("failures_per_role_and_address = 5", "failures_per_role_and_address = 0", "failure counts"),
            ("master_max_encryptions = 1073741824", "master_max_encryptions = 0", "master_max_encryptions"),
            ("master_max_encryptions = 1073741824", "master_max_encryptions = 5000000000", "master_max_encryptions"),
            ("# master_max_age = \"90d\"", "master_max_age = \"0s\"", "master_max_age"),
        ] {
            assert!(EXAMPLE.contains(line), "{line}");
            let err = Config::parse(&EXAMPLE.replace(line, replacement)).unwrap_err().to_string();
            assert!(err.contains(says), "{replacement}: {err}");
        }
        let fine = EXAMPLE.replace("# master_max_age = \"90d\"", "master_max_age = \"90d\"");
        assert_eq!(Config::parse(&fine).unwrap().rotation.master_max_age, Some(Duration::from_secs(90 * 86400)));
    }
}
