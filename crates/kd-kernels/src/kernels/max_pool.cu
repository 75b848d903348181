// Padded max-pool, gradient to the first maximum of each window in row-major order (NaN wins),
// as kd's CPU op and PyTorch's CPU kernel do: over NCHW planes, and over channels-last (N, H, W,
// C) images (`*_cl_*`), where one channel's pixels lie C values apart.

// Pixel index y·W + x of the first maximum of window (oy, ox) of one channel, whose pixel p is
// at p·cs in `plane` (cs = 1 channels-first, C channels-last).
template <class E>
__device__ __forceinline__ int window_argmax(const typename E::T* plane, long long cs, int H,
                                             int W, int oy, int ox, int K, int S, int P) {
    int best = -1;
    float b = 0.0f;
    int y0 = oy * S - P, x0 = ox * S - P;
    for (int ky = 0; ky < K; ++ky) {
        int y = y0 + ky;
        if (y < 0 || y >= H) continue;
        for (int kx = 0; kx < K; ++kx) {
            int x = x0 + kx;
            if (x < 0 || x >= W) continue;
            float v = E::load(plane, (long long)(y * W + x) * cs);
            if (best < 0 || v > b || (isnan(v) && !isnan(b))) {
                best = y * W + x;
                b = v;
            }
        }
    }
    return best;
}

// The gradient of input pixel (iy, ix) of one channel: the sum, in the windows' row-major order,
// of dy over the windows whose first maximum it is; dy's window (oy, ox) at (oy·OW + ox)·cs.
template <class E>
__device__ __forceinline__ float pixel_grad(const typename E::T* plane, const typename E::T* dy,
                                            long long cs, int H, int W, int OH, int OW, int iy,
                                            int ix, int K, int S, int P) {
    // Windows oy with oy*S - P <= iy <= oy*S - P + K - 1.
    int oy0 = iy + P - K + 1 > 0 ? (iy + P - K + 1 + S - 1) / S : 0;
    int oy1 = (iy + P) / S; if (oy1 > OH - 1) oy1 = OH - 1;
    int ox0 = ix + P - K + 1 > 0 ? (ix + P - K + 1 + S - 1) / S : 0;
    int ox1 = (ix + P) / S; if (ox1 > OW - 1) ox1 = OW - 1;
    int r = iy * W + ix;
    float g = 0.0f;
    for (int oy = oy0; oy <= oy1; ++oy)
        for (int ox = ox0; ox <= ox1; ++ox)
            if (window_argmax<E>(plane, cs, H, W, oy, ox, K, S, P) == r)
                g += E::load(dy, (long long)(oy * OW + ox) * cs);
    return g;
}

template <class E>
__device__ void max_pool_fwd(const typename E::T* x, typename E::T* y, long long planes, int H,
                             int W, int OH, int OW, int K, int S, int P) {
    long long total = planes * OH * OW;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total;
         k += (long long)gridDim.x * blockDim.x) {
        long long p = k / ((long long)OH * OW);
        int r = (int)(k - p * OH * OW), oy = r / OW, ox = r - oy * OW;
        const typename E::T* plane = x + p * H * W;
        int i = window_argmax<E>(plane, 1, H, W, oy, ox, K, S, P);
        y[k] = plane[i];
    }
}

// One thread per input element: sums the gradients of the windows whose maximum it is.
template <class E>
__device__ void max_pool_bwd(const typename E::T* x, const typename E::T* dy, typename E::T* dx,
                             long long planes, int H, int W, int OH, int OW, int K, int S, int P) {
    long long total = planes * H * W;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total;
         k += (long long)gridDim.x * blockDim.x) {
        long long p = k / ((long long)H * W);
        int r = (int)(k - p * H * W), iy = r / W, ix = r - iy * W;
        float g = pixel_grad<E>(x + p * H * W, dy + p * OH * OW, 1, H, W, OH, OW, iy, ix, K, S, P);
        E::store(dx, k, g);
    }
}

// Channels-last: a ChannelTile over the output pixels m = (n·OH + oy)·OW + ox (forward) or the
// input pixels (backward), N·OH·OW and N·H·W int (the host checks); a warp reads a window's
// pixel as one segment of consecutive channels.
template <class E>
__device__ void max_pool_fwd_cl(const typename E::T* x, typename E::T* y, int N, int C, int H,
                                int W, int OH, int OW, int K, int S, int P) {
    ChannelTile t = channel_tile(C);
    KD_CL_ROWS(t, N * OH * OW) {
        int q = m / OW, ox = m - q * OW, n = q / OH, oy = q - n * OH;
        const typename E::T* image = x + (long long)n * H * W * C + t.c;
        int i = window_argmax<E>(image, C, H, W, oy, ox, K, S, P);
        y[(long long)m * C + t.c] = image[(long long)i * C];
    }
}

template <class E>
__device__ void max_pool_bwd_cl(const typename E::T* x, const typename E::T* dy,
                                typename E::T* dx, int N, int C, int H, int W, int OH, int OW,
                                int K, int S, int P) {
    ChannelTile t = channel_tile(C);
    KD_CL_ROWS(t, N * H * W) {
        int q = m / W, ix = m - q * W, n = q / H, iy = q - n * H;
        float g = pixel_grad<E>(x + (long long)n * H * W * C + t.c,
                                dy + (long long)n * OH * OW * C + t.c, C, H, W, OH, OW, iy, ix,
                                K, S, P);
        E::store(dx, (long long)m * C + t.c, g);
    }
}

#define KD_POOL_KERNELS(SUFFIX, E)                                                              \
extern "C" __global__ void max_pool_fwd_##SUFFIX(const E::T* x, E::T* y, long long planes,     \
        int H, int W, int OH, int OW, int K, int S, int P) {                                    \
    max_pool_fwd<E>(x, y, planes, H, W, OH, OW, K, S, P);                                       \
}                                                                                               \
extern "C" __global__ void max_pool_bwd_##SUFFIX(const E::T* x, const E::T* dy, E::T* dx,      \
        long long planes, int H, int W, int OH, int OW, int K, int S, int P) {                  \
    max_pool_bwd<E>(x, dy, dx, planes, H, W, OH, OW, K, S, P);                                  \
}                                                                                               \
extern "C" __global__ void max_pool_fwd_cl_##SUFFIX(const E::T* x, E::T* y, int N, int C,      \
        int H, int W, int OH, int OW, int K, int S, int P) {                                    \
    max_pool_fwd_cl<E>(x, y, N, C, H, W, OH, OW, K, S, P);                                      \
}                                                                                               \
extern "C" __global__ void max_pool_bwd_cl_##SUFFIX(const E::T* x, const E::T* dy, E::T* dx,   \
        int N, int C, int H, int W, int OH, int OW, int K, int S, int P) {                      \
    max_pool_bwd_cl<E>(x, dy, dx, N, C, H, W, OH, OW, K, S, P);                                 \
}

KD_POOL_KERNELS(f32, ElemF32)
KD_POOL_KERNELS(bf16, ElemBF16)
