//! `keyvault audit verify`: check a sequence of audit files with the audit public key only
//! (no HSM, no server). The first failure is reported with its file, line and one reason.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, VerifyingKey};
use serde_json::{Map, Value};

use super::chain::{canonical, checkpoint_message, decode_hash, entry_hash};

/// Why verification failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A line's content does not produce its recorded hash (edited, or not JSON).
    EntryHashMismatch,
    /// A line does not follow the previous one (deleted, reordered or appended lines).
    PreviousHashMismatch,
    /// A checkpoint's signature does not verify with the audit public key.
    CheckpointSignatureInvalid,
    /// The log does not end with its final checkpoint, or its last line is cut.
    TruncatedAfterCheckpoint,
    /// The first file does not start with a genesis header.
    MissingGenesis,
    /// A line's `seq` is not one more than the previous line's (the genesis header's is
    /// 1): lines were removed or inserted and the chain recomputed, or the writer erred.
    SequenceBroken,
}

impl Failure {
    pub fn code(self) -> &'static str {
        match self {
            Failure::EntryHashMismatch => "entry_hash_mismatch",
            Failure::PreviousHashMismatch => "previous_hash_mismatch",
            Failure::CheckpointSignatureInvalid => "checkpoint_signature_invalid",
            Failure::TruncatedAfterCheckpoint => "truncated_after_checkpoint",
            Failure::MissingGenesis => "missing_genesis",
            Failure::SequenceBroken => "sequence_broken",
        }
    }
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    Ok {
        entries: u64,
        /// `seq` of the last checkpoint, if any.
        last_checkpoint: Option<u64>,
        /// Entries after the last checkpoint (only with `live`).
        unsigned_tail: u64,
        gaps: u64,
        /// Requests whose `intent` is in the log but whose outcome is not: a crash (or a
        /// failed disk) between the two; the change may or may not have been made.
        unfinished_intents: u64,
    },
    Failed {
        file: PathBuf,
        /// 1-based line number.
        line: usize,
        reason: Failure,
    },
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Report::Ok { entries, last_checkpoint, unsigned_tail, gaps, unfinished_intents } => {
                write!(f, "ok entries={entries} last_checkpoint=")?;
                match last_checkpoint {
                    Some(s) => write!(f, "{s}")?,
                    None => write!(f, "none")?,
                }
                write!(f, " unsigned_tail={unsigned_tail} gaps={gaps} unfinished_intents={unfinished_intents}")
            }
            Report::Failed { file, line, reason } => {
                write!(f, "ok=false file={} line={line} reason={}", file.display(), reason.code())
            }
        }
    }
}

/// Parse a public key file: the base64 of the 32-byte Ed25519 key (what
/// `keyvault audit export-key` writes), surrounding whitespace ignored.
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let raw = STANDARD.decode(text.trim()).map_err(|_| format!("{} is not base64", path.display()))?;
    let raw: [u8; 32] = raw.try_into().map_err(|_| format!("{} is not a 32-byte Ed25519 key", path.display()))?;
    VerifyingKey::from_bytes(&raw).map_err(|e| format!("{}: {e}", path.display()))
}

struct State {
    prev: Option<[u8; 32]>,
    /// `seq` of the previous line.
    seq: u64,
    /// The previous line was a final checkpoint: only a continuation header may follow.
    closed: bool,
    entries: u64,
    last_checkpoint: Option<u64>,
    since_checkpoint: u64,
    gaps: u64,
    /// Request ids of intents not followed (yet) by their request entry.
    open_intents: std::collections::HashSet<String>,
}

/// Verify `files` in order as one chain. `live`: the log is still being written, so
/// entries after the last checkpoint are accepted (and counted as the unsigned tail).
pub fn verify(files: &[PathBuf], key: &VerifyingKey, live: bool) -> std::io::Result<Report> {
    let mut st = State {
        prev: None,
        seq: 0,
        closed: false,
        entries: 0,
        last_checkpoint: None,
        since_checkpoint: 0,
        gaps: 0,
        open_intents: Default::default(),
    };
    let mut last_position = (PathBuf::new(), 0usize);
    for (fi, file) in files.iter().enumerate() {
        let bytes = std::fs::read(file)?;
        let fail = |line: usize, reason: Failure| Ok(Report::Failed { file: file.clone(), line, reason });
        let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
        // A complete file ends with a newline: the split leaves one empty piece.
        let torn = lines.last().is_some_and(|l| !l.is_empty());
        if !torn {
            lines.pop();
        }
        for (i, raw) in lines.iter().enumerate() {
            let lineno = i + 1;
            if torn && i + 1 == lines.len() {
                return fail(lineno, Failure::TruncatedAfterCheckpoint);
            }
            let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(raw) else {
                return fail(lineno, Failure::EntryHashMismatch);
            };
            let Some(hash) = obj.remove("hash").and_then(|h| h.as_str().and_then(decode_hash)) else {
                return fail(lineno, Failure::EntryHashMismatch);
            };
            let Some(prev) = obj.get("prev").and_then(Value::as_str).and_then(decode_hash) else {
                return fail(lineno, Failure::EntryHashMismatch);
            };
            let kind = obj.get("type").and_then(Value::as_str).unwrap_or("");
            let first_of_all = fi == 0 && i == 0;
            if first_of_all {
                let genesis = obj.get("genesis").and_then(Value::as_str).and_then(decode_hash);
                if kind != "header" || genesis != Some(prev) {
                    return fail(lineno, Failure::MissingGenesis);
                }
            } else {
                if kind == "header" {
                    // A continuation header must name the hash it continues from.
                    let continues = obj.get("continues").and_then(Value::as_str).and_then(decode_hash);
                    if continues != Some(prev) || Some(prev) != st.prev {
                        return fail(lineno, Failure::PreviousHashMismatch);
                    }
                } else if st.closed || Some(prev) != st.prev {
                    return fail(lineno, Failure::PreviousHashMismatch);
                }
            }
            let hashed = canonical(&Value::Object(obj.clone()));
            if entry_hash(&prev, &hashed) != hash
                || !(is_written_form(raw, &hashed, &hash) || is_older_form(raw, &obj, &hash))
            {
                return fail(lineno, Failure::EntryHashMismatch);
            }
            // Every line counts: the genesis header is 1, each line one more, across files.
            let seq = obj.get("seq").and_then(Value::as_u64);
            if seq != Some(st.seq + 1) {
                return fail(lineno, Failure::SequenceBroken);
            }
            st.seq += 1;
            st.closed = false;
            match kind {
                "checkpoint" => {
                    if !checkpoint_ok(&obj, &prev, key) {
                        return fail(lineno, Failure::CheckpointSignatureInvalid);
                    }
                    st.last_checkpoint = obj.get("seq").and_then(Value::as_u64);
                    st.since_checkpoint = 0;
                    st.closed = obj.get("final").and_then(Value::as_bool).unwrap_or(false);
                }
                "header" => {}
                other => {
                    if other == "gap" {
                        st.gaps += 1;
                    }
                    let id = obj.get("request_id").and_then(Value::as_str).map(str::to_owned);
                    match (other, id) {
                        ("intent", Some(id)) => {
                            st.open_intents.insert(id);
                        }
                        ("request", Some(id)) => {
                            st.open_intents.remove(&id);
                        }
                        _ => {}
                    }
                    st.entries += 1;
                    st.since_checkpoint += 1;
                }
            }
            st.prev = Some(hash);
            last_position = (file.clone(), lineno);
        }
        if lines.is_empty() && fi == 0 {
            return fail(1, Failure::MissingGenesis);
        }
    }
    if st.prev.is_none() {
        return Ok(Report::Failed {
            file: files.first().cloned().unwrap_or_default(),
            line: 1,
            reason: Failure::MissingGenesis,
        });
    }
    if !live && !st.closed {
        // A stopped log ends with its final checkpoint; here something after the last
        // checkpoint was cut off, or lines were appended after it without a signature.
        return Ok(Report::Failed {
            file: last_position.0,
            line: last_position.1 + 1,
            reason: Failure::TruncatedAfterCheckpoint,
        });
    }
    Ok(Report::Ok {
        entries: st.entries,
        last_checkpoint: st.last_checkpoint,
        unsigned_tail: st.since_checkpoint,
        gaps: st.gaps,
        unfinished_intents: st.open_intents.len() as u64,
    })
}

/// Whether a line is byte for byte what the writer makes of its hashed form: the
/// canonical entry with `"hash"` appended as its last member. A line that only parses to
/// the same entry is not (a key given twice, whose first value a reader that keeps the
/// first of duplicates would show; added spaces; escapes spelled otherwise): the log's
/// bytes are what the chain covers, whatever parser reads them.
fn is_written_form(raw: &[u8], hashed: &[u8], hash: &[u8; 32]) -> bool {
    let Some(body) = hashed.strip_suffix(b"}") else { return false };
    let Some(rest) = raw.strip_prefix(body) else { return false };
    let mut tail = Vec::with_capacity(76);
    tail.extend_from_slice(b",\"hash\":\"");
    tail.extend_from_slice(hex::encode(hash).as_bytes());
    tail.extend_from_slice(b"\"}");
    rest == tail.as_slice()
}

/// Whether a line is the form writers before 2026-11-25 made: the canonical form of the
/// entry with its `"hash"` (among the keys, in order). As unambiguous as the current one.
fn is_older_form(raw: &[u8], obj: &Map<String, Value>, hash: &[u8; 32]) -> bool {
    let mut with_hash = obj.clone();
    with_hash.insert("hash".into(), Value::String(hex::encode(hash)));
    raw == canonical(&Value::Object(with_hash)).as_slice()
}

fn checkpoint_ok(obj: &Map<String, Value>, prev: &[u8; 32], key: &VerifyingKey) -> bool {
    let head = obj.get("head").and_then(Value::as_str).and_then(decode_hash);
    let seq = obj.get("seq").and_then(Value::as_u64);
    let is_final = obj.get("final").and_then(Value::as_bool).unwrap_or(false);
    let sig = obj.get("signature").and_then(Value::as_str).and_then(|s| STANDARD.decode(s).ok());
    let (Some(head), Some(seq), Some(sig)) = (head, seq, sig) else { return false };
    if head != *prev {
        return false;
    }
    let Ok(sig) = Signature::from_slice(&sig) else { return false };
    key.verify_strict(&checkpoint_message(&head, seq, is_final), &sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line in the older form (the hash among the keys, in order) verifies, as does the
    /// current one; one that only parses to the same entry does not.
    #[test]
    fn a_line_verifies_in_a_form_a_writer_made_and_in_no_other() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        let genesis = [9u8; 32];
        let mut header = Map::new();
        header.insert("type".into(), "header".into());
        header.insert("genesis".into(), hex::encode(genesis).into());
        let (header_line, head) = super::super::chain::seal(&header, 1, &genesis);
        let mut entry = Map::new();
        entry.insert("type".into(), "request".into());
        entry.insert("status".into(), 200.into());
        let (current, _) = super::super::chain::seal(&entry, 2, &head);
        let current = String::from_utf8(current).unwrap();
        let mut parsed: Map<String, Value> = serde_json::from_str(&current).unwrap();
        let hash = parsed.remove("hash").unwrap();
        parsed.insert("hash".into(), hash);
        let older = format!("{}\n", String::from_utf8(canonical(&Value::Object(parsed))).unwrap());
        assert_ne!(older, current);
        let twice = current.replacen("\"status\":", "\"status\":500,\"status\":", 1);
        let spaced = current.replacen(',', ", ", 1);

        let dir = tempfile::tempdir().unwrap();
        let check = |line: &str| {
            let path = dir.path().join("audit.log");
            std::fs::write(&path, [header_line.as_slice(), line.as_bytes()].concat()).unwrap();
            verify(&[path], &key, true).unwrap()
        };
        for good in [&current, &older] {
            assert!(matches!(check(good), Report::Ok { entries: 1, .. }), "{good}");
        }
        for bad in [&twice, &spaced] {
            let r = check(bad);
            assert!(matches!(r, Report::Failed { line: 2, reason: Failure::EntryHashMismatch, .. }), "{bad}: {r}");
        }
    }
}
