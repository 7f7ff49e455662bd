//! Envelope encryption of large payloads: the payload is encrypted here, with AES-256-GCM
//! under a fresh data key from `transit/datakey/plaintext/<key>`; the data key, wrapped
//! by the transit key in KeyVault's HSM, is stored beside the ciphertext. Only the data
//! key crosses the network, never the payload. Opening asks KeyVault to unwrap the data
//! key (`transit/decrypt`), so the transit key's policy decides who can read.
//!
//! The format (all lengths big-endian):
//!
//! ```text
//! "KVE1"                      4 bytes, magic and version
//! key name length             1 byte (1-128), then the transit key's name (ASCII)
//! wrapped key length          2 bytes, then the wrapped data key (`vault:v<N>:...`, ASCII)
//! nonce                       12 bytes, random
//! ciphertext || tag           AES-256-GCM, tag 16 bytes
//! ```
//!
//! The associated data of AES-GCM is every byte before the nonce, so the key name and the
//! wrapped key cannot be swapped for another's without the tag failing. Each field is
//! length-prefixed: a header splits one way only.

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use zeroize::Zeroizing;

use crate::client::Client;
use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"KVE1";
const NONCE: usize = 12;

fn header(key: &str, wrapped: &str) -> Result<Vec<u8>> {
    if !keyvault_api::valid_name(key) {
        return Err(Error::Invalid(format!("transit key name {key:?}")));
    }
    let wlen = u16::try_from(wrapped.len()).map_err(|_| Error::Decode("wrapped key too long".into()))?;
    let mut h = Vec::with_capacity(4 + 1 + key.len() + 2 + wrapped.len());
    h.extend_from_slice(MAGIC);
    h.push(key.len() as u8); // valid_name: at most 128
    h.extend_from_slice(key.as_bytes());
    h.extend_from_slice(&wlen.to_be_bytes());
    h.extend_from_slice(wrapped.as_bytes());
    Ok(h)
}

/// The header's fields and where the nonce starts.
fn parse(sealed: &[u8]) -> Result<(&str, &str, usize)> {
    let bad = || Error::Crypto("not a KeyVault envelope (or damaged)".into());
    let rest = sealed.strip_prefix(MAGIC).ok_or_else(bad)?;
    let (&klen, rest) = rest.split_first().ok_or_else(bad)?;
    let klen = usize::from(klen);
    let key = rest.get(..klen).and_then(|k| std::str::from_utf8(k).ok()).ok_or_else(bad)?;
    let rest = &rest[klen..];
    let wlen = usize::from(u16::from_be_bytes(rest.get(..2).ok_or_else(bad)?.try_into().map_err(|_| bad())?));
    let wrapped = rest.get(2..2 + wlen).and_then(|w| std::str::from_utf8(w).ok()).ok_or_else(bad)?;
    let start = 4 + 1 + klen + 2 + wlen;
    if sealed.len() < start + NONCE + 16 {
        return Err(bad());
    }
    Ok((key, wrapped, start))
}

impl Client {
    /// Encrypt `payload` locally under a fresh data key wrapped by the transit key `key`.
    pub async fn seal_envelope(&self, key: &str, payload: &[u8]) -> Result<Vec<u8>> {
        let dk = self.datakey(key).await?;
        let cipher = Aes256Gcm::new_from_slice(&dk.plaintext)
            .map_err(|_| Error::Crypto("a data key of the wrong size".into()))?;
        let mut nonce = [0u8; NONCE];
        getrandom::fill(&mut nonce).map_err(|_| Error::Crypto("no randomness".into()))?;
        let mut out = header(key, &dk.ciphertext)?;
        let ct = cipher
            .encrypt((&nonce).into(), Payload { msg: payload, aad: &out })
            .map_err(|_| Error::Crypto("encryption failed".into()))?;
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypt what [`Client::seal_envelope`] produced (the caller needs `decrypt` on the
    /// transit key named inside).
    pub async fn open_envelope(&self, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let (key, wrapped, start) = parse(sealed)?;
        let dk = self.decrypt(key, wrapped).await?;
        let cipher =
            Aes256Gcm::new_from_slice(&dk).map_err(|_| Error::Crypto("a data key of the wrong size".into()))?;
        let nonce: [u8; NONCE] =
            sealed[start..start + NONCE].try_into().map_err(|_| Error::Crypto("not a KeyVault envelope".into()))?;
        cipher
            .decrypt((&nonce).into(), Payload { msg: &sealed[start + NONCE..], aad: &sealed[..start] })
            .map(Zeroizing::new)
            .map_err(|_| Error::Crypto("the envelope does not open: altered, or another key".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_splits_one_way_and_rejects_damage() {
        let mut h = header("app", "vault:v1:abc").unwrap();
        h.extend_from_slice(&[0u8; NONCE + 16]);
        let (k, w, start) = parse(&h).unwrap();
        assert_eq!((k, w, start), ("app", "vault:v1:abc", 4 + 1 + 3 + 2 + 12));
        assert!(parse(&h[..start + 10]).is_err());
        assert!(parse(b"KVE2").is_err());
        let mut long = h.clone();
        long[4] = 200;
        assert!(parse(&long).is_err());
        assert!(header("../x", "w").is_err());
    }
}
