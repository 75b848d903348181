//! CL-ILR, collaborative learning with intermediate-level representation sharing and backprop
//! rescaling (Song & Chai 2018), as OKDDip's authors reimplemented it for their comparison
//! (`train_one.py --avg --bpscale`, `models/model_cifar/resnet_one.py`): the student grows
//! branches of its last stage on its shared trunk ([`kd_models::ResNetConfig::branches`]),
//! whose gradient is divided by the number of branches
//! ([`kd_models::ResNetConfig::rescale_trunk_grad`]); each branch learns from the labels and
//! from the mean logits of the other branches, softened at T, the target keeping its graph as
//! in that code's `KL_Loss`; the weight `α·exp(−5(1 − e/L)²)` ramps up over `L` epochs. The
//! deployed network is the first branch.
use candle_core::{Result, Tensor};
use kd_data::Batch;

use super::none::CrossEntropy;
use super::okddip::kl_with_target_grad;
use super::one::sigmoid_rampup;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// CL-ILR.
pub struct ClIlr {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Temperature (3).
    pub temperature: f64,
    /// Weight α of the peer terms (1).
    pub alpha: f64,
    /// Epochs of the ramp-up of their weight (80; 0: none).
    pub rampup_epochs: f64,
}

impl Distiller for ClIlr {
    fn name(&self) -> &'static str {
        "cl_ilr"
    }

    fn loss(&self, ctx: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        if student.branches.is_empty() {
            candle_core::bail!(
                "cl_ilr needs a student built with branches (ResNetConfig::branches ≥ 2)"
            );
        }
        let branches: Vec<&Tensor> = std::iter::once(&student.logits)
            .chain(student.branches.iter().map(|b| &b.logits))
            .collect();
        let others = (branches.len() - 1) as f64;
        let total = Tensor::stack(&branches, 0)?.sum(0)?;
        let mut branch_ce = None;
        let mut kd = None;
        for (i, z) in branches.iter().enumerate() {
            if i > 0 {
                let ce = self.ce.of(z, batch)?;
                branch_ce = Some(match branch_ce {
                    None => ce,
                    Some(a) => (a + ce)?,
                });
            }
            // The mean of the other branches' logits.
            let target = ((&total - *z)? / others)?;
            let k = kl_with_target_grad(z, &target, self.temperature)?;
            kd = Some(match kd {
                None => k,
                Some(a) => (a + k)?,
            });
        }
        let w = self.alpha * sigmoid_rampup(ctx.epoch, self.rampup_epochs);
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(branches[0], batch)?);
        t.push("loss_branch_ce", branch_ce.expect("at least two branches"));
        t.push("loss_kd", (kd.expect("at least two branches") * w)?);
        t.note("kd_weight", &Tensor::new(w as f32, total.device())?);
        Ok(t)
    }

    /// Logits only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::fixtures::{get, labelled_batch, load, rel_err, scalar};
    use candle_core::{DType, Device, Var};
    use kd_models::{AuxOutput, ModelOutput};

    /// Every term and the gradient of their sum for each branch's logits, through the
    /// undetached targets, equal the OKDDip code's CL-ILR loss computed by PyTorch in float64
    /// (`tools/fixtures/make_cl_ilr_fixtures.py`): four branches early in the ramp-up, three on
    /// 100 classes after it, two at T = 2, α = 0.5; kd computes in f32.
    #[test]
    fn the_okddip_codes_loss_in_pytorch() {
        let f = load("cl_ilr");
        for i in 0..3 {
            let at = |k: &str| get(&f, &format!("cl_ilr.{i}.{k}"));
            let p: Vec<f64> = at("params").to_vec1().unwrap();
            let logits = Var::from_tensor(&at("logits").to_dtype(DType::F32).unwrap()).unwrap();
            let method = ClIlr {
                ce: CrossEntropy { smoothing: 0.0 },
                temperature: p[0],
                alpha: p[1],
                rampup_epochs: p[2],
            };
            let m = logits.dim(0).unwrap();
            let branch = |j: usize| logits.as_tensor().get(j).unwrap();
            let student = ModelOutput {
                logits: branch(0),
                feats: vec![],
                pooled: branch(0),
                preact: vec![],
                aux: vec![],
                branches: (1..m)
                    .map(|j| AuxOutput {
                        logits: branch(j),
                        pooled: branch(j),
                    })
                    .collect(),
            };
            let batch = labelled_batch(at("labels").to_dtype(DType::U32).unwrap());
            let ctx = StepContext {
                epoch: p[3] as usize,
                step: 0,
                total_steps: 1,
                epochs: 300,
            };
            let terms = method
                .loss(&ctx, &batch, &Outputs::student(&student))
                .unwrap();
            let names: Vec<&str> = terms.terms.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, ["loss_ce", "loss_branch_ce", "loss_kd"]);
            for (name, value) in &terms.terms {
                let (got, want) = (scalar(value), scalar(&at(name)));
                assert!(
                    (got - want).abs() <= 2e-5 * want.abs() + 1e-7,
                    "case {i} {name}: {got} vs {want}"
                );
            }
            let grads = terms.total().unwrap().backward().unwrap();
            let e = rel_err(grads.get(logits.as_tensor()).unwrap(), &at("grad_logits"));
            assert!(e < 5e-5, "case {i} grad_logits: relative error {e:.2e}");
        }
    }

    /// A plain student is refused with what it lacks.
    #[test]
    fn refuses_a_student_without_branches() {
        let dev = Device::Cpu;
        let z = Tensor::new(&[[1f32, 0.0, -1.0], [0.5, 0.2, 0.1]], &dev).unwrap();
        let student = ModelOutput {
            logits: z.clone(),
            feats: vec![],
            pooled: z,
            preact: vec![],
            aux: vec![],
            branches: vec![],
        };
        let method = ClIlr {
            ce: CrossEntropy { smoothing: 0.0 },
            temperature: 3.0,
            alpha: 1.0,
            rampup_epochs: 80.0,
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
