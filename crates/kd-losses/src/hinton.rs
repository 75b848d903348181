//! Response-based distillation (Hinton, Vinyals & Dean 2015):
//! `T² · KL(softmax(t/T) ‖ softmax(s/T))`, averaged over the batch. The direction is teacher ‖
//! student — the teacher's distribution is the target — and the T² factor keeps gradient
//! magnitudes comparable across temperatures.
use candle_core::{Result, Tensor, D};
use candle_nn::ops::{log_softmax, softmax};

/// The KD loss of `student` logits against `teacher` logits (B, K) at temperature `t`.
/// The teacher side is detached.
pub fn kd_loss(student: &Tensor, teacher: &Tensor, t: f64) -> Result<Tensor> {
    let p_t = softmax(&(teacher.detach() / t)?, D::Minus1)?;
    let logp_t = log_softmax(&(teacher.detach() / t)?, D::Minus1)?;
    let logp_s = log_softmax(&(student / t)?, D::Minus1)?;
    let kl = (p_t * (logp_t - logp_s)?)?.sum(D::Minus1)?;
    kl.mean_all()? * (t * t)
}
