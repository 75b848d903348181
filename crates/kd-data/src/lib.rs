//! Datasets for knowledge-distillation experiments on candle.
//!
//! - [`load_cifar10`] / [`load_cifar100`] read the official binary layouts (fine and coarse labels),
//!   [`load_image_folder`] reads `root/<split>/<class>/*.png|jpg`.
//! - Images stay in memory as `u8` (N×3×H×W); [`balanced_subset`] picks a class-balanced subset.
//! - [`Augment`], [`Normalize`] and [`Mix`] are seeded augmentations; [`Loader`] serves batches as
//!   candle tensors with a background prefetch thread.
//!
//! ```no_run
//! use std::sync::Arc;
//! use kd_data::{load_cifar100, Loader, LoaderConfig, Normalize};
//! let ds = load_cifar100("data/cifar100".as_ref())?;
//! let loader = Loader::new(Arc::new(ds.train), LoaderConfig::train(128, Normalize::CIFAR100, 0), candle_core::Device::Cpu)?;
//! for batch in loader.epoch(0, 0) {
//!     let batch = batch?;
//!     assert_eq!(batch.images.dims()[1..], [3, 32, 32]);
//! }
//! # Ok::<(), kd_data::DataError>(())
//! ```
#![warn(missing_docs)]

pub mod augment;
pub mod cifar;
mod dataset;
mod error;
pub mod folder;
pub mod loader;
pub mod randaugment;
mod spec;
pub mod subset;

pub use augment::{Augment, CropFlip, Mix, MixInfo, MixPlan, Normalize};
pub use cifar::{load_cifar10, load_cifar100};
pub use dataset::{Dataset, Split};
pub use error::{DataError, Result};
pub use folder::load_image_folder;
pub use loader::{Batch, EpochIter, HostBatch, Loader, LoaderConfig, Pairing};
pub use spec::DatasetSpec;
pub use subset::{balanced_subset, SubsetSpec};

/// The README's examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
