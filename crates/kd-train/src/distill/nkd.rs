//! Normalized KD, NKD (Yang et al. 2023, "From Knowledge Distillation to Self-Knowledge
//! Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels"), as the
//! authors' code (yzd-v/cls_KD, `nkd.py`) computes it: `CE + target + γ·non-target`, the target
//! term −p_t\[y\]·log p_s\[y\] at T = 1 and the non-target term −T²·Σ_{k≠y} q_t,k·log q_s,k between the
//! teacher's and the student's distributions among the other classes at T
//! ([`kd_losses::nkd_terms`]). Under mixup the target class of a sample is its dominant label (the
//! code's argmax of the mixed label); the supervised term stays the mixed cross-entropy.
use candle_core::Result;
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// NKD.
#[derive(Clone, Copy, Debug)]
pub struct Nkd {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Weight γ of the non-target term.
    pub gamma: f64,
    /// Temperature of the non-target term.
    pub temperature: f64,
}

impl Distiller for Nkd {
    fn name(&self) -> &'static str {
        "nkd"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = super::teacher_outputs(self.name(), out.teacher)?;
        let terms = kd_losses::nkd_terms(
            &student.logits,
            &teacher.logits,
            super::dkd::target_labels(batch),
            self.temperature,
        )?;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push("loss_nkd_target", terms.target);
        t.push("loss_nkd_non_target", (terms.non_target * self.gamma)?);
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
    use crate::distill::fixtures::{labelled_batch, logits_only as output};
    use candle_core::{Device, Tensor};

    /// Under mixup the distillation terms are those of the dominant labels (the partner's when
    /// λ < ½), while the cross-entropy stays mixed.
    #[test]
    fn mixup_distils_towards_the_dominant_label() {
        let dev = Device::Cpu;
        let nkd = Nkd {
            ce: CrossEntropy { smoothing: 0.0 },
            gamma: 3.5,
            temperature: 3.0,
        };
        let s =
            output(Tensor::new(&[[1f32, -0.5, 2.0, 0.0], [0.3, 0.1, -1.0, 1.5]], &dev).unwrap());
        let t =
            output(Tensor::new(&[[2f32, 0.5, -1.0, 0.3], [0.0, 1.1, 0.4, -1.5]], &dev).unwrap());
        let out = Outputs {
            teacher: Some(&t),
            ..Outputs::student(&s)
        };
        let own = Tensor::new(&[0u32, 3], &dev).unwrap();
        let partner = Tensor::new(&[2u32, 1], &dev).unwrap();
        let terms = |batch: &Batch| {
            let t = nkd.loss(&StepContext::one_step(), batch, &out).unwrap();
            let v: Vec<f32> = t
                .terms
                .iter()
                .map(|(_, v)| v.to_scalar().unwrap())
                .collect();
            v
        };
        let mixed = |lambda| Batch {
            mix: Some((partner.clone(), lambda)),
            ..labelled_batch(own.clone())
        };
        let (as_partner, as_own) = (
            terms(&labelled_batch(partner.clone())),
            terms(&labelled_batch(own.clone())),
        );
        let (low, high) = (terms(&mixed(0.3)), terms(&mixed(0.7)));
        assert_eq!(low[1..], as_partner[1..]);
        assert_eq!(high[1..], as_own[1..]);
        assert_ne!(as_own[1..], as_partner[1..]);
        // The mixed cross-entropy is neither label's alone.
        assert!(low[0] != as_partner[0] && low[0] != as_own[0]);
    }

    #[test]
    fn nkd_needs_a_teacher() {
        let nkd = Nkd {
            ce: CrossEntropy { smoothing: 0.0 },
            gamma: 1.5,
            temperature: 1.0,
        };
        let s = output(Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap());
        let err = crate::distill::fixtures::refusal(&nkd, &s);
        assert!(err.contains("nkd needs teacher outputs"), "{err}");
    }
}
