// The grouped expert FFN (MegaBlocks' grouped GEMM, Gale et al. 2022): the rows of the
// tokens routed to each expert are gathered in expert order, each expert multiplies its
// contiguous rows by its weights, and each token sums its experts' outputs in expert order
// (no atomics: the result does not depend on scheduling). The host sorts the assignments
// (`kernels/src/moe.rs`, the same sort as the CPU's).

// out[i, :] = x[rows[i], :] for i < n; x and out have `hidden` columns.
extern "C" __global__ void gather_rows(const float* __restrict__ x, int hidden, const u32* __restrict__ rows, int n,
                                       float* __restrict__ out) {
    const long long total = (long long)n * hidden;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += (long long)gridDim.x * blockDim.x)
        out[i] = x[(size_t)rows[i / hidden] * hidden + i % hidden];
}

// out[t, :] += weight[j] · y[rows[j], :] for j = starts[t] .. starts[t + 1], in that order, each
// product and sum rounded once as on the CPU. One block per token.
extern "C" __global__ void scatter_add_rows(const float* __restrict__ y, int hidden, const int* __restrict__ starts,
                                            const u32* __restrict__ rows, const float* __restrict__ weight,
                                            float* __restrict__ out) {
    const int t = blockIdx.x;
    for (int h = threadIdx.x; h < hidden; h += blockDim.x) {
        float acc = out[(size_t)t * hidden + h];
        for (int j = starts[t]; j < starts[t + 1]; j++)
            acc = __fadd_rn(acc, __fmul_rn(weight[j], y[(size_t)rows[j] * hidden + h]));
        out[(size_t)t * hidden + h] = acc;
    }
}

// How a stored weight value reads as f32 (FP8's block scale is applied by the caller).
struct F32 { static __device__ float at(const void* w, size_t i) { return ((const float*)w)[i]; } };
struct Bf16 { static __device__ float at(const void* w, size_t i) { return bf16_to_f32(((const u16*)w)[i]); } };
struct F16 { static __device__ float at(const void* w, size_t i) { return f16_to_f32(((const u16*)w)[i]); } };
struct Fp8 { static __device__ float at(const void* w, size_t i) { return fp8_e4m3_to_f32(((const u8*)w)[i]); } };

#define TILE 16

// y[r, :] = x[r, :] · W_eᵀ for the rows r of expert e = blockIdx.z, offsets[e] ≤ r < offsets[e + 1]:
// x [R, k] f32, y [R, n] f32; expert e's weight W_e [n, k] is at address w_ptrs[e], and for FP8
// its scales [⌈n/b0⌉, ⌈k/b1⌉] at s_ptrs[e] (s_ptrs is null otherwise). Blocks of TILE × TILE
// threads, one output each; weight values widened to f32 in shared memory.
template <typename W>
__device__ void expert_linear(const float* __restrict__ x, const int* __restrict__ offsets,
                              const unsigned long long* __restrict__ w_ptrs,
                              const unsigned long long* __restrict__ s_ptrs, int b0, int b1, int n, int k,
                              float* __restrict__ y) {
    __shared__ float xs[TILE][TILE + 1], ws[TILE][TILE + 1];
    const int e = blockIdx.z;
    const int r0 = offsets[e] + blockIdx.y * TILE, r1 = offsets[e + 1];
    if (r0 >= r1) return;  // the whole block: this expert has fewer rows
    const int row = r0 + threadIdx.y, col = blockIdx.x * TILE + threadIdx.x;
    const int w_row = blockIdx.x * TILE + threadIdx.y;
    const void* we = (const void*)w_ptrs[e];
    const float* se = s_ptrs ? (const float*)s_ptrs[e] : (const float*)0;
    const int grid_cols = (k + b1 - 1) / b1;
    float acc = 0.0f;
    for (int k0 = 0; k0 < k; k0 += TILE) {
        const int kk = k0 + threadIdx.x;
        xs[threadIdx.y][threadIdx.x] = row < r1 && kk < k ? x[(size_t)row * k + kk] : 0.0f;
        float v = 0.0f;
        if (w_row < n && kk < k) {
            v = W::at(we, (size_t)w_row * k + kk);
            if (se) v *= se[(w_row / b0) * grid_cols + kk / b1];
        }
        ws[threadIdx.y][threadIdx.x] = v;
        __syncthreads();
        for (int j = 0; j < TILE; j++) acc += xs[threadIdx.y][j] * ws[threadIdx.x][j];
        __syncthreads();
    }
    if (row < r1 && col < n) y[(size_t)row * n + col] = acc;
}

#define EXPERT_LINEAR(name, W)                                                                                \
    extern "C" __global__ void name(const float* x, const int* offsets, const unsigned long long* w_ptrs,     \
                                    const unsigned long long* s_ptrs, int b0, int b1, int n, int k, float* y) { \
        expert_linear<W>(x, offsets, w_ptrs, s_ptrs, b0, b1, n, k, y);                                        \
    }
EXPERT_LINEAR(expert_linear_f32, F32)
EXPERT_LINEAR(expert_linear_bf16, Bf16)
EXPERT_LINEAR(expert_linear_f16, F16)
EXPERT_LINEAR(expert_linear_fp8, Fp8)
