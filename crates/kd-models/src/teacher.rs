//! A frozen teacher: constant weights, always evaluated in eval mode, outputs detached, and its
//! own input normalisation. The type, not discipline, keeps gradients out of it.
use std::path::Path;

use candle_core::{Device, Result as CResult, Tensor};

use crate::checkpoint::load_frozen;
use crate::import::TeacherMeta;
use crate::resnet::{ForwardParts, ModelOutput, ResNet};
use crate::Result;

/// A pretrained network used only for inference.
#[derive(Clone, Debug)]
pub struct Teacher {
    model: ResNet,
    meta: TeacherMeta,
}

impl Teacher {
    /// Loads `weights` (safetensors) with its JSON sidecar.
    pub fn load(weights: &Path, device: &Device) -> Result<Self> {
        let meta = TeacherMeta::load(weights)?;
        let model = load_frozen(&meta.config(), weights, device)?;
        Ok(Teacher { model, meta })
    }

    /// Its metadata (architecture, classes, normalisation).
    pub fn meta(&self) -> &TeacherMeta {
        &self.meta
    }

    /// Runs the network in `dtype` (f32, or bf16 for mixed precision); outputs stay f32.
    pub fn set_compute_dtype(&mut self, dtype: candle_core::DType) -> CResult<()> {
        self.model.set_compute_dtype(dtype)
    }

    /// Holds its activations in `format` (`ResNet::set_memory_format`); outputs stay
    /// (N, C, H, W).
    pub fn set_memory_format(&mut self, format: kd_kernels::MemoryFormat) -> CResult<()> {
        self.model.set_memory_format(format)
    }

    /// The underlying network.
    pub fn model(&self) -> &ResNet {
        &self.model
    }

    /// Eval-mode forward; every output is detached from any graph. No pre-ReLU stage outputs
    /// ([`Teacher::forward_with`]).
    pub fn forward(&self, x: &Tensor) -> CResult<ModelOutput> {
        self.forward_with(x, false)
    }

    /// [`Teacher::forward`], with the pre-ReLU stage outputs ([`ModelOutput::preact`]) when
    /// `preact_too` (OFD and AB compare them; they cost an add and a tensor per stage).
    pub fn forward_with(&self, x: &Tensor, preact_too: bool) -> CResult<ModelOutput> {
        let parts = ForwardParts {
            features: true,
            preact: preact_too,
        };
        self.forward_parts(x, parts)
    }

    /// The eval-mode forward with the optional outputs `parts` (a method that reads only the
    /// logits spares the stage features' f32 copies).
    pub fn forward_parts(&self, x: &Tensor, parts: ForwardParts) -> CResult<ModelOutput> {
        let out = self.model.forward_parts(&x.detach(), false, parts)?;
        Ok(ModelOutput {
            logits: out.logits.detach(),
            feats: out.feats.iter().map(Tensor::detach).collect(),
            pooled: out.pooled.detach(),
            preact: out.preact.iter().map(Tensor::detach).collect(),
            aux: vec![],
        })
    }
}
