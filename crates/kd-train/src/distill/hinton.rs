//! Offline response distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
//! Neural Network"): `(1−α)·CE(student, y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T))`.
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
    /// Temperature.
    pub temperature: f64,
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
        t.push(
            "loss_kd",
            (kd_losses::kd_loss(&student.logits, &teacher.logits, self.temperature)? * self.alpha)?,
        );
        Ok(t)
    }
}
