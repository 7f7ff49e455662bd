//! Transit, mounted at `transit/` by default: named keys in the HSM and the operations on
//! them (Vault's shapes). Every operation is authorized on its key's path
//! (`transit/keys/<name>`) with the capability of the operation: `encrypt` (also rewrap
//! and data keys), `decrypt`, `sign`, `verify`, `rotate`.

use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyvault_api::Sensitive;
use keyvault_api::transit::{
    BatchResults, CreateKey, Datakey, DatakeyRequest, Item, ItemResult, KeyConfig, KeyInfo, KeyType, OperationRequest,
    VersionInfo,
};

use super::EngineKind;
use crate::error::{Error, Result};
use crate::logical::openapi::Answer;
use crate::logical::{Access, Engine, EngineInfo, OpSpec, Operation, Params, Reply, Request, Route};
use crate::policy::Capability;
use crate::transit::{Transit, TransitKey, b64_field};

pub const KIND: EngineKind = EngineKind {
    info: EngineInfo {
        name: "transit",
        description: "named keys in the HSM: encrypt, decrypt, sign, verify, data keys",
        auth: false,
        routes: ROUTES,
    },
    fixed_at: None,
    once: true,
    takes_options: false,
    build: |core, _| {
        Ok(Arc::new(TransitEngine { transit: Transit::new(core.store.clone(), core.keys.clone(), core.names.clone()) }))
    },
};

fn key_name(_: Operation, p: &mut Params) -> Result<()> {
    crate::transit::validate_key_name(p.get("name").unwrap_or_default())
}

fn datakey_params(op: Operation, p: &mut Params) -> Result<()> {
    if !matches!(p.get("kind"), Some("plaintext" | "wrapped")) {
        return Err(Error::NotFound("datakey type is plaintext or wrapped".into()));
    }
    key_name(op, p)
}

const fn on_key(pattern: &'static str, summary: &'static str, ops: &'static [OpSpec]) -> Route {
    Route::new(pattern, summary, ops).policy("keys/{name}").normalize(key_name).names(crate::transit::KEY_NAME_PATTERN)
}

/// An operation on a key's data: one item, or `batch_input`.
const fn item_op(access: Access) -> OpSpec {
    OpSpec::compute(access).body::<OperationRequest>().data_either::<ItemResult, BatchResults>()
}

const ROUTES: &[Route] = &[
    Route::new("keys", "list keys", &[OpSpec::list(Access::Needs(Capability::List))]),
    on_key(
        "keys/{name}",
        "create (`type`: aes256-gcm96 or ed25519), read, delete (when `deletion_allowed`)",
        &[
            OpSpec::write(Access::Needs(Capability::Create)).body::<CreateKey>().data::<KeyInfo>(),
            OpSpec::read(Access::Needs(Capability::Read)).data::<KeyInfo>(),
            OpSpec::delete(Access::Needs(Capability::Delete)).answers(Answer::Empty),
        ],
    ),
    on_key(
        "keys/{name}/rotate",
        "new key version",
        &[OpSpec::write(Access::Needs(Capability::Rotate)).body::<keyvault_api::Empty>().data::<KeyInfo>()],
    ),
    on_key(
        "keys/{name}/config",
        "min_decryption_version, deletion_allowed",
        &[OpSpec::write(Access::Needs(Capability::Update)).body::<KeyConfig>().data::<KeyInfo>()],
    ),
    on_key("encrypt/{name}", "encrypt (or batch_input)", &[item_op(Access::Needs(Capability::Encrypt))]),
    on_key("decrypt/{name}", "decrypt (or batch_input)", &[item_op(Access::Needs(Capability::Decrypt))]),
    on_key("rewrap/{name}", "re-encrypt under the latest version", &[item_op(Access::Needs(Capability::Encrypt))]),
    on_key("sign/{name}", "Ed25519 signature (or batch_input)", &[item_op(Access::Needs(Capability::Sign))]),
    on_key("verify/{name}", "check a signature (or batch_input)", &[item_op(Access::Needs(Capability::Verify))]),
    Route::new(
        "datakey/{kind}/{name}",
        "a fresh 256-bit data key encrypted under the key (`plaintext` also returns it)",
        &[OpSpec::compute(Access::Needs(Capability::Encrypt)).body::<DatakeyRequest>().data::<Datakey>()],
    )
    .policy("keys/{name}")
    .normalize(datakey_params)
    .names(crate::transit::KEY_NAME_PATTERN),
];

#[derive(Debug)]
pub struct TransitEngine {
    transit: Transit,
}

fn key_info(name: &str, k: &TransitKey) -> KeyInfo {
    let keys = k
        .versions
        .iter()
        .map(|(v, m)| {
            let info = match &m.public_key {
                Some(pk) => VersionInfo::Signing { creation_time: m.creation_time.clone(), public_key: pk.clone() },
                None => VersionInfo::Created(m.creation_time.clone()),
            };
            (v.to_string(), info)
        })
        .collect();
    let ed = k.key_type == KeyType::Ed25519;
    KeyInfo {
        name: name.to_owned(),
        key_type: k.key_type,
        keys,
        latest_version: k.latest_version,
        min_decryption_version: k.min_decryption_version,
        deletion_allowed: k.deletion_allowed,
        exportable: false,
        supports_encryption: !ed,
        supports_decryption: !ed,
        supports_signing: ed,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Encrypt,
    Decrypt,
    Rewrap,
    Sign,
    Verify,
}

/// Vault's fields that change what an operation means and that KeyVault does not
/// support: refused, not ignored with a warning (a `context` that bound nothing would let
/// a caller believe two tenants' ciphertexts are separated).
const NO_AUTO_ROTATION: &str =
    "auto_rotate_period is not supported: keys rotate by transit/keys/<name>/rotate only (run it on a schedule)";

fn refuse_unsupported(context: Option<&str>, nonce: Option<&str>, prehashed: Option<bool>) -> Result<()> {
    if context.is_some_and(|c| !c.is_empty()) {
        return Err(Error::invalid(
            "context is not supported: transit keys are not derived, a ciphertext is bound to its key and its \
             associated_data (use associated_data, or one key per tenant)",
        ));
    }
    if nonce.is_some_and(|n| !n.is_empty()) {
        return Err(Error::invalid("nonce is not supported: there is no convergent encryption"));
    }
    if prehashed == Some(true) {
        return Err(Error::invalid("prehashed is not supported: Ed25519 signs the input itself"));
    }
    Ok(())
}

/// The items of an operation, and whether it was a batch.
fn into_items(body: OperationRequest) -> Result<(Vec<Item>, bool)> {
    {
        let this = body;
        refuse_unsupported(this.context.as_deref(), this.nonce.as_deref(), this.prehashed)?;
        if let Some(batch) = &this.batch_input {
            for item in batch {
                refuse_unsupported(item.context.as_deref(), item.nonce.as_deref(), item.prehashed)?;
            }
        }
        match this.batch_input {
            Some(batch) => {
                let single = this.plaintext.is_some()
                    || this.ciphertext.is_some()
                    || this.input.is_some()
                    || this.signature.is_some()
                    || this.associated_data.is_some();
                if single {
                    return Err(Error::invalid("give either batch_input or the fields of one item"));
                }
                if batch.is_empty() || batch.len() > keyvault_api::gateway::MAX_BATCH {
                    return Err(Error::invalid("batch_input holds 1 to 1000 items"));
                }
                let batch = batch
                    .into_iter()
                    .map(|item| Item { key_version: item.key_version.or(this.key_version), ..item })
                    .collect();
                Ok((batch, true))
            }
            None => Ok((
                vec![Item {
                    plaintext: this.plaintext,
                    ciphertext: this.ciphertext,
                    associated_data: this.associated_data,
                    input: this.input,
                    signature: this.signature,
                    key_version: this.key_version,
                    ..Default::default()
                }],
                false,
            )),
        }
    }
}

fn aad(item: &Item) -> Result<Vec<u8>> {
    Ok(match &item.associated_data {
        Some(a) => b64_field("associated_data", a)?.to_vec(),
        None => Vec::new(),
    })
}

fn required<'a>(v: &'a Option<String>, name: &str) -> Result<&'a str> {
    v.as_deref().ok_or_else(|| Error::invalid(format!("missing field `{name}`")))
}

/// Items of one transit batch whose token calls may be queued at once.
const BATCH_IN_FLIGHT: usize = 128;

impl TransitEngine {
    async fn one(&self, name: &str, key: &TransitKey, op: Op, item: &Item) -> Result<ItemResult> {
        let t = &self.transit;
        // The version to encrypt, rewrap or sign with.
        let v = match item.key_version.filter(|v| *v != 0) {
            None => key.latest_version,
            Some(_) if matches!(op, Op::Decrypt | Op::Verify) => {
                return Err(Error::invalid(
                    "key_version applies to encrypt, rewrap and sign; a decryption or verification uses the version its text names",
                ));
            }
            Some(v) => {
                Transit::usable(key, v)?;
                v
            }
        };
        let version = Some(v);
        Ok(match op {
            Op::Encrypt => {
                let pt = item.plaintext.as_ref().ok_or_else(|| Error::invalid("missing field `plaintext`"))?;
                let pt = b64_field("plaintext", pt.expose())?;
                let ct = t.encrypt_with(name, key, v, pt, aad(item)?).await?;
                ItemResult { ciphertext: Some(ct), key_version: version, ..Default::default() }
            }
            Op::Decrypt => {
                let pt = t.decrypt(name, key, required(&item.ciphertext, "ciphertext")?, aad(item)?).await?;
                ItemResult { plaintext: Some(Sensitive::new(STANDARD.encode(pt.as_slice()))), ..Default::default() }
            }
            Op::Rewrap => {
                let ct = t.rewrap(name, key, v, required(&item.ciphertext, "ciphertext")?, aad(item)?).await?;
                ItemResult { ciphertext: Some(ct), key_version: version, ..Default::default() }
            }
            Op::Sign => {
                let input = b64_field("input", required(&item.input, "input")?)?;
                let sig = t.sign(name, key, v, input.to_vec()).await?;
                ItemResult { signature: Some(sig), key_version: version, ..Default::default() }
            }
            Op::Verify => {
                let input = b64_field("input", required(&item.input, "input")?)?;
                let valid = Transit::verify(key, &input, required(&item.signature, "signature")?)?;
                ItemResult { valid: Some(valid), ..Default::default() }
            }
        })
    }

    /// One item, or `batch_input` (one result per item; a failing item carries `error`
    /// and does not fail the others).
    async fn operation(&self, req: &mut Request, op: Op) -> Result<Reply> {
        let name = req.param("name").to_owned();
        let key = self.transit.get(&name).await?;
        let body: OperationRequest = req.data()?;
        let (items, batch) = into_items(body)?;
        if !batch {
            return Reply::data(&self.one(&name, &key, op, &items[0]).await?);
        }
        // Items run side by side in chunks of BATCH_IN_FLIGHT: their token calls reach the token
        // workers together and are served in one wake-up, instead of one hand-off and back
        // per item; the bound keeps one large batch from queueing a thousand calls ahead of
        // every other request's. Results keep the order of the items.
        let mut results: Vec<ItemResult> = Vec::with_capacity(items.len());
        for chunk in items.chunks(BATCH_IN_FLIGHT) {
            let done = futures_util::future::join_all(chunk.iter().map(|item| self.one(&name, &key, op, item))).await;
            for (item, r) in chunk.iter().zip(done) {
                let mut r = r.unwrap_or_else(|e| ItemResult { error: Some(e.client_message()), ..Default::default() });
                r.reference = item.reference.clone();
                results.push(r);
            }
        }
        Reply::data(&BatchResults { batch_results: results })
    }

    async fn datakey(&self, req: &mut Request) -> Result<Reply> {
        let name = req.param("name").to_owned();
        let with_plaintext = req.param("kind") == "plaintext";
        let b: DatakeyRequest = req.data()?;
        refuse_unsupported(b.context.as_deref(), b.nonce.as_deref(), None)?;
        let key = self.transit.get(&name).await?;
        let aad = match &b.associated_data {
            Some(a) => b64_field("associated_data", a)?.to_vec(),
            None => Vec::new(),
        };
        let (dk, ciphertext) = self.transit.datakey(&name, &key, aad).await?;
        let plaintext = with_plaintext.then(|| Sensitive::new(STANDARD.encode(dk.as_slice())));
        Reply::data(&Datakey { ciphertext, key_version: key.latest_version, plaintext })
    }
}

#[async_trait]
impl Engine for TransitEngine {
    fn info(&self) -> &'static EngineInfo {
        &KIND.info
    }

    async fn handle(&self, req: &mut Request) -> Result<Reply> {
        let name = req.param("name").to_owned();
        match (req.route.pattern, req.operation) {
            ("keys", Operation::List) => Reply::keys(self.transit.list().await?),
            ("keys/{name}", Operation::Write) => {
                let b: CreateKey = req.data()?;
                let refused = [
                    ("derived", b.derived, "keys are not derived from a context"),
                    ("convergent_encryption", b.convergent_encryption, "there is no convergent encryption"),
                    ("exportable", b.exportable, "no key leaves the HSM"),
                    ("allow_plaintext_backup", b.allow_plaintext_backup, "no key leaves the HSM"),
                ];
                if let Some((field, _, why)) = refused.iter().find(|(_, v, _)| *v == Some(true)) {
                    return Err(Error::invalid(format!("{field} is not supported: {why}")));
                }
                if b.auto_rotate_period.as_ref().is_some_and(|p| !p.is_zero()) {
                    return Err(Error::invalid(NO_AUTO_ROTATION));
                }
                let k = self.transit.create(&name, b.key_type.unwrap_or(KeyType::Aes256Gcm96)).await?;
                Reply::data(&key_info(&name, &k))
            }
            ("keys/{name}", Operation::Read) => Reply::data(&key_info(&name, &self.transit.get(&name).await?)),
            ("keys/{name}", Operation::Delete) => {
                self.transit.delete(&name).await?;
                Ok(Reply::empty())
            }
            ("keys/{name}/rotate", _) => {
                req.data::<keyvault_api::Empty>()?;
                Reply::data(&key_info(&name, &self.transit.rotate(&name).await?))
            }
            ("keys/{name}/config", _) => {
                let b: KeyConfig = req.data()?;
                if b.auto_rotate_period.as_ref().is_some_and(|p| !p.is_zero()) {
                    return Err(Error::invalid(NO_AUTO_ROTATION));
                }
                if b.min_encryption_version.is_some_and(|v| v != 0) {
                    return Err(Error::invalid(
                        "min_encryption_version is not supported: the latest version encrypts (rotate the key)",
                    ));
                }
                if b.exportable == Some(true) || b.allow_plaintext_backup == Some(true) {
                    return Err(Error::invalid(
                        "exportable and allow_plaintext_backup are not supported: no key leaves the HSM",
                    ));
                }
                let k = self.transit.configure(&name, b.min_decryption_version, b.deletion_allowed).await?;
                Reply::data(&key_info(&name, &k))
            }
            ("encrypt/{name}", _) => self.operation(req, Op::Encrypt).await,
            ("decrypt/{name}", _) => self.operation(req, Op::Decrypt).await,
            ("rewrap/{name}", _) => self.operation(req, Op::Rewrap).await,
            ("sign/{name}", _) => self.operation(req, Op::Sign).await,
            ("verify/{name}", _) => self.operation(req, Op::Verify).await,
            ("datakey/{kind}/{name}", _) => self.datakey(req).await,
            _ => Err(Error::UnsupportedOperation),
        }
    }
}
