//! The element-wise and attention operations of the CPU forward pass, in f32.
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

/// RMSNorm of every `width`-wide row of `x` into `out`: `x / sqrt(mean(x²) + eps) · weight`.
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f64, out: &mut [f32]) {
    let width = weight.len();
    for (xr, or) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let mean = dot(xr, xr) / width as f32;
        let inv = 1.0 / (mean + eps as f32).sqrt();
        for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * w;
        }
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
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `x += y`.
pub fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// One query token's view of the paged KV cache for a layer: position `j` is row
/// `j % block_tokens` of block `j / block_tokens`.
pub struct AttnQuery<'a> {
    /// Per block, `block_tokens × kv_heads × head_dim` keys.
    pub keys: Vec<&'a [f32]>,
    /// Per block, values laid out like the keys.
    pub values: Vec<&'a [f32]>,
    /// Positions attended to (`0..positions`).
    pub positions: usize,
    /// Positions per block.
    pub block_tokens: usize,
}

impl AttnQuery<'_> {
    /// The elements `cols` of position `j`'s row (`kv_dim` wide) in `blocks` of `block_tokens`
    /// positions: row `j % block_tokens` of block `j / block_tokens`.
    #[inline(always)]
    fn row<'b>(
        blocks: &[&'b [f32]],
        block_tokens: usize,
        j: usize,
        kv_dim: usize,
        cols: std::ops::Range<usize>,
    ) -> &'b [f32] {
        let at = (j % block_tokens) * kv_dim;
        &blocks[j / block_tokens][at + cols.start..at + cols.end]
    }
}

/// Query tokens per attention task. The tokens of a prompt read the same key and value rows, so
/// a tile of them (× the query heads of one key/value head) uses each row it loads many times
/// while it is in L1, instead of every (token, head) pair streaming the whole cache again.
const ATTN_TILE: usize = 8;

/// Causal grouped-query attention for a set of query tokens: `q` is `n × heads × head_dim`
/// (already rotated), `out` the same shape. Query head `h` reads key/value head `h / group`.
///
/// Parallel over (tile of [`ATTN_TILE`] tokens, key/value head). Each (token, head) pair's
/// arithmetic is fixed by its own positions alone, whatever the tile or batch it runs in: the
/// scores `dot(q, k_j) · scale` for `j` in order, their maximum, `exp(s_j − max)` summed in
/// order, then `o += (e_j / sum) · v_j` in order of `j` (no fused multiply-add).
pub fn attention(
    q: &[f32],
    queries: &[AttnQuery<'_>],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    out: &mut [f32],
) {
    let group = heads / kv_heads;
    let kv_dim = kv_heads * head_dim;
    let n = queries.len();
    let shape = AttnShape {
        heads,
        kv_heads,
        head_dim,
    };
    let task = |i: usize| attention_task(q, queries, shape, i);
    let tasks = n.div_ceil(ATTN_TILE) * kv_heads;
    // Threads only pay off past a few hundred thousand multiply-adds (long prompts, big
    // batches); a decode step of a short sequence runs inline.
    let work: usize = queries
        .iter()
        .map(|qr| qr.positions * kv_dim)
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

/// Head counts and width of an attention call.
#[derive(Clone, Copy)]
struct AttnShape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// One task of [`attention`] (tile `i / kv_heads`, key/value head `i % kv_heads`), compiled for
/// AVX2 when the CPU has it: the same operations in the same order, eight lanes at a time, so
/// the bits do not depend on which version runs.
fn attention_task(q: &[f32], queries: &[AttnQuery<'_>], shape: AttnShape, i: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { attention_task_avx2(q, queries, shape, i) };
        }
    }
    attention_task_body(q, queries, shape, i, dot)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attention_task_avx2(
    q: &[f32],
    queries: &[AttnQuery<'_>],
    shape: AttnShape,
    i: usize,
) -> Vec<f32> {
    // SAFETY: this function only runs on CPUs with AVX2.
    attention_task_body(q, queries, shape, i, |a, b| unsafe { dot_avx2(a, b) })
}

/// [`dot`] with AVX2 intrinsics: the eight partial sums are the lanes of one register (a
/// multiply, then an add), reduced by the same tree (`lane i + lane i+4`, then `(0+1) + (2+3)`),
/// the rest added one by one: the same bits.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let full = n / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    let mut k = 0;
    while k < full {
        // SAFETY: k + 8 <= n, inside both slices.
        unsafe {
            let x = _mm256_loadu_ps(a.as_ptr().add(k));
            let y = _mm256_loadu_ps(b.as_ptr().add(k));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(x, y));
        }
        k += 8;
    }
    // [a0+a4, a1+a5, a2+a6, a3+a7], then [(0)+(1), (2)+(3), ..], then their sum.
    let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
    let p = _mm_hadd_ps(h, h);
    let mut s = _mm_cvtss_f32(_mm_add_ss(p, _mm_movehdup_ps(p)));
    for i in full..n {
        s += a[i] * b[i];
    }
    s
}

/// The task's arithmetic; returns its outputs, `[token in tile][head in group][head_dim]`.
#[inline(always)]
fn attention_task_body(
    q: &[f32],
    queries: &[AttnQuery<'_>],
    shape: AttnShape,
    i: usize,
    dot: impl Fn(&[f32], &[f32]) -> f32,
) -> Vec<f32> {
    let AttnShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    let group = heads / kv_heads;
    let kv_dim = kv_heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let n = queries.len();
    let (t0, g) = ((i / kv_heads) * ATTN_TILE, i % kv_heads);
    let tile = &queries[t0..(t0 + ATTN_TILE).min(n)];
    let off = g * head_dim;
    let most = tile.iter().map(|x| x.positions).max().unwrap_or(0);
    let rows = tile.len() * group;
    let query = |ti: usize, hh: usize| {
        let idx = (t0 + ti) * heads + g * group + hh;
        &q[idx * head_dim..(idx + 1) * head_dim]
    };
    let mut scores = vec![0f32; rows * most];
    for j in 0..most {
        for (ti, kv) in tile.iter().enumerate() {
            if j >= kv.positions {
                continue;
            }
            let k = AttnQuery::row(&kv.keys, kv.block_tokens, j, kv_dim, off..off + head_dim);
            for hh in 0..group {
                scores[(ti * group + hh) * most + j] = dot(query(ti, hh), k) * scale;
            }
        }
    }
    let mut sums = vec![0f32; rows];
    for (row, sum) in sums.iter_mut().enumerate() {
        let s = &mut scores[row * most..row * most + tile[row / group].positions];
        let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        for x in s.iter_mut() {
            *x = (*x - max).exp();
            *sum += *x;
        }
    }
    let mut o = vec![0f32; rows * head_dim];
    for j in 0..most {
        for (ti, kv) in tile.iter().enumerate() {
            if j >= kv.positions {
                continue;
            }
            let v = AttnQuery::row(&kv.values, kv.block_tokens, j, kv_dim, off..off + head_dim);
            for hh in 0..group {
                let row = ti * group + hh;
                let p = scores[row * most + j] / sums[row];
                for (a, &b) in o[row * head_dim..(row + 1) * head_dim].iter_mut().zip(v) {
                    *a += p * b;
                }
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// One (token, head) pair at a time, in the documented order: the semantics the tiled
    /// [`attention`] must reproduce bit for bit.
    fn attention_one_by_one(
        q: &[f32],
        queries: &[AttnQuery<'_>],
        heads: usize,
        kv_heads: usize,
        hd: usize,
    ) -> Vec<f32> {
        let (group, kv_dim) = (heads / kv_heads, kv_heads * hd);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; q.len()];
        for (idx, o) in out.chunks_mut(hd).enumerate() {
            let kv = &queries[idx / heads];
            let off = (idx % heads / group) * hd;
            let row = |blocks: &[&[f32]], j: usize| {
                AttnQuery::row(blocks, kv.block_tokens, j, kv_dim, off..off + hd).to_vec()
            };
            let qa = &q[idx * hd..(idx + 1) * hd];
            let mut s: Vec<f32> = (0..kv.positions)
                .map(|j| dot(qa, &row(&kv.keys, j)) * scale)
                .collect();
            let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut sum = 0f32;
            for x in &mut s {
                *x = (*x - max).exp();
                sum += *x;
            }
            for (j, &e) in s.iter().enumerate() {
                let p = e / sum;
                for (a, b) in o.iter_mut().zip(row(&kv.values, j)) {
                    *a += p * b;
                }
            }
        }
        out
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_dot_equals_the_portable_dot_bitwise() {
        if !is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(9);
        for n in [0, 1, 7, 8, 9, 63, 64, 65, 128, 200] {
            let a: Vec<f32> = (0..n).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
            // SAFETY: AVX2 checked above.
            let fast = unsafe { dot_avx2(&a, &b) };
            assert_eq!(fast.to_bits(), dot(&a, &b).to_bits(), "n {n}");
        }
    }

    #[test]
    fn tiled_attention_equals_one_pair_at_a_time_bitwise() {
        // Three sequences (a 13-token prompt, a 1-token decode at position 40, a 5-token chunk
        // at positions 20..25) in one call: tiles cut across sequences, blocks of 16 positions
        // partly filled; 6 query heads over 2 key/value heads of 8.
        let (heads, kv_heads, hd, bt) = (6, 2, 8, 16);
        let kv_dim = kv_heads * hd;
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(3);
        let mut cache = |positions: usize| -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
            let blocks = positions.div_ceil(bt);
            let mut mk = || {
                (0..blocks)
                    .map(|_| {
                        (0..bt * kv_dim)
                            .map(|_| rng.gen_range(-2.0f32..2.0))
                            .collect()
                    })
                    .collect::<Vec<Vec<f32>>>()
            };
            (mk(), mk())
        };
        let seqs = [cache(13), cache(41), cache(25)];
        let mut queries = Vec::new();
        let view = |s: usize, positions: usize| AttnQuery {
            keys: seqs[s].0.iter().map(Vec::as_slice).collect(),
            values: seqs[s].1.iter().map(Vec::as_slice).collect(),
            positions,
            block_tokens: bt,
        };
        for p in 1..=13 {
            queries.push(view(0, p));
        }
        queries.push(view(1, 41));
        for p in 21..=25 {
            queries.push(view(2, p));
        }
        let q: Vec<f32> = (0..queries.len() * heads * hd)
            .map(|_| rng.gen_range(-1.0f32..1.0))
            .collect();
        let mut got = vec![0f32; q.len()];
        attention(&q, &queries, heads, kv_heads, hd, &mut got);
        let want = attention_one_by_one(&q, &queries, heads, kv_heads, hd);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want));
        // And each token alone (a decode step) gives its bits in the batch.
        for t in [0, 12, 13, 18] {
            let one = [view(
                if t < 13 {
                    0
                } else if t == 13 {
                    1
                } else {
                    2
                },
                queries[t].positions,
            )];
            let mut alone = vec![0f32; heads * hd];
            attention(
                &q[t * heads * hd..(t + 1) * heads * hd],
                &one,
                heads,
                kv_heads,
                hd,
                &mut alone,
            );
            assert_eq!(
                bits(&alone),
                bits(&got[t * heads * hd..(t + 1) * heads * hd]),
                "token {t}"
            );
        }
    }

    #[test]
    fn rmsnorm_normalises() {
        let x = [3.0f32, 4.0, 0.0, 0.0];
        let mut out = [0f32; 4];
        rmsnorm(&x, &[1.0, 2.0, 1.0, 1.0], 0.0, &mut out);
        // mean(x²) = 25/4, rms = 2.5.
        assert_eq!(out, [1.2, 3.2, 0.0, 0.0]);
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

    #[test]
    fn attention_over_one_position_returns_its_value() {
        // 2 query heads share 1 kv head; a single cached position: softmax weight 1.
        let keys = [0.3f32, -0.2];
        let values = [5.0f32, 7.0];
        let q = [1.0f32, 2.0, -1.0, 0.5];
        let mut out = [0f32; 4];
        attention(
            &q,
            &[AttnQuery {
                keys: vec![&keys],
                values: vec![&values],
                positions: 1,
                block_tokens: 1,
            }],
            2,
            1,
            2,
            &mut out,
        );
        assert_eq!(out, [5.0, 7.0, 5.0, 7.0]);
    }

    #[test]
    fn attention_weights_by_softmax() {
        // Scores q·k / sqrt(1): 0 and ln 3, so weights 1/4 and 3/4.
        let keys = [0.0f32, 3f32.ln()];
        let values = [4.0f32, 8.0];
        let mut out = [0f32; 1];
        attention(
            &[1.0],
            &[AttnQuery {
                keys: vec![&keys],
                values: vec![&values],
                positions: 2,
                block_tokens: 2,
            }],
            1,
            1,
            1,
            &mut out,
        );
        assert!((out[0] - 7.0).abs() < 1e-5, "{}", out[0]);
    }

    #[test]
    fn attention_is_the_same_over_any_block_size() {
        // Five positions, kv_dim 4 (2 kv heads of 2), 4 query heads: contiguous (one block) and
        // in blocks of 2 (the last partly filled) give the same bits.
        let keys: Vec<f32> = (0..20).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1).collect();
        let values: Vec<f32> = (0..20).map(|i| (i as f32) * 0.25 - 2.0).collect();
        let q: Vec<f32> = (0..8).map(|i| (i as f32 - 3.5) * 0.3).collect();
        let run = |bt: usize| {
            let span = bt * 4;
            let blocks = |v: &[f32]| -> Vec<Vec<f32>> {
                v.chunks(span)
                    .map(|c| {
                        let mut b = c.to_vec();
                        b.resize(span, f32::NAN); // unused rows must never be read
                        b
                    })
                    .collect()
            };
            let (kb, vb) = (blocks(&keys), blocks(&values));
            let mut out = [0f32; 8];
            attention(
                &q,
                &[AttnQuery {
                    keys: kb.iter().map(Vec::as_slice).collect(),
                    values: vb.iter().map(Vec::as_slice).collect(),
                    positions: 5,
                    block_tokens: bt,
                }],
                4,
                2,
                2,
                &mut out,
            );
            out.map(f32::to_bits)
        };
        assert!(run(5).iter().all(|&b| !f32::from_bits(b).is_nan()));
        assert_eq!(run(5), run(2));
        assert_eq!(run(5), run(1));
    }
}
