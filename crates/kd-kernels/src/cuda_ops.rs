//! Launches of our CUDA kernels on candle's CUDA storage (see `kernels/*.cu`).
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Storage, Tensor};

use crate::batch_norm::StatsRunning;
use crate::cuda::{
    bn_elementwise, bn_reduction, flat, kernel_name, rows, suffix, ADD_RELU, AUGMENT, BATCH_NORM,
    MAX_POOL, SOFTMAX_LOSS,
};
use crate::launch::{overlapping, LaunchGeometry};
use crate::memory_format::MemoryFormat;

/// Element types our kernels are instantiated for or read (u32: the losses' labels).
trait Elem: DeviceRepr + CudaDType + ValidAsZeroBits {}
impl Elem for f32 {}
impl Elem for half::bf16 {}
impl Elem for u32 {}

fn view<'a, T: Elem>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => bail!("kd CUDA kernels expect contiguous tensors"),
    }
}

/// Runs `f` with the f32 device view of `t` (a small per-channel tensor held by an op).
fn with_f32_view<R>(t: &Tensor, f: impl FnOnce(&CudaView<'_, f32>) -> Result<R>) -> Result<R> {
    let (guard, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*guard else {
        bail!(
            "expected a CUDA tensor, got one on {:?}",
            t.device().location()
        )
    };
    f(&view::<f32>(s, layout)?)
}

/// The f32 device views of the tensors whose storage `guards` hold (from
/// `Tensor::storage_and_layout`, kept alive by the caller); an error naming `what` for one that
/// is not on a CUDA device.
fn f32_views<'a>(
    guards: &'a [(candle_core::StorageRef<'_>, &Layout)],
    what: &str,
) -> Result<Vec<CudaView<'a, f32>>> {
    guards
        .iter()
        .map(|(guard, layout)| match &**guard {
            Storage::Cuda(s) => view::<f32>(s, layout),
            _ => bail!("{what} is not on a CUDA device"),
        })
        .collect()
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} = {v} exceeds i32")))
}

macro_rules! by_dtype {
    ($dtype:expr, $f:ident::<T>($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<half::bf16>($($arg),*),
            d => bail!("kd CUDA kernels support f32 and bf16, got {d:?}"),
        }
    };
}

// Every BatchNorm launch below takes its tensors' `format` and their (N, C, H·W) `dims`.

/// Per-channel (mean, biased variance) as (2, C) f32; with `running`, the running statistics
/// updated by the same last launch.
pub(crate) fn bn_stats(
    s: &CudaStorage,
    l: &Layout,
    format: MemoryFormat,
    dims: (usize, usize, usize),
    running: Option<&StatsRunning>,
) -> Result<CudaStorage> {
    by_dtype!(s.dtype(), bn_stats_t::<T>(s, l, format, dims, running))
}

fn bn_stats_t<T: Elem>(
    s: &CudaStorage,
    l: &Layout,
    format: MemoryFormat,
    (n, c, hw): (usize, usize, usize),
    running: Option<&StatsRunning>,
) -> Result<CudaStorage> {
    let dev = &s.device;
    let x = view::<T>(s, l)?;
    let grid = bn_reduction(format, (n, c, hw))?;
    let slices = grid.grid_dim.1 as usize;
    // SAFETY: every block writes its (count, mean, M2).
    let mut part = unsafe { dev.alloc::<f32>(3 * slices * c)? };
    let f = BATCH_NORM.func(dev, &kernel_name("bn_stats", format, s.dtype())?)?;
    let (n, c_, hw) = (i32_of(n, "N")?, i32_of(c, "C")?, i32_of(hw, "H·W")?);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&x).arg(&mut part).arg(&n).arg(&c_).arg(&hw);
    // SAFETY: argument types and sizes match bn_stats in batch_norm.cu.
    unsafe { b.launch(grid) }.w()?;
    let out = match running {
        None => finish_slices(dev, "bn_stats_finish", &part, c, slices)?,
        Some(r) => finish_stats_running(dev, &part, c, slices, r)?,
    };
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `bn_stats_finish_running`: the (2, C) statistics from the slices' partial states, and the
/// running mean and variance updated in place. They are written through device pointers taken
/// under candle's read locks (as `sgd_list` writes its parameters): the launch is ordered on
/// the device's one stream after every earlier use of them and before every later one, as an
/// in-place op's would be; the two must not overlap (checked).
fn finish_stats_running(
    dev: &candle_core::cuda_backend::CudaDevice,
    part: &CudaSlice<f32>,
    c: usize,
    slices: usize,
    r: &StatsRunning,
) -> Result<CudaSlice<f32>> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let guards = [r.mean.storage_and_layout(), r.var.storage_and_layout()];
    let views = f32_views(&guards, "batch norm: a running statistic")?;
    let (mv, vv) = (&views[0], &views[1]);
    if mv.len() != c || vv.len() != c {
        bail!(
            "batch norm: running statistics of {} and {} values for {c} channels",
            mv.len(),
            vv.len()
        );
    }
    let stream = dev.cuda_stream();
    let (mean_ptr, mean_sync) = mv.device_ptr(&stream);
    let (var_ptr, var_sync) = vv.device_ptr(&stream);
    let bytes = 4 * c as u64;
    if overlapping(vec![
        (mean_ptr, mean_ptr + bytes),
        (var_ptr, var_ptr + bytes),
    ]) {
        bail!("batch norm: the running mean and variance share memory");
    }
    // SAFETY: the kernel writes both rows of every channel.
    let mut out = unsafe { dev.alloc::<f32>(2 * c)? };
    let f = BATCH_NORM.func(dev, "bn_stats_finish_running")?;
    let (c_, s_) = (i32_of(c, "C")?, i32_of(slices, "slices")?);
    let mut b = stream.launch_builder(&f);
    b.arg(part)
        .arg(&mut out)
        .arg(&c_)
        .arg(&s_)
        .arg(&mean_ptr)
        .arg(&var_ptr)
        .arg(&r.momentum)
        .arg(&r.var_scale);
    // SAFETY: argument types and sizes match bn_stats_finish_running in batch_norm.cu (the two
    // pointers as 64-bit device addresses); both are live f32 ranges of C values, held under
    // the guards above until the launch is queued, and disjoint (checked).
    unsafe { b.launch(flat(c)) }.w()?;
    drop((mean_sync, var_sync));
    Ok(out)
}

/// Merges the per-slice partial results of a per-channel reduction into (2, C) f32 with the
/// kernel `finish` (`bn_stats_finish` or `bn_reduce_finish`).
fn finish_slices(
    dev: &candle_core::cuda_backend::CudaDevice,
    finish: &str,
    part: &CudaSlice<f32>,
    c: usize,
    slices: usize,
) -> Result<CudaSlice<f32>> {
    // SAFETY: the kernel writes both rows of every channel.
    let mut out = unsafe { dev.alloc::<f32>(2 * c)? };
    let f = BATCH_NORM.func(dev, finish)?;
    let (c_, s_) = (i32_of(c, "C")?, i32_of(slices, "slices")?);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(part).arg(&mut out).arg(&c_).arg(&s_);
    // SAFETY: argument types and sizes match bn_stats_finish / bn_reduce_finish.
    unsafe { b.launch(flat(c)) }.w()?;
    Ok(out)
}

type Arg<'a> = (&'a CudaStorage, &'a Layout);

pub(crate) fn bn_apply(
    args: [Arg<'_>; 3],
    stats: &Tensor,
    format: MemoryFormat,
    dims: (usize, usize, usize),
    eps: f32,
    relu: bool,
) -> Result<CudaStorage> {
    by_dtype!(
        args[0].0.dtype(),
        bn_apply_t::<T>(args, stats, format, dims, eps, relu)
    )
}

/// A residual block's tail in training mode, `relu(bn(x) + residual)`: `bn_apply_add_relu_*`
/// on (x, residual, βγ), βγ being β and γ as one (2, C) f32 tensor.
pub(crate) fn bn_apply_add_relu(
    args: [Arg<'_>; 3],
    stats: &Tensor,
    format: MemoryFormat,
    dims: (usize, usize, usize),
    eps: f32,
) -> Result<CudaStorage> {
    by_dtype!(
        args[0].0.dtype(),
        bn_apply_add_relu_t::<T>(args, stats, format, dims, eps)
    )
}

/// The element-wise kernels' (N, C, H·W) as i32, N only for channels-last (whose kernels
/// cannot read it from the grid).
fn elementwise_dims(
    format: MemoryFormat,
    (n, c, hw): (usize, usize, usize),
) -> Result<(Option<i32>, i32, i32)> {
    let n = match format {
        MemoryFormat::ChannelsFirst => None,
        MemoryFormat::ChannelsLast => Some(i32_of(n, "N")?),
    };
    Ok((n, i32_of(c, "C")?, i32_of(hw, "H·W")?))
}

fn bn_apply_add_relu_t<T: Elem>(
    [(sx, lx), (sr, lr), (sg, lg)]: [Arg<'_>; 3],
    stats: &Tensor,
    format: MemoryFormat,
    dims: (usize, usize, usize),
    eps: f32,
) -> Result<CudaStorage> {
    let c = dims.1;
    let dev = &sx.device;
    let total = lx.shape().elem_count();
    if lr.shape().elem_count() != total || lg.shape().elem_count() != 2 * c {
        bail!(
            "batch norm add relu: input {:?}, residual {:?}, βγ {:?}",
            lx.dims(),
            lr.dims(),
            lg.dims()
        );
    }
    let (x, r, beta_gamma) = (view::<T>(sx, lx)?, view::<T>(sr, lr)?, view::<f32>(sg, lg)?);
    // SAFETY: every element is written by the kernel.
    let mut y = unsafe { dev.alloc::<T>(total)? };
    let f = BATCH_NORM.func(dev, &kernel_name("bn_apply_add_relu", format, sx.dtype())?)?;
    let (n_, c_, hw_) = elementwise_dims(format, dims)?;
    let grid = bn_elementwise(format, dims)?;
    with_f32_view(stats, |st| {
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&r).arg(st).arg(&beta_gamma).arg(&mut y);
        if let Some(n_) = &n_ {
            b.arg(n_);
        }
        b.arg(&c_).arg(&hw_).arg(&eps);
        // SAFETY: argument types and sizes match bn_apply_add_relu in batch_norm.cu.
        unsafe { b.launch(grid) }.w()?;
        Ok(())
    })?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

fn bn_apply_t<T: Elem>(
    [(sx, lx), (sg, lg), (sb, lb)]: [Arg<'_>; 3],
    stats: &Tensor,
    format: MemoryFormat,
    dims: (usize, usize, usize),
    eps: f32,
    relu: bool,
) -> Result<CudaStorage> {
    let dev = &sx.device;
    let total = lx.shape().elem_count();
    let x = view::<T>(sx, lx)?;
    let (gamma, beta) = (view::<f32>(sg, lg)?, view::<f32>(sb, lb)?);
    // SAFETY: every element is written by the kernel.
    let mut y = unsafe { dev.alloc::<T>(total)? };
    let f = BATCH_NORM.func(dev, &kernel_name("bn_apply", format, sx.dtype())?)?;
    let ((n_, c_, hw_), relu_) = (elementwise_dims(format, dims)?, relu as i32);
    let grid = bn_elementwise(format, dims)?;
    with_f32_view(stats, |st| {
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(st).arg(&gamma).arg(&beta).arg(&mut y);
        if let Some(n_) = &n_ {
            b.arg(n_);
        }
        b.arg(&c_).arg(&hw_).arg(&eps).arg(&relu_);
        // SAFETY: argument types and sizes match bn_apply in batch_norm.cu.
        unsafe { b.launch(grid) }.w()?;
        Ok(())
    })?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// BatchNorm in eval mode from the four per-channel vectors `params` (mean, variance, γ, β:
/// f32 (C,) CUDA tensors), then `+ residual` and the ReLU when a residual is given, else the
/// ReLU if `relu`: `bn_eval_*` or `bn_eval_add_relu_*`, one launch.
pub(crate) fn bn_eval(
    x: Arg<'_>,
    residual: Option<Arg<'_>>,
    params: [&Tensor; 4],
    format: MemoryFormat,
    dims: (usize, usize, usize),
    eps: f32,
    relu: bool,
) -> Result<CudaStorage> {
    by_dtype!(
        x.0.dtype(),
        bn_eval_t::<T>(x, residual, params, format, dims, eps, relu)
    )
}

fn bn_eval_t<T: Elem>(
    (sx, lx): Arg<'_>,
    residual: Option<Arg<'_>>,
    params: [&Tensor; 4],
    format: MemoryFormat,
    dims: (usize, usize, usize),
    eps: f32,
    relu: bool,
) -> Result<CudaStorage> {
    let c = dims.1;
    let dev = &sx.device;
    let total = lx.shape().elem_count();
    let x = view::<T>(sx, lx)?;
    let r = match residual {
        Some((sr, lr)) if lr.shape().elem_count() == total => Some(view::<T>(sr, lr)?),
        Some((_, lr)) => bail!(
            "batch norm eval: input {:?} but residual {:?}",
            lx.dims(),
            lr.dims()
        ),
        None => None,
    };
    let guards = params.map(|t| t.storage_and_layout());
    let views = f32_views(&guards, "batch norm eval: a per-channel parameter")?;
    if let Some(v) = views.iter().find(|v| v.len() != c) {
        bail!(
            "batch norm eval: {} values of a per-channel parameter for {c} channels",
            v.len()
        );
    }
    // SAFETY: every element is written by the kernel.
    let mut y = unsafe { dev.alloc::<T>(total)? };
    let base = match r {
        Some(_) => "bn_eval_add_relu",
        None => "bn_eval",
    };
    let f = BATCH_NORM.func(dev, &kernel_name(base, format, sx.dtype())?)?;
    let ((n_, c_, hw_), relu_) = (elementwise_dims(format, dims)?, relu as i32);
    let grid = bn_elementwise(format, dims)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&x);
    for v in &views {
        b.arg(v);
    }
    if let Some(r) = &r {
        b.arg(r);
    }
    b.arg(&mut y);
    if let Some(n_) = &n_ {
        b.arg(n_);
    }
    b.arg(&c_).arg(&hw_).arg(&eps);
    if r.is_none() {
        b.arg(&relu_);
    }
    // SAFETY: argument types and sizes match bn_eval / bn_eval_add_relu in batch_norm.cu (the
    // parameters in the kernel's order: mean, variance, γ, β).
    unsafe { b.launch(grid) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

pub(crate) fn bn_update_running(
    running: &mut CudaStorage,
    lr: &Layout,
    stats: &CudaStorage,
    ls: &Layout,
    row: usize,
    momentum: f32,
    scale: f32,
) -> Result<()> {
    let dev = running.device.clone();
    let c = lr.shape().elem_count();
    let st = view::<f32>(stats, ls)?;
    let mut r = view_mut(running, lr)?;
    let f = BATCH_NORM.func(&dev, "bn_update_running")?;
    let (c_, row_) = (i32_of(c, "C")?, row as i32);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&mut r)
        .arg(&st)
        .arg(&c_)
        .arg(&row_)
        .arg(&momentum)
        .arg(&scale);
    // SAFETY: argument types and sizes match bn_update_running in batch_norm.cu.
    unsafe { b.launch(flat(c)) }.w()?;
    Ok(())
}

pub(crate) fn bn_backward_reduce(
    args: [Arg<'_>; 3],
    stats: &Tensor,
    format: MemoryFormat,
    dims: (usize, usize, usize),
    eps: f32,
    relu: bool,
) -> Result<CudaStorage> {
    by_dtype!(
        args[0].0.dtype(),
        bn_backward_reduce_t::<T>(args, stats, format, dims, eps, relu)
    )
}

fn bn_backward_reduce_t<T: Elem>(
    [(sx, lx), (sy, ly), (sd, ld)]: [Arg<'_>; 3],
    stats: &Tensor,
    format: MemoryFormat,
    (n, c, hw): (usize, usize, usize),
    eps: f32,
    relu: bool,
) -> Result<CudaStorage> {
    let dev = &sx.device;
    let (x, y, dy) = (view::<T>(sx, lx)?, view::<T>(sy, ly)?, view::<T>(sd, ld)?);
    let grid = bn_reduction(format, (n, c, hw))?;
    let slices = grid.grid_dim.1 as usize;
    // SAFETY: every block writes its two sums.
    let mut part = unsafe { dev.alloc::<f32>(2 * slices * c)? };
    let f = BATCH_NORM.func(dev, &kernel_name("bn_backward_reduce", format, sx.dtype())?)?;
    let (n_, c_, hw_, relu_) = (
        i32_of(n, "N")?,
        i32_of(c, "C")?,
        i32_of(hw, "H·W")?,
        relu as i32,
    );
    with_f32_view(stats, |p| {
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&x).arg(&y).arg(&dy).arg(p).arg(&mut part);
        b.arg(&n_).arg(&c_).arg(&hw_).arg(&eps).arg(&relu_);
        // SAFETY: argument types and sizes match bn_backward_reduce in batch_norm.cu.
        unsafe { b.launch(grid) }.w()?;
        Ok(())
    })?;
    let red = finish_slices(dev, "bn_reduce_finish", &part, c, slices)?;
    Ok(CudaStorage::wrap_cuda_slice(red, dev.clone()))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn bn_backward_data(
    args: [Arg<'_>; 3],
    stats: &Tensor,
    gamma: &Tensor,
    red: &Tensor,
    format: MemoryFormat,
    dims: (usize, usize, usize),
    eps: f32,
    relu: bool,
    shortcut_grad: bool,
) -> Result<CudaStorage> {
    by_dtype!(
        args[0].0.dtype(),
        bn_backward_data_t::<T>(
            args,
            stats,
            gamma,
            red,
            format,
            dims,
            eps,
            relu,
            shortcut_grad
        )
    )
}

#[allow(clippy::too_many_arguments)]
fn bn_backward_data_t<T: Elem>(
    [(sx, lx), (sy, ly), (sd, ld)]: [Arg<'_>; 3],
    stats: &Tensor,
    gamma: &Tensor,
    red: &Tensor,
    format: MemoryFormat,
    (n, c, hw): (usize, usize, usize),
    eps: f32,
    relu: bool,
    shortcut_grad: bool,
) -> Result<CudaStorage> {
    let dev = &sx.device;
    let total = lx.shape().elem_count();
    let (x, y, dy) = (view::<T>(sx, lx)?, view::<T>(sy, ly)?, view::<T>(sd, ld)?);
    // SAFETY: every element is written by the kernel (both halves with `shortcut_grad`).
    let mut dx = unsafe { dev.alloc::<T>(total * (1 + shortcut_grad as usize))? };
    let f = BATCH_NORM.func(dev, &kernel_name("bn_backward_data", format, sx.dtype())?)?;
    let (n_, c_, hw_) = (i32_of(n, "N")?, i32_of(c, "C")?, i32_of(hw, "H·W")?);
    let (relu_, shortcut_grad_) = (relu as i32, shortcut_grad as i32);
    let grid = bn_elementwise(format, (n, c, hw))?;
    with_f32_view(stats, |p| {
        with_f32_view(red, |r| {
            with_f32_view(gamma, |g| {
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                b.arg(&x).arg(&y).arg(&dy).arg(p).arg(g).arg(r).arg(&mut dx);
                b.arg(&n_).arg(&c_).arg(&hw_).arg(&eps).arg(&relu_);
                b.arg(&shortcut_grad_);
                // SAFETY: argument types and sizes match bn_backward_data in batch_norm.cu.
                unsafe { b.launch(grid) }.w()?;
                Ok(())
            })
        })
    })?;
    Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
}

/// `xent_fwd`: the cross-entropy of (B, K) f32 logits against two label sets (one scalar).
pub(crate) fn xent_fwd(
    [(sz, lz), (sa, la), (sb, lb)]: [Arg<'_>; 3],
    (b, k): (usize, usize),
    t: &crate::softmax_loss::Target,
) -> Result<CudaStorage> {
    let dev = &sz.device;
    let z = view::<f32>(sz, lz)?;
    let (ya, yb) = (view::<u32>(sa, la)?, view::<u32>(sb, lb)?);
    // SAFETY: thread 0 writes the one value.
    let mut loss = unsafe { dev.alloc::<f32>(1)? };
    let f = SOFTMAX_LOSS.func(dev, "xent_fwd")?;
    let (b_, k_) = (i32_of(b, "B")?, i32_of(k, "K")?);
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    l.arg(&z).arg(&ya).arg(&yb).arg(&mut loss);
    l.arg(&b_).arg(&k_).arg(&t.wa).arg(&t.wb).arg(&t.eps_k);
    // SAFETY: argument types and sizes match xent_fwd in softmax_loss.cu.
    unsafe { l.launch(LaunchGeometry::loss_rows().into()) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(loss, dev.clone()))
}

/// `xent_bwd`: the gradient of the logits, `grad`'s one value times (p − q) / B.
pub(crate) fn xent_bwd(
    [(sz, lz), (sa, la), (sb, lb)]: [Arg<'_>; 3],
    (b, k): (usize, usize),
    t: &crate::softmax_loss::Target,
    grad: &Tensor,
) -> Result<CudaStorage> {
    let dev = &sz.device;
    let z = view::<f32>(sz, lz)?;
    let (ya, yb) = (view::<u32>(sa, la)?, view::<u32>(sb, lb)?);
    // SAFETY: every element is written by the kernel (one warp a row).
    let mut dz = unsafe { dev.alloc::<f32>(b * k)? };
    let f = SOFTMAX_LOSS.func(dev, "xent_bwd")?;
    let (b_, k_) = (i32_of(b, "B")?, i32_of(k, "K")?);
    with_f32_view(grad, |g| {
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(&f);
        l.arg(&z).arg(&ya).arg(&yb).arg(g).arg(&mut dz);
        l.arg(&b_).arg(&k_).arg(&t.wa).arg(&t.wb).arg(&t.eps_k);
        // SAFETY: argument types and sizes match xent_bwd in softmax_loss.cu.
        unsafe { l.launch(LaunchGeometry::warp_per_row(b).into()) }.w()?;
        Ok(())
    })?;
    Ok(CudaStorage::wrap_cuda_slice(dz, dev.clone()))
}

/// `kd_kl_fwd`: Hinton's KD loss of (B, K) f32 student and teacher logits (one scalar).
pub(crate) fn kd_kl_fwd(
    [(ss, ls), (st, lt)]: [Arg<'_>; 2],
    (b, k): (usize, usize),
    t: f32,
) -> Result<CudaStorage> {
    let dev = &ss.device;
    let (s, tt) = (view::<f32>(ss, ls)?, view::<f32>(st, lt)?);
    // SAFETY: thread 0 writes the one value.
    let mut loss = unsafe { dev.alloc::<f32>(1)? };
    let f = SOFTMAX_LOSS.func(dev, "kd_kl_fwd")?;
    let (b_, k_, inv_t, t_sq) = (i32_of(b, "B")?, i32_of(k, "K")?, 1.0 / t, t * t);
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    l.arg(&s).arg(&tt).arg(&mut loss);
    l.arg(&b_).arg(&k_).arg(&inv_t).arg(&t_sq);
    // SAFETY: argument types and sizes match kd_kl_fwd in softmax_loss.cu.
    unsafe { l.launch(LaunchGeometry::loss_rows().into()) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(loss, dev.clone()))
}

/// `kd_kl_bwd`: the student's gradient, `grad`'s one value times T·(p_s − p_t) / B.
pub(crate) fn kd_kl_bwd(
    [(ss, ls), (st, lt)]: [Arg<'_>; 2],
    (b, k): (usize, usize),
    t: f32,
    grad: &Tensor,
) -> Result<CudaStorage> {
    let dev = &ss.device;
    let (s, tt) = (view::<f32>(ss, ls)?, view::<f32>(st, lt)?);
    // SAFETY: every element is written by the kernel (one warp a row).
    let mut ds = unsafe { dev.alloc::<f32>(b * k)? };
    let f = SOFTMAX_LOSS.func(dev, "kd_kl_bwd")?;
    let (b_, k_, inv_t) = (i32_of(b, "B")?, i32_of(k, "K")?, 1.0 / t);
    with_f32_view(grad, |g| {
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(&f);
        l.arg(&s).arg(&tt).arg(g).arg(&mut ds);
        l.arg(&b_).arg(&k_).arg(&inv_t).arg(&t);
        // SAFETY: argument types and sizes match kd_kl_bwd in softmax_loss.cu.
        unsafe { l.launch(LaunchGeometry::warp_per_row(b).into()) }.w()?;
        Ok(())
    })?;
    Ok(CudaStorage::wrap_cuda_slice(ds, dev.clone()))
}

/// Geometry of a max-pool launch: the tensors' layout, the input's (N, C, H, W) and the
/// output's (H', W'), kernel, stride and padding.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PoolDims {
    pub format: MemoryFormat,
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl PoolDims {
    /// The arguments after the buffers: `planes` (N·C, as a 64-bit integer) channels-first, N
    /// and C channels-last; then H, W, H', W', kernel, stride, padding.
    fn args(&self) -> Result<(Option<i64>, Vec<i32>)> {
        let mut v = Vec::with_capacity(9);
        let planes = match self.format {
            MemoryFormat::ChannelsFirst => Some((self.n * self.c) as i64),
            MemoryFormat::ChannelsLast => {
                // The kernels count pixels in an int.
                rows(self.n, (self.h * self.w).max(self.oh * self.ow))?;
                v.extend([i32_of(self.n, "N")?, i32_of(self.c, "C")?]);
                None
            }
        };
        for (x, what) in [
            (self.h, "H"),
            (self.w, "W"),
            (self.oh, "OH"),
            (self.ow, "OW"),
            (self.kernel, "kernel"),
            (self.stride, "stride"),
            (self.padding, "padding"),
        ] {
            v.push(i32_of(x, what)?);
        }
        Ok((planes, v))
    }

    /// The launch over `pixels` pixels of every channel (N·H'·W' forward, N·H·W backward).
    fn launch(&self, pixels: usize) -> LaunchConfig {
        match self.format {
            MemoryFormat::ChannelsFirst => flat(pixels * self.c),
            MemoryFormat::ChannelsLast => LaunchGeometry::channels_last_rows(pixels, self.c).into(),
        }
    }
}

/// The pooled (N, C, H', W') or (N, H', W', C) tensor of `x`.
pub(crate) fn max_pool_fwd(x: Arg<'_>, d: PoolDims) -> Result<CudaStorage> {
    let pixels = d.n * d.oh * d.ow;
    by_dtype!(
        x.0.dtype(),
        max_pool_t::<T>("max_pool_fwd", &[x], d, pixels)
    )
}

/// The gradient of `x` from the pooled output's gradient `dy`.
pub(crate) fn max_pool_bwd(x: Arg<'_>, dy: Arg<'_>, d: PoolDims) -> Result<CudaStorage> {
    let pixels = d.n * d.h * d.w;
    by_dtype!(
        x.0.dtype(),
        max_pool_t::<T>("max_pool_bwd", &[x, dy], d, pixels)
    )
}

/// Max-pool kernel `base` of `d.format` on `inputs`, writing `pixels` pixels of every channel.
fn max_pool_t<T: Elem>(
    base: &str,
    inputs: &[Arg<'_>],
    d: PoolDims,
    pixels: usize,
) -> Result<CudaStorage> {
    let dev = &inputs[0].0.device;
    let views = inputs
        .iter()
        .map(|&(s, l)| view::<T>(s, l))
        .collect::<Result<Vec<_>>>()?;
    // SAFETY: every element is written by the kernel.
    let mut out = unsafe { dev.alloc::<T>(pixels * d.c)? };
    let f = MAX_POOL.func(dev, &kernel_name(base, d.format, inputs[0].0.dtype())?)?;
    let (planes, g) = d.args()?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    for v in &views {
        b.arg(v);
    }
    b.arg(&mut out);
    if let Some(planes) = &planes {
        b.arg(planes);
    }
    for v in &g {
        b.arg(v);
    }
    // SAFETY: argument types and sizes match `base` (channels-first or `_cl`) in max_pool.cu:
    // x, dy for the backward, the output, then `PoolDims::args`.
    unsafe { b.launch(d.launch(pixels)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// Augments and mixes a batch: images (N, C, H, W) u8, plan (B, 5) u32, norm (2·C) f32 (scale,
/// shift).
pub(crate) fn augment(
    images: (&CudaStorage, &Layout),
    plan: (&CudaStorage, &Layout),
    norm: &Tensor,
    out_dtype: DType,
    pad: usize,
    mix: crate::augment::MixKind,
) -> Result<CudaStorage> {
    by_dtype!(
        out_dtype,
        augment_t::<T>(images, plan, norm, out_dtype, pad, mix)
    )
}

fn augment_t<T: Elem>(
    (si, li): (&CudaStorage, &Layout),
    (sp, lp): (&CudaStorage, &Layout),
    norm: &Tensor,
    out_dtype: DType,
    pad: usize,
    mix: crate::augment::MixKind,
) -> Result<CudaStorage> {
    let dev = &si.device;
    let [_, c, h, w] = match li.dims() {
        [n, c, h, w] => [*n, *c, *h, *w],
        d => bail!("augment expects images (N, C, H, W), got {d:?}"),
    };
    let bsz = lp.dims()[0];
    let images = view::<u8>(si, li)?;
    let plan = match lp.contiguous_offsets() {
        Some((a, b)) => sp.as_cuda_slice::<u32>()?.slice(a..b),
        None => bail!("augment expects a contiguous plan"),
    };
    let total = bsz * c * h * w;
    // SAFETY: every element is written by the kernel.
    let mut out = unsafe { dev.alloc::<T>(total)? };
    let f = AUGMENT.func(dev, &format!("augment_{}", suffix(out_dtype)?))?;
    let a = [
        i32_of(bsz, "batch")?,
        i32_of(c, "C")?,
        i32_of(h, "H")?,
        i32_of(w, "W")?,
        i32_of(pad, "padding")?,
    ];
    let (mode, lambda, cut) = mix.kernel_args();
    let mut mix_args = [mode, 0, 0, 0, 0];
    for (slot, v) in mix_args[1..].iter_mut().zip(cut) {
        *slot = i32_of(v, "CutMix box")?;
    }
    with_f32_view(norm, |nv| {
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&images).arg(&plan).arg(nv).arg(&mut out);
        for v in &a {
            b.arg(v);
        }
        b.arg(&mix_args[0]).arg(&lambda);
        for v in &mix_args[1..] {
            b.arg(v);
        }
        // SAFETY: argument types and sizes match augment in augment.cu.
        unsafe { b.launch(flat(total)) }.w()?;
        Ok(())
    })?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

impl Elem for u8 {}

fn view_mut<'a>(
    s: &'a mut CudaStorage,
    l: &Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaViewMut<'a, f32>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice_mut::<f32>()?.slice_mut(a..b)),
        None => bail!("kd CUDA kernels expect contiguous tensors"),
    }
}

pub(crate) fn sgd_momentum(
    buf: &mut CudaStorage,
    lb: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    p: &CudaStorage,
    lp: &Layout,
    s: &crate::sgd::SgdStep,
) -> Result<()> {
    let dev = buf.device.clone();
    let n = lb.shape().elem_count();
    let (gv, pv) = (view::<f32>(g, lg)?, view::<f32>(p, lp)?);
    let mut bv = view_mut(buf, lb)?;
    let f = crate::cuda::SGD.func(&dev, "sgd_momentum_f32")?;
    let (n_, wd, mu, damp) = (
        n as i64,
        s.weight_decay as f32,
        s.momentum as f32,
        (1.0 - s.dampening) as f32,
    );
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&mut bv)
        .arg(&gv)
        .arg(&pv)
        .arg(&n_)
        .arg(&wd)
        .arg(&mu)
        .arg(&damp);
    // SAFETY: argument types and sizes match sgd_momentum_f32 in sgd.cu.
    unsafe { b.launch(flat(n)) }.w()?;
    Ok(())
}

pub(crate) fn sgd_param(
    p: &mut CudaStorage,
    lp: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    buf: &CudaStorage,
    lb: &Layout,
    s: &crate::sgd::SgdStep,
) -> Result<()> {
    let dev = p.device.clone();
    let n = lp.shape().elem_count();
    let (gv, bv) = (view::<f32>(g, lg)?, view::<f32>(buf, lb)?);
    let mut pv = view_mut(p, lp)?;
    let f = crate::cuda::SGD.func(&dev, "sgd_param_f32")?;
    let (n_, lr, wd, mu, nesterov) = (
        n as i64,
        s.lr as f32,
        s.weight_decay as f32,
        s.momentum as f32,
        s.nesterov as i32,
    );
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&mut pv)
        .arg(&gv)
        .arg(&bv)
        .arg(&n_)
        .arg(&lr)
        .arg(&wd)
        .arg(&mu)
        .arg(&nesterov);
    // SAFETY: argument types and sizes match sgd_param_f32 in sgd.cu.
    unsafe { b.launch(flat(n)) }.w()?;
    Ok(())
}

/// `kernel` (`add_relu` or `relu_backward` in add_relu.cu) on two same-shape inputs of one
/// dtype, writing a third: (a, b, out, n).
pub(crate) fn elementwise2(kernel: &str, a: Arg<'_>, b: Arg<'_>) -> Result<CudaStorage> {
    if a.0.dtype() != b.0.dtype() {
        bail!("{kernel}: operands {:?} and {:?}", a.0.dtype(), b.0.dtype());
    }
    by_dtype!(a.0.dtype(), elementwise2_t::<T>(kernel, a, b))
}

fn elementwise2_t<T: Elem>(
    kernel: &str,
    (sa, la): Arg<'_>,
    (sb, lb): Arg<'_>,
) -> Result<CudaStorage> {
    let dev = &sa.device;
    let n = la.shape().elem_count();
    if lb.shape().elem_count() != n {
        bail!(
            "{kernel}: operands of {n} and {} elements",
            lb.shape().elem_count()
        );
    }
    let (a, b) = (view::<T>(sa, la)?, view::<T>(sb, lb)?);
    // SAFETY: every element is written by the kernel.
    let mut out = unsafe { dev.alloc::<T>(n)? };
    let f = ADD_RELU.func(dev, &format!("{kernel}_{}", suffix(sa.dtype())?))?;
    let n_ = n as i64;
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    l.arg(&a).arg(&b).arg(&mut out).arg(&n_);
    // SAFETY: argument types and sizes match add_relu / relu_backward in add_relu.cu.
    unsafe { l.launch(flat(n)) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `SgdList` in sgd.cu, field for field (2,568 bytes, passed by value as the kernel argument).
#[repr(C)]
struct SgdList {
    p: [u64; crate::launch::SGD_LIST],
    g: [u64; crate::launch::SGD_LIST],
    buf: [u64; crate::launch::SGD_LIST],
    n: [i64; crate::launch::SGD_LIST],
    wd: [f32; crate::launch::SGD_LIST],
    first_block: [i32; crate::launch::SGD_LIST + 1],
    count: i32,
}

pub(crate) const SGD_LIST_BYTES: usize = std::mem::size_of::<SgdList>();

// SAFETY: plain old data of the kernel parameter's layout (`#[repr(C)]`, the C struct's fields in
// order, no padding but C's).
unsafe impl DeviceRepr for SgdList {}

/// [`crate::sgd::sgd_momentum_steps`] on CUDA: the updates in runs of at most
/// [`crate::launch::SGD_LIST`] that share (lr, momentum, dampening, Nesterov), one
/// `sgd_list_f32` launch a run. The parameters and buffers are written through device pointers
/// taken under candle's read locks: the launch is ordered on the device's one stream after every
/// earlier use of them and before every later one, as an in-place op's would be, and the
/// caller's tensors are distinct (checked here: no two written ranges overlap).
pub(crate) fn sgd_list(updates: &[crate::sgd::SgdUpdate<'_>]) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let shared = |s: &crate::sgd::SgdStep| {
        (
            s.lr.to_bits(),
            s.momentum.to_bits(),
            s.dampening.to_bits(),
            s.nesterov,
        )
    };
    let mut start = 0;
    while start < updates.len() {
        let key = shared(&updates[start].step);
        let len = updates[start..]
            .iter()
            .take(crate::launch::SGD_LIST)
            .take_while(|u| shared(&u.step) == key)
            .count();
        let run = &updates[start..start + len];
        start += len;
        let grads = run
            .iter()
            .map(|u| u.grad.contiguous())
            .collect::<Result<Vec<_>>>()?;
        let lens: Vec<usize> = run.iter().map(|u| u.param.elem_count()).collect();
        let Some((geometry, first_block)) = crate::launch::sgd_list(&lens) else {
            bail!(
                "fused SGD: {} parameters overflow one launch's blocks",
                run.len()
            );
        };
        let mut guards = Vec::with_capacity(3 * run.len());
        for (u, g) in run.iter().zip(&grads) {
            guards.push(u.param.storage_and_layout());
            guards.push(g.storage_and_layout());
            guards.push(u.buf.storage_and_layout());
        }
        let views = f32_views(&guards, "fused SGD: a tensor of the CUDA update")?;
        let dev = run[0].param.device().as_cuda_device()?.clone();
        let stream = dev.cuda_stream();
        let mut list = SgdList {
            p: [0; crate::launch::SGD_LIST],
            g: [0; crate::launch::SGD_LIST],
            buf: [0; crate::launch::SGD_LIST],
            n: [0; crate::launch::SGD_LIST],
            wd: [0.0; crate::launch::SGD_LIST],
            first_block: [0; crate::launch::SGD_LIST + 1],
            count: run.len() as i32,
        };
        list.first_block[..first_block.len()].copy_from_slice(&first_block);
        let mut syncs = Vec::with_capacity(views.len());
        let mut written = Vec::with_capacity(2 * run.len());
        for (i, (u, tensors)) in run.iter().zip(views.chunks(3)).enumerate() {
            let mut ptr = |k: usize| {
                let (p, sync) = tensors[k].device_ptr(&stream);
                syncs.push(sync);
                p
            };
            (list.p[i], list.g[i], list.buf[i]) = (ptr(0), ptr(1), ptr(2));
            list.n[i] = lens[i] as i64;
            list.wd[i] = u.step.weight_decay as f32;
            let bytes = 4 * lens[i] as u64;
            written.push((list.p[i], list.p[i] + bytes));
            written.push((list.buf[i], list.buf[i] + bytes));
        }
        if overlapping(written) {
            bail!("fused SGD: two of the updated parameters or momentum buffers share memory");
        }
        let s = &run[0].step;
        let (lr, mu, damp, nesterov) = (
            s.lr as f32,
            s.momentum as f32,
            (1.0 - s.dampening) as f32,
            s.nesterov as i32,
        );
        let f = crate::cuda::SGD.func(&dev, "sgd_list_f32")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&list).arg(&lr).arg(&mu).arg(&damp).arg(&nesterov);
        // SAFETY: argument types and sizes match sgd_list_f32 in sgd.cu (the list as its C
        // struct); every pointer is a live f32 range of `n` elements, held under the guards above
        // until the launch is queued, the written ranges disjoint (checked).
        unsafe { b.launch(geometry.into()) }.w()?;
        drop(syncs);
    }
    Ok(())
}
