//! Neuron selectivity transfer, NST (Huang & Wang 2017, "Like What You Like: Knowledge Distill
//! via Neuron Selectivity Transfer"): CE + weight · Σ over stages 1–4 of the squared MMD
//! (polynomial kernel) between the student's and the teacher's channel-map distributions,
//! maps aligned spatially.
use candle_core::Result;
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// NST on stages 1–4.
#[derive(Clone, Copy, Debug)]
pub struct Nst {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Weight of the summed MMD terms (50 in RepDistiller's benchmark).
    pub weight: f64,
}

impl Distiller for Nst {
    fn name(&self) -> &'static str {
        "nst"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = super::teacher_outputs(self.name(), out.teacher)?;
        let mmd = super::sum_levels(
            self.name(),
            (1..student.feats.len())
                .map(|i| kd_losses::nst_loss(&student.feats[i], &teacher.feats[i])),
        )?;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push("loss_nst", (mmd * self.weight)?);
        Ok(t)
    }
}
