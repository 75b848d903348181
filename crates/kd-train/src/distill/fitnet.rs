//! FitNets (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"): a learnable regressor
//! (1×1 conv, BN, ReLU — the teacher's stage output it predicts is post-ReLU) maps a student stage
//! onto the matching teacher stage; MSE after average-pooling the larger map to the smaller one's
//! resolution (stems differ: 32/16/8/4 px vs 16/8/4/2 px). Trained in one stage with the
//! cross-entropy, weight 100 on the middle stage, as RepDistiller's and mdistiller's CIFAR
//! benchmarks (`ConvReg`, β = 100); where their maps differ in size they use a strided or
//! transposed convolution instead of the pooling.
use candle_core::{Module, Result};
use candle_nn::{Conv2d, VarBuilder};
use kd_data::Batch;
use kd_models::{batch_norm2d, BatchNorm2d, ResNet};

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// FitNets hint on one stage.
pub struct FitNet {
    ce: CrossEntropy,
    stage: usize,
    weight: f64,
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl FitNet {
    /// A regressor from the student's `stage` channels to the teacher's.
    pub fn new(
        ce: CrossEntropy,
        student: &ResNet,
        teacher: &ResNet,
        stage: usize,
        weight: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (s, t) = (student.feature_info(), teacher.feature_info());
        if stage >= s.len() {
            candle_core::bail!(
                "fitnet stage {stage}: the models have features 0..{}",
                s.len() - 1
            );
        }
        let conv = candle_nn::conv2d_no_bias(
            s[stage].channels,
            t[stage].channels,
            1,
            Default::default(),
            vb.pp("conv"),
        )?;
        let bn = batch_norm2d(t[stage].channels, vb.pp("bn"))?;
        Ok(FitNet {
            ce,
            stage,
            weight,
            conv,
            bn,
        })
    }
}

impl Distiller for FitNet {
    fn name(&self) -> &'static str {
        "fitnet"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = out.teacher;
        let teacher = super::teacher_outputs(self.name(), teacher)?;
        let mapped = self
            .bn
            .forward_relu_t(&self.conv.forward(&student.feats[self.stage])?, true)?;
        let (s, t) = kd_losses::align_spatial(&mapped, &teacher.feats[self.stage])?;
        let mut terms = LossTerms::default();
        terms.push("loss_ce", self.ce.of(&student.logits, batch)?);
        terms.push("loss_hint", (kd_losses::hint_loss(&s, &t)? * self.weight)?);
        Ok(terms)
    }
}
