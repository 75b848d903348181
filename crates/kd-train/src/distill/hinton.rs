//! Offline response distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
//! Neural Network"): `(1−α)·CE(student, y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T))`; with
//! `standardize`, both sides' logits are z-scored per image first (Sun et al. 2024, "Logit
//! Standardization in Knowledge Distillation"), so the student need not match the teacher's
//! logit scale.
use candle_core::Result;
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// Hinton KD.
#[derive(Clone, Copy, Debug)]
pub struct Hinton {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Weight of the KD term.
    pub alpha: f64,
    /// Temperature (the base temperature under standardisation).
    pub temperature: f64,
    /// Z-score each image's logits on both sides before the temperature.
    pub standardize: bool,
}

impl Distiller for Hinton {
    fn name(&self) -> &'static str {
        "kd"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = out.teacher;
        let teacher = super::teacher_outputs(self.name(), teacher)?;
        let mut t = LossTerms::default();
        t.push(
            "loss_ce",
            (self.ce.of(&student.logits, batch)? * (1.0 - self.alpha))?,
        );
        let (zs, zt) = super::compared_logits(&student.logits, &teacher.logits, self.standardize)?;
        let kd = kd_losses::kd_loss(&zs, &zt, self.temperature)?;
        t.push("loss_kd", (kd * self.alpha)?);
        Ok(t)
    }

    /// Logits, pooled embeddings or pre-activations only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::fixtures::distillation_of_a_scaled_copy;

    /// A student whose logits are the teacher's scaled and shifted has the teacher's relations
    /// but not its scale: standardised KD is (nearly) 0, plain KD is not.
    #[test]
    fn standardised_kd_ignores_the_logit_scale() {
        let kd = |standardize| {
            distillation_of_a_scaled_copy(&Hinton {
                ce: CrossEntropy { smoothing: 0.0 },
                alpha: 1.0,
                temperature: 4.0,
                standardize,
            })
        };
        assert!(kd(true) < 1e-5, "standardised: {}", kd(true));
        assert!(kd(false) > 0.1, "plain: {}", kd(false));
    }
}
