// Embedding gather. Rust partner: src/device/cuda/kernels.rs (`embed_gather_bf16`).
//
// grid: (n) one block per token; block: 256 threads striding over the hidden dimension.
// table: BF16 [vocab x hidden] (device); tokens: int32 [n] (device, checked < vocab by the host);
// x: f32 [n x hidden] (device), the residual stream.
#include "common.cuh"

extern "C" __global__ void embed_gather_bf16(const uint16_t* __restrict__ table,
                                             const int* __restrict__ tokens,
                                             float* __restrict__ x, int hidden) {
    const int t = blockIdx.x;
    const uint16_t* row = table + (size_t)tokens[t] * hidden;
    float* out = x + (size_t)t * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[i] = bf16_to_f32(row[i]);
}
