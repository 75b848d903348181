//! Losses for classification and knowledge distillation on candle.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let student = Tensor::new(&[[1.0f32, 2.0, 3.0]], &Device::Cpu)?;
//! let teacher = Tensor::new(&[[1.0f32, 2.0, 3.0]], &Device::Cpu)?;
//! let kd = kd_losses::kd_loss(&student, &teacher, 4.0)?.to_scalar::<f32>()?;
//! assert!(kd.abs() < 1e-6); // identical distributions
//! # Ok::<(), candle_core::Error>(())
//! ```
#![warn(missing_docs)]

pub mod classification;
pub mod hinton;

pub use classification::{cross_entropy, mixed_cross_entropy};
pub use hinton::kd_loss;
