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
//! Every buffer is allocated at construction.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::driver::{
    Context, Cublas, DevBuf, Event, GpuError, GpuResult, Graph, PinnedBuf, Staging,
};
use super::kernels::{AttnSplit, Kernels, PagedKv, Product, ATTN_MAX_HEAD_DIM};
use super::kv::{self as paged, KvCache};
use super::linear::{Form, Input, Linear, Products};
use super::options::{resolve_plan, CudaOptions, PlanSource};
use super::persist::weights_identity;
use super::plan::{Plan, Role, RoleShapes, Storage};
use super::sample;
use super::sizing::{decode_buckets, decode_inputs, decode_splits, kv_plan, pick_bucket};

mod choosing;
pub use super::sizing::{role_shapes, WorkBuffers};
use super::stream::stream_weights_persisted;
use super::tbe3::{multiprocessors, Tbe3Kernels};
use super::weights::{device_weights, upload_linear, LayerW, UploadSink, Weights, WeightsKey};
use crate::container::Checkpoint;
use crate::device::{
    Backend, DecodeChoice, DecodeItem, DecodeOutput, DeviceError, FaultKind, KvCapacity, Launched,
    Logits, RowSampling, SeqId,
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
    /// The decode step [`Backend::launch_decode`] left running, to be collected.
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
            sample_rows: buf(wb.sample_rows)?,
            attn_ml: buf(wb.attn_ml)?,
            attn_acc: buf(wb.attn_acc)?,
            cos: DevBuf::from_host(&ctx, &cos)?,
            sin: DevBuf::from_host(&ctx, &sin)?,
        };
        debug_assert_eq!(2 * 4 * cos.len(), wb.rope);
        let host_logits = PinnedBuf::new(&ctx, lcap * v)?;
        // The KV cache from what is left.
        let (free, _) = ctx.mem_info()?;
        let reserve = 512usize << 20; // graphs, cuBLAS internals, fragmentation
        let max_sequences = opts.max_sequences;
        let table_bytes = 4 * (max_sequences + 1) * paged::blocks_for(max_context);
        let (_, total_blocks) = kv_plan(
            free,
            reserve,
            opts.kv_budget_bytes,
            opts.kv_fraction,
            paged::block_bytes(cfg.num_hidden_layers, kvd),
            table_bytes,
            max_sequences,
            max_context,
        )
        .map_err(DeviceError::Invalid)?;
        let kv = KvCache::new(
            &ctx,
            cfg.num_hidden_layers,
            kvd,
            total_blocks,
            max_sequences,
            max_context,
        )?;
        let buckets = decode_buckets(max_sequences);
        let step_events = (Event::new(&ctx)?, Event::new(&ctx)?);
        let choice_events = (Event::new(&ctx)?, Event::new(&ctx)?);
        let staging = Staging::new(&ctx, STAGING_BYTES)?;
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
            staging,
            step_events,
            step_timed: false,
            choice_events,
            ctx,
            opts: opts.clone(),
            cap,
            buckets,
            weight_bytes,
            weight_memory,
            timing: StepTiming::default(),
            logit_rows: 0,
            in_flight: None,
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

    /// The tokens of the last decode step's rows chosen by the device sampler as `rows` say,
    /// from the logits that step left in device memory: the path of
    /// [`Backend::decode_sampled`], run after a [`Backend::decode`], for the benchmark (which
    /// checks them against the host sampler on the logits `decode` returned and times it,
    /// [`StepTiming::sample_ms`]). The sampler edits the logits in place, so afterwards they are
    /// no longer the step's: a second call (or `argmax_last_step`) is an error until the next
    /// decode step.
    pub fn sample_last_step(&mut self, rows: &[RowSampling]) -> Result<Vec<u32>, DeviceError> {
        if self.logit_rows == 0 {
            return Err(DeviceError::Invalid(
                "sample_last_step: no decode step's logits on the device".into(),
            ));
        }
        if rows.len() != self.logit_rows {
            return Err(DeviceError::Invalid(format!(
                "sample_last_step: {} sampling rows for the last step's {} rows",
                rows.len(),
                self.logit_rows
            )));
        }
        let packed = sample::pack(rows, self.cfg.vocab_size, self.edit_capacity())?;
        let r = self.device_sample(&packed).map_err(DeviceError::from);
        self.on_fault(r)
    }

    /// Runs the argmax kernel over the first `rows` rows of the logits buffer and copies the
    /// ids back; records its timing.
    fn device_argmax(&mut self, rows: usize) -> GpuResult<Vec<u32>> {
        let t = self.queue_argmax(rows)?;
        self.finish_argmax(rows, t)
    }

    /// Queues the argmax kernel over the first `rows` rows of the logits buffer (no wait);
    /// returns when it was queued.
    fn queue_argmax(&mut self, rows: usize) -> GpuResult<Instant> {
        self.ctx.bind()?;
        let vocab = self.cfg.vocab_size;
        let t = Instant::now();
        self.choice_events.0.record()?;
        self.k
            .argmax_rows(self.bufs.logits.ptr(), rows, vocab, self.bufs.ids.ptr())?;
        self.choice_events.1.record()?;
        Ok(t)
    }

    /// The ids of a queued argmax (`queue_argmax` at `t`) back on the host; records its timing.
    fn finish_argmax(&mut self, rows: usize, t: Instant) -> GpuResult<Vec<u32>> {
        let (ids, host_ms, gpu_ms) = self.finish_choice(rows, t)?;
        (self.timing.argmax_ms, self.timing.argmax_gpu_ms) = (host_ms, gpu_ms);
        ids_in_vocab(ids, self.cfg.vocab_size, "argmax")
    }

    /// The ids of a queued choosing kernel (queued at `t`) back on the host: the step's one
    /// synchronisation. Returns them with the time from `t` to the ids on the host and the
    /// kernel's device time (`choice_events`), after settling the step's own time.
    fn finish_choice(&mut self, rows: usize, t: Instant) -> GpuResult<(Vec<i32>, f64, f64)> {
        self.ctx.bind()?;
        let mut ids = vec![0i32; rows];
        // The step's one synchronisation: the ids back (the step and the kernel done).
        self.bufs.ids.download(&mut ids)?;
        let host_ms = t.elapsed().as_secs_f64() * 1e3;
        self.settle_step_time()?;
        let gpu_ms = self.choice_events.0.elapsed_ms(&self.choice_events.1)? as f64;
        Ok((ids, host_ms, gpu_ms))
    }

    /// Logit edits the device sampler has room for in one step: they are stored in
    /// `logits_raw` (8 bytes each), which the step's last kernel has consumed by then.
    fn edit_capacity(&self) -> usize {
        self.bufs.logits_raw.bytes() / std::mem::size_of::<sample::SampleEdit>()
    }

    /// Runs the sampling kernel over the first `packed.rows.len()` rows of the logits buffer
    /// (editing them in place) and copies the ids back; records its timing.
    fn device_sample(&mut self, packed: &sample::Packed) -> GpuResult<Vec<u32>> {
        let t = self.queue_sample(packed)?;
        self.finish_sample(packed.rows.len(), t)
    }

    /// Queues the sampling records' upload and the sampling kernel over the first
    /// `packed.rows.len()` rows of the logits buffer (no wait); returns when it was queued.
    fn queue_sample(&mut self, packed: &sample::Packed) -> GpuResult<Instant> {
        self.ctx.bind()?;
        let rows = packed.rows.len();
        let vocab = self.cfg.vocab_size;
        // The logits are edited from now on: not the step's logits any more.
        self.logit_rows = 0;
        let t = Instant::now();
        // Stream-ordered after the step, whose last kernel consumed logits_raw.
        self.staging
            .upload(&self.bufs.sample_rows, 0, &packed.rows)?;
        self.staging
            .upload(&self.bufs.logits_raw, 0, &packed.edits)?;
        self.choice_events.0.record()?;
        self.k.sample_rows(
            self.bufs.logits.ptr(),
            rows,
            vocab,
            self.bufs.sample_rows.ptr(),
            self.bufs.logits_raw.ptr(),
            self.bufs.ids.ptr(),
        )?;
        self.choice_events.1.record()?;
        Ok(t)
    }

    /// The ids of a queued sampler (`queue_sample` at `t`) back on the host; records its
    /// timing.
    fn finish_sample(&mut self, rows: usize, t: Instant) -> GpuResult<Vec<u32>> {
        let (ids, host_ms, gpu_ms) = self.finish_choice(rows, t)?;
        (self.timing.sample_ms, self.timing.sample_gpu_ms) = (host_ms, gpu_ms);
        ids_in_vocab(ids, self.cfg.vocab_size, "sampler")
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
        let (b, w, k) = (&self.bufs, &self.weights, &self.k);
        let paged = |l: usize| PagedKv {
            keys: self.kv.keys(l),
            values: self.kv.values(l),
            table: self.kv.table(),
            max_blocks: self.kv.max_blocks(),
        };
        // Decode batches too small to fill the GPU split each row's attention along its
        // sequence (fixed per bucket: the graph bakes it in); prefill chunks take the tiled
        // kernel instead.
        let split = AttnSplit {
            splits: decode_splits(n, heads, self.sms, self.kv.max_context),
            part_ml: b.attn_ml.ptr(),
            part_acc: b.attn_acc.ptr(),
        };
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
                paged(l),
                heads,
                kvh,
                hd,
            )?;
            if want == Want::All {
                k.attention(
                    b.q.ptr(),
                    paged(l),
                    b.pos.ptr(),
                    b.slot.ptr(),
                    b.ab.ptr(),
                    s,
                    Some(b.af.ptr()),
                    n,
                    heads,
                    kvh,
                    hd,
                    split,
                )?;
            } else {
                // A prompt chunk: one sequence, so the tiled kernel shares each key tile among
                // its queries.
                k.attention_prefill(
                    b.q.ptr(),
                    paged(l),
                    b.pos.ptr(),
                    b.slot.ptr(),
                    b.ab.ptr(),
                    s,
                    Some(b.af.ptr()),
                    n,
                    heads,
                    kvh,
                    hd,
                )?;
            }
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

    /// Queues a pass's inputs through the staging memory, without waiting.
    fn upload_inputs(&mut self, tokens: &[i32], pos: &[i32], slots: &[i32]) -> GpuResult<()> {
        self.staging.upload(&self.bufs.tokens, 0, tokens)?;
        self.staging.upload(&self.bufs.pos, 0, pos)?;
        self.staging.upload(&self.bufs.slot, 0, slots)
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
        self.step_timed = false;
        self.step_events.0.record()?;
        match graph {
            Some(g) => g.launch()?,
            None => self.enqueue(bucket, Want::All)?,
        }
        self.step_events.1.record()?;
        self.step_timed = true;
        if self.opts.graphs && !eager_only && !self.graphs.contains_key(&bucket) {
            // Once per bucket: capture from an idle stream, the eager step above finished.
            self.ctx.sync()?;
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
        // gpu_ms is read from the events once the step's ids or logits are back.
        self.timing = StepTiming {
            graph: graph_used,
            bucket,
            ..StepTiming::default()
        };
        self.logit_rows = n;
        Ok(())
    }

    /// The last decode step's device time into `timing.gpu_ms`, once the stream was
    /// synchronised after it (its events are complete then: no wait).
    fn settle_step_time(&mut self) -> GpuResult<()> {
        if std::mem::take(&mut self.step_timed) {
            self.timing.gpu_ms = self.step_events.0.elapsed_ms(&self.step_events.1)? as f64;
        }
        Ok(())
    }

    /// A decode step whose logits are copied back. It waits for the step before the copy, so
    /// `copy_ms` is the copy alone (this is the benchmark's reference path; serving steps take
    /// ids, with one synchronisation).
    fn decode_inner(&mut self, batch: &[DecodeItem]) -> GpuResult<Vec<f32>> {
        self.run_decode(batch)?;
        self.ctx.sync()?;
        self.settle_step_time()?;
        let t = Instant::now();
        let logits = self.copy_logits(batch.len())?;
        self.timing.copy_ms = t.elapsed().as_secs_f64() * 1e3;
        Ok(logits)
    }

    fn prefill_inner(&mut self, seq: SeqId, start: usize, tokens: &[u32]) -> GpuResult<Vec<f32>> {
        self.prefill_enqueue(seq, start, tokens)?;
        self.copy_logits(1)
    }

    /// Queues a prefill of `tokens` at positions from `start`, leaving the logits after the
    /// last of them in row 0 of `bufs.logits` (not copied back, not waited for).
    fn prefill_enqueue(&mut self, seq: SeqId, start: usize, tokens: &[u32]) -> GpuResult<()> {
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
            let slots = vec![paged::slot_of(seq) as i32; n];
            self.upload_inputs(&toks, &pos, &slots)?;
            let last = ci + 1 == chunks.len();
            self.enqueue(n, if last { Want::Last } else { Want::None })?;
            p += n;
        }
        Ok(())
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

    fn collect_decode(&mut self) -> Result<DecodeOutput, DeviceError> {
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
