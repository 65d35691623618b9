// Grouped-query attention of a set of query tokens over the paged BF16 KV cache, for decode (a
// batch of sequences at different lengths) and prefill (the tokens of one prompt, causal) alike:
// every query token carries its own (slot, position) and attends to cache positions 0..=position
// of its slot, whose keys and values `rope_qkv_store` has already written. Rust partner:
// src/device/cuda/kernels.rs (`attention`, `attention_per_head`, `attention_combine`;
// `split_range` there is this file's range rule in Rust, tested on the CPU).
//
// Decode runs `attention_decode_h*` (below): one block per KV head, every KV row read once.
// attention_per_head is the first decode kernel, one block per query head (each query head of a
// group re-reads its KV head's rows, 2 bytes per lane per load); it is kept only as the baseline
// `unweight bench attention` measures the decode kernel against, side by side (docs/cuda.md).
//
// attention_per_head: grid (heads, n, splits); block: ATTN_THREADS = 256 threads (8 warps);
//   static shared memory: 8 x 256 + 16 floats (8.3 KB). head_dim must be a multiple of 32, at
//   most 256.
// Split along the sequence: block z of `splits` takes the positions [z c, min((z + 1) c, p + 1))
// with c = split_chunk(p + 1, splits) (a multiple of KV_BLOCK, at least ATTN_MIN_CHUNK): chosen
// from the position in-kernel, so one captured graph serves every length. Each warp walks its
// range's positions warp, warp + 8, ... (loading 4 of them at a time, 2 for head_dim > 128)
// with an online softmax (running max, sum and a head_dim-wide accumulator spread over its
// lanes, head_dim/32 elements per lane); the 8 partial results are merged through shared memory
// at the end. With splits = 1 (decode batches that fill the GPU on their own) the block writes
// the output; otherwise it writes its
// (max, sum, unnormalised accumulator) to the partials and `attention_combine` merges them.
// Query head h reads KV head h / group.
// Keys and values are BF16 (rounded once when stored); they are widened exactly (bf16 << 16) and
// every product and sum is f32, as the CPU reference's.
// q: f32 [n x heads x head_dim]; k_cache, v_cache: this layer's BF16 [blocks x KV_BLOCK x kvd];
// table: int32 [slots x max_blocks] block table; pos, slot: int32 [n];
// out: BF16 split [(split ? 2n : n) x heads x head_dim], the o_proj GEMM's input;
// out_f32: f32 [n x heads x head_dim], the same unrounded, or null (the fused GEMV's input);
// part_ml: f32 [n x heads x splits x 2] (max, sum); part_acc: f32 [n x heads x splits x head_dim]
//   (only with splits > 1).
#include "common.cuh"

#define ATTN_WARPS 8
#define ATTN_MAX_HEAD_DIM 256
// Fewest positions a split takes (shorter ranges leave later splits empty instead).
#define ATTN_MIN_CHUNK 64

// Positions per split for a sequence of `len` positions in `splits` splits.
UW_DEVICE int split_chunk(int len, int splits) {
    int c = (len + splits - 1) / splits;
    c = c < ATTN_MIN_CHUNK ? ATTN_MIN_CHUNK : c;
    return (c + KV_BLOCK - 1) / KV_BLOCK * KV_BLOCK;
}

template <int E>
UW_DEVICE void attention_body(const float* __restrict__ q, const uint16_t* __restrict__ k_cache,
                              const uint16_t* __restrict__ v_cache,
                              const int* __restrict__ table, int max_blocks,
                              const int* __restrict__ pos, const int* __restrict__ slot,
                              uint16_t* __restrict__ out, float* __restrict__ out_f32, int split,
                              int n, int heads, int kv_heads, float scale, int splits,
                              float* __restrict__ part_ml, float* __restrict__ part_acc,
                              float (*sm_acc)[ATTN_MAX_HEAD_DIM], float* sm_m, float* sm_l) {
    constexpr int head_dim = 32 * E;
    const int h = blockIdx.x, t = blockIdx.y, z = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = heads / kv_heads;
    const size_t kvd = (size_t)kv_heads * head_dim;
    const int p = pos[t], sl = slot[t];
    const int chunk = splits > 1 ? split_chunk(p + 1, splits) : p + 1;
    const int begin = z * chunk;
    const int end = min(p + 1, begin + chunk);
    const size_t part = ((size_t)t * heads + h) * splits + z;
    if (begin >= end) {  // an empty split (short sequence): nothing to merge
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) part_acc[part * head_dim + d] = 0.0f;
        if (threadIdx.x == 0) {
            part_ml[2 * part] = -INFINITY;
            part_ml[2 * part + 1] = 0.0f;
        }
        return;
    }
    const float* qr = q + ((size_t)t * heads + h) * head_dim;
    const size_t head_off = (size_t)(h / group) * head_dim;
    float qv[E], acc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
        qv[e] = qr[lane + 32 * e];
        acc[e] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    // The warp's positions are j, j + 8, ...; U of them are loaded at once (more bytes in
    // flight per warp), then folded in one by one in that same order: the operations of a loop
    // over single positions (the order kernels.rs's split model and the CPU test follow).
    constexpr int U = E <= 4 ? 4 : 2;
    for (int j0 = begin + warp; j0 < end; j0 += U * ATTN_WARPS) {
        uint16_t kb[U][E], vb[U][E];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = j0 + u * ATTN_WARPS;
            if (j < end) {
                const size_t row = kv_row(table, max_blocks, sl, j, kvd) + head_off;
#pragma unroll
                for (int e = 0; e < E; ++e) {
                    kb[u][e] = k_cache[row + lane + 32 * e];
                    vb[u][e] = v_cache[row + lane + 32 * e];
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (j0 + u * ATTN_WARPS >= end) break;
            float s = 0.0f;
#pragma unroll
            for (int e = 0; e < E; ++e) s += qv[e] * bf16_to_f32(kb[u][e]);
            s = warp_sum(s) * scale;
            const float mn = fmaxf(m, s);
            const float corr = expf(m - mn);
            const float pe = expf(s - mn);
            l = l * corr + pe;
#pragma unroll
            for (int e = 0; e < E; ++e) acc[e] = acc[e] * corr + pe * bf16_to_f32(vb[u][e]);
            m = mn;
        }
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
    if (splits > 1) {
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float o = 0.0f;
#pragma unroll
            for (int w = 0; w < ATTN_WARPS; ++w) o += sm_acc[w][d] * expf(sm_m[w] - mx);
            part_acc[part * head_dim + d] = o;
        }
        if (threadIdx.x == 0) {
            part_ml[2 * part] = mx;
            part_ml[2 * part + 1] = total;
        }
        return;
    }
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
    attention_per_head(const float* __restrict__ q, const uint16_t* __restrict__ k_cache,
              const uint16_t* __restrict__ v_cache, const int* __restrict__ table, int max_blocks,
              const int* __restrict__ pos, const int* __restrict__ slot,
              uint16_t* __restrict__ out, int split, int n, int heads, int kv_heads, int head_dim,
              float scale, float* __restrict__ out_f32, int splits, float* __restrict__ part_ml,
              float* __restrict__ part_acc) {
    __shared__ float sm_acc[ATTN_WARPS][ATTN_MAX_HEAD_DIM];
    __shared__ float sm_m[ATTN_WARPS], sm_l[ATTN_WARPS];
#define UW_ATTN_CASE(E)                                                                        \
    case E:                                                                                    \
        attention_body<E>(q, k_cache, v_cache, table, max_blocks, pos, slot, out, out_f32,     \
                          split, n, heads, kv_heads, scale, splits, part_ml, part_acc, sm_acc, \
                          sm_m, sm_l);                                                         \
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

// Decode attention built for bandwidth: one block per (token, KV head, split) computes every
// query head of that KV head (up to G of them: a group larger than 8 takes ceil(group / 8)
// blocks per KV head), so each key and value row is read from memory once per step, in 16-byte
// loads. Entry points attention_decode_h{1,2,4,8}: G = 1, 2, 4, 8 heads per block (the host
// picks the smallest G that holds the group, at most 8: `heads_per_block` in kernels.rs;
// a group of 3 runs in G = 4 with one slot idle).
// grid: (kv_heads x ceil(group / G), n, splits); block: DEC_THREADS = 128 threads (4 warps);
//   static shared memory: G x (DEC_SPAN + 64) floats (G = 4: 17 KB, G = 8: 34 KB).
// head_dim = 32E (E = 1..8). A key row of the KV head is C = head_dim / 8 chunks of 8 BF16
// (16 bytes); a row is taken by SUB lanes (the power of two >= C, at most 32; lanes c >= C idle),
// so a warp holds 32 / SUB rows at once and the block NS = 4 x 32 / SUB "streams" (hd 128: 16
// lanes per row, 8 streams; hd 64: 8 lanes, 16 streams). Lane c of a stream holds elements
// 8c..8c+7 of its heads' queries (registers), accumulators and of the rows it loads.
// Split range [begin, end) as attention_per_head's (split_chunk). Stream s walks begin + s,
// begin + s + NS, ... in ascending order, loading U positions at once (U x 32 bytes of K and V
// per lane in flight; U = 8 for G <= 4, 4 for G = 8 whose registers are full), then folds them
// in one by one in that order: per head, score = (the lane's sequential 8-term f32 dot product,
// summed over the SUB lanes by an xor butterfly: every lane gets the same bits) x scale, and the
// online-softmax update of attention_per_head (a corr of exactly 1 when the max does not move
// is skipped: the same values).
// At the end every stream's (max, sum, accumulator) per head goes to shared memory and is merged
// over the streams 0..NS-1 in order as attention_per_head's warps are; the output or the
// partials (`attention_combine`'s input, per query head) are written as attention_per_head's.
// Arguments and layouts as attention_per_head's.
// `sizing::tests::decode_streams_model_equals_the_softmax` is this kernel's order of operations
// in Rust, and `kernels::tests::decode_kernel_transcribed_equals_the_softmax` this code thread by
// thread (every address and index), both checked against f64 on the CPU: keep them in step.
#define DEC_WARPS 4
#define DEC_THREADS (DEC_WARPS * 32)
// Largest NS x head_dim over head_dim = 32..256 (NS x head_dim <= 4 x 32 / SUB x 8 SUB).
#define DEC_SPAN 1024
// Largest NS (head_dim 32: SUB 4, 8 rows per warp).
#define DEC_MAX_STREAMS 32

template <int E>
struct DecShape {
    static constexpr int head_dim = 32 * E;
    static constexpr int chunks = head_dim / 8;
    static constexpr int sub = chunks <= 4 ? 4 : chunks <= 8 ? 8 : chunks <= 16 ? 16 : 32;
    static constexpr int streams = DEC_WARPS * (32 / sub);
    static_assert(chunks <= sub && sub <= 32, "one chunk per lane");
    static_assert(streams <= DEC_MAX_STREAMS && streams * head_dim <= DEC_SPAN, "shared sizes");
};

// 8 BF16 (a 16-byte chunk, element 2i in the low half of word i) widened exactly.
UW_DEVICE void widen8(uint4 w, float* x) {
    x[0] = __uint_as_float(w.x << 16);
    x[1] = __uint_as_float(w.x & 0xffff0000u);
    x[2] = __uint_as_float(w.y << 16);
    x[3] = __uint_as_float(w.y & 0xffff0000u);
    x[4] = __uint_as_float(w.z << 16);
    x[5] = __uint_as_float(w.z & 0xffff0000u);
    x[6] = __uint_as_float(w.w << 16);
    x[7] = __uint_as_float(w.w & 0xffff0000u);
}

template <int E, int G>
UW_DEVICE void decode_body(const float* __restrict__ q, const uint16_t* __restrict__ k_cache,
                           const uint16_t* __restrict__ v_cache, const int* __restrict__ table,
                           int max_blocks, const int* __restrict__ pos,
                           const int* __restrict__ slot, uint16_t* __restrict__ out,
                           float* __restrict__ out_f32, int split, int n, int heads,
                           int kv_heads, float scale, int splits, float* __restrict__ part_ml,
                           float* __restrict__ part_acc, float* sm_acc, float* sm_m,
                           float* sm_l) {
    using S = DecShape<E>;
    constexpr int hd = S::head_dim, C = S::chunks, SUB = S::sub, NS = S::streams;
    constexpr int U = G <= 4 ? 8 : 4;
    const int group = heads / kv_heads;
    const int hchunks = (group + G - 1) / G;
    const int kh = blockIdx.x / hchunks, hc = blockIdx.x % hchunks;
    const int h0 = kh * group + hc * G;    // first query head of this block
    const int gn = min(G, group - hc * G);  // query heads of this block (the rest idle)
    const int t = blockIdx.y, z = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int c = lane % SUB;  // this lane's chunk of the row; c >= C: idle lane
    const int stream = warp * (32 / SUB) + lane / SUB;
    const size_t kvd = (size_t)kv_heads * hd;
    const int p = pos[t], sl = slot[t];
    const int chunk = splits > 1 ? split_chunk(p + 1, splits) : p + 1;
    const int begin = z * chunk;
    const int end = min(p + 1, begin + chunk);
    if (begin >= end) {  // an empty split (short sequence): nothing to merge
        for (int i = threadIdx.x; i < gn * hd; i += DEC_THREADS) {
            const size_t part = ((size_t)t * heads + h0 + i / hd) * splits + z;
            part_acc[part * hd + i % hd] = 0.0f;
            if (i % hd == 0) {
                part_ml[2 * part] = -INFINITY;
                part_ml[2 * part + 1] = 0.0f;
            }
        }
        return;
    }
    float qv[G][8], acc[G][8], m[G], l[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            qv[g][i] = 0.0f;
            acc[g][i] = 0.0f;
        }
        if (g < gn && c < C) {
            const float4* qp = reinterpret_cast<const float4*>(
                q + ((size_t)t * heads + h0 + g) * hd + (size_t)c * 8);
            const float4 a = qp[0], b = qp[1];
            qv[g][0] = a.x;
            qv[g][1] = a.y;
            qv[g][2] = a.z;
            qv[g][3] = a.w;
            qv[g][4] = b.x;
            qv[g][5] = b.y;
            qv[g][6] = b.z;
            qv[g][7] = b.w;
        }
    }
    const int* __restrict__ trow = table + (size_t)sl * max_blocks;
    const size_t col = (size_t)kh * hd + (size_t)c * 8;  // this lane's chunk within a row
    // The step's bounds are the block's (uniform), so every lane of a warp runs the shuffles.
    for (int base = begin; base < end; base += NS * U) {
        uint4 kq[U], vq[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = base + u * NS + stream;
            kq[u] = make_uint4(0u, 0u, 0u, 0u);
            vq[u] = make_uint4(0u, 0u, 0u, 0u);
            if (j < end && c < C) {
                const size_t row =
                    ((size_t)trow[j / KV_BLOCK] * KV_BLOCK + j % KV_BLOCK) * kvd + col;
                kq[u] = *reinterpret_cast<const uint4*>(k_cache + row);
                vq[u] = *reinterpret_cast<const uint4*>(v_cache + row);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float kx[8];
            widen8(kq[u], kx);
            float s[G];
#pragma unroll
            for (int g = 0; g < G; ++g) {
                float d = 0.0f;
#pragma unroll
                for (int i = 0; i < 8; ++i) d += qv[g][i] * kx[i];
#pragma unroll
                for (int o = SUB / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                s[g] = d * scale;
            }
            if (base + u * NS + stream < end) {
                float vx[8];
                widen8(vq[u], vx);
#pragma unroll
                for (int g = 0; g < G; ++g) {
                    if (s[g] > m[g]) {  // the max moves: rescale (m = -inf: corr 0)
                        const float corr = expf(m[g] - s[g]);
                        l[g] *= corr;
#pragma unroll
                        for (int i = 0; i < 8; ++i) acc[g][i] *= corr;
                        m[g] = s[g];
                    }
                    const float pe = expf(s[g] - m[g]);
                    l[g] += pe;
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[g][i] += pe * vx[i];
                }
            }
        }
    }
    // Every stream's state to shared memory: [stream][g] and [stream][g][head_dim].
#pragma unroll
    for (int g = 0; g < G; ++g) {
        if (c == 0) {
            sm_m[stream * G + g] = m[g];
            sm_l[stream * G + g] = l[g];
        }
        if (c < C) {
#pragma unroll
            for (int i = 0; i < 8; ++i) sm_acc[(stream * G + g) * hd + c * 8 + i] = acc[g][i];
        }
    }
    __syncthreads();
    const size_t qd = (size_t)heads * hd;
    for (int i = threadIdx.x; i < gn * hd; i += DEC_THREADS) {
        const int g = i / hd, d = i % hd, h = h0 + g;
        float mx = -INFINITY;  // finite: stream 0 holds position `begin`
#pragma unroll
        for (int st = 0; st < NS; ++st) mx = fmaxf(mx, sm_m[st * G + g]);
        float total = 0.0f, o = 0.0f;
#pragma unroll
        for (int st = 0; st < NS; ++st) {
            const float w = expf(sm_m[st * G + g] - mx);  // an empty stream: exp(-inf) = 0
            total += sm_l[st * G + g] * w;
            o += sm_acc[(st * G + g) * hd + d] * w;
        }
        if (splits > 1) {
            const size_t part = ((size_t)t * heads + h) * splits + z;
            part_acc[part * hd + d] = o;
            if (d == 0) {
                part_ml[2 * part] = mx;
                part_ml[2 * part + 1] = total;
            }
        } else {
            uint16_t* hi = out + (size_t)t * qd + (size_t)h * hd;
            uint16_t* lo = split ? out + ((size_t)n + t) * qd + (size_t)h * hd : nullptr;
            float* f = out_f32 ? out_f32 + (size_t)t * qd + (size_t)h * hd : nullptr;
            store_act(hi, lo, f, d, o / total);
        }
    }
}

#define UW_DEC_CASE(E, G)                                                                      \
    case E:                                                                                    \
        decode_body<E, G>(q, k_cache, v_cache, table, max_blocks, pos, slot, out, out_f32,     \
                          split, n, heads, kv_heads, scale, splits, part_ml, part_acc, sm_acc, \
                          sm_m, sm_l);                                                         \
        break;
#define UW_DEC_KERNEL(G)                                                                       \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS) attention_decode_h##G(          \
        const float* __restrict__ q, const uint16_t* __restrict__ k_cache,                     \
        const uint16_t* __restrict__ v_cache, const int* __restrict__ table, int max_blocks,   \
        const int* __restrict__ pos, const int* __restrict__ slot, uint16_t* __restrict__ out, \
        int split, int n, int heads, int kv_heads, int head_dim, float scale,                  \
        float* __restrict__ out_f32, int splits, float* __restrict__ part_ml,                  \
        float* __restrict__ part_acc) {                                                        \
        __shared__ __align__(16) float sm_acc[G * DEC_SPAN];                                   \
        __shared__ float sm_m[G * DEC_MAX_STREAMS], sm_l[G * DEC_MAX_STREAMS];                 \
        switch (head_dim / 32) {                                                               \
            UW_DEC_CASE(1, G)                                                                  \
            UW_DEC_CASE(2, G)                                                                  \
            UW_DEC_CASE(3, G)                                                                  \
            UW_DEC_CASE(4, G)                                                                  \
            UW_DEC_CASE(5, G)                                                                  \
            UW_DEC_CASE(6, G)                                                                  \
            UW_DEC_CASE(7, G)                                                                  \
            UW_DEC_CASE(8, G)                                                                  \
            default:                                                                           \
                break; /* the host refuses other head sizes before launching */               \
        }                                                                                      \
    }
UW_DEC_KERNEL(1)
UW_DEC_KERNEL(2)
UW_DEC_KERNEL(4)
UW_DEC_KERNEL(8)
#undef UW_DEC_KERNEL
#undef UW_DEC_CASE

// Merges the `splits` partial results of each (token, head) of a decode attention: M = max of the
// maxima, L = sum of sum_z * exp(max_z - M), out = (sum of acc_z * exp(max_z - M)) / L. Split 0
// always holds position 0, so M is finite; empty splits (max -inf, sum 0) weigh 0.
// grid: (heads, n); block: ATTN_THREADS (threads stride over head_dim).
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32)
    attention_combine(const float* __restrict__ part_ml, const float* __restrict__ part_acc,
                      uint16_t* __restrict__ out, int split, int n, int heads, int head_dim,
                      int splits, float* __restrict__ out_f32) {
    const int h = blockIdx.x, t = blockIdx.y;
    const size_t first = ((size_t)t * heads + h) * splits;
    float mx = -INFINITY;
    for (int z = 0; z < splits; ++z) mx = fmaxf(mx, part_ml[2 * (first + z)]);
    float total = 0.0f;
    for (int z = 0; z < splits; ++z)
        total += part_ml[2 * (first + z) + 1] * expf(part_ml[2 * (first + z)] - mx);
    const size_t qd = (size_t)heads * head_dim;
    uint16_t* hi = out + (size_t)t * qd + (size_t)h * head_dim;
    uint16_t* lo = split ? out + ((size_t)n + t) * qd + (size_t)h * head_dim : nullptr;
    float* f = out_f32 ? out_f32 + (size_t)t * qd + (size_t)h * head_dim : nullptr;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int z = 0; z < splits; ++z)
            o += part_acc[(first + z) * head_dim + d] * expf(part_ml[2 * (first + z)] - mx);
        store_act(hi, lo, f, d, o / total);
    }
}

// Prefill attention, tiled through shared memory (flash style, causal, CUDA cores in f32): the
// queries of one prompt chunk, every token in the same slot (one sequence: the host's contract),
// over the paged BF16 cache.
// A block takes PF_ROWS = 32 (query, head) rows: the G query heads h0 .. h0 + G - 1 of one KV
// head (G = heads_per_block(group), as the decode kernel's; a group of 3 in G = 4 with one head
// idle, a group above 8 in ceil(group / 8) blocks per KV head) for QT = 32 / G consecutive
// queries t0 = x QT ..; row rr = qi G + g is query t0 + qi, head h0 + g; warp w holds rows
// 4w .. 4w + 3 (PF_ROWS_PER_WARP).
// grid: (ceil(n / QT), kv_heads x ceil(group / G)); block: ATTN_THREADS (8 warps), at most 128
//   registers (2 blocks per SM); dynamic shared memory (kernels.rs prefill_smem): 32 x head_dim
//   f32 (the rows' queries) + 2 x PF_KTILE x (head_dim + 2) BF16 = 256 (head_dim + 1) bytes
//   (32.3 KB at head_dim 128, 64.3 KB at 256: the host raises the kernel's limit at load).
// The block's queries go to shared memory once. It walks the key tiles [k0, k0 + PF_KTILE) of the
// slot from position 0 up to its last query's position; each tile's keys and values (two KV
// blocks) are loaded once into shared memory for all its rows: every query head of the group
// and every query of the tile. Per tile, lane j computes the scores of key k0 + j for the warp's
// 4 rows (a sequential f32 dot product over head_dim per row, each key word read once for the 4
// rows, the queries read as broadcast float4s); then per row (skipped when the tile is past its
// query's position) -inf past the query's position, the warp takes the tile's max and sum
// (online softmax), and each lane adds p_j v_j to its head_dim/32 output elements, key by key.
// A row's operations, and their order, depend only on its query, its position and the cache:
// the same whatever chunk, tile or block it is in (chunked prefill = whole prefill, bit for bit,
// on the attention's part). Arguments as attention_per_head's (no splits).
// `kernels::tests::prefill_kernel_transcribed_equals_the_softmax` is this code warp by warp and
// lane by lane (every address and index) in Rust, checked against f64 on the CPU: keep in step.
#define PF_ROWS_PER_WARP 4
#define PF_ROWS (ATTN_WARPS * PF_ROWS_PER_WARP)
#define PF_KTILE 32

// Query heads per block of the decode and prefill kernels for a group of `group` query heads per
// KV head: the smallest power of two that holds it, at most 8 (kernels.rs heads_per_block).
UW_DEVICE int heads_per_block(int group) {
    return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8;
}

template <int E>
UW_DEVICE void prefill_body(const float* __restrict__ q, const uint16_t* __restrict__ k_cache,
                            const uint16_t* __restrict__ v_cache, const int* __restrict__ table,
                            int max_blocks, const int* __restrict__ pos,
                            const int* __restrict__ slot, uint16_t* __restrict__ out,
                            float* __restrict__ out_f32, int split, int n, int heads,
                            int kv_heads, float scale, float* sq, uint16_t* sk, uint16_t* sv) {
    constexpr int head_dim = 32 * E;
    constexpr int stride = head_dim + 2;  // BF16 per shared row: lane j's words fall in bank j
    constexpr int words = head_dim / 2;   // u32 (BF16 pairs) per row
    constexpr int RW = PF_ROWS_PER_WARP;
    const int group = heads / kv_heads;
    const int G = heads_per_block(group);
    const int QT = PF_ROWS / G;  // queries per block
    const int hchunks = (group + G - 1) / G;
    const int kh = blockIdx.y / hchunks, hc = blockIdx.y % hchunks;
    const int h0 = kh * group + hc * G;    // first query head of this block
    const int gn = min(G, group - hc * G);  // query heads of this block (the rest idle)
    const int t0 = blockIdx.x * QT;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t kvd = (size_t)kv_heads * head_dim;
    const size_t head_off = (size_t)kh * head_dim;
    const int sl = slot[t0];
    int last = 0;
    for (int i = 0; i < QT && t0 + i < n; ++i) last = max(last, pos[t0 + i]);
    // The rows' queries (zeros for idle rows), read by the first tile's sync.
    for (int i = threadIdx.x; i < PF_ROWS * head_dim; i += blockDim.x) {
        const int rr = i / head_dim, e = i % head_dim;
        const int t = t0 + rr / G, g = rr % G;
        sq[i] = (t < n && g < gn) ? q[((size_t)t * heads + h0 + g) * head_dim + e] : 0.0f;
    }
    int pr[RW];
    float m[RW], l[RW], pe[RW], acc[RW][E];
#pragma unroll
    for (int r = 0; r < RW; ++r) {
        const int rr = warp * RW + r;
        const int t = t0 + rr / G, g = rr % G;
        pr[r] = (t < n && g < gn) ? pos[t] : -1;  // -1: no row (past the chunk, idle head)
        m[r] = -INFINITY;
        l[r] = 0.0f;
        pe[r] = 0.0f;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[r][e] = 0.0f;
    }
    int wlast = -1;  // the warp's last visible position
#pragma unroll
    for (int r = 0; r < RW; ++r) wlast = max(wlast, pr[r]);
    for (int k0 = 0; k0 <= last; k0 += PF_KTILE) {
        __syncthreads();  // every warp is done with the previous tile (and sq is written)
        for (int i = threadIdx.x; i < PF_KTILE * words; i += blockDim.x) {
            const int j = i / words, c = i % words, p = k0 + j;
            uint32_t kw = 0, vw = 0;
            if (p <= last) {
                const size_t row = kv_row(table, max_blocks, sl, p, kvd) + head_off;
                kw = reinterpret_cast<const uint32_t*>(k_cache + row)[c];
                vw = reinterpret_cast<const uint32_t*>(v_cache + row)[c];
            }
            reinterpret_cast<uint32_t*>(sk + j * stride)[c] = kw;
            reinterpret_cast<uint32_t*>(sv + j * stride)[c] = vw;
        }
        __syncthreads();
        if (k0 > wlast) continue;  // warp-uniform: no row of this warp sees the tile
        // Lane j's dot products with key k0 + j for the warp's rows: element order 0, 1, ...
        float dot[RW];
#pragma unroll
        for (int r = 0; r < RW; ++r) dot[r] = 0.0f;
        const uint32_t* kr = reinterpret_cast<const uint32_t*>(sk + lane * stride);
        const float4* q4 = reinterpret_cast<const float4*>(sq + (size_t)warp * RW * head_dim);
#pragma unroll 4
        for (int c4 = 0; c4 < head_dim / 4; ++c4) {
            const uint32_t w0 = kr[2 * c4], w1 = kr[2 * c4 + 1];
            const float k0v = __uint_as_float(w0 << 16), k1v = __uint_as_float(w0 & 0xffff0000u);
            const float k2v = __uint_as_float(w1 << 16), k3v = __uint_as_float(w1 & 0xffff0000u);
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                const float4 qq = q4[r * (head_dim / 4) + c4];
                dot[r] += qq.x * k0v;
                dot[r] += qq.y * k1v;
                dot[r] += qq.z * k2v;
                dot[r] += qq.w * k3v;
            }
        }
#pragma unroll
        for (int r = 0; r < RW; ++r) {
            if (k0 > pr[r]) continue;  // warp-uniform: no key of this tile is visible
            const float s = k0 + lane <= pr[r] ? dot[r] * scale : -INFINITY;
            const float mn = fmaxf(m[r], warp_max(s));  // finite: key k0 is visible
            pe[r] = expf(s - mn);
            const float corr = expf(m[r] - mn);
            l[r] = l[r] * corr + warp_sum(pe[r]);
#pragma unroll
            for (int e = 0; e < E; ++e) acc[r][e] *= corr;
            m[r] = mn;
        }
        // p_j v_j, key by key, for every row that sees key k0 + j (a row past the tile keeps a
        // stale pe, never added: k0 + j > its position).
        for (int j = 0; j < PF_KTILE; ++j) {
            if (k0 + j > wlast) break;  // warp-uniform
            const uint16_t* vr = sv + j * stride;
            float v[E];
#pragma unroll
            for (int e = 0; e < E; ++e) v[e] = bf16_to_f32(vr[lane + 32 * e]);
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                const float pj = __shfl_sync(0xffffffffu, pe[r], j);
                if (k0 + j <= pr[r]) {
#pragma unroll
                    for (int e = 0; e < E; ++e) acc[r][e] += pj * v[e];
                }
            }
        }
    }
    const size_t qd = (size_t)heads * head_dim;
#pragma unroll
    for (int r = 0; r < RW; ++r) {
        if (pr[r] < 0) continue;
        const int rr = warp * RW + r;
        const int t = t0 + rr / G, h = h0 + rr % G;
        uint16_t* hi = out + (size_t)t * qd + (size_t)h * head_dim;
        uint16_t* lo = split ? out + ((size_t)n + t) * qd + (size_t)h * head_dim : nullptr;
        float* f = out_f32 ? out_f32 + (size_t)t * qd + (size_t)h * head_dim : nullptr;
#pragma unroll
        for (int e = 0; e < E; ++e) store_act(hi, lo, f, lane + 32 * e, acc[r][e] / l[r]);
    }
}

extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32, 2)
    attention_prefill(const float* __restrict__ q, const uint16_t* __restrict__ k_cache,
                      const uint16_t* __restrict__ v_cache, const int* __restrict__ table,
                      int max_blocks, const int* __restrict__ pos, const int* __restrict__ slot,
                      uint16_t* __restrict__ out, int split, int n, int heads, int kv_heads,
                      int head_dim, float scale, float* __restrict__ out_f32) {
    // Dynamic: PF_ROWS x head_dim f32, then keys and values, PF_KTILE x (head_dim + 2) BF16 each
    // (4-byte aligned rows: the stride is even).
    extern __shared__ __align__(16) unsigned char pf_smem[];
    float* sq = reinterpret_cast<float*>(pf_smem);
    uint16_t* sk = reinterpret_cast<uint16_t*>(pf_smem + (size_t)PF_ROWS * head_dim * 4);
    uint16_t* sv = sk + PF_KTILE * (head_dim + 2);
#define UW_PF_CASE(E)                                                                          \
    case E:                                                                                    \
        prefill_body<E>(q, k_cache, v_cache, table, max_blocks, pos, slot, out, out_f32,       \
                        split, n, heads, kv_heads, scale, sq, sk, sv);                         \
        break;
    switch (head_dim / 32) {
        UW_PF_CASE(1)
        UW_PF_CASE(2)
        UW_PF_CASE(3)
        UW_PF_CASE(4)
        UW_PF_CASE(5)
        UW_PF_CASE(6)
        UW_PF_CASE(7)
        UW_PF_CASE(8)
        default:
            break;  // the host refuses other head sizes before launching
    }
#undef UW_PF_CASE
}
