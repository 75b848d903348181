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
