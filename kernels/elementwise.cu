// Element-wise kernels: SwiGLU gating, adding split GEMM products, splitting f32 rows and
// gathering rows (a fused step's attention output and lm_head input), and device-side fills (poison
// values for tests, N(0, sigma) BF16 weights for benchmarks that never touch the host). Rust
// partner: src/device/cuda/kernels.rs.
//
// Every kernel here: 1-D grid-stride loop; grid and block chosen by the host (256 threads,
// enough blocks to cover the data up to a cap).
#include "common.cuh"

// gu: f32 GEMM output [(split ? 2n : n) x 2 im], columns gate | up (device).
// out: BF16 split [(out_split ? 2n : n) x im] = silu(gate) * up, the down_proj GEMM's input;
// out_f32: f32 [n x im], the same unrounded, or null (the fused GEMV's input).
// Arithmetic as the CPU reference: g / (1 + exp(-g)) * u.
extern "C" __global__ void silu_mul(const float* __restrict__ gu, int split, int n, int im,
                                    uint16_t* __restrict__ out, int out_split,
                                    float* __restrict__ out_f32) {
    const size_t total = (size_t)n * im;
    const size_t cols = 2 * (size_t)im;
    uint16_t* lo = out_split ? out + total : nullptr;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const int t = (int)(i / im);
        const size_t j = i % im;
        const float g = load_split(gu, split, n, t, cols, j);
        const float u = load_split(gu, split, n, t, cols, im + j);
        store_act(out, lo, out_f32, i, g / (1.0f + expf(-g)) * u);
    }
}

// out: f32 [n x cols] = y[t] + y[n + t] (split) or y[t], from a GEMM output (device).
extern "C" __global__ void split_sum(const float* __restrict__ y, int split, int n, int cols,
                                     float* __restrict__ out) {
    const size_t total = (size_t)n * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        out[i] = load_split(y, split, n, (int)(i / cols), cols, i % cols);
    }
}

// out: BF16 split [2 x count] from x: f32 [count]: hi = bf16(x[i]) at out[i], lo = bf16(x[i] - hi)
// at out[count + i], the bits `store_act` writes (device). A fused step's attention runs per
// part of the pass (one prompt chunk's rows, the decode rows) with its f32 output only, and this
// makes the o_proj GEMM's split input of all n rows at once: the parts cannot write their lo rows
// themselves, whose place (row n + t) depends on the whole pass's n.
extern "C" __global__ void split_f32(const float* __restrict__ x, unsigned long long count,
                                     uint16_t* __restrict__ out) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        store_split(out, out + count, i, x[i]);
}

// Gathers the `m` rows of a pass whose logits are wanted, for the lm_head product: output row r
// is input row rows[r] (device, i32 [m], each < n). xb: BF16 [(split ? 2n : n) x h] (hi rows,
// then lo rows n further); xf: f32 [n x h]. out_b: BF16 [(split ? 2m : m) x h] in the same layout
// (lo rows m further); out_f: f32 [m x h]. Copies bits: the lm_head reads exactly the rows it
// would read in place.
extern "C" __global__ void gather_rows(const uint16_t* __restrict__ xb,
                                       const float* __restrict__ xf, int split, int n, int h,
                                       const int* __restrict__ rows, int m,
                                       uint16_t* __restrict__ out_b, float* __restrict__ out_f) {
    const size_t total = (size_t)m * h;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / h, c = i % h;
        const size_t s = (size_t)rows[r];
        out_b[i] = xb[s * h + c];
        if (split) out_b[total + i] = xb[((size_t)n + s) * h + c];
        out_f[i] = xf[s * h + c];
    }
}

// x: f32 [count] = value.
extern "C" __global__ void fill_f32(float* __restrict__ x, unsigned long long count, float value) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = value;
}

// x: u16 [count] = value (BF16 bits).
extern "C" __global__ void fill_u16(uint16_t* __restrict__ x, unsigned long long count,
                                    unsigned int value) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = (uint16_t)value;
}

UW_DEVICE unsigned long long splitmix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// x: BF16 [count], element i = bf16(sigma * N(0,1)) from a Box-Muller transform of the hash of
// (seed, i): deterministic for a seed, whatever the launch geometry.
extern "C" __global__ void fill_normal_bf16(uint16_t* __restrict__ x, unsigned long long count,
                                            unsigned long long seed, float sigma) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        const unsigned long long r = splitmix64(seed ^ splitmix64(i));
        const float u1 = ((float)(r >> 40) + 1.0f) * (1.0f / 16777216.0f);  // (0, 1]
        const float u2 = (float)((r >> 16) & 0xffffffu) * (1.0f / 16777216.0f);
        const float z = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
        x[i] = f32_to_bf16(sigma * z);
    }
}
