// The `tbe3` runtime form on the device (docs/format.md §6, CPU reference src/codec/runtime.rs):
// the two "weight sources" the tbe3 kernels are templated on, so that one kernel body runs on the
// compressed form and on raw BF16 (the pass-through variant) and the two give bit-identical
// results (they hand the body identical BF16 values in the same order).
//
// Work unit: a warp *step* covers 512 consecutive weights (flat index i = r * cols + c), lane l
// the 16 weights from step_start + 16 l. Per lane and step, tbe3 reads one 16-byte load of
// sign+mantissa bytes, three 2-byte loads of code bits (16 bits of each bit-plane of its group)
// and the tile's base exponent and first-escape index (cached header loads); raw BF16 reads two
// 16-byte loads. Both produce 8 packed BF16 pairs (low half = the lower-indexed weight).
//
// Escapes: a weight's escape rank inside its tile = escapes of the earlier lanes of the same tile
// in this step (a segmented warp scan of popcounts, segments of min(tile, 512) / 16 lanes) plus
// the escapes of the tile's earlier steps (`State::carry`, reset when a step starts a tile).
// Callers must walk each tile's steps in order within one warp, starting at the tile's start.
#pragma once
#include "common.cuh"

#define TBE3_FULL_MASK 0xffffffffu
#define TBE3_STEP 512
#define TBE3_LANE 16

// Pointers to the planes of one runtime image (host computes them from the layout).
struct Tbe3Planes {
    const uint8_t* sm;           // sign+mantissa bytes, one per weight
    const uint8_t* codes;        // 48 bytes per 128-weight group: bit-planes 0, 1, 2
    const uint8_t* bases;        // base exponent per tile
    const uint32_t* esc_start;   // first escape of each tile
    const uint8_t* esc;          // escape exponent bytes
    uint32_t tile_shift;         // log2(tile_elems), tile_elems in 128..=65536
};

// Spreads the low 4 bits of n to bit 0 of each byte (bit i -> bit 8 i). The nibble is isolated
// first: the multiply places bit i at i + 7 j (j = 0..3) with no two terms on one bit.
UW_DEVICE uint32_t tbe3_spread4(uint32_t n) { return ((n & 0xFu) * 0x00204081u) & 0x01010101u; }

struct Tbe3Source {
    Tbe3Planes p;
    struct Raw {
        uint4 s;
        uint32_t c0, c1, c2, base, estart;
    };
    struct State {
        uint32_t carry = 0;
    };

    // Loads lane data for the 16 weights at flat index i (a multiple of 16); zeros when inactive.
    UW_DEVICE Raw load(size_t i, bool active) const {
        Raw r;
        if (active) {
            r.s = __ldg(reinterpret_cast<const uint4*>(p.sm + i));
            const uint8_t* cb = p.codes + (i >> 7) * 48 + ((i >> 3) & 14);
            r.c0 = __ldg(reinterpret_cast<const unsigned short*>(cb));
            r.c1 = __ldg(reinterpret_cast<const unsigned short*>(cb + 16));
            r.c2 = __ldg(reinterpret_cast<const unsigned short*>(cb + 32));
            const size_t t = i >> p.tile_shift;
            r.base = __ldg(p.bases + t);
            r.estart = __ldg(p.esc_start + t);
        } else {
            r.s = make_uint4(0, 0, 0, 0);
            r.c0 = r.c1 = r.c2 = r.base = r.estart = 0;
        }
        return r;
    }

    // Warp-collective (every lane of the warp calls it for the same step). `step_start`: flat
    // index of the step's first weight. Writes 8 BF16 pairs.
    UW_DEVICE void decode(const Raw& r, State& st, size_t step_start, uint32_t out[8]) const {
        const uint32_t lane = threadIdx.x & 31;
        const uint32_t tile = 1u << p.tile_shift;
        const uint32_t seg = tile >= TBE3_STEP ? 32u : tile / TBE3_LANE;
        if ((step_start & (size_t)(tile - 1)) == 0) st.carry = 0;
        uint32_t emask = r.c0 & r.c1 & r.c2;
        const uint32_t n = __popc(emask);
        uint32_t incl = n;
#pragma unroll
        for (uint32_t d = 1; d < 32; d <<= 1) {
            const uint32_t v = __shfl_up_sync(TBE3_FULL_MASK, incl, d, seg);
            if (d < seg && (lane & (seg - 1)) >= d) incl += v;
        }
        uint32_t k = r.estart + st.carry + incl - n;
        st.carry += __shfl_sync(TBE3_FULL_MASK, incl, 31);

        // Exponent bytes: code + base, 0 where escaped (code 7; no carry since base <= 249).
        const uint32_t base4 = r.base * 0x01010101u, b7 = r.base + 7;
        uint32_t e[4];
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            const uint32_t code = tbe3_spread4(r.c0 >> (4 * m)) |
                                  (tbe3_spread4(r.c1 >> (4 * m)) << 1) |
                                  (tbe3_spread4(r.c2 >> (4 * m)) << 2);
            const uint32_t escaped = ((code + 0x01010101u) >> 3) & 0x01010101u;
            e[m] = code + base4 - b7 * escaped;
        }
        // Escaped exponents, in weight order (rare: ~2-4% of weights).
        while (emask) {
            const uint32_t j = __ffs(emask) - 1;
            emask &= emask - 1;
            const uint32_t v = (uint32_t)__ldg(p.esc + k) << (8 * (j & 3));
            ++k;
#pragma unroll
            for (int m = 0; m < 4; ++m)
                if ((j >> 2) == (uint32_t)m) e[m] |= v;
        }
        // BF16 = s<<15 | e<<7 | m: high byte s | e>>1, low byte (e & 1)<<7 | m.
        const uint32_t s[4] = {r.s.x, r.s.y, r.s.z, r.s.w};
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            const uint32_t hi = (s[m] & 0x80808080u) | ((e[m] >> 1) & 0x7F7F7F7Fu);
            const uint32_t lo = ((e[m] << 7) & 0x80808080u) | (s[m] & 0x7F7F7F7Fu);
            out[2 * m] = __byte_perm(lo, hi, 0x5140);
            out[2 * m + 1] = __byte_perm(lo, hi, 0x7362);
        }
    }
};

// Raw row-major BF16 weights: the pass-through source.
struct Bf16Source {
    const uint16_t* w;
    struct Raw {
        uint4 a, b;
    };
    struct State {};
    UW_DEVICE Raw load(size_t i, bool active) const {
        Raw r;
        if (active) {
            r.a = __ldg(reinterpret_cast<const uint4*>(w + i));
            r.b = __ldg(reinterpret_cast<const uint4*>(w + i + 8));
        } else {
            r.a = r.b = make_uint4(0, 0, 0, 0);
        }
        return r;
    }
    UW_DEVICE void decode(const Raw& r, State&, size_t, uint32_t out[8]) const {
        out[0] = r.a.x; out[1] = r.a.y; out[2] = r.a.z; out[3] = r.a.w;
        out[4] = r.b.x; out[5] = r.b.y; out[6] = r.b.z; out[7] = r.b.w;
    }
};
