// BatchNorm2d in training mode over NCHW tensors, optionally fused with the ReLU after it.
// stats is (2, C) f32: mean, biased variance; gamma and beta are (C,) f32. Statistics and sums
// are f32 for every element type. The reductions run on blocks (channel, slice of the batch)
// and a second kernel merges the slices in a fixed order; the element-wise kernels on blocks
// over the planes (launch.rs). No index is divided per element.

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

// The samples [n0, n1) of slice blockIdx.y of a per-channel reduction: gridDim.y contiguous
// slices of the batch, so that a channel is read by several blocks at once.
// The first N % S slices get one sample more than the others.
__device__ __forceinline__ void batch_slice(int N, int* n0, int* n1) {
    int S = (int)gridDim.y, k = (int)blockIdx.y, q = N / S, r = N % S;
    *n0 = k * q + (k < r ? k : r);
    *n1 = *n0 + q + (k < r ? 1 : 0);
}

// Welford state (count, mean, M2) of channel c = blockIdx.x over slice blockIdx.y, to
// part[((slice * C) + c) * 3 + {0, 1, 2}]; bn_stats_finish merges the slices.
template <class E>
__device__ void bn_stats(const typename E::T* x, float* part, int N, int C, int HW) {
    __shared__ Welford warp_part[32];
    int c = blockIdx.x, n0, n1;
    batch_slice(N, &n0, &n1);
    Tile t = plane_tile(HW);
    Welford w = {0.0f, 0.0f, 0.0f};
    for (int n = n0 + t.ty; t.ty < t.TY && n < n1; n += t.TY) {
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
    if (lane == 0) warp_part[warp] = w;
    __syncthreads();
    if (warp == 0) {
        Welford z = {0.0f, 0.0f, 0.0f};
        w = lane < warps ? warp_part[lane] : z;
        for (int o = 16; o > 0; o >>= 1) w = welford_merge(w, welford_shfl(w, o));
        if (lane == 0) {
            float* out = part + ((long long)blockIdx.y * C + c) * 3;
            out[0] = w.n;
            out[1] = w.mean;
            out[2] = w.m2;
        }
    }
}

// The S slices' Welford states of channel c merged in slice order (deterministic):
// *mean and *var (biased).
__device__ __forceinline__ void merged_stats(const float* part, int c, int C, int S, float* mean,
                                             float* var) {
    Welford w = {0.0f, 0.0f, 0.0f};
    for (int s = 0; s < S; ++s) {
        const float* p = part + ((long long)s * C + c) * 3;
        Welford q = {p[0], p[1], p[2]};
        w = welford_merge(w, q);
    }
    *mean = w.mean;
    *var = w.n > 0.0f ? w.m2 / w.n : 0.0f;
}

// running = (1 - momentum) * running + momentum * value * scale: PyTorch's update, with scale
// M / (M - 1) for the unbiased running variance (1 for the mean).
__device__ __forceinline__ float running_update(float running, float value, float momentum,
                                                float scale) {
    return running * (1.0f - momentum) + value * scale * momentum;
}

// stats[c] = mean, stats[C + c] = biased variance of channel c (merged_stats), also returned in
// *mean and *var.
__device__ __forceinline__ void finish_channel(const float* part, float* stats, int c, int C,
                                               int S, float* mean, float* var) {
    merged_stats(part, c, C, S, mean, var);
    stats[c] = *mean;
    stats[C + c] = *var;
}

// The (2, C) statistics from the slices' partial states. One thread per channel.
extern "C" __global__ void bn_stats_finish(const float* part, float* stats, int C, int S) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    float mean, var;
    if (c < C) finish_channel(part, stats, c, C, S, &mean, &var);
}

// bn_stats_finish, and the layer's running statistics updated in the same launch (as cuDNN's
// training-mode BatchNorm does): mean with scale 1, variance with var_scale = M / (M - 1).
// The same arithmetic as bn_update_running on the stored statistics, so the same bits.
extern "C" __global__ void bn_stats_finish_running(const float* part, float* stats, int C, int S,
                                                   float* running_mean, float* running_var,
                                                   float momentum, float var_scale) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float mean, var;
    finish_channel(part, stats, c, C, S, &mean, &var);
    running_mean[c] = running_update(running_mean[c], mean, momentum, 1.0f);
    running_var[c] = running_update(running_var[c], var, momentum, var_scale);
}

// v + residual[k] with RESIDUAL, then the ReLU when RESIDUAL or relu: the end of every
// element-wise BatchNorm kernel (a NaN counts as not positive and becomes 0).
template <class E, bool RESIDUAL>
__device__ __forceinline__ float add_rectify(float v, const typename E::T* residual, long long k,
                                             int relu) {
    if (RESIDUAL) v += E::load(residual, k);
    if ((RESIDUAL || relu) && !(v > 0.0f)) v = 0.0f;
    return v;
}

// dx of one element (see bn_backward_data): dy masked by the ReLU's output y, then the
// BatchNorm's input gradient with the channel's factors; *masked gets dy'.
__device__ __forceinline__ float bn_input_grad(float x, float y, float dy, float mean,
                                               float invstd, float ga, float rs, float rsx,
                                               float inv_m, int relu, float* masked) {
    float g = dy;
    if (relu && !(y > 0.0f)) g = 0.0f;
    *masked = g;
    float xhat = (x - mean) * invstd;
    return ga * invstd * (g - rs * inv_m - xhat * rsx * inv_m);
}

// y = gamma * (x - mean) / sqrt(var + eps) + beta, then max(y, 0) when relu. A per-plane
// launch: block (chunk, c, n) covers its chunk of plane (n, c). With RESIDUAL (a residual
// block's tail in training mode) the shortcut is added before the ReLU, which is then always on.
template <class E, bool RESIDUAL>
__device__ void bn_apply(const typename E::T* x, const typename E::T* residual,
                         const float* stats, const float* gamma, const float* beta,
                         typename E::T* y, int C, int HW, float eps, int relu) {
    int c = blockIdx.y;
    long long base = ((long long)blockIdx.z * C + c) * HW;
    float mean = stats[c], invstd = rsqrtf(stats[C + c] + eps), g = gamma[c], b = beta[c];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < HW; i += gridDim.x * blockDim.x) {
        float v = (E::load(x, base + i) - mean) * invstd * g + b;
        E::store(y, base + i, add_rectify<E, RESIDUAL>(v, residual, base + i, relu));
    }
}

// Eval mode with the running statistics (a frozen teacher, evaluation; nothing needs a
// gradient): y = x * scale + shift with scale = gamma / sqrt(var + eps), shift = beta - mean *
// scale, then + residual (a residual block's tail, when RESIDUAL) and the ReLU when relu (always
// after a residual). The per-channel factors read directly from the four (C,) vectors, so no
// (2, C) statistics tensor is assembled per call. A per-plane launch, as bn_apply.
template <class E, bool RESIDUAL>
__device__ void bn_eval(const typename E::T* x, const float* mean, const float* var,
                        const float* gamma, const float* beta, const typename E::T* residual,
                        typename E::T* y, int C, int HW, float eps, int relu) {
    int c = blockIdx.y;
    long long base = ((long long)blockIdx.z * C + c) * HW;
    float scale = gamma[c] * rsqrtf(var[c] + eps);
    float shift = beta[c] - mean[c] * scale;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < HW; i += gridDim.x * blockDim.x) {
        float v = E::load(x, base + i) * scale + shift;
        E::store(y, base + i, add_rectify<E, RESIDUAL>(v, residual, base + i, relu));
    }
}

// Σdy' and Σdy'·x̂ of channel c = blockIdx.x over slice blockIdx.y, where dy' = dy masked by
// the ReLU, to part[((slice * C) + c) * 2 + {0, 1}]; bn_reduce_finish adds the slices.
template <class E>
__device__ void bn_backward_reduce(const typename E::T* x, const typename E::T* y,
                                   const typename E::T* dy, const float* stats, float* part,
                                   int N, int C, int HW, float eps, int relu) {
    __shared__ float shared32[32];
    int c = blockIdx.x, n0, n1;
    batch_slice(N, &n0, &n1);
    Tile t = plane_tile(HW);
    float mean = stats[c], invstd = rsqrtf(stats[C + c] + eps);
    float s = 0.0f, sx = 0.0f;
    for (int n = n0 + t.ty; t.ty < t.TY && n < n1; n += t.TY) {
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
        float* out = part + ((long long)blockIdx.y * C + c) * 2;
        out[0] = s;
        out[1] = sx;
    }
}

// red[c] = Σdy', red[C + c] = Σdy'·x̂: the S slices' sums of channel c added in slice order.
extern "C" __global__ void bn_reduce_finish(const float* part, float* red, int C, int S) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.0f, sx = 0.0f;
    for (int k = 0; k < S; ++k) {
        s += part[((long long)k * C + c) * 2];
        sx += part[((long long)k * C + c) * 2 + 1];
    }
    red[c] = s;
    red[C + c] = sx;
}

// dx = gamma * invstd * (dy' - sum dy' / M - xhat * sum(dy' xhat) / M), M = N * H * W. A
// per-plane launch, as bn_apply. With shortcut_grad (a residual block's tail) dx holds two
// tensors: the input's gradient, then the shortcut's, which is dy' itself.
template <class E>
__device__ void bn_backward_data(const typename E::T* x, const typename E::T* y,
                                 const typename E::T* dy, const float* stats, const float* gamma,
                                 const float* red, typename E::T* dx, int N, int C, int HW,
                                 float eps, int relu, int shortcut_grad) {
    long long total = (long long)N * C * HW;
    int c = blockIdx.y;
    long long base = ((long long)blockIdx.z * C + c) * HW;
    float inv_m = 1.0f / ((float)N * (float)HW);
    float mean = stats[c], invstd = rsqrtf(stats[C + c] + eps);
    float ga = gamma[c], rs = red[c], rsx = red[C + c];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < HW; i += gridDim.x * blockDim.x) {
        long long k = base + i;
        float g;
        float v = bn_input_grad(E::load(x, k), E::load(y, k), E::load(dy, k), mean, invstd, ga,
                                rs, rsx, inv_m, relu, &g);
        E::store(dx, k, v);
        if (shortcut_grad) E::store(dx, total + k, g);
    }
}

// running = (1 - momentum) * running + momentum * stats[row] * scale, in place; row 0 (mean,
// scale 1) or row 1 (variance, scale M / (M - 1) for the unbiased estimate).
extern "C" __global__ void bn_update_running(float* running, const float* stats, int C, int row,
                                             float momentum, float scale) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < C) running[c] = running_update(running[c], stats[row * C + c], momentum, scale);
}

#define KD_BN_KERNELS(SUFFIX, E)                                                               \
extern "C" __global__ void bn_stats_##SUFFIX(const E::T* x, float* part, int N, int C, int HW) { \
    bn_stats<E>(x, part, N, C, HW);                                                             \
}                                                                                               \
extern "C" __global__ void bn_apply_##SUFFIX(const E::T* x, const float* stats,                 \
        const float* gamma, const float* beta, E::T* y, int C, int HW, float eps, int relu) {  \
    bn_apply<E, false>(x, x, stats, gamma, beta, y, C, HW, eps, relu);                          \
}                                                                                               \
extern "C" __global__ void bn_apply_add_relu_##SUFFIX(const E::T* x, const E::T* residual,      \
        const float* stats, const float* beta_gamma, E::T* y, int C, int HW, float eps) {       \
    bn_apply<E, true>(x, residual, stats, beta_gamma + C, beta_gamma, y, C, HW, eps, 1);        \
}                                                                                               \
extern "C" __global__ void bn_eval_##SUFFIX(const E::T* x, const float* mean, const float* var, \
        const float* gamma, const float* beta, E::T* y, int C, int HW, float eps, int relu) {   \
    bn_eval<E, false>(x, mean, var, gamma, beta, x, y, C, HW, eps, relu);                       \
}                                                                                               \
extern "C" __global__ void bn_eval_add_relu_##SUFFIX(const E::T* x, const float* mean,          \
        const float* var, const float* gamma, const float* beta, const E::T* residual, E::T* y, \
        int C, int HW, float eps) {                                                             \
    bn_eval<E, true>(x, mean, var, gamma, beta, residual, y, C, HW, eps, 1);                    \
}                                                                                               \
extern "C" __global__ void bn_backward_reduce_##SUFFIX(const E::T* x, const E::T* y,            \
        const E::T* dy, const float* stats, float* part, int N, int C, int HW, float eps,      \
        int relu) {                                                                             \
    bn_backward_reduce<E>(x, y, dy, stats, part, N, C, HW, eps, relu);                          \
}                                                                                               \
extern "C" __global__ void bn_backward_data_##SUFFIX(const E::T* x, const E::T* y,              \
        const E::T* dy, const float* stats, const float* gamma, const float* red, E::T* dx,    \
        int N, int C, int HW, float eps, int relu, int shortcut_grad) {                         \
    bn_backward_data<E>(x, y, dy, stats, gamma, red, dx, N, C, HW, eps, relu, shortcut_grad);   \
}

KD_BN_KERNELS(f32, ElemF32)
KD_BN_KERNELS(bf16, ElemBF16)

// ---------------------------------------------------------------------------------------------
// Channels-last (N, H, W, C): the same operations over the (M, C) matrix, M = N·H·W, with the
// same arguments (and N for the element-wise ones, which the channels-first kernels read from
// the grid). A block is a tile of TX consecutive channels (32, or all C when fewer) × TY rows
// (ChannelTile, common.cuh):
// a warp reads one contiguous segment of a row, each thread keeps one channel's factors in
// registers, and no index is divided per element. The reductions write the channels-first
// kernels' partial results, merged by the same finish kernels.

// Welford state of channel c over the rows of slice blockIdx.y (batch_slice over the M rows),
// the tile's TY states of a channel merged in row order by its first thread.
template <class E>
__device__ void bn_stats_cl(const typename E::T* x, float* part, int N, int C, int HW) {
    __shared__ Welford cell[1024];
    ChannelTile t = channel_tile(C);
    int m0, m1;
    batch_slice(N * HW, &m0, &m1);
    Welford w = {0.0f, 0.0f, 0.0f};
    for (int m = m0 + t.ty; t.on && m < m1; m += t.TY) {
        float v = E::load(x, (long long)m * C + t.c);
        w.n += 1.0f;
        float d = v - w.mean;
        w.mean += d / w.n;
        w.m2 += d * (v - w.mean);
    }
    cell[threadIdx.x] = w;
    __syncthreads();
    if (t.on && t.ty == 0) {
        for (int k = 1; k < t.TY; ++k) w = welford_merge(w, cell[threadIdx.x + k * t.TX]);
        float* out = part + ((long long)blockIdx.y * C + t.c) * 3;
        out[0] = w.n;
        out[1] = w.mean;
        out[2] = w.m2;
    }
}

// Σdy' and Σdy'·x̂ of channel c over slice blockIdx.y, as bn_backward_reduce.
template <class E>
__device__ void bn_backward_reduce_cl(const typename E::T* x, const typename E::T* y,
                                      const typename E::T* dy, const float* stats, float* part,
                                      int N, int C, int HW, float eps, int relu) {
    __shared__ float cell_s[1024], cell_sx[1024];
    ChannelTile t = channel_tile(C);
    int m0, m1;
    batch_slice(N * HW, &m0, &m1);
    float s = 0.0f, sx = 0.0f;
    if (t.on) {
        float mean = stats[t.c], invstd = rsqrtf(stats[C + t.c] + eps);
        for (int m = m0 + t.ty; m < m1; m += t.TY) {
            long long k = (long long)m * C + t.c;
            float g = E::load(dy, k);
            if (relu && !(E::load(y, k) > 0.0f)) g = 0.0f;
            s += g;
            sx += g * (E::load(x, k) - mean) * invstd;
        }
    }
    cell_s[threadIdx.x] = s;
    cell_sx[threadIdx.x] = sx;
    __syncthreads();
    if (t.on && t.ty == 0) {
        for (int k = 1; k < t.TY; ++k) {
            s += cell_s[threadIdx.x + k * t.TX];
            sx += cell_sx[threadIdx.x + k * t.TX];
        }
        float* out = part + ((long long)blockIdx.y * C + t.c) * 2;
        out[0] = s;
        out[1] = sx;
    }
}

template <class E, bool RESIDUAL>
__device__ void bn_apply_cl(const typename E::T* x, const typename E::T* residual,
                            const float* stats, const float* gamma, const float* beta,
                            typename E::T* y, int N, int C, int HW, float eps, int relu) {
    ChannelTile t = channel_tile(C);
    if (!t.on) return;
    int c = t.c;
    float mean = stats[c], invstd = rsqrtf(stats[C + c] + eps), g = gamma[c], b = beta[c];
    KD_CL_ROWS(t, N * HW) {
        long long k = (long long)m * C + c;
        float v = (E::load(x, k) - mean) * invstd * g + b;
        E::store(y, k, add_rectify<E, RESIDUAL>(v, residual, k, relu));
    }
}

template <class E, bool RESIDUAL>
__device__ void bn_eval_cl(const typename E::T* x, const float* mean, const float* var,
                           const float* gamma, const float* beta, const typename E::T* residual,
                           typename E::T* y, int N, int C, int HW, float eps, int relu) {
    ChannelTile t = channel_tile(C);
    if (!t.on) return;
    int c = t.c;
    float scale = gamma[c] * rsqrtf(var[c] + eps);
    float shift = beta[c] - mean[c] * scale;
    KD_CL_ROWS(t, N * HW) {
        long long k = (long long)m * C + c;
        float v = E::load(x, k) * scale + shift;
        E::store(y, k, add_rectify<E, RESIDUAL>(v, residual, k, relu));
    }
}

template <class E>
__device__ void bn_backward_data_cl(const typename E::T* x, const typename E::T* y,
                                    const typename E::T* dy, const float* stats,
                                    const float* gamma, const float* red, typename E::T* dx,
                                    int N, int C, int HW, float eps, int relu,
                                    int shortcut_grad) {
    ChannelTile t = channel_tile(C);
    if (!t.on) return;
    int c = t.c;
    int rows = N * HW;
    long long total = (long long)rows * C;
    float inv_m = 1.0f / ((float)N * (float)HW);
    float mean = stats[c], invstd = rsqrtf(stats[C + c] + eps);
    float ga = gamma[c], rs = red[c], rsx = red[C + c];
    KD_CL_ROWS(t, rows) {
        long long k = (long long)m * C + c;
        float g;
        float v = bn_input_grad(E::load(x, k), E::load(y, k), E::load(dy, k), mean, invstd, ga,
                                rs, rsx, inv_m, relu, &g);
        E::store(dx, k, v);
        if (shortcut_grad) E::store(dx, total + k, g);
    }
}

#define KD_BN_KERNELS_CL(SUFFIX, E)                                                            \
extern "C" __global__ void bn_stats_cl_##SUFFIX(const E::T* x, float* part, int N, int C,       \
        int HW) {                                                                               \
    bn_stats_cl<E>(x, part, N, C, HW);                                                          \
}                                                                                               \
extern "C" __global__ void bn_apply_cl_##SUFFIX(const E::T* x, const float* stats,              \
        const float* gamma, const float* beta, E::T* y, int N, int C, int HW, float eps,        \
        int relu) {                                                                             \
    bn_apply_cl<E, false>(x, x, stats, gamma, beta, y, N, C, HW, eps, relu);                    \
}                                                                                               \
extern "C" __global__ void bn_apply_add_relu_cl_##SUFFIX(const E::T* x, const E::T* residual,   \
        const float* stats, const float* beta_gamma, E::T* y, int N, int C, int HW, float eps) {\
    bn_apply_cl<E, true>(x, residual, stats, beta_gamma + C, beta_gamma, y, N, C, HW, eps, 1);  \
}                                                                                               \
extern "C" __global__ void bn_eval_cl_##SUFFIX(const E::T* x, const float* mean,                \
        const float* var, const float* gamma, const float* beta, E::T* y, int N, int C, int HW, \
        float eps, int relu) {                                                                  \
    bn_eval_cl<E, false>(x, mean, var, gamma, beta, x, y, N, C, HW, eps, relu);                 \
}                                                                                               \
extern "C" __global__ void bn_eval_add_relu_cl_##SUFFIX(const E::T* x, const float* mean,       \
        const float* var, const float* gamma, const float* beta, const E::T* residual, E::T* y, \
        int N, int C, int HW, float eps) {                                                      \
    bn_eval_cl<E, true>(x, mean, var, gamma, beta, residual, y, N, C, HW, eps, 1);              \
}                                                                                               \
extern "C" __global__ void bn_backward_reduce_cl_##SUFFIX(const E::T* x, const E::T* y,         \
        const E::T* dy, const float* stats, float* part, int N, int C, int HW, float eps,      \
        int relu) {                                                                             \
    bn_backward_reduce_cl<E>(x, y, dy, stats, part, N, C, HW, eps, relu);                       \
}                                                                                               \
extern "C" __global__ void bn_backward_data_cl_##SUFFIX(const E::T* x, const E::T* y,           \
        const E::T* dy, const float* stats, const float* gamma, const float* red, E::T* dx,    \
        int N, int C, int HW, float eps, int relu, int shortcut_grad) {                         \
    bn_backward_data_cl<E>(x, y, dy, stats, gamma, red, dx, N, C, HW, eps, relu,               \
                           shortcut_grad);                                                      \
}

KD_BN_KERNELS_CL(f32, ElemF32)
KD_BN_KERNELS_CL(bf16, ElemBF16)
