//! Fetching CIFAR-10/100 and the pretrained teachers: checksummed, resumable, offline-capable.
//!
//! Every download goes to `NAME.part` (resumed with HTTP `Range`), is verified against the pinned
//! checksum, unpacked into a staging folder with path-traversal protection, checked to load, and
//! renamed into place; nothing half-written is left and an earlier install survives a failure.
//! `--from DIR` installs from archives on disk, `--mirror URL` / `KD_MIRROR` replaces the base
//! URL, `HF_HUB_OFFLINE=1` keeps the Hub client to its cache.
//!
//! ```no_run
//! use kd_fetch::{fetch, Artifact, FetchOptions};
//! let opts = FetchOptions::from_env(None);
//! let done = fetch(Artifact::Cifar10, &opts)?;
//! println!("CIFAR-10 in {}", done.path.display());
//! # Ok::<(), kd_fetch::FetchError>(())
//! ```
#![warn(missing_docs)]

pub mod checksum;
mod error;
pub mod extract;
pub mod http;
pub mod hub;
pub mod install;
mod progress;
pub mod sources;

pub use checksum::{digest_file, Digests, Expected, Verify};
pub use error::{ChecksumMismatch, FetchError, Result};
pub use install::{
    default_data_dir, fetch, install_path, installed, teacher_weights, FetchOptions, InstallMarker,
    Installed, TEACHER_WEIGHTS,
};
pub use progress::Progress;
pub use sources::{Artifact, Source};

#[cfg(feature = "cli")]
pub mod cli;

/// The README's examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
