//! 2-D max-pooling with padding and a backward pass, as a candle custom op.
//!
//! candle 0.11's `max_pool2d` has no padding and its backward fails when kernel ≠ stride, yet
//! the huyvnphan CIFAR stem uses a 3×3/stride-2/padding-1 pool and online KD trains it. The
//! gradient goes to the first maximum of each window in row-major order, as PyTorch's CPU
//! kernel does (it matters: pooled ReLU outputs are often tied at 0). Padding is −∞.
//! On CUDA (feature `cuda`) both directions run our kernels (`kernels/max_pool.cu`); the
//! backward gathers, per input element, the windows whose maximum it is: no atomics, so it is
//! deterministic. Channels-last (N, H, W, C) tensors ([`MaxPool2d::forward_nhwc`]) have kernels
//! of their own on CUDA; on the CPU they pool between transposes (`cpu_via_channels_first`).
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use crate::cpu;
use crate::memory_format::{channels_first, cpu_via_channels_first, MemoryFormat};

/// Max-pool geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPool2d {
    /// Square kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Implicit −∞ padding on each side.
    pub padding: usize,
}

impl MaxPool2d {
    /// The ResNet stem pool: 3×3, stride 2, padding 1.
    pub const RESNET_STEM: MaxPool2d = MaxPool2d {
        kernel: 3,
        stride: 2,
        padding: 1,
    };

    /// Output size along an axis of size `n`.
    pub fn out_size(&self, n: usize) -> usize {
        (n + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// Pools `x` (N, C, H, W).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_in(MemoryFormat::ChannelsFirst, x)
    }

    /// Pools a channels-last `x` (N, H, W, C) into (N, H', W', C): the same values and
    /// gradients as [`MaxPool2d::forward`] on the (N, C, H, W) tensor.
    pub fn forward_nhwc(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_in(MemoryFormat::ChannelsLast, x)
    }

    fn forward_in(&self, format: MemoryFormat, x: &Tensor) -> Result<Tensor> {
        if self.padding * 2 > self.kernel {
            bail!(
                "max-pool padding {} exceeds half the kernel {}",
                self.padding,
                self.kernel
            );
        }
        let [_, _, h, w] = format.nchw(x.dims())?;
        if h + 2 * self.padding < self.kernel || w + 2 * self.padding < self.kernel {
            bail!(
                "max-pool kernel {} larger than the padded input {:?} ({format})",
                self.kernel,
                x.dims()
            );
        }
        x.contiguous()?.apply_op1(PoolOp {
            pool: *self,
            format,
        })
    }

    /// The output's dimensions, in `format`'s order, for an input of dimensions `dims`.
    fn out_dims(&self, format: MemoryFormat, dims: &[usize]) -> Result<Shape> {
        let [n, c, h, w] = format.nchw(dims)?;
        Ok(Shape::from(&format.dims_of([
            n,
            c,
            self.out_size(h),
            self.out_size(w),
        ])))
    }

    /// Pools a non-negative `x` (a ReLU's output) with candle's own tensor ops, on any device:
    /// zero padding equals −∞ padding for such input, and each output is the element-wise
    /// maximum of the kernel² strided views. This is the path for devices without a kernel of
    /// the custom op (builds without the `cuda` feature). Its gradient reaches every tied
    /// maximum; for a ReLU's output the ties that matter are at 0, where the ReLU's own gradient
    /// is 0, so the network's gradients equal the custom op's.
    pub fn forward_nonneg_composed(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let (oh, ow) = (self.out_size(h), self.out_size(w));
        let p = self.padding;
        let s = self.stride;
        // Pad so that every strided view has exactly oh × ow elements after reshaping by s.
        let (ph, pw) = (
            (oh - 1) * s + self.kernel + s,
            (ow - 1) * s + self.kernel + s,
        );
        let xp = x
            .pad_with_zeros(2, p, ph - h - p)?
            .pad_with_zeros(3, p, pw - w - p)?;
        let mut out: Option<Tensor> = None;
        for dy in 0..self.kernel {
            let rows = xp
                .narrow(2, dy, oh * s)?
                .reshape((n, c, oh, s, pw))?
                .narrow(3, 0, 1)?
                .squeeze(3)?;
            for dx in 0..self.kernel {
                let v = rows
                    .narrow(3, dx, ow * s)?
                    .reshape((n, c, oh, ow, s))?
                    .narrow(4, 0, 1)?
                    .squeeze(4)?;
                out = Some(match out {
                    None => v,
                    Some(o) => o.maximum(&v)?,
                });
            }
        }
        Ok(out.expect("kernel ≥ 1"))
    }

    #[cfg(feature = "cuda")]
    fn launch_dims(
        &self,
        format: MemoryFormat,
        dims: &[usize],
    ) -> Result<crate::cuda_ops::PoolDims> {
        let [n, c, h, w] = format.nchw(dims)?;
        Ok(crate::cuda_ops::PoolDims {
            format,
            n,
            c,
            h,
            w,
            oh: self.out_size(h),
            ow: self.out_size(w),
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
        })
    }

    /// Index (within one plane) of the first maximum of output window (oy, ox) in row-major
    /// order, a NaN beating any number; the window is clamped to the plane, and valid geometry
    /// (padding at most half the kernel) leaves at least one element in it.
    #[inline]
    fn argmax<T: PoolElem>(&self, plane: &[T], h: usize, w: usize, oy: usize, ox: usize) -> usize {
        let y0 = (oy * self.stride) as isize - self.padding as isize;
        let x0 = (ox * self.stride) as isize - self.padding as isize;
        let clamp = |a: isize, n: usize| a.clamp(0, n as isize) as usize;
        let (ya, yb) = (clamp(y0, h), clamp(y0 + self.kernel as isize, h));
        let (xa, xb) = (clamp(x0, w), clamp(x0 + self.kernel as isize, w));
        let mut best = ya * w + xa;
        let mut b = plane[best];
        for y in ya..yb {
            for x in xa..xb {
                let i = y * w + x;
                let v = plane[i];
                if v > b || v.is_nan_value() && !b.is_nan_value() {
                    best = i;
                    b = v;
                }
            }
        }
        best
    }

    /// Forward over contiguous planes, in parallel over the planes.
    #[allow(unsafe_code)]
    fn fwd_slice<T: PoolElem>(&self, x: &[T], dims: &[usize]) -> Vec<T> {
        let (nc, h, w) = (dims[0] * dims[1], dims[2], dims[3]);
        let (oh, ow) = (self.out_size(h), self.out_size(w));
        let mut out = cpu::output_slots::<T>(nc * oh * ow);
        cpu::par_chunks(&mut out, oh * ow, |p, o| {
            let plane = &x[p * h * w..(p + 1) * h * w];
            for (oy, row) in o.chunks_exact_mut(ow).enumerate() {
                for (ox, slot) in row.iter_mut().enumerate() {
                    slot.write(plane[self.argmax(plane, h, w, oy, ox)]);
                }
            }
        });
        // SAFETY: the chunks are the output planes, and each slot of a plane is written.
        unsafe { cpu::written(out) }
    }

    /// Backward over contiguous planes, in parallel over the planes: each input sums, in the
    /// windows' row-major order and in `T::Acc` (f32 for bf16, as the CUDA kernel), the
    /// gradients of the windows whose first maximum it is.
    #[allow(unsafe_code)]
    fn bwd_slice<T: PoolElem>(&self, x: &[T], g: &[T], dims: &[usize]) -> Vec<T> {
        let (nc, h, w) = (dims[0] * dims[1], dims[2], dims[3]);
        let (oh, ow) = (self.out_size(h), self.out_size(w));
        let mut out = cpu::output_slots::<T>(nc * h * w);
        cpu::par_chunks(&mut out, h * w, |p, o| {
            let plane = &x[p * h * w..(p + 1) * h * w];
            let grads = &g[p * oh * ow..(p + 1) * oh * ow];
            let mut acc = vec![T::Acc::default(); h * w];
            for (oy, row) in grads.chunks_exact(ow).enumerate() {
                for (ox, &gk) in row.iter().enumerate() {
                    acc[self.argmax(plane, h, w, oy, ox)] += gk.to_acc();
                }
            }
            for (slot, a) in o.iter_mut().zip(acc) {
                slot.write(T::from_acc(a));
            }
        });
        // SAFETY: the chunks are the input planes, and each slot of a plane is written.
        unsafe { cpu::written(out) }
    }
}

/// Element types of the CPU max-pool, with the type its backward sums in.
trait PoolElem: candle_core::WithDType + PartialOrd {
    type Acc: Copy + Default + std::ops::AddAssign + Send;
    fn is_nan_value(self) -> bool;
    fn to_acc(self) -> Self::Acc;
    fn from_acc(a: Self::Acc) -> Self;
}

impl PoolElem for f32 {
    type Acc = f32;
    fn is_nan_value(self) -> bool {
        self.is_nan()
    }
    fn to_acc(self) -> f32 {
        self
    }
    fn from_acc(a: f32) -> Self {
        a
    }
}

impl PoolElem for f64 {
    type Acc = f64;
    fn is_nan_value(self) -> bool {
        self.is_nan()
    }
    fn to_acc(self) -> f64 {
        self
    }
    fn from_acc(a: f64) -> Self {
        a
    }
}

impl PoolElem for half::bf16 {
    type Acc = f32;
    fn is_nan_value(self) -> bool {
        self.is_nan()
    }
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    fn from_acc(a: f32) -> Self {
        half::bf16::from_f32(a)
    }
}

fn slice<'a, T>(v: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("max-pool expects a contiguous tensor"),
    }
}

/// The op of [`MaxPool2d::forward`] and [`MaxPool2d::forward_nhwc`]: the geometry and the
/// layout of its tensors.
#[derive(Clone, Copy)]
struct PoolOp {
    pool: MaxPool2d,
    format: MemoryFormat,
}

impl CustomOp1 for PoolOp {
    fn name(&self) -> &'static str {
        "max-pool2d-padded"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if self.format == MemoryFormat::ChannelsLast {
            return cpu_via_channels_first([(s, l)], |[(s, l)]| {
                channels_first!(self).cpu_fwd(s, l)
            });
        }
        let dims = l.dims();
        let p = &self.pool;
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(p.fwd_slice(slice(v, l)?, dims)),
            CpuStorage::F64(v) => CpuStorage::F64(p.fwd_slice(slice(v, l)?, dims)),
            CpuStorage::BF16(v) => CpuStorage::BF16(p.fwd_slice(slice(v, l)?, dims)),
            _ => bail!("max-pool supports f32, f64 and bf16 on the CPU"),
        };
        Ok((out, p.out_dims(self.format, dims)?))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = self.pool.launch_dims(self.format, l.dims())?;
        let out = crate::cuda_ops::max_pool_fwd((s, l), d)?;
        Ok((out, self.pool.out_dims(self.format, l.dims())?))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &MaxPoolBackward(*self),
        )?))
    }
}

/// The gradient of [`PoolOp`] with respect to its input: (input, output gradient) → input
/// gradient.
struct MaxPoolBackward(PoolOp);

impl CustomOp2 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "max-pool2d-padded-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.0.format == MemoryFormat::ChannelsLast {
            let op = MaxPoolBackward(channels_first!(self.0));
            return cpu_via_channels_first([(s1, l1), (s2, l2)], |[(s1, l1), (s2, l2)]| {
                op.cpu_fwd(s1, l1, s2, l2)
            });
        }
        let dims = l1.dims();
        let p = &self.0.pool;
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                CpuStorage::F32(p.bwd_slice(slice(x, l1)?, slice(g, l2)?, dims))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => {
                CpuStorage::F64(p.bwd_slice(slice(x, l1)?, slice(g, l2)?, dims))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(g)) => {
                CpuStorage::BF16(p.bwd_slice(slice(x, l1)?, slice(g, l2)?, dims))
            }
            _ => bail!("max-pool backward supports f32, f64 and bf16 on the CPU"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let d = self.0.pool.launch_dims(self.0.format, l1.dims())?;
        let out = crate::cuda_ops::max_pool_bwd((s1, l1), (s2, l2), d)?;
        Ok((out, l1.shape().clone()))
    }
}
