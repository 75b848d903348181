//! Offline + self distillation (the seed's "self teacher"): Hinton KD from a frozen teacher on
//! the final head, plus the BYOT terms on the auxiliary heads.
use candle_core::Result;
use kd_data::Batch;

use super::byot::Byot;
use super::hinton::Hinton;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// KD + BYOT.
pub struct OfflineSelf {
    /// The teacher's term on the final head (with its CE).
    pub kd: Hinton,
    /// The self-distillation terms.
    pub byot: Byot,
}

impl Distiller for OfflineSelf {
    fn name(&self) -> &'static str {
        "kd_byot"
    }

    fn loss(&self, ctx: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let mut t = self.kd.loss(ctx, batch, out)?;
        t.extend(self.byot.head_terms(batch, student)?);
        Ok(t)
    }

    /// Logits, pooled embeddings or pre-activations only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}
