//! `unweight plan-memory`: how a model fits on a GPU of a given size, in BF16 and compressed:
//! weight memory, KV-cache tokens and concurrent sequences at a context length
//! ([`crate::model::memory`], docs/memory.md). CPU only.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::report::human_bytes;
use crate::container::Checkpoint;
use crate::device::cuda::options::resolve_plan;
use crate::device::cuda::sizing::{role_shapes, WorkBuffers};
use crate::device::cuda::{CudaOptions, PlanSource};
use crate::model::memory::{self, Dims, Fit, Target};
use crate::model::{LlamaConfig, LlamaShape};

/// Arguments of `unweight plan-memory`.
#[derive(clap::Args, Debug)]
pub struct PlanMemoryArgs {
    /// Checkpoint directory (plain or compressed): its config.json, and a sample of each role's
    /// layer-0 matrix encoded to measure the compressed size.
    #[arg(required_unless_present = "shape", value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Instead of a checkpoint: a preset shape, with synthetic N(0, 0.02) weights sampled for the
    /// compressed size.
    #[arg(long, conflicts_with = "dir", value_parser = clap::builder::PossibleValuesParser::new(LlamaShape::PRESETS))]
    shape: Option<String>,
    /// GPU memory, GiB (e.g. 80 for an H100, 139 for an H200 as CUDA reports it).
    #[arg(long, value_name = "G")]
    gpu_mem_gib: f64,
    /// Tokens per sequence (prompt and output) the sequences are counted at; default 8192, or
    /// the model's limit when lower.
    #[arg(long, value_name = "L")]
    context: Option<usize>,
    /// Fraction of the memory left after weights and work buffers given to the KV cache.
    #[arg(long, default_value_t = 0.9, value_name = "F")]
    kv_fraction: f64,
    /// Print JSON: {"bf16": {...}, "compressed": {...}, ...}.
    #[arg(long)]
    json: bool,
}

/// Multiprocessors of the GPUs the plan is for (H100 SXM and H200): the default plan's GEMV
/// splits, and so its partial-sum buffer, depend on it.
const HOPPER_SMS: usize = 132;

/// Device bytes of the CUDA engine's work buffers for `cfg` with the Triton backend's defaults
/// (decode batches of up to 64, 512-token prefill passes) and `context` positions, under `plan`:
/// the raw baseline for BF16, the untuned default plan for compressed weights (a tuning table
/// made on the device may choose other decode chunks; the load log states the real figure).
fn work_bytes(cfg: &LlamaConfig, plan: PlanSource, context: usize) -> Result<u64> {
    let opts = CudaOptions {
        max_sequences: 64,
        max_prefill_tokens: 512,
        max_context: Some(context),
        plan,
        ..CudaOptions::default()
    };
    let shapes = role_shapes(cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
    let plan = resolve_plan(&opts, &shapes, HOPPER_SMS, cfg.tie_word_embeddings);
    Ok(WorkBuffers::new(cfg, &plan, &shapes, &opts, context).device_bytes() as u64)
}

/// Runs the command.
pub fn run(a: &PlanMemoryArgs) -> Result<()> {
    if !(a.gpu_mem_gib.is_finite() && a.gpu_mem_gib > 0.0) {
        bail!(
            "--gpu-mem-gib must be a positive number, got {}",
            a.gpu_mem_gib
        );
    }
    if !(a.kv_fraction.is_finite() && a.kv_fraction > 0.0 && a.kv_fraction <= 1.0) {
        bail!("--kv-fraction must be in (0, 1], got {}", a.kv_fraction);
    }
    let (name, cfg, weights) = match (&a.shape, &a.dir) {
        (Some(shape), _) => {
            let s = LlamaShape::preset(shape).expect("clap restricts the shape to presets");
            let cfg = LlamaConfig::from_json(s.config_json().as_object().expect("an object"))
                .with_context(|| format!("the {shape} preset's config"))?;
            let w = memory::weight_bytes_synthetic(&Dims::of_shape(&s), 0.02, 0)
                .map_err(anyhow::Error::msg)?;
            (s.name.to_string(), cfg, w)
        }
        (None, Some(dir)) => {
            let cfg =
                LlamaConfig::from_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
            let d = Dims::of_config(&cfg);
            let ckpt =
                Checkpoint::open(dir).with_context(|| format!("opening {}", dir.display()))?;
            let w = memory::weight_bytes_of_checkpoint(&ckpt, &d)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("measuring the weights of {}", dir.display()))?;
            (dir.display().to_string(), cfg, w)
        }
        (None, None) => bail!("give a checkpoint DIR or --shape"),
    };
    let (dims, max_positions) = (Dims::of_config(&cfg), cfg.max_position_embeddings);
    let context = a.context.unwrap_or(8192.min(max_positions));
    if context == 0 || context > max_positions {
        bail!("--context must be in 1..={max_positions} (the model's limit), got {context}");
    }
    let target = Target {
        gpu_bytes: (a.gpu_mem_gib * (1u64 << 30) as f64) as u64,
        context,
        kv_fraction: a.kv_fraction,
    };
    let bf16 = memory::fit(
        &dims,
        weights.bf16,
        work_bytes(&cfg, PlanSource::Baseline, context)?,
        &target,
    );
    let compressed = memory::fit(
        &dims,
        weights.compressed,
        work_bytes(&cfg, PlanSource::Compressed, context)?,
        &target,
    );
    if a.json {
        let out = json!({
            "model": name,
            "parameters": dims.parameters(),
            "gpu_mem_bytes": target.gpu_bytes,
            "context": context,
            "kv_fraction": a.kv_fraction,
            "kv_bytes_per_token": dims.kv_bytes_per_token(),
            "block_tokens": memory::BLOCK_TOKENS,
            "compressed_size_from": weights.source,
            "bf16": bf16,
            "compressed": compressed,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{name}: {} parameters on {} GiB, sequences of {context} tokens, KV {} per token (BF16)",
        dims.parameters(),
        a.gpu_mem_gib,
        human_bytes(dims.kv_bytes_per_token())
    );
    let row = |label: &str, f: &Fit| {
        println!(
            "{label:<11} weights {:>10}  workspace {:>10}  KV {:>10} = {:>9} tokens = {:>4} sequences{}",
            human_bytes(f.weights_bytes),
            human_bytes(f.workspace_bytes),
            human_bytes(f.kv_bytes),
            f.kv_tokens,
            f.sequences,
            if f.fits { "" } else { "  (does not fit)" }
        );
    };
    row("bf16", &bf16);
    row("compressed", &compressed);
    if bf16.sequences > 0 {
        println!(
            "compressed serves {:.1}x the sequences of BF16",
            compressed.sequences as f64 / bf16.sequences as f64
        );
    }
    println!("compressed size: {}", weights.source);
    Ok(())
}
