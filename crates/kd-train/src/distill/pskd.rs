//! Progressive self-knowledge distillation, PS-KD (Kim et al. 2021, "Self-Knowledge
//! Distillation with Progressive Refinement of Targets"): the network's own prediction for an
//! image in the previous epoch softens that image's target, more as training goes on:
//! target = (1 − α_t)·one-hot + α_t·p_prev, α_t = α_T·(epoch + 1)/epochs (epochs from 0).
//! Cross-entropy is linear in the target, so the loss is logged as its two parts:
//! `loss_ce` = (1 − α_t)·CE(y) and `loss_pskd` = α_t·H(p_prev, p).
//!
//! The predictions live in a (training images × classes) f32 memory on the device, read and
//! overwritten for the batch's images at each step (as the authors' code does, from the training
//! forward pass); it starts as the one-hot labels and is part of the checkpoint, so a resumed run
//! continues bit for bit.
use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{bail, DType, Result, Tensor, D};
use candle_nn::ops::{log_softmax, softmax};
use kd_data::Batch;

use super::{Distiller, LossTerms, Outputs, RunInfo, StepContext};

/// The checkpoint key of the prediction memory.
const MEMORY_KEY: &str = "pskd.predictions";

/// PS-KD.
#[derive(Debug)]
pub struct Pskd {
    /// α_T, the weight of the past predictions in the last epoch (0.8 in the paper).
    pub alpha: f64,
    /// The last prediction for each training image, (N, K) f32; `None` before
    /// [`Distiller::prepare`].
    memory: Mutex<Option<Tensor>>,
}

impl Pskd {
    /// PS-KD with final weight `alpha`.
    pub fn new(alpha: f64) -> Self {
        Pskd {
            alpha,
            memory: Mutex::new(None),
        }
    }

    /// α_t at `epoch` (0-based) of `epochs`.
    pub fn alpha_at(&self, epoch: usize, epochs: usize) -> f64 {
        self.alpha * super::linear_ramp(epoch, epochs as f64)
    }
}

/// Rows `idx` of `memory` as a (B, K) index tensor for `scatter_set` along dim 0.
fn row_index(idx: &Tensor, k: usize) -> Result<Tensor> {
    let b = idx.dim(0)?;
    idx.unsqueeze(1)?.broadcast_as((b, k))?.contiguous()
}

impl Distiller for Pskd {
    fn name(&self) -> &'static str {
        "pskd"
    }

    fn prepare(&self, run: &RunInfo) -> Result<()> {
        // One-hot start: at epoch 0 the target is the label whatever α_0.
        let mut m = self.memory.lock().expect("pskd memory lock");
        *m = Some(Tensor::zeros(
            (run.train_size, run.num_classes),
            DType::F32,
            &run.device,
        )?);
        Ok(())
    }

    fn state(&self) -> Result<HashMap<String, Tensor>> {
        let m = self.memory.lock().expect("pskd memory lock");
        let mut state = HashMap::new();
        if let Some(t) = &*m {
            state.insert(MEMORY_KEY.to_string(), t.copy()?);
        }
        Ok(state)
    }

    fn load_state(&self, mut state: HashMap<String, Tensor>) -> Result<()> {
        let mut m = self.memory.lock().expect("pskd memory lock");
        let Some(current) = &*m else {
            bail!("pskd: load_state before prepare");
        };
        let Some(saved) = state.remove(MEMORY_KEY) else {
            bail!("pskd: the checkpoint has no {MEMORY_KEY}");
        };
        if saved.dims() != current.dims() || saved.dtype() != DType::F32 {
            bail!(
                "pskd: the checkpoint's {MEMORY_KEY} is {:?} {:?}, expected {:?} F32 (training images × classes)",
                saved.dims(),
                saved.dtype(),
                current.dims()
            );
        }
        *m = Some(saved.to_device(current.device())?);
        Ok(())
    }

    fn loss(&self, ctx: &StepContext, batch: &Batch, out: &Outputs) -> Result<LossTerms> {
        if batch.mix.is_some() {
            bail!("pskd keeps one prediction per image and cannot follow mixed images: turn mixup off");
        }
        let logits = &out.student.logits;
        let (b, k) = logits.dims2()?;
        let mut guard = self.memory.lock().expect("pskd memory lock");
        let Some(memory) = guard.as_mut() else {
            bail!("pskd: prepare(run) must be called before training");
        };
        if memory.dim(1)? != k {
            bail!(
                "pskd: the memory holds {} classes, the logits {k}",
                memory.dim(1)?
            );
        }
        let n = memory.dim(0)?;
        if let Some(&bad) = batch.indices.iter().find(|&&i| i >= n) {
            bail!("pskd: image index {bad} outside the {n} training images given to prepare");
        }
        if batch.indices.len() != b {
            bail!("pskd: {} indices for a batch of {b}", batch.indices.len());
        }
        let idx: Vec<u32> = batch.indices.iter().map(|&i| i as u32).collect();
        let idx = Tensor::new(idx.as_slice(), memory.device())?;
        let one_hot = kd_losses::one_hot(&batch.labels, k, DType::F32)?;
        // The first visit of an image finds zeros: its past prediction is its label.
        let stored = memory.index_select(&idx, 0)?;
        let seen = stored.sum_keepdim(D::Minus1)?.gt(0.0)?;
        let past = seen.broadcast_as((b, k))?.where_cond(&stored, &one_hot)?;
        let logp = log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        let alpha = self.alpha_at(ctx.epoch, ctx.epochs);
        let ce = (one_hot * &logp)?.sum(D::Minus1)?.neg()?.mean_all()?;
        let soft = (past * &logp)?.sum(D::Minus1)?.neg()?.mean_all()?;
        let now = softmax(&logits.detach().to_dtype(DType::F32)?, D::Minus1)?;
        memory.scatter_set(&row_index(&idx, k)?, &now, 0)?;
        let mut t = LossTerms::default();
        t.push("loss_ce", (ce * (1.0 - alpha))?);
        t.push("loss_pskd", (soft * alpha)?);
        Ok(t)
    }

    /// Logits, pooled embeddings or pre-activations only: no stage features.
    fn needs_features(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::fixtures::labelled_batch;
    use candle_core::Device;
    use kd_models::ModelOutput;

    fn batch(labels: &[u32], indices: &[usize]) -> Batch {
        Batch {
            indices: indices.to_vec(),
            ..labelled_batch(Tensor::new(labels, &Device::Cpu).unwrap())
        }
    }

    fn output(logits: &[[f32; 3]]) -> ModelOutput {
        let flat: Vec<f32> = logits.iter().flatten().copied().collect();
        let logits = Tensor::from_vec(flat, (logits.len(), 3), &Device::Cpu).unwrap();
        ModelOutput {
            logits: logits.clone(),
            feats: vec![],
            pooled: logits,
            preact: vec![],
            aux: vec![],
            branches: vec![],
            gated: None,
        }
    }

    fn ctx(epoch: usize, epochs: usize) -> StepContext {
        StepContext {
            epoch,
            step: 0,
            total_steps: 10,
            epochs,
        }
    }

    fn total(t: &LossTerms) -> f64 {
        t.total().unwrap().to_scalar::<f32>().unwrap() as f64
    }

    fn log_softmax64(z: &[f32; 3]) -> [f64; 3] {
        let m = z.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let s: f64 = z.iter().map(|&x| (x as f64 - m).exp()).sum();
        z.map(|x| x as f64 - m - s.ln())
    }

    #[test]
    fn alpha_grows_linearly_to_its_final_value() {
        let p = Pskd::new(0.8);
        assert!((p.alpha_at(0, 4) - 0.2).abs() < 1e-12);
        assert!((p.alpha_at(3, 4) - 0.8).abs() < 1e-12);
        assert!((p.alpha_at(9, 4) - 0.8).abs() < 1e-12);
    }

    #[test]
    fn targets_mix_the_label_with_the_previous_prediction() {
        let p = Pskd::new(0.8);
        p.prepare(&RunInfo::cpu(5, 3)).unwrap();
        let first = [[1.0f32, 2.0, 0.5], [0.0, -1.0, 3.0]];
        let b = batch(&[1, 2], &[4, 0]);
        // First visit: nothing remembered, the target is the label: plain cross-entropy.
        let t = p
            .loss(&ctx(0, 4), &b, &Outputs::student(&output(&first)))
            .unwrap();
        let ce: f64 = -(log_softmax64(&first[0])[1] + log_softmax64(&first[1])[2]) / 2.0;
        assert!((total(&t) - ce).abs() < 1e-6, "{} vs {ce}", total(&t));
        // The memory now holds these predictions in rows 4 and 0, and nothing else.
        let mem = p.state().unwrap()[MEMORY_KEY].to_vec2::<f32>().unwrap();
        for (row, z) in [(4, first[0]), (0, first[1])] {
            let want = log_softmax64(&z).map(f64::exp);
            for c in 0..3 {
                assert!((mem[row][c] as f64 - want[c]).abs() < 1e-6);
            }
        }
        assert!(mem[1..4].iter().flatten().all(|&v| v == 0.0));
        // Second visit (epoch 2 of 4, α = 0.6): target = 0.4·one-hot + 0.6·previous prediction.
        let second = [[0.3f32, 0.1, -0.2], [2.0, 0.0, 1.0]];
        let t = p
            .loss(&ctx(2, 4), &b, &Outputs::student(&output(&second)))
            .unwrap();
        let names: Vec<&str> = t.terms.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["loss_ce", "loss_pskd"]);
        let mut want = 0.0;
        for (k, label) in [(0usize, 1usize), (1, 2)] {
            let prev = log_softmax64(&first[k]).map(f64::exp);
            let lq = log_softmax64(&second[k]);
            for c in 0..3 {
                let y = if c == label { 1.0 } else { 0.0 };
                want -= (0.4 * y + 0.6 * prev[c]) * lq[c] / 2.0;
            }
        }
        assert!((total(&t) - want).abs() < 1e-6, "{} vs {want}", total(&t));
    }

    #[test]
    fn refuses_what_it_cannot_follow() {
        let p = Pskd::new(0.8);
        let out = output(&[[1.0, 2.0, 0.5]]);
        let b = batch(&[1], &[0]);
        let err = p.loss(&ctx(0, 2), &b, &Outputs::student(&out)).unwrap_err();
        assert!(err.to_string().contains("prepare"), "{err}");
        p.prepare(&RunInfo::cpu(2, 3)).unwrap();
        let err = p
            .loss(&ctx(0, 2), &batch(&[1], &[7]), &Outputs::student(&out))
            .unwrap_err();
        assert!(err.to_string().contains("index 7"), "{err}");
        let mut mixed = batch(&[1], &[0]);
        mixed.mix = Some((Tensor::new(&[2u32], &Device::Cpu).unwrap(), 0.5));
        let err = p
            .loss(&ctx(0, 2), &mixed, &Outputs::student(&out))
            .unwrap_err();
        assert!(err.to_string().contains("mixup"), "{err}");
        let wrong = HashMap::from([(
            MEMORY_KEY.to_string(),
            Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
        )]);
        let err = p.load_state(wrong).unwrap_err();
        assert!(err.to_string().contains("[3, 3]"), "{err}");
        assert!(p.load_state(HashMap::new()).is_err());
    }
}
