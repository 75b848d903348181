//! Stride-1 convolutions on the CPU as sums of shifted products, one per kernel tap, without
//! patch rows.
//!
//! Each image is laid out on its zero-padded grid (Hp, Wp) of C-value rows, the images one after
//! another: a matrix X of N·Hp·Wp rows. The output position (n, u, v) is given the grid row
//! r = (n·Hp + u)·Wp + v, and its tap (a, b) reads grid row r + a·Wp + b. For a fixed tap these
//! are X's rows shifted by a·Wp + b: a plain strided matrix. So
//!
//! - the convolution is Y = Σ_t X[shift_t] · W_t, with W_t the (C, O) slice of tap t: kh·kw
//!   products on X as it lies, accumulated in place;
//! - the kernel gradient is dW_t = X[shift_t]ᵀ · DY, with dy laid on the same grid (zeros
//!   outside the output positions).
//!
//! Rows that are not output positions (each grid's right and bottom margins) are computed and
//! dropped: 13% more work at 32×32 with padding 1, 27% at 16×16, 56% at 8×8, which is why
//! [`suits`] keeps this to planes of 16×16 and more. In exchange the im2col path's patch rows
//! (kh·kw times the input, written then read by gemm) are gone, and gemm reads X in place.
//! ResNet18's first stage at batch 32 (`cargo run --release -p kd-kernels --example
//! cpu_conv_timing`) has the numbers.
use crate::conv::Conv2dGeometry;
use crate::cpu::{self, Float, MatRef, Scratch};
use crate::switches::{enabled, Kernel};

/// The smallest output plane (pixels) worth the grid's margins: 16×16. At 8×8 with a 3×3
/// kernel the margins add 56% to the products and the im2col path was as fast or faster.
const MIN_PLANE: usize = 256;

/// Bytes of output rows one task computes: its (rows, O) block stays in the L2 cache across
/// the kh·kw products that accumulate into it.
const TASK_BYTES: usize = 256 << 10;

/// Grid rows behind one partial kernel gradient at least, and the most partials: a fixed split
/// (from the shapes, not the threads) so that the sum does not depend on the thread count.
const GRADIENT_MIN_ROWS: usize = 256;
const GRADIENT_MAX_PARTS: usize = 16;

/// Whether a convolution with this kernel, geometry and output plane goes through this path:
/// stride 1, a kernel larger than 1×1, an output plane of at least [`MIN_PLANE`] pixels, and
/// `KD_DISABLE` not naming `taps`.
pub(crate) fn suits((kh, kw): (usize, usize), g: Conv2dGeometry, (ho, wo): (usize, usize)) -> bool {
    g.stride == 1 && kh * kw > 1 && ho * wo >= MIN_PLANE && enabled(Kernel::ConvTaps)
}

/// The padded grid shared by the images, the kernel and the output.
struct Grid {
    n: usize,
    hp: usize,
    wp: usize,
    ho: usize,
    wo: usize,
    kh: usize,
    kw: usize,
}

impl Grid {
    /// The grid of input `[n, _, h, w]` padded by `padding` on each side, for a kh×kw kernel.
    fn new([n, _, h, w]: [usize; 4], (kh, kw): (usize, usize), padding: usize) -> Self {
        let (hp, wp) = (h + 2 * padding, w + 2 * padding);
        Grid {
            n,
            hp,
            wp,
            ho: (hp + 1).saturating_sub(kh),
            wo: (wp + 1).saturating_sub(kw),
            kh,
            kw,
        }
    }

    fn taps(&self) -> usize {
        self.kh * self.kw
    }

    /// How many rows past its own the last tap reads.
    fn reach(&self) -> usize {
        (self.kh - 1) * self.wp + self.kw - 1
    }

    /// The rows computed: every output position lies below this (the last one, of the last
    /// image, at n·Hp·Wp − 1 − reach), and tap t of a row below it reads inside the grid.
    fn rows(&self) -> usize {
        (self.n * self.hp * self.wp).saturating_sub(self.reach())
    }

    /// Tap t's shift, in rows.
    fn shift(&self, t: usize) -> usize {
        t / self.kw * self.wp + t % self.kw
    }

    /// Whether there is anything to compute.
    fn is_empty(&self) -> bool {
        self.n * self.ho * self.wo == 0
    }
}

/// `v` (N, C, H, W) laid on each image's (Hp, Wp) grid with its top-left value at (top, left),
/// zeros elsewhere: (N, Hp, Wp, C), one grid row per parallel task. Writes every value.
fn lay_on_grid<T: Float>(
    v: &[T],
    [n, c, h, w]: [usize; 4],
    (hp, wp): (usize, usize),
    (top, left): (usize, usize),
) -> Scratch<T> {
    use rayon::prelude::*;
    debug_assert!(top + h <= hp && left + w <= wp);
    let mut out = Scratch::take(n * hp * wp * c);
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(wp * c)
        .enumerate()
        .for_each(|(row, dst)| {
            let (img, i) = (row / hp, row % hp);
            if !(top..top + h).contains(&i) {
                dst.fill(T::default());
                return;
            }
            dst[..left * c].fill(T::default());
            dst[(left + w) * c..].fill(T::default());
            // Row i − top of the image's C planes, (C, W) with a plane's stride, as (W, C).
            let src = &v[(img * c * h + i - top) * w..];
            cpu::transpose(src, h * w, (c, w), &mut dst[left * c..(left + w) * c], c);
        });
    out
}

/// y (N, O, Ho, Wo) = conv(x (N, C, H, W)) at stride 1 with `padding`, the kernel given as its
/// (kh·kw·C, O) matrix `wm` (tap-major, `conv_cpu`'s `kernel_matrix`): per block of grid rows,
/// the kh·kw products accumulate into the block, then the output positions go to NCHW.
#[allow(unsafe_code)]
pub(crate) fn convolve<T: Float>(
    x: &[T],
    dims: [usize; 4],
    wm: &[T],
    (o, kh, kw): (usize, usize, usize),
    padding: usize,
) -> Vec<T> {
    use rayon::prelude::*;
    let c = dims[1];
    let grid = Grid::new(dims, (kh, kw), padding);
    debug_assert_eq!(wm.len(), grid.taps() * c * o);
    let (ho, wo) = (grid.ho, grid.wo);
    if grid.is_empty() || o == 0 {
        return Vec::new();
    }
    let xg = lay_on_grid(x, dims, (grid.hp, grid.wp), (padding, padding));
    let rows = grid.rows();
    let mut acc = Scratch::take(rows * o);
    let task_rows = (TASK_BYTES / (o * std::mem::size_of::<T>())).max(16);
    acc.par_chunks_mut(task_rows * o)
        .enumerate()
        .for_each(|(i, block)| {
            let (first, len) = (i * task_rows, block.len() / o);
            for t in 0..grid.taps() {
                let shifted = MatRef {
                    data: &xg[(first + grid.shift(t)) * c..],
                    rows: len,
                    cols: c,
                    row_stride: c,
                    col_stride: 1,
                };
                let w_t = MatRef::row_major(&wm[t * c * o..][..c * o], c, o);
                cpu::matmul_into_serial(block, shifted, w_t, t > 0);
            }
        });
    // (grid row, o) → (o, pixel), per image and block of transpose tiles' worth of channels, a
    // grid row at a time.
    let (plane, block) = (ho * wo, cpu::TILE);
    let mut y = cpu::output_slots(grid.n * o * plane);
    let acc = &*acc;
    y.par_chunks_mut(o * plane)
        .enumerate()
        .for_each(|(img, image)| {
            image
                .par_chunks_mut(block * plane)
                .enumerate()
                .for_each(|(b, planes)| {
                    let channels = planes.len() / plane;
                    for u in 0..ho {
                        let src = &acc[(img * grid.hp + u) * grid.wp * o + b * block..];
                        cpu::transpose(src, o, (wo, channels), &mut planes[u * wo..], plane);
                    }
                });
        });
    // SAFETY: the images cover `y`, their blocks of planes cover each image, and the transposes
    // write row u of every plane of a block, for every u < Ho.
    unsafe { cpu::written(y) }
}

/// dw (O, C, kh, kw) of a stride-1 convolution with `padding`, from x (N, C, H, W) and dy
/// (N, O, Ho, Wo): the grid rows split into at most [`GRADIENT_MAX_PARTS`] blocks, each giving
/// a partial dW_t = X[shift_t]ᵀ · DY per tap; the partials are then added in block order.
#[allow(unsafe_code)]
pub(crate) fn kernel_gradient<T: Float>(
    x: &[T],
    dims: [usize; 4],
    dy: &[T],
    [o, c, kh, kw]: [usize; 4],
    padding: usize,
) -> Vec<T> {
    use rayon::prelude::*;
    let grid = Grid::new(dims, (kh, kw), padding);
    let (taps, part_len) = (grid.taps(), grid.taps() * c * o);
    if grid.is_empty() || part_len == 0 {
        return vec![T::default(); o * c * kh * kw];
    }
    let xg = lay_on_grid(x, dims, (grid.hp, grid.wp), (padding, padding));
    let dyg = lay_on_grid(
        dy,
        [grid.n, o, grid.ho, grid.wo],
        (grid.hp, grid.wp),
        (0, 0),
    );
    let rows = grid.rows();
    let parts = (rows / GRADIENT_MIN_ROWS).clamp(1, GRADIENT_MAX_PARTS);
    let block_rows = rows.div_ceil(parts);
    let mut partial = Scratch::take(parts * part_len);
    partial
        .par_chunks_mut(part_len)
        .enumerate()
        .for_each(|(b, part)| {
            let first = b * block_rows;
            let len = block_rows.min(rows.saturating_sub(first));
            let dy_block = MatRef::row_major(&dyg[first * o..][..len * o], len, o);
            for (t, part_t) in part.chunks_mut(c * o).enumerate() {
                // X[shift_t]ᵀ over the block: (C, len), column-major.
                let shifted_t = MatRef {
                    data: &xg[(first + grid.shift(t)) * c..],
                    rows: c,
                    cols: len,
                    row_stride: 1,
                    col_stride: c,
                };
                cpu::matmul_into_serial(part_t, shifted_t, dy_block, false);
            }
        });
    // Σ over the blocks, in block order, into the first.
    let (first, rest) = partial.split_at_mut(part_len);
    first.par_chunks_mut(4096).enumerate().for_each(|(i, dst)| {
        for b in 0..parts - 1 {
            let src = &rest[b * part_len + i * 4096..][..dst.len()];
            for (d, &s) in dst.iter_mut().zip(src) {
                *d += s;
            }
        }
    });
    // (tap, C, O) → (O, C, kh, kw), one output channel per task.
    let sum = &*first;
    let mut dw = cpu::output_slots(o * c * taps);
    dw.par_chunks_mut(c * taps)
        .enumerate()
        .for_each(|(oc, dst)| {
            for (ci, channel) in dst.chunks_mut(taps).enumerate() {
                for (t, d) in channel.iter_mut().enumerate() {
                    d.write(sum[(t * c + ci) * o + oc]);
                }
            }
        });
    // SAFETY: the output channels' (C·kh·kw)-value chunks cover `dw`, and each slot of a chunk
    // is written, channel by channel, tap by tap.
    unsafe { cpu::written(dw) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::backward_filter_reference;
    use crate::conv_cpu::{kernel_matrix, Taps};
    use crate::cpu::{max_abs_diff, poison_scratch};
    use candle_core::{Device, Tensor};

    /// (x dims, w dims, padding): 3×3 with and without padding on odd sizes, 5×5 with padding 4
    /// (taps that see only padding), a 1×3 kernel, one image, and a grid of 7,056 rows (16
    /// partial kernel gradients).
    const CASES: [([usize; 4], [usize; 4], usize); 7] = [
        ([2, 3, 17, 19], [5, 3, 3, 3], 1),
        ([2, 3, 12, 11], [4, 3, 3, 3], 0),
        ([2, 2, 9, 10], [3, 2, 5, 5], 4),
        ([3, 4, 6, 8], [2, 4, 1, 3], 1),
        ([1, 5, 7, 7], [6, 5, 3, 3], 1),
        ([4, 3, 40, 40], [4, 3, 3, 3], 1),
        ([2, 1, 3, 3], [1, 1, 3, 3], 0),
    ];

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn convolve_matches_candles_convolution() {
        let dev = Device::Cpu;
        for (xd, wd, padding) in CASES {
            let x = Tensor::randn(0f32, 1.0, &xd, &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, &wd, &dev).unwrap();
            let y_ref = x.conv2d(&w, padding, 1, 1, 1).unwrap();
            let wm = kernel_matrix(&f32s(&w), wd, Taps::AsIs);
            poison_scratch();
            let y = convolve(&f32s(&x), xd, &wm, (wd[0], wd[2], wd[3]), padding);
            let y = Tensor::from_vec(y, y_ref.dims(), &dev).unwrap();
            assert!(max_abs_diff(&y, &y_ref) < 1e-4, "{xd:?} {wd:?} p{padding}");
        }
    }

    #[test]
    fn kernel_gradient_matches_the_reference() {
        let dev = Device::Cpu;
        for (xd, wd, padding) in CASES {
            let x = Tensor::randn(0f32, 1.0, &xd, &dev).unwrap();
            let g = Conv2dGeometry { stride: 1, padding };
            let yd = [
                xd[0],
                wd[0],
                g.out_size(xd[2], wd[2]),
                g.out_size(xd[3], wd[3]),
            ];
            let dy = Tensor::randn(0f32, 1.0, &yd, &dev).unwrap();
            let dw_ref = backward_filter_reference(&x, &dy, g, wd).unwrap();
            poison_scratch();
            let dw = kernel_gradient(&f32s(&x), xd, &f32s(&dy), wd, padding);
            let dw = Tensor::from_vec(dw, &wd, &dev).unwrap();
            assert!(
                max_abs_diff(&dw, &dw_ref) < 1e-3,
                "{xd:?} {wd:?} p{padding}"
            );
        }
    }

    #[test]
    fn f64_matches_candles_convolution() {
        let dev = Device::Cpu;
        let (xd, wd) = ([2, 3, 17, 19], [5, 3, 3, 3]);
        let x = Tensor::randn(0f64, 1.0, &xd, &dev).unwrap();
        let w = Tensor::randn(0f64, 1.0, &wd, &dev).unwrap();
        let wm = kernel_matrix(&f64s(&w), wd, Taps::AsIs);
        let y = convolve(&f64s(&x), xd, &wm, (5, 3, 3), 1);
        let y_ref = f64s(&x.conv2d(&w, 1, 1, 1, 1).unwrap());
        let worst = y
            .iter()
            .zip(&y_ref)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        assert!(worst < 1e-10, "{worst}");
    }

    fn f64s(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The partial gradients are split by the shapes, not the threads: the same bits on one
    /// thread and on three.
    #[test]
    fn kernel_gradient_does_not_depend_on_the_threads() {
        let dev = Device::Cpu;
        let (xd, wd) = ([4, 3, 40, 40], [4, 3, 3, 3]);
        let x = f32s(&Tensor::randn(0f32, 1.0, &xd, &dev).unwrap());
        let dy = f32s(&Tensor::randn(0f32, 1.0, (4, 4, 40, 40), &dev).unwrap());
        let on = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| kernel_gradient(&x, xd, &dy, wd, 1))
        };
        assert_eq!(on(1), on(3));
    }
}
