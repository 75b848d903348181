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
use candle_nn::ops::softmax;
use candle_nn::{Linear, Module, VarBuilder};
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{
    branch_logits, sigmoid_rampup, smoothed_kl, sum_levels, Distiller, LossTerms, Outputs,
    StepContext,
};

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
        // The leader (the network's own branch), then at least two peers.
        let peers = &branch_logits("okddip", student, 3)?[1..];
        let pooled: Vec<&Tensor> = student.branches.iter().map(|b| &b.pooled).collect();
        let attention = self.attention.weights(&pooled)?;
        // (B, n, K): the peers' logits stacked, so that row i of attention · stack is peer i's
        // target, Σ_j a[i, j]·z_j.
        let stack = Tensor::stack(peers, 1)?;
        let targets = attention.matmul(&stack)?;
        let t = self.temperature;
        let peer_ce = sum_levels("okddip", peers.iter().map(|z| self.ce.of(z, batch)))?;
        let peer_kd = sum_levels(
            "okddip",
            peers
                .iter()
                .enumerate()
                .map(|(i, z)| smoothed_kl(z, &targets.narrow(1, i, 1)?.squeeze(1)?, t)),
        )?;
        let peer_mean = stack.mean(1)?;
        let w = self.alpha * sigmoid_rampup(ctx.epoch, self.rampup_epochs);
        let mut terms = LossTerms::default();
        terms.push("loss_ce", self.ce.of(&student.logits, batch)?);
        terms.push("loss_branch_ce", peer_ce);
        terms.push("loss_peer_kd", (peer_kd * w)?);
        terms.push(
            "loss_leader_kd",
            (smoothed_kl(&student.logits, &peer_mean, t)? * w)?,
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
    use crate::distill::fixtures::{
        assert_terms, get, load, refusal, rel_err, terms_at, with_branches,
    };
    use candle_core::{DType, Device, Var};

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
            // The leader's own pooled embedding is not read.
            let student = with_branches(
                (0..m).map(|j| logits.as_tensor().get(j).unwrap()).collect(),
                std::iter::once(Tensor::zeros(1, DType::F32, &dev).unwrap())
                    .chain((1..m).map(|j| pooled.as_tensor().get(j - 1).unwrap()))
                    .collect(),
            );
            let labels = at("labels").to_dtype(DType::U32).unwrap();
            let terms = terms_at(&method, p[3] as usize, labels, &student);
            assert_terms(
                &terms,
                &[
                    "loss_ce",
                    "loss_branch_ce",
                    "loss_peer_kd",
                    "loss_leader_kd",
                ],
                at,
                &format!("case {i}"),
            );
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
        let student = with_branches(vec![z.clone(), z.clone()], vec![z.clone(), z]);
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
        let err = refusal(&method, &student);
        assert!(err.contains("at least 3 branches"), "{err}");
    }
}
