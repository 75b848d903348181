//! Weighted soft labels, WSLD (Zhou et al. 2021, "Rethinking Soft Labels for Knowledge
//! Distillation: A Bias-Variance Tradeoff Perspective"), as the authors' code
//! (`knowledge_distiller.py`) computes it: `CE + α·T²·mean_i w_i·(−Σ p_t·log p_s)`, the soft
//! cross-entropy at T weighted per image by `w = 1 − exp(−max(CE_s / (CE_t + 1e-7), 0))` from
//! the student's and the teacher's detached cross-entropies against the label
//! ([`kd_losses::wsld_loss`]). Under mixup (which the code does not handle) both
//! cross-entropies are the λ-mixed ones, as the supervised term is.
use candle_core::Result;
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// WSLD.
#[derive(Clone, Copy, Debug)]
pub struct Wsld {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Weight α of the weighted soft term.
    pub alpha: f64,
    /// Temperature.
    pub temperature: f64,
}

impl Distiller for Wsld {
    fn name(&self) -> &'static str {
        "wsld"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = super::teacher_outputs(self.name(), out.teacher)?;
        let logits = &student.logits;
        let target = super::label_distribution(batch, logits.dim(1)?, logits.dtype())?;
        let soft = kd_losses::wsld_loss(logits, &teacher.logits, &target, self.temperature)?;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(logits, batch)?);
        t.push("loss_wsld", (soft * self.alpha)?);
        Ok(t)
    }

    /// The logits only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::fixtures::labelled_batch;
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn mixed_labels_are_a_distribution() {
        let dev = Device::Cpu;
        let own = Tensor::new(&[0u32, 2], &dev).unwrap();
        let partner = Tensor::new(&[1u32, 2], &dev).unwrap();
        let batch = Batch {
            mix: Some((partner, 0.75)),
            ..labelled_batch(own.clone())
        };
        let y = crate::distill::label_distribution(&batch, 3, DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(y, [[0.75, 0.25, 0.0], [0.0, 0.0, 1.0]]);
        let y = crate::distill::label_distribution(&labelled_batch(own), 3, DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(y, [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]);
    }
}
