// The end of a residual block, relu(a + b), in one pass, and its backward, dy masked by y > 0,
// which is the gradient of both a and b. A NaN sum is not positive, so it gives 0, as the fused
// BatchNorm's ReLU does. Grid-stride over n elements.
template <class E>
__device__ void add_relu(const typename E::T* a, const typename E::T* b, typename E::T* y,
                         long long n) {
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (long long)gridDim.x * blockDim.x) {
        float s = E::load(a, k) + E::load(b, k);
        E::store(y, k, s > 0.0f ? s : 0.0f);
    }
}

template <class E>
__device__ void relu_backward(const typename E::T* y, const typename E::T* dy,
                              typename E::T* dx, long long n) {
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (long long)gridDim.x * blockDim.x) {
        E::store(dx, k, E::load(y, k) > 0.0f ? E::load(dy, k) : 0.0f);
    }
}

#define KD_ADD_RELU_KERNELS(SUFFIX, E)                                                          \
extern "C" __global__ void add_relu_##SUFFIX(const E::T* a, const E::T* b, E::T* y,            \
        long long n) {                                                                          \
    add_relu<E>(a, b, y, n);                                                                    \
}                                                                                               \
extern "C" __global__ void relu_backward_##SUFFIX(const E::T* y, const E::T* dy, E::T* dx,     \
        long long n) {                                                                          \
    relu_backward<E>(y, dy, dx, n);                                                             \
}

KD_ADD_RELU_KERNELS(f32, ElemF32)
KD_ADD_RELU_KERNELS(bf16, ElemBF16)
