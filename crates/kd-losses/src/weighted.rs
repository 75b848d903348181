//! Soft labels reweighted or transformed before the student matches them: WSLD and (W)TTM.
//!
//! Weighted soft labels, WSLD (Zhou et al. 2021, "Rethinking Soft Labels for Knowledge
//! Distillation: A Bias-Variance Tradeoff Perspective"), as the authors' code
//! (bellymonster/Weighted-Soft-Label-Distillation, `knowledge_distiller.py`) computes it.
//!
//! Hinton's soft cross-entropy per image, −T²·Σ p_t·log p_s at T, weighted by
//! 1 − exp(−max(CE_s / (CE_t + 1e-7), 0)), CE_s and CE_t the student's and the teacher's
//! cross-entropies against the label at T = 1, both detached: images on which the student is
//! already as good as the teacher (CE_s ≪ CE_t) weigh little, those on which the teacher is far
//! ahead weigh up to 1. The paper's point is that the soft labels' variance harms where the
//! teacher is no better than the student. The code takes the soft cross-entropy, not the KL:
//! the two differ by the teacher's entropy, a constant, so the gradients agree and the logged
//! value does not fall to 0.
use candle_core::{bail, Result, Tensor, D};
use candle_nn::ops::log_softmax;

/// WSLD's term (before its weight α) of `student` logits against `teacher` logits (B, K), at
/// temperature `t`; `target` (B, K) is the label as a distribution: one-hot, or under mixup the
/// λ-mixed one-hots (kd's extension: the code takes one-hot labels only). The teacher side and
/// the weights are detached.
pub fn wsld_loss(student: &Tensor, teacher: &Tensor, target: &Tensor, t: f64) -> Result<Tensor> {
    let (b, _) = student.dims2()?;
    if teacher.dims() != student.dims() || target.dims() != student.dims() {
        bail!(
            "wsld: student logits {:?}, teacher logits {:?} and targets {:?} differ in shape",
            student.dims(),
            teacher.dims(),
            target.dims()
        );
    }
    if t.is_nan() || t <= 0.0 {
        bail!("wsld: temperature must be positive, got {t}");
    }
    let teacher = teacher.detach();
    let p_t = log_softmax(&(&teacher / t)?, D::Minus1)?.exp()?;
    let soft = (p_t * log_softmax(&(student / t)?, D::Minus1)?)?
        .sum(D::Minus1)?
        .neg()?;
    let ce = |z: &Tensor| -> Result<Tensor> {
        (target * log_softmax(z, D::Minus1)?)?.sum(D::Minus1)?.neg()
    };
    let ratio = (ce(&student.detach())? / (ce(&teacher)? + 1e-7)?)?.relu()?;
    let weight = (1.0 - ratio.neg()?.exp()?)?;
    (weight * soft)?.sum_all()? * (t * t / b as f64)
}

/// Transformed teacher matching, TTM, and its weighted form, WTTM (Zheng & Yang 2024,
/// "Knowledge Distillation Based on Transformed Teacher Matching"), as the authors' code computes
/// them: the teacher's probabilities raised to the power `gamma` and renormalised,
/// q = p_t^γ / U with U = Σ p_t^γ (the teacher softened at T = 1/γ), against the student's
/// softmax at T = 1, without the T² factor: mean_i KL(q_i ‖ p_s,i), or with `weighted`
/// mean_i U_i·KL(q_i ‖ p_s,i), U_i large where the teacher is unsure. The teacher side is detached.
pub fn ttm_loss(student: &Tensor, teacher: &Tensor, gamma: f64, weighted: bool) -> Result<Tensor> {
    if teacher.dims() != student.dims() || student.rank() != 2 {
        bail!(
            "ttm: student logits {:?} and teacher logits {:?} must be (B, K) of one shape",
            student.dims(),
            teacher.dims()
        );
    }
    if gamma.is_nan() || gamma <= 0.0 {
        bail!("ttm: gamma must be positive, got {gamma}");
    }
    let b = student.dim(0)? as f64;
    // γ·log p_t; its log-sum-exp is log U, and subtracting it gives log q.
    let scaled = (log_softmax(&teacher.detach(), D::Minus1)? * gamma)?;
    let log_u = scaled.log_sum_exp(D::Minus1)?;
    let log_q = scaled.broadcast_sub(&log_u.unsqueeze(1)?)?;
    let kl = (log_q.exp()? * (log_q - log_softmax(student, D::Minus1)?)?)?.sum(D::Minus1)?;
    let kl = if weighted { (kl * log_u.exp()?)? } else { kl };
    kl.sum_all()? / b
}
