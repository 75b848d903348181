//! Multi-level logit distillation (MLKD; Jin, Wang & Lin 2023, "Multi-Level Logit
//! Distillation"): beside the instance level (KD), the student matches the teacher's
//! class-level and batch-level relations of its softened predictions — the K×K Gram matrix
//! `PᵀP` of how classes co-occur over the batch, and the B×B matrix `PPᵀ` of how images
//! resemble each other — at several temperatures.
use candle_core::{bail, Result, Tensor, D};
use candle_nn::ops::softmax;

fn softened(student: &Tensor, teacher: &Tensor, t: f64) -> Result<(Tensor, Tensor)> {
    if student.dims() != teacher.dims() || student.rank() != 2 {
        bail!(
            "multi-level logits: student {:?} and teacher {:?} must be equal (B, K)",
            student.dims(),
            teacher.dims()
        );
    }
    Ok((
        softmax(&(student / t)?, D::Minus1)?,
        softmax(&(teacher.detach() / t)?, D::Minus1)?,
    ))
}

/// Class-level alignment at temperature `t`: `‖PₜᵀPₜ − PₛᵀPₛ‖²_F / K`, P = softmax(z/t) (B, K),
/// as the authors' `cc_loss`. The teacher side is detached.
pub fn class_correlation_loss(student: &Tensor, teacher: &Tensor, t: f64) -> Result<Tensor> {
    let (ps, pt) = softened(student, teacher, t)?;
    let k = ps.dim(1)?;
    let gram = |p: &Tensor| p.t()?.matmul(p);
    (gram(&pt)? - gram(&ps)?)?.sqr()?.sum_all()? / k as f64
}

/// Batch-level alignment at temperature `t`: `‖PₜPₜᵀ − PₛPₛᵀ‖²_F / B`, P = softmax(z/t) (B, K),
/// as the authors' `bc_loss`. The teacher side is detached.
pub fn batch_correlation_loss(student: &Tensor, teacher: &Tensor, t: f64) -> Result<Tensor> {
    let (ps, pt) = softened(student, teacher, t)?;
    let b = ps.dim(0)?;
    let gram = |p: &Tensor| p.matmul(&p.t()?);
    (gram(&pt)? - gram(&ps)?)?.sqr()?.sum_all()? / b as f64
}

/// The fraction of `values` at or below their median, numpy's `percentile(·, 50)` (the mean of
/// the two middle values for an even count): MLKD's confidence masks keep these. 0 for none.
pub fn fraction_at_or_below_median(values: &[f32]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted: Vec<f64> = values.iter().map(|&v| f64::from(v)).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    sorted.iter().filter(|&&v| v <= median).count() as f64 / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Identical logits give 0; the class-level term of a one-image batch is the batch-level
    /// term times B/K (both are the squared difference of outer products of one row).
    #[test]
    fn closed_forms() -> Result<()> {
        let dev = Device::Cpu;
        let z = Tensor::new(&[[1.0f64, -2.0, 0.5], [0.0, 3.0, -1.0]], &dev)?;
        for t in [1.0, 4.0] {
            assert!(class_correlation_loss(&z, &z, t)?.to_scalar::<f64>()?.abs() < 1e-15);
            assert!(batch_correlation_loss(&z, &z, t)?.to_scalar::<f64>()?.abs() < 1e-15);
        }
        let s = Tensor::new(&[[1.0f64, -2.0, 0.5]], &dev)?;
        let t = Tensor::new(&[[0.2f64, 1.0, -0.3]], &dev)?;
        // One image: PᵀP = ppᵀ (K×K), PPᵀ = ‖p‖² (1×1).
        let p = |z: &Tensor| -> Result<Vec<f64>> {
            softmax(&(z / 2.0)?, D::Minus1)?.squeeze(0)?.to_vec1()
        };
        let (ps, pt) = (p(&s)?, p(&t)?);
        let mut cc = 0.0;
        for i in 0..3 {
            for j in 0..3 {
                cc += (pt[i] * pt[j] - ps[i] * ps[j]).powi(2);
            }
        }
        let norm2 = |p: &[f64]| p.iter().map(|x| x * x).sum::<f64>();
        let bc = (norm2(&pt) - norm2(&ps)).powi(2);
        let got_cc = class_correlation_loss(&s, &t, 2.0)?.to_scalar::<f64>()?;
        let got_bc = batch_correlation_loss(&s, &t, 2.0)?.to_scalar::<f64>()?;
        assert!(
            (got_cc - cc / 3.0).abs() < 1e-15,
            "{got_cc} vs {}",
            cc / 3.0
        );
        assert!((got_bc - bc).abs() < 1e-15, "{got_bc} vs {bc}");
        Ok(())
    }

    #[test]
    fn median_fraction_as_numpy() {
        assert_eq!(fraction_at_or_below_median(&[3.0, 1.0, 2.0, 4.0]), 0.5);
        assert_eq!(fraction_at_or_below_median(&[3.0, 1.0, 2.0]), 2.0 / 3.0);
        // Ties at the median are all kept.
        assert_eq!(fraction_at_or_below_median(&[1.0, 2.0, 2.0, 2.0]), 1.0);
        assert_eq!(fraction_at_or_below_median(&[]), 0.0);
    }
}
