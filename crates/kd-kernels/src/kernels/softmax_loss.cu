// Losses on the softmax of f32 logits (B, K), one launch forward and one backward each, where
// candle's composed log-softmax, gather and means launch about thirty kernels a loss:
// - softmax cross-entropy against a target distribution q built from labels:
//   q = wa·onehot(la) + wb·onehot(lb) + eps_k (label smoothing ε: eps_k = ε / K; mixup's two
//   label sets: wa = λ(1 − ε), wb = (1 − λ)(1 − ε); plain labels: lb = la, wb = 0);
// - Hinton's KD loss T²·mean_b KL(softmax(t/T) ‖ softmax(s/T)).
// Forward: one block; warp w takes rows w, w + warps, ... and the block adds the warps' sums in
// a fixed order, so the loss is deterministic. Backward: one warp a row. A label outside
// [0, K) gives a NaN loss and NaN gradients (the host path refuses it by name).

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The row's max of z·inv_t and log Σ exp(z·inv_t − max), in every lane of the warp:
// log softmax(z·inv_t)_k = z_k·inv_t − max − lse.
struct RowLse { float max, lse; };

__device__ RowLse row_lse(const float* z, int K, float inv_t) {
    int lane = threadIdx.x & 31;
    float m = __uint_as_float(0xff800000u);  // -inf
    for (int k = lane; k < K; k += 32) m = fmaxf(m, z[k] * inv_t);
    m = warp_max(m);
    float s = 0.0f;
    for (int k = lane; k < K; k += 32) s += expf(z[k] * inv_t - m);
    RowLse r;
    r.max = m;
    r.lse = logf(warp_sum(s));
    return r;
}

__device__ __forceinline__ float nan_f32() { return __uint_as_float(0x7fc00000u); }

// loss[0] = mean_b Σ_k q_bk · (−log p_bk). One block (blockDim.x a multiple of 32).
extern "C" __global__ void xent_fwd(const float* z, const unsigned int* la, const unsigned int* lb,
                                    float* loss, int B, int K, float wa, float wb, float eps_k) {
    __shared__ float shared32[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float acc = 0.0f;
    for (int b = warp; b < B; b += warps) {
        const float* row = z + (long long)b * K;
        RowLse r = row_lse(row, K, 1.0f);
        float sum_logp = 0.0f;
        if (eps_k != 0.0f) {
            for (int k = lane; k < K; k += 32) sum_logp += row[k] - r.max - r.lse;
            sum_logp = warp_sum(sum_logp);
        }
        unsigned int a = la[b], c = lb[b];
        float l = nan_f32();
        if (a < (unsigned int)K && c < (unsigned int)K) {
            float lpa = row[a] - r.max - r.lse, lpc = row[c] - r.max - r.lse;
            l = -(wa * lpa + wb * lpc + eps_k * sum_logp);
        }
        acc += l;
    }
    float total = block_sum(lane == 0 ? acc : 0.0f, shared32);
    if (threadIdx.x == 0) loss[0] = total / (float)B;
}

// dz = grad[0] / B · (softmax(z) − q), one warp a row.
extern "C" __global__ void xent_bwd(const float* z, const unsigned int* la, const unsigned int* lb,
                                    const float* grad, float* dz, int B, int K, float wa, float wb,
                                    float eps_k) {
    int lane = threadIdx.x & 31;
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int warps = (gridDim.x * blockDim.x) >> 5;
    float scale = grad[0] / (float)B;
    for (int b = warp; b < B; b += warps) {
        const float* row = z + (long long)b * K;
        float* out = dz + (long long)b * K;
        RowLse r = row_lse(row, K, 1.0f);
        unsigned int a = la[b], c = lb[b];
        bool ok = a < (unsigned int)K && c < (unsigned int)K;
        for (int k = lane; k < K; k += 32) {
            float q = eps_k + ((unsigned int)k == a ? wa : 0.0f) + ((unsigned int)k == c ? wb : 0.0f);
            float p = expf(row[k] - r.max - r.lse);
            out[k] = ok ? scale * (p - q) : nan_f32();
        }
    }
}

// loss[0] = T² · mean_b Σ_k p_t,k · (log p_t,k − log p_s,k), p = softmax(logits / T). One block.
extern "C" __global__ void kd_kl_fwd(const float* s, const float* t, float* loss, int B, int K,
                                     float inv_t, float t_sq) {
    __shared__ float shared32[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float acc = 0.0f;
    for (int b = warp; b < B; b += warps) {
        const float* rs = s + (long long)b * K;
        const float* rt = t + (long long)b * K;
        RowLse ls = row_lse(rs, K, inv_t), lt = row_lse(rt, K, inv_t);
        float kl = 0.0f;
        for (int k = lane; k < K; k += 32) {
            float lpt = rt[k] * inv_t - lt.max - lt.lse;
            float lps = rs[k] * inv_t - ls.max - ls.lse;
            kl += expf(lpt) * (lpt - lps);
        }
        acc += warp_sum(kl);
    }
    float total = block_sum(lane == 0 ? acc : 0.0f, shared32);
    if (threadIdx.x == 0) loss[0] = t_sq * total / (float)B;
}

// ds = grad[0] · T / B · (p_s − p_t), one warp a row (the teacher gets no gradient).
extern "C" __global__ void kd_kl_bwd(const float* s, const float* t, const float* grad, float* ds,
                                     int B, int K, float inv_t, float t_val) {
    int lane = threadIdx.x & 31;
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int warps = (gridDim.x * blockDim.x) >> 5;
    float scale = grad[0] * t_val / (float)B;
    for (int b = warp; b < B; b += warps) {
        const float* rs = s + (long long)b * K;
        const float* rt = t + (long long)b * K;
        RowLse ls = row_lse(rs, K, inv_t), lt = row_lse(rt, K, inv_t);
        for (int k = lane; k < K; k += 32) {
            float ps = expf(rs[k] * inv_t - ls.max - ls.lse);
            float pt = expf(rt[k] * inv_t - lt.max - lt.lse);
            ds[(long long)b * K + k] = scale * (ps - pt);
        }
    }
}
