//! ONE, knowledge distillation by On-the-fly Native Ensemble (Lan, Zhu & Gong 2018): the
//! student grows m copies of its last stage and classifier on its shared trunk
//! ([`kd_models::ResNetConfig::branches`]); its gate ([`kd_models::BranchGate`]: linear,
//! BatchNorm, ReLU, softmax over the trunk's pooled output) weighs the branches' logits into an
//! ensemble ([`kd_models::ModelOutput::gated`]) that learns from the labels and teaches every
//! branch at temperature T. No pretrained teacher: the ensemble is built on the fly.
//!
//! As the authors' code computes it (`cifar_one.py`, `loss/kl_loss.py`,
//! `models/cifar/resnet.py`): every branch and the ensemble take the cross-entropy; each
//! branch's KL term is `T²·Σ (p + 1e-7)(log(p + 1e-7) − log q)` averaged over the batch, with
//! `p` the ensemble's softened prediction cut from the graph; the KL terms weigh
//! `exp(−5(1 − e/L)²)` at epoch `e` (0-based) of a ramp-up of `L` epochs (mean teacher's
//! sigmoid ramp-up), 1 after it. The deployed network is the first branch (the network's own
//! last stage and classifier); the other branches and the gate train only, and the gated
//! ensemble is evaluated beside it (ONE-E, with the gate's running statistics).
use candle_core::Result;
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{
    branch_logits, sigmoid_rampup, smoothed_kl, sum_levels, Distiller, LossTerms, Outputs,
    StepContext,
};

/// ONE.
pub struct One {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Temperature of the ensemble's teaching (3).
    pub temperature: f64,
    /// Epochs of the ramp-up of the KL weight (80; 0: none).
    pub rampup_epochs: f64,
}

impl Distiller for One {
    fn name(&self) -> &'static str {
        "one"
    }

    fn loss(&self, ctx: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let branches = branch_logits("one", student, 2)?;
        let ensemble = student.gated.as_ref().ok_or_else(|| {
            candle_core::Error::Msg(
                "one needs a student built with its gate (ResNetConfig::gate)".into(),
            )
        })?;
        // The ensemble teaches through its prediction alone (the authors' `Variable(.data)`).
        let target = ensemble.detach();
        let branch_ce = sum_levels("one", branches[1..].iter().map(|z| self.ce.of(z, batch)))?;
        let kl = sum_levels(
            "one",
            branches
                .iter()
                .map(|z| smoothed_kl(z, &target, self.temperature)),
        )?;
        let w = sigmoid_rampup(ctx.epoch, self.rampup_epochs);
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(branches[0], batch)?);
        t.push("loss_branch_ce", branch_ce);
        t.push("loss_ensemble_ce", self.ce.of(ensemble, batch)?);
        t.push("loss_kd", (kl * w)?);
        t.note(
            "kd_weight",
            &candle_core::Tensor::new(w as f32, ensemble.device())?,
        );
        Ok(t)
    }

    /// Logits and the gated ensemble only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::fixtures::{
        assert_terms, get, load, refusal, rel_err, scalar, terms_at, with_branches,
    };
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::{VarBuilder, VarMap};
    use kd_models::{BranchGate, ModelOutput};

    /// Every term and the gradients of their sum for each branch's logits, the trunk and the
    /// gate's four tensors equal the authors' loss computed by PyTorch in float64
    /// (`tools/fixtures/make_one_fixtures.py`): three branches early in the ramp-up, four on
    /// 100 classes after it, two at T = 2 without one; kd computes in f32.
    #[test]
    fn the_authors_loss_in_pytorch() {
        let f = load("one");
        let dev = Device::Cpu;
        for i in 0..3 {
            let at = |k: &str| get(&f, &format!("one.{i}.{k}"));
            let f32_of = |k: &str| at(k).to_dtype(DType::F32).unwrap();
            let p: Vec<f64> = at("params").to_vec1().unwrap();
            let logits = Var::from_tensor(&f32_of("logits")).unwrap();
            let trunk = Var::from_tensor(&f32_of("trunk")).unwrap();
            let (m, c) = (logits.dim(0).unwrap(), trunk.dim(1).unwrap());
            // kd-models' gate, its variables set to the fixture's.
            let vars = VarMap::new();
            let gate =
                BranchGate::new(c, m, VarBuilder::from_varmap(&vars, DType::F32, &dev)).unwrap();
            let gate_keys = [
                ("fc.weight", "fc_weight"),
                ("fc.bias", "fc_bias"),
                ("bn.weight", "bn_weight"),
                ("bn.bias", "bn_bias"),
            ];
            let gate_vars: Vec<Var> = {
                let data = vars.data().lock().unwrap();
                gate_keys
                    .iter()
                    .map(|(name, key)| {
                        data[*name].set(&f32_of(key)).unwrap();
                        data[*name].clone()
                    })
                    .collect()
            };
            let branches: Vec<Tensor> =
                (0..m).map(|j| logits.as_tensor().get(j).unwrap()).collect();
            let pooled = trunk.as_tensor().mean(3).unwrap().mean(2).unwrap();
            let gated = gate
                .forward_t(&pooled, &branches.iter().collect::<Vec<_>>(), true)
                .unwrap();
            let b = pooled.dim(0).unwrap();
            let zeros = Tensor::zeros((b, 1), DType::F32, &dev).unwrap();
            let student = ModelOutput {
                gated: Some(gated),
                ..with_branches(branches, vec![zeros; m])
            };
            let method = One {
                ce: CrossEntropy { smoothing: 0.0 },
                temperature: p[0],
                rampup_epochs: p[1],
            };
            let labels = at("labels").to_dtype(DType::U32).unwrap();
            let terms = terms_at(&method, p[2] as usize, labels, &student);
            assert_terms(
                &terms,
                &["loss_ce", "loss_branch_ce", "loss_ensemble_ce", "loss_kd"],
                at,
                &format!("case {i}"),
            );
            let grads = terms.total().unwrap().backward().unwrap();
            let leaves = [&logits, &trunk].into_iter().chain(&gate_vars);
            let keys = ["logits", "trunk"]
                .into_iter()
                .chain(gate_keys.iter().map(|(_, key)| *key));
            for (leaf, key) in leaves.zip(keys) {
                let grad = grads
                    .get(leaf.as_tensor())
                    .unwrap_or_else(|| panic!("case {i}: no gradient for {key}"));
                let want = at(&format!("grad_{key}"));
                if key == "fc_bias" {
                    // The batch-statistics BatchNorm after it takes out any shift: the bias's
                    // gradient is zero up to rounding (1e-17 in PyTorch's f64).
                    let max = |t: &Tensor| scalar(&t.abs().unwrap().max_all().unwrap());
                    assert!(
                        max(&want) < 1e-12 && max(grad) < 1e-6,
                        "case {i} grad_fc_bias"
                    );
                    continue;
                }
                let e = rel_err(grad, &want);
                assert!(e < 5e-5, "case {i} grad_{key}: relative error {e:.2e}");
            }
        }
    }

    /// The ramp-up starts at e⁻⁵, reaches 1 at its last epoch and stays there; none is 1.
    #[test]
    fn the_ramp_up_in_closed_form() {
        assert!((sigmoid_rampup(0, 80.0) - (-5f64).exp()).abs() < 1e-15);
        assert!((sigmoid_rampup(40, 80.0) - (-1.25f64).exp()).abs() < 1e-15);
        assert_eq!(sigmoid_rampup(80, 80.0), 1.0);
        assert_eq!(sigmoid_rampup(200, 80.0), 1.0);
        assert_eq!(sigmoid_rampup(0, 0.0), 1.0);
    }

    /// A plain student (one branch), or one without its gate, is refused with what it lacks.
    #[test]
    fn refuses_a_student_without_branches_or_gate() {
        let dev = Device::Cpu;
        let z = Tensor::new(&[[1f32, 0.0, -1.0], [0.5, 0.2, 0.1]], &dev).unwrap();
        let method = One {
            ce: CrossEntropy { smoothing: 0.0 },
            temperature: 3.0,
            rampup_epochs: 80.0,
        };
        for (student, lacks) in [
            (with_branches(vec![z.clone()], vec![z.clone()]), "branches"),
            (
                with_branches(vec![z.clone(), z.clone()], vec![z.clone(), z.clone()]),
                "gate",
            ),
        ] {
            let err = refusal(&method, &student);
            assert!(err.contains(lacks), "{err}");
        }
    }
}
