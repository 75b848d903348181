//! Learning-rate schedules, SGD and AdamW for candle training loops.
//!
//! ```
//! use kd_schedulers::Schedule;
//! let s = Schedule::WarmupCosine { warmup_steps: 5, final_lr: 0.0 };
//! assert!((s.lr(0.1, 4, 100) - 0.1).abs() < 1e-12);  // warm-up done
//! assert!(s.lr(0.1, 99, 100) < 1e-3);                  // annealed
//! ```
#![warn(missing_docs)]

pub mod adamw;
pub mod clip;
pub mod optimizer;
pub mod schedule;
pub mod sgd;

pub use adamw::{AdamW, AdamWConfig};
pub use clip::clip_grad_norm;
pub use optimizer::{Optimizer, OptimizerConfig};
pub use schedule::Schedule;
pub use sgd::{Sgd, SgdConfig};

/// The README's examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
