//! Attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention"):
//! CE + β/2 · Σ over stages 1–4 of the attention-map loss (p = 2), maps aligned spatially.
use candle_core::Result;
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// Attention transfer.
#[derive(Clone, Copy, Debug)]
pub struct Attention {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// β.
    pub weight: f64,
}

impl Distiller for Attention {
    fn name(&self) -> &'static str {
        "at"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = out.teacher;
        let teacher = super::teacher_outputs(self.name(), teacher)?;
        let at = super::sum_levels(
            self.name(),
            (1..student.feats.len())
                .map(|i| kd_losses::attention_loss(&student.feats[i], &teacher.feats[i])),
        )?;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push("loss_at", (at * (self.weight / 2.0))?);
        Ok(t)
    }
}
