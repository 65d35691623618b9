//! The element-wise operations of the CPU forward pass, in f32 (attention is in `attn`).
//!
//! Every reduction has a fixed order that depends only on the vector length, never on the batch,
//! so a token's result does not depend on which other tokens share its step.

use rayon::prelude::*;

/// Sum of `a[i] · b[i]` with eight interleaved partial sums (a fixed order that vectorises):
/// element `k` below the last multiple of 8 goes to partial sum `k % 8` (a multiply, then an
/// add: no fused multiply-add), the partial sums are added by a fixed tree, the rest one by one.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (a[..n].chunks_exact(8), b[..n].chunks_exact(8));
    let (ra, rb) = (a.remainder(), b.remainder());
    let mut acc = [0f32; 8];
    for (x, y) in a.zip(b) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Elements from which [`rmsnorm`] and [`silu_mul`] share the work between threads (a prompt's
/// activations), whose serial passes (a libm `exp` per element of the gate) would leave the
/// other cores idle. Every element's arithmetic is the same either way.
const PARALLEL_MIN: usize = 1 << 15;

/// Elements per task of the parallel element-wise operations.
const PARALLEL_CHUNK: usize = 1 << 13;

/// RMSNorm of every `width`-wide row of `x` into `out`: `x / sqrt(mean(x²) + eps) · weight`.
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f64, out: &mut [f32]) {
    let width = weight.len();
    let rows = |x: &[f32], out: &mut [f32]| {
        for (xr, or) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
            let mean = dot(xr, xr) / width as f32;
            let inv = 1.0 / (mean + eps as f32).sqrt();
            for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
                *o = v * inv * w;
            }
        }
    };
    if out.len() >= PARALLEL_MIN {
        let chunk = (PARALLEL_CHUNK / width).max(1) * width;
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(o, x)| rows(x, o));
    } else {
        rows(x, out);
    }
}

/// The cosines and sines of one position: `head_dim / 2` of each.
pub fn rope_table(inv_freq: &[f64], pos: usize) -> (Vec<f32>, Vec<f32>) {
    inv_freq
        .iter()
        .map(|&f| {
            let a = pos as f64 * f;
            (a.cos() as f32, a.sin() as f32)
        })
        .unzip()
}

/// Rotates every `head_dim`-wide head of one token's projection in place, with the
/// "rotate_half" pairing of Hugging Face Llama (element `i` with `i + head_dim / 2`).
pub fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            a[i] = x1 * cos[i] - x2 * sin[i];
            b[i] = x2 * cos[i] + x1 * sin[i];
        }
    }
}

/// `gate ← silu(gate) · up`, SwiGLU's gating.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let run = |gate: &mut [f32], up: &[f32]| {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    };
    if gate.len() >= PARALLEL_MIN {
        gate.par_chunks_mut(PARALLEL_CHUNK)
            .zip(up.par_chunks(PARALLEL_CHUNK))
            .for_each(|(g, u)| run(g, u));
    } else {
        run(gate, up);
    }
}

/// `x += y`.
pub fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rmsnorm_normalises() {
        let x = [3.0f32, 4.0, 0.0, 0.0];
        let mut out = [0f32; 4];
        rmsnorm(&x, &[1.0, 2.0, 1.0, 1.0], 0.0, &mut out);
        // mean(x²) = 25/4, rms = 2.5.
        assert_eq!(out, [1.2, 3.2, 0.0, 0.0]);
    }

    #[test]
    fn parallel_passes_equal_row_by_row_bitwise() {
        // Enough elements for the parallel path, with rows that do not divide its chunks.
        let (width, rows) = (576, 2 * PARALLEL_MIN / 576 + 3);
        let x: Vec<f32> = (0..width * rows)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        let weight: Vec<f32> = (0..width).map(|i| 0.5 + i as f32 / width as f32).collect();
        let mut whole = vec![0f32; x.len()];
        rmsnorm(&x, &weight, 1e-5, &mut whole);
        let mut by_row = vec![0f32; x.len()];
        for (xr, or) in x.chunks(width).zip(by_row.chunks_mut(width)) {
            rmsnorm(xr, &weight, 1e-5, or);
        }
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&whole), bits(&by_row));

        let up: Vec<f32> = x.iter().map(|v| 1.0 - v).collect();
        let mut gate = x.clone();
        silu_mul(&mut gate, &up);
        let mut one_by_one = x.clone();
        for (g, u) in one_by_one.chunks_mut(1).zip(up.chunks(1)) {
            silu_mul(g, u);
        }
        assert_eq!(bits(&gate), bits(&one_by_one));
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        let inv = [1.0f64, 0.5];
        let (c, s) = rope_table(&inv, 2);
        let mut x = [1.0f32, 0.0, 0.0, 1.0];
        rope(&mut x, 4, &c, &s);
        // Pair (x0, x2) = (1, 0) rotated by 2 rad; pair (x1, x3) = (0, 1) rotated by 1 rad.
        let close = |a: f32, b: f64| (a as f64 - b).abs() < 1e-6;
        assert!(close(x[0], 2f64.cos()) && close(x[2], 2f64.sin()), "{x:?}");
        assert!(
            close(x[1], -(1f64.sin())) && close(x[3], 1f64.cos()),
            "{x:?}"
        );
    }
}
