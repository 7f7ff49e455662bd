//! Key operations for gateways, end to end: transit keys in the HSM and the gateway
//! signature check. Producers sign with `ed25519-dalek` here, independently of KeyVault.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer, SigningKey, Verifier};
use keyvault_tests::pki::TestCa;
use keyvault_tests::server::{ServerOptions, TestServer};
use keyvault_tests::{Client, Reply, json};

#[track_caller]
fn ok(r: Reply, status: u16) -> Reply {
    assert_eq!(r.status, status, "{r:?}");
    r
}

fn b64(b: &[u8]) -> String {
    STANDARD.encode(b)
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

async fn token_with(c: &Client, root: &str, name: &str, policy: &str) -> String {
    ok(c.put(&format!("sys/policies/acl/{name}"), root, json!({ "policy": policy })).await, 204);
    ok(c.post(&format!("auth/approle/role/{name}"), Some(root), json!({"token_policies": [name]})).await, 204);
    let sid =
        c.post(&format!("auth/approle/role/{name}/secret-id"), Some(root), json!({})).await.body["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_owned();
    ok(c.post("auth", None, json!({"role": name, "secret_id": sid})).await, 200).body["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn transit_encryption_round_trips_rotation_and_policies() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    let r = ok(c.post("transit/keys/orders", Some(&root), json!({"type": "aes256-gcm96"})).await, 200);
    assert_eq!(r.body["data"]["latest_version"], 1);
    assert_eq!(r.body["data"]["supports_encryption"], true);
    let pt = b"card 4111 1111 1111 1111";
    let enc = |body: serde_json::Value| {
        let (c, root) = (c.clone(), root.clone());
        async move { c.post("transit/encrypt/orders", Some(&root), body).await }
    };
    let dec = |body: serde_json::Value| {
        let (c, root) = (c.clone(), root.clone());
        async move { c.post("transit/decrypt/orders", Some(&root), body).await }
    };
    let ct1 = ok(enc(json!({"plaintext": b64(pt)})).await, 200).body["data"]["ciphertext"].as_str().unwrap().to_owned();
    assert!(ct1.starts_with("vault:v1:"));
    assert_eq!(ok(dec(json!({"ciphertext": ct1})).await, 200).body["data"]["plaintext"], b64(pt));
    // Associated data is bound.
    let ct_ad = ok(enc(json!({"plaintext": b64(pt), "associated_data": b64(b"order-17")})).await, 200).body["data"]["ciphertext"]
        .as_str()
        .unwrap()
        .to_owned();
    ok(dec(json!({"ciphertext": ct_ad, "associated_data": b64(b"order-17")})).await, 200);
    ok(dec(json!({"ciphertext": ct_ad, "associated_data": b64(b"order-18")})).await, 400);
    ok(dec(json!({"ciphertext": ct_ad})).await, 400);
    // Tampering: a flipped bit, a truncated ciphertext, a wrong version, garbage.
    let (_, raw) = ct1.split_at("vault:v1:".len());
    let mut bytes = STANDARD.decode(raw).unwrap();
    bytes[14] ^= 1;
    for bad in [
        format!("vault:v1:{}", b64(&bytes)),
        format!("vault:v1:{}", b64(&bytes[..10])),
        "vault:v9:AAAA".into(),
        "nope".into(),
        "vault:v1:***".into(),
    ] {
        ok(dec(json!({"ciphertext": bad})).await, 400);
    }

    // Rotation: new encryptions use v2, old ciphertexts still decrypt, rewrap moves them.
    ok(c.post("transit/keys/orders/rotate", Some(&root), json!({})).await, 200);
    let ct2 = ok(enc(json!({"plaintext": b64(pt)})).await, 200).body["data"]["ciphertext"].as_str().unwrap().to_owned();
    assert!(ct2.starts_with("vault:v2:"));
    assert_eq!(ok(dec(json!({"ciphertext": ct1})).await, 200).body["data"]["plaintext"], b64(pt));
    let rewrapped = ok(c.post("transit/rewrap/orders", Some(&root), json!({"ciphertext": ct1})).await, 200);
    let ct1b = rewrapped.body["data"]["ciphertext"].as_str().unwrap().to_owned();
    assert!(ct1b.starts_with("vault:v2:"));
    assert!(rewrapped.body["data"].get("plaintext").is_none(), "rewrap never returns plaintext");
    assert_eq!(ok(dec(json!({"ciphertext": ct1b})).await, 200).body["data"]["plaintext"], b64(pt));
    // key_version picks the version to encrypt or rewrap with (0: the latest); one that
    // does not exist is refused, as is key_version on a decryption (before, the field
    // was ignored with a warning and the latest version used).
    let r = ok(enc(json!({"plaintext": b64(pt), "key_version": 1})).await, 200);
    assert!(r.body["data"]["ciphertext"].as_str().unwrap().starts_with("vault:v1:"), "{r:?}");
    assert_eq!(r.body["data"]["key_version"], 1);
    assert!(r.body.get("warnings").is_none(), "{r:?}");
    let r = ok(enc(json!({"plaintext": b64(pt), "key_version": 0})).await, 200);
    assert!(r.body["data"]["ciphertext"].as_str().unwrap().starts_with("vault:v2:"), "{r:?}");
    let r = ok(c.post("transit/rewrap/orders", Some(&root), json!({"ciphertext": ct2, "key_version": 1})).await, 200);
    assert!(r.body["data"]["ciphertext"].as_str().unwrap().starts_with("vault:v1:"), "{r:?}");
    ok(enc(json!({"plaintext": b64(pt), "key_version": 3})).await, 400);
    for malformed in [json!("1"), json!(-1), json!(1.5), json!(4294967296u64)] {
        ok(enc(json!({"plaintext": b64(pt), "key_version": malformed})).await, 400);
    }
    ok(dec(json!({"ciphertext": ct1, "key_version": 1})).await, 400);
    let r = ok(enc(json!({"key_version": 1, "batch_input": [{"plaintext": b64(pt)}, {"plaintext": b64(pt), "key_version": 2}]})).await, 200);
    let items = &r.body["data"]["batch_results"];
    assert!(items[0]["ciphertext"].as_str().unwrap().starts_with("vault:v1:"), "{r:?}");
    assert!(items[1]["ciphertext"].as_str().unwrap().starts_with("vault:v2:"), "{r:?}");
    // min_decryption_version.
    ok(c.post("transit/keys/orders/config", Some(&root), json!({"min_decryption_version": 2})).await, 200);
    let r = ok(dec(json!({"ciphertext": ct1})).await, 400);
    assert!(r.body["errors"][0].as_str().unwrap().contains("min_decryption_version"));
    ok(dec(json!({"ciphertext": ct1b})).await, 200);
    ok(c.post("transit/keys/orders/config", Some(&root), json!({"min_decryption_version": 5})).await, 400);
    let r = ok(enc(json!({"plaintext": b64(pt), "key_version": 1})).await, 400);
    assert!(r.body["errors"][0].as_str().unwrap().contains("below min_decryption_version"), "{r:?}");
    let r = ok(c.get("transit/keys/orders", &root).await, 200);
    assert_eq!(r.body["data"]["keys"].as_object().unwrap().len(), 2);
    assert_eq!(r.body["data"]["min_decryption_version"], 2);

    // Batches: one result per item, a failing item does not fail the others.
    let r = ok(
        enc(json!({"batch_input": [{"plaintext": b64(b"a")}, {"plaintext": "not base64!"}, {"plaintext": b64(b"c"), "reference": "r3"}]})).await,
        200,
    );
    let results = r.body["data"]["batch_results"].as_array().unwrap().clone();
    assert!(results[0]["ciphertext"].is_string());
    assert!(results[1]["error"].as_str().unwrap().contains("base64"));
    assert_eq!(results[2]["reference"], "r3");
    let r = ok(
        dec(json!({"batch_input": [{"ciphertext": results[0]["ciphertext"]}, {"ciphertext": ct1}, {"ciphertext": results[2]["ciphertext"]}]})).await,
        200,
    );
    let d = r.body["data"]["batch_results"].as_array().unwrap().clone();
    assert_eq!(d[0]["plaintext"], b64(b"a"));
    assert!(d[1]["error"].as_str().unwrap().contains("below min_decryption_version"), "{d:?}");
    assert_eq!(d[2]["plaintext"], b64(b"c"));
    let r = ok(
        c.post(
            "transit/rewrap/orders",
            Some(&root),
            json!({"batch_input": [{"ciphertext": ct2}, {"ciphertext": "x"}]}),
        )
        .await,
        200,
    );
    assert!(r.body["data"]["batch_results"][0]["ciphertext"].as_str().unwrap().starts_with("vault:v2:"));
    ok(enc(json!({"plaintext": b64(b"a"), "batch_input": []})).await, 400);
    // A large batch runs its items side by side: results still come back in item order
    // (each decrypts to its own plaintext, references and errors where they were given).
    let items: Vec<_> = (0..300)
        .map(|i| {
            if i % 97 == 0 {
                json!({"plaintext": "%%"})
            } else {
                json!({"plaintext": b64(format!("item {i}").as_bytes()), "reference": format!("r{i}")})
            }
        })
        .collect();
    let r = ok(enc(json!({"batch_input": items})).await, 200);
    let cts = r.body["data"]["batch_results"].as_array().unwrap().clone();
    assert_eq!(cts.len(), 300);
    let back: Vec<_> = cts.iter().map(|x| json!({"ciphertext": x["ciphertext"].as_str().unwrap_or("x")})).collect();
    let d = ok(dec(json!({"batch_input": back})).await, 200).body["data"]["batch_results"].as_array().unwrap().clone();
    for i in 0..300 {
        if i % 97 == 0 {
            assert!(cts[i]["error"].is_string() && d[i]["error"].is_string(), "item {i}");
        } else {
            assert_eq!(cts[i]["reference"], format!("r{i}"));
            assert_eq!(d[i]["plaintext"], b64(format!("item {i}").as_bytes()), "item {i}");
        }
    }

    // Data keys (client-side envelope encryption).
    let r = ok(c.post("transit/datakey/plaintext/orders", Some(&root), json!({})).await, 200);
    let dk = r.body["data"]["plaintext"].as_str().unwrap().to_owned();
    assert_eq!(STANDARD.decode(&dk).unwrap().len(), 32);
    assert_eq!(ok(dec(json!({"ciphertext": r.body["data"]["ciphertext"]})).await, 200).body["data"]["plaintext"], dk);
    let r = ok(c.post("transit/datakey/wrapped/orders", Some(&root), json!({})).await, 200);
    assert!(r.body["data"].get("plaintext").is_none());
    ok(c.post("transit/datakey/other/orders", Some(&root), json!({})).await, 404);

    // Policies: each operation needs its capability on the key's path.
    let encrypt_only =
        token_with(&c, &root, "enc-only", r#"path "transit/keys/orders" { capabilities = ["encrypt"] }"#).await;
    ok(c.post("transit/encrypt/orders", Some(&encrypt_only), json!({"plaintext": b64(b"x")})).await, 200);
    ok(c.post("transit/decrypt/orders", Some(&encrypt_only), json!({"ciphertext": ct2})).await, 403);
    ok(c.post("transit/keys/orders/rotate", Some(&encrypt_only), json!({})).await, 403);
    ok(c.get("transit/keys/orders", &encrypt_only).await, 403);
    ok(c.post("transit/encrypt/other", Some(&encrypt_only), json!({"plaintext": b64(b"x")})).await, 403);

    // Deletion only when allowed; then the key and its ciphertexts are gone for good.
    ok(c.send("DELETE", "transit/keys/orders", Some(&root), None).await, 400);
    ok(c.post("transit/keys/orders/config", Some(&root), json!({"deletion_allowed": true})).await, 200);
    ok(c.send("DELETE", "transit/keys/orders", Some(&root), None).await, 204);
    ok(c.get("transit/keys/orders", &root).await, 404);
    // The name stays taken for a few seconds (another replica may still use a copy of
    // the destroyed key in its token session for up to a second), then it is free.
    let r = ok(c.post("transit/keys/orders", Some(&root), json!({})).await, 409);
    assert!(r.body["errors"][0].as_str().unwrap().contains("was deleted less than"), "{r:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let r = c.post("transit/keys/orders", Some(&root), json!({})).await;
        if r.status == 200 {
            break;
        }
        assert!(r.status == 409 && std::time::Instant::now() < deadline, "{r:?}");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    ok(dec(json!({"ciphertext": ct2})).await, 400);
    // Bad requests.
    ok(c.post("transit/keys/bad%20name", Some(&root), json!({})).await, 400);
    ok(c.post("transit/keys/x", Some(&root), json!({"type": "rsa-2048"})).await, 400);
    ok(c.post("transit/keys/orders", Some(&root), json!({"type": "ed25519"})).await, 409);
    // An unknown field is named in the warnings (Vault's convention); a wrong type is refused.
    let r = ok(c.post("transit/encrypt/orders", Some(&root), json!({"plaintext": b64(b"x"), "bogus": 1})).await, 200);
    assert_eq!(r.body["warnings"][0], "Endpoint ignored these unrecognized parameters: [bogus]");
    ok(c.post("transit/encrypt/orders", Some(&root), json!({"plaintext": 7})).await, 400);
}

/// Vault's fields that change what a key or an operation means, and that KeyVault does
/// not support, are refused with 400 rather than ignored with a warning: a `context`
/// ignored would let a caller believe that two tenants' ciphertexts are kept apart.
#[tokio::test]
async fn transit_refuses_derivation_and_export_rather_than_ignoring_them() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    for field in ["derived", "convergent_encryption", "exportable", "allow_plaintext_backup"] {
        let r = ok(c.post("transit/keys/refused", Some(&root), json!({ field: true })).await, 400);
        assert!(r.body["errors"][0].as_str().unwrap().contains(field), "{r:?}");
    }
    let r = ok(c.post("transit/keys/refused", Some(&root), json!({"auto_rotate_period": "24h"})).await, 400);
    assert!(r.body["errors"][0].as_str().unwrap().contains("auto_rotate_period"), "{r:?}");
    assert_eq!(c.get("transit/keys/refused", &root).await.status, 404, "no key was made");
    ok(
        c.post("transit/keys/t", Some(&root), json!({"derived": false, "exportable": false, "auto_rotate_period": 0}))
            .await,
        200,
    );
    // The settings of a key: an automatic rotation, a minimum encryption version or an
    // export asked for are refused, not ignored with a warning (the key would not do
    // what its owner believes); asking for none of them is fine.
    for (field, value) in [
        ("auto_rotate_period", json!("24h")),
        ("auto_rotate_period", json!(3600)),
        ("min_encryption_version", json!(1)),
        ("exportable", json!(true)),
        ("allow_plaintext_backup", json!(true)),
    ] {
        let r = ok(c.post("transit/keys/t/config", Some(&root), json!({ field: value })).await, 400);
        assert!(r.body["errors"][0].as_str().unwrap().contains(field), "{field}: {r:?}");
    }
    let r = ok(
        c.post(
            "transit/keys/t/config",
            Some(&root),
            json!({"auto_rotate_period": "0s", "min_encryption_version": 0, "exportable": false, "deletion_allowed": false}),
        )
        .await,
        200,
    );
    assert!(r.body["warnings"].is_null(), "{r:?}");
    ok(c.post("transit/keys/s", Some(&root), json!({"type": "ed25519"})).await, 200);
    let ct = ok(c.post("transit/encrypt/t", Some(&root), json!({"plaintext": b64(b"tenant A")})).await, 200).body
        ["data"]["ciphertext"]
        .as_str()
        .unwrap()
        .to_owned();
    let refused = [
        ("transit/encrypt/t", json!({"plaintext": b64(b"x"), "context": b64(b"tenant-a")})),
        ("transit/encrypt/t", json!({"plaintext": b64(b"x"), "nonce": b64(&[0; 12])})),
        (
            "transit/encrypt/t",
            json!({"batch_input": [{"plaintext": b64(b"x")}, {"plaintext": b64(b"y"), "context": b64(b"b")}]}),
        ),
        ("transit/decrypt/t", json!({"ciphertext": ct, "context": b64(b"tenant-b")})),
        ("transit/rewrap/t", json!({"ciphertext": ct, "context": b64(b"tenant-b")})),
        ("transit/datakey/wrapped/t", json!({"context": b64(b"tenant-a")})),
        ("transit/sign/s", json!({"input": b64(b"x"), "prehashed": true})),
    ];
    for (path, body) in refused {
        let r = ok(c.post(path, Some(&root), body.clone()).await, 400);
        assert!(r.body["data"].is_null(), "{path} {body}: {r:?}");
    }
    // An empty context is no context (as in Vault).
    let r = ok(c.post("transit/decrypt/t", Some(&root), json!({"ciphertext": ct, "context": ""})).await, 200);
    assert_eq!(r.body["data"]["plaintext"], b64(b"tenant A"));
}

/// A transit key deleted while requests that loaded it are in flight: they get 404,
/// never a 500 for a key "missing from the HSM", and health counts no missing key. The
/// encryptions are held in the token layer (the fault layer's `slow <ms> <op>`, with a
/// worker each) until the delete has destroyed the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_transit_key_under_load_gives_404_not_500() {
    let fault = keyvault_tests::TokenFault::new();
    let s = TestServer::start(ServerOptions {
        env: vec![fault.env()],
        hsm_extra: "workers = 16".into(),
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();
    ok(c.post("transit/keys/del", Some(&root), json!({})).await, 200);
    ok(c.post("transit/keys/del/config", Some(&root), json!({"deletion_allowed": true})).await, 200);
    ok(c.post("transit/encrypt/del", Some(&root), json!({"plaintext": "aGk="})).await, 200);
    fault.set("slow 3000 encrypt_aes_gcm");
    let sent = std::time::Instant::now();
    let held: Vec<_> = (0..8)
        .map(|_| {
            let (c, root) = (c.clone(), root.clone());
            tokio::spawn(async move {
                let r = c.post("transit/encrypt/del", Some(&root), json!({"plaintext": "aGk="})).await;
                (r, sent.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    ok(c.send("DELETE", "transit/keys/del", Some(&root), None).await, 204);
    let mut waited = Vec::new();
    for t in held {
        let (r, took) = t.await.unwrap();
        assert_eq!(r.status, 404, "{r:?}");
        waited.push(took);
    }
    // Held in the token layer, not refused before it (the key was still there when they
    // were sent): at least one took the fault's 3 s.
    assert!(waited.iter().any(|t| *t >= std::time::Duration::from_millis(2900)), "{waited:?}");
    fault.set("");
    let h = ok(c.send("GET", "sys/health", None, None).await, 200);
    assert_eq!(h.body["missing_key_errors"], 0, "{h:?}");
}

#[tokio::test]
async fn transit_signatures_verify_independently() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    let r = ok(c.post("transit/keys/attest", Some(&root), json!({"type": "ed25519"})).await, 200);
    let pk_b64 = r.body["data"]["keys"]["1"]["public_key"].as_str().unwrap().to_owned();
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&STANDARD.decode(&pk_b64).unwrap().try_into().unwrap()).unwrap();
    let msg = b"telemetry frame 42";
    let sig =
        ok(c.post("transit/sign/attest", Some(&root), json!({"input": b64(msg)})).await, 200).body["data"]["signature"]
            .as_str()
            .unwrap()
            .to_owned();
    assert!(sig.starts_with("vault:v1:"));
    // An independent verifier accepts the signature made in the HSM.
    let raw = STANDARD.decode(&sig["vault:v1:".len()..]).unwrap();
    vk.verify(msg, &ed25519_dalek::Signature::from_slice(&raw).unwrap()).unwrap();
    let verify = |input: &[u8], sig: &str| {
        let (c, root, input, sig) = (c.clone(), root.clone(), b64(input), sig.to_owned());
        async move { c.post("transit/verify/attest", Some(&root), json!({"input": input, "signature": sig})).await }
    };
    assert_eq!(ok(verify(msg, &sig).await, 200).body["data"]["valid"], true);
    assert_eq!(ok(verify(b"telemetry frame 43", &sig).await, 200).body["data"]["valid"], false);
    let mut bad = raw.clone();
    bad[3] ^= 1;
    assert_eq!(ok(verify(msg, &format!("vault:v1:{}", b64(&bad))).await, 200).body["data"]["valid"], false);
    // Rotate: new signatures are v2, v1 ones still verify until min_decryption_version moves.
    ok(c.post("transit/keys/attest/rotate", Some(&root), json!({})).await, 200);
    let sig2 =
        ok(c.post("transit/sign/attest", Some(&root), json!({"input": b64(msg)})).await, 200).body["data"]["signature"]
            .as_str()
            .unwrap()
            .to_owned();
    assert!(sig2.starts_with("vault:v2:"));
    let r = ok(c.post("transit/sign/attest", Some(&root), json!({"input": b64(msg), "key_version": 1})).await, 200);
    let sig1b = r.body["data"]["signature"].as_str().unwrap().to_owned();
    assert!(sig1b.starts_with("vault:v1:"), "{r:?}");
    assert_eq!(ok(verify(msg, &sig1b).await, 200).body["data"]["valid"], true);
    assert_eq!(ok(verify(msg, &sig).await, 200).body["data"]["valid"], true);
    ok(c.post("transit/keys/attest/config", Some(&root), json!({"min_decryption_version": 2})).await, 200);
    ok(verify(msg, &sig).await, 400);
    assert_eq!(ok(verify(msg, &sig2).await, 200).body["data"]["valid"], true);
    // Batches.
    let r = ok(
        c.post(
            "transit/sign/attest",
            Some(&root),
            json!({"batch_input": [{"input": b64(b"a")}, {"input": "%%"}, {"input": b64(b"c")}]}),
        )
        .await,
        200,
    );
    let res = r.body["data"]["batch_results"].as_array().unwrap().clone();
    assert!(res[1]["error"].is_string());
    let r = ok(
        c.post(
            "transit/verify/attest",
            Some(&root),
            json!({"batch_input": [{"input": b64(b"a"), "signature": res[0]["signature"]}, {"input": b64(b"x"), "signature": res[2]["signature"]}]}),
        )
        .await,
        200,
    );
    assert_eq!(r.body["data"]["batch_results"][0]["valid"], true);
    assert_eq!(r.body["data"]["batch_results"][1]["valid"], false);
    // Wrong operations for the key type.
    ok(c.post("transit/encrypt/attest", Some(&root), json!({"plaintext": b64(b"x")})).await, 400);
}

struct Producer {
    key: SigningKey,
    cert: String,
}

impl Producer {
    fn new(seed: u8, cert: &str) -> Self {
        Producer { key: SigningKey::from_bytes(&[seed; 32]), cert: cert.to_owned() }
    }

    fn public(&self) -> String {
        b64(self.key.verifying_key().as_bytes())
    }

    /// The item a gateway forwards: the five header values and the body.
    fn item(&self, identity: &str, ts: u64, nonce: &str, body: &[u8]) -> serde_json::Value {
        self.item_signed_by(&self.key, identity, ts, nonce, body)
    }

    fn item_signed_by(&self, key: &SigningKey, identity: &str, ts: u64, nonce: &str, body: &[u8]) -> serde_json::Value {
        let msg = keyvault_api::gateway::signing_input(&ts.to_string(), nonce, body);
        json!({"identity": identity, "cert_sha256": self.cert, "timestamp": ts.to_string(), "nonce": nonce,
               "signature": b64(&key.sign(&msg).to_bytes()), "body": b64(body)})
    }
}

fn nonce(i: usize) -> String {
    format!("nonce-{i:012}-abcdef")
}

fn body(tenant: &str, operator: &str, signed_tenant: &str) -> Vec<u8> {
    json!({"tenant_id": tenant, "operator_id": operator, "campaign_id": "c-1", "reading": 21.5,
           "signed_metadata": {"tenant_id": signed_tenant, "operator_id": operator, "campaign_id": "c-1"}})
    .to_string()
    .into_bytes()
}

#[tokio::test]
async fn gateway_check_matrix() {
    let ca = TestCa::new("client CA");
    let mut s = TestServer::start(ServerOptions {
        client_auth: "optional",
        client_ca_pem: Some(ca.pem()),
        settable_clock: true,
        ..Default::default()
    });
    let c = s.client();
    let root = s.root.clone();
    let cert = "ab".repeat(32);
    let old = Producer::new(1, &cert);
    let new = Producer::new(2, &cert);
    let tenant = "3f1e0000-0000-4000-8000-000000000001";
    ok(
        c.post(
            "gateway/producers/spiffe://corp/ns/iot/sa/sensor-7",
            Some(&root),
            json!({"cert_sha256": [cert], "keys": [{"key_id": "k-old", "public_key": old.public()}, {"key_id": "k-new", "public_key": new.public()}],
                   "operator_tenants": {"op-001": tenant}, "clock_skew_seconds": 30, "nonce_ttl_seconds": 120}),
        )
        .await,
        204,
    );
    let gw = token_with(&c, &root, "gateway", r#"path "gateway/verify" { capabilities = ["verify"] }"#).await;
    let id = "spiffe://corp/ns/iot/sa/sensor-7";
    let check = |item: serde_json::Value| {
        let (c, gw) = (c.clone(), gw.clone());
        async move { c.post("gateway/verify", Some(&gw), item).await }
    };
    let good_body = body(tenant, "op-001", tenant);
    let expect = |r: &Reply, status: u16, reason: Option<&str>| {
        assert_eq!(r.status, status, "{r:?}");
        assert_eq!(r.body["data"]["valid"], status == 200, "{r:?}");
        assert_eq!(r.body["data"]["reason"].as_str(), reason, "{r:?}");
    };

    // Accepted, with the key that signed.
    let r = check(new.item(id, now(), &nonce(1), &good_body)).await;
    expect(&r, 200, None);
    assert_eq!(r.body["data"]["key_id"], "k-new");
    // Dual-validation window: the old key still works.
    let r = check(old.item(id, now(), &nonce(2), &good_body)).await;
    expect(&r, 200, None);
    assert_eq!(r.body["data"]["key_id"], "k-old");
    // Invalid signature (signed by a key the producer does not have).
    let stranger = SigningKey::from_bytes(&[9; 32]);
    expect(
        &check(new.item_signed_by(&stranger, id, now(), &nonce(3), &good_body)).await,
        401,
        Some("invalid_signature"),
    );
    // A body changed after signing.
    let mut tampered = new.item(id, now(), &nonce(4), &good_body);
    tampered["body"] =
        b64(&body(tenant, "op-001", tenant).iter().map(|b| if *b == b'5' { b'6' } else { *b }).collect::<Vec<_>>())
            .into();
    expect(&check(tampered).await, 401, Some("invalid_signature"));
    // Timestamps outside the 30 s skew, either way (by a margin: the second may tick
    // between this process and the server).
    expect(&check(new.item(id, now() - 35, &nonce(5), &good_body)).await, 401, Some("timestamp_out_of_skew"));
    expect(&check(new.item(id, now() + 35, &nonce(6), &good_body)).await, 401, Some("timestamp_out_of_skew"));
    expect(&check(new.item(id, now() - 25, &nonce(250), &good_body)).await, 200, None);
    // The same signed request twice: the second is a replay.
    let item = new.item(id, now(), &nonce(7), &good_body);
    expect(&check(item.clone()).await, 200, None);
    expect(&check(item).await, 409, Some("replay"));
    // Cross-tenant metadata.
    expect(
        &check(new.item(id, now(), &nonce(8), &body("other-tenant", "op-001", "other-tenant"))).await,
        403,
        Some("tenant_mapping_violation"),
    );
    expect(
        &check(new.item(id, now(), &nonce(9), &body(tenant, "op-001", "other-tenant"))).await,
        403,
        Some("tenant_mapping_violation"),
    );
    expect(
        &check(new.item(id, now(), &nonce(10), &body(tenant, "op-999", tenant))).await,
        403,
        Some("tenant_mapping_violation"),
    );
    // Unknown identity; a certificate the producer does not pin.
    expect(
        &check(new.item("spiffe://corp/ns/iot/sa/unknown", now(), &nonce(11), &good_body)).await,
        401,
        Some("identity_mismatch"),
    );
    let other_cert = Producer::new(2, &"cd".repeat(32));
    expect(&check(other_cert.item(id, now(), &nonce(12), &good_body)).await, 401, Some("identity_mismatch"));
    // Malformed: missing fields, short nonce, bad base64, non-numeric timestamp: 400.
    let mut m = new.item(id, now(), &nonce(13), &good_body);
    m.as_object_mut().unwrap().remove("nonce");
    expect(&check(m).await, 400, Some("malformed_request"));
    expect(&check(new.item(id, now(), "short", &good_body)).await, 400, Some("malformed_request"));
    let mut m = new.item(id, now(), &nonce(14), &good_body);
    m["signature"] = "!!".into();
    expect(&check(m).await, 400, Some("malformed_request"));
    let mut m = new.item(id, now(), &nonce(15), &good_body);
    m["timestamp"] = "12a".into();
    expect(&check(m).await, 400, Some("malformed_request"));
    ok(c.post("gateway/verify", Some(&gw), json!({"bogus": 1})).await, 400);
    // A caller without the capability.
    ok(
        c.post(
            "gateway/verify",
            Some(&token_with(&c, &root, "nobody", r#"path "x" { capabilities = ["read"] }"#).await),
            new.item(id, now(), &nonce(16), &good_body),
        )
        .await,
        403,
    );

    // The same request 50 times concurrently: exactly one acceptance.
    let item = new.item(id, now(), &nonce(17), &good_body);
    let tasks: Vec<_> = (0..50).map(|_| tokio::spawn(check(item.clone()))).collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap().status);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 409).count(), 49, "{statuses:?}");

    // A batch of 100: one result each, with its own status.
    let mut batch: Vec<serde_json::Value> = (100..198).map(|i| new.item(id, now(), &nonce(i), &good_body)).collect();
    batch.push(new.item_signed_by(&stranger, id, now(), &nonce(198), &good_body));
    batch.push(batch[0].clone());
    let r = ok(c.post("gateway/verify", Some(&gw), json!({ "batch": batch })).await, 200);
    let results = r.body["data"]["batch_results"].as_array().unwrap();
    assert_eq!(results.len(), 100);
    assert!(results[..98].iter().all(|r| r["valid"] == true && r["status"] == 200));
    assert_eq!(results[98]["reason"], "invalid_signature");
    assert_eq!(results[99]["status"], 409, "a duplicate inside one batch is a replay");

    // Closing the dual-validation window: the old key stops at not_after (the server's
    // clock is moved past it, not waited for).
    let na = now() + 60;
    ok(
        c.post(
            &format!("gateway/producers/{id}"),
            Some(&root),
            json!({"cert_sha256": [cert], "keys": [{"key_id": "k-old", "public_key": old.public(), "not_after": na}, {"key_id": "k-new", "public_key": new.public()}],
                   "operator_tenants": {"op-001": tenant}}),
        )
        .await,
        204,
    );
    expect(&check(old.item(id, now(), &nonce(300), &good_body)).await, 200, None);
    s.advance_clock(120);
    let later = now() + 120;
    expect(&check(old.item(id, later, &nonce(301), &good_body)).await, 401, Some("invalid_signature"));
    expect(&check(new.item(id, later, &nonce(302), &good_body)).await, 200, None);

    // The kill switch on the producer's certificate: revoked_identity.
    ok(c.post("sys/revoke-identity", Some(&root), json!({"certificate_sha256": cert})).await, 200);
    expect(&check(new.item(id, later, &nonce(303), &good_body)).await, 401, Some("revoked_identity"));
    let r = ok(c.get(&format!("gateway/producers/{id}"), &root).await, 200);
    assert_eq!(r.body["data"]["disabled"], true);
    // Registered again still pinning the revoked certificate (with another beside it), it
    // is refused: that would enable the producer again for the other pin.
    let other = "cd".repeat(32);
    let again = json!({"cert_sha256": [cert, other], "keys": [{"key_id": "k-new", "public_key": new.public()}],
                       "operator_tenants": {"op-001": tenant}});
    let r = ok(c.post(&format!("gateway/producers/{id}"), Some(&root), again).await, 400);
    assert!(r.body["errors"][0].as_str().unwrap().contains("is revoked (kill switch)"), "{r:?}");
    let r = ok(c.get(&format!("gateway/producers/{id}"), &root).await, 200);
    assert_eq!(r.body["data"]["disabled"], true, "still disabled");

    // Every verdict is an audit event.
    let audit = std::fs::read_to_string(s.audit_log()).unwrap();
    assert!(audit.contains("telemetry.accepted") && audit.contains("telemetry.rejected"));
    assert!(audit.contains("\"reason\":\"replay\"") && audit.contains("\"reason\":\"tenant_mapping_violation\""));
    // Each verdict event is written just before its request's own entry (one fsync for
    // both): for every event, the request entry with its request id comes after it.
    let lines: Vec<serde_json::Value> = audit.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut checked = 0;
    for (i, e) in lines.iter().enumerate() {
        if !e["event"].as_str().is_some_and(|x| x.starts_with("telemetry.")) {
            continue;
        }
        let id = e["request_id"].as_str().unwrap();
        let own = lines.iter().position(|l| l["type"] == "request" && l["request_id"] == id).unwrap();
        assert!(own > i, "verdict event {i} of request {id} is not before the request's entry {own}");
        checked += 1;
    }
    assert!(checked >= 4, "{checked} verdict events");

    // Producer registration is validated.
    ok(c.post("gateway/producers/p2", Some(&root), json!({"cert_sha256": [], "keys": []})).await, 400);
    ok(
        c.post(
            "gateway/producers/p2",
            Some(&root),
            json!({"cert_sha256": [cert], "keys": [{"key_id": "k", "public_key": "short"}]}),
        )
        .await,
        400,
    );
    ok(
        c.post("gateway/producers/p2", Some(&root), json!({"cert_sha256": [cert], "keys": [{"key_id": "k", "public_key": new.public()}], "clock_skew_seconds": 60, "nonce_ttl_seconds": 60}))
            .await,
        400,
    );
}

#[tokio::test]
async fn a_producer_signing_through_transit_never_holds_its_key() {
    let s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    ok(c.post("transit/keys/sensor-9", Some(&root), json!({"type": "ed25519"})).await, 200);
    let cert = "ef".repeat(32);
    ok(
        c.post("gateway/producers/sensor-9", Some(&root), json!({"cert_sha256": [cert], "transit_key": "sensor-9"}))
            .await,
        204,
    );
    let producer =
        token_with(&c, &root, "sensor-9", r#"path "transit/keys/sensor-9" { capabilities = ["sign"] }"#).await;
    let gw = token_with(&c, &root, "gw", r#"path "gateway/verify" { capabilities = ["verify"] }"#).await;
    let ts = now();
    let n = "transit-nonce-0000000001";
    let body = br#"{"reading": 1}"#;
    let msg = keyvault_api::gateway::signing_input(&ts.to_string(), n, body);
    let sig = ok(c.post("transit/sign/sensor-9", Some(&producer), json!({"input": b64(&msg)})).await, 200).body["data"]
        ["signature"]
        .as_str()
        .unwrap()
        .to_owned();
    let raw_sig = STANDARD.decode(&sig["vault:v1:".len()..]).unwrap();
    let item = json!({"identity": "sensor-9", "cert_sha256": cert, "timestamp": ts, "nonce": n, "signature": b64(&raw_sig), "body": b64(body)});
    let r = ok(c.post("gateway/verify", Some(&gw), item.clone()).await, 200);
    assert_eq!(r.body["data"]["key_id"], "transit:sensor-9:v1");
    ok(c.post("gateway/verify", Some(&gw), item).await, 409);

    // Batches of a producer with one key are verified together (and item by item when
    // the batch as a whole fails): all valid, then one tampered among valid ones.
    let mut items = Vec::new();
    for i in 0..6 {
        let n = format!("transit-batch-nonce-{i:04}");
        let msg = keyvault_api::gateway::signing_input(&ts.to_string(), &n, body);
        let sig = ok(c.post("transit/sign/sensor-9", Some(&producer), json!({"input": b64(&msg)})).await, 200).body["data"]["signature"]
            .as_str()
            .unwrap()
            .to_owned();
        let raw_sig = STANDARD.decode(&sig["vault:v1:".len()..]).unwrap();
        items.push(json!({"identity": "sensor-9", "cert_sha256": cert, "timestamp": ts, "nonce": n, "signature": b64(&raw_sig), "body": b64(body)}));
    }
    let r = ok(c.post("gateway/verify", Some(&gw), json!({"batch": items[..3]})).await, 200);
    assert!(r.body["data"]["batch_results"].as_array().unwrap().iter().all(|v| v["valid"] == true), "{r:?}");
    let mut mixed = items[3..].to_vec();
    mixed[1]["body"] = b64(br#"{"reading": 2}"#).into();
    let r = ok(c.post("gateway/verify", Some(&gw), json!({"batch": mixed})).await, 200);
    let res = r.body["data"]["batch_results"].as_array().unwrap();
    assert_eq!(
        (res[0]["valid"].clone(), res[1]["reason"].clone(), res[2]["valid"].clone()),
        (json!(true), json!("invalid_signature"), json!(true))
    );
}

/// The replay cache under the class of "16 copies at once" and `kill -9`: of 16 copies of
/// one signed request sent together exactly one is accepted; every accepted nonce is
/// durable before its reply, so after a SIGKILL right after the replies every one of them
/// is still a replay; and the check records no intent entry, only its verdict events and
/// its request entry.
#[tokio::test]
async fn gateway_nonces_are_durable_before_the_reply_and_one_of_sixteen_copies_wins() {
    let mut s = TestServer::start(ServerOptions::default());
    let c = s.client();
    let root = s.root.clone();
    let cert = "cd".repeat(32);
    let p = Producer::new(7, &cert);
    let id = "spiffe://corp/ns/iot/sa/sensor-9";
    ok(
        c.post(
            &format!("gateway/producers/{id}"),
            Some(&root),
            json!({"cert_sha256": [cert], "keys": [{"key_id": "k", "public_key": p.public()}],
                   "clock_skew_seconds": 60, "nonce_ttl_seconds": 600}),
        )
        .await,
        204,
    );
    let gw = token_with(&c, &root, "gateway", r#"path "gateway/verify" { capabilities = ["verify"] }"#).await;
    let body = b"{\"reading\": 1}";

    // 16 copies of one request at once: one winner, 15 replays.
    let item = p.item(id, now(), &nonce(9_000), body);
    let copies = (0..16).map(|_| {
        let (c, gw, item) = (c.clone(), gw.clone(), item.clone());
        async move { c.post("gateway/verify", Some(&gw), item).await }
    });
    let replies = futures_util::future::join_all(copies).await;
    let mut statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    statuses.sort_unstable();
    assert_eq!(statuses, [vec![200], vec![409; 15]].concat(), "{replies:?}");

    // 64 distinct requests at once (their nonces share syncs), then SIGKILL at once.
    let items: Vec<serde_json::Value> = (0..64).map(|i| p.item(id, now(), &nonce(10_000 + i), body)).collect();
    let sends = items.iter().map(|item| {
        let (c, gw, item) = (c.clone(), gw.clone(), item.clone());
        async move { c.post("gateway/verify", Some(&gw), item).await }
    });
    for r in futures_util::future::join_all(sends).await {
        ok(r, 200);
    }
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    s.restart();
    let c = s.client();
    for item in std::iter::once(&item).chain(&items) {
        let r = ok(c.post("gateway/verify", Some(&gw), item.clone()).await, 409);
        assert_eq!(r.body["data"]["reason"], "replay", "{r:?}");
    }
    s.stop();

    let log = std::fs::read_to_string(s.audit_log()).unwrap();
    let entries: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let checks: Vec<&serde_json::Value> =
        entries.iter().filter(|e| e["type"] == "request" && e["path"] == "/v1/gateway/verify").collect();
    assert_eq!(checks.len(), 16 + 64 + 65, "one request entry per check");
    let accepted = entries.iter().filter(|e| e["event"] == "telemetry.accepted").count();
    assert_eq!(accepted, 1 + 64, "one accepted verdict per 200");
    let intents = entries.iter().filter(|e| e["type"] == "intent" && e["path"] == "/v1/gateway/verify").count();
    assert_eq!(intents, 0, "a gateway check records no intent");
}
