//! RandAugment as the strong view of MLKD and of logit-standardisation's code uses it (their
//! `RandAugment(2, 10)`, taken from FixMatch): two operations drawn with replacement from 14,
//! each at a magnitude drawn uniformly from its range, then a Cutout of up to half the image.
//!
//! Every operation reproduces Pillow's arithmetic on `u8` pixels (Pillow 13: the blends in
//! `f32` and truncated, the 3×3 smoothing, the 16.16 fixed-point affine warp with
//! nearest-neighbour sampling, the float translation, the equalisation's `// 255` step), so
//! an image comes out as the authors' pipeline would make it; `tools/fixtures/
//! make_randaugment_fixtures.py` records Pillow's outputs and the tests compare them byte for
//! byte. Images are 3×H×W, channel-major, as the splits store them.
use rand::Rng;

/// One of the 14 RandAugment operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RandOp {
    /// Stretches each channel to 0–255 (`ImageOps.autocontrast`); ignores the magnitude.
    AutoContrast,
    /// Blends with black (`ImageEnhance.Brightness`).
    Brightness,
    /// Blends with the grey-scale image (`ImageEnhance.Color`).
    Color,
    /// Blends with the mean grey (`ImageEnhance.Contrast`).
    Contrast,
    /// Equalises each channel's histogram (`ImageOps.equalize`); ignores the magnitude.
    Equalize,
    /// Leaves the image as it is.
    Identity,
    /// Keeps the top `int(v)` bits (`ImageOps.posterize`).
    Posterize,
    /// Rotates by `v` degrees counter-clockwise about the centre, black outside.
    Rotate,
    /// Blends with the 3×3-smoothed image (`ImageEnhance.Sharpness`).
    Sharpness,
    /// Shears along x: output (x, y) reads input (x + v·y, y).
    ShearX,
    /// Shears along y: output (x, y) reads input (x, y + v·x).
    ShearY,
    /// Inverts pixels at or above the threshold `v` (`ImageOps.solarize`).
    Solarize,
    /// Shifts by `v`·width pixels: output x reads input x + v·width.
    TranslateX,
    /// Shifts by `v`·height pixels.
    TranslateY,
}

impl RandOp {
    /// The list and order of the authors' `augment_list()`.
    pub const ALL: [RandOp; 14] = [
        RandOp::AutoContrast,
        RandOp::Brightness,
        RandOp::Color,
        RandOp::Contrast,
        RandOp::Equalize,
        RandOp::Identity,
        RandOp::Posterize,
        RandOp::Rotate,
        RandOp::Sharpness,
        RandOp::ShearX,
        RandOp::ShearY,
        RandOp::Solarize,
        RandOp::TranslateX,
        RandOp::TranslateY,
    ];

    /// The range the magnitude is drawn from, uniformly.
    pub fn range(self) -> (f64, f64) {
        match self {
            RandOp::AutoContrast | RandOp::Equalize | RandOp::Identity => (0.0, 1.0),
            RandOp::Brightness | RandOp::Color | RandOp::Contrast | RandOp::Sharpness => {
                (0.05, 0.95)
            }
            RandOp::Posterize => (4.0, 8.0),
            RandOp::Rotate => (-30.0, 30.0),
            RandOp::ShearX | RandOp::ShearY | RandOp::TranslateX | RandOp::TranslateY => {
                (-0.3, 0.3)
            }
            RandOp::Solarize => (0.0, 256.0),
        }
    }

    /// The name the fixtures use (the authors' function name).
    pub fn name(self) -> &'static str {
        match self {
            RandOp::AutoContrast => "AutoContrast",
            RandOp::Brightness => "Brightness",
            RandOp::Color => "Color",
            RandOp::Contrast => "Contrast",
            RandOp::Equalize => "Equalize",
            RandOp::Identity => "Identity",
            RandOp::Posterize => "Posterize",
            RandOp::Rotate => "Rotate",
            RandOp::Sharpness => "Sharpness",
            RandOp::ShearX => "ShearX",
            RandOp::ShearY => "ShearY",
            RandOp::Solarize => "Solarize",
            RandOp::TranslateX => "TranslateX",
            RandOp::TranslateY => "TranslateY",
        }
    }

    /// The operation called `name` ([`RandOp::name`]).
    pub fn from_name(name: &str) -> Option<RandOp> {
        RandOp::ALL.into_iter().find(|op| op.name() == name)
    }

    /// Applies the operation at magnitude `v` to a 3×`h`×`w` image in place.
    pub fn apply(self, img: &mut [u8], h: usize, w: usize, v: f64) {
        debug_assert_eq!(img.len(), 3 * h * w);
        match self {
            RandOp::Identity => {}
            RandOp::AutoContrast => per_channel_lut(img, autocontrast_lut),
            RandOp::Equalize => per_channel_lut(img, equalize_lut),
            RandOp::Posterize => {
                let bits = (v as i64).clamp(1, 8) as u32;
                let mask = !((1u16 << (8 - bits)) - 1) as u8;
                img.iter_mut().for_each(|p| *p &= mask);
            }
            RandOp::Solarize => img.iter_mut().for_each(|p| {
                if f64::from(*p) >= v {
                    *p = 255 - *p;
                }
            }),
            RandOp::Brightness => blend(img, |_| 0, v),
            RandOp::Color => {
                let grey = luminance(img, h * w);
                blend(img, |i| grey[i % (h * w)], v)
            }
            RandOp::Contrast => {
                let grey = luminance(img, h * w);
                let sum: u64 = grey.iter().map(|&g| u64::from(g)).sum();
                let mean = (sum as f64 / grey.len() as f64 + 0.5) as u8;
                blend(img, |_| mean, v)
            }
            RandOp::Sharpness => {
                let smooth = smoothed(img, h, w);
                blend(img, |i| smooth[i], v)
            }
            RandOp::Rotate => {
                if let Some(m) = rotation(v, w, h) {
                    affine_fixed(img, h, w, m)
                }
            }
            RandOp::ShearX => affine_fixed(img, h, w, [1.0, v, 0.0, 0.0, 1.0, 0.0]),
            RandOp::ShearY => affine_fixed(img, h, w, [1.0, 0.0, 0.0, v, 1.0, 0.0]),
            RandOp::TranslateX => translate(img, h, w, v * w as f64, 0.0),
            RandOp::TranslateY => translate(img, h, w, 0.0, v * h as f64),
        }
    }
}

/// The grey fill of the authors' Cutout, (R, G, B).
pub const CUTOUT_FILL: [u8; 3] = [125, 123, 114];

/// The authors' `CutoutAbs` for a square of side `size` about a corner drawn at (`cx`, `cy`):
/// from (int(max(0, cx − size/2)), likewise y) to that plus `size`, both ends included as
/// Pillow's `rectangle` includes them, clipped to the image.
pub fn cutout(img: &mut [u8], h: usize, w: usize, cx: f64, cy: f64, size: f64) {
    if size < 0.0 {
        return;
    }
    let x0 = (cx - size / 2.0).max(0.0) as usize;
    let y0 = (cy - size / 2.0).max(0.0) as usize;
    let x1 = ((x0 as f64 + size).min(w as f64) as usize).min(w - 1);
    let y1 = ((y0 as f64 + size).min(h as f64) as usize).min(h - 1);
    for (c, &fill) in CUTOUT_FILL.iter().enumerate() {
        for y in y0..=y1 {
            img[(c * h + y) * w + x0..=(c * h + y) * w + x1].fill(fill);
        }
    }
}

/// RandAugment: `ops` operations drawn with replacement, then the Cutout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RandAugment {
    /// Operations per image.
    pub ops: usize,
}

impl RandAugment {
    /// The authors' `RandAugment(2, 10)` (the 10, FixMatch's magnitude, is unused there too:
    /// each magnitude is drawn from its whole range).
    pub const FIXMATCH: RandAugment = RandAugment { ops: 2 };

    /// Draws and applies the operations and the Cutout to a 3×`h`×`w` image in place, as the
    /// authors' `__call__`: the operations, each magnitude `lo + (hi − lo)·u`, then a Cutout
    /// of side `u/2`·width whose corner comes from numpy's `uniform(w)`, which (low = w,
    /// high = 1) draws from (1, w], not from (0, w).
    pub fn apply(&self, img: &mut [u8], h: usize, w: usize, rng: &mut impl Rng) {
        for _ in 0..self.ops {
            let op = RandOp::ALL[rng.gen_range(0..RandOp::ALL.len())];
            let (lo, hi) = op.range();
            let v = lo + (hi - lo) * rng.gen::<f64>();
            op.apply(img, h, w, v);
        }
        let size = rng.gen::<f64>() * 0.5 * w as f64;
        let cx = w as f64 + (1.0 - w as f64) * rng.gen::<f64>();
        let cy = h as f64 + (1.0 - h as f64) * rng.gen::<f64>();
        if size > 0.0 {
            cutout(img, h, w, cx, cy, size);
        }
    }
}

/// Maps each channel through the table `lut(channel)` makes.
fn per_channel_lut(img: &mut [u8], lut: fn(&[u8]) -> Option<[u8; 256]>) {
    let n = img.len() / 3;
    for ch in img.chunks_mut(n) {
        if let Some(t) = lut(ch) {
            ch.iter_mut().for_each(|p| *p = t[*p as usize]);
        }
    }
}

fn histogram(ch: &[u8]) -> [u64; 256] {
    let mut h = [0u64; 256];
    ch.iter().for_each(|&p| h[p as usize] += 1);
    h
}

/// `ImageOps.autocontrast` with no cut-off: lo → 0, hi → 255, `int(i·scale + offset)`.
fn autocontrast_lut(ch: &[u8]) -> Option<[u8; 256]> {
    let lo = *ch.iter().min()?;
    let hi = *ch.iter().max()?;
    if hi <= lo {
        return None;
    }
    let scale = 255.0 / f64::from(hi - lo);
    let offset = -f64::from(lo) * scale;
    let mut t = [0u8; 256];
    for (i, v) in t.iter_mut().enumerate() {
        *v = (i as f64 * scale + offset).clamp(0.0, 255.0) as u8;
    }
    Some(t)
}

/// `ImageOps.equalize`: the cumulative histogram in steps of (pixels − last bin's) // 255.
fn equalize_lut(ch: &[u8]) -> Option<[u8; 256]> {
    let h = histogram(ch);
    let used: Vec<u64> = h.iter().copied().filter(|&c| c > 0).collect();
    if used.len() <= 1 {
        return None;
    }
    let step = (used.iter().sum::<u64>() - used[used.len() - 1]) / 255;
    if step == 0 {
        return None;
    }
    let mut t = [0u8; 256];
    let mut n = step / 2;
    for (i, v) in t.iter_mut().enumerate() {
        *v = (n / step).min(255) as u8;
        n += h[i];
    }
    Some(t)
}

/// Pillow's RGB → L: (R·19595 + G·38470 + B·7471 + 2¹⁵) >> 16, per pixel.
fn luminance(img: &[u8], n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| {
            let (r, g, b) = (
                u32::from(img[i]),
                u32::from(img[n + i]),
                u32::from(img[2 * n + i]),
            );
            ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
        })
        .collect()
}

/// `ImageEnhance`'s `Image.blend(degenerate, image, v)`: `d + v·(p − d)` in `f32`, truncated
/// (clipped first outside 0 ≤ v ≤ 1, as Pillow extrapolates).
fn blend(img: &mut [u8], degenerate: impl Fn(usize) -> u8, v: f64) {
    let alpha = v as f32;
    for (i, p) in img.iter_mut().enumerate() {
        let d = degenerate(i);
        let x = f32::from(d) + alpha * (i32::from(*p) - i32::from(d)) as f32;
        *p = x.clamp(0.0, 255.0) as u8;
    }
}

/// `ImageFilter.SMOOTH` (3×3 kernel 1 1 1 / 1 5 1 / 1 1 1, divided by 13, rounded; the border
/// rows and columns copied). Pillow sums in `f32`, but a sum of 13ths plus ½ never lies within
/// 1/26 of an integer, so the exact integer form `⌊(2s + 13) / 26⌋` gives the same bytes.
fn smoothed(img: &[u8], h: usize, w: usize) -> Vec<u8> {
    let mut out = img.to_vec();
    if h < 3 || w < 3 {
        return out;
    }
    for c in 0..3 {
        let at = |y: usize, x: usize| u32::from(img[(c * h + y) * w + x]);
        for y in 1..h - 1 {
            for x in 1..w - 1 {
                let mut s = 4 * at(y, x);
                for yy in y - 1..=y + 1 {
                    for xx in x - 1..=x + 1 {
                        s += at(yy, xx);
                    }
                }
                out[(c * h + y) * w + x] = ((2 * s + 13) / 26).min(255) as u8;
            }
        }
    }
    out
}

/// The inverse matrix Pillow's `rotate(v)` builds (no expansion, about (w/2, h/2)), or `None`
/// where it copies the image (an angle of 0 modulo 360).
fn rotation(degrees: f64, w: usize, h: usize) -> Option<[f64; 6]> {
    let degrees = degrees.rem_euclid(360.0);
    if degrees == 0.0 {
        return None;
    }
    let a = -degrees.to_radians();
    // Python's round(x, 15).
    let r = |x: f64| (x * 1e15).round() / 1e15;
    let mut m = [r(a.cos()), r(a.sin()), 0.0, r(-a.sin()), r(a.cos()), 0.0];
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx;
    m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy;
    Some(m)
}

/// Pillow's nearest-neighbour affine warp in 16.16 fixed point (`affine_fixed`): output
/// (x, y) reads input (m0·x + m1·y + m2, m3·x + m4·y + m5) at pixel centres, black outside.
fn affine_fixed(img: &mut [u8], h: usize, w: usize, m: [f64; 6]) {
    let fix = |v: f64| (v * 65536.0 + 0.5).floor() as i64;
    let (a0, a1, a3, a4) = (fix(m[0]), fix(m[1]), fix(m[3]), fix(m[4]));
    let mut a2 = fix(m[2] + m[0] * 0.5 + m[1] * 0.5);
    let mut a5 = fix(m[5] + m[3] * 0.5 + m[4] * 0.5);
    let src = img.to_vec();
    for y in 0..h {
        let (mut xx, mut yy) = (a2, a5);
        for x in 0..w {
            let (xi, yi) = (xx >> 16, yy >> 16);
            let inside = (0..w as i64).contains(&xi) && (0..h as i64).contains(&yi);
            for c in 0..3 {
                img[(c * h + y) * w + x] = if inside {
                    src[(c * h + yi as usize) * w + xi as usize]
                } else {
                    0
                };
            }
            xx += a0;
            yy += a3;
        }
        a2 += a1;
        a5 += a4;
    }
}

/// Pillow's translation (`ImagingScaleAffine`): output x reads input ⌊x + ½ + dx⌋, stepped in
/// `f64`, negative coordinates outside; black outside.
fn translate(img: &mut [u8], h: usize, w: usize, dx: f64, dy: f64) {
    let coord = |v: f64| if v < 0.0 { -1 } else { v as i64 };
    let mut xs = vec![None; w];
    let mut xo = dx + 0.5;
    for slot in xs.iter_mut() {
        let xi = coord(xo);
        *slot = (0..w as i64).contains(&xi).then_some(xi as usize);
        xo += 1.0;
    }
    let src = img.to_vec();
    let mut yo = dy + 0.5;
    for y in 0..h {
        let yi = coord(yo);
        let row = (0..h as i64).contains(&yi).then_some(yi as usize);
        for (x, sx) in xs.iter().enumerate() {
            for c in 0..3 {
                img[(c * h + y) * w + x] = match (row, sx) {
                    (Some(sy), Some(sx)) => src[(c * h + sy) * w + sx],
                    _ => 0,
                };
            }
        }
        yo += 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn image(seed: u64) -> Vec<u8> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..3 * 32 * 32).map(|_| rng.gen()).collect()
    }

    /// A translation by a whole number of pixels shifts the image and fills black.
    #[test]
    fn translation_by_whole_pixels_shifts() {
        let src = image(1);
        let mut img = src.clone();
        RandOp::TranslateX.apply(&mut img, 32, 32, 3.0 / 32.0);
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let want = if x + 3 < 32 {
                        src[(c * 32 + y) * 32 + x + 3]
                    } else {
                        0
                    };
                    assert_eq!(img[(c * 32 + y) * 32 + x], want);
                }
            }
        }
    }

    /// A blend at 1 is the image; Posterize at 8 bits and Solarize above 255 leave it alone.
    #[test]
    fn identities() {
        let src = image(2);
        for (op, v) in [
            (RandOp::Brightness, 1.0),
            (RandOp::Color, 1.0),
            (RandOp::Contrast, 1.0),
            (RandOp::Sharpness, 1.0),
            (RandOp::Posterize, 8.0),
            (RandOp::Solarize, 256.0),
            (RandOp::Rotate, 0.0),
            (RandOp::ShearX, 0.0),
        ] {
            let mut img = src.clone();
            op.apply(&mut img, 32, 32, v);
            assert_eq!(img, src, "{op:?} at {v}");
        }
    }

    /// The same generator state gives the same strong view; the ops change the image.
    #[test]
    fn seeded_and_not_identity() {
        let src = image(3);
        let run = |seed| {
            let mut img = src.clone();
            RandAugment::FIXMATCH.apply(
                &mut img,
                32,
                32,
                &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            );
            img
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
