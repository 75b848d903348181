//! 2-D convolution (square kernel, no bias, one group, no dilation) as a custom op whose forward,
//! backward-data and backward-filter run on cuDNN on CUDA devices (feature `cudnn`; without it
//! the ops have no CUDA path, and [`conv2d`] keeps CUDA tensors on candle's conv).
//!
//! On the CPU the three run kd's own paths (f32 and f64): the forward and the kernel gradient as
//! matrix products with the input's patch rows ([`conv2d_cpu`], [`backward_filter_cpu`]), the
//! input gradient as the convolution with the flipped kernel or a product and col2im
//! ([`backward_data_cpu`]); the products are gemm calls into reused buffers
//! (`cpu::matmul_into`). Tests check each against its definition and candle's conv, and the op's
//! wiring ([`conv2d_custom`]) against [`Tensor::conv2d`] with autograd; the GPU check compares the
//! cuDNN path with the CPU one.
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::cpu::{self, MatRef};

/// Runs `$body` with `$v` bound to the elements of `$t` as `&[f32]` or `&[f64]`, borrowed when
/// `$t` is contiguous, and wraps the `Vec` it returns (`try`: the `Result<Vec>`) in a tensor of
/// `$shape`; another dtype is an error naming `$what`. The generic helpers the body calls are
/// instantiated once per type.
macro_rules! per_float {
    ($t:expr, $shape:expr, $what:literal, |$v:ident| try $body:expr) => {{
        let t: &Tensor = $t;
        match t.dtype() {
            DType::F32 => Tensor::from_vec(
                cpu::with_slice::<f32, _>(t, |$v| $body)??,
                $shape,
                t.device(),
            ),
            DType::F64 => Tensor::from_vec(
                cpu::with_slice::<f64, _>(t, |$v| $body)??,
                $shape,
                t.device(),
            ),
            d => bail!("{} on the CPU: no {d:?} path (f32 and f64 only)", $what),
        }
    }};
    ($t:expr, $shape:expr, $what:literal, |$v:ident| $body:expr) => {
        per_float!($t, $shape, $what, |$v| try Ok::<_, candle_core::Error>($body))
    };
}

/// Stride and zero padding of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dGeometry {
    /// Stride along both axes.
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
}

impl Conv2dGeometry {
    /// Output size of an input of size `n` and a kernel of size `k`.
    pub fn out_size(&self, n: usize, k: usize) -> usize {
        (n + 2 * self.padding - k) / self.stride + 1
    }

    fn check(&self, x: &[usize], w: &[usize]) -> Result<()> {
        if x.len() != 4 || w.len() != 4 {
            bail!("conv2d expects a 4-D input and a 4-D kernel, got {x:?} and {w:?}");
        }
        if x[1] != w[1] {
            bail!(
                "conv2d: input has {} channels, the kernel {:?} expects {}",
                x[1],
                w,
                w[1]
            );
        }
        if x[2] + 2 * self.padding < w[2] || x[3] + 2 * self.padding < w[3] {
            bail!("conv2d: kernel {w:?} larger than the padded input {x:?}");
        }
        if self.stride == 0 {
            bail!("conv2d: stride must be at least 1");
        }
        Ok(())
    }
}

/// Convolves `x` (N, C, H, W) with `w` (O, C, K, K): through cuDNN (forward and backward) when `x`
/// is on a CUDA device and the crate was built with `cudnn`. On the CPU through kd's own
/// convolution ([`conv2d_cpu`]): inside kd's op when a gradient may be asked for in f32 (its
/// backward is faster there than candle's, [`backward_data_cpu`]), directly when none can be.
/// Otherwise (f64 with gradients, other devices, `KD_DISABLE=conv`) candle's conv.
pub fn conv2d(x: &Tensor, w: &Tensor, g: Conv2dGeometry) -> Result<Tensor> {
    let ours = crate::enabled(crate::Kernel::Conv);
    let cpu = x.device().is_cpu();
    let tracked = x.track_op() || w.track_op();
    let cuda = cfg!(feature = "cudnn") && x.device().is_cuda();
    let cpu_training = cpu && tracked && x.dtype() == DType::F32;
    if ours && (cuda || cpu_training) {
        conv2d_custom(x, w, g)
    } else if ours && cpu && !tracked {
        // No gradient can flow: the plain function (half types through f32, as below).
        in_f32_on_cpu([x, w], |x, w| conv2d_cpu(x, w, g))
    } else if cpu && is_half(x.dtype()) {
        // candle's CPU matmul has no bf16/f16: accumulate in f32 and round the result, which is
        // what cuDNN does for bf16 (and so the CPU reference of the mixed-precision path).
        in_f32_on_cpu([x, w], |x, w| x.conv2d(w, g.padding, g.stride, 1, 1))
    } else {
        x.conv2d(w, g.padding, g.stride, 1, 1)
    }
}

fn is_half(d: DType) -> bool {
    matches!(d, DType::BF16 | DType::F16)
}

/// Runs `f` on f32 copies of `args` when they are bf16/f16 (the CPU has no reduced-precision
/// matmul) and rounds its result back; otherwise on `args` as they are.
fn in_f32_on_cpu(
    args: [&Tensor; 2],
    f: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let dtype = args[0].dtype();
    if !is_half(dtype) {
        return f(args[0], args[1]);
    }
    f(
        &args[0].to_dtype(DType::F32)?,
        &args[1].to_dtype(DType::F32)?,
    )?
    .to_dtype(dtype)
}

/// Convolves through the custom op on any device (on the CPU it runs candle's convolution inside
/// the op); tests use it to check the op against [`Tensor::conv2d`].
pub fn conv2d_custom(x: &Tensor, w: &Tensor, g: Conv2dGeometry) -> Result<Tensor> {
    g.check(x.dims(), w.dims())?;
    if x.dtype() != w.dtype() {
        bail!(
            "conv2d: input is {:?} but the kernel is {:?}",
            x.dtype(),
            w.dtype()
        );
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Conv2dForward(g))
}

/// y = conv(x, w).
struct Conv2dForward(Conv2dGeometry);

/// dx = conv_transpose(dy, w), sized like the input: args (dy, w).
struct Conv2dBackwardData {
    g: Conv2dGeometry,
    input_dims: [usize; 4],
}

/// dw = correlation of x with dy: args (x, dy).
struct Conv2dBackwardFilter {
    g: Conv2dGeometry,
    kernel_dims: [usize; 4],
}

fn dims4(d: &[usize]) -> [usize; 4] {
    [d[0], d[1], d[2], d[3]]
}

impl CustomOp2 for Conv2dForward {
    fn name(&self) -> &'static str {
        "kd-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (dims, wdims) = (dims4(l1.dims()), dims4(l2.dims()));
        let [_, _, kh, kw] = wdims;
        let shape = Shape::from((
            dims[0],
            wdims[0],
            g.out_size(dims[2], kh),
            g.out_size(dims[3], kw),
        ));
        // Input and kernel are read where they lie and the output handed over as it is built.
        let (x_at, w_at) = (l1.contiguous_offsets(), l2.contiguous_offsets());
        let y = match (s1, s2, x_at, w_at) {
            (CpuStorage::F32(x), CpuStorage::F32(w), Some((a, b)), Some((c, d))) => {
                let wm = kernel_matrix(&w[c..d], wdims, Taps::AsIs);
                CpuStorage::F32(conv2d_rows(&x[a..b], dims, &wm, (wdims[0], kh, kw), g))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), Some((a, b)), Some((c, d))) => {
                let wm = kernel_matrix(&w[c..d], wdims, Taps::AsIs);
                CpuStorage::F64(conv2d_rows(&x[a..b], dims, &wm, (wdims[0], kh, kw), g))
            }
            _ => {
                let (x, w) = (cpu::tensor(s1, l1)?, cpu::tensor(s2, l2)?);
                let y = in_f32_on_cpu([&x, &w], |x, w| conv2d_cpu(x, w, g))?;
                cpu::storage(&y)?
            }
        };
        Ok((y, shape))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cudnn_conv::forward(self.0, s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        // No input gradient where nothing upstream wants one (the stem's input, the images).
        let dx = if x.track_op() {
            Some(dy.apply_op2_no_bwd(
                w,
                &Conv2dBackwardData {
                    g: self.0,
                    input_dims: dims4(x.dims()),
                },
            )?)
        } else {
            None
        };
        let dw = x.apply_op2_no_bwd(
            &dy,
            &Conv2dBackwardFilter {
                g: self.0,
                kernel_dims: dims4(w.dims()),
            },
        )?;
        Ok((dx, Some(dw)))
    }
}

/// The input gradient on the CPU, without candle's transposed convolution (a direct loop, 1.6–3.4×
/// the forward's time at ResNet18's 3×3 shapes): at stride 1, the convolution of `dy` with the
/// kernel flipped in space and its channel axes swapped, padded by k − 1 − p
/// ([`backward_data_flipped`]); otherwise one matrix product and a scatter
/// ([`backward_data_col2im`]). Each was the fastest of the three where it is used, on the 2-core
/// CPU at batch 32 (`cargo run --release -p kd-kernels --example cpu_conv_timing` prints all
/// three per shape).
pub fn backward_data_cpu(
    dy: &Tensor,
    w: &Tensor,
    g: Conv2dGeometry,
    input_dims: [usize; 4],
) -> Result<Tensor> {
    let (kh, kw) = (w.dim(2)?, w.dim(3)?);
    let float = matches!(dy.dtype(), DType::F32 | DType::F64);
    if !float {
        backward_data_reference(dy, w, g, input_dims)
    } else if g.stride == 1 && kh == kw && g.padding < kh {
        backward_data_flipped(dy, w, g)
    } else {
        backward_data_col2im(dy, w, g, input_dims)
    }
}

/// dx for a stride-1 convolution with a square k×k kernel and padding p < k (what
/// [`backward_data_cpu`] checks): dx[c, i, j] = Σ_o Σ_(a,b) dy[o, i + p − a, j + p − b]·w[o, c, a, b]
/// = conv(dy, w')[c, i, j] with w'[c, o, a, b] = w[o, c, k − 1 − a, k − 1 − b] and padding
/// k − 1 − p (the output is then H + 2p − k + 1 + 2(k − 1 − p) − k + 1 = H wide).
fn backward_data_flipped(dy: &Tensor, w: &Tensor, g: Conv2dGeometry) -> Result<Tensor> {
    let wdims = dims4(w.dims());
    let [o, c, k, _] = wdims;
    let [n, _, h, wd] = dims4(dy.dims());
    let flipped = Conv2dGeometry {
        stride: 1,
        padding: k - 1 - g.padding,
    };
    let shape = (n, c, flipped.out_size(h, k), flipped.out_size(wd, k));
    // The flipped kernel's matrix is built straight from `w`; its input channels are w's outputs.
    per_float!(dy, shape, "conv2d backward-data", |v| try cpu::with_slice(w, |wv| {
        let wm = kernel_matrix(wv, wdims, Taps::SwapFlipped);
        conv2d_rows(v, [n, o, h, wd], &wm, (c, k, k), flipped)
    }))
}

/// dx of any stride as one matrix product and a scatter (PyTorch's CPU formula): the columns
/// W^T·dy, (C·K², O) × (O, N·Ho·Wo) with the batch folded into the columns so that the product
/// is one large one, then col2im adds each column entry into the input position its tap touched.
/// The product does the forward's multiply-adds.
pub fn backward_data_col2im(
    dy: &Tensor,
    w: &Tensor,
    g: Conv2dGeometry,
    input_dims: [usize; 4],
) -> Result<Tensor> {
    let [n, c, h, wd] = input_dims;
    let (o, kh, kw) = (w.dim(0)?, w.dim(2)?, w.dim(3)?);
    let geometry = Columns::new(input_dims, (kh, kw), dy.dim(2)?, dy.dim(3)?, g);
    let wt = w.reshape((o, c * kh * kw))?.t()?.contiguous()?;
    let cols = wt.matmul(&geometry.batch_in_columns(dy)?)?;
    per_float!(&cols, (n, c, h, wd), "conv2d backward-data", |v| geometry
        .col2im(v, n))
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
    /// and the output gradient as (O, N·Ho·Wo) ([`Columns::batch_in_columns`]): per chunk of
    /// images, dw (O, kh·kw·C) += dy (O, chunk·Ho·Wo) × rows (chunk·Ho·Wo, kh·kw·C), the rows
    /// being the forward's ([`Columns::rows_into`]); then reordered to (O, C, kh, kw).
    fn filter_gradient<T: cpu::Float>(&self, x: &[T], n: usize, dy: &[T], o: usize) -> Vec<T> {
        use rayon::prelude::*;
        let (k, taps) = (self.kh * self.kw * self.c, self.kh * self.kw);
        let (plane_in, plane_out) = (self.h * self.w * self.c, self.ho * self.wo);
        let mut dw = vec![T::default(); o * k];
        if dw.is_empty() || n * plane_out == 0 {
            return dw;
        }
        let nhwc = to_nhwc(x, n, self.c, self.h * self.w);
        let chunk = images_per_chunk(n, plane_out * k * std::mem::size_of::<T>());
        let mut rows = vec![T::default(); chunk * plane_out * k];
        let mut by_tap = vec![T::default(); o * k];
        for (i, first) in (0..n).step_by(chunk).enumerate() {
            let len = chunk.min(n - first);
            let rows = &mut rows[..len * plane_out * k];
            self.rows_into(&nhwc[first * plane_in..][..len * plane_in], rows);
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
        dw.par_chunks_mut(k).enumerate().for_each(|(oi, dst)| {
            let src = &by_tap[oi * k..][..k];
            for (ci, channel) in dst.chunks_mut(taps).enumerate() {
                for (t, d) in channel.iter_mut().enumerate() {
                    *d = src[t * self.c + ci];
                }
            }
        });
        dw
    }

    /// `dy` (N, O, Ho, Wo) as (O, N·Ho·Wo): the batch folded into the columns, so that the
    /// gradient's matrix product is one large one.
    fn batch_in_columns(&self, dy: &Tensor) -> Result<Tensor> {
        let (n, o) = (dy.dim(0)?, dy.dim(1)?);
        dy.reshape((n, o, self.ho * self.wo))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((o, n * self.ho * self.wo))
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

/// candle's autograd formula for the input gradient (a transposed convolution).
pub fn backward_data_reference(
    dy: &Tensor,
    w: &Tensor,
    g: Conv2dGeometry,
    input_dims: [usize; 4],
) -> Result<Tensor> {
    let k = w.dim(2)?;
    let out = (dy.dim(2)? - 1) * g.stride + k - 2 * g.padding;
    let out_padding = input_dims[2] - out;
    dy.conv_transpose2d(w, g.padding, out_padding, g.stride, 1)
}

/// The kernel gradient on the CPU (f32 or f64; other dtypes go to candle's formula): per chunk of
/// images, the input's patch rows (those of the forward, [`conv2d_cpu`]) multiply the output
/// gradient, dw (O, K²·C) += dy (O, chunk·Ho·Wo) × rows (chunk·Ho·Wo, K²·C), accumulated over the
/// chunks in one buffer. candle's autograd formula, a convolution of the input with the output
/// gradient (dilated by the stride), took 1.1–2.2× the time of an im2col product at ResNet18's
/// stride-1 shapes and 2.3–5.5× at the strided ones, batch 32 on the 2-core CPU (session 10);
/// `cargo run --release -p kd-kernels --example cpu_conv_timing` times both.
pub fn backward_filter_cpu(
    x: &Tensor,
    dy: &Tensor,
    g: Conv2dGeometry,
    kernel_dims: [usize; 4],
) -> Result<Tensor> {
    if !matches!(x.dtype(), DType::F32 | DType::F64) || dy.dtype() != x.dtype() {
        return backward_filter_reference(x, dy, g, kernel_dims);
    }
    let dims = dims4(x.dims());
    let geometry = Columns::new(
        dims,
        (kernel_dims[2], kernel_dims[3]),
        dy.dim(2)?,
        dy.dim(3)?,
        g,
    );
    let dy_columns = geometry.batch_in_columns(dy)?;
    per_float!(x, kernel_dims.to_vec(), "conv2d backward-filter", |v| try cpu::with_slice(
        &dy_columns,
        |d| geometry.filter_gradient(v, dims[0], d, kernel_dims[0])
    ))
}

/// The forward convolution on the CPU (f32 or f64; other dtypes go to candle's): the input as
/// NHWC, then per chunk of images its patches as rows (N·Ho·Wo, K²·C), each tap a copy of C
/// contiguous values, times the kernel as (K²·C, O), written back as NCHW. candle's own CPU
/// convolution multiplies (O, K²·C) by a 512-pixel tile of columns gathered value by value, after
/// a single-threaded NHWC copy; with the pixels as the product's rows the matmul runs at 2–3× the
/// rate on this project's CPU (`cargo run --release -p kd-kernels --example cpu_conv_timing`).
pub fn conv2d_cpu(x: &Tensor, w: &Tensor, g: Conv2dGeometry) -> Result<Tensor> {
    g.check(x.dims(), w.dims())?;
    let (dims, wdims) = (dims4(x.dims()), dims4(w.dims()));
    let [o, _, kh, kw] = wdims;
    let shape = (dims[0], o, g.out_size(dims[2], kh), g.out_size(dims[3], kw));
    if !matches!(x.dtype(), DType::F32 | DType::F64) || w.dtype() != x.dtype() {
        return x.conv2d(w, g.padding, g.stride, 1, 1);
    }
    per_float!(x, shape, "conv2d", |v| try cpu::with_slice(w, |wv| {
        conv2d_rows(v, dims, &kernel_matrix(wv, wdims, Taps::AsIs), (o, kh, kw), g)
    }))
}

/// Which (K²·C_in, C_out) matrix a kernel (O, C, kh, kw) becomes in [`kernel_matrix`].
#[derive(Clone, Copy)]
enum Taps {
    /// The convolution's own: row (a, b, c), column o, value w[o, c, a, b].
    AsIs,
    /// The stride-1 input gradient's ([`backward_data_flipped`]): the kernel flipped in space
    /// with its channel axes swapped, row (a, b, o), column c, value w[o, c, kh−1−a, kw−1−b].
    SwapFlipped,
}

/// `w` (O, C, kh, kw) as the right-hand side of [`conv2d_rows`]' product: a contiguous
/// (kh·kw·C_in, C_out) matrix whose rows are in the patch rows' tap order, one pass in parallel.
fn kernel_matrix<T: cpu::Float>(w: &[T], [o, c, kh, kw]: [usize; 4], taps: Taps) -> Vec<T> {
    use rayon::prelude::*;
    let (c_in, c_out) = match taps {
        Taps::AsIs => (c, o),
        Taps::SwapFlipped => (o, c),
    };
    let mut m = vec![T::default(); kh * kw * c_in * c_out];
    if m.is_empty() {
        return m;
    }
    m.par_chunks_mut(c_out)
        .with_min_len(64)
        .enumerate()
        .for_each(|(row, dst)| {
            let (a, b, i) = (row / (kw * c_in), row / c_in % kw, row % c_in);
            for (j, d) in dst.iter_mut().enumerate() {
                *d = match taps {
                    Taps::AsIs => w[((j * c + i) * kh + a) * kw + b],
                    Taps::SwapFlipped => w[((i * c + j) * kh + kh - 1 - a) * kw + kw - 1 - b],
                };
            }
        });
    m
}

/// The convolution of a contiguous (N, C, H, W) input `x` with a kernel given as its
/// (kh·kw·C, O) matrix `wm` ([`kernel_matrix`]): the (N, O, Ho, Wo) output's elements. Per chunk
/// of images the patch rows and the product go to two buffers reused from chunk to chunk.
fn conv2d_rows<T: cpu::Float>(
    x: &[T],
    dims: [usize; 4],
    wm: &[T],
    (o, kh, kw): (usize, usize, usize),
    g: Conv2dGeometry,
) -> Vec<T> {
    use rayon::prelude::*;
    let [n, c, h, wd] = dims;
    let k = kh * kw * c;
    debug_assert_eq!(wm.len(), k * o);
    let (ho, wo) = (g.out_size(h, kh), g.out_size(wd, kw));
    let geometry = Columns::new(dims, (kh, kw), ho, wo, g);
    let (plane_in, plane_out) = (h * wd * c, ho * wo);
    let mut y = vec![T::default(); n * o * plane_out];
    if y.is_empty() {
        return y;
    }
    let nhwc = to_nhwc(x, n, c, h * wd);
    let chunk = images_per_chunk(n, plane_out * k * std::mem::size_of::<T>());
    let mut rows = vec![T::default(); chunk * plane_out * k];
    let mut prod = vec![T::default(); chunk * plane_out * o];
    for (i, out) in y.chunks_mut(chunk * o * plane_out).enumerate() {
        let len = out.len() / (o * plane_out);
        let (rows, prod) = (
            &mut rows[..len * plane_out * k],
            &mut prod[..len * plane_out * o],
        );
        geometry.rows_into(&nhwc[i * chunk * plane_in..][..len * plane_in], rows);
        cpu::matmul_into(
            prod,
            MatRef::row_major(rows, len * plane_out, k),
            MatRef::row_major(wm, k, o),
            false,
        );
        // (pixel, o) → (o, pixel), one (image, output channel) plane per task.
        let prod = &*prod;
        out.par_chunks_mut(plane_out)
            .enumerate()
            .for_each(|(io, dst)| {
                let (img, oc) = (io / o, io % o);
                let src = &prod[img * plane_out * o..][..plane_out * o];
                for (p, d) in dst.iter_mut().enumerate() {
                    *d = src[p * o + oc];
                }
            });
    }
    y
}

/// Images per chunk of patch rows: as few chunks as keep each within [`COLUMNS_BYTES`], all of
/// one size (so that the last is not a sliver with a short, slow product).
fn images_per_chunk(n: usize, bytes_per_image: usize) -> usize {
    let most = (COLUMNS_BYTES / bytes_per_image.max(1)).clamp(1, n.max(1));
    n.div_ceil(n.div_ceil(most).max(1)).max(1)
}

/// (N, C, P) → (N, P, C), in parallel over images and blocks of 64 pixels.
fn to_nhwc<T: Copy + Default + Send + Sync>(v: &[T], n: usize, c: usize, p: usize) -> Vec<T> {
    use rayon::prelude::*;
    const BLOCK: usize = 64;
    let mut out = vec![T::default(); n * c * p];
    out.par_chunks_mut(c * p)
        .enumerate()
        .for_each(|(img, image)| {
            let src = &v[img * c * p..][..c * p];
            image
                .par_chunks_mut(c * BLOCK)
                .enumerate()
                .for_each(|(block, dst)| {
                    for (q, px) in dst.chunks_mut(c).enumerate() {
                        let pix = block * BLOCK + q;
                        for (ci, d) in px.iter_mut().enumerate() {
                            *d = src[ci * p + pix];
                        }
                    }
                });
        });
    out
}

/// The most bytes of patch rows built at once by [`conv2d_cpu`] and [`backward_filter_cpu`]:
/// small enough to stay clear of fresh pages (session 10: a 64 MB budget spent a quarter of the
/// time in page faults), large enough for long matrix products (ResNet18's first stage: 3 images,
/// 3,072 rows).
const COLUMNS_BYTES: usize = 8 << 20;

/// candle's autograd formula for the kernel gradient.
pub fn backward_filter_reference(
    x: &Tensor,
    dy: &Tensor,
    g: Conv2dGeometry,
    kernel_dims: [usize; 4],
) -> Result<Tensor> {
    let gk = x
        .transpose(0, 1)?
        .conv2d(&dy.transpose(0, 1)?, g.padding, 1, g.stride, 1)?
        .transpose(0, 1)?;
    let (kh, kw) = (kernel_dims[2], kernel_dims[3]);
    let gk = if gk.dim(2)? != kh || gk.dim(3)? != kw {
        gk.narrow(2, 0, kh)?.narrow(3, 0, kw)?
    } else {
        gk
    };
    gk.contiguous()
}

impl CustomOp2 for Conv2dBackwardData {
    fn name(&self) -> &'static str {
        "kd-conv2d-backward-data"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dx = in_f32_on_cpu([&cpu::tensor(s1, l1)?, &cpu::tensor(s2, l2)?], |dy, w| {
            backward_data_cpu(dy, w, self.g, self.input_dims)
        })?;
        Ok((cpu::storage(&dx)?, dx.shape().clone()))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cudnn_conv::backward_data(self.g, self.input_dims, s1, l1, s2, l2)
    }
}

impl CustomOp2 for Conv2dBackwardFilter {
    fn name(&self) -> &'static str {
        "kd-conv2d-backward-filter"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dw = in_f32_on_cpu([&cpu::tensor(s1, l1)?, &cpu::tensor(s2, l2)?], |x, dy| {
            backward_filter_cpu(x, dy, self.g, self.kernel_dims)
        })?;
        Ok((cpu::storage(&dw)?, dw.shape().clone()))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cudnn_conv::backward_filter(self.g, self.kernel_dims, s1, l1, s2, l2)
    }
}
