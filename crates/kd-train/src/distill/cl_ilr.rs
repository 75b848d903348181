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
use super::{
    branch_logits, sigmoid_rampup, smoothed_kl, sum_levels, Distiller, LossTerms, Outputs,
    StepContext,
};

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
        let branches = branch_logits("cl_ilr", out.student, 2)?;
        let others = (branches.len() - 1) as f64;
        let total = Tensor::stack(&branches, 0)?.sum(0)?;
        let branch_ce = sum_levels("cl_ilr", branches[1..].iter().map(|z| self.ce.of(z, batch)))?;
        // Each branch against the mean of the other branches' logits.
        let kd = sum_levels(
            "cl_ilr",
            branches
                .iter()
                .map(|z| smoothed_kl(z, &((&total - *z)? / others)?, self.temperature)),
        )?;
        let w = self.alpha * sigmoid_rampup(ctx.epoch, self.rampup_epochs);
        let mut t = LossTerms::default();
        t.push("loss_ce", self.ce.of(branches[0], batch)?);
        t.push("loss_branch_ce", branch_ce);
        t.push("loss_kd", (kd * w)?);
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
    use crate::distill::fixtures::{
        assert_terms, get, load, refusal, rel_err, terms_at, with_branches,
    };
    use candle_core::{DType, Device, Var};

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
            let branches: Vec<Tensor> =
                (0..m).map(|j| logits.as_tensor().get(j).unwrap()).collect();
            let student = with_branches(branches.clone(), branches);
            let labels = at("labels").to_dtype(DType::U32).unwrap();
            let terms = terms_at(&method, p[3] as usize, labels, &student);
            assert_terms(
                &terms,
                &["loss_ce", "loss_branch_ce", "loss_kd"],
                at,
                &format!("case {i}"),
            );
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
        let student = with_branches(vec![z.clone()], vec![z]);
        let method = ClIlr {
            ce: CrossEntropy { smoothing: 0.0 },
            temperature: 3.0,
            alpha: 1.0,
            rampup_epochs: 80.0,
        };
        let err = refusal(&method, &student);
        assert!(err.contains("branches"), "{err}");
    }
}
