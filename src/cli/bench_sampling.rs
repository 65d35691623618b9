//! `unweight bench decode --sampling`: sampled decoding (temperature 0.8, top-p 0.95) next to
//! greedy decoding, on the CPU, at each batch size, in one run, and the engine's host time per
//! decode step next to the step time.
//!
//! Host time is everything a step spends outside the model's forward pass: scheduling, sampling
//! (or the argmax), stop checks and detokenization (the model's tokenizer is the engine's
//! detokenizer when the model directory has one). It is measured by timing the backend's
//! forward calls ([`Timed`]) and subtracting them from the step's wall time. Greedy and
//! sampled runs alternate, several rounds each, so a load change on the machine hits both; the
//! medians are reported.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::device::cpu::{CpuBackend, CpuOptions};
use crate::device::{
    Backend, DecodeItem, DeviceError, KvCapacity, KvUsage, Logits, SeqId, WeightMemory,
};
use crate::engine::sampler::argmax;
use crate::engine::text::TextTokenizer;
use crate::engine::{Detokenizer, Engine, EngineOptions, Event, Request, Sampler, SamplingParams};
use crate::model::weights::WeightMode;
use crate::model::LlamaConfig;

/// The sampled setting the goal names.
const TEMPERATURE: f32 = 0.8;
const TOP_P: f32 = 0.95;
/// Greedy / sampled pairs of runs per batch size.
const ROUNDS: usize = 3;

/// A backend whose forward passes (prefill, decode) are timed.
struct Timed<B> {
    inner: B,
    forward: Duration,
}

impl<B: Backend> Timed<B> {
    fn time<T>(&mut self, f: impl FnOnce(&mut B) -> T) -> T {
        let t = Instant::now();
        let out = f(&mut self.inner);
        self.forward += t.elapsed();
        out
    }
}

impl<B: Backend> Backend for Timed<B> {
    fn config(&self) -> &LlamaConfig {
        self.inner.config()
    }
    fn kv_capacity(&self) -> KvCapacity {
        self.inner.kv_capacity()
    }
    fn kv_usage(&self) -> KvUsage {
        self.inner.kv_usage()
    }
    fn weight_memory(&self) -> WeightMemory {
        self.inner.weight_memory()
    }
    fn new_sequence(&mut self) -> Result<SeqId, DeviceError> {
        self.inner.new_sequence()
    }
    fn free_sequence(&mut self, seq: SeqId) {
        self.inner.free_sequence(seq)
    }
    fn sequence_len(&self, seq: SeqId) -> Result<usize, DeviceError> {
        self.inner.sequence_len(seq)
    }
    fn prefill(&mut self, seq: SeqId, tokens: &[u32]) -> Result<Vec<f32>, DeviceError> {
        self.time(|b| b.prefill(seq, tokens))
    }
    fn decode(&mut self, batch: &[DecodeItem]) -> Result<Logits, DeviceError> {
        self.time(|b| b.decode(batch))
    }
    // decode_argmax: the trait's default, the timed `decode` then the argmax on the host (host
    // time, as the sampling of a sampled step is).
}

/// One timed run: `batch` requests, the first step (their prefill) untimed, then `tokens`
/// decode steps timed.
struct Run {
    wall: Duration,
    forward: Duration,
    tokens: Vec<Vec<u32>>,
}

fn run_once(
    engine: &mut Engine<Timed<CpuBackend>>,
    batch: usize,
    tokens: usize,
    prompt_len: usize,
    sampling: Option<SamplingParams>,
) -> Result<Run> {
    let vocab = engine.backend().config().vocab_size as u32;
    let mut ids = Vec::new();
    for b in 0..batch {
        let mut r = Request::greedy(
            super::bench_decode::bench_prompt(prompt_len + b, b, vocab),
            tokens + 1,
        );
        r.ignore_eos = true;
        if let Some(s) = &sampling {
            r.sampling = SamplingParams {
                seed: b as u64,
                ..s.clone()
            };
        }
        ids.push(engine.add(r)?);
    }
    let mut out = vec![Vec::new(); batch];
    let mut record = |events: Vec<Event>| {
        for e in events {
            if let Event::Token { id, token, .. } = e {
                if let Some(i) = ids.iter().position(|&x| x == id) {
                    out[i].push(token);
                }
            }
        }
    };
    record(engine.step()?);
    let forward0 = engine.backend().forward;
    let t = Instant::now();
    for _ in 0..tokens {
        record(engine.step()?);
    }
    let wall = t.elapsed();
    let forward = engine.backend().forward - forward0;
    while engine.has_work() {
        record(engine.step()?);
    }
    Ok(Run {
        wall,
        forward,
        tokens: out,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Greedy and sampled decoding of the plain checkpoint at every batch size; prints a table and
/// returns its rows.
pub(super) fn measure_sampling(
    model: &Path,
    batches: &[usize],
    tokens: usize,
    prompt_len: usize,
) -> Result<Vec<Value>> {
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let opts = CpuOptions {
        max_sequences: max_batch,
        ..CpuOptions::default()
    };
    let mut inner = CpuBackend::load(model, WeightMode::Decoded, &opts)
        .with_context(|| format!("loading {}", model.display()))?;
    let sampler_row = time_sampler(&mut inner, prompt_len)?;
    let detok: Option<Arc<dyn Detokenizer>> = match TextTokenizer::from_dir(model) {
        Ok(t) => Some(Arc::new(t)),
        Err(_) => None,
    };
    let detokenizes = detok.is_some();
    let eopts = EngineOptions {
        max_batch,
        ..EngineOptions::for_config(inner.config())
    };
    let mut engine = Engine::new(
        Timed {
            inner,
            forward: Duration::ZERO,
        },
        detok,
        eopts,
    );
    let sampled = SamplingParams {
        temperature: TEMPERATURE,
        top_p: TOP_P,
        ..SamplingParams::default()
    };
    println!(
        "{:>6} {:>11} {:>11} {:>8} {:>9} {:>9} {:>9} {:>9}   (plain checkpoint, T {TEMPERATURE} top-p {TOP_P}, \
         medians of {ROUNDS} alternating runs, detokenization {})",
        "batch",
        "greedy t/s",
        "sampled t/s",
        "ratio",
        "step ms",
        "host ms",
        "host ms",
        "host %",
        if detokenizes { "on" } else { "off (no tokenizer.json)" }
    );
    println!(
        "{:>6} {:>11} {:>11} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "", "", "", "", "sampled", "greedy", "sampled", "sampled"
    );
    let mut rows = Vec::new();
    for &batch in batches {
        let mut per = [Vec::new(), Vec::new()];
        let mut sampled_tokens: Option<Vec<Vec<u32>>> = None;
        for _ in 0..ROUNDS {
            for (k, params) in [None, Some(sampled.clone())].into_iter().enumerate() {
                let r = run_once(&mut engine, batch, tokens, prompt_len, params)?;
                if k == 1 {
                    match &sampled_tokens {
                        None => sampled_tokens = Some(r.tokens.clone()),
                        Some(t) if *t != r.tokens => {
                            bail!("two sampled runs with the same seeds gave different tokens at batch {batch}")
                        }
                        Some(_) => {}
                    }
                }
                per[k].push(r);
            }
        }
        let tps = |runs: &[Run]| {
            median(
                runs.iter()
                    .map(|r| (batch * tokens) as f64 / r.wall.as_secs_f64())
                    .collect(),
            )
        };
        let ms = |runs: &[Run], f: fn(&Run) -> Duration| {
            median(
                runs.iter()
                    .map(|r| f(r).as_secs_f64() * 1e3 / tokens as f64)
                    .collect(),
            )
        };
        let host = |r: &Run| r.wall.saturating_sub(r.forward);
        let (g, s) = (tps(&per[0]), tps(&per[1]));
        let step_s = ms(&per[1], |r| r.wall);
        let (host_g, host_s) = (ms(&per[0], host), ms(&per[1], host));
        println!(
            "{batch:>6} {g:>11.1} {s:>11.1} {:>8.3} {step_s:>9.2} {host_g:>9.3} {host_s:>9.3} {:>8.1}%",
            s / g,
            100.0 * host_s / step_s
        );
        rows.push(json!({
            "batch": batch,
            "greedy_tokens_per_s": g,
            "sampled_tokens_per_s": s,
            "sampled_over_greedy": s / g,
            "step_ms_greedy": ms(&per[0], |r| r.wall),
            "step_ms_sampled": step_s,
            "host_ms_per_step_greedy": host_g,
            "host_ms_per_step_sampled": host_s,
            "detokenization": detokenizes,
            "temperature": TEMPERATURE,
            "top_p": TOP_P,
            "rounds": ROUNDS,
        }));
    }
    rows.push(sampler_row);
    Ok(rows)
}

/// The sampler alone on one real row of logits (the model's after a bench prompt): time per
/// row at the sampled setting, next to the argmax's, and how many tokens it keeps.
fn time_sampler(backend: &mut CpuBackend, prompt_len: usize) -> Result<Value> {
    let vocab = backend.config().vocab_size;
    let seq = backend.new_sequence()?;
    let prompt = super::bench_decode::bench_prompt(prompt_len, 0, vocab as u32);
    let row = backend.prefill(seq, &prompt);
    backend.free_sequence(seq);
    let row = row?;
    let sampler = Sampler::new(SamplingParams {
        temperature: TEMPERATURE,
        top_p: TOP_P,
        seed: 1,
        ..SamplingParams::default()
    });
    const N: u64 = 2000;
    let mut acc = 0u64;
    let t = Instant::now();
    for pos in 0..N {
        acc += u64::from(sampler.sample(std::hint::black_box(&row), pos));
    }
    let sample_us = t.elapsed().as_secs_f64() * 1e6 / N as f64;
    let t = Instant::now();
    for _ in 0..N {
        acc += u64::from(argmax(std::hint::black_box(&row)));
    }
    let argmax_us = t.elapsed().as_secs_f64() * 1e6 / N as f64;
    std::hint::black_box(acc);
    let kept = sampler.kept(&row).len();
    println!(
        "sampler alone: {sample_us:.1} us per row of {vocab} logits ({kept} tokens kept), argmax {argmax_us:.1} us"
    );
    Ok(json!({
        "sampler_us_per_row": sample_us,
        "argmax_us_per_row": argmax_us,
        "vocab": vocab,
        "kept_tokens": kept,
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
    }))
}
