//! The algorithm (and math type) of a cuDNN convolution, chosen once per shape by cuDNN's
//! heuristics or by benchmarking every algorithm on the card ([`ConvAlgoSearch`]).
//!
//! cudarc's safe `pick_algorithm` keeps only the algorithm of the first ranked result and errs
//! when that one is unsupported; it drops the math type the result was ranked under, which
//! PyTorch sets on the descriptor before it launches, and it has no benchmarked search. So the
//! search runs here on raw descriptors and a raw handle of its own (cudarc keeps its handle and
//! descriptors private); the launches stay on cudarc's safe API.
#![allow(unsafe_code)]

use std::ffi::c_int;

use candle_core::cuda_backend::cudarc::cudnn::{result, sys, CudnnError};
use candle_core::cuda_backend::cudarc::driver::CudaStream;

use crate::conv_algo::ConvAlgoSearch;

/// One chosen algorithm with the math type it was ranked under.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Choice<A> {
    pub algo: A,
    pub math: sys::cudnnMathType_t,
}

/// The search of one operation ([`forward`], [`backward_data`], [`backward_filter`]): the
/// search, whether only deterministic algorithms may be chosen, and the label of the log line
/// (`KD_CUDNN_LOG`).
pub(crate) type SearchFn<A> =
    fn(&SearchHandle, &RawDescriptors, ConvAlgoSearch, bool, &str) -> Result<Choice<A>, CudnnError>;

/// A cuDNN handle on a stream, for the search calls only.
pub(crate) struct SearchHandle(sys::cudnnHandle_t);

impl SearchHandle {
    pub fn new(stream: &CudaStream) -> Result<Self, CudnnError> {
        let handle = result::create_handle()?;
        let this = SearchHandle(handle);
        // SAFETY: the handle was just created; the stream outlives the thread's state.
        unsafe { result::set_stream(this.0, stream.cu_stream() as sys::cudaStream_t)? };
        Ok(this)
    }
}

impl Drop for SearchHandle {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}

/// What a convolution is, in cuDNN's terms.
pub(crate) struct ConvShape {
    pub data_type: sys::cudnnDataType_t,
    pub x: [c_int; 4],
    pub w: [c_int; 4],
    pub y: [c_int; 4],
    pub padding: c_int,
    pub stride: c_int,
    pub math: sys::cudnnMathType_t,
    /// NCHW or NHWC; the dimensions above are in (N, C, H, W) order for both.
    pub format: sys::cudnnTensorFormat_t,
}

/// Raw descriptors of one convolution (f32 accumulation), destroyed on drop.
pub(crate) struct RawDescriptors {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
}

impl RawDescriptors {
    pub fn new(s: &ConvShape) -> Result<Self, CudnnError> {
        let f = s.format;
        let mut d = RawDescriptors {
            x: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            conv: std::ptr::null_mut(),
        };
        // Each descriptor is stored as soon as it exists, so `drop` frees it on any error below.
        d.x = result::create_tensor_descriptor()?;
        d.y = result::create_tensor_descriptor()?;
        d.w = result::create_filter_descriptor()?;
        d.conv = result::create_convolution_descriptor()?;
        // SAFETY: every descriptor was created above and is freed only by `drop`.
        unsafe {
            result::set_tensor4d_descriptor(d.x, f, s.data_type, s.x)?;
            result::set_tensor4d_descriptor(d.y, f, s.data_type, s.y)?;
            result::set_filter4d_descriptor(d.w, s.data_type, f, s.w)?;
            result::set_convolution2d_descriptor(
                d.conv,
                s.padding,
                s.padding,
                s.stride,
                s.stride,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )?;
            result::set_convolution_math_type(d.conv, s.math)?;
        }
        Ok(d)
    }
}

impl Drop for RawDescriptors {
    fn drop(&mut self) {
        // SAFETY: each non-null descriptor was created by `new` and is destroyed once.
        unsafe {
            if !self.x.is_null() {
                let _ = result::destroy_tensor_descriptor(self.x);
            }
            if !self.y.is_null() {
                let _ = result::destroy_tensor_descriptor(self.y);
            }
            if !self.w.is_null() {
                let _ = result::destroy_filter_descriptor(self.w);
            }
            if !self.conv.is_null() {
                let _ = result::destroy_convolution_descriptor(self.conv);
            }
        }
    }
}

/// One ranked result of a search: algorithm, status, math type, time (ms), workspace (bytes),
/// and whether it is deterministic.
type Ranked<A> = (
    A,
    sys::cudnnStatus_t,
    sys::cudnnMathType_t,
    f32,
    usize,
    sys::cudnnDeterminism_t,
);

/// The first usable result: cuDNN ranks heuristics by expected speed and benchmarks by measured
/// time, and marks algorithms that cannot run this shape with a status other than success.
/// With `deterministic`, results cuDNN marks non-deterministic are passed over.
fn first_usable<A: Copy + std::fmt::Debug>(
    results: impl Iterator<Item = Ranked<A>>,
    what: &str,
    label: &str,
    search: ConvAlgoSearch,
    deterministic: bool,
) -> Result<Choice<A>, CudnnError> {
    let mut first_error = None;
    for (algo, status, math, ms, bytes, determinism) in results {
        if deterministic && determinism != sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC {
            continue;
        }
        match status.result() {
            Ok(()) => {
                if std::env::var_os("KD_CUDNN_LOG").is_some() {
                    eprintln!(
                        "cudnn {what} {label} ({search}): {algo:?} {math:?} {determinism:?} workspace={bytes} B time={ms:.3} ms"
                    );
                }
                return Ok(Choice { algo, math });
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or(CudnnError(sys::cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED)))
}

/// Generates the search of one operation: the heuristic and the benchmark entry points take the
/// same arguments, in the operation's own order of descriptors.
macro_rules! search_op {
    ($name:ident, $algo:ty, $perf:ty, $count:expr, $get:ident, $find:ident, $what:literal,
     |$d:ident| ($a:expr, $b:expr, $out:expr)) => {
        pub(crate) fn $name(
            h: &SearchHandle,
            $d: &RawDescriptors,
            search: ConvAlgoSearch,
            deterministic: bool,
            label: &str,
        ) -> Result<Choice<$algo>, CudnnError> {
            const N: usize = $count as usize;
            // SAFETY: plain C structs, all-zero is a valid value; cuDNN fills `n` of them.
            let mut perf: [$perf; N] = unsafe { std::mem::zeroed() };
            let mut n: c_int = 0;
            // Both entry points take the same arguments.
            let entry: unsafe fn(_, _, _, _, _, _, _, _) -> sys::cudnnStatus_t = match search {
                ConvAlgoSearch::Heuristic => sys::$get,
                ConvAlgoSearch::Benchmark => sys::$find,
            };
            // SAFETY: the handle and descriptors are live; `perf` holds `N` results.
            let status = unsafe {
                entry(
                    h.0,
                    $a,
                    $b,
                    $d.conv,
                    $out,
                    N as c_int,
                    &mut n,
                    perf.as_mut_ptr(),
                )
            };
            status.result()?;
            let n = (n.max(0) as usize).min(N);
            first_usable(
                perf[..n].iter().map(|p| {
                    (
                        p.algo,
                        p.status,
                        p.mathType,
                        p.time,
                        p.memory,
                        p.determinism,
                    )
                }),
                $what,
                label,
                search,
                deterministic,
            )
        }
    };
}

search_op!(
    forward,
    sys::cudnnConvolutionFwdAlgo_t,
    sys::cudnnConvolutionFwdAlgoPerf_t,
    sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT,
    cudnnGetConvolutionForwardAlgorithm_v7,
    cudnnFindConvolutionForwardAlgorithm,
    "forward",
    |d| (d.x, d.w, d.y)
);

search_op!(
    backward_data,
    sys::cudnnConvolutionBwdDataAlgo_t,
    sys::cudnnConvolutionBwdDataAlgoPerf_t,
    sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT,
    cudnnGetConvolutionBackwardDataAlgorithm_v7,
    cudnnFindConvolutionBackwardDataAlgorithm,
    "backward-data",
    |d| (d.w, d.y, d.x)
);

search_op!(
    backward_filter,
    sys::cudnnConvolutionBwdFilterAlgo_t,
    sys::cudnnConvolutionBwdFilterAlgoPerf_t,
    sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT,
    cudnnGetConvolutionBackwardFilterAlgorithm_v7,
    cudnnFindConvolutionBackwardFilterAlgorithm,
    "backward-filter",
    |d| (d.x, d.y, d.w)
);

#[cfg(test)]
mod tests {
    use super::*;
    use sys::cudnnDeterminism_t::{CUDNN_DETERMINISTIC, CUDNN_NON_DETERMINISTIC};
    use sys::cudnnMathType_t::{CUDNN_DEFAULT_MATH, CUDNN_TENSOR_OP_MATH};
    use sys::cudnnStatus_t::{CUDNN_STATUS_NOT_SUPPORTED, CUDNN_STATUS_SUCCESS};

    /// Ranked as cuDNN would: a failed algorithm, a fast non-deterministic one, then a slower
    /// deterministic one with another math type.
    fn ranked() -> Vec<Ranked<u32>> {
        vec![
            (
                7,
                CUDNN_STATUS_NOT_SUPPORTED,
                CUDNN_DEFAULT_MATH,
                0.1,
                0,
                CUDNN_DETERMINISTIC,
            ),
            (
                0,
                CUDNN_STATUS_SUCCESS,
                CUDNN_TENSOR_OP_MATH,
                0.2,
                64,
                CUDNN_NON_DETERMINISTIC,
            ),
            (
                1,
                CUDNN_STATUS_SUCCESS,
                CUDNN_DEFAULT_MATH,
                0.3,
                0,
                CUDNN_DETERMINISTIC,
            ),
        ]
    }

    #[test]
    fn the_first_usable_result_wins_with_its_math_type() {
        let c = first_usable(
            ranked().into_iter(),
            "t",
            "t",
            ConvAlgoSearch::Heuristic,
            false,
        )
        .unwrap();
        assert_eq!((c.algo, c.math), (0, CUDNN_TENSOR_OP_MATH));
    }

    #[test]
    fn deterministic_passes_over_the_others() {
        let c = first_usable(
            ranked().into_iter(),
            "t",
            "t",
            ConvAlgoSearch::Benchmark,
            true,
        )
        .unwrap();
        assert_eq!((c.algo, c.math), (1, CUDNN_DEFAULT_MATH));
    }

    #[test]
    fn nothing_usable_is_the_first_failure() {
        let only_nondeterministic = ranked().into_iter().take(2);
        let e = first_usable(
            only_nondeterministic,
            "t",
            "t",
            ConvAlgoSearch::Heuristic,
            true,
        )
        .unwrap_err();
        assert_eq!(e.0, CUDNN_STATUS_NOT_SUPPORTED);
        let e = first_usable(
            std::iter::empty::<Ranked<u32>>(),
            "t",
            "t",
            ConvAlgoSearch::Heuristic,
            false,
        )
        .unwrap_err();
        assert_eq!(e.0, CUDNN_STATUS_NOT_SUPPORTED);
    }
}
