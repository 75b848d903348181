//! SGD with momentum as two in-place passes per parameter (momentum buffer, then parameter),
//! where the composed update allocates and launches about nine element-wise ops; on CUDA a
//! whole list of parameters in one launch ([`sgd_momentum_steps`]). The arithmetic is
//! `torch.optim.SGD`'s, in the same order as kd-schedulers' composed update, so on the CPU the
//! two agree bit for bit.
use candle_core::{bail, CpuStorage, DType, InplaceOp3, Layout, Result, Tensor};

use crate::cpu;

/// The hyper-parameters of one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
    /// Learning rate.
    pub lr: f64,
    /// Momentum μ (non-zero).
    pub momentum: f64,
    /// Dampening τ.
    pub dampening: f64,
    /// L2 weight decay for this parameter (0 for an exempt one).
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
}

/// Updates `buf` (the momentum buffer) and then `param` in place from the gradient `grad`; all
/// three f32, same shape, distinct storage (the buffer must not alias a gradient).
pub fn sgd_momentum_step(param: &Tensor, grad: &Tensor, buf: &Tensor, s: &SgdStep) -> Result<()> {
    check(param, grad, buf)?;
    two_passes(param, grad, buf, s)
}

/// The two in-place passes of a checked update ([`check`]).
fn two_passes(param: &Tensor, grad: &Tensor, buf: &Tensor, s: &SgdStep) -> Result<()> {
    let grad = grad.contiguous()?;
    buf.inplace_op3(&grad, param, &Momentum(*s))?;
    param.inplace_op3(&grad, buf, &Param(*s))
}

/// One parameter's update in [`sgd_momentum_steps`].
#[derive(Clone, Copy, Debug)]
pub struct SgdUpdate<'a> {
    /// The parameter, updated in place.
    pub param: &'a Tensor,
    /// Its gradient.
    pub grad: &'a Tensor,
    /// Its momentum buffer, updated in place.
    pub buf: &'a Tensor,
    /// The step's hyper-parameters (the weight decay may differ between parameters).
    pub step: SgdStep,
}

/// [`sgd_momentum_step`] for each update, the same results. On CUDA devices (feature `cuda`)
/// one launch updates up to [`SGD_LIST`] parameters that share learning rate, momentum,
/// dampening and Nesterov, both passes in one read of each element, instead of two launches a
/// parameter; elsewhere the updates run one after another. Each update is checked as
/// [`sgd_momentum_step`] checks it, and no two may share a parameter or buffer (every one is
/// written).
///
/// [`SGD_LIST`]: crate::launch::SGD_LIST
pub fn sgd_momentum_steps(updates: &[SgdUpdate<'_>]) -> Result<()> {
    for u in updates {
        check(u.param, u.grad, u.buf)?;
    }
    #[cfg(feature = "cuda")]
    if updates.iter().all(|u| u.param.device().is_cuda()) {
        return crate::cuda_ops::sgd_list(updates);
    }
    for u in updates {
        two_passes(u.param, u.grad, u.buf, &u.step)?;
    }
    Ok(())
}

/// What [`sgd_momentum_step`] requires of its tensors.
fn check(param: &Tensor, grad: &Tensor, buf: &Tensor) -> Result<()> {
    for (name, t) in [
        ("parameter", param),
        ("gradient", grad),
        ("momentum buffer", buf),
    ] {
        if t.dtype() != DType::F32 {
            bail!("fused SGD: the {name} is {:?}, expected f32", t.dtype());
        }
        if t.dims() != param.dims() {
            bail!(
                "fused SGD: the {name} has shape {:?}, the parameter {:?}",
                t.dims(),
                param.dims()
            );
        }
        if name != "gradient" && !t.is_contiguous() {
            bail!("fused SGD: the {name} is not contiguous");
        }
        if t.device().location() != param.device().location() {
            bail!(
                "fused SGD: the {name} is on {:?}, the parameter on {:?}",
                t.device().location(),
                param.device().location()
            );
        }
    }
    Ok(())
}

/// Values per parallel task of the two in-place passes.
const CHUNK: usize = 1 << 15;

/// buf ← μ·buf + (1−τ)·(g + wd·p); sources (g, p).
struct Momentum(SgdStep);

/// p ← p − lr·(Nesterov ? (g + wd·p) + μ·buf : buf); sources (g, buf).
struct Param(SgdStep);

impl InplaceOp3 for Momentum {
    fn name(&self) -> &'static str {
        "kd-sgd-momentum"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (g, p) = (cpu::f32_slice(s2, l2)?, cpu::f32_slice(s3, l3)?);
        let buf = cpu::f32_slice_mut(s1, l1)?;
        let (wd, mu, damp) = (
            self.0.weight_decay as f32,
            self.0.momentum as f32,
            (1.0 - self.0.dampening) as f32,
        );
        let update = |(b, (g, p)): (&mut [f32], (&[f32], &[f32]))| {
            for ((b, &g), &p) in b.iter_mut().zip(g).zip(p) {
                let gd = g + p * wd;
                *b = *b * mu + gd * damp;
            }
        };
        cpu::par_zip3(buf, g, p, CHUNK, update);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        crate::cuda_ops::sgd_momentum(s1, l1, s2, l2, s3, l3, &self.0)
    }
}

impl InplaceOp3 for Param {
    fn name(&self) -> &'static str {
        "kd-sgd-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (g, buf) = (cpu::f32_slice(s2, l2)?, cpu::f32_slice(s3, l3)?);
        let p = cpu::f32_slice_mut(s1, l1)?;
        let (lr, wd, mu) = (
            self.0.lr as f32,
            self.0.weight_decay as f32,
            self.0.momentum as f32,
        );
        let nesterov = self.0.nesterov;
        let update = |(p, (g, buf)): (&mut [f32], (&[f32], &[f32]))| {
            for ((p, &g), &b) in p.iter_mut().zip(g).zip(buf) {
                let d = if nesterov { (g + *p * wd) + b * mu } else { b };
                *p -= d * lr;
            }
        };
        cpu::par_zip3(p, g, buf, CHUNK, update);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        crate::cuda_ops::sgd_param(s1, l1, s2, l2, s3, l3, &self.0)
    }
}
