//! Seeded augmentation on `u8` images: random crop from a zero-padded image, horizontal flip,
//! normalisation, and the batch mixes mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019).
//!
//! Crop, flip and normalisation run as one pass from `u8` pixels to normalised `f32`, so an
//! augmented batch is written once. Randomness comes from [`sample_rng`], keyed by
//! (seed, stream, epoch, position), so results do not depend on thread scheduling.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};
use serde::{Deserialize, Serialize};

use crate::{DataError, Result};

/// Per-channel normalisation `(x/255 − mean) / std`, constants in [0, 1] units.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalize {
    /// Channel means.
    pub mean: [f32; 3],
    /// Channel standard deviations.
    pub std: [f32; 3],
}

impl Normalize {
    /// CIFAR-10 constants used by the huyvnphan v3 teachers.
    pub const CIFAR10: Normalize = Normalize {
        mean: [0.4914, 0.4822, 0.4465],
        std: [0.2471, 0.2435, 0.2616],
    };
    /// CIFAR-100 constants.
    pub const CIFAR100: Normalize = Normalize {
        mean: [0.5071, 0.4865, 0.4409],
        std: [0.2673, 0.2564, 0.2762],
    };
    /// Scale to [0, 1] only.
    pub const IDENTITY: Normalize = Normalize {
        mean: [0.0; 3],
        std: [1.0; 3],
    };

    /// Validates that every std is positive and finite.
    pub fn validate(&self) -> Result<()> {
        if self.std.iter().all(|s| s.is_finite() && *s > 0.0)
            && self.mean.iter().all(|m| m.is_finite())
        {
            Ok(())
        } else {
            Err(DataError::Invalid {
                field: "normalize",
                message: format!(
                    "mean {:?} / std {:?}: std must be positive and finite",
                    self.mean, self.std
                ),
            })
        }
    }
}

/// Which per-image augmentations to apply.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Augment {
    /// Zero padding before the random crop back to the original size; 0 disables cropping.
    pub crop_padding: usize,
    /// Random horizontal flip with probability ½.
    pub hflip: bool,
}

impl Augment {
    /// The standard CIFAR recipe: pad 4, random 32×32 crop, random flip.
    pub const STANDARD: Augment = Augment {
        crop_padding: 4,
        hflip: true,
    };
    /// No augmentation (normalisation only).
    pub const NONE: Augment = Augment {
        crop_padding: 0,
        hflip: false,
    };

    /// Draws the crop offset and flip for one image.
    pub fn sample(&self, rng: &mut impl Rng) -> CropFlip {
        let span = 2 * self.crop_padding + 1;
        let oy = if self.crop_padding > 0 {
            rng.gen_range(0..span)
        } else {
            0
        };
        let ox = if self.crop_padding > 0 {
            rng.gen_range(0..span)
        } else {
            0
        };
        let flip = self.hflip && rng.gen_bool(0.5);
        CropFlip {
            pad: self.crop_padding,
            oy,
            ox,
            flip,
        }
    }
}

/// A drawn crop window (offset in the padded image) and flip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropFlip {
    /// Padding the offsets refer to.
    pub pad: usize,
    /// Row offset of the window in the padded image, `0..=2·pad`.
    pub oy: usize,
    /// Column offset of the window in the padded image, `0..=2·pad`.
    pub ox: usize,
    /// Mirror left-right after cropping.
    pub flip: bool,
}

impl CropFlip {
    /// The identity transform.
    pub const IDENTITY: CropFlip = CropFlip {
        pad: 0,
        oy: 0,
        ox: 0,
        flip: false,
    };

    /// Source (row, column) for output (y, x), or `None` where the window sees padding.
    #[inline]
    fn source(&self, y: usize, x: usize, h: usize, w: usize) -> Option<(usize, usize)> {
        let x = if self.flip { w - 1 - x } else { x };
        let sy = (y + self.oy).checked_sub(self.pad)?;
        let sx = (x + self.ox).checked_sub(self.pad)?;
        (sy < h && sx < w).then_some((sy, sx))
    }

    /// Applies the transform to a C×H×W `u8` image (padding pixels are 0).
    pub fn apply_u8(&self, img: &[u8], c: usize, h: usize, w: usize) -> Vec<u8> {
        let mut out = vec![0u8; c * h * w];
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    if let Some((sy, sx)) = self.source(y, x, h, w) {
                        out[(ch * h + y) * w + x] = img[(ch * h + sy) * w + sx];
                    }
                }
            }
        }
        out
    }

    /// Applies the transform and normalisation in one pass, writing C×H×W `f32` into `out`.
    /// Padding is black (pixel value 0) before normalisation, as torchvision pads.
    pub fn apply_normalized(
        &self,
        img: &[u8],
        h: usize,
        w: usize,
        norm: &Normalize,
        out: &mut [f32],
    ) {
        for ch in 0..3 {
            let scale = 1.0 / (255.0 * norm.std[ch]);
            let shift = -norm.mean[ch] / norm.std[ch];
            let src = &img[ch * h * w..(ch + 1) * h * w];
            let dst = &mut out[ch * h * w..(ch + 1) * h * w];
            if *self == CropFlip::IDENTITY {
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = s as f32 * scale + shift;
                }
                continue;
            }
            for y in 0..h {
                for x in 0..w {
                    let v = self
                        .source(y, x, h, w)
                        .map_or(0.0, |(sy, sx)| src[sy * w + sx] as f32);
                    dst[y * w + x] = v * scale + shift;
                }
            }
        }
    }
}

/// How images of a batch are mixed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Mix {
    /// Mixup: `λ·x_i + (1−λ)·x_π(i)`, λ ~ Beta(α, α).
    Mixup {
        /// Beta concentration.
        alpha: f32,
    },
    /// CutMix: a box of area `(1−λ)` pasted from `x_π(i)`; λ recomputed from the clipped box.
    Cutmix {
        /// Beta concentration.
        alpha: f32,
    },
}

/// What a mixed batch carries besides its images: the partner labels and the weight of the first.
#[derive(Clone, Debug, PartialEq)]
pub struct MixInfo {
    /// Label of the image mixed in, per sample.
    pub labels_b: Vec<u32>,
    /// Weight of the original labels (λ); `1 − λ` goes to `labels_b`.
    pub lambda: f32,
}

/// One batch's mixing, drawn before any pixel is touched, so the host and the device (a
/// resident data set) mix identically: λ, the partner of each sample, and CutMix's box.
#[derive(Clone, Debug, PartialEq)]
pub struct MixPlan {
    /// Weight of the original image and label (for CutMix, recomputed from the clipped box).
    pub lambda: f32,
    /// Sample `i` is mixed with sample `perm[i]` of the same batch.
    pub perm: Vec<usize>,
    /// CutMix's pasted box, rows `y0..y1` and columns `x0..x1`; `None` for mixup.
    pub cut: Option<[usize; 4]>,
}

impl MixPlan {
    /// Mixes normalised images (B×C×H×W in `images`) in place, with the arithmetic the
    /// resident data path's augmentation kernel uses ([`kd_kernels::BatchMix::apply`]).
    pub fn apply_host(&self, images: &mut [f32], c: usize, h: usize, w: usize) {
        self.batch_mix().apply(images, c, h, w);
    }

    /// This mixing as kd-kernels' augmentation takes it.
    pub fn batch_mix(&self) -> kd_kernels::BatchMix {
        kd_kernels::BatchMix {
            partner: self.perm.iter().map(|&j| j as u32).collect(),
            lambda: self.lambda,
            cut: self.cut,
        }
    }

    /// The labels mixed in, per sample.
    pub fn info(&self, labels: &[u32]) -> MixInfo {
        MixInfo {
            labels_b: self.perm.iter().map(|&j| labels[j]).collect(),
            lambda: self.lambda,
        }
    }
}

impl Mix {
    /// Draws the mixing of a batch of `b` images of `h`×`w`: one λ per batch and a random
    /// pairing, as the reference implementations do.
    pub fn draw(&self, b: usize, h: usize, w: usize, rng: &mut impl Rng) -> Result<MixPlan> {
        let alpha = match *self {
            Mix::Mixup { alpha } | Mix::Cutmix { alpha } => alpha,
        };
        let beta = Beta::new(alpha, alpha).map_err(|e| DataError::Invalid {
            field: "mix.alpha",
            message: format!("{alpha}: {e}"),
        })?;
        let lambda: f32 = beta.sample(rng);
        let mut perm: Vec<usize> = (0..b).collect();
        rand::seq::SliceRandom::shuffle(perm.as_mut_slice(), rng);
        Ok(match *self {
            Mix::Mixup { .. } => MixPlan {
                lambda,
                perm,
                cut: None,
            },
            Mix::Cutmix { .. } => {
                let ratio = (1.0 - lambda).sqrt();
                let cut_h = (h as f32 * ratio) as usize;
                let cut_w = (w as f32 * ratio) as usize;
                let cy = rng.gen_range(0..h);
                let cx = rng.gen_range(0..w);
                let y0 = cy.saturating_sub(cut_h / 2);
                let y1 = (cy + cut_h / 2).min(h);
                let x0 = cx.saturating_sub(cut_w / 2);
                let x1 = (cx + cut_w / 2).min(w);
                MixPlan {
                    lambda: 1.0 - ((y1 - y0) * (x1 - x0)) as f32 / (h * w) as f32,
                    perm,
                    cut: Some([y0, y1, x0, x1]),
                }
            }
        })
    }

    /// Mixes a batch of normalised images (B×C×H×W in `images`) in place: [`Mix::draw`] then
    /// [`MixPlan::apply_host`].
    pub fn apply(
        &self,
        images: &mut [f32],
        labels: &[u32],
        c: usize,
        h: usize,
        w: usize,
        rng: &mut impl Rng,
    ) -> Result<MixInfo> {
        let plan = self.draw(labels.len(), h, w, rng)?;
        plan.apply_host(images, c, h, w);
        Ok(plan.info(labels))
    }
}

/// Independent random streams, one per purpose, so resuming or reordering one never shifts another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Per-epoch shuffle of the data order.
    Order = 1,
    /// Per-image crop and flip.
    Augment = 2,
    /// Per-batch mixup/cutmix.
    Mix = 3,
    /// Subset selection.
    Subset = 4,
    /// The second view's crop and flip (two-view and class-wise self-distillation).
    SecondView = 5,
    /// The choice of a same-class partner (class-wise self-distillation).
    Partner = 6,
    /// Each sample's negatives, images of other classes (contrastive distillation, CRD).
    Negatives = 7,
    /// The strong view's crop, flip and RandAugment draws (MLKD).
    StrongView = 8,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A generator keyed by (seed, stream, epoch, index): the same key always gives the same numbers.
pub fn sample_rng(seed: u64, stream: Stream, epoch: u64, index: u64) -> ChaCha8Rng {
    let key = splitmix(splitmix(splitmix(seed ^ splitmix(stream as u64)) ^ epoch) ^ index);
    ChaCha8Rng::seed_from_u64(key)
}
