//! Decoupled knowledge distillation, DKD (Zhao et al. 2022, "Decoupled Knowledge
//! Distillation"): the KD loss splits into a *target-class* term (TCKD: KL between the binary
//! distributions "true class or not") and a *non-target-class* term (NCKD: KL between the
//! distributions among the other classes), which DKD weighs independently (α·TCKD + β·NCKD, with
//! β large: the paper's point is that NCKD carries the "dark knowledge" and classic KD suppresses
//! it by the factor 1 − p_target).
//!
//! Computed in log space: the non-target log-probabilities come from the logits with the true
//! class pushed down by 1000 (after dividing by T, as the reference implementation does), and
//! log(1 − p_target) as a difference of two log-sum-exps, so neither term takes the log of a
//! probability that has underflowed.
use candle_core::{bail, Result, Tensor, D};

use crate::classification::one_hot;

/// The two DKD terms of a batch, each already multiplied by T² and averaged over the batch.
#[derive(Clone, Debug)]
pub struct DecoupledTerms {
    /// TCKD: KL(b_teacher ‖ b_student) of the binary (target, all others) distributions.
    pub target: Tensor,
    /// NCKD: KL(q_teacher ‖ q_student) of the distributions among the non-target classes.
    pub non_target: Tensor,
}

impl DecoupledTerms {
    /// `alpha·TCKD + beta·NCKD`, the DKD loss.
    pub fn weighted(&self, alpha: f64, beta: f64) -> Result<Tensor> {
        (&self.target * alpha)? + (&self.non_target * beta)?
    }
}

/// What the true class is pushed down by (after the division by T) to leave it out of a
/// softmax: exp(−1000) is 0 in f32 and f64.
pub(crate) const MASK_OFFSET: f64 = 1000.0;

/// TCKD and NCKD of `student` logits against `teacher` logits (B, K) with true classes `labels`
/// (B,) u32, at temperature `t`. The teacher side is detached.
pub fn dkd_terms(
    student: &Tensor,
    teacher: &Tensor,
    labels: &Tensor,
    t: f64,
) -> Result<DecoupledTerms> {
    let (b, k) = student.dims2()?;
    if teacher.dims() != student.dims() {
        bail!(
            "dkd: teacher logits {:?} and student logits {:?} differ in shape",
            teacher.dims(),
            student.dims()
        );
    }
    if labels.dims() != [b] {
        bail!("dkd: expected {b} labels, got shape {:?}", labels.dims());
    }
    if k < 2 {
        bail!("dkd needs at least 2 classes, got {k}");
    }
    if t.is_nan() || t <= 0.0 {
        bail!("dkd: temperature must be positive, got {t}");
    }
    let mask = one_hot(labels, k, student.dtype())?;
    let (s_bin, s_non) = decoupled_log_probs(&(student / t)?, &mask)?;
    let (t_bin, t_non) = decoupled_log_probs(&(teacher.detach() / t)?, &mask)?;
    let scale = t * t / b as f64;
    Ok(DecoupledTerms {
        target: (kl_sum(&t_bin, &s_bin)? * scale)?,
        non_target: (kl_sum(&t_non, &s_non)? * scale)?,
    })
}

/// `alpha·TCKD + beta·NCKD` of [`dkd_terms`].
pub fn dkd_loss(
    student: &Tensor,
    teacher: &Tensor,
    labels: &Tensor,
    alpha: f64,
    beta: f64,
    t: f64,
) -> Result<Tensor> {
    dkd_terms(student, teacher, labels, t)?.weighted(alpha, beta)
}

/// From scaled logits z (B, K): the binary log-probabilities (B, 2) of (target, non-target), and
/// the log-probabilities (B, K) among the non-target classes (the target's is ≈ −1000).
pub(crate) fn decoupled_log_probs(z: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
    let lse = z.log_sum_exp(D::Minus1)?;
    let z_non = (z - (mask * MASK_OFFSET)?)?;
    let lse_non = z_non.log_sum_exp(D::Minus1)?;
    let log_p_target = ((z * mask)?.sum(D::Minus1)? - &lse)?;
    let log_p_others = (&lse_non - &lse)?;
    let binary = Tensor::stack(&[log_p_target, log_p_others], 1)?;
    let among_others = z_non.broadcast_sub(&lse_non.unsqueeze(1)?)?;
    Ok((binary, among_others))
}

/// Σ over every row of KL(exp(log_p) ‖ exp(log_q)) = Σ p (log p − log q); terms with p = 0 are 0.
fn kl_sum(log_p: &Tensor, log_q: &Tensor) -> Result<Tensor> {
    (log_p.exp()? * (log_p - log_q)?)?.sum_all()
}
