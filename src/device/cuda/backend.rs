//! [`CudaBackend`]: the Llama forward pass on the GPU, step for step the CPU reference's
//! (`device::cpu`). Each linear layer's weight is in device memory raw (BF16) or in the tbe3
//! runtime form, as the [`Plan`] says, and each product runs the plan's strategy for its batch
//! size ([`super::linear`]): the fused GEMV (f32 activations), or cuBLAS (split-BF16
//! activations, after a chunked decode on tbe3).
//!
//! One layer, for `n` tokens (a prompt chunk, or one token of each sequence of a decode batch):
//!
//! ```text
//! rmsnorm_residual(x += down_prev; x -> xb)     GEMM qkv (fused q|k|v weight) -> qkv
//! rope_qkv_store(qkv -> q, K/V cache)          attention(q, cache -> ab)
//! GEMM o -> y      rmsnorm_residual(x += y; x -> xb)      GEMM gate|up (fused) -> gu
//! silu_mul(gu -> mb)                           GEMM down -> y
//! ```
//!
//! then the final norm, `lm_head` on the rows whose logits are wanted, and the f32 logits copied
//! to pinned host memory; or, for a batch whose rows all want their greedy token
//! (`Backend::decode_argmax`), the argmax of each row on the device (kernels/argmax.cu) and only
//! the ids copied back. The residual stream is f32, as on the CPU; the KV cache is paged BF16
//! (`super::kv`: keys and values computed in f32, rounded once when stored, as on the CPU). GEMM
//! inputs are BF16; with `split_activations` (the default) each activation row goes in as two
//! BF16 rows whose sum is the f32 value to 2^-17 (kernels/common.cuh), so cuBLAS's products match
//! the CPU's f32-activation products to ~1e-5 while reading every weight once.
//!
//! A decode step is padded to a batch-size bucket (powers of two up to `max_sequences`) and runs
//! as that bucket's CUDA graph (the bucket's first step runs eagerly, then is captured); per-step
//! inputs (tokens, positions, slots) live in fixed device buffers the graph reads, and so does the
//! KV block table (its entries go up when a sequence gains blocks, before the step). Below
//! a batch that fills the GPU, the decode attention is split along the sequence
//! (`sizing::decode_splits`, fixed per bucket). Prefill runs eagerly in chunks of at most
//! `max_prefill_tokens`, its attention the tiled `attention_prefill` (kernels/attention.cu).
//! A fused step (`Backend::step`: prompt chunks of several sequences and a decode batch) runs
//! eagerly as one pass over all their rows, each part's attention by its own kernel, the
//! `lm_head` only on the rows whose logits are wanted (`fused`). Every buffer is allocated at
//! construction.
//!
//! Here: the backend's state and the [`Backend`] contract. Its parts: `build` (plan, weights,
//! buffers, graphs and KV cache made once), `forward` (the pass above, queued on the stream),
//! `fused` (a fused step's row plan, checks and passes) and `choosing` (device argmax and
//! sampling, a prompt's first token, launched and collected steps).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::driver::{
    Context, Cublas, DevBuf, Event, GpuError, GpuResult, Graph, IdsDownload, PinnedBuf, Staging,
};
use super::kernels::{AttnSplit, Kernels, PagedKv, Product, ATTN_MAX_HEAD_DIM};
use super::kv::{self as paged, KvCache};
use super::linear::{Form, Input, Linear, Products};
use super::options::{resolve_plan, CudaOptions, PlanSource};
use super::persist::weights_identity;
use super::plan::{Plan, Role, RoleShapes, Storage};
use super::sample;
use super::sizing::{decode_buckets, decode_inputs, decode_splits, kv_plan, pick_bucket};

mod build;
mod choosing;
mod forward;
mod fused;
pub use super::sizing::{role_shapes, WorkBuffers};
use super::stream::stream_weights_persisted;
use super::tbe3::{multiprocessors, Tbe3Kernels};
use super::weights::{device_weights, upload_linear, LayerW, UploadSink, Weights, WeightsKey};
use crate::container::Checkpoint;
use crate::device::{
    Backend, ChunkItem, DecodeChoice, DecodeItem, DecodeOutput, DeviceError, FaultKind, KvCapacity,
    Launched, Logits, RowSampling, SeqId, StepChoice,
};
use crate::model::weights::{LlamaWeights, WeightError};
use crate::model::LlamaConfig;

/// Timing of the last decode step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTiming {
    /// Device time of the step (graph or kernels), from CUDA events.
    pub gpu_ms: f64,
    /// Host time of copying the logits back (pinned memory), after the step finished; 0 when
    /// the step returned ids instead ([`Backend::decode_argmax`], [`Backend::decode_sampled`]).
    pub copy_ms: f64,
    /// The batch bucket the step ran as.
    pub bucket: usize,
    /// Whether the step ran as a replay of its bucket's CUDA graph (false: launched eagerly,
    /// because graphs are off, this is the bucket's first step, or its capture failed).
    pub graph: bool,
    /// Host time of the greedy-id path: from the argmax kernel's launch to the ids on the host;
    /// 0 when it did not run. After a `decode` ([`CudaBackend::argmax_last_step`], as the
    /// benchmark runs it) the step has finished first, so this is the path alone, and next to
    /// `copy_ms` plus a host argmax it says which way of getting greedy tokens is cheaper; in
    /// [`Backend::decode_argmax`] it also covers the end of the step, which is not waited for
    /// separately (one synchronisation per step).
    pub argmax_ms: f64,
    /// Device time of the argmax kernel alone (CUDA events); 0 when it did not run.
    pub argmax_gpu_ms: f64,
    /// Host time of the device sampler: from queueing the rows' sampling records to the ids on
    /// the host; 0 when it did not run. After a `decode` ([`CudaBackend::sample_last_step`]) the
    /// path alone; in [`Backend::decode_sampled`] it also covers the end of the step, as
    /// `argmax_ms` does.
    pub sample_ms: f64,
    /// Device time of the sampling kernel alone (CUDA events); 0 when it did not run.
    pub sample_gpu_ms: f64,
}

/// Work buffers, sized for `cap` tokens (`2 cap` rows where split) at construction.
struct Bufs {
    tokens: DevBuf,
    pos: DevBuf,
    slot: DevBuf,
    x: DevBuf,
    xb: DevBuf,
    /// f32 twins of xb, ab and mb (unrounded): the fused GEMV's inputs.
    xf: DevBuf,
    af: DevBuf,
    mf: DevBuf,
    /// BF16 scratch of chunked decodes, and the split-K partial sums of the GEMV.
    scratch: DevBuf,
    partial: DevBuf,
    qkv: DevBuf,
    q: DevBuf,
    ab: DevBuf,
    y: DevBuf,
    gu: DevBuf,
    mb: DevBuf,
    logits_raw: DevBuf,
    logits: DevBuf,
    /// i32 ids of a decode step's rows (the device argmax's or sampler's output).
    ids: DevBuf,
    /// i32 rows of a fused step's pass whose logits are wanted (`gather_rows`' indices).
    gather: DevBuf,
    /// The device sampler's per-row records (its edits go into `logits_raw`).
    sample_rows: DevBuf,
    /// The split decode attention's partials: (max, sum) and accumulators.
    attn_ml: DevBuf,
    attn_acc: DevBuf,
    cos: DevBuf,
    sin: DevBuf,
}

/// Which rows' logits a pass computes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// None (a prompt chunk that is not the last).
    None,
    /// The last row only (prefill).
    Last,
    /// Every row (decode).
    All,
    /// The `rows` rows listed in `bufs.gather` (a fused step's pass), into rows `out0..` of
    /// `bufs.logits`.
    Gathered {
        /// How many.
        rows: usize,
        /// The first output row.
        out0: usize,
    },
}

/// How a pass's attention runs.
#[derive(Clone, Copy)]
enum Attend<'a> {
    /// Every row its own sequence's token (a decode batch): the per-token kernel, split along
    /// the sequence as `sizing::decode_splits` says for the pass's rows.
    Decode,
    /// Every row a token of one prompt chunk: the tiled prefill kernel.
    Prefill,
    /// A fused step's pass: the tiled kernel over each `prefill` part (first row, rows: one
    /// sequence each), the per-token kernel in `splits` over the `decode` rows.
    Mixed {
        prefill: &'a [(usize, usize)],
        decode: Option<(usize, usize)>,
        splits: usize,
    },
}

/// The CUDA backend.
pub struct CudaBackend {
    cfg: LlamaConfig,
    // Field order is drop order: graphs, then buffers, handles and modules, then the context.
    graphs: HashMap<usize, Graph>,
    /// Buckets whose graph capture failed: they run eagerly (logged once, counted in
    /// [`CudaBackend::graph_failures`]) instead of failing every step.
    graphless: HashMap<usize, String>,
    host_logits: PinnedBuf,
    kv: KvCache,
    bufs: Bufs,
    /// Possibly shared with other instances ([`device_weights`]); `shared_key` is its key there.
    weights: Arc<Weights>,
    shared_key: Option<WeightsKey>,
    /// Whether the weights were already on the device, loaded by another instance.
    reused_weights: bool,
    blas: Cublas,
    k: Kernels,
    t3: Tbe3Kernels,
    plan: Plan,
    shapes: RoleShapes,
    sms: usize,
    /// Pinned memory every step's inputs (tokens, positions, slots, sampling records) go up
    /// from without waiting: a decode step synchronises once, when its ids come back.
    staging: Staging,
    /// Events around the last decode step's graph (or kernels); read once the stream was
    /// synchronised after it (`step_timed`).
    step_events: (Event, Event),
    /// Whether `step_events` hold a step whose device time is not in `timing` yet.
    step_timed: bool,
    /// Events around the token choice (argmax or sampler kernel) after a step.
    choice_events: (Event, Event),
    /// Pinned memory the chosen ids come back to, copied asynchronously right after the
    /// choosing kernel, with the event a collection waits for.
    host_ids: IdsDownload,
    ctx: Arc<Context>,
    opts: CudaOptions,
    cap: usize,
    buckets: Vec<usize>,
    weight_bytes: usize,
    weight_memory: usize,
    timing: StepTiming,
    /// Rows of decode logits `bufs.logits` holds from the last decode step (0 after a prefill,
    /// or a step that failed before its logits were complete): what
    /// [`CudaBackend::argmax_last_step`] may read.
    logit_rows: usize,
    /// The step [`Backend::launch_decode`] or [`Backend::launch_step`] left running, to be
    /// collected.
    in_flight: Option<choosing::InFlight>,
}

/// Builds a backend with `opts` whose [`PlanSource::Auto`] was resolved to `plan` (from
/// `source`), and labels and logs where its plan came from.
/// Pinned staging memory for a backend's step inputs: a few steps' worth of tokens, positions,
/// slots and sampling records (more than that waits for the stream and wraps; a batch's logit
/// edits beyond it go up synchronously).
const STAGING_BYTES: usize = 4 << 20;

/// A kernel's i32 ids as token ids, or an error naming the kernel (`who`) when one is outside
/// the vocabulary (-1: a row the kernel did not answer).
fn ids_in_vocab(ids: Vec<i32>, vocab: usize, who: &str) -> GpuResult<Vec<u32>> {
    ids.into_iter()
        .map(|id| match u32::try_from(id) {
            Ok(id) if (id as usize) < vocab => Ok(id),
            _ => Err(GpuError::invalid(format!(
                "the device {who} returned id {id} (vocabulary {vocab})"
            ))),
        })
        .collect()
}

impl CudaBackend {
    /// Bytes of weights one decode step reads (every matrix once; the embedding gather reads a
    /// few rows and is not counted).
    pub fn weight_bytes_per_step(&self) -> usize {
        self.weight_bytes
    }

    /// Device bytes of all the weights (matrices in their storage form, embedding, norms): what
    /// compression saves, next to [`CudaBackend::bf16_weight_bytes`].
    pub fn weight_memory_bytes(&self) -> usize {
        self.weight_memory
    }

    /// What the same weights take as BF16 matrices and f32 norms (the checkpoint's size on the
    /// device): the denominator of the memory goal (compressed ≤ 72% of it).
    pub fn bf16_weight_bytes(&self) -> usize {
        let c = &self.cfg;
        let s = &self.shapes;
        let per_layer: usize = [Role::Qkv, Role::O, Role::GateUp, Role::Down]
            .iter()
            .map(|r| 2 * s[r].len())
            .sum();
        let head = if c.tie_word_embeddings { 1 } else { 2 };
        per_layer * c.num_hidden_layers
            + head * 2 * s[&Role::LmHead].len()
            + 4 * c.hidden_size * (2 * c.num_hidden_layers + 1)
    }

    /// Bytes of the KV cache: its block pool (the padding block included) and block table.
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }

    /// KV-cache bytes one cached position holds over all layers (keys and values, in the
    /// cache's own element type): what attention reads per position per step.
    pub fn kv_bytes_per_position(&self) -> usize {
        paged::block_bytes(self.cfg.num_hidden_layers, self.cfg.kv_dim()) / paged::BLOCK_TOKENS
    }

    /// Sequences of the full context (`max_context` tokens) the KV cache holds at once: its
    /// blocks divided among them, at most `max_sequences`.
    pub fn kv_full_context_sequences(&self) -> usize {
        let per = paged::blocks_for(self.kv.max_context).max(1);
        (self.kv.total_blocks() / per).min(self.kv.max_sequences)
    }

    /// The shapes of the linear layers (fused as the backend runs them).
    pub fn shapes(&self) -> &RoleShapes {
        &self.shapes
    }

    /// The plan the linear layers run by; its `source` says where it came from ("default",
    /// "table", "tuning table PATH", "tuned at load in 41.3 s, saved to PATH").
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Buckets whose CUDA graph capture failed, with the error: they run eagerly. Benchmarks
    /// record this, since eager steps pay every launch.
    pub fn graph_failures(&self) -> Vec<(usize, String)> {
        let mut v: Vec<(usize, String)> = self
            .graphless
            .iter()
            .map(|(b, e)| (*b, e.clone()))
            .collect();
        v.sort();
        v
    }

    /// The decode batch buckets (one CUDA graph each).
    pub fn buckets(&self) -> &[usize] {
        &self.buckets
    }

    /// Timing of the last decode step.
    pub fn last_timing(&self) -> StepTiming {
        self.timing
    }
}

impl Backend for CudaBackend {
    fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    fn kv_capacity(&self) -> KvCapacity {
        KvCapacity {
            max_sequences: self.kv.max_sequences,
            max_context: self.kv.max_context,
        }
    }

    fn kv_usage(&self) -> crate::device::KvUsage {
        self.kv.usage()
    }

    fn weight_memory(&self) -> crate::device::WeightMemory {
        crate::device::WeightMemory {
            bytes: self.weight_memory_bytes() as u64,
            bf16_bytes: self.bf16_weight_bytes() as u64,
        }
    }

    fn new_sequence(&mut self) -> Result<SeqId, DeviceError> {
        self.kv.alloc()
    }

    fn free_sequence(&mut self, seq: SeqId) {
        // The engine frees only between steps; a direct caller may free a sequence of a step in
        // flight. Its blocks go back now (the step still writes its row there, harmlessly: every
        // call that reserves blocks is refused until the step is collected) and the collection
        // leaves its dead handle alone.
        if let Some(f) = self.in_flight.as_mut() {
            f.forget(seq);
        }
        self.kv.free(seq)
    }

    fn sequence_len(&self, seq: SeqId) -> Result<usize, DeviceError> {
        self.kv.len(seq)
    }

    fn prefill(&mut self, seq: SeqId, tokens: &[u32]) -> Result<Vec<f32>, DeviceError> {
        self.refuse_in_flight("prefill")?;
        let len = self.check_prefill(seq, tokens)?;
        let r = self.prefill_inner(seq, len, tokens);
        if r.is_err() {
            self.kv.truncate(seq, len);
        }
        let logits = self.on_fault(r.map_err(DeviceError::from))?;
        self.kv.set_len(seq, len + tokens.len());
        Ok(logits)
    }

    fn decode(&mut self, batch: &[DecodeItem]) -> Result<Logits, DeviceError> {
        let vocab = self.cfg.vocab_size;
        self.refuse_in_flight("decode")?;
        self.check_batch(batch)?;
        if batch.is_empty() {
            return Ok(Logits {
                vocab,
                data: Vec::new(),
            });
        }
        self.reserve_batch(batch)?;
        let r = self.decode_inner(batch);
        if r.is_err() {
            self.release_batch(batch);
        }
        let data = self.on_fault(r.map_err(DeviceError::from))?;
        for it in batch {
            self.kv.set_len(it.seq, it.pos + 1);
        }
        Ok(Logits { vocab, data })
    }

    /// The step of `decode`, then the argmax kernel over its logits on the device: only
    /// `batch.len()` i32 ids come back (Llama 3 at batch 128: 512 bytes instead of 64 MB).
    fn context_lost(&self) -> Option<DeviceError> {
        self.ctx.lost().then(|| {
            DeviceError::Cuda(GpuError {
                message: format!(
                    "device {}'s context was lost to a fatal fault (in this instance or another \
                     on the same GPU)",
                    self.ctx.ordinal()
                ),
                kind: FaultKind::Fatal,
            })
        })
    }

    fn decode_argmax(&mut self, batch: &[DecodeItem]) -> Result<Vec<u32>, DeviceError> {
        self.check_batch(batch)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.decode_choosing(batch, |b| b.device_argmax(batch.len()))
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    /// The prefill, then its last row's token chosen on the device (the argmax kernel for a
    /// greedy row without edits, the sampler otherwise): only one i32 comes back.
    fn prefill_sampled(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        row: &RowSampling,
    ) -> Result<u32, DeviceError> {
        self.prefill_choosing(seq, tokens, row)
    }

    /// Ids (argmax or sampler) are left in flight: inputs uploaded, the step's graph and the
    /// choosing kernel queued; logits run synchronously (`decode`).
    fn launch_decode(
        &mut self,
        batch: &[DecodeItem],
        choice: DecodeChoice<'_>,
    ) -> Result<Launched, DeviceError> {
        self.launch_choosing(batch, choice)
    }

    fn collect_step(&mut self) -> Result<DecodeOutput, DeviceError> {
        self.collect_choosing()
    }

    /// The step of `decode`, then `sample_rows` over its logits on the device: the rows'
    /// sampling records are packed and checked before anything runs, and only `batch.len()`
    /// i32 ids come back.
    fn decode_sampled(
        &mut self,
        batch: &[DecodeItem],
        rows: &[RowSampling],
    ) -> Result<Vec<u32>, DeviceError> {
        self.check_batch(batch)?;
        if rows.len() != batch.len() {
            return Err(DeviceError::Invalid(format!(
                "decode_sampled: {} sampling rows for a batch of {}",
                rows.len(),
                batch.len()
            )));
        }
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let packed = sample::pack(rows, self.cfg.vocab_size, self.edit_capacity())?;
        self.decode_choosing(batch, |b| b.device_sample(&packed))
    }

    /// True for every plan and option: a step with prompt chunks runs as one forward pass over
    /// all its rows (`fused`); one without runs as the decode step (its graph).
    fn fuses_steps(&self) -> bool {
        true
    }

    /// Prompt chunks and decode rows as one pass (several, in order, past `cap` rows), all or
    /// nothing; only the wanted rows' logits are computed and copied back (synchronously).
    /// Without chunks, the decode step ([`Backend::decode`]) itself.
    fn step(
        &mut self,
        chunks: &[ChunkItem<'_>],
        batch: &[DecodeItem],
    ) -> Result<Logits, DeviceError> {
        if chunks.is_empty() {
            return self.decode(batch);
        }
        let vocab = self.cfg.vocab_size;
        let data = self.fused_logits(chunks, batch)?;
        Ok(Logits { vocab, data })
    }

    /// [`Backend::launch_step`], then its collection: the same pass, choice and one
    /// synchronisation as a step left in flight.
    fn step_sampled(
        &mut self,
        chunks: &[ChunkItem<'_>],
        chunk_rows: &[Option<RowSampling>],
        batch: &[DecodeItem],
        rows: &[RowSampling],
    ) -> Result<Vec<u32>, DeviceError> {
        let choice = StepChoice::Sampled {
            chunks: chunk_rows,
            rows,
        };
        let out = match self.launch_step(chunks, batch, choice)? {
            Launched::Done(out) => out,
            Launched::InFlight => self.collect_step()?,
        };
        match out {
            DecodeOutput::Ids(ids) => Ok(ids),
            DecodeOutput::Logits(_) => Err(DeviceError::cuda(
                "step_sampled: the step brought back logits, not ids".into(),
            )),
        }
    }

    /// Ids are left in flight: [`Backend::step`]'s pass (every pass of it), then every wanted
    /// row's token chosen on the device in one launch (the argmax kernel when every row is
    /// greedy without edits, the sampler otherwise, its records packed and checked before
    /// anything runs), only the ids coming back at the collection. Without chunks, the decode
    /// step's own launch (its graph). Logits run synchronously ([`Backend::step`]).
    fn launch_step(
        &mut self,
        chunks: &[ChunkItem<'_>],
        batch: &[DecodeItem],
        choice: StepChoice<'_>,
    ) -> Result<Launched, DeviceError> {
        // The contract first: a bad record in flight is refused as a call in flight.
        self.refuse_in_flight("launch_step")?;
        let StepChoice::Sampled {
            chunks: chunk_rows,
            rows,
        } = choice
        else {
            return Ok(Launched::Done(DecodeOutput::Logits(
                self.step(chunks, batch)?,
            )));
        };
        crate::device::check_sampling_rows(
            chunks.len(),
            chunk_rows.len(),
            batch.len(),
            rows.len(),
        )?;
        let all: Vec<RowSampling> = chunk_rows.iter().flatten().chain(rows).cloned().collect();
        let greedy = all.iter().all(|r| r.is_greedy() && r.edits.is_empty());
        if greedy {
            // The argmax path checks nothing of the records: as prefill_sampled, here.
            for r in &all {
                r.validate()
                    .map_err(|e| DeviceError::Invalid(format!("sampling of a step's row: {e}")))?;
            }
        }
        if chunks.is_empty() {
            let choice = if greedy {
                DecodeChoice::Argmax
            } else {
                DecodeChoice::Sampled(rows)
            };
            return self.launch_choosing(batch, choice);
        }
        let wants: Vec<bool> = chunk_rows.iter().map(Option::is_some).collect();
        let packed = if greedy {
            None
        } else {
            Some(sample::pack(
                &all,
                self.cfg.vocab_size,
                self.edit_capacity(),
            )?)
        };
        self.launch_fused(chunks, &wants, batch, packed.as_ref())
    }
}

impl CudaBackend {
    /// A checked, non-empty decode batch's step, then `choose` on its logits on the device (the
    /// argmax or the sampler): the ids, and the sequences one token longer; on an error, the
    /// sequences as they were (and a fatal fault reported, [`CudaBackend::on_fault`]).
    fn decode_choosing(
        &mut self,
        batch: &[DecodeItem],
        choose: impl FnOnce(&mut Self) -> GpuResult<Vec<u32>>,
    ) -> Result<Vec<u32>, DeviceError> {
        self.refuse_in_flight("decode")?;
        self.reserve_batch(batch)?;
        let r = self.run_decode(batch).and_then(|()| choose(self));
        if r.is_err() {
            self.release_batch(batch);
        }
        let ids = self.on_fault(r.map_err(DeviceError::from))?;
        for it in batch {
            self.kv.set_len(it.seq, it.pos + 1);
        }
        Ok(ids)
    }

    /// Passes a step's result through; on a fatal fault (the context is dead, and with it every
    /// buffer in it) the context is marked lost for every instance on the device
    /// ([`Context::mark_lost`]: they see it through [`Backend::context_lost`] and let go), and
    /// the shared device copy of the weights is forgotten by [`device_weights`], so that no
    /// engine built from now on (this instance's rebuild, another's, a new instance) is handed
    /// memory of the dead context.
    fn on_fault<T>(&self, r: Result<T, DeviceError>) -> Result<T, DeviceError> {
        let Err(e) = &r else { return r };
        if e.kind() != FaultKind::Fatal {
            return r;
        }
        if self.ctx.mark_lost() {
            tracing::warn!(
                ordinal = self.opts.ordinal,
                "fatal device fault: the device's context is lost for every instance on it; \
                 a new one is made once they have all let go"
            );
        }
        if let Some(key) = &self.shared_key {
            if device_weights().invalidate(key, &self.weights) {
                tracing::warn!(
                    ordinal = self.opts.ordinal,
                    "fatal device fault: the shared device copy of the weights will not be \
                     reused; engines built from now on upload their own"
                );
            }
        }
        r
    }

    /// Whether `other` runs on the very same device copy of the weights (instances of one
    /// model on one GPU share it).
    pub fn shares_weights_with(&self, other: &CudaBackend) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights)
    }

    /// Whether this backend found its weights already on the device (loaded by another
    /// instance of the same model) instead of loading them.
    pub fn reused_weights(&self) -> bool {
        self.reused_weights
    }

    /// The checks of a decode batch, before anything runs: distinct sequences, each at its
    /// length, with room for one more token, and tokens inside the vocabulary. (The KV blocks
    /// for the new positions are taken just before the step runs, after every other check:
    /// [`CudaBackend::reserve_batch`].)
    fn check_batch(&self, batch: &[DecodeItem]) -> Result<(), DeviceError> {
        let mut seen = std::collections::HashSet::new();
        for it in batch {
            if !seen.insert(it.seq) {
                return Err(DeviceError::Invalid(format!(
                    "sequence {:?} appears twice in one decode batch",
                    it.seq
                )));
            }
            let len = self.kv.len(it.seq)?;
            if it.pos != len {
                return Err(DeviceError::BadPosition {
                    seq: it.seq,
                    len,
                    pos: it.pos,
                });
            }
            self.check_room(it.seq, len + 1)?;
            self.check_token(it.token)?;
        }
        Ok(())
    }

    /// Reserves the block each row's new position may need, all or nothing: on
    /// [`DeviceError::KvFull`] the rows reserved before it are given back and nothing changed.
    /// New blocks' table entries go up on the stream, ahead of the step. A step that fails
    /// after this gives them back ([`CudaBackend::release_batch`]).
    fn reserve_batch(&mut self, batch: &[DecodeItem]) -> Result<(), DeviceError> {
        for (i, it) in batch.iter().enumerate() {
            if let Err(e) = self.kv.reserve(&mut self.staging, it.seq, it.pos + 1) {
                for done in &batch[..i] {
                    self.kv.truncate(done.seq, done.pos);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Undoes [`CudaBackend::reserve_batch`] after a failed step: each row's sequence keeps its
    /// `pos` tokens and the blocks those need, nothing more.
    pub(super) fn release_batch(&mut self, batch: &[DecodeItem]) {
        for it in batch {
            self.kv.truncate(it.seq, it.pos);
        }
    }
}
