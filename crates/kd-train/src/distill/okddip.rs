//! OKDDip, online knowledge distillation with diverse peers (Chen, Mei, Wang, Feng & Chen
//! 2020): the student grows branches of its last stage on its shared trunk
//! ([`kd_models::ResNetConfig::branches`]); the extra ones are auxiliary peers, the network's
//! own last stage is the group leader, the deployed network. Two levels of distillation:
//! each peer learns from its own attention-weighted mix of the peers' logits (weights from
//! shared query and key projections of the peers' pooled embeddings, so each peer gets a
//! different target), and the leader learns from the peers' mean logits.
//!
//! As the authors' code computes it (`train_GL.py`, `utils.py`'s `KL_Loss`,
//! `models/model_cifar/resnet_GL.py`): every peer and the leader take the cross-entropy; a
//! soft term is `T²·Σ (p + 1e-7)(log(p + 1e-7) − log q)` averaged over the batch, `p` the
//! softened target, which is **not** cut from the graph (their `KL_Loss` keeps its gradient),
//! `q` the softened logits; both levels weigh `α·exp(−5(1 − e/L)²)` at epoch `e` (0-based) of
//! a ramp-up over `L` epochs, 1 after it. The peers and the projections train only.
use candle_core::{Result, Tensor, D};
use candle_nn::ops::{log_softmax, softmax};
use candle_nn::{Linear, Module, VarBuilder};
use kd_data::Batch;

use super::none::CrossEntropy;
use super::one::sigmoid_rampup;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// The authors' smoothing of a softened target (`F.softmax(...) + 10**(-7)`).
const TARGET_EPS: f64 = 1e-7;

/// `T²·KL(p + ε ‖ q)` averaged over the batch, `p` the softened `target` with its graph and
/// `q` the softened `logits`, as the authors' `KL_Loss`.
pub(super) fn kl_with_target_grad(logits: &Tensor, target: &Tensor, t: f64) -> Result<Tensor> {
    let p = (softmax(&(target / t)?, D::Minus1)? + TARGET_EPS)?;
    let log_q = log_softmax(&(logits / t)?, D::Minus1)?;
    let kl = (&p * (p.log()? - log_q)?)?.sum(D::Minus1)?;
    kl.mean_all()? * (t * t)
}

/// The peers' attention: bias-free query and key projections of each peer's pooled embedding,
/// shared by the peers.
pub struct PeerAttention {
    query: Linear,
    key: Linear,
}

impl PeerAttention {
    /// Projections from `channels` (the last stage's width) to `channels / factor`, their
    /// variables under `vb` (`query.fc.weight`, `key.fc.weight`).
    pub fn new(channels: usize, factor: usize, vb: VarBuilder) -> Result<Self> {
        let dim = channels / factor;
        Ok(PeerAttention {
            query: candle_nn::linear_no_bias(channels, dim, vb.pp("query").pp("fc"))?,
            key: candle_nn::linear_no_bias(channels, dim, vb.pp("key").pp("fc"))?,
        })
    }

    /// Projections of given (dim, C) weights (tests, fixtures).
    pub fn from_tensors(query: Tensor, key: Tensor) -> Self {
        PeerAttention {
            query: Linear::new(query, None),
            key: Linear::new(key, None),
        }
    }

    /// The (B, n, n) attention of `n` peers' (B, C) pooled embeddings: row i is peer i's
    /// softmax over the peers (itself included) of its query against their keys.
    pub fn weights(&self, pooled: &[&Tensor]) -> Result<Tensor> {
        let project = |proj: &Linear| -> Result<Tensor> {
            let each = pooled
                .iter()
                .map(|p| proj.forward(p)?.unsqueeze(1))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&each, 1)
        };
        let (q, k) = (project(&self.query)?, project(&self.key)?);
        let energy = q.matmul(&k.transpose(1, 2)?.contiguous()?)?;
        softmax(&energy, D::Minus1)
    }
}

/// OKDDip.
pub struct Okddip {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Temperature (3).
    pub temperature: f64,
    /// Weight α of both distillation levels (1).
    pub alpha: f64,
    /// Epochs of the ramp-up of their weight (80; 0: none).
    pub rampup_epochs: f64,
    /// The peers' attention.
    pub attention: PeerAttention,
}

impl Distiller for Okddip {
    fn name(&self) -> &'static str {
        "okddip"
    }

    fn loss(&self, ctx: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let student = out.student;
        if student.branches.len() < 2 {
            candle_core::bail!(
                "okddip needs a student built with at least three branches (a leader and two peers; ResNetConfig::branches), got {}",
                student.branches.len() + 1
            );
        }
        let peers: Vec<&Tensor> = student.branches.iter().map(|b| &b.logits).collect();
        let pooled: Vec<&Tensor> = student.branches.iter().map(|b| &b.pooled).collect();
        let attention = self.attention.weights(&pooled)?;
        // (B, n, K): the peers' logits stacked, so that row i of attention · stack is peer i's
        // target, Σ_j a[i, j]·z_j.
        let stack = Tensor::stack(&peers, 1)?;
        let targets = attention.matmul(&stack)?;
        let t = self.temperature;
        let mut peer_ce = None;
        let mut peer_kd = None;
        for (i, z) in peers.iter().enumerate() {
            let ce = self.ce.of(z, batch)?;
            let kd = kl_with_target_grad(z, &targets.narrow(1, i, 1)?.squeeze(1)?, t)?;
            peer_ce = Some(match peer_ce {
                None => ce,
                Some(a) => (a + ce)?,
            });
            peer_kd = Some(match peer_kd {
                None => kd,
                Some(a) => (a + kd)?,
            });
        }
        let peer_mean = stack.mean(1)?;
        let w = self.alpha * sigmoid_rampup(ctx.epoch, self.rampup_epochs);
        let mut terms = LossTerms::default();
        terms.push("loss_ce", self.ce.of(&student.logits, batch)?);
        terms.push("loss_branch_ce", peer_ce.expect("at least two peers"));
        terms.push("loss_peer_kd", (peer_kd.expect("at least two peers") * w)?);
        terms.push(
            "loss_leader_kd",
            (kl_with_target_grad(&student.logits, &peer_mean, t)? * w)?,
        );
        terms.note(
            "kd_weight",
            &Tensor::new(w as f32, student.logits.device())?,
        );
        Ok(terms)
    }

    /// Logits and the branches' pooled embeddings only: no stage features.
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

    /// Every term and the gradients of their sum for the leader's and the peers' logits, the
    /// peers' pooled embeddings and both projections equal the authors' loss computed by
    /// PyTorch in float64 (`tools/fixtures/make_okddip_fixtures.py`), the targets' own
    /// gradients included: their defaults early in the ramp-up, four peers on 100 classes after
    /// it, two peers at T = 2, α = 0.5 without one; kd computes in f32.
    #[test]
    fn the_authors_loss_in_pytorch() {
        let f = load("okddip");
        let dev = Device::Cpu;
        for i in 0..3 {
            let at = |k: &str| get(&f, &format!("okddip.{i}.{k}"));
            let var = |k: &str| Var::from_tensor(&at(k).to_dtype(DType::F32).unwrap()).unwrap();
            let p: Vec<f64> = at("params").to_vec1().unwrap();
            let (logits, pooled, query, key) =
                (var("logits"), var("pooled"), var("query"), var("key"));
            let method = Okddip {
                ce: CrossEntropy { smoothing: 0.0 },
                temperature: p[0],
                alpha: p[1],
                rampup_epochs: p[2],
                attention: PeerAttention::from_tensors(
                    query.as_tensor().clone(),
                    key.as_tensor().clone(),
                ),
            };
            let m = logits.dim(0).unwrap();
            let student = ModelOutput {
                logits: logits.as_tensor().get(0).unwrap(),
                feats: vec![],
                pooled: Tensor::zeros(1, DType::F32, &dev).unwrap(),
                preact: vec![],
                aux: vec![],
                branches: (1..m)
                    .map(|j| AuxOutput {
                        logits: logits.as_tensor().get(j).unwrap(),
                        pooled: pooled.as_tensor().get(j - 1).unwrap(),
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
            assert_eq!(
                names,
                [
                    "loss_ce",
                    "loss_branch_ce",
                    "loss_peer_kd",
                    "loss_leader_kd"
                ]
            );
            for (name, value) in &terms.terms {
                let (got, want) = (scalar(value), scalar(&at(name)));
                assert!(
                    (got - want).abs() <= 2e-5 * want.abs() + 1e-7,
                    "case {i} {name}: {got} vs {want}"
                );
            }
            let grads = terms.total().unwrap().backward().unwrap();
            for (leaf, key) in [
                (&logits, "logits"),
                (&pooled, "pooled"),
                (&query, "query"),
                (&key, "key"),
            ] {
                let grad = grads
                    .get(leaf.as_tensor())
                    .unwrap_or_else(|| panic!("case {i}: no gradient for {key}"));
                let e = rel_err(grad, &at(&format!("grad_{key}")));
                assert!(e < 5e-5, "case {i} grad_{key}: relative error {e:.2e}");
            }
        }
    }

    /// Each peer's attention row sums to 1, and peers with the same embedding attend to each
    /// other equally whatever the projections.
    #[test]
    fn attention_rows_are_distributions() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.0, 0.5, -1.0], [0.3, 0.0, 1.0, 2.0]], &dev).unwrap();
        let y = Tensor::new(&[[0f32, 1.0, 1.0, 0.0], [1.0, 1.0, -1.0, 0.5]], &dev).unwrap();
        let att = PeerAttention::from_tensors(
            Tensor::new(&[[0.5f32, -0.2, 0.1, 0.3], [0.0, 0.4, -0.3, 0.2]], &dev).unwrap(),
            Tensor::new(&[[0.1f32, 0.2, 0.3, 0.4], [-0.4, 0.3, 0.2, -0.1]], &dev).unwrap(),
        );
        let a = att.weights(&[&x, &x, &y]).unwrap();
        assert_eq!(a.dims(), &[2, 3, 3]);
        let rows: Vec<Vec<Vec<f32>>> = a.to_vec3().unwrap();
        for image in &rows {
            for row in image {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{row:?}");
                assert_eq!(row[0], row[1], "{row:?}");
            }
        }
    }

    /// A group of a leader and one peer is refused: the peers' attention needs two.
    #[test]
    fn refuses_fewer_than_two_peers() {
        let dev = Device::Cpu;
        let z = Tensor::new(&[[1f32, 0.0, -1.0], [0.5, 0.2, 0.1]], &dev).unwrap();
        let student = ModelOutput {
            logits: z.clone(),
            feats: vec![],
            pooled: z.clone(),
            preact: vec![],
            aux: vec![],
            branches: vec![AuxOutput {
                logits: z.clone(),
                pooled: z,
            }],
        };
        let method = Okddip {
            ce: CrossEntropy { smoothing: 0.0 },
            temperature: 3.0,
            alpha: 1.0,
            rampup_epochs: 80.0,
            attention: PeerAttention::from_tensors(
                Tensor::zeros((1, 3), DType::F32, &dev).unwrap(),
                Tensor::zeros((1, 3), DType::F32, &dev).unwrap(),
            ),
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
        assert!(err.contains("at least three branches"), "{err}");
    }
}
