//! Masked generative distillation, MGD (Yang, Li, Shao, Shi, Yuan & Yuan 2022, "Masked
//! Generative Distillation"), as the authors' code (yzd-v/MGD; cls_KD's `mgd.py`) computes it for
//! classification: the student's last stage, mapped to the teacher's width by a 1×1 convolution
//! (with bias; none when the widths agree), has whole channels zeroed at random (each with
//! probability `mask_ratio`, per image), and a generator (3×3 conv, ReLU, 3×3 conv, with biases)
//! must rebuild the teacher's last stage from what is left: `CE + weight·Σ (G(mask·f_s) − f_t)² /
//! N`. The student learns to hold the teacher's features in fewer channels, not to copy them.
//! Where the two maps differ in size (different stems) the larger is average-pooled to the
//! smaller first, as FitNets' hint does here; the code asserts one size.
//!
//! The mask is a pure function of the run's seed and the global step (SplitMix64 over the
//! image and channel index, `mask_uniforms`), so a resumed run draws the masks it would have
//! drawn, the GPU the CPU's, and the PyTorch fixture reproduces them. The convolutions are method
//! parts (`distill.mgd.{align,generation1,generation2}`), not exported.
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use kd_data::Batch;
use kd_models::ResNet;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, RunInfo, StepContext};

/// MGD on the last stage.
pub struct Mgd {
    ce: CrossEntropy,
    weight: f64,
    mask_ratio: f64,
    align: Option<Conv2d>,
    generation: [Conv2d; 2],
    seed: AtomicU64,
}

/// SplitMix64's output function: a well-mixed 64-bit value from a counter.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `count` uniforms in [0, 1) for step `step` of a run seeded `seed`: value i is SplitMix64 of
/// `seed·2⁴⁰ + step·2²⁰ + i`'s top 53 bits (wrapping), so every (seed, step) has its own stream
/// (steps below 2²⁰ images × channels apart).
pub fn mask_uniforms(seed: u64, step: u64, count: usize) -> Vec<f32> {
    let base = seed.wrapping_shl(40).wrapping_add(step.wrapping_shl(20));
    (0..count as u64)
        .map(|i| ((splitmix64(base.wrapping_add(i)) >> 11) as f64 / (1u64 << 53) as f64) as f32)
        .collect()
}

impl Mgd {
    /// MGD for `student` learning from `teacher`: the alignment (when the last stages' widths
    /// differ) and the generator under `vb` (`align.*`, `generation1.*`, `generation2.*`).
    pub fn new(
        ce: CrossEntropy,
        weight: f64,
        mask_ratio: f64,
        student: &ResNet,
        teacher: &ResNet,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (cs, ct) = (super::pooled_width(student), super::pooled_width(teacher));
        let align = match cs == ct {
            true => None,
            false => Some(candle_nn::conv2d(
                cs,
                ct,
                1,
                Default::default(),
                vb.pp("align"),
            )?),
        };
        let same = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let generation = [
            candle_nn::conv2d(ct, ct, 3, same, vb.pp("generation1"))?,
            candle_nn::conv2d(ct, ct, 3, same, vb.pp("generation2"))?,
        ];
        Ok(Mgd {
            ce,
            weight,
            mask_ratio,
            align,
            generation,
            seed: AtomicU64::new(0),
        })
    }

    /// The (N, C, 1, 1) channel mask of `step`: 0 where the uniform is below the ratio.
    fn mask(&self, step: usize, n: usize, c: usize, like: &Tensor) -> Result<Tensor> {
        let seed = self.seed.load(Ordering::Relaxed);
        let keep: Vec<f32> = mask_uniforms(seed, step as u64, n * c)
            .into_iter()
            .map(|u| {
                if (u as f64) < self.mask_ratio {
                    0.0
                } else {
                    1.0
                }
            })
            .collect();
        Tensor::from_vec(keep, (n, c, 1, 1), like.device())?.to_dtype(like.dtype())
    }
}

impl Distiller for Mgd {
    fn name(&self) -> &'static str {
        "mgd"
    }

    /// The masks are drawn from the run's seed.
    fn prepare(&self, run: &RunInfo) -> Result<()> {
        self.seed.store(run.seed, Ordering::Relaxed);
        Ok(())
    }

    fn loss(&self, ctx: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let teacher = super::teacher_outputs(self.name(), out.teacher)?;
        let (Some(fs), Some(ft)) = (student.feats.last(), teacher.feats.last()) else {
            candle_core::bail!("mgd needs both networks' stage features");
        };
        let f = match &self.align {
            Some(conv) => conv.forward(fs)?,
            None => fs.clone(),
        };
        // Stems that differ leave maps of different sizes: the larger is average-pooled to the
        // smaller (the code asserts one size).
        let (f, ft) = kd_losses::align_spatial(&f, ft)?;
        let (n, c) = (f.dim(0)?, f.dim(1)?);
        let masked = f.broadcast_mul(&self.mask(ctx.step, n, c, &f)?)?;
        let generated =
            self.generation[1].forward(&self.generation[0].forward(&masked)?.relu()?)?;
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(&student.logits, batch)?);
        t.push(
            "loss_mgd",
            (kd_losses::generation_loss(&generated, &ft)? * self.weight)?,
        );
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64 from 0 gives the reference sequence's first values (Vigna's `splitmix64.c`
    /// with state 0: 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F).
    #[test]
    fn splitmix64_is_the_reference_generator() {
        let gamma = 0x9E37_79B9_7F4A_7C15u64;
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(gamma), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(splitmix64(gamma.wrapping_mul(2)), 0x06C4_5D18_8009_454F);
    }

    /// The uniforms lie in [0, 1), differ between steps and seeds, and about `ratio` of them
    /// fall below it.
    #[test]
    fn masks_differ_by_step_and_seed_and_drop_the_ratio() {
        let a = mask_uniforms(0, 0, 20_000);
        assert!(a.iter().all(|&u| (0.0..1.0).contains(&u)));
        assert_ne!(a[..64], mask_uniforms(0, 1, 64)[..]);
        assert_ne!(a[..64], mask_uniforms(1, 0, 64)[..]);
        assert_eq!(a[..64], mask_uniforms(0, 0, 64)[..]);
        let dropped = a.iter().filter(|&&u| u < 0.15).count() as f64 / a.len() as f64;
        assert!((dropped - 0.15).abs() < 0.01, "{dropped}");
    }
}
