//! What a [`super::CudaBackend`] sizes before it allocates: the fused shapes of the linear
//! layers ([`role_shapes`]), its work buffers ([`WorkBuffers`], also counted by
//! `unweight plan-memory`), the decode batch buckets and their attention splits, the KV cache
//! budget in blocks, and the padded inputs of a decode step. Host-only arithmetic, unit-tested
//! without a GPU.

use super::options::CudaOptions;
use super::plan::{Plan, Role, RoleShapes, Strategy};
use super::tbe3::{gemv_geometry_with_split, MAX_GEMV_BATCH};
use crate::codec::runtime::Shape;
use crate::device::{DecodeItem, DeviceError};
use crate::model::LlamaConfig;

/// The shapes of `cfg`'s linear layers as the backend fuses them.
pub fn role_shapes(cfg: &LlamaConfig) -> Result<RoleShapes, DeviceError> {
    let (h, im, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    [
        (Role::Qkv, qd + 2 * kvd, h),
        (Role::O, h, qd),
        (Role::GateUp, 2 * im, h),
        (Role::Down, h, im),
        (Role::LmHead, v, h),
    ]
    .into_iter()
    .map(|(r, rows, cols)| {
        Shape::for_matrix(rows, cols)
            .map(|s| (r, s))
            .map_err(|e| DeviceError::Invalid(format!("{r:?} ({rows} × {cols}): {e}")))
    })
    .collect()
}

/// f32 values of split-K partial sums the plan's GEMVs need for up to 8 rows.
fn partial_len(plan: &Plan, shapes: &RoleShapes) -> usize {
    let mut most = 0;
    for (&role, shape) in shapes {
        for n in 1..=MAX_GEMV_BATCH {
            if let Strategy::Gemv { ksplit } = plan.strategy(role, shape, n) {
                if let Ok(g) = gemv_geometry_with_split(shape, n, ksplit) {
                    most = most.max(g.partial_len());
                }
            }
        }
    }
    most
}

/// Bytes of each work buffer a [`super::CudaBackend`] allocates on the device, for the larger
/// of a decode batch and a prefill chunk. The constructor allocates exactly these and
/// `unweight plan-memory` counts them, so the planner's workspace is the engine's, not an
/// estimate that drifts from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkBuffers {
    /// Rows one pass handles at most: `max(max_sequences, max_prefill_tokens)`.
    pub cap: usize,
    /// Token ids, positions and cache slots of a pass (i32 each).
    pub tokens: usize,
    /// See [`WorkBuffers::tokens`].
    pub pos: usize,
    /// See [`WorkBuffers::tokens`].
    pub slot: usize,
    /// The residual stream (f32).
    pub x: usize,
    /// Normed activations as hi + lo BF16 rows.
    pub xb: usize,
    /// f32 twins of the GEMV inputs (normed activations, attention output, MLP product).
    pub xf: usize,
    /// See [`WorkBuffers::xf`].
    pub af: usize,
    /// See [`WorkBuffers::xf`].
    pub mf: usize,
    /// BF16 scratch of the plan's chunked decodes (the largest chunk any tbe3 matrix decodes
    /// into before a cuBLAS product); at least 16 bytes.
    pub scratch: usize,
    /// f32 split-K partial sums of the plan's GEMVs.
    pub partial: usize,
    /// Products and their BF16 forms, hi + lo rows where a GEMM reads them.
    pub qkv: usize,
    /// See [`WorkBuffers::qkv`].
    pub q: usize,
    /// See [`WorkBuffers::qkv`].
    pub ab: usize,
    /// See [`WorkBuffers::qkv`].
    pub y: usize,
    /// See [`WorkBuffers::qkv`].
    pub gu: usize,
    /// See [`WorkBuffers::qkv`].
    pub mb: usize,
    /// Logits of a decode batch (raw products and final f32), and its greedy ids.
    pub logits_raw: usize,
    /// See [`WorkBuffers::logits_raw`].
    pub logits: usize,
    /// See [`WorkBuffers::logits_raw`].
    pub ids: usize,
    /// The rows of a fused step's pass whose logits are wanted (i32, at most one per sequence).
    pub gather: usize,
    /// The device sampler's per-row records (`sample::SampleRow`, 48 bytes each). Its logit
    /// edits (8 bytes each, at most one per token id and row) go into `logits_raw`, which is
    /// exactly `8 × rows × vocab` bytes and dead once a step's logits are final.
    pub sample_rows: usize,
    /// The decode attention's split partials (f32 (max, sum) and head_dim-wide accumulators)
    /// for the largest split batch (`attn_split_rows`: 16 rows × 32 splits at most).
    pub attn_ml: usize,
    /// See [`WorkBuffers::attn_ml`].
    pub attn_acc: usize,
    /// RoPE cosine and sine tables for `max_context` positions.
    pub rope: usize,
    /// The cuBLAS handle's fixed workspace.
    pub cublas: usize,
}

impl WorkBuffers {
    /// The buffers of a backend for `cfg` under `opts`, with `plan` resolved for `shapes`
    /// ([`resolve_plan`](super::options::resolve_plan)) and `max_context` positions of RoPE tables.
    pub fn new(
        cfg: &LlamaConfig,
        plan: &Plan,
        shapes: &RoleShapes,
        opts: &CudaOptions,
        max_context: usize,
    ) -> Self {
        let (h, im, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let lcap = opts.max_sequences;
        let cap = lcap.max(opts.max_prefill_tokens);
        let rows = 2 * cap; // hi + lo rows (allocated even when not split: simpler, small)
        Self {
            cap,
            tokens: 4 * cap,
            pos: 4 * cap,
            slot: 4 * cap,
            x: 4 * cap * h,
            xb: 2 * rows * h,
            xf: 4 * cap * h,
            af: 4 * cap * qd,
            mf: 4 * cap * im,
            scratch: plan.scratch_bytes(shapes, cap).max(16),
            partial: 4 * partial_len(plan, shapes).max(1),
            qkv: 4 * rows * (qd + 2 * kvd),
            q: 4 * cap * qd,
            ab: 2 * rows * qd,
            y: 4 * rows * h,
            gu: 4 * rows * 2 * im,
            mb: 2 * rows * im,
            logits_raw: 4 * 2 * lcap * v,
            logits: 4 * lcap * v,
            ids: 4 * lcap,
            gather: 4 * lcap,
            sample_rows: std::mem::size_of::<super::sample::SampleRow>() * lcap,
            attn_ml: 4 * 2 * attn_split_rows(lcap) * cfg.num_attention_heads,
            attn_acc: 4 * attn_split_rows(lcap) * cfg.num_attention_heads * cfg.head_dim,
            rope: 2 * 4 * max_context * (cfg.head_dim / 2),
            cublas: super::driver::CUBLAS_WORKSPACE,
        }
    }

    /// Device bytes of all of them.
    pub fn device_bytes(&self) -> usize {
        let Self {
            cap: _,
            tokens,
            pos,
            slot,
            x,
            xb,
            xf,
            af,
            mf,
            scratch,
            partial,
            qkv,
            q,
            ab,
            y,
            gu,
            mb,
            logits_raw,
            logits,
            ids,
            gather,
            sample_rows,
            attn_ml,
            attn_acc,
            rope,
            cublas,
        } = *self;
        tokens
            + pos
            + slot
            + x
            + xb
            + xf
            + af
            + mf
            + scratch
            + partial
            + qkv
            + q
            + ab
            + y
            + gu
            + mb
            + logits_raw
            + logits
            + ids
            + gather
            + sample_rows
            + attn_ml
            + attn_acc
            + rope
            + cublas
    }
}

/// The decode batch buckets for `max_sequences` live sequences: powers of two below it, then
/// `max_sequences` itself (one CUDA graph each).
pub(crate) fn decode_buckets(max_sequences: usize) -> Vec<usize> {
    let mut buckets: Vec<usize> = (0..usize::BITS)
        .map(|i| 1usize << i)
        .take_while(|&b| b < max_sequences)
        .collect();
    buckets.push(max_sequences.max(1));
    buckets
}

/// The smallest bucket that holds a batch of `n`, if any.
pub(crate) fn pick_bucket(buckets: &[usize], n: usize) -> Option<usize> {
    buckets.iter().copied().find(|&b| b >= n)
}

/// Most splits of one decode attention (per token and head).
pub(crate) const ATTN_MAX_SPLITS: usize = 32;
/// Largest decode batch whose attention is split along the sequence.
pub(crate) const ATTN_SPLIT_MAX_BATCH: usize = 16;

/// Splits along the sequence of the decode attention of a batch bucket of `bucket` rows, for a
/// model of `heads` query heads and `kv_heads` KV heads on a device of `sms` multiprocessors,
/// with sequences of at most `max_context` positions. The decode kernel runs one block of 4 warps
/// per (row, KV head, split) ([`blocks_per_row`] per row and split); once a bucket has at
/// least `sms` of them it fills the GPU without splitting: then 1. Below that, enough splits for
/// about two blocks per multiprocessor (`ceil(2 sms / blocks)`; the kernel's registers leave room
/// for two to three resident), at most [`ATTN_MAX_SPLITS`], never more than `max_context` has
/// [`ATTN_MIN_CHUNK`]-position chunks (a split shorter than that costs more than it saves), and
/// none past [`ATTN_SPLIT_MAX_BATCH`] rows. Fixed per bucket, so the bucket's CUDA graph bakes it
/// in; each split's positions come from the row's position in-kernel
/// ([`super::kernels::split_range`]).
///
/// [`ATTN_MIN_CHUNK`]: super::kernels::ATTN_MIN_CHUNK
/// [`blocks_per_row`]: super::kernels::blocks_per_row
pub(crate) fn decode_splits(
    bucket: usize,
    heads: usize,
    kv_heads: usize,
    sms: usize,
    max_context: usize,
) -> usize {
    let blocks = bucket.max(1) * super::kernels::blocks_per_row(heads, kv_heads);
    if bucket > ATTN_SPLIT_MAX_BATCH || blocks >= sms {
        return 1;
    }
    let chunks = max_context.div_ceil(super::kernels::ATTN_MIN_CHUNK).max(1);
    (2 * sms)
        .div_ceil(blocks)
        .min(ATTN_MAX_SPLITS)
        .min(chunks)
        .max(1)
}

/// (row, split) records the decode attention's partials hold: the largest split batch (at most
/// [`ATTN_SPLIT_MAX_BATCH`] rows) times [`ATTN_MAX_SPLITS`], whatever the device.
pub(crate) fn attn_split_rows(max_sequences: usize) -> usize {
    max_sequences.min(ATTN_SPLIT_MAX_BATCH) * ATTN_MAX_SPLITS
}

/// Sizes the paged KV cache: from `free` device bytes (with `reserve` kept back), an explicit
/// budget or `fraction` of what is free, blocks of `block_bytes` each (one more, the padding
/// block, takes the padding rows of decode batches) and a block table of `table_bytes`. The
/// pool holds at most what `max_sequences` sequences of `max_context` tokens can use, and at
/// least one sequence of `max_context` tokens. Returns (budget, blocks), or the reason nothing
/// fits.
#[allow(clippy::too_many_arguments)]
pub(crate) fn kv_plan(
    free: usize,
    reserve: usize,
    budget: Option<usize>,
    fraction: f64,
    block_bytes: usize,
    table_bytes: usize,
    max_sequences: usize,
    max_context: usize,
) -> Result<(usize, usize), String> {
    let left = free.saturating_sub(reserve);
    let budget = budget.unwrap_or((left as f64 * fraction.clamp(0.0, 1.0)) as usize);
    let block_bytes = block_bytes.max(1);
    let per_sequence = super::kv::blocks_for(max_context).max(1);
    // The padding block comes out of the budget; a block id must fit the kernels' i32 table.
    let fit = (budget.saturating_sub(table_bytes) / block_bytes)
        .saturating_sub(1)
        .min(i32::MAX as usize - 1);
    let blocks = fit.min(max_sequences.saturating_mul(per_sequence));
    if blocks < per_sequence {
        return Err(format!(
            "a KV budget of {budget} bytes holds no sequence of {max_context} tokens: it needs {per_sequence} blocks of {block_bytes} bytes, plus one padding block and a {table_bytes}-byte block table ({} MiB free on the device)",
            free >> 20
        ));
    }
    let need = (blocks + 1)
        .saturating_mul(block_bytes)
        .saturating_add(table_bytes);
    if need.saturating_add(reserve) > free {
        return Err(format!(
            "the KV cache ({need} bytes: {blocks} blocks of {block_bytes}) does not fit in the {free} bytes free on the device"
        ));
    }
    Ok((budget, blocks))
}

/// The per-step inputs of a decode batch padded to `bucket` rows: (tokens, positions, slots).
/// Padding rows are token 0 at position 0 of the padding slot `pad`, whose table points at the
/// padding block only, so they never write into a live sequence's blocks. A row's slot is its
/// sequence handle's slot ([`super::kv::slot_of`]), its row of the block table.
pub(crate) fn decode_inputs(
    batch: &[DecodeItem],
    bucket: usize,
    pad: usize,
) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let n = bucket.max(batch.len());
    let mut tokens = vec![0i32; n];
    let mut pos = vec![0i32; n];
    let mut slots = vec![pad as i32; n];
    for (i, d) in batch.iter().enumerate() {
        tokens[i] = d.token as i32;
        pos[i] = d.pos as i32;
        slots[i] = super::kv::slot_of(d.seq) as i32;
    }
    (tokens, pos, slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::cuda::kv;
    use crate::device::cuda::options::{resolve_plan, PlanSource};
    use crate::device::SeqId;

    #[test]
    fn work_buffers_hold_one_pass_and_decode_chunks_not_whole_matrices() {
        let shape = crate::model::LlamaShape::preset("llama-3.1-70b").unwrap();
        let cfg = LlamaConfig::from_json(shape.config_json().as_object().unwrap()).unwrap();
        let shapes = role_shapes(&cfg).unwrap();
        let opts = |plan| CudaOptions {
            max_sequences: 64,
            max_prefill_tokens: 512,
            plan,
            ..CudaOptions::default()
        };
        let of = |plan: PlanSource| {
            let o = opts(plan);
            let p = resolve_plan(&o, &shapes, 132, cfg.tie_word_embeddings);
            WorkBuffers::new(&cfg, &p, &shapes, &o, 8192)
        };
        let (raw, comp) = (of(PlanSource::Baseline), of(PlanSource::Compressed));
        // Rows of a pass: the larger of the decode batch and the prefill chunk.
        assert_eq!(comp.cap, 512);
        assert_eq!(comp.x, 4 * 512 * cfg.hidden_size);
        assert_eq!(comp.logits, 4 * 64 * cfg.vocab_size);
        // RoPE tables: cos and sin, f32, half a head per position.
        assert_eq!(comp.rope, 2 * 4 * 8192 * cfg.head_dim / 2);
        // Raw weights decode nothing; compressed ones decode chunks of at most 16 MiB, far
        // less than one matrix in BF16 (lm_head alone is 2.1 GB).
        assert_eq!(raw.scratch, 16);
        assert!(comp.scratch > 16 && comp.scratch <= super::super::plan::DEFAULT_CHUNK_BYTES);
        let largest = 2 * cfg.vocab_size * cfg.hidden_size;
        assert!(comp.device_bytes() < largest, "{}", comp.device_bytes());
        // The total is every buffer: at least the activations and the logits.
        assert!(comp.device_bytes() > comp.x + comp.xb + comp.gu + comp.logits_raw + comp.rope);
        assert_eq!(
            comp.device_bytes() - comp.scratch - comp.partial,
            raw.device_bytes() - raw.scratch - raw.partial
        );
    }

    #[test]
    fn buckets_cover_every_batch_up_to_max_sequences() {
        assert_eq!(decode_buckets(1), vec![1]);
        assert_eq!(decode_buckets(4), vec![1, 2, 4]);
        assert_eq!(decode_buckets(5), vec![1, 2, 4, 5]);
        assert_eq!(decode_buckets(128), vec![1, 2, 4, 8, 16, 32, 64, 128]);
        for max in 1..=70 {
            let b = decode_buckets(max);
            assert_eq!(*b.last().unwrap(), max);
            for n in 1..=max {
                let k = pick_bucket(&b, n).unwrap();
                assert!(
                    k >= n && k <= max && (k == max || k < 2 * n),
                    "{max} {n} {k}"
                );
            }
            assert_eq!(pick_bucket(&b, max + 1), None);
        }
    }

    #[test]
    fn padding_rows_go_to_the_padding_slot_at_position_zero() {
        let batch = [
            DecodeItem {
                seq: SeqId(3),
                token: 11,
                pos: 40,
            },
            DecodeItem {
                seq: SeqId(0),
                token: 7,
                pos: 2,
            },
        ];
        let (t, p, s) = decode_inputs(&batch, 4, 9);
        assert_eq!(t, vec![11, 7, 0, 0]);
        // A handle's generation (high bits) is not part of its slot.
        let again = [DecodeItem {
            seq: SeqId(5 << 16 | 3),
            token: 1,
            pos: 0,
        }];
        assert_eq!(decode_inputs(&again, 1, 9).2, vec![3]);
        assert_eq!(p, vec![40, 2, 0, 0]);
        assert_eq!(s, vec![3, 0, 9, 9]);
        let (t, p, s) = decode_inputs(&batch, 2, 9);
        assert_eq!((t.len(), p.len(), s), (2, 2, vec![3, 0]));
    }

    #[test]
    fn kv_plan_counts_blocks_from_the_budget_and_refuses_what_does_not_fit() {
        const GIB: usize = 1 << 30;
        // Llama-3.1-8B: 2 MiB per block of 16 tokens (BF16), 256 blocks per 4096-token sequence.
        let block = kv::block_bytes(32, 1024);
        assert_eq!(block, 2 << 20);
        let table = 4 * 65 * kv::blocks_for(4096);
        // Default budget: half of what is free after the reserve; 30 GiB hold 15359 blocks (the
        // padding block and the table out of the budget), 59 sequences at the full context.
        let (budget, blocks) = kv_plan(61 * GIB, GIB, None, 0.5, block, table, 1024, 4096).unwrap();
        assert_eq!(budget, 30 * GIB);
        assert_eq!(blocks, (30 * GIB - table) / block - 1);
        assert_eq!(blocks / kv::blocks_for(4096), 59);
        // The pool never exceeds what max_sequences full sequences can use.
        let (_, blocks) = kv_plan(61 * GIB, GIB, None, 0.5, block, table, 8, 4096).unwrap();
        assert_eq!(blocks, 8 * 256);
        // A budget for exactly one full sequence, the padding block and the table.
        let exact = 257 * block + table;
        assert_eq!(
            kv_plan(61 * GIB, 0, Some(exact), 0.5, block, table, 64, 4096)
                .unwrap()
                .1,
            256
        );
        // One byte less: refused, naming the budget.
        let e = kv_plan(61 * GIB, 0, Some(exact - 1), 0.5, block, table, 64, 4096).unwrap_err();
        assert!(e.contains("KV budget"), "{e}");
        // An explicit budget beyond what is free: refused, not an OOM later.
        let e = kv_plan(
            10 * GIB,
            512 << 20,
            Some(40 * GIB),
            0.5,
            block,
            table,
            64,
            4096,
        )
        .unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
        // Degenerate block size (no layers): no division by zero.
        assert!(kv_plan(GIB, 0, None, 0.5, 0, 0, 4, 16).is_ok());
    }

    #[test]
    fn decode_splits_fill_the_gpu_at_small_batches_only() {
        // Llama-3.1-8B (32 heads, 8 KV heads: one block per KV head) on an H200 (132 SMs), 8k
        // context: batch 1 gets min(ceil(264 / 8), 32) = 32 splits, batch 2 17, batch 4 9,
        // batch 8 5, batch 16 3 (128 blocks < 132), batch 17 and beyond none.
        let s = |b| decode_splits(b, 32, 8, 132, 8192);
        assert_eq!(
            (s(1), s(2), s(4), s(8), s(16), s(17), s(128)),
            (32, 17, 9, 5, 3, 1, 1)
        );
        // Llama-3.1-70B (64 / 8: group 8, one block per KV head): as 8B.
        assert_eq!(decode_splits(1, 64, 8, 132, 8192), 32);
        // SmolLM2 (9 / 3: group 3 in blocks of 4 heads): capped at ATTN_MAX_SPLITS; never past
        // ATTN_SPLIT_MAX_BATCH rows.
        assert_eq!(decode_splits(1, 9, 3, 132, 8192), ATTN_MAX_SPLITS);
        assert_eq!(
            decode_splits(ATTN_SPLIT_MAX_BATCH + 1, 1, 1, 10_000, 8192),
            1
        );
        // A group of 16 takes two blocks per KV head: 8 rows x 4 KV heads x 2 = 64 blocks,
        // ceil(264 / 64) = 5 splits, where a group of 8 (32 blocks) gets 9.
        assert_eq!(decode_splits(8, 64, 4, 132, 8192), 5);
        assert_eq!(decode_splits(8, 32, 4, 132, 8192), 9);
        // Enough blocks without splitting: none.
        assert_eq!(decode_splits(2, 128, 128, 132, 8192), 1);
        // A short context has few 64-position chunks to split into.
        assert_eq!(decode_splits(1, 4, 4, 132, 128), 2);
        assert_eq!(decode_splits(1, 4, 4, 132, 64), 1);
        // The partials hold every split bucket's rows × splits.
        for max_seq in [1usize, 5, 16, 64] {
            for b in decode_buckets(max_seq) {
                for (heads, kvh) in [(1usize, 1usize), (9, 3), (32, 8), (64, 8), (32, 1)] {
                    let z = decode_splits(b, heads, kvh, 132, 8192);
                    assert!(z == 1 || b * z <= attn_split_rows(max_seq), "{max_seq} {b}");
                }
            }
        }
    }

    /// A sequential model of the split decode attention (kernels/attention.cu): each split's
    /// range ([`split_range`]) with its own online softmax, in the kernel's order of positions
    /// (warp w of 8 takes begin + w, begin + w + 8, ...), merged per split as the kernel's
    /// shared-memory step and across splits as `attention_combine` does. Every split count must
    /// give the unsplit result within f32 rounding, and the ranges must tile `0..=pos`.
    #[test]
    fn split_attention_merges_to_the_unsplit_result() {
        use crate::device::cuda::kernels::split_range;
        // (max, sum, acc) of positions `range` for query `q` over keys/values of width `d`.
        fn block(q: &[f32], k: &[f32], v: &[f32], range: std::ops::Range<usize>) -> Part {
            let d = q.len();
            let scale = 1.0 / (d as f32).sqrt();
            let mut warps = vec![(f32::NEG_INFINITY, 0f32, vec![0f32; d]); 8];
            for (w, (m, l, acc)) in warps.iter_mut().enumerate() {
                let mut j = range.start + w;
                while j < range.end {
                    let s: f32 = (0..d).map(|e| q[e] * k[j * d + e]).sum::<f32>() * scale;
                    let mn = m.max(s);
                    let (corr, pe) = ((*m - mn).exp(), (s - mn).exp());
                    *l = *l * corr + pe;
                    for e in 0..d {
                        acc[e] = acc[e] * corr + pe * v[j * d + e];
                    }
                    *m = mn;
                    j += 8;
                }
            }
            merge(&warps)
        }
        type Part = (f32, f32, Vec<f32>);
        fn merge(parts: &[Part]) -> Part {
            let mx = parts.iter().fold(f32::NEG_INFINITY, |a, p| a.max(p.0));
            if mx == f32::NEG_INFINITY {
                return (mx, 0.0, vec![0.0; parts[0].2.len()]);
            }
            let total = parts.iter().map(|p| p.1 * (p.0 - mx).exp()).sum();
            let d = parts[0].2.len();
            let acc = (0..d)
                .map(|e| parts.iter().map(|p| p.2[e] * (p.0 - mx).exp()).sum())
                .collect();
            (mx, total, acc)
        }
        let mut r = 0x2545f491u64;
        let mut rand = || {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            (r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let d = 64;
        let n = 1000;
        let q: Vec<f32> = (0..d).map(|_| 3.0 * rand()).collect();
        let k: Vec<f32> = (0..n * d).map(|_| rand()).collect();
        let v: Vec<f32> = (0..n * d).map(|_| rand()).collect();
        for pos in [0usize, 5, 63, 64, 200, 999] {
            let (_, l1, a1) = block(&q, &k, &v, 0..pos + 1);
            let unsplit: Vec<f32> = a1.iter().map(|a| a / l1).collect();
            for splits in [1usize, 2, 3, 7, 16] {
                let ranges: Vec<_> = (0..splits).map(|z| split_range(pos, splits, z)).collect();
                let mut next = 0;
                for rg in &ranges {
                    assert!(
                        rg.start == next || rg.is_empty(),
                        "{pos} {splits} {ranges:?}"
                    );
                    assert!(rg.is_empty() || rg.start % kv::BLOCK_TOKENS == 0);
                    next = next.max(rg.end);
                }
                assert_eq!(next, pos + 1, "{pos} {splits}: {ranges:?}");
                assert!(!ranges[0].is_empty());
                let parts: Vec<Part> = ranges
                    .iter()
                    .map(|rg| block(&q, &k, &v, rg.clone()))
                    .collect();
                let (_, l, acc) = merge(&parts);
                for e in 0..d {
                    let (got, want) = (acc[e] / l, unsplit[e]);
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1e-2),
                        "pos {pos} splits {splits} e {e}: {got} vs {want}"
                    );
                    if splits == 1 {
                        assert_eq!(got.to_bits(), want.to_bits(), "one split is today's path");
                    }
                }
            }
        }
    }

    /// A sequential model of the decode kernel `attention_decode_h*` (kernels/attention.cu) for
    /// one query head, in its order of operations: a row of head_dim = 8 C elements taken by SUB
    /// lanes (the power of two >= C, at least 4), lane c's 8-term dot product (fused
    /// multiply-adds, as nvcc contracts them) summed over the lanes by an xor butterfly; NS = 4 x
    /// 32 / SUB streams, stream s taking begin + s, begin + s + NS, ... with the online softmax
    /// (rescaled only when the max moves); the streams merged in order, then the splits as
    /// `attention_combine` does. At head_dim 64, 96 (idle lanes) and 128, every length and split
    /// count must give f64 softmax(q K^T / sqrt(d)) V within f32 rounding.
    #[test]
    fn decode_streams_model_equals_the_softmax() {
        use crate::device::cuda::kernels::split_range;
        type Part = (f32, f32, Vec<f32>);
        fn merge(parts: &[Part]) -> Part {
            let mx = parts.iter().fold(f32::NEG_INFINITY, |a, p| a.max(p.0));
            let d = parts[0].2.len();
            if mx == f32::NEG_INFINITY {
                return (mx, 0.0, vec![0.0; d]);
            }
            let mut total = 0f32;
            let mut acc = vec![0f32; d];
            for p in parts {
                let w = (p.0 - mx).exp();
                total = p.1.mul_add(w, total);
                for (a, &x) in acc.iter_mut().zip(&p.2) {
                    *a = x.mul_add(w, *a);
                }
            }
            (mx, total, acc)
        }
        /// The score of position j as the kernel's lanes compute it.
        fn score(q: &[f32], krow: &[f32], scale: f32) -> f32 {
            let d = q.len();
            let chunks = d / 8;
            let sub = chunks.next_power_of_two().max(4);
            let mut lanes: Vec<f32> = (0..sub)
                .map(|c| {
                    if c >= chunks {
                        return 0.0;
                    }
                    (0..8).fold(0f32, |a, i| q[8 * c + i].mul_add(krow[8 * c + i], a))
                })
                .collect();
            let mut o = sub / 2;
            while o > 0 {
                lanes = (0..sub).map(|c| lanes[c] + lanes[c ^ o]).collect();
                o /= 2;
            }
            assert!(lanes.iter().all(|&x| x.to_bits() == lanes[0].to_bits()));
            lanes[0] * scale
        }
        fn block(q: &[f32], k: &[f32], v: &[f32], range: std::ops::Range<usize>) -> Part {
            let d = q.len();
            let scale = 1.0 / (d as f32).sqrt();
            if range.is_empty() {
                return (f32::NEG_INFINITY, 0.0, vec![0.0; d]);
            }
            let ns = 4 * 32 / (d / 8).next_power_of_two().max(4);
            let mut streams = vec![(f32::NEG_INFINITY, 0f32, vec![0f32; d]); ns];
            for (st, (m, l, acc)) in streams.iter_mut().enumerate() {
                let mut j = range.start + st;
                while j < range.end {
                    let s = score(q, &k[j * d..(j + 1) * d], scale);
                    if s > *m {
                        let corr = (*m - s).exp();
                        *l *= corr;
                        for a in acc.iter_mut() {
                            *a *= corr;
                        }
                        *m = s;
                    }
                    let pe = (s - *m).exp();
                    *l += pe;
                    for (e, a) in acc.iter_mut().enumerate() {
                        *a = pe.mul_add(v[j * d + e], *a);
                    }
                    j += ns;
                }
            }
            merge(&streams)
        }
        let mut r = 0x5851f42du64;
        let mut rand = || {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            (r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let n = 1100;
        for d in [64usize, 96, 128] {
            // Keys and values BF16-exact (the cache's), as the kernel widens them.
            let bf = |x: f32| f32::from_bits(x.to_bits() & 0xffff_0000);
            let q: Vec<f32> = (0..d).map(|_| 3.0 * rand()).collect();
            let k: Vec<f32> = (0..n * d).map(|_| bf(rand())).collect();
            let v: Vec<f32> = (0..n * d).map(|_| bf(rand())).collect();
            for pos in [0usize, 1, 15, 16, 17, 63, 64, 127, 300, 1099] {
                let sc: Vec<f64> = (0..=pos)
                    .map(|j| {
                        (0..d)
                            .map(|e| q[e] as f64 * k[j * d + e] as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                for splits in [1usize, 2, 5, 16, 32] {
                    let parts: Vec<Part> = (0..splits)
                        .map(|zz| block(&q, &k, &v, split_range(pos, splits, zz)))
                        .collect();
                    let (_, l, acc) = merge(&parts);
                    for e in 0..d {
                        let want: f64 = (0..=pos)
                            .map(|j| (sc[j] - mx).exp() / z * v[j * d + e] as f64)
                            .sum();
                        let got = (acc[e] / l) as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * want.abs().max(1e-2),
                            "d {d} pos {pos} splits {splits} e {e}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
