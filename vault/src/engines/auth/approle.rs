//! AppRole: machine login with a role id and a secret id (Vault's shapes).
//!
//! Secret ids are 256 random bits. They are stored only as HMAC-SHA256 computed inside the
//! token (key `approle-hmac`), bound to the role name, and compared in constant time. A
//! keyed hash is the right tool here: the secret is high-entropy, so a slow password hash
//! would add nothing but a denial-of-service lever on login.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keyvault_hsm::KeyStore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::{LoginOutcome, RoleAdmin, RoleStore, RoleView, StoredRole, validate_name, vault_duration};
use crate::engines::EngineKind;
use crate::error::{AuthFailure, Error, Result};
use crate::keys::{KeyNames, SharedKeyring, keyed_hash};
use crate::logical::openapi::Answer;
use crate::logical::{Access, Engine, EngineInfo, OpSpec, Reply, Request, Route};
use crate::policy::Capability;
use crate::store::{Store, decode_json, encode_json, scan_all};
use crate::unix_now;

pub const METHOD: &str = "approle";

pub const KIND: EngineKind = EngineKind {
    info: EngineInfo {
        name: METHOD,
        description: "machine login with a role id and a secret id",
        auth: true,
        routes: ROUTES,
    },
    fixed_at: None,
    once: true,
    takes_options: false,
    build: |core, _| {
        Ok(Arc::new(AppRole::new(core.store.clone(), core.keys.clone(), core.names.clone(), core.keyring.clone())))
    },
};

const ROLES: [Route; 2] = crate::role_routes!("role", "role", keyvault_api::auth::AppRoleRole);

const ROUTES: &[Route] = &[
    // A secret id with a number of uses is consumed by a login (which records its audit
    // intent first); one of unlimited uses changes nothing.
    Route::new(
        "login",
        "log in with role_id (or role) and secret_id",
        &[OpSpec::write(Access::Login).intent_by_handler().body::<keyvault_api::auth::AppRoleLogin>()],
    ),
    ROLES[0],
    ROLES[1],
    Route::new(
        "role/{name}/role-id",
        "the role's role id",
        &[OpSpec::read(Access::Needs(Capability::Read)).data::<keyvault_api::auth::RoleId>()],
    )
    .normalize(super::role_name)
    .names(crate::NAME_PATTERN),
    Route::new(
        "role/{name}/secret-id",
        "a new secret id (shown once)",
        &[OpSpec::write(Access::Needs(Capability::Update))
            .body::<keyvault_api::Empty>()
            .data::<keyvault_api::auth::SecretId>()],
    )
    .normalize(super::role_name)
    .names(crate::NAME_PATTERN),
    Route::new(
        "tidy/secret-id",
        "remove stored secret ids that can no longer log in (Vault's tidy; runs in the background)",
        &[OpSpec::write(Access::Needs(Capability::Update)).body::<keyvault_api::Empty>().answers(Answer::Empty)],
    ),
];

/// The tidy's claim: one runs at a time across replicas; a holder that dies releases it
/// when this runs out.
const TIDY_CLAIM: &str = "auth/approle/tidy-claim";
const TIDY_CLAIM_TTL: Duration = Duration::from_secs(600);
const TIDY_STARTED: &str =
    "Tidy operation successfully started. Any information from the operation will be printed to the server log.";
const TIDY_RUNNING: &str = "Tidy operation already in progress.";

/// AppRole's own role settings, as written (the token settings are common to every
/// method).
pub use keyvault_api::auth::{AppRoleRole as RoleConfig, DEFAULT_SECRET_ID_TTL};

/// What is stored besides the token settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppRoleData {
    role_id: String,
    #[serde(default, with = "vault_duration")]
    secret_id_ttl: Option<Duration>,
    #[serde(default)]
    secret_id_num_uses: u64,
}

/// What is stored for a secret id (under a key derived from its HMAC).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredSecretId {
    hmac: String,
    accessor: String,
    created: u64,
    expires: Option<u64>,
    /// Logins left; `None`: any number. Decremented by compare-and-swap (the last use
    /// deletes the record), so concurrent logins never use one more than allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uses_left: Option<u64>,
    /// The role id of the role it was made for. A role deleted and made again under the
    /// same name has a new role id, so a secret id of the old role (one left behind by a
    /// delete that was interrupted, or made while the delete ran) logs in to nothing.
    /// Secret ids stored without one (made before this field) are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role_id: Option<String>,
}

/// A freshly generated secret id: shown once, never stored.
pub struct NewSecretId {
    pub secret_id: SecretString,
    pub accessor: String,
    pub ttl: Option<Duration>,
    pub num_uses: u64,
}

impl std::fmt::Debug for NewSecretId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSecretId").field("accessor", &self.accessor).finish_non_exhaustive()
    }
}

fn role_id_key(role_id: &str) -> String {
    format!("auth/approle/role-id/{role_id}")
}
fn secret_id_prefix(name: &str) -> String {
    format!("auth/approle/secret-id/{name}/")
}

pub(crate) fn random_hex<const N: usize>() -> Result<String> {
    Ok(hex::encode(crate::barrier::random::<N>()?))
}

#[derive(Debug)]
pub struct AppRole {
    store: Arc<dyn Store>,
    roles: RoleStore<AppRoleData>,
    keys: Arc<dyn KeyStore>,
    names: KeyNames,
    keyring: SharedKeyring,
}

fn invalid() -> Error {
    Error::Unauthenticated(AuthFailure::InvalidCredentials)
}

impl AppRole {
    pub fn new(store: Arc<dyn Store>, keys: Arc<dyn KeyStore>, names: KeyNames, keyring: SharedKeyring) -> Self {
        AppRole { roles: RoleStore::new(store.clone(), METHOD), store, keys, names, keyring }
    }

    /// Create (`expected == None`) or update a role whose stored bytes are still
    /// `expected`. A new role gets a random role id; an update keeps it.
    pub async fn write(
        &self,
        name: &str,
        config: RoleConfig,
        token: super::TokenSettings,
        expected: Option<&[u8]>,
    ) -> Result<()> {
        let existing: Option<StoredRole<AppRoleData>> =
            expected.map(|raw| decode_json(&format!("auth/approle/role/{name}"), raw)).transpose()?;
        let role_id = match &existing {
            Some(r) => r.config.role_id.clone(),
            None => uuid::Uuid::new_v4().to_string(),
        };
        let data = AppRoleData {
            role_id: role_id.clone(),
            secret_id_ttl: config.secret_id_ttl,
            secret_id_num_uses: config.secret_id_num_uses,
        };
        // The role id's index first: a role whose save commits has its index whatever
        // happens next (a crash, a failing store). One whose save does not leaves an
        // entry that logs nobody in (a login checks the role's own role id), and every
        // update writes the entry again (a role left without one by an older version
        // gets it back).
        self.store.put(&role_id_key(&role_id), name.as_bytes()).await?;
        #[cfg(debug_assertions)]
        crate::faults::crash_point("KEYVAULT_TEST_CRASH_APPROLE_WRITE");
        self.roles.save(name, &StoredRole { config: data, token }, expected).await?;
        Ok(())
    }

    pub async fn role_id(&self, name: &str) -> Result<String> {
        Ok(self.roles.require(name).await?.config.role_id)
    }

    /// Keyed hash of a secret id, bound to its role, computed inside the token.
    async fn secret_id_hmac(&self, role: &str, secret_id: &SecretString) -> Result<[u8; 32]> {
        keyed_hash(
            &self.keys,
            &self.names,
            &self.keyring,
            "keyvault.approle.secret-id.v1",
            &[role.as_bytes(), secret_id.expose_secret().as_bytes()],
        )
        .await
    }

    /// Generate a secret id for `role` (as loaded, under `name`): 256 random bits,
    /// returned once.
    async fn new_secret_id(&self, name: &str, role: &StoredRole<AppRoleData>) -> Result<NewSecretId> {
        let secret_id = SecretString::from(random_hex::<32>()?);
        let accessor = random_hex::<16>()?;
        let mac = hex::encode(self.secret_id_hmac(name, &secret_id).await?);
        let ttl = role.config.secret_id_ttl;
        let num_uses = role.config.secret_id_num_uses;
        let entry = StoredSecretId {
            hmac: mac.clone(),
            accessor: accessor.clone(),
            created: unix_now(),
            expires: ttl.map(|t| unix_now().saturating_add(t.as_secs())),
            uses_left: (num_uses > 0).then_some(num_uses),
            role_id: Some(role.config.role_id.clone()),
        };
        let key = format!("{}{mac}", secret_id_prefix(name));
        let raw = encode_json(&entry);
        if !self.store.insert_if_absent(&key, &raw, ttl).await? {
            return Err(Error::Internal("secret id collision".into()));
        }
        // A delete of the role may have scanned for its secret ids before this one was
        // stored (the role was read before the delete): if the role is gone now, or is
        // another role of that name, the id is taken back, or it would stay in storage for
        // good (it could not log in). A delete removes the role before it scans, so either
        // this look finds it gone or the delete's scan finds this id.
        // (No one has seen the id yet: on any failure it is deleted.)
        let outcome = match self.roles.load_raw(name).await {
            Ok(Some((_, now))) if now.config.role_id == role.config.role_id => Ok(()),
            Ok(_) => Err(Error::NotFound(format!("no role {name}"))),
            Err(e) => Err(e),
        };
        if let Err(e) = outcome {
            if let Err(d) = self.store.delete(&key).await {
                tracing::warn!(role = name, error = %d, "approle: a secret id of a role deleted meanwhile stays in storage");
            }
            return Err(e);
        }
        Ok(NewSecretId { secret_id, accessor, ttl, num_uses })
    }
}

impl AppRole {
    /// Start a tidy of the stored secret ids in the background, unless one is running
    /// (on any replica): whether it started. It runs under the claim [`TIDY_CLAIM`]
    /// ([`crate::store::while_claimed`]: renewed while it runs, and the tidy stopped if
    /// the claim cannot be kept).
    async fn start_tidy(&self) -> Result<bool> {
        let store = self.store.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<bool>>();
        let tx = std::sync::Mutex::new(Some(tx));
        let answer = move |r: Result<bool>| {
            if let Some(tx) = tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = tx.send(r);
            }
        };
        tokio::spawn(async move {
            let work = async {
                answer(Ok(true));
                tidy_secret_ids(&store).await
            };
            match crate::store::while_claimed(&store, TIDY_CLAIM, TIDY_CLAIM_TTL, work).await {
                Ok(Some(Ok(t))) => {
                    tracing::info!(scanned = t.scanned, removed = t.removed, "approle: tidy of secret ids done")
                }
                Ok(Some(Err(e))) => tracing::warn!(error = %e, "approle: tidy of secret ids stopped"),
                Ok(None) => answer(Ok(false)),
                Err(e) => {
                    tracing::warn!(error = %e, "approle: tidy of secret ids stopped");
                    answer(Err(e.into()));
                }
            }
        });
        rx.await.map_err(|_| Error::Internal("the tidy task ended without an answer".into()))?
    }
}

/// What a tidy did.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tidied {
    scanned: u64,
    removed: u64,
}

/// The role id of role `name`, if there is such a role.
async fn role_id_of(roles: &RoleStore<AppRoleData>, name: &str) -> Result<Option<String>> {
    match roles.load(name).await {
        Ok(r) => Ok(r.map(|r| r.config.role_id)),
        // Not a name a role can have: no role has it.
        Err(Error::InvalidRequest(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Remove every stored secret id that can no longer log in: past its `expires`, with no
/// use left, of a role that is gone or was made again under its name (another role id),
/// or stored without a role id. Such records are left by older versions (a limited-use
/// id lost its storage TTL at its first login), and by a delete or a mint cut short.
/// Each is removed by compare-and-delete, so a login that changed it meanwhile keeps it
/// (for the next tidy). Pages through the ids in key order (grouped by role, so one role
/// lookup per role); a progress line every 10,000.
async fn tidy_secret_ids(store: &Arc<dyn Store>) -> Result<Tidied> {
    const ROOT: &str = "auth/approle/secret-id/";
    let roles: RoleStore<AppRoleData> = RoleStore::new(store.clone(), METHOD);
    let now = unix_now();
    let mut done = Tidied::default();
    // The role of the ids being looked at: (name, its role id if it exists).
    let mut role: Option<(String, Option<String>)> = None;
    let mut after: Option<String> = None;
    loop {
        let page = store.scan_prefix(ROOT, after.as_deref(), 1000).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (key, raw) in page {
            done.scanned += 1;
            if done.scanned % 10_000 == 0 {
                tracing::info!(scanned = done.scanned, removed = done.removed, "approle: tidy of secret ids");
            }
            let Some((name, _)) = key[ROOT.len()..].split_once('/') else { continue };
            // Not a secret id this version can read: left alone.
            let Ok(id) = decode_json::<StoredSecretId>(&key, &raw) else { continue };
            let mut dead = id.expires.is_some_and(|e| e <= now) || id.uses_left == Some(0) || id.role_id.is_none();
            if !dead {
                // Its role as looked up for the ids before it; looked up (again) when that
                // is another name or another role id: a role made again since has ids of
                // its own, which must not be taken for the old role's.
                let cached = role.as_ref().filter(|(n, _)| n == name).map(|(_, r)| r);
                if cached != Some(&id.role_id) {
                    role = Some((name.to_owned(), role_id_of(&roles, name).await?));
                }
                dead = role.as_ref().map(|(_, r)| r) != Some(&id.role_id);
            }
            if dead && store.compare_and_swap(&key, Some(&raw), None).await? {
                done.removed += 1;
            }
        }
    }
    Ok(done)
}

/// What `GET` shows of a role (the role id has its own endpoint, as in Vault).
#[derive(Serialize)]
struct RoleFields {
    #[serde(with = "vault_duration")]
    secret_id_ttl: Option<Duration>,
    secret_id_num_uses: u64,
}

#[async_trait]
impl RoleAdmin for AppRole {
    type Config = RoleConfig;

    async fn current(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.roles.load_raw(name).await?.map(|(raw, _)| raw))
    }

    async fn write_role(
        &self,
        name: &str,
        config: RoleConfig,
        token: super::TokenSettings,
        expected: Option<&[u8]>,
    ) -> Result<()> {
        self.write(name, config, token, expected).await
    }

    async fn read_role(&self, name: &str) -> Result<Reply> {
        let role = self.roles.require(name).await?;
        let fields =
            RoleFields { secret_id_ttl: role.config.secret_id_ttl, secret_id_num_uses: role.config.secret_id_num_uses };
        Reply::data(&RoleView { token: (&role.token).into(), config: &fields })
    }

    async fn delete_role(&self, name: &str) -> Result<()> {
        let role = self.roles.delete(name).await?;
        // Only this role's secret ids (and those stored without a role id, refused at
        // login anyway): a role made again under the same name meanwhile keeps its own. A
        // record that a login changed since it was read is read again.
        for (k, mut raw) in scan_all(self.store.as_ref(), &secret_id_prefix(name)).await? {
            loop {
                let stale = match decode_json::<StoredSecretId>(&k, &raw) {
                    Ok(s) => s.role_id.as_deref().is_none_or(|id| id == role.config.role_id),
                    Err(_) => true,
                };
                if !stale || self.store.compare_and_swap(&k, Some(&raw), None).await? {
                    break;
                }
                match self.store.get(&k).await? {
                    Some(now) => raw = now,
                    None => break,
                }
            }
        }
        self.store.delete(&role_id_key(&role.config.role_id)).await?;
        Ok(())
    }

    async fn list_roles(&self) -> Result<Vec<String>> {
        self.roles.names().await
    }
}

#[async_trait]
impl Engine for AppRole {
    fn info(&self) -> &'static EngineInfo {
        &KIND.info
    }

    async fn existence(&self, req: &Request) -> Result<Option<Vec<u8>>> {
        self.current(req.param("name")).await
    }

    /// The role a login names, by its name or by its role id: both count as the same
    /// identity (before, a role id and its role's name each had their own guesses). A role
    /// id that names no role (or a store that cannot say) counts as itself.
    async fn login_identity(&self, req: &Request) -> Option<String> {
        match super::LoginClaim::parse(&req.body).approle_by() {
            Some(super::ClaimedRole::Name(name)) => Some(name),
            Some(super::ClaimedRole::Id(role_id)) => {
                let named = if role_id.len() <= 128 {
                    self.store.get(&role_id_key(&role_id)).await.ok().flatten().and_then(|n| String::from_utf8(n).ok())
                } else {
                    None
                };
                Some(named.unwrap_or(role_id))
            }
            None => None,
        }
    }

    async fn handle(&self, req: &mut Request) -> Result<Reply> {
        let name = req.param("name").to_owned();
        match req.route.pattern {
            "role/{name}/role-id" => Reply::data(&keyvault_api::auth::RoleId { role_id: self.role_id(&name).await? }),
            "role/{name}/secret-id" => {
                super::refuse_unenforced(
                    &crate::json::parse_body(&req.body)?,
                    super::UNENFORCED_SECRET_ID_RESTRICTIONS,
                )?;
                req.data::<keyvault_api::Empty>()?;
                // A secret id logs in as the role: making one needs what the role grants.
                let role = self.roles.require(&name).await?;
                req.caller()?.check_settings_grant(&role.token)?;
                let s = self.new_secret_id(&name, &role).await?;
                Reply::data(&keyvault_api::auth::SecretId {
                    secret_id: s.secret_id.into(),
                    secret_id_accessor: s.accessor,
                    secret_id_ttl: s.ttl.map(|t| t.as_secs()).unwrap_or(0),
                    secret_id_num_uses: s.num_uses,
                })
            }
            "tidy/secret-id" => {
                req.data::<keyvault_api::Empty>()?;
                let mut reply = Reply::empty();
                reply.warnings.push(if self.start_tidy().await? { TIDY_STARTED } else { TIDY_RUNNING }.to_owned());
                Ok(reply)
            }
            _ => super::handle_role(self, req).await,
        }
    }

    async fn login(&self, req: &mut Request) -> Result<LoginOutcome> {
        let body: keyvault_api::auth::AppRoleLogin = req.data()?;
        let (name, role) = match (body.role, body.role_id) {
            (Some(name), None) => {
                validate_name("role", &name)?;
                let role = self.roles.load(&name).await?.ok_or_else(invalid)?;
                (name, role)
            }
            (None, Some(role_id)) => {
                if role_id.len() > 128 {
                    return Err(invalid());
                }
                let name = self.store.get(&role_id_key(&role_id)).await?.ok_or_else(invalid)?;
                let name = String::from_utf8(name).map_err(|_| invalid())?;
                let role = self.roles.load(&name).await?.ok_or_else(invalid)?;
                if !bool::from(role.config.role_id.as_bytes().ct_eq(role_id.as_bytes())) {
                    return Err(invalid());
                }
                (name, role)
            }
            _ => {
                return Err(Error::invalid("give either role (short form) or role_id, and secret_id"));
            }
        };
        let secret_id = SecretString::from(body.secret_id.expose().to_owned());
        if secret_id.expose_secret().len() > 256 {
            return Err(invalid());
        }
        let mac = self.secret_id_hmac(&name, &secret_id).await?;
        let key = format!("{}{}", secret_id_prefix(&name), hex::encode(mac));
        // A use is taken atomically: of concurrent logins with the last use, exactly one
        // wins (the others find the record changed or gone and look again).
        loop {
            let raw = self.store.get(&key).await?.ok_or_else(invalid)?;
            let mut stored: StoredSecretId = decode_json(&key, &raw)?;
            let stored_mac = hex::decode(&stored.hmac).map_err(|_| Error::Internal("stored secret id hmac".into()))?;
            if !bool::from(stored_mac.as_slice().ct_eq(&mac)) {
                return Err(invalid());
            }
            if stored.expires.is_some_and(|e| e <= unix_now()) || stored.uses_left == Some(0) {
                return Err(invalid());
            }
            let same_role =
                stored.role_id.as_ref().is_some_and(|r| bool::from(r.as_bytes().ct_eq(role.config.role_id.as_bytes())));
            if !same_role {
                return Err(invalid());
            }
            if stored.uses_left.is_some() {
                // A use is about to be consumed: its audit intent first.
                req.intent().await?;
            }
            let taken = match stored.uses_left {
                None => true,
                Some(0 | 1) => self.store.compare_and_swap(&key, Some(&raw), None).await?,
                Some(n) => {
                    stored.uses_left = Some(n - 1);
                    self.store.compare_and_swap(&key, Some(&raw), Some(&encode_json(&stored))).await?
                }
            };
            if taken {
                return Ok(LoginOutcome::for_role(METHOD, &name, &role.token));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::TokenSettings;
    use crate::test_support::{Keyed, PauseAt, TestStore};

    /// A role deleted while it is made again under its name, the new role's secret id
    /// minted before the delete scans for the old role's: the delete removes the old
    /// role's secret ids only; the new one stays, bound to the new role.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deleting_a_role_keeps_the_secret_ids_of_one_made_again_meanwhile() {
        let keyed = Keyed::new().await;
        let store = Arc::new(TestStore::holding(keyed.store.clone(), PauseAt::Scan, &secret_id_prefix("web")));
        let approle =
            Arc::new(AppRole::new(store.clone(), keyed.keys.clone(), keyed.names.clone(), keyed.keyring.clone()));
        let config = RoleConfig { secret_id_ttl: None, secret_id_num_uses: 0 };
        let record = |s: &NewSecretId| {
            let (approle, sid) = (approle.clone(), s.secret_id.clone());
            async move {
                let mac = approle.secret_id_hmac("web", &sid).await.unwrap();
                approle.store.get(&format!("{}{}", secret_id_prefix("web"), hex::encode(mac))).await.unwrap()
            }
        };

        approle.write("web", config.clone(), TokenSettings::default(), None).await.unwrap();
        let old = approle.new_secret_id("web", &approle.roles.require("web").await.unwrap()).await.unwrap();
        store.arm();
        let deleting = tokio::spawn({
            let approle = approle.clone();
            async move { approle.delete_role("web").await }
        });
        store.reached.notified().await;
        approle.write("web", config, TokenSettings::default(), None).await.unwrap();
        let new = approle.new_secret_id("web", &approle.roles.require("web").await.unwrap()).await.unwrap();
        store.go.notify_one();
        deleting.await.unwrap().unwrap();

        assert!(record(&old).await.is_none(), "the deleted role's secret id is gone");
        let kept = record(&new).await.expect("the new role's secret id is kept");
        let kept: StoredSecretId = decode_json("kept", &kept).unwrap();
        assert_eq!(kept.role_id, Some(approle.role_id("web").await.unwrap()));
    }

    /// The tidy removes exactly the ids that can no longer log in, keeps the rest, and
    /// runs once at a time (its claim held: it does not start).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tidy_removes_the_secret_ids_that_cannot_log_in_and_only_those() {
        let keyed = Keyed::new().await;
        let approle = AppRole::new(keyed.store.clone(), keyed.keys.clone(), keyed.names.clone(), keyed.keyring.clone());
        let config = RoleConfig { secret_id_ttl: None, secret_id_num_uses: 0 };
        approle.write("web", config, TokenSettings::default(), None).await.unwrap();
        let web = approle.roles.require("web").await.unwrap();
        let unlimited = approle.new_secret_id("web", &web).await.unwrap();
        let mut limited_role = web.clone();
        limited_role.config.secret_id_num_uses = 3;
        limited_role.config.secret_id_ttl = Some(Duration::from_secs(3600));
        let limited = approle.new_secret_id("web", &limited_role).await.unwrap();
        let now = unix_now();
        let record = |role_id: Option<&str>, expires: Option<u64>, uses_left: Option<u64>| {
            encode_json(&StoredSecretId {
                hmac: "00".repeat(32),
                accessor: "a".into(),
                created: now - 100,
                expires,
                uses_left,
                role_id: role_id.map(str::to_owned),
            })
        };
        let id = web.config.role_id.as_str();
        let dead = [
            ("web", record(Some(id), Some(now - 10), Some(2))),
            ("web", record(None, None, None)),
            ("web", record(Some("another-role-id"), None, None)),
            ("web", record(Some(id), None, Some(0))),
            ("gone", record(Some(id), None, None)),
        ];
        for (i, (role, raw)) in dead.iter().enumerate() {
            keyed.store.put(&format!("{}dead{i}", secret_id_prefix(role)), raw).await.unwrap();
        }
        keyed.store.put(&format!("{}unreadable", secret_id_prefix("web")), b"{not json").await.unwrap();
        let all = || async { scan_all(keyed.store.as_ref(), "auth/approle/secret-id/").await.unwrap().len() };
        assert_eq!(all().await, 8);

        assert_eq!(tidy_secret_ids(&keyed.store).await.unwrap(), Tidied { scanned: 8, removed: 5 });
        let left: Vec<String> = scan_all(keyed.store.as_ref(), "auth/approle/secret-id/")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(left.len(), 3, "{left:?}");
        assert!(left.iter().all(|k| !k.contains("dead")), "{left:?}");
        for s in [&unlimited, &limited] {
            let mac = hex::encode(approle.secret_id_hmac("web", &s.secret_id).await.unwrap());
            assert!(left.contains(&format!("{}{mac}", secret_id_prefix("web"))));
        }
        assert_eq!(tidy_secret_ids(&keyed.store).await.unwrap(), Tidied { scanned: 3, removed: 0 });

        // One at a time: a held claim keeps a second from starting.
        keyed.store.put(&format!("{}dead9", secret_id_prefix("gone")), &dead[4].1).await.unwrap();
        keyed.store.insert_if_absent(TIDY_CLAIM, b"someone", Some(TIDY_CLAIM_TTL)).await.unwrap();
        assert!(!approle.start_tidy().await.unwrap());
        assert_eq!(all().await, 4);
        keyed.store.delete(TIDY_CLAIM).await.unwrap();
        assert!(approle.start_tidy().await.unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while keyed.store.get(TIDY_CLAIM).await.unwrap().is_some() {
            assert!(std::time::Instant::now() < deadline, "the tidy never released its claim");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(all().await, 3);
    }

    /// A secret id minted for a role that a delete removed meanwhile (after the mint read
    /// the role, before it stored the id, so the delete's scan missed it): the mint
    /// answers 404 and leaves nothing in storage. The same when the role was made again
    /// under its name: the id was for the one deleted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_secret_id_minted_for_a_role_deleted_meanwhile_is_not_kept() {
        let keyed = Keyed::new().await;
        let approle = AppRole::new(keyed.store.clone(), keyed.keys.clone(), keyed.names.clone(), keyed.keyring.clone());
        let config = RoleConfig { secret_id_ttl: None, secret_id_num_uses: 0 };
        let stored = || async { scan_all(keyed.store.as_ref(), &secret_id_prefix("web")).await.unwrap().len() };

        approle.write("web", config.clone(), TokenSettings::default(), None).await.unwrap();
        let read_before = approle.roles.require("web").await.unwrap();
        approle.delete_role("web").await.unwrap();
        let minted = approle.new_secret_id("web", &read_before).await;
        assert!(matches!(minted, Err(Error::NotFound(_))), "{:?}", minted.map(|m| m.accessor));
        assert_eq!(stored().await, 0);

        approle.write("web", config, TokenSettings::default(), None).await.unwrap();
        assert!(matches!(approle.new_secret_id("web", &read_before).await, Err(Error::NotFound(_))));
        assert_eq!(stored().await, 0);
        // The role as it is now mints as before.
        approle.new_secret_id("web", &approle.roles.require("web").await.unwrap()).await.unwrap();
        assert_eq!(stored().await, 1);
    }
}
