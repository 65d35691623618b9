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
#include "common.cuh"

#define ARGMAX_UNROLL 8

// The order-preserving key of a non-NaN float (±0 equal): larger float, larger key.
UW_DEVICE uint32_t argmax_key(uint32_t bits) {
    if (bits == 0x80000000u) bits = 0u;
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

UW_DEVICE unsigned long long umax64(unsigned long long a, unsigned long long b) {
    return a > b ? a : b;
}

extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int vocab,
                                       int* __restrict__ out) {
    const float* row = logits + (size_t)blockIdx.x * vocab;
    // 0 is below every packed value of a real element (the key of -inf is 0x007fffff, and key 0
    // would be a NaN, which is skipped).
    unsigned long long best = 0ull;
    const int stride = blockDim.x * ARGMAX_UNROLL;
    for (int base = threadIdx.x; base < vocab; base += stride) {
        uint32_t bits[ARGMAX_UNROLL];
#pragma unroll
        for (int u = 0; u < ARGMAX_UNROLL; ++u) {
            const int i = base + u * blockDim.x;
            bits[u] = i < vocab ? __float_as_uint(row[i]) : 0xffffffffu;  // a NaN: skipped
        }
#pragma unroll
        for (int u = 0; u < ARGMAX_UNROLL; ++u) {
            if ((bits[u] & 0x7fffffffu) > 0x7f800000u) continue;  // NaN never wins
            const uint32_t i = (uint32_t)(base + u * blockDim.x);
            best = umax64(best, ((unsigned long long)argmax_key(bits[u]) << 32) | (uint32_t)~i);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) best = umax64(best, __shfl_xor_sync(0xffffffffu, best, o));
    __shared__ unsigned long long partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) partial[warp] = best;
    __syncthreads();
    if (warp == 0) {
        best = lane < warps ? partial[lane] : 0ull;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            best = umax64(best, __shfl_xor_sync(0xffffffffu, best, o));
        if (lane == 0) {
            // Nothing above -inf: the CPU's loop never moves off index 0.
            const uint32_t key_neg_inf = argmax_key(0xff800000u);
            out[blockIdx.x] = (uint32_t)(best >> 32) > key_neg_inf ? (int)~(uint32_t)best : 0;
        }
    }
}
