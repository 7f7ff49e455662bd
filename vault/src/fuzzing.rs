//! Entry points of the fuzz targets (`fuzz/`, run by `fuzz/run.sh`) and of their regression
//! tests (`tests/tests/fuzz_regressions.rs`): one function per parser that sees untrusted
//! bytes. Each must never panic, and each checks what its parser promises, so that a
//! wrong answer is a crash too: a record or a wrapped key that opens without having been
//! sealed, a token that verifies without a signature by the token's key, a gateway item
//! that passes without the producer's signature or twice with one nonce, an audit chain
//! built correctly that does not verify, a parse that does not round-trip.
//!
//! The stateful targets (records, wrapped keys, tokens, the gateway) run against a real
//! SoftHSM token and a sled store made once per process ([`Fixture`]).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::{Signer as _, SigningKey};
use keyvault_hsm::KeyStore;
use serde_json::{Map, Value};

use crate::auth::revocation::Revocations;
use crate::barrier::{Barrier, Record, RecordContext};
use crate::epoch::EpochKey;
use crate::gateway::{Gateway, Producer, ProducerKey, Timestamp, VerifyItem};
use crate::keys::{KeyNames, SharedKeyring};
use crate::store::{SledStore, Store};
use crate::token::TokenIssuer;
use crate::transit::Transit;

/// The fuzz targets, by name (the file names under `fuzz/fuzz_targets/`).
pub const TARGETS: &[&str] = &[
    "barrier_record",
    "wrapped_key",
    "transit_strings",
    "token",
    "gateway_request",
    "policy",
    "config",
    "audit_log",
    "pipeline",
];

/// Run `target` on `data` (the regression tests' dispatcher).
pub fn run(target: &str, data: &[u8]) {
    match target {
        "barrier_record" => {
            barrier_record(data);
        }
        "wrapped_key" => wrapped_key(data),
        "transit_strings" => transit_strings(data),
        "token" => {
            token(data);
        }
        "gateway_request" => {
            gateway_request(data);
        }
        "policy" => policy(data),
        "config" => config(data),
        "audit_log" => audit_log(data),
        "pipeline" => {
            pipeline(data);
        }
        other => panic!("no fuzz target {other}"),
    }
}

/// What the stateful targets share: a SoftHSM token with the keyring made in it, a sled
/// store on tmpfs, a barrier, a token issuer, the gateway with one registered producer.
pub struct Fixture {
    rt: tokio::runtime::Runtime,
    keys: Arc<dyn KeyStore>,
    names: KeyNames,
    keyring: SharedKeyring,
    barrier: Barrier,
    issuer: TokenIssuer,
    gateway: Gateway,
    transit: Transit,
    revocations: Revocations,
    /// A record sealed at start, at [`SEALED_PATH`] version 1.
    pub sealed: Vec<u8>,
    producer_key: SigningKey,
    _dir: tempfile::TempDir,
    _token: keyvault_hsm::softhsm::testing::TestToken,
}

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fixture(..)")
    }
}

pub const SEALED_PATH: &str = "fuzz/sealed";
pub const PRODUCER: &str = "producer-1";
pub const PRODUCER_CERT: &str = "aa11bb22cc33dd44ee55ff6600778899aa11bb22cc33dd44ee55ff6600778899";
const EPOCH_TEST_KEY: [u8; 32] = [7u8; 32];

impl Fixture {
    pub fn get() -> &'static Fixture {
        static F: OnceLock<Fixture> = OnceLock::new();
        F.get_or_init(Fixture::new)
    }

    fn new() -> Fixture {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let token = keyvault_hsm::softhsm::testing::token();
        let keys: Arc<dyn KeyStore> = token.store.clone();
        let dir = scratch_dir("keyvault-fuzz-");
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).expect("sled"));
        let names = KeyNames::new("keyvault").expect("names");
        let (keyring, barrier, issuer, sealed) = rt.block_on(async {
            let ring = crate::keys::initialize(store.as_ref(), &keys, &names).await.expect("keyring");
            let keyring = SharedKeyring::new(ring, store.clone());
            let barrier = Barrier::new(keys.clone(), names.clone(), keyring.clone());
            let issuer = TokenIssuer::new(keys.clone(), names.clone(), keyring.clone(), "keyvault".into())
                .await
                .expect("issuer");
            let sealed = barrier.seal(&record_context(), b"fuzz value").await.expect("seal");
            (keyring, barrier, issuer, sealed)
        });
        let producer_key = SigningKey::from_bytes(&[42u8; 32]);
        let gateway = Gateway::new(store.clone());
        let producer = Producer {
            cert_sha256: vec![PRODUCER_CERT.into()],
            keys: vec![ProducerKey {
                key_id: "k1".into(),
                public_key: STANDARD.encode(producer_key.verifying_key().as_bytes()),
                not_after: None,
            }],
            transit_key: None,
            operator_tenants: BTreeMap::from([("op-1".to_owned(), "tenant-1".to_owned())]),
            clock_skew_seconds: 30,
            nonce_ttl_seconds: 120,
            disabled: false,
            signing_input: None,
        };
        rt.block_on(gateway.put_producer(PRODUCER, producer, None)).expect("producer");
        let transit = Transit::new(store.clone(), keys.clone(), names.clone());
        let revocations = Revocations::new(store.clone());
        Fixture {
            rt,
            keys,
            names,
            keyring,
            barrier,
            issuer,
            gateway,
            transit,
            revocations,
            sealed,
            producer_key,
            _dir: dir,
            _token: token,
        }
    }

    /// A token string over `header` and `claims` (raw JSON), signed by the token's active
    /// signing key, as the server signs its own.
    pub fn sign_token(&self, header: &[u8], claims: &[u8]) -> String {
        let mut token = URL_SAFE_NO_PAD.encode(header);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(claims, &mut token);
        let label = self.names.token_signing(self.keyring.load().token_signing.active);
        let sig = self.keys.sign_ed25519(&label, token.as_bytes()).expect("sign");
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(sig, &mut token);
        token
    }

    /// The header the server puts on its tokens (`kid` names the active signing key).
    pub fn token_header(&self) -> Vec<u8> {
        let kid = self.keyring.load().token_signing.active.to_string();
        serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": kid}).to_string().into_bytes()
    }

    /// `item` signed by the registered producer with its current time.
    pub fn sign_item(&self, mut item: VerifyItem) -> VerifyItem {
        let ts = crate::unix_now().to_string();
        item.timestamp = Some(Timestamp::Text(ts.clone()));
        let body = item.body.as_deref().and_then(|b| STANDARD.decode(b).ok()).unwrap_or_default();
        let nonce = item.nonce.clone().unwrap_or_default();
        let sig = self.producer_key.sign(&crate::gateway::signing_input(&ts, &nonce, &body));
        item.signature = Some(STANDARD.encode(sig.to_bytes()));
        item
    }
}

/// A temporary directory on tmpfs where there is one (fsyncs cost nothing there).
fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" };
    tempfile::Builder::new().prefix(prefix).tempdir_in(base).expect("temp dir")
}

fn record_context() -> RecordContext<'static> {
    RecordContext { purpose: "kv", path: SEALED_PATH, version: 1 }
}

/// Stored record decoding: `Record::parse` round-trips byte for byte, and the barrier opens
/// nothing but the record it sealed (a damaged or forged record is an integrity error).
pub fn barrier_record(data: &[u8]) -> bool {
    if let Ok(r) = Record::parse(data) {
        assert_eq!(r.encode(), data, "a parsed record encodes to other bytes");
    }
    let f = Fixture::get();
    let opened = f.rt.block_on(f.barrier.open(&record_context(), data));
    if data != f.sealed.as_slice() {
        assert!(opened.is_err(), "a record that was never sealed opened");
        false
    } else {
        assert_eq!(opened.expect("the sealed record opens").as_slice(), b"fuzz value");
        true
    }
}

/// The wrapped data key format: an epoch key unwraps only what it wrapped, for the same
/// context; a wrap round-trips. The first byte picks the mode.
pub fn wrapped_key(data: &[u8]) {
    let key = EpochKey::new(&EPOCH_TEST_KEY).expect("epoch key");
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        // Untrusted wrapped bytes under some context: never opens.
        let (aad, wrapped) = rest.split_at(rest.len().min(usize::from(mode / 2) % 64));
        assert!(key.unwrap(wrapped, aad).is_err(), "a wrapped key that was never wrapped unwrapped");
    } else if rest.len() >= 32 {
        let (dek, aad) = rest.split_at(32);
        let dek: [u8; 32] = dek.try_into().expect("32 bytes");
        let wrapped = key.wrap(&dek, aad).expect("wrap");
        assert!(crate::epoch::is_epoch_wrapped(&wrapped));
        assert_eq!(key.unwrap(&wrapped, aad).expect("unwrap").as_slice(), &dek);
        let mut other = aad.to_vec();
        other.push(0);
        assert!(key.unwrap(&wrapped, &other).is_err(), "unwrapped under another context");
    }
}

/// Transit's `vault:v<N>:<base64>` ciphertext and signature strings, and base64 fields.
pub fn transit_strings(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    if let Ok((v, bytes)) = crate::transit::parse_versioned(&s) {
        assert!(v > 0);
        let again = crate::transit::format_versioned(v, &bytes);
        assert_eq!(crate::transit::parse_versioned(&again).expect("re-parse"), (v, bytes));
    }
    if let Ok(b) = crate::transit::b64_field("input", &s) {
        assert_eq!(STANDARD.encode(&*b), *s, "base64 decoding accepted a non-canonical form");
    }
    let _ = crate::transit::validate_key_name(&s);
}

/// Token parsing and claim validation. Mode 0: the bytes are a token string. Mode 1: they
/// are the claims, signed by the token's key. Mode 2: they are the header, signed with
/// valid claims. A token verifies only when signed by the token's key, with the EdDSA
/// header, this issuer and an expiry not passed.
pub fn token(data: &[u8]) -> bool {
    let f = Fixture::get();
    // Verified tokens are cached; a cache that grows with every input makes libFuzzer
    // run a leak check after each one (about 100 ms with SoftHSM in the process).
    f.issuer.forget_verified();
    let Some((&mode, rest)) = data.split_first() else { return false };
    let now = crate::unix_now();
    match mode % 3 {
        0 => {
            let s = String::from_utf8_lossy(rest);
            // Only a string the fixture signed verifies (the seeds have one).
            f.issuer.verify(&s).is_ok()
        }
        1 => {
            let token = f.sign_token(&f.token_header(), rest);
            let Ok(c) = f.issuer.verify(&token) else { return false };
            assert_eq!(c.iss, "keyvault");
            assert!(c.exp.saturating_add(120) >= now && c.nbf <= now + 120, "times not checked: {c:?}");
            true
        }
        _ => {
            let claims = serde_json::json!({
                "iss": "keyvault", "sub": "fuzz", "iat": now, "nbf": now, "exp": now + 60,
                "jti": "j", "acc": "a", "pol": ["default"], "meth": "token",
            });
            let token = f.sign_token(rest, claims.to_string().as_bytes());
            if f.issuer.verify(&token).is_err() {
                return false;
            }
            let header: Value = serde_json::from_slice(rest).expect("a header that verified is JSON");
            assert_eq!(header["alg"], "EdDSA", "a token verified with header {header}");
            true
        }
    }
}

/// The gateway's verify request (one item or a batch) and its body. The first byte picks
/// whether the items are signed by the registered producer. An unsigned item never
/// passes; a signed item passes at most once (its nonce is spent).
pub fn gateway_request(data: &[u8]) -> usize {
    let f = Fixture::get();
    let Some((&mode, rest)) = data.split_first() else { return 0 };
    let Ok(v) = crate::json::from_slice_strict::<Value>(rest) else { return 0 };
    let items: Vec<VerifyItem> = if v.get("batch").is_some() {
        match serde_json::from_value::<keyvault_api::gateway::VerifyBatch>(v) {
            Ok(b) if !b.batch.is_empty() => b.batch,
            _ => return 0,
        }
    } else {
        match serde_json::from_value::<VerifyItem>(v) {
            Ok(i) => vec![i],
            Err(_) => return 0,
        }
    };
    let signed = mode % 2 == 1;
    let items: Vec<VerifyItem> = if signed { items.into_iter().map(|i| f.sign_item(i)).collect() } else { items };
    let Ok(verdicts) = f.rt.block_on(f.gateway.verify(&items, &f.transit, &f.revocations)) else { return 0 };
    assert_eq!(verdicts.len(), items.len());
    let mut nonces = std::collections::HashSet::new();
    for (item, v) in items.iter().zip(&verdicts) {
        if v.valid {
            assert!(signed, "an item passed without the producer's signature: {item:?}");
            assert_eq!(item.identity.as_deref(), Some(PRODUCER));
            assert!(nonces.insert(item.nonce.clone()), "one nonce passed twice in a batch");
        }
    }
    let valid = verdicts.iter().filter(|v| v.valid).count();
    if valid > 0 {
        let again = f.rt.block_on(f.gateway.verify(&items, &f.transit, &f.revocations)).expect("replay");
        assert!(again.iter().all(|v| !v.valid), "a replayed item passed");
    }
    valid
}

/// HCL and JSON policy documents; a parsed policy answers for any path.
pub fn policy(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(p) = crate::policy::Policy::parse("fuzz", &text) {
        let acl = crate::policy::Acl::from_policies([&p]);
        assert!(!acl.is_root(), "a parsed policy grants root");
        for path in ["secret/a", "sys/seal", "", "auth/token/create", &text] {
            let _ = acl.capabilities(path);
        }
    }
}

/// The configuration file (TOML), with its validation.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::config::Config::parse(&text);
}

/// The audit log as `keyvault audit verify` reads it. Mode 0: the bytes are a log file.
/// Mode 1: each line that is a JSON object becomes an entry of a correctly built chain
/// (header, entries, a final checkpoint signed by the test key), which must verify with
/// every entry counted.
pub fn audit_log(data: &[u8]) {
    use crate::audit::chain;
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::Builder::new().prefix("keyvault-fuzz-audit-").tempdir().expect("temp dir"));
    let file = dir.path().join(format!("audit-{:?}.log", std::thread::current().id()));
    let key = SigningKey::from_bytes(&[9u8; 32]);
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        std::fs::write(&file, rest).expect("write");
        let _ = crate::audit::verify::verify(std::slice::from_ref(&file), &key.verifying_key(), mode % 4 == 0);
        return;
    }
    let genesis = [1u8; 32];
    let mut header = Map::new();
    header.insert("type".into(), "header".into());
    header.insert("genesis".into(), Value::String(hex::encode(genesis)));
    // Numbered as the writer numbers them: the header is 1, each line one more.
    let (mut out, mut prev) = chain::seal(&header, 1, &genesis);
    let mut entries = 0u64;
    for line in rest.split(|b| *b == b'\n') {
        let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(line) else { continue };
        if matches!(obj.get("type").and_then(Value::as_str), Some("header" | "checkpoint")) {
            obj.remove("type");
        }
        entries += 1;
        let (l, h) = chain::seal(&obj, entries + 1, &prev);
        out.extend_from_slice(&l);
        prev = h;
    }
    let mut cp = Map::new();
    cp.insert("type".into(), "checkpoint".into());
    cp.insert("head".into(), Value::String(hex::encode(prev)));
    cp.insert("final".into(), true.into());
    let sig = key.sign(&chain::checkpoint_message(&prev, entries + 2, true));
    cp.insert("signature".into(), Value::String(STANDARD.encode(sig.to_bytes())));
    let (l, _) = chain::seal(&cp, entries + 2, &prev);
    out.extend_from_slice(&l);
    std::fs::write(&file, &out).expect("write");
    let report = crate::audit::verify::verify(std::slice::from_ref(&file), &key.verifying_key(), false).expect("read");
    match report {
        crate::audit::verify::Report::Ok { entries: n, .. } => assert_eq!(n, entries),
        other => panic!("a correctly built chain of {entries} entries does not verify: {other:?}"),
    }
}

/// A whole server in process (the HTTP router over the service, as `keyvault server`
/// builds it: SoftHSM, sled, the default mounts; audit off for speed) and a root token.
pub struct Pipeline {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    root: String,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pipeline(..)")
    }
}

impl Pipeline {
    pub fn get() -> &'static Pipeline {
        static P: OnceLock<Pipeline> = OnceLock::new();
        P.get_or_init(Pipeline::new)
    }

    fn new() -> Pipeline {
        use secrecy::ExposeSecret;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let token = keyvault_hsm::softhsm::testing::token_config();
        let dir = scratch_dir("keyvault-fuzz-pipeline-");
        let d = dir.path();
        std::fs::write(d.join("pin"), token.pin.expose_secret()).expect("pin");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        std::fs::write(d.join("cert.pem"), cert.pem()).expect("cert");
        std::fs::write(d.join("key.pem"), key.serialize_pem()).expect("key");
        let text = format!(
            "[listener]\naddress = \"127.0.0.1:0\"\ntls_cert_file = \"{d}/cert.pem\"\ntls_key_file = \"{d}/key.pem\"\n\
             [storage]\ntype = \"sled\"\npath = \"{d}/storage\"\n\
             [hsm]\nmodule = \"{}\"\ntoken_label = \"{}\"\npin_file = \"{d}/pin\"\n\
             [audit]\npath = \"{d}/audit.log\"\nmode = \"dangerous_off\"\n",
            token.module.display(),
            token.token_label,
            d = d.display(),
        );
        let config = crate::config::Config::parse(&text).expect("config");
        let (router, root) = rt.block_on(async {
            let service =
                crate::service::Builder::new(&config).init(crate::service::Init::IfNew).build().await.expect("service");
            let root = service.issue_root_token(Duration::from_secs(24 * 3600)).await.expect("root token");
            let state = crate::http::AppState {
                service: Arc::new(service),
                body: crate::http::BodyLimits::from_config(&config.listener),
            };
            (crate::http::router(state), root.token.expose_secret().to_owned())
        });
        Pipeline { rt, router, root, _dir: dir }
    }
}

use std::time::Duration;

/// The whole request pipeline: a method (first byte), a token (second byte: root, none or
/// a forged one), a path and a body (split at the first newline). Whatever arrives, the
/// answer is never a 5xx other than 503 (a panic or an internal error is a crash).
/// Left out, as they would end every later input's coverage: `sys/seal` (every answer
/// 503 after it) and revocations (the root token revoking itself: every answer 403).
pub fn pipeline(data: &[u8]) -> u16 {
    use tower::ServiceExt as _;
    let p = Pipeline::get();
    let [m, t, rest @ ..] = data else { return 0 };
    let method = ["GET", "POST", "PUT", "DELETE", "LIST", "PATCH", "HEAD"][usize::from(*m) % 7];
    let (path, body) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let path = String::from_utf8_lossy(path);
    if path.len() > 512 || path.contains("seal") || path.contains("revoke") {
        return 0;
    }
    let Ok(uri) = axum::http::Uri::try_from(format!("/v1/{path}")) else { return 0 };
    let mut req = axum::http::Request::builder().method(method).uri(uri);
    match t % 3 {
        0 => req = req.header("x-vault-token", p.root.as_str()),
        1 => {}
        _ => req = req.header("x-vault-token", format!("{}x", p.root)),
    }
    if !body.is_empty() {
        req = req.header("content-type", "application/json");
    }
    let Ok(req) = req.body(axum::body::Body::from(body.to_vec())) else { return 0 };
    let status = p.rt.block_on(p.router.clone().oneshot(req)).map(|r| r.status().as_u16()).unwrap_or(0);
    assert!(status < 500 || status == 503, "{method} /v1/{path} answered {status}");
    status
}
