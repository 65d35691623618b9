// Strategy 1 of issue 6: full decode of a tbe3 runtime matrix to row-major BF16 in global memory
// (for cuBLAS at large batch and prefill), one pass over the image, coalesced.
//
// Any shape and tile size (the form is defined on the flat index, so rows need not align with
// tiles or groups). A warp owns a *span* of max(tile, 512) weights (a whole tile, or one 512-
// weight step holding several small tiles) and walks it in 512-weight steps; lane l decodes the
// 16 weights from step + 16 l (Tbe3Source, kernels/tbe3.cuh) and writes them with two 16-byte
// stores, so a warp writes 1 KiB contiguous per step. Warps take spans grid-stride.
// Decodes weights [begin, end) to out[0 .. end - begin): the whole matrix, or a chunk of rows for
// the chunked decode + cuBLAS strategy. begin must be a multiple of the span (checked by the
// host), so every span starts where the form's escape ranks restart.
#include "tbe3.cuh"

extern "C" __global__ void __launch_bounds__(256) tbe3_decode(
    const uint8_t* sm, const uint8_t* codes, const uint8_t* bases, const uint32_t* esc_start,
    const uint8_t* esc, int tile_shift, uint16_t* __restrict__ out, unsigned long long begin,
    unsigned long long end) {
    const Tbe3Source src{{sm, codes, bases, esc_start, esc, (uint32_t)tile_shift}};
    const int lane = threadIdx.x & 31;
    const size_t n = end;
    const size_t span = max((size_t)1 << tile_shift, (size_t)TBE3_STEP);
    const size_t first = begin / span;
    const size_t spans = (n + span - 1) / span;
    const size_t warps = (size_t)gridDim.x * (blockDim.x >> 5);
    for (size_t sp = first + ((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5); sp < spans;
         sp += warps) {
        Tbe3Source::State st;
        const size_t stop = min(n, (sp + 1) * span);
        for (size_t s0 = sp * span; s0 < stop; s0 += TBE3_STEP) {
            const size_t i = s0 + TBE3_LANE * lane;
            const bool active = i < n;
            uint32_t pr[8];
            src.decode(src.load(i, active), st, s0, pr);
            if (i + TBE3_LANE <= n) {
                uint4* o = reinterpret_cast<uint4*>(out + (i - begin));
                o[0] = make_uint4(pr[0], pr[1], pr[2], pr[3]);
                o[1] = make_uint4(pr[4], pr[5], pr[6], pr[7]);
            } else if (active) {
#pragma unroll
                for (int j = 0; j < TBE3_LANE; ++j)
                    if (i + j < n) out[i + j - begin] = (uint16_t)(pr[j >> 1] >> (16 * (j & 1)));
            }
        }
    }
}
