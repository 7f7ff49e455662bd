//! The fuzz targets' inputs in the normal suite: every seed (`fuzz/seeds/<target>/`) and
//! every input that once crashed a target (`fuzz/regressions/<target>/`) runs through the
//! same entry point as the fuzzer (`keyvault::fuzzing`), which asserts what its parser
//! promises. `fuzz/run.sh` runs the fuzzers themselves (not in CI).
//!
//! The seeds are made by `write_seeds` below (`cargo test -p keyvault-tests --test
//! fuzz_regressions -- --ignored write_seeds`) from real records, tokens and requests.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyvault::fuzzing::{self, Fixture, PRODUCER, PRODUCER_CERT, TARGETS};
use serde_json::json;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = fuzz_dir().join(kind).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut out: Vec<_> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_seed_and_every_past_crash_passes_its_target() {
    let mut seeds = 0;
    for target in TARGETS {
        let s = inputs("seeds", target);
        assert!(!s.is_empty(), "no seeds for {target}: run write_seeds");
        seeds += s.len();
        for (path, data) in s.into_iter().chain(inputs("regressions", target)) {
            let outcome = std::panic::catch_unwind(|| fuzzing::run(target, &data));
            assert!(outcome.is_ok(), "{target} fails on {}", path.display());
        }
    }
    assert!(seeds >= 3 * TARGETS.len());
}

/// The targets' checks can fail: each is given an input it must refuse.
#[test]
fn the_targets_catch_what_they_check() {
    let f = Fixture::get();
    // The sealed record opens; one changed byte does not (checked inside the target).
    assert!(fuzzing::barrier_record(&f.sealed));
    let mut damaged = f.sealed.clone();
    *damaged.last_mut().unwrap() ^= 1;
    assert!(!fuzzing::barrier_record(&damaged));
    // A token the fixture signs verifies (mode 1 with good claims).
    let now = keyvault::unix_now();
    let claims = json!({"iss": "keyvault", "sub": "s", "iat": now, "nbf": now, "exp": now + 60,
        "jti": "j", "acc": "a", "pol": ["default"], "meth": "token"});
    let mut input = vec![1u8];
    input.extend_from_slice(claims.to_string().as_bytes());
    assert!(fuzzing::token(&input));
    input[0] = 0;
    assert!(!fuzzing::token(&input), "claims are not a token");
    // A signed gateway item passes once, then is a replay (both checked by the target).
    let item = gateway_item("nonce-checks-0001");
    let mut input = vec![1u8];
    input.extend_from_slice(item.to_string().as_bytes());
    assert_eq!(fuzzing::gateway_request(&input), 1, "the signed item did not pass");
    input[0] = 0;
    assert_eq!(fuzzing::gateway_request(&input), 0);
    // The pipeline answers: a root write is 200, the same with a forged token 401.
    assert_eq!(fuzzing::pipeline(b"\x02\x00secret/fuzz/x\n{\"value\":\"v\"}"), 200);
    assert_eq!(fuzzing::pipeline(b"\x00\x00secret/fuzz/x"), 200);
    assert_eq!(fuzzing::pipeline(b"\x02\x02secret/fuzz/x\n{\"value\":\"v\"}"), 401);
}

fn gateway_item(nonce: &str) -> serde_json::Value {
    let body = json!({"tenant_id": "tenant-1", "operator_id": "op-1", "campaign_id": "c-1",
        "signed_metadata": {"tenant_id": "tenant-1", "operator_id": "op-1", "campaign_id": "c-1"}});
    json!({"identity": PRODUCER, "cert_sha256": PRODUCER_CERT, "timestamp": "1700000000",
        "nonce": nonce, "signature": STANDARD.encode([0u8; 64]), "body": STANDARD.encode(body.to_string())})
}

#[test]
#[ignore = "writes fuzz/seeds: run by hand when a target changes"]
fn write_seeds() {
    let f = Fixture::get();
    let root = fuzz_dir().join("seeds");
    let put = |target: &str, name: &str, data: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    };
    let with_mode = |mode: u8, data: &[u8]| {
        let mut v = vec![mode];
        v.extend_from_slice(data);
        v
    };

    put("barrier_record", "sealed", &f.sealed);
    put("barrier_record", "header-only", &f.sealed[..10]);
    put("barrier_record", "truncated", &f.sealed[..f.sealed.len() - 17]);

    put("wrapped_key", "roundtrip", &with_mode(1, &[5u8; 48]));
    put("wrapped_key", "foreign", &with_mode(8, &[0x45; 61 + 4]));
    put("wrapped_key", "short", &with_mode(0, &[0x45, 1, 2, 3]));

    for (i, s) in
        ["vault:v1:aGVsbG8gd29ybGQ=", "vault:v12:AAAA", "vault:v0:AA==", "aGVsbG8=", "my-key_1.2"].iter().enumerate()
    {
        put("transit_strings", &format!("s{i}"), s.as_bytes());
    }

    let now = keyvault::unix_now();
    let claims = json!({"iss": "keyvault", "sub": "approle:web", "iat": now, "nbf": now, "exp": now + 600,
        "jti": "0f5d", "acc": "9a1c", "pol": ["default", "web"], "meth": "approle", "role": "web",
        "max_exp": now + 3600, "nren": false});
    let token = f.sign_token(&f.token_header(), claims.to_string().as_bytes());
    put("token", "string", &with_mode(0, token.as_bytes()));
    put("token", "claims", &with_mode(1, claims.to_string().as_bytes()));
    put("token", "header", &with_mode(2, &f.token_header()));
    let hs256 = String::from_utf8(f.token_header()).unwrap().replace("EdDSA", "HS256");
    put("token", "header-hs256", &with_mode(2, hs256.as_bytes()));

    put("gateway_request", "single-signed", &with_mode(1, gateway_item("seed-nonce-00001").to_string().as_bytes()));
    put("gateway_request", "single-unsigned", &with_mode(0, gateway_item("seed-nonce-00002").to_string().as_bytes()));
    let batch =
        json!({"batch": [gateway_item("seed-nonce-00003"), gateway_item("seed-nonce-00004"), {"identity": "x"}]});
    put("gateway_request", "batch-signed", &with_mode(1, batch.to_string().as_bytes()));

    put(
        "policy",
        "hcl",
        br#"path "secret/app/*" { capabilities = ["read", "list"] }
path "transit/encrypt/web" { capabilities = ["update"] }
path "sys/policies/grant/+" { capabilities = ["sudo"] }
"#,
    );
    put("policy", "json", br#"{"path": {"secret/+/x": {"capabilities": ["create", "update", "deny"]}}}"#);
    put("policy", "glob", br#"path "*" { capabilities = ["read"] } path "" { capabilities = [] }"#);

    let example = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/keyvault.example.toml")).unwrap();
    put("config", "example", &example);
    put(
        "config",
        "minimal",
        br#"[listener]
address = "127.0.0.1:0"
tls_cert_file = "c.pem"
tls_key_file = "k.pem"
[storage]
type = "sled"
path = "/tmp/x"
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "t"
pin_file = "/tmp/pin"
[audit]
path = "/tmp/audit.log"
"#,
    );
    put("config", "bad-duration", b"[tokens]\ndefault_ttl = \"-5m\"\n");

    let lines = [
        json!({"type": "request", "request_id": "r1", "path": "secret/a", "status": 200, "time": "2026-11-28T00:00:00Z"}),
        json!({"type": "intent", "request_id": "r2", "path": "transit/encrypt/k"}),
        json!({"type": "gap", "missing": 3, "n": 1.5e300, "s": "\u{e9}\u{1F600}\\\"", "nested": {"b": [1, {"a": null}]}}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    put("audit_log", "chain", &with_mode(1, text.as_bytes()));
    put("audit_log", "raw", &with_mode(0, text.as_bytes()));
    put(
        "audit_log",
        "raw-live",
        &with_mode(2, b"{\"type\":\"header\",\"genesis\":\"00\",\"prev\":\"00\",\"hash\":\"00\"}\n"),
    );
    let requests: [(&str, u8, u8, &str); 12] = [
        ("put-secret", 2, 0, "secret/app/db\n{\"value\": \"s3cret\", \"ttl\": \"1h\"}"),
        ("get-secret", 0, 0, "secret/app/db"),
        ("list-secrets", 4, 0, "secret/app/"),
        ("kv2-write", 1, 0, "kv/data/app/config\n{\"options\": {\"cas\": 0}, \"data\": {\"user\": \"u\"}}"),
        ("transit-create", 1, 0, "transit/keys/k1\n{\"type\": \"ed25519\"}"),
        (
            "transit-encrypt",
            1,
            0,
            "transit/encrypt/k\n{\"batch_input\": [{\"plaintext\": \"aGk=\"}, {\"plaintext\": \"!\"}]}",
        ),
        (
            "policy",
            2,
            0,
            r#"sys/policies/acl/p
{"policy": "path \"secret/*\" { capabilities = [\"read\"] }"}"#,
        ),
        ("approle-role", 1, 0, "auth/approle/role/web\n{\"token_policies\": [\"p\"], \"token_ttl\": \"10m\"}"),
        ("approle-login", 1, 1, "auth/approle/login\n{\"role_id\": \"x\", \"secret_id\": \"y\"}"),
        ("gateway-verify", 1, 0, "gateway/verify\n{\"batch\": [{\"identity\": \"a\", \"nonce\": \"n\"}]}"),
        ("token-create", 1, 0, "auth/token/create\n{\"policies\": [\"default\"], \"ttl\": \"5m\"}"),
        ("dotdot", 0, 0, "secret/../sys/policies/acl/root"),
    ];
    for (name, method, token, rest) in requests {
        let mut v = vec![method, token];
        v.extend_from_slice(rest.as_bytes());
        put("pipeline", name, &v);
    }
}
