//! Feature-based distillation losses: FitNets hints (Romero et al. 2015), attention transfer
//! (Zagoruyko & Komodakis 2017), neuron selectivity transfer (Huang & Wang 2017) and variational
//! information distillation (Ahn et al. 2019), ReviewKD's hierarchical context loss (Chen et al.
//! 2021), the overhaul of feature distillation, OFD (Heo et al. 2019), activation boundaries, AB
//! (Heo et al. 2019), factor transfer, FT (Kim et al. 2018) and the FSP matrices (Yim et al.
//! 2017), with spatial alignment between
//! stems of different resolution.
use candle_core::{bail, Result, Tensor, D};

/// Average-pools the larger of two (N, C, H, W) maps down to the other's size, so maps from
/// nets with different stems compare position by position (e.g. 32 px vs 16 px stages).
pub fn align_spatial(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let (ha, hb) = (a.dim(2)?, b.dim(2)?);
    if ha == hb {
        return Ok((a.clone(), b.clone()));
    }
    let (big, small) = if ha > hb { (ha, hb) } else { (hb, ha) };
    if small == 0 || big % small != 0 || a.dim(3)? * hb != b.dim(3)? * ha {
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

/// MGD's generation loss: the squared error between generated and teacher (N, …) features,
/// summed, over N (the authors' `MSELoss(reduction='sum') / N`); the teacher side detached.
pub fn generation_loss(generated: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let n = generated.dim(0)? as f64;
    (generated - teacher.detach())?.sqr()?.sum_all()? / n
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

/// Each channel's spatial map as a unit vector: (N, C, H, W) → (N, C, H·W), divided by its L2
/// norm (at least 1e-12, PyTorch's `F.normalize`).
fn unit_channel_maps(f: &Tensor) -> Result<Tensor> {
    let f = f.flatten_from(2)?;
    // max(‖x‖, 1e-12) as max(‖x‖², 1e-24) under the root: a dead (all-zero) channel then has a
    // zero gradient instead of 0·∞.
    let norm = f
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .clamp(1e-24, f64::MAX)?
        .sqrt()?;
    f.broadcast_div(&norm)
}

/// Mean of the squared-dot-product (second-order polynomial) kernel between the channel maps
/// of `a` (N, Ca, P) and `b` (N, Cb, P): `mean_{n,i,j} (a_ni · b_nj)²`.
fn mean_poly_kernel(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.matmul(&b.transpose(1, 2)?)?.sqr()?.mean_all()
}

/// Neuron selectivity transfer, NST (Huang & Wang 2017): the squared maximum mean discrepancy,
/// with the polynomial kernel k(x, y) = (xᵀy)², between the distributions of the student's and
/// the teacher's channel maps (each map L2-normalised over positions) after spatial alignment:
/// `mean k(t, t) + mean k(s, s) − 2·mean k(s, t)`, as RepDistiller's `NSTLoss` (the
/// teacher-only term is a constant). Channel counts may differ.
pub fn nst_loss(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let (s, t) = align_spatial(student, &teacher.detach())?;
    let (s, t) = (unit_channel_maps(&s)?, unit_channel_maps(&t)?);
    let tt = mean_poly_kernel(&t, &t)?;
    let ss = mean_poly_kernel(&s, &s)?;
    let st = mean_poly_kernel(&s, &t)?;
    (tt + ss)? - (st * 2.0)?
}

/// VID's predicted variance per channel, `softplus(log_scale + offset) + ε`, with `offset` the
/// softplus⁻¹ of the initial variance (see [`vid_loss`]).
pub fn vid_variance(log_scale: &Tensor, init_variance: f64, eps: f64) -> Result<Tensor> {
    let offset = ((init_variance - eps).exp() - 1.0).ln();
    // softplus(x) = log(1 + eᵡ), written stably as max(x, 0) + log(1 + e^(−|x|)).
    let x = (log_scale + offset)?;
    let soft = (x.relu()? + ((x.abs()?.neg()?.exp()? + 1.0)?.log()?))?;
    soft + eps
}

/// Variational information distillation, VID (Ahn et al. 2019): the negative log-likelihood of
/// the teacher's features under a Gaussian with the student's regressed mean `mean` (N, C, H, W)
/// and a learned per-channel variance σ² = [`vid_variance`]:
/// `mean(½·((mean − t)²/σ² + log σ²))`, as RepDistiller's `VIDLoss` (which stores the
/// variance's parameter pre-shifted by the offset; here it starts at 0, the same function and
/// gradient). The teacher side is detached; the maps must already share their size.
pub fn vid_loss(mean: &Tensor, teacher: &Tensor, variance: &Tensor) -> Result<Tensor> {
    let c = mean.dim(1)?;
    if variance.dims() != [c] || mean.dims() != teacher.dims() {
        bail!(
            "vid: regressed mean {:?}, teacher {:?} and variance {:?} do not fit (expected equal maps and one variance per channel)",
            mean.dims(),
            teacher.dims(),
            variance.dims()
        );
    }
    let var = variance.reshape((1, c, 1, 1))?;
    let sq = (mean - teacher.detach())?.sqr()?.broadcast_div(&var)?;
    (sq.broadcast_add(&var.log()?)? * 0.5)?.mean_all()
}

/// ReviewKD's hierarchical context loss, HCL (Chen et al. 2021), for one level: the MSE of the
/// two (N, C, H, W) maps plus the MSEs of both average-pooled to 4×4, 2×2 and 1×1 (each size
/// smaller than H only), weighted ½, ¼, ⅛ and normalised by the weights' sum — as mdistiller's
/// `hcl_loss`. The maps must share their shape (and be square, with H a multiple of each size);
/// the teacher side is detached.
pub fn hcl_loss(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    if student.dims() != teacher.dims() || student.rank() != 4 {
        bail!(
            "hcl: student {:?} and teacher {:?} must be (N, C, H, W) maps of one shape",
            student.dims(),
            teacher.dims()
        );
    }
    let teacher = teacher.detach();
    let h = student.dim(2)?;
    let mut loss = (student - &teacher)?.sqr()?.mean_all()?;
    let (mut weight, mut total) = (1.0, 1.0);
    for size in [4, 2, 1] {
        if size >= h {
            continue;
        }
        if h % size != 0 || student.dim(3)? != h {
            bail!(
                "hcl: {h}×{} maps do not pool evenly to {size}×{size}",
                student.dim(3)?
            );
        }
        let k = h / size;
        weight /= 2.0;
        let pooled = (student.avg_pool2d(k)? - teacher.avg_pool2d(k)?)?
            .sqr()?
            .mean_all()?;
        loss = (loss + (pooled * weight)?)?;
        total += weight;
    }
    loss / total
}

/// OFD's margin per channel (Heo et al. 2019): the expected value of a pre-ReLU response below
/// zero, `E[x | x < 0]` for `x ~ N(β, γ²)`, with γ, β the teacher's BatchNorm before the ReLU:
/// `β − |γ|·φ(β/|γ|)/Φ(−β/|γ|)`; where that tail holds less than 0.1 % of the mass, `−3|γ|`, as
/// the authors' `get_margin_from_BN`. A channel with γ = 0 is the constant β: margin
/// `min(β, 0)`. Computed in f64.
pub fn ofd_margins(gamma: &[f32], beta: &[f32]) -> Result<Vec<f32>> {
    if gamma.len() != beta.len() {
        bail!(
            "ofd: {} BatchNorm scales but {} shifts",
            gamma.len(),
            beta.len()
        );
    }
    let cdf = |x: f64| 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
    Ok(gamma
        .iter()
        .zip(beta)
        .map(|(&g, &b)| {
            let (s, m) = ((g as f64).abs(), b as f64);
            if s == 0.0 {
                return m.min(0.0) as f32;
            }
            let tail = cdf(-m / s);
            if tail > 0.001 {
                let pdf = (-(m / s).powi(2) / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
                (m - s * pdf / tail) as f32
            } else {
                (-3.0 * s) as f32
            }
        })
        .collect())
}

/// OFD's partial L2 distance (Heo et al. 2019) between the student's transformed pre-ReLU
/// features `student` and the teacher's `teacher` (N, C, H, W), with the teacher clamped below at
/// its per-channel `margin` (C): `t' = max(t, margin)`, and `(s − t')²` counted where `s > t'`
/// or `t' > 0` — a student below a negative teacher response is not pushed up, since the ReLU
/// hides the difference. Summed, divided by N (the authors' `loss.sum() / batch_size`); the
/// teacher side is detached.
pub fn ofd_loss(student: &Tensor, teacher: &Tensor, margin: &Tensor) -> Result<Tensor> {
    let c = student.dim(1)?;
    if student.dims() != teacher.dims() || student.rank() != 4 || margin.dims() != [c] {
        bail!(
            "ofd: student {:?}, teacher {:?} and margin {:?} do not fit (expected equal (N, C, H, W) maps and one margin per channel)",
            student.dims(),
            teacher.dims(),
            margin.dims()
        );
    }
    let target = teacher
        .detach()
        .broadcast_maximum(&margin.reshape((1, c, 1, 1))?)?;
    let counted = student
        .gt(&target)?
        .maximum(&target.gt(0.0)?)?
        .to_dtype(student.dtype())?;
    let sq = ((student - &target)?.sqr()? * counted)?;
    sq.sum_all()? / student.dim(0)? as f64
}

/// The activation-boundary loss of AB (Heo et al. 2019, "Knowledge Transfer via Distillation of
/// Activation Boundaries Formed by Hidden Neurons"): the alternative L2 with margin μ between the
/// student's connected pre-ReLU map `student` and the teacher's pre-ReLU map `teacher` (same
/// shape). Only which side of zero each teacher neuron lies on matters: where the teacher is off
/// (t ≤ 0) a student above −μ is pushed down, `(s + μ)²`; where it is on (t > 0) a student below
/// μ is pushed up, `(s − μ)²`. Summed and divided by N, as RepDistiller's `ABLoss` per level
/// (which then weighs the levels and scales by 3/1000); the teacher side is detached.
pub fn ab_loss(student: &Tensor, teacher: &Tensor, margin: f64) -> Result<Tensor> {
    if student.dims() != teacher.dims() || student.rank() != 4 {
        bail!(
            "ab: student {:?} and teacher {:?} do not fit (expected equal (N, C, H, W) maps)",
            student.dims(),
            teacher.dims()
        );
    }
    if margin.is_nan() || margin < 0.0 {
        bail!("ab: the margin must be at least 0, got {margin}");
    }
    let dtype = student.dtype();
    let teacher = teacher.detach();
    let on = teacher.gt(0.0)?;
    let off = teacher.le(0.0)?.to_dtype(dtype)?;
    let push_down = (student.gt(-margin)?.to_dtype(dtype)? * off)?;
    let push_up = (student.le(margin)?.to_dtype(dtype)? * on.to_dtype(dtype)?)?;
    let below = ((student + margin)?.sqr()? * push_down)?;
    let above = ((student - margin)?.sqr()? * push_up)?;
    (below + above)?.sum_all()? / student.dim(0)? as f64
}

/// Factor transfer (Kim et al. 2018, "Paraphrasing Complex Network") as RepDistiller's
/// `FactorTransfer` computes it: each (N, C, H, W) factor reduced to its spatial map
/// [`attention_map`] (`mean_c(f²)`, L2-normalised per image), the larger map average-pooled to
/// the smaller one's size first, and the mean absolute difference. The paper's factor is the
/// whole flattened factor, L2-normalised; RepDistiller's benchmark, which this follows, reduces
/// over channels first, so that factors of different widths compare. The teacher side is
/// detached.
pub fn factor_transfer_loss(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let (s, t) = align_spatial(student, &teacher.detach())?;
    (attention_map(&s)? - attention_map(&t)?)?.abs()?.mean_all()
}

/// The FSP matrix (Yim et al. 2017, "A Gift from Knowledge Distillation", the "flow of solution
/// procedure") between two feature maps of one network, `bottom` (N, C₁, H₁, W₁) and the deeper
/// `top` (N, C₂, H₂, W₂): `G[n, j, i] = mean_p top[n, j, p]·bottom[n, i, p]` over positions p,
/// the larger map average-pooled to the smaller one's size first → (N, C₂, C₁), as
/// RepDistiller's `FSP.compute_fsp`.
pub fn fsp_matrix(bottom: &Tensor, top: &Tensor) -> Result<Tensor> {
    let (bottom, top) = align_spatial(bottom, top)?;
    let positions = bottom.dim(2)? * bottom.dim(3)?;
    let b = bottom.flatten_from(2)?.contiguous()?;
    let t = top.flatten_from(2)?.contiguous()?;
    t.matmul(&b.t()?.contiguous()?)? / positions as f64
}

/// FSP's loss for one pair of levels: the mean squared difference between the student's and the
/// teacher's FSP matrices ([`fsp_matrix`]), which must share their shape (equal channel counts at
/// both levels); the teacher side is detached.
pub fn fsp_loss(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    if student.dims() != teacher.dims() {
        bail!(
            "fsp: the student's FSP matrix {:?} and the teacher's {:?} differ: FSP needs equal channel counts at every level",
            student.dims(),
            teacher.dims()
        );
    }
    (student - teacher.detach())?.sqr()?.mean_all()
}
