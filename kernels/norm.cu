// RMSNorm fused with the residual add that precedes it. Rust partner:
// src/device/cuda/kernels.rs (`rmsnorm_residual`).
//
// grid: (n) one block per token row; block: 1024 threads (NORM_THREADS in kernels.rs; any multiple
// of 32 up to 1024 works); static shared memory: 32 floats. A decode step of batch 1 runs this
// as a single block, so the block is made wide: each thread then has only h/1024 dependent loads
// (measured on an H200 with 256 threads: 15.6 us per call at h = 4096, latency-bound, 1 ms of a
// 5.4 ms Llama-3.1-8B step).
// x: f32 [n x h] residual stream (device), updated in place: x += y (the preceding GEMM's
//    product, split-summed: rows t and n + t when y_split) unless y is null.
// w: f32 [h] norm weight; out: BF16 [(out_split ? 2n : n) x h], the next GEMM's input:
//    out = x / sqrt(mean(x^2) + eps) * w, hi rows then lo rows.
// out_f32: f32 [n x h], the same values unrounded, or null (the fused GEMV's input).
// Arithmetic as the CPU reference: inv = 1 / sqrt(mean + eps) in f32, then (x * inv) * w.
#include "common.cuh"

extern "C" __global__ void rmsnorm_residual(float* __restrict__ x, const float* __restrict__ y,
                                            int y_split, const float* __restrict__ w,
                                            uint16_t* __restrict__ out, int out_split, int n,
                                            int h, float eps,
                                            float* __restrict__ out_f32) {
    const int t = blockIdx.x;
    float* xr = x + (size_t)t * h;
    float ss = 0.0f;
#pragma unroll 4
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float v = xr[i];
        if (y) {
            v += load_split(y, y_split, n, t, h, i);
            xr[i] = v;
        }
        ss += v * v;
    }
    ss = block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)h + eps);
    uint16_t* hi = out + (size_t)t * h;
    uint16_t* lo = out_split ? out + ((size_t)n + t) * h : nullptr;
    for (int i = threadIdx.x; i < h; i += blockDim.x) store_act(hi, lo, out_f32 ? out_f32 + (size_t)t * h : nullptr, i, xr[i] * inv * w[i]);
}
