//! The two losses every distillation step computes on logits, each as one op forward and one
//! backward: softmax cross-entropy (label smoothing, mixup's two label sets) and Hinton's KD
//! loss. candle composes each from a log-softmax (six ops), a gather or a product, and means:
//! about thirty launches a loss and step on CUDA, forward and backward, on tensors of a few
//! thousand values. Here: `xent_*` and `kd_kl_*` in `kernels/softmax_loss.cu`, and the same
//! formulas on the CPU (what the tests and the kernels are checked against).
//!
//! Cross-entropy against the target distribution `q = wa·onehot(y_a) + wb·onehot(y_b) + ε/K`,
//! `wa = λ(1 − ε)`, `wb = (1 − λ)(1 − ε)`: `mean_b Σ_k q_bk·(−log p_bk)`, which is PyTorch's
//! label-smoothed cross-entropy (λ = 1) and mixup's `λ·CE(y_a) + (1 − λ)·CE(y_b)`. Its gradient
//! is `(p − q)/B`. KD: `T²·mean_b KL(softmax(t/T) ‖ softmax(s/T))`, gradient `T·(p_s − p_t)/B`
//! for the student; the teacher's logits get none (detached).
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use crate::cpu;
use candle_core::backend::BackendStorage;

/// Whether [`cross_entropy`] and [`kd_loss`] run for `logits` (f32 on the CPU, or on CUDA with
/// feature `cuda`; not with `KD_DISABLE=losses`). Callers compose the losses otherwise.
pub fn supported(logits: &Tensor) -> bool {
    logits.dtype() == DType::F32
        && logits.rank() == 2
        && (logits.device().is_cpu() || (crate::HAS_CUDA_KERNELS && logits.device().is_cuda()))
        && crate::enabled(crate::Kernel::SoftmaxLosses)
}

/// Mean softmax cross-entropy of `logits` (B, K) f32 against `labels_a` (B,) u32, mixed with
/// `labels_b` at weight `1 − lambda` when given (mixup, CutMix), with label smoothing
/// `smoothing`. One op; see the module's formulas. A label outside `[0, K)` is refused on the
/// CPU and gives NaN on CUDA (checking it there would wait for the device every step).
pub fn cross_entropy(
    logits: &Tensor,
    labels_a: &Tensor,
    labels_b: Option<(&Tensor, f64)>,
    smoothing: f64,
) -> Result<Tensor> {
    let (b, k) = logits.dims2()?;
    let (lb, lambda) = labels_b.unwrap_or((labels_a, 1.0));
    for (name, l) in [("labels", labels_a), ("mixed labels", lb)] {
        if l.dims() != [b] || l.dtype() != DType::U32 {
            bail!(
                "cross_entropy: {name} are {:?} {:?}, expected u32 ({b},) for logits {:?}",
                l.dtype(),
                l.dims(),
                logits.dims()
            );
        }
    }
    let target = Target::new(k, lambda, smoothing);
    logits
        .contiguous()?
        .apply_op3(&labels_a.contiguous()?, &lb.contiguous()?, target)
}

/// `T²·mean_b KL(softmax(teacher/T) ‖ softmax(student/T))` of (B, K) f32 logits, one op; the
/// teacher's logits get no gradient.
pub fn kd_loss(student: &Tensor, teacher: &Tensor, t: f64) -> Result<Tensor> {
    if student.dims() != teacher.dims() || teacher.dtype() != student.dtype() {
        bail!(
            "kd_loss: student logits {:?} {:?}, teacher logits {:?} {:?}",
            student.dims(),
            student.dtype(),
            teacher.dims(),
            teacher.dtype()
        );
    }
    if t.is_nan() || t <= 0.0 {
        bail!("kd_loss: the temperature must be positive, got {t}");
    }
    student.dims2()?;
    student
        .contiguous()?
        .apply_op2(&teacher.detach().contiguous()?, Kl { t: t as f32 })
}

/// The cross-entropy's target weights (module docs).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Target {
    pub(crate) wa: f32,
    pub(crate) wb: f32,
    /// ε / K.
    pub(crate) eps_k: f32,
}

impl Target {
    fn new(k: usize, lambda: f64, smoothing: f64) -> Self {
        Target {
            wa: (lambda * (1.0 - smoothing)) as f32,
            wb: ((1.0 - lambda) * (1.0 - smoothing)) as f32,
            eps_k: (smoothing / k as f64) as f32,
        }
    }

    /// Σ_k q_k·(−log p_k) of one row whose log-probabilities are `logp` (labels in range).
    fn row_loss(&self, logp: &[f32], a: u32, c: u32) -> f32 {
        let (a, c) = (a as usize, c as usize);
        let sum_logp = if self.eps_k != 0.0 {
            logp.iter().sum::<f32>()
        } else {
            0.0
        };
        -(self.wa * logp[a] + self.wb * logp[c] + self.eps_k * sum_logp)
    }
}

/// (dz) of [`Target`]'s loss, with the upstream gradient (one value) held.
struct TargetBackward {
    target: Target,
    grad: Tensor,
}

/// The KD loss at temperature `t`.
struct Kl {
    t: f32,
}

/// (ds) of [`Kl`], with the upstream gradient (one value) held.
struct KlBackward {
    t: f32,
    grad: Tensor,
}

/// Each row's log-softmax of `z·inv_t`, in place of `out`, as the kernels compute it (max, then
/// the log of the sum of exponentials, in f32).
fn log_softmax_row(z: &[f32], inv_t: f32, out: &mut [f32]) {
    let m = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * inv_t));
    let lse = z.iter().map(|&v| (v * inv_t - m).exp()).sum::<f32>().ln();
    for (o, &v) in out.iter_mut().zip(z) {
        *o = v * inv_t - m - lse;
    }
}

/// The labels of a CPU op, each checked against the `k` classes.
fn labels(s: &CpuStorage, l: &Layout, k: usize) -> Result<Vec<u32>> {
    let v = match s {
        CpuStorage::U32(v) => match l.contiguous_offsets() {
            Some((a, b)) => v[a..b].to_vec(),
            None => bail!("cross_entropy: labels must be contiguous"),
        },
        _ => bail!("cross_entropy: labels must be u32, got {:?}", s.dtype()),
    };
    if let Some(bad) = v.iter().find(|&&y| y as usize >= k) {
        bail!("cross_entropy: label {bad} is outside the {k} classes of the logits");
    }
    Ok(v)
}

fn rows(l: &Layout) -> Result<(usize, usize)> {
    match l.dims() {
        [b, k] => Ok((*b, *k)),
        d => bail!("softmax losses expect (B, K) logits, got {d:?}"),
    }
}

/// The one value of the upstream gradient.
fn scalar(t: &Tensor) -> Result<f32> {
    t.flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?
        .first()
        .copied()
        .ok_or_else(|| candle_core::Error::Msg("softmax losses: an empty gradient".into()))
}

impl CustomOp3 for Target {
    fn name(&self) -> &'static str {
        "kd-cross-entropy"
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
        let (b, k) = rows(l1)?;
        let z = cpu::f32s_cow(s1, l1)?;
        let (la, lb) = (labels(s2, l2, k)?, labels(s3, l3, k)?);
        let mut logp = vec![0f32; k];
        let mut total = 0f64;
        for r in 0..b {
            log_softmax_row(&z[r * k..][..k], 1.0, &mut logp);
            total += self.row_loss(&logp, la[r], lb[r]) as f64;
        }
        Ok((
            CpuStorage::F32(vec![(total / b as f64) as f32]),
            Shape::from(()),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda_ops::xent_fwd([(s1, l1), (s2, l2), (s3, l3)], rows(l1)?, self)?;
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels_a: &Tensor,
        labels_b: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dz = logits.apply_op3_no_bwd(
            labels_a,
            labels_b,
            &TargetBackward {
                target: *self,
                grad: grad.to_dtype(DType::F32)?.contiguous()?,
            },
        )?;
        Ok((Some(dz), None, None))
    }
}

impl CustomOp3 for TargetBackward {
    fn name(&self) -> &'static str {
        "kd-cross-entropy-backward"
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
        let (b, k) = rows(l1)?;
        let z = cpu::f32s_cow(s1, l1)?;
        let (la, lb) = (labels(s2, l2, k)?, labels(s3, l3, k)?);
        let scale = scalar(&self.grad)? / b as f32;
        let t = &self.target;
        let mut dz = vec![0f32; b * k];
        for (r, out) in dz.chunks_exact_mut(k).enumerate() {
            log_softmax_row(&z[r * k..][..k], 1.0, out);
            let (a, c) = (la[r] as usize, lb[r] as usize);
            for (j, o) in out.iter_mut().enumerate() {
                let q = t.eps_k + if j == a { t.wa } else { 0.0 } + if j == c { t.wb } else { 0.0 };
                *o = scale * (o.exp() - q);
            }
        }
        Ok((CpuStorage::F32(dz), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda_ops::xent_bwd(
            [(s1, l1), (s2, l2), (s3, l3)],
            rows(l1)?,
            &self.target,
            &self.grad,
        )?;
        Ok((out, l1.shape().clone()))
    }
}

impl CustomOp2 for Kl {
    fn name(&self) -> &'static str {
        "kd-hinton-kl"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, k) = rows(l1)?;
        let (s, t) = (cpu::f32s_cow(s1, l1)?, cpu::f32s_cow(s2, l2)?);
        let inv_t = 1.0 / self.t;
        let (mut ls, mut lt) = (vec![0f32; k], vec![0f32; k]);
        let mut total = 0f64;
        for r in 0..b {
            log_softmax_row(&s[r * k..][..k], inv_t, &mut ls);
            log_softmax_row(&t[r * k..][..k], inv_t, &mut lt);
            let kl: f32 = lt
                .iter()
                .zip(&ls)
                .map(|(&pt, &ps)| pt.exp() * (pt - ps))
                .sum();
            total += kl as f64;
        }
        let loss = (self.t * self.t) as f64 * total / b as f64;
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda_ops::kd_kl_fwd([(s1, l1), (s2, l2)], rows(l1)?, self.t)?;
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = student.apply_op2_no_bwd(
            teacher,
            &KlBackward {
                t: self.t,
                grad: grad.to_dtype(DType::F32)?.contiguous()?,
            },
        )?;
        Ok((Some(ds), None))
    }
}

impl CustomOp2 for KlBackward {
    fn name(&self) -> &'static str {
        "kd-hinton-kl-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, k) = rows(l1)?;
        let (s, t) = (cpu::f32s_cow(s1, l1)?, cpu::f32s_cow(s2, l2)?);
        let inv_t = 1.0 / self.t;
        let scale = scalar(&self.grad)? * self.t / b as f32;
        let mut ds = vec![0f32; b * k];
        let mut lt = vec![0f32; k];
        for (r, out) in ds.chunks_exact_mut(k).enumerate() {
            log_softmax_row(&s[r * k..][..k], inv_t, out);
            log_softmax_row(&t[r * k..][..k], inv_t, &mut lt);
            for (o, &pt) in out.iter_mut().zip(&lt) {
                *o = scale * (o.exp() - pt.exp());
            }
        }
        Ok((CpuStorage::F32(ds), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda_ops::kd_kl_bwd([(s1, l1), (s2, l2)], rows(l1)?, self.t, &self.grad)?;
        Ok((out, l1.shape().clone()))
    }
}
