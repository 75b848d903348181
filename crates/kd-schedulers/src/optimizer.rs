//! One type for the optimizers a run can choose, so the trainer and checkpoints need no generics.
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::adamw::{AdamW, AdamWConfig};
use crate::sgd::{Sgd, SgdConfig};

/// Which optimizer, with its hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum OptimizerConfig {
    /// SGD with momentum / Nesterov / weight decay.
    Sgd(SgdConfig),
    /// AdamW.
    Adamw(AdamWConfig),
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig::Sgd(SgdConfig::default())
    }
}

/// A constructed optimizer.
pub enum Optimizer {
    /// SGD.
    Sgd(Sgd),
    /// AdamW.
    Adamw(AdamW),
}

impl Optimizer {
    /// Builds the optimizer over `vars`.
    pub fn new(cfg: &OptimizerConfig, vars: Vec<(String, Var)>) -> Self {
        match cfg {
            OptimizerConfig::Sgd(c) => Optimizer::Sgd(Sgd::new(vars, c.clone())),
            OptimizerConfig::Adamw(c) => Optimizer::Adamw(AdamW::new(vars, c.clone())),
        }
    }

    /// One update at learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        match self {
            Optimizer::Sgd(o) => o.step(grads, lr),
            Optimizer::Adamw(o) => o.step(grads, lr),
        }
    }

    /// Its state as named tensors (for checkpoints).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        match self {
            Optimizer::Sgd(o) => Ok(o.state().clone()),
            Optimizer::Adamw(o) => o.state(),
        }
    }

    /// Restores a state saved with [`Optimizer::state`].
    pub fn load_state(&mut self, state: HashMap<String, Tensor>) -> Result<()> {
        match self {
            Optimizer::Sgd(o) => o.load_state(state),
            Optimizer::Adamw(o) => o.load_state(state),
        }
    }
}
