//! FT, factor transfer (Kim et al. 2018, "Paraphrasing Complex Network: Network Compression via
//! Factor Transfer"): the teacher's last stage is first "paraphrased" into a smaller factor by an
//! autoencoder trained to reconstruct it; the student then learns, through a translator of its
//! own, to produce that factor.
//!
//! As RepDistiller's `factor`, whose benchmark numbers this follows:
//! - init phase (30 epochs, SGD at 0.05): the paraphraser — three 3×3 convolutions (with bias,
//!   LeakyReLU 0.1, no BN) down to `rate`·C channels, then three back up to C — learns to
//!   reconstruct the teacher's last-stage output (MSE); the student is not run;
//! - main run: CE + weight·FT between the translator's factor of the student's last stage (three
//!   3×3 convolutions with BN and LeakyReLU to `rate`·C_teacher, trained with the student) and
//!   the frozen paraphraser's encoding of the teacher's ([`kd_losses::factor_transfer_loss`]),
//!   weight 200.
//!
//! RepDistiller's decoder uses transposed 3×3 convolutions of stride 1 and padding 1: each is a
//! 3×3 convolution with padding 1 (its kernel flipped and its in/out axes swapped), so the
//! decoder here is built of plain convolutions — the same functions, trained from scratch.
use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use kd_data::Batch;
use kd_models::{batch_norm2d, BatchNorm2d, ModelOutput, ResNet};

use super::none::CrossEntropy;
use super::{Distiller, InitPhase, LossTerms, Outputs, StepContext};

/// What FT (`Ft`) is built with, beyond the networks.
#[derive(Clone, Copy, Debug)]
pub struct FtParams {
    /// Weight of the factor loss (200 in RepDistiller's benchmark).
    pub weight: f64,
    /// The factor's width as a fraction of the teacher's (the paraphrase rate k, 0.5).
    pub rate: f64,
    /// Epochs of the init phase.
    pub init_epochs: usize,
    /// Its learning rate.
    pub init_lr: f64,
}

/// The slope of the LeakyReLU after every convolution.
const SLOPE: f64 = 0.1;

/// A 3×3 convolution with bias and padding 1, then (when present) BN in training mode, then
/// LeakyReLU.
#[derive(Debug)]
struct ConvUnit {
    conv: Conv2d,
    bn: Option<BatchNorm2d>,
}

impl ConvUnit {
    fn new(cin: usize, cout: usize, with_bn: bool, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(ConvUnit {
            conv: candle_nn::conv2d(cin, cout, 3, cfg, vb.pp("conv"))?,
            bn: if with_bn {
                Some(batch_norm2d(cout, vb.pp("bn"))?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv.forward(x)?;
        let y = match &self.bn {
            Some(bn) => bn.forward_t(&y, true)?,
            None => y,
        };
        candle_nn::ops::leaky_relu(&y, SLOPE)
    }
}

fn chain(units: &[ConvUnit], x: &Tensor) -> Result<Tensor> {
    units.iter().try_fold(x.clone(), |x, u| u.forward(&x))
}

/// FT on the last stage.
#[derive(Debug)]
pub struct Ft {
    ce: CrossEntropy,
    params: FtParams,
    /// Teacher's C → C → k·C → k·C.
    encoder: Vec<ConvUnit>,
    /// k·C → k·C → C → C.
    decoder: Vec<ConvUnit>,
    /// Student's C_s → C_s → k·C → k·C, with BN.
    translator: Vec<ConvUnit>,
}

/// The name prefix of FT's paraphraser in the student's map (`distill.ft.` holds FT's parts),
/// fitted in the init phase and then frozen.
const PARAPHRASER: &str = "distill.ft.paraphraser.";

impl Ft {
    /// The paraphraser of the teacher's last stage (`paraphraser.{encoder,decoder}.{0,1,2}`) and
    /// the student's translator (`translator.{0,1,2}`), under `vb`.
    pub fn new(
        ce: CrossEntropy,
        student: &ResNet,
        teacher: &ResNet,
        params: FtParams,
        vb: VarBuilder,
    ) -> Result<Self> {
        let width = |m: &ResNet| m.feature_info().last().map_or(0, |f| f.channels);
        let (cs, ct) = (width(student), width(teacher));
        let factor = (ct as f64 * params.rate) as usize;
        if params.rate.is_nan() || params.rate <= 0.0 || factor == 0 || params.init_epochs == 0 {
            bail!(
                "method ft: rate must give the factor at least one channel and init_epochs be at least 1, got rate {} (of {ct} channels) and {} epochs",
                params.rate,
                params.init_epochs
            );
        }
        let units = |dims: [usize; 4], bn: bool, vb: VarBuilder| -> Result<Vec<ConvUnit>> {
            (0..3)
                .map(|i| ConvUnit::new(dims[i], dims[i + 1], bn, vb.pp(i.to_string())))
                .collect()
        };
        let p = vb.pp("paraphraser");
        Ok(Ft {
            ce,
            params,
            encoder: units([ct, ct, factor, factor], false, p.pp("encoder"))?,
            decoder: units([factor, factor, ct, ct], false, p.pp("decoder"))?,
            translator: units([cs, cs, factor, factor], true, vb.pp("translator"))?,
        })
    }
}

/// The last stage's output (post-ReLU) in f32.
fn last_stage(o: &ModelOutput) -> Result<Tensor> {
    o.feats
        .last()
        .ok_or_else(|| candle_core::Error::Msg("ft: the network has no stages".into()))?
        .to_dtype(DType::F32)
}

impl Distiller for Ft {
    fn name(&self) -> &'static str {
        "ft"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = super::teacher_outputs(self.name(), out.teacher)?;
        let factor_s = chain(&self.translator, &last_stage(student)?)?;
        let factor_t = chain(&self.encoder, &last_stage(teacher)?.detach())?.detach();
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push(
            "loss_ft",
            (kd_losses::factor_transfer_loss(&factor_s, &factor_t)? * self.params.weight)?,
        );
        Ok(t)
    }

    fn init_phase(&self) -> Option<InitPhase> {
        Some(InitPhase {
            epochs: self.params.init_epochs,
            lr: self.params.init_lr,
            student_body: false,
            parts: PARAPHRASER.into(),
        })
    }

    /// The paraphraser's reconstruction error of the teacher's last stage (MSE).
    fn init_loss(&self, _: Option<&ModelOutput>, teacher: &ModelOutput) -> Result<LossTerms> {
        let f = last_stage(teacher)?.detach();
        let rec = chain(&self.decoder, &chain(&self.encoder, &f)?)?;
        let mut t = LossTerms::default();
        t.push("loss_reconstruction", kd_losses::hint_loss(&rec, &f)?);
        Ok(t)
    }

    fn frozen(&self) -> Vec<String> {
        vec![PARAPHRASER.into()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::fixtures::labelled_batch;
    use candle_core::Device;
    use candle_nn::VarMap;
    use kd_models::{trainable_resnet, Arch, ResNetConfig, Stem};

    /// The paraphraser's and translator's widths follow the teacher's last stage and the rate;
    /// the init phase trains the paraphraser alone, which the main run then freezes; the main
    /// loss reaches the translator but not the paraphraser.
    #[test]
    fn widths_phases_and_gradients() {
        let net = |arch, seed| {
            let cfg = ResNetConfig {
                base_width: 4,
                ..ResNetConfig::new(arch, Stem::Cifar, 10)
            };
            trainable_resnet(&cfg, &Device::Cpu, seed).unwrap().0
        };
        let (s, t) = (net(Arch::Resnet18, 1), net(Arch::Resnet50, 2));
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let params = FtParams {
            weight: 200.0,
            rate: 0.5,
            init_epochs: 1,
            init_lr: 0.05,
        };
        let ft = Ft::new(
            CrossEntropy { smoothing: 0.0 },
            &s,
            &t,
            params,
            vb.pp("distill").pp("ft"),
        )
        .unwrap();
        // ResNet50 at width 4 ends with 128 channels: a factor of 64; the student's 32.
        let data = vars.data().lock().unwrap();
        assert_eq!(
            data["distill.ft.paraphraser.encoder.2.conv.weight"].dims(),
            [64, 64, 3, 3]
        );
        assert_eq!(
            data["distill.ft.paraphraser.decoder.2.conv.weight"].dims(),
            [128, 128, 3, 3]
        );
        assert_eq!(
            data["distill.ft.translator.0.conv.weight"].dims(),
            [32, 32, 3, 3]
        );
        assert_eq!(data["distill.ft.translator.2.bn.weight"].dims(), [64]);
        assert!(!data
            .keys()
            .any(|k| k.starts_with("distill.ft.paraphraser") && k.contains(".bn.")));
        let phase = ft.init_phase().unwrap();
        assert!(!phase.student_body);
        assert!(phase.trains("distill.ft.paraphraser.decoder.0.conv.bias"));
        assert!(
            !phase.trains("distill.ft.translator.0.conv.weight")
                && !phase.trains("layer1.0.conv1.weight")
        );
        assert_eq!(ft.frozen(), vec![PARAPHRASER.to_string()]);
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
        let (os, ot) = (
            s.forward_t(&x, true).unwrap(),
            t.forward_t(&x, false).unwrap(),
        );
        let rec = ft.init_loss(None, &ot).unwrap().total().unwrap();
        let g = rec.backward().unwrap();
        assert!(g
            .get(data["distill.ft.paraphraser.decoder.2.conv.weight"].as_tensor())
            .is_some());
        let batch = Batch {
            images: x,
            ..labelled_batch(Tensor::new(&[1u32, 2], &Device::Cpu).unwrap())
        };
        let terms = ft
            .loss(
                &StepContext::one_step(),
                &batch,
                &Outputs {
                    teacher: Some(&ot),
                    ..Outputs::student(&os)
                },
            )
            .unwrap();
        let g = terms.total().unwrap().backward().unwrap();
        assert!(g
            .get(data["distill.ft.translator.0.conv.weight"].as_tensor())
            .is_some());
        assert!(g
            .get(data["distill.ft.paraphraser.encoder.0.conv.weight"].as_tensor())
            .is_none());
    }
}
