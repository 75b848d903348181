//! Learning-rate schedules as pure functions of (step, total steps): resuming needs only the step.
use serde::{Deserialize, Serialize};

/// A learning-rate schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum Schedule {
    /// The base rate throughout.
    Constant,
    /// Linear warm-up from `base/warmup_steps` to `base` over `warmup_steps`, then cosine
    /// annealing to `final_lr` at the last step (Loshchilov & Hutter 2017; Goyal et al. 2017).
    WarmupCosine {
        /// Steps of linear warm-up.
        warmup_steps: usize,
        /// Rate reached at the end.
        final_lr: f64,
    },
    /// Multiply by `gamma` at each milestone step (PyTorch's MultiStepLR).
    MultiStep {
        /// Steps at which the rate drops.
        milestones: Vec<usize>,
        /// Factor per milestone.
        gamma: f64,
    },
}

impl Schedule {
    /// The rate at `step` (0-based) of `total` steps for base rate `base`.
    pub fn lr(&self, base: f64, step: usize, total: usize) -> f64 {
        match self {
            Schedule::Constant => base,
            Schedule::WarmupCosine {
                warmup_steps,
                final_lr,
            } => {
                if step < *warmup_steps {
                    return base * (step + 1) as f64 / *warmup_steps as f64;
                }
                let span = total.saturating_sub(*warmup_steps).max(1);
                let t = ((step - warmup_steps) as f64 / span as f64).min(1.0);
                final_lr + (base - final_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
            Schedule::MultiStep { milestones, gamma } => {
                base * gamma.powi(milestones.iter().filter(|&&m| step >= m).count() as i32)
            }
        }
    }
}
