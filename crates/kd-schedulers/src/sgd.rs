//! SGD with momentum, Nesterov and weight decay, step for step as `torch.optim.SGD`:
//! `g ← ∇ + wd·p; b ← μ·b + (1−τ)·g (b ← g on the first step); g ← g + μ·b (Nesterov) or b;
//! p ← p − lr·g`. Variables without a gradient (BN running statistics, frozen parts) are skipped.
//!
//! Once a parameter has a momentum buffer, its update runs in place through kd-kernels
//! (`sgd_momentum_steps`: on CUDA one launch for up to 64 parameters, feature `cuda`; on the CPU
//! two passes a parameter) instead of about nine allocating element-wise ops; the arithmetic
//! and its order are the same (bit-identical on the CPU).
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
    /// Force the fused update on or off; `None`: on for CPU tensors, and for CUDA tensors in
    /// builds with kernels.
    fused: Option<bool>,
}

impl Sgd {
    /// Optimises `vars` (name, variable); names key the saved state.
    pub fn new(vars: Vec<(String, Var)>, cfg: SgdConfig) -> Self {
        Sgd {
            cfg,
            vars,
            momentum: HashMap::new(),
            fused: None,
        }
    }

    /// Forces the fused in-place update on (also on the CPU, for tests) or off.
    pub fn with_fused(mut self, fused: bool) -> Self {
        self.fused = Some(fused);
        self
    }

    fn fused_for(&self, p: &Tensor) -> bool {
        self.cfg.momentum != 0.0
            && p.dtype() == candle_core::DType::F32
            && self.fused.unwrap_or(
                (p.device().is_cpu() || kd_kernels::HAS_CUDA_KERNELS && p.device().is_cuda())
                    && kd_kernels::enabled(kd_kernels::Kernel::Sgd),
            )
    }

    /// One update at learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let c = &self.cfg;
        // The fused updates, run together at the end (one launch for all of them on CUDA); a
        // buffer's clone shares its storage, which the update writes in place.
        let mut fused_updates: Vec<(&Var, Tensor, Tensor, kd_kernels::SgdStep)> = Vec::new();
        for (name, var) in &self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Detached: a gradient tensor still links to the step's graph, and a momentum buffer
            // built from it would keep every past step's graph alive.
            let g = g.detach();
            let p = var.as_tensor().detach();
            let decay = c.weight_decay != 0.0 && !(c.no_decay_1d && p.rank() <= 1);
            let fused = self.fused_for(&p);
            if fused {
                if let Some(buf) = self.momentum.get(name) {
                    let step = kd_kernels::SgdStep {
                        lr,
                        momentum: c.momentum,
                        dampening: c.dampening,
                        weight_decay: if decay { c.weight_decay } else { 0.0 },
                        nesterov: c.nesterov,
                    };
                    fused_updates.push((var, g, buf.clone(), step));
                    continue;
                }
            }
            let mut g = if decay {
                (&g + (&p * c.weight_decay)?)?
            } else {
                g
            };
            if c.momentum != 0.0 {
                let buf = match self.momentum.get(name) {
                    Some(b) => ((b * c.momentum)? + (&g * (1.0 - c.dampening))?)?,
                    // The fused update writes the buffer in place: it must own its storage (a
                    // gradient may share one with another variable's gradient).
                    None if fused => g.copy()?,
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
        let updates: Vec<kd_kernels::SgdUpdate<'_>> = fused_updates
            .iter()
            .map(|(var, grad, buf, step)| kd_kernels::SgdUpdate {
                param: var.as_tensor(),
                grad,
                buf,
                step: *step,
            })
            .collect();
        kd_kernels::sgd_momentum_steps(&updates)
    }

    /// The momentum buffers by variable name (for checkpoints).
    pub fn state(&self) -> &HashMap<String, Tensor> {
        &self.momentum
    }

    /// Restores momentum buffers saved with [`Sgd::state`]. Each is copied: the fused update
    /// writes buffers in place, and the given tensors may be shared (another optimizer's).
    pub fn load_state(&mut self, state: HashMap<String, Tensor>) -> Result<()> {
        self.momentum = state
            .into_iter()
            .map(|(k, v)| Ok((k, v.copy()?)))
            .collect::<Result<_>>()?;
        Ok(())
    }
}
