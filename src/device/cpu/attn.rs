//! Causal grouped-query attention of the CPU backend, flash style: an online softmax over blocks
//! of [`KEY_BLOCK`] keys, so every key and value row is read once per tile of query rows and the
//! scores of a block never leave the registers.
//!
//! The arithmetic of one (query token, head) pair is fixed by its own positions alone, whatever
//! tile, batch or prefill chunk it runs in, and whether the AVX-512 kernel or the portable one
//! runs (the same operations on the same lanes: a unit test checks the bits). For a query that
//! attends to positions `0..P`, key block `b` covers positions `16b..16b + 16` (the last one cut
//! at `P`), and with `m = −∞`, `l = 0` (16 lanes) and `o = 0` (`head_dim` wide):
//!
//! 1. lane `j` of the scores: `s_j = (Σ_d q_d · k_{16b+j, d}) · scale`, the sum a chain of fused
//!    multiply-adds over `d` in order; lanes past `P` are `−∞`;
//! 2. `m' = max(m, max_j s_j)`, `α = exp(m − m')`, `p_j = exp(s_j − m')` ([`exp16`]);
//! 3. `l_j ← fma(l_j, α, p_j)`, `o ← o · α`, then `o ← fma(p_j, v_j, o)` for `j` in order;
//!
//! and at the end `out = o / Σ l` (the lanes of `l` summed by the tree `i + 8`, `+ 4`, `+ 2`,
//! `+ 1`). Keys `k` and values `v` are the cache's BF16, widened exactly to f32 as they are
//! loaded; every operation above is f32.
//!
//! When a block does not move the maximum (most blocks of a long prompt), `α = exp(0)` is exactly
//! 1, so `fma(l_j, 1, p_j) = l_j + p_j` and `o · 1 = o`: every kernel skips that exponential and
//! the rescaling of `o`, and the bits stay those of the steps above.

use rayon::prelude::*;

use super::kernel::KernelKind;
use crate::model::weights::bf16_to_f32;

/// Keys per block of the online softmax, and positions per block of the KV cache: one score per
/// lane of an AVX-512 register.
pub const KEY_BLOCK: usize = 16;

/// One query token's view of the paged KV cache for a layer: position `j` lives in block
/// `j / KEY_BLOCK`, at `j % KEY_BLOCK` within it.
///
/// Keys and values are BF16 bits, widened exactly to f32 (`bits << 16`) as they are loaded.
/// A key block is laid out column-major, `[kv_dim][KEY_BLOCK]` (element `c` of position `j` at
/// `c · KEY_BLOCK + j`), so the 16 keys' element `d` is one vector load (16 BF16, 32 bytes);
/// a value block is row-major, `[KEY_BLOCK][kv_dim]`.
pub struct AttnQuery<'a> {
    /// Per block, `kv_dim × KEY_BLOCK` keys (BF16).
    pub keys: Vec<&'a [u16]>,
    /// Per block, `KEY_BLOCK × kv_dim` values (BF16).
    pub values: Vec<&'a [u16]>,
    /// Positions attended to (`0..positions`).
    pub positions: usize,
}

/// Query tokens per attention task. The tokens of a prompt read the same key and value blocks, so
/// a tile of them (× the query heads of one key/value head) uses each block it loads many times
/// while it is in L1, instead of every (token, head) pair streaming the whole cache again.
const ATTN_TILE: usize = 8;

/// Head counts and width of an attention call.
#[derive(Clone, Copy)]
pub struct AttnShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (query head `h` reads key/value head `h / (heads / kv_heads)`).
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
}

/// Causal grouped-query attention for a set of query tokens: `q` is `n × heads × head_dim`
/// (already rotated), `out` the same shape, `queries[t]` token `t`'s keys and values.
///
/// Parallel over (tile of [`ATTN_TILE`] tokens, key/value head); the arithmetic of each (token,
/// head) pair is the module's, whatever tile it lands in.
pub fn attention(
    kind: KernelKind,
    q: &[f32],
    queries: &[AttnQuery<'_>],
    shape: AttnShape,
    out: &mut [f32],
) {
    let AttnShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    let group = heads / kv_heads;
    let n = queries.len();
    let task = |i: usize| attention_task(kind, q, queries, shape, i);
    let tasks = n.div_ceil(ATTN_TILE) * kv_heads;
    // Threads only pay off past a few hundred thousand multiply-adds (long prompts, big
    // batches); a decode step of a short sequence runs inline.
    let work: usize = queries
        .iter()
        .map(|qr| qr.positions * kv_heads * head_dim)
        .sum::<usize>()
        * group;
    let outs: Vec<Vec<f32>> = if work < 1 << 18 {
        (0..tasks).map(task).collect()
    } else {
        (0..tasks).into_par_iter().map(task).collect()
    };
    for (i, o) in outs.iter().enumerate() {
        let (t0, g) = ((i / kv_heads) * ATTN_TILE, i % kv_heads);
        for (r, src) in o.chunks_exact(group * head_dim).enumerate() {
            let at = ((t0 + r) * heads + g * group) * head_dim;
            out[at..at + group * head_dim].copy_from_slice(src);
        }
    }
}

/// The running state of one (token, head) pair: the maximum so far, the 16 lanes of the sum of
/// weights, the unnormalised output.
struct RowState {
    m: f32,
    l: [f32; KEY_BLOCK],
    o: Vec<f32>,
}

/// One task of [`attention`] (tile `i / kv_heads`, key/value head `i % kv_heads`); returns its
/// outputs, `[token in tile][head in group][head_dim]`.
fn attention_task(
    kind: KernelKind,
    q: &[f32],
    queries: &[AttnQuery<'_>],
    shape: AttnShape,
    i: usize,
) -> Vec<f32> {
    let AttnShape {
        heads,
        kv_heads,
        head_dim: hd,
    } = shape;
    let group = heads / kv_heads;
    let kv_dim = kv_heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let n = queries.len();
    let (t0, g) = ((i / kv_heads) * ATTN_TILE, i % kv_heads);
    let tile = &queries[t0..(t0 + ATTN_TILE).min(n)];
    let mut rows: Vec<RowState> = (0..tile.len() * group)
        .map(|_| RowState {
            m: f32::NEG_INFINITY,
            l: [0.0; KEY_BLOCK],
            o: vec![0.0; hd],
        })
        .collect();
    let blocks = tile
        .iter()
        .map(|x| x.positions.div_ceil(KEY_BLOCK))
        .max()
        .unwrap_or(0);
    let update = block_update_for(kind, hd);
    let qs: Vec<&[f32]> = (0..rows.len())
        .map(|r| {
            let idx = (t0 + r / group) * heads + g * group + r % group;
            &q[idx * hd..(idx + 1) * hd]
        })
        .collect();
    let mut valid = vec![0usize; rows.len()];
    for b in 0..blocks {
        // Runs of consecutive tokens that read this same block (a prompt's tokens): their rows
        // share every key and value load.
        let mut ti = 0;
        while ti < tile.len() {
            let kv = &tile[ti];
            if b * KEY_BLOCK >= kv.positions {
                ti += 1;
                continue;
            }
            let block = kv.keys[b].as_ptr();
            let mut end = ti;
            while end < tile.len()
                && b * KEY_BLOCK < tile[end].positions
                && std::ptr::eq(tile[end].keys[b].as_ptr(), block)
            {
                let v = (tile[end].positions - b * KEY_BLOCK).min(KEY_BLOCK);
                valid[end * group..(end + 1) * group].fill(v);
                end += 1;
            }
            let kt = &kv.keys[b][g * hd * KEY_BLOCK..(g + 1) * hd * KEY_BLOCK];
            let vb = &kv.values[b][g * hd..];
            let r = ti * group..end * group;
            update(
                &qs[r.clone()],
                &valid[r.clone()],
                kt,
                vb,
                kv_dim,
                scale,
                &mut rows[r],
            );
            ti = end;
        }
    }
    let mut out = Vec::with_capacity(rows.len() * hd);
    for r in &rows {
        let l = sum16(&r.l);
        out.extend(r.o.iter().map(|&o| o / l));
    }
    out
}

/// One block of the online softmax for rows that read the same key block: `qs[r]` row `r`'s
/// query (`hd` wide), `valid[r]` its positions in the block (at least 1), `kt` the block's keys
/// of this head (`hd × KEY_BLOCK`), `vb` its values from this head's first column on (row `j` at
/// `j · kv_dim`), `st[r]` row `r`'s state.
type BlockUpdate = fn(&[&[f32]], &[usize], &[u16], &[u16], usize, f32, &mut [RowState]);

/// The fastest [`BlockUpdate`] for a kernel choice and head width.
fn block_update_for(kind: KernelKind, hd: usize) -> BlockUpdate {
    #[cfg(target_arch = "x86_64")]
    {
        if kind == KernelKind::Avx512 && hd.is_multiple_of(KEY_BLOCK) {
            return match hd / KEY_BLOCK {
                4 => rows_avx512::<4, ROWS_64>,
                8 => rows_avx512::<8, ROWS_128>,
                _ => rows_avx512_any,
            };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return rows_fma;
        }
    }
    let _ = (kind, hd);
    rows_portable
}

/// Rows per call of the AVX-512 block update for heads of 64 (a tile of 8 tokens × 3 query
/// heads per key/value head in SmolLM2 is 4 calls): 6 independent score chains hide the latency
/// of the fused multiply-adds better than 4; 8 spill registers.
#[cfg(target_arch = "x86_64")]
const ROWS_64: usize = 6;
/// Rows per call for heads of 128 (Llama's 8 tokens × 4 query heads are 8 calls): 4 score
/// chains instead of the 2 that fit before the value pass went 64 columns at a time.
#[cfg(target_arch = "x86_64")]
const ROWS_128: usize = 4;

/// [`exp16`]'s constants (Cephes `expf`): `ln 2` in two parts, the polynomial of `e^r` on
/// `|r| ≤ ln 2 / 2`, and the range where `e^x` is a normal f32.
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];
const EXP_LO: f32 = -87.336_54;
const EXP_CLAMP: f32 = 88.0;

/// `e^x` of one lane, within about 2 ulp, exactly as every lane of the vector versions: clamp to
/// `±88`, `n = round_even(x · log2 e)`, `r = fma(−n, ln2_lo, fma(−n, ln2_hi, x))`, the polynomial
/// by Horner with fused multiply-adds, `y = fma(y, r², r) + 1`, times `2ⁿ`; 0 below the normal
/// range (and for `−∞`).
#[inline(always)]
fn exp1(x: f32) -> f32 {
    let xc = x.clamp(-EXP_CLAMP, EXP_CLAMP);
    let n = (xc * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_HI, xc);
    let r = (-n).mul_add(LN2_LO, r);
    let mut y = EXP_P[0];
    for &c in &EXP_P[1..] {
        y = y.mul_add(r, c);
    }
    let y = y.mul_add(r * r, r) + 1.0;
    let pow = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < EXP_LO {
        0.0
    } else {
        y * pow
    }
}

/// Sums 16 lanes by the tree `i + 8`, `+ 4`, `+ 2`, `+ 1`.
#[inline(always)]
fn sum16(a: &[f32; KEY_BLOCK]) -> f32 {
    let mut b = [0f32; 8];
    for i in 0..8 {
        b[i] = a[i] + a[i + 8];
    }
    let c = [b[0] + b[4], b[1] + b[5], b[2] + b[6], b[3] + b[7]];
    let d = [c[0] + c[2], c[1] + c[3]];
    d[0] + d[1]
}

/// The portable [`BlockUpdate`]: the module's arithmetic lane by lane. When a block does not
/// move the maximum, `α = exp(0)` is exactly 1, so `l ← fma(l, 1, p) = l + p` and `o · 1 = o`:
/// the exponential and the rescaling are skipped, the bits are the same.
#[inline(always)]
fn block_update_body(
    q: &[f32],
    kt: &[u16],
    vb: &[u16],
    kv_dim: usize,
    valid: usize,
    scale: f32,
    st: &mut RowState,
) {
    let hd = q.len();
    let mut s = [0f32; KEY_BLOCK];
    for (d, &qd) in q.iter().enumerate() {
        let k = &kt[d * KEY_BLOCK..(d + 1) * KEY_BLOCK];
        for j in 0..KEY_BLOCK {
            s[j] = qd.mul_add(bf16_to_f32(k[j]), s[j]);
        }
    }
    for (j, x) in s.iter_mut().enumerate() {
        *x = if j < valid {
            *x * scale
        } else {
            f32::NEG_INFINITY
        };
    }
    let bmax = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let m = st.m.max(bmax);
    let alpha = (m != st.m).then(|| exp1(st.m - m));
    st.m = m;
    let mut p = [0f32; KEY_BLOCK];
    for j in 0..KEY_BLOCK {
        p[j] = exp1(s[j] - m);
        st.l[j] = match alpha {
            Some(a) => st.l[j].mul_add(a, p[j]),
            None => st.l[j] + p[j],
        };
    }
    if let Some(a) = alpha {
        for o in st.o.iter_mut() {
            *o *= a;
        }
    }
    for (j, &pj) in p.iter().enumerate().take(valid) {
        let v = &vb[j * kv_dim..j * kv_dim + hd];
        for (o, &vd) in st.o.iter_mut().zip(v) {
            *o = pj.mul_add(bf16_to_f32(vd), *o);
        }
    }
}

fn rows_portable(
    qs: &[&[f32]],
    valid: &[usize],
    kt: &[u16],
    vb: &[u16],
    kv_dim: usize,
    scale: f32,
    st: &mut [RowState],
) {
    for ((q, &v), s) in qs.iter().zip(valid).zip(st) {
        block_update_body(q, kt, vb, kv_dim, v, scale, s);
    }
}

/// [`rows_portable`] compiled with AVX2 and FMA (the same operations; `mul_add` becomes one
/// instruction instead of a library call).
#[cfg(target_arch = "x86_64")]
fn rows_fma(
    qs: &[&[f32]],
    valid: &[usize],
    kt: &[u16],
    vb: &[u16],
    kv_dim: usize,
    scale: f32,
    st: &mut [RowState],
) {
    #[target_feature(enable = "avx2,fma")]
    fn inner(
        qs: &[&[f32]],
        valid: &[usize],
        kt: &[u16],
        vb: &[u16],
        kv_dim: usize,
        scale: f32,
        st: &mut [RowState],
    ) {
        for ((q, &v), s) in qs.iter().zip(valid).zip(st) {
            block_update_body(q, kt, vb, kv_dim, v, scale, s);
        }
    }
    // SAFETY: chosen by `block_update_for` only when the CPU has AVX2 and FMA.
    unsafe { inner(qs, valid, kt, vb, kv_dim, scale, st) }
}

/// The AVX-512 [`BlockUpdate`] for heads of `16 V` (`V` a multiple of 4): rows `R` at a time
/// (their score chains and value loads interleaved), the rest two, then one, at a time.
#[cfg(target_arch = "x86_64")]
fn rows_avx512<const V: usize, const R: usize>(
    qs: &[&[f32]],
    valid: &[usize],
    kt: &[u16],
    vb: &[u16],
    kv_dim: usize,
    scale: f32,
    st: &mut [RowState],
) {
    let n = qs.len();
    assert!(V.is_multiple_of(4));
    assert!(valid.len() == n && st.len() == n && kt.len() >= 16 * V * KEY_BLOCK);
    for r in 0..n {
        assert!(qs[r].len() == 16 * V && st[r].o.len() == 16 * V && valid[r] >= 1);
        assert!(vb.len() >= (valid[r] - 1) * kv_dim + 16 * V);
    }
    let mut r = 0;
    while r + R <= n {
        // SAFETY: chosen by `block_update_for` only for the AVX-512 kernel kind (which
        // `KernelKind` hands out only on CPUs with AVX-512F/DQ); shapes checked above.
        unsafe {
            avx512::block_update::<V, R>(
                &qs[r..r + R],
                &valid[r..r + R],
                kt,
                vb,
                kv_dim,
                scale,
                &mut st[r..r + R],
            )
        };
        r += R;
    }
    while r + 2 <= n {
        // SAFETY: as above.
        unsafe {
            avx512::block_update::<V, 2>(
                &qs[r..r + 2],
                &valid[r..r + 2],
                kt,
                vb,
                kv_dim,
                scale,
                &mut st[r..r + 2],
            )
        };
        r += 2;
    }
    for r in r..n {
        // SAFETY: as above.
        unsafe {
            avx512::block_update::<V, 1>(
                &qs[r..r + 1],
                &valid[r..r + 1],
                kt,
                vb,
                kv_dim,
                scale,
                &mut st[r..r + 1],
            )
        };
    }
}

/// The AVX-512 [`BlockUpdate`] for any head width that is a multiple of 16, one row at a time.
#[cfg(target_arch = "x86_64")]
fn rows_avx512_any(
    qs: &[&[f32]],
    valid: &[usize],
    kt: &[u16],
    vb: &[u16],
    kv_dim: usize,
    scale: f32,
    st: &mut [RowState],
) {
    for ((q, &v), s) in qs.iter().zip(valid).zip(st) {
        let hd = q.len();
        assert!(hd.is_multiple_of(16) && s.o.len() == hd && kt.len() >= hd * KEY_BLOCK && v >= 1);
        assert!(vb.len() >= (v - 1) * kv_dim + hd);
        // SAFETY: as `rows_avx512`; shapes checked just above.
        unsafe { avx512::block_update_any(q, kt, vb, kv_dim, v, scale, s) };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The AVX-512 [`super::BlockUpdate`]: one key block's 16 scores in one register.
    // Rows, lanes and output registers are indexed together, as in the kernel's description.
    #![allow(clippy::needless_range_loop)]

    use std::arch::x86_64::*;

    /// Output registers per row in the value pass of [`block_update`] (64 columns).
    const PV_REGS: usize = 4;

    use super::{RowState, EXP_CLAMP, EXP_LO, EXP_P, KEY_BLOCK, LN2_HI, LN2_LO, LOG2E};

    /// 16 BF16 elements from `p` widened exactly to f32: one zero-extend, one shift.
    ///
    /// # Safety
    /// `p` must point to 16 readable `u16`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    unsafe fn load16(p: *const u16) -> __m512 {
        // SAFETY: 32 readable bytes at `p` (the caller's contract); unaligned load.
        let h = unsafe { _mm256_loadu_si256(p.cast::<__m256i>()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    /// [`super::exp1`] on 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    fn exp16(x: __m512) -> __m512 {
        let xc = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-EXP_CLAMP)),
            _mm512_set1_ps(EXP_CLAMP),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(xc, _mm512_set1_ps(LOG2E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), xc);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut y = _mm512_set1_ps(EXP_P[0]);
        for &c in &EXP_P[1..] {
            y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(
            _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        let res = _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
        // Lanes at or above the normal range keep the result (`x ≥ EXP_LO`, false for NaN).
        let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(EXP_LO));
        _mm512_maskz_mov_ps(keep, res)
    }

    /// The scores, the new maximum and weights, and the sum lanes of a block; returns
    /// `(α, p)` for the output update. `kt` must hold `q.len() × 16` keys (checked).
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    fn scores(
        q: &[f32],
        kt: &[u16],
        valid: usize,
        scale: f32,
        st: &mut RowState,
    ) -> (Option<__m512>, [f32; KEY_BLOCK]) {
        let hd = q.len();
        assert!(kt.len() >= hd * KEY_BLOCK);
        let mut s = _mm512_setzero_ps();
        for d in 0..hd {
            // SAFETY: d < hd and kt holds hd × 16 keys.
            s = unsafe {
                _mm512_fmadd_ps(
                    _mm512_set1_ps(*q.get_unchecked(d)),
                    load16(kt.as_ptr().add(d * KEY_BLOCK)),
                    s,
                )
            };
        }
        softmax_step(s, valid, scale, st)
    }

    /// Scales and masks a block's raw scores (lanes from `valid` on become `−∞`), moves the
    /// row's maximum and sum lanes on; returns `(α, p)` for the output update, `α` `None` when
    /// the maximum did not move (it would be exactly 1; see [`super::block_update_body`]).
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    fn softmax_step(
        s: __m512,
        valid: usize,
        scale: f32,
        st: &mut RowState,
    ) -> (Option<__m512>, [f32; KEY_BLOCK]) {
        let live: __mmask16 = if valid >= KEY_BLOCK {
            0xffff
        } else {
            (1u16 << valid) - 1
        };
        let s = _mm512_mask_blend_ps(
            live,
            _mm512_set1_ps(f32::NEG_INFINITY),
            _mm512_mul_ps(s, _mm512_set1_ps(scale)),
        );
        let m = st.m.max(_mm512_reduce_max_ps(s));
        let alpha = (m != st.m).then(|| exp16(_mm512_set1_ps(st.m - m)));
        st.m = m;
        let p = exp16(_mm512_sub_ps(s, _mm512_set1_ps(m)));
        // SAFETY: `l` is 16 floats.
        unsafe {
            let l = _mm512_loadu_ps(st.l.as_ptr());
            let l = match alpha {
                Some(a) => _mm512_fmadd_ps(l, a, p),
                None => _mm512_add_ps(l, p),
            };
            _mm512_storeu_ps(st.l.as_mut_ptr(), l);
        }
        let mut pa = [0f32; KEY_BLOCK];
        // SAFETY: `pa` is 16 floats.
        unsafe { _mm512_storeu_ps(pa.as_mut_ptr(), p) };
        (alpha, pa)
    }

    /// The block update for `R` rows with heads of `16 V` elements: the rows' score chains
    /// share each key load, their outputs stay in `R × V` registers and share each value load;
    /// every row's operations are those of a row alone, in the same order.
    ///
    /// # Safety
    /// The CPU must have AVX-512F/DQ and FMA; `qs`, `valid`, `st` hold `R` rows, every query
    /// and output `16 V` floats, `valid[r] ≥ 1`, `kt` holds `16 V × 16` keys and `vb` row
    /// `valid[r] − 1` of every row (`(valid[r] − 1) · kv_dim + 16 V` values).
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    pub unsafe fn block_update<const V: usize, const R: usize>(
        qs: &[&[f32]],
        valid: &[usize],
        kt: &[u16],
        vb: &[u16],
        kv_dim: usize,
        scale: f32,
        st: &mut [RowState],
    ) {
        let hd = 16 * V;
        let mut s = [_mm512_setzero_ps(); R];
        for d in 0..hd {
            // SAFETY: d < hd; kt holds hd × 16 keys and every query hd (the contract).
            unsafe {
                let k = load16(kt.as_ptr().add(d * KEY_BLOCK));
                for r in 0..R {
                    let qd = _mm512_set1_ps(*qs.get_unchecked(r).get_unchecked(d));
                    s[r] = _mm512_fmadd_ps(qd, k, s[r]);
                }
            }
        }
        let mut alpha = [None; R];
        let mut p = [[0f32; KEY_BLOCK]; R];
        for r in 0..R {
            (alpha[r], p[r]) = softmax_step(s[r], valid[r], scale, &mut st[r]);
        }
        let shared = valid[..R].iter().copied().min().unwrap_or(0);
        // The outputs 64 columns (4 registers) at a time, so that `R × 4` accumulators fit
        // whatever the head width.
        for c0 in (0..V).step_by(PV_REGS) {
            // SAFETY: outputs are 16 V floats (V a multiple of PV_REGS); value rows below
            // `valid[r]` as the caller promised.
            unsafe {
                let mut o: [[__m512; PV_REGS]; R] = std::array::from_fn(|r| {
                    let op = st[r].o.as_ptr().add(16 * c0);
                    std::array::from_fn(|c| {
                        let x = _mm512_loadu_ps(op.add(16 * c));
                        match alpha[r] {
                            Some(a) => _mm512_mul_ps(x, a),
                            None => x,
                        }
                    })
                });
                for j in 0..shared {
                    let vp = vb.as_ptr().add(j * kv_dim + 16 * c0);
                    let pj: [__m512; R] = std::array::from_fn(|r| _mm512_set1_ps(p[r][j]));
                    for c in 0..PV_REGS {
                        let v = load16(vp.add(16 * c));
                        for r in 0..R {
                            o[r][c] = _mm512_fmadd_ps(pj[r], v, o[r][c]);
                        }
                    }
                }
                for r in 0..R {
                    for j in shared..valid[r] {
                        let vp = vb.as_ptr().add(j * kv_dim + 16 * c0);
                        let pj = _mm512_set1_ps(p[r][j]);
                        for c in 0..PV_REGS {
                            o[r][c] = _mm512_fmadd_ps(pj, load16(vp.add(16 * c)), o[r][c]);
                        }
                    }
                    let op = st[r].o.as_mut_ptr().add(16 * c0);
                    for c in 0..PV_REGS {
                        _mm512_storeu_ps(op.add(16 * c), o[r][c]);
                    }
                }
            }
        }
    }

    /// [`block_update`] for any head width that is a multiple of 16 (the output goes through
    /// memory, 16 lanes at a time, in the same order per lane).
    ///
    /// # Safety
    /// As [`block_update`], with `q.len()` a multiple of 16.
    #[target_feature(enable = "avx512f,avx512dq,fma")]
    pub unsafe fn block_update_any(
        q: &[f32],
        kt: &[u16],
        vb: &[u16],
        kv_dim: usize,
        valid: usize,
        scale: f32,
        st: &mut RowState,
    ) {
        let hd = q.len();
        debug_assert!(hd.is_multiple_of(16) && st.o.len() == hd);
        debug_assert!(valid == 0 || vb.len() >= (valid - 1) * kv_dim + hd);
        let (alpha, p) = scores(q, kt, valid, scale, st);
        let op = st.o.as_mut_ptr();
        for c in (0..hd).step_by(16) {
            // SAFETY: c + 16 <= hd, inside `o` and every value row.
            unsafe {
                let mut oc = _mm512_loadu_ps(op.add(c));
                if let Some(a) = alpha {
                    oc = _mm512_mul_ps(oc, a);
                }
                for (j, &pj) in p.iter().enumerate().take(valid) {
                    let v = load16(vb.as_ptr().add(j * kv_dim + c));
                    oc = _mm512_fmadd_ps(_mm512_set1_ps(pj), v, oc);
                }
                _mm512_storeu_ps(op.add(c), oc);
            }
        }
    }

    #[cfg(test)]
    pub fn exp16_of(x: &[f32; 16]) -> [f32; 16] {
        let mut out = [0f32; 16];
        // SAFETY: only called by tests that checked AVX-512 first.
        unsafe {
            #[target_feature(enable = "avx512f,avx512dq,fma")]
            unsafe fn run(x: &[f32; 16], out: &mut [f32; 16]) {
                unsafe { _mm512_storeu_ps(out.as_mut_ptr(), exp16(_mm512_loadu_ps(x.as_ptr()))) }
            }
            run(x, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synth::f32_to_bf16;
    use rand::{Rng, SeedableRng};

    /// BF16 NaN: fills the cache rows past the end (never to be read).
    const NAN16: u16 = 0x7fc0;

    /// A sequence's keys and values, row-major (`positions × kv_dim`, f32 values that BF16 holds
    /// exactly), and as the cache holds them: BF16, cut into blocks in the layouts of
    /// [`AttnQuery`], rows past the end NaN.
    struct Seq {
        keys: Vec<Vec<u16>>,
        values: Vec<Vec<u16>>,
        rows_k: Vec<Vec<f32>>,
        rows_v: Vec<Vec<f32>>,
    }

    impl Seq {
        fn random(rng: &mut impl Rng, positions: usize, kv_dim: usize) -> Self {
            let mut row = || -> Vec<f32> {
                (0..kv_dim)
                    .map(|_| bf16_to_f32(f32_to_bf16(rng.gen_range(-2.0..2.0))))
                    .collect()
            };
            let rows_k: Vec<Vec<f32>> = (0..positions).map(|_| row()).collect();
            let rows_v: Vec<Vec<f32>> = (0..positions).map(|_| row()).collect();
            let blocks = positions.div_ceil(KEY_BLOCK);
            let mut keys = vec![vec![NAN16; kv_dim * KEY_BLOCK]; blocks];
            let mut values = vec![vec![NAN16; kv_dim * KEY_BLOCK]; blocks];
            for p in 0..positions {
                let (b, j) = (p / KEY_BLOCK, p % KEY_BLOCK);
                for c in 0..kv_dim {
                    keys[b][c * KEY_BLOCK + j] = f32_to_bf16(rows_k[p][c]);
                    values[b][j * kv_dim + c] = f32_to_bf16(rows_v[p][c]);
                }
            }
            Self {
                keys,
                values,
                rows_k,
                rows_v,
            }
        }

        fn view(&self, positions: usize) -> AttnQuery<'_> {
            AttnQuery {
                keys: self.keys.iter().map(Vec::as_slice).collect(),
                values: self.values.iter().map(Vec::as_slice).collect(),
                positions,
            }
        }
    }

    /// Textbook softmax attention in f64, one (token, head) pair at a time.
    fn reference(q: &[f32], seqs: &[(&Seq, usize)], shape: AttnShape) -> Vec<f64> {
        let AttnShape {
            heads,
            kv_heads,
            head_dim: hd,
        } = shape;
        let group = heads / kv_heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = vec![0f64; q.len()];
        for (idx, o) in out.chunks_mut(hd).enumerate() {
            let (seq, positions) = seqs[idx / heads];
            let off = (idx % heads / group) * hd;
            let qa = &q[idx * hd..(idx + 1) * hd];
            let s: Vec<f64> = (0..positions)
                .map(|j| {
                    let k = &seq.rows_k[j][off..off + hd];
                    qa.iter()
                        .zip(k)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (j, w) in e.iter().enumerate() {
                for (a, &b) in o.iter_mut().zip(&seq.rows_v[j][off..off + hd]) {
                    *a += w / sum * b as f64;
                }
            }
        }
        out
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn kinds() -> Vec<KernelKind> {
        let mut k = vec![KernelKind::Portable];
        if KernelKind::detect() == KernelKind::Avx512 {
            k.push(KernelKind::Avx512);
        } else {
            eprintln!("skipped: this CPU has no AVX-512, only the portable attention is checked");
        }
        k
    }

    #[test]
    fn exp_is_accurate_and_the_same_on_every_path() {
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(5);
        let mut xs: Vec<f32> = (0..4000).map(|_| rng.gen_range(-90.0f32..1.0)).collect();
        xs.extend([
            0.0,
            -0.0,
            -1e-30,
            f32::NEG_INFINITY,
            -87.3,
            -87.4,
            -88.0,
            -100.0,
        ]);
        // The kernels skip `o · α` and `fma(l, α, p)` when the maximum stays, which is exact only
        // because `α = exp(0)` is exactly 1.
        assert_eq!(exp1(0.0).to_bits(), 1f32.to_bits());
        for &x in &xs {
            let got = exp1(x) as f64;
            let want = (x as f64).exp();
            if x >= EXP_LO {
                assert!(
                    (got - want).abs() <= 3e-7 * want,
                    "exp({x}) = {got}, want {want}"
                );
            } else {
                assert_eq!(got, 0.0, "exp({x})");
            }
        }
        #[cfg(target_arch = "x86_64")]
        if KernelKind::detect() == KernelKind::Avx512 {
            for c in xs.chunks_exact(16) {
                let c: [f32; 16] = c.try_into().unwrap();
                assert_eq!(bits(&avx512::exp16_of(&c)), bits(&c.map(exp1)), "{c:?}");
            }
        } else {
            eprintln!("skipped: this CPU has no AVX-512, exp16 not compared");
        }
    }

    /// Three sequences in one call (a 37-token prompt, a 1-token decode at position 70, a
    /// 5-token chunk at positions 20..25): tiles cut across sequences, blocks partly filled.
    /// Every kernel gives the same bits, close to the f64 reference, and each token alone (a
    /// decode step) gives its bits in the batch.
    fn check_batch(heads: usize, kv_heads: usize, hd: usize) {
        let shape = AttnShape {
            heads,
            kv_heads,
            head_dim: hd,
        };
        let kv_dim = kv_heads * hd;
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(3);
        let seqs = [
            Seq::random(&mut rng, 37, kv_dim),
            Seq::random(&mut rng, 71, kv_dim),
            Seq::random(&mut rng, 25, kv_dim),
        ];
        let mut rows: Vec<(&Seq, usize)> = (1..=37).map(|p| (&seqs[0], p)).collect();
        rows.push((&seqs[1], 71));
        rows.extend((21..=25).map(|p| (&seqs[2], p)));
        let queries: Vec<AttnQuery<'_>> = rows.iter().map(|(s, p)| s.view(*p)).collect();
        let width = heads * hd;
        let q: Vec<f32> = (0..rows.len() * width)
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect();
        let want = reference(&q, &rows, shape);
        let mut first: Option<Vec<f32>> = None;
        for kind in kinds() {
            let mut got = vec![0f32; q.len()];
            attention(kind, &q, &queries, shape, &mut got);
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!((g as f64 - w).abs() < 1e-5, "{kind:?} [{i}]: {g} vs {w}");
            }
            match &first {
                None => first = Some(got.clone()),
                Some(f) => assert_eq!(bits(f), bits(&got), "{kind:?} vs portable"),
            }
            for t in [0, 15, 16, 36, 37, 40] {
                let mut alone = vec![0f32; width];
                let one = [rows[t].0.view(rows[t].1)];
                attention(
                    kind,
                    &q[t * width..(t + 1) * width],
                    &one,
                    shape,
                    &mut alone,
                );
                assert_eq!(
                    bits(&alone),
                    bits(&got[t * width..(t + 1) * width]),
                    "{kind:?} token {t}"
                );
            }
        }
    }

    #[test]
    fn batched_attention_matches_f64_and_every_token_alone() {
        // SmolLM2's shape (heads of 64: the register kernel, 4 rows at a time), Llama's heads of
        // 128 (2 rows at a time), heads of 32 (the any-width AVX-512 kernel) and of 8 (the
        // portable one only).
        check_batch(6, 2, 64);
        check_batch(4, 1, 128);
        check_batch(4, 2, 32);
        check_batch(6, 3, 8);
    }

    #[test]
    fn attention_over_one_position_returns_its_value() {
        // 2 query heads share 1 kv head; a single cached position: softmax weight 1.
        let seq = Seq {
            keys: vec![{
                let mut k = vec![NAN16; 2 * KEY_BLOCK];
                k[0] = f32_to_bf16(0.3);
                k[KEY_BLOCK] = f32_to_bf16(-0.2);
                k
            }],
            values: vec![{
                let mut v = vec![NAN16; 2 * KEY_BLOCK];
                v[..2].copy_from_slice(&[f32_to_bf16(5.0), f32_to_bf16(7.0)]);
                v
            }],
            rows_k: Vec::new(),
            rows_v: Vec::new(),
        };
        let shape = AttnShape {
            heads: 2,
            kv_heads: 1,
            head_dim: 2,
        };
        for kind in kinds() {
            let mut out = [0f32; 4];
            attention(
                kind,
                &[1.0, 2.0, -1.0, 0.5],
                &[seq.view(1)],
                shape,
                &mut out,
            );
            assert_eq!(out, [5.0, 7.0, 5.0, 7.0]);
        }
    }
}
