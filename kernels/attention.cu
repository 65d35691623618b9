// Grouped-query attention of a set of query tokens over the KV cache, for decode (a batch of
// sequences at different lengths) and prefill (the tokens of one prompt, causal) alike: every
// query token carries its own (slot, position) and attends to cache positions 0..=position of its
// slot, whose keys and values `rope_qkv_store` has already written. Rust partner:
// src/device/cuda/kernels.rs (`attention`).
//
// grid: (heads, n); block: ATTN_THREADS = 256 threads (8 warps); static shared memory:
//   8 x 256 + 16 floats (8.3 KB). head_dim must be a multiple of 32, at most 256.
// Each warp walks positions warp, warp + 8, ... with an online softmax (running max, sum and a
// head_dim-wide accumulator spread over its lanes, head_dim/32 elements per lane); the 8 partial
// results are merged through shared memory at the end. Query head h reads KV head h / group.
// q: f32 [n x heads x head_dim]; k_cache, v_cache: this layer's f32 [slots x max_ctx x kvd];
// out: BF16 split [(split ? 2n : n) x heads x head_dim], the o_proj GEMM's input;
// out_f32: f32 [n x heads x head_dim], the same unrounded, or null (the fused GEMV's input).
#include "common.cuh"

#define ATTN_WARPS 8
#define ATTN_MAX_HEAD_DIM 256

template <int E>
UW_DEVICE void attention_body(const float* __restrict__ q, const float* __restrict__ k_cache,
                              const float* __restrict__ v_cache, const int* __restrict__ pos,
                              const int* __restrict__ slot, uint16_t* __restrict__ out,
                              float* __restrict__ out_f32, int split, int n, int heads, int kv_heads, int max_ctx, float scale,
                              float (*sm_acc)[ATTN_MAX_HEAD_DIM], float* sm_m, float* sm_l) {
    constexpr int head_dim = 32 * E;
    const int h = blockIdx.x, t = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = heads / kv_heads;
    const size_t kvd = (size_t)kv_heads * head_dim;
    const int p = pos[t];
    const float* qr = q + ((size_t)t * heads + h) * head_dim;
    const size_t base = (size_t)slot[t] * max_ctx * kvd + (size_t)(h / group) * head_dim;
    const float* kb = k_cache + base;
    const float* vb = v_cache + base;
    float qv[E], acc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
        qv[e] = qr[lane + 32 * e];
        acc[e] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int j = warp; j <= p; j += ATTN_WARPS) {
        const float* kr = kb + (size_t)j * kvd;
        const float* vr = vb + (size_t)j * kvd;
        float kv[E], vv[E];
#pragma unroll
        for (int e = 0; e < E; ++e) {
            kv[e] = kr[lane + 32 * e];
            vv[e] = vr[lane + 32 * e];
        }
        float s = 0.0f;
#pragma unroll
        for (int e = 0; e < E; ++e) s += qv[e] * kv[e];
        s = warp_sum(s) * scale;
        const float mn = fmaxf(m, s);
        const float corr = expf(m - mn);
        const float pe = expf(s - mn);
        l = l * corr + pe;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] = acc[e] * corr + pe * vv[e];
        m = mn;
    }
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < E; ++e) sm_acc[warp][lane + 32 * e] = acc[e];
    __syncthreads();
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < ATTN_WARPS; ++w) mx = fmaxf(mx, sm_m[w]);
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < ATTN_WARPS; ++w) total += sm_l[w] * expf(sm_m[w] - mx);
    const size_t qd = (size_t)heads * head_dim;
    uint16_t* hi = out + (size_t)t * qd + (size_t)h * head_dim;
    uint16_t* lo = split ? out + ((size_t)n + t) * qd + (size_t)h * head_dim : nullptr;
    float* f = out_f32 ? out_f32 + (size_t)t * qd + (size_t)h * head_dim : nullptr;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < ATTN_WARPS; ++w) o += sm_acc[w][d] * expf(sm_m[w] - mx);
        store_act(hi, lo, f, d, o / total);
    }
}

extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32)
    attention(const float* __restrict__ q, const float* __restrict__ k_cache,
              const float* __restrict__ v_cache, const int* __restrict__ pos,
              const int* __restrict__ slot, uint16_t* __restrict__ out, int split, int n,
              int heads, int kv_heads, int head_dim, int max_ctx, float scale,
              float* __restrict__ out_f32) {
    __shared__ float sm_acc[ATTN_WARPS][ATTN_MAX_HEAD_DIM];
    __shared__ float sm_m[ATTN_WARPS], sm_l[ATTN_WARPS];
#define UW_ATTN_CASE(E)                                                                        \
    case E:                                                                                    \
        attention_body<E>(q, k_cache, v_cache, pos, slot, out, out_f32, split, n, heads, kv_heads,      \
                          max_ctx, scale, sm_acc, sm_m, sm_l);                                 \
        break;
    switch (head_dim / 32) {
        UW_ATTN_CASE(1)
        UW_ATTN_CASE(2)
        UW_ATTN_CASE(3)
        UW_ATTN_CASE(4)
        UW_ATTN_CASE(5)
        UW_ATTN_CASE(6)
        UW_ATTN_CASE(7)
        UW_ATTN_CASE(8)
        default:
            break;  // the host refuses other head sizes before launching
    }
#undef UW_ATTN_CASE
}
