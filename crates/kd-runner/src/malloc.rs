//! glibc's allocator, set to keep the memory it is given back.
//!
//! A CPU step allocates and frees tensors of tens of MB (a ResNet50 stage-1 activation at batch
//! 32 and 32 px is 33.5 MB). glibc serves blocks above its mmap threshold (at most 32 MB) with
//! a fresh `mmap` and unmaps them on free, and trims the heap's free top, so every step faults
//! such blocks in again page by page, each page zeroed by the kernel: `perf` put
//! `clear_page_erms` at 28% of a ResNet50 inference bench. With mmap off, trimming off and one
//! arena, freed blocks are reused; the process keeps its peak heap (which it reaches every step
//! anyway). `KD_MALLOC=system` leaves glibc's defaults.

/// The environment variable that, set to `system`, leaves glibc's defaults.
pub const ENV: &str = "KD_MALLOC";

/// Applies the settings unless [`ENV`] says `system`; returns whether it did. Call first in
/// `main`, before any thread starts (the arena limit applies to threads created after it).
pub fn keep_freed_memory() -> bool {
    if std::env::var(ENV).is_ok_and(|v| v == "system") {
        return false;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn apply() -> bool {
    // SAFETY: `mallopt` only changes glibc's allocation parameters; it is called before the
    // program starts other threads and takes no pointers.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1) == 1
            && libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
    }
}

/// Other platforms' allocators are left as they are.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}

#[cfg(test)]
mod tests {
    /// glibc accepts every setting (mallopt returns 1 on success), and a block larger than the
    /// largest mmap threshold is still served afterwards, written and freed.
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_settings_and_large_blocks_still_allocate() {
        assert!(super::apply());
        for _ in 0..3 {
            let v = vec![1u8; 64 << 20];
            assert_eq!(v.iter().map(|&b| b as usize).sum::<usize>(), 64 << 20);
        }
    }
}
