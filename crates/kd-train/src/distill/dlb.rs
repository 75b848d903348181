//! Self-distillation from the last mini-batch, DLB (Shen, Xu, Yang, Li & Guo, CVPR 2022), as
//! the authors' code computes it (Meta-knowledge-Lab/DLB, `dlb.py`): every image comes with two
//! augmentations ([`kd_data::Pairing::SecondView`]). Step t trains on batch t's first views and,
//! alongside, replays batch t − 1 under its second views; the network's own prediction of batch
//! t − 1's first views at step t − 1 (detached) teaches the replay:
//!
//! - `loss_ce` = cross-entropy over both, as one batch: (B·CE(now) + B′·CE(replay)) / (B + B′);
//! - `loss_dlb` = α·T²·KL(softmax(z_{t−1}/T) ‖ softmax(z_replay/T)), batch mean.
//!
//! The very first step has nothing to replay: CE alone (and `loss_dlb` = 0). The replay runs
//! across epochs, as in the code (an epoch's first step replays the last batch of the one
//! before). [`Distiller::prepare_batch`] swaps the previous batch's second views in as the
//! step's paired images; the views, labels and logits carried to the next step are part of the
//! checkpoint, so a resumed run continues bit for bit. Mixup is refused (two images per sample).
use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{bail, DType, Result, Tensor};
use kd_data::Batch;

use super::none::CrossEntropy;
use super::{Distiller, LossTerms, Outputs, StepContext};

/// Checkpoint keys of what one step carries to the next.
const VIEWS_KEY: &str = "dlb.views";
const LABELS_KEY: &str = "dlb.labels";
const LOGITS_KEY: &str = "dlb.logits";

/// What one step leaves for the next.
#[derive(Debug, Default)]
struct Carried {
    /// The current batch's second views and labels, replayed at the next step.
    held: Option<(Tensor, Tensor)>,
    /// The labels of the batch this step replays (its views are the step's paired images).
    replay_labels: Option<Tensor>,
    /// The network's logits on the last step's batch (first views), detached: the replay's
    /// target.
    last_logits: Option<Tensor>,
}

/// DLB.
#[derive(Debug)]
pub struct Dlb {
    /// The supervised term.
    pub ce: CrossEntropy,
    /// Weight α of the consistency term.
    pub alpha: f64,
    /// Temperature.
    pub temperature: f64,
    carried: Mutex<Carried>,
}

impl Dlb {
    /// DLB with weight `alpha` at temperature `temperature`, nothing carried yet.
    pub fn new(ce: CrossEntropy, alpha: f64, temperature: f64) -> Self {
        Dlb {
            ce,
            alpha,
            temperature,
            carried: Mutex::new(Carried::default()),
        }
    }
}

impl Distiller for Dlb {
    fn name(&self) -> &'static str {
        "dlb"
    }

    fn prepare_batch(&self, mut batch: Batch) -> Result<Batch> {
        let Some(views) = batch.paired.take() else {
            bail!("dlb needs each image's second view (the loader's Pairing::SecondView)");
        };
        let mut c = self.carried.lock().expect("dlb lock");
        match c.held.replace((views, batch.labels.clone())) {
            Some((previous, labels)) => {
                batch.paired = Some(previous);
                c.replay_labels = Some(labels);
            }
            None => c.replay_labels = None,
        }
        Ok(batch)
    }

    fn loss(&self, _: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        let logits = &out.student.logits;
        let now = self.ce.of(logits, batch)?;
        let mut c = self.carried.lock().expect("dlb lock");
        // Without prepare_batch's replay (the first step; a bench or check calling the loss
        // alone), CE on the batch only.
        let (ce, consistency) = match (out.paired, &c.replay_labels, &c.last_logits) {
            (Some(replay), Some(labels), Some(last)) => {
                let (b, b_replay) = (logits.dim(0)? as f64, replay.logits.dim(0)? as f64);
                let replayed = kd_losses::cross_entropy(&replay.logits, labels, self.ce.smoothing)?;
                let ce = (((now * b)? + (replayed * b_replay)?)? / (b + b_replay))?;
                let kd = kd_losses::kd_loss(&replay.logits, last, self.temperature)?;
                (ce, (kd * self.alpha)?)
            }
            _ => (now, Tensor::zeros((), DType::F32, logits.device())?),
        };
        c.last_logits = Some(logits.detach());
        let mut t = LossTerms::default();
        t.push("loss_ce", ce);
        t.push("loss_dlb", consistency);
        Ok(t)
    }

    fn state(&self) -> Result<HashMap<String, Tensor>> {
        let c = self.carried.lock().expect("dlb lock");
        let mut state = HashMap::new();
        if let (Some((views, labels)), Some(logits)) = (&c.held, &c.last_logits) {
            state.insert(VIEWS_KEY.to_string(), views.copy()?);
            state.insert(LABELS_KEY.to_string(), labels.to_dtype(DType::U32)?);
            state.insert(LOGITS_KEY.to_string(), logits.copy()?);
        }
        Ok(state)
    }

    fn load_state(&self, mut state: HashMap<String, Tensor>) -> Result<()> {
        let mut c = self.carried.lock().expect("dlb lock");
        let keys = [VIEWS_KEY, LABELS_KEY, LOGITS_KEY];
        let present = keys.iter().filter(|k| state.contains_key(**k)).count();
        if present == 0 {
            *c = Carried::default();
            return Ok(());
        }
        let (Some(views), Some(labels), Some(logits)) = (
            state.remove(VIEWS_KEY),
            state.remove(LABELS_KEY),
            state.remove(LOGITS_KEY),
        ) else {
            bail!("dlb: the checkpoint holds {present} of {VIEWS_KEY}, {LABELS_KEY} and {LOGITS_KEY}; expected all or none");
        };
        let b = labels.dim(0)?;
        if views.rank() != 4 || views.dim(0)? != b || logits.rank() != 2 || logits.dim(0)? != b {
            bail!(
                "dlb: the checkpoint's {VIEWS_KEY} {:?}, {LABELS_KEY} {:?} and {LOGITS_KEY} {:?} do not describe one batch (B×C×H×W, B, B×K)",
                views.dims(),
                labels.dims(),
                logits.dims()
            );
        }
        *c = Carried {
            held: Some((views, labels)),
            replay_labels: None,
            last_logits: Some(logits),
        };
        Ok(())
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
        assert_terms, get, labelled_batch, load, rel_err, with_branches,
    };
    use candle_core::Var;

    /// One network's output of these logits alone.
    fn output(logits: &Tensor) -> kd_models::ModelOutput {
        with_branches(vec![logits.clone()], vec![logits.clone()])
    }

    /// A batch of `labels` whose second views are blank images.
    fn batch_of(labels: Tensor) -> Batch {
        let mut batch = labelled_batch(labels);
        batch.paired = Some(batch.images.zeros_like().unwrap());
        batch
    }

    /// Both terms, and the gradients for this batch's and the replay's logits, equal the
    /// authors' loss computed by PyTorch in float64 (`tools/fixtures/make_dlb_fixtures.py`):
    /// the paper's T = 3, α = 1; a short batch replayed after a full one on 100 classes; the
    /// other way round at T = 1. Step one is CE alone and leaves its logits as the replay's
    /// target; kd computes in f32.
    #[test]
    fn the_authors_loss_in_pytorch() {
        let f = load("dlb");
        for i in 0..3 {
            let at = |k: &str| get(&f, &format!("dlb.{i}.{k}"));
            let p: Vec<f64> = at("params").to_vec1().unwrap();
            let method = Dlb::new(CrossEntropy { smoothing: 0.0 }, p[1], p[0]);
            let f32_of = |k: &str| at(k).to_dtype(DType::F32).unwrap();
            let ctx = StepContext::one_step();
            // Step one: the replayed batch's own step, its logits the fixture's `last`.
            let first = batch_of(at("replay_labels").to_dtype(DType::U32).unwrap());
            let first = method.prepare_batch(first).unwrap();
            assert!(
                first.paired.is_none(),
                "nothing to replay at the first step"
            );
            let last = output(&f32_of("last"));
            let terms = method.loss(&ctx, &first, &Outputs::student(&last)).unwrap();
            assert_eq!(terms.terms[1].1.to_scalar::<f32>().unwrap(), 0.0);
            // Step two replays it.
            let second = batch_of(at("labels").to_dtype(DType::U32).unwrap());
            let second = method.prepare_batch(second).unwrap();
            assert_eq!(
                second.paired.as_ref().unwrap().dims(),
                first.images.dims(),
                "step two's paired images are step one's second views"
            );
            let (z, z_r) = (
                Var::from_tensor(&f32_of("logits")).unwrap(),
                Var::from_tensor(&f32_of("replay")).unwrap(),
            );
            let (now, replay) = (output(z.as_tensor()), output(z_r.as_tensor()));
            let out = Outputs {
                paired: Some(&replay),
                ..Outputs::student(&now)
            };
            let terms = method.loss(&ctx, &second, &out).unwrap();
            assert_terms(&terms, &["loss_ce", "loss_dlb"], at, &format!("case {i}"));
            let grads = terms.total().unwrap().backward().unwrap();
            for (var, key) in [(&z, "grad_logits"), (&z_r, "grad_replay")] {
                let e = rel_err(grads.get(var.as_tensor()).unwrap(), &at(key));
                assert!(e < 5e-5, "case {i} {key}: relative error {e:.2e}");
            }
        }
    }

    /// What a step carries to the next survives a checkpoint: a method restored from another's
    /// state replays the same views and labels against the same logits.
    #[test]
    fn the_carried_batch_is_checkpointed() {
        let a = Dlb::new(CrossEntropy { smoothing: 0.0 }, 1.0, 3.0);
        let labels = Tensor::new(&[1u32, 2], &candle_core::Device::Cpu).unwrap();
        let mut batch = batch_of(labels.clone());
        batch.paired = Some((batch.images.ones_like().unwrap() * 0.5).unwrap());
        let batch = a.prepare_batch(batch).unwrap();
        let z = Tensor::new(
            &[[1f32, 0.0, -1.0], [0.5, 0.2, 0.1]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        a.loss(
            &StepContext::one_step(),
            &batch,
            &Outputs::student(&output(&z)),
        )
        .unwrap();
        let state = a.state().unwrap();
        assert_eq!(state.len(), 3);
        let b = Dlb::new(CrossEntropy { smoothing: 0.0 }, 1.0, 3.0);
        b.load_state(state).unwrap();
        let next = |m: &Dlb| {
            m.prepare_batch(batch_of(labels.clone()))
                .unwrap()
                .paired
                .unwrap()
        };
        assert_eq!(
            next(&a).flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            next(&b).flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // A partial state is refused by name.
        let mut partial = a.state().unwrap();
        partial.remove(LOGITS_KEY);
        let err = b.load_state(partial).unwrap_err().to_string();
        assert!(err.contains("dlb.logits"), "{err}");
    }
}
