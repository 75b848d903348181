//! The end of a residual block, `relu(a + b)`, as one op with its own backward.
//!
//! Composed from candle ops it is an add and a ReLU forward (two passes, one intermediate
//! tensor) and, backward, the ReLU's mask built from several element-wise ops before the add
//! hands the gradient on. Here it is one pass forward and one backward: the gradient of both
//! inputs is `dy` where `y > 0`, else 0. A NaN sum gives 0, as the fused BatchNorm's ReLU.
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::cpu;
use candle_core::backend::BackendStorage;

/// `relu(a + b)` for two tensors of one shape and dtype (f32 or bf16; other dtypes, and
/// `KD_DISABLE=addrelu`, take candle's add and ReLU).
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() || a.dtype() != b.dtype() {
        bail!(
            "add_relu: operands {:?} {:?} and {:?} {:?} differ",
            a.dims(),
            a.dtype(),
            b.dims(),
            b.dtype()
        );
    }
    let ours = crate::enabled(crate::Kernel::AddRelu)
        && matches!(a.dtype(), DType::F32 | DType::BF16)
        && (a.device().is_cpu() || (crate::HAS_CUDA_KERNELS && a.device().is_cuda()));
    if !ours {
        return (a + b)?.relu();
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}

/// (a, b) → relu(a + b).
struct AddRelu;

/// (y, dy) → dy where y > 0, else 0.
struct ReluBackward;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "kd-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (cpu::f32s_cow(s1, l1)?, cpu::f32s_cow(s2, l2)?);
        let y = cpu::zip_map(&a, &b, |a, b| {
            let s = a + b;
            if s > 0.0 {
                s
            } else {
                0.0
            }
        });
        Ok((cpu::from_f32s(y, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::cuda_ops::elementwise2("add_relu", (s1, l1), (s2, l2))?;
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = y.apply_op2_no_bwd(&dy.contiguous()?, &ReluBackward)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

impl CustomOp2 for ReluBackward {
    fn name(&self) -> &'static str {
        "kd-relu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if s1.dtype() != s2.dtype() {
            bail!(
                "relu backward: output {:?}, gradient {:?}",
                s1.dtype(),
                s2.dtype()
            );
        }
        let (y, dy) = (cpu::f32s_cow(s1, l1)?, cpu::f32s_cow(s2, l2)?);
        let dx = cpu::zip_map(&y, &dy, |y, dy| if y > 0.0 { dy } else { 0.0 });
        Ok((cpu::from_f32s(dx, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dx = crate::cuda_ops::elementwise2("relu_backward", (s1, l1), (s2, l2))?;
        Ok((dx, l1.shape().clone()))
    }
}
