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

pub use crate::conv_cpu::{
    backward_data_col2im, backward_data_cpu, backward_filter_cpu, conv2d_cpu,
};
use crate::conv_cpu::{forward, input_gradient, kernel_gradient};
use crate::cpu;
use crate::memory_format::{channels_first, cpu_via_channels_first, MemoryFormat};

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

    pub(crate) fn check(&self, x: &[usize], w: &[usize]) -> Result<()> {
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

/// A CPU op's result: `fast` (the slice path, taken when both operands are contiguous f32 or
/// f64), else `slow` on tensor copies of the operands, through f32 for the half types.
fn or_through_tensors(
    fast: Option<CpuStorage>,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    slow: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<CpuStorage> {
    match fast {
        Some(storage) => Ok(storage),
        None => {
            let (a, b) = (cpu::tensor(s1, l1)?, cpu::tensor(s2, l2)?);
            cpu::storage(&in_f32_on_cpu([&a, &b], slow)?)
        }
    }
}

/// Convolves through the custom op on any device (on the CPU it runs candle's convolution inside
/// the op); tests use it to check the op against [`Tensor::conv2d`].
pub fn conv2d_custom(x: &Tensor, w: &Tensor, g: Conv2dGeometry) -> Result<Tensor> {
    conv2d_custom_in(x, w, g, MemoryFormat::ChannelsFirst)
}

/// [`conv2d_custom`] over tensors of `format` (channels-last: `x` (N, H, W, C), `w`
/// (K, R, S, C), the result (N, H', W', K)).
pub fn conv2d_custom_in(
    x: &Tensor,
    w: &Tensor,
    g: Conv2dGeometry,
    format: MemoryFormat,
) -> Result<Tensor> {
    g.check(&format.nchw(x.dims())?, &format.nchw(w.dims())?)?;
    if x.dtype() != w.dtype() {
        bail!(
            "conv2d: input is {:?} but the kernel is {:?}",
            x.dtype(),
            w.dtype()
        );
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Conv2dForward { g, format })
}

/// y = conv(x, w). Each op's tensors are laid out as its `format` says; its dimensions are in
/// that format's order.
#[derive(Clone)]
struct Conv2dForward {
    g: Conv2dGeometry,
    format: MemoryFormat,
}

/// dx = conv_transpose(dy, w), sized like the input: args (dy, w).
#[derive(Clone)]
struct Conv2dBackwardData {
    g: Conv2dGeometry,
    format: MemoryFormat,
    input_dims: [usize; 4],
}

/// dw = correlation of x with dy: args (x, dy).
#[derive(Clone)]
struct Conv2dBackwardFilter {
    g: Conv2dGeometry,
    format: MemoryFormat,
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
        if self.format == MemoryFormat::ChannelsLast {
            let op = channels_first!(self);
            return cpu_via_channels_first([(s1, l1), (s2, l2)], |[(s1, l1), (s2, l2)]| {
                op.cpu_fwd(s1, l1, s2, l2)
            });
        }
        let g = self.g;
        let (dims, wdims) = (dims4(l1.dims()), dims4(l2.dims()));
        let [_, _, kh, kw] = wdims;
        let shape = Shape::from((
            dims[0],
            wdims[0],
            g.out_size(dims[2], kh),
            g.out_size(dims[3], kw),
        ));
        // Input and kernel are read where they lie and the output handed over as it is built.
        let y = cpu::float_slices!((s1, l1), (s2, l2), |x, w| forward(x, dims, w, wdims, g));
        let y = or_through_tensors(y, (s1, l1), (s2, l2), |x, w| conv2d_cpu(x, w, g))?;
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
        crate::cudnn_conv::forward(self.g, self.format, s1, l1, s2, l2)
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
                    g: self.g,
                    format: self.format,
                    input_dims: dims4(x.dims()),
                },
            )?)
        } else {
            None
        };
        let dw = x.apply_op2_no_bwd(
            &dy,
            &Conv2dBackwardFilter {
                g: self.g,
                format: self.format,
                kernel_dims: dims4(w.dims()),
            },
        )?;
        Ok((dx, Some(dw)))
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
        if self.format == MemoryFormat::ChannelsLast {
            let op = channels_first!(self, input_dims);
            return cpu_via_channels_first([(s1, l1), (s2, l2)], |[(s1, l1), (s2, l2)]| {
                op.cpu_fwd(s1, l1, s2, l2)
            });
        }
        let (g, input_dims) = (self.g, self.input_dims);
        let wdims = dims4(l2.dims());
        let dx = cpu::float_slices!((s1, l1), (s2, l2), |dy, w| {
            input_gradient(dy, w, wdims, g, input_dims, false)
        });
        let dx = or_through_tensors(dx, (s1, l1), (s2, l2), |dy, w| {
            backward_data_cpu(dy, w, g, input_dims)
        })?;
        Ok((dx, Shape::from(input_dims.to_vec())))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cudnn_conv::backward_data(self.g, self.format, self.input_dims, s1, l1, s2, l2)
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
        if self.format == MemoryFormat::ChannelsLast {
            let op = channels_first!(self, kernel_dims);
            return cpu_via_channels_first([(s1, l1), (s2, l2)], |[(s1, l1), (s2, l2)]| {
                op.cpu_fwd(s1, l1, s2, l2)
            });
        }
        let (g, kernel_dims) = (self.g, self.kernel_dims);
        let dims = dims4(l1.dims());
        let dw = cpu::float_slices!((s1, l1), (s2, l2), |x, dy| {
            kernel_gradient(x, dims, dy, kernel_dims, g)
        });
        let dw = or_through_tensors(dw, (s1, l1), (s2, l2), |x, dy| {
            backward_filter_cpu(x, dy, g, kernel_dims)
        })?;
        Ok((dw, Shape::from(kernel_dims.to_vec())))
    }

    #[cfg(feature = "cudnn")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cudnn_conv::backward_filter(self.g, self.format, self.kernel_dims, s1, l1, s2, l2)
    }
}
