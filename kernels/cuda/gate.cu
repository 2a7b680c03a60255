// The MoE gates of DeepSeek-V2 and V3 (`kernels/src/gate.rs` states the rules): one thread
// per token computes its scores, the group-limited top-k and the weights, with the CPU's tie
// rule (the lower index wins) and its summation order, so that only exp's last bit can differ.
// The host checks n_experts ≤ MAX_EXPERTS, n_group ≤ MAX_GROUPS and top_k ≤ MAX_TOP_K.

#define MAX_EXPERTS 256
#define MAX_GROUPS 64
#define MAX_TOP_K 16
#define GREEDY 0
#define GROUP_LIMITED_GREEDY 1
#define NOAUX_TC 2

// The k largest of values[0, n), ties to the lower index, in descending order, into out.
__device__ void top_indices(const float* values, int n, int k, int* out) {
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int i = 0; i < n; i++) {
            bool taken = false;
            for (int q = 0; q < j; q++) taken |= out[q] == i;
            if (!taken && (best < 0 || values[i] > values[best])) best = i;
        }
        out[j] = best;
    }
}

// logits [tokens, n_experts] (f32, the gate's linear output); bias [n_experts] or null;
// ids and weights [tokens, top_k], each token's experts sorted by id.
extern "C" __global__ void route(const float* __restrict__ logits, const float* __restrict__ bias, int tokens,
                                 int n_experts, int top_k, int n_group, int topk_group, int sigmoid_scoring,
                                 int method, int norm_topk_prob, float routed_scaling_factor, u32* __restrict__ ids,
                                 float* __restrict__ weights) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    const float* row = logits + (size_t)t * n_experts;
    float scores[MAX_EXPERTS], choice[MAX_EXPERTS];
    if (sigmoid_scoring) {
        for (int i = 0; i < n_experts; i++) scores[i] = 1.0f / (1.0f + expf(-row[i]));
    } else {
        float max = NEG_INF;
        for (int i = 0; i < n_experts; i++) max = fmaxf(max, row[i]);
        float sum = 0.0f;
        for (int i = 0; i < n_experts; i++) {
            scores[i] = max == NEG_INF ? 0.0f : expf(row[i] - max);
            sum += scores[i];
        }
        const float inv = max == NEG_INF ? 0.0f : 1.0f / sum;
        for (int i = 0; i < n_experts; i++) scores[i] *= inv;
    }
    for (int i = 0; i < n_experts; i++) choice[i] = scores[i] + (method == NOAUX_TC && bias ? bias[i] : 0.0f);
    if (method != GREEDY) {
        const int group_size = n_experts / n_group;
        float group_scores[MAX_GROUPS];
        int pair[2], groups[MAX_GROUPS];
        for (int g = 0; g < n_group; g++) {
            const float* members = choice + g * group_size;
            if (method == NOAUX_TC) {
                const int k2 = group_size < 2 ? group_size : 2;
                top_indices(members, group_size, k2, pair);
                float s = 0.0f;
                for (int j = 0; j < k2; j++) s += members[pair[j]];
                group_scores[g] = s;
            } else {
                float m = NEG_INF;
                for (int j = 0; j < group_size; j++) m = fmaxf(m, members[j]);
                group_scores[g] = m;
            }
        }
        top_indices(group_scores, n_group, topk_group, groups);
        for (int g = 0; g < n_group; g++) {
            bool kept = false;
            for (int j = 0; j < topk_group; j++) kept |= groups[j] == g;
            if (!kept)
                for (int j = 0; j < group_size; j++) choice[g * group_size + j] = NEG_INF;
        }
    }
    int picked[MAX_TOP_K];
    top_indices(choice, n_experts, top_k, picked);
    for (int j = 1; j < top_k; j++)  // insertion sort by expert id
        for (int q = j; q > 0 && picked[q - 1] > picked[q]; q--) {
            const int s = picked[q];
            picked[q] = picked[q - 1];
            picked[q - 1] = s;
        }
    float* w = weights + (size_t)t * top_k;
    for (int j = 0; j < top_k; j++) {
        ids[(size_t)t * top_k + j] = (u32)picked[j];
        w[j] = scores[picked[j]];
    }
    const bool normalise = norm_topk_prob && (method == NOAUX_TC || top_k > 1);
    if (normalise) {
        float denom = 0.0f;
        for (int j = 0; j < top_k; j++) denom += w[j];
        denom += 1e-20f;
        for (int j = 0; j < top_k; j++) w[j] /= denom;
    }
    if (method == NOAUX_TC || !normalise)
        for (int j = 0; j < top_k; j++) w[j] *= routed_scaling_factor;
}
