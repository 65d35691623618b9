//! `unweight bench decode --burst N`: a burst of short requests next to running streams, under
//! the engine's prefill policies side by side (CPU, plain checkpoint).
//!
//! Pacing prefill against running streams keeps their gaps between tokens short while a long
//! prompt is admitted (`--interference`), but paced naively it also admits every short prompt a
//! few tokens a step, one after another. This measures what a burst costs and gets under each
//! policy: four greedy streams decode; after sixteen steps `N` requests with prompts of
//! `--burst-len` tokens arrive together, each generating [`BURST_TOKENS`] tokens. Reported: the
//! burst's time to first token (median, worst), the time and the engine steps until its last
//! request finished (the steps do not depend on the machine's speed but for paced prompts), the
//! most of its requests streaming at once, and a running stream's worst gap next to its plain
//! decode gap. Every policy must generate the same tokens.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::bench_decode::bench_prompt;
use crate::device::cpu::{CpuBackend, CpuOptions};
use crate::device::Backend;
use crate::engine::{Engine, EngineOptions, Event, Request, RequestId, DEFAULT_STEP_SLOWDOWN};
use crate::model::weights::WeightMode;

/// Tokens each request of the burst generates.
pub const BURST_TOKENS: usize = 8;

/// Decode steps of the four streams before the burst arrives.
const BEFORE: usize = 16;

/// The policies compared: a label, `max_step_slowdown` and `short_prompt_tokens` (the token
/// cap is the default in every one).
fn policies() -> Vec<(&'static str, Option<f64>, Option<usize>)> {
    vec![
        ("fixed cap, no pacing", None, None),
        ("every prompt paced", Some(DEFAULT_STEP_SLOWDOWN), Some(0)),
        (
            "default: long ones paced",
            Some(DEFAULT_STEP_SLOWDOWN),
            None,
        ),
    ]
}

/// Runs the burst under every policy; returns one JSON row per policy.
pub(super) fn measure_burst(model: &Path, count: usize, len: usize) -> Result<Vec<Value>> {
    println!(
        "{:<26} {:>10} {:>10} {:>10} {:>6} {:>8} {:>11} {:>12}   (4 streams decoding, {count} prompts of {len} tokens arrive, {BURST_TOKENS} tokens each)",
        "policy", "TTFT med s", "TTFT max s", "all done s", "steps", "at once", "decode gap", "worst/decode"
    );
    let mut rows = Vec::new();
    let mut reference: Option<Vec<Vec<u32>>> = None;
    for (label, slowdown, short) in policies() {
        let opts = CpuOptions {
            max_sequences: 4 + count,
            max_context: Some(len.max(16) + BEFORE + 4 * BURST_TOKENS + 1024),
            ..CpuOptions::default()
        };
        let backend = CpuBackend::load(model, WeightMode::Decoded, &opts)
            .with_context(|| format!("loading {}", model.display()))?;
        let vocab = backend.config().vocab_size as u32;
        let defaults = EngineOptions::for_config(backend.config());
        let eopts = EngineOptions {
            max_batch: 4 + count,
            max_step_slowdown: slowdown,
            short_prompt_tokens: short.unwrap_or(defaults.short_prompt_tokens),
            ..defaults
        };
        let cap = eopts.max_prefill_tokens;
        let short_tokens = eopts.short_prompt_tokens;
        let mut engine = Engine::new(backend, None, eopts);
        let mut streams = Vec::new();
        for b in 0..4 {
            let mut r = Request::greedy(bench_prompt(16, b, vocab), 1 << 20);
            r.ignore_eos = true;
            streams.push(engine.add(r)?);
        }
        let mut stream_times = Vec::new();
        let mut burst: Vec<RequestId> = Vec::new();
        let mut tokens = vec![Vec::new(); count];
        let mut first: Vec<Option<Instant>> = vec![None; count];
        let mut done: Vec<Option<Instant>> = vec![None; count];
        let (mut arrived, mut arrived_at_token) = (None, 0);
        let mut most_at_once = 0;
        let mut steps = 0;
        while done.iter().any(Option::is_none) {
            if steps == BEFORE {
                for i in 0..count {
                    let mut r = Request::greedy(bench_prompt(len, 100 + i, vocab), BURST_TOKENS);
                    r.ignore_eos = true;
                    burst.push(engine.add(r)?);
                }
                arrived = Some(Instant::now());
                arrived_at_token = stream_times.len();
            }
            let events = engine.step()?;
            let now = Instant::now();
            for e in &events {
                match e {
                    Event::Token { id, .. } if *id == streams[0] => stream_times.push(now),
                    Event::Token { id, token, .. } => {
                        if let Some(i) = burst.iter().position(|b| b == id) {
                            tokens[i].push(*token);
                            first[i].get_or_insert(now);
                        }
                    }
                    Event::Finished { id, .. } => {
                        if let Some(i) = burst.iter().position(|b| b == id) {
                            done[i] = Some(now);
                        }
                    }
                }
            }
            let streaming = (0..count)
                .filter(|&i| first[i].is_some() && done[i].is_none_or(|d| d == now))
                .count();
            most_at_once = most_at_once.max(streaming);
            steps += 1;
            if steps > 100_000 {
                bail!("the burst never finished");
            }
        }
        for id in streams {
            engine.cancel(id);
        }
        while engine.has_work() {
            engine.step()?;
        }
        match &reference {
            None => reference = Some(tokens),
            Some(r) if *r != tokens => {
                bail!("`{label}` generated different tokens for the burst than `fixed cap`")
            }
            Some(_) => {}
        }
        let t0 = arrived.expect("the burst arrived");
        let secs = |t: &Option<Instant>| (t.expect("every request ended") - t0).as_secs_f64();
        let mut ttft: Vec<f64> = first.iter().map(secs).collect();
        ttft.sort_by(f64::total_cmp);
        let all_done = done.iter().map(secs).fold(0f64, f64::max);
        let gaps: Vec<f64> = stream_times
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        // Plain decode gaps: before the burst (the first is the streams' own prefill).
        let mut plain = gaps[1..arrived_at_token.saturating_sub(1).max(2)].to_vec();
        plain.sort_by(f64::total_cmp);
        let decode = plain[plain.len() / 2];
        let worst = gaps[arrived_at_token.saturating_sub(1)..]
            .iter()
            .copied()
            .fold(0f64, f64::max);
        let (median_ttft, worst_ttft) = (ttft[ttft.len() / 2], ttft[ttft.len() - 1]);
        println!(
            "{label:<26} {median_ttft:>10.2} {worst_ttft:>10.2} {all_done:>10.2} {:>6} {most_at_once:>8} {:>9.1}ms {:>11.2}x",
            steps - BEFORE,
            decode * 1e3,
            worst / decode
        );
        rows.push(json!({
            "policy": label, "max_step_slowdown": slowdown, "short_prompt_tokens": short_tokens,
            "max_prefill_tokens": cap, "requests": count, "prompt_len": len,
            "tokens_each": BURST_TOKENS, "streams": 4,
            "ttft_median_s": median_ttft, "ttft_worst_s": worst_ttft, "all_done_s": all_done,
            "steps": steps - BEFORE,
            "most_at_once": most_at_once, "decode_median_gap_s": decode, "worst_gap_s": worst,
            "worst_over_decode_median": worst / decode,
        }));
    }
    Ok(rows)
}
