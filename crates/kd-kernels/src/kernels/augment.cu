// Random crop (zero padding), horizontal flip and normalisation of a batch drawn from a uint8
// NCHW data set resident on the device. plan is (B, 4) u32: image index, crop offsets oy and
// ox in the padded image, flip. Same arithmetic as kd-data's CropFlip::apply_normalized.
template <class E>
__device__ void augment(const unsigned char* images, const unsigned int* plan, const float* norm,
                        typename E::T* out, int B, int C, int H, int W, int pad) {
    long long total = (long long)B * C * H * W;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total;
         k += (long long)gridDim.x * blockDim.x) {
        int x = (int)(k % W);
        long long t = k / W;
        int y = (int)(t % H);
        t /= H;
        int c = (int)(t % C);
        int b = (int)(t / C);
        const unsigned int* pl = plan + 4 * b;
        int xs = pl[3] ? W - 1 - x : x;
        int sy = y + (int)pl[1] - pad, sx = xs + (int)pl[2] - pad;
        float v = 0.0f;
        if (sy >= 0 && sy < H && sx >= 0 && sx < W)
            v = (float)images[(((long long)pl[0] * C + c) * H + sy) * W + sx];
        // norm: scale[C] then shift[C].
        E::store(out, k, v * norm[c] + norm[C + c]);
    }
}

extern "C" __global__ void augment_f32(const unsigned char* images, const unsigned int* plan,
        const float* norm, float* out, int B, int C, int H, int W, int pad) {
    augment<ElemF32>(images, plan, norm, out, B, C, H, W, pad);
}
extern "C" __global__ void augment_bf16(const unsigned char* images, const unsigned int* plan,
        const float* norm, bf16_t* out, int B, int C, int H, int W, int pad) {
    augment<ElemBF16>(images, plan, norm, out, B, C, H, W, pad);
}
