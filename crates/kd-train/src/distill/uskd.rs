//! Universal self-knowledge distillation, USKD (Yang et al. 2023, "From Knowledge Distillation to
//! Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft
//! Labels"), NKD without a teacher, as the authors' code (yzd-v/cls_KD, `uskd.py`, and its
//! distiller's `sd` path) computes it: `CE + α·target + β·non-target + μ·weak`
//! ([`kd_losses::uskd_terms`]). The target's soft label comes from the network's own target
//! probability (p² + 1 − its batch mean), the non-target ones from Zipf's law over a ranking of
//! the classes that adds a "weak" head's predictions to the final head's. The weak head is a
//! linear classifier on the average-pooled output of the second-to-last stage (the code's
//! `fea_s[-2]`: stage 3 of a ResNet), trained on labels smoothed by 0.1 with weight μ; its
//! gradient reaches the stages below it, as in the code. It is a method part
//! (`distill.uskd.fc.*`), not exported. No mixup: the code's mixed form cuts both labels out of
//! every row and breaks where an image is mixed with one of its own class.
use candle_core::{bail, Result};
use candle_nn::{Linear, Module, VarBuilder};
use kd_data::Batch;
use kd_models::ResNet;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// USKD.
pub struct Uskd {
    ce: CrossEntropy,
    alpha: f64,
    beta: f64,
    mu: f64,
    /// The stage whose pooled output the weak head reads (feature index: 0 is the stem).
    stage: usize,
    weak: Linear,
}

impl Uskd {
    /// USKD for `student`, its weak head under `vb` (`fc.weight`, `fc.bias`): from the
    /// second-to-last stage's width to the classes.
    pub fn new(
        ce: CrossEntropy,
        alpha: f64,
        beta: f64,
        mu: f64,
        student: &ResNet,
        vb: VarBuilder,
    ) -> Result<Self> {
        let info = student.feature_info();
        if info.len() < 3 {
            bail!(
                "uskd needs a network of at least two stages, got {} features",
                info.len()
            );
        }
        let stage = info.len() - 2;
        let weak = candle_nn::linear(
            info[stage].channels,
            student.config().num_classes,
            vb.pp("fc"),
        )?;
        Ok(Uskd {
            ce,
            alpha,
            beta,
            mu,
            stage,
            weak,
        })
    }
}

impl Distiller for Uskd {
    fn name(&self) -> &'static str {
        "uskd"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        if batch.mix.is_some() {
            bail!("uskd makes its soft labels from one label per image and cannot follow mixed images: turn mixup off");
        }
        let student = out.student;
        let Some(f) = student.feats.get(self.stage) else {
            bail!(
                "uskd reads stage {} of the student, which returned {} features",
                self.stage,
                student.feats.len()
            );
        };
        let weak = self.weak.forward(&f.mean((2, 3))?)?;
        let terms = kd_losses::uskd_terms(&student.logits, &weak, &batch.labels)?;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push("loss_uskd_target", (terms.target * self.alpha)?);
        t.push("loss_uskd_non_target", (terms.non_target * self.beta)?);
        t.push("loss_uskd_weak", (terms.weak * self.mu)?);
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::fixtures::labelled_batch;
    use candle_core::{DType, Device, Tensor};
    use kd_models::{Arch, ResNetConfig, Stem};

    fn uskd(vars: &candle_nn::VarMap) -> (ResNet, Uskd) {
        let mut cfg = ResNetConfig::new(Arch::Resnet18, Stem::Cifar, 10);
        cfg.base_width = 4;
        let vb = VarBuilder::from_varmap(vars, DType::F32, &Device::Cpu);
        let model = ResNet::new(&cfg, vb.clone()).unwrap();
        let ce = CrossEntropy { smoothing: 0.0 };
        let method = Uskd::new(ce, 0.1, 0.1, 0.1, &model, vb.pp("distill").pp("uskd")).unwrap();
        (model, method)
    }

    /// The weak head reads stage 3 (16 channels at width 4) and trains: its variables get a
    /// gradient, and so does the stage below it, but not stage 4 through the weak head alone.
    #[test]
    fn the_weak_head_reads_stage_three_and_trains() {
        let vars = candle_nn::VarMap::new();
        let (model, method) = uskd(&vars);
        assert_eq!(method.stage, 3);
        let dims = vars.data().lock().unwrap()["distill.uskd.fc.weight"]
            .dims()
            .to_vec();
        assert_eq!(dims, [10, 16]);
        let x = Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &Device::Cpu).unwrap();
        let out = model.forward_t(&x, true).unwrap();
        let batch = labelled_batch(Tensor::new(&[0u32, 1, 2, 3], &Device::Cpu).unwrap());
        let terms = method
            .loss(&StepContext::one_step(), &batch, &Outputs::student(&out))
            .unwrap();
        let names: Vec<&str> = terms.terms.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "loss_ce",
                "loss_uskd_target",
                "loss_uskd_non_target",
                "loss_uskd_weak"
            ]
        );
        let weak = &terms.terms[3].1;
        let grads = weak.backward().unwrap();
        let data = vars.data().lock().unwrap();
        let has_grad = |name: &str| grads.get(data[name].as_tensor()).is_some();
        assert!(has_grad("distill.uskd.fc.weight"));
        assert!(has_grad("layer3.1.conv2.weight"));
        assert!(!has_grad("layer4.1.conv2.weight"));
        assert!(!has_grad("fc.weight"));
    }

    #[test]
    fn mixup_is_refused() {
        let vars = candle_nn::VarMap::new();
        let (model, method) = uskd(&vars);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
        let out = model.forward_t(&x, true).unwrap();
        let labels = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        let batch = Batch {
            mix: Some((labels.flip(&[0]).unwrap(), 0.6)),
            ..labelled_batch(labels)
        };
        let err = method
            .loss(&StepContext::one_step(), &batch, &Outputs::student(&out))
            .expect_err("mixup refused")
            .to_string();
        assert!(err.contains("turn mixup off"), "{err}");
    }
}
