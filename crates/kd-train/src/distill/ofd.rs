//! OFD, the overhaul of feature distillation (Heo et al. 2019, "A Comprehensive Overhaul of
//! Feature Distillation"): the student's pre-ReLU stage outputs (stages 1–4), each through a
//! connector (1×1 conv + BN to the teacher's width), are drawn to the teacher's pre-ReLU outputs
//! by a partial L2 distance ([`kd_losses::ofd_loss`]) that ignores what the teacher's ReLU hides:
//! below zero the teacher is clamped at a per-channel margin, the expected negative response
//! under its BatchNorm ([`kd_losses::ofd_margins`]), and a student below it is not penalised.
//!
//! As the authors' code: stage i of n weighs 1/2^(n−1−i) (the deepest 1), the loss is summed
//! over positions and channels and divided by the batch size; weight 1e-3 (their `/ 1000`);
//! connectors train with the student (BN in training mode) and are not exported. mdistiller's
//! port omits the division by the batch size (its weight 1e-3 at batch 64 is 64× stronger). When
//! the two networks' maps differ in size, the larger is average-pooled to the smaller.
use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::{Conv2d, VarBuilder};
use kd_data::Batch;
use kd_models::{batch_norm2d, BatchNorm2d, ResNet};

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// One stage's connector and the teacher's margins there.
#[derive(Debug)]
struct Stage {
    conv: Conv2d,
    bn: BatchNorm2d,
    /// (C_teacher,) f32.
    margin: Tensor,
}

/// OFD on stages 1–4.
#[derive(Debug)]
pub struct Ofd {
    ce: CrossEntropy,
    weight: f64,
    stages: Vec<Stage>,
}

impl Ofd {
    /// A connector per stage from the student's channels to the teacher's, under `vb`
    /// (`connector{i}.conv`, `connector{i}.bn`, i = 1–4), and the margins from the teacher's
    /// BatchNorms before each stage's last ReLU.
    pub fn new(
        ce: CrossEntropy,
        student: &ResNet,
        teacher: &ResNet,
        weight: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (s, t) = (student.feature_info(), teacher.feature_info());
        let margins = teacher
            .preact_bn_params()
            .iter()
            .map(|(gamma, beta)| {
                kd_losses::ofd_margins(
                    &gamma.to_dtype(DType::F32)?.to_vec1()?,
                    &beta.to_dtype(DType::F32)?.to_vec1()?,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let widths = |f: &[kd_models::FeatureInfo]| -> Vec<usize> {
            f.iter().skip(1).map(|x| x.channels).collect()
        };
        Self::with_margins(ce, &widths(s), &widths(t), margins, weight, vb)
    }

    /// The connectors from the student's stage widths `cin` to the teacher's `cout` (shallow to
    /// deep) and the teacher's margins per stage.
    fn with_margins(
        ce: CrossEntropy,
        cin: &[usize],
        cout: &[usize],
        margins: Vec<Vec<f32>>,
        weight: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        if cin.len() != cout.len() || margins.len() != cout.len() || cin.is_empty() {
            bail!(
                "ofd: the student has {} stages, the teacher {} and {} pre-ReLU BatchNorms",
                cin.len(),
                cout.len(),
                margins.len()
            );
        }
        let mut stages = Vec::new();
        for (i, ((&cs, &ct), margin)) in cin.iter().zip(cout).zip(margins).enumerate() {
            if margin.len() != ct {
                bail!(
                    "ofd: stage {} of the teacher has {ct} channels but {} margins",
                    i + 1,
                    margin.len()
                );
            }
            let vb = vb.pp(format!("connector{}", i + 1));
            stages.push(Stage {
                conv: candle_nn::conv2d_no_bias(cs, ct, 1, Default::default(), vb.pp("conv"))?,
                bn: batch_norm2d(ct, vb.pp("bn"))?,
                margin: Tensor::from_vec(margin, ct, vb.device())?,
            });
        }
        Ok(Ofd { ce, weight, stages })
    }

    /// The weighted sum over stages of the partial L2 distances between the connected student
    /// levels `student` and the teacher's `teacher` (pre-ReLU, shallow to deep), before `weight`.
    fn distance(&self, student: &[Tensor], teacher: &[Tensor]) -> Result<Tensor> {
        let n = self.stages.len();
        if student.len() != n || teacher.len() != n {
            bail!(
                "ofd: {n} connectors but {} student and {} teacher pre-ReLU levels",
                student.len(),
                teacher.len()
            );
        }
        super::sum_levels(
            "ofd",
            self.stages
                .iter()
                .zip(student)
                .zip(teacher)
                .enumerate()
                .map(|(i, ((st, s), t))| {
                    let s = st
                        .bn
                        .forward_t(&st.conv.forward(&s.to_dtype(DType::F32)?)?, true)?;
                    let (s, t) = kd_losses::align_spatial(&s, &t.to_dtype(DType::F32)?)?;
                    kd_losses::ofd_loss(&s, &t, &st.margin)? / 2f64.powi((n - 1 - i) as i32)
                }),
        )
    }
}

impl Distiller for Ofd {
    fn name(&self) -> &'static str {
        "ofd"
    }

    fn needs_preact(&self) -> bool {
        true
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = super::teacher_outputs(self.name(), out.teacher)?;
        let d = self.distance(&student.preact, &teacher.preact)?;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push("loss_ofd", (d * self.weight)?);
        Ok(t)
    }

    /// Logits, pooled embeddings or pre-activations only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    use crate::distill::fixtures::{get, rel_err, scalar};

    /// The authors' OFD distance over four levels — connectors (1×1 conv + BN in training mode),
    /// margins from the teacher's BN, the shallowest level's connected map pooled to the
    /// teacher's size, stage weights 1/8 … 1 — computed by PyTorch in f64
    /// (`tools/fixtures/make_loss_fixtures.py`).
    #[test]
    fn distance_matches_pytorch() {
        let f = crate::distill::fixtures::load("ofd");
        let (cin, cout) = ([3, 4, 5, 6], [5, 6, 8, 10]);
        let vec = |k: &str| {
            get(&f, k)
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let margins = (0..4)
            .map(|i| {
                kd_losses::ofd_margins(&vec(&format!("gamma.{i}")), &vec(&format!("beta.{i}")))
            })
            .collect::<Result<Vec<_>>>()
            .unwrap();
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let ofd = Ofd::with_margins(
            CrossEntropy { smoothing: 0.0 },
            &cin,
            &cout,
            margins,
            1.0,
            vb,
        )
        .unwrap();
        {
            let data = vars.data().lock().unwrap();
            for (name, var) in data.iter() {
                if !name.contains("running_") {
                    var.set(&get(&f, name).to_dtype(DType::F32).unwrap())
                        .unwrap();
                }
            }
        }
        let student: Vec<Var> = (0..4)
            .map(|i| {
                Var::from_tensor(
                    &get(&f, &format!("student.{i}"))
                        .to_dtype(DType::F32)
                        .unwrap(),
                )
                .unwrap()
            })
            .collect();
        let teacher: Vec<Tensor> = (0..4).map(|i| get(&f, &format!("teacher.{i}"))).collect();
        let levels: Vec<Tensor> = student.iter().map(|v| v.as_tensor().clone()).collect();
        let d = ofd.distance(&levels, &teacher).unwrap();
        let (got, want) = (scalar(&d), scalar(&get(&f, "distance")));
        assert!(
            (got - want).abs() <= 1e-5 * want.abs(),
            "{got} vs PyTorch {want}"
        );
        let grads = d.backward().unwrap();
        for (i, v) in student.iter().enumerate() {
            let e = rel_err(
                grads.get(v.as_tensor()).unwrap(),
                &get(&f, &format!("grad.student.{i}")),
            );
            assert!(e < 1e-4, "gradient of student level {i}: {e:e}");
        }
        let data = vars.data().lock().unwrap();
        for i in 1..=4 {
            for leaf in ["conv.weight", "bn.weight"] {
                let name = format!("connector{i}.{leaf}");
                let e = rel_err(
                    grads.get(data[&name].as_tensor()).unwrap(),
                    &get(&f, &format!("grad.{name}")),
                );
                assert!(e < 1e-4, "gradient of {name}: {e:e}");
            }
        }
    }

    /// A ResNet teacher's margins come from the BatchNorm before each stage's last ReLU; every
    /// margin is negative (or 0 for a scale of 0) and there is one per teacher channel.
    #[test]
    fn margins_come_from_the_teachers_last_batch_norms() {
        use kd_models::{trainable_resnet, Arch, ResNetConfig, Stem};
        let cfg = |arch, w| ResNetConfig {
            base_width: w,
            ..ResNetConfig::new(arch, Stem::Cifar, 10)
        };
        let (student, _) = trainable_resnet(&cfg(Arch::Resnet18, 4), &Device::Cpu, 1).unwrap();
        let (teacher, tvars) = trainable_resnet(&cfg(Arch::Resnet50, 4), &Device::Cpu, 2).unwrap();
        // Give the teacher's last BN of stage 2 a known scale and shift.
        let key = "layer2.3.bn3";
        {
            let data = tvars.data().lock().unwrap();
            let c = data[&format!("{key}.weight")].dim(0).unwrap();
            data[&format!("{key}.weight")]
                .set(&Tensor::full(-2f32, c, &Device::Cpu).unwrap())
                .unwrap();
            data[&format!("{key}.bias")]
                .set(&Tensor::zeros(c, DType::F32, &Device::Cpu).unwrap())
                .unwrap();
        }
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let ofd = Ofd::new(CrossEntropy { smoothing: 0.0 }, &student, &teacher, 1.0, vb).unwrap();
        let widths: Vec<usize> = teacher.feature_info()[1..]
            .iter()
            .map(|f| f.channels)
            .collect();
        for (stage, w) in ofd.stages.iter().zip(&widths) {
            let m: Vec<f32> = stage.margin.to_vec1().unwrap();
            assert_eq!(m.len(), *w);
            assert!(m.iter().all(|x| *x <= 0.0), "{m:?}");
        }
        let half_normal = -(2.0 / std::f64::consts::PI).sqrt() as f32;
        let m: Vec<f32> = ofd.stages[1].margin.to_vec1().unwrap();
        assert!(
            m.iter().all(|x| (x - 2.0 * half_normal).abs() < 1e-5),
            "{m:?}"
        );
    }
}
