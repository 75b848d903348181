// SGD with momentum in two in-place passes per parameter (f32), the arithmetic of
// torch.optim.SGD: gd = g + wd*p; buf = mu*buf + (1 - tau)*gd; d = nesterov ? gd + mu*buf : buf;
// p = p - lr*d.
extern "C" __global__ void sgd_momentum_f32(float* buf, const float* g, const float* p,
                                            long long n, float wd, float mu, float one_minus_tau) {
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (long long)gridDim.x * blockDim.x) {
        float gd = g[k] + p[k] * wd;
        buf[k] = buf[k] * mu + gd * one_minus_tau;
    }
}

extern "C" __global__ void sgd_param_f32(float* p, const float* g, const float* buf, long long n,
                                         float lr, float wd, float mu, int nesterov) {
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (long long)gridDim.x * blockDim.x) {
        float d = nesterov ? (g[k] + p[k] * wd) + buf[k] * mu : buf[k];
        p[k] = p[k] - d * lr;
    }
}

// The same update for up to KD_SGD_LIST parameters in one launch (a ResNet18 has 62, so one
// launch a step instead of two a parameter), the list passed by value as the kernel's argument
// (2.6 KB, under CUDA's 4 KB). Block b updates elements [(b - first_block[t])·KD_SGD_CHUNK, +
// KD_SGD_CHUNK) of the parameter t with first_block[t] <= b < first_block[t + 1]; both passes
// of the two-kernel version run on each element in turn, with the same arithmetic.
#define KD_SGD_LIST 64
#define KD_SGD_CHUNK 4096

struct SgdList {
    float* p[KD_SGD_LIST];
    const float* g[KD_SGD_LIST];
    float* buf[KD_SGD_LIST];
    long long n[KD_SGD_LIST];
    float wd[KD_SGD_LIST];
    int first_block[KD_SGD_LIST + 1];
    int count;
};

extern "C" __global__ void sgd_list_f32(SgdList list, float lr, float mu, float one_minus_tau,
                                        int nesterov) {
    int b = (int)blockIdx.x, t = 0;
    while (t + 1 < list.count && list.first_block[t + 1] <= b) ++t;
    if (t >= list.count || b >= list.first_block[t + 1]) return;
    long long start = (long long)(b - list.first_block[t]) * KD_SGD_CHUNK;
    long long end = start + KD_SGD_CHUNK < list.n[t] ? start + KD_SGD_CHUNK : list.n[t];
    float* p = list.p[t];
    const float* g = list.g[t];
    float* buf = list.buf[t];
    float wd = list.wd[t];
    for (long long k = start + threadIdx.x; k < end; k += blockDim.x) {
        float gd = g[k] + p[k] * wd;
        float m = buf[k] * mu + gd * one_minus_tau;
        buf[k] = m;
        float d = nesterov ? (g[k] + p[k] * wd) + m * mu : m;
        p[k] = p[k] - d * lr;
    }
}
