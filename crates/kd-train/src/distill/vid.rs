//! Variational information distillation, VID (Ahn et al. 2019, "Variational Information
//! Distillation for Knowledge Transfer"): for each of stages 1–4 a regressor (1×1 conv, ReLU,
//! 1×1 conv, ReLU, 1×1 conv, teacher-wide) predicts the mean of a Gaussian over the teacher's
//! features, with a learned variance per channel; the loss is its negative log-likelihood, a
//! variational lower bound on the mutual information between the two networks' features.
//! As RepDistiller: the regressors and variances train with the student, the variances start at
//! 5, the larger map is pooled to the smaller's size before the regressor.
use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, VarBuilder};
use kd_data::Batch;
use kd_models::ResNet;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// The variance every channel starts at (RepDistiller's `init_pred_var`).
const INIT_VARIANCE: f64 = 5.0;
/// The variance's floor (RepDistiller's `eps`).
const VARIANCE_EPS: f64 = 1e-5;

/// One stage's regressor and variance parameter.
#[derive(Debug)]
struct StageHead {
    convs: [Conv2d; 3],
    /// The per-channel variance's parameter, 0 at the start ([`kd_losses::vid_variance`]).
    log_scale: Tensor,
}

/// VID on stages 1–4.
#[derive(Debug)]
pub struct Vid {
    ce: CrossEntropy,
    weight: f64,
    heads: Vec<StageHead>,
}

impl Vid {
    /// A regressor per stage from the student's channels to the teacher's, under `vb`
    /// (`stage{i}.conv{1,2,3}`, `stage{i}.log_scale`).
    pub fn new(
        ce: CrossEntropy,
        student: &ResNet,
        teacher: &ResNet,
        weight: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (s, t) = (student.feature_info(), teacher.feature_info());
        let mut heads = Vec::new();
        for i in 1..s.len().min(t.len()) {
            let (cs, ct) = (s[i].channels, t[i].channels);
            let vb = vb.pp(format!("stage{i}"));
            let conv = |cin: usize, name: &str| {
                candle_nn::conv2d_no_bias(cin, ct, 1, Default::default(), vb.pp(name))
            };
            heads.push(StageHead {
                convs: [conv(cs, "conv1")?, conv(ct, "conv2")?, conv(ct, "conv3")?],
                log_scale: vb.get_with_hints(ct, "log_scale", candle_nn::Init::Const(0.0))?,
            });
        }
        Ok(Vid { ce, weight, heads })
    }
}

impl Distiller for Vid {
    fn name(&self) -> &'static str {
        "vid"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = super::teacher_outputs(self.name(), out.teacher)?;
        let nll = super::sum_levels(
            self.name(),
            self.heads.iter().enumerate().map(|(k, head)| {
                let (s, t) =
                    kd_losses::align_spatial(&student.feats[k + 1], &teacher.feats[k + 1])?;
                let [c1, c2, c3] = &head.convs;
                let mean = c3.forward(&c2.forward(&c1.forward(&s)?.relu()?)?.relu()?)?;
                let var = kd_losses::vid_variance(&head.log_scale, INIT_VARIANCE, VARIANCE_EPS)?;
                kd_losses::vid_loss(&mean, &t, &var)
            }),
        )?;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push("loss_vid", (nll * self.weight)?);
        Ok(t)
    }
}
