//! How the client logs in. The credentials stay in memory (or in the files named here) and
//! never appear in `Debug` output, errors or logs.

use std::fmt;
use std::path::PathBuf;

use secrecy::SecretString;

/// Where an AppRole secret id comes from.
#[derive(Clone)]
pub enum SecretIdSource {
    /// Given directly.
    Value(SecretString),
    /// Read from this file at each login (an orchestrator may replace it).
    File(PathBuf),
    /// A response-wrapping token whose wrapped reply holds the secret id
    /// (`auth/approle/role/<r>/secret-id` created with `X-Vault-Wrap-TTL`): unwrapped once,
    /// at the first login, then kept in memory for later logins.
    Wrapped(SecretString),
}

impl fmt::Debug for SecretIdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretIdSource::Value(_) => f.write_str("Value([redacted])"),
            SecretIdSource::File(p) => f.debug_tuple("File").field(p).finish(),
            SecretIdSource::Wrapped(_) => f.write_str("Wrapped([redacted])"),
        }
    }
}

/// An auth method and its credentials. Methods mounted elsewhere than their default path
/// take [`Auth::at_mount`].
#[derive(Clone)]
pub enum Auth {
    /// A token obtained elsewhere (`VAULT_TOKEN`). Renewed in the background when it is
    /// renewable; it cannot be obtained again once it expires.
    Token(SecretString),
    /// AppRole: `POST /v1/auth/<mount>/login` with the role id and a secret id.
    #[allow(missing_docs)]
    AppRole { mount: String, role_id: String, secret_id: SecretIdSource },
    /// Kubernetes: the pod's service-account token, read from `jwt_file` at each login.
    #[allow(missing_docs)]
    Kubernetes { mount: String, role: String, jwt_file: PathBuf },
    /// The client certificate is the credential (mutual TLS; `role` picks one of several).
    #[allow(missing_docs)]
    Cert { mount: String, role: Option<String> },
    /// A one-time bootstrap token: consumed by the first login, so a token that can no
    /// longer be renewed cannot be replaced.
    #[allow(missing_docs)]
    Bootstrap { mount: String, token: SecretString },
    /// A userpass user and password (people: administrators).
    #[allow(missing_docs)]
    Userpass { mount: String, username: String, password: SecretString },
}

impl Auth {
    /// A given token.
    pub fn token(token: impl Into<String>) -> Self {
        Auth::Token(SecretString::from(token.into()))
    }

    /// AppRole with the secret id given.
    pub fn approle(role_id: impl Into<String>, secret_id: impl Into<String>) -> Self {
        Auth::AppRole {
            mount: "approle".into(),
            role_id: role_id.into(),
            secret_id: SecretIdSource::Value(SecretString::from(secret_id.into())),
        }
    }

    /// AppRole with the secret id read from a file at each login.
    pub fn approle_file(role_id: impl Into<String>, secret_id_file: impl Into<PathBuf>) -> Self {
        Auth::AppRole {
            mount: "approle".into(),
            role_id: role_id.into(),
            secret_id: SecretIdSource::File(secret_id_file.into()),
        }
    }

    /// AppRole with the secret id delivered by a response-wrapping token.
    pub fn approle_wrapped(role_id: impl Into<String>, wrapping_token: impl Into<String>) -> Self {
        Auth::AppRole {
            mount: "approle".into(),
            role_id: role_id.into(),
            secret_id: SecretIdSource::Wrapped(SecretString::from(wrapping_token.into())),
        }
    }

    /// Kubernetes, with the service account token file (usually
    /// `/var/run/secrets/kubernetes.io/serviceaccount/token`).
    pub fn kubernetes(role: impl Into<String>, jwt_file: impl Into<PathBuf>) -> Self {
        Auth::Kubernetes { mount: "kubernetes".into(), role: role.into(), jwt_file: jwt_file.into() }
    }

    /// The client certificate of the builder's identity, optionally as a named role.
    pub fn cert(role: Option<&str>) -> Self {
        Auth::Cert { mount: "cert".into(), role: role.map(str::to_owned) }
    }

    /// A userpass user.
    pub fn userpass(username: impl Into<String>, password: impl Into<String>) -> Self {
        Auth::Userpass {
            mount: "userpass".into(),
            username: username.into(),
            password: SecretString::from(password.into()),
        }
    }

    /// A one-time bootstrap token.
    pub fn bootstrap(token: impl Into<String>) -> Self {
        Auth::Bootstrap { mount: "bootstrap".into(), token: SecretString::from(token.into()) }
    }

    /// The method mounted at `auth/<mount>` instead of its default path.
    pub fn at_mount(mut self, mount: &str) -> Self {
        let m = mount.trim_matches('/').trim_start_matches("auth/").to_owned();
        match &mut self {
            Auth::Token(_) => {}
            Auth::AppRole { mount, .. }
            | Auth::Kubernetes { mount, .. }
            | Auth::Cert { mount, .. }
            | Auth::Userpass { mount, .. }
            | Auth::Bootstrap { mount, .. } => *mount = m,
        }
        self
    }

    /// Whether a new token can be obtained when the current one is refused.
    pub(crate) fn can_login_again(&self) -> bool {
        !matches!(self, Auth::Token(_) | Auth::Bootstrap { .. })
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Token(_) => f.write_str("Token([redacted])"),
            Auth::AppRole { mount, role_id, secret_id } => f
                .debug_struct("AppRole")
                .field("mount", mount)
                .field("role_id", role_id)
                .field("secret_id", secret_id)
                .finish(),
            Auth::Kubernetes { mount, role, jwt_file } => f
                .debug_struct("Kubernetes")
                .field("mount", mount)
                .field("role", role)
                .field("jwt_file", jwt_file)
                .finish(),
            Auth::Cert { mount, role } => f.debug_struct("Cert").field("mount", mount).field("role", role).finish(),
            Auth::Bootstrap { mount, .. } => {
                f.debug_struct("Bootstrap").field("mount", mount).field("token", &"[redacted]").finish()
            }
            Auth::Userpass { mount, username, .. } => f
                .debug_struct("Userpass")
                .field("mount", mount)
                .field("username", username)
                .field("password", &"[redacted]")
                .finish(),
        }
    }
}
