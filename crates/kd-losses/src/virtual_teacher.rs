//! Tf-KD's manually designed "virtual teacher" (Yuan et al. 2020, "Revisiting Knowledge
//! Distillation via Label Smoothing Regularization"): a teacher-free target that puts
//! probability `a` on the true class and `(1 − a)/(K − 1)` on each other class, softened the way
//! the authors' code softens it — a softmax of those probabilities divided by the temperature —
//! which at their a = 0.99, T = 20 leaves a nearly uniform target with the true class slightly
//! ahead: a regulariser akin to label smoothing. The student is compared at temperature 1.
use candle_core::{bail, DType, Result, Tensor, D};
use candle_nn::ops::log_softmax;

use crate::classification::one_hot;

/// Fails unless `correct_prob` lies in (0, 1] and `temperature` is positive and finite: what a
/// method built on the virtual teacher checks before training.
pub fn check_virtual_teacher(correct_prob: f64, temperature: f64) -> Result<()> {
    if !(correct_prob > 0.0 && correct_prob <= 1.0) {
        bail!("the virtual teacher's correct_prob must lie in (0, 1], got {correct_prob}");
    }
    if !(temperature > 0.0 && temperature.is_finite()) {
        bail!("the virtual teacher's temperature must be positive, got {temperature}");
    }
    Ok(())
}

/// The two values of the softened virtual teacher over `k` classes: (true class, each other).
fn target_values(k: usize, correct_prob: f64, temperature: f64) -> Result<(f64, f64)> {
    if k < 2 {
        bail!("the virtual teacher needs at least 2 classes, got {k}");
    }
    check_virtual_teacher(correct_prob, temperature)?;
    let other = (1.0 - correct_prob) / (k - 1) as f64;
    // softmax over one entry correct_prob/T and k − 1 entries other/T.
    let ratio = ((other - correct_prob) / temperature).exp();
    let top = 1.0 / (1.0 + (k - 1) as f64 * ratio);
    Ok((top, ratio * top))
}

/// The softened virtual teacher of each label, (B, K) rows of `dtype` that sum to 1.
pub fn virtual_teacher_probs(
    labels: &Tensor,
    k: usize,
    correct_prob: f64,
    temperature: f64,
    dtype: DType,
) -> Result<Tensor> {
    let (top, rest) = target_values(k, correct_prob, temperature)?;
    one_hot(labels, k, dtype)?.affine(top - rest, rest)
}

/// Mean over the batch of KL(virtual teacher ‖ softmax(logits)): the teacher's entropy, a
/// constant, in closed form, and the cross-entropy against its (B, K) rows.
pub fn virtual_teacher_loss(
    logits: &Tensor,
    labels: &Tensor,
    correct_prob: f64,
    temperature: f64,
) -> Result<Tensor> {
    let k = logits.dim(D::Minus1)?;
    let (top, rest) = target_values(k, correct_prob, temperature)?;
    let entropy = -(top * top.ln() + (k - 1) as f64 * rest * rest.ln());
    let target = virtual_teacher_probs(labels, k, correct_prob, temperature, logits.dtype())?;
    let cross = (target * log_softmax(logits, D::Minus1)?)?
        .sum(D::Minus1)?
        .mean_all()?
        .neg()?;
    cross - entropy
}
