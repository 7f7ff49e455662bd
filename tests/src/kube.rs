//! A stand-in for a Kubernetes cluster's service-account token issuer: an ES256 key, the
//! tokens it signs, and its public key as PEM or as the cluster's JWKS.

use serde_json::json;

use jsonwebtoken::{Algorithm, EncodingKey, Header};

pub struct Signer {
    pub key: rcgen::KeyPair,
    pub kid: &'static str,
}

impl Signer {
    pub fn new(kid: &'static str) -> Self {
        Signer { key: rcgen::KeyPair::generate().unwrap(), kid }
    }

    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(self.kid.to_owned());
        jsonwebtoken::encode(&h, claims, &EncodingKey::from_ec_pem(self.key.serialize_pem().as_bytes()).unwrap())
            .unwrap()
    }

    pub fn public_pem(&self) -> String {
        self.key.public_key_pem()
    }

    /// A JWKS with this key (EC P-256), as a cluster's `/openid/v1/jwks` serves it.
    pub fn jwks(&self) -> String {
        let raw = self.key.public_key_raw(); // 0x04 || x || y
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}]})
        .to_string()
    }
}

pub fn claims(ns: &str, sa: &str, aud: &str, iss: &str, exp_in: i64) -> serde_json::Value {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    json!({
        "iss": iss, "aud": [aud], "iat": now, "nbf": now, "exp": now + exp_in,
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "0f1e"}},
    })
}
