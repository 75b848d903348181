//! DIST (Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher"): the student
//! matches the teacher's predictions up to shift and scale — their Pearson correlation per image
//! across classes (inter-class) and per class across the batch (intra-class) — rather than
//! exactly, as KL does, so a much stronger teacher stays a reachable target.
//! `CE + β·inter + γ·intra` ([`kd_losses::dist_terms`], each scaled by τ²). Under mixup the
//! relations are between the mixed images' predictions, as the teacher sees the same images.
use candle_core::Result;
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// DIST.
#[derive(Clone, Copy, Debug)]
pub struct Dist {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Weight β of the inter-class relation.
    pub beta: f64,
    /// Weight γ of the intra-class relation.
    pub gamma: f64,
    /// Temperature τ.
    pub temperature: f64,
}

impl Distiller for Dist {
    fn name(&self) -> &'static str {
        "dist"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = super::teacher_outputs(self.name(), out.teacher)?;
        let (inter, intra) =
            kd_losses::dist_terms(&student.logits, &teacher.logits, self.temperature)?;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push("loss_inter", (inter * self.beta)?);
        t.push("loss_intra", (intra * self.gamma)?);
        Ok(t)
    }

    /// Logits, pooled embeddings or pre-activations only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}
