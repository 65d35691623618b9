// Shared helpers of every kernel family: BF16 conversions written out bit by bit (so the device
// rounds exactly like `model::synth::f32_to_bf16` on the host, and no CUDA header beyond the
// compiler's built-ins is needed), warp and block reductions, and the "split" BF16 layout.
//
// Split activations: cuBLAS multiplies BF16 by BF16, but the CPU reference keeps activations in
// f32. An f32 activation x is stored as two BF16 rows, hi = bf16(x) and lo = bf16(x - hi), so that
// hi + lo equals x to about 2^-17 relative. A GEMM over the 2n rows [hi; lo] reads every weight
// once and returns both partial products; the consumer of the product adds row t and row n + t.
// With split = 0 only the hi rows exist (plain BF16 activations).
#pragma once
#include <stdint.h>

#define UW_DEVICE __device__ __forceinline__

// Positions per block of the paged KV cache (src/device/cuda/kv.rs BLOCK_TOKENS, the CPU's too).
#define KV_BLOCK 16

// Element offset of position p's row in a layer's paged keys or values, `[block][KV_BLOCK][kvd]`:
// the block is entry p / KV_BLOCK of the slot's row of the block table `[slots][max_blocks]`.
UW_DEVICE size_t kv_row(const int* __restrict__ table, int max_blocks, int slot, int p,
                        size_t kvd) {
    const int b = table[(size_t)slot * max_blocks + p / KV_BLOCK];
    return ((size_t)b * KV_BLOCK + p % KV_BLOCK) * kvd;
}

// BF16 bits -> f32 (exact).
UW_DEVICE float bf16_to_f32(uint16_t b) { return __uint_as_float(((uint32_t)b) << 16); }

// f32 -> BF16 bits, round to nearest, ties to even; NaN stays NaN (mirrors f32_to_bf16 in Rust).
UW_DEVICE uint16_t f32_to_bf16(float x) {
    uint32_t b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b >> 16) | 0x40u);
    return (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// Writes x as split BF16: hi at `hi[i]`, and when `lo` is not null, lo = bf16(x - hi) at `lo[i]`.
UW_DEVICE void store_split(uint16_t* hi, uint16_t* lo, size_t i, float x) {
    uint16_t h = f32_to_bf16(x);
    hi[i] = h;
    if (lo) lo[i] = f32_to_bf16(x - bf16_to_f32(h));
}

// store_split, and the unrounded f32 value at `f[i]` when `f` is not null (the input of the fused
// tbe3 GEMV, which multiplies f32 activations as the CPU reference does).
UW_DEVICE void store_act(uint16_t* hi, uint16_t* lo, float* f, size_t i, float x) {
    store_split(hi, lo, i, x);
    if (f) f[i] = x;
}

// Reads element i of row t of a GEMM output of `n` rows of width `cols`, adding the lo-row
// product (row n + t) when the input was split.
UW_DEVICE float load_split(const float* y, int split, int n, int t, size_t cols, size_t i) {
    float v = y[(size_t)t * cols + i];
    if (split) v += y[((size_t)n + t) * cols + i];
    return v;
}

UW_DEVICE float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

UW_DEVICE float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
UW_DEVICE float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // partial[] may still be read by a previous call
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : 0.0f;
    return warp_sum(v);
}
