// Embedding gather from a tbe3 table (docs/format.md §6): rows tokens[t] of a `vocab x cols`
// runtime-form matrix, decoded to f32 (the residual stream). The compressed twin of
// embed_gather_bf16 (kernels/embed.cu): it reads the same BF16 values, so x is bit-identical.
// Rust partner: src/device/cuda/gather.rs.
//
// grid: (n) one block per token; block: 256 threads (8 warps). A row is a whole number of spans
// (span = max(tile, 512) weights; the host checks cols % span == 0 and tile | cols): warp w
// decodes spans w, w + 8, ... of the row, each span's 512-weight steps in order (the escape
// carry, kernels/tbe3.cuh), lane l the 16 weights from step + 16 l, written as f32.
#include "tbe3.cuh"

extern "C" __global__ void __launch_bounds__(256) tbe3_gather_f32(
    const uint8_t* sm, const uint8_t* codes, const uint8_t* bases, const uint32_t* esc_start,
    const uint8_t* esc, int tile_shift, const int* __restrict__ tokens, int cols,
    float* __restrict__ x) {
    const Tbe3Source src{{sm, codes, bases, esc_start, esc, (uint32_t)tile_shift}};
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t span = max((size_t)1 << tile_shift, (size_t)TBE3_STEP);
    const size_t row0 = (size_t)tokens[blockIdx.x] * cols;
    float* out = x + (size_t)blockIdx.x * cols;
    for (size_t sp = warp; sp * span < (size_t)cols; sp += blockDim.x >> 5) {
        Tbe3Source::State st;
        const size_t stop = min((size_t)cols, (sp + 1) * span);
        for (size_t s0 = sp * span; s0 < stop; s0 += TBE3_STEP) {
            const size_t c = s0 + TBE3_LANE * lane;
            const bool active = c < stop;
            uint32_t pr[8];
            src.decode(src.load(row0 + c, active), st, row0 + s0, pr);
            if (active) {
                float4* o = reinterpret_cast<float4*>(out + c);
#pragma unroll
                for (int q = 0; q < 4; ++q)
                    o[q] = make_float4(__uint_as_float(pr[2 * q] << 16),
                                       __uint_as_float(pr[2 * q] & 0xFFFF0000u),
                                       __uint_as_float(pr[2 * q + 1] << 16),
                                       __uint_as_float(pr[2 * q + 1] & 0xFFFF0000u));
            }
        }
    }
}
