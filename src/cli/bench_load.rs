//! `unweight bench load`: the CPU side of loading a model onto the GPU (every step but the
//! upload), by the streamed path the CUDA backend takes (`device::cuda::stream`: read, decode,
//! encode the runtime form, drop; one fused layer at a time) or by the path it took before
//! (`--path whole`: decode the whole model to BF16 first, keep it, then fuse and encode each
//! layer), or by the path the CUDA backend takes now (`--path persisted`: streamed, with the tbe3
//! runtime form read from `<dir>/runtime/tbe3.bin` when it is there, else computed and written
//! there; `--fresh` removes it first, to measure the first load), so they are measured the same
//! way: wall time and the process's peak RSS (`getrusage`), one path per process (peak RSS is
//! per process), with the system load average before and after (the machine may be shared).
//! Runs without a GPU.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::codec::runtime::{encode_le_bytes, Shape};
use crate::container::Checkpoint;
use crate::device::cuda::options::resolve_plan;
use crate::device::cuda::persist::runtime_path;
use crate::device::cuda::plan::Storage;
use crate::device::cuda::sizing::role_shapes;
use crate::device::cuda::stream::{
    stream_weights, stream_weights_persisted, HostLinear, Persisted, Slot, WeightSink,
};
use crate::device::cuda::{CudaOptions, PlanSource};
use crate::device::DeviceError;
use crate::model::weights::{LlamaWeights, Matrix, MatrixData, WeightMode};
use crate::model::LlamaConfig;

/// Which load to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LoadPath {
    /// Tensor by tensor (the CUDA backend's load).
    Streamed,
    /// The whole model decoded to BF16 first and kept (the load before streaming).
    Whole,
    /// Streamed, the runtime form read from its persisted copy, or computed and persisted when
    /// there is none (the CUDA backend's load).
    Persisted,
}

/// `unweight bench load` arguments.
#[derive(Args, Debug)]
pub struct LoadArgs {
    /// A checkpoint directory (compressed or plain).
    pub dir: PathBuf,
    /// The load to measure.
    #[arg(long, value_enum, default_value_t = LoadPath::Streamed)]
    pub path: LoadPath,
    /// The runtime forms: `compressed` (the default plan: tbe3 where it stores a role) or
    /// `baseline` (every layer raw BF16).
    #[arg(long, default_value = "compressed")]
    pub plan: String,
    /// Multiprocessors assumed by the plan (an H100 SXM / H200 has 132).
    #[arg(long, default_value_t = 132)]
    pub sms: usize,
    /// With `--path persisted`: remove the persisted runtime form first (measures the first
    /// load, which computes and writes it).
    #[arg(long)]
    pub fresh: bool,
    /// Add the result to this JSON file (`results`, one row per run; stamped with the date,
    /// commit and machine).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Counts what the sink is handed and drops it (the upload's place).
#[derive(Default)]
struct Discard {
    pieces: usize,
    runtime_bytes: usize,
    largest: usize,
}

impl WeightSink for Discard {
    fn vector(&mut self, _: Slot, v: Vec<f32>) -> Result<(), DeviceError> {
        self.pieces += 1;
        self.runtime_bytes += 4 * v.len();
        Ok(())
    }
    fn linear(&mut self, _: Slot, _: Shape, f: HostLinear) -> Result<(), DeviceError> {
        self.pieces += 1;
        self.runtime_bytes += f.host_bytes();
        self.largest = self.largest.max(f.host_bytes());
        Ok(())
    }
}

/// The 1-minute load average (`/proc/loadavg`), or `None` where it cannot be read.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0;
    }
    u.ru_maxrss as u64 * 1024
}

/// The BF16 bytes of a matrix loaded decoded (empty otherwise, which the encoder then refuses
/// by its size check).
fn bf16(m: &Matrix) -> &[u8] {
    match &m.data {
        MatrixData::Bf16(b) => b,
        MatrixData::Compressed(_) => &[],
    }
}

/// The load before streaming: the whole model decoded (and kept, as the Triton backend kept it
/// for the model's life), then each fused layer concatenated and encoded as the plan says.
fn whole(
    ckpt: &Checkpoint,
    cfg: &LlamaConfig,
    plan: &crate::device::cuda::plan::Plan,
    sink: &mut Discard,
) -> Result<()> {
    let w = LlamaWeights::load(ckpt, cfg, WeightMode::Decoded)?;
    let mut put = |slot: Slot, parts: &[&Matrix]| -> Result<()> {
        let rows = parts.iter().map(|m| m.rows).sum();
        let cols = parts[0].cols;
        let mut bytes = Vec::with_capacity(2 * rows * cols);
        for m in parts {
            bytes.extend_from_slice(bf16(m));
        }
        let storage = slot.role().map_or(plan.embed, |r| plan.storage(r));
        let form = match storage {
            Storage::Raw => HostLinear::Raw(bytes),
            Storage::Tbe3 => {
                HostLinear::Tbe3(encode_le_bytes(&bytes, Shape::for_matrix(rows, cols)?)?)
            }
        };
        sink.linear(slot, Shape::for_matrix(rows, cols)?, form)?;
        Ok(())
    };
    put(Slot::Embed, &[&w.embed_tokens])?;
    for (l, lw) in w.layers.iter().enumerate() {
        put(Slot::Qkv(l), &[&lw.q_proj, &lw.k_proj, &lw.v_proj])?;
        put(Slot::O(l), &[&lw.o_proj])?;
        put(Slot::GateUp(l), &[&lw.gate_proj, &lw.up_proj])?;
        put(Slot::Down(l), &[&lw.down_proj])?;
    }
    if let Some(m) = &w.lm_head {
        put(Slot::LmHead, &[m])?;
    }
    // The norm vectors, as the streamed path counts them.
    sink.pieces += 2 * w.layers.len() + 1;
    sink.runtime_bytes += 4 * w.norm.len() * (2 * w.layers.len() + 1);
    Ok(())
}

/// Runs the benchmark.
pub fn run(args: &LoadArgs) -> Result<()> {
    let cfg = LlamaConfig::from_dir(&args.dir)?;
    let shapes = role_shapes(&cfg)?;
    let source = match args.plan.as_str() {
        "compressed" => PlanSource::Compressed,
        "baseline" => PlanSource::Baseline,
        other => anyhow::bail!("--plan {other}: expected compressed or baseline"),
    };
    let opts = CudaOptions {
        plan: source,
        ..CudaOptions::default()
    };
    let plan = resolve_plan(&opts, &shapes, args.sms, cfg.tie_word_embeddings);
    let persisted_file = runtime_path(&args.dir);
    if args.fresh {
        anyhow::ensure!(
            args.path == LoadPath::Persisted,
            "--fresh goes with --path persisted"
        );
        match std::fs::remove_file(&persisted_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", persisted_file.display()))
            }
            _ => {}
        }
    }
    let load0 = load_average();
    let rss0 = peak_rss_bytes();
    let t0 = Instant::now();
    let ckpt = Checkpoint::open(&args.dir)?;
    let mut sink = Discard::default();
    let mut persisted = Persisted::Off;
    let times = match args.path {
        LoadPath::Streamed => Some(stream_weights(&ckpt, &cfg, &plan, &mut sink)?),
        LoadPath::Persisted => {
            let (t, p) = stream_weights_persisted(&ckpt, &cfg, &plan, &mut sink, &args.dir)?;
            persisted = p;
            Some(t)
        }
        LoadPath::Whole => {
            whole(&ckpt, &cfg, &plan, &mut sink)?;
            None
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    let peak = peak_rss_bytes();
    let model_bf16: usize = ckpt
        .entries()
        .iter()
        .map(|e| 2 * e.shape.iter().product::<usize>())
        .sum();
    let path = format!("{:?}", args.path).to_lowercase();
    let runtime_form = match &persisted {
        Persisted::Off => "computed".to_string(),
        Persisted::Read(_) => "read from the persisted copy".to_string(),
        Persisted::Written { replaced: None, .. } => "computed and persisted".to_string(),
        Persisted::Written {
            replaced: Some(why),
            ..
        } => format!("computed and persisted (replacing one that {why})"),
        Persisted::NotSaved(why) => format!("computed, not persisted: {why}"),
    };
    let file_bytes = std::fs::metadata(&persisted_file).map(|m| m.len()).ok();
    let row = json!({
        "model": args.dir.display().to_string(),
        "path": path,
        "plan": args.plan,
        "seconds": seconds,
        "peak_rss_bytes": peak,
        "peak_rss_before_load_bytes": rss0,
        "model_bf16_bytes": model_bf16,
        "runtime_bytes": sink.runtime_bytes,
        "largest_runtime_piece_bytes": sink.largest,
        "pieces": sink.pieces,
        "threads": rayon::current_num_threads(),
        "read_decode_seconds": times.map(|t| t.read_decode_s),
        "encode_seconds": times.map(|t| t.encode_s),
        "encoded_layers": times.map(|t| t.encoded),
        "persisted_layers_read": times.map(|t| t.from_persisted),
        "persisted_read_seconds": times.map(|t| t.persisted_read_s),
        "persisted_write_seconds": times.map(|t| t.persisted_write_s),
        "runtime_form": runtime_form,
        "persisted_file_bytes": if args.path == LoadPath::Persisted { file_bytes } else { None },
        "stored_bytes": ckpt.entries().iter().map(|e| ckpt.stored_bytes(e) as u64).sum::<u64>(),
        "load_average_before": load0,
        "load_average_after": load_average(),
    });
    println!(
        "load {path} ({} plan): {seconds:.2} s, peak RSS {:.1} MiB (model {:.1} MiB BF16, \
         runtime form {:.1} MiB, largest piece {:.1} MiB)",
        args.plan,
        peak as f64 / 1048576.0,
        model_bf16 as f64 / 1048576.0,
        sink.runtime_bytes as f64 / 1048576.0,
        sink.largest as f64 / 1048576.0
    );
    if let Some(t) = times {
        println!(
            "  read + decode {:.2} s, tbe3 encode {:.2} s ({} layers), persisted form read {:.2} s \
             ({} layers), written {:.2} s; runtime form {runtime_form}",
            t.read_decode_s,
            t.encode_s,
            t.encoded,
            t.persisted_read_s,
            t.from_persisted,
            t.persisted_write_s
        );
    }
    println!(
        "  load average {} before, {} after",
        load0.map_or("?".into(), |l| format!("{l:.2}")),
        load_average().map_or("?".into(), |l| format!("{l:.2}"))
    );
    if let Some(out) = &args.out {
        // One file gathers the runs (one path per process): each run appends its row and the
        // file is restamped with the date, commit and machine.
        let mut rows: Vec<serde_json::Value> = match std::fs::read_to_string(out) {
            Ok(t) => {
                let doc: serde_json::Value = serde_json::from_str(&t)
                    .with_context(|| format!("{} is not JSON", out.display()))?;
                doc["results"].as_array().cloned().unwrap_or_default()
            }
            Err(_) => Vec::new(),
        };
        rows.push(row);
        let doc = json!({"benchmark": "load", "results": rows});
        super::bench::write_results(out, doc, rayon::current_num_threads())?;
    }
    Ok(())
}
