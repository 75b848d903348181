//! FSP, the flow of solution procedure (Yim et al. 2017, "A Gift from Knowledge Distillation:
//! Fast Optimization, Network Minimization and Transfer Learning"): how a network transforms
//! one level's features into the next is summarised by their (C_{i+1} × C_i) Gram matrix over
//! positions ([`kd_losses::fsp_matrix`]); the student's body is first fitted to the teacher's
//! matrices, then trained on the labels.
//!
//! As RepDistiller's `fsp`, whose benchmark numbers this follows: an init phase (30 epochs, SGD
//! at 0.05) trains the student's body on the sum over consecutive levels (stem, stages 1–4) of
//! the mean squared difference of the FSP matrices, unweighted; the main run is the
//! cross-entropy alone (RepDistiller's `loss_kd = 0` for FSP; its `-b 50` has no effect), without
//! the teacher. The matrices compare only when both networks have the same width at every
//! level: a ResNet18 student needs a ResNet18 or ResNet34 teacher of its width (not a ResNet50,
//! whose stages are four times wider); spatial sizes may differ.
use candle_core::{bail, DType, Result, Tensor};
use kd_data::Batch;
use kd_models::{ModelOutput, ResNet};

use super::none::CrossEntropy;
use super::{Distiller, InitPhase, LossTerms, Outputs, StepContext};

/// FSP between consecutive levels.
#[derive(Debug)]
pub struct Fsp {
    ce: CrossEntropy,
    init_epochs: usize,
    init_lr: f64,
}

impl Fsp {
    /// FSP for `student` and `teacher`, which must share their widths level by level.
    pub fn new(
        ce: CrossEntropy,
        student: &ResNet,
        teacher: &ResNet,
        init_epochs: usize,
        init_lr: f64,
    ) -> Result<Self> {
        let widths =
            |m: &ResNet| -> Vec<usize> { m.feature_info().iter().map(|f| f.channels).collect() };
        let (s, t) = (widths(student), widths(teacher));
        if s != t {
            bail!(
                "method fsp compares the two networks' (C_i+1 × C_i) matrices and needs equal widths at every level: the student has {s:?}, the teacher {t:?}; a teacher of the student's family and width fits (e.g. ResNet18 or ResNet34 for a ResNet18)"
            );
        }
        if init_epochs == 0 {
            bail!("method fsp: init_epochs must be at least 1 (the phase is the whole method)");
        }
        Ok(Fsp {
            ce,
            init_epochs,
            init_lr,
        })
    }
}

/// Each consecutive pair's FSP matrix of one network's levels, in f32.
fn matrices(levels: &[Tensor]) -> Result<Vec<Tensor>> {
    let levels: Vec<Tensor> = levels
        .iter()
        .map(|l| l.to_dtype(DType::F32))
        .collect::<Result<_>>()?;
    levels
        .windows(2)
        .map(|w| kd_losses::fsp_matrix(&w[0], &w[1]))
        .collect()
}

impl Distiller for Fsp {
    fn name(&self) -> &'static str {
        "fsp"
    }

    /// The main run: the cross-entropy alone (the flow was transferred in the init phase).
    fn loss(&self, ctx: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        self.ce.loss(ctx, batch, out)
    }

    fn init_phase(&self) -> Option<InitPhase> {
        Some(InitPhase {
            epochs: self.init_epochs,
            lr: self.init_lr,
            student_body: true,
            parts: "distill.fsp.".into(),
        })
    }

    fn init_loss(&self, student: Option<&ModelOutput>, teacher: &ModelOutput) -> Result<LossTerms> {
        let student = student.ok_or_else(|| {
            candle_core::Error::Msg("fsp: the init phase needs the student's outputs".into())
        })?;
        let (gs, gt) = (matrices(&student.feats)?, matrices(&teacher.feats)?);
        let total = super::sum_levels(
            self.name(),
            gs.iter().zip(&gt).map(|(s, t)| kd_losses::fsp_loss(s, t)),
        )?;
        let mut terms = LossTerms::default();
        terms.push("loss_fsp", total);
        Ok(terms)
    }

    fn teacher_each_step(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use kd_models::{trainable_resnet, Arch, ResNetConfig, Stem};

    fn net(arch: Arch, stem: Stem, width: usize, seed: u64) -> ResNet {
        let cfg = ResNetConfig {
            base_width: width,
            ..ResNetConfig::new(arch, stem, 10)
        };
        trainable_resnet(&cfg, &Device::Cpu, seed).unwrap().0
    }

    /// A ResNet34 teacher of the student's width fits, whatever its stem; a ResNet50 or a wider
    /// ResNet18 is refused with the widths named.
    #[test]
    fn needs_equal_widths_at_every_level() {
        let ce = CrossEntropy { smoothing: 0.0 };
        let s = net(Arch::Resnet18, Stem::Cifar, 4, 1);
        let t = net(Arch::Resnet34, Stem::CifarMaxpool, 4, 2);
        let fsp = Fsp::new(ce, &s, &t, 1, 0.05).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
        let (os, ot) = (
            s.forward_t(&x, true).unwrap(),
            t.forward_t(&x, false).unwrap(),
        );
        // Four pairs of levels: stem–1, 1–2, 2–3, 3–4.
        let l = fsp.init_loss(Some(&os), &ot).unwrap();
        let mut want = 0.0;
        for k in 0..4 {
            let gs = kd_losses::fsp_matrix(&os.feats[k], &os.feats[k + 1]).unwrap();
            let gt = kd_losses::fsp_matrix(&ot.feats[k], &ot.feats[k + 1]).unwrap();
            want += kd_losses::fsp_loss(&gs, &gt)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
        }
        let got = l.total().unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() <= 1e-5 * want, "{got} vs {want}");
        assert!(!fsp.teacher_each_step() && fsp.init_phase().unwrap().student_body);
        for t in [
            net(Arch::Resnet50, Stem::Cifar, 4, 3),
            net(Arch::Resnet18, Stem::Cifar, 8, 4),
        ] {
            let err = Fsp::new(ce, &s, &t, 1, 0.05).unwrap_err().to_string();
            assert!(
                err.contains("equal widths") && err.contains("[4, 4, 8, 16, 32]"),
                "{err}"
            );
        }
    }
}
