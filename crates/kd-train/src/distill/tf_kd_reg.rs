//! Teacher-free KD with a manually designed teacher, Tf-KD_reg (Yuan et al. 2020, "Revisiting
//! Knowledge Distillation via Label Smoothing Regularization"): no network teaches; a virtual
//! teacher that puts `correct_prob` on the label and spreads the rest, softened at the
//! temperature, regularises the student ([`kd_losses::virtual_teacher_loss`]). The loss is the
//! authors' `loss_kd_regularization`: `(1 − α)·CE + α·multiplier·KLDivLoss`, where their
//! `nn.KLDivLoss()` averages over the batch *and* the K classes, so the per-image KL weighs
//! `α·multiplier/K` (0.1 for their ResNet18 on CIFAR-100: α 0.1, multiplier 100, T 20,
//! correct_prob 0.99). Logged as `loss_ce` = (1 − α)·CE and `loss_reg`.
use candle_core::{Result, Tensor};
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// Tf-KD_reg.
#[derive(Clone, Copy, Debug)]
pub struct TfKdReg {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// α: the CE weighs 1 − α, the virtual teacher α·multiplier/K.
    pub alpha: f64,
    /// The temperature that softens the designed distribution.
    pub temperature: f64,
    /// Probability the designed distribution puts on the label.
    pub correct_prob: f64,
    /// The authors' multiplier of their class-averaged KL.
    pub multiplier: f64,
}

impl TfKdReg {
    /// KL(virtual teacher ‖ student) against the labels, λ-mixed with the partner labels'
    /// under mixup (as the cross-entropy is).
    fn kl(&self, logits: &Tensor, batch: &Batch) -> Result<Tensor> {
        let kl = |labels| {
            kd_losses::virtual_teacher_loss(logits, labels, self.correct_prob, self.temperature)
        };
        match &batch.mix {
            Some((labels_b, lambda)) => {
                let lambda = *lambda as f64;
                (kl(&batch.labels)? * lambda)? + (kl(labels_b)? * (1.0 - lambda))?
            }
            None => kl(&batch.labels),
        }
    }
}

impl Distiller for TfKdReg {
    fn name(&self) -> &'static str {
        "tf_kd_reg"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let logits = &out.student.logits;
        let k = logits.dim(1)? as f64;
        let mut t = LossTerms::default();
        t.push(
            "loss_ce",
            (self.ce.of(logits, batch)? * (1.0 - self.alpha))?,
        );
        t.push(
            "loss_reg",
            (self.kl(logits, batch)? * (self.alpha * self.multiplier / k))?,
        );
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
    use crate::distill::fixtures::{labelled_batch, logits_only};
    use candle_core::{DType, Device};

    fn batch(labels: Tensor, mix: Option<(Tensor, f32)>) -> Batch {
        Batch {
            mix,
            ..labelled_batch(labels)
        }
    }

    fn total(method: &TfKdReg, logits: &Tensor, batch: &Batch) -> f64 {
        let student = logits_only(logits.clone());
        let out = Outputs::student(&student);
        let terms = method.loss(&StepContext::one_step(), batch, &out).unwrap();
        assert_eq!(
            terms
                .terms
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>(),
            ["loss_ce", "loss_reg"]
        );
        terms
            .terms
            .iter()
            .map(|(_, v)| v.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap())
            .sum()
    }

    /// The whole loss equals the authors' `loss_kd_regularization` computed by PyTorch
    /// (kd-losses' fixture, `tools/fixtures/make_tf_kd_fixtures.py`); under mixup it is the
    /// λ-mix of the two labels' losses.
    #[test]
    fn the_authors_loss_and_its_mixup_form() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../kd-losses/tests/fixtures/tf_kd_reg.safetensors"
        );
        let f = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        for i in 0..3 {
            let get = |k: &str| f[&format!("tf_kd_reg.{i}.{k}")].clone();
            let params: Vec<f64> = get("params").to_vec1().unwrap();
            let method = TfKdReg {
                ce: CrossEntropy { smoothing: 0.0 },
                correct_prob: params[0],
                temperature: params[1],
                alpha: params[2],
                multiplier: params[3],
            };
            let logits = get("logits").to_dtype(DType::F32).unwrap();
            let labels = get("labels").to_dtype(DType::U32).unwrap();
            let want = get("loss").to_vec1::<f64>().unwrap()[0];
            let got = total(&method, &logits, &batch(labels.clone(), None));
            assert!(
                (got - want).abs() < 2e-5 * (1.0 + want),
                "case {i}: {got} vs {want}"
            );
            // Mixed with the labels reversed, λ = 0.3.
            let other = labels.flip(&[0]).unwrap();
            let mixed = total(&method, &logits, &batch(labels, Some((other.clone(), 0.3))));
            let b = total(&method, &logits, &batch(other, None));
            let want = 0.3 * got + 0.7 * b;
            assert!(
                (mixed - want).abs() < 2e-5 * (1.0 + want),
                "case {i} mixed: {mixed} vs {want}"
            );
        }
    }
}
