//! A frozen teacher: constant weights, always evaluated in eval mode, outputs detached, and its
//! own input normalisation. The type, not discipline, keeps gradients out of it.
use std::path::Path;

use candle_core::{Device, Result as CResult, Tensor};

use crate::checkpoint::load_frozen;
use crate::import::TeacherMeta;
use crate::resnet::{ModelOutput, ResNet};
use crate::Result;

/// A pretrained network used only for inference.
#[derive(Debug)]
pub struct Teacher {
    model: ResNet,
    meta: TeacherMeta,
    /// Whether [`Teacher::forward`] returns the pre-ReLU stage outputs (OFD and AB compare
    /// them): set through a shared reference by the method that needs them.
    keep_preact: std::sync::atomic::AtomicBool,
}

impl Clone for Teacher {
    fn clone(&self) -> Self {
        Teacher {
            model: self.model.clone(),
            meta: self.meta.clone(),
            keep_preact: self
                .keep_preact
                .load(std::sync::atomic::Ordering::Relaxed)
                .into(),
        }
    }
}

impl Teacher {
    /// Loads `weights` (safetensors) with its JSON sidecar.
    pub fn load(weights: &Path, device: &Device) -> Result<Self> {
        let meta = TeacherMeta::load(weights)?;
        let model = load_frozen(&meta.config(), weights, device)?;
        Ok(Teacher {
            model,
            meta,
            keep_preact: false.into(),
        })
    }

    /// Its metadata (architecture, classes, normalisation).
    pub fn meta(&self) -> &TeacherMeta {
        &self.meta
    }

    /// Runs the network in `dtype` (f32, or bf16 for mixed precision); outputs stay f32.
    pub fn set_compute_dtype(&mut self, dtype: candle_core::DType) -> CResult<()> {
        self.model.set_compute_dtype(dtype)
    }

    /// The underlying network.
    pub fn model(&self) -> &ResNet {
        &self.model
    }

    /// Makes [`Teacher::forward`] return the pre-ReLU stage outputs too
    /// ([`ModelOutput::preact`]); off by default.
    pub fn keep_preact(&self, keep: bool) {
        self.keep_preact
            .store(keep, std::sync::atomic::Ordering::Relaxed);
    }

    /// Eval-mode forward; every output is detached from any graph.
    pub fn forward(&self, x: &Tensor) -> CResult<ModelOutput> {
        let preact = self.keep_preact.load(std::sync::atomic::Ordering::Relaxed);
        let out = self.model.forward_with(&x.detach(), false, preact)?;
        Ok(ModelOutput {
            logits: out.logits.detach(),
            feats: out.feats.iter().map(Tensor::detach).collect(),
            pooled: out.pooled.detach(),
            preact: out.preact.iter().map(Tensor::detach).collect(),
            aux: vec![],
        })
    }
}
