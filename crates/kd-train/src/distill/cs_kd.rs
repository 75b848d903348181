//! Class-wise self-knowledge distillation, CS-KD (Yun et al. 2020): a second image of the same
//! class, through the same network without gradient, provides a softened target:
//! `CE(x) + weight·T²·KL(softmax(f(x')/T) ‖ softmax(f(x)/T))`, with `x'` drawn by the loader's
//! [`kd_data::Pairing::SameClass`]. The paper's CIFAR settings are T = 4, weight 1.
use candle_core::Result;
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// CS-KD.
#[derive(Clone, Copy, Debug)]
pub struct CsKd {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Weight λ of the class-wise term.
    pub weight: f64,
    /// Temperature.
    pub temperature: f64,
}

impl Distiller for CsKd {
    fn name(&self) -> &'static str {
        "cs_kd"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let partner = super::paired_outputs(self.name(), out.paired)?
            .logits
            .detach();
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&out.student.logits, batch)?);
        t.push(
            "loss_cls",
            (kd_losses::kd_loss(&out.student.logits, &partner, self.temperature)? * self.weight)?,
        );
        Ok(t)
    }

    /// Logits, pooled embeddings or pre-activations only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}
