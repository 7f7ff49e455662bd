//! `/v1/secret/<path>`: secret paths and the replies of the key/value store.

use serde::{Deserialize, Serialize};

pub const MAX_PATH_LEN: usize = 512;
pub const MAX_SEGMENTS: usize = 32;

/// Why a path was refused (safe to show: it quotes nothing of the path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathError(pub &'static str);

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid path: {}", self.0)
    }
}

impl std::error::Error for PathError {}

/// A valid secret path: 1-32 non-empty segments, no `.` or `..`, no control characters,
/// no `/` inside a segment, at most 512 bytes. Parse, don't validate: holding one means it
/// is valid.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretPath(String);

/// A prefix to list under: empty (the root) or a path followed by `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretPrefix(String);

fn check_segment(seg: &str) -> Result<(), PathError> {
    if seg.is_empty() {
        return Err(PathError("empty segment"));
    }
    if seg == "." || seg == ".." {
        return Err(PathError("'.' and '..' segments are not allowed"));
    }
    if seg.chars().any(char::is_control) {
        return Err(PathError("control characters are not allowed"));
    }
    if seg.contains('/') {
        return Err(PathError("encoded '/' inside a segment"));
    }
    Ok(())
}

/// Whether one entry of a listing (`name`, or `folder/`) is a name this API can address:
/// the rule of every path segment. An upstream's listing may name others (`a/../b` is a
/// valid AWS name, listed as the folder `../`); a client walking the listing would
/// address another path with them.
pub fn check_listing_entry(entry: &str) -> Result<(), PathError> {
    check_segment(entry.strip_suffix('/').unwrap_or(entry))
}

/// Percent-decode each `/`-separated segment of a URL path remainder.
pub fn decode_segments(raw: &str) -> Result<Vec<String>, PathError> {
    raw.split('/')
        .map(|seg| {
            percent_encoding::percent_decode_str(seg)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| PathError("not valid UTF-8"))
        })
        .collect()
}

/// Every byte but letters, digits and `-._~` (RFC 3986's unreserved characters).
const SEGMENT: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Percent-encode each `/`-separated segment of `path` (names, not URL syntax): the
/// inverse of [`decode_segments`]. `%2e%2e` stays a name (`%252e%252e`), `?` and `#` do not
/// start a query or a fragment. A segment that is `.` or `..` itself is not a name: URL
/// parsers resolve it (percent-encoded too), so callers refuse such names first, as
/// [`SecretPath`] does.
pub fn encode_segments(path: &str) -> String {
    path.split('/').map(|s| percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()).collect::<Vec<_>>().join("/")
}

impl SecretPath {
    /// Parse the part of a URL path after the mount (still percent-encoded).
    pub fn from_url(raw: &str) -> Result<Self, PathError> {
        Self::from_segments(&decode_segments(raw)?)
    }

    /// Parse an already decoded path.
    pub fn parse(path: &str) -> Result<Self, PathError> {
        let segments: Vec<String> = path.split('/').map(str::to_owned).collect();
        Self::from_segments(&segments)
    }

    /// A path from decoded segments.
    pub fn from_segments(segments: &[String]) -> Result<Self, PathError> {
        if segments.len() > MAX_SEGMENTS {
            return Err(PathError("more than 32 segments"));
        }
        for s in segments {
            check_segment(s)?;
        }
        let path = segments.join("/");
        if path.len() > MAX_PATH_LEN {
            return Err(PathError("longer than 512 bytes"));
        }
        Ok(SecretPath(path))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl SecretPrefix {
    /// Parse a list prefix: empty, `a/b`, or `a/b/` (decoded).
    pub fn parse(path: &str) -> Result<Self, PathError> {
        let trimmed = path.strip_suffix('/').unwrap_or(path);
        if trimmed.is_empty() {
            return Ok(SecretPrefix(String::new()));
        }
        let path = SecretPath::parse(trimmed)?;
        Ok(SecretPrefix(format!("{}/", path.0)))
    }

    /// Parse a list prefix from the URL (still percent-encoded).
    pub fn from_url(raw: &str) -> Result<Self, PathError> {
        let trimmed = raw.strip_suffix('/').unwrap_or(raw);
        if trimmed.is_empty() {
            return Ok(SecretPrefix(String::new()));
        }
        let path = SecretPath::from_url(trimmed)?;
        Ok(SecretPrefix(format!("{}/", path.0)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The reply to a write: the new version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Written {
    pub version: u64,
    pub created_time: String,
}

/// The `metadata` beside `data` in a read's reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Metadata {
    pub version: u64,
    pub created_time: String,
    pub deletion_time: String,
    pub destroyed: bool,
    /// A proxied mount's upstream id of the version read (AWS `VersionId`, Azure's
    /// version), for `?version_id=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
}

/// The query of a read: `?version=N` (versions start at 1).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReadQuery {
    #[serde(default)]
    pub version: Option<u64>,
}

/// The query of a read on a proxied mount: a numbered version (KV version 2 upstreams),
/// or the upstream's own version id or staging label (AWS Secrets Manager, Azure Key
/// Vault); at most one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProxyReadQuery {
    #[serde(default)]
    pub version: Option<u64>,
    #[serde(default)]
    pub version_id: Option<String>,
    #[serde(default)]
    pub version_stage: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(SecretPath::from_url("a/b%20c").unwrap().as_str(), "a/b c");
        for bad in ["", "a//b", "a/../b", "./a", "a/%2e%2e/b", "a%2Fb", "a/\u{1}"] {
            assert!(SecretPath::from_url(bad).is_err(), "{bad:?}");
        }
        assert!(SecretPath::parse(&"a/".repeat(33)).is_err());
        assert_eq!(SecretPrefix::from_url("").unwrap().as_str(), "");
        assert_eq!(SecretPrefix::from_url("a/b/").unwrap().as_str(), "a/b/");
        assert_eq!(SecretPrefix::parse("a/b").unwrap().as_str(), "a/b/");
    }
}
