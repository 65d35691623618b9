//! `unweight bench decode --device cuda`: decode steps of the CUDA backend, on a synthetic model
//! generated in device memory (`--shape`) or a checkpoint (`--model`), next to the device's own
//! copy bandwidth measured in the same run.
//!
//! For each batch size: `batch` sequences with pseudo-random prompts of lengths `prompt_len + i`
//! are prefilled, then three untimed decode steps run (the first captures the bucket's CUDA
//! graph), then `tokens` timed steps, each fed the greedy (argmax) tokens of the previous one as
//! the engine would. Reported per batch (medians over the timed steps): the device time of a step
//! (CUDA events), the host time of copying the logits back, of the CPU argmax, and of the whole
//! step; tokens/s; and weight bytes read per step over the device time, as a fraction of the
//! device-to-device copy bandwidth (bytes read plus written, buffers larger than L2).

use std::time::Instant;

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::json;

use super::bench_decode::DecodeArgs;
use crate::device::cuda::{self, CudaBackend, CudaOptions};
use crate::device::{Backend, DecodeItem};
use crate::engine::sampler::argmax;
use crate::model::{LlamaConfig, LlamaShape};

/// Bytes of each buffer of the copy-bandwidth measurement (two of them; far larger than L2).
const COPY_BYTES: usize = 1 << 30;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the CUDA decode benchmark.
pub fn run(a: &DecodeArgs) -> Result<()> {
    let info = cuda::probe().map_err(|r| anyhow!("--device cuda: no usable GPU: {r}"))?;
    eprintln!(
        "bench: {} (sm_{}{}, {} SMs, {} MiB, driver CUDA {}.{})",
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.multiprocessors,
        info.total_memory >> 20,
        info.driver_cuda_version / 1000,
        info.driver_cuda_version % 1000 / 10
    );
    let copy_bw = cuda::copy_bandwidth(COPY_BYTES, 20)?;
    let max_batch = *a.batch.iter().max().expect("checked non-empty");
    let max_context = a
        .max_context
        .unwrap_or(a.prompt_len + max_batch + a.tokens + 8);
    let opts = CudaOptions {
        max_sequences: max_batch,
        max_context: Some(max_context),
        split_activations: !a.bf16_activations,
        graphs: !a.no_graphs,
        ..CudaOptions::default()
    };
    let t = Instant::now();
    let (mut backend, model_name) = match (&a.shape, &a.model) {
        (Some(shape), _) => {
            let s = LlamaShape::preset(shape).expect("clap restricts the shape to presets");
            let cfg = LlamaConfig::from_json(s.config_json().as_object().expect("an object"))?;
            (
                CudaBackend::synthetic(cfg, 0, 0.02, &opts)?,
                format!("synthetic {shape} (N(0, 0.02) BF16, generated on the device)"),
            )
        }
        (None, Some(dir)) => (
            CudaBackend::load(dir, &opts).with_context(|| format!("loading {}", dir.display()))?,
            dir.display().to_string(),
        ),
        (None, None) => bail!("--device cuda needs --shape or --model"),
    };
    let load_s = t.elapsed().as_secs_f64();
    if backend.kv_capacity().max_sequences < max_batch {
        bail!(
            "the KV cache holds {} sequences, fewer than the largest batch {max_batch}",
            backend.kv_capacity().max_sequences
        );
    }
    let wbytes = backend.weight_bytes_per_step();
    println!(
        "device-to-device copy: {:.0} GB/s (read + write, {} MiB buffers, median of 20)",
        copy_bw / 1e9,
        COPY_BYTES >> 20
    );
    println!(
        "{:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9} {:>7}",
        "batch",
        "gpu ms",
        "copy ms",
        "argmax",
        "step ms",
        "tok/s",
        "tok/s gpu",
        "wt GB/s",
        "of copy"
    );
    let mut rows = Vec::new();
    for &batch in &a.batch {
        let r = measure(&mut backend, batch, a)?;
        let gbps = wbytes as f64 / (r.gpu_ms * 1e-3) / 1e9;
        let frac = gbps * 1e9 / copy_bw;
        let step = r.step_ms + r.argmax_ms;
        println!(
            "{batch:>6} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>10.1} {:>10.1} {:>9.0} {:>6.1}%",
            r.gpu_ms,
            r.copy_ms,
            r.argmax_ms,
            step,
            batch as f64 / (step * 1e-3),
            batch as f64 / (r.gpu_ms * 1e-3),
            gbps,
            100.0 * frac
        );
        rows.push(json!({
            "batch": batch,
            "bucket": r.bucket,
            "gpu_ms_per_step": r.gpu_ms,
            "logits_copy_ms": r.copy_ms,
            "cpu_argmax_ms": r.argmax_ms,
            "step_ms": step,
            "tokens_per_s": batch as f64 / (step * 1e-3),
            "tokens_per_s_gpu_only": batch as f64 / (r.gpu_ms * 1e-3),
            "weight_bytes_per_step": wbytes,
            "weight_read_gbps": gbps,
            "fraction_of_copy_bandwidth": frac,
        }));
    }
    if let Some(out) = &a.out {
        let doc = json!({
            "benchmark": "decode",
            "device": "cuda",
            "gpu": info,
            "model": model_name,
            "tokens": a.tokens,
            "prompt_len": a.prompt_len,
            "max_context": max_context,
            "split_activations": opts.split_activations,
            "graphs": opts.graphs,
            "load_s": load_s,
            "kv_cache_bytes": backend.kv_bytes(),
            "copy_bandwidth_gbps": copy_bw / 1e9,
            "copy_bandwidth_note": "device-to-device cuMemcpyDtoDAsync, bytes read + written, 1 GiB buffers, median of 20 (CUDA events)",
            "results": rows,
        });
        super::bench::write_results(out, doc, rayon::current_num_threads())?;
    }
    Ok(())
}

struct Measured {
    gpu_ms: f64,
    copy_ms: f64,
    argmax_ms: f64,
    step_ms: f64,
    bucket: usize,
}

fn measure(b: &mut CudaBackend, batch: usize, a: &DecodeArgs) -> Result<Measured> {
    let vocab = b.config().vocab_size as u64;
    let mut seqs = Vec::with_capacity(batch);
    let mut next = Vec::with_capacity(batch);
    let (mut gpu, mut copy, mut am, mut step) = (vec![], vec![], vec![], vec![]);
    let mut bucket = 0;
    // Every sequence taken is freed below, whatever fails (the next batch size needs the slots).
    let result = (|| -> Result<()> {
        for i in 0..batch {
            let seq = b.new_sequence()?;
            seqs.push((seq, 0));
            let prompt: Vec<u32> = (0..a.prompt_len + i)
                .map(|j| ((j as u64 * 2654435761 + i as u64 * 40503 + 17) % vocab) as u32)
                .collect();
            let logits = b.prefill(seq, &prompt)?;
            next.push(argmax(&logits));
            seqs[i].1 = prompt.len();
        }
        for s in 0..a.tokens + 3 {
            let items: Vec<DecodeItem> = seqs
                .iter()
                .zip(&next)
                .map(|(&(seq, pos), &token)| DecodeItem { seq, token, pos })
                .collect();
            let t = Instant::now();
            let logits = b.decode(&items)?;
            let step_ms = t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            for (i, n) in next.iter_mut().enumerate() {
                *n = argmax(logits.row(i));
            }
            let argmax_ms = t.elapsed().as_secs_f64() * 1e3;
            for sq in &mut seqs {
                sq.1 += 1;
            }
            if s >= 3 {
                let tm = b.last_timing();
                gpu.push(tm.gpu_ms);
                copy.push(tm.copy_ms);
                am.push(argmax_ms);
                step.push(step_ms);
                bucket = tm.bucket;
            }
        }
        Ok(())
    })();
    for (seq, _) in &seqs {
        b.free_sequence(*seq);
    }
    result?;
    if gpu.is_empty() {
        bail!("no timed decode step (--tokens must be at least 1)");
    }
    Ok(Measured {
        gpu_ms: median(&mut gpu),
        copy_ms: median(&mut copy),
        argmax_ms: median(&mut am),
        step_ms: median(&mut step),
        bucket,
    })
}
