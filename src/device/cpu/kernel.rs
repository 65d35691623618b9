//! The BF16 × f32 row-dot kernel every matrix product of the CPU backend is made of.
//!
//! The arithmetic order is fixed and depends only on the row length: element `k` of a row goes
//! to accumulator lane `k % 32` with a fused multiply-add (for `k` below the last multiple of
//! 32), the 32 lanes are summed by a fixed tree (`i + 16`, `+ 8`, `+ 4`, `+ 2`, `+ 1`), and the
//! remaining elements are added one by one with fused multiply-adds. Nothing depends on how many
//! token vectors are processed together, on where the weights came from (decoded at load or
//! decoded chunk by chunk) or on whether the AVX-512 version runs: every path gives the same
//! bits. That is what makes compressed and plain checkpoints, and batched and single decoding,
//! produce identical logits.

/// Accumulator lanes.
pub const LANES: usize = 32;

/// Token vectors processed per pass over a weight row.
pub const GROUP: usize = 8;

/// BF16 element `k` of little-endian bytes, widened to f32 (exact).
#[inline(always)]
pub fn bf16_at(w: &[u8], k: usize) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes([w[2 * k], w[2 * k + 1]])) << 16)
}

/// Adds elements `full..cols` to `s` one by one (the part of a row after its last whole
/// 32-element block).
#[inline(always)]
pub fn tail(w: &[u8], x: &[f32], full: usize, cols: usize, mut s: f32) -> f32 {
    for (k, &xv) in x.iter().enumerate().take(cols).skip(full) {
        s = bf16_at(w, k).mul_add(xv, s);
    }
    s
}

/// Sums 32 lanes with the fixed tree.
#[inline(always)]
fn reduce(a: &[f32; LANES]) -> f32 {
    let mut b = [0f32; 16];
    for i in 0..16 {
        b[i] = a[i] + a[i + 16];
    }
    let mut c = [0f32; 8];
    for i in 0..8 {
        c[i] = b[i] + b[i + 8];
    }
    let d = [c[0] + c[4], c[1] + c[5], c[2] + c[6], c[3] + c[7]];
    let e = [d[0] + d[2], d[1] + d[3]];
    e[0] + e[1]
}

/// The portable kernel: `out[g] = Σ_k bf16(w[k]) · xs[g][k]` in the fixed order.
pub fn dot_group_portable<const G: usize>(w: &[u8], xs: [&[f32]; G], cols: usize) -> [f32; G] {
    assert!(w.len() >= 2 * cols && xs.iter().all(|x| x.len() >= cols));
    let full = cols / LANES * LANES;
    let mut acc = [[0f32; LANES]; G];
    for k in (0..full).step_by(LANES) {
        let mut wf = [0f32; LANES];
        for (i, v) in wf.iter_mut().enumerate() {
            *v = bf16_at(w, k + i);
        }
        for g in 0..G {
            let x = &xs[g][k..k + LANES];
            for i in 0..LANES {
                acc[g][i] = wf[i].mul_add(x[i], acc[g][i]);
            }
        }
    }
    let mut out = [0f32; G];
    for g in 0..G {
        out[g] = tail(w, xs[g], full, cols, reduce(&acc[g]));
    }
    out
}

/// Which implementation of the kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// Plain Rust (fused multiply-adds through `f32::mul_add`).
    Portable,
    /// AVX-512 (same results).
    Avx512,
}

impl KernelKind {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Self {
        if super::simd::available() {
            KernelKind::Avx512
        } else {
            KernelKind::Portable
        }
    }

    fn dot<const G: usize>(self, w: &[u8], xs: [&[f32]; G], cols: usize) -> [f32; G] {
        match self {
            KernelKind::Portable => dot_group_portable(w, xs, cols),
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx512 => {
                assert!(w.len() >= 2 * cols && xs.iter().all(|x| x.len() >= cols));
                // SAFETY: `Avx512` is only chosen when `simd::available()` found the features;
                // the slice lengths were just checked.
                unsafe { super::simd::dot_group(w, xs, cols) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            KernelKind::Avx512 => dot_group_portable(w, xs, cols),
        }
    }

    /// `out[r][g] = ws[r] · xs[g]`: several rows over several token vectors in one pass, each
    /// product bit-identical to [`KernelKind::dot_row`]'s.
    pub fn dot_block<const R: usize, const G: usize>(
        self,
        ws: [&[u8]; R],
        xs: [&[f32]; G],
        cols: usize,
    ) -> [[f32; G]; R] {
        match self {
            KernelKind::Portable => ws.map(|w| dot_group_portable(w, xs, cols)),
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx512 => {
                assert!(
                    ws.iter().all(|w| w.len() >= 2 * cols) && xs.iter().all(|x| x.len() >= cols)
                );
                // SAFETY: `Avx512` is only chosen when `simd::available()` found the features;
                // the slice lengths were just checked.
                unsafe { super::simd::dot_block(ws, xs, cols) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            KernelKind::Avx512 => ws.map(|w| dot_group_portable(w, xs, cols)),
        }
    }

    /// `out[t] = row · x[t]` for every token vector `t` of `x` (`n × cols`, row-major), where
    /// `row` holds `cols` little-endian BF16 values.
    pub fn dot_row(self, row: &[u8], x: &[f32], cols: usize, out: &mut [f32]) {
        let n = out.len();
        let mut t = 0;
        while t + GROUP <= n {
            let xs: [&[f32]; GROUP] =
                std::array::from_fn(|g| &x[(t + g) * cols..(t + g + 1) * cols]);
            out[t..t + GROUP].copy_from_slice(&self.dot(row, xs, cols));
            t += GROUP;
        }
        while t + 4 <= n {
            let xs: [&[f32]; 4] = std::array::from_fn(|g| &x[(t + g) * cols..(t + g + 1) * cols]);
            out[t..t + 4].copy_from_slice(&self.dot(row, xs, cols));
            t += 4;
        }
        while t < n {
            out[t] = self.dot(row, [&x[t * cols..(t + 1) * cols]], cols)[0];
            t += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn data(cols: usize, n: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
        let w: Vec<u8> = (0..cols)
            .flat_map(|_| {
                crate::model::synth::f32_to_bf16(rng.gen_range(-1.0f32..1.0)).to_le_bytes()
            })
            .collect();
        let x = (0..n * cols).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
        (w, x)
    }

    #[test]
    fn matches_f64_reference() {
        for cols in [1, 31, 32, 33, 576, 688] {
            let (w, x) = data(cols, 1, cols as u64);
            let got = dot_group_portable(&w, [&x[..]], cols)[0] as f64;
            let want: f64 = (0..cols).map(|k| bf16_at(&w, k) as f64 * x[k] as f64).sum();
            assert!(
                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                "cols {cols}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn grouping_and_simd_do_not_change_bits() {
        let kinds = [KernelKind::Portable, KernelKind::detect()];
        for cols in [7, 32, 100, 576, 688, 1536] {
            let n = 11;
            let (w, x) = data(cols, n, 7 + cols as u64);
            let single: Vec<u32> = (0..n)
                .map(|t| dot_group_portable(&w, [&x[t * cols..(t + 1) * cols]], cols)[0].to_bits())
                .collect();
            for kind in kinds {
                let mut out = vec![0f32; n];
                kind.dot_row(&w, &x, cols, &mut out);
                let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                assert_eq!(bits, single, "{kind:?}, cols {cols}");
            }
        }
    }
}
