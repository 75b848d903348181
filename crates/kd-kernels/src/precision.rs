//! Numeric precision of a training run: what the convolutions and matmuls compute in.
//!
//! `bf16` is mixed precision as PyTorch's autocast does it for CNNs: the model keeps f32 master
//! weights and casts them to bf16 for each convolution and matmul, activations flow in bf16,
//! BatchNorm computes its statistics in f32, and the loss is computed in f32.
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::DType;

/// f32, f32 storage with TF32 tensor-core math, or bf16 activations with f32 master weights.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// IEEE f32 everywhere (cuDNN restricted to FMA math).
    #[default]
    F32,
    /// f32 tensors; convolutions and matmuls may round their inputs to TF32 on tensor cores.
    Tf32,
    /// bf16 activations and convolutions, f32 master weights, BN statistics and loss.
    Bf16,
}

static TF32: AtomicBool = AtomicBool::new(false);

impl Precision {
    /// All values, for help texts.
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::Tf32, Precision::Bf16];

    /// The dtype activations (and the weights cast for each op) have.
    pub fn activation_dtype(self) -> DType {
        match self {
            Precision::Bf16 => DType::BF16,
            Precision::F32 | Precision::Tf32 => DType::F32,
        }
    }

    /// Makes this the process-wide setting for f32 convolutions (cuDNN math type) and f32
    /// matmuls (cuBLAS reduced precision). Only TF32 changes anything, and only on CUDA.
    pub fn apply(self) {
        let tf32 = self != Precision::F32;
        TF32.store(tf32, Ordering::Relaxed);
        #[cfg(feature = "cuda")]
        candle_core::cuda_backend::set_gemm_reduced_precision_f32(tf32);
    }

    /// The name used on the command line and in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Whether f32 convolutions may use TF32 (set by [`Precision::apply`]).
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
pub(crate) fn tf32_allowed() -> bool {
    TF32.load(Ordering::Relaxed)
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Precision::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown precision {s:?}: expected one of f32, tf32, bf16"))
    }
}
