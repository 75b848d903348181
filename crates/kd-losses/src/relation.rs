//! Relation-based distillation: RKD distance and angle terms (Park et al. 2019) and probabilistic
//! knowledge transfer (Passalis & Tefas 2018) on embeddings, and similarity-preserving KD
//! (Tung & Mori 2019) on batch Gram matrices, and correlation congruence (Peng et al. 2019).
//! Norms clamp the squared value before the square root: `√` of an exact 0 has an infinite
//! derivative, and candle turns 0·∞ into NaN gradients.
use candle_core::{bail, Result, Tensor, D};

/// Huber loss with δ = 1 (PyTorch's `smooth_l1_loss`), mean over elements.
pub fn smooth_l1(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let d = (a - b)?.abs()?;
    let quad = (d.sqr()? * 0.5)?;
    let lin = (&d - 0.5)?;
    d.lt(1.0)?.where_cond(&quad, &lin)?.mean_all()
}

/// Pairwise Euclidean distances (B, B) of embeddings (B, D).
fn pairwise_distances(e: &Tensor) -> Result<Tensor> {
    let sq = e.sqr()?.sum_keepdim(D::Minus1)?; // (B,1)
    let prod = e.matmul(&e.t()?)?;
    let d2 = (sq.broadcast_add(&sq.t()?)? - (prod * 2.0)?)?.clamp(1e-12, f64::MAX)?;
    let b = e.dim(0)?;
    // Zero the diagonal exactly (no √ of the clamp floor there).
    let eye = Tensor::eye(b, e.dtype(), e.device())?;
    d2.sqrt()? * (1.0 - eye)?
}

/// RKD distance term: distances normalised by their mean over distinct pairs, compared with
/// smooth-L1; the teacher side is detached.
pub fn rkd_distance_loss(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let b = student.dim(0)?;
    let pairs = (b * (b - 1)) as f64;
    let norm = |d: Tensor| -> Result<Tensor> {
        let mean = (d.sum_all()? / pairs)?;
        d.broadcast_div(&mean)
    };
    let ds = norm(pairwise_distances(&student.flatten_from(1)?)?)?;
    let dt = norm(pairwise_distances(&teacher.detach().flatten_from(1)?)?)?;
    smooth_l1(&ds, &dt)
}

/// Cosines of the angles ∠(i, j, k) for every triplet: (B, B, B) of `e_ij · e_kj` with unit
/// difference vectors.
fn angles(e: &Tensor) -> Result<Tensor> {
    let diff = e.unsqueeze(0)?.broadcast_sub(&e.unsqueeze(1)?)?; // [j, i] = e_i − e_j
    let norm = diff
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .clamp(1e-24, f64::MAX)?
        .sqrt()?;
    let unit = diff.broadcast_div(&norm)?; // (B, B, D)
    unit.matmul(&unit.transpose(1, 2)?) // [j, i, k] = e_ij · e_kj
}

/// RKD angle term: smooth-L1 between the triplet angle cosines of student and teacher.
pub fn rkd_angle_loss(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    smooth_l1(
        &angles(&student.flatten_from(1)?)?,
        &angles(&teacher.detach().flatten_from(1)?)?,
    )
}

/// Row-normalised batch similarity `G = normalize(F Fᵀ)` of features flattened to (B, ·).
pub fn similarity_matrix(f: &Tensor) -> Result<Tensor> {
    let f = f.flatten_from(1)?;
    let g = f.matmul(&f.t()?)?;
    let norm = g
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .clamp(1e-24, f64::MAX)?
        .sqrt()?;
    g.broadcast_div(&norm)
}

/// Similarity-preserving loss `‖G_s − G_t‖²_F / B²`.
pub fn sp_loss(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let b = student.dim(0)? as f64;
    (similarity_matrix(student)? - similarity_matrix(&teacher.detach())?)?
        .sqr()?
        .sum_all()?
        / (b * b)
}

/// PKT's ε (Passalis & Tefas' reference value), in the norms and in the log ratio.
const PKT_EPS: f64 = 1e-7;

/// Row-stochastic cosine-similarity kernel of embeddings (B, ·): cosines mapped to [0, 1], each
/// row divided by its sum — the conditional probability of picking sample j given sample i.
pub fn pkt_probabilities(e: &Tensor) -> Result<Tensor> {
    let e = e.flatten_from(1)?;
    let norm = e
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .clamp(1e-24, f64::MAX)?
        .sqrt()?;
    let unit = e.broadcast_div(&(norm + PKT_EPS)?)?;
    let sim = ((unit.matmul(&unit.t()?)? + 1.0)? * 0.5)?;
    sim.broadcast_div(&sim.sum_keepdim(D::Minus1)?)
}

/// Probabilistic knowledge transfer, PKT (Passalis & Tefas 2018): the KL divergence between the
/// teacher's and the student's [`pkt_probabilities`], as the reference implementation computes
/// it — `mean(p_t · log((p_t + ε) / (p_s + ε)))` over the B×B entries. The embeddings may differ
/// in width; the teacher side is detached.
pub fn pkt_loss(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let ps = pkt_probabilities(student)?;
    let pt = pkt_probabilities(&teacher.detach())?;
    let ratio = ((&pt + PKT_EPS)?.log()? - (ps + PKT_EPS)?.log()?)?;
    (pt * ratio)?.mean_all()
}

/// Correlation congruence, CC (Peng et al. 2019), as RepDistiller's `Correlation` computes it (the
/// code the authors shared with RepDistiller, which its CC benchmark numbers come from; not the
/// paper's Taylor-expanded Gaussian kernel): with `δ = |s − t|` per sample (B, D), the mean over
/// the B − 1 consecutive pairs of samples of `Σ_d δ_i,d · δ_{i+1},d`. The embeddings share their
/// width. Both sides keep their gradients: in CC both embeddings come from trained projections.
pub fn cc_loss(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    if student.dims() != teacher.dims() || student.rank() != 2 || student.dim(0)? < 2 {
        bail!(
            "cc: student {:?} and teacher {:?} embeddings must be equal (B, D) with B ≥ 2",
            student.dims(),
            teacher.dims()
        );
    }
    let b = student.dim(0)?;
    let delta = (student - teacher)?.abs()?;
    (delta.narrow(0, 0, b - 1)? * delta.narrow(0, 1, b - 1)?)?
        .sum(1)?
        .mean_all()
}
