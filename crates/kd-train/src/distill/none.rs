//! The baseline: cross-entropy on the final head (mixed when the batch is mixed).
use candle_core::{Result, Tensor};
use kd_data::Batch;

use super::{Distiller, LossTerms, Outputs, StepContext};

/// Cross-entropy with label smoothing; also the supervised part of every other method.
#[derive(Clone, Copy, Debug)]
pub struct CrossEntropy {
    /// Label smoothing ε.
    pub smoothing: f64,
}

impl CrossEntropy {
    /// CE of `logits` against the batch's labels (λ-mixed with the partner labels under mixup).
    pub fn of(&self, logits: &Tensor, batch: &Batch) -> Result<Tensor> {
        match &batch.mix {
            Some((labels_b, lambda)) => kd_losses::mixed_cross_entropy(
                logits,
                &batch.labels,
                labels_b,
                *lambda as f64,
                self.smoothing,
            ),
            None => kd_losses::cross_entropy(logits, &batch.labels, self.smoothing),
        }
    }
}

impl Distiller for CrossEntropy {
    fn name(&self) -> &'static str {
        "none"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.of(&student.logits, batch)?);
        Ok(t)
    }

    /// Logits, pooled embeddings or pre-activations only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}
