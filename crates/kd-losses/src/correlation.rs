//! DIST (Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher"): instead of the
//! exact probabilities (KL), the student matches the teacher's predictions up to shift and scale —
//! the Pearson correlation of each image's class probabilities (inter-class relation) and of each
//! class's probabilities across the batch (intra-class relation). A stronger teacher's sharper
//! predictions stop being a target the student cannot reach.
use candle_core::{bail, Result, Tensor, D};
use candle_nn::ops::softmax;

/// The authors' ε in the denominator of the correlation.
const DIST_EPS: f64 = 1e-8;

/// The Pearson correlation of each row of `a` with the same row of `b` (B, K) → (B,): the cosine
/// of the centred rows, `Σ a′b′ / (‖a′‖·‖b′‖ + ε)` as the authors compute it.
pub fn pearson_rows(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let centre = |x: &Tensor| -> Result<Tensor> { x.broadcast_sub(&x.mean_keepdim(D::Minus1)?) };
    // The squared norm is clamped before the root: √0 has an infinite derivative, and candle
    // turns 0·∞ into NaN (a constant row; PyTorch's norm gives it a zero gradient).
    let norm =
        |x: &Tensor| -> Result<Tensor> { x.sqr()?.sum(D::Minus1)?.clamp(1e-30, f64::MAX)?.sqrt() };
    let (a, b) = (centre(a)?, centre(b)?);
    (&a * &b)?
        .sum(D::Minus1)?
        .div(&((norm(&a)? * norm(&b)?)? + DIST_EPS)?)
}

/// DIST's two terms of `student` against `teacher` logits (B, K) at temperature `tau`, both
/// scaled by τ²: (inter-class `1 − mean_i ρ(p_s[i, :], p_t[i, :])`, intra-class
/// `1 − mean_k ρ(p_s[:, k], p_t[:, k])`), p = softmax(z/τ). The teacher side is detached.
pub fn dist_terms(student: &Tensor, teacher: &Tensor, tau: f64) -> Result<(Tensor, Tensor)> {
    if student.dims() != teacher.dims() || student.rank() != 2 {
        bail!(
            "dist: student {:?} and teacher {:?} logits must be equal (B, K)",
            student.dims(),
            teacher.dims()
        );
    }
    let ps = softmax(&(student / tau)?, D::Minus1)?;
    let pt = softmax(&(teacher.detach() / tau)?, D::Minus1)?;
    let relation = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
        (pearson_rows(a, b)?.mean_all()?.neg()? + 1.0)? * (tau * tau)
    };
    let inter = relation(&ps, &pt)?;
    let intra = relation(&ps.t()?.contiguous()?, &pt.t()?.contiguous()?)?;
    Ok((inter, intra))
}
