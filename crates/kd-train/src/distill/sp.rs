//! Similarity-preserving KD (Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation"):
//! the student's batch Gram matrix of last-stage features follows the teacher's.
use candle_core::Result;
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// SP on the last stage.
#[derive(Clone, Copy, Debug)]
pub struct Sp {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// γ.
    pub weight: f64,
}

impl Distiller for Sp {
    fn name(&self) -> &'static str {
        "sp"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = out.teacher;
        let teacher = super::teacher_outputs(self.name(), teacher)?;
        let last = student.feats.len() - 1;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push(
            "loss_sp",
            (kd_losses::sp_loss(&student.feats[last], &teacher.feats[last])? * self.weight)?,
        );
        Ok(t)
    }
}
