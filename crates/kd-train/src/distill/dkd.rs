//! Decoupled knowledge distillation, DKD (Zhao et al. 2022, "Decoupled Knowledge
//! Distillation"): `CE + w(epoch)·(α·TCKD + β·NCKD)`, where w ramps linearly to 1 over the first
//! `warmup_epochs` epochs as in the authors' mdistiller (`min(epoch / warmup, 1)`, epochs counted
//! from 1). Under mixup the target class of a sample is its dominant label (λ ≥ ½: the image's own,
//! otherwise its partner's); the supervised term stays the mixed cross-entropy. With
//! `standardize`, both sides' logits are z-scored per image first (Sun et al. 2024).
use candle_core::{Result, Tensor};
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// DKD.
#[derive(Clone, Copy, Debug)]
pub struct Dkd {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Weight α of the target-class term.
    pub alpha: f64,
    /// Weight β of the non-target-class term.
    pub beta: f64,
    /// Temperature.
    pub temperature: f64,
    /// Epochs over which the distillation weight ramps up to 1 (0: none).
    pub warmup_epochs: f64,
    /// Z-score each image's logits on both sides before the temperature.
    pub standardize: bool,
}

impl Dkd {
    /// The ramp factor at `epoch` (0-based).
    pub fn warmup_factor(&self, epoch: usize) -> f64 {
        super::linear_ramp(epoch, self.warmup_epochs)
    }
}

/// The class each sample's target-class term is about: its label, or under mixup the label of
/// the image with the larger weight.
pub(super) fn target_labels(batch: &Batch) -> &Tensor {
    match &batch.mix {
        Some((partner, lambda)) if *lambda < 0.5 => partner,
        _ => &batch.labels,
    }
}

impl Distiller for Dkd {
    fn name(&self) -> &'static str {
        "dkd"
    }

    fn loss(&self, ctx: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = super::teacher_outputs(self.name(), out.teacher)?;
        let (s, t) = super::compared_logits(&student.logits, &teacher.logits, self.standardize)?;
        let terms = kd_losses::dkd_terms(&s, &t, target_labels(batch), self.temperature)?;
        let w = self.warmup_factor(ctx.epoch);
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push("loss_tckd", (terms.target * (w * self.alpha))?);
        t.push("loss_nckd", (terms.non_target * (w * self.beta))?);
        Ok(t)
    }

    /// Logits, pooled embeddings or pre-activations only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::fixtures::labelled_batch;
    use candle_core::Device;

    fn dkd(warmup_epochs: f64) -> Dkd {
        Dkd {
            ce: CrossEntropy { smoothing: 0.0 },
            alpha: 1.0,
            beta: 8.0,
            temperature: 4.0,
            warmup_epochs,
            standardize: false,
        }
    }

    #[test]
    fn warmup_ramps_like_mdistiller() {
        // mdistiller: min(epoch / warmup, 1) with epochs counted from 1.
        assert_eq!(dkd(20.0).warmup_factor(0), 0.05);
        assert_eq!(dkd(20.0).warmup_factor(9), 0.5);
        assert_eq!(dkd(20.0).warmup_factor(19), 1.0);
        assert_eq!(dkd(20.0).warmup_factor(150), 1.0);
        assert_eq!(dkd(0.0).warmup_factor(0), 1.0);
    }

    #[test]
    fn mixup_targets_the_dominant_label() {
        let dev = Device::Cpu;
        let own = Tensor::new(&[1u32, 2], &dev).unwrap();
        let partner = Tensor::new(&[3u32, 0], &dev).unwrap();
        let batch = |mix: Option<f32>| Batch {
            mix: mix.map(|l| (partner.clone(), l)),
            ..labelled_batch(own.clone())
        };
        let labels = |b: &Batch| target_labels(b).to_vec1::<u32>().unwrap();
        assert_eq!(labels(&batch(None)), [1, 2]);
        assert_eq!(labels(&batch(Some(0.7))), [1, 2]);
        assert_eq!(labels(&batch(Some(0.5))), [1, 2]);
        assert_eq!(labels(&batch(Some(0.3))), [3, 0]);
    }

    /// A student whose logits are the teacher's scaled and shifted: both DKD terms vanish with
    /// standardisation (the same z-scores), and not without it.
    #[test]
    fn standardised_dkd_ignores_the_logit_scale() {
        let distil = |standardize| {
            crate::distill::fixtures::distillation_of_a_scaled_copy(&Dkd {
                standardize,
                ..dkd(0.0)
            })
        };
        assert!(distil(true).abs() < 1e-4, "standardised: {}", distil(true));
        assert!(distil(false) > 0.1, "plain: {}", distil(false));
    }
}
