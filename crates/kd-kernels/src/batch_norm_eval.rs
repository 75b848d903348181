//! BatchNorm2d in eval mode, `y = x·scale[c] + shift[c]`, optionally followed by ReLU, as one
//! pass over the activations.
//!
//! A frozen teacher's forward pass and every evaluation run BatchNorm this way. Composed from
//! candle's ops it is a broadcast multiply, a broadcast add and a ReLU: three passes and two
//! intermediate tensors over every activation of the network. The scale and shift
//! (`γ/√(σ² + ε)` and `β − μ·scale`) are per-channel and computed by the caller, so gradients
//! reach γ and β through them; this op's own backward is the composed formula.
//!
//! The one-pass path runs on the CPU for f32 and bf16 (arithmetic in f32); on CUDA, and with
//! `KD_DISABLE=bneval`, the composed ops run.
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::cpu;
use candle_core::backend::BackendStorage;
use rayon::prelude::*;

/// `x · scale + shift` per channel of `x` (N, C, H, W), then ReLU if `relu`. `scale` and
/// `shift` are (C,); the result has `x`'s dtype.
pub fn batch_norm_eval(x: &Tensor, scale: &Tensor, shift: &Tensor, relu: bool) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    if scale.dims() != [c] || shift.dims() != [c] {
        bail!(
            "batch_norm_eval: input {:?} has {c} channels but scale is {:?} and shift {:?}",
            x.dims(),
            scale.dims(),
            shift.dims()
        );
    }
    let ours = crate::enabled(crate::Kernel::BatchNormEval)
        && x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::BF16);
    if !ours {
        return composed(x, scale, shift, relu);
    }
    x.contiguous()?.apply_op3(
        &scale.to_dtype(DType::F32)?,
        &shift.to_dtype(DType::F32)?,
        ScaleShift { relu },
    )
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
        let plane = h * w;
        let mut y = vec![0f32; x.len()];
        if plane > 0 {
            y.par_chunks_mut(plane)
                .zip(x.par_chunks(plane))
                .with_min_len((4096 / plane).max(1))
                .enumerate()
                .for_each(|(i, (y, x))| {
                    let (a, b) = (scale[i % c], shift[i % c]);
                    if self.relu {
                        for (y, &x) in y.iter_mut().zip(x) {
                            *y = (x * a + b).max(0.0);
                        }
                    } else {
                        for (y, &x) in y.iter_mut().zip(x) {
                            *y = x * a + b;
                        }
                    }
                });
        }
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
