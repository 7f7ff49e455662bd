//! What the `keyvault` command does besides serving: the development set-up, the load
//! generator, migration, and the admin commands, all talking to a running server through
//! the `keyvault-client` crate. Not part of the server library.

pub mod admin;
pub mod bench;
pub mod dev;
pub mod dev_pki;
pub mod migrate;

use std::path::PathBuf;

use keyvault_client::{Auth, ClientBuilder};
use secrecy::{ExposeSecret, SecretString};

/// A server to talk to, from the command line and the environment.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `https://host:port` (or `http://` to the loopback).
    pub address: String,
    /// CA certificate for https.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub token: Option<SecretString>,
}

impl Endpoint {
    /// A client builder for this endpoint (no auth method yet).
    pub fn builder(&self) -> anyhow::Result<ClientBuilder> {
        let mut b = ClientBuilder::new().address(&self.address);
        if let Some(ca) = &self.ca_file {
            b = b.ca_file(ca);
        }
        match (&self.client_cert, &self.client_key) {
            (Some(c), Some(k)) => b = b.client_identity_files(c, k),
            (None, None) => {}
            _ => anyhow::bail!("give both --client-cert and --client-key"),
        }
        Ok(b)
    }

    /// The token given, as an auth method.
    pub fn auth(&self) -> Option<Auth> {
        self.token.as_ref().map(|t| Auth::token(t.expose_secret()))
    }

    /// A client with the token given (if any).
    pub fn client(&self) -> anyhow::Result<keyvault_client::Client> {
        let mut b = self.builder()?;
        if let Some(a) = self.auth() {
            b = b.auth(a);
        }
        Ok(b.build()?)
    }
}

/// How to reach a running server: flags, else the variables of one family, `KEYVAULT_*`,
/// or Vault's `VAULT_*` when `KEYVAULT_ADDR` is unset, `VAULT_ADDR` is set and no
/// `--address` is given. Never a mix: `VAULT_TOKEN` (a Vault credential) must not go to
/// a KeyVault named by `KEYVAULT_ADDR` or `--address`, nor `KEYVAULT_TOKEN` to the Vault
/// server `VAULT_ADDR` names.
#[derive(clap::Args, Debug, Clone)]
pub struct EndpointArgs {
    /// `https://host:port` (`KEYVAULT_ADDR`, `VAULT_ADDR`; default `https://127.0.0.1:8200`).
    #[arg(long)]
    pub address: Option<String>,
    /// CA certificate for https (`KEYVAULT_CACERT`, `VAULT_CACERT`).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS (`KEYVAULT_CLIENT_CERT`, `VAULT_CLIENT_CERT`).
    #[arg(long)]
    pub client_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS (`KEYVAULT_CLIENT_KEY`, `VAULT_CLIENT_KEY`).
    #[arg(long)]
    pub client_key: Option<PathBuf>,
    /// A file holding the token (`KEYVAULT_TOKEN`, `VAULT_TOKEN`; a token never goes on the
    /// command line, where `ps` shows it).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

fn env(names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
}

/// The environment variable family an [`EndpointArgs`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvFamily {
    KeyVault,
    Vault,
}

impl EnvFamily {
    fn prefix(self) -> &'static str {
        match self {
            EnvFamily::KeyVault => "KEYVAULT_",
            EnvFamily::Vault => "VAULT_",
        }
    }

    fn var(self, name: &str) -> Option<String> {
        env(&[&format!("{}{name}", self.prefix())])
    }
}

impl EndpointArgs {
    /// The family of variables these arguments read (see [`EndpointArgs`]).
    /// The Rust client's rule ([`keyvault_client::env_prefix`]), so the two never disagree.
    pub fn family(&self) -> EnvFamily {
        if keyvault_client::env_prefix(self.address.is_some()) == EnvFamily::Vault.prefix() {
            EnvFamily::Vault
        } else {
            EnvFamily::KeyVault
        }
    }

    pub fn endpoint(self) -> anyhow::Result<Endpoint> {
        let family = self.family();
        let token = match &self.token_file {
            Some(f) => {
                let text = zeroize::Zeroizing::new(
                    std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("--token-file {}: {e}", f.display()))?,
                );
                Some(SecretString::from(text.trim().to_owned()))
            }
            None => family.var("TOKEN").map(SecretString::from),
        };
        Ok(Endpoint {
            address: self.address.or_else(|| family.var("ADDR")).unwrap_or_else(|| "https://127.0.0.1:8200".into()),
            ca_file: self.ca_file.or_else(|| family.var("CACERT").map(PathBuf::from)),
            client_cert: self.client_cert.or_else(|| family.var("CLIENT_CERT").map(PathBuf::from)),
            client_key: self.client_key.or_else(|| family.var("CLIENT_KEY").map(PathBuf::from)),
            token,
        })
    }
}
