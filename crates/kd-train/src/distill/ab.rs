//! AB, activation boundaries (Heo et al. 2019, "Knowledge Transfer via Distillation of
//! Activation Boundaries Formed by Hidden Neurons"): what a ReLU network computes is decided by
//! which neurons fire, so the student's body is first fitted to fire where the teacher's does,
//! then trained on the labels.
//!
//! As RepDistiller's `abound`, whose benchmark numbers this follows: an init phase (30 epochs,
//! SGD at 0.05) trains the student's body and a connector per stage (1×1 conv with bias + BN to
//! the teacher's width; none where the widths already agree) on the alternative L2 between the
//! connected pre-ReLU stage outputs (stages 1–4) and the teacher's
//! ([`kd_losses::ab_loss`], margin 1), stage i of n weighted 1/2^(n−1−i), times 3/1000. The main
//! run is the cross-entropy alone (`-a 0`, and its `loss_kd = 0`): the connectors are dropped and
//! the teacher is not run. When the two networks' maps differ in size, the larger is
//! average-pooled to the smaller (RepDistiller uses a strided convolution there).
use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::{Conv2d, VarBuilder};
use kd_data::Batch;
use kd_models::{batch_norm2d, BatchNorm2d, ModelOutput, ResNet};

use super::none::CrossEntropy;
use super::{Distiller, InitPhase, LossTerms, Outputs, StepContext};

/// What AB (`Ab`) is built with, beyond the networks.
#[derive(Clone, Copy, Debug)]
pub struct AbParams {
    /// Weight of the summed stage losses (RepDistiller's 3/1000).
    pub weight: f64,
    /// Margin μ of the alternative L2.
    pub margin: f64,
    /// Epochs of the init phase.
    pub init_epochs: usize,
    /// Its learning rate.
    pub init_lr: f64,
}

/// One stage's connector: none when the widths agree.
#[derive(Debug)]
struct Connector {
    conv: Conv2d,
    bn: BatchNorm2d,
}

/// AB on stages 1–4.
#[derive(Debug)]
pub struct Ab {
    ce: CrossEntropy,
    params: AbParams,
    connectors: Vec<Option<Connector>>,
}

/// The name prefix of AB's variables in the student's map.
const PARTS: &str = "distill.ab.";

impl Ab {
    /// A connector per stage from the student's width to the teacher's (`connector{i}.conv`,
    /// `connector{i}.bn`, i = 1–4, under `vb`), where they differ.
    pub fn new(
        ce: CrossEntropy,
        student: &ResNet,
        teacher: &ResNet,
        params: AbParams,
        vb: VarBuilder,
    ) -> Result<Self> {
        if params.margin.is_nan() || params.margin < 0.0 || params.init_epochs == 0 {
            bail!(
                "method ab: margin must be at least 0 and init_epochs at least 1, got {} and {}",
                params.margin,
                params.init_epochs
            );
        }
        let (s, t) = (student.feature_info(), teacher.feature_info());
        if s.len() != t.len() {
            bail!(
                "method ab: the student has {} feature levels, the teacher {}",
                s.len(),
                t.len()
            );
        }
        let mut connectors = Vec::new();
        for (i, (fs, ft)) in s.iter().zip(t).enumerate().skip(1) {
            connectors.push(if fs.channels == ft.channels {
                None
            } else {
                let vb = vb.pp(format!("connector{i}"));
                Some(Connector {
                    conv: candle_nn::conv2d(
                        fs.channels,
                        ft.channels,
                        1,
                        Default::default(),
                        vb.pp("conv"),
                    )?,
                    bn: batch_norm2d(ft.channels, vb.pp("bn"))?,
                })
            });
        }
        Ok(Ab {
            ce,
            params,
            connectors,
        })
    }

    /// The weighted sum over stages of the AB loss between the connected student pre-ReLU levels
    /// and the teacher's (shallow to deep), times the weight.
    fn boundary_loss(&self, student: &[Tensor], teacher: &[Tensor]) -> Result<Tensor> {
        let n = self.connectors.len();
        if student.len() != n || teacher.len() != n {
            bail!(
                "ab: {n} stages but {} student and {} teacher pre-ReLU levels",
                student.len(),
                teacher.len()
            );
        }
        super::sum_levels(
            "ab",
            self.connectors
                .iter()
                .zip(student)
                .zip(teacher)
                .enumerate()
                .map(|(i, ((c, s), t))| {
                    let s = s.to_dtype(DType::F32)?;
                    let s = match c {
                        Some(c) => c.bn.forward_t(&c.conv.forward(&s)?, true)?,
                        None => s,
                    };
                    let (s, t) = kd_losses::align_spatial(&s, &t.to_dtype(DType::F32)?)?;
                    kd_losses::ab_loss(&s, &t, self.params.margin)? / 2f64.powi((n - 1 - i) as i32)
                }),
        )?
        .affine(self.params.weight, 0.0)
    }
}

impl Distiller for Ab {
    fn name(&self) -> &'static str {
        "ab"
    }

    /// The main run: the cross-entropy alone (the boundaries were transferred in the init phase).
    fn loss(&self, ctx: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        self.ce.loss(ctx, batch, out)
    }

    fn init_phase(&self) -> Option<InitPhase> {
        Some(InitPhase {
            epochs: self.params.init_epochs,
            lr: self.params.init_lr,
            student_body: true,
            parts: PARTS.into(),
        })
    }

    fn init_loss(&self, student: Option<&ModelOutput>, teacher: &ModelOutput) -> Result<LossTerms> {
        let student = student.ok_or_else(|| {
            candle_core::Error::Msg("ab: the init phase needs the student's outputs".into())
        })?;
        let mut t = LossTerms::default();
        t.push(
            "loss_ab",
            self.boundary_loss(&student.preact, &teacher.preact)?,
        );
        Ok(t)
    }

    fn frozen(&self) -> Vec<String> {
        vec![PARTS.into()]
    }

    fn teacher_each_step(&self) -> bool {
        false
    }

    fn needs_preact(&self) -> bool {
        true
    }

    /// Logits, pooled embeddings or pre-activations only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;
    use kd_models::{trainable_resnet, Arch, ResNetConfig, Stem};

    fn net(arch: Arch, width: usize, seed: u64) -> ResNet {
        let cfg = ResNetConfig {
            base_width: width,
            ..ResNetConfig::new(arch, Stem::Cifar, 10)
        };
        trainable_resnet(&cfg, &Device::Cpu, seed).unwrap().0
    }

    fn params() -> AbParams {
        AbParams {
            weight: 1.0,
            margin: 1.0,
            init_epochs: 1,
            init_lr: 0.05,
        }
    }

    /// Between networks of equal widths there are no connectors, and the loss is the stage
    /// losses weighted 1/8, 1/4, 1/2, 1 (computed here level by level).
    #[test]
    fn equal_widths_need_no_connector_and_stages_weigh_by_depth() {
        let (s, t) = (net(Arch::Resnet18, 4, 1), net(Arch::Resnet18, 4, 2));
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let ab = Ab::new(CrossEntropy { smoothing: 0.0 }, &s, &t, params(), vb).unwrap();
        assert!(ab.connectors.iter().all(Option::is_none));
        assert!(vars.all_vars().is_empty());
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
        let (os, ot) = (
            s.forward_with(&x, true, true).unwrap(),
            t.forward_with(&x, false, true).unwrap(),
        );
        let got = ab.init_loss(Some(&os), &ot).unwrap().total().unwrap();
        let mut want = 0.0;
        for (i, w) in [0.125, 0.25, 0.5, 1.0].iter().enumerate() {
            let l = kd_losses::ab_loss(&os.preact[i], &ot.preact[i], 1.0).unwrap();
            want += w * l.to_scalar::<f32>().unwrap() as f64;
        }
        let got = got.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() <= 1e-5 * want, "{got} vs {want}");
    }

    /// A ResNet18 student of a ResNet50 teacher gets a connector per stage to the teacher's
    /// width; the init phase trains those and the body, not the classifier; the main run
    /// leaves the connectors and needs no teacher.
    #[test]
    fn connectors_map_to_the_teachers_widths_and_the_phase_trains_the_body() {
        let (s, t) = (net(Arch::Resnet18, 4, 1), net(Arch::Resnet50, 4, 2));
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let ab = Ab::new(
            CrossEntropy { smoothing: 0.0 },
            &s,
            &t,
            params(),
            vb.pp("distill").pp("ab"),
        )
        .unwrap();
        let widths: Vec<usize> = t.feature_info()[1..].iter().map(|f| f.channels).collect();
        for (c, w) in ab.connectors.iter().zip(&widths) {
            assert_eq!(c.as_ref().unwrap().conv.weight().dim(0).unwrap(), *w);
        }
        let phase = ab.init_phase().unwrap();
        assert!(phase.trains("distill.ab.connector1.conv.weight"));
        assert!(phase.trains("layer3.0.conv1.weight") && phase.trains("bn1.weight"));
        assert!(!phase.trains("fc.weight") && !phase.trains("aux_heads.0.fc.weight"));
        assert_eq!(ab.frozen(), vec!["distill.ab.".to_string()]);
        assert!(!ab.teacher_each_step());
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
        assert!(ab
            .init_loss(None, &t.forward_t(&x, false).unwrap())
            .is_err());
    }
}
