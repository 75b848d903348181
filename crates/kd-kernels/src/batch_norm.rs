//! BatchNorm2d in training mode, optionally fused with the ReLU after it: two kernels forward
//! (per-channel statistics, then normalise-scale-shift-ReLU) and two backward (per-channel sums,
//! then the input gradient), where candle's composed ops launch about thirty. The running
//! statistics are updated in place: on CUDA by the statistics' own last launch
//! ([`batch_norm_train_update`], as cuDNN's training-mode BatchNorm does), elsewhere by
//! [`update_running_stats`].
//!
//! [`batch_norm_train_add_relu`] is a residual block's tail, `relu(bn(x) + shortcut)`, as one op:
//! one pass forward instead of two, and backward the input's and the shortcut's gradients
//! written by one pass instead of two.
//!
//! The statistics come out of a no-gradient op, and the input gradient of the apply op is the
//! full BatchNorm formula (it accounts for the statistics' dependence on the input):
//! `dx = γ·σ⁻¹·(dy' − Σdy'/M − x̂·Σ(dy'·x̂)/M)`, `dγ = Σ(dy'·x̂)`, `dβ = Σdy'`, where
//! `dy'` is `dy` masked by the ReLU and M = N·H·W. Statistics and sums are f32 for bf16 input.
// `!(y > 0)` on purpose: a NaN output counts as not positive, as in the CUDA kernels.
#![allow(clippy::neg_cmp_op_on_partial_ord)]
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp3, DType, InplaceOp2, Layout, Result, Shape, Tensor,
};

use crate::cpu;
use crate::memory_format::{channels_first, cpu_via_channels_first, MemoryFormat};
use candle_core::backend::BackendStorage;
use rayon::prelude::*;

/// What [`batch_norm_train`] returns.
#[derive(Clone, Debug)]
pub struct BatchNormOutput {
    /// The normalised (and rectified) output, same dtype as the input.
    pub y: Tensor,
    /// Per-channel batch mean (f32, no gradient).
    pub mean: Tensor,
    /// Per-channel biased batch variance (f32, no gradient); the running variance wants the
    /// unbiased one, `var · M / (M − 1)`.
    pub var: Tensor,
    /// `mean` and `var` as one (2, C) tensor, for [`update_running_stats`].
    pub stats: Tensor,
}

/// Normalises `x` (N, C, H, W) with its batch statistics, scales by `weight` and shifts by
/// `bias` (both (C,), f32), then applies ReLU if `relu`. Runs the fused kernels on CUDA (feature
/// `cuda`) and their reference implementation on the CPU.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<BatchNormOutput> {
    train_in(
        MemoryFormat::ChannelsFirst,
        (x, weight, bias),
        eps,
        relu,
        None,
        None,
    )
}

/// A layer's running statistics and their momentum, for [`batch_norm_train_update`].
#[derive(Clone, Copy, Debug)]
pub struct RunningStats<'a> {
    /// Running mean: f32 (C,), contiguous, updated in place.
    pub mean: &'a Tensor,
    /// Running (unbiased) variance: f32 (C,), contiguous, updated in place.
    pub var: &'a Tensor,
    /// PyTorch's momentum: `r ← (1 − momentum)·r + momentum·s`.
    pub momentum: f64,
}

/// [`batch_norm_train`], then the running statistics updated from the batch's as
/// [`update_running_stats`] does, with the same bits. On CUDA (feature `cuda`) the update is part
/// of the statistics' last launch, so a layer's forward is two launches instead of four (unless
/// `KD_DISABLE=bnrunning`).
pub fn batch_norm_train_update(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
    running: RunningStats<'_>,
) -> Result<BatchNormOutput> {
    train_in(
        MemoryFormat::ChannelsFirst,
        (x, weight, bias),
        eps,
        relu,
        None,
        Some(running),
    )
}

/// A residual block's tail in training mode: `relu(batch_norm(x) + residual)`, with the running
/// statistics updated as [`batch_norm_train_update`] does when given. `y` is the block's output;
/// `mean`, `var` and `stats` are the BatchNorm's. One op (forward one pass, backward the input's
/// and the shortcut's gradients in one pass), or, with `KD_DISABLE=traintail`,
/// [`batch_norm_train`] followed by [`crate::add_relu()`].
pub fn batch_norm_train_add_relu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    eps: f64,
    running: Option<RunningStats<'_>>,
) -> Result<BatchNormOutput> {
    train_add_relu_in(
        MemoryFormat::ChannelsFirst,
        (x, weight, bias),
        residual,
        eps,
        running,
    )
}

/// [`batch_norm_train_add_relu`] over tensors of `format`.
pub(crate) fn train_add_relu_in(
    format: MemoryFormat,
    (x, weight, bias): (&Tensor, &Tensor, &Tensor),
    residual: &Tensor,
    eps: f64,
    running: Option<RunningStats<'_>>,
) -> Result<BatchNormOutput> {
    if residual.dims() != x.dims() || residual.dtype() != x.dtype() {
        bail!(
            "batch_norm_train_add_relu: input {:?} {:?} but residual {:?} {:?}",
            x.dims(),
            x.dtype(),
            residual.dims(),
            residual.dtype()
        );
    }
    if !residual.device().same_device(x.device()) {
        bail!(
            "batch_norm_train_add_relu: the residual is on {:?}, the input on {:?}",
            residual.device().location(),
            x.device().location()
        );
    }
    let params = (x, weight, bias);
    if crate::enabled(crate::Kernel::TrainTail) {
        return train_in(format, params, eps, true, Some(residual), running);
    }
    let out = train_in(format, params, eps, false, None, running)?;
    Ok(BatchNormOutput {
        y: crate::add_relu(&out.y, residual)?,
        ..out
    })
}

/// The training-mode BatchNorm, then the ReLU if `relu`; with `residual` (and `relu`), the
/// residual added before the ReLU in the same op; over tensors of `format`.
pub(crate) fn train_in(
    format: MemoryFormat,
    (x, weight, bias): (&Tensor, &Tensor, &Tensor),
    eps: f64,
    relu: bool,
    residual: Option<&Tensor>,
    running: Option<RunningStats<'_>>,
) -> Result<BatchNormOutput> {
    let (n, c, hw) = format.n_c_hw(x.dims())?;
    if weight.dims() != [c] || bias.dims() != [c] {
        bail!(
            "batch_norm_train: input {:?} has {c} channels but weight is {:?} and bias {:?}",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    if n * hw < 2 {
        bail!(
            "BatchNorm2d in training mode needs more than one value per channel, got input {:?}",
            x.dims()
        );
    }
    if !matches!(x.dtype(), DType::F32 | DType::BF16) {
        bail!(
            "batch_norm_train supports f32 and bf16 input, got {:?}",
            x.dtype()
        );
    }
    let count = n * hw;
    if let Some(r) = running {
        check_running(r.mean, r.var, c, count)?;
        for t in [r.mean, r.var] {
            if !t.device().same_device(x.device()) {
                bail!(
                    "batch_norm_train_update: the running statistics are on {:?}, the input on {:?}",
                    t.device().location(),
                    x.device().location()
                );
            }
        }
    }
    // On CUDA the statistics kernel updates the running statistics too; elsewhere they are
    // updated after it, by two in-place ops.
    let in_stats = running.filter(|_| {
        crate::HAS_CUDA_KERNELS
            && x.device().is_cuda()
            && crate::enabled(crate::Kernel::BatchNormRunning)
    });
    let x = x.contiguous()?;
    let stats = x.apply_op1_no_bwd(&Stats {
        format,
        running: in_stats.map(|r| StatsRunning {
            mean: r.mean.clone(),
            var: r.var.clone(),
            momentum: r.momentum as f32,
            var_scale: unbiased_scale(count),
        }),
    })?;
    if let (Some(r), None) = (running, in_stats) {
        update_running_stats(r.mean, r.var, &stats, r.momentum, count)?;
    }
    let (weight, bias) = (weight.to_dtype(DType::F32)?, bias.to_dtype(DType::F32)?);
    let y = match residual {
        None => x.apply_op3(
            &weight,
            &bias,
            Apply {
                format,
                eps: eps as f32,
                relu,
                stats: stats.clone(),
            },
        )?,
        // β and γ as one (2, C) input, as a custom op takes at most three tensors; in that
        // order, their gradient is the backward reduction's (Σdy', Σdy'·x̂) as it comes.
        Some(r) => x.apply_op3(
            &r.contiguous()?,
            &Tensor::stack(&[&bias, &weight], 0)?,
            ApplyAddRelu {
                format,
                eps: eps as f32,
                stats: stats.clone(),
            },
        )?,
    };
    Ok(BatchNormOutput {
        y,
        mean: stats.get(0)?,
        var: stats.get(1)?,
        stats,
    })
}

/// Updates `running_mean` and `running_var` (f32 (C,), contiguous) in place from a batch's
/// [`BatchNormOutput::stats`] over `count` values per channel, as PyTorch does:
/// `r ← (1 − momentum)·r + momentum·s`, with the unbiased variance.
pub fn update_running_stats(
    running_mean: &Tensor,
    running_var: &Tensor,
    stats: &Tensor,
    momentum: f64,
    count: usize,
) -> Result<()> {
    check_running(running_mean, running_var, stats.dim(1)?, count)?;
    let stats = stats.contiguous()?;
    running_mean.inplace_op2(
        &stats,
        &UpdateRunning {
            row: 0,
            momentum: momentum as f32,
            scale: 1.0,
        },
    )?;
    running_var.inplace_op2(
        &stats,
        &UpdateRunning {
            row: 1,
            momentum: momentum as f32,
            scale: unbiased_scale(count),
        },
    )
}

/// M / (M − 1): the biased variance of M values times this is the unbiased one.
fn unbiased_scale(count: usize) -> f32 {
    (count as f64 / (count as f64 - 1.0)) as f32
}

/// What the running statistics of `c` channels over `count` values per channel must be.
fn check_running(
    running_mean: &Tensor,
    running_var: &Tensor,
    c: usize,
    count: usize,
) -> Result<()> {
    for (name, r) in [
        ("running mean", running_mean),
        ("running variance", running_var),
    ] {
        if r.dims() != [c] || r.dtype() != DType::F32 || !r.is_contiguous() {
            bail!(
                "BatchNorm running statistics: the {name} is {:?} {:?}, expected contiguous f32 ({c},)",
                r.dtype(),
                r.dims()
            );
        }
    }
    if count < 2 {
        bail!("BatchNorm running statistics: {count} values per channel, need at least 2");
    }
    Ok(())
}

/// (N, C, H, W) (or, channels-last, (N, H, W, C)) → (2, C) f32: mean and biased variance per
/// channel; on CUDA, with `running`, also the running statistics' update. Each op below has the
/// `format` of its 4-D tensors.
#[derive(Clone)]
struct Stats {
    format: MemoryFormat,
    running: Option<StatsRunning>,
}

/// The running statistics a CUDA [`Stats`] launch updates in place (written through device
/// pointers, in stream order: see `cuda_ops::bn_stats`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Clone)]
pub(crate) struct StatsRunning {
    pub(crate) mean: Tensor,
    pub(crate) var: Tensor,
    pub(crate) momentum: f32,
    /// M / (M − 1), for the unbiased variance.
    pub(crate) var_scale: f32,
}

/// (x, γ, β) → y, with the batch statistics (2, C) held by the op (they have no gradient: the
/// input gradient below accounts for them).
#[derive(Clone)]
struct Apply {
    format: MemoryFormat,
    eps: f32,
    relu: bool,
    stats: Tensor,
}

/// (x, residual, βγ) → relu(x̂·γ + β + residual), βγ being (2, C) f32 (β, then γ), with the batch
/// statistics held by the op as in [`Apply`].
#[derive(Clone)]
struct ApplyAddRelu {
    format: MemoryFormat,
    eps: f32,
    stats: Tensor,
}

/// (x, y, dy) → (2, C) f32: Σdy', Σdy'·x̂ per channel.
#[derive(Clone)]
struct BackwardReduce {
    format: MemoryFormat,
    eps: f32,
    relu: bool,
    stats: Tensor,
}

/// (x, y, dy) → dx; with `shortcut_grad`, (2, N, C, H, W): dx, then the shortcut's gradient
/// dy' (the gradient the ReLU passes on).
#[derive(Clone)]
struct BackwardData {
    format: MemoryFormat,
    eps: f32,
    relu: bool,
    stats: Tensor,
    gamma: Tensor,
    red: Tensor,
    shortcut_grad: bool,
}

/// running ← (1 − momentum)·running + momentum·scale·stats[row], in place; source: stats.
struct UpdateRunning {
    row: usize,
    momentum: f32,
    scale: f32,
}

fn f32_vec(p: &Tensor) -> Result<Vec<f32>> {
    p.flatten_all()?.to_vec1::<f32>()
}

impl CustomOp1 for Stats {
    fn name(&self) -> &'static str {
        "kd-batch-norm-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if self.running.is_some() {
            bail!(
                "batch norm statistics: the running statistics are updated in the op only on CUDA"
            );
        }
        if self.format == MemoryFormat::ChannelsLast {
            let op = channels_first!(self);
            return cpu_via_channels_first([(s, l)], |[(s, l)]| op.cpu_fwd(s, l));
        }
        let (n, c, hw) = self.format.n_c_hw(l.dims())?;
        let x = cpu::f32s_cow(s, l)?;
        let m = (n * hw) as f64;
        let stats = per_channel_pairs(c, |ch| {
            let planes = || (0..n).map(|b| &x[(b * c + ch) * hw..][..hw]);
            let mean = planes().map(|p| lane_sums(p, |v| [v, 0.0]).0).sum::<f64>() / m;
            let centre = mean as f32;
            let var = planes()
                .map(|p| lane_sums(p, |v| [(v - centre) * (v - centre), 0.0]).0)
                .sum::<f64>()
                / m;
            (mean as f32, var as f32)
        });
        Ok((CpuStorage::F32(stats), Shape::from((2, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = self.format.n_c_hw(l.dims())?;
        let out = crate::cuda_ops::bn_stats(s, l, self.format, dims, self.running.as_ref())?;
        Ok((out, Shape::from((2, dims.1))))
    }
}

impl CustomOp3 for Apply {
    fn name(&self) -> &'static str {
        "kd-batch-norm-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.format == MemoryFormat::ChannelsLast {
            let op = channels_first!(self);
            let args = [(s1, l1), (s2, l2), (s3, l3)];
            return cpu_via_channels_first(args, |[(s1, l1), (s2, l2), (s3, l3)]| {
                op.cpu_fwd(s1, l1, s2, l2, s3, l3)
            });
        }
        let (_, c, hw) = self.format.n_c_hw(l1.dims())?;
        let x = cpu::f32s_cow(s1, l1)?;
        let (gamma, beta) = (cpu::f32s(s2, l2)?, cpu::f32s(s3, l3)?);
        let st = f32_vec(&self.stats)?;
        let y = apply_cpu(&x, None, &st, (&gamma, &beta), (c, hw), self.eps, self.relu);
        Ok((cpu::from_f32s(y, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda_ops::bn_apply(
            [(s1, l1), (s2, l2), (s3, l3)],
            &self.stats,
            self.format,
            self.format.n_c_hw(l1.dims())?,
            self.eps,
            self.relu,
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let red = x.apply_op3_no_bwd(
            y,
            &dy,
            &BackwardReduce {
                format: self.format,
                eps: self.eps,
                relu: self.relu,
                stats: self.stats.clone(),
            },
        )?;
        let dx = x.apply_op3_no_bwd(
            y,
            &dy,
            &BackwardData {
                format: self.format,
                eps: self.eps,
                relu: self.relu,
                stats: self.stats.clone(),
                gamma: gamma.contiguous()?,
                red: red.clone(),
                shortcut_grad: false,
            },
        )?;
        // dγ = Σdy'·x̂, dβ = Σdy'.
        Ok((Some(dx), Some(red.get(1)?), Some(red.get(0)?)))
    }
}

impl CustomOp3 for ApplyAddRelu {
    fn name(&self) -> &'static str {
        "kd-batch-norm-apply-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.format == MemoryFormat::ChannelsLast {
            let op = channels_first!(self);
            let args = [(s1, l1), (s2, l2), (s3, l3)];
            return cpu_via_channels_first(args, |[(s1, l1), (s2, l2), (s3, l3)]| {
                op.cpu_fwd(s1, l1, s2, l2, s3, l3)
            });
        }
        let (_, c, hw) = self.format.n_c_hw(l1.dims())?;
        let (x, r) = (cpu::f32s_cow(s1, l1)?, cpu::f32s_cow(s2, l2)?);
        let gb = cpu::f32s(s3, l3)?;
        if r.len() != x.len() || gb.len() != 2 * c {
            bail!(
                "batch norm add relu: input {:?}, residual {:?}, βγ {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let st = f32_vec(&self.stats)?;
        let (beta, gamma) = gb.split_at(c);
        let y = apply_cpu(&x, Some(&r), &st, (gamma, beta), (c, hw), self.eps, true);
        Ok((cpu::from_f32s(y, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda_ops::bn_apply_add_relu(
            [(s1, l1), (s2, l2), (s3, l3)],
            &self.stats,
            self.format,
            self.format.n_c_hw(l1.dims())?,
            self.eps,
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _residual: &Tensor,
        beta_gamma: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // y > 0 is the mask of the ReLU after the sum, so the plain BatchNorm's backward with
        // its ReLU on gives the input's gradient; the shortcut's is the masked dy itself.
        let dy = dy.contiguous()?;
        let red = x.apply_op3_no_bwd(
            y,
            &dy,
            &BackwardReduce {
                format: self.format,
                eps: self.eps,
                relu: true,
                stats: self.stats.clone(),
            },
        )?;
        let both = x.apply_op3_no_bwd(
            y,
            &dy,
            &BackwardData {
                format: self.format,
                eps: self.eps,
                relu: true,
                stats: self.stats.clone(),
                gamma: beta_gamma.get(1)?,
                red: red.clone(),
                shortcut_grad: true,
            },
        )?;
        // (dβ, dγ) = (Σdy', Σdy'·x̂): the reduction itself.
        Ok((Some(both.get(0)?), Some(both.get(1)?), Some(red)))
    }
}

/// `x̂·γ + β`, plus `residual` when given, then the ReLU if `relu` (a residual always has it):
/// the apply pass of [`Apply`] and [`ApplyAddRelu`] on the CPU, one call per (N, C) plane, with
/// the batch statistics `st` ((2, C): mean, variance).
#[allow(unsafe_code)]
fn apply_cpu(
    x: &[f32],
    residual: Option<&[f32]>,
    st: &[f32],
    (gamma, beta): (&[f32], &[f32]),
    (c, hw): (usize, usize),
    eps: f32,
    relu: bool,
) -> Vec<f32> {
    let mut y = cpu::output_slots(x.len());
    // Plane p's channel is p % C.
    cpu::par_chunks(&mut y, hw, |plane, out| {
        let ch = plane % c;
        let invstd = 1.0 / (st[c + ch] + eps).sqrt();
        let (at, len) = (plane * hw, out.len());
        let x = &x[at..][..len];
        let rectify = |y: f32| if !(y > 0.0) { 0.0 } else { y };
        match residual {
            None => {
                for (o, &v) in out.iter_mut().zip(x) {
                    let y = (v - st[ch]) * invstd * gamma[ch] + beta[ch];
                    o.write(if relu { rectify(y) } else { y });
                }
            }
            Some(r) => {
                for ((o, &v), &r) in out.iter_mut().zip(x).zip(&r[at..][..len]) {
                    o.write(rectify((v - st[ch]) * invstd * gamma[ch] + beta[ch] + r));
                }
            }
        }
    });
    // SAFETY: the planes cover `y`, and each slot of a plane is written (its input slices have
    // the plane's length).
    unsafe { cpu::written(y) }
}

/// Σdy' and Σdy'·x̂ per channel (the CPU reference): f32 lanes within a plane, f64 across.
fn reduce_cpu(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    p: &[f32],
    (n, c, hw): (usize, usize, usize),
    eps: f32,
    relu: bool,
) -> Vec<f32> {
    per_channel_pairs(c, |ch| {
        let (invstd, mean) = (1.0 / (p[c + ch] + eps).sqrt(), p[ch]);
        let (mut s, mut sx) = (0f64, 0f64);
        for b in 0..n {
            let at = (b * c + ch) * hw;
            let (x, y, dy) = (&x[at..][..hw], &y[at..][..hw], &dy[at..][..hw]);
            let (ps, psx) = lane_sums3(x, y, dy, |x, y, dy| {
                let g = if relu && !(y > 0.0) { 0.0 } else { dy };
                [g, g * (x - mean)]
            });
            s += ps;
            sx += psx;
        }
        (s as f32, (sx * invstd as f64) as f32)
    })
}

/// Values per lane group in [`lane_sums`]: independent f32 accumulators, so that the loop
/// vectorises (a single running sum is a chain the compiler must keep in order).
const LANES: usize = 16;

/// (Σ f(v)[0], Σ f(v)[1]) over `v`: [`lane_sums3`] on one plane.
fn lane_sums(v: &[f32], f: impl Fn(f32) -> [f32; 2]) -> (f64, f64) {
    lane_sums3(v, v, v, |x, _, _| f(x))
}

/// (Σ f(x, y, dy)[0], Σ f(x, y, dy)[1]) over three planes of one length, in [`LANES`] f32
/// accumulators added up in f64.
fn lane_sums3(
    x: &[f32],
    y: &[f32],
    dy: &[f32],
    f: impl Fn(f32, f32, f32) -> [f32; 2],
) -> (f64, f64) {
    let (mut a, mut b) = ([0f32; LANES], [0f32; LANES]);
    let (xs, ys, ds) = (
        x.chunks_exact(LANES),
        y.chunks_exact(LANES),
        dy.chunks_exact(LANES),
    );
    let body = x.len() / LANES * LANES;
    for ((x, y), dy) in xs.zip(ys).zip(ds) {
        let lane = |v: &[f32]| -> [f32; LANES] { v.try_into().expect("chunks_exact") };
        let (x, y, dy) = (lane(x), lane(y), lane(dy));
        for i in 0..LANES {
            let [p, q] = f(x[i], y[i], dy[i]);
            a[i] += p;
            b[i] += q;
        }
    }
    let tail = (body..x.len()).map(|k| f(x[k], y[k], dy[k]));
    fold_lanes(&a, &b, tail)
}

fn fold_lanes(a: &[f32], b: &[f32], tail: impl Iterator<Item = [f32; 2]>) -> (f64, f64) {
    let sum = |v: &[f32]| v.iter().map(|&v| v as f64).sum::<f64>();
    tail.fold((sum(a), sum(b)), |(s, t), [p, q]| {
        (s + p as f64, t + q as f64)
    })
}

/// `f(ch)` = (first, second) for each channel, in parallel, as one (2, C) row-major vector.
fn per_channel_pairs(c: usize, f: impl Fn(usize) -> (f32, f32) + Sync) -> Vec<f32> {
    let pairs: Vec<(f32, f32)> = (0..c).into_par_iter().map(&f).collect();
    let (first, second): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
    [first, second].concat()
}

impl CustomOp3 for BackwardReduce {
    fn name(&self) -> &'static str {
        "kd-batch-norm-backward-reduce"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.format == MemoryFormat::ChannelsLast {
            let op = channels_first!(self);
            let args = [(s1, l1), (s2, l2), (s3, l3)];
            return cpu_via_channels_first(args, |[(s1, l1), (s2, l2), (s3, l3)]| {
                op.cpu_fwd(s1, l1, s2, l2, s3, l3)
            });
        }
        let dims = self.format.n_c_hw(l1.dims())?;
        let out = reduce_cpu(
            &cpu::f32s_cow(s1, l1)?,
            &cpu::f32s_cow(s2, l2)?,
            &cpu::f32s_cow(s3, l3)?,
            &f32_vec(&self.stats)?,
            dims,
            self.eps,
            self.relu,
        );
        Ok((CpuStorage::F32(out), Shape::from((2, dims.1))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = self.format.n_c_hw(l1.dims())?;
        let out = crate::cuda_ops::bn_backward_reduce(
            [(s1, l1), (s2, l2), (s3, l3)],
            &self.stats,
            self.format,
            dims,
            self.eps,
            self.relu,
        )?;
        Ok((out, Shape::from((2, dims.1))))
    }
}

impl CustomOp3 for BackwardData {
    fn name(&self) -> &'static str {
        "kd-batch-norm-backward-data"
    }

    #[allow(unsafe_code)]
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.format == MemoryFormat::ChannelsLast {
            let op = channels_first!(self);
            let args = [(s1, l1), (s2, l2), (s3, l3)];
            return cpu_via_channels_first(args, |[(s1, l1), (s2, l2), (s3, l3)]| {
                op.cpu_fwd(s1, l1, s2, l2, s3, l3)
            });
        }
        let (n, c, hw) = self.format.n_c_hw(l1.dims())?;
        let (x, y, dy) = (
            cpu::f32s_cow(s1, l1)?,
            cpu::f32s_cow(s2, l2)?,
            cpu::f32s_cow(s3, l3)?,
        );
        let st = f32_vec(&self.stats)?;
        let gamma = f32_vec(&self.gamma)?;
        let red = f32_vec(&self.red)?;
        let inv_m = 1.0 / (n * hw) as f32;
        let planes = n * c;
        let mut dx = cpu::output_slots(x.len() * (1 + self.shortcut_grad as usize));
        let relu = self.relu;
        // Planes 0..N·C are dx; with `shortcut_grad`, planes N·C.. the shortcut's gradient.
        cpu::par_chunks(&mut dx, hw, |plane, out| {
            let (shortcut, plane) = (plane >= planes, plane % planes);
            let at = plane * hw;
            let (x, y, dy) = (&x[at..][..hw], &y[at..][..hw], &dy[at..][..hw]);
            let masked = |y: f32, dy: f32| if relu && !(y > 0.0) { 0.0 } else { dy };
            if shortcut {
                for ((o, &y), &dy) in out.iter_mut().zip(y).zip(dy) {
                    o.write(masked(y, dy));
                }
                return;
            }
            let ch = plane % c;
            let (mean, invstd) = (st[ch], 1.0 / (st[c + ch] + self.eps).sqrt());
            // dx = γ·σ⁻¹·(dy' − Σdy'/M − x̂·Σ(dy'·x̂)/M), the per-channel factors taken out.
            let (scale, shift, slope) = (gamma[ch] * invstd, red[ch] * inv_m, red[c + ch] * inv_m);
            for (((o, &x), &y), &dy) in out.iter_mut().zip(x).zip(y).zip(dy) {
                o.write(scale * (masked(y, dy) - shift - (x - mean) * invstd * slope));
            }
        });
        // SAFETY: the planes cover `dx`, and each slot of a plane is written (x, y and dy are
        // sliced to the plane's length).
        let dx = unsafe { cpu::written(dx) };
        Ok((cpu::from_f32s(dx, s1.dtype())?, self.out_shape(l1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = self.format.n_c_hw(l1.dims())?;
        let out = crate::cuda_ops::bn_backward_data(
            [(s1, l1), (s2, l2), (s3, l3)],
            &self.stats,
            &self.gamma,
            &self.red,
            self.format,
            dims,
            self.eps,
            self.relu,
            self.shortcut_grad,
        )?;
        Ok((out, self.out_shape(l1)))
    }
}

impl BackwardData {
    /// x's shape, or (2, N, C, H, W) with the shortcut's gradient.
    fn out_shape(&self, l: &Layout) -> Shape {
        match self.shortcut_grad {
            false => l.shape().clone(),
            true => Shape::from([&[2][..], l.dims()].concat()),
        }
    }
}

impl InplaceOp2 for UpdateRunning {
    fn name(&self) -> &'static str {
        "kd-batch-norm-update-running"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let stats = cpu::f32s(s2, l2)?;
        let c = l1.dims()[0];
        for (k, r) in cpu::f32_slice_mut(s1, l1)?.iter_mut().enumerate() {
            *r = *r * (1.0 - self.momentum) + stats[self.row * c + k] * self.scale * self.momentum;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        crate::cuda_ops::bn_update_running(s1, l1, s2, l2, self.row, self.momentum, self.scale)
    }
}
