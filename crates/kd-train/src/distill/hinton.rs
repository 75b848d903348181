//! Offline response distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
//! Neural Network"): `(1−α)·CE(student, y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T))`.
use candle_core::Result;
use kd_data::Batch;
use kd_models::ModelOutput;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, StepContext};

/// Hinton KD.
#[derive(Clone, Copy, Debug)]
pub struct Hinton {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Weight of the KD term.
    pub alpha: f64,
    /// Temperature.
    pub temperature: f64,
}

impl Distiller for Hinton {
    fn name(&self) -> &'static str {
        "kd"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, student: &ModelOutput, teacher: Option<&ModelOutput>) -> Result<LossTerms> {
        let teacher = super::teacher_outputs(self.name(), teacher)?;
        let mut t = LossTerms::default();
        t.push("loss_ce", (self.ce.of(&student.logits, batch)? * (1.0 - self.alpha))?);
        t.push("loss_kd", (kd_losses::kd_loss(&student.logits, &teacher.logits, self.temperature)? * self.alpha)?);
        Ok(t)
    }
}
