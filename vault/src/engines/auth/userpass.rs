//! Username and password, for human administrators. Passwords are stored as Argon2id
//! (m = 19456 KiB, t = 2, p = 1: OWASP's recommendation) and hashed on blocking threads,
//! at most two at a time, so a flood of logins cannot starve the server.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{LoginOutcome, validate_name, vault_duration};
use crate::engines::EngineKind;
use crate::error::{AuthFailure, Error, Result};
use crate::logical::{Access, Engine, EngineInfo, OpSpec, Operation, Reply, Request, Route};
use crate::policy::Capability;
use crate::store::{Store, decode_json, encode_json, get_json, list_names};

pub const KIND: EngineKind = EngineKind {
    info: EngineInfo {
        name: METHOD,
        description: "user names and passwords (Argon2id), for people",
        auth: true,
        routes: ROUTES,
    },
    fixed_at: None,
    once: true,
    takes_options: false,
    build: |core, _| Ok(Arc::new(UserPass::new(core.store.clone()))),
};

/// User names in their one form (see [`normalize_user`]) before authorization.
fn user_param(_: Operation, p: &mut crate::logical::Params) -> Result<()> {
    for key in ["user", "name"] {
        if let Some(raw) = p.get(key) {
            let n = normalize_user(raw)?;
            p.set(key, n);
        }
    }
    Ok(())
}

const ROUTES: &[Route] = &[
    Route::new(
        "login/{user}",
        "log in with a password",
        &[OpSpec::compute(Access::Login).body::<keyvault_api::auth::UserpassLogin>()],
    )
    .normalize(user_param)
    .names(crate::NAME_PATTERN),
    Route::new("users", "list users", &[OpSpec::list(Access::Needs(Capability::List))]),
    Route::new(
        "users/{name}",
        "create or update (`create` or `update`), read, delete a user",
        &[
            OpSpec::write(Access::CreateOrUpdate)
                .body::<keyvault_api::auth::UserWrite>()
                .answers(crate::logical::openapi::Answer::Empty),
            OpSpec::read(Access::Needs(Capability::Read)).data::<keyvault_api::auth::UserView>(),
            OpSpec::delete(Access::Needs(Capability::Delete)).answers(crate::logical::openapi::Answer::Empty),
        ],
    )
    .normalize(user_param)
    .names(crate::NAME_PATTERN),
];
const MIN_PASSWORD_LEN: usize = 12;
const MAX_PASSWORD_LEN: usize = 1024;

fn argon2() -> Argon2<'static> {
    // Invariant: constant, valid parameters (the argon2 crate's own defaults).
    let params = Params::new(19 * 1024, 2, 1, Some(32)).expect("valid Argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Limits concurrent Argon2 work (each hash holds 19 MiB and ~17 ms of a core).
static HASHING: Semaphore = Semaphore::const_new(2);

/// A hash of a random password, verified against for unknown users so that a login for a
/// user that does not exist takes as long as one with a wrong password.
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| {
    let salt = crate::barrier::random::<16>().unwrap_or([7u8; 16]);
    let pw = crate::barrier::random::<16>().unwrap_or([9u8; 16]);
    argon2().hash_password_with_salt(&pw, &salt).map(|h| h.to_string()).unwrap_or_default()
});

async fn hash_password(password: SecretString) -> Result<String> {
    let _permit = HASHING.acquire().await.map_err(|_| Error::Internal("hashing pool closed".into()))?;
    let salt = crate::barrier::random::<16>()?;
    tokio::task::spawn_blocking(move || {
        argon2()
            .hash_password_with_salt(password.expose_secret().as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| Error::Internal(format!("argon2: {e}")))
    })
    .await
    .map_err(|e| Error::Internal(format!("hash task: {e}")))?
}

async fn verify_password(password: SecretString, phc: String) -> Result<bool> {
    let _permit = HASHING.acquire().await.map_err(|_| Error::Internal("hashing pool closed".into()))?;
    tokio::task::spawn_blocking(move || {
        // Verification compares the derived hashes in constant time (password-hash's Output).
        Ok(argon2().verify_password(password.expose_secret().as_bytes(), phc.as_str()).is_ok())
    })
    .await
    .map_err(|e| Error::Internal(format!("verify task: {e}")))?
}

/// The body of `POST /v1/auth/userpass/users/<user>` (an update changes only the fields
/// it gives) and a user as `GET` shows it (never the hash).
pub use keyvault_api::auth::{UserView, UserWrite};

pub use crate::auth::userpass::{METHOD, normalize_user};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredUser {
    password_hash: String,
    token_policies: Vec<String>,
    #[serde(default, with = "vault_duration", skip_serializing_if = "Option::is_none")]
    token_ttl: Option<Duration>,
    #[serde(default, with = "vault_duration", skip_serializing_if = "Option::is_none")]
    token_max_ttl: Option<Duration>,
}

fn user_key(name: &str) -> String {
    format!("auth/userpass/users/{name}")
}

#[derive(Debug)]
pub struct UserPass {
    store: Arc<dyn Store>,
}

impl UserPass {
    pub fn new(store: Arc<dyn Store>) -> Self {
        UserPass { store }
    }

    async fn load(&self, name: &str) -> Result<Option<StoredUser>> {
        Ok(get_json(self.store.as_ref(), &user_key(name)).await?)
    }

    /// The policies user `name` (a normalized name) grants now, if it exists.
    pub async fn current_policies(&self, name: &str) -> Result<Option<Vec<String>>> {
        Ok(self.load(name).await?.map(|u| u.token_policies))
    }

    /// The stored bytes of user `name` (a normalized name), if it exists.
    pub async fn current(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.store.get(&user_key(name)).await?)
    }

    /// Create (`expected == None`) or update the user `name` (a normalized name) if its
    /// stored bytes are still `expected`; 409 otherwise. `grant` is asked first, with the
    /// policies the user's logins will get (before any password is hashed).
    pub async fn write_user(
        &self,
        name: &str,
        w: UserWrite,
        expected: Option<&[u8]>,
        grant: impl FnOnce(&[String]) -> Result<()>,
    ) -> Result<()> {
        validate_name("user", name)?;
        let existing: Option<StoredUser> = expected.map(|raw| decode_json(&user_key(name), raw)).transpose()?;
        let (old_policies, old_ttl, old_max) = match &existing {
            Some(u) => (u.token_policies.clone(), u.token_ttl, u.token_max_ttl),
            None => (Vec::new(), None, None),
        };
        let token_policies = w.token_policies.unwrap_or(old_policies);
        grant(&token_policies)?;
        let password_hash = match (w.password.map(keyvault_api::Sensitive::into_secret), existing) {
            (Some(pw), _) => {
                let len = pw.expose_secret().chars().count();
                if !(MIN_PASSWORD_LEN..=MAX_PASSWORD_LEN).contains(&len) {
                    return Err(Error::invalid(format!(
                        "password must be {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN} characters"
                    )));
                }
                hash_password(pw).await?
            }
            (None, Some(u)) => u.password_hash,
            (None, None) => return Err(Error::invalid("password is required for a new user")),
        };
        let stored = StoredUser {
            password_hash,
            token_policies,
            token_ttl: w.token_ttl.unwrap_or(old_ttl),
            token_max_ttl: w.token_max_ttl.unwrap_or(old_max),
        };
        if let (Some(ttl), Some(max)) = (stored.token_ttl, stored.token_max_ttl)
            && ttl > max
        {
            return Err(Error::invalid("token_ttl must not exceed token_max_ttl"));
        }
        let raw = encode_json(&stored);
        if !self.store.compare_and_swap(&user_key(name), expected, Some(&raw)).await? {
            return Err(Error::Conflict(format!("user {name} changed concurrently; retry")));
        }
        Ok(())
    }

    pub async fn read_user(&self, name: &str) -> Result<UserView> {
        validate_name("user", name)?;
        let u = self.load(name).await?.ok_or_else(|| Error::NotFound(format!("no user {name}")))?;
        Ok(UserView {
            token_policies: u.token_policies,
            token_ttl: u.token_ttl.map(|d| d.as_secs()).unwrap_or(0),
            token_max_ttl: u.token_max_ttl.map(|d| d.as_secs()).unwrap_or(0),
        })
    }

    pub async fn delete_user(&self, name: &str) -> Result<()> {
        validate_name("user", name)?;
        if !self.store.delete(&user_key(name)).await? {
            return Err(Error::NotFound(format!("no user {name}")));
        }
        Ok(())
    }

    pub async fn list_users(&self) -> Result<Vec<String>> {
        let prefix = "auth/userpass/users/";
        let names = list_names(self.store.as_ref(), prefix).await?;
        if names.is_empty() {
            return Err(Error::NotFound("no users".into()));
        }
        Ok(names)
    }
}

#[async_trait]
impl Engine for UserPass {
    fn info(&self) -> &'static EngineInfo {
        &KIND.info
    }

    async fn existence(&self, req: &Request) -> Result<Option<Vec<u8>>> {
        self.current(req.param("name")).await
    }

    async fn login_identity(&self, req: &Request) -> Option<String> {
        Some(req.param("user").to_owned())
    }

    async fn handle(&self, req: &mut Request) -> Result<Reply> {
        let name = req.param("name").to_owned();
        match req.operation {
            Operation::List => Reply::keys(self.list_users().await?),
            Operation::Read => Reply::data(&self.read_user(&name).await?),
            Operation::Write => {
                super::refuse_unenforced_restrictions(&crate::json::parse_body(&req.body)?)?;
                let w: UserWrite = req.data()?;
                // Whoever sets a user's password can log in as the user: every write (a
                // password reset as much as a policy change) needs the caller to hold the
                // policies the user's logins will get.
                let caller = req.caller()?;
                self.write_user(&name, w, req.existing.as_deref(), |p| caller.check_grant(p)).await?;
                Ok(Reply::empty())
            }
            Operation::Delete => {
                self.delete_user(&name).await?;
                Ok(Reply::empty())
            }
            Operation::Patch => Err(Error::UnsupportedOperation),
        }
    }

    async fn login(&self, req: &mut Request) -> Result<LoginOutcome> {
        let name = req.param("user").to_owned();
        let body: keyvault_api::auth::UserpassLogin = req.data()?;
        let password = body.password.into_secret();
        if password.expose_secret().len() > MAX_PASSWORD_LEN * 4 {
            return Err(Error::Unauthenticated(AuthFailure::InvalidCredentials));
        }
        let user = self.load(&name).await?;
        let phc = match &user {
            Some(u) => u.password_hash.clone(),
            None => DUMMY_HASH.clone(),
        };
        let ok = verify_password(password, phc).await?;
        match user {
            Some(u) if ok => Ok(LoginOutcome {
                sub: format!("userpass:{name}"),
                method: METHOD,
                role: None,
                policies: u.token_policies,
                ttl: u.token_ttl,
                max_ttl: u.token_max_ttl,
                bind_certificate: false,
                metadata: [("username".to_owned(), name.clone())].into(),
                user: Some(name),
                parent: None,
                attributes: Default::default(),
                audiences: Vec::new(),
            }),
            _ => Err(Error::Unauthenticated(AuthFailure::InvalidCredentials)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn argon2id_with_owasp_parameters() {
        let h = hash_password(SecretString::from("correct horse battery".to_owned())).await.unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_password(SecretString::from("correct horse battery".to_owned()), h.clone()).await.unwrap());
        assert!(!verify_password(SecretString::from("correct horse batterz".to_owned()), h).await.unwrap());
    }
}
