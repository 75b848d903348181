//! Normalized KD (NKD) and its teacher-free form, universal self-KD (USKD): Yang, Zeng, Li,
//! Zhang, Yuan & Li 2023, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified
//! Approach with Normalized Loss and Customized Soft Labels", as the authors' code (yzd-v/cls_KD,
//! `nkd.py`, `uskd.py`) computes them.
//!
//! Both split a soft target into the target class and the others, and normalise the others to
//! sum to one, so that the non-target term does not shrink as the target probability grows (the
//! paper's point: in Hinton's KD the non-target part is weighed by 1 − p_target).
//!
//! - NKD: the teacher's target probability weighs the student's target log-probability,
//!   −p_t\[y\]·log p_s\[y\] at T = 1, and the teacher's distribution among the other classes teaches
//!   the student's, −T²·Σ_{k≠y} q_t,k·log q_s,k at T. Its non-target gradient is DKD's NCKD's:
//!   the two differ by the teacher's entropy, a constant.
//! - USKD: no teacher. The target's soft label is p_s\[y\]² + 1 − mean_batch(p_s\[y\]²), detached;
//!   the non-target soft labels are Zipf's law over a ranking of the classes (1/rank, normalised
//!   over the non-target classes), the ranking made from the final logits and a "weak" head's
//!   (a linear classifier on a middle stage, trained on labels smoothed by 0.1). As in the code,
//!   the ranking adds the weak head's probabilities, each divided by 1 − its target probability,
//!   to the final head's *log*-probabilities, each divided by 1 − its target log-probability (the
//!   code reuses a variable that by then holds log-probabilities); the paper describes
//!   probabilities for both.
use candle_core::{bail, Result, Tensor, D};
use candle_nn::ops::{log_softmax, softmax};

use crate::classification::one_hot;
use crate::decoupled::decoupled_log_probs;

/// NKD's two terms, averaged over the batch, unweighted.
#[derive(Clone, Debug)]
pub struct NormalizedTerms {
    /// −mean p_t\[y\]·log p_s\[y\] (T = 1, the teacher's probability detached).
    pub target: Tensor,
    /// −T²·mean Σ_{k≠y} q_t,k·log q_s,k, q = softmax of the non-target logits over T.
    pub non_target: Tensor,
}

/// USKD's three terms, averaged over the batch, unweighted.
#[derive(Clone, Debug)]
pub struct UniversalSelfTerms {
    /// −mean p̃·log p_s\[y\], p̃ = p_s\[y\]² + 1 − mean_batch(p_s\[y\]²), detached.
    pub target: Tensor,
    /// −mean Σ_{k≠y} z_k·log q_s,k: z the normalised Zipf labels of the non-target classes, q_s
    /// the softmax of the student's non-target logits.
    pub non_target: Tensor,
    /// The weak head's cross-entropy against the labels smoothed by 0.1 (0.9 on the label plus
    /// 0.1/K everywhere).
    pub weak: Tensor,
}

fn check_logits(method: &str, logits: &Tensor, other: &Tensor, labels: &Tensor) -> Result<usize> {
    let (b, k) = logits.dims2()?;
    if other.dims() != logits.dims() {
        bail!(
            "{method}: logits {:?} and {:?} differ in shape",
            logits.dims(),
            other.dims()
        );
    }
    if labels.dims() != [b] {
        bail!(
            "{method}: expected {b} labels, got shape {:?}",
            labels.dims()
        );
    }
    if k < 2 {
        bail!("{method} needs at least 2 classes, got {k}");
    }
    Ok(b)
}

/// Each row's entry at its label: Σ_k x·mask.
fn at_label(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    (x * mask)?.sum(D::Minus1)
}

/// NKD's terms of `student` logits against `teacher` logits (B, K), true classes `labels` (B,)
/// u32, the non-target term at temperature `t`. The teacher side is detached.
pub fn nkd_terms(
    student: &Tensor,
    teacher: &Tensor,
    labels: &Tensor,
    t: f64,
) -> Result<NormalizedTerms> {
    let b = check_logits("nkd", student, teacher, labels)?;
    if t.is_nan() || t <= 0.0 {
        bail!("nkd: temperature must be positive, got {t}");
    }
    let teacher = teacher.detach();
    let k = student.dim(1)?;
    let mask = one_hot(labels, k, student.dtype())?;
    let log_s_y = at_label(&log_softmax(student, D::Minus1)?, &mask)?;
    let p_t_y = at_label(&softmax(&teacher, D::Minus1)?, &mask)?;
    let target = (p_t_y * log_s_y)?.mean_all()?.neg()?;
    let (_, s_non) = decoupled_log_probs(&(student / t)?, &mask)?;
    let (_, t_non) = decoupled_log_probs(&(teacher / t)?, &mask)?;
    // The target column: exp(≈ −1000) = 0 times ≈ −1000, so 0.
    let non_target = ((t_non.exp()? * s_non)?.sum_all()? * (-t * t / b as f64))?;
    Ok(NormalizedTerms { target, non_target })
}

/// Zipf's law over a ranking (B, K): 1/(1 + the class's place when each row is sorted from the
/// highest score down), detached.
pub fn zipf_labels(scores: &Tensor) -> Result<Tensor> {
    let order = scores.detach().contiguous()?.arg_sort_last_dim(false)?;
    let place = order.arg_sort_last_dim(true)?;
    (place.to_dtype(scores.dtype())? + 1.0)?.recip()
}

/// USKD's terms of the student's final `logits` and its `weak` head's logits (B, K), true
/// classes `labels` (B,) u32.
pub fn uskd_terms(logits: &Tensor, weak: &Tensor, labels: &Tensor) -> Result<UniversalSelfTerms> {
    let b = check_logits("uskd", logits, weak, labels)?;
    let k = logits.dim(1)?;
    let mask = one_hot(labels, k, logits.dtype())?;
    // The target's soft label, from the detached target probabilities.
    let p_y = at_label(&softmax(&logits.detach(), D::Minus1)?, &mask)?;
    let sq = p_y.sqr()?;
    let soft = (sq.broadcast_sub(&sq.mean_all()?)? + 1.0)?;
    let log_s = log_softmax(logits, D::Minus1)?;
    let log_s_y = at_label(&log_s, &mask)?;
    let target = (soft * &log_s_y)?.mean_all()?.neg()?;
    // The weak head against the smoothed labels.
    let smoothed = ((&mask * 0.9)? + 0.1 / k as f64)?;
    let log_w = log_softmax(weak, D::Minus1)?;
    let weak_ce = ((smoothed * &log_w)?.sum_all()? * (-1.0 / b as f64))?;
    // The ranking, as the code computes it (module docs), and the Zipf labels of the others.
    let (w, log_s, log_s_y) = (log_w.detach().exp()?, log_s.detach(), log_s_y.detach());
    let w_y = at_label(&w, &mask)?;
    let score = (w.broadcast_div(&((1.0 - w_y)? + 1e-6)?.unsqueeze(1)?)?
        + log_s.broadcast_div(&((1.0 - log_s_y)? + 1e-6)?.unsqueeze(1)?)?)?;
    let zipf = (zipf_labels(&score)? * (1.0 - &mask)?)?;
    let zipf = zipf.broadcast_div(&zipf.sum_keepdim(D::Minus1)?)?;
    let (_, s_non) = decoupled_log_probs(logits, &mask)?;
    let non_target = ((zipf * s_non)?.sum_all()? * (-1.0 / b as f64))?;
    Ok(UniversalSelfTerms {
        target,
        non_target,
        weak: weak_ce,
    })
}
