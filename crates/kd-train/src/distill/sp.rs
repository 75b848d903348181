//! Similarity-preserving KD (Tung & Mori 2019, "Similarity-Preserving Knowledge Distillation"):
//! the student's batch Gram matrix of last-stage features follows the teacher's.
use candle_core::Result;
use kd_data::Batch;
use kd_models::ModelOutput;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, StepContext};

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

    fn loss(&self, _: &StepContext, batch: &Batch, student: &ModelOutput, teacher: Option<&ModelOutput>) -> Result<LossTerms> {
        let teacher = super::teacher_outputs(self.name(), teacher)?;
        let last = student.feats.len() - 1;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push("loss_sp", (kd_losses::sp_loss(&student.feats[last], &teacher.feats[last])? * self.weight)?);
        Ok(t)
    }
}
