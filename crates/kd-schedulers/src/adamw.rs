//! AdamW (Loshchilov & Hutter 2019) as `torch.optim.AdamW`: decoupled weight decay
//! `p ← p·(1 − lr·wd)`, then the bias-corrected Adam step `p ← p − lr·m̂/(√v̂ + ε)`.
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The optimizer over named variables.
pub struct AdamW {
    cfg: AdamWConfig,
    vars: Vec<(String, Var)>,
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
    t: HashMap<String, u64>,
}

impl AdamW {
    /// Optimises `vars` (name, variable).
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Self {
        AdamW {
            cfg,
            vars,
            m: HashMap::new(),
            v: HashMap::new(),
            t: HashMap::new(),
        }
    }

    /// One update at learning rate `lr`; variables without a gradient are skipped (and keep their step count).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let c = &self.cfg;
        for (name, var) in &self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.detach();
            let t = self.t.entry(name.clone()).or_insert(0);
            *t += 1;
            let m = match self.m.get(name) {
                Some(m) => ((m * c.beta1)? + (&g * (1.0 - c.beta1))?)?,
                None => (&g * (1.0 - c.beta1))?,
            };
            let v = match self.v.get(name) {
                Some(v) => ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?,
                None => (g.sqr()? * (1.0 - c.beta2))?,
            };
            let bc1 = 1.0 - c.beta1.powi(*t as i32);
            let bc2 = 1.0 - c.beta2.powi(*t as i32);
            let p = (var.as_tensor().detach() * (1.0 - lr * c.weight_decay))?;
            let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&m / bc1)? / denom)?;
            var.set(&(p - (update * lr)?)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }

    /// State as named tensors: `m.<name>`, `v.<name>`, `t.<name>` (step count as a 1-element f64).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (k, m) in &self.m {
            out.insert(format!("m.{k}"), m.clone());
            out.insert(format!("v.{k}"), self.v[k].clone());
            out.insert(
                format!("t.{k}"),
                Tensor::new(&[self.t[k] as f64], &Device::Cpu)?,
            );
        }
        Ok(out)
    }

    /// Restores state saved with [`AdamW::state`].
    pub fn load_state(&mut self, state: HashMap<String, Tensor>) -> Result<()> {
        for (k, t) in state {
            if let Some(n) = k.strip_prefix("m.") {
                self.m.insert(n.to_string(), t);
            } else if let Some(n) = k.strip_prefix("v.") {
                self.v.insert(n.to_string(), t);
            } else if let Some(n) = k.strip_prefix("t.") {
                self.t.insert(
                    n.to_string(),
                    t.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?[0] as u64,
                );
            }
        }
        Ok(())
    }
}
