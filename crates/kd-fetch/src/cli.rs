//! The `fetch` command line, shared by `cargo xtask fetch` and `kd-runner fetch`.
use std::path::PathBuf;
use std::time::Duration;

use crate::checksum::{parse_hex, Expected, Verify};
use crate::{fetch, Artifact, FetchError, FetchOptions, Result};

/// Arguments of `fetch`.
#[derive(Clone, Debug, clap::Args)]
pub struct FetchArgs {
    /// What to install: cifar10, cifar100, teacher-cifar10, teacher-cifar100 or all.
    #[arg(default_value = "all")]
    pub what: Vec<String>,
    /// Data root (default: $KD_DATA_DIR or ./data).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Install from archives already on disk in DIR (same names as the downloads, same checks).
    #[arg(long, value_name = "DIR")]
    pub from: Option<PathBuf>,
    /// Base URL replacing the official locations (also $KD_MIRROR); FILE is fetched from URL/FILE.
    #[arg(long, value_name = "URL")]
    pub mirror: Option<String>,
    /// Accept a copy whose MD5 is HEX instead of the official checksum (e.g. a local re-encoding).
    #[arg(long, value_name = "HEX", conflicts_with_all = ["sha256", "no_verify"])]
    pub md5: Option<String>,
    /// Accept a copy whose SHA-256 is HEX instead of the official checksum.
    #[arg(long, value_name = "HEX", conflicts_with = "no_verify")]
    pub sha256: Option<String>,
    /// Install without checking any checksum (the digests are still recorded).
    #[arg(long)]
    pub no_verify: bool,
    /// Reinstall even if a verified install exists.
    #[arg(long)]
    pub force: bool,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
    /// Seconds without data before a transfer is abandoned.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

impl FetchArgs {
    /// The artifacts named (`all` expands to every one).
    pub fn artifacts(&self) -> Result<Vec<Artifact>> {
        let mut out = Vec::new();
        for w in &self.what {
            if w == "all" {
                out.extend(Artifact::ALL);
            } else {
                out.push(w.parse()?);
            }
        }
        out.dedup();
        Ok(out)
    }

    /// The options these arguments describe, on top of the environment.
    pub fn options(&self) -> Result<FetchOptions> {
        let mut o = FetchOptions::from_env(self.data_dir.clone());
        if let Some(m) = &self.mirror {
            o.mirror = Some(m.clone());
        }
        o.from = self.from.clone();
        o.verify = if self.no_verify {
            Verify::Skip
        } else if let Some(m) = &self.md5 {
            Verify::Pinned(Expected::Md5(parse_hex("--md5", m, 32)?))
        } else if let Some(s) = &self.sha256 {
            Verify::Pinned(Expected::Sha256(parse_hex("--sha256", s, 64)?))
        } else {
            Verify::Official
        };
        o.force = self.force;
        o.quiet = self.quiet;
        o.read_timeout = Duration::from_secs(self.timeout.max(1));
        Ok(o)
    }

    /// Runs the fetch, printing one line per artifact. Stops at the first failure.
    pub fn run(&self) -> Result<()> {
        let arts = self.artifacts()?;
        if arts.len() > 1 && (self.md5.is_some() || self.sha256.is_some()) {
            return Err(FetchError::Invalid {
                field: "--md5/--sha256",
                message: "pins one file: name exactly one artifact".into(),
            });
        }
        let opts = self.options()?;
        for a in arts {
            let done = fetch(a, &opts)?;
            let m = &done.marker;
            if done.already {
                println!(
                    "{a}: already installed in {} ({}; sha256 {})",
                    done.path.display(),
                    m.verified,
                    m.sha256
                );
            } else {
                println!(
                    "{a}: installed in {} from {} ({}; md5 {}, sha256 {})",
                    done.path.display(),
                    m.source,
                    m.verified,
                    m.md5,
                    m.sha256
                );
            }
        }
        Ok(())
    }
}

/// What a command line prints for an error: the error and its causes joined by ": ", leaving out
/// a cause the text before it already ends with. The libraries' errors on a path
/// (`Io { path, source }`) print their source in their own message, and walking the chain would
/// print it a second time. `kd-runner` and `cargo xtask` both print errors this way.
pub fn error_message(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    for cause in std::iter::successors(Some(e), |e| e.source()) {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod error_message_tests {
    use super::error_message;

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct OnPath {
        path: String,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("loading the teacher")]
    struct Context(#[source] OnPath);

    #[test]
    fn prints_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "not found");
        let e = Context(OnPath {
            path: "t.json".into(),
            source: io,
        });
        assert_eq!(error_message(&e), "loading the teacher: t.json: not found");
    }
}
