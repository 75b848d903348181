//! ONE, knowledge distillation by On-the-fly Native Ensemble (Lan, Zhu & Gong 2018): the
//! student grows m copies of its last stage and classifier on its shared trunk
//! ([`kd_models::ResNetConfig::branches`]); a gate (linear, BatchNorm, ReLU, softmax over the
//! trunk's pooled output) weighs the branches' logits into an ensemble that learns from the
//! labels and teaches every branch at temperature T. No pretrained teacher: the ensemble is
//! built on the fly.
//!
//! As the authors' code computes it (`cifar_one.py`, `loss/kl_loss.py`,
//! `models/cifar/resnet.py`): every branch and the ensemble take the cross-entropy; each
//! branch's KL term is `T²·Σ (p + 1e-7)(log(p + 1e-7) − log q)` averaged over the batch, with
//! `p` the ensemble's softened prediction cut from the graph; the KL terms weigh
//! `exp(−5(1 − e/L)²)` at epoch `e` (0-based) of a ramp-up of `L` epochs (mean teacher's
//! sigmoid ramp-up), 1 after it. The gate's BatchNorm normalises with the batch's statistics.
//! The deployed network is the first branch (the network's own last stage and classifier);
//! the other branches and the gate train only.
use candle_core::{Result, Tensor, D};
use candle_nn::ops::softmax;
use candle_nn::{Linear, Module, VarBuilder};
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{
    branch_logits, sigmoid_rampup, smoothed_kl, sum_levels, Distiller, LossTerms, Outputs,
    StepContext,
};

/// PyTorch's `BatchNorm1d` ε.
const BN_EPS: f64 = 1e-5;

/// The gate: the trunk's globally pooled output through a linear layer to one score per
/// branch, a BatchNorm over the batch, a ReLU and a softmax.
pub struct Gate {
    fc: Linear,
    bn_weight: Tensor,
    bn_bias: Tensor,
}

impl Gate {
    /// A gate from `channels` trunk channels to `branches` weights, its variables under `vb`
    /// (`fc.*`, `bn.weight`, `bn.bias`).
    pub fn new(channels: usize, branches: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Gate {
            fc: candle_nn::linear(channels, branches, vb.pp("fc"))?,
            bn_weight: vb.pp("bn").get_with_hints(
                branches,
                "weight",
                candle_nn::Init::Const(1.0),
            )?,
            bn_bias: vb
                .pp("bn")
                .get_with_hints(branches, "bias", candle_nn::Init::Const(0.0))?,
        })
    }

    /// A gate of given tensors (tests, fixtures): the linear layer's (m, C) weight and (m,)
    /// bias, the BatchNorm's (m,) scale and shift.
    pub fn from_tensors(
        fc_weight: Tensor,
        fc_bias: Tensor,
        bn_weight: Tensor,
        bn_bias: Tensor,
    ) -> Self {
        Gate {
            fc: Linear::new(fc_weight, Some(fc_bias)),
            bn_weight,
            bn_bias,
        }
    }

    /// The (B, m) branch weights of a (B, C, H, W) trunk output, each row summing to 1.
    pub fn weights(&self, trunk: &Tensor) -> Result<Tensor> {
        let pooled = trunk.mean(D::Minus1)?.mean(D::Minus1)?;
        let z = self.fc.forward(&pooled)?;
        let centered = z.broadcast_sub(&z.mean_keepdim(0)?)?;
        let var = centered.sqr()?.mean_keepdim(0)?;
        let normed = centered.broadcast_div(&(var + BN_EPS)?.sqrt()?)?;
        let y = normed
            .broadcast_mul(&self.bn_weight)?
            .broadcast_add(&self.bn_bias)?
            .relu()?;
        softmax(&y, D::Minus1)
    }
}

/// ONE.
pub struct One {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Temperature of the ensemble's teaching (3).
    pub temperature: f64,
    /// Epochs of the ramp-up of the KL weight (80; 0: none).
    pub rampup_epochs: f64,
    /// The gate.
    pub gate: Gate,
}

impl Distiller for One {
    fn name(&self) -> &'static str {
        "one"
    }

    fn loss(&self, ctx: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        let branches = branch_logits("one", student, 2)?;
        let trunk = student
            .feats
            .len()
            .checked_sub(2)
            .map(|i| &student.feats[i])
            .ok_or_else(|| {
                candle_core::Error::Msg("one needs the student's stage features".into())
            })?;
        let gate = self.gate.weights(trunk)?;
        if gate.dim(1)? != branches.len() {
            candle_core::bail!(
                "one: the gate weighs {} branches, the student has {}",
                gate.dim(1)?,
                branches.len()
            );
        }
        // (B, 1, m) · (B, m, K): each image's branches weighed by its gate.
        let ensemble = gate
            .unsqueeze(1)?
            .matmul(&Tensor::stack(&branches, 1)?)?
            .squeeze(1)?;
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
        t.push("loss_ensemble_ce", self.ce.of(&ensemble, batch)?);
        t.push("loss_kd", (kl * w)?);
        t.note("kd_weight", &Tensor::new(w as f32, ensemble.device())?);
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::fixtures::{
        assert_terms, get, labelled_batch, load, rel_err, scalar, with_branches,
    };
    use candle_core::{DType, Device, Var};
    use kd_models::ModelOutput;

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
            let var = |k: &str| Var::from_tensor(&at(k).to_dtype(DType::F32).unwrap()).unwrap();
            let p: Vec<f64> = at("params").to_vec1().unwrap();
            let (logits, trunk) = (var("logits"), var("trunk"));
            let gate_vars = [
                var("fc_weight"),
                var("fc_bias"),
                var("bn_weight"),
                var("bn_bias"),
            ];
            let [w, b, g, s] = gate_vars.clone().map(|v| v.as_tensor().clone());
            let method = One {
                ce: CrossEntropy { smoothing: 0.0 },
                temperature: p[0],
                rampup_epochs: p[1],
                gate: Gate::from_tensors(w, b, g, s),
            };
            let m = logits.dim(0).unwrap();
            let b = trunk.dim(0).unwrap();
            let zeros = || Tensor::zeros((b, 1), DType::F32, &dev).unwrap();
            let student = ModelOutput {
                // The trunk is the last stage's input: the feature before the last.
                feats: vec![trunk.as_tensor().clone(), zeros()],
                ..with_branches(
                    (0..m).map(|j| logits.as_tensor().get(j).unwrap()).collect(),
                    (0..m).map(|_| zeros()).collect(),
                )
            };
            let batch = labelled_batch(at("labels").to_dtype(DType::U32).unwrap());
            let ctx = StepContext {
                epoch: p[2] as usize,
                step: 0,
                total_steps: 1,
                epochs: 200,
            };
            let terms = method
                .loss(&ctx, &batch, &Outputs::student(&student))
                .unwrap();
            assert_terms(
                &terms,
                &["loss_ce", "loss_branch_ce", "loss_ensemble_ce", "loss_kd"],
                at,
                &format!("case {i}"),
            );
            let grads = terms.total().unwrap().backward().unwrap();
            let leaves = [
                &logits,
                &trunk,
                &gate_vars[0],
                &gate_vars[1],
                &gate_vars[2],
                &gate_vars[3],
            ];
            let keys = [
                "logits",
                "trunk",
                "fc_weight",
                "fc_bias",
                "bn_weight",
                "bn_bias",
            ];
            for (leaf, key) in leaves.into_iter().zip(keys) {
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

    /// A plain student (one branch) is refused with what it lacks.
    #[test]
    fn refuses_a_student_without_branches() {
        let dev = Device::Cpu;
        let z = Tensor::new(&[[1f32, 0.0, -1.0], [0.5, 0.2, 0.1]], &dev).unwrap();
        let student = with_branches(vec![z.clone()], vec![z]);
        let gate = Gate::from_tensors(
            Tensor::zeros((3, 4), DType::F32, &dev).unwrap(),
            Tensor::zeros(3, DType::F32, &dev).unwrap(),
            Tensor::ones(3, DType::F32, &dev).unwrap(),
            Tensor::zeros(3, DType::F32, &dev).unwrap(),
        );
        let method = One {
            ce: CrossEntropy { smoothing: 0.0 },
            temperature: 3.0,
            rampup_epochs: 80.0,
            gate,
        };
        let batch = labelled_batch(Tensor::new(&[0u32, 1], &dev).unwrap());
        let err = method
            .loss(
                &StepContext::one_step(),
                &batch,
                &Outputs::student(&student),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("branches"), "{err}");
    }
}
