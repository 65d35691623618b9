// Strategy 2 of issue 6: fused decode GEMV / skinny GEMM for 1..8 activation rows,
//   y[b, r] = sum_c W[r, c] * x[b, c],
// W (rows x cols, row-major) in the tbe3 runtime form (tbe3_gemv_b{B}) or raw BF16 (the
// pass-through variant bf16_gemv_b{B}), decoded into registers from 16-byte loads (decoded
// weights never touch shared or global memory). Activations x: f32, [B][cols] (the engine's
// residual-stream precision; the CPU reference multiplies f32 activations by BF16 weights).
// Output: f32, FP32 accumulation (fmaf), [B][rows] like the cuBLAS path's output.
//
// Geometry (host: src/device/cuda/tbe3.rs `GemvGeometry`): 256 threads = 8 warps per block;
// each warp owns R = rows_per_warp(B) consecutive rows and one K chunk of `kchunk` columns
// (blockIdx.y); it walks the chunk in steps of 512 columns, lane l taking columns +16 l. Each lane
// accumulates its 16 columns of every step in column order into acc[r][b]; a warp xor-butterfly
// then sums the 32 lanes. With ksplit = gridDim.y > 1 the warp writes partial sums
// partial[ks][b][r] and gemv_reduce adds them in ks order: deterministic, no atomics. The same
// body, geometry and order for both sources, hence bit-identical outputs.
// Requirements (checked by the host): cols % 128 == 0, tile | cols, kchunk a multiple of 512 and
// of the tile (chunks start on tile boundaries, so escape ranks start there).
#include "tbe3.cuh"

#define GEMV_THREADS 256
// At least 2 blocks (16 warps) per SM, which caps registers at 128 per thread; B = 8 spills
// under that cap (ptxas -v), so it gets 1 (up to 255 registers, 8+ warps per SM).
#define GEMV_MIN_BLOCKS(B) ((B) >= 8 ? 1 : 2)

// Rows per warp for B activation rows: the x loads (from L1) are shared by R rows. 4 only where
// R x 16 decoded weights + B x R sums fit 128 registers without spilling (B = 3, 4).
__host__ __device__ constexpr int gemv_rows_per_warp(int b) { return (b == 3 || b == 4) ? 4 : 2; }

template <int B, class Src>
UW_DEVICE void gemv_body(const Src& src, const float* __restrict__ x, float* __restrict__ out,
                         int rows, int cols, int kchunk) {
    constexpr int R = gemv_rows_per_warp(B);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row0 = (blockIdx.x * (GEMV_THREADS / 32) + warp) * R;
    if (row0 >= rows) return;  // whole warp: nothing below synchronises across warps
    const int c_begin = blockIdx.y * kchunk;
    const int c_end = min(cols, c_begin + kchunk);
    float acc[R][B];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int b = 0; b < B; ++b) acc[r][b] = 0.0f;
    typename Src::State st[R];

    for (int c0 = c_begin; c0 < c_end; c0 += TBE3_STEP) {
        const int c = c0 + TBE3_LANE * lane;
        const bool active = c < c_end;
        typename Src::Raw raw[R];
#pragma unroll
        for (int r = 0; r < R; ++r)
            raw[r] = src.load((size_t)(row0 + r) * cols + c, active && row0 + r < rows);
        float w[R][16];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            uint32_t pr[8];
            src.decode(raw[r], st[r], (size_t)(row0 + r) * cols + c0, pr);
#pragma unroll
            for (int q = 0; q < 8; ++q) {
                w[r][2 * q] = __uint_as_float(pr[q] << 16);
                w[r][2 * q + 1] = __uint_as_float(pr[q] & 0xFFFF0000u);
            }
        }
#pragma unroll
        for (int b = 0; b < B; ++b) {
            float xv[16];
            if (active) {
                const float4* xp = reinterpret_cast<const float4*>(x + (size_t)b * cols + c);
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const float4 v = __ldg(xp + q);
                    xv[4 * q] = v.x; xv[4 * q + 1] = v.y; xv[4 * q + 2] = v.z; xv[4 * q + 3] = v.w;
                }
            } else {
#pragma unroll
                for (int j = 0; j < 16; ++j) xv[j] = 0.0f;
            }
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int j = 0; j < 16; ++j) acc[r][b] = fmaf(w[r][j], xv[j], acc[r][b]);
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int b = 0; b < B; ++b) {
            const float v = warp_sum(acc[r][b]);
            if (lane == 0 && row0 + r < rows)
                out[((size_t)blockIdx.y * B + b) * rows + row0 + r] = v;
        }
}

#define GEMV_ENTRIES(B)                                                                         \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS, GEMV_MIN_BLOCKS(B)) tbe3_gemv_b##B(                  \
        const uint8_t* sm, const uint8_t* codes, const uint8_t* bases,                         \
        const uint32_t* esc_start, const uint8_t* esc, int tile_shift, const float* x,         \
        float* out, int rows, int cols, int kchunk) {                                           \
        const Tbe3Source src{{sm, codes, bases, esc_start, esc, (uint32_t)tile_shift}};         \
        gemv_body<B>(src, x, out, rows, cols, kchunk);                                          \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS, GEMV_MIN_BLOCKS(B)) bf16_gemv_b##B(                  \
        const uint16_t* w, const float* x, float* out, int rows, int cols, int kchunk) {       \
        const Bf16Source src{w};                                                                \
        gemv_body<B>(src, x, out, rows, cols, kchunk);                                          \
    }

GEMV_ENTRIES(1)
GEMV_ENTRIES(2)
GEMV_ENTRIES(3)
GEMV_ENTRIES(4)
GEMV_ENTRIES(5)
GEMV_ENTRIES(6)
GEMV_ENTRIES(7)
GEMV_ENTRIES(8)

// Second pass of split-K: y[i] = partial[0][i] + partial[1][i] + ... in ks order, i < n.
extern "C" __global__ void gemv_reduce(const float* __restrict__ partial, float* __restrict__ y,
                                       int n, int ksplit) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (size_t)n;
         i += (size_t)gridDim.x * blockDim.x) {
        float s = partial[i];
        for (int k = 1; k < ksplit; ++k) s += partial[(size_t)k * n + i];
        y[i] = s;
    }
}
