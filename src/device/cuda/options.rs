//! How a [`super::CudaBackend`] is set up: the user's settings ([`CudaOptions`]), where its
//! plan comes from ([`PlanSource`], [`PlanChoice`]), and how they resolve to the [`Plan`] a
//! backend and `unweight plan-memory` use ([`resolve_plan`]).

use std::path::{Path, PathBuf};

use super::plan::{Plan, Role, RoleShapes, TuneTable};
use super::sizing::decode_buckets;
#[cfg(doc)]
use super::CudaBackend;

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
    /// Tokens per sequence; `None` for the model's limit capped at 4096 (it sizes the RoPE
    /// tables and the block table; the KV pool must hold one sequence of it).
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
