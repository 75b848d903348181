//! BatchNorm2d in eval mode, `y = (x − μ)·γ/√(σ² + ε) + β` with the running statistics,
//! optionally followed by ReLU, as one pass over the activations.
//!
//! A frozen teacher's forward pass and every evaluation run BatchNorm this way. Composed from
//! candle's ops it is a broadcast multiply, a broadcast add and a ReLU: three passes and two
//! intermediate tensors over every activation of the network, after half a dozen small ops that
//! make the per-channel scale and shift.
//!
//! - Where nothing needs a gradient (a frozen teacher: constant weights, constant input), on
//!   CUDA (feature `cuda`): one kernel that reads the four per-channel vectors as they are (until
//!   session 19 the training kernel's apply step, after two launches that stacked the running
//!   statistics into its (2, C) input); a residual block's tail likewise in one kernel.
//! - On the CPU (f32, bf16): the per-channel scale `γ/√(σ² + ε)` and shift `β − μ·scale` as
//!   candle ops (so gradients reach γ and β), then one pass, `x·scale + shift` and the ReLU, in
//!   f32; in f32 these are the composed ops' own roundings.
//! - Elsewhere, and with `KD_DISABLE=bneval`: the composed ops.
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::cpu;
use crate::memory_format::{to_channels_first, to_channels_last, MemoryFormat};
use candle_core::backend::BackendStorage;

/// BatchNorm of `x` (N, C, H, W) in eval mode with `weight` γ, `bias` β, `running_mean` μ and
/// `running_var` σ² (all (C,)), then ReLU if `relu`; the result has `x`'s dtype.
pub fn batch_norm_eval(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let p = [weight, bias, running_mean, running_var];
    eval_in(MemoryFormat::ChannelsFirst, x, p, eps, relu, None)
}

/// A residual block's tail in eval mode, `relu(batch_norm_eval(x) + residual)`: BatchNorm of
/// `x` as [`batch_norm_eval`] (without its ReLU), plus `residual` (of `x`'s shape), rectified.
///
/// Where nothing needs a gradient (a frozen teacher, evaluation of constant weights) on the
/// CPU in f32, one pass: neither the BatchNorm's output nor the sum is written out, which saves
/// a write and a read of every block's output (a ResNet50's widest tensors). It makes the same
/// f32 roundings as the two ops. Elsewhere, and with `KD_DISABLE=evaltail`: [`batch_norm_eval`]
/// then [`crate::add_relu()`].
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_eval_add_relu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    residual: &Tensor,
) -> Result<Tensor> {
    let p = [weight, bias, running_mean, running_var];
    eval_in(MemoryFormat::ChannelsFirst, x, p, eps, true, Some(residual))
}

/// [`batch_norm_eval`] (`residual` `None`) or [`batch_norm_eval_add_relu`] over tensors of
/// `format`, `params` being (γ, β, μ, σ²). Channels-last runs its own kernels on CUDA where
/// nothing needs a gradient, else the channels-first op between permutes.
pub(crate) fn eval_in(
    format: MemoryFormat,
    x: &Tensor,
    params: [&Tensor; 4],
    eps: f64,
    relu: bool,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    if let Some(r) = residual {
        if r.dims() != x.dims() {
            bail!(
                "batch_norm_eval_add_relu: input {:?} but residual {:?} (expected equal shapes)",
                x.dims(),
                r.dims()
            );
        }
    }
    check_channels(format, x, params)?;
    let [weight, bias, running_mean, running_var] = params;
    let frozen = !x.track_op()
        && !weight.track_op()
        && !bias.track_op()
        && !residual.is_some_and(Tensor::track_op);
    let on_cuda = frozen
        && crate::HAS_CUDA_KERNELS
        && x.device().is_cuda()
        && crate::enabled(crate::Kernel::BatchNormEval)
        && (residual.is_none() || crate::enabled(crate::Kernel::EvalTail))
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && residual.is_none_or(|r| r.dtype() == x.dtype());
    if on_cuda {
        let op = FrozenBn {
            params: frozen_params([running_mean, running_var, weight, bias])?,
            format,
            eps: eps as f32,
            relu,
        };
        return match residual {
            None => x.contiguous()?.apply_op1_no_bwd(&op),
            Some(r) => x
                .contiguous()?
                .apply_op2_no_bwd(&r.contiguous()?, &FrozenBnAddRelu(op)),
        };
    }
    if format == MemoryFormat::ChannelsLast {
        let first = MemoryFormat::ChannelsFirst;
        let r = residual.map(to_channels_first).transpose()?;
        let y = eval_in(first, &to_channels_first(x)?, params, eps, relu, r.as_ref())?;
        return to_channels_last(&y);
    }
    match residual {
        None => eval_first(x, params, eps, relu),
        Some(r) => eval_tail_first(x, params, eps, r, frozen),
    }
}

/// [`batch_norm_eval`] off the CUDA kernels: kd's one-pass op on the CPU, else composed.
fn eval_first(x: &Tensor, params: [&Tensor; 4], eps: f64, relu: bool) -> Result<Tensor> {
    let ours = crate::enabled(crate::Kernel::BatchNormEval)
        && matches!(x.dtype(), DType::F32 | DType::BF16);
    let (scale, shift) = scale_and_shift(params, eps)?;
    if ours && x.device().is_cpu() {
        return x
            .contiguous()?
            .apply_op3(&scale, &shift, ScaleShift { relu });
    }
    composed(x, &scale, &shift, relu)
}

/// [`batch_norm_eval_add_relu`] off its CUDA kernel: one pass on the CPU in f32 where nothing
/// needs a gradient, else the BatchNorm then [`crate::add_relu()`].
fn eval_tail_first(
    x: &Tensor,
    params: [&Tensor; 4],
    eps: f64,
    residual: &Tensor,
    frozen: bool,
) -> Result<Tensor> {
    let one_pass = frozen
        && crate::enabled(crate::Kernel::EvalTail)
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && residual.dtype() == DType::F32;
    if !one_pass {
        // The BatchNorm by its own best path (on CUDA, frozen: its one kernel).
        let y = eval_in(MemoryFormat::ChannelsFirst, x, params, eps, false, None)?;
        return crate::add_relu(&y, residual);
    }
    let (scale, shift) = scale_and_shift(params, eps)?;
    x.contiguous()?.apply_op3_no_bwd(
        &residual.contiguous()?,
        &Tensor::stack(&[scale, shift], 0)?,
        &ScaleShiftAddRelu,
    )
}

/// An error unless `x` is a 4-D tensor of `format` whose channels each of weight, bias,
/// running mean and running variance has ((C,)).
fn check_channels(format: MemoryFormat, x: &Tensor, params: [&Tensor; 4]) -> Result<()> {
    let (_, c, _) = format.n_c_hw(x.dims())?;
    let names = ["weight", "bias", "running mean", "running variance"];
    for (name, t) in names.into_iter().zip(params) {
        if t.dims() != [c] {
            bail!(
                "batch_norm_eval: input {:?} has {c} channels but the {name} is {:?}",
                x.dims(),
                t.dims()
            );
        }
    }
    Ok(())
}

/// The per-channel `scale = γ/√(σ² + ε)` and `shift = β − μ·scale`, in f32, as candle ops (so
/// gradients reach γ and β), from (γ, β, μ, σ²).
fn scale_and_shift(
    [weight, bias, running_mean, running_var]: [&Tensor; 4],
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let rm = running_mean.detach().to_dtype(DType::F32)?;
    let rv = running_var.detach().to_dtype(DType::F32)?;
    let scale = (weight.to_dtype(DType::F32)? / (rv + eps)?.sqrt()?)?;
    let shift = (bias.to_dtype(DType::F32)? - (rm * &scale)?)?;
    Ok((scale, shift))
}

/// Running mean, running variance, γ and β as contiguous f32 vectors, detached.
fn frozen_params(p: [&Tensor; 4]) -> Result<[Tensor; 4]> {
    let f = |t: &Tensor| t.detach().to_dtype(DType::F32)?.contiguous();
    Ok([f(p[0])?, f(p[1])?, f(p[2])?, f(p[3])?])
}

/// x → BatchNorm(x) with the running statistics (then ReLU if `relu`), on CUDA, where nothing
/// needs a gradient: `bn_eval_*`, one launch. `params`: mean, variance, γ, β.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct FrozenBn {
    params: [Tensor; 4],
    format: MemoryFormat,
    eps: f32,
    relu: bool,
}

/// (x, residual) → relu(BatchNorm(x) + residual), on CUDA, where nothing needs a gradient:
/// `bn_eval_add_relu_*`, one launch.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct FrozenBnAddRelu(FrozenBn);

#[cfg(feature = "cuda")]
impl FrozenBn {
    /// The launch both ops make: BatchNorm of `x`, then the residual's add and the ReLU when one
    /// is given (else the ReLU if `relu`).
    fn launch(
        &self,
        x: (&candle_core::CudaStorage, &Layout),
        residual: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let p = &self.params;
        let y = crate::cuda_ops::bn_eval(
            x,
            residual,
            [&p[0], &p[1], &p[2], &p[3]],
            self.format,
            self.format.n_c_hw(x.1.dims())?,
            self.eps,
            self.relu,
        )?;
        Ok((y, x.1.shape().clone()))
    }
}

/// The CPU never runs these ops: [`batch_norm_eval`] and [`batch_norm_eval_add_relu`] take
/// their own CPU paths.
fn cuda_only(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: a CUDA-only op was asked to run on the CPU"))
}

impl candle_core::CustomOp1 for FrozenBn {
    fn name(&self) -> &'static str {
        "kd-batch-norm-eval-frozen"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(cuda_only(candle_core::CustomOp1::name(self)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.launch((s, l), None)
    }
}

impl candle_core::CustomOp2 for FrozenBnAddRelu {
    fn name(&self) -> &'static str {
        "kd-batch-norm-eval-add-relu-frozen"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Err(cuda_only(candle_core::CustomOp2::name(self)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.0.launch((s1, l1), Some((s2, l2)))
    }
}

/// (x, residual, [scale; shift]) → relu(x·scale + shift + residual) per channel, f32 on the
/// CPU, with no backward (it runs only where nothing needs a gradient).
struct ScaleShiftAddRelu;

impl CustomOp3 for ScaleShiftAddRelu {
    fn name(&self) -> &'static str {
        "kd-batch-norm-eval-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = l1.shape().dims4()?;
        let (x, r) = (cpu::f32_slice(s1, l1)?, cpu::f32_slice(s2, l2)?);
        let ss = cpu::f32_slice(s3, l3)?;
        if r.len() != x.len() || ss.len() != 2 * c {
            bail!(
                "batch_norm_eval_add_relu: {} inputs, {} residuals and {} scale-and-shift values for {c} channels",
                x.len(),
                r.len(),
                ss.len()
            );
        }
        let (scale, shift) = ss.split_at(c);
        let y = scale_shift_planes(x, Some(r), (scale, shift), h * w, true);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

/// `x·scale[c] + shift[c]` over the (N, C) planes of `plane` values of `x`, in parallel, then
/// `+ residual` and the ReLU, or the ReLU alone if `relu`. Each value is rounded to f32 after
/// each operation, as candle's separate ops would: `(x·a + b) + r`.
#[allow(unsafe_code)]
fn scale_shift_planes(
    x: &[f32],
    residual: Option<&[f32]>,
    (scale, shift): (&[f32], &[f32]),
    plane: usize,
    relu: bool,
) -> Vec<f32> {
    let c = scale.len();
    let mut y = cpu::output_slots(x.len());
    // One call per (N, C) plane; plane p's channel is p % C.
    cpu::par_chunks(&mut y, plane, |p, out| {
        let (a, b) = (scale[p % c], shift[p % c]);
        let (at, len) = (p * plane, out.len());
        let x = &x[at..][..len];
        match (residual, relu) {
            (Some(r), _) => {
                for ((y, &x), &r) in out.iter_mut().zip(x).zip(&r[at..][..len]) {
                    let s = (x * a + b) + r;
                    y.write(if s > 0.0 { s } else { 0.0 });
                }
            }
            (None, true) => {
                for (y, &x) in out.iter_mut().zip(x) {
                    y.write((x * a + b).max(0.0));
                }
            }
            (None, false) => {
                for (y, &x) in out.iter_mut().zip(x) {
                    y.write(x * a + b);
                }
            }
        }
    });
    // SAFETY: the planes cover `y`, and each slot of a plane is written (x and the residual are
    // sliced to the plane's length, and every arm writes each slot once).
    unsafe { cpu::written(y) }
}

/// The same with candle's ops: scale and shift in `x`'s dtype, broadcast over (N, H, W).
fn composed(x: &Tensor, scale: &Tensor, shift: &Tensor, relu: bool) -> Result<Tensor> {
    let c = scale.dim(0)?;
    let (scale, shift) = (
        scale.to_dtype(x.dtype())?.reshape((1, c, 1, 1))?,
        shift.to_dtype(x.dtype())?.reshape((1, c, 1, 1))?,
    );
    let y = x.broadcast_mul(&scale)?.broadcast_add(&shift)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// (x, scale, shift) → x·scale + shift per channel, rectified if `relu`.
struct ScaleShift {
    relu: bool,
}

impl CustomOp3 for ScaleShift {
    fn name(&self) -> &'static str {
        "kd-batch-norm-eval"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = l1.shape().dims4()?;
        let x = cpu::f32s_cow(s1, l1)?;
        let (scale, shift) = (cpu::f32_slice(s2, l2)?, cpu::f32_slice(s3, l3)?);
        if scale.len() != c || shift.len() != c {
            bail!(
                "batch_norm_eval: {} scales and {} shifts for {c} channels",
                scale.len(),
                shift.len()
            );
        }
        let y = scale_shift_planes(&x, None, (scale, shift), h * w, self.relu);
        Ok((cpu::from_f32s(y, s1.dtype())?, l1.shape().clone()))
    }

    /// dx = g·scale, dscale = Σ g·x, dshift = Σ g over (N, H, W), with g = dy masked by the
    /// ReLU (y > 0) when there is one.
    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _shift: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = scale.dim(0)?;
        let g = if self.relu {
            (dy * y.gt(0.0)?.to_dtype(dy.dtype())?)?
        } else {
            dy.clone()
        }
        .to_dtype(DType::F32)?;
        let dx = g
            .broadcast_mul(&scale.reshape((1, c, 1, 1))?)?
            .to_dtype(x.dtype())?;
        let per_channel = |t: &Tensor| {
            t.sum_keepdim(0)?
                .sum_keepdim(2)?
                .sum_keepdim(3)?
                .flatten_all()
        };
        let dscale = per_channel(&(&g * x.to_dtype(DType::F32)?)?)?;
        let dshift = per_channel(&g)?;
        Ok((Some(dx), Some(dscale), Some(dshift)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The one-pass tail equals BatchNorm then add + ReLU bit for bit in f32 (about half the
    /// sums below zero); with a gradient to carry it takes the two ops, and γ gets one.
    #[test]
    fn the_residual_tail_is_batch_norm_then_add_relu() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (3, 5, 4, 6), &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (3, 5, 4, 6), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.5, 5, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.5, 5, &dev).unwrap();
        let m = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        let v = (Tensor::randn(0f32, 1.0, 5, &dev).unwrap().abs().unwrap() + 0.1).unwrap();
        let fused = batch_norm_eval_add_relu(&x, &w, &b, &m, &v, 1e-5, &r).unwrap();
        let two = crate::add_relu(
            &batch_norm_eval(&x, &w, &b, &m, &v, 1e-5, false).unwrap(),
            &r,
        )
        .unwrap();
        let (f, t): (Vec<f32>, Vec<f32>) = (
            fused.flatten_all().unwrap().to_vec1().unwrap(),
            two.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(f, t);
        let zeros = f.iter().filter(|&&v| v == 0.0).count();
        assert!(zeros > f.len() / 4 && zeros < 3 * f.len() / 4, "{zeros}");
        let wv = candle_core::Var::from_tensor(&w).unwrap();
        let y = batch_norm_eval_add_relu(&x, wv.as_tensor(), &b, &m, &v, 1e-5, &r).unwrap();
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), t);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(wv.as_tensor()).unwrap().dims(), &[5]);
        let err = batch_norm_eval_add_relu(&x, &w, &b, &m, &v, 1e-5, &x.narrow(0, 0, 2).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected equal shapes"), "{err}");
    }
}
