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

use super::bench_prefill::{measure_prefill, Form};
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
    /// Also time prefill of one prompt of each of these lengths (comma separated). CPU: per
    /// weight configuration, tokens/s; their last-position logits must be identical across
    /// them. CUDA: time to first token per plan (compressed vs baseline in the same run).
    #[arg(long, value_delimiter = ',')]
    pub(super) prefill: Vec<usize>,
    /// CPU only, with --prefill: a Python with torch and transformers (`scripts/reference-env`)
    /// to time Hugging Face transformers' prefill (f32 and BF16) of the same prompts on the same
    /// threads, its runs alternated with ours (scripts/hf_prefill.py, which keeps both dtypes
    /// loaded for the whole run: about 6 bytes per parameter next to our forms, fine for the
    /// test models, not for an 8B model on a small machine).
    #[arg(long, requires = "prefill")]
    pub(super) hf_python: Option<PathBuf>,
    /// CPU only: also measure chunked prefill inside continuous batching: four streams decode
    /// while a prompt of this many tokens is admitted; reports a stream's worst gap between
    /// tokens next to its median gap, for fixed chunks, paced chunks and unchunked, side by side
    /// (plain checkpoint).
    #[arg(long)]
    pub(super) interference: Option<usize>,
    /// With --interference: the fixed per-step prompt budgets (chunk sizes, no pacing) to
    /// measure, comma separated; an unchunked run is always added.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "256",
        requires = "interference"
    )]
    pub(super) prefill_chunks: Vec<usize>,
    /// With --interference: the paced policy's `max_step_slowdown` values to measure (each
    /// under the default cap of 256 tokens a step and the default `short_prompt_tokens`; the
    /// default slowdown is the engine's default policy), comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_values_t = [crate::engine::DEFAULT_STEP_SLOWDOWN],
        requires = "interference"
    )]
    pub(super) step_slowdowns: Vec<f64>,
    /// CPU only: also measure a burst of this many short requests arriving together while four
    /// streams decode, under the fixed cap without pacing, with every prompt paced, and under
    /// the default (long prompts paced, short ones whole), side by side (plain checkpoint;
    /// bench_burst.rs).
    #[arg(long)]
    pub(super) burst: Option<usize>,
    /// With --burst: the prompt length of the burst's requests.
    #[arg(long, default_value_t = 100, requires = "burst")]
    pub(super) burst_len: usize,
    /// CPU only: also measure sampled decoding (temperature 0.8, top-p 0.95) next to greedy at
    /// each batch size, and the engine's host time per decode step (plain checkpoint;
    /// bench_sampling.rs).
    #[arg(long)]
    pub(super) sampling: bool,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub(super) out: Option<PathBuf>,
}

/// Runs `unweight bench decode`.
pub fn run(a: DecodeArgs) -> Result<()> {
    if a.batch.is_empty() || a.batch.contains(&0) || a.tokens == 0 || a.prompt_len == 0 {
        bail!("--batch sizes, --tokens and --prompt-len must all be at least 1");
    }
    if a.prefill.contains(&0)
        || a.interference == Some(0)
        || a.prefill_chunks.contains(&0)
        || a.burst == Some(0)
        || a.burst_len == 0
    {
        bail!("--prefill lengths, --interference, --prefill-chunks, --burst and --burst-len must be at least 1");
    }
    if a.step_slowdowns
        .iter()
        .any(|&f| !(f.is_finite() && f >= 1.0))
    {
        bail!("--step-slowdowns must be numbers of at least 1");
    }
    if a.device == "cuda" {
        if a.hf_python.is_some() || a.interference.is_some() || a.burst.is_some() || a.sampling {
            bail!(
                "--hf-python, --interference, --burst and --sampling are measured on the CPU only for now"
            );
        }
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
    let forms: [Form<'_>; 3] = [
        ("plain checkpoint, bf16", &model, WeightMode::Decoded),
        (
            "compressed, decoded at load",
            &compressed,
            WeightMode::Decoded,
        ),
        ("compressed, on the fly", &compressed, WeightMode::OnTheFly),
    ];
    let result = measure_all(&a, &forms).and_then(|rows| {
        if a.prefill.is_empty() {
            return Ok((rows, Vec::new(), None));
        }
        let (prefill, hf) = measure_prefill(&forms, &a.prefill, &model, a.hf_python.as_deref())?;
        Ok((rows, prefill, hf))
    });
    if a.compressed.is_none() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    let (rows, prefill, hf) = result?;
    let interference = match a.interference {
        Some(len) => measure_interference(&model, len, &a.prefill_chunks, &a.step_slowdowns)?,
        None => Vec::new(),
    };
    let burst = match a.burst {
        Some(n) => super::bench_burst::measure_burst(&model, n, a.burst_len)?,
        None => Vec::new(),
    };
    let sampling = if a.sampling {
        super::bench_sampling::measure_sampling(&model, &a.batch, a.tokens, a.prompt_len)?
    } else {
        Vec::new()
    };
    if let Some(out) = &a.out {
        let doc = json!({
            "benchmark": "decode",
            "device": a.device,
            "model": model.display().to_string(),
            "tokens": a.tokens,
            "prompt_len": a.prompt_len,
            "results": rows,
            "prefill": prefill,
            "interference": interference,
            "burst": burst,
            "sampling": sampling,
            "hf_transformers_prefill": hf,
        });
        super::bench::write_results(out, doc, rayon::current_num_threads())?;
    }
    Ok(())
}

/// Decode rows and prefill rows of every configuration.
fn measure_all(a: &DecodeArgs, configs: &[Form<'_>]) -> Result<Vec<Value>> {
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

/// The fixed pseudo-random prompt of `len` tokens number `salt` of the decode benchmarks
/// (every sequence of a batch its own); salt 0 is the one every prefill measurement uses, which
/// scripts/hf_prefill.py builds too.
pub(super) fn bench_prompt(len: usize, salt: usize, vocab: u32) -> Vec<u32> {
    (0..len as u64)
        .map(|i| ((i * 2654435761 + salt as u64 * 40503 + 17) % u64::from(vocab)) as u32)
        .collect()
}

/// Prefills `prompt` into a fresh sequence (freed afterwards, whatever happens) and runs `then`
/// on its logits; returns the seconds both took, and what `then` gave.
pub(super) fn timed_prefill<B: crate::device::Backend + ?Sized, T>(
    backend: &mut B,
    prompt: &[u32],
    then: impl FnOnce(Vec<f32>) -> T,
) -> Result<(f64, T)> {
    let seq = backend.new_sequence()?;
    let t = Instant::now();
    let result = backend.prefill(seq, prompt).map(then);
    let secs = t.elapsed().as_secs_f64();
    backend.free_sequence(seq);
    Ok((secs, result?))
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
        let prompt = bench_prompt(a.prompt_len + b, b, vocab);
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

/// Four greedy streams decode; after sixteen steps a `len`-token prompt arrives. For each fixed
/// chunk size (the engine's per-step prompt budget, no pacing), for each paced policy
/// (`max_step_slowdown`, under the default cap) and for no chunking (the whole prompt in one
/// step), the gaps between a stream's tokens: the median and the worst of the plain decode steps
/// before the prompt arrived (the worst over the median is the machine's noise floor for the
/// ratios), the median over the whole run, the worst while the prompt was being prefilled, the
/// prompt's time to first token and the steps it took.
fn measure_interference(
    model: &Path,
    len: usize,
    chunks: &[usize],
    slowdowns: &[f64],
) -> Result<Vec<Value>> {
    use crate::device::Backend;
    use crate::engine::DEFAULT_PREFILL_CHUNK;
    const BEFORE: usize = 16;
    let mut rows = Vec::new();
    println!(
        "{:<26} {:>11} {:>11} {:>11} {:>11} {:>12} {:>12} {:>9} {:>6} {:>13}   (4 streams decoding, a {len}-token prompt arrives)",
        "prefill per step", "decode gap", "its worst", "median gap", "worst gap", "worst/decode", "worst/median", "TTFT s", "steps", "chunk: worst/max"
    );
    // (token cap, pacing) of each run.
    let mut runs: Vec<(usize, Option<f64>)> = chunks
        .iter()
        .filter(|&&c| c < len)
        .map(|&c| (c, None))
        .collect();
    runs.extend(slowdowns.iter().map(|&f| (DEFAULT_PREFILL_CHUNK, Some(f))));
    runs.push((len, None));
    for (chunk, pacing) in runs {
        let opts = CpuOptions {
            max_sequences: 8,
            ..CpuOptions::default()
        };
        let backend = CpuBackend::load(model, WeightMode::Decoded, &opts)
            .with_context(|| format!("loading {}", model.display()))?;
        let vocab = backend.config().vocab_size as u32;
        let eopts = EngineOptions {
            max_batch: 8,
            max_prefill_tokens: chunk,
            max_step_slowdown: pacing,
            ..EngineOptions::for_config(backend.config())
        };
        let mut engine = Engine::new(backend, None, eopts);
        let prompt = |n: usize, salt: usize| bench_prompt(n, salt, vocab);
        let mut streams = Vec::new();
        for b in 0..4 {
            let mut r = Request::greedy(prompt(16, b), 1 << 20);
            r.ignore_eos = true;
            streams.push(engine.add(r)?);
        }
        // Times of the first stream's tokens; when the long prompt arrived and gave its token.
        let mut times = Vec::new();
        // The prompt tokens of the step that gave each of those tokens.
        let mut chunk_of = Vec::new();
        let mut long = None;
        let (mut arrived, mut first_token) = (None, None);
        let mut steps = 0;
        let mut prefill_steps = 0;
        while first_token.is_none() || steps < 2 * BEFORE {
            if steps == BEFORE {
                let mut r = Request::greedy(prompt(len, 99), 1);
                r.ignore_eos = true;
                long = Some(engine.add(r)?);
                arrived = Some((Instant::now(), times.len()));
            }
            if long.is_some() && first_token.is_none() {
                prefill_steps += 1;
            }
            let before = engine.stats().prefill_tokens;
            let events = engine.step()?;
            let now = Instant::now();
            let chunk = engine.stats().prefill_tokens - before;
            for e in &events {
                match e {
                    Event::Token { id, .. } if *id == streams[0] => {
                        times.push(now);
                        chunk_of.push(chunk);
                    }
                    Event::Token { id, .. } if Some(*id) == long && first_token.is_none() => {
                        first_token = Some((now, times.len()));
                    }
                    _ => {}
                }
            }
            steps += 1;
            if steps > 100_000 {
                bail!("the {len}-token prompt never produced a token");
            }
        }
        for id in streams {
            engine.cancel(id);
        }
        while engine.has_work() {
            engine.step()?;
        }
        let gaps: Vec<f64> = times
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        let (t0, i0) = arrived.expect("the prompt arrived");
        let (t1, i1) = first_token.expect("loop ran until the first token");
        let median = |v: &[f64]| {
            let mut s = v.to_vec();
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        };
        // Plain decode steps: the gaps before the prompt arrived (the first is the streams'
        // own prefill).
        let plain = &gaps[1..i0.saturating_sub(1).max(2)];
        let decode = median(plain);
        let decode_worst = plain.iter().copied().fold(0f64, f64::max);
        let whole = median(&gaps);
        // Gaps that end at a token given while the prompt was being prefilled (or just after).
        // Gap j ends at token j + 1: its step prefilled chunk_of[j + 1] prompt tokens.
        let (lo, hi) = (i0.saturating_sub(1), i1.min(gaps.len()));
        let (worst, worst_chunk) = (lo..hi)
            .map(|j| (gaps[j], chunk_of[j + 1]))
            .fold((0f64, 0), |a, b| if b.0 > a.0 { b } else { a });
        let largest_chunk = chunk_of[lo + 1..=hi].iter().copied().max().unwrap_or(0);
        let ttft = (t1 - t0).as_secs_f64();
        let (label, policy) = match pacing {
            Some(f) if f == crate::engine::DEFAULT_STEP_SLOWDOWN => {
                (format!("default: paced to {f}x"), "paced")
            }
            Some(f) => (format!("paced to {f}x (cap {chunk})"), "paced"),
            None if chunk >= len => ("whole prompt (unchunked)".to_string(), "unchunked"),
            None => (format!("chunks of {chunk} tokens"), "fixed"),
        };
        println!(
            "{label:<26} {:>9.1}ms {:>9.1}ms {:>9.1}ms {:>9.1}ms {:>11.2}x {:>11.2}x {ttft:>9.2} {prefill_steps:>6} {worst_chunk:>6}/{largest_chunk:<6}",
            decode * 1e3,
            decode_worst * 1e3,
            whole * 1e3,
            worst * 1e3,
            worst / decode,
            worst / whole
        );
        rows.push(json!({
            "policy": policy, "max_step_slowdown": pacing, "prefill_steps": prefill_steps,
            "worst_gap_chunk": worst_chunk, "largest_chunk": largest_chunk,
            "prefill_chunk": chunk, "prompt_len": len, "streams": 4,
            "decode_median_gap_s": decode, "decode_worst_gap_s": decode_worst,
            "median_gap_s": whole, "worst_gap_s": worst,
            "worst_over_decode_median": worst / decode, "worst_over_median": worst / whole,
            "ttft_s": ttft,
            "stream_tokens": times.len(),
        }));
    }
    Ok(rows)
}
