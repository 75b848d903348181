//! CIFAR ResNets for candle, built for distillation.
//!
//! - [`ResNet`] (18/34/50, `cifar` and `cifar-maxpool` stems, any width) returns
//!   [`ModelOutput`] with logits, the stem's and each stage's features, the pooled embedding and
//!   optional auxiliary heads; [`ResNet::feature_info`] sizes adapters without a dummy pass.
//! - [`BatchNorm2d`] trains like PyTorch's; [`MaxPool2d`] pools with padding and has a backward.
//! - Parameter names follow torchvision, so converted PyTorch checkpoints load as they are;
//!   [`import_checkpoint`] converts them, [`Teacher`] runs them frozen.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use kd_models::{trainable_resnet, Arch, ResNetConfig, Stem};
//! let cfg = ResNetConfig { base_width: 8, ..ResNetConfig::new(Arch::Resnet18, Stem::Cifar, 10) };
//! let (model, _vars) = trainable_resnet(&cfg, &Device::Cpu, 0)?;
//! let x = Tensor::zeros((2, 3, 32, 32), candle_core::DType::F32, &Device::Cpu)?;
//! let out = model.forward_t(&x, false)?;
//! assert_eq!(out.logits.dims(), &[2, 10]);
//! assert_eq!(out.feats.len(), 5);
//! # Ok::<(), kd_models::ModelError>(())
//! ```
#![warn(missing_docs)]

pub mod batch_norm;
pub mod checkpoint;
mod error;
pub mod import;
pub mod init;
/// The padded max-pool lives in kd-kernels (it has CUDA kernels); re-exported here.
pub use kd_kernels::max_pool;
mod registry;
pub mod resnet;
mod teacher;

pub use batch_norm::{batch_norm2d, BatchNorm2d};
pub use checkpoint::{
    check_keys, expected_keys, load_frozen, load_into, save_varmap, trainable_resnet, write_atomic,
};
pub use error::{ModelError, Result};
pub use import::{import_checkpoint, import_teacher, TeacherMeta};
pub use max_pool::MaxPool2d;
pub use registry::{Arch, BlockKind, ResNetConfig, Stem};
pub use resnet::{AuxOutput, BranchGate, FeatureInfo, ForwardParts, Macs, ModelOutput, ResNet};
pub use teacher::{mean_logits, renormalize, Teacher};

/// The README's examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
