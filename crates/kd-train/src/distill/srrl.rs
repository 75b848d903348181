//! Softmax regression representation learning, SRRL (Yang, Martinez, Bulat & Tzimiropoulos
//! 2021, "Knowledge Distillation via Softmax Regression Representation Learning"), as the
//! authors' code (jingyang2017/KD_SRRL, `train_imagenet_distillation.py`, `distiller_zoo/AIN.py`)
//! and cls_KD's `srrl.py` compute it: a connector (1×1 conv, BN, ReLU) maps the student's last
//! stage to the teacher's width; then `CE + α·MSE(pool(connector(s)), pool(t)) + β·MSE(fc_t(pool(
//! connector(s))), z_t)`: the pooled features are drawn to the teacher's, and the teacher's own
//! classifier, frozen, must give from the student's mapped features the logits it gives from its
//! own (the "softmax regression"). The gradient reaches the connector and the student through
//! the teacher's classifier, whose weights stay constant. The connector is a method part
//! (`distill.srrl.{conv,bn}`), not exported.
use candle_core::{Module, Result};
use candle_nn::{Conv2d, Linear, VarBuilder};
use kd_data::Batch;
use kd_models::{batch_norm2d, BatchNorm2d, ResNet};

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// SRRL.
pub struct Srrl {
    ce: CrossEntropy,
    alpha: f64,
    beta: f64,
    conv: Conv2d,
    bn: BatchNorm2d,
    /// The teacher's classifier, its weights constants.
    teacher_head: Linear,
}

impl Srrl {
    /// SRRL for `student` learning from `teacher`: the connector from the student's last stage
    /// to the teacher's width under `vb` (`conv.weight`, `bn.*`), and a copy of the teacher's
    /// classifier cut from any graph.
    pub fn new(
        ce: CrossEntropy,
        alpha: f64,
        beta: f64,
        student: &ResNet,
        teacher: &ResNet,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (cs, ct) = (super::pooled_width(student), super::pooled_width(teacher));
        let conv = candle_nn::conv2d_no_bias(cs, ct, 1, Default::default(), vb.pp("conv"))?;
        let bn = batch_norm2d(ct, vb.pp("bn"))?;
        let head = teacher.head();
        let teacher_head = Linear::new(head.weight().detach(), head.bias().map(|b| b.detach()));
        Ok(Srrl {
            ce,
            alpha,
            beta,
            conv,
            bn,
            teacher_head,
        })
    }
}

impl Distiller for Srrl {
    fn name(&self) -> &'static str {
        "srrl"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = super::teacher_outputs(self.name(), out.teacher)?;
        let (Some(fs), Some(ft)) = (student.feats.last(), teacher.feats.last()) else {
            candle_core::bail!("srrl needs both networks' stage features");
        };
        let mapped = self.bn.forward_relu_t(&self.conv.forward(fs)?, true)?;
        let pooled = mapped.mean((2, 3))?;
        let regressed = self.teacher_head.forward(&pooled)?;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push(
            "loss_srrl_feature",
            (kd_losses::hint_loss(&pooled, &ft.mean((2, 3))?)? * self.alpha)?,
        );
        t.push(
            "loss_srrl_logits",
            (kd_losses::hint_loss(&regressed, &teacher.logits)? * self.beta)?,
        );
        Ok(t)
    }
}
