//! The Hugging Face Hub through `hf-hub`, with the offline switch it lacks (`HF_HUB_OFFLINE`)
//! and a content check: the Hub names a large file's blob by its SHA-256, which we recompute.
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo};

use crate::checksum::{digest_file, Digests};
use crate::{ChecksumMismatch, FetchError, Result};

/// Where the Hub is and how to reach it.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// Cache folder (the `hf-hub` layout).
    pub cache_dir: PathBuf,
    /// Endpoint replacing `https://huggingface.co` (a mirror or a test server).
    pub endpoint: Option<String>,
    /// Use only what the cache already holds.
    pub offline: bool,
    /// Show a progress bar.
    pub progress: bool,
}

/// Returns the local path of `repo/file`, downloading it unless offline, and its digests,
/// checked against the blob's SHA-256 name when it has one.
pub fn hub_get(repo: &str, file: &str, opts: &HubOptions) -> Result<(PathBuf, Digests)> {
    let path = if opts.offline {
        Cache::new(opts.cache_dir.clone())
            .repo(Repo::model(repo.to_string()))
            .get(file)
            .ok_or_else(|| FetchError::HubOffline {
                repo: repo.into(),
                file: file.into(),
                cache: opts.cache_dir.clone(),
            })?
    } else {
        let mut b = ApiBuilder::new()
            .with_cache_dir(opts.cache_dir.clone())
            .with_progress(opts.progress)
            .with_retries(2);
        if let Some(e) = &opts.endpoint {
            b = b.with_endpoint(e.trim_end_matches('/').to_string());
        }
        let hub_err = |e: hf_hub::api::sync::ApiError| FetchError::Hub {
            repo: repo.into(),
            file: file.into(),
            message: e.to_string(),
        };
        let api = b.build().map_err(hub_err)?;
        api.model(repo.to_string()).get(file).map_err(hub_err)?
    };
    let d = digest_file(&path)?;
    check_blob_name(&path, &d, repo, file)?;
    Ok((path, d))
}

fn check_blob_name(path: &Path, d: &Digests, repo: &str, file: &str) -> Result<()> {
    let blob = std::fs::canonicalize(path).map_err(FetchError::io(path))?;
    let name = blob
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.len() == 64
        && name.bytes().all(|b| b.is_ascii_hexdigit())
        && !name.eq_ignore_ascii_case(&d.sha256)
    {
        return Err(FetchError::Checksum(Box::new(ChecksumMismatch {
            source_desc: format!("Hugging Face Hub {repo}"),
            file: file.into(),
            algo: "sha256",
            expected: name,
            actual: d.sha256.clone(),
            hint: format!(
                " The cached blob {} is corrupt; delete it and fetch again.",
                blob.display()
            ),
        })));
    }
    Ok(())
}
