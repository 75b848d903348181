//! Our CUDA kernels: sources compiled once per process with NVRTC, modules loaded once per
//! device through candle's custom-module cache, and launch helpers.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, LaunchConfig};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{bail, Result};

use crate::memory_format::MemoryFormat;

/// One kernel source file.
pub(crate) struct Module {
    name: &'static str,
    source: &'static str,
    ptx: OnceLock<std::result::Result<String, String>>,
}

const PRELUDE: &str = include_str!("kernels/common.cuh");

pub(crate) static BATCH_NORM: Module =
    Module::new("kd_batch_norm", include_str!("kernels/batch_norm.cu"));
pub(crate) static MAX_POOL: Module =
    Module::new("kd_max_pool", include_str!("kernels/max_pool.cu"));
pub(crate) static AUGMENT: Module = Module::new("kd_augment", include_str!("kernels/augment.cu"));

pub(crate) static SGD: Module = Module::new("kd_sgd", include_str!("kernels/sgd.cu"));
pub(crate) static ADD_RELU: Module =
    Module::new("kd_add_relu", include_str!("kernels/add_relu.cu"));
pub(crate) static SOFTMAX_LOSS: Module =
    Module::new("kd_softmax_loss", include_str!("kernels/softmax_loss.cu"));

const ALL: [&Module; 6] = [
    &BATCH_NORM,
    &MAX_POOL,
    &AUGMENT,
    &SGD,
    &ADD_RELU,
    &SOFTMAX_LOSS,
];

impl Module {
    const fn new(name: &'static str, source: &'static str) -> Self {
        Module {
            name,
            source,
            ptx: OnceLock::new(),
        }
    }

    fn ptx(&self) -> Result<&str> {
        let ptx = self.ptx.get_or_init(|| {
            let opts = CompileOptions {
                name: Some(format!("{}.cu", self.name)),
                // fmad on (the default) as nvcc; precise division and sqrt as PyTorch's kernels.
                prec_div: Some(true),
                prec_sqrt: Some(true),
                ..Default::default()
            };
            compile_ptx_with_opts(format!("{PRELUDE}\n{}", self.source), opts)
                .map(|p| p.to_src())
                .map_err(|e| format!("{e:?}"))
        });
        match ptx {
            Ok(p) => Ok(p),
            Err(e) => bail!("NVRTC could not compile {}: {e}", self.name),
        }
    }

    /// The kernel `function` of this module on `dev`.
    pub(crate) fn func(&self, dev: &CudaDevice, function: &str) -> Result<CudaFunction> {
        Ok(dev
            .get_or_load_custom_func(function, self.name, self.ptx()?)?
            .into_cuda_function())
    }
}

/// Compiles every module; returns each one's PTX size.
pub(crate) fn compile_all() -> Result<Vec<(&'static str, usize)>> {
    ALL.iter().map(|m| Ok((m.name, m.ptx()?.len()))).collect()
}

/// The PTX of module `name` (`kd_batch_norm`, `kd_max_pool`, `kd_augment`, `kd_sgd`,
/// `kd_add_relu`).
pub(crate) fn ptx_of(name: &str) -> Result<&'static str> {
    match ALL.iter().copied().find(|m| m.name == name) {
        Some(m) => m.ptx(),
        None => bail!("no kernel module named {name}"),
    }
}

impl From<crate::launch::LaunchGeometry> for LaunchConfig {
    fn from(g: crate::launch::LaunchGeometry) -> Self {
        LaunchConfig {
            grid_dim: (g.grid[0], g.grid[1], g.grid[2]),
            block_dim: (g.threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// A grid-stride launch over `total` elements ([`LaunchGeometry::flat`]).
///
/// [`LaunchGeometry::flat`]: crate::launch::LaunchGeometry::flat
pub(crate) fn flat(total: usize) -> LaunchConfig {
    crate::launch::LaunchGeometry::flat(total).into()
}

/// Blocks (channel, slice of the batch) ([`LaunchGeometry::per_channel`]).
///
/// [`LaunchGeometry::per_channel`]: crate::launch::LaunchGeometry::per_channel
pub(crate) fn per_channel(n: usize, channels: usize) -> LaunchConfig {
    crate::launch::LaunchGeometry::per_channel(n, channels).into()
}

/// Blocks over the planes of an (N, C, H, W) tensor ([`LaunchGeometry::per_plane`]).
///
/// [`LaunchGeometry::per_plane`]: crate::launch::LaunchGeometry::per_plane
pub(crate) fn per_plane(n: usize, c: usize, hw: usize) -> Result<LaunchConfig> {
    match crate::launch::LaunchGeometry::per_plane(n, c, hw) {
        Some(g) => Ok(g.into()),
        None => bail!(
            "kd CUDA kernels: an (N, C, H·W) = ({n}, {c}, {hw}) tensor has N or C above {}",
            crate::launch::LaunchGeometry::MAX_GRID_YZ
        ),
    }
}

/// The launch of a per-channel BatchNorm reduction over a tensor of `format` with (N, C, H·W) =
/// `(n, c, hw)`: [`LaunchGeometry::per_channel`] or [`LaunchGeometry::channels_last_reduction`].
///
/// [`LaunchGeometry::per_channel`]: crate::launch::LaunchGeometry::per_channel
/// [`LaunchGeometry::channels_last_reduction`]: crate::launch::LaunchGeometry::channels_last_reduction
pub(crate) fn bn_reduction(
    format: MemoryFormat,
    (n, c, hw): (usize, usize, usize),
) -> Result<LaunchConfig> {
    Ok(match format {
        MemoryFormat::ChannelsFirst => per_channel(n, c),
        MemoryFormat::ChannelsLast => {
            crate::launch::LaunchGeometry::channels_last_reduction(rows(n, hw)?, c).into()
        }
    })
}

/// The rows N·H·W of a channels-last tensor, which its kernels count in an int (with a grid's
/// step of rows on top).
pub(crate) fn rows(n: usize, hw: usize) -> Result<usize> {
    let m = n * hw;
    if m > (i32::MAX / 2) as usize {
        bail!(
            "kd channels-last kernels: N·H·W = {m} rows exceeds {}",
            i32::MAX / 2
        );
    }
    Ok(m)
}

/// The launch of an element-wise BatchNorm kernel over a tensor of `format`:
/// [`per_plane`] or [`LaunchGeometry::channels_last_rows`].
///
/// [`LaunchGeometry::channels_last_rows`]: crate::launch::LaunchGeometry::channels_last_rows
pub(crate) fn bn_elementwise(
    format: MemoryFormat,
    (n, c, hw): (usize, usize, usize),
) -> Result<LaunchConfig> {
    match format {
        MemoryFormat::ChannelsFirst => per_plane(n, c, hw),
        MemoryFormat::ChannelsLast => {
            Ok(crate::launch::LaunchGeometry::channels_last_rows(rows(n, hw)?, c).into())
        }
    }
}

/// The name of kernel `base` for `format` and `dtype`: `bn_apply_f32`, `bn_apply_cl_bf16`,
/// `max_pool_fwd_cl_f32`, ...
pub(crate) fn kernel_name(
    base: &str,
    format: MemoryFormat,
    dtype: candle_core::DType,
) -> Result<String> {
    let cl = match format {
        MemoryFormat::ChannelsFirst => "",
        MemoryFormat::ChannelsLast => "cl_",
    };
    Ok(format!("{base}_{cl}{}", suffix(dtype)?))
}

/// The kernel-name suffix of a dtype.
pub(crate) fn suffix(dtype: candle_core::DType) -> Result<&'static str> {
    match dtype {
        candle_core::DType::F32 => Ok("f32"),
        candle_core::DType::BF16 => Ok("bf16"),
        d => bail!("kd CUDA kernels support f32 and bf16, got {d:?}"),
    }
}
