//! Typed transit calls: encrypt, decrypt, rewrap, data keys, sign, verify, and their
//! batches. Keys stay in KeyVault's HSM; plaintexts come back zeroizing.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use keyvault_api::Sensitive;
use keyvault_api::transit::{BatchResults, Datakey, Item, ItemResult, OperationRequest};
use zeroize::Zeroizing;

use crate::client::Client;
use crate::error::{Error, Result};

/// A data key: its plaintext (use it, then drop it) and the same key wrapped by the
/// transit key (store that).
pub struct DataKey {
    /// The key itself (32 bytes): use it and drop it.
    pub plaintext: Zeroizing<Vec<u8>>,
    /// `vault:v<N>:...`
    pub ciphertext: String,
    /// The transit key's version that wrapped it.
    pub key_version: u32,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("plaintext", &"[redacted]")
            .field("ciphertext", &self.ciphertext)
            .field("key_version", &self.key_version)
            .finish()
    }
}

fn check_key(key: &str) -> Result<()> {
    if keyvault_api::valid_name(key) { Ok(()) } else { Err(Error::Invalid(format!("transit key name {key:?}"))) }
}

fn b64_secret(bytes: &[u8]) -> Sensitive {
    Sensitive::new(B64.encode(bytes))
}

fn unb64(text: &str) -> Result<Zeroizing<Vec<u8>>> {
    B64.decode(text).map(Zeroizing::new).map_err(|_| Error::Decode("plaintext is not base64".into()))
}

fn item_error(r: &ItemResult) -> Option<Error> {
    r.error.as_ref().map(|e| Error::Status { status: 400, errors: vec![e.clone()] })
}

impl Client {
    async fn transit(&self, op: &str, key: &str, req: &OperationRequest) -> Result<ItemResult> {
        check_key(key)?;
        self.request_data("POST", &format!("transit/{op}/{key}"), Some(req)).await
    }

    async fn transit_batch(&self, op: &str, key: &str, items: Vec<Item>) -> Result<Vec<ItemResult>> {
        check_key(key)?;
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let req = OperationRequest { batch_input: Some(items), ..Default::default() };
        let r: BatchResults = self.request_data("POST", &format!("transit/{op}/{key}"), Some(&req)).await?;
        Ok(r.batch_results)
    }

    /// Encrypt with the named key: `vault:v<N>:...`.
    pub async fn encrypt(&self, key: &str, plaintext: &[u8]) -> Result<String> {
        self.encrypt_aad(key, plaintext, None).await
    }

    /// Encrypt with associated data (authenticated, not encrypted; needed to decrypt).
    pub async fn encrypt_aad(&self, key: &str, plaintext: &[u8], associated_data: Option<&[u8]>) -> Result<String> {
        let req = OperationRequest {
            plaintext: Some(b64_secret(plaintext)),
            associated_data: associated_data.map(|a| B64.encode(a)),
            ..Default::default()
        };
        self.transit("encrypt", key, &req).await?.ciphertext.ok_or_else(|| Error::Decode("no ciphertext".into()))
    }

    /// Decrypt a `vault:v<N>:...` ciphertext of the named key.
    pub async fn decrypt(&self, key: &str, ciphertext: &str) -> Result<Zeroizing<Vec<u8>>> {
        self.decrypt_aad(key, ciphertext, None).await
    }

    /// Decrypt with the associated data given at encryption.
    pub async fn decrypt_aad(
        &self,
        key: &str,
        ciphertext: &str,
        associated_data: Option<&[u8]>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let req = OperationRequest {
            ciphertext: Some(ciphertext.to_owned()),
            associated_data: associated_data.map(|a| B64.encode(a)),
            ..Default::default()
        };
        let r = self.transit("decrypt", key, &req).await?;
        unb64(r.plaintext.as_ref().ok_or_else(|| Error::Decode("no plaintext".into()))?.expose())
    }

    /// The same plaintext under the key's latest version (the plaintext never leaves
    /// KeyVault).
    pub async fn rewrap(&self, key: &str, ciphertext: &str) -> Result<String> {
        let req = OperationRequest { ciphertext: Some(ciphertext.to_owned()), ..Default::default() };
        self.transit("rewrap", key, &req).await?.ciphertext.ok_or_else(|| Error::Decode("no ciphertext".into()))
    }

    /// A new data key, plaintext and wrapped (`datakey/plaintext`).
    pub async fn datakey(&self, key: &str) -> Result<DataKey> {
        check_key(key)?;
        let d: Datakey = self
            .request_data("POST", &format!("transit/datakey/plaintext/{key}"), Some(&serde_json::json!({})))
            .await?;
        let plaintext = unb64(d.plaintext.as_ref().ok_or_else(|| Error::Decode("no plaintext key".into()))?.expose())?;
        Ok(DataKey { plaintext, ciphertext: d.ciphertext, key_version: d.key_version })
    }

    /// A new data key, wrapped only (`datakey/wrapped`): for a component that stores it
    /// now and has another unwrap it later with [`Client::decrypt`].
    pub async fn datakey_wrapped(&self, key: &str) -> Result<String> {
        check_key(key)?;
        let d: Datakey =
            self.request_data("POST", &format!("transit/datakey/wrapped/{key}"), Some(&serde_json::json!({}))).await?;
        Ok(d.ciphertext)
    }

    /// Sign with the named key (Ed25519 in the HSM): `vault:v<N>:<base64>`.
    pub async fn sign(&self, key: &str, input: &[u8]) -> Result<String> {
        let req = OperationRequest { input: Some(B64.encode(input)), ..Default::default() };
        self.transit("sign", key, &req).await?.signature.ok_or_else(|| Error::Decode("no signature".into()))
    }

    /// Whether `signature` (`vault:v<N>:...`) is the named key's over `input`.
    pub async fn verify(&self, key: &str, input: &[u8], signature: &str) -> Result<bool> {
        let req = OperationRequest {
            input: Some(B64.encode(input)),
            signature: Some(signature.to_owned()),
            ..Default::default()
        };
        self.transit("verify", key, &req).await?.valid.ok_or_else(|| Error::Decode("no verdict".into()))
    }

    /// Encrypt many plaintexts in one request (at most 1000); one result per item.
    pub async fn encrypt_batch(&self, key: &str, plaintexts: &[&[u8]]) -> Result<Vec<Result<String>>> {
        let items = plaintexts.iter().map(|p| Item { plaintext: Some(b64_secret(p)), ..Default::default() }).collect();
        let out = self.transit_batch("encrypt", key, items).await?;
        Ok(out
            .into_iter()
            .map(|r| match item_error(&r) {
                Some(e) => Err(e),
                None => r.ciphertext.ok_or_else(|| Error::Decode("no ciphertext".into())),
            })
            .collect())
    }

    /// Decrypt many ciphertexts in one request; one result per item.
    pub async fn decrypt_batch(&self, key: &str, ciphertexts: &[&str]) -> Result<Vec<Result<Zeroizing<Vec<u8>>>>> {
        let items =
            ciphertexts.iter().map(|c| Item { ciphertext: Some((*c).to_owned()), ..Default::default() }).collect();
        let out = self.transit_batch("decrypt", key, items).await?;
        Ok(out
            .into_iter()
            .map(|r| match item_error(&r) {
                Some(e) => Err(e),
                None => unb64(r.plaintext.as_ref().ok_or_else(|| Error::Decode("no plaintext".into()))?.expose()),
            })
            .collect())
    }

    /// Sign many inputs in one request; one result per item.
    pub async fn sign_batch(&self, key: &str, inputs: &[&[u8]]) -> Result<Vec<Result<String>>> {
        let items = inputs.iter().map(|i| Item { input: Some(B64.encode(i)), ..Default::default() }).collect();
        let out = self.transit_batch("sign", key, items).await?;
        Ok(out
            .into_iter()
            .map(|r| match item_error(&r) {
                Some(e) => Err(e),
                None => r.signature.ok_or_else(|| Error::Decode("no signature".into())),
            })
            .collect())
    }

    /// Verify many (input, signature) pairs in one request.
    pub async fn verify_batch(&self, key: &str, pairs: &[(&[u8], &str)]) -> Result<Vec<Result<bool>>> {
        let items = pairs
            .iter()
            .map(|(i, s)| Item { input: Some(B64.encode(i)), signature: Some((*s).to_owned()), ..Default::default() })
            .collect();
        let out = self.transit_batch("verify", key, items).await?;
        Ok(out
            .into_iter()
            .map(|r| match item_error(&r) {
                Some(e) => Err(e),
                None => r.valid.ok_or_else(|| Error::Decode("no verdict".into())),
            })
            .collect())
    }
}
