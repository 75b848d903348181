//! The baseline: cross-entropy on the final head (mixed when the batch is mixed).
use candle_core::{Result, Tensor};
use kd_data::Batch;
use kd_models::ModelOutput;

use super::{Distiller, LossTerms, StepContext};

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
            Some((labels_b, lambda)) => kd_losses::mixed_cross_entropy(logits, &batch.labels, labels_b, *lambda as f64, self.smoothing),
            None => kd_losses::cross_entropy(logits, &batch.labels, self.smoothing),
        }
    }
}

impl Distiller for CrossEntropy {
    fn name(&self) -> &'static str {
        "none"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, student: &ModelOutput, _: Option<&ModelOutput>) -> Result<LossTerms> {
        let mut t = LossTerms::default();
        t.push("loss_ce", self.of(&student.logits, batch)?);
        Ok(t)
    }
}
