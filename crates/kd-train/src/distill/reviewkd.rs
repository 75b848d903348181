//! ReviewKD (Chen et al. 2021, "Distilling Knowledge via Knowledge Review"): the student's
//! levels (stages 1–4 and the pooled embedding) are fused deepest first by attention-based
//! fusion (ABF) modules — each level's features, projected, are blended with the residual
//! from the deeper level by two learned attention maps — and each fused level is compared with
//! the teacher's same level by the hierarchical context loss ([`kd_losses::hcl_loss`]).
//!
//! As mdistiller: CE + w·min(epoch/warm-up, 1)·Σ HCL (epochs from 1); ABF = 1×1 conv + BN to
//! `mid` = min(512, the student's deepest width) channels, attention 1×1 conv (with bias) +
//! sigmoid over [level, residual] (every level but the deepest), 3×3 conv + BN to the teacher's
//! width; nearest-neighbour resizing between the student's and the teacher's map sizes. The ABFs
//! train with the student and are not exported. Their convolutions start from kd's
//! Kaiming-normal (fan-out) initialisation (mdistiller: Kaiming-uniform, a = 1).
use candle_core::{bail, Module, Result, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use kd_data::Batch;
use kd_models::{batch_norm2d, BatchNorm2d, ModelOutput, ResNet};

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// One attention-based fusion module.
#[derive(Debug)]
struct Abf {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    /// Attention over [this level, the deeper residual]; `None` for the deepest level.
    att: Option<Conv2d>,
}

impl Abf {
    fn new(cin: usize, mid: usize, cout: usize, fuse: bool, vb: VarBuilder) -> Result<Self> {
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Abf {
            conv1: candle_nn::conv2d_no_bias(cin, mid, 1, Default::default(), vb.pp("conv1"))?,
            bn1: batch_norm2d(mid, vb.pp("bn1"))?,
            conv2: candle_nn::conv2d_no_bias(mid, cout, 3, pad1, vb.pp("conv2"))?,
            bn2: batch_norm2d(cout, vb.pp("bn2"))?,
            att: if fuse {
                Some(candle_nn::conv2d(
                    2 * mid,
                    2,
                    1,
                    Default::default(),
                    vb.pp("att"),
                )?)
            } else {
                None
            },
        })
    }

    /// (output at `out_size`, residual for the next level at `out_size`) from this level's
    /// features `x` and the deeper level's residual.
    fn forward(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        out_size: usize,
    ) -> Result<(Tensor, Tensor)> {
        let size = x.dim(2)?;
        let mut x = self.bn1.forward_t(&self.conv1.forward(x)?, true)?;
        if let (Some(att), Some(y)) = (&self.att, residual) {
            let y = resize_nearest(y, size)?;
            let z = candle_nn::ops::sigmoid(&att.forward(&Tensor::cat(&[&x, &y], 1)?)?)?;
            let a = z.narrow(1, 0, 1)?;
            let b = z.narrow(1, 1, 1)?;
            x = (x.broadcast_mul(&a)? + y.broadcast_mul(&b)?)?;
        }
        let x = resize_nearest(&x, out_size)?;
        let out = self.bn2.forward_t(&self.conv2.forward(&x)?, true)?;
        Ok((out, x))
    }
}

/// PyTorch's `F.interpolate(mode="nearest")` of square (N, C, H, H) maps to `size`×`size`:
/// output pixel i takes input pixel `floor(i·H/size)`, up or down. Two `index_select`s, whose
/// backward accumulates: candle 0.11's `upsample_nearest2d` backward overwrites the gradient
/// already gathered for its input instead of adding to it (huggingface/candle#3507), and an
/// ABF's residual also feeds its own output.
fn resize_nearest(x: &Tensor, size: usize) -> Result<Tensor> {
    let h = x.dim(2)?;
    if h == size {
        return Ok(x.clone());
    }
    if size == 0 || x.dim(3)? != h {
        bail!(
            "reviewkd: cannot resize {:?} maps to {size}×{size} (square maps only)",
            x.dims()
        );
    }
    let pick: Vec<u32> = (0..size).map(|i| (i * h / size) as u32).collect();
    let pick = Tensor::from_vec(pick, size, x.device())?;
    x.index_select(&pick, 2)?.index_select(&pick, 3)
}

/// Stages 1–4 then the pooled embedding as a 1×1 map: ReviewKD's levels, shallow to deep.
fn levels(out: &ModelOutput) -> Result<Vec<Tensor>> {
    let mut v: Vec<Tensor> = out.feats[1..].to_vec();
    v.push(out.pooled.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?);
    Ok(v)
}

/// ReviewKD.
#[derive(Debug)]
pub struct ReviewKd {
    ce: CrossEntropy,
    weight: f64,
    warmup_epochs: f64,
    /// One per level, shallow to deep.
    abfs: Vec<Abf>,
}

impl ReviewKd {
    /// The widths of a network's levels: stages 1–4, then the pooled embedding (the last
    /// stage's width again).
    pub fn level_widths(m: &ResNet) -> Vec<usize> {
        let f = m.feature_info();
        let mut w: Vec<usize> = f[1..].iter().map(|x| x.channels).collect();
        w.push(f.last().map_or(0, |x| x.channels));
        w
    }

    /// The ABFs from the student's level widths `cin` to the teacher's `cout` (shallow to deep),
    /// under `vb` (`abf{i}.*`, i = 0 the shallowest).
    pub fn new(
        ce: CrossEntropy,
        cin: &[usize],
        cout: &[usize],
        weight: f64,
        warmup_epochs: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        if cin.len() != cout.len() || cin.is_empty() {
            bail!(
                "reviewkd: the student has {} levels and the teacher {}",
                cin.len(),
                cout.len()
            );
        }
        let mid = cin[cin.len() - 1].min(512);
        let deepest = cin.len() - 1;
        let abfs = (0..cin.len())
            .map(|i| Abf::new(cin[i], mid, cout[i], i < deepest, vb.pp(format!("abf{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(ReviewKd {
            ce,
            weight,
            warmup_epochs,
            abfs,
        })
    }

    /// The fused student levels, shallow to deep, each at the teacher's size of that level.
    fn review(&self, student: &[Tensor], teacher: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(self.abfs.len());
        let mut residual: Option<Tensor> = None;
        for i in (0..self.abfs.len()).rev() {
            let (y, r) =
                self.abfs[i].forward(&student[i], residual.as_ref(), teacher[i].dim(2)?)?;
            out.push(y);
            residual = Some(r);
        }
        out.reverse();
        Ok(out)
    }
}

impl Distiller for ReviewKd {
    fn name(&self) -> &'static str {
        "reviewkd"
    }

    fn loss(&self, ctx: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = super::teacher_outputs(self.name(), out.teacher)?;
        let t_levels = levels(teacher)?;
        let fused = self.review(&levels(student)?, &t_levels)?;
        let hcl = super::sum_levels(
            self.name(),
            fused
                .iter()
                .zip(&t_levels)
                .map(|(s, t)| kd_losses::hcl_loss(s, t)),
        )?;
        let w = self.weight * super::linear_ramp(ctx.epoch, self.warmup_epochs);
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push("loss_review", (hcl * w)?);
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    use crate::distill::fixtures::{get, rel_err, scalar, Fixture};

    /// mdistiller's ReviewKD on a student at 16/8/4/2 px and a teacher at 8/4/2/1 px (plus the
    /// pooled level), computed by PyTorch in f64 (`tools/fixtures/make_loss_fixtures.py`).
    fn fixture() -> Fixture {
        crate::distill::fixtures::load("reviewkd")
    }

    #[test]
    fn review_and_hcl_match_pytorch() {
        let f = fixture();
        let (cin, cout) = ([4, 8, 16, 32, 32], [6, 12, 24, 48, 48]);
        // f32, the training dtype (kd's BatchNorm keeps f32 statistics).
        for (dtype, tol) in [(DType::F32, 1e-4)] {
            let vars = VarMap::new();
            let vb = VarBuilder::from_varmap(&vars, dtype, &Device::Cpu);
            let review =
                ReviewKd::new(CrossEntropy { smoothing: 0.0 }, &cin, &cout, 1.0, 0.0, vb).unwrap();
            {
                let data = vars.data().lock().unwrap();
                for (name, var) in data.iter() {
                    if name.ends_with("running_mean") || name.ends_with("running_var") {
                        continue;
                    }
                    var.set(&get(&f, name).to_dtype(dtype).unwrap()).unwrap();
                }
            }
            let student: Vec<Var> = (0..5)
                .map(|i| {
                    Var::from_tensor(&get(&f, &format!("student.{i}")).to_dtype(dtype).unwrap())
                        .unwrap()
                })
                .collect();
            let teacher: Vec<Tensor> = (0..5)
                .map(|i| get(&f, &format!("teacher.{i}")).to_dtype(dtype).unwrap())
                .collect();
            let levels: Vec<Tensor> = student.iter().map(|v| v.as_tensor().clone()).collect();
            let fused = review.review(&levels, &teacher).unwrap();
            let mut loss = kd_losses::hcl_loss(&fused[0], &teacher[0]).unwrap();
            for (s, t) in fused.iter().zip(&teacher).skip(1) {
                loss = (loss + kd_losses::hcl_loss(s, t).unwrap()).unwrap();
            }
            let (got, want) = (scalar(&loss), scalar(&get(&f, "loss")));
            assert!(
                (got - want).abs() <= tol * want.abs(),
                "{dtype:?}: {got} vs PyTorch {want}"
            );
            let grads = loss.backward().unwrap();
            for (i, v) in student.iter().enumerate() {
                let e = rel_err(
                    grads.get(v.as_tensor()).unwrap(),
                    &get(&f, &format!("grad.student.{i}")),
                );
                assert!(
                    e < tol * 10.0,
                    "{dtype:?} gradient of student level {i}: {e:e}"
                );
            }
            let data = vars.data().lock().unwrap();
            for i in 0..5 {
                let mut names = vec![format!("abf{i}.conv1.weight")];
                if i < 4 {
                    names.push(format!("abf{i}.att.weight"));
                }
                for name in names {
                    let g = grads.get(data[&name].as_tensor()).unwrap();
                    let e = rel_err(g, &get(&f, &format!("grad.{name}")));
                    assert!(e < tol * 10.0, "{dtype:?} gradient of {name}: {e:e}");
                }
            }
        }
    }

    #[test]
    fn nearest_resizing_picks_pytorchs_pixels() {
        let x = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        let down = resize_nearest(&x, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(down, [0.0, 2.0, 8.0, 10.0]);
        let up = resize_nearest(&resize_nearest(&x, 2).unwrap(), 4).unwrap();
        assert_eq!(up.dims(), [1, 1, 4, 4]);
        assert_eq!(
            up.flatten_all().unwrap().to_vec1::<f32>().unwrap()[..4],
            [0.0, 0.0, 2.0, 2.0]
        );
        // Not a multiple: PyTorch's floor(i·H/size) all the same.
        let three = resize_nearest(&x, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(three, [0.0, 1.0, 2.0, 4.0, 5.0, 6.0, 8.0, 9.0, 10.0]);
    }
}
