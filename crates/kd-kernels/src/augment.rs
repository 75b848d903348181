//! Random crop with zero padding, horizontal flip and normalisation of a batch, read from a
//! uint8 data set that lives on the device: per batch only the plan (16 bytes an image) crosses
//! from the host, and the pixels never do.
//!
//! The plan is drawn on the host from the loader's seeded streams, so a run augments the same
//! way whether the pixels are prepared on the host or on the device. The arithmetic is that of
//! kd-data's `CropFlip::apply_normalized`: `out = pixel · scale[c] + shift[c]`, with
//! `scale = 1 / (255 · std)` and `shift = −mean / std`, and 0 as the padding pixel.
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

/// Per-channel affine map from a raw pixel (0–255) to the network's input.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalisation {
    /// Multiplier per channel.
    pub scale: Vec<f32>,
    /// Offset per channel.
    pub shift: Vec<f32>,
}

impl Normalisation {
    /// `(pixel / 255 − mean) / std`, computed as kd-data computes it.
    pub fn from_mean_std(mean: &[f32], std: &[f32]) -> Self {
        Normalisation {
            scale: std.iter().map(|s| 1.0 / (255.0 * s)).collect(),
            shift: mean.iter().zip(std).map(|(m, s)| -m / s).collect(),
        }
    }
}

/// Makes a batch (B, C, H, W) of `dtype` (f32 or bf16) from `images` (N, C, H, W, u8, on any
/// device) following `plans`; `padding` is the crop padding the plans' offsets refer to.
pub fn augment_batch(
    images: &Tensor,
    plans: &[AugmentPlan],
    padding: usize,
    norm: &Normalisation,
    dtype: DType,
) -> Result<Tensor> {
    let (n, c, _, _) = images.dims4()?;
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
    let mut flat = Vec::with_capacity(plans.len() * 4);
    for (i, p) in plans.iter().enumerate() {
        let max = 2 * padding as u32;
        if p.index as usize >= n || p.oy > max || p.ox > max {
            bail!(
                "augment_batch: plan {i} ({p:?}) is outside {n} images with crop padding {padding}"
            );
        }
        flat.extend([p.index, p.oy, p.ox, p.flip as u32]);
    }
    let dev = images.device();
    let plan = Tensor::from_vec(flat, (plans.len(), 4), dev)?;
    let norm_t = Tensor::from_vec(
        [norm.scale.clone(), norm.shift.clone()].concat(),
        2 * c,
        dev,
    )?;
    images.contiguous()?.apply_op2_no_bwd(
        &plan,
        &Augment {
            padding,
            norm: norm_t,
            dtype,
        },
    )
}

struct Augment {
    padding: usize,
    norm: Tensor,
    dtype: DType,
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
        let b = plan.len() / 4;
        let mut out = vec![0f32; b * c * h * w];
        for (i, p) in plan.chunks_exact(4).enumerate() {
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
        let out =
            crate::cuda_ops::augment((s1, l1), (s2, l2), &self.norm, self.dtype, self.padding)?;
        Ok((out, Shape::from((l2.dims()[0], d[1], d[2], d[3]))))
    }
}
