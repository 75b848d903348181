//! Multi-level logit distillation (MLKD; Jin, Wang & Lin 2023), as the authors' code computes
//! it (their `KD_ours`, the same as logit standardisation's `MLKD`): the student and the
//! teacher see each image twice, weakly (crop, flip) and strongly (then RandAugment and
//! Cutout, [`kd_data::Pairing::StrongView`]); the student aligns with the teacher at the
//! instance level (KD), the class level (K×K Gram matrices over the batch) and the batch level
//! (B×B), each at the temperatures {T, 3, 5, 2, 6}.
//!
//! The code's terms, with w the alignment weight and τ over the five temperatures:
//! - `loss_ce` = ce_weight · (CE(weak) + CE(strong));
//! - `loss_kd` = w · [f_B · Σ_τ KD_τ(weak) + Σ_{τ ∈ T, 3, 5} KD_τ(strong) + Σ_{τ ∈ 2, 6} KD_τ(weak)]
//!   (its "strong" sum takes the weak view at 2 and 6);
//! - `loss_cc` = w · f_K · Σ_τ CC_τ(weak), `loss_bc` = w · f_B · Σ_τ BC_τ(weak) (the strong
//!   view's CC and BC are computed there but left out of the total, so not here).
//!
//! The paper masks images (and classes) by the teacher's confidence; the code multiplies the
//! already-averaged loss by the mask and averages it, so the mask only scales the term by the
//! fraction kept: f_B of the images whose teacher confidence (top softmax probability on the
//! weak view) is at or below the batch median, f_K of the classes whose summed probability is.
//! kd does the same. With `standardize` the KD terms (only they, as in logit standardisation's
//! code) compare z-scored logits.
use candle_core::{DType, Result, Tensor, D};
use candle_nn::ops::softmax;
use kd_data::Batch;
use kd_losses::{
    batch_correlation_loss, class_correlation_loss, fraction_at_or_below_median, kd_loss,
};

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// The temperatures after the configured one, in the authors' order.
pub const OTHER_TEMPERATURES: [f64; 4] = [3.0, 5.0, 2.0, 6.0];

/// MLKD.
#[derive(Clone, Copy, Debug)]
pub struct Mlkd {
    /// The supervised term on each view.
    pub ce: CrossEntropy,
    /// Weight of each view's CE (the authors' `CE_WEIGHT`).
    pub ce_weight: f64,
    /// Weight of every alignment term (`KD_WEIGHT`).
    pub weight: f64,
    /// The first temperature (`KD.TEMPERATURE`).
    pub temperature: f64,
    /// Z-score the logits of the KD terms first (logit standardisation, Sun et al. 2024).
    pub standardize: bool,
}

impl Mlkd {
    fn temperatures(&self) -> [f64; 5] {
        let [a, b, c, d] = OTHER_TEMPERATURES;
        [self.temperature, a, b, c, d]
    }
}

/// (f_B, f_K) of the teacher's weak-view probabilities `p` (B, K) f32: the shares of images
/// (top probability) and of classes (summed probability) at or below their median, as the
/// authors' `np.percentile` finds them on the host. Both vectors come over in one read (one
/// device synchronisation a step).
fn mask_shares(p: &Tensor) -> Result<(f64, f64)> {
    let b = p.dim(0)?;
    let both: Vec<f32> = Tensor::cat(&[p.max(D::Minus1)?, p.sum(0)?], 0)?.to_vec1()?;
    let (images, classes) = both.split_at(b);
    Ok((
        fraction_at_or_below_median(images),
        fraction_at_or_below_median(classes),
    ))
}

impl Distiller for Mlkd {
    fn name(&self) -> &'static str {
        "mlkd"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let sw = &out.student.logits;
        let ss = &super::paired_outputs(self.name(), out.paired)?.logits;
        let teacher = &super::teacher_outputs(self.name(), out.teacher)?.logits;
        let b = sw.dim(0)?;
        if teacher.dim(0)? != 2 * b {
            candle_core::bail!("mlkd needs the teacher on both views ({} rows, the weak then the strong), got {}: run it through teacher_forward", 2 * b, teacher.dim(0)?);
        }
        let (tw, ts) = (
            teacher.narrow(0, 0, b)?.detach(),
            teacher.narrow(0, b, b)?.detach(),
        );
        let p = softmax(&tw.to_dtype(DType::F32)?, D::Minus1)?;
        let (f_b, f_k) = mask_shares(&p)?;

        let (ksw, ktw) = super::compared_logits(sw, &tw, self.standardize)?;
        let (kss, kts) = super::compared_logits(ss, &ts, self.standardize)?;
        let sum = |f: &dyn Fn(f64) -> Result<Tensor>, temps: &[f64]| -> Result<Tensor> {
            super::sum_levels(self.name(), temps.iter().map(|&t| f(t)))
        };
        let all = self.temperatures();
        let weak_kd = sum(&|t| kd_loss(&ksw, &ktw, t), &all)?;
        let strong_kd = sum(&|t| kd_loss(&kss, &kts, t), &all[..3])?;
        let weak_tail = sum(&|t| kd_loss(&ksw, &ktw, t), &all[3..])?;
        let cc = sum(&|t| class_correlation_loss(sw, &tw, t), &all)?;
        let bc = sum(&|t| batch_correlation_loss(sw, &tw, t), &all)?;

        let mut terms = LossTerms::default();
        terms.push(
            "loss_ce",
            ((self.ce.of(sw, batch)? + self.ce.of(ss, batch)?)? * self.ce_weight)?,
        );
        terms.push(
            "loss_kd",
            ((((weak_kd * f_b)? + strong_kd)? + weak_tail)? * self.weight)?,
        );
        terms.push("loss_cc", (cc * (self.weight * f_k))?);
        terms.push("loss_bc", (bc * (self.weight * f_b))?);
        Ok(terms)
    }

    fn teacher_sees_paired(&self) -> bool {
        true
    }

    /// Logits only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::fixtures::{
        assert_terms, get, labelled_batch, load, logits_only as output, rel_err,
    };
    use candle_core::{Device, Var};

    /// Every term and the gradients of their sum for both views' logits equal the authors'
    /// loss dict computed by PyTorch in float64 (`tools/fixtures/make_mlkd_fixtures.py`): the
    /// defaults, logit standardisation's MLKD+LS on 100 classes with an odd batch, and a sharp
    /// teacher; kd computes in f32.
    #[test]
    fn the_authors_loss_dict_in_pytorch() {
        let f = load("mlkd");
        let dev = Device::Cpu;
        for i in 0..3 {
            let at = |k: &str| get(&f, &format!("mlkd.{i}.{k}"));
            let f32_of = |k: &str| at(k).to_dtype(DType::F32).unwrap();
            let p: Vec<f64> = at("params").to_vec1().unwrap();
            let method = Mlkd {
                ce: CrossEntropy { smoothing: 0.0 },
                ce_weight: p[0],
                weight: p[1],
                temperature: p[2],
                standardize: p[3] != 0.0,
            };
            let sw = Var::from_tensor(&f32_of("student_weak")).unwrap();
            let ss = Var::from_tensor(&f32_of("student_strong")).unwrap();
            let teacher =
                Tensor::cat(&[f32_of("teacher_weak"), f32_of("teacher_strong")], 0).unwrap();
            let labels = at("labels").to_dtype(DType::U32).unwrap();
            let b = labels.dim(0).unwrap();
            let batch = Batch {
                paired: Some(Tensor::zeros((b, 3, 2, 2), DType::F32, &dev).unwrap()),
                ..labelled_batch(labels)
            };
            let (student, strong, teacher) = (
                output(sw.as_tensor().clone()),
                output(ss.as_tensor().clone()),
                output(teacher),
            );
            let out = Outputs {
                student: &student,
                teacher: Some(&teacher),
                peers: &[],
                paired: Some(&strong),
                member: 0,
            };
            let terms = method.loss(&StepContext::one_step(), &batch, &out).unwrap();
            assert_terms(
                &terms,
                &["loss_ce", "loss_kd", "loss_cc", "loss_bc"],
                at,
                &format!("case {i}"),
            );
            let grads = terms.total().unwrap().backward().unwrap();
            for (var, key) in [(&sw, "grad_weak"), (&ss, "grad_strong")] {
                let e = rel_err(grads.get(var.as_tensor()).unwrap(), &at(key));
                assert!(e < 2e-5, "case {i} {key}: relative error {e:.2e}");
            }
        }
    }

    /// Without the strong view's teacher rows the method says what it needs.
    #[test]
    fn refuses_a_teacher_on_one_view() {
        let dev = Device::Cpu;
        let z = Tensor::new(&[[1f32, 0.0, -1.0], [0.5, 0.2, 0.1]], &dev).unwrap();
        let (s, t) = (output(z.clone()), output(z.clone()));
        let batch = labelled_batch(Tensor::new(&[0u32, 1], &dev).unwrap());
        let out = Outputs {
            student: &s,
            teacher: Some(&t),
            peers: &[],
            paired: Some(&s),
            member: 0,
        };
        let method = Mlkd {
            ce: CrossEntropy { smoothing: 0.0 },
            ce_weight: 0.1,
            weight: 0.9,
            temperature: 4.0,
            standardize: false,
        };
        let err = method
            .loss(&StepContext::one_step(), &batch, &out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("both views"), "{err}");
    }
}
