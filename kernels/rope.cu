// Rotary embedding of q and k, and the append of k and v to the KV cache. Rust partner:
// src/device/cuda/kernels.rs (`rope_qkv_store`).
//
// grid: (n, g) g blocks per token (ceil(max(pairs, kv_dim) / 128) in kernels.rs); block: 128
// threads; the g x 128 threads of a token stride over its rotation pairs, then over its v values.
// (One block per token, as before, took 14.5 us per call on an H200 at batch 1: 20 dependent
// iterations per thread.)
// qkv: f32 GEMM output [(split ? 2n : n) x (qd + 2 kvd)], columns q | k | v (device).
// cos, sin: f32 [max_ctx x head_dim/2], the host's table (angles pos * inv_freq computed in f64 on
//   the host, Llama 3 scaling included, exactly as the CPU reference) (device).
// pos, slot: int32 [n] position and KV slot of each token (device).
// table: int32 [slots x max_blocks] block table of the paged cache (src/device/cuda/kv.rs).
// q_out: f32 [n x qd]; k_cache, v_cache: this layer's BF16 [blocks x KV_BLOCK x kvd] (device).
// k (after RoPE) and v are computed in f32, then stored rounded to BF16, round to nearest even
// (f32_to_bf16: bit for bit __float2bfloat16_rn on every non-NaN value, and the CPU's helper).
// Pairing: Hugging Face rotate_half, element i with i + head_dim/2 inside each head.
#include "common.cuh"

extern "C" __global__ void rope_qkv_store(const float* __restrict__ qkv, int split, int n,
                                          const float* __restrict__ cos_t,
                                          const float* __restrict__ sin_t,
                                          const int* __restrict__ pos, const int* __restrict__ slot,
                                          const int* __restrict__ table, int max_blocks,
                                          float* __restrict__ q_out,
                                          uint16_t* __restrict__ k_cache,
                                          uint16_t* __restrict__ v_cache, int heads, int kv_heads,
                                          int head_dim) {
    const int t = blockIdx.x;
    const int half = head_dim / 2;
    const size_t qd = (size_t)heads * head_dim, kvd = (size_t)kv_heads * head_dim;
    const size_t cols = qd + 2 * kvd;
    const int p = pos[t];
    const float* c = cos_t + (size_t)p * half;
    const float* s = sin_t + (size_t)p * half;
    const size_t cache_row = kv_row(table, max_blocks, slot[t], p, kvd);
    const int pairs = (heads + kv_heads) * half;
    const int first = blockIdx.y * blockDim.x + threadIdx.x, stride = gridDim.y * blockDim.x;
    for (int i = first; i < pairs; i += stride) {
        const int head = i / half, j = i % half;
        const size_t col = (size_t)head * head_dim + j;  // q heads then k heads: contiguous
        const float x1 = load_split(qkv, split, n, t, cols, col);
        const float x2 = load_split(qkv, split, n, t, cols, col + half);
        // Rounded as the CPU's `ops::rope` rounds: each product, then the sum; no fused
        // multiply-add (nvcc would contract `b` into one).
        const float a = __fsub_rn(__fmul_rn(x1, c[j]), __fmul_rn(x2, s[j]));
        const float b = __fadd_rn(__fmul_rn(x2, c[j]), __fmul_rn(x1, s[j]));
        if (head < heads) {
            q_out[(size_t)t * qd + col] = a;
            q_out[(size_t)t * qd + col + half] = b;
        } else {
            const size_t kc = col - qd;
            k_cache[cache_row + kc] = f32_to_bf16(a);
            k_cache[cache_row + kc + half] = f32_to_bf16(b);
        }
    }
    for (size_t i = first; i < kvd; i += stride)
        v_cache[cache_row + i] = f32_to_bf16(load_split(qkv, split, n, t, cols, qd + kvd + i));
}
