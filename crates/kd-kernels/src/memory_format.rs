//! Channels-last (NHWC) tensors: the layout cuDNN's tensor-core convolutions read natively
//! (with NCHW tensors they transpose around the kernel or take slower ones), as PyTorch's
//! `memory_format=torch.channels_last`.
//!
//! A candle op returns a contiguous tensor of the shape it names, so an op cannot hand back an
//! (N, C, H, W)-shaped tensor with channels-last strides. A channels-last network therefore
//! holds **(N, H, W, C)** tensors, contiguous, and convolution kernels as **(K, R, S, C)**; it
//! permutes at its boundaries ([`to_channels_last`] on the input, [`to_channels_first`] views
//! for what leaves it). The ops here are the channels-first ones over that layout:
//!
//! - on CUDA, their own launches: cuDNN with `CUDNN_TENSOR_NHWC` descriptors, and BatchNorm
//!   kernels that treat the tensor as an (N·H·W, C) matrix (a block's threads read consecutive
//!   channels of a row, so a warp's loads are one segment);
//! - on the CPU, the same ops with each 4-D operand transposed to channels-first, the
//!   channels-first body run, and the result transposed back (`cpu_via_channels_first`):
//!   correct everywhere and tested against the channels-first ops, fast only on CUDA.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result, Shape, Tensor};

use crate::batch_norm::{BatchNormOutput, RunningStats};
use crate::conv::Conv2dGeometry;
use crate::cpu;

/// How an op's 4-D tensors are laid out (`channels-first` or `channels-last` in configs and on
/// the command line).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryFormat {
    /// (N, C, H, W) activations, (K, C, R, S) convolution kernels: candle's and PyTorch's
    /// default.
    #[default]
    ChannelsFirst,
    /// (N, H, W, C) activations, (K, R, S, C) convolution kernels.
    ChannelsLast,
}

impl MemoryFormat {
    /// Both formats, for help texts.
    pub const ALL: [MemoryFormat; 2] = [MemoryFormat::ChannelsFirst, MemoryFormat::ChannelsLast];

    /// The name in configs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryFormat::ChannelsFirst => "channels-first",
            MemoryFormat::ChannelsLast => "channels-last",
        }
    }

    /// (N, C, H·W) of a 4-D tensor of this format: batch, channels and values per plane.
    pub fn n_c_hw(self, dims: &[usize]) -> Result<(usize, usize, usize)> {
        let [n, c, h, w] = self.nchw(dims)?;
        Ok((n, c, h * w))
    }

    /// The dimensions of a 4-D tensor of this format in (N, C, H, W) order (for a kernel,
    /// (K, C, R, S)).
    pub fn nchw(self, dims: &[usize]) -> Result<[usize; 4]> {
        match (self, dims) {
            (MemoryFormat::ChannelsFirst, &[n, c, h, w]) => Ok([n, c, h, w]),
            (MemoryFormat::ChannelsLast, &[n, h, w, c]) => Ok([n, c, h, w]),
            (f, d) => bail!("{f:?} expects a 4-D tensor, got dimensions {d:?}"),
        }
    }

    /// (N, C, H, W)-ordered dimensions as this format lays them out.
    pub fn dims_of(self, [n, c, h, w]: [usize; 4]) -> [usize; 4] {
        match self {
            MemoryFormat::ChannelsFirst => [n, c, h, w],
            MemoryFormat::ChannelsLast => [n, h, w, c],
        }
    }

    /// The axis that holds the channels in a 4-D tensor of this format.
    pub fn channel_axis(self) -> usize {
        match self {
            MemoryFormat::ChannelsFirst => 1,
            MemoryFormat::ChannelsLast => 3,
        }
    }

    /// A 4-D tensor of this format as (N, C, H, W): itself channels-first, a view
    /// ([`to_channels_first`]) channels-last.
    pub fn nchw_view(self, t: &Tensor) -> Result<Tensor> {
        match self {
            MemoryFormat::ChannelsFirst => Ok(t.clone()),
            MemoryFormat::ChannelsLast => to_channels_first(t),
        }
    }

    /// Runs `f`, written for (N, C, H, W) tensors, on `x` of this format: as it is
    /// channels-first, between permutes (views) channels-last, the result in this format.
    pub fn via_nchw(self, x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        match self {
            MemoryFormat::ChannelsFirst => f(x),
            MemoryFormat::ChannelsLast => to_channels_last(&f(&to_channels_first(x)?)?),
        }
    }
}

impl std::fmt::Display for MemoryFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for MemoryFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        MemoryFormat::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                format!("unknown memory format {s:?}: expected channels-first or channels-last")
            })
    }
}

/// An (N, C, H, W) tensor (or a (K, C, R, S) kernel) as (N, H, W, C): a view; ops that need it
/// contiguous copy it.
pub fn to_channels_last(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 2, 3, 1))
}

/// An (N, H, W, C) tensor as (N, C, H, W): a view.
pub fn to_channels_first(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 3, 1, 2))
}

/// The channels-first twin of a custom op (a `Clone` struct with a `format` field) for its CPU
/// body under [`cpu_via_channels_first`]; with a field name, that field (dimensions in the op's
/// format's order) reordered to (N, C, H, W) too.
macro_rules! channels_first {
    ($op:expr) => {{
        let mut op = $op.clone();
        op.format = $crate::memory_format::MemoryFormat::ChannelsFirst;
        op
    }};
    ($op:expr, $dims:ident) => {{
        let mut op = channels_first!($op);
        op.$dims = $op.format.nchw(&$op.$dims)?;
        op
    }};
}
pub(crate) use channels_first;

/// Runs `body`, a CPU op body written for channels-first operands, on channels-last ones: each
/// 4-D operand (activations, kernels) transposed to channels-first, the body run, and a 4-D
/// result (or a (2, N, C, H, W) pair of them) transposed back. Per-channel operands and results
/// ((C,), (2, C)) pass as they are.
pub(crate) fn cpu_via_channels_first<const K: usize>(
    inputs: [(&CpuStorage, &Layout); K],
    body: impl FnOnce([(&CpuStorage, &Layout); K]) -> Result<(CpuStorage, Shape)>,
) -> Result<(CpuStorage, Shape)> {
    let mut first = Vec::with_capacity(K);
    for (s, l) in inputs {
        first.push(match l.dims().len() {
            4 => {
                let (s, shape) = move_channel_axis(s, l, MemoryFormat::ChannelsFirst)?;
                (s, Layout::contiguous(shape))
            }
            _ => (s.clone(), l.clone()),
        });
    }
    let (out, shape) = body(std::array::from_fn(|i| (&first[i].0, &first[i].1)))?;
    if shape.rank() < 4 {
        return Ok((out, shape));
    }
    move_channel_axis(&out, &Layout::contiguous(shape), MemoryFormat::ChannelsLast)
}

/// A contiguous CPU tensor whose last three axes are (H, W, C) made (C, H, W) (`to` channels-
/// first), or (C, H, W) made (H, W, C) (`to` channels-last), the leading axes kept: one pass of
/// the convolutions' tiled layout transposes ([`cpu::transpose_images`]) per image.
fn move_channel_axis(s: &CpuStorage, l: &Layout, to: MemoryFormat) -> Result<(CpuStorage, Shape)> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!(
            "{to:?} transpose: expected a contiguous tensor, got strides {:?}",
            l.stride()
        );
    };
    let d = l.dims();
    let r = d.len();
    if r < 3 {
        bail!("{to:?} transpose: expected at least 3 axes, got {d:?}");
    }
    let images = d[..r - 3].iter().product();
    let (rows_cols, last3) = match to {
        MemoryFormat::ChannelsFirst => (
            (d[r - 3] * d[r - 2], d[r - 1]),
            [d[r - 1], d[r - 3], d[r - 2]],
        ),
        MemoryFormat::ChannelsLast => (
            (d[r - 3], d[r - 2] * d[r - 1]),
            [d[r - 2], d[r - 1], d[r - 3]],
        ),
    };
    fn transposed<T: Copy + Default + Send + Sync>(
        v: &[T],
        images: usize,
        rows_cols: (usize, usize),
    ) -> Vec<T> {
        let mut out = vec![T::default(); v.len()];
        cpu::transpose_images(v, images, rows_cols, &mut out);
        out
    }
    let out = match s {
        CpuStorage::F32(v) => CpuStorage::F32(transposed(&v[a..b], images, rows_cols)),
        CpuStorage::F64(v) => CpuStorage::F64(transposed(&v[a..b], images, rows_cols)),
        CpuStorage::BF16(v) => CpuStorage::BF16(transposed(&v[a..b], images, rows_cols)),
        CpuStorage::F16(v) => CpuStorage::F16(transposed(&v[a..b], images, rows_cols)),
        _ => bail!("{to:?} transpose: unsupported dtype {:?}", s.dtype()),
    };
    Ok((out, Shape::from([&d[..r - 3], &last3[..]].concat())))
}

/// [`crate::conv2d`] over channels-last tensors: `x` (N, H, W, C) with `w` (K, R, S, C) gives
/// (N, H', W', K). cuDNN with NHWC descriptors on CUDA (feature `cudnn`, unless
/// `KD_DISABLE=conv`); elsewhere the channels-first convolution between permutes.
pub fn conv2d_nhwc(x: &Tensor, w: &Tensor, g: Conv2dGeometry) -> Result<Tensor> {
    let cuda = cfg!(feature = "cudnn") && x.device().is_cuda();
    if cuda && crate::enabled(crate::Kernel::Conv) {
        return crate::conv::conv2d_custom_in(x, w, g, MemoryFormat::ChannelsLast);
    }
    let y = crate::conv2d(&to_channels_first(x)?, &to_channels_first(w)?, g)?;
    to_channels_last(&y)
}

/// [`crate::batch_norm_train`] (with [`crate::batch_norm_train_update`]'s running statistics
/// when given) over an (N, H, W, C) tensor; `y` is (N, H, W, C), the statistics as for
/// channels-first.
pub fn batch_norm_train_nhwc(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
    running: Option<RunningStats<'_>>,
) -> Result<BatchNormOutput> {
    crate::batch_norm::train_in(
        MemoryFormat::ChannelsLast,
        (x, weight, bias),
        eps,
        relu,
        None,
        running,
    )
}

/// [`crate::batch_norm_train_add_relu`] over (N, H, W, C) tensors.
pub fn batch_norm_train_add_relu_nhwc(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    eps: f64,
    running: Option<RunningStats<'_>>,
) -> Result<BatchNormOutput> {
    crate::batch_norm::train_add_relu_in(
        MemoryFormat::ChannelsLast,
        (x, weight, bias),
        residual,
        eps,
        running,
    )
}

/// [`crate::batch_norm_eval()`] over an (N, H, W, C) tensor: one launch on CUDA where nothing
/// needs a gradient (as the channels-first op), elsewhere the channels-first op between
/// permutes.
pub fn batch_norm_eval_nhwc(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let p = [weight, bias, running_mean, running_var];
    crate::batch_norm_eval::eval_in(MemoryFormat::ChannelsLast, x, p, eps, relu, None)
}

/// [`crate::batch_norm_eval_add_relu()`] over (N, H, W, C) tensors.
pub fn batch_norm_eval_add_relu_nhwc(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    residual: &Tensor,
) -> Result<Tensor> {
    let p = [weight, bias, running_mean, running_var];
    crate::batch_norm_eval::eval_in(MemoryFormat::ChannelsLast, x, p, eps, true, Some(residual))
}
