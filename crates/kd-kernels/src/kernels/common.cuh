// Shared by every kd kernel source (prepended by kd-kernels before NVRTC compiles it).
// bf16 is handled as raw 16-bit words, so the sources need no CUDA headers.
typedef unsigned short bf16_t;

__device__ __forceinline__ float bf16_to_f32(bf16_t h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// Round to nearest even, NaN kept a quiet NaN.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

struct ElemF32 {
    typedef float T;
    static __device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
    static __device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; }
};

struct ElemBF16 {
    typedef bf16_t T;
    static __device__ __forceinline__ float load(const bf16_t* p, long long i) { return bf16_to_f32(p[i]); }
    static __device__ __forceinline__ void store(bf16_t* p, long long i, float v) { p[i] = f32_to_bf16(v); }
};

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v, float* shared32) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) shared32[warp] = v;
    __syncthreads();
    v = lane < warps ? shared32[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// A channels-last (N, H, W, C) tensor seen as an (M, C) matrix, M = N·H·W (or the pixels of
// an output): a block of blockDim.x threads is a tile of TX consecutive channels (32, or all C
// when fewer) × TY rows, channel group blockIdx.x. A warp reads one contiguous segment of a
// row, and no index is divided per element.
struct ChannelTile { int c, ty, TX, TY; bool on; };

__device__ __forceinline__ ChannelTile channel_tile(int C) {
    ChannelTile t;
    t.TX = C < 32 ? C : 32;
    t.TY = (int)blockDim.x / t.TX;
    t.ty = (int)threadIdx.x / t.TX;
    t.c = (int)blockIdx.x * t.TX + (int)threadIdx.x % t.TX;
    t.on = t.ty < t.TY && t.c < C;
    return t;
}

// The rows m = first, first + step, ... below M of a thread of an element-wise tile (M = N·H·W
// fits an int, as the kernels' arguments; a 64-bit counter would have the compiler divide by
// the step to count the iterations).
#define KD_CL_ROWS(t, M) \
    for (int m = (int)blockIdx.y * (t).TY + (t).ty; (t).on && m < (M); m += (int)gridDim.y * (t).TY)

