// Stored weights widened to f32: f32 copied, bf16 and f16 exactly; FP8 e4m3 times its block's
// `weight_scale_inv` (DeepSeek-V3 report §3.3.2: 128×128 blocks), one rounding.
// `w` is row-major [rows, cols]; `scales` [⌈rows/b0⌉, ⌈cols/b1⌉]. One thread per value.

extern "C" __global__ void widen_f32(const float* __restrict__ w, long long n, float* __restrict__ out) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = w[i];
}

extern "C" __global__ void widen_bf16(const u16* __restrict__ w, long long n, float* __restrict__ out) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = bf16_to_f32(w[i]);
}

extern "C" __global__ void widen_f16(const u16* __restrict__ w, long long n, float* __restrict__ out) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = f16_to_f32(w[i]);
}

extern "C" __global__ void widen_fp8(const u8* __restrict__ w, const float* __restrict__ scales, int rows, int cols,
                                     int b0, int b1, float* __restrict__ out) {
    const int grid_cols = (cols + b1 - 1) / b1;
    const long long n = (long long)rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(i / cols), c = (int)(i % cols);
        out[i] = fp8_e4m3_to_f32(w[i]) * scales[(r / b0) * grid_cols + c / b1];
    }
}
