//! AVX-512 versions of the BF16 row-dot kernel: the only `unsafe` of the CPU backend.
//!
//! Each function performs exactly the arithmetic of [`super::kernel::dot_group_portable`] (same
//! fused multiply-adds on the same lanes, same reduction tree, same scalar tail), only 16 lanes
//! per instruction, so its results are bit-identical to the portable kernel's; a unit test
//! checks that on random data.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::kernel::LANES;

/// Whether this CPU runs the kernels of this file (checked once, cached by `std`).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[g] = Σ_k bf16(w[k]) · xs[g][k]` for `G` token vectors, as in
/// [`super::kernel::dot_group_portable`].
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512DQ ([`available`]); `w` must hold at least
/// `2 × cols` bytes and every `xs[g]` at least `cols` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,fma")]
pub unsafe fn dot_group<const G: usize>(w: &[u8], xs: [&[f32]; G], cols: usize) -> [f32; G] {
    debug_assert!(w.len() >= 2 * cols && xs.iter().all(|x| x.len() >= cols));
    let full = cols / LANES * LANES;
    let mut lo = [_mm512_setzero_ps(); G];
    let mut hi = [_mm512_setzero_ps(); G];
    let wp = w.as_ptr();
    let mut k = 0;
    while k < full {
        // SAFETY: k + 32 <= cols, so the 64 bytes at 2k are inside `w`, and the 32 floats at k
        // inside every `xs[g]` (the caller's contract).
        unsafe {
            let raw = _mm512_loadu_si512(wp.add(2 * k) as *const _);
            let w0 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm512_castsi512_si256(raw),
            )));
            let w1 = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm512_extracti64x4_epi64::<1>(raw),
            )));
            for g in 0..G {
                let xp = xs[g].as_ptr().add(k);
                lo[g] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), lo[g]);
                hi[g] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), hi[g]);
            }
        }
        k += LANES;
    }
    let mut out = [0f32; G];
    for g in 0..G {
        // The reduction tree of `kernel::reduce`: lane i + lane i+16, then +8, +4, +2, +1.
        let v = _mm512_add_ps(lo[g], hi[g]);
        let c = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
        let d = _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps::<1>(c));
        let e = _mm_add_ps(d, _mm_movehl_ps(d, d));
        let s = _mm_cvtss_f32(_mm_add_ss(e, _mm_shuffle_ps::<1>(e, e)));
        out[g] = super::kernel::tail(w, xs[g], full, cols, s);
    }
    out
}

/// `out[r][g] = Σ_k bf16(ws[r][k]) · xs[g][k]` for `R` rows and `G` token vectors at once, each
/// product with exactly the arithmetic of [`dot_group`] (its own two accumulators, the same
/// reduction tree and tail); sharing the loads of one pass between several rows and tokens is
/// what makes a prompt's matrix product run at the speed of the FMA units rather than the loads.
///
/// # Safety
/// As [`dot_group`], for every row of `ws`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,fma")]
pub unsafe fn dot_block<const R: usize, const G: usize>(
    ws: [&[u8]; R],
    xs: [&[f32]; G],
    cols: usize,
) -> [[f32; G]; R] {
    debug_assert!(ws.iter().all(|w| w.len() >= 2 * cols) && xs.iter().all(|x| x.len() >= cols));
    let full = cols / LANES * LANES;
    let mut lo = [[_mm512_setzero_ps(); G]; R];
    let mut hi = [[_mm512_setzero_ps(); G]; R];
    let mut k = 0;
    while k < full {
        // SAFETY: as in `dot_group`, for every row and token vector.
        unsafe {
            let mut w0 = [_mm512_setzero_ps(); R];
            let mut w1 = [_mm512_setzero_ps(); R];
            for r in 0..R {
                let raw = _mm512_loadu_si512(ws[r].as_ptr().add(2 * k) as *const _);
                w0[r] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm512_castsi512_si256(raw),
                )));
                w1[r] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm512_extracti64x4_epi64::<1>(raw),
                )));
            }
            for g in 0..G {
                let xp = xs[g].as_ptr().add(k);
                let (x0, x1) = (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)));
                for r in 0..R {
                    lo[r][g] = _mm512_fmadd_ps(w0[r], x0, lo[r][g]);
                    hi[r][g] = _mm512_fmadd_ps(w1[r], x1, hi[r][g]);
                }
            }
        }
        k += LANES;
    }
    let mut out = [[0f32; G]; R];
    for r in 0..R {
        for g in 0..G {
            let v = _mm512_add_ps(lo[r][g], hi[r][g]);
            let c = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
            let d = _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps::<1>(c));
            let e = _mm_add_ps(d, _mm_movehl_ps(d, d));
            let s = _mm_cvtss_f32(_mm_add_ss(e, _mm_shuffle_ps::<1>(e, e)));
            out[r][g] = super::kernel::tail(ws[r], xs[g], full, cols, s);
        }
    }
    out
}
