// BatchNorm2d in training mode over NCHW tensors, optionally fused with the ReLU after it.
// stats is (2, C) f32: mean, biased variance; gamma and beta are (C,) f32. Statistics and sums
// are f32 for every element type. One block per channel for the reductions, blocks over the
// planes for the element-wise kernels (launch.rs): no index is divided per element.

// Welford's running (count, mean, M2), merged with Chan's formula.
struct Welford { float n, mean, m2; };

__device__ __forceinline__ Welford welford_merge(Welford a, Welford b) {
    float n = a.n + b.n;
    if (n == 0.0f) return a;
    float d = b.mean - a.mean;
    Welford r;
    r.n = n;
    r.mean = a.mean + d * (b.n / n);
    r.m2 = a.m2 + b.m2 + d * d * (a.n * b.n / n);
    return r;
}

__device__ __forceinline__ Welford welford_shfl(Welford w, int o) {
    Welford r;
    r.n = __shfl_xor_sync(0xffffffffu, w.n, o);
    r.mean = __shfl_xor_sync(0xffffffffu, w.mean, o);
    r.m2 = __shfl_xor_sync(0xffffffffu, w.m2, o);
    return r;
}

// The threads of a per-channel block as a TX × TY tile: TX consecutive elements of a plane
// (all of a small one), TY planes at a time, so that no index is divided per element. Threads
// with ty >= TY sit out the loops (and still take part in the block's reductions).
struct Tile { int tx, ty, TX, TY; };

__device__ __forceinline__ Tile plane_tile(int HW) {
    Tile t;
    t.TX = HW < (int)blockDim.x ? HW : (int)blockDim.x;
    t.TY = (int)blockDim.x / t.TX;
    t.tx = (int)threadIdx.x % t.TX;
    t.ty = (int)threadIdx.x / t.TX;
    return t;
}

// stats[c] = mean, stats[C + c] = biased variance of channel c = blockIdx.x.
template <class E>
__device__ void bn_stats(const typename E::T* x, float* stats, int N, int C, int HW) {
    __shared__ Welford part[32];
    int c = blockIdx.x;
    Tile t = plane_tile(HW);
    Welford w = {0.0f, 0.0f, 0.0f};
    for (int n = t.ty; t.ty < t.TY && n < N; n += t.TY) {
        const typename E::T* plane = x + ((long long)n * C + c) * HW;
        for (int i = t.tx; i < HW; i += t.TX) {
            float v = E::load(plane, i);
            w.n += 1.0f;
            float d = v - w.mean;
            w.mean += d / w.n;
            w.m2 += d * (v - w.mean);
        }
    }
    for (int o = 16; o > 0; o >>= 1) w = welford_merge(w, welford_shfl(w, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) part[warp] = w;
    __syncthreads();
    if (warp == 0) {
        Welford z = {0.0f, 0.0f, 0.0f};
        w = lane < warps ? part[lane] : z;
        for (int o = 16; o > 0; o >>= 1) w = welford_merge(w, welford_shfl(w, o));
        if (lane == 0) {
            stats[c] = w.mean;
            stats[C + c] = w.n > 0.0f ? w.m2 / w.n : 0.0f;
        }
    }
}

// y = gamma * (x - mean) / sqrt(var + eps) + beta, then max(y, 0) when relu. A per-plane
// launch: block (chunk, c, n) covers its chunk of plane (n, c).
template <class E>
__device__ void bn_apply(const typename E::T* x, const float* stats, const float* gamma,
                         const float* beta, typename E::T* y, int C, int HW, float eps, int relu) {
    int c = blockIdx.y;
    long long base = ((long long)blockIdx.z * C + c) * HW;
    float mean = stats[c], invstd = rsqrtf(stats[C + c] + eps), g = gamma[c], b = beta[c];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < HW; i += gridDim.x * blockDim.x) {
        float v = (E::load(x, base + i) - mean) * invstd * g + b;
        if (relu && !(v > 0.0f)) v = 0.0f;
        E::store(y, base + i, v);
    }
}

// red[c] = sum dy', red[C + c] = sum dy' * xhat, where dy' = dy masked by the ReLU.
template <class E>
__device__ void bn_backward_reduce(const typename E::T* x, const typename E::T* y,
                                   const typename E::T* dy, const float* stats, float* red,
                                   int N, int C, int HW, float eps, int relu) {
    __shared__ float shared32[32];
    int c = blockIdx.x;
    Tile t = plane_tile(HW);
    float mean = stats[c], invstd = rsqrtf(stats[C + c] + eps);
    float s = 0.0f, sx = 0.0f;
    for (int n = t.ty; t.ty < t.TY && n < N; n += t.TY) {
        long long base = ((long long)n * C + c) * HW;
        for (int i = t.tx; i < HW; i += t.TX) {
            float g = E::load(dy, base + i);
            if (relu && !(E::load(y, base + i) > 0.0f)) g = 0.0f;
            s += g;
            sx += g * (E::load(x, base + i) - mean) * invstd;
        }
    }
    s = block_sum(s, shared32);
    sx = block_sum(sx, shared32);
    if (threadIdx.x == 0) {
        red[c] = s;
        red[C + c] = sx;
    }
}

// dx = gamma * invstd * (dy' - sum dy' / M - xhat * sum(dy' xhat) / M), M = N * H * W. A
// per-plane launch, as bn_apply.
template <class E>
__device__ void bn_backward_data(const typename E::T* x, const typename E::T* y,
                                 const typename E::T* dy, const float* stats, const float* gamma,
                                 const float* red, typename E::T* dx, int N, int C, int HW,
                                 float eps, int relu) {
    int c = blockIdx.y;
    long long base = ((long long)blockIdx.z * C + c) * HW;
    float inv_m = 1.0f / ((float)N * (float)HW);
    float mean = stats[c], invstd = rsqrtf(stats[C + c] + eps);
    float ga = gamma[c], rs = red[c], rsx = red[C + c];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < HW; i += gridDim.x * blockDim.x) {
        long long k = base + i;
        float g = E::load(dy, k);
        if (relu && !(E::load(y, k) > 0.0f)) g = 0.0f;
        float xhat = (E::load(x, k) - mean) * invstd;
        float v = ga * invstd * (g - rs * inv_m - xhat * rsx * inv_m);
        E::store(dx, k, v);
    }
}

// running = (1 - momentum) * running + momentum * stats[row] * scale, in place; row 0 (mean,
// scale 1) or row 1 (variance, scale M / (M - 1) for the unbiased estimate).
extern "C" __global__ void bn_update_running(float* running, const float* stats, int C, int row,
                                             float momentum, float scale) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < C) running[c] = running[c] * (1.0f - momentum) + stats[row * C + c] * scale * momentum;
}

#define KD_BN_KERNELS(SUFFIX, E)                                                               \
extern "C" __global__ void bn_stats_##SUFFIX(const E::T* x, float* stats, int N, int C, int HW) { \
    bn_stats<E>(x, stats, N, C, HW);                                                            \
}                                                                                               \
extern "C" __global__ void bn_apply_##SUFFIX(const E::T* x, const float* stats,                 \
        const float* gamma, const float* beta, E::T* y, int C, int HW, float eps, int relu) {  \
    bn_apply<E>(x, stats, gamma, beta, y, C, HW, eps, relu);                                    \
}                                                                                               \
extern "C" __global__ void bn_backward_reduce_##SUFFIX(const E::T* x, const E::T* y,            \
        const E::T* dy, const float* stats, float* red, int N, int C, int HW, float eps,       \
        int relu) {                                                                             \
    bn_backward_reduce<E>(x, y, dy, stats, red, N, C, HW, eps, relu);                           \
}                                                                                               \
extern "C" __global__ void bn_backward_data_##SUFFIX(const E::T* x, const E::T* y,              \
        const E::T* dy, const float* stats, const float* gamma, const float* red, E::T* dx,    \
        int N, int C, int HW, float eps, int relu) {                                            \
    bn_backward_data<E>(x, y, dy, stats, gamma, red, dx, N, C, HW, eps, relu);                  \
}

KD_BN_KERNELS(f32, ElemF32)
KD_BN_KERNELS(bf16, ElemBF16)
