//! Fidelity of a student to its teacher (Stanton et al. 2021, "Does Knowledge Distillation Really
//! Work?"): how often the student's top-1 prediction is the teacher's, and the mean
//! KL(teacher ‖ student) of their predictive distributions at temperature 1, on held-out images.
//! A student can gain accuracy while matching its teacher poorly; these say how well it imitates.
use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// Running sums of one comparison of a student with a reference model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Fidelity {
    /// Images compared.
    pub total: usize,
    /// Of them, those where both models' arg-max is the same class.
    pub agree: usize,
    /// Sum over the images of KL(reference ‖ student), in nats.
    pub kl_sum: f64,
}

impl Fidelity {
    /// Nothing compared yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a batch: the student's and the reference's logits on the same images, (B, K) each.
    pub fn update(&mut self, student: &Tensor, reference: &Tensor) -> Result<()> {
        if student.dims() != reference.dims() {
            candle_core::bail!(
                "fidelity: student logits {:?} but reference logits {:?}",
                student.dims(),
                reference.dims()
            );
        }
        let (s, r) = (
            student.to_dtype(DType::F32)?,
            reference.to_dtype(DType::F32)?,
        );
        let log_s = candle_nn::ops::log_softmax(&s, D::Minus1)?;
        let log_r = candle_nn::ops::log_softmax(&r, D::Minus1)?;
        let kl = (log_r.exp()? * (&log_r - &log_s)?)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let agree = s
            .argmax(D::Minus1)?
            .eq(&r.argmax(D::Minus1)?)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        self.total += s.dim(0)?;
        self.agree += agree as usize;
        self.kl_sum += kl;
        Ok(())
    }

    /// Top-1 agreement in percent.
    pub fn agreement_pct(&self) -> f64 {
        crate::metrics::pct(self.agree, self.total)
    }

    /// Mean KL(reference ‖ student) per image, in nats.
    pub fn mean_kl(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.kl_sum / self.total as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// KL(p ‖ q) of two explicit distributions, in f64.
    fn kl(p: &[f64], q: &[f64]) -> f64 {
        p.iter().zip(q).map(|(a, b)| a * (a / b).ln()).sum()
    }

    /// Closed form: the reference's softmax([ln 3, 0, 0]) = (0.6, 0.2, 0.2) against a student's
    /// softmax([0, ln 2, 0]) = (0.25, 0.5, 0.25) and against itself; one agreement in two.
    #[test]
    fn agreement_and_kl_against_closed_forms() -> Result<()> {
        let dev = Device::Cpu;
        let (l3, l2) = (3f32.ln(), 2f32.ln());
        let reference = Tensor::new(&[[l3, 0.0, 0.0], [l3, 0.0, 0.0]], &dev)?;
        let student = Tensor::new(&[[0.0, l2, 0.0], [l3, 0.0, 0.0]], &dev)?;
        let mut f = Fidelity::new();
        f.update(&student, &reference)?;
        let want = kl(&[0.6, 0.2, 0.2], &[0.25, 0.5, 0.25]) / 2.0;
        assert!(
            (f.mean_kl() - want).abs() < 1e-6,
            "{} vs {want}",
            f.mean_kl()
        );
        assert_eq!((f.total, f.agree), (2, 1));
        assert_eq!(f.agreement_pct(), 50.0);
        Ok(())
    }

    /// The direction is KL(reference ‖ student): reference (0.8, 0.1, 0.1), student uniform,
    /// where the reverse is 0.51 nats against 0.46.
    #[test]
    fn the_reference_is_the_first_argument() -> Result<()> {
        let dev = Device::Cpu;
        let reference = Tensor::new(&[[8f32.ln(), 0.0, 0.0]], &dev)?;
        let student = Tensor::new(&[[0f32, 0.0, 0.0]], &dev)?;
        let mut f = Fidelity::new();
        f.update(&student, &reference)?;
        let (p, u) = ([0.8, 0.1, 0.1], [1.0 / 3.0; 3]);
        assert!((f.mean_kl() - kl(&p, &u)).abs() < 1e-6, "{}", f.mean_kl());
        assert!((f.mean_kl() - kl(&u, &p)).abs() > 1e-2);
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_refused() -> Result<()> {
        let dev = Device::Cpu;
        let err = Fidelity::new()
            .update(
                &Tensor::zeros((2, 3), DType::F32, &dev)?,
                &Tensor::zeros((2, 4), DType::F32, &dev)?,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("[2, 3]") && err.contains("[2, 4]"), "{err}");
        Ok(())
    }
}
