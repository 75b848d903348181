//! How candle's CUDA allocations are made: from a memory pool that keeps what is freed into it,
//! without per-buffer stream events; and the pool's high-water marks, for benchmarks.
//!
//! cudarc allocates with `cuMemAllocAsync` from the device's current memory pool, whose release
//! threshold is 0 by default: at every stream or context synchronisation the driver hands all
//! of the pool's free memory back to the OS, and the next allocations map it again. A training
//! loop synchronises often (reads of the loss sums, evaluation, the benches' clocks), so it would
//! pay the mapping of its activations again and again. PyTorch's caching allocator keeps what it
//! freed; [`retain_freed_memory`] makes the pool do the same (threshold = `u64::MAX`).
//! `KD_DISABLE=mempool` leaves the driver's default, for measuring what this buys.
//!
//! Each allocation also made two CUDA events (and each free destroyed them): cudarc's record of
//! which stream last read and wrote a buffer, which it consults only when the context has more
//! than one stream. candle's `Device::new_cuda` runs everything on the per-thread default
//! stream, so the events are made and destroyed unused, about four driver calls per tensor;
//! [`skip_allocation_events`] turns them off (`KD_DISABLE=events` leaves them on).
//!
//! On the CPU, or without the `cuda` feature, every function here is a no-op that says so.
use candle_core::{Device, Result};

/// The pool's high-water marks since the last [`reset_pool_peaks`], in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolPeaks {
    /// Most bytes handed out to live allocations at once.
    pub used: u64,
    /// Most bytes the pool held from the OS at once (used + free but kept).
    pub reserved: u64,
}

impl PoolPeaks {
    /// [`PoolPeaks::used`] in MiB.
    pub fn used_mib(&self) -> f64 {
        mib(self.used)
    }

    /// [`PoolPeaks::reserved`] in MiB.
    pub fn reserved_mib(&self) -> f64 {
        mib(self.reserved)
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Makes `device`'s memory pool keep the memory freed into it across synchronisations, unless
/// `KD_DISABLE=mempool`. Returns whether the threshold was set: `false` on the CPU, without the
/// `cuda` feature, when disabled, or when the device allocates without a pool.
pub fn retain_freed_memory(device: &Device) -> Result<bool> {
    if !crate::enabled(crate::Kernel::MemPool) {
        return Ok(false);
    }
    #[cfg(feature = "cuda")]
    if let Some(pool) = imp::pool(device)? {
        imp::set(pool, imp::Attr::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX)?;
        return Ok(true);
    }
    let _ = device;
    Ok(false)
}

/// Stops cudarc from making a read and a write event for each buffer allocated on `device`
/// from now on, unless `KD_DISABLE=events` or the context already runs several streams (where
/// cudarc uses the events to order them). Returns whether it did.
///
/// Only for a device that keeps to one stream, as `Device::new_cuda` and kd do: a stream created
/// later (`Device::new_cuda_with_stream`, `CudaContext::new_stream`) would not be ordered
/// against buffers made without events.
pub fn skip_allocation_events(device: &Device) -> bool {
    if !crate::enabled(crate::Kernel::AllocationEvents) {
        return false;
    }
    #[cfg(feature = "cuda")]
    #[allow(unsafe_code)]
    if let Device::Cuda(dev) = device {
        if dev.cuda_stream().context().is_in_multi_stream_mode() {
            return false;
        }
        // SAFETY: one stream on this context (checked above), so no buffer needs ordering
        // between streams; the caller keeps it so (the function's contract).
        unsafe { dev.disable_event_tracking() };
        return true;
    }
    let _ = device;
    false
}

/// Whether buffers allocated on `device` now get cudarc's stream events (`None` on the CPU).
pub fn allocation_events(device: &Device) -> Option<bool> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return Some(dev.is_event_tracking());
    }
    let _ = device;
    None
}

/// The release threshold of `device`'s pool (`None` where there is no pool): `u64::MAX` after
/// [`retain_freed_memory`], the driver's 0 otherwise. For `selfcheck`.
pub fn release_threshold(device: &Device) -> Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let Some(pool) = imp::pool(device)? {
        return Ok(Some(imp::get(
            pool,
            imp::Attr::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
        )?));
    }
    let _ = device;
    Ok(None)
}

/// Starts the high-water marks of `device`'s pool again from what is in use now.
pub fn reset_pool_peaks(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(pool) = imp::pool(device)? {
        // The driver accepts only 0 for these two, which resets them to the current values.
        imp::set(pool, imp::Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)?;
        imp::set(pool, imp::Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, 0)?;
    }
    let _ = device;
    Ok(())
}

/// The high-water marks of `device`'s pool since the last [`reset_pool_peaks`] (`None` on the
/// CPU or without a pool). Call it after synchronising, so that queued frees have happened.
pub fn pool_peaks(device: &Device) -> Result<Option<PoolPeaks>> {
    #[cfg(feature = "cuda")]
    if let Some(pool) = imp::pool(device)? {
        return Ok(Some(PoolPeaks {
            used: imp::get(pool, imp::Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            reserved: imp::get(pool, imp::Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        }));
    }
    let _ = device;
    Ok(None)
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod imp {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    use candle_core::{Device, Result};

    pub(super) type Attr = sys::CUmemPool_attribute;

    /// The pool `cuMemAllocAsync` draws from on `device`'s CUDA device; `None` on the CPU and
    /// where cudarc allocates synchronously (no pool support).
    pub(super) fn pool(device: &Device) -> Result<Option<sys::CUmemoryPool>> {
        let Device::Cuda(dev) = device else {
            return Ok(None);
        };
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        if !ctx.has_async_alloc() {
            return Ok(None);
        }
        // SAFETY: the context's device handle came from the driver (`cuDeviceGet`).
        let pool = unsafe { result::device::get_mem_pool(ctx.cu_device()) }
            .map_err(candle_core::Error::wrap)?;
        Ok(Some(pool))
    }

    /// Every attribute written here is a `cuuint64_t`.
    pub(super) fn set(pool: sys::CUmemoryPool, attr: Attr, value: u64) -> Result<()> {
        let mut v = value;
        // SAFETY: a live pool; the attribute's value type is a u64.
        unsafe { result::mem_pool::set_attribute(pool, attr, (&mut v as *mut u64).cast()) }
            .map_err(|e| candle_core::Error::Msg(format!("cuMemPoolSetAttribute({attr:?}): {e}")))
    }

    pub(super) fn get(pool: sys::CUmemoryPool, attr: Attr) -> Result<u64> {
        let mut v = 0u64;
        // SAFETY: a live pool; the attribute's value type is a u64.
        unsafe { result::mem_pool::get_attribute(pool, attr, (&mut v as *mut u64).cast()) }
            .map_err(|e| {
                candle_core::Error::Msg(format!("cuMemPoolGetAttribute({attr:?}): {e}"))
            })?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_has_no_pool_and_says_so() {
        let cpu = Device::Cpu;
        assert!(!retain_freed_memory(&cpu).unwrap());
        assert!(!skip_allocation_events(&cpu));
        assert_eq!(allocation_events(&cpu), None);
        assert_eq!(release_threshold(&cpu).unwrap(), None);
        reset_pool_peaks(&cpu).unwrap();
        assert_eq!(pool_peaks(&cpu).unwrap(), None);
    }
}
