//! Custom candle ops for training CNNs fast on CUDA, each with a CPU path that defines what it
//! computes and that the tests compare against.
//!
//! candle 0.11 trains a CIFAR ResNet about twenty times slower than PyTorch on the same card: its
//! convolution backward runs on im2col + matmul kernels (its `cudnn` feature covers only the
//! forward, choosing an algorithm and allocating a workspace on every call), BatchNorm is a chain
//! of a dozen element-wise and reduction kernels, and it has no padded max-pool. This crate adds:
//!
//! - [`conv2d`]: convolution through cuDNN forward, backward-data and backward-filter, the
//!   algorithm chosen once per shape (cuDNN's heuristics, or a benchmark: [`ConvAlgoSearch`])
//!   and cached, one workspace reused (feature `cudnn`); on the CPU through kd's own patch-row
//!   and gemm paths, faster there than candle's convolution;
//! - [`batch_norm_train`]: BatchNorm in training mode, optionally fused with the ReLU that follows,
//!   as two kernels forward and two backward (feature `cuda`, NVRTC);
//!   [`batch_norm_train_update`] with the running statistics updated by the forward's second
//!   launch; [`batch_norm_train_add_relu`] a residual block's tail (BatchNorm, add, ReLU) as one op;
//! - [`MaxPool2d`]: padded max-pool with a backward pass, on the CPU and on CUDA;
//! - [`augment_batch`]: crop, flip, normalise and mix (mixup, CutMix) a batch from a uint8 data
//!   set that stays on the device, in one kernel;
//! - [`sgd_momentum_step`]: SGD with (Nesterov) momentum in two in-place kernels per parameter,
//!   [`sgd_momentum_steps`] a model's parameters in one launch;
//! - [`add_relu()`]: a residual block's `relu(a + b)` in one pass forward and one backward;
//! - [`batch_norm_eval()`]: BatchNorm(+ReLU) in eval mode in one pass (CPU), for frozen teachers
//!   and evaluation;
//! - [`softmax_loss`]: softmax cross-entropy (label smoothing, mixup) and Hinton's KD loss as
//!   one op each, forward and backward;
//! - [`MemoryFormat`]: the convolutions and BatchNorms over channels-last (N, H, W, C) tensors
//!   too ([`conv2d_nhwc`], [`batch_norm_train_nhwc`], ...), cuDNN's NHWC descriptors and kd's
//!   channels-last BatchNorm kernels on CUDA;
//! - [`Precision`]: f32, TF32 or bf16 convolutions and matmuls;
//! - [`device_memory`]: the CUDA memory pool kept across synchronisations, as PyTorch's caching
//!   allocator keeps what it freed, and its high-water marks;
//! - [`device_clock`]: the time of spans of device work (a teacher's forward pass) from CUDA
//!   events, read once an epoch rather than by waiting for the device around each span.
//!
//! Without the features every op runs its CPU path, so code written against this crate runs
//! (and is tested) on machines without a GPU.
pub mod add_relu;
pub mod augment;
pub mod batch_norm;
pub mod batch_norm_eval;
pub mod conv;
pub mod conv_algo;
mod conv_cpu;
mod conv_taps;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod cuda_ops;
#[cfg(feature = "cudnn")]
mod cudnn_algo;
#[cfg(feature = "cudnn")]
mod cudnn_conv;
pub mod device_clock;
pub mod device_memory;
pub mod launch;
pub mod max_pool;
pub mod memory_format;
pub mod precision;
pub mod sgd;
pub mod softmax_loss;
pub mod switches;

pub use add_relu::add_relu;
pub use augment::{augment_batch, AugmentPlan, BatchMix, Normalisation};
pub use batch_norm::{
    batch_norm_train, batch_norm_train_add_relu, batch_norm_train_update, BatchNormOutput,
    RunningStats,
};
pub use batch_norm_eval::{batch_norm_eval, batch_norm_eval_add_relu};
pub use conv::{conv2d, conv2d_cpu, conv2d_custom, Conv2dGeometry};
pub use conv_algo::ConvAlgoSearch;
pub use max_pool::MaxPool2d;
pub use memory_format::{
    batch_norm_eval_add_relu_nhwc, batch_norm_eval_nhwc, batch_norm_train_add_relu_nhwc,
    batch_norm_train_nhwc, conv2d_nhwc, to_channels_first, to_channels_last, MemoryFormat,
};
pub use precision::Precision;
pub use sgd::{sgd_momentum_step, sgd_momentum_steps, SgdStep, SgdUpdate};
pub use switches::{enabled, Kernel};

/// Whether this build can run the CUDA kernels (feature `cuda`).
pub const HAS_CUDA_KERNELS: bool = cfg!(feature = "cuda");

/// Compiles every CUDA kernel source of this crate with NVRTC and returns the PTX sizes, by
/// module name. Needs only the NVRTC library, not a GPU: builds check their kernels with it.
#[cfg(feature = "cuda")]
pub fn compile_all_kernels() -> candle_core::Result<Vec<(&'static str, usize)>> {
    cuda::compile_all()
}

/// The PTX NVRTC makes of one kernel module (`kd_batch_norm`, `kd_max_pool`, `kd_augment`,
/// `kd_sgd`, `kd_add_relu`, `kd_softmax_loss`), for tests that check what the kernels compile
/// to.
#[cfg(feature = "cuda")]
pub fn kernel_ptx(module: &str) -> candle_core::Result<&'static str> {
    cuda::ptx_of(module)
}

/// The size in bytes of the parameter list `sgd_list_f32` takes by value, as kd lays it out on
/// the host: the PTX's parameter must have the same (a test compares them).
#[cfg(feature = "cuda")]
pub fn sgd_list_arg_bytes() -> usize {
    cuda_ops::SGD_LIST_BYTES
}

/// The README's examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
