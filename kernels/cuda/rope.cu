// Rotary position embeddings (RoFormer) with YaRN's frequencies and attention factor
// (computed on the host, `kernels/src/rope.rs`): rotates the `2·half` values at `offset` of
// every `stride`-long row of x; row r belongs to token r / heads, at positions[r / heads].
// Pairs are interleaved (x[2i], x[2i+1]) or halves (x[i], x[i+half]).
//
// The angle is position · inv_freq in f32 and its cosine and sine are taken in f64, then
// scaled and rounded to f32, as the CPU does. One thread per (row, pair).
extern "C" __global__ void rope(float* __restrict__ x, int rows, int stride, int offset, int heads,
                                const int* __restrict__ positions, const float* __restrict__ inv_freq, int half,
                                double attention_factor, int interleaved) {
    const long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (idx >= (long long)rows * half) return;
    const int r = (int)(idx / half), i = (int)(idx % half);
    const float angle = (float)positions[r / heads] * inv_freq[i];
    const float c = (float)(cos((double)angle) * attention_factor);
    const float s = (float)(sin((double)angle) * attention_factor);
    float* v = x + (size_t)r * stride + offset;
    const int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    const float x0 = v[a], x1 = v[b];
    v[a] = x0 * c - x1 * s;
    v[b] = x1 * c + x0 * s;
}
