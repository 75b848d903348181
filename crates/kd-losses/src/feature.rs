//! Feature-based distillation losses: FitNets hints (Romero et al. 2015) and attention transfer
//! (Zagoruyko & Komodakis 2017), with spatial alignment between stems of different resolution.
use candle_core::{bail, Result, Tensor, D};

/// Average-pools the larger of two (N, C, H, W) maps down to the other's size, so maps from
/// nets with different stems compare position by position (e.g. 32 px vs 16 px stages).
pub fn align_spatial(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let (ha, hb) = (a.dim(2)?, b.dim(2)?);
    if ha == hb {
        return Ok((a.clone(), b.clone()));
    }
    let (big, small) = if ha > hb { (ha, hb) } else { (hb, ha) };
    if big % small != 0 || a.dim(3)? * hb != b.dim(3)? * ha {
        bail!(
            "cannot align feature maps {:?} and {:?}: sizes are not integer multiples",
            a.dims(),
            b.dims()
        );
    }
    let k = big / small;
    if ha > hb {
        Ok((a.avg_pool2d(k)?, b.clone()))
    } else {
        Ok((a.clone(), b.avg_pool2d(k)?))
    }
}

/// Mean squared error between two tensors of the same shape (the FitNets hint after the regressor).
pub fn hint_loss(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    (student - teacher.detach())?.sqr()?.mean_all()
}

/// The spatial attention map of (N, C, H, W) features with p = 2: `mean_c(f²)`, flattened and
/// L2-normalised per sample → (N, H·W).
pub fn attention_map(f: &Tensor) -> Result<Tensor> {
    let a = f.sqr()?.mean(1)?.flatten_from(1)?;
    let norm = a
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .clamp(1e-24, f64::MAX)?
        .sqrt()?;
    a.broadcast_div(&norm)
}

/// Attention transfer: mean over batch and positions of `(Q_s − Q_t)²` after spatial alignment,
/// as the reference implementation's `(at(x) − at(y)).pow(2).mean()`.
pub fn attention_loss(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let (s, t) = align_spatial(student, &teacher.detach())?;
    (attention_map(&s)? - attention_map(&t)?)?.sqr()?.mean_all()
}
