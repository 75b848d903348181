//! Typed errors of the training engine.
use std::path::PathBuf;

/// Everything that can go wrong in training or evaluation.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The data pipeline failed.
    #[error(transparent)]
    Data(#[from] kd_data::DataError),
    /// A model or checkpoint problem.
    #[error(transparent)]
    Model(#[from] kd_models::ModelError),
    /// The loss became NaN or infinite.
    #[error(
        "non-finite loss {value} at epoch {epoch}, step {step}; the last good checkpoint is kept"
    )]
    NonFinite {
        /// Epoch (0-based).
        epoch: usize,
        /// Step within the epoch.
        step: usize,
        /// The loss value.
        value: f32,
    },
    /// The loss of a method's init phase became NaN or infinite.
    #[error("non-finite loss {value} in the init phase of method {method} at its epoch {epoch}, step {step}: try a lower method.init_lr")]
    NonFiniteInit {
        /// The method.
        method: String,
        /// Epoch of the phase (0-based).
        epoch: usize,
        /// Step within the epoch.
        step: usize,
        /// The loss value.
        value: f32,
    },
    /// An I/O error on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A bad state or argument.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, TrainError>;
