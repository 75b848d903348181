//! cuDNN forward, backward-data and backward-filter for [`crate::conv`].
//!
//! Per thread and device: one cuDNN handle on candle's stream, one workspace that only grows,
//! and the algorithms chosen (cuDNN's heuristics, under the current math type) per shape.
//! Descriptors are made per call: they are host-side structs, microseconds against the kernel.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    CudnnError, FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorageSlice, DeviceId};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, WithDType};

use crate::conv::Conv2dGeometry;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    x: [usize; 4],
    w: [usize; 4],
    g: Conv2dGeometry,
    dtype: DType,
    tf32: bool,
}

#[derive(Default)]
struct Algos {
    fwd: Option<sys::cudnnConvolutionFwdAlgo_t>,
    bwd_data: Option<sys::cudnnConvolutionBwdDataAlgo_t>,
    bwd_filter: Option<sys::cudnnConvolutionBwdFilterAlgo_t>,
}

struct State {
    cudnn: Arc<Cudnn>,
    workspace: Option<CudaSlice<u8>>,
    algos: HashMap<Key, Algos>,
}

thread_local! {
    // cuDNN handles are neither Send nor Sync, hence per thread.
    static STATES: RefCell<HashMap<DeviceId, State>> = RefCell::new(HashMap::new());
}

fn with_state<R>(dev: &CudaDevice, f: impl FnOnce(&mut State) -> Result<R>) -> Result<R> {
    STATES.with(|states| {
        let mut states = states.borrow_mut();
        let state = match states.entry(dev.id()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(State {
                cudnn: Cudnn::new(dev.cuda_stream())?,
                workspace: None,
                algos: HashMap::new(),
            }),
        };
        f(state)
    })
}

impl Key {
    fn new<T: Elem>(x: [usize; 4], w: [usize; 4], g: Conv2dGeometry) -> Self {
        Key {
            x,
            w,
            g,
            dtype: T::DTYPE,
            tf32: crate::precision::tf32_allowed(),
        }
    }
}

/// The algorithm cached in `slot`, or cuDNN's heuristic choice, then cached.
fn cached<A: Copy>(
    slot: &mut Option<A>,
    pick: impl FnOnce() -> std::result::Result<A, CudnnError>,
) -> Result<A> {
    match *slot {
        Some(a) => Ok(a),
        None => Ok(*slot.insert(pick()?)),
    }
}

/// Allocates an output of `elems` elements and runs `f` on it with `key`'s descriptors, its
/// cached algorithms and the shared workspace: what the three operations share.
fn run<T: Elem>(
    dev: &CudaDevice,
    key: &Key,
    elems: usize,
    f: impl FnOnce(
        &Descriptors<T>,
        &mut Algos,
        &mut Option<CudaSlice<u8>>,
        &mut CudaSlice<T>,
    ) -> Result<()>,
) -> Result<CudaSlice<T>> {
    // SAFETY: `f` writes every element (each launch has beta = 0).
    let mut out = unsafe { dev.alloc::<T>(elems)? };
    with_state(dev, |st| {
        let d = descriptors::<T>(&st.cudnn, key)?;
        let algos = st.algos.entry(*key).or_default();
        f(&d, algos, &mut st.workspace, &mut out)
    })?;
    Ok(out)
}

/// The (alpha, beta) = (1, 0) of a launch that overwrites its output.
fn one_zero<T: Elem>() -> (T, T) {
    (T::from_f64(1.0), T::from_f64(0.0))
}

/// The shared workspace, grown to at least `bytes`; `None` when no workspace is needed.
fn workspace<'a>(
    ws: &'a mut Option<CudaSlice<u8>>,
    dev: &CudaDevice,
    bytes: usize,
) -> Result<Option<&'a mut CudaSlice<u8>>> {
    if bytes == 0 {
        return Ok(None);
    }
    if ws.as_ref().is_none_or(|w| w.len() < bytes) {
        // The old buffer is freed in stream order, after the kernels that use it.
        *ws = Some(dev.alloc_zeros::<u8>(bytes)?);
    }
    Ok(ws.as_mut())
}

struct Descriptors<T: CudnnDataType> {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
}

fn descriptors<T: CudnnDataType>(cudnn: &Arc<Cudnn>, key: &Key) -> Result<Descriptors<T>> {
    let i = |v: usize| v as std::ffi::c_int;
    let (p, s) = (i(key.g.padding), i(key.g.stride));
    // f32 accumulation for every data type (bf16 included), as PyTorch does.
    let mut conv = cudnn.create_conv2d::<f32>(
        [p, p],
        [s, s],
        [1, 1],
        sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
    )?;
    let math = match (key.dtype, key.tf32) {
        (DType::F32, false) | (DType::F64, _) => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    };
    conv.set_math_type(math)?;
    let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let [n, c, h, w] = key.x;
    let [o, _, kh, kw] = key.w;
    let (oh, ow) = (key.g.out_size(h, kh), key.g.out_size(w, kw));
    Ok(Descriptors {
        conv,
        x: cudnn.create_4d_tensor::<T>(nchw, [i(n), i(c), i(h), i(w)])?,
        w: cudnn.create_4d_filter::<T>(nchw, [i(o), i(c), i(kh), i(kw)])?,
        y: cudnn.create_4d_tensor::<T>(nchw, [i(n), i(o), i(oh), i(ow)])?,
    })
}

/// What the three entry points share: the element type's bounds.
trait Elem: CudnnDataType + DeviceRepr + ValidAsZeroBits + WithDType + CudaDType {}
impl<T: CudnnDataType + DeviceRepr + ValidAsZeroBits + WithDType + CudaDType> Elem for T {}

fn contiguous<'a, T: Elem>(
    s: &'a CudaSlice<T>,
    l: &Layout,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.slice(a..b)),
        None => bail!("kd-conv2d expects contiguous tensors"),
    }
}

fn dims4(l: &Layout) -> [usize; 4] {
    let d = l.dims();
    [d[0], d[1], d[2], d[3]]
}

macro_rules! dispatch {
    ($s1:expr, $s2:expr, $f:ident, $($arg:expr),*) => {
        match (&$s1.slice, &$s2.slice) {
            (CudaStorageSlice::F32(a), CudaStorageSlice::F32(b)) => $f::<f32>(a, b, $($arg),*),
            (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) => $f::<half::bf16>(a, b, $($arg),*),
            (CudaStorageSlice::F16(a), CudaStorageSlice::F16(b)) => $f::<half::f16>(a, b, $($arg),*),
            _ => bail!("kd-conv2d on CUDA supports f32, bf16 and f16 with both operands of one dtype, got {:?} and {:?}", $s1.dtype(), $s2.dtype()),
        }
    };
}

/// y = conv(x, w).
pub(crate) fn forward(
    g: Conv2dGeometry,
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(x, w, forward_t, lx, lw, g, &x.device)
}

fn forward_t<T: Elem>(
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    lx: &Layout,
    lw: &Layout,
    g: Conv2dGeometry,
    dev: &CudaDevice,
) -> Result<(CudaStorage, Shape)> {
    let key = Key::new::<T>(dims4(lx), dims4(lw), g);
    let [n, _, h, wd] = key.x;
    let [o, _, kh, kw] = key.w;
    let shape = Shape::from((n, o, g.out_size(h, kh), g.out_size(wd, kw)));
    let (xv, wv) = (contiguous(x, lx)?, contiguous(w, lw)?);
    let y = run::<T>(dev, &key, shape.elem_count(), |d, algos, ws, y| {
        let op = ConvForward {
            conv: &d.conv,
            x: &d.x,
            w: &d.w,
            y: &d.y,
        };
        let algo = cached(&mut algos.fwd, || op.pick_algorithm())?;
        let ws = workspace(ws, dev, op.get_workspace_size(algo)?)?;
        // SAFETY: the descriptors describe exactly these contiguous buffers.
        unsafe { op.launch(algo, ws, one_zero::<T>(), &xv, &wv, y)? };
        Ok(())
    })?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), shape))
}

/// dx from (dy, w).
pub(crate) fn backward_data(
    g: Conv2dGeometry,
    input_dims: [usize; 4],
    dy: &CudaStorage,
    ldy: &Layout,
    w: &CudaStorage,
    lw: &Layout,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(dy, w, backward_data_t, ldy, lw, g, input_dims, &dy.device)
}

fn backward_data_t<T: Elem>(
    dy: &CudaSlice<T>,
    w: &CudaSlice<T>,
    ldy: &Layout,
    lw: &Layout,
    g: Conv2dGeometry,
    input_dims: [usize; 4],
    dev: &CudaDevice,
) -> Result<(CudaStorage, Shape)> {
    let key = Key::new::<T>(input_dims, dims4(lw), g);
    let shape = Shape::from(input_dims.to_vec());
    let (dyv, wv) = (contiguous(dy, ldy)?, contiguous(w, lw)?);
    let dx = run::<T>(dev, &key, shape.elem_count(), |d, algos, ws, dx| {
        let op = ConvBackwardData {
            conv: &d.conv,
            dx: &d.x,
            w: &d.w,
            dy: &d.y,
        };
        let algo = cached(&mut algos.bwd_data, || op.pick_algorithm())?;
        let ws = workspace(ws, dev, op.get_workspace_size(algo)?)?;
        // SAFETY: the descriptors describe exactly these contiguous buffers.
        unsafe { op.launch(algo, ws, one_zero::<T>(), dx, &wv, &dyv)? };
        Ok(())
    })?;
    Ok((CudaStorage::wrap_cuda_slice(dx, dev.clone()), shape))
}

/// dw from (x, dy).
pub(crate) fn backward_filter(
    g: Conv2dGeometry,
    kernel_dims: [usize; 4],
    x: &CudaStorage,
    lx: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(x, dy, backward_filter_t, lx, ldy, g, kernel_dims, &x.device)
}

fn backward_filter_t<T: Elem>(
    x: &CudaSlice<T>,
    dy: &CudaSlice<T>,
    lx: &Layout,
    ldy: &Layout,
    g: Conv2dGeometry,
    kernel_dims: [usize; 4],
    dev: &CudaDevice,
) -> Result<(CudaStorage, Shape)> {
    let key = Key::new::<T>(dims4(lx), kernel_dims, g);
    let shape = Shape::from(kernel_dims.to_vec());
    let (xv, dyv) = (contiguous(x, lx)?, contiguous(dy, ldy)?);
    let dw = run::<T>(dev, &key, shape.elem_count(), |d, algos, ws, dw| {
        let op = ConvBackwardFilter {
            conv: &d.conv,
            x: &d.x,
            dw: &d.w,
            dy: &d.y,
        };
        let algo = cached(&mut algos.bwd_filter, || op.pick_algorithm())?;
        let ws = workspace(ws, dev, op.get_workspace_size(algo)?)?;
        // SAFETY: the descriptors describe exactly these contiguous buffers.
        unsafe { op.launch(algo, ws, one_zero::<T>(), &xv, dw, &dyv)? };
        Ok(())
    })?;
    Ok((CudaStorage::wrap_cuda_slice(dw, dev.clone()), shape))
}
