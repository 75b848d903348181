// BatchNorm2d in training mode over NCHW tensors, optionally fused with the ReLU after it.
// stats is (2, C) f32: mean, biased variance; gamma and beta are (C,) f32. Statistics and sums
// are f32 for every element type. One block per channel for the reductions, a flat grid for
// the rest.

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

// stats[c] = mean, stats[C + c] = biased variance of channel c = blockIdx.x.
template <class E>
__device__ void bn_stats(const typename E::T* x, float* stats, int N, int C, int HW) {
    __shared__ Welford part[32];
    int c = blockIdx.x;
    long long m = (long long)N * HW;
    Welford w = {0.0f, 0.0f, 0.0f};
    for (long long j = threadIdx.x; j < m; j += blockDim.x) {
        long long n = j / HW, i = j - n * HW;
        float v = E::load(x, (n * C + c) * HW + i);
        w.n += 1.0f;
        float d = v - w.mean;
        w.mean += d / w.n;
        w.m2 += d * (v - w.mean);
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

// y = gamma * (x - mean) / sqrt(var + eps) + beta, then max(y, 0) when relu.
template <class E>
__device__ void bn_apply(const typename E::T* x, const float* stats, const float* gamma,
                         const float* beta, typename E::T* y, int C, int HW, long long total,
                         float eps, int relu) {
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total;
         k += (long long)gridDim.x * blockDim.x) {
        int c = (int)((k / HW) % C);
        float invstd = rsqrtf(stats[C + c] + eps);
        float v = (E::load(x, k) - stats[c]) * invstd * gamma[c] + beta[c];
        if (relu && !(v > 0.0f)) v = 0.0f;
        E::store(y, k, v);
    }
}

// red[c] = sum dy', red[C + c] = sum dy' * xhat, where dy' = dy masked by the ReLU.
template <class E>
__device__ void bn_backward_reduce(const typename E::T* x, const typename E::T* y,
                                   const typename E::T* dy, const float* stats, float* red,
                                   int N, int C, int HW, float eps, int relu) {
    __shared__ float shared32[32];
    int c = blockIdx.x;
    long long m = (long long)N * HW;
    float mean = stats[c], invstd = rsqrtf(stats[C + c] + eps);
    float s = 0.0f, sx = 0.0f;
    for (long long j = threadIdx.x; j < m; j += blockDim.x) {
        long long n = j / HW, i = j - n * HW;
        long long k = (n * C + c) * HW + i;
        float g = E::load(dy, k);
        if (relu && !(E::load(y, k) > 0.0f)) g = 0.0f;
        s += g;
        sx += g * (E::load(x, k) - mean) * invstd;
    }
    s = block_sum(s, shared32);
    sx = block_sum(sx, shared32);
    if (threadIdx.x == 0) {
        red[c] = s;
        red[C + c] = sx;
    }
}

// dx = gamma * invstd * (dy' - sum dy' / M - xhat * sum(dy' xhat) / M), M = N * H * W.
template <class E>
__device__ void bn_backward_data(const typename E::T* x, const typename E::T* y,
                                 const typename E::T* dy, const float* stats, const float* gamma,
                                 const float* red, typename E::T* dx, int N, int C, int HW,
                                 long long total, float eps, int relu) {
    float inv_m = 1.0f / ((float)N * (float)HW);
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total;
         k += (long long)gridDim.x * blockDim.x) {
        int c = (int)((k / HW) % C);
        float invstd = rsqrtf(stats[C + c] + eps);
        float g = E::load(dy, k);
        if (relu && !(E::load(y, k) > 0.0f)) g = 0.0f;
        float xhat = (E::load(x, k) - stats[c]) * invstd;
        float v = gamma[c] * invstd * (g - red[c] * inv_m - xhat * red[C + c] * inv_m);
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
        const float* gamma, const float* beta, E::T* y, int C, int HW, long long total,        \
        float eps, int relu) {                                                                  \
    bn_apply<E>(x, stats, gamma, beta, y, C, HW, total, eps, relu);                             \
}                                                                                               \
extern "C" __global__ void bn_backward_reduce_##SUFFIX(const E::T* x, const E::T* y,            \
        const E::T* dy, const float* stats, float* red, int N, int C, int HW, float eps,       \
        int relu) {                                                                             \
    bn_backward_reduce<E>(x, y, dy, stats, red, N, C, HW, eps, relu);                           \
}                                                                                               \
extern "C" __global__ void bn_backward_data_##SUFFIX(const E::T* x, const E::T* y,              \
        const E::T* dy, const float* stats, const float* gamma, const float* red, E::T* dx,    \
        int N, int C, int HW, long long total, float eps, int relu) {                           \
    bn_backward_data<E>(x, y, dy, stats, gamma, red, dx, N, C, HW, total, eps, relu);           \
}

KD_BN_KERNELS(f32, ElemF32)
KD_BN_KERNELS(bf16, ElemBF16)
