#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod calibration;
pub mod distill;
pub mod ensemble;
mod error;
pub mod evaluate;
pub mod fidelity;
pub mod metrics;
pub mod step;
pub mod trainer;

pub use calibration::Calibration;
pub use distill::{
    build_student, AbParams, BuiltStudent, CrdParams, CrossEntropy, Distiller, FtParams, InitPhase,
    LossTerms, MethodConfig, Outputs, Peer, PeerSpec, PlusKd, RunInfo, StepContext,
};
pub use error::{Result, TrainError};
pub use evaluate::{evaluate, evaluate_ensemble, EvalReport, Reference};
pub use fidelity::Fidelity;
pub use metrics::Accuracy;
pub use step::{renormalize, step_losses, teacher_forward, teacher_forward_parts, StepLosses};
pub use trainer::{
    export, latest_checkpoint, read_metrics, train, trainable_vars, trainable_vars_except,
    EpochMetrics, InitEpoch, PeerEpoch, PeerSummary, RunOptions, Student, Summary, TrainConfig,
};
