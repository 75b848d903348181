//! A frozen teacher: constant weights, always evaluated in eval mode, outputs detached, and its
//! own input normalisation. The type, not discipline, keeps gradients out of it. Several
//! networks can teach as one ([`Teacher::ensemble`]): their mean logits, the ensemble teacher of
//! Hinton et al.'s distillation of an ensemble into one network.
use std::path::Path;

use candle_core::{DType, Device, Result as CResult, Tensor};

use crate::checkpoint::load_frozen;
use crate::import::TeacherMeta;
use crate::resnet::{ForwardParts, ModelOutput, ResNet};
use crate::{ModelError, Result};

/// One network of a teacher, with the normalisation it was trained with.
#[derive(Clone, Debug)]
struct Member {
    model: ResNet,
    meta: TeacherMeta,
}

/// A pretrained network, or an ensemble of them, used only for inference.
#[derive(Clone, Debug)]
pub struct Teacher {
    /// Never empty; the first one's normalisation is the one inputs come in.
    members: Vec<Member>,
}

impl Teacher {
    /// Loads `weights` (safetensors) with its JSON sidecar.
    pub fn load(weights: &Path, device: &Device) -> Result<Self> {
        let meta = TeacherMeta::load(weights)?;
        let model = load_frozen(&meta.config(), weights, device)?;
        Ok(Teacher {
            members: vec![Member { model, meta }],
        })
    }

    /// The teachers in `teachers` teaching as one: their logits averaged image by image (each
    /// network fed the normalisation it was trained with). The mean logits soften at a
    /// temperature T into the renormalised geometric mean of the members' softmax at T, so every
    /// logit-based loss takes them as they are; the ensemble has no stage features, pre-ReLU
    /// outputs or embedding to give ([`Teacher::forward_parts`] refuses them). The teachers
    /// must agree on the class count.
    pub fn ensemble(teachers: Vec<Teacher>) -> Result<Self> {
        let members: Vec<Member> = teachers.into_iter().flat_map(|t| t.members).collect();
        let Some(first) = members.first() else {
            return Err(ModelError::Invalid {
                field: "teacher",
                message: "an ensemble needs at least one teacher".into(),
            });
        };
        let classes = first.meta.num_classes;
        if let Some((i, m)) = members
            .iter()
            .enumerate()
            .find(|(_, m)| m.meta.num_classes != classes)
        {
            return Err(ModelError::Invalid {
                field: "teacher",
                message: format!(
                    "the ensemble's member {} ({}) has {} classes, its first ({}) has {classes}",
                    i + 1,
                    m.meta.source,
                    m.meta.num_classes,
                    first.meta.source
                ),
            });
        }
        Ok(Teacher { members })
    }

    /// The networks teaching (1 unless an ensemble).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: a teacher has at least one network (for clippy's `len` convention).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The metadata (architecture, classes, normalisation) of its first network: the
    /// normalisation [`Teacher::forward`] expects its input in.
    pub fn meta(&self) -> &TeacherMeta {
        &self.members[0].meta
    }

    /// Runs the networks in `dtype` (f32, or bf16 for mixed precision); outputs stay f32.
    pub fn set_compute_dtype(&mut self, dtype: DType) -> CResult<()> {
        for m in &mut self.members {
            m.model.set_compute_dtype(dtype)?;
        }
        Ok(())
    }

    /// Holds its activations in `format` (`ResNet::set_memory_format`); outputs stay
    /// (N, C, H, W).
    pub fn set_memory_format(&mut self, format: kd_kernels::MemoryFormat) -> CResult<()> {
        for m in &mut self.members {
            m.model.set_memory_format(format)?;
        }
        Ok(())
    }

    /// The (first) network: what the feature methods size their parts by. Those methods take a
    /// single teacher only.
    pub fn model(&self) -> &ResNet {
        &self.members[0].model
    }

    /// Parameters of every network, auxiliary heads aside.
    pub fn num_params(&self) -> usize {
        self.members
            .iter()
            .map(|m| m.model.num_backbone_params())
            .sum()
    }

    /// Multiply-accumulates of one (height × width) image through every network.
    pub fn macs(&self, height: usize, width: usize) -> u64 {
        self.members
            .iter()
            .map(|m| m.model.macs(height, width).backbone)
            .sum()
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
    /// logits spares the stage features' f32 copies). `x` is normalised as [`Teacher::meta`]
    /// says. An ensemble gives its mean logits only: its `pooled` has no columns, and asking
    /// it for features or pre-ReLU outputs is an error.
    pub fn forward_parts(&self, x: &Tensor, parts: ForwardParts) -> CResult<ModelOutput> {
        let x = x.detach();
        if let [only] = self.members.as_slice() {
            return Ok(only.model.forward_parts(&x, false, parts)?.detach());
        }
        if parts.features || parts.preact {
            candle_core::bail!(
                "an ensemble of {} teachers gives its mean logits only, not stage features or pre-ReLU outputs",
                self.members.len()
            );
        }
        let first = &self.members[0].meta;
        let each = self
            .members
            .iter()
            .map(|m| {
                let xm = renormalize(&x, (first.mean, first.std), (m.meta.mean, m.meta.std))?;
                Ok(m.model
                    .forward_parts(&xm, false, ForwardParts::LOGITS)?
                    .logits
                    .detach())
            })
            .collect::<CResult<Vec<_>>>()?;
        let logits = mean_logits(&each.iter().collect::<Vec<_>>())?;
        // No embedding: a view of no columns (no device allocation, which CUDA refuses at 0 B).
        let pooled = logits.narrow(1, 0, 0)?;
        Ok(ModelOutput {
            logits,
            feats: vec![],
            pooled,
            preact: vec![],
            aux: vec![],
            branches: vec![],
            gated: None,
        })
    }
}

/// The mean of `members`' logits (each (B, K)) in f32, summed in order and divided by their
/// count: an ensemble teacher's logits ([`Teacher::ensemble`]), and what `kd-runner eval`
/// scores as that ensemble from logits it already has.
pub fn mean_logits(members: &[&Tensor]) -> CResult<Tensor> {
    let Some((first, rest)) = members.split_first() else {
        candle_core::bail!("mean logits of no members");
    };
    let sum = rest
        .iter()
        .try_fold(first.to_dtype(DType::F32)?, |acc, m| {
            acc + m.to_dtype(DType::F32)?
        })?;
    sum / members.len() as f64
}

/// `x` normalised per channel by `from` (mean, std) re-expressed as normalised by `to`: undo
/// one, apply the other (a teacher trained with other statistics than the data's).
pub fn renormalize(
    x: &Tensor,
    from: ([f32; 3], [f32; 3]),
    to: ([f32; 3], [f32; 3]),
) -> CResult<Tensor> {
    if from == to {
        return Ok(x.clone());
    }
    let dev = x.device();
    let c = |v: [f32; 3]| Tensor::new(&v, dev).and_then(|t| t.reshape((1, 3, 1, 1)));
    let scale: [f32; 3] = std::array::from_fn(|i| from.1[i] / to.1[i]);
    let shift: [f32; 3] = std::array::from_fn(|i| (from.0[i] - to.0[i]) / to.1[i]);
    x.broadcast_mul(&c(scale)?)?.broadcast_add(&c(shift)?)
}
