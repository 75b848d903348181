//! Launch geometry of the kernels in `src/kernels/*.cu`: how many blocks of how many threads
//! each launch uses. The CUDA launches (feature `cuda`) and the tests that run the kernel
//! sources in the CPU emulator (`tests/emulator/`) both take it from here, so the emulator runs
//! the kernels with the geometry the GPU gets.

/// A grid of blocks (x, y, z) of `threads` threads each (one-dimensional blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchGeometry {
    /// Blocks along x, y and z (`gridDim`).
    pub grid: [u32; 3],
    /// Threads per block (`blockDim.x`).
    pub threads: u32,
}

impl LaunchGeometry {
    /// Most blocks of a grid-stride launch: enough to fill any current GPU many times over,
    /// few enough that a huge tensor is covered by the kernel's loop, not by the grid.
    pub const MAX_FLAT_BLOCKS: u32 = 65_535 * 8;

    /// Most blocks along y or z of a CUDA grid.
    pub const MAX_GRID_YZ: usize = 65_535;

    /// A one-dimensional grid of `blocks` blocks.
    pub fn linear(blocks: u32, threads: u32) -> Self {
        LaunchGeometry {
            grid: [blocks, 1, 1],
            threads,
        }
    }

    /// A grid-stride launch over `total` elements: 256 threads a block, one element a thread
    /// up to [`Self::MAX_FLAT_BLOCKS`] blocks.
    pub fn flat(total: usize) -> Self {
        Self::linear(
            total.div_ceil(256).clamp(1, Self::MAX_FLAT_BLOCKS as usize) as u32,
            256,
        )
    }

    /// One block of 1,024 threads for a loss over the rows of (B, K) logits (`xent_fwd`,
    /// `kd_kl_fwd`): warp w takes rows w, w + 32, ..., and the block adds the warps' sums in a
    /// fixed order, so the loss does not depend on scheduling.
    pub fn loss_rows() -> Self {
        Self::linear(1, 1024)
    }

    /// One warp a row of `rows` rows, 256 threads (8 rows) a block, up to
    /// [`Self::MAX_FLAT_BLOCKS`] blocks (the kernel loops beyond): the losses' backward.
    pub fn warp_per_row(rows: usize) -> Self {
        Self::linear(
            rows.div_ceil(8).clamp(1, Self::MAX_FLAT_BLOCKS as usize) as u32,
            256,
        )
    }

    /// Blocks a per-channel reduction aims for: a few per streaming multiprocessor of a large
    /// GPU (132 on an H100), so that channels × slices keeps them all reading.
    pub const REDUCTION_BLOCKS: usize = 1024;

    /// How many slices of the batch each channel's reduction is split into: enough that
    /// channels × slices reaches [`Self::REDUCTION_BLOCKS`] (64 channels would otherwise keep
    /// 64 multiprocessors busy and leave the rest idle), at most one per sample.
    pub fn reduction_slices(n: usize, c: usize) -> usize {
        Self::REDUCTION_BLOCKS
            .div_ceil(c.max(1))
            .clamp(1, n.clamp(1, Self::MAX_GRID_YZ))
    }

    /// Blocks (channel, slice) of 512 threads for the per-channel reductions, with
    /// [`Self::reduction_slices`] slices; each writes a partial result that a second kernel
    /// merges in a fixed order (so the result is deterministic). The kernels' `block_sum`
    /// needs a multiple of 32 threads, at most 1024.
    pub fn per_channel(n: usize, c: usize) -> Self {
        LaunchGeometry {
            grid: [c as u32, Self::reduction_slices(n, c) as u32, 1],
            threads: 512,
        }
    }

    /// Blocks (chunk, channel, sample) over the H·W planes of an (N, C, H, W) tensor, so that a
    /// kernel knows its channel from `blockIdx.y` and divides no index per element (a 64-bit
    /// division is a long instruction sequence on a GPU). Blocks have 256 threads, or as few
    /// whole warps as cover a smaller plane. `None` when N or C exceeds
    /// [`Self::MAX_GRID_YZ`].
    pub fn per_plane(n: usize, c: usize, hw: usize) -> Option<Self> {
        if n > Self::MAX_GRID_YZ || c > Self::MAX_GRID_YZ || n == 0 || c == 0 || hw == 0 {
            return None;
        }
        let threads = hw.next_multiple_of(32).min(256);
        Some(LaunchGeometry {
            grid: [hw.div_ceil(threads) as u32, c as u32, n as u32],
            threads: threads as u32,
        })
    }

    /// Channels one block of the channels-last BatchNorm kernels covers side by side: 32 (a
    /// warp then reads one 128-byte segment of an f32 row), or all of them when fewer.
    pub fn channel_group(c: usize) -> usize {
        c.clamp(1, 32)
    }

    /// Blocks (channel group, slice of rows) of 256 threads for the channels-last per-channel
    /// reductions over the (M, C) matrix of an (N, H, W, C) tensor, M = N·H·W: each block a
    /// tile of [`Self::channel_group`] channels × 256 / group rows, and enough slices of the
    /// rows that groups × slices reaches [`Self::REDUCTION_BLOCKS`] (at most one per row tile).
    /// The partial results are the channels-first reductions', merged by the same kernels.
    pub fn channels_last_reduction(m: usize, c: usize) -> Self {
        let (groups, rows) = Self::channel_tile(c);
        let slices = Self::REDUCTION_BLOCKS
            .div_ceil(groups)
            .clamp(1, m.div_ceil(rows).clamp(1, Self::MAX_GRID_YZ));
        LaunchGeometry {
            grid: [groups as u32, slices as u32, 1],
            threads: 256,
        }
    }

    /// Blocks (channel group, row tile) of 256 threads for the channels-last element-wise
    /// BatchNorm kernels: one row a thread, up to [`Self::MAX_GRID_YZ`] row tiles (the kernels
    /// loop beyond).
    pub fn channels_last_rows(m: usize, c: usize) -> Self {
        let (groups, rows) = Self::channel_tile(c);
        LaunchGeometry {
            grid: [
                groups as u32,
                m.div_ceil(rows).clamp(1, Self::MAX_GRID_YZ) as u32,
                1,
            ],
            threads: 256,
        }
    }

    /// (channel groups, rows a block) of a channels-last tile of 256 threads.
    fn channel_tile(c: usize) -> (usize, usize) {
        let group = Self::channel_group(c);
        (c.max(1).div_ceil(group), 256 / group)
    }
}

/// Parameters one launch of `sgd_list_f32` updates at most (`KD_SGD_LIST` in sgd.cu).
pub const SGD_LIST: usize = 64;

/// Elements of one parameter a block of `sgd_list_f32` updates (`KD_SGD_CHUNK` in sgd.cu).
pub const SGD_CHUNK: usize = 4096;

/// The blocks of one `sgd_list_f32` launch over parameters of `lens` elements (at most
/// [`SGD_LIST`]), 256 threads each: [`SGD_CHUNK`] elements a block, and the first block of each
/// parameter, with the total after the last (`first_block` in sgd.cu). `None` when the list is
/// too long or the blocks overflow an i32.
pub fn sgd_list(lens: &[usize]) -> Option<(LaunchGeometry, Vec<i32>)> {
    if lens.len() > SGD_LIST {
        return None;
    }
    let mut first = Vec::with_capacity(lens.len() + 1);
    let mut total = 0usize;
    for &n in lens {
        first.push(i32::try_from(total).ok()?);
        total = total.checked_add(n.div_ceil(SGD_CHUNK))?;
    }
    first.push(i32::try_from(total).ok()?);
    let blocks = u32::try_from(total.max(1)).ok()?;
    Some((LaunchGeometry::linear(blocks, 256), first))
}

/// Whether any two of the byte ranges `[start, end)` that a launch writes through device
/// pointers overlap (the fused SGD list, the running statistics' update). Empty ranges overlap
/// nothing and are set aside first: sorted by start, two non-empty ranges overlap only if some
/// neighbours do, which an empty range between them would hide.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn overlapping(mut written: Vec<(u64, u64)>) -> bool {
    written.retain(|&(start, end)| start < end);
    written.sort_unstable();
    written.windows(2).any(|w| w[0].1 > w[1].0)
}

#[cfg(test)]
mod tests {
    use super::{overlapping, sgd_list, LaunchGeometry, SGD_LIST};

    #[test]
    fn per_plane_covers_each_plane_with_whole_warps() {
        // CIFAR ResNet planes: 32×32, 16×16, 8×8, 4×4, and an odd 7×7.
        for (hw, threads, chunks) in [
            (1024, 256, 4),
            (256, 256, 1),
            (64, 64, 1),
            (16, 32, 1),
            (49, 64, 1),
        ] {
            let g = LaunchGeometry::per_plane(8, 3, hw).unwrap();
            assert_eq!(
                g,
                LaunchGeometry {
                    grid: [chunks, 3, 8],
                    threads
                },
                "H·W = {hw}"
            );
            assert!(g.grid[0] * g.threads >= hw as u32);
        }
        assert!(LaunchGeometry::per_plane(70_000, 3, 16).is_none());
        assert!(LaunchGeometry::per_plane(8, 0, 16).is_none());
    }

    #[test]
    fn reductions_split_small_channel_counts_over_the_batch() {
        assert_eq!(LaunchGeometry::per_channel(256, 64).grid, [64, 16, 1]);
        assert_eq!(LaunchGeometry::per_channel(256, 512).grid, [512, 2, 1]);
        assert_eq!(LaunchGeometry::per_channel(256, 2048).grid, [2048, 1, 1]);
        // Never more slices than samples.
        assert_eq!(LaunchGeometry::per_channel(3, 5).grid, [5, 3, 1]);
        assert_eq!(LaunchGeometry::per_channel(3, 5).threads, 512);
    }

    #[test]
    fn channels_last_tiles_cover_the_channels_and_split_the_rows() {
        // 64 channels: 2 groups of 32 × 8 rows; ResNet18's first stage at batch 256.
        let g = LaunchGeometry::channels_last_reduction(256 * 32 * 32, 64);
        assert_eq!(g.grid, [2, 512, 1]);
        assert_eq!(
            LaunchGeometry::channels_last_rows(256 * 32 * 32, 64).grid,
            [2, 32_768, 1]
        );
        // Fewer channels than a warp: one group of all of them, 256 / 5 = 51 rows a block.
        assert_eq!(LaunchGeometry::channels_last_rows(100, 5).grid, [1, 2, 1]);
        // Never more slices than row tiles; never more than the grid allows.
        assert_eq!(
            LaunchGeometry::channels_last_reduction(20, 512).grid,
            [16, 3, 1]
        );
        assert_eq!(
            LaunchGeometry::channels_last_rows(1 << 30, 32).grid[1],
            65_535
        );
    }

    #[test]
    fn sgd_lists_give_each_parameter_its_chunks() {
        let (g, first) = sgd_list(&[1, 0, 4096, 4097, 10_000]).unwrap();
        assert_eq!(first, vec![0, 1, 1, 2, 4, 7]);
        assert_eq!(g, LaunchGeometry::linear(7, 256));
        // An empty list still launches one block (which finds nothing to do).
        assert_eq!(sgd_list(&[]).unwrap().0.grid, [1, 1, 1]);
        assert!(sgd_list(&[1; SGD_LIST + 1]).is_none());
    }

    #[test]
    fn flat_launches_clamp_the_grid() {
        assert_eq!(LaunchGeometry::flat(0).grid, [1, 1, 1]);
        assert_eq!(LaunchGeometry::flat(257).grid, [2, 1, 1]);
        assert_eq!(
            LaunchGeometry::flat(usize::MAX / 2).grid[0],
            LaunchGeometry::MAX_FLAT_BLOCKS
        );
    }

    #[test]
    fn overlapping_ranges_are_found_past_empty_ones() {
        assert!(!overlapping(vec![]));
        assert!(!overlapping(vec![(0, 100), (100, 200), (300, 400)]));
        assert!(overlapping(vec![(100, 200), (0, 101)]));
        assert!(overlapping(vec![(0, 100), (10, 20), (50, 60)]));
        // An empty range overlaps nothing, not even inside another range...
        assert!(!overlapping(vec![(0, 100), (50, 50)]));
        // ...and does not hide an overlap of the ranges around it.
        assert!(overlapping(vec![(0, 100), (10, 10), (50, 60)]));
    }
}
