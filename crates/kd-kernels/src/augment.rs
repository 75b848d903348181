//! Random crop with zero padding, horizontal flip, normalisation and mixup or CutMix of a batch,
//! read from a uint8 data set that lives on the device, in one kernel: per batch only the plan
//! (20 bytes an image, and λ and CutMix's box) crosses from the host, and the pixels never do.
//!
//! The plan is drawn on the host from the loader's seeded streams, so a run augments the same
//! way whether the pixels are prepared on the host or on the device. The arithmetic is that of
//! kd-data's `CropFlip::apply_normalized`: `out = pixel · scale[c] + shift[c]`, with
//! `scale = 1 / (255 · std)` and `shift = −mean / std`, and 0 as the padding pixel; then
//! [`BatchMix::apply`]'s on the normalised values, the mixing kd-data's host loader also uses.
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::cpu;

/// How one image of a batch is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AugmentPlan {
    /// Index of the image in the data set.
    pub index: u32,
    /// Row of the crop's top-left corner in the padded image (0..=2·padding).
    pub oy: u32,
    /// Column of the crop's top-left corner in the padded image (0..=2·padding).
    pub ox: u32,
    /// Mirror left–right after cropping.
    pub flip: bool,
}

/// How the augmented images of a batch are mixed (kd-data's `MixPlan`, drawn on the host).
#[derive(Clone, Debug, PartialEq)]
pub struct BatchMix {
    /// Sample `i` is mixed with sample `partner[i]` of the same batch (its augmented image).
    pub partner: Vec<u32>,
    /// Mixup's weight of the sample's own image: `λ·x_i + (1 − λ)·x_partner[i]`. With a
    /// CutMix box it weighs only the labels, not the pixels.
    pub lambda: f32,
    /// CutMix: rows `y0..y1` and columns `x0..x1`, as `[y0, y1, x0, x1]`, are the partner's;
    /// `None` for mixup.
    pub cut: Option<[usize; 4]>,
}

impl BatchMix {
    /// Mixes a batch of augmented, normalised images (B×C×H×W in `images`, B = the partners)
    /// in place, from a copy of it: the arithmetic of the kernel's mixing, and the one kd-data's
    /// host loader uses (`MixPlan::apply_host`), so both paths mix alike.
    pub fn apply(&self, images: &mut [f32], c: usize, h: usize, w: usize) {
        let n = c * h * w;
        let src = images.to_vec();
        for (img, &j) in images.chunks_exact_mut(n).zip(&self.partner) {
            let other = &src[j as usize * n..][..n];
            match self.cut {
                None => {
                    let lambda = self.lambda;
                    for (o, &p) in img.iter_mut().zip(other) {
                        *o = lambda * *o + (1.0 - lambda) * p;
                    }
                }
                Some([y0, y1, x0, x1]) => {
                    for ch in 0..c {
                        for y in y0..y1 {
                            let row = (ch * h + y) * w;
                            img[row + x0..row + x1].copy_from_slice(&other[row + x0..row + x1]);
                        }
                    }
                }
            }
        }
    }
}

/// Per-channel affine map from a raw pixel (0–255) to the network's input.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalisation {
    /// Multiplier per channel.
    pub scale: Vec<f32>,
    /// Offset per channel.
    pub shift: Vec<f32>,
}

impl Normalisation {
    /// The table the kernel reads: the C scales, then the C shifts. The CUDA launch, the CPU op
    /// and the emulator tests all take it from here.
    pub fn kernel_table(&self) -> Vec<f32> {
        [self.scale.as_slice(), self.shift.as_slice()].concat()
    }

    /// `(pixel / 255 − mean) / std`, computed as kd-data computes it.
    pub fn from_mean_std(mean: &[f32], std: &[f32]) -> Self {
        Normalisation {
            scale: std.iter().map(|s| 1.0 / (255.0 * s)).collect(),
            shift: mean.iter().zip(std).map(|(m, s)| -m / s).collect(),
        }
    }
}

/// Makes a batch (B, C, H, W) of `dtype` (f32 or bf16) from `images` (N, C, H, W, u8, on any
/// device) following `plans`, then mixes it as `mix` says; `padding` is the crop padding the
/// plans' offsets refer to.
pub fn augment_batch(
    images: &Tensor,
    plans: &[AugmentPlan],
    mix: Option<&BatchMix>,
    padding: usize,
    norm: &Normalisation,
    dtype: DType,
) -> Result<Tensor> {
    let (n, c, h, w) = images.dims4()?;
    if images.dtype() != DType::U8 {
        bail!("augment_batch: images must be u8, got {:?}", images.dtype());
    }
    if norm.scale.len() != c || norm.shift.len() != c {
        bail!(
            "augment_batch: {c} channels but the normalisation has {} scales and {} shifts",
            norm.scale.len(),
            norm.shift.len()
        );
    }
    if !matches!(dtype, DType::F32 | DType::BF16) {
        bail!("augment_batch: output dtype must be f32 or bf16, got {dtype:?}");
    }
    if plans.is_empty() {
        bail!("augment_batch: empty batch");
    }
    let b = plans.len();
    if let Some(m) = mix {
        if m.partner.len() != b {
            bail!(
                "augment_batch: {b} plans but the mix has {} partners",
                m.partner.len()
            );
        }
        if let Some(&j) = m.partner.iter().find(|&&j| j as usize >= b) {
            bail!("augment_batch: mix partner {j} is outside the batch of {b}");
        }
        if let Some([y0, y1, x0, x1]) = m.cut {
            if y0 > y1 || y1 > h || x0 > x1 || x1 > w {
                bail!(
                    "augment_batch: CutMix box rows {y0}..{y1}, columns {x0}..{x1} is not \
                     inside {h}×{w} images"
                );
            }
        }
    }
    for (i, p) in plans.iter().enumerate() {
        let max = 2 * padding as u32;
        if p.index as usize >= n || p.oy > max || p.ox > max {
            bail!(
                "augment_batch: plan {i} ({p:?}) is outside {n} images with crop padding {padding}"
            );
        }
    }
    let flat = kernel_plan(plans, mix);
    let dev = images.device();
    let plan = Tensor::from_vec(flat, (b, 5), dev)?;
    let norm_t = Tensor::from_vec(norm.kernel_table(), 2 * c, dev)?;
    images.contiguous()?.apply_op2_no_bwd(
        &plan,
        &Augment {
            padding,
            norm: norm_t,
            dtype,
            mix: mix.cloned(),
        },
    )
}

/// The plan as the kernel reads it, five words an image: image index, crop offsets oy and ox,
/// flip, and the batch position of its mixing partner (its own when unmixed). The CUDA launch,
/// the CPU op and the emulator tests all take it from here.
pub fn kernel_plan(plans: &[AugmentPlan], mix: Option<&BatchMix>) -> Vec<u32> {
    plans
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            let partner = mix.map_or(i as u32, |m| m.partner[i]);
            [p.index, p.oy, p.ox, p.flip as u32, partner]
        })
        .collect()
}

/// The mixing as the kernel takes it (the partners travel in the plan).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MixKind {
    /// No mixing.
    Unmixed,
    /// Mixup with the sample's own weight λ.
    Mixup {
        /// λ.
        lambda: f32,
    },
    /// CutMix with the box `[y0, y1, x0, x1]`.
    Cutmix {
        /// The pasted box.
        cut: [usize; 4],
    },
}

impl MixKind {
    /// The kind of `mix`.
    pub fn of(mix: Option<&BatchMix>) -> Self {
        match mix {
            None => MixKind::Unmixed,
            Some(BatchMix { cut: Some(cut), .. }) => MixKind::Cutmix { cut: *cut },
            Some(m) => MixKind::Mixup { lambda: m.lambda },
        }
    }

    /// The kernel's `mix`, `lambda` and box (`y0, y1, x0, x1`) arguments; the CUDA launch and
    /// the emulator tests take them from here.
    pub fn kernel_args(self) -> (i32, f32, [usize; 4]) {
        match self {
            MixKind::Unmixed => (0, 1.0, [0; 4]),
            MixKind::Mixup { lambda } => (1, lambda, [0; 4]),
            MixKind::Cutmix { cut } => (2, 1.0, cut),
        }
    }
}

struct Augment {
    padding: usize,
    norm: Tensor,
    dtype: DType,
    mix: Option<BatchMix>,
}

impl CustomOp2 for Augment {
    fn name(&self) -> &'static str {
        "kd-augment"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::U8(images), CpuStorage::U32(plan)) = (s1, s2) else {
            bail!("kd-augment expects u8 images and a u32 plan")
        };
        let Some((a, _)) = l1.contiguous_offsets() else {
            bail!("kd-augment expects contiguous images")
        };
        let images = &images[a..];
        let plan = cpu::tensor(&CpuStorage::U32(plan.clone()), l2)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        let norm = self.norm.to_vec1::<f32>()?;
        let (c, h, w) = (l1.dims()[1], l1.dims()[2], l1.dims()[3]);
        let pad = self.padding as isize;
        let b = plan.len() / 5;
        let n = c * h * w;
        let mut out = vec![0f32; b * n];
        for (i, p) in plan.chunks_exact(5).enumerate() {
            let img = &images[p[0] as usize * c * h * w..][..c * h * w];
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let xs = if p[3] != 0 { w - 1 - x } else { x };
                        let sy = y as isize + p[1] as isize - pad;
                        let sx = xs as isize + p[2] as isize - pad;
                        let inside = (0..h as isize).contains(&sy) && (0..w as isize).contains(&sx);
                        let v = if inside {
                            img[(ch * h + sy as usize) * w + sx as usize] as f32
                        } else {
                            0.0
                        };
                        out[((i * c + ch) * h + y) * w + x] = v * norm[ch] + norm[c + ch];
                    }
                }
            }
        }
        if let Some(mix) = &self.mix {
            mix.apply(&mut out, c, h, w);
        }
        Ok((cpu::from_f32s(out, self.dtype)?, Shape::from((b, c, h, w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = l1.dims();
        let out = crate::cuda_ops::augment(
            (s1, l1),
            (s2, l2),
            &self.norm,
            self.dtype,
            self.padding,
            MixKind::of(self.mix.as_ref()),
        )?;
        Ok((out, Shape::from((l2.dims()[0], d[1], d[2], d[3]))))
    }
}
