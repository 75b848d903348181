//! Attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention"):
//! CE + β/2 · Σ over the chosen stages (1–4 by default) of the attention-map loss (p = 2), maps
//! aligned spatially.
//!
//! The loss of a stage is a mean over its map's positions of normalised maps, so a stage weighs
//! in inversely to its area: with the max-pool stem at 32 px the last map is 2×2 and weighs 64
//! times the first. `stages` lets a study leave such a map out (the paper's CIFAR networks end
//! at 8×8).
use candle_core::Result;
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// The stages a ResNet has (feature 0 is the stem).
pub(super) const STAGES: std::ops::RangeInclusive<usize> = 1..=4;

/// Attention transfer.
#[derive(Clone, Debug)]
pub struct Attention {
    /// The supervised term.
    ce: CrossEntropy,
    /// β.
    weight: f64,
    /// The stages matched, strictly increasing, each in 1–4.
    stages: Vec<usize>,
}

impl Attention {
    /// AT on `stages`; an error naming `method.stages` unless they are distinct stages 1–4.
    pub fn new(ce: CrossEntropy, weight: f64, stages: &[usize]) -> Result<Self> {
        let mut sorted = stages.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.is_empty()
            || sorted.len() != stages.len()
            || !sorted.iter().all(|s| STAGES.contains(s))
        {
            candle_core::bail!(
                "method at: method.stages = {stages:?}: expected distinct stages 1–4, e.g. [1, 2, 3]"
            );
        }
        Ok(Attention {
            ce,
            weight,
            stages: sorted,
        })
    }
}

impl Distiller for Attention {
    fn name(&self) -> &'static str {
        "at"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = super::teacher_outputs(self.name(), out.teacher)?;
        let level = |i: usize| -> Result<_> {
            match (student.feats.get(i), teacher.feats.get(i)) {
                (Some(s), Some(t)) => kd_losses::attention_loss(s, t),
                _ => candle_core::bail!(
                    "at: stage {i} asked for, but the student has {} levels and the teacher {}",
                    student.feats.len(),
                    teacher.feats.len()
                ),
            }
        };
        let mut t = LossTerms::default();
        let mut weighted = Vec::with_capacity(self.stages.len());
        for &i in &self.stages {
            let w = (level(i)? * (self.weight / 2.0))?;
            // Each stage's share, logged beside the loss: which map dominates shows here.
            t.note(format!("at_stage{i}"), &w);
            weighted.push(Ok(w));
        }
        let at = super::sum_levels(self.name(), weighted)?;
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push("loss_at", at);
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::fixtures::labelled_batch;
    use candle_core::{DType, Device, Tensor};
    use kd_models::{trainable_resnet, Arch, ResNetConfig, Stem};

    fn out(arch: Arch, seed: u64, x: &Tensor) -> kd_models::ModelOutput {
        let cfg = ResNetConfig {
            base_width: 4,
            ..ResNetConfig::new(arch, Stem::CifarMaxpool, 10)
        };
        let (net, _) = trainable_resnet(&cfg, &Device::Cpu, seed).unwrap();
        net.forward_t(x, false).unwrap()
    }

    /// The term is β/2 times the sum of the chosen stages' attention losses, whatever order they
    /// are given in; leaving out the 2×2 last stage changes it; each stage's share is noted.
    #[test]
    fn sums_the_chosen_stages() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev).unwrap();
        let (s, t) = (out(Arch::Resnet18, 1, &x), out(Arch::Resnet50, 2, &x));
        assert_eq!(s.feats[4].dims()[2..], [2, 2]);
        let batch = Batch {
            images: x.clone(),
            ..labelled_batch(Tensor::new(&[1u32, 7], &dev).unwrap())
        };
        let outputs = Outputs {
            student: &s,
            teacher: Some(&t),
            peers: &[],
            paired: None,
            member: 0,
        };
        let ce = CrossEntropy { smoothing: 0.0 };
        let term = |stages: &[usize]| -> f64 {
            let at = Attention::new(ce, 1000.0, stages).unwrap();
            let l = at.loss(&StepContext::one_step(), &batch, &outputs).unwrap();
            let (_, v) = l.terms.iter().find(|(n, _)| n == "loss_at").unwrap();
            v.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
        };
        let by_stage: Vec<f64> = (0..=4)
            .map(|i| {
                kd_losses::attention_loss(&s.feats[i], &t.feats[i])
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            })
            .collect();
        let want = |stages: &[usize]| 500.0 * stages.iter().map(|&i| by_stage[i]).sum::<f64>();
        for stages in [&[1, 2, 3, 4][..], &[1, 2, 3], &[3, 1], &[4]] {
            let (got, want) = (term(stages), want(stages));
            assert!(
                (got - want).abs() <= 1e-5 * want,
                "{stages:?}: {got} vs {want}"
            );
        }
        assert!(term(&[1, 2, 3]) < term(&[1, 2, 3, 4]));
        // Each chosen stage's weighted share is reported, and only those.
        let at = Attention::new(ce, 1000.0, &[2, 4]).unwrap();
        let l = at.loss(&StepContext::one_step(), &batch, &outputs).unwrap();
        let names: Vec<&str> = l.values.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["at_stage2", "at_stage4"]);
        for ((_, v), i) in l.values.iter().zip([2, 4]) {
            let v = v.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            assert!((v - 500.0 * by_stage[i]).abs() <= 1e-5 * v, "stage {i}");
        }
    }

    #[test]
    fn refuses_stages_outside_one_to_four() {
        let ce = CrossEntropy { smoothing: 0.0 };
        for bad in [&[][..], &[0, 1], &[1, 5], &[2, 2]] {
            let err = Attention::new(ce, 1000.0, bad).unwrap_err().to_string();
            assert!(
                err.contains("method.stages") && err.contains("expected distinct stages 1–4"),
                "{err}"
            );
        }
    }
}
