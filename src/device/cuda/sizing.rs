//! What a [`super::CudaBackend`] sizes before it allocates: the fused shapes of the linear
//! layers ([`role_shapes`]), its work buffers ([`WorkBuffers`], also counted by
//! `unweight plan-memory`), the decode batch buckets, the KV cache budget, and the padded inputs
//! of a decode step. Host-only arithmetic, unit-tested without a GPU.

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
    /// The device sampler's per-row records (`sample::SampleRow`, 48 bytes each). Its logit
    /// edits (8 bytes each, at most one per token id and row) go into `logits_raw`, which is
    /// exactly `8 × rows × vocab` bytes and dead once a step's logits are final.
    pub sample_rows: usize,
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
            sample_rows: std::mem::size_of::<super::sample::SampleRow>() * lcap,
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
            sample_rows,
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
            + sample_rows
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

/// Sizes the KV cache: from `free` device bytes (with `reserve` kept back), an explicit budget or
/// `fraction` of what is free, and slots of `slot_bytes` each (one more slot pads decode
/// batches). Returns (budget, live sequences), or the reason nothing fits.
pub(crate) fn kv_plan(
    free: usize,
    reserve: usize,
    budget: Option<usize>,
    fraction: f64,
    slot_bytes: usize,
    want_sequences: usize,
    max_context: usize,
) -> Result<(usize, usize), String> {
    let left = free.saturating_sub(reserve);
    let budget = budget.unwrap_or((left as f64 * fraction.clamp(0.0, 1.0)) as usize);
    let slot_bytes = slot_bytes.max(1);
    let fit = (budget / slot_bytes).saturating_sub(1); // one slot pads decode batches
    let max_sequences = want_sequences.min(fit);
    if max_sequences == 0 {
        return Err(format!(
            "a KV budget of {budget} bytes holds no sequence of {max_context} tokens: each slot needs {slot_bytes} bytes, plus one padding slot ({} MiB free on the device)",
            free >> 20
        ));
    }
    let need = (max_sequences + 1).saturating_mul(slot_bytes);
    if need.saturating_add(reserve) > free {
        return Err(format!(
            "the KV cache ({need} bytes for {max_sequences} sequences of {max_context} tokens) does not fit in the {free} bytes free on the device"
        ));
    }
    Ok((budget, max_sequences))
}

/// The per-step inputs of a decode batch padded to `bucket` rows: (tokens, positions, slots).
/// Padding rows are token 0 at position 0 of the padding slot `pad`, so they never write into
/// a live sequence's cache.
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
        slots[i] = d.seq.0 as i32;
    }
    (tokens, pos, slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::cuda::kv::KvCache;
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
        assert_eq!(p, vec![40, 2, 0, 0]);
        assert_eq!(s, vec![3, 0, 9, 9]);
        let (t, p, s) = decode_inputs(&batch, 2, 9);
        assert_eq!((t.len(), p.len(), s), (2, 2, vec![3, 0]));
    }

    #[test]
    fn kv_plan_sizes_from_the_budget_and_refuses_what_does_not_fit() {
        const GIB: usize = 1 << 30;
        let slot = KvCache::slot_bytes(32, 1024, 4096); // Llama-3.1-8B at 4096 tokens: 1 GiB
                                                        // Default budget: half of what is free after the reserve. 60 GiB free -> ~30 GiB -> 28
                                                        // sequences + the padding slot.
        let (budget, n) = kv_plan(60 * GIB, 512 << 20, None, 0.5, slot, 64, 4096).unwrap();
        assert_eq!(budget, (60 * GIB - (512 << 20)) / 2);
        assert_eq!(n, 28);
        // 90% of it (the Triton default): 53.1 GiB -> 52 sequences + the padding slot.
        let (budget, n) = kv_plan(60 * GIB, 512 << 20, None, 0.9, slot, 64, 4096).unwrap();
        assert_eq!(budget, ((60 * GIB - (512 << 20)) as f64 * 0.9) as usize);
        assert_eq!(n, 52);
        // The option caps it.
        assert_eq!(kv_plan(60 * GIB, 0, None, 0.5, slot, 8, 4096).unwrap().1, 8);
        // A budget for exactly one sequence and the pad.
        assert_eq!(
            kv_plan(60 * GIB, 0, Some(2 * slot), 0.5, slot, 64, 4096)
                .unwrap()
                .1,
            1
        );
        // Too small: refused, naming the budget.
        let e = kv_plan(60 * GIB, 0, Some(2 * slot - 1), 0.5, slot, 64, 4096).unwrap_err();
        assert!(e.contains("KV budget"), "{e}");
        // An explicit budget beyond what is free: refused, not an OOM later.
        let e = kv_plan(10 * GIB, 512 << 20, Some(40 * GIB), 0.5, slot, 64, 4096).unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
        // Degenerate slot size (no layers): no division by zero.
        assert!(kv_plan(GIB, 0, None, 0.5, 0, 4, 16).is_ok());
    }
}
