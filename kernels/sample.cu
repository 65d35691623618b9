// Token choice on the device: docs/sampling.md steps 1–9 (penalties, masks, greedy, candidates,
// fixed-point weights, rank, top-k, top-p, the Philox draw), so only token ids cross PCIe. Rust
// partner: src/device/cuda/sample.rs (`SampleRow`, `SampleEdit`, the launcher); the reference is
// `engine::sampler::choose`, which this kernel reproduces bit for bit from the same logits.
//
// grid: (rows) one block per row; block: SAMPLE_THREADS = 1024 threads. shared: 256 u64 (the
// radix histogram) + a few u64 per warp for reductions and scans.
// logits: f32 [rows x vocab] (device; the row's edits are applied in place);
// rows: SampleRow [rows]; edits: SampleEdit [..] (each row's in [edits_begin, edits_end));
// out: int32 [rows].
//
// How the steps map onto a block (nothing is sorted, every sum is an integer, so no step depends
// on the order of a reduction and the answer is the CPU's exactly):
//   1–2  each edit (unique ids per row) is one thread's store: l - delta (penalties, the delta
//        computed on the host exactly as the CPU does) or -inf (a mask, delta = NaN);
//   3    greedy rows: block_argmax (argmax.cuh, the same code as `argmax_rows`);
//   4–5  the max over non-NaN logits (fmaxf skips NaN; ±0 give the same weights), then every
//        token's weight recomputed where needed (a handful of f32 operations, __fadd_rn /
//        __fmul_rn so nothing is contracted into an FMA) rather than stored;
//   6–8  the top-k and top-p cuts are radix selects on the 64-bit rank key: eight passes of 8
//        bits, each a histogram over the candidates still in play (counts for top-k, u64 weights
//        for top-p) and a scan from the top digit down to the one where the metric crosses. The
//        result is the key of the token that completes the cut, so the kept set is "key >= K";
//   9    the draw: each thread owns a contiguous id range, a block-wide exclusive scan of the
//        ranges' kept weight puts the target in exactly one range, whose thread walks it in id
//        order (the inverse CDF).
// The row is written (step 1–2) and then read by every step, so the helpers take it without
// __restrict__: no read-only (non-coherent) loads that could miss the block's own edits.
#include "argmax.cuh"

#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)

// One row's parameters (48 bytes; mirrors `SampleRow` in src/device/cuda/sample.rs).
struct SampleRow {
    float scale;                  // gap_scale(temperature) = min(LOG2_E / temperature, FLT_MAX)
    uint32_t top_k;               // 0 = off
    unsigned long long top_p32;   // ceil(top_p * 2^32); 2^32 = off
    unsigned long long seed;      // Philox key
    unsigned long long position;  // Philox counter: tokens generated before this one
    uint32_t greedy;              // 1: the argmax (temperature 0 or top_k 1)
    uint32_t edits_begin;         // the row's edits in `edits`
    uint32_t edits_end;
    uint32_t pad;
};

// One logit edit (8 bytes; mirrors `SampleEdit`): l = l - delta, or l = -inf when delta is NaN.
struct SampleEdit {
    uint32_t id;
    float delta;
};

#define WEIGHT_ONE_F 4294967296.0f  // 2^32, the weight of the best token
#define T_MIN (-32.0f)

// 2^f on [-0.5, 0.5]: the degree-7 Taylor coefficients (ln 2)^k / k! as f32 (docs/sampling.md).
UW_DEVICE float exp2_poly(float f) {
    float p = __uint_as_float(0x377FE5FEu);
    p = __fadd_rn(__fmul_rn(p, f), __uint_as_float(0x39218489u));
    p = __fadd_rn(__fmul_rn(p, f), __uint_as_float(0x3AAEC3FFu));
    p = __fadd_rn(__fmul_rn(p, f), __uint_as_float(0x3C1D955Bu));
    p = __fadd_rn(__fmul_rn(p, f), __uint_as_float(0x3D635847u));
    p = __fadd_rn(__fmul_rn(p, f), __uint_as_float(0x3E75FDF0u));
    p = __fadd_rn(__fmul_rn(p, f), __uint_as_float(0x3F317218u));
    p = __fadd_rn(__fmul_rn(p, f), __uint_as_float(0x3F800000u));
    return p;
}

// The fixed-point weight of a candidate with scaled gap t in [T_MIN, 0], as an integer-valued
// f32: floor(P(f) * 2^(32 + r)), r = t rounded to nearest (ties to even) by two additions of
// 1.5 * 2^23, f = t - r (exact). `engine::sampler::weight`.
UW_DEVICE float candidate_weight(float t) {
    const float round = 12582912.0f;
    const float big = __fadd_rn(t, round);
    const float r = __fsub_rn(big, round);
    const float f = __fsub_rn(t, r);
    const int ri = (int)__float_as_uint(big) - 0x4B400000;
    const float scale = __uint_as_float((uint32_t)(32 + ri + 127) << 23);
    return floorf(__fmul_rn(exp2_poly(f), scale));
}

// Token i's weight (0: not a candidate) given the row's max `m` (finite or +inf) and `scale`.
UW_DEVICE float token_weight(float l, float m, float scale) {
    if (m == INFINITY) return l == INFINITY ? WEIGHT_ONE_F : 0.0f;
    const float t = __fmul_rn(__fsub_rn(l, m), scale);
    return t >= T_MIN ? candidate_weight(t) : 0.0f;  // NaN: not a candidate
}

// The rank key: larger logit first, then lower id (step 6; `engine::sampler::rank_key`).
UW_DEVICE unsigned long long rank_key(float l, uint32_t id) {
    const uint32_t bits = __float_as_uint(__fadd_rn(l, 0.0f));  // -0 + 0 = +0
    const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return ((unsigned long long)ordered << 32) | (0xFFFFFFFFu - id);
}

// Philox4x32-10, word 0, key (seed lo, seed hi), counter (position lo, position hi, 0, 0)
// (`engine::philox::draw_word`).
UW_DEVICE uint32_t draw_word(unsigned long long seed, unsigned long long position) {
    uint32_t c0 = (uint32_t)position, c1 = (uint32_t)(position >> 32), c2 = 0u, c3 = 0u;
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    return c0;
}

// floor(a * b / 2^32) for a < 2^32 (the product fits 96 bits).
UW_DEVICE unsigned long long mul_shr32(unsigned long long a, unsigned long long b) {
    const unsigned long long lo = a * b, hi = __umul64hi(a, b);
    return (hi << 32) | (lo >> 32);
}

UW_DEVICE unsigned long long warp_sum_u64(unsigned long long v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block; every thread gets it. `scratch` holds SAMPLE_WARPS u64.
UW_DEVICE unsigned long long block_sum_u64(unsigned long long v, unsigned long long* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_u64(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < SAMPLE_WARPS ? scratch[lane] : 0ull;
    v = warp_sum_u64(v);
    __syncthreads();  // scratch is free again
    return v;
}

// The largest non-NaN value over the block (-inf when there is none); every thread gets it.
UW_DEVICE float block_max_f(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < SAMPLE_WARPS ? scratch[lane] : -INFINITY;
    v = warp_max(v);
    __syncthreads();
    return v;
}

// Exclusive prefix sum over the block in thread order; `scratch` holds SAMPLE_WARPS u64.
UW_DEVICE unsigned long long block_exclusive_scan_u64(unsigned long long v,
                                                      unsigned long long* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned long long inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long up = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += up;
    }
    if (lane == 31) scratch[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        unsigned long long w = lane < SAMPLE_WARPS ? scratch[lane] : 0ull;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned long long up = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += up;
        }
        if (lane < SAMPLE_WARPS) scratch[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    const unsigned long long before = warp > 0 ? scratch[warp - 1] : 0ull;
    __syncthreads();
    return before + inc - v;
}

// The key K of the token that completes a cut: among the candidates with key >= `floor`, the
// shortest prefix in descending key order whose metric (1 per token when `by_count`, the weight
// otherwise) sums to at least `need` ends at the token with key K. Requires 0 < need <= the
// metric of those candidates. Eight passes of 8 bits, most significant first.
UW_DEVICE unsigned long long radix_cut(const float* row, int vocab, float m,
                                       float scale, unsigned long long floor, bool by_count,
                                       unsigned long long need, unsigned long long* hist,
                                       unsigned long long* shared_pick) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned long long prefix = 0ull, mask = 0ull;
    for (int shift = 56; shift >= 0; shift -= 8) {
        for (int d = threadIdx.x; d < 256; d += blockDim.x) hist[d] = 0ull;
        __syncthreads();
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float l = row[i];
            const float w = token_weight(l, m, scale);
            if (w == 0.0f) continue;
            const unsigned long long key = rank_key(l, (uint32_t)i);
            if (key < floor || (key & mask) != prefix) continue;
            atomicAdd(&hist[(key >> shift) & 255u], by_count ? 1ull : (unsigned long long)w);
        }
        __syncthreads();
        if (warp == 0) {
            // Lane j holds digits 255 - 8j down to 248 - 8j: its sum, then the sums of the lanes
            // above it (higher digits), find the lane where the running metric crosses `need`.
            unsigned long long own = 0ull;
#pragma unroll
            for (int u = 0; u < 8; ++u) own += hist[255 - 8 * lane - u];
            unsigned long long inc = own;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const unsigned long long up = __shfl_up_sync(0xffffffffu, inc, o);
                if (lane >= o) inc += up;
            }
            const unsigned long long above = inc - own;
            const bool crosses = above < need && inc >= need;
            if (crosses) {
                unsigned long long acc = above;
                int digit = 255 - 8 * lane;
                for (int u = 0; u < 8; ++u, --digit) {
                    if (acc + hist[digit] >= need) break;
                    acc += hist[digit];
                }
                shared_pick[0] = (unsigned long long)digit;
                shared_pick[1] = need - acc;
            }
        }
        __syncthreads();
        prefix |= shared_pick[0] << shift;
        mask |= 255ull << shift;
        need = shared_pick[1];
        __syncthreads();
    }
    return prefix;
}

// The weight of token i if it is kept (a candidate ranked at or above `floor`), 0 otherwise.
UW_DEVICE unsigned long long kept_token_weight(const float* row, int i, float m,
                                               float scale, unsigned long long floor) {
    const float l = row[i];
    const float w = token_weight(l, m, scale);
    return w != 0.0f && rank_key(l, (uint32_t)i) >= floor ? (unsigned long long)w : 0ull;
}

// The total weight of the kept tokens over the block; every thread gets it.
UW_DEVICE unsigned long long kept_weight(const float* row, int vocab, float m,
                                         float scale, unsigned long long floor,
                                         unsigned long long* scratch) {
    unsigned long long kept = 0ull;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        kept += kept_token_weight(row, i, m, scale, floor);
    return block_sum_u64(kept, scratch);
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows(float* __restrict__ logits, int vocab, const SampleRow* __restrict__ rows,
                const SampleEdit* __restrict__ edits, int* __restrict__ out) {
    __shared__ unsigned long long hist[256];
    __shared__ unsigned long long scratch[SAMPLE_WARPS];
    __shared__ unsigned long long pick[2];
    float* row = logits + (size_t)blockIdx.x * vocab;
    const SampleRow p = rows[blockIdx.x];
    // -1 until a step below writes the answer: the launcher refuses an id outside the vocabulary,
    // so a row no step answered is an error, not a stale id.
    if (threadIdx.x == 0) out[blockIdx.x] = -1;

    // 1–2: penalties and masks (ids unique within a row, so the stores do not collide).
    for (uint32_t e = p.edits_begin + threadIdx.x; e < p.edits_end; e += blockDim.x) {
        const SampleEdit ed = edits[e];
        if (ed.id < (uint32_t)vocab) {
            const float l = row[ed.id];
            row[ed.id] = isnan(ed.delta) ? -INFINITY : __fsub_rn(l, ed.delta);
        }
    }
    __syncthreads();

    // 3: greedy.
    if (p.greedy) {
        const int id = block_argmax(row, vocab);
        if (threadIdx.x == 0) out[blockIdx.x] = id;
        return;
    }

    // 4: the largest non-NaN logit.
    float m = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, row[i]);
    m = block_max_f(m, reinterpret_cast<float*>(scratch));
    if (m == -INFINITY) {  // nothing above -inf: argmax's answer
        if (threadIdx.x == 0) out[blockIdx.x] = 0;
        return;
    }

    // 5: the candidates' number and weight.
    unsigned long long count = 0ull, total = 0ull;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float w = token_weight(row[i], m, p.scale);
        count += w != 0.0f;
        total += (unsigned long long)w;
    }
    count = block_sum_u64(count, scratch);
    total = block_sum_u64(total, scratch);

    // 6–8: the cuts, as a floor on the rank key.
    unsigned long long floor = 0ull;
    if (p.top_k > 0 && (unsigned long long)p.top_k < count) {
        floor = radix_cut(row, vocab, m, p.scale, 0ull, true, p.top_k, hist, pick);
        total = kept_weight(row, vocab, m, p.scale, floor, scratch);
    }
    if (p.top_p32 < (1ull << 32)) {
        // need = max(1, ceil(top_p32 * total / 2^32)); top_p32 <= 2^32 and total < 2^50.
        const unsigned long long lo = p.top_p32 * total, hi = __umul64hi(p.top_p32, total);
        unsigned long long need = (hi << 32) | (lo >> 32);
        if (lo & 0xFFFFFFFFull) need += 1;
        if (need == 0) need = 1;
        floor = radix_cut(row, vocab, m, p.scale, floor, false, need, hist, pick);
        total = kept_weight(row, vocab, m, p.scale, floor, scratch);
    }

    // 9: the draw, the inverse CDF over the kept tokens in id order.
    const unsigned long long target = mul_shr32(draw_word(p.seed, p.position), total);
    const int per = (vocab + (int)blockDim.x - 1) / (int)blockDim.x;
    const int begin = min((int)threadIdx.x * per, vocab), end = min(begin + per, vocab);
    unsigned long long mine = 0ull;
    for (int i = begin; i < end; ++i) mine += kept_token_weight(row, i, m, p.scale, floor);
    const unsigned long long before = block_exclusive_scan_u64(mine, scratch);
    if (before <= target && target < before + mine) {
        unsigned long long cum = before;
        for (int i = begin; i < end; ++i) {
            cum += kept_token_weight(row, i, m, p.scale, floor);
            if (cum > target) {
                out[blockIdx.x] = i;
                break;
            }
        }
    }
}
