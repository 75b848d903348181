//! Launch geometry of the kernels in `src/kernels/*.cu`: how many blocks of how many threads
//! each launch uses. The CUDA launches (feature `cuda`) and the tests that run the kernel
//! sources in the CPU emulator (`tests/emulator/`) both take it from here, so the emulator runs
//! the kernels with the geometry the GPU gets.

/// Blocks × threads of a one-dimensional launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchGeometry {
    /// Blocks in the grid (`gridDim.x`).
    pub blocks: u32,
    /// Threads per block (`blockDim.x`).
    pub threads: u32,
}

impl LaunchGeometry {
    /// Most blocks of a grid-stride launch: enough to fill any current GPU many times over,
    /// few enough that a huge tensor is covered by the kernel's loop, not by the grid.
    pub const MAX_FLAT_BLOCKS: u32 = 65_535 * 8;

    /// A grid-stride launch over `total` elements: 256 threads a block, one element a thread
    /// up to [`Self::MAX_FLAT_BLOCKS`] blocks.
    pub fn flat(total: usize) -> Self {
        LaunchGeometry {
            blocks: total.div_ceil(256).clamp(1, Self::MAX_FLAT_BLOCKS as usize) as u32,
            threads: 256,
        }
    }

    /// One block of 512 threads per channel, for the per-channel reductions (the kernels'
    /// `block_sum` needs a multiple of 32 threads, at most 1024).
    pub fn per_channel(channels: usize) -> Self {
        LaunchGeometry {
            blocks: channels as u32,
            threads: 512,
        }
    }
}
