// RMSNorm `w ⊙ x / sqrt(mean(x²) + eps)` (Zhang & Sennrich 2019), as DeepSeek's
// `DeepseekV3RMSNorm`: the mean in f32, the weight applied after normalising.
//
// x: rows `x_ld` apart, the first `dim` values of each; out: [rows, dim]. One block per row.
extern "C" __global__ void rms_norm(const float* __restrict__ x, int x_ld, const float* __restrict__ weight,
                                    float eps, int dim, float* __restrict__ out) {
    const float* row = x + (size_t)blockIdx.x * x_ld;
    float* o = out + (size_t)blockIdx.x * dim;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) sq += row[i] * row[i];
    const float inv = 1.0f / sqrtf(block_sum(sq) / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = weight[i] * (row[i] * inv);
}
