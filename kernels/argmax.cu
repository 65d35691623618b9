// Greedy token choice on the device. Rust partner: src/device/cuda/kernels.rs (`argmax_rows`);
// the reference is `device::argmax` (re-exported as `engine::sampler::argmax`).
//
// grid: (rows) one block per row; block: 1024 threads (a multiple of 32, at most 1024) striding
// over the row, 8 loads in flight per thread. shared: 32 u64 (one per warp).
// logits: f32 [rows x vocab] (device); out: int32 [rows] (device).
//
// Semantics, exactly those of the CPU's `argmax`: the lowest index among the maxima; NaN never
// wins; -0.0 and +0.0 are equal; when no value is above -inf (all NaN, all -inf, or an empty row)
// the answer is 0. Each value is mapped to an unsigned key that orders like IEEE `>` on non-NaN
// floats (-0.0 canonicalised to +0.0 first), and (key, ~index) is packed into one u64: the
// maximum of the packed values is the largest key with the lowest index. Integer comparisons
// make the result independent of flush-to-zero flags, and a maximum does not depend on the
// order of the reduction, so the kernel is deterministic.
#include "argmax.cuh"

extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int vocab,
                                       int* __restrict__ out) {
    const int id = block_argmax(logits + (size_t)blockIdx.x * vocab, vocab);
    if (threadIdx.x == 0) out[blockIdx.x] = id;
}
