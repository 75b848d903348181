//! Moving between a custom op's `CpuStorage` and tensors, so CPU paths can reuse candle's ops.
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Device, Layout, Result, Storage, Tensor, WithDType};
use std::cell::RefCell;
use std::ops::Range;

/// A tensor holding the elements of a contiguous `(storage, layout)` pair.
pub(crate) fn tensor(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("expected a contiguous tensor, got strides {:?}", l.stride())
    };
    let dev = &Device::Cpu;
    match s {
        CpuStorage::F32(v) => Tensor::from_slice(&v[a..b], l.dims(), dev),
        CpuStorage::F64(v) => Tensor::from_slice(&v[a..b], l.dims(), dev),
        CpuStorage::BF16(v) => Tensor::from_slice(&v[a..b], l.dims(), dev),
        CpuStorage::F16(v) => Tensor::from_slice(&v[a..b], l.dims(), dev),
        CpuStorage::U8(v) => Tensor::from_slice(&v[a..b], l.dims(), dev),
        CpuStorage::U32(v) => Tensor::from_slice(&v[a..b], l.dims(), dev),
        _ => bail!("unsupported dtype {:?}", s.dtype()),
    }
}

/// The elements of `t`, in row-major order, as a `CpuStorage`.
pub(crate) fn storage(t: &Tensor) -> Result<CpuStorage> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => CpuStorage::F32(t.to_vec1()?),
        DType::F64 => CpuStorage::F64(t.to_vec1()?),
        DType::BF16 => CpuStorage::BF16(t.to_vec1()?),
        DType::F16 => CpuStorage::F16(t.to_vec1()?),
        DType::U8 => CpuStorage::U8(t.to_vec1()?),
        DType::U32 => CpuStorage::U32(t.to_vec1()?),
        d => bail!("unsupported dtype {d:?}"),
    })
}

/// The contiguous elements of `s` as f32 (converting bf16, f16 and f64).
pub(crate) fn f32s(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    tensor(s, l)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// [`f32s`] without a copy when the storage already holds contiguous f32.
pub(crate) fn f32s_cow<'a>(s: &'a CpuStorage, l: &Layout) -> Result<std::borrow::Cow<'a, [f32]>> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(std::borrow::Cow::Borrowed(&v[a..b])),
        _ => Ok(std::borrow::Cow::Owned(f32s(s, l)?)),
    }
}

/// `v` as a CpuStorage of `dtype`.
pub(crate) fn from_f32s(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    if dtype == DType::F32 {
        return Ok(CpuStorage::F32(v));
    }
    let n = v.len();
    storage(&Tensor::from_vec(v, n, &Device::Cpu)?.to_dtype(dtype)?)
}

/// The elements of a contiguous f32 `(storage, layout)` pair, borrowed (no conversion).
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!(
            "expected a contiguous f32 tensor, got {:?} with strides {:?}",
            s.dtype(),
            l.stride()
        ),
    }
}

/// [`f32_slice`], mutable: for the in-place ops.
pub(crate) fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    let dtype = s.dtype();
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => bail!(
            "expected a contiguous f32 tensor, got {dtype:?} with strides {:?}",
            l.stride()
        ),
    }
}

/// Runs `f(i, chunk)` on the `i`-th `len`-value chunk of `out` (the last may be shorter), in
/// parallel. Each chunk is written by one call, so the result does not depend on the threads.
/// Short chunks go to a task in groups, so that a task is not a handful of values.
pub(crate) fn par_chunks<E: Send>(out: &mut [E], len: usize, f: impl Fn(usize, &mut [E]) + Sync) {
    use rayon::prelude::*;
    let len = len.max(1);
    out.par_chunks_mut(len)
        .with_min_len((4096 / len).max(1))
        .enumerate()
        .for_each(|(i, chunk)| f(i, chunk));
}

/// Runs `f` on matching `len`-value chunks of `out`, `a` and `b` (same length), in parallel:
/// each value is computed by the same arithmetic whatever the threads.
pub(crate) fn par_zip3<E: Send, F>(out: &mut [E], a: &[f32], b: &[f32], len: usize, f: F)
where
    F: Fn((&mut [E], (&[f32], &[f32]))) + Sync + Send,
{
    use rayon::prelude::*;
    debug_assert!(a.len() == out.len() && b.len() == out.len());
    let len = len.max(1);
    out.par_chunks_mut(len)
        .zip(a.par_chunks(len).zip(b.par_chunks(len)))
        .for_each(f);
}

/// `f(a[i], b[i])` for every element of two same-length slices, in parallel (the binary
/// element-wise passes of the CPU paths).
#[allow(unsafe_code)]
pub(crate) fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "zip_map: slices of different lengths");
    let mut out = output_slots(a.len());
    par_zip3(&mut out, a, b, 1 << 14, |(out, (a, b))| {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            o.write(f(x, y));
        }
    });
    // SAFETY: the chunks of `out`, `a` and `b` match one to one (equal lengths), and each slot
    // is written by its chunk's loop.
    unsafe { written(out) }
}

/// Slots for an op's output of `len` values, not zero-filled: an op writes each output value
/// once, and `vec![0; len]`'s zero fill was one more pass over tens of MB a step once glibc
/// reuses freed memory instead of mapping fresh zeroed pages (kd-runner's `malloc.rs`; memset
/// took 7.6% of a ResNet50 inference profile). In debug builds, the tests', the slots start as
/// NaN, so a value an op forgot to write shows in the comparisons with candle's ops.
#[allow(unsafe_code)]
pub(crate) fn output_slots<T: WithDType>(len: usize) -> Vec<std::mem::MaybeUninit<T>> {
    if cfg!(debug_assertions) {
        return vec![std::mem::MaybeUninit::new(T::from_f64(f64::NAN)); len];
    }
    let mut v = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`, and a `MaybeUninit` needs no initialisation.
    unsafe { v.set_len(len) };
    v
}

/// The values of slots from [`output_slots`], every one of which was written.
///
/// # Safety
/// Every slot of `v` holds a written value.
#[allow(unsafe_code)]
pub(crate) unsafe fn written<T>(v: Vec<std::mem::MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    let (ptr, len, cap) = (v.as_mut_ptr(), v.len(), v.capacity());
    // SAFETY: `MaybeUninit<T>` has `T`'s size and alignment, the allocation is handed over
    // whole (`v` is not dropped), and the caller guarantees each element is initialised.
    unsafe { Vec::from_raw_parts(ptr.cast::<T>(), len, cap) }
}

/// Runs `f` on the elements of a CPU tensor, in row-major order: borrowed when `t` is contiguous,
/// else a copy.
pub(crate) fn with_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    {
        let (guard, layout) = t.storage_and_layout();
        if let (Storage::Cpu(s), Some((a, b))) = (&*guard, layout.contiguous_offsets()) {
            return Ok(f(&s.as_slice::<T>()?[a..b]));
        }
    }
    Ok(f(&t.flatten_all()?.to_vec1::<T>()?))
}

/// `Some(storage of $body)` with `$a`, `$b` bound to the elements of two contiguous storages
/// (with their layouts) of one float type, `&[f32]` or `&[f64]`, read in place; `None` for other
/// types or strided layouts (the caller's fallback).
macro_rules! float_slices {
    (($s1:expr, $l1:expr), ($s2:expr, $l2:expr), |$a:ident, $b:ident| $body:expr) => {{
        use candle_core::CpuStorage as S;
        match ($s1, $s2, $l1.contiguous_offsets(), $l2.contiguous_offsets()) {
            (S::F32(u), S::F32(v), Some((i, j)), Some((k, l))) => {
                let ($a, $b) = (&u[i..j], &v[k..l]);
                Some(S::F32($body))
            }
            (S::F64(u), S::F64(v), Some((i, j)), Some((k, l))) => {
                let ($a, $b) = (&u[i..j], &v[k..l]);
                Some(S::F64($body))
            }
            _ => None,
        }
    }};
}
pub(crate) use float_slices;

/// The element types of the CPU convolution's matrix products (gemm has kernels for both).
pub(crate) trait Float: WithDType + Default + Send + Sync + 'static {
    /// This thread's idle [`Scratch`] buffers of this type.
    fn scratch_pool() -> &'static std::thread::LocalKey<RefCell<Vec<Vec<Self>>>>;
}

thread_local! {
    static SCRATCH_F32: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_F64: RefCell<Vec<Vec<f64>>> = const { RefCell::new(Vec::new()) };
}

impl Float for f32 {
    fn scratch_pool() -> &'static std::thread::LocalKey<RefCell<Vec<Vec<Self>>>> {
        &SCRATCH_F32
    }
}

impl Float for f64 {
    fn scratch_pool() -> &'static std::thread::LocalKey<RefCell<Vec<Vec<Self>>>> {
        &SCRATCH_F64
    }
}

/// Idle scratch buffers a thread keeps: a convolution holds at most three at once.
pub(crate) const SCRATCH_KEPT: usize = 4;

/// A buffer of `len` values lent from the calling thread's pool and given back when dropped.
///
/// The CPU convolution's temporaries (NHWC copy, patch rows, products, the gradient's columns)
/// were fresh, zero-filled allocations on every call, tens of MB per step that the kernel faulted
/// in page by page and unmapped again. Lent buffers keep their memory from call to call. Their
/// values are whatever the last borrower left: a borrower writes every value before it reads it.
pub(crate) struct Scratch<T: Float> {
    /// Initialised in full when it was made (never refilled): a loan uses its first `len` values.
    buf: Vec<T>,
    len: usize,
}

impl<T: Float> Scratch<T> {
    /// A buffer of `len` values: the pool's smallest one that holds `len`, else a new one
    /// (values of a new buffer are zero; nothing is filled on reuse).
    pub fn take(len: usize) -> Self {
        let reused = T::scratch_pool().with(|pool| {
            let mut pool = pool.borrow_mut();
            let best = pool
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= len)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i)?;
            Some(pool.swap_remove(best))
        });
        let buf = reused.unwrap_or_else(|| vec![T::default(); len]);
        Scratch { buf, len }
    }

    /// Sets every value of the underlying buffer, lent or not, to `v` (the tests' poison).
    #[cfg(test)]
    pub fn fill_whole(&mut self, v: T) {
        self.buf.fill(v);
    }
}

impl<T: Float> Drop for Scratch<T> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.is_empty() {
            return;
        }
        // try_with: a thread being torn down has no pool left; the buffer is then freed.
        let _ = T::scratch_pool().try_with(|pool| {
            let mut pool = pool.borrow_mut();
            pool.push(buf);
            if pool.len() > SCRATCH_KEPT {
                // Keep the largest: they serve every smaller request too.
                let smallest = (0..pool.len())
                    .min_by_key(|&i| pool[i].len())
                    .expect("the pool is not empty");
                pool.swap_remove(smallest);
            }
        });
    }
}

impl<T: Float> std::ops::Deref for Scratch<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[..self.len]
    }
}

impl<T: Float> std::ops::DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[..self.len]
    }
}

/// A place a value can be written to: an initialised value or an output slot
/// ([`output_slots`]), so that [`transpose`] serves both.
pub(crate) trait Slot<T> {
    fn put(&mut self, v: T);
}

impl<T> Slot<T> for T {
    #[inline(always)]
    fn put(&mut self, v: T) {
        *self = v;
    }
}

impl<T> Slot<T> for std::mem::MaybeUninit<T> {
    #[inline(always)]
    fn put(&mut self, v: T) {
        self.write(v);
    }
}

/// Values per side of [`transpose`]'s tiles: 16 f32 rows of 64 bytes, one cache line each.
pub(crate) const TILE: usize = 16;

/// `dst[c·dst_stride + r] = src[r·src_stride + c]` for r < rows, c < cols, in 16×16 tiles: the
/// layout passes of the convolution (NCHW ↔ pixels × channels). Plain loops read (or write) a
/// whole row apart each step; at ResNet's power-of-two row lengths (2 KB, 4 KB) every such access
/// falls in the same few L1 sets, and a (pixel, channel) → NCHW pass at the last stage took 28% of
/// the convolution's time. Within a tile both sides stay in the L1 cache. Four-byte values (f32)
/// move as 8×8 blocks in AVX registers where the CPU has AVX ([`transpose_avx`]).
#[allow(unsafe_code)]
pub(crate) fn transpose<T: Copy, D: Slot<T>>(
    src: &[T],
    src_stride: usize,
    (rows, cols): (usize, usize),
    dst: &mut [D],
    dst_stride: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        (rows - 1) * src_stride + cols <= src.len() && (cols - 1) * dst_stride + rows <= dst.len(),
        "transpose: ({rows}, {cols}) with strides {src_stride} → {dst_stride} reaches outside \
         {} → {} values",
        src.len(),
        dst.len()
    );
    #[cfg(target_arch = "x86_64")]
    if std::mem::size_of::<T>() == 4
        && std::mem::size_of::<D>() == 4
        && rows.min(cols) >= 8
        && avx_transposes()
    {
        // SAFETY: the CPU has AVX ([`avx_transposes`]); the bounds were asserted above; T and D are
        // four bytes each and a `Slot` is a plain value or an uninitialised slot for one, so
        // moving the bits of T values into D's places writes those values.
        unsafe {
            transpose_avx(
                src.as_ptr().cast::<f32>(),
                src_stride,
                (rows, cols),
                dst.as_mut_ptr().cast::<f32>(),
                dst_stride,
            )
        };
        return;
    }
    for tile in tiles(rows, cols) {
        // SAFETY: the tile lies within rows × cols, whose bounds were asserted above.
        unsafe { transpose_tile(src.as_ptr(), src_stride, tile, dst.as_mut_ptr(), dst_stride) };
    }
}

/// The (rows, columns) ranges of [`transpose`]'s 16×16 tiles of a rows × cols matrix, row of
/// tiles by row of tiles. An iterator rather than a loop taking a closure, so that the AVX
/// path's loop body keeps the AVX feature (closures do not inherit it).
fn tiles(rows: usize, cols: usize) -> impl Iterator<Item = (Range<usize>, Range<usize>)> {
    (0..rows).step_by(TILE).flat_map(move |r0| {
        (0..cols)
            .step_by(TILE)
            .map(move |c0| (r0..(r0 + TILE).min(rows), c0..(c0 + TILE).min(cols)))
    })
}

/// Whether [`transpose`] moves four-byte values in AVX registers: the CPU has AVX and
/// `KD_DISABLE` does not name `avx`. Read once: the transposes run per image row.
#[cfg(target_arch = "x86_64")]
fn avx_transposes() -> bool {
    static AVX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX.get_or_init(|| {
        std::is_x86_feature_detected!("avx")
            && crate::switches::enabled(crate::switches::Kernel::AvxTranspose)
    })
}

/// One tile of [`transpose`], value by value.
///
/// # Safety
/// Every `r·src_stride + c` of the tile is within `src`'s values and every `c·dst_stride + r`
/// within `dst`'s.
#[allow(unsafe_code)]
#[inline(always)]
unsafe fn transpose_tile<T: Copy, D: Slot<T>>(
    src: *const T,
    src_stride: usize,
    (rows, cols): (Range<usize>, Range<usize>),
    dst: *mut D,
    dst_stride: usize,
) {
    for c in cols {
        for r in rows.clone() {
            // SAFETY: the caller's bounds.
            unsafe { (*dst.add(c * dst_stride + r)).put(*src.add(r * src_stride + c)) };
        }
    }
}

/// [`transpose`] of four-byte values: each 16×16 tile as 8×8 blocks, each block loaded as eight
/// rows of eight values, transposed in registers (unpack, shuffle, swap of 128-bit halves) and
/// stored as eight rows; a tile's last rows and columns short of a block go value by value.
/// ResNet18's convolutions at batch 32 took up to 15% less time with it than with the plain
/// tiles, in two of three comparisons on a noisy machine (`KD_DISABLE=avx`;
/// `docs/performance.md`, session 21).
///
/// # Safety
/// The CPU has AVX, `rows`, `cols` ≥ 1, and `src`/`dst` hold the values [`transpose`] asserts.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx")]
unsafe fn transpose_avx(
    src: *const f32,
    src_stride: usize,
    (rows, cols): (usize, usize),
    dst: *mut f32,
    dst_stride: usize,
) {
    for (Range { start: r0, end: r1 }, Range { start: c0, end: c1 }) in tiles(rows, cols) {
        let r8 = r0 + (r1 - r0) / 8 * 8;
        let c8 = c0 + (c1 - c0) / 8 * 8;
        // SAFETY (all three calls): the blocks and the rest lie within the tile, and so within
        // rows × cols, whose values the caller guarantees.
        for r in (r0..r8).step_by(8) {
            for c in (c0..c8).step_by(8) {
                unsafe {
                    transpose_8x8(
                        src.add(r * src_stride + c),
                        src_stride,
                        dst.add(c * dst_stride + r),
                        dst_stride,
                    )
                };
            }
        }
        unsafe { transpose_tile(src, src_stride, (r0..r8, c8..c1), dst, dst_stride) };
        unsafe { transpose_tile(src, src_stride, (r8..r1, c0..c1), dst, dst_stride) };
    }
}

/// `dst[j·dst_stride + i] = src[i·src_stride + j]` for i, j < 8, in AVX registers.
///
/// # Safety
/// The CPU has AVX; the 8 rows of 8 values at `src` (rows `src_stride` apart) are readable and
/// the 8 at `dst` writable.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn transpose_8x8(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's bounds; unaligned loads and stores.
    unsafe {
        // (No closures here: they would not inherit the AVX feature.)
        let a0 = _mm256_loadu_ps(src);
        let a1 = _mm256_loadu_ps(src.add(src_stride));
        let a2 = _mm256_loadu_ps(src.add(2 * src_stride));
        let a3 = _mm256_loadu_ps(src.add(3 * src_stride));
        let a4 = _mm256_loadu_ps(src.add(4 * src_stride));
        let a5 = _mm256_loadu_ps(src.add(5 * src_stride));
        let a6 = _mm256_loadu_ps(src.add(6 * src_stride));
        let a7 = _mm256_loadu_ps(src.add(7 * src_stride));
        // Interleave pairs of rows: b0 = (a0₀ a1₀ a0₁ a1₁ | a0₄ a1₄ a0₅ a1₅), …
        let (b0, b1) = (_mm256_unpacklo_ps(a0, a1), _mm256_unpackhi_ps(a0, a1));
        let (b2, b3) = (_mm256_unpacklo_ps(a2, a3), _mm256_unpackhi_ps(a2, a3));
        let (b4, b5) = (_mm256_unpacklo_ps(a4, a5), _mm256_unpackhi_ps(a4, a5));
        let (b6, b7) = (_mm256_unpacklo_ps(a6, a7), _mm256_unpackhi_ps(a6, a7));
        // Then pairs of pairs: c0 = column 0 of rows 0–3 | column 4 of rows 0–3, …
        let (c0, c1) = (
            _mm256_shuffle_ps::<0x44>(b0, b2),
            _mm256_shuffle_ps::<0xEE>(b0, b2),
        );
        let (c2, c3) = (
            _mm256_shuffle_ps::<0x44>(b1, b3),
            _mm256_shuffle_ps::<0xEE>(b1, b3),
        );
        let (c4, c5) = (
            _mm256_shuffle_ps::<0x44>(b4, b6),
            _mm256_shuffle_ps::<0xEE>(b4, b6),
        );
        let (c6, c7) = (
            _mm256_shuffle_ps::<0x44>(b5, b7),
            _mm256_shuffle_ps::<0xEE>(b5, b7),
        );
        // Rows 0–3 and 4–7 of each column meet across the 128-bit halves.
        let d = dst_stride;
        _mm256_storeu_ps(dst, _mm256_permute2f128_ps::<0x20>(c0, c4));
        _mm256_storeu_ps(dst.add(d), _mm256_permute2f128_ps::<0x20>(c1, c5));
        _mm256_storeu_ps(dst.add(2 * d), _mm256_permute2f128_ps::<0x20>(c2, c6));
        _mm256_storeu_ps(dst.add(3 * d), _mm256_permute2f128_ps::<0x20>(c3, c7));
        _mm256_storeu_ps(dst.add(4 * d), _mm256_permute2f128_ps::<0x31>(c0, c4));
        _mm256_storeu_ps(dst.add(5 * d), _mm256_permute2f128_ps::<0x31>(c1, c5));
        _mm256_storeu_ps(dst.add(6 * d), _mm256_permute2f128_ps::<0x31>(c2, c6));
        _mm256_storeu_ps(dst.add(7 * d), _mm256_permute2f128_ps::<0x31>(c3, c7));
    }
}

/// Each of `images` (rows, cols) matrices in `src`, one after another, transposed into `dst`
/// ([`transpose`]), in parallel over the images and blocks of 16 destination rows (so that a
/// chunk of a few images still splits into many tasks).
pub(crate) fn transpose_images<T: Copy + Sync, D: Slot<T> + Send>(
    src: &[T],
    images: usize,
    (rows, cols): (usize, usize),
    dst: &mut [D],
) {
    use rayon::prelude::*;
    let len = rows * cols;
    assert!(src.len() >= images * len && dst.len() == images * len);
    if len == 0 {
        return;
    }
    dst.par_chunks_mut(len)
        .enumerate()
        .for_each(|(img, image)| {
            let src = &src[img * len..][..len];
            image
                .par_chunks_mut(TILE * rows)
                .enumerate()
                .for_each(|(b, block)| {
                    let first = b * TILE;
                    transpose(&src[first..], cols, (rows, block.len() / rows), block, rows);
                });
        });
}

/// Fills this thread's scratch pool with NaN buffers of many sizes (the tests' poison: a value
/// read from a lent buffer before it is written then shows as NaN in the result).
#[cfg(test)]
pub(crate) fn poison_scratch() {
    let held: Vec<Scratch<f32>> = [1 << 10, 1 << 14, 1 << 18, 1 << 20, 3 << 20]
        .into_iter()
        .map(|len| {
            let mut s = Scratch::<f32>::take(len);
            s.fill_whole(f32::NAN);
            s
        })
        .collect();
    drop(held);
}

/// A read-only matrix inside a slice: element (i, j) at `i·row_stride + j·col_stride`, so that
/// a block of columns, or a transpose, is a view rather than a copy.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A contiguous row-major (rows, cols) matrix.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `dst` (m, n, row-major) = a·b, or `dst += a·b` with `accumulate`: one gemm call on rayon's
/// threads, without the tensors (and their allocations) that candle's matmul would need.
/// Panics if the shapes disagree or a matrix reaches outside its slice.
#[allow(unsafe_code)]
pub(crate) fn matmul_into<T: Float>(
    dst: &mut [T],
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    accumulate: bool,
) {
    // SAFETY: `dst` is `dst.len()` initialised values, borrowed mutably.
    unsafe { matmul_raw(dst.as_mut_ptr(), dst.len(), a, b, accumulate, true) }
}

/// [`matmul_into`] on the calling thread only: for products that are already one of many
/// parallel tasks (gemm's own threads would nest inside rayon's).
#[allow(unsafe_code)]
pub(crate) fn matmul_into_serial<T: Float>(
    dst: &mut [T],
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    accumulate: bool,
) {
    // SAFETY: `dst` is `dst.len()` initialised values, borrowed mutably.
    unsafe { matmul_raw(dst.as_mut_ptr(), dst.len(), a, b, accumulate, false) }
}

/// [`matmul_into`] without accumulation into output slots ([`output_slots`]): writes every
/// one of them (gemm does not read its destination when it does not accumulate).
#[allow(unsafe_code)]
pub(crate) fn matmul_into_slots<T: Float>(
    dst: &mut [std::mem::MaybeUninit<T>],
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
) {
    // SAFETY: `dst` is `dst.len()` slots of `T`'s layout, borrowed mutably; without
    // accumulation nothing is read from them.
    unsafe { matmul_raw(dst.as_mut_ptr().cast::<T>(), dst.len(), a, b, false, true) }
}

/// The product behind [`matmul_into`], [`matmul_into_serial`] and [`matmul_into_slots`], on
/// rayon's threads when `parallel`; writes every one of the `dst_len` values (zeros when the
/// inner dimension is 0).
///
/// # Safety
/// `dst` is valid for writes of `dst_len` values (and for reads when `accumulate`) and
/// overlaps neither `a.data` nor `b.data`.
#[allow(unsafe_code)]
unsafe fn matmul_raw<T: Float>(
    dst: *mut T,
    dst_len: usize,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    accumulate: bool,
    parallel: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(
        b.rows, k,
        "matmul_into: inner dimensions {k} and {}",
        b.rows
    );
    assert_eq!(
        dst_len,
        m * n,
        "matmul_into: destination of {dst_len} for ({m}, {n})"
    );
    assert!(
        a.in_bounds() && b.in_bounds(),
        "matmul_into: a matrix reaches outside its slice"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..dst_len {
                // SAFETY: `i < dst_len`, within what the caller lent.
                unsafe { dst.add(i).write(T::from_f64(0.0)) };
            }
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let s = |v: usize| v as isize;
    // SAFETY: every element gemm reads lies inside `a.data` and `b.data` and every element it
    // writes inside `dst` (checked above, with the caller's promise on `dst`), which overlaps
    // neither; gemm reads `dst` only when accumulating. T is f32 or f64, types gemm implements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            s(n),
            accumulate,
            a.data.as_ptr(),
            s(a.col_stride),
            s(a.row_stride),
            b.data.as_ptr(),
            s(b.col_stride),
            s(b.row_stride),
            T::from_f64(1.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Largest |a − b| over two f32 tensors of one shape (the unit tests' comparisons); infinite
/// when a difference is not finite (a NaN left in an output would otherwise slip past `max`).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d: Vec<f32> = (a - b)
        .and_then(|d| d.flatten_all()?.to_vec1())
        .expect("two f32 tensors of one shape");
    d.iter().fold(0f32, |m, &x| {
        if x.is_finite() {
            m.max(x.abs())
        } else {
            f32::INFINITY
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes around the 16×16 tile (one short tile, several, partial ones on both sides) and
    /// the 8×8 blocks within it (whole, with rows or columns to spare), strides wider than the
    /// rows. f32 takes the AVX blocks where the CPU has AVX, f64 the plain tiles.
    #[test]
    fn transpose_moves_every_value_to_its_place() {
        fn check<T: Copy + PartialEq + std::fmt::Debug>(value: impl Fn(usize) -> T, nan: T) {
            for (rows, cols, src_extra, dst_extra) in [
                (1, 1, 0, 0),
                (5, 3, 2, 0),
                (8, 8, 0, 0),
                (16, 16, 0, 0),
                (9, 24, 1, 3),
                (24, 9, 0, 2),
                (17, 33, 0, 5),
                (31, 47, 4, 1),
                (64, 16, 0, 0),
                (40, 7, 3, 1),
            ] {
                let src_stride = cols + src_extra;
                let dst_stride = rows + dst_extra;
                let src: Vec<T> = (0..rows * src_stride).map(&value).collect();
                let mut dst = vec![nan; cols * dst_stride];
                transpose(&src, src_stride, (rows, cols), &mut dst, dst_stride);
                for c in 0..cols {
                    for r in 0..dst_stride {
                        let got = dst[c * dst_stride + r];
                        if r < rows {
                            let want = src[r * src_stride + c];
                            assert_eq!(got, want, "({r}, {c}) of {rows}×{cols}");
                        } else {
                            assert!(got != got, "wrote past row {rows} in column {c}");
                        }
                    }
                }
            }
        }
        check(|i| i as f32, f32::NAN);
        check(|i| i as f64, f64::NAN);
    }

    #[test]
    fn transpose_images_transposes_each_image() {
        let (images, rows, cols) = (3, 37, 20);
        let src: Vec<f32> = (0..images * rows * cols).map(|i| i as f32).collect();
        let mut dst = vec![f32::NAN; images * rows * cols];
        transpose_images(&src, images, (rows, cols), &mut dst);
        for i in 0..images {
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[(i * cols + c) * rows + r],
                        src[(i * rows + r) * cols + c]
                    );
                }
            }
        }
    }
}
