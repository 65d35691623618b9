// The greedy choice over one row of f32 logits, for a whole block: shared by argmax.cu
// (`argmax_rows`) and sample.cu (`sample_rows`' greedy rows), so both give exactly
// `device::argmax`'s id. Semantics and the packing of (key, ~index) are described in argmax.cu.
#pragma once
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

// The argmax of `row[0..vocab)` over the whole block (blockDim.x a multiple of 32, at most
// 1024); every thread gets the answer. Ends with a __syncthreads(), so it may be called again.
UW_DEVICE int block_argmax(const float* row, int vocab) {
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
    __shared__ unsigned long long argmax_partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0) argmax_partial[warp] = best;
    __syncthreads();
    best = lane < warps ? argmax_partial[lane] : 0ull;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) best = umax64(best, __shfl_xor_sync(0xffffffffu, best, o));
    __syncthreads();  // argmax_partial[] is free for the next call
    // Nothing above -inf: the CPU's loop never moves off index 0.
    const uint32_t key_neg_inf = argmax_key(0xff800000u);
    return (uint32_t)(best >> 32) > key_neg_inf ? (int)~(uint32_t)best : 0;
}
