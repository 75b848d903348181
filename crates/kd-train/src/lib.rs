//! The kd training engine: metrics and evaluation (the trainer loop, run directories and exact
//! resume build on these).
#![warn(missing_docs)]

mod error;
pub mod evaluate;
pub mod metrics;

pub use error::{Result, TrainError};
pub use evaluate::{evaluate, EvalReport};
pub use metrics::Accuracy;
