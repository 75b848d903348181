// Random crop (zero padding), horizontal flip, normalisation and mixing of a batch drawn from a
// uint8 NCHW data set resident on the device, in one pass. plan is (B, 5) u32: image index,
// crop offsets oy and ox in the padded image, flip, and the batch position of the sample it is
// mixed with. Same arithmetic as kd-data's CropFlip::apply_normalized and MixPlan::apply_host.

// Normalised pixel (c, y, x) of the crop and flip that plan row pl describes.
__device__ __forceinline__ float augmented(const unsigned char* images, const unsigned int* pl,
                                           const float* norm, int c, int y, int x, int C, int H,
                                           int W, int pad) {
    int xs = pl[3] ? W - 1 - x : x;
    int sy = y + (int)pl[1] - pad, sx = xs + (int)pl[2] - pad;
    float v = 0.0f;
    if (sy >= 0 && sy < H && sx >= 0 && sx < W)
        v = (float)images[(((long long)pl[0] * C + c) * H + sy) * W + sx];
    // norm: scale[C] then shift[C].
    return v * norm[c] + norm[C + c];
}

// mix: 0 none; 1 mixup, lambda·own + (1 − lambda)·partner; 2 CutMix, the partner's pixels in
// rows [y0, y1) and columns [x0, x1).
template <class E>
__device__ void augment(const unsigned char* images, const unsigned int* plan, const float* norm,
                        typename E::T* out, int B, int C, int H, int W, int pad, int mix,
                        float lambda, int y0, int y1, int x0, int x1) {
    long long total = (long long)B * C * H * W;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total;
         k += (long long)gridDim.x * blockDim.x) {
        int x = (int)(k % W);
        long long t = k / W;
        int y = (int)(t % H);
        t /= H;
        int c = (int)(t % C);
        int b = (int)(t / C);
        const unsigned int* pl = plan + 5 * b;
        float v = augmented(images, pl, norm, c, y, x, C, H, W, pad);
        const unsigned int* partner = plan + 5 * pl[4];
        if (mix == 1)
            v = lambda * v + (1.0f - lambda) * augmented(images, partner, norm, c, y, x, C, H, W, pad);
        else if (mix == 2 && y >= y0 && y < y1 && x >= x0 && x < x1)
            v = augmented(images, partner, norm, c, y, x, C, H, W, pad);
        E::store(out, k, v);
    }
}

#define KD_AUGMENT_KERNELS(SUFFIX, E)                                                           \
extern "C" __global__ void augment_##SUFFIX(const unsigned char* images,                       \
        const unsigned int* plan, const float* norm, E::T* out, int B, int C, int H, int W,     \
        int pad, int mix, float lambda, int y0, int y1, int x0, int x1) {                       \
    augment<E>(images, plan, norm, out, B, C, H, W, pad, mix, lambda, y0, y1, x0, x1);          \
}

KD_AUGMENT_KERNELS(f32, ElemF32)
KD_AUGMENT_KERNELS(bf16, ElemBF16)
