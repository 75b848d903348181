//! 2-D convolution (square kernel, no bias, one group, no dilation) as a custom op whose forward,
//! backward-data and backward-filter run on cuDNN on CUDA devices (feature `cudnn`; without it
//! the ops have no CUDA path, and [`conv2d`] keeps CUDA tensors on candle's conv).
//!
//! On the CPU each of the three ops runs candle's own convolution with the formulas of candle's
//! autograd, so [`conv2d_custom`] on the CPU checks the op's wiring (shapes, argument order, which
//! gradient goes where) against [`Tensor::conv2d`] with autograd; the GPU check compares the
//! cuDNN path with the CPU one.
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::cpu;

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
        let w = cpu::tensor(s2, l2)?;
        let dims = dims4(l1.dims());
        let (o, k) = (w.dim(0)?, w.dim(2)?);
        let shape = Shape::from((dims[0], o, g.out_size(dims[2], k), g.out_size(dims[3], k)));
        // The input is read where it lies and the output handed over as it is built: no copies.
        let y = match (s1, l1.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => {
                CpuStorage::F32(conv2d_rows(&v[a..b], dims, &w, g)?)
            }
            (CpuStorage::F64(v), Some((a, b))) => {
                CpuStorage::F64(conv2d_rows(&v[a..b], dims, &w, g)?)
            }
            _ => {
                let y = in_f32_on_cpu([&cpu::tensor(s1, l1)?, &w], |x, w| conv2d_cpu(x, w, g))?;
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
    let (o, c, k) = (w.dim(0)?, w.dim(1)?, w.dim(2)?);
    // Flipping both spatial axes reverses each k·k block; one pass, in the tensor's dtype.
    fn swap_flip<T: Copy>(v: &[T], o: usize, c: usize, taps: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(v.len());
        for ci in 0..c {
            for oi in 0..o {
                out.extend(v[(oi * c + ci) * taps..][..taps].iter().rev());
            }
        }
        out
    }
    let flipped = per_float!(w, (c, o, k, k), "conv2d backward-data", |v| swap_flip(
        v,
        o,
        c,
        k * k
    ))?;
    let g = Conv2dGeometry {
        stride: 1,
        padding: k - 1 - g.padding,
    };
    conv2d_cpu(dy, &flipped, g)
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

    /// The columns of `x` (N, C, H, W) as a (C·K², N·Ho·Wo) tensor ([`Columns::im2col`]).
    fn columns(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.dim(0)?;
        let shape = (self.c * self.kh * self.kw, n * self.ho * self.wo);
        per_float!(x, shape, "conv2d backward-filter", |v| self.im2col(v, n))
    }

    /// The patches of `nhwc` (N images, H, W, C) as (N·Ho·Wo, kh·kw·C) values: row (n, u, v)
    /// holds, tap by tap, the C values under tap (a, b) (zero in the padding); each tap is one
    /// copy of C contiguous values, one row per parallel task.
    fn rows<T: Copy + Default + Send + Sync>(&self, nhwc: &[T], n: usize) -> Vec<T> {
        use rayon::prelude::*;
        let k = self.kh * self.kw * self.c;
        let (s, p) = (self.g.stride as isize, self.g.padding as isize);
        let mut out = vec![T::default(); n * self.ho * self.wo * k];
        out.par_chunks_mut(k).enumerate().for_each(|(row, dst)| {
            let (img, u, v) = (
                row / (self.ho * self.wo),
                row / self.wo % self.ho,
                row % self.wo,
            );
            for a in 0..self.kh {
                let i = u as isize * s - p + a as isize;
                if !(0..self.h as isize).contains(&i) {
                    continue;
                }
                for b in 0..self.kw {
                    let j = v as isize * s - p + b as isize;
                    if (0..self.w as isize).contains(&j) {
                        let src = ((img * self.h + i as usize) * self.w + j as usize) * self.c;
                        dst[(a * self.kw + b) * self.c..][..self.c]
                            .copy_from_slice(&nhwc[src..][..self.c]);
                    }
                }
            }
        });
        out
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

    /// The columns of `x` (N, C, H, W): cols[(c·kh + a)·kw + b, n·Ho·Wo + u·wo + v] =
    /// x[n, c, u·s − p + a, v·s − p + b], zero in the padding; one row per parallel task.
    fn im2col<T>(&self, x: &[T], n: usize) -> Vec<T>
    where
        T: Copy + Default + Send + Sync,
    {
        use rayon::prelude::*;
        let (plane, out) = (self.h * self.w, self.ho * self.wo);
        let (s, p) = (self.g.stride as isize, self.g.padding as isize);
        let mut cols = vec![T::default(); self.c * self.kh * self.kw * n * out];
        cols.par_chunks_mut(n * out)
            .enumerate()
            .for_each(|(tap, row)| {
                let (ci, a, b) = (
                    tap / (self.kh * self.kw),
                    tap / self.kw % self.kh,
                    tap % self.kw,
                );
                for ni in 0..n {
                    let src = &x[(ni * self.c + ci) * plane..][..plane];
                    for u in 0..self.ho {
                        let i = u as isize * s - p + a as isize;
                        if !(0..self.h as isize).contains(&i) {
                            continue;
                        }
                        let line = &src[i as usize * self.w..][..self.w];
                        let dst = &mut row[ni * out + u * self.wo..][..self.wo];
                        for (v, d) in dst.iter_mut().enumerate() {
                            let j = v as isize * s - p + b as isize;
                            if (0..self.w as isize).contains(&j) {
                                *d = line[j as usize];
                            }
                        }
                    }
                }
            });
        cols
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

/// The kernel gradient on the CPU: one matrix product with the input's columns
/// ([`backward_filter_im2col`]). candle's autograd formula, a convolution of the input with the
/// output gradient (dilated by the stride), took 1.1–2.2× its time at ResNet18's stride-1 shapes
/// and 2.3–5.5× at the strided ones, batch 32 on the 2-core CPU
/// (`cargo run --release -p kd-kernels --example cpu_conv_timing`). The columns are transient:
/// C·K²·N·Ho·Wo values (75 MB for ResNet18's first stage at batch 32).
pub fn backward_filter_cpu(
    x: &Tensor,
    dy: &Tensor,
    g: Conv2dGeometry,
    kernel_dims: [usize; 4],
) -> Result<Tensor> {
    if matches!(x.dtype(), DType::F32 | DType::F64) {
        backward_filter_im2col(x, dy, g, kernel_dims)
    } else {
        backward_filter_reference(x, dy, g, kernel_dims)
    }
}

/// dw = dy·cols(x)^T: (O, N·Ho·Wo) × (N·Ho·Wo, C·K²), where row (c, a, b) of the columns holds,
/// for every image and output position, the input value that tap (a, b) of channel c met.
pub fn backward_filter_im2col(
    x: &Tensor,
    dy: &Tensor,
    g: Conv2dGeometry,
    kernel_dims: [usize; 4],
) -> Result<Tensor> {
    let [o, c, kh, kw] = kernel_dims;
    let geometry = Columns::new(dims4(x.dims()), (kh, kw), dy.dim(2)?, dy.dim(3)?, g);
    geometry
        .batch_in_columns(dy)?
        .matmul(&geometry.columns(x)?.t()?)?
        .reshape((o, c, kh, kw))
}

/// The forward convolution on the CPU (f32 or f64; other dtypes go to candle's): the input as
/// NHWC, then per chunk of images its patches as rows (N·Ho·Wo, K²·C), each tap a copy of C
/// contiguous values, times the kernel as (K²·C, O), written back as NCHW. candle's own CPU
/// convolution multiplies (O, K²·C) by a 512-pixel tile of columns gathered value by value, after
/// a single-threaded NHWC copy; with the pixels as the product's rows the matmul runs at 2–3× the
/// rate on this project's CPU (`cargo run --release -p kd-kernels --example cpu_conv_timing`).
pub fn conv2d_cpu(x: &Tensor, w: &Tensor, g: Conv2dGeometry) -> Result<Tensor> {
    g.check(x.dims(), w.dims())?;
    let dims = dims4(x.dims());
    let (o, k) = (w.dim(0)?, w.dim(2)?);
    let shape = (dims[0], o, g.out_size(dims[2], k), g.out_size(dims[3], k));
    if !matches!(x.dtype(), DType::F32 | DType::F64) {
        return x.conv2d(w, g.padding, g.stride, 1, 1);
    }
    per_float!(x, shape, "conv2d", |v| try conv2d_rows(v, dims, w, g))
}

/// [`conv2d_cpu`] on the elements of a contiguous (N, C, H, W) input; the output's elements.
fn conv2d_rows<T>(x: &[T], dims: [usize; 4], w: &Tensor, g: Conv2dGeometry) -> Result<Vec<T>>
where
    T: candle_core::WithDType + Default,
{
    use rayon::prelude::*;
    let [n, c, h, wd] = dims;
    let (o, _, kh, kw) = w.dims4()?;
    let (ho, wo) = (g.out_size(h, kh), g.out_size(wd, kw));
    let geometry = Columns::new(dims, (kh, kw), ho, wo, g);
    // (O, C, kh, kw) → (kh·kw·C, O): the taps in the rows' order.
    let wt = w
        .to_dtype(T::DTYPE)?
        .permute((0, 2, 3, 1))?
        .reshape((o, kh * kw * c))?
        .t()?;
    let nhwc = to_nhwc(x, n, c, h * wd);
    let (plane_in, plane_out) = (h * wd * c, ho * wo);
    let per_image = kh * kw * c * plane_out * std::mem::size_of::<T>();
    let chunk = (COLUMNS_BYTES / per_image.max(1)).clamp(1, n.max(1));
    let mut y = vec![T::default(); n * o * plane_out];
    for (i, out) in y.chunks_mut(chunk * o * plane_out).enumerate() {
        let len = out.len() / (o * plane_out);
        let images = &nhwc[i * chunk * plane_in..][..len * plane_in];
        let rows = Tensor::from_vec(
            geometry.rows(images, len),
            (len * plane_out, kh * kw * c),
            &candle_core::Device::Cpu,
        )?;
        let prod = rows.matmul(&wt)?; // (len·Ho·Wo, O)
        cpu::with_slice::<T, _>(&prod, |pv| {
            // (pixel, o) → (o, pixel), one (image, output channel) plane per task.
            out.par_chunks_mut(plane_out)
                .enumerate()
                .for_each(|(io, dst)| {
                    let (img, oc) = (io / o, io % o);
                    let src = &pv[img * plane_out * o..][..plane_out * o];
                    for (p, d) in dst.iter_mut().enumerate() {
                        *d = src[p * o + oc];
                    }
                });
        })?;
    }
    Ok(y)
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

/// The most bytes of patch rows built at once by [`conv2d_cpu`]: small enough that the allocator
/// reuses the buffer from chunk to chunk instead of mapping fresh pages (a 64 MB budget spent a
/// quarter of the time in page faults), large enough for long matrix products (ResNet18's first
/// stage: 3 images, 3,072 rows).
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
