// MLA attention on the latent cache in the absorbed form (DeepSeek-V2 report §2.1.2;
// `kernels/src/attention.rs`, `latent_attention`): absorbed queries qa [n, heads, w] of the
// last n of s positions, cache [s, w] rows of [c_kv (r values), k_pe]; query i sees the
// positions up to s - n + i. Three passes over a scores buffer [n · heads, s] in global memory
// (no limit on s): scores, causal softmax, values.

// scores[q, j] = scale · qa[q] · cache[j] for the positions j that query row q (token q / heads)
// sees; the others are left for the softmax to zero. One thread per (q, j).
extern "C" __global__ void latent_scores(const float* __restrict__ qa, const float* __restrict__ cache, int n,
                                         int heads, int s, int w, float scale, float* __restrict__ scores) {
    const long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (idx >= (long long)n * heads * s) return;
    const int q = (int)(idx / s), j = (int)(idx % s);
    if (j > s - n + q / heads) return;
    const float* a = qa + (size_t)q * w;
    const float* b = cache + (size_t)j * w;
    float acc = 0.0f;
    for (int c = 0; c < w; c++) acc += a[c] * b[c];
    scores[idx] = acc * scale;
}

// Row q of scores becomes the softmax of its visible entries (the max subtracted, f32), its
// other entries 0. One block per row.
extern "C" __global__ void causal_softmax_rows(float* __restrict__ scores, int n, int heads, int s) {
    const int q = blockIdx.x;
    const int visible = s - n + q / heads + 1;
    float* row = scores + (size_t)q * s;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_max(m);
    // A row of −∞ (never from finite inputs) gives zeros, as on the CPU.
    const bool empty = m == NEG_INF;
    float sum = 0.0f;
    for (int j = threadIdx.x; j < visible; j += blockDim.x) {
        const float e = empty ? 0.0f : expf(row[j] - m);
        row[j] = e;
        sum += e;
    }
    const float total = block_sum(sum);
    const float inv = empty ? 0.0f : 1.0f / total;
    for (int j = threadIdx.x; j < s; j += blockDim.x) row[j] = j < visible ? row[j] * inv : 0.0f;
}

// out[q, c] = Σ_j p[q, j] · cache[j, c] for c < r (the c_kv part). One thread per (q, c).
extern "C" __global__ void latent_values(const float* __restrict__ p, const float* __restrict__ cache, int rows, int s,
                                         int w, int r, float* __restrict__ out) {
    const long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (idx >= (long long)rows * r) return;
    const int q = (int)(idx / r), c = (int)(idx % r);
    const float* pq = p + (size_t)q * s;
    float acc = 0.0f;
    for (int j = 0; j < s; j++) acc += pq[j] * cache[(size_t)j * w + c];
    out[idx] = acc;
}
