//! Probabilistic knowledge transfer, PKT (Passalis & Tefas 2018, "Learning Deep Representations
//! with Probabilistic Knowledge Transfer"): the student's batch distribution of cosine
//! similarities between pooled embeddings follows the teacher's (KL divergence); the widths of the
//! two embeddings may differ.
use candle_core::Result;
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// PKT on the pooled embeddings.
#[derive(Clone, Copy, Debug)]
pub struct Pkt {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Weight of the PKT term (30000 in RepDistiller's CIFAR-100 benchmark).
    pub weight: f64,
}

impl Distiller for Pkt {
    fn name(&self) -> &'static str {
        "pkt"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = super::teacher_outputs(self.name(), out.teacher)?;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push(
            "loss_pkt",
            (kd_losses::pkt_loss(&student.pooled, &teacher.pooled)? * self.weight)?,
        );
        Ok(t)
    }

    /// Logits, pooled embeddings or pre-activations only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}
