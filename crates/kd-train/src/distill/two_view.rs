//! Two-view self-distillation (the seed's "same image, different augmentation"; in the spirit
//! of DDGSD, Xu & Liu 2019): each image goes through the network under two independent
//! augmentations; both views learn from the labels, and each view's softened prediction,
//! detached, teaches the other: `CE(a)/2 + CE(b)/2 + weight·T²·(KL(b ‖ a) + KL(a ‖ b))/2`.
//! The loader's [`kd_data::Pairing::SecondView`] supplies the second view.
use candle_core::Result;
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// Two-view self-distillation.
#[derive(Clone, Copy, Debug)]
pub struct TwoView {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Weight of the consistency term.
    pub weight: f64,
    /// Temperature.
    pub temperature: f64,
}

impl Distiller for TwoView {
    fn name(&self) -> &'static str {
        "two_view"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let a = &out.student.logits;
        let b = &super::paired_outputs(self.name(), out.paired)?.logits;
        let ce = ((self.ce.of(a, batch)? + self.ce.of(b, batch)?)? * 0.5)?;
        let a_from_b = kd_losses::kd_loss(a, &b.detach(), self.temperature)?;
        let b_from_a = kd_losses::kd_loss(b, &a.detach(), self.temperature)?;
        let mut t = LossTerms::default();
        t.push("loss_ce", ce);
        t.push(
            "loss_self_kd",
            ((a_from_b + b_from_a)? * (0.5 * self.weight))?,
        );
        Ok(t)
    }

    /// Logits, pooled embeddings or pre-activations only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}
