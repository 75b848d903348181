//! cuDNN forward, backward-data and backward-filter for [`crate::conv`].
//!
//! Per thread and device: one cuDNN handle on candle's stream, one workspace that only grows,
//! and the algorithms chosen per shape ([`crate::cudnn_algo`]: cuDNN's heuristics or a
//! benchmark, with the math type each was ranked under). Descriptors are made per call: they
//! are host-side structs, microseconds against the kernel.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorageSlice, DeviceId};
use candle_core::{bail, CudaStorage, DType, Layout, Result, Shape, WithDType};

use crate::conv::Conv2dGeometry;
use crate::conv_algo::ConvAlgoSearch;
use crate::cudnn_algo::{self, Choice, ConvShape, RawDescriptors, SearchFn, SearchHandle};
use crate::memory_format::MemoryFormat;

/// One convolution's shape and settings; `x` and `w` in (N, C, H, W) and (K, C, R, S) order
/// whatever the `format` (cuDNN's descriptors take them so).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    x: [usize; 4],
    w: [usize; 4],
    g: Conv2dGeometry,
    format: MemoryFormat,
    dtype: DType,
    tf32: bool,
    search: ConvAlgoSearch,
    deterministic: bool,
}

#[derive(Default)]
struct Algos {
    fwd: Option<Choice<sys::cudnnConvolutionFwdAlgo_t>>,
    bwd_data: Option<Choice<sys::cudnnConvolutionBwdDataAlgo_t>>,
    bwd_filter: Option<Choice<sys::cudnnConvolutionBwdFilterAlgo_t>>,
}

struct State {
    cudnn: Arc<Cudnn>,
    /// A second handle on the same stream, for the algorithm search (made at the first search).
    search: Option<SearchHandle>,
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
                search: None,
                workspace: None,
                algos: HashMap::new(),
            }),
        };
        f(state)
    })
}

impl Key {
    /// The key of a convolution of `x` with `w` (dimensions in `format`'s order).
    fn new<T: Elem>(
        x: &[usize],
        w: &[usize],
        g: Conv2dGeometry,
        format: MemoryFormat,
    ) -> Result<Self> {
        Ok(Key {
            x: format.nchw(x)?,
            w: format.nchw(w)?,
            g,
            format,
            dtype: T::DTYPE,
            tf32: crate::precision::tf32_allowed(),
            search: ConvAlgoSearch::current(),
            deterministic: crate::conv_algo::deterministic_required(),
        })
    }

    /// cuDNN's name for the format.
    fn tensor_format(&self) -> sys::cudnnTensorFormat_t {
        match self.format {
            MemoryFormat::ChannelsFirst => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
            MemoryFormat::ChannelsLast => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
        }
    }

    /// A tensor's shape as candle holds it: (N, C, H, W)-ordered `dims` in the key's format.
    fn shape(&self, dims: [usize; 4]) -> Shape {
        Shape::from(self.format.dims_of(dims).to_vec())
    }

    /// The math type the descriptor starts with, as PyTorch sets it: FMA only for f32 without
    /// TF32; cuDNN's default (which lets f32 use TF32 tensor cores) for f32 with TF32; tensor-op
    /// math for the 16-bit types. The chosen algorithm's own math type replaces it.
    fn math(&self) -> sys::cudnnMathType_t {
        match (self.dtype, self.tf32) {
            (DType::F32, false) | (DType::F64, _) => sys::cudnnMathType_t::CUDNN_FMA_MATH,
            (DType::F32, true) => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
            _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        }
    }

    fn output(&self) -> [usize; 4] {
        let [n, _, h, w] = self.x;
        let [o, _, kh, kw] = self.w;
        [n, o, self.g.out_size(h, kh), self.g.out_size(w, kw)]
    }

    /// For log lines: the shapes, the geometry and the type.
    fn label(&self) -> String {
        format!(
            "x={:?} w={:?} stride={} pad={} {:?}{}{}{}",
            self.x,
            self.w,
            self.g.stride,
            self.g.padding,
            self.dtype,
            match self.format {
                MemoryFormat::ChannelsFirst => "",
                MemoryFormat::ChannelsLast => " channels-last",
            },
            if self.tf32 && self.dtype == DType::F32 {
                " tf32"
            } else {
                ""
            },
            if self.deterministic {
                " deterministic"
            } else {
                ""
            }
        )
    }
}

/// What one launch has: the descriptors (math type set to the chosen algorithm's), the
/// thread's cached choices for the shape, the shared workspace, and what a search needs.
struct Call<'a, T: CudnnDataType> {
    d: Descriptors<T>,
    key: Key,
    algos: &'a mut Algos,
    workspace: &'a mut Option<CudaSlice<u8>>,
    search: &'a mut Option<SearchHandle>,
    dev: &'a CudaDevice,
}

impl<T: Elem> Call<'_, T> {
    /// The algorithm cached in `slot`, or the search's choice, then cached; the descriptor's
    /// math type set to the one it was chosen under.
    fn choose<A: Copy>(
        &mut self,
        slot: fn(&mut Algos) -> &mut Option<Choice<A>>,
        search: SearchFn<A>,
    ) -> Result<A> {
        let choice = match *slot(self.algos) {
            Some(c) => c,
            None => {
                let handle = match self.search {
                    Some(h) => h,
                    None => self
                        .search
                        .insert(SearchHandle::new(&self.dev.cuda_stream())?),
                };
                let i = |v: usize| v as std::ffi::c_int;
                let shape = ConvShape {
                    data_type: T::DATA_TYPE,
                    x: self.key.x.map(i),
                    w: self.key.w.map(i),
                    y: self.key.output().map(i),
                    padding: i(self.key.g.padding),
                    stride: i(self.key.g.stride),
                    math: self.key.math(),
                    format: self.key.tensor_format(),
                };
                let raw = RawDescriptors::new(&shape)?;
                let c = search(
                    handle,
                    &raw,
                    self.key.search,
                    self.key.deterministic,
                    &self.key.label(),
                )?;
                *slot(self.algos).insert(c)
            }
        };
        self.d.conv.set_math_type(choice.math)?;
        Ok(choice.algo)
    }
}

/// Allocates an output of `elems` elements and runs `f` on it with the call's descriptors,
/// choices and workspace: what the three operations share.
fn run<T: Elem>(
    dev: &CudaDevice,
    key: Key,
    elems: usize,
    f: impl FnOnce(&mut Call<'_, T>, &mut CudaSlice<T>) -> Result<()>,
) -> Result<CudaSlice<T>> {
    // SAFETY: `f` writes every element (each launch has beta = 0).
    let mut out = unsafe { dev.alloc::<T>(elems)? };
    with_state(dev, |st| {
        let mut call = Call {
            d: descriptors::<T>(&st.cudnn, &key)?,
            key,
            algos: st.algos.entry(key).or_default(),
            workspace: &mut st.workspace,
            search: &mut st.search,
            dev,
        };
        f(&mut call, &mut out)
    })?;
    Ok(out)
}

/// The (alpha, beta) = (1, 0) of a launch that overwrites its output.
fn one_zero<T: Elem>() -> (T, T) {
    (T::from_f64(1.0), T::from_f64(0.0))
}

/// `ws` grown to at least `bytes`; `None` when no workspace is needed.
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
    conv.set_math_type(key.math())?;
    // The dimensions in (N, C, H, W) order for either format (NHWC filters are (K, R, S, C)).
    let f = key.tensor_format();
    Ok(Descriptors {
        conv,
        x: cudnn.create_4d_tensor::<T>(f, key.x.map(i))?,
        w: cudnn.create_4d_filter::<T>(f, key.w.map(i))?,
        y: cudnn.create_4d_tensor::<T>(f, key.output().map(i))?,
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
    format: MemoryFormat,
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(x, w, forward_t, lx, lw, g, format, &x.device)
}

#[allow(clippy::too_many_arguments)]
fn forward_t<T: Elem>(
    x: &CudaSlice<T>,
    w: &CudaSlice<T>,
    lx: &Layout,
    lw: &Layout,
    g: Conv2dGeometry,
    format: MemoryFormat,
    dev: &CudaDevice,
) -> Result<(CudaStorage, Shape)> {
    let key = Key::new::<T>(lx.dims(), lw.dims(), g, format)?;
    let shape = key.shape(key.output());
    let (xv, wv) = (contiguous(x, lx)?, contiguous(w, lw)?);
    let y = run::<T>(dev, key, shape.elem_count(), |call, y| {
        let algo = call.choose(|a| &mut a.fwd, cudnn_algo::forward)?;
        let d = &call.d;
        let op = ConvForward {
            conv: &d.conv,
            x: &d.x,
            w: &d.w,
            y: &d.y,
        };
        let ws = workspace(call.workspace, dev, op.get_workspace_size(algo)?)?;
        // SAFETY: the descriptors describe exactly these contiguous buffers.
        unsafe { op.launch(algo, ws, one_zero::<T>(), &xv, &wv, y)? };
        Ok(())
    })?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), shape))
}

/// dx from (dy, w).
pub(crate) fn backward_data(
    g: Conv2dGeometry,
    format: MemoryFormat,
    input_dims: [usize; 4],
    dy: &CudaStorage,
    ldy: &Layout,
    w: &CudaStorage,
    lw: &Layout,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(
        dy,
        w,
        backward_data_t,
        ldy,
        lw,
        g,
        format,
        input_dims,
        &dy.device
    )
}

#[allow(clippy::too_many_arguments)]
fn backward_data_t<T: Elem>(
    dy: &CudaSlice<T>,
    w: &CudaSlice<T>,
    ldy: &Layout,
    lw: &Layout,
    g: Conv2dGeometry,
    format: MemoryFormat,
    input_dims: [usize; 4],
    dev: &CudaDevice,
) -> Result<(CudaStorage, Shape)> {
    let key = Key::new::<T>(&input_dims, lw.dims(), g, format)?;
    let shape = Shape::from(input_dims.to_vec());
    let (dyv, wv) = (contiguous(dy, ldy)?, contiguous(w, lw)?);
    let dx = run::<T>(dev, key, shape.elem_count(), |call, dx| {
        let algo = call.choose(|a| &mut a.bwd_data, cudnn_algo::backward_data)?;
        let d = &call.d;
        let op = ConvBackwardData {
            conv: &d.conv,
            dx: &d.x,
            w: &d.w,
            dy: &d.y,
        };
        let ws = workspace(call.workspace, dev, op.get_workspace_size(algo)?)?;
        // SAFETY: the descriptors describe exactly these contiguous buffers.
        unsafe { op.launch(algo, ws, one_zero::<T>(), dx, &wv, &dyv)? };
        Ok(())
    })?;
    Ok((CudaStorage::wrap_cuda_slice(dx, dev.clone()), shape))
}

/// dw from (x, dy).
pub(crate) fn backward_filter(
    g: Conv2dGeometry,
    format: MemoryFormat,
    kernel_dims: [usize; 4],
    x: &CudaStorage,
    lx: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
) -> Result<(CudaStorage, Shape)> {
    dispatch!(
        x,
        dy,
        backward_filter_t,
        lx,
        ldy,
        g,
        format,
        kernel_dims,
        &x.device
    )
}

#[allow(clippy::too_many_arguments)]
fn backward_filter_t<T: Elem>(
    x: &CudaSlice<T>,
    dy: &CudaSlice<T>,
    lx: &Layout,
    ldy: &Layout,
    g: Conv2dGeometry,
    format: MemoryFormat,
    kernel_dims: [usize; 4],
    dev: &CudaDevice,
) -> Result<(CudaStorage, Shape)> {
    let key = Key::new::<T>(lx.dims(), &kernel_dims, g, format)?;
    let shape = Shape::from(kernel_dims.to_vec());
    let (xv, dyv) = (contiguous(x, lx)?, contiguous(dy, ldy)?);
    let dw = run::<T>(dev, key, shape.elem_count(), |call, dw| {
        let algo = call.choose(|a| &mut a.bwd_filter, cudnn_algo::backward_filter)?;
        let d = &call.d;
        let op = ConvBackwardFilter {
            conv: &d.conv,
            x: &d.x,
            dw: &d.w,
            dy: &d.y,
        };
        let ws = workspace(call.workspace, dev, op.get_workspace_size(algo)?)?;
        // SAFETY: the descriptors describe exactly these contiguous buffers.
        unsafe { op.launch(algo, ws, one_zero::<T>(), &xv, dw, &dyv)? };
        Ok(())
    })?;
    Ok((CudaStorage::wrap_cuda_slice(dw, dev.clone()), shape))
}
