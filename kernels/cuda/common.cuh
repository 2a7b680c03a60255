// Shared by every kubemoe CUDA source: `kernels/src/cuda.rs` puts this text in front of each
// `.cu` file before NVRTC compiles it (no CUDA headers are needed, so nothing but libnvrtc has
// to be installed to compile them).
//
// Conversions are exact and branch-free, as on the CPU (`kernels/src/weight.rs`): a 16- or
// 8-bit value's bits are moved into an f32's fields and a power of two moves the exponent
// bias. Sums are f32; compiled without fast math (IEEE division and square root, no flush of
// subnormals to zero), so the CPU and the GPU differ in summation order, fused multiply-adds
// and `expf`'s last bits only.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#define NEG_INF __uint_as_float(0xFF800000u)

__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float((u32)h << 16);
}

// The magnitude's 15 bits as f32 exponent and mantissa (a subnormal f32 when the f16 is
// subnormal), times 2^112: f16's bias 15 to f32's 127.
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float m = __uint_as_float(((u32)h & 0x7FFFu) << 13) * __uint_as_float(0x77800000u);
    return __uint_as_float(__float_as_uint(m) | (((u32)h & 0x8000u) << 16));
}

// float8_e4m3fn: the same move, times 2^120 (bias 7 to 127). 0x7F / 0xFF (NaN) are refused
// when a weight is made, so they never reach a kernel.
__device__ __forceinline__ float fp8_e4m3_to_f32(u8 b) {
    float m = __uint_as_float(((u32)b & 0x7Fu) << 20) * __uint_as_float(0x7B800000u);
    return (b & 0x80u) ? -m : m;
}

// The sum of `v` over the block, in every thread. blockDim.x is a multiple of 32, at most 1024.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    __syncthreads();  // `partial` may be reused by the next call
    return v;
}

// The maximum of `v` over the block, in every thread (same shape rules as block_sum).
__device__ float block_max(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? partial[lane] : NEG_INF;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    __syncthreads();
    return v;
}
