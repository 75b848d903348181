//! SGD with momentum, Nesterov and weight decay, step for step as `torch.optim.SGD`:
//! `g ← ∇ + wd·p; b ← μ·b + (1−τ)·g (b ← g on the first step); g ← g + μ·b (Nesterov) or b;
//! p ← p − lr·g`. Variables without a gradient (BN running statistics, frozen parts) are skipped.
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// SGD hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgdConfig {
    /// Momentum μ.
    pub momentum: f64,
    /// Dampening τ.
    #[serde(default)]
    pub dampening: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Exempt 1-D parameters (BN γ/β, biases) from weight decay.
    #[serde(default)]
    pub no_decay_1d: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            momentum: 0.9,
            dampening: 0.0,
            nesterov: true,
            weight_decay: 5e-4,
            no_decay_1d: false,
        }
    }
}

/// The optimizer over named variables.
pub struct Sgd {
    cfg: SgdConfig,
    vars: Vec<(String, Var)>,
    momentum: HashMap<String, Tensor>,
}

impl Sgd {
    /// Optimises `vars` (name, variable); names key the saved state.
    pub fn new(vars: Vec<(String, Var)>, cfg: SgdConfig) -> Self {
        Sgd {
            cfg,
            vars,
            momentum: HashMap::new(),
        }
    }

    /// One update at learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let c = &self.cfg;
        for (name, var) in &self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Detached: a gradient tensor still links to the step's graph, and a momentum buffer
            // built from it would keep every past step's graph alive.
            let g = g.detach();
            let p = var.as_tensor().detach();
            let decay = c.weight_decay != 0.0 && !(c.no_decay_1d && p.rank() <= 1);
            let mut g = if decay {
                (&g + (&p * c.weight_decay)?)?
            } else {
                g
            };
            if c.momentum != 0.0 {
                let buf = match self.momentum.get(name) {
                    Some(b) => ((b * c.momentum)? + (&g * (1.0 - c.dampening))?)?,
                    None => g.clone(),
                };
                g = if c.nesterov {
                    (g + (&buf * c.momentum)?)?
                } else {
                    buf.clone()
                };
                self.momentum.insert(name.clone(), buf);
            }
            var.set(&(p - (g * lr)?)?)?;
        }
        Ok(())
    }

    /// The momentum buffers by variable name (for checkpoints).
    pub fn state(&self) -> &HashMap<String, Tensor> {
        &self.momentum
    }

    /// Restores momentum buffers saved with [`Sgd::state`].
    pub fn load_state(&mut self, state: HashMap<String, Tensor>) {
        self.momentum = state;
    }
}
