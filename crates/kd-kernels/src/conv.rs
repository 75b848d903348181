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
/// is on a CUDA device and the crate was built with `cudnn`; on the CPU, in f32 and when a
/// gradient will be asked for, through the same op, whose backward is faster there than
/// candle's ([`backward_data_cpu`]); otherwise with candle's own conv.
pub fn conv2d(x: &Tensor, w: &Tensor, g: Conv2dGeometry) -> Result<Tensor> {
    let ours = crate::enabled(crate::Kernel::Conv);
    let cuda = cfg!(feature = "cudnn") && x.device().is_cuda();
    let cpu_training =
        x.device().is_cpu() && x.dtype() == DType::F32 && (x.track_op() || w.track_op());
    if ours && (cuda || cpu_training) {
        conv2d_custom(x, w, g)
    } else if x.device().is_cpu() && is_half(x.dtype()) {
        // candle's CPU matmul has no bf16/f16: accumulate in f32 and round the result, which is
        // what cuDNN does for bf16 (and so the CPU reference of the mixed-precision path).
        let y =
            x.to_dtype(DType::F32)?
                .conv2d(&w.to_dtype(DType::F32)?, g.padding, g.stride, 1, 1)?;
        y.to_dtype(x.dtype())
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
        let y = in_f32_on_cpu([&cpu::tensor(s1, l1)?, &cpu::tensor(s2, l2)?], |x, w| {
            x.conv2d(w, g.padding, g.stride, 1, 1)
        })?;
        Ok((cpu::storage(&y)?, y.shape().clone()))
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

/// The input gradient on the CPU: for stride 1, the convolution of `dy` with the kernel flipped
/// in space and with its channel axes swapped, padded by k − 1 − p ([`backward_data_flipped`]),
/// which runs on candle's im2col + matmul convolution; otherwise candle's autograd formula, a
/// transposed convolution ([`backward_data_reference`]). On the 2-core CPU, at ResNet18's
/// stride-1 3×3 shapes and batch 32, the transposed convolution took 1.6–3.4× the forward's time
/// and the flipped one 0.8–1.8× (`cargo run --release -p kd-kernels --example cpu_conv_timing`).
pub fn backward_data_cpu(
    dy: &Tensor,
    w: &Tensor,
    g: Conv2dGeometry,
    input_dims: [usize; 4],
) -> Result<Tensor> {
    let (kh, kw) = (w.dim(2)?, w.dim(3)?);
    if g.stride == 1 && kh == kw && g.padding < kh {
        backward_data_flipped(dy, w, g)
    } else {
        backward_data_reference(dy, w, g, input_dims)
    }
}

/// dx for a stride-1 convolution with a square k×k kernel and padding p < k (what
/// [`backward_data_cpu`] checks): dx[c, i, j] = Σ_o Σ_(a,b) dy[o, i + p − a, j + p − b]·w[o, c, a, b]
/// = conv(dy, w')[c, i, j] with w'[c, o, a, b] = w[o, c, k − 1 − a, k − 1 − b] and padding
/// k − 1 − p (the output is then H + 2p − k + 1 + 2(k − 1 − p) − k + 1 = H wide).
fn backward_data_flipped(dy: &Tensor, w: &Tensor, g: Conv2dGeometry) -> Result<Tensor> {
    let k = w.dim(2)?;
    let rev = Tensor::from_vec((0..k as u32).rev().collect::<Vec<_>>(), k, w.device())?;
    let flipped = w
        .index_select(&rev, 2)?
        .index_select(&rev, 3)?
        .transpose(0, 1)?
        .contiguous()?;
    dy.conv2d(&flipped, k - 1 - g.padding, 1, 1, 1)
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
            backward_filter_reference(x, dy, self.g, self.kernel_dims)
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
