//! Response-based distillation (Hinton, Vinyals & Dean 2015):
//! `T² · KL(softmax(t/T) ‖ softmax(s/T))`, averaged over the batch. The direction is teacher ‖
//! student — the teacher's distribution is the target — and the T² factor keeps gradient
//! magnitudes comparable across temperatures. Optionally on standardised logits (Sun et al. 2024,
//! "Logit Standardization in Knowledge Distillation"): each sample's logits as z-scores, so the
//! student matches the teacher's logit relations without having to match their scale.
use candle_core::{Result, Tensor, D};
use candle_nn::ops::{log_softmax, softmax};

/// The KD loss of `student` logits against `teacher` logits (B, K) at temperature `t`.
/// The teacher side is detached. On f32 logits (CPU, and CUDA with feature `cuda`) one op
/// forward and one backward (`kd_kernels::softmax_loss`); otherwise, and with
/// `KD_DISABLE=losses`, [`kd_loss_composed`].
pub fn kd_loss(student: &Tensor, teacher: &Tensor, t: f64) -> Result<Tensor> {
    if kd_kernels::softmax_loss::supported(student) && teacher.dtype() == student.dtype() {
        return kd_kernels::softmax_loss::kd_loss(student, teacher, t);
    }
    kd_loss_composed(student, teacher, t)
}

/// [`kd_loss`] composed from candle ops (softmax, log-softmax, a product and means): the path
/// for other dtypes, and what the tests check the one-op path against.
pub fn kd_loss_composed(student: &Tensor, teacher: &Tensor, t: f64) -> Result<Tensor> {
    let p_t = softmax(&(teacher.detach() / t)?, D::Minus1)?;
    let logp_t = log_softmax(&(teacher.detach() / t)?, D::Minus1)?;
    let logp_s = log_softmax(&(student / t)?, D::Minus1)?;
    let kl = (p_t * (logp_t - logp_s)?)?.sum(D::Minus1)?;
    kl.mean_all()? * (t * t)
}

/// [`kd_loss`] at a temperature that is itself a tensor with a graph (one element, any shape):
/// CTKD's learnable temperature (Li et al. 2023), which receives the gradient of both sides'
/// softened distributions and of the T² factor. The teacher's logits are detached, `t` is not.
pub fn kd_loss_at(student: &Tensor, teacher: &Tensor, t: &Tensor) -> Result<Tensor> {
    if t.elem_count() != 1 {
        candle_core::bail!(
            "kd_loss_at: the temperature must be one value, got shape {:?}",
            t.dims()
        );
    }
    let t = t.reshape((1, 1))?.to_dtype(student.dtype())?;
    let zt = teacher.detach().broadcast_div(&t)?;
    let p_t = softmax(&zt, D::Minus1)?;
    let logp_t = log_softmax(&zt, D::Minus1)?;
    let logp_s = log_softmax(&student.broadcast_div(&t)?, D::Minus1)?;
    let kl = (p_t * (logp_t - logp_s)?)?.sum(D::Minus1)?;
    kl.mean_keepdim(0)?.mul(&t.sqr()?.squeeze(0)?)?.squeeze(0)
}

/// Each row's logits as z-scores, `(z − mean) / (1e-7 + std)` with the unbiased standard
/// deviation over the classes, as Sun et al. 2024's code (`torch.std`). Needs at least two
/// classes.
pub fn standardize_logits(z: &Tensor) -> Result<Tensor> {
    let k = z.dim(D::Minus1)?;
    if k < 2 {
        candle_core::bail!(
            "standardize_logits: {:?} has {k} class; the standard deviation needs at least 2",
            z.dims()
        );
    }
    let centred = z.broadcast_sub(&z.mean_keepdim(D::Minus1)?)?;
    let std = (centred.sqr()?.sum_keepdim(D::Minus1)? / (k - 1) as f64)?.sqrt()?;
    centred.broadcast_div(&(std + 1e-7)?)
}
