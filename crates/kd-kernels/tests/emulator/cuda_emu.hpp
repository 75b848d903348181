// A CPU emulator for the subset of CUDA C that kd's kernels use, so that CI (no GPU) runs the
// kernel sources themselves, not a rewrite of them.
//
// Each block runs after the previous one; its threads run concurrently as OS threads (one pool
// for all blocks), so __syncthreads is a real barrier and a warp shuffle a real exchange among
// 32 threads. Shared memory is a function-local static: one copy, which is exactly one block's worth because the
// blocks run one at a time. Built with AddressSanitizer, an out-of-bounds access of any kernel
// is an error; built with ThreadSanitizer, so is a data race between its threads.
//
// What this does not show: the GPU's memory model beyond what the barriers order, warp
// scheduling, and the GPU's approximate intrinsics (rsqrtf here is exact).
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace kd_emu {

// Ends the process at once: other threads of the launch may be waiting at a barrier, and exit()
// would run destructors under them.
[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "cuda emulator: %s\n", what);
    std::fflush(stderr);
    std::_Exit(3);
}

// The lanes of one warp exchanging a shuffle's operands.
struct Warp {
    explicit Warp(int lanes) : lanes(lanes), bar(lanes) {}
    int lanes;
    std::barrier<> bar;
    float values[32];
};

inline dim3 grid_dim, block_dim;
inline thread_local dim3 thread_idx, block_idx;
// The running block's barriers; made afresh for each block, because a thread that returns
// drops out of them for the rest of its block only.
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<Warp>> warps;

// Runs kernel(args...) over grid × block (block one-dimensional), blocks in order (x fastest),
// on one pool of `block` threads (creating threads is what costs most under the sanitizers).
template <class... P, class... A>
void launch(dim3 grid, unsigned block, void (*kernel)(P...), A... args) {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
        fail("invalid grid");
    if (block == 0 || block > 1024) fail("invalid block size");
    grid_dim = grid;
    block_dim = dim3{block, 1, 1};
    unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
    // The host and the pool meet here twice a block: to start it and to finish it.
    std::barrier<> phase(block + 1);
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
        threads.emplace_back([=, &phase] {
            thread_idx = dim3{t, 0, 0};
            for (unsigned long long b = 0; b < blocks; ++b) {
                phase.arrive_and_wait();
                block_idx = dim3{(unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y),
                                 (unsigned)(b / grid.x / grid.y)};
                kernel(args...);
                // A thread that has returned no longer holds up its block's barriers, as on
                // Volta and later.
                warps[t / 32]->bar.arrive_and_drop();
                block_barrier->arrive_and_drop();
                phase.arrive_and_wait();
            }
        });
    }
    for (unsigned long long b = 0; b < blocks; ++b) {
        block_barrier = std::make_unique<std::barrier<>>(block);
        warps.clear();
        for (unsigned w = 0; w * 32 < block; ++w)
            warps.push_back(std::make_unique<Warp>(block - w * 32 < 32 ? block - w * 32 : 32));
        phase.arrive_and_wait();
        phase.arrive_and_wait();
    }
    for (auto& th : threads) th.join();
    block_barrier.reset();
    warps.clear();
}

}  // namespace kd_emu

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define threadIdx kd_emu::thread_idx
#define blockIdx kd_emu::block_idx
#define blockDim kd_emu::block_dim
#define gridDim kd_emu::grid_dim

inline void __syncthreads() { kd_emu::block_barrier->arrive_and_wait(); }

// The value of `v` held by lane (this lane ^ lane_mask), every lane of the warp taking part.
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
    if (mask != 0xffffffffu) kd_emu::fail("__shfl_xor_sync with a partial mask");
    kd_emu::Warp& w = *kd_emu::warps[threadIdx.x / 32];
    int lane = (int)(threadIdx.x % 32), other = lane ^ lane_mask;
    if (other >= w.lanes) kd_emu::fail("__shfl_xor_sync reads a lane past the block's end");
    w.values[lane] = v;
    w.bar.arrive_and_wait();
    float r = w.values[other];
    w.bar.arrive_and_wait();
    return r;
}

inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
