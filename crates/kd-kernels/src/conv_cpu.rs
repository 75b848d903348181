//! kd's convolution on the CPU (f32 and f64): the forward and the kernel gradient as matrix
//! products with the input's patch rows, the input gradient as the convolution with the flipped
//! kernel (stride 1) or a product and col2im; a 1×1 stride-1 convolution and its input gradient
//! as one product per image on NCHW data. Stride-1 convolutions on planes of 16×16 and more
//! (and their kernel gradients) skip the patch rows: one shifted product per tap
//! ([`crate::conv_taps`]). The products are gemm calls into reused buffers
//! ([`cpu::matmul_into`]); each pass reads its operands in place.
//!
//! Why not candle's: its CPU convolution multiplies (O, K²·C) by 512-pixel tiles of columns
//! gathered value by value after a single-threaded NHWC copy, its input gradient is a direct
//! transposed-convolution loop, and its kernel gradient a convolution of the input with the
//! output gradient; at ResNet18's shapes (batch 32, 2 cores) these took 1.5–5× the time of the
//! paths here (`cargo run --release -p kd-kernels --example cpu_conv_timing` prints both).
//!
//! The slice functions serve kd's op ([`crate::conv`]), which reads candle's storage in place;
//! the tensor functions serve everything else (untracked inputs, tests, the timing example).
use candle_core::{bail, DType, Result, Tensor};

use crate::conv::{backward_data_reference, backward_filter_reference, Conv2dGeometry};
use crate::conv_taps;
use crate::cpu::{self, Float, MatRef, Scratch};

/// Runs `$body` with `$a` and `$b` bound to the elements of `$t` and `$u` (one dtype, which the
/// caller checks) as `&[f32]` or `&[f64]`, borrowed when contiguous, and wraps the `Vec` it
/// returns in a tensor of `$shape`; another dtype is an error naming `$what`. The generic
/// functions the body calls are instantiated once per type.
macro_rules! per_float {
    ($what:literal, $shape:expr, ($t:expr, $u:expr), |$a:ident, $b:ident| $body:expr) => {{
        let (t, u): (&Tensor, &Tensor) = ($t, $u);
        match t.dtype() {
            DType::F32 => Tensor::from_vec(
                cpu::with_slice::<f32, _>(t, |$a| cpu::with_slice::<f32, _>(u, |$b| $body))??,
                $shape,
                t.device(),
            ),
            DType::F64 => Tensor::from_vec(
                cpu::with_slice::<f64, _>(t, |$a| cpu::with_slice::<f64, _>(u, |$b| $body))??,
                $shape,
                t.device(),
            ),
            d => bail!("{} on the CPU: no {d:?} path (f32 and f64 only)", $what),
        }
    }};
}

/// The forward convolution (f32 or f64; other dtypes, or a kernel of another dtype, go to
/// candle's): per chunk of images the input's patch rows (N·Ho·Wo, K²·C) times the kernel as
/// (K²·C, O), written back as NCHW.
pub fn conv2d_cpu(x: &Tensor, w: &Tensor, g: Conv2dGeometry) -> Result<Tensor> {
    g.check(x.dims(), w.dims())?;
    let (dims, wdims) = (dims4(x.dims()), dims4(w.dims()));
    let [o, _, kh, kw] = wdims;
    let shape = (dims[0], o, g.out_size(dims[2], kh), g.out_size(dims[3], kw));
    if !is_float(x.dtype()) || w.dtype() != x.dtype() {
        return x.conv2d(w, g.padding, g.stride, 1, 1);
    }
    per_float!("conv2d", shape, (x, w), |v, wv| forward(
        v, dims, wv, wdims, g
    ))
}

/// The input gradient (f32 or f64; other dtypes go to candle's transposed convolution): at
/// stride 1 (square kernel, padding below its size) the convolution of `dy` with the kernel
/// flipped in space and its channel axes swapped, else one product and col2im
/// (`input_gradient` has the formulas).
pub fn backward_data_cpu(
    dy: &Tensor,
    w: &Tensor,
    g: Conv2dGeometry,
    input_dims: [usize; 4],
) -> Result<Tensor> {
    input_gradient_tensor(dy, w, g, input_dims, false)
}

/// [`backward_data_cpu`] always through the product and col2im (tests and the timing example
/// compare the two ways at stride 1).
pub fn backward_data_col2im(
    dy: &Tensor,
    w: &Tensor,
    g: Conv2dGeometry,
    input_dims: [usize; 4],
) -> Result<Tensor> {
    input_gradient_tensor(dy, w, g, input_dims, true)
}

fn input_gradient_tensor(
    dy: &Tensor,
    w: &Tensor,
    g: Conv2dGeometry,
    input_dims: [usize; 4],
    col2im: bool,
) -> Result<Tensor> {
    if !is_float(dy.dtype()) || w.dtype() != dy.dtype() {
        return backward_data_reference(dy, w, g, input_dims);
    }
    let wdims = dims4(w.dims());
    let shape = input_dims.to_vec();
    per_float!("conv2d backward-data", shape, (dy, w), |v, wv| {
        input_gradient(v, wv, wdims, g, input_dims, col2im)
    })
}

/// The kernel gradient (f32 or f64; other dtypes go to candle's formula): per chunk of images,
/// dw (O, K²·C) += dy (O, chunk·Ho·Wo) × the forward's patch rows (chunk·Ho·Wo, K²·C).
pub fn backward_filter_cpu(
    x: &Tensor,
    dy: &Tensor,
    g: Conv2dGeometry,
    kernel_dims: [usize; 4],
) -> Result<Tensor> {
    if !is_float(x.dtype()) || dy.dtype() != x.dtype() {
        return backward_filter_reference(x, dy, g, kernel_dims);
    }
    let dims = dims4(x.dims());
    let shape = kernel_dims.to_vec();
    per_float!("conv2d backward-filter", shape, (x, dy), |v, d| {
        kernel_gradient(v, dims, d, kernel_dims, g)
    })
}

/// A 1×1 kernel at stride 1 without padding: each pixel's only patch is its own C values.
fn pointwise(kh: usize, kw: usize, g: Conv2dGeometry) -> bool {
    kh == 1 && kw == 1 && g.stride == 1 && g.padding == 0
}

fn is_float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F64)
}

fn dims4(d: &[usize]) -> [usize; 4] {
    [d[0], d[1], d[2], d[3]]
}

/// y (N, O, Ho, Wo) = conv(x (N, C, H, W), w (O, C, kh, kw)), as elements.
pub(crate) fn forward<T: Float>(
    x: &[T],
    dims: [usize; 4],
    w: &[T],
    wdims: [usize; 4],
    g: Conv2dGeometry,
) -> Vec<T> {
    let [o, c, kh, kw] = wdims;
    if pointwise(kh, kw, g) {
        // y_n (O, P) = W (O, C) · x_n (C, P), image by image, in NCHW as it lies.
        let (n, pixels) = (dims[0], dims[2] * dims[3]);
        return per_image_product(x, (n, pixels), MatRef::row_major(w, o, c));
    }
    conv2d_rows(
        x,
        dims,
        &kernel_matrix(w, wdims, Taps::AsIs),
        (o, kh, kw),
        g,
    )
}

/// dx (N, C, H, W) from dy (N, O, Ho, Wo) and w (O, C, kh, kw), as elements.
///
/// At stride 1 with a square k×k kernel and padding p < k (unless `col2im`): dx[c, i, j] =
/// Σ_o Σ_(a,b) dy[o, i + p − a, j + p − b]·w[o, c, a, b] = conv(dy, w')[c, i, j] with
/// w'[c, o, a, b] = w[o, c, k − 1 − a, k − 1 − b] and padding k − 1 − p (the output is then
/// H + 2p − k + 1 + 2(k − 1 − p) − k + 1 = H wide); w' goes straight into its matrix
/// ([`Taps::SwapFlipped`]).
///
/// Otherwise PyTorch's CPU formula: the columns W^T·dy, (C·K², O) × (O, N·Ho·Wo) with the batch
/// folded into the columns so that the product is one large one, then col2im adds each column
/// entry into the input position its tap touched.
pub(crate) fn input_gradient<T: Float>(
    dy: &[T],
    w: &[T],
    wdims: [usize; 4],
    g: Conv2dGeometry,
    input_dims: [usize; 4],
    col2im: bool,
) -> Vec<T> {
    let [n, c, h, wd] = input_dims;
    let [o, _, kh, kw] = wdims;
    let (ho, wo) = (g.out_size(h, kh), g.out_size(wd, kw));
    if !col2im && pointwise(kh, kw, g) {
        // dx_n (C, P) = W^T (C, O) · dy_n (O, P), W^T read column-major.
        let wt = MatRef {
            data: w,
            rows: c,
            cols: o,
            row_stride: 1,
            col_stride: c,
        };
        return per_image_product(dy, (n, h * wd), wt);
    }
    if !col2im && g.stride == 1 && kh == kw && g.padding < kh {
        let flipped = Conv2dGeometry {
            stride: 1,
            padding: kh - 1 - g.padding,
        };
        let wm = kernel_matrix(w, wdims, Taps::SwapFlipped);
        return conv2d_rows(dy, [n, o, ho, wo], &wm, (c, kh, kw), flipped);
    }
    let geometry = Columns::new(input_dims, (kh, kw), ho, wo, g);
    let (taps, pixels) = (c * kh * kw, n * ho * wo);
    let dy = batch_in_columns(dy, n, o, ho * wo);
    let mut cols = Scratch::take(taps * pixels);
    // W^T: w read as (C·K², O), column-major.
    let wt = MatRef {
        data: w,
        rows: taps,
        cols: o,
        row_stride: 1,
        col_stride: taps,
    };
    cpu::matmul_into(&mut cols, wt, MatRef::row_major(&dy, o, pixels), false);
    geometry.col2im(&cols, n)
}

/// dw (O, C, kh, kw) from x (N, C, H, W) and dy (N, O, Ho, Wo), as elements.
pub(crate) fn kernel_gradient<T: Float>(
    x: &[T],
    dims: [usize; 4],
    dy: &[T],
    kernel_dims: [usize; 4],
    g: Conv2dGeometry,
) -> Vec<T> {
    let [n, _, h, wd] = dims;
    let [o, _, kh, kw] = kernel_dims;
    let (ho, wo) = (g.out_size(h, kh), g.out_size(wd, kw));
    if conv_taps::suits((kh, kw), g, (ho, wo)) {
        return conv_taps::kernel_gradient(x, dims, dy, kernel_dims, g.padding);
    }
    let geometry = Columns::new(dims, (kh, kw), ho, wo, g);
    geometry.filter_gradient(x, n, &batch_in_columns(dy, n, o, ho * wo), o)
}

/// `a · b_n` for each of `images` (K, P) matrices `b_n` stored one after another in `b`, the
/// (M, P) results one after another: a 1×1 convolution or its input gradient on NCHW data,
/// without the layout passes of the patch rows. One product per image while the planes are
/// large; below [`BATCHED_BELOW`] pixels one product for the batch, a·(K, N·P), between two
/// passes of whole-plane copies (at 4×4 a product per image is 16 columns wide, too narrow for
/// gemm's kernels).
#[allow(unsafe_code)]
fn per_image_product<T: Float>(b: &[T], (images, p): (usize, usize), a: MatRef<'_, T>) -> Vec<T> {
    use rayon::prelude::*;
    let (m, k) = (a.rows, a.cols);
    let mut out = cpu::output_slots(images * m * p);
    if p < BATCHED_BELOW && images > 1 && m * p > 0 {
        let columns = batch_in_columns(b, images, k, p);
        let mut prod = Scratch::take(m * images * p);
        cpu::matmul_into(
            &mut prod,
            a,
            MatRef::row_major(&columns, k, images * p),
            false,
        );
        // (M, N·P) → (N, M, P), one plane per task.
        let prod = &*prod;
        out.par_chunks_mut(p)
            .with_min_len((4096 / p).max(1))
            .enumerate()
            .for_each(|(i, dst)| {
                let (img, row) = (i / m, i % m);
                for (d, &v) in dst.iter_mut().zip(&prod[(row * images + img) * p..][..p]) {
                    d.write(v);
                }
            });
    } else {
        for (i, out) in out.chunks_mut((m * p).max(1)).enumerate() {
            let b = &b[i * k * p..][..k * p];
            cpu::matmul_into_slots(out, a, MatRef::row_major(b, k, p));
        }
    }
    // SAFETY: batched: the P-value planes cover `out` (images·m·p values) and each is copied
    // whole; per image: the (m·p)-value chunks cover `out` and `matmul_into_slots` writes every
    // slot of each.
    unsafe { cpu::written(out) }
}

/// Planes below this many pixels (16×16) make [`per_image_product`] one product for the batch.
const BATCHED_BELOW: usize = 256;

/// `dy` (N, O, P) as (O, N·P): the batch folded into the columns, so that a gradient's matrix
/// product is one large one; one output channel per parallel task.
fn batch_in_columns<T: Float>(dy: &[T], n: usize, o: usize, p: usize) -> Scratch<T> {
    use rayon::prelude::*;
    let mut out = Scratch::take(o * n * p);
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(n * p).enumerate().for_each(|(oi, row)| {
        for (ni, dst) in row.chunks_mut(p).enumerate() {
            dst.copy_from_slice(&dy[(ni * o + oi) * p..][..p]);
        }
    });
    out
}

/// The shapes that relate a convolution's input to its columns (rows (c, a, b), one column per
/// image and output position): input plane, kernel, output plane, geometry.
struct Columns {
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    g: Conv2dGeometry,
}

impl Columns {
    fn new(
        input_dims: [usize; 4],
        (kh, kw): (usize, usize),
        ho: usize,
        wo: usize,
        g: Conv2dGeometry,
    ) -> Self {
        let [_, c, h, w] = input_dims;
        Columns {
            c,
            h,
            w,
            kh,
            kw,
            ho,
            wo,
            g,
        }
    }

    /// [`pointwise`]: the NHWC input already is the patch rows.
    fn pointwise(&self) -> bool {
        pointwise(self.kh, self.kw, self.g)
    }

    /// Values of the patch rows of `images` images.
    fn rows_len(&self, images: usize) -> usize {
        images * self.ho * self.wo * self.kh * self.kw * self.c
    }

    /// The buffer [`Columns::rows`] fills for `images` images (empty when pointwise).
    fn rows_buffer<T: Float>(&self, images: usize) -> Scratch<T> {
        let len = if self.pointwise() {
            0
        } else {
            self.rows_len(images)
        };
        Scratch::take(len)
    }

    /// The patch rows of `nhwc` (images, H, W, C): `nhwc` itself when pointwise, else written
    /// into the front of `buffer` ([`Columns::rows_into`]).
    fn rows<'a, T>(&self, nhwc: &'a [T], buffer: &'a mut [T]) -> &'a [T]
    where
        T: Copy + Default + Send + Sync,
    {
        if self.pointwise() {
            return nhwc;
        }
        let images = nhwc.len() / (self.h * self.w * self.c).max(1);
        let rows = &mut buffer[..self.rows_len(images)];
        self.rows_into(nhwc, rows);
        rows
    }

    /// Writes the patches of `nhwc` (images, H, W, C) into `out` as (images·Ho·Wo, kh·kw·C)
    /// values: row (n, u, v) holds, tap by tap, the C values under tap (a, b), zero in the
    /// padding; each tap is one copy of C contiguous values, one row per parallel task. Every
    /// value of `out` is written, so the buffer can be reused from chunk to chunk.
    fn rows_into<T: Copy + Default + Send + Sync>(&self, nhwc: &[T], out: &mut [T]) {
        use rayon::prelude::*;
        let k = self.kh * self.kw * self.c;
        let (s, p) = (self.g.stride as isize, self.g.padding as isize);
        let inside = |i: isize, n: usize| (0..n as isize).contains(&i);
        out.par_chunks_mut(k)
            .with_min_len(16)
            .enumerate()
            .for_each(|(row, dst)| {
                let (img, u, v) = (
                    row / (self.ho * self.wo),
                    row / self.wo % self.ho,
                    row % self.wo,
                );
                for (a, taps) in dst.chunks_mut(self.kw * self.c).enumerate() {
                    let i = u as isize * s - p + a as isize;
                    for (b, tap) in taps.chunks_mut(self.c).enumerate() {
                        let j = v as isize * s - p + b as isize;
                        if inside(i, self.h) && inside(j, self.w) {
                            let src = ((img * self.h + i as usize) * self.w + j as usize) * self.c;
                            tap.copy_from_slice(&nhwc[src..][..self.c]);
                        } else {
                            tap.fill(T::default());
                        }
                    }
                }
            });
    }

    /// The kernel gradient (O, C, kh, kw) from the elements of `n` input images (N, C, H, W)
    /// and the output gradient as (O, N·Ho·Wo) ([`batch_in_columns`]): per chunk of
    /// images, dw (O, kh·kw·C) += dy (O, chunk·Ho·Wo) × rows (chunk·Ho·Wo, kh·kw·C), the rows
    /// being the forward's ([`Columns::rows_into`]); then reordered to (O, C, kh, kw).
    #[allow(unsafe_code)]
    fn filter_gradient<T: cpu::Float>(&self, x: &[T], n: usize, dy: &[T], o: usize) -> Vec<T> {
        use rayon::prelude::*;
        let (k, taps) = (self.kh * self.kw * self.c, self.kh * self.kw);
        let (plane_in, plane_out) = (self.h * self.w * self.c, self.ho * self.wo);
        if o * k == 0 || n * plane_out == 0 {
            return vec![T::default(); o * k];
        }
        let nhwc = to_nhwc(x, n, self.c, self.h * self.w);
        let chunk = images_per_chunk(n, plane_out * k * std::mem::size_of::<T>());
        let mut buffer = self.rows_buffer(chunk);
        let mut by_tap = Scratch::take(o * k);
        for (i, first) in (0..n).step_by(chunk).enumerate() {
            let len = chunk.min(n - first);
            let rows = self.rows(&nhwc[first * plane_in..][..len * plane_in], &mut buffer);
            let dy = MatRef {
                data: &dy[first * plane_out..],
                rows: o,
                cols: len * plane_out,
                row_stride: n * plane_out,
                col_stride: 1,
            };
            let rows = MatRef::row_major(rows, len * plane_out, k);
            cpu::matmul_into(&mut by_tap, dy, rows, i > 0);
        }
        // (O, kh, kw, C) → (O, C, kh, kw), one output channel per task.
        let mut dw = cpu::output_slots(o * k);
        dw.par_chunks_mut(k)
            .zip(by_tap.par_chunks(k))
            .for_each(|(dst, src)| cpu::transpose(src, self.c, (taps, self.c), dst, taps));
        // SAFETY: the k-value rows cover `dw` (o·k values), and each row's transpose writes
        // all of its (C, taps) slots.
        unsafe { cpu::written(dw) }
    }

    /// dx[n, c, u·s − p + a, v·s − p + b] += cols[(c·kh + a)·kw + b, n·Ho·Wo + u·wo + v], one
    /// input plane per parallel task (each plane is written by one task, so the sums do not
    /// depend on the threads).
    fn col2im<T>(&self, cols: &[T], n: usize) -> Vec<T>
    where
        T: Copy + Default + std::ops::AddAssign + Send + Sync,
    {
        use rayon::prelude::*;
        let (plane, out) = (self.h * self.w, self.ho * self.wo);
        let (s, p) = (self.g.stride as isize, self.g.padding as isize);
        let row_len = n * out; // one row of `cols`: a tap of a channel, over every image
        let mut dx = vec![T::default(); n * self.c * plane];
        dx.par_chunks_mut(plane).enumerate().for_each(|(nc, dst)| {
            let (ni, ci) = (nc / self.c, nc % self.c);
            for a in 0..self.kh {
                for b in 0..self.kw {
                    let tap = (ci * self.kh + a) * self.kw + b;
                    let col = &cols[tap * row_len + ni * out..][..out];
                    for u in 0..self.ho {
                        let i = u as isize * s - p + a as isize;
                        if !(0..self.h as isize).contains(&i) {
                            continue;
                        }
                        let row = &mut dst[i as usize * self.w..][..self.w];
                        for v in 0..self.wo {
                            let j = v as isize * s - p + b as isize;
                            if (0..self.w as isize).contains(&j) {
                                row[j as usize] += col[u * self.wo + v];
                            }
                        }
                    }
                }
            }
        });
        dx
    }
}

/// Which (K²·C_in, C_out) matrix a kernel (O, C, kh, kw) becomes in [`kernel_matrix`].
#[derive(Clone, Copy)]
pub(crate) enum Taps {
    /// The convolution's own: row (a, b, c), column o, value w[o, c, a, b].
    AsIs,
    /// The stride-1 input gradient's ([`input_gradient`]): the kernel flipped in space
    /// with its channel axes swapped, row (a, b, o), column c, value w[o, c, kh−1−a, kw−1−b].
    SwapFlipped,
}

/// `w` (O, C, kh, kw) as the right-hand side of [`conv2d_rows`]' product: a contiguous
/// (kh·kw·C_in, C_out) matrix whose rows are in the patch rows' tap order.
///
/// [`Taps::AsIs`] in blocks of 16 input channels: row by row, reading w[o, c, a, b] across o
/// strides by a whole output channel (18 KB at ResNet's last stage, 3–4 ms of a 15 ms forward
/// there); a block's tasks instead read the same (O, 16, kh·kw) slice of w while it is in the
/// L2 cache. [`Taps::SwapFlipped`] reads each output channel's block in place (a stride of
/// kh·kw values).
#[allow(unsafe_code)]
pub(crate) fn kernel_matrix<T: cpu::Float>(
    w: &[T],
    [o, c, kh, kw]: [usize; 4],
    taps: Taps,
) -> Vec<T> {
    use rayon::prelude::*;
    let (t, k) = (kh * kw, kh * kw * c);
    if o * k == 0 {
        return Vec::new();
    }
    let mut m = cpu::output_slots(k * o);
    match taps {
        Taps::AsIs => {
            // Row (tap, c) of O values: w[o, c, tap]. One task per tap and block of 16 input
            // channels, ordered block by block, so that a thread's consecutive tasks read the
            // same (O, 16, kh·kw) slice of w while it is in its L2 cache.
            const BLOCK: usize = 16;
            let mut tasks: Vec<(usize, usize, &mut [std::mem::MaybeUninit<T>])> = m
                .chunks_mut(c * o)
                .enumerate()
                .flat_map(|(tap, rows)| {
                    rows.chunks_mut(BLOCK * o)
                        .enumerate()
                        .map(move |(b, dst)| (b, tap, dst))
                })
                .collect();
            tasks.sort_by_key(|&(b, tap, _)| (b, tap));
            tasks.into_par_iter().for_each(|(b, tap, dst)| {
                let rows = dst.len() / o;
                for oi in 0..o {
                    let src = &w[(oi * c + b * BLOCK) * t..][..rows * t];
                    for r in 0..rows {
                        dst[r * o + oi].write(src[r * t + tap]);
                    }
                }
            });
        }
        Taps::SwapFlipped => {
            // Row (a, b, o) of C values: w[o, c, kh−1−a, kw−1−b] = w[o, c, t−1−tap].
            m.par_chunks_mut(c)
                .with_min_len(64)
                .enumerate()
                .for_each(|(row, dst)| {
                    let (tap, oi) = (row / o, row % o);
                    let src = &w[oi * k + t - 1 - tap..];
                    for (ci, d) in dst.iter_mut().enumerate() {
                        d.write(src[ci * t]);
                    }
                });
        }
    }
    // SAFETY: AsIs: the tasks' blocks of rows cover `m` (each tap's C rows, in blocks), and a
    // task writes column o of each of its rows for every o; SwapFlipped: the C-value rows cover
    // `m`, and each slot of a row is written.
    unsafe { cpu::written(m) }
}

/// The convolution of a contiguous (N, C, H, W) input `x` with a kernel given as its
/// (kh·kw·C, O) matrix `wm` ([`kernel_matrix`]): the (N, O, Ho, Wo) output's elements. Per chunk
/// of images the patch rows and the product go to two buffers reused from chunk to chunk.
#[allow(unsafe_code)]
fn conv2d_rows<T: cpu::Float>(
    x: &[T],
    dims: [usize; 4],
    wm: &[T],
    (o, kh, kw): (usize, usize, usize),
    g: Conv2dGeometry,
) -> Vec<T> {
    let [n, c, h, wd] = dims;
    let k = kh * kw * c;
    debug_assert_eq!(wm.len(), k * o);
    let (ho, wo) = (g.out_size(h, kh), g.out_size(wd, kw));
    if conv_taps::suits((kh, kw), g, (ho, wo)) {
        return conv_taps::convolve(x, dims, wm, (o, kh, kw), g.padding);
    }
    let geometry = Columns::new(dims, (kh, kw), ho, wo, g);
    let (plane_in, plane_out) = (h * wd * c, ho * wo);
    if n * o * plane_out == 0 {
        return Vec::new();
    }
    let mut y = cpu::output_slots(n * o * plane_out);
    let nhwc = to_nhwc(x, n, c, h * wd);
    let chunk = images_per_chunk(n, plane_out * k * std::mem::size_of::<T>());
    let mut buffer = geometry.rows_buffer(chunk);
    let mut prod = Scratch::take(chunk * plane_out * o);
    for (i, out) in y.chunks_mut(chunk * o * plane_out).enumerate() {
        let len = out.len() / (o * plane_out);
        let prod = &mut prod[..len * plane_out * o];
        let rows = geometry.rows(&nhwc[i * chunk * plane_in..][..len * plane_in], &mut buffer);
        cpu::matmul_into(
            prod,
            MatRef::row_major(rows, len * plane_out, k),
            MatRef::row_major(wm, k, o),
            false,
        );
        // (pixel, o) → (o, pixel), image by image.
        cpu::transpose_images(prod, len, (plane_out, o), out);
    }
    // SAFETY: the chunks of images cover `y`, their images cover each chunk, and every slot of
    // an image is written: the transpose of its (pixel, channel) product.
    unsafe { cpu::written(y) }
}

/// Images per chunk of patch rows: as few chunks as keep each within [`COLUMNS_BYTES`], and the
/// images per chunk lowered as far as that number of chunks allows, so that the last chunk is not
/// a sliver with a short, slow product (at 8 MB, ResNet18's last stage at batch 32 took at most
/// 28 images per chunk: two chunks of 16, not 28 and 4).
fn images_per_chunk(n: usize, bytes_per_image: usize) -> usize {
    let most = (COLUMNS_BYTES / bytes_per_image.max(1)).clamp(1, n.max(1));
    n.div_ceil(n.div_ceil(most).max(1)).max(1)
}

/// (N, C, P) → (N, P, C).
fn to_nhwc<T: Float>(v: &[T], n: usize, c: usize, p: usize) -> Scratch<T> {
    let mut out = Scratch::take(n * c * p);
    cpu::transpose_images(v, n, (c, p), &mut out);
    out
}

/// The most bytes of patch rows built at once by [`conv2d_cpu`] and [`backward_filter_cpu`]:
/// large enough for long matrix products (ResNet18's last stage at batch 32 in one chunk: a
/// (512 × 4,608)·(4,608 × 512) product runs at 305 GFLOP/s here, two of 256 rows at 252), small
/// enough to stay clear of fresh pages (session 10: a 64 MB budget spent a quarter of the time
/// in page faults, before the buffers were pooled). 8 MB until session 14; 16 MB measured 2–7%
/// faster train steps, 32 MB no better.
const COLUMNS_BYTES: usize = 16 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{max_abs_diff, poison_scratch, SCRATCH_KEPT};
    use candle_core::Device;

    /// The lent buffers hold the last borrower's values; a NaN read anywhere before it is
    /// written would reach the result. Each path runs after the pool is poisoned.
    #[test]
    fn convolutions_write_every_scratch_value_they_read() {
        let dev = Device::Cpu;
        // (x dims, w dims, stride, padding): 3×3 at strides 1 and 2, 1×1 pointwise and strided,
        // 3×3 at stride 2 on odd sizes and without padding, 7×7 at stride 2 (the ImageNet stem),
        // 5×5 with padding 4 (a tap that sees only padding in some rows).
        for (xd, wd, stride, padding) in [
            ([3, 5, 9, 7], [4, 5, 3, 3], 1, 1),
            ([3, 5, 9, 7], [4, 5, 3, 3], 2, 1),
            ([2, 6, 8, 8], [7, 6, 1, 1], 1, 0),
            ([2, 6, 8, 8], [7, 6, 1, 1], 2, 0),
            ([2, 3, 17, 19], [5, 3, 3, 3], 2, 1),
            ([2, 3, 12, 11], [4, 3, 3, 3], 1, 0),
            ([1, 3, 21, 19], [4, 3, 7, 7], 2, 3),
            ([2, 2, 9, 10], [3, 2, 5, 5], 1, 4),
            // Planes of 256 pixels and more: the stride-1 ones go through `conv_taps`.
            ([2, 3, 17, 19], [5, 3, 3, 3], 1, 1),
            ([2, 2, 20, 18], [3, 2, 5, 5], 1, 4),
            ([1, 4, 18, 18], [3, 4, 3, 3], 1, 0),
            ([2, 3, 34, 34], [4, 3, 3, 3], 2, 1),
            // 1×1 on a plane of 256 pixels: one product per image (smaller planes, one for the
            // batch); one image takes the per-image path at any size.
            ([2, 6, 16, 16], [7, 6, 1, 1], 1, 0),
            ([1, 6, 8, 8], [7, 6, 1, 1], 1, 0),
        ] {
            let g = Conv2dGeometry { stride, padding };
            let x = Tensor::randn(0f32, 1.0, &xd, &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, &wd, &dev).unwrap();
            poison_scratch();
            let y = conv2d_cpu(&x, &w, g).unwrap();
            let y_ref = x.conv2d(&w, padding, stride, 1, 1).unwrap();
            assert!(
                max_abs_diff(&y, &y_ref) < 1e-4,
                "forward {xd:?} {wd:?} s{stride}"
            );
            let dy = Tensor::randn(0f32, 1.0, y.dims(), &dev).unwrap();
            for col2im in [false, true] {
                poison_scratch();
                let dx = input_gradient_tensor(&dy, &w, g, xd, col2im).unwrap();
                let dx_ref = backward_data_reference(&dy, &w, g, xd).unwrap();
                assert!(
                    max_abs_diff(&dx, &dx_ref) < 1e-4,
                    "dx {xd:?} {wd:?} s{stride}"
                );
            }
            poison_scratch();
            let dw = backward_filter_cpu(&x, &dy, g, wd).unwrap();
            let dw_ref = backward_filter_reference(&x, &dy, g, wd).unwrap();
            assert!(
                max_abs_diff(&dw, &dw_ref) < 1e-3,
                "dw {xd:?} {wd:?} s{stride}"
            );
        }
    }

    #[test]
    fn scratch_lends_the_smallest_fitting_buffer_and_keeps_a_few() {
        let big = Scratch::<f64>::take(1000);
        let small = Scratch::<f64>::take(10);
        let (big_ptr, small_ptr) = (big.as_ptr(), small.as_ptr());
        drop((big, small));
        // 8 values fit both; the smaller is lent, with its old length's values cut to 8.
        let s = Scratch::<f64>::take(8);
        assert_eq!((s.len(), s.as_ptr()), (8, small_ptr));
        let b = Scratch::<f64>::take(900);
        assert_eq!((b.len(), b.as_ptr()), (900, big_ptr));
        drop((s, b));
        let many: Vec<_> = (1..=10).map(|i| Scratch::<f64>::take(i * 100)).collect();
        drop(many);
        let kept = f64::scratch_pool().with(|p| p.borrow().len());
        assert_eq!(kept, SCRATCH_KEPT);
    }
}
