// SwiGLU of the DeepSeek MLPs: gate[i] = silu(gate[i]) · up[i], for n values.
extern "C" __global__ void swiglu(float* __restrict__ gate, const float* __restrict__ up, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}
