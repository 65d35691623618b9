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
//! the ids copied back. The residual stream and the KV cache are f32, as on the CPU. GEMM
//! inputs are BF16; with `split_activations` (the default) each activation row goes in as two
//! BF16 rows whose sum is the f32 value to 2^-17 (kernels/common.cuh), so cuBLAS's products match
//! the CPU's f32-activation products to ~1e-5 while reading every weight once.
//!
//! A decode step is padded to a batch-size bucket (powers of two up to `max_sequences`) and runs
//! as that bucket's CUDA graph (the bucket's first step runs eagerly, then is captured); per-step
//! inputs (tokens, positions, slots) live in fixed device buffers the graph reads. Prefill runs eagerly in chunks of at most
//! `max_prefill_tokens`. Every buffer is allocated at construction.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::driver::{Context, Cublas, DevBuf, Event, GpuError, GpuResult, Graph, PinnedBuf};
use super::kernels::{Kernels, Product, ATTN_MAX_HEAD_DIM};
use super::kv::KvCache;
use super::linear::{Form, Input, Linear, Products};
use super::persist::weights_identity;
use super::plan::{Plan, Role, RoleShapes, Storage, Strategy, TuneTable};
use super::stream::{stream_weights_persisted, HostLinear, Slot, WeightSink};
use super::tbe3::{
    gemv_geometry_with_split, multiprocessors, DeviceTbe3, Tbe3Kernels, MAX_GEMV_BATCH,
};
use crate::codec::runtime::Shape;
use crate::container::Checkpoint;
use crate::device::shared::Registry;
use crate::device::{Backend, DecodeItem, DeviceError, FaultKind, KvCapacity, Logits, SeqId};
use crate::model::weights::{LlamaWeights, Matrix, MatrixData, WeightError};
use crate::model::LlamaConfig;

/// Where a backend's [`Plan`] comes from.
#[derive(Clone, Debug)]
pub enum PlanSource {
    /// Every matrix raw BF16, every product one cuBLAS call: the uncompressed baseline.
    Baseline,
    /// Every linear layer in tbe3 form with the untuned default strategies
    /// ([`super::plan::default_strategy`]).
    Compressed,
    /// Storage and strategies from a tuning table (`unweight tune`).
    Table(TuneTable),
    /// Exactly this plan.
    Given(Plan),
    /// The default: the model directory's tuning table for this device when present and
    /// usable; otherwise the model is tuned now on its layer-0 matrices (within 60 s) and the
    /// table saved there (a warning when the directory is not writable) and used
    /// ([`super::tune::table_for_model`]). [`CudaBackend::load`] fills in its directory.
    /// Without a directory ([`CudaBackend::synthetic`], or [`CudaBackend::from_weights`] given
    /// `dir: None`) it is [`PlanSource::Compressed`]: there is nowhere to keep a table, and
    /// tuning anew at every load would make two loads of one model run different plans.
    Auto {
        /// The model directory whose `tune/` holds the tables.
        dir: Option<PathBuf>,
    },
}

/// The plan as a user names it (`--plan`, Triton's `plan` parameter).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PlanChoice {
    /// The model directory's tuning table for this GPU, made at the first load when missing.
    #[default]
    Auto,
    /// Every linear layer compressed, untuned default strategies.
    Compressed,
    /// Uncompressed BF16 and cuBLAS: the baseline.
    Baseline,
}

impl PlanChoice {
    /// The [`PlanSource`] for a model in `dir` (where `Auto` keeps its tables).
    pub fn source(self, dir: Option<&Path>) -> PlanSource {
        match self {
            PlanChoice::Auto => PlanSource::Auto {
                dir: dir.map(Path::to_path_buf),
            },
            PlanChoice::Compressed => PlanSource::Compressed,
            PlanChoice::Baseline => PlanSource::Baseline,
        }
    }
}

impl Default for PlanSource {
    fn default() -> Self {
        PlanSource::Auto { dir: None }
    }
}

/// Settings of a [`CudaBackend`].
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// Device ordinal.
    pub ordinal: usize,
    /// Sequences live at once, at most (fewer if the KV budget holds fewer).
    pub max_sequences: usize,
    /// Tokens per sequence; `None` for the model's limit capped at 4096 (each slot of the slab
    /// holds this many positions, so it sizes the cache).
    pub max_context: Option<usize>,
    /// Bytes for the KV cache; `None` for [`CudaOptions::kv_fraction`] of the device memory
    /// left free once weights and work buffers are allocated.
    pub kv_budget_bytes: Option<usize>,
    /// Fraction of the free device memory (after weights, work buffers and a 512 MiB reserve)
    /// the KV cache may take when no budget is given, as vLLM's `gpu_memory_utilization`;
    /// default 0.5, the Triton backend's default 0.9 (`kv_cache_fraction`).
    pub kv_fraction: f64,
    /// Tokens per prefill pass; longer prompts go through in chunks.
    pub max_prefill_tokens: usize,
    /// Feed GEMMs hi + lo BF16 rows (f32-accurate, the default) instead of plain BF16.
    pub split_activations: bool,
    /// Run decode steps as CUDA graphs (one per batch bucket).
    pub graphs: bool,
    /// How the linear layers are stored and multiplied.
    pub plan: PlanSource,
    /// Run the plan's strategies on raw BF16 weights (the pass-through twins): the logits must
    /// equal the plan's own bit for bit. For checks and benchmarks.
    pub twin: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            ordinal: 0,
            max_sequences: 64,
            max_context: None,
            kv_budget_bytes: None,
            kv_fraction: 0.5,
            max_prefill_tokens: 512,
            split_activations: true,
            graphs: true,
            plan: PlanSource::default(),
            twin: false,
        }
    }
}

/// Timing of the last decode step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTiming {
    /// Device time of the step (graph or kernels), from CUDA events.
    pub gpu_ms: f64,
    /// Host time of copying the logits back (pinned memory), after the step finished; 0 when
    /// the step returned greedy ids instead ([`Backend::decode_argmax`]).
    pub copy_ms: f64,
    /// The batch bucket the step ran as.
    pub bucket: usize,
    /// Whether the step ran as a replay of its bucket's CUDA graph (false: launched eagerly,
    /// because graphs are off, this is the bucket's first step, or its capture failed).
    pub graph: bool,
    /// Host time of the greedy-id path after the step finished: the device argmax over the
    /// step's logits plus copying the ids back ([`Backend::decode_argmax`], or
    /// [`CudaBackend::argmax_last_step`] after a `decode`); 0 when it did not run. Next to
    /// `copy_ms` plus a host argmax, it says which way of getting greedy tokens is cheaper.
    pub argmax_ms: f64,
    /// Device time of the argmax kernel alone (CUDA events); 0 when it did not run.
    pub argmax_gpu_ms: f64,
}

struct LayerW {
    input_norm: DevBuf,
    qkv: Linear,
    o: Linear,
    post_norm: DevBuf,
    gate_up: Linear,
    down: Linear,
}

/// The device weights of one model in one plan's storage forms; shared by the instances that
/// run the same weights in the same forms on the same device ([`device_weights`]).
struct Weights {
    /// The embedding table, raw or tbe3 (`Plan::embed`); a tied lm_head's product reads it.
    embed: Linear,
    layers: Vec<LayerW>,
    norm: DevBuf,
    /// The output projection; `None` when tied: the product then reads the raw embedding.
    lm_head: Option<Linear>,
}

/// What makes two loads' device weights interchangeable: the same stored weights
/// ([`weights_identity`]), the same device, and the same storage form for every layer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct WeightsKey {
    identity: String,
    ordinal: usize,
    storage: String,
}

impl WeightsKey {
    /// The key of `identity`'s weights on device `ordinal` stored as `plan` says.
    fn new(identity: String, ordinal: usize, plan: &Plan) -> Self {
        let roles: Vec<Storage> = Role::ALL.iter().map(|&r| plan.storage(r)).collect();
        Self {
            identity,
            ordinal,
            storage: format!("embed {:?}, {roles:?}", plan.embed),
        }
    }
}

/// The process's device weights loaded from checkpoints ([`CudaBackend::load`]), one copy per
/// (weights, device, storage forms): instances of one model on one GPU share it
/// (docs/cuda.md, "Shared device weights").
fn device_weights() -> &'static Registry<WeightsKey, Weights> {
    static REGISTRY: std::sync::OnceLock<Registry<WeightsKey, Weights>> =
        std::sync::OnceLock::new();
    REGISTRY.get_or_init(Registry::new)
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
    /// i32 greedy ids of a decode step's rows (the device argmax's output).
    ids: DevBuf,
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
    events: (Event, Event),
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
}

fn bf16_bytes(m: &Matrix) -> Result<&[u8], DeviceError> {
    match &m.data {
        MatrixData::Bf16(bytes) => Ok(bytes),
        MatrixData::Compressed(_) => Err(DeviceError::Invalid(format!(
            "{}: the CUDA backend takes weights decoded at load (WeightMode::Decoded)",
            m.name
        ))),
    }
}

/// Uploads matrices stacked row-wise as one linear layer (fused q|k|v, gate|up) in `storage`.
fn upload_linear(
    ctx: &Arc<Context>,
    parts: &[&Matrix],
    storage: Storage,
) -> Result<Linear, DeviceError> {
    let cols = parts[0].cols;
    let rows: usize = parts.iter().map(|m| m.rows).sum();
    if let Some(m) = parts.iter().find(|m| m.cols != cols) {
        return Err(DeviceError::Invalid(format!(
            "{} has {} columns, {} has {cols}: they cannot be fused",
            m.name, m.cols, parts[0].name
        )));
    }
    let name = parts.iter().map(|m| m.name.as_str()).collect::<Vec<_>>();
    let wrap = |e: GpuError| DeviceError::Cuda(e.context(name.join(" | ")));
    if let [one] = parts {
        return Linear::upload(ctx, bf16_bytes(one)?, rows, cols, storage).map_err(wrap);
    }
    let mut bytes = Vec::with_capacity(2 * rows * cols);
    for m in parts {
        bytes.extend_from_slice(bf16_bytes(m)?);
    }
    Linear::upload(ctx, &bytes, rows, cols, storage).map_err(wrap)
}

/// The CUDA backend's [`WeightSink`]: uploads each piece as [`stream_weights`] hands it over
/// (the host buffers are dropped on return) and assembles the device weights.
struct UploadSink<'a> {
    ctx: &'a Arc<Context>,
    linears: std::collections::BTreeMap<Slot, Linear>,
    vectors: std::collections::BTreeMap<Slot, DevBuf>,
}

impl WeightSink for UploadSink<'_> {
    fn vector(&mut self, slot: Slot, values: Vec<f32>) -> Result<(), DeviceError> {
        self.vectors
            .insert(slot, DevBuf::from_host(self.ctx, &values)?);
        Ok(())
    }

    fn linear(&mut self, slot: Slot, shape: Shape, form: HostLinear) -> Result<(), DeviceError> {
        let wrap = |e: GpuError| DeviceError::Cuda(e.context(format_args!("{slot:?}")));
        let linear = match form {
            HostLinear::Raw(bytes) => {
                Linear::upload(self.ctx, &bytes, shape.rows, shape.cols, Storage::Raw)
                    .map_err(wrap)?
            }
            HostLinear::Tbe3(m) => Linear {
                shape,
                form: Form::Tbe3(DeviceTbe3::upload(self.ctx, &m).map_err(wrap)?),
            },
        };
        self.linears.insert(slot, linear);
        Ok(())
    }
}

impl UploadSink<'_> {
    /// The device weights of a model of `layers` layers, every piece present.
    fn finish(mut self, layers: usize) -> Result<Weights, DeviceError> {
        let missing = |slot: Slot| DeviceError::Invalid(format!("the load gave no {slot:?}"));
        let mut lin = |slot| self.linears.remove(&slot).ok_or_else(|| missing(slot));
        let embed = lin(Slot::Embed)?;
        let lm_head = lin(Slot::LmHead).ok();
        let mut ls = Vec::with_capacity(layers);
        for l in 0..layers {
            ls.push((
                lin(Slot::Qkv(l))?,
                lin(Slot::O(l))?,
                lin(Slot::GateUp(l))?,
                lin(Slot::Down(l))?,
            ));
        }
        let mut vec = |slot| self.vectors.remove(&slot).ok_or_else(|| missing(slot));
        let layers = ls
            .into_iter()
            .enumerate()
            .map(|(l, (qkv, o, gate_up, down))| {
                Ok(LayerW {
                    input_norm: vec(Slot::InputNorm(l))?,
                    qkv,
                    o,
                    post_norm: vec(Slot::PostNorm(l))?,
                    gate_up,
                    down,
                })
            })
            .collect::<Result<Vec<_>, DeviceError>>()?;
        Ok(Weights {
            embed,
            layers,
            norm: vec(Slot::Norm)?,
            lm_head,
        })
    }
}

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

/// Resolves `opts.plan` for a model of `shapes` on a device with `sms` multiprocessors: the
/// twin when asked, and a tied `lm_head` always raw (it is the embedding table, which the
/// gather reads as BF16; a tbe3 copy would add memory, not save it).
pub fn resolve_plan(opts: &CudaOptions, shapes: &RoleShapes, sms: usize, tied: bool) -> Plan {
    let buckets = decode_buckets(opts.max_sequences);
    let mut plan = match &opts.plan {
        PlanSource::Baseline => Plan::baseline(),
        PlanSource::Compressed | PlanSource::Auto { .. } => Plan::default_for(shapes, sms),
        PlanSource::Table(t) => Plan::from_table(t, shapes, &buckets, sms),
        PlanSource::Given(p) => p.clone(),
    };
    if tied {
        let table = match &opts.plan {
            PlanSource::Table(t) => Some(t),
            _ => None,
        };
        if let Some(head) = shapes.get(&Role::LmHead) {
            plan.set_storage(Role::LmHead, plan.embed, head, sms, table);
        }
    }
    if opts.twin {
        plan = plan.twin();
    }
    plan
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

/// Bytes of each work buffer a [`CudaBackend`] allocates on the device, for the larger of a
/// decode batch and a prefill chunk. The constructor allocates exactly these and
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
    /// RoPE cosine and sine tables for `max_context` positions.
    pub rope: usize,
    /// The cuBLAS handle's fixed workspace.
    pub cublas: usize,
}

impl WorkBuffers {
    /// The buffers of a backend for `cfg` under `opts`, with `plan` resolved for `shapes`
    /// ([`resolve_plan`]) and `max_context` positions of RoPE tables.
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

/// Builds a backend with `opts` whose [`PlanSource::Auto`] was resolved to `plan` (from
/// `source`), and labels and logs where its plan came from.
fn with_resolved_plan(
    opts: &CudaOptions,
    plan: PlanSource,
    source: String,
    build: impl FnOnce(&CudaOptions) -> Result<CudaBackend, DeviceError>,
) -> Result<CudaBackend, DeviceError> {
    let opts = CudaOptions {
        plan,
        ..opts.clone()
    };
    let mut b = build(&opts)?;
    b.plan.source = if opts.twin {
        format!("{source} (raw twin)")
    } else {
        source
    };
    tracing::info!(plan = %b.plan.source, "CUDA backend plan");
    Ok(b)
}

/// The plan [`PlanSource::Auto`] resolves to: `dir`'s tuning table for this device, or one made
/// now from `samples` (and saved there); should tuning fail, the default plan, with a warning.
/// Returns the plan and where it came from.
fn resolve_auto<'a>(
    cfg: &LlamaConfig,
    dir: &Path,
    opts: &CudaOptions,
    samples: impl FnOnce() -> Result<Vec<super::tune::Sample<'a>>, DeviceError>,
) -> Result<(PlanSource, String), DeviceError> {
    Ok(
        match super::tune::table_for_model(
            dir,
            &role_shapes(cfg)?,
            samples,
            opts.ordinal,
            &super::tune::TuneOptions::default(),
        ) {
            Ok((t, source)) => (PlanSource::Table(t), source),
            Err(e) => {
                tracing::warn!(error = %e, "tuning failed; using the default plan");
                (
                    PlanSource::Compressed,
                    format!("default (tuning failed: {e})"),
                )
            }
        },
    )
}

/// What a `build` closure makes: the device weights, their key in [`device_weights`] when
/// they are shared there, and whether they were already there (loaded by another instance).
type Made = (Arc<Weights>, Option<WeightsKey>, bool);

/// Largest number of tokens one pass may take: the attention grid's y dimension.
pub(crate) const MAX_PASS_TOKENS: usize = 65535;

impl CudaBackend {
    /// Reads `config.json` and streams the weights of a checkpoint directory to the device
    /// tensor by tensor ([`stream_weights_persisted`]: read, decode, encode the plan's runtime
    /// form, upload, drop), so no host copy of the model is made or kept. The tbe3 images are
    /// computed once per model: persisted in `dir/runtime/` at the first load and read from
    /// there by later ones. Another instance's device copy of the same weights in the same
    /// forms on the same GPU is shared instead of loading again. With
    /// [`PlanSource::Auto`] the tuning table of `dir` is used, or made from layer 0's matrices
    /// read from the checkpoint; should tuning fail, the default plan is used with a warning.
    pub fn load(dir: &Path, opts: &CudaOptions) -> Result<Self, DeviceError> {
        let cfg = LlamaConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir).map_err(WeightError::from)?;
        let auto_dir = match &opts.plan {
            PlanSource::Auto { dir: Some(d) } => Some(d.clone()),
            PlanSource::Auto { dir: None } => Some(dir.to_path_buf()),
            _ => None,
        };
        if let Some(tune_dir) = auto_dir {
            let (plan, source) = resolve_auto(&cfg, &tune_dir, opts, || {
                super::tune::checkpoint_samples(&ckpt, &cfg)
            })?;
            return with_resolved_plan(opts, plan, source, |opts| {
                Self::load_streamed(cfg, &ckpt, opts)
            });
        }
        Self::load_streamed(cfg, &ckpt, opts)
    }

    /// [`CudaBackend::load`] once the plan is known (not [`PlanSource::Auto`]): the device copy
    /// another instance of the same weights in the same forms holds on this device, else the
    /// weights streamed to the device with the runtime form persisted in the model directory
    /// ([`stream_weights_persisted`]: read from there when it was persisted before).
    fn load_streamed(
        cfg: LlamaConfig,
        ckpt: &Checkpoint,
        opts: &CudaOptions,
    ) -> Result<Self, DeviceError> {
        let layers = cfg.num_hidden_layers;
        let model = cfg.clone();
        let dir = ckpt.dir().to_path_buf();
        let identity = weights_identity(ckpt);
        Self::build(cfg, opts, |ctx, _k, plan| {
            let upload = || {
                let mut sink = UploadSink {
                    ctx,
                    linears: Default::default(),
                    vectors: Default::default(),
                };
                let (t, persisted) = stream_weights_persisted(ckpt, &model, plan, &mut sink, &dir)?;
                tracing::info!(
                    read_decode_s = t.read_decode_s,
                    encode_s = t.encode_s,
                    encoded = t.encoded,
                    persisted_read_s = t.persisted_read_s,
                    from_persisted = t.from_persisted,
                    persisted_write_s = t.persisted_write_s,
                    upload_s = t.sink_s,
                    runtime_form = ?persisted,
                    "weights streamed to the device"
                );
                sink.finish(layers)
            };
            match &identity {
                Ok(id) => {
                    let key = WeightsKey::new(id.clone(), opts.ordinal, plan);
                    let (w, reused) = device_weights().get_or_load(&key, upload)?;
                    if reused {
                        tracing::info!(
                            ordinal = opts.ordinal,
                            "the weights are already on this GPU (another instance of the \
                             model): sharing that copy"
                        );
                    }
                    Ok((w, Some(key), reused))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the weights' identity could not be read; this instance's device copy is not shared");
                    Ok((Arc::new(upload()?), None, false))
                }
            }
        })
    }

    /// Uploads loaded weights (which must be
    /// [`WeightMode::Decoded`](crate::model::weights::WeightMode::Decoded)). With
    /// [`PlanSource::Auto`] and a directory, its tuning table is used, or made (layer 0's
    /// matrices are the samples); should tuning fail, the default plan is used with a warning.
    pub fn from_weights(
        cfg: LlamaConfig,
        w: &LlamaWeights,
        opts: &CudaOptions,
    ) -> Result<Self, DeviceError> {
        if let PlanSource::Auto { dir: Some(dir) } = &opts.plan {
            let (plan, source) = resolve_auto(&cfg, dir, opts, || super::tune::layer0_samples(w))?;
            return with_resolved_plan(opts, plan, source, |opts| Self::from_weights(cfg, w, opts));
        }
        Self::build(cfg, opts, |ctx, _k, plan| {
            let st = |r: Role| plan.storage(r);
            let layers = w
                .layers
                .iter()
                .map(|lw| {
                    Ok(LayerW {
                        input_norm: DevBuf::from_host(ctx, &lw.input_norm)?,
                        qkv: upload_linear(
                            ctx,
                            &[&lw.q_proj, &lw.k_proj, &lw.v_proj],
                            st(Role::Qkv),
                        )?,
                        o: upload_linear(ctx, &[&lw.o_proj], st(Role::O))?,
                        post_norm: DevBuf::from_host(ctx, &lw.post_attention_norm)?,
                        gate_up: upload_linear(
                            ctx,
                            &[&lw.gate_proj, &lw.up_proj],
                            st(Role::GateUp),
                        )?,
                        down: upload_linear(ctx, &[&lw.down_proj], st(Role::Down))?,
                    })
                })
                .collect::<Result<Vec<_>, DeviceError>>()?;
            let w = Weights {
                embed: upload_linear(ctx, &[&w.embed_tokens], plan.embed)?,
                layers,
                norm: DevBuf::from_host(ctx, &w.norm)?,
                lm_head: w
                    .lm_head
                    .as_ref()
                    .map(|m| upload_linear(ctx, &[m], st(Role::LmHead)))
                    .transpose()?,
            };
            Ok((Arc::new(w), None, false))
        })
    }

    /// A model of `cfg`'s shape whose weights are generated in device memory: every matrix
    /// N(0, sigma) BF16 from `seed`, norms 1.0. For benchmarks at real scale (an 8B model)
    /// without writing or uploading 16 GB. Matrices the plan stores as tbe3 are generated once
    /// per role, encoded on the CPU and copied into every layer (same bytes moved per step as
    /// distinct values; the raw ones are distinct per layer). With `opts.twin` the same roles
    /// are generated once and copied raw, so the twin holds exactly the weights of the plan it
    /// twins (the same seeds in the same order) and its logits can be compared bit for bit.
    pub fn synthetic(
        cfg: LlamaConfig,
        seed: u64,
        sigma: f32,
        opts: &CudaOptions,
    ) -> Result<Self, DeviceError> {
        let layers = cfg.num_hidden_layers;
        let tied = cfg.tie_word_embeddings;
        let shapes = role_shapes(&cfg)?;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        // Which roles are shared across layers: those the plan (before any twinning) stores as
        // tbe3. Storage never depends on the device's multiprocessors, so 1 will do here.
        let untwinned = CudaOptions {
            twin: false,
            ..opts.clone()
        };
        let shared = resolve_plan(&untwinned, &shapes, 1, tied);
        Self::build(cfg, opts, |ctx, k, plan| {
            let mut tensor = 0u64;
            let mut raw = |elems: usize| -> Result<DevBuf, DeviceError> {
                let b = DevBuf::new(ctx, 2 * elems)?;
                tensor += 1;
                k.fill_normal_bf16(
                    b.ptr(),
                    elems,
                    seed ^ tensor.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    sigma,
                )?;
                Ok(b)
            };
            // One matrix per shared role: a tbe3 image encoded from a generated matrix
            // (downloaded once), or, in the raw twin, the generated matrix itself.
            let mut images = std::collections::BTreeMap::new();
            for (&role, shape) in &shapes {
                if shared.storage(role) == Storage::Tbe3 && !(role == Role::LmHead && tied) {
                    let b = raw(shape.len())?;
                    let one = if plan.storage(role) == Storage::Tbe3 {
                        ctx.sync()?;
                        let mut bytes = vec![0u8; 2 * shape.len()];
                        b.download(&mut bytes)?;
                        Linear::upload(ctx, &bytes, shape.rows, shape.cols, Storage::Tbe3)?
                    } else {
                        Linear::raw(b, shape.rows, shape.cols)?
                    };
                    images.insert(role, one);
                }
            }
            let mut linear = |role: Role| -> Result<Linear, DeviceError> {
                let s = shapes[&role];
                match images.get(&role).map(|l| &l.form) {
                    Some(super::linear::Form::Tbe3(m)) => Ok(Linear {
                        shape: s,
                        form: super::linear::Form::Tbe3(m.duplicate(ctx)?),
                    }),
                    Some(super::linear::Form::Raw(b)) => {
                        let c = DevBuf::new(ctx, 2 * s.len())?;
                        // SAFETY: both buffers hold the role's `2 × rows × cols` bytes.
                        unsafe { super::driver::copy_dtod(ctx, c.ptr(), b.ptr(), 2 * s.len())? };
                        Ok(Linear::raw(c, s.rows, s.cols)?)
                    }
                    None => Ok(Linear::raw(raw(s.len())?, s.rows, s.cols)?),
                }
            };
            let ones = |elems: usize| -> Result<DevBuf, DeviceError> {
                let b = DevBuf::new(ctx, 4 * elems)?;
                k.fill_f32(b.ptr(), elems, 1.0)?;
                Ok(b)
            };
            let mut ls = Vec::with_capacity(layers);
            for _ in 0..layers {
                ls.push(LayerW {
                    input_norm: ones(h)?,
                    qkv: linear(Role::Qkv)?,
                    o: linear(Role::O)?,
                    post_norm: ones(h)?,
                    gate_up: linear(Role::GateUp)?,
                    down: linear(Role::Down)?,
                });
            }
            let lm_head = if tied {
                None
            } else {
                Some(linear(Role::LmHead)?)
            };
            // The embedding: a copy of lm_head's shared matrix when there is one (same shape),
            // else generated (and encoded when the plan compresses it).
            let embed = if shared.embed == Storage::Tbe3 && images.contains_key(&Role::LmHead) {
                linear(Role::LmHead)?
            } else {
                let b = raw(v * h)?;
                if plan.embed == Storage::Tbe3 {
                    ctx.sync()?;
                    let mut bytes = vec![0u8; 2 * v * h];
                    b.download(&mut bytes)?;
                    Linear::upload(ctx, &bytes, v, h, Storage::Tbe3)?
                } else {
                    Linear::raw(b, v, h)?
                }
            };
            let w = Weights {
                embed,
                layers: ls,
                norm: ones(h)?,
                lm_head,
            };
            Ok((Arc::new(w), None, false))
        })
    }

    fn build(
        cfg: LlamaConfig,
        opts: &CudaOptions,
        make: impl FnOnce(&Arc<Context>, &Kernels, &Plan) -> Result<Made, DeviceError>,
    ) -> Result<Self, DeviceError> {
        let hd = cfg.head_dim;
        if !hd.is_multiple_of(32) || hd > ATTN_MAX_HEAD_DIM {
            return Err(DeviceError::Invalid(format!(
                "the CUDA attention kernel needs head_dim a multiple of 32 up to {ATTN_MAX_HEAD_DIM}; this model has {hd}"
            )));
        }
        if opts.max_sequences == 0 || opts.max_prefill_tokens == 0 {
            return Err(DeviceError::Invalid(
                "max_sequences and max_prefill_tokens must be at least 1".into(),
            ));
        }
        if opts.max_sequences > MAX_PASS_TOKENS || opts.max_prefill_tokens > MAX_PASS_TOKENS {
            return Err(DeviceError::Invalid(format!(
                "max_sequences and max_prefill_tokens must be at most {MAX_PASS_TOKENS} (the attention grid)"
            )));
        }
        let max_context = opts
            .max_context
            .unwrap_or(4096)
            .min(cfg.max_position_embeddings)
            .max(1);
        if !super::kernels::built_with_kernels() {
            return Err(DeviceError::cuda(
                "built without CUDA kernels (nvcc was not found when the crate was compiled)"
                    .into(),
            ));
        }
        let ctx = Context::new(opts.ordinal)?;
        let k = Kernels::load(&ctx)?;
        let t3 = Tbe3Kernels::load(&ctx)?;
        let blas = Cublas::new(&ctx)?;
        let sms = multiprocessors(&ctx)?;
        let shapes = role_shapes(&cfg)?;
        let plan = resolve_plan(opts, &shapes, sms, cfg.tie_word_embeddings);
        let (weights, shared_key, reused_weights) = make(&ctx, &k, &plan)?;
        ctx.sync()?;
        let (h, v, kvd) = (cfg.hidden_size, cfg.vocab_size, cfg.kv_dim());
        let mut weight_bytes = 0;
        for lw in &weights.layers {
            weight_bytes += lw.qkv.bytes() + lw.o.bytes() + lw.gate_up.bytes() + lw.down.bytes();
        }
        weight_bytes += weights.lm_head.as_ref().unwrap_or(&weights.embed).bytes();
        // Memory: every matrix once (a tied lm_head is the embedding), plus the norms.
        let weight_memory = weight_bytes
            + if weights.lm_head.is_some() {
                weights.embed.bytes()
            } else {
                0
            }
            + 4 * h * (2 * weights.layers.len() + 1);
        // Work buffers for the larger of a decode batch and a prefill chunk (sized by
        // `WorkBuffers`, which `unweight plan-memory` counts too).
        let wb = WorkBuffers::new(&cfg, &plan, &shapes, opts, max_context);
        let (cap, lcap) = (wb.cap, opts.max_sequences);
        let inv_freq = cfg.rope_inv_freq();
        let half = hd / 2;
        let (mut cos, mut sin) = (
            vec![0f32; max_context * half],
            vec![0f32; max_context * half],
        );
        for p in 0..max_context {
            for (i, &f) in inv_freq.iter().enumerate() {
                // As ops::rope_table: the angle in f64, rounded to f32 after cos/sin.
                let a = p as f64 * f;
                cos[p * half + i] = a.cos() as f32;
                sin[p * half + i] = a.sin() as f32;
            }
        }
        let buf = |bytes: usize| DevBuf::new(&ctx, bytes);
        let bufs = Bufs {
            tokens: buf(wb.tokens)?,
            pos: buf(wb.pos)?,
            slot: buf(wb.slot)?,
            x: buf(wb.x)?,
            xb: buf(wb.xb)?,
            xf: buf(wb.xf)?,
            af: buf(wb.af)?,
            mf: buf(wb.mf)?,
            scratch: buf(wb.scratch)?,
            partial: buf(wb.partial)?,
            qkv: buf(wb.qkv)?,
            q: buf(wb.q)?,
            ab: buf(wb.ab)?,
            y: buf(wb.y)?,
            gu: buf(wb.gu)?,
            mb: buf(wb.mb)?,
            logits_raw: buf(wb.logits_raw)?,
            logits: buf(wb.logits)?,
            ids: buf(wb.ids)?,
            cos: DevBuf::from_host(&ctx, &cos)?,
            sin: DevBuf::from_host(&ctx, &sin)?,
        };
        debug_assert_eq!(2 * 4 * cos.len(), wb.rope);
        let host_logits = PinnedBuf::new(&ctx, lcap * v)?;
        // The KV cache from what is left.
        let (free, _) = ctx.mem_info()?;
        let reserve = 512usize << 20; // graphs, cuBLAS internals, fragmentation
        let slot_bytes = KvCache::slot_bytes(cfg.num_hidden_layers, kvd, max_context);
        let (_, max_sequences) = kv_plan(
            free,
            reserve,
            opts.kv_budget_bytes,
            opts.kv_fraction,
            slot_bytes,
            opts.max_sequences,
            max_context,
        )
        .map_err(DeviceError::Invalid)?;
        let kv = KvCache::new(&ctx, cfg.num_hidden_layers, kvd, max_sequences, max_context)?;
        let buckets = decode_buckets(max_sequences);
        let events = (Event::new(&ctx)?, Event::new(&ctx)?);
        Ok(Self {
            cfg,
            graphs: HashMap::new(),
            graphless: HashMap::new(),
            host_logits,
            kv,
            bufs,
            weights,
            shared_key,
            reused_weights,
            blas,
            k,
            t3,
            plan,
            shapes,
            sms,
            events,
            ctx,
            opts: opts.clone(),
            cap,
            buckets,
            weight_bytes,
            weight_memory,
            timing: StepTiming::default(),
            logit_rows: 0,
        })
    }

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

    /// Bytes of the KV-cache slab.
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }

    /// KV-cache bytes one cached position holds over all layers (keys and values, in the
    /// cache's own element type): what attention reads per position per step.
    pub fn kv_bytes_per_position(&self) -> usize {
        KvCache::slot_bytes(self.cfg.num_hidden_layers, self.cfg.kv_dim(), 1)
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

    /// The greedy ids of the last decode step's rows, chosen on the device from the logits that
    /// step left in device memory (the logits `decode` returned, bit for bit): the path of
    /// [`Backend::decode_argmax`], run after a [`Backend::decode`]. For the benchmark, which
    /// times both ways of getting greedy tokens on the same step ([`StepTiming::argmax_ms`])
    /// and checks they agree. An error when no decode step's logits are there (none yet, or a
    /// prefill or a failed step came after).
    pub fn argmax_last_step(&mut self) -> Result<Vec<u32>, DeviceError> {
        if self.logit_rows == 0 {
            return Err(DeviceError::Invalid(
                "argmax_last_step: no decode step's logits on the device".into(),
            ));
        }
        Ok(self.device_argmax(self.logit_rows)?)
    }

    /// Runs the argmax kernel over the first `rows` rows of the logits buffer and copies the
    /// ids back; records its timing.
    fn device_argmax(&mut self, rows: usize) -> GpuResult<Vec<u32>> {
        self.ctx.bind()?;
        let vocab = self.cfg.vocab_size;
        let t = Instant::now();
        self.events.0.record()?;
        self.k
            .argmax_rows(self.bufs.logits.ptr(), rows, vocab, self.bufs.ids.ptr())?;
        self.events.1.record()?;
        let mut ids = vec![0i32; rows];
        self.bufs.ids.download(&mut ids)?;
        self.timing.argmax_ms = t.elapsed().as_secs_f64() * 1e3;
        self.timing.argmax_gpu_ms = self.events.0.elapsed_ms(&self.events.1)? as f64;
        ids.into_iter()
            .map(|id| match u32::try_from(id) {
                Ok(id) if (id as usize) < vocab => Ok(id),
                _ => Err(GpuError::invalid(format!(
                    "the device argmax returned id {id} (vocabulary {vocab})"
                ))),
            })
            .collect()
    }

    /// Queues the product of `n` activation rows with `role`'s matrix `w` by the plan's
    /// strategy; returns the product as the consumer reads it (split rows or not).
    fn product(&self, role: Role, w: &Linear, x: Input, y: u64) -> GpuResult<Product> {
        let st = self.plan.strategy(role, &w.shape, x.n);
        let p = Products {
            blas: &self.blas,
            tbe3: &self.t3,
            scratch: &self.bufs.scratch,
            partial: &self.bufs.partial,
            sms: self.sms,
        };
        // SAFETY: (every caller) the input buffers hold `x.bf16_rows` BF16 rows `x.ldb` apart
        // and `x.n` f32 rows of `w`'s columns, within buffers sized for 2 cap (BF16) and cap
        // (f32) rows; `y` holds 2 cap rows of the matrix's rows (logits_raw: 2 max_batch).
        unsafe { p.run(w, st, &x, y)? };
        Ok(Product {
            ptr: y,
            split: st.split_output(self.opts.split_activations),
        })
    }

    /// Queues one pass over `n` tokens whose ids, positions and slots are in the input buffers.
    fn enqueue(&self, n: usize, want: Want) -> GpuResult<()> {
        let c = &self.cfg;
        let (h, im, vocab) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (heads, kvh, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (qd, eps) = (c.q_dim(), c.rms_norm_eps as f32);
        let s = self.opts.split_activations;
        let rows = if s { 2 * n } else { n };
        let input = |bf16: u64, f32: u64, cols: usize| Input {
            bf16,
            ldb: cols,
            bf16_rows: rows,
            f32,
            n,
        };
        let (b, w, k, max_ctx) = (&self.bufs, &self.weights, &self.k, self.kv.max_context);
        match &w.embed.form {
            Form::Raw(t) => k.embed(t.ptr(), b.tokens.ptr(), b.x.ptr(), n, h)?,
            // SAFETY: tokens holds n ids checked < vocab, x holds cap rows of h f32.
            Form::Tbe3(t) => unsafe { self.t3.gather.run(t, b.tokens.ptr(), b.x.ptr(), n)? },
        }
        let mut prev: Option<Product> = None;
        for (l, lw) in w.layers.iter().enumerate() {
            k.rmsnorm_residual(
                b.x.ptr(),
                prev,
                lw.input_norm.ptr(),
                b.xb.ptr(),
                s,
                Some(b.xf.ptr()),
                n,
                h,
                eps,
            )?;
            let qkv = self.product(
                Role::Qkv,
                &lw.qkv,
                input(b.xb.ptr(), b.xf.ptr(), h),
                b.qkv.ptr(),
            )?;
            k.rope_qkv_store(
                qkv,
                n,
                b.cos.ptr(),
                b.sin.ptr(),
                b.pos.ptr(),
                b.slot.ptr(),
                b.q.ptr(),
                self.kv.keys(l),
                self.kv.values(l),
                heads,
                kvh,
                hd,
                max_ctx,
            )?;
            k.attention(
                b.q.ptr(),
                self.kv.keys(l),
                self.kv.values(l),
                b.pos.ptr(),
                b.slot.ptr(),
                b.ab.ptr(),
                s,
                Some(b.af.ptr()),
                n,
                heads,
                kvh,
                hd,
                max_ctx,
            )?;
            let o = self.product(Role::O, &lw.o, input(b.ab.ptr(), b.af.ptr(), qd), b.y.ptr())?;
            k.rmsnorm_residual(
                b.x.ptr(),
                Some(o),
                lw.post_norm.ptr(),
                b.xb.ptr(),
                s,
                Some(b.xf.ptr()),
                n,
                h,
                eps,
            )?;
            let gu = self.product(
                Role::GateUp,
                &lw.gate_up,
                input(b.xb.ptr(), b.xf.ptr(), h),
                b.gu.ptr(),
            )?;
            k.silu_mul(gu, n, im, b.mb.ptr(), s, Some(b.mf.ptr()))?;
            prev = Some(self.product(
                Role::Down,
                &lw.down,
                input(b.mb.ptr(), b.mf.ptr(), im),
                b.y.ptr(),
            )?);
        }
        if want == Want::None {
            return Ok(());
        }
        k.rmsnorm_residual(
            b.x.ptr(),
            prev,
            w.norm.ptr(),
            b.xb.ptr(),
            s,
            Some(b.xf.ptr()),
            n,
            h,
            eps,
        )?;
        let head = w.lm_head.as_ref().unwrap_or(&w.embed);
        let (x, m) = match want {
            // Row n-1 (and its lo row 2n-1, n rows further): BF16 rows n*h elements apart.
            Want::Last => (
                Input {
                    bf16: b.xb.ptr() + 2 * ((n - 1) * h) as u64,
                    ldb: n * h,
                    bf16_rows: if s { 2 } else { 1 },
                    f32: b.xf.ptr() + 4 * ((n - 1) * h) as u64,
                    n: 1,
                },
                1,
            ),
            _ => (input(b.xb.ptr(), b.xf.ptr(), h), n),
        };
        let logits = self.product(Role::LmHead, head, x, b.logits_raw.ptr())?;
        k.split_sum(logits, m, vocab, b.logits.ptr())
    }

    fn upload_inputs(&self, tokens: &[i32], pos: &[i32], slots: &[i32]) -> GpuResult<()> {
        self.bufs.tokens.upload(0, tokens)?;
        self.bufs.pos.upload(0, pos)?;
        self.bufs.slot.upload(0, slots)
    }

    fn copy_logits(&mut self, rows: usize) -> GpuResult<Vec<f32>> {
        let n = rows * self.cfg.vocab_size;
        self.host_logits.copy_from(self.bufs.logits.ptr(), n)?;
        Ok(self.host_logits.slice(n).to_vec())
    }

    fn check_token(&self, token: u32) -> Result<(), DeviceError> {
        if token as usize >= self.cfg.vocab_size {
            return Err(DeviceError::BadToken {
                token,
                vocab: self.cfg.vocab_size,
            });
        }
        Ok(())
    }

    fn check_room(&self, seq: SeqId, want: usize) -> Result<(), DeviceError> {
        if want > self.kv.max_context {
            return Err(DeviceError::ContextFull {
                seq,
                want,
                max: self.kv.max_context,
            });
        }
        Ok(())
    }

    /// Runs one decode step, leaving the logits of its `batch.len()` rows in `bufs.logits`;
    /// records its device time and bucket (the copy and argmax times start at 0).
    fn run_decode(&mut self, batch: &[DecodeItem]) -> GpuResult<()> {
        self.logit_rows = 0;
        self.ctx.bind()?;
        let n = batch.len();
        let bucket = if self.opts.graphs {
            pick_bucket(&self.buckets, n)
                .ok_or_else(|| GpuError::invalid(format!("batch of {n} exceeds every bucket")))?
        } else {
            n
        };
        let (tokens, pos, slots) = decode_inputs(batch, bucket, self.kv.pad_slot());
        self.upload_inputs(&tokens, &pos, &slots)?;
        // A bucket's first step runs eagerly (warming up cuBLAS's and the kernels' lazy loading
        // outside any capture, as graph capture wants), and is captured after it for the next
        // steps. Capture does not run the work; the graph reads the input buffers above, which
        // every step rewrites in place before its replay.
        let graph = if self.opts.graphs {
            self.graphs.get(&bucket)
        } else {
            None
        };
        let eager_only = self.graphless.contains_key(&bucket);
        let graph_used = graph.is_some();
        self.events.0.record()?;
        match graph {
            Some(g) => g.launch()?,
            None => self.enqueue(bucket, Want::All)?,
        }
        self.events.1.record()?;
        let gpu_ms = self.events.0.elapsed_ms(&self.events.1)? as f64;
        if self.opts.graphs && !eager_only && !self.graphs.contains_key(&bucket) {
            // A failed capture is not a failed step: the step above already ran eagerly, and
            // this bucket keeps running eagerly (slower launches, same results).
            match Graph::capture(&self.ctx, || self.enqueue(bucket, Want::All)) {
                Ok(g) => {
                    self.graphs.insert(bucket, g);
                }
                Err(e) => {
                    tracing::warn!(bucket, error = %e, "CUDA graph capture failed; this bucket runs without a graph");
                    eprintln!(
                        "unweight: CUDA graph capture failed for batch bucket {bucket} ({e}); it runs without a graph"
                    );
                    self.graphless.insert(bucket, e.to_string());
                }
            }
        }
        self.timing = StepTiming {
            gpu_ms,
            graph: graph_used,
            bucket,
            ..StepTiming::default()
        };
        self.logit_rows = n;
        Ok(())
    }

    /// A decode step whose logits are copied back.
    fn decode_inner(&mut self, batch: &[DecodeItem]) -> GpuResult<Vec<f32>> {
        self.run_decode(batch)?;
        let t = Instant::now();
        let logits = self.copy_logits(batch.len())?;
        self.timing.copy_ms = t.elapsed().as_secs_f64() * 1e3;
        Ok(logits)
    }

    fn prefill_inner(&mut self, seq: SeqId, start: usize, tokens: &[u32]) -> GpuResult<Vec<f32>> {
        self.logit_rows = 0;
        self.ctx.bind()?;
        let chunks: Vec<&[u32]> = tokens
            .chunks(self.cap.min(self.opts.max_prefill_tokens))
            .collect();
        let mut p = start;
        for (ci, chunk) in chunks.iter().enumerate() {
            let n = chunk.len();
            let toks: Vec<i32> = chunk.iter().map(|&t| t as i32).collect();
            let pos: Vec<i32> = (p..p + n).map(|x| x as i32).collect();
            let slots = vec![seq.0 as i32; n];
            self.upload_inputs(&toks, &pos, &slots)?;
            let last = ci + 1 == chunks.len();
            self.enqueue(n, if last { Want::Last } else { Want::None })?;
            p += n;
        }
        self.copy_logits(1)
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
        self.kv.free(seq)
    }

    fn sequence_len(&self, seq: SeqId) -> Result<usize, DeviceError> {
        self.kv.len(seq)
    }

    fn prefill(&mut self, seq: SeqId, tokens: &[u32]) -> Result<Vec<f32>, DeviceError> {
        if tokens.is_empty() {
            return Err(DeviceError::Invalid(
                "prefill of an empty token list".into(),
            ));
        }
        let len = self.kv.len(seq)?;
        self.check_room(seq, len + tokens.len())?;
        for &t in tokens {
            self.check_token(t)?;
        }
        let r = self.prefill_inner(seq, len, tokens);
        let logits = self.on_fault(r.map_err(DeviceError::from))?;
        self.kv.set_len(seq, len + tokens.len());
        Ok(logits)
    }

    fn decode(&mut self, batch: &[DecodeItem]) -> Result<Logits, DeviceError> {
        let vocab = self.cfg.vocab_size;
        self.check_batch(batch)?;
        if batch.is_empty() {
            return Ok(Logits {
                vocab,
                data: Vec::new(),
            });
        }
        let r = self.decode_inner(batch);
        let data = self.on_fault(r.map_err(DeviceError::from))?;
        for it in batch {
            self.kv.set_len(it.seq, it.pos + 1);
        }
        Ok(Logits { vocab, data })
    }

    /// The step of `decode`, then the argmax kernel over its logits on the device: only
    /// `batch.len()` i32 ids come back (Llama 3 at batch 128: 512 bytes instead of 64 MB).
    fn decode_argmax(&mut self, batch: &[DecodeItem]) -> Result<Vec<u32>, DeviceError> {
        self.check_batch(batch)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let r = self
            .run_decode(batch)
            .and_then(|()| self.device_argmax(batch.len()));
        let ids = self.on_fault(r.map_err(DeviceError::from))?;
        for it in batch {
            self.kv.set_len(it.seq, it.pos + 1);
        }
        Ok(ids)
    }
}

impl CudaBackend {
    /// Passes a step's result through; on a fatal fault (the context is dead, and with it every
    /// buffer in it) the shared device copy of the weights is first forgotten by
    /// [`device_weights`], so that no engine built from now on (this instance's rebuild, a new
    /// instance) is handed memory of the dead context. Instances still holding it keep it until
    /// their own step faults and they are rebuilt.
    fn on_fault<T>(&self, r: Result<T, DeviceError>) -> Result<T, DeviceError> {
        if let (Err(e), Some(key)) = (&r, &self.shared_key) {
            if e.kind() == FaultKind::Fatal && device_weights().invalidate(key, &self.weights) {
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
    /// length, with room for one more token, and tokens inside the vocabulary.
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
