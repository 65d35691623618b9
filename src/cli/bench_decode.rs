//! `unweight bench decode`: decode throughput. With `--device cuda` the GPU backend is measured
//! instead (see [`super::bench_cuda`]). On the CPU: one model held three ways,
//! measured in one run: the plain checkpoint (BF16), the compressed checkpoint decoded at load,
//! and the compressed checkpoint decoded chunk by chunk inside every product (on the fly).
//!
//! Each configuration serves `batch` greedy requests with pseudo-random prompts of different
//! lengths through the [`Engine`]; the first step (prefill of every prompt) is not timed, the
//! next `tokens` steps are. All configurations must generate the same tokens (the weights are
//! the same bits); the run fails otherwise.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::container::{self, CompressOptions};
use crate::device::cpu::{CpuBackend, CpuOptions};
use crate::engine::{Engine, EngineOptions, Event, Request};
use crate::model::weights::WeightMode;

/// Arguments of `unweight bench decode`.
#[derive(clap::Args, Debug)]
pub struct DecodeArgs {
    /// The device to measure.
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    pub(super) device: String,
    /// Plain BF16 checkpoint directory (required on the CPU; on CUDA, instead of --shape).
    #[arg(long)]
    pub(super) model: Option<PathBuf>,
    /// CUDA only: a synthetic model of this shape generated in device memory (N(0, 0.02)).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(crate::model::LlamaShape::PRESETS), conflicts_with = "model")]
    pub(super) shape: Option<String>,
    /// CUDA only: tokens per sequence the KV cache holds (default: what the run needs).
    #[arg(long)]
    pub(super) max_context: Option<usize>,
    /// CUDA only: feed GEMMs plain BF16 activations instead of split hi + lo rows.
    #[arg(long)]
    pub(super) bf16_activations: bool,
    /// CUDA only: run decode steps without CUDA graphs.
    #[arg(long)]
    pub(super) no_graphs: bool,
    /// CUDA only: the plans to measure, one after the other on the same model (one backend
    /// alive at a time): `baseline` (raw BF16, cuBLAS) and `compressed` (tbe3, the default
    /// strategies or --plan-table's). With both, the ratios compressed / baseline are reported.
    #[arg(long, value_delimiter = ',', default_value = "baseline,compressed",
          value_parser = ["baseline", "compressed"])]
    pub(super) plans: Vec<String>,
    /// CUDA only: the compressed plan from this tuning table (`unweight tune`'s JSON) instead of
    /// the default strategies.
    #[arg(long)]
    pub(super) plan_table: Option<PathBuf>,
    /// CUDA only: also build the compressed plan's raw twin (the same strategies on BF16
    /// weights) and check that a few greedy steps give bit-identical logits.
    #[arg(long)]
    pub(super) check_twin: bool,
    /// Its compressed form; without it the model is compressed into a temporary directory.
    #[arg(long)]
    compressed: Option<PathBuf>,
    /// Batch sizes (concurrent sequences), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub(super) batch: Vec<usize>,
    /// Timed decode steps per batch size.
    #[arg(long, default_value_t = 32)]
    pub(super) tokens: usize,
    /// Prompt length of the first sequence (sequence i gets i more tokens).
    #[arg(long, default_value_t = 16)]
    pub(super) prompt_len: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub(super) out: Option<PathBuf>,
}

/// Runs `unweight bench decode`.
pub fn run(a: DecodeArgs) -> Result<()> {
    if a.batch.is_empty() || a.batch.contains(&0) || a.tokens == 0 || a.prompt_len == 0 {
        bail!("--batch sizes, --tokens and --prompt-len must all be at least 1");
    }
    if a.device == "cuda" {
        return super::bench_cuda::run(&a);
    }
    // The CPU measures its own three configurations; the plan options are the GPU's.
    if a.plans != ["baseline", "compressed"] || a.plan_table.is_some() || a.check_twin {
        bail!("--plans, --plan-table and --check-twin are for --device cuda");
    }
    if a.shape.is_some() {
        bail!("--shape is for --device cuda; on the CPU, write the model with `unweight synth` and pass --model");
    }
    let Some(model) = a.model.clone() else {
        bail!("--model is required for --device cpu");
    };
    let temp = std::env::temp_dir().join(format!("unweight-bench-decode-{}", std::process::id()));
    let compressed = match &a.compressed {
        Some(c) => c.clone(),
        None => {
            eprintln!(
                "bench: compressing {} into {}",
                model.display(),
                temp.display()
            );
            let opts = CompressOptions {
                force: true,
                progress: false,
                ..CompressOptions::default()
            };
            container::compress_dir(&model, &temp, &opts).context("compressing the model")?;
            temp.clone()
        }
    };
    let result = measure_all(&a, &model, &compressed);
    if a.compressed.is_none() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    let rows = result?;
    if let Some(out) = &a.out {
        let doc = json!({
            "benchmark": "decode",
            "device": a.device,
            "model": model.display().to_string(),
            "tokens": a.tokens,
            "prompt_len": a.prompt_len,
            "results": rows,
        });
        super::bench::write_results(out, doc, rayon::current_num_threads())?;
    }
    Ok(())
}

fn measure_all(a: &DecodeArgs, model: &Path, compressed: &Path) -> Result<Vec<Value>> {
    let configs: [(&str, &Path, WeightMode); 3] = [
        ("plain checkpoint, bf16", model, WeightMode::Decoded),
        (
            "compressed, decoded at load",
            compressed,
            WeightMode::Decoded,
        ),
        ("compressed, on the fly", compressed, WeightMode::OnTheFly),
    ];
    let threads = rayon::current_num_threads();
    println!(
        "{:<30} {:>6} {:>10} {:>11} {:>9}   ({threads} threads, {} timed steps)",
        "weights", "batch", "tokens/s", "weights MiB", "load s", a.tokens
    );
    let mut rows = Vec::new();
    let mut reference: Vec<Vec<Vec<u32>>> = Vec::new();
    for (ci, (name, dir, mode)) in configs.iter().enumerate() {
        let max_batch = *a.batch.iter().max().expect("checked non-empty");
        let t = Instant::now();
        let opts = CpuOptions {
            max_sequences: max_batch,
            ..CpuOptions::default()
        };
        let backend = CpuBackend::load(dir, *mode, &opts)
            .with_context(|| format!("loading {}", dir.display()))?;
        let load_s = t.elapsed().as_secs_f64();
        let mib = backend.weights().resident_bytes() as f64 / (1 << 20) as f64;
        let vocab = crate::device::Backend::config(&backend).vocab_size as u32;
        let eopts = EngineOptions {
            max_batch,
            ..EngineOptions::for_config(crate::device::Backend::config(&backend))
        };
        let mut engine = Engine::new(backend, None, eopts);
        for (bi, &batch) in a.batch.iter().enumerate() {
            let (tps, tokens) = measure(&mut engine, batch, a, vocab)?;
            println!("{name:<30} {batch:>6} {tps:>10.1} {mib:>11.1} {load_s:>9.2}");
            if ci == 0 {
                reference.push(tokens);
            } else if reference[bi] != tokens {
                bail!("`{name}` generated different tokens than the plain checkpoint at batch {batch}");
            }
            rows.push(json!({
                "weights": name, "mode": mode.as_str(), "batch": batch, "tokens_per_s": tps,
                "resident_weight_bytes": engine.backend().weights().resident_bytes(), "load_s": load_s,
            }));
        }
    }
    println!("all configurations generated identical tokens");
    Ok(rows)
}

/// Serves `batch` requests; returns decode tokens/s over the timed steps and every token.
fn measure<B: crate::device::Backend>(
    engine: &mut Engine<B>,
    batch: usize,
    a: &DecodeArgs,
    vocab: u32,
) -> Result<(f64, Vec<Vec<u32>>)> {
    let mut ids = Vec::new();
    for b in 0..batch {
        // A fixed pseudo-random prompt per sequence, lengths prompt_len + b.
        let prompt = (0..a.prompt_len + b)
            .map(|i| ((i as u64 * 2654435761 + b as u64 * 40503 + 17) % vocab as u64) as u32)
            .collect();
        let mut r = Request::greedy(prompt, a.tokens + 1);
        r.ignore_eos = true;
        ids.push(engine.add(r)?);
    }
    let mut tokens = vec![Vec::new(); batch];
    let mut record = |events: Vec<Event>| {
        for e in events {
            if let Event::Token { id, token, .. } = e {
                if let Some(i) = ids.iter().position(|&x| x == id) {
                    tokens[i].push(token);
                }
            }
        }
    };
    record(engine.step()?); // prefill: every prompt, one token each
    let t = Instant::now();
    for _ in 0..a.tokens {
        record(engine.step()?);
    }
    let secs = t.elapsed().as_secs_f64();
    while engine.has_work() {
        record(engine.step()?);
    }
    Ok(((batch * a.tokens) as f64 / secs, tokens))
}
