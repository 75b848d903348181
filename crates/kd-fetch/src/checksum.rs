//! Streaming MD5 / SHA-256 of files, and the policy that decides which value a file must have.
use std::io::Read;
use std::path::Path;

use md5::{Digest, Md5};
use sha2::Sha256;

use crate::{ChecksumMismatch, FetchError, Result};

/// Hex digests of one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digests {
    /// MD5, lowercase hex.
    pub md5: String,
    /// SHA-256, lowercase hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// Hashes a file once with both algorithms.
pub fn digest_file(path: &Path) -> Result<Digests> {
    let mut f = std::fs::File::open(path).map_err(FetchError::io(path))?;
    let mut md5 = Md5::new();
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(FetchError::io(path))?;
        if n == 0 {
            break;
        }
        md5.update(&buf[..n]);
        sha.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Digests {
        md5: hex::encode(md5.finalize()),
        sha256: hex::encode(sha.finalize()),
        size,
    })
}

/// The value a file must hash to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    /// An MD5 in hex.
    Md5(String),
    /// A SHA-256 in hex.
    Sha256(String),
}

/// How strictly a fetched file is checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Verify {
    /// Against the checksum pinned for the official source.
    #[default]
    Official,
    /// Against a checksum the user pins (`--md5` / `--sha256`), e.g. for a local re-encoding.
    Pinned(Expected),
    /// Not at all (`--no-verify`); the digests are still recorded in the install marker.
    Skip,
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.algo(), self.value())
    }
}

impl Expected {
    fn algo(&self) -> &'static str {
        match self {
            Expected::Md5(_) => "md5",
            Expected::Sha256(_) => "sha256",
        }
    }

    fn value(&self) -> &str {
        match self {
            Expected::Md5(v) | Expected::Sha256(v) => v,
        }
    }

    /// Checks `d` against this value; `source_desc` and `file` name the file in the error.
    pub fn check(&self, d: &Digests, source_desc: &str, file: &str, official: bool) -> Result<()> {
        let actual = match self {
            Expected::Md5(_) => &d.md5,
            Expected::Sha256(_) => &d.sha256,
        };
        if actual.eq_ignore_ascii_case(self.value()) {
            return Ok(());
        }
        let hint = if official {
            format!(
                " This is not the official file. To install this copy deliberately, pin it with --md5 {} (or --sha256 {}), or pass --no-verify.",
                d.md5, d.sha256
            )
        } else {
            " The file differs from the checksum you pinned.".to_string()
        };
        Err(FetchError::Checksum(Box::new(ChecksumMismatch {
            source_desc: source_desc.into(),
            file: file.into(),
            algo: self.algo(),
            expected: self.value().to_ascii_lowercase(),
            actual: actual.clone(),
            hint,
        })))
    }
}

/// Parses a user-given hex digest, checking its length.
pub fn parse_hex(field: &'static str, value: &str, len: usize) -> Result<String> {
    let v = value.trim().to_ascii_lowercase();
    if v.len() != len || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FetchError::Invalid {
            field,
            message: format!("{value:?} is not {len} hex digits"),
        });
    }
    Ok(v)
}
