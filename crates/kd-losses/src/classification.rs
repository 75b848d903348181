//! Cross-entropy with label smoothing (Szegedy et al. 2016) and its mixup/CutMix form. On f32
//! logits (CPU, and CUDA with feature `cuda`) each is one op forward and one backward
//! (`kd_kernels::softmax_loss`); otherwise, and with `KD_DISABLE=losses`, composed from candle
//! ops ([`cross_entropy_composed`]).
use candle_core::{DType, Result, Tensor, D};
use candle_nn::ops::log_softmax;

/// Mean cross-entropy of `logits` (B, K) against `labels` (B,) u32, with PyTorch's label
/// smoothing ε: `(1−ε)·(−log p_y) + ε·mean_k(−log p_k)`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Result<Tensor> {
    if fused(logits, labels) {
        return kd_kernels::softmax_loss::cross_entropy(logits, labels, None, smoothing);
    }
    cross_entropy_composed(logits, labels, smoothing)
}

/// Whether the one-op losses run for these logits and labels (u32 labels; the op's own
/// conditions).
fn fused(logits: &Tensor, labels: &Tensor) -> bool {
    labels.dtype() == DType::U32 && kd_kernels::softmax_loss::supported(logits)
}

/// [`cross_entropy`] composed from candle ops (log-softmax, gather, means): the path for other
/// dtypes, and what the tests check the one-op path against.
pub fn cross_entropy_composed(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Result<Tensor> {
    let logp = log_softmax(logits, D::Minus1)?;
    let nll = logp
        .gather(&labels.unsqueeze(1)?, D::Minus1)?
        .squeeze(1)?
        .neg()?;
    if smoothing == 0.0 {
        return nll.mean_all();
    }
    let uniform = logp.mean(D::Minus1)?.neg()?;
    ((nll * (1.0 - smoothing))? + (uniform * smoothing)?)?.mean_all()
}

/// The mixed-label loss `λ·CE(y_a) + (1−λ)·CE(y_b)` for mixup and CutMix batches.
pub fn mixed_cross_entropy(
    logits: &Tensor,
    labels_a: &Tensor,
    labels_b: &Tensor,
    lambda: f64,
    smoothing: f64,
) -> Result<Tensor> {
    if fused(logits, labels_a) && labels_b.dtype() == DType::U32 {
        return kd_kernels::softmax_loss::cross_entropy(
            logits,
            labels_a,
            Some((labels_b, lambda)),
            smoothing,
        );
    }
    (cross_entropy_composed(logits, labels_a, smoothing)? * lambda)?
        + (cross_entropy_composed(logits, labels_b, smoothing)? * (1.0 - lambda))?
}

/// (B, K) with 1 at each row's label, 0 elsewhere, in `dtype`.
pub fn one_hot(labels: &Tensor, k: usize, dtype: DType) -> Result<Tensor> {
    let b = labels.dim(0)?;
    let classes = Tensor::arange(0u32, k as u32, labels.device())?
        .unsqueeze(0)?
        .broadcast_as((b, k))?;
    let labels = labels
        .to_dtype(DType::U32)?
        .unsqueeze(1)?
        .broadcast_as((b, k))?;
    classes.eq(&labels)?.to_dtype(dtype)
}
