//! Ensembles of the classifiers a run trains: an online method's cohort (the student and its
//! peers) or one network's final classifier and its auxiliary heads. The ensemble predicts
//! the members' mean distribution, softmax averaged over members, as DML, ONE and KDCL report
//! for a cohort and BYOT for its heads. It is not deployed. It says what the members know
//! together, and each member's own accuracy then says how much of that one network holds.
use candle_core::{DType, Result, Tensor, D};

use crate::metrics::Accuracy;

/// The ensemble's prediction as log-probabilities, (B, K) f32: log of the mean over `members`
/// of softmax(logits), each member (B, K). Computed as logsumexp over the members of their
/// log-softmax, minus ln M, so that a class one member rules out to f32's last digit keeps the
/// others' probability. Its softmax is the mean distribution itself, so it serves as logits.
pub fn mean_prediction(members: &[&Tensor]) -> Result<Tensor> {
    let Some(first) = members.first() else {
        candle_core::bail!("ensemble: no members");
    };
    if let Some(other) = members.iter().find(|m| m.dims() != first.dims()) {
        candle_core::bail!(
            "ensemble: member logits {:?} and {:?} differ in shape",
            first.dims(),
            other.dims()
        );
    }
    let log_probs = members
        .iter()
        .map(|m| candle_nn::ops::log_softmax(&m.to_dtype(DType::F32)?, D::Minus1))
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&log_probs, 0)?.log_sum_exp(0)? - (members.len() as f64).ln()
}

/// How an ensemble combines its members' logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combine {
    /// Their softmax averaged ([`mean_prediction`]): a cohort's or a network's heads' ensemble.
    Probabilities,
    /// Their logits averaged ([`kd_models::mean_logits`]): an ensemble teacher
    /// ([`kd_models::Teacher::ensemble`]).
    Logits,
}

/// Adds a batch of the ensemble of `members` (their logits on the same images), combined as
/// `combine` says, to `acc`: its top-1 and top-5, and its negative log-likelihood as the loss.
pub fn update(
    acc: &mut Accuracy,
    members: &[&Tensor],
    labels: &Tensor,
    combine: Combine,
) -> Result<()> {
    let log_p = match combine {
        Combine::Probabilities => mean_prediction(members)?,
        Combine::Logits => {
            candle_nn::ops::log_softmax(&kd_models::mean_logits(members)?, D::Minus1)?
        }
    };
    let nll = candle_nn::loss::nll(&log_p, labels)?.to_scalar::<f32>()? as f64;
    acc.update(&log_p, labels, Some(nll))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn softmax64(z: &[f32]) -> Vec<f64> {
        let m = z.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
        let e: Vec<f64> = z.iter().map(|&v| (v as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    /// The mean of the members' softmax, computed here in f64 image by image.
    #[test]
    fn predicts_the_members_mean_distribution() {
        let a = [[2.0f32, 0.0, -1.0], [0.5, 0.4, 3.0]];
        let b = [[-1.0f32, 1.5, 0.0], [0.0, -2.0, 2.5]];
        let c = [[0.0f32, 0.0, 0.0], [90.0, -90.0, 0.0]];
        let t = |z: &[[f32; 3]; 2]| Tensor::new(z, &Device::Cpu).unwrap();
        let (ta, tb, tc) = (t(&a), t(&b), t(&c));
        let got: Vec<Vec<f32>> = mean_prediction(&[&ta, &tb, &tc])
            .unwrap()
            .exp()
            .unwrap()
            .to_vec2()
            .unwrap();
        for i in 0..2 {
            let (pa, pb, pc) = (softmax64(&a[i]), softmax64(&b[i]), softmax64(&c[i]));
            for k in 0..3 {
                let want = (pa[k] + pb[k] + pc[k]) / 3.0;
                assert!((got[i][k] as f64 - want).abs() < 1e-6, "{got:?}");
            }
        }
        // One member alone is itself.
        let alone: Vec<Vec<f32>> = mean_prediction(&[&ta]).unwrap().to_vec2().unwrap();
        let own: Vec<Vec<f32>> = candle_nn::ops::log_softmax(&ta, D::Minus1)
            .unwrap()
            .to_vec2()
            .unwrap();
        for (x, y) in alone.iter().flatten().zip(own.iter().flatten()) {
            assert!((x - y).abs() < 1e-6);
        }
    }

    /// Averaged logits score the mean logits themselves: on image 0 they are (3.05, 0) and on
    /// image 1 (0, 2.95), both right, with the cross-entropy of those logits as the loss.
    #[test]
    fn mean_logits_are_scored_as_an_ensemble_teacher_predicts() {
        let a = Tensor::new(&[[0.1f32, 0.0], [0.0, 6.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[6.0f32, 0.0], [0.0, -0.1]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        let mut acc = Accuracy::new(2);
        update(&mut acc, &[&a, &b], &labels, Combine::Logits).unwrap();
        assert_eq!((acc.top1, acc.total), (2, 2));
        let ce = |z: [f64; 2], k: usize| -(z[k] - (z[0].exp() + z[1].exp()).ln());
        let want = (ce([3.05, 0.0], 0) + ce([0.0, 2.95], 1)) / 2.0;
        assert!((acc.mean_loss() - want).abs() < 1e-6, "{}", acc.mean_loss());
    }

    /// Each member is wrong on one image and confidently right on the other; the ensemble is
    /// right on both, which no vote of arg-maxes would be (one wrong, one right per image).
    #[test]
    fn is_scored_on_the_mean_distribution_not_on_a_vote() {
        let a = Tensor::new(&[[0.1f32, 0.0], [0.0, 6.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[6.0f32, 0.0], [0.0, -0.1]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        let mut single = Accuracy::new(2);
        single.update(&b, &labels, None).unwrap();
        assert_eq!(single.top1, 1);
        let mut acc = Accuracy::new(2);
        update(&mut acc, &[&a, &b], &labels, Combine::Probabilities).unwrap();
        assert_eq!((acc.top1, acc.total), (2, 2));
        // Its loss is the NLL of the mean distribution: −ln((p_a + p_b)/2) at the label.
        let p = |z: [f32; 2], k: usize| softmax64(&z)[k];
        let want = -(0.5 * (p([0.1, 0.0], 0) + p([6.0, 0.0], 0))).ln()
            - (0.5 * (p([0.0, 6.0], 1) + p([0.0, -0.1], 1))).ln();
        assert!(
            (acc.mean_loss() - want / 2.0).abs() < 1e-6,
            "{}",
            acc.mean_loss()
        );
    }

    #[test]
    fn refuses_members_of_different_shapes() {
        let a = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let err = mean_prediction(&[&a, &b]).unwrap_err().to_string();
        assert!(err.contains("[2, 3]") && err.contains("[2, 4]"), "{err}");
        assert!(mean_prediction(&[]).is_err());
    }
}
