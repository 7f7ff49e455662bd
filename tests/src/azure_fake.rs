//! A fake of Azure Key Vault's secrets REST API (api-version 7.4) and of Microsoft Entra
//! ID's client-credentials token endpoint, written from Microsoft's published API
//! reference, for the `azure` adapter's tests: no emulator of Key Vault exists. It checks
//! the shapes of what it is sent (the API version, the bearer token and its expiry, the
//! token request's form, secret names) and keeps soft-deleted secrets recoverable, as
//! Key Vault does with soft delete on. Lists come two to a page, linked by `nextLink`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

/// What a test sets up and reads back.
pub struct FakeAzure {
    pub url: String,
    pub tenant: String,
    pub client_id: String,
    pub client_secret: String,
    state: Arc<Shared>,
    _server: tokio::task::JoinHandle<()>,
}

/// Names are case-insensitive, as in Key Vault: the maps are keyed by the lower-case
/// name ([`folded`]), and a secret keeps the case it was made with (`shown`).
#[derive(Default)]
struct Store {
    /// name -> versions (id, value, created), oldest first.
    secrets: BTreeMap<String, Vec<(String, String, u64)>>,
    deleted: BTreeMap<String, Vec<(String, String, u64)>>,
    /// name -> the name as it was made.
    shown: HashMap<String, String>,
    tokens: HashMap<String, Instant>,
    tokens_issued: u64,
    /// Requests refused for a missing, unknown or expired token.
    refused: u64,
    /// Requests refused for a missing or wrong api-version.
    bad_version: u64,
    pages_served: u64,
    /// Reads of a secret (any outcome).
    secret_reads: u64,
}

struct Shared {
    base: String,
    tenant: String,
    client_id: String,
    client_secret: String,
    token_life: Duration,
    store: Mutex<Store>,
    /// A certificate registered with the application: its public key (PEM) and SHA-256
    /// thumbprint (`x5t#S256`).
    certificate: Mutex<Option<(String, String)>>,
}

fn err(status: StatusCode, code: &str, inner: Option<&str>, message: &str) -> Response {
    let mut e = json!({"error": {"code": code, "message": message}});
    if let Some(i) = inner {
        e["error"]["innererror"] = json!({ "code": i });
    }
    (status, Json(e)).into_response()
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut b).unwrap();
    hex::encode(b)
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// The checks every vault request passes first: `api-version=7.4`, a live bearer token.
/// `Some`: the refusal to send.
fn admit(s: &Shared, headers: &HeaderMap, q: &HashMap<String, String>) -> Option<Response> {
    let mut st = s.store.lock().unwrap();
    if q.get("api-version").map(String::as_str) != Some("7.4") {
        st.bad_version += 1;
        return Some(err(StatusCode::BAD_REQUEST, "BadParameter", None, "api-version 7.4 is required"));
    }
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    match st.tokens.get(token) {
        Some(exp) if Instant::now() < *exp => None,
        _ => {
            st.refused += 1;
            Some(err(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                None,
                "AKV10000: Request is missing a Bearer or PoP token.",
            ))
        }
    }
}

fn folded(name: &str) -> String {
    name.to_ascii_lowercase()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 127 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn bundle(s: &Shared, name: &str, v: &(String, String, u64)) -> Value {
    json!({
        "value": v.1,
        "id": format!("{}/secrets/{name}/{}", s.base, v.0),
        "attributes": {"enabled": true, "created": v.2, "updated": v.2, "recoveryLevel": "Recoverable+Purgeable"},
    })
}

async fn token(
    State(s): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let field = |k: &str| f.get(k).map(String::as_str).unwrap_or_default();
    if tenant != s.tenant {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_request", "error_description": "AADSTS90002: Tenant not found."})),
        )
            .into_response();
    }
    let proof_ok = if f.contains_key("client_assertion") {
        field("client_assertion_type") == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            && assertion_ok(&s, field("client_assertion"), &tenant)
    } else {
        field("client_secret") == s.client_secret
    };
    if field("grant_type") != "client_credentials"
        || field("scope") != "https://vault.azure.net/.default"
        || field("client_id") != s.client_id
        || !proof_ok
    {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."}))).into_response();
    }
    let t = random_hex(24);
    let mut st = s.store.lock().unwrap();
    st.tokens.insert(t.clone(), Instant::now() + s.token_life);
    st.tokens_issued += 1;
    Json(json!({"token_type": "Bearer", "expires_in": s.token_life.as_secs(), "ext_expires_in": s.token_life.as_secs(), "access_token": t}))
        .into_response()
}

/// A client assertion as Entra ID checks it: RS256, signed by the registered
/// certificate's key (named by `x5t#S256`), for this token endpoint, from the client.
fn assertion_ok(s: &Shared, jwt: &str, tenant: &str) -> bool {
    let Some((public_pem, thumbprint)) = s.certificate.lock().unwrap().clone() else { return false };
    let Ok(header) = jsonwebtoken::decode_header(jwt) else { return false };
    if header.alg != jsonwebtoken::Algorithm::RS256 || header.x5t_s256.as_deref() != Some(thumbprint.as_str()) {
        return false;
    }
    let Ok(key) = jsonwebtoken::DecodingKey::from_rsa_pem(public_pem.as_bytes()) else { return false };
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&[format!("{}/{tenant}/oauth2/v2.0/token", s.base)]);
    v.set_issuer(&[s.client_id.as_str()]);
    v.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
    jsonwebtoken::decode::<Value>(jwt, &key, &v).is_ok_and(|d| d.claims["sub"] == s.client_id.as_str())
}

async fn list(State(s): State<Arc<Shared>>, headers: HeaderMap, Query(q): Query<HashMap<String, String>>) -> Response {
    if let Some(r) = admit(&s, &headers, &q) {
        return r;
    }
    let skip: usize = q.get("$skiptoken").and_then(|t| t.parse().ok()).unwrap_or(0);
    let mut st = s.store.lock().unwrap();
    st.pages_served += 1;
    let names: Vec<&String> = st.secrets.keys().map(|k| st.shown.get(k).unwrap_or(k)).collect();
    let page: Vec<Value> = names
        .iter()
        .skip(skip)
        .take(2)
        .map(|n| json!({"id": format!("{}/secrets/{n}", s.base), "attributes": {"enabled": true}}))
        .collect();
    let next = (skip + 2 < names.len())
        .then(|| format!("{}/secrets?api-version=7.4&$skiptoken={}&maxresults=25", s.base, skip + 2));
    Json(json!({"value": page, "nextLink": next})).into_response()
}

async fn get_secret(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(params): Path<Vec<String>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = admit(&s, &headers, &q) {
        return r;
    }
    let mut st = s.store.lock().unwrap();
    st.secret_reads += 1;
    let name = st.shown.get(&folded(&params[0])).unwrap_or(&params[0]);
    let found = st.secrets.get(&folded(name)).and_then(|versions| match params.get(1) {
        Some(id) => versions.iter().find(|v| &v.0 == id),
        None => versions.last(),
    });
    match found {
        Some(v) => Json(bundle(&s, name, v)).into_response(),
        None => err(
            StatusCode::NOT_FOUND,
            "SecretNotFound",
            None,
            &format!("A secret with (name/id) {name} was not found in this key vault."),
        ),
    }
}

async fn put_secret(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    Json(body): Json<Value>,
) -> Response {
    if let Some(r) = admit(&s, &headers, &q) {
        return r;
    }
    if !valid_name(&name) {
        return err(StatusCode::BAD_REQUEST, "BadParameter", None, "The request URI contains an invalid name");
    }
    let Some(value) = body["value"].as_str() else {
        return err(StatusCode::BAD_REQUEST, "BadParameter", None, "Property value is required");
    };
    let mut st = s.store.lock().unwrap();
    if st.deleted.contains_key(&folded(&name)) {
        return err(
            StatusCode::CONFLICT,
            "Conflict",
            Some("ObjectIsDeletedButRecoverable"),
            &format!(
                "Secret {name} is currently in a deleted but recoverable state, and its name cannot be reused; in this state, the secret can only be recovered or purged."
            ),
        );
    }
    let v = (random_hex(16), value.to_owned(), now_secs());
    let name = st.shown.entry(folded(&name)).or_insert(name).clone();
    let out = bundle(&s, &name, &v);
    st.secrets.entry(folded(&name)).or_default().push(v);
    Json(out).into_response()
}

async fn delete_secret(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = admit(&s, &headers, &q) {
        return r;
    }
    move_secret(&s, &name, true)
}

async fn recover(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = admit(&s, &headers, &q) {
        return r;
    }
    move_secret(&s, &name, false)
}

/// Soft delete (`to_deleted`) or recover: a secret's versions move between the live and
/// the deleted store.
fn move_secret(s: &Shared, name: &str, to_deleted: bool) -> Response {
    let mut guard = s.store.lock().unwrap();
    let st = &mut *guard;
    let (from, to) = if to_deleted { (&mut st.secrets, &mut st.deleted) } else { (&mut st.deleted, &mut st.secrets) };
    let Some(versions) = from.remove(&folded(name)) else {
        return err(StatusCode::NOT_FOUND, "SecretNotFound", None, "not found");
    };
    to.insert(folded(name), versions);
    let name = st.shown.get(&folded(name)).map_or(name, String::as_str);
    let reply = if to_deleted {
        json!({"recoveryId": format!("{}/deletedsecrets/{name}", s.base)})
    } else {
        json!({"id": format!("{}/secrets/{name}", s.base)})
    };
    Json(reply).into_response()
}

/// Counters of what the fake saw.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub tokens_issued: u64,
    pub refused: u64,
    pub bad_version: u64,
    pub pages_served: u64,
    pub secret_reads: u64,
}

impl FakeAzure {
    /// Start on a free port; tokens live `token_life`.
    pub async fn start(token_life: Duration) -> FakeAzure {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let shared = Arc::new(Shared {
            base: url.clone(),
            tenant: "0a1b2c3d-tenant".into(),
            client_id: "keyvault-app".into(),
            client_secret: format!("client-secret-{}", random_hex(8)),
            token_life,
            store: Mutex::new(Store::default()),
            certificate: Mutex::new(None),
        });
        let app = Router::new()
            .route("/{tenant}/oauth2/v2.0/token", post(token))
            .route("/secrets", get(list))
            .route("/secrets/{name}", get(get_secret).put(put_secret).delete(delete_secret))
            .route("/secrets/{name}/{version}", get(get_secret))
            .route("/deletedsecrets/{name}/recover", post(recover))
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeAzure {
            url,
            tenant: shared.tenant.clone(),
            client_id: shared.client_id.clone(),
            client_secret: shared.client_secret.clone(),
            state: shared,
            _server: server,
        }
    }

    pub fn seen(&self) -> Seen {
        let st = self.state.store.lock().unwrap();
        Seen {
            tokens_issued: st.tokens_issued,
            refused: st.refused,
            bad_version: st.bad_version,
            pages_served: st.pages_served,
            secret_reads: st.secret_reads,
        }
    }

    /// Register a certificate with the application (as its public key PEM and SHA-256
    /// thumbprint): client assertions signed by its key are accepted.
    pub fn register_certificate(&self, public_key_pem: &str, x5t_s256: &str) {
        *self.state.certificate.lock().unwrap() = Some((public_key_pem.to_owned(), x5t_s256.to_owned()));
    }

    /// A secret as another tool would have put it there (names are case-insensitive; a
    /// secret keeps the case it was first made with).
    pub fn put(&self, name: &str, value: &str) {
        let mut st = self.state.store.lock().unwrap();
        st.shown.entry(folded(name)).or_insert_with(|| name.to_owned());
        st.secrets.entry(folded(name)).or_default().push((random_hex(16), value.into(), now_secs()));
    }
}
