//! Switchable online knowledge distillation, SwitOKD (Qian, Wang, Yin, Hong & Wang, ECCV 2022),
//! as the authors' CIFAR code (hfutqian/SwitOKD, `main.py`) computes it. The student (the run's
//! network) and one larger peer, its teacher, learn from each other as in DML, each by
//! `CE + T²·KL(other ‖ self)` with the other's prediction detached. At every step, from both
//! networks' detached predictions `p_s`, `p_t` and the labels `y` (one-hot, mixed under mixup):
//!
//! - the distillation gap `G = mean_i ‖p_s − p_t‖₁`,
//! - the distances to the labels `s = mean_i ‖p_s − y‖₁` and `t = mean_i ‖p_t − y‖₁`,
//! - the adaptive threshold `δ = s − e^{−t/(t + s)}·t`.
//!
//! When `G > δ` and `t < s` (the teacher ahead; the code's condition beside the paper's) the
//! teacher pauses, the paper's *expert mode*: it runs no backward pass and no optimizer step
//! ([`LossTerms::paused`]), so its momentum and weight decay wait too, as in the code where its
//! optimizer does not step; its BatchNorm statistics still move with its train-mode forward.
//! Otherwise both learn (*learning mode*). The temperature softens the mimicry and the
//! switch's predictions alike; the authors use 1 for both.
//!
//! Deciding the switch reads one scalar from the device per step, as the code's `if` does.
use candle_core::{DType, Result, Tensor, D};
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// SwitOKD, as seen by the student (member 0) or by its teacher (member 1).
#[derive(Clone, Copy, Debug)]
pub struct Switokd {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Temperature of the mimicry and of the switch (1 in the authors' code).
    pub temperature: f64,
}

/// The switch's quantities on one batch, scalars.
pub(crate) struct Switch {
    /// `G`, the mean L1 distance between the two softened predictions.
    pub gap: Tensor,
    /// `δ`, the adaptive threshold.
    pub threshold: Tensor,
    /// 1 in expert mode (the teacher pauses), 0 in learning mode; f32.
    pub expert: Tensor,
}

/// SwitOKD's switch from the student's and the teacher's logits (detached here) at temperature
/// `t`, against the target distribution `y`.
pub(crate) fn switch(student: &Tensor, teacher: &Tensor, y: &Tensor, t: f64) -> Result<Switch> {
    let soft = |z: &Tensor| candle_nn::ops::softmax(&(z.detach() / t)?, D::Minus1);
    let l1 = |a: &Tensor, b: &Tensor| (a - b)?.abs()?.sum(D::Minus1)?.mean_all();
    let (p_s, p_t) = (soft(student)?, soft(teacher)?);
    let gap = l1(&p_s, &p_t)?;
    let s = l1(&p_s, y)?;
    let t_dist = l1(&p_t, y)?;
    let epsilon = (t_dist.neg()? / (&t_dist + &s)?)?.exp()?;
    let threshold = (&s - (epsilon * &t_dist)?)?;
    let expert =
        (gap.gt(&threshold)?.to_dtype(DType::F32)? * t_dist.lt(&s)?.to_dtype(DType::F32)?)?;
    Ok(Switch {
        gap,
        threshold,
        expert,
    })
}

impl Distiller for Switokd {
    fn name(&self) -> &'static str {
        "switokd"
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let [other] = out.peers else {
            candle_core::bail!(
                "switokd needs the outputs of exactly one other network, got {}",
                out.peers.len()
            );
        };
        let own = &out.student.logits;
        let mut terms = LossTerms::default();
        terms.push("loss_ce", self.ce.of(own, batch)?);
        // The other network's prediction is a constant here: its own loss trains it.
        terms.push(
            "loss_switokd",
            kd_losses::kd_loss(own, &other.logits.detach(), self.temperature)?,
        );
        let (student, teacher) = match out.member {
            0 => (own, &other.logits),
            _ => (&other.logits, own),
        };
        let y = super::label_distribution(batch, own.dim(D::Minus1)?, own.dtype())?;
        let sw = switch(student, teacher, &y, self.temperature)?;
        if out.member == 0 {
            // The student always learns; its log says how often its teacher waited.
            terms.note("switokd_gap", &sw.gap);
            terms.note("switokd_threshold", &sw.threshold);
            terms.note("switokd_expert", &sw.expert);
        } else {
            terms.paused = sw.expert.to_scalar::<f32>()? > 0.5;
        }
        Ok(terms)
    }

    /// Logits only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::fixtures::{assert_terms, get, labelled_batch, load, rel_err, scalar};
    use candle_core::{Device, Var};

    /// Both networks' terms, the switch's gap, threshold and mode, and each network's gradient
    /// for its logits equal the authors' step computed by PyTorch in float64
    /// (`tools/fixtures/make_switokd_fixtures.py`): the teacher close and a little ahead
    /// (learning), far and ahead (expert), behind (learning), and 100 classes under mixup at
    /// T = 2 (expert); kd computes in f32.
    #[test]
    fn the_authors_step_in_pytorch() {
        let f = load("switokd");
        for i in 0..4 {
            let at = |k: &str| get(&f, &format!("switokd.{i}.{k}"));
            let p: Vec<f64> = at("params").to_vec1().unwrap();
            let method = Switokd {
                ce: super::super::CrossEntropy { smoothing: 0.0 },
                temperature: p[0],
            };
            let var = |k: &str| Var::from_tensor(&at(k).to_dtype(DType::F32).unwrap()).unwrap();
            let (z_s, z_t) = (var("student"), var("teacher"));
            let output = |z: &Var| {
                crate::distill::fixtures::with_branches(
                    vec![z.as_tensor().clone()],
                    vec![z.as_tensor().clone()],
                )
            };
            let (student, teacher) = (output(&z_s), output(&z_t));
            let mut batch = labelled_batch(at("labels").to_dtype(DType::U32).unwrap());
            if p[1] < 1.0 {
                batch.mix = Some((at("labels_b").to_dtype(DType::U32).unwrap(), p[1] as f32));
            }
            let expert = scalar(&at("expert")) > 0.5;
            for (member, own, other, var, who) in [
                (0, &student, &teacher, &z_s, "student"),
                (1, &teacher, &student, &z_t, "teacher"),
            ] {
                let peers = [other.detach()];
                let out = Outputs {
                    student: own,
                    teacher: None,
                    peers: &peers,
                    paired: None,
                    member,
                };
                let terms = method.loss(&StepContext::one_step(), &batch, &out).unwrap();
                let case = format!("case {i}, {who}");
                assert_terms(
                    &terms,
                    &["loss_ce", "loss_switokd"],
                    |name| at(&format!("{who}_{name}")),
                    &case,
                );
                // Only the teacher pauses, and only in expert mode.
                assert_eq!(terms.paused, member == 1 && expert, "{case}");
                if member == 0 {
                    let value = |name: &str| {
                        let (_, v) = terms.values.iter().find(|(n, _)| n == name).unwrap();
                        scalar(v)
                    };
                    for (name, key) in [
                        ("switokd_gap", "gap"),
                        ("switokd_threshold", "threshold"),
                        ("switokd_expert", "expert"),
                    ] {
                        let (got, want) = (value(name), scalar(&at(key)));
                        assert!((got - want).abs() <= 1e-5, "{case} {name}: {got} vs {want}");
                    }
                }
                let grads = terms.total().unwrap().backward().unwrap();
                let e = rel_err(
                    grads.get(var.as_tensor()).unwrap(),
                    &at(&format!("grad_{who}")),
                );
                assert!(e < 5e-5, "{case}: gradient off by {e:.2e}");
                // The other network's logits are constants of this loss.
                let other_var = if member == 0 { &z_t } else { &z_s };
                assert!(grads.get(other_var.as_tensor()).is_none(), "{case}");
            }
        }
    }

    fn logits(rows: &[[f32; 3]]) -> Tensor {
        Tensor::from_iter(rows.iter().flatten().copied(), &Device::Cpu)
            .unwrap()
            .reshape((rows.len(), 3))
            .unwrap()
    }

    /// The switch in closed form on a batch of one, label 0, against the formulas in f64.
    #[test]
    fn the_teacher_pauses_when_ahead_and_far() -> Result<()> {
        let y = logits(&[[1.0, 0.0, 0.0]]);
        let soft = |z: [f32; 3]| {
            let e: Vec<f64> = z.iter().map(|v| (*v as f64).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(|v| v / sum).collect::<Vec<_>>()
        };
        let l1 = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>();
        let onehot = [1.0, 0.0, 0.0];
        // (student, teacher, expert): the teacher ahead and erring elsewhere than the student
        // pauses (G ≈ 0.995 > δ ≈ 0.723); the student ahead, both learn; the two close, both
        // learn (G < δ).
        let cases = [
            ([0.0, 0.0, -5.0], [2.0, -5.0, 0.5], true),
            ([2.0, -5.0, 0.5], [0.0, 0.0, -5.0], false),
            ([0.0, 0.0, 0.0], [0.5, 0.0, 0.0], false),
        ];
        for (zs, zt, expert) in cases {
            let (p_s, p_t) = (soft(zs), soft(zt));
            let (g, s, t) = (l1(&p_s, &p_t), l1(&p_s, &onehot), l1(&p_t, &onehot));
            let delta = s - (-t / (t + s)).exp() * t;
            assert_eq!(
                g > delta && t < s,
                expert,
                "the case itself: G {g}, δ {delta}"
            );
            assert!(
                (g - delta).abs() > 0.05,
                "a case near the switch: G {g}, δ {delta}"
            );
            let sw = switch(&logits(&[zs]), &logits(&[zt]), &y, 1.0)?;
            let close =
                |a: &Tensor, b: f64| (a.to_scalar::<f32>().unwrap() as f64 - b).abs() < 1e-6;
            assert!(close(&sw.gap, g) && close(&sw.threshold, delta));
            assert_eq!(
                sw.expert.to_scalar::<f32>()?,
                if expert { 1.0 } else { 0.0 }
            );
        }
        Ok(())
    }
}
