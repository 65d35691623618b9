// Strategy 3 of issue 6 (first version): weights decoded into shared memory feeding the tensor
// cores, for products past the GEMV's 8 rows (batches of 16..256 tokens, prefill chunks).
//   y[n][r] = sum_c W[r][c] * x[n][c]      (the cuBLAS strategy's layout: y column-major,
//                                            ldy = rows; x rows ldx apart, BF16, split rows
//                                            allowed: the consumer adds hi and lo products)
// W (rows x cols, row-major) in the tbe3 runtime form (tbe3_mma) or raw BF16 (the pass-through
// twin bf16_mma): one body templated on the weight source, so both sum identical BF16 values in
// the identical order: bit-identical outputs.
//
// Block: 256 threads (8 warps), output tile 64 weight rows x 64 activation rows, the whole K
// (no split-K: each warp walks its rows' tbe3 steps in order, as the escape carry requires).
// Per stage of 512 columns:
//   1. decode: warp w decodes rows 8w..8w+7 of the tile, one 512-weight tbe3 step each (lane l:
//      16 weights, two 16-byte shared stores) into sw[64][520];
//   2. activations: 64 rows x 512 BF16 into sx[64][520] with 16-byte loads (zeros past n);
//   3. mma.sync.m16n8k16 BF16 -> f32: warp w owns weight rows 16 (w & 3) .. +16 and activation
//      rows 32 (w >> 2) .. +32 (4 n8 tiles, 16 f32 accumulators per thread).
// Shared rows are 520 BF16 (1040 bytes) apart, so the fragment loads (8 rows x 4 words) hit 32
// distinct banks. 2 x 66,560 bytes of dynamic shared memory: one block per SM.
// No cp.async / TMA pipelining yet: decode, load and mma alternate with two barriers per stage.
// This is the correctness-first version; the H100 measurements decide where it stands against
// chunked decode + cuBLAS (the autotuner picks per shape and batch).
// Requirements (checked by the host, src/device/cuda/mma.rs): cols a multiple of 512 and of the
// tile; x 16-byte aligned with ldx a multiple of 8.
#include "tbe3.cuh"

#define MMA_THREADS 256
#define MMA_M 64
#define MMA_N 64
#define MMA_K 512
#define MMA_LD (MMA_K + 8)

template <class Src>
UW_DEVICE void mma_body(const Src& src, const uint16_t* __restrict__ x, int ldx, int n_rows,
                        float* __restrict__ y, int rows, int cols) {
    extern __shared__ __align__(16) uint16_t smem[];
    uint16_t* sw = smem;
    uint16_t* sx = smem + MMA_M * MMA_LD;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int m0 = blockIdx.x * MMA_M, n0 = blockIdx.y * MMA_N;
    const int wm = (warp & 3) * 16, wn = (warp >> 2) * 32;
    const int g = lane >> 2, t = lane & 3;
    typename Src::State st[MMA_M / 8];
    float acc[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;

    for (int k0 = 0; k0 < cols; k0 += MMA_K) {
        // 1. Weights: warp-uniform rows, every lane calls decode (it is warp-collective).
#pragma unroll
        for (int j = 0; j < MMA_M / 8; ++j) {
            const int lr = warp * (MMA_M / 8) + j;
            const int r = m0 + lr;
            const bool active = r < rows;
            const size_t step = (size_t)(active ? r : 0) * cols + k0;
            uint32_t pr[8];
            src.decode(src.load(step + TBE3_LANE * lane, active), st[j], step, pr);
            uint4* d = reinterpret_cast<uint4*>(sw + lr * MMA_LD + TBE3_LANE * lane);
            d[0] = make_uint4(pr[0], pr[1], pr[2], pr[3]);
            d[1] = make_uint4(pr[4], pr[5], pr[6], pr[7]);
        }
        // 2. Activations.
        for (int v = threadIdx.x; v < MMA_N * (MMA_K / 8); v += MMA_THREADS) {
            const int row = v / (MMA_K / 8), c8 = (v % (MMA_K / 8)) * 8;
            uint4 val = make_uint4(0, 0, 0, 0);
            if (n0 + row < n_rows)
                val = __ldg(reinterpret_cast<const uint4*>(x + (size_t)(n0 + row) * ldx + k0 + c8));
            *reinterpret_cast<uint4*>(sx + row * MMA_LD + c8) = val;
        }
        __syncthreads();
        // 3. Tensor cores: A = W rows (row-major), B = x rows (k contiguous: the "col" operand).
#pragma unroll 4
        for (int kk = 0; kk < MMA_K; kk += 16) {
            const uint16_t* a = sw + (wm + g) * MMA_LD + kk + 2 * t;
            const uint32_t a0 = *reinterpret_cast<const uint32_t*>(a);
            const uint32_t a1 = *reinterpret_cast<const uint32_t*>(a + 8 * MMA_LD);
            const uint32_t a2 = *reinterpret_cast<const uint32_t*>(a + 8);
            const uint32_t a3 = *reinterpret_cast<const uint32_t*>(a + 8 * MMA_LD + 8);
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const uint16_t* b = sx + (wn + nt * 8 + g) * MMA_LD + kk + 2 * t;
                const uint32_t b0 = *reinterpret_cast<const uint32_t*>(b);
                const uint32_t b1 = *reinterpret_cast<const uint32_t*>(b + 8);
                asm volatile(
                    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                    "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                    : "+f"(acc[nt][0]), "+f"(acc[nt][1]), "+f"(acc[nt][2]), "+f"(acc[nt][3])
                    : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
            }
        }
        __syncthreads();
    }
    // C fragment: c0, c1 at (weight row g, activation rows 2t, 2t + 1); c2, c3 at row g + 8.
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
        const int n = n0 + wn + nt * 8 + 2 * t;
        const int r = m0 + wm + g;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int rr = r + 8 * (q >> 1), nn = n + (q & 1);
            if (rr < rows && nn < n_rows) y[(size_t)nn * rows + rr] = acc[nt][q];
        }
    }
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
    tbe3_mma(const uint8_t* sm, const uint8_t* codes, const uint8_t* bases,
             const uint32_t* esc_start, const uint8_t* esc, int tile_shift,
             const uint16_t* __restrict__ x, int ldx, int n_rows, float* __restrict__ y, int rows,
             int cols) {
    const Tbe3Source src{{sm, codes, bases, esc_start, esc, (uint32_t)tile_shift}};
    mma_body(src, x, ldx, n_rows, y, rows, cols);
}

extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)
    bf16_mma(const uint16_t* __restrict__ w, const uint16_t* __restrict__ x, int ldx, int n_rows,
             float* __restrict__ y, int rows, int cols) {
    const Bf16Source src{w};
    mma_body(src, x, ldx, n_rows, y, rows, cols);
}
