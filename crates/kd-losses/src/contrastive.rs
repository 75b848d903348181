//! Contrastive representation distillation, CRD (Tian et al. 2020, "Contrastive Representation
//! Distillation"): an embedding is scored against a memory bank of the other network's
//! embeddings — its own image (the positive) and K images of other classes (negatives) — and
//! a noise-contrastive estimation (NCE) loss tells them apart. The banks and their momentum
//! update are here as pure tensor functions; who owns the banks is the caller's business.
use candle_core::{bail, Result, Tensor, D};

/// NCE's ε (RepDistiller's value), in the denominators.
const NCE_EPS: f64 = 1e-7;

/// Rows divided by their L2 norm (the squared norm clamped at 1e-24 so that an exact zero row
/// gives zeros rather than NaN).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .clamp(1e-24, f64::MAX)?
        .sqrt()?;
    x.broadcast_div(&norm)
}

/// Unnormalised contrast scores `exp(memory[contrast[b, j]] · v_b / T)`, (B, 1 + K): `v` is the
/// batch's (B, D) embeddings, `contrast` (B, 1 + K) u32 rows of the (N, D) `memory` (the
/// positive first). The bank is read detached (and copied, so updating it in place afterwards
/// leaves this step's gradient alone): gradients reach `v` only.
pub fn contrast_scores(
    memory: &Tensor,
    contrast: &Tensor,
    v: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    let (b, d) = v.dims2()?;
    let (cb, _) = contrast.dims2()?;
    if cb != b || memory.dim(1)? != d {
        bail!(
            "contrast scores: embeddings {:?}, contrast rows {:?} and memory {:?} do not fit (expected (B, D), (B, 1 + K), (N, D))",
            v.dims(),
            contrast.dims(),
            memory.dims()
        );
    }
    if temperature.is_nan() || temperature <= 0.0 {
        bail!("contrast scores: temperature must be positive, got {temperature}");
    }
    // Every image's dot product, then the batch's rows picked out: B·N·D multiply-adds and a
    // (B, N) matrix instead of gathering B·(1+K) bank rows of D floats (RepDistiller's way:
    // 537 MB a side at B = 64, K = 16384, D = 128), cheaper whenever N < (1+K)·D.
    // A copy, not a view: the backward pass needs the bank as it was here, and the caller
    // updates it in place ([`momentum_update`]) before backward runs.
    let all = v.matmul(&memory.detach().t()?.contiguous()?)?;
    let dots = all.gather(&contrast.contiguous()?, 1)?;
    (dots / temperature)?.exp()
}

/// The NCE loss of normalised scores `x` (B, 1 + K), positive first: with noise probability
/// `1/n_data` and `m = K`, `−(Σ log(x₀ / (x₀ + m/n)) + Σ log((m/n) / (x_j + m/n))) / B`
/// (each denominator plus ε, as RepDistiller's `ContrastLoss`).
pub fn nce_loss(x: &Tensor, n_data: usize) -> Result<Tensor> {
    let (b, slots) = x.dims2()?;
    if slots < 2 || n_data == 0 {
        bail!("nce loss: expected a positive and at least one negative per row and n_data ≥ 1, got {slots} scores a row and n_data {n_data}");
    }
    let noise = (slots - 1) as f64 / n_data as f64;
    let pos = x.narrow(1, 0, 1)?;
    let neg = x.narrow(1, 1, slots - 1)?;
    let log_d1 = (pos.log()? - (&pos + (noise + NCE_EPS))?.log()?)?;
    let log_d0 = ((&neg + (noise + NCE_EPS))?.log()?.neg()? + noise.ln())?;
    (log_d1.sum_all()? + log_d0.sum_all()?)? / -(b as f64)
}

/// RepDistiller's bank update, in place: rows `rows` (B,) u32 of `memory` become
/// `normalize(momentum·memory[row] + (1 − momentum)·v)` with `v` the batch's (B, D) embeddings
/// (detached). Rows must be distinct.
pub fn momentum_update(memory: &Tensor, rows: &Tensor, v: &Tensor, momentum: f64) -> Result<()> {
    let (b, d) = v.dims2()?;
    if rows.dims() != [b] || memory.dim(1)? != d {
        bail!(
            "memory update: rows {:?}, embeddings {:?} and memory {:?} do not fit (expected (B,), (B, D), (N, D))",
            rows.dims(),
            v.dims(),
            memory.dims()
        );
    }
    let old = memory.index_select(rows, 0)?;
    let mixed = ((old * momentum)? + (v.detach().to_dtype(memory.dtype())? * (1.0 - momentum))?)?;
    let index = rows.unsqueeze(1)?.broadcast_as((b, d))?.contiguous()?;
    memory.scatter_set(&index, &l2_normalize(&mixed)?, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    /// One row worked by hand: x = [x₀, x₁, x₂], m = 2, n = 4 → m/n = 0.5.
    #[test]
    fn nce_loss_matches_its_closed_form() {
        let x = Tensor::new(&[[0.8f64, 0.1, 0.3], [0.2, 0.6, 0.05]], &Device::Cpu).unwrap();
        let got = scalar(&nce_loss(&x, 4).unwrap());
        let row = |r: [f64; 3]| {
            let pn = 0.5;
            (r[0] / (r[0] + pn + 1e-7)).ln()
                + (pn / (r[1] + pn + 1e-7)).ln()
                + (pn / (r[2] + pn + 1e-7)).ln()
        };
        let want = -(row([0.8, 0.1, 0.3]) + row([0.2, 0.6, 0.05])) / 2.0;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        assert!(nce_loss(&x.narrow(1, 0, 1).unwrap(), 4).is_err());
    }

    /// CRD scores, then updates the bank in place, then runs backward: the gradient must be
    /// the one of the bank as scored.
    #[test]
    fn updating_the_bank_before_backward_keeps_the_gradient() {
        let dev = Device::Cpu;
        let bank = || Tensor::new(&[[1.0f64, 0.0], [0.0, 1.0], [0.6, 0.8]], &dev).unwrap();
        let contrast = Tensor::new(&[[0u32, 2]], &dev).unwrap();
        let grad = |update: bool| {
            let memory = bank();
            let v = candle_core::Var::new(&[[0.3f64, 0.4]], &dev).unwrap();
            let s = contrast_scores(&memory, &contrast, v.as_tensor(), 1.0)
                .unwrap()
                .sum_all()
                .unwrap();
            if update {
                let rows = Tensor::new(&[2u32], &dev).unwrap();
                let far = Tensor::new(&[[-1.0f64, 0.0]], &dev).unwrap();
                momentum_update(&memory, &rows, &far, 0.0).unwrap();
            }
            let g = s.backward().unwrap();
            g.get(v.as_tensor()).unwrap().to_vec2::<f64>().unwrap()
        };
        assert_eq!(grad(true), grad(false));
    }

    #[test]
    fn scores_pick_memory_rows_and_update_renormalises() {
        let dev = Device::Cpu;
        let memory = Tensor::new(&[[1.0f64, 0.0], [0.0, 1.0], [0.6, 0.8]], &dev).unwrap();
        let v = Tensor::new(&[[0.0f64, 1.0]], &dev).unwrap();
        let contrast = Tensor::new(&[[2u32, 0, 1]], &dev).unwrap();
        let s = contrast_scores(&memory, &contrast, &v, 0.5)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let want = [(0.8f64 / 0.5).exp(), 1.0, 2f64.exp()];
        for (g, w) in s[0].iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{:?} vs {want:?}", s[0]);
        }
        momentum_update(&memory, &Tensor::new(&[0u32], &dev).unwrap(), &v, 0.5).unwrap();
        let m = memory.to_vec2::<f64>().unwrap();
        let h = 0.5f64.sqrt();
        assert!(
            (m[0][0] - h).abs() < 1e-12 && (m[0][1] - h).abs() < 1e-12,
            "{m:?}"
        );
        assert_eq!(m[1], [0.0, 1.0], "other rows untouched");
        assert_eq!(m[2], [0.6, 0.8]);
        let bad = Tensor::new(&[[0u32, 1]], &dev).unwrap();
        assert!(contrast_scores(&memory, &bad, &v.repeat((2, 1)).unwrap(), 0.5).is_err());
    }
}
