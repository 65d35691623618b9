//! `unweight bench cli`: the whole `compress` and `decompress` commands, file in to file out,
//! next to ZipNN's compress and decompress calls on the same tensors' bytes, in one run.
//!
//! For every plain BF16 checkpoint given (and all-MiniLM-L6-v2, rounded to BF16 and written as
//! one, with `--minilm`) it times, best of `--repeats`: `compress` with format version 2's
//! parameters and with version 1's, and `decompress` of each result; the repeats of the codecs
//! are interleaved, so a change of load on a shared machine hits them alike. The input is read from the
//! page cache after the first repeat and the output goes to the page cache (no fsync), the same
//! for every repeat and every format. ZipNN gets the concatenation of the checkpoint's tensor
//! bytes in memory (`scripts/zipnn_bench.py`): no file I/O at all on its side, so the comparison
//! leans its way. GB/s are bytes of BF16 tensors per second. The load average before and after
//! the run is recorded: on a shared machine the numbers are only as good as that.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use super::bench::print_row;
use crate::codec::Params;
use crate::container::{self, CompressOptions, SafetensorsFile};

/// Arguments of `unweight bench cli`.
#[derive(Args, Debug)]
pub struct CliArgs {
    /// A plain BF16 checkpoint directory (repeatable).
    #[arg(long = "model")]
    models: Vec<PathBuf>,
    /// all-MiniLM-L6-v2 model.safetensors (FP32; see scripts/fetch-minilm): measured as a BF16
    /// checkpoint made from it.
    #[arg(long)]
    minilm: Option<PathBuf>,
    /// Timed repeats per measurement (the best is reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Python of a venv with zipnn (see scripts/bench-env); without it ZipNN is not run.
    #[arg(long)]
    zipnn_python: Option<PathBuf>,
    /// Where the outputs go while measured (default: the system temp dir); removed afterwards.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs `bench cli`.
pub fn run(args: &CliArgs) -> Result<()> {
    let repeats = args.repeats.max(1);
    let threads = rayon::current_num_threads();
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("unweight-bench-cli-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let result = measure_all(args, repeats, threads, &work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn measure_all(args: &CliArgs, repeats: usize, threads: usize, work: &Path) -> Result<()> {
    let mut models: Vec<(String, PathBuf)> = args
        .models
        .iter()
        .map(|m| (m.display().to_string(), m.clone()))
        .collect();
    if let Some(p) = &args.minilm {
        let dir = work.join("minilm-bf16");
        minilm_checkpoint(p, &dir)?;
        models.push(("MiniLM-L6 (BERT) fp32->bf16".into(), dir));
    }
    if models.is_empty() {
        bail!("bench cli: give at least one --model or --minilm");
    }
    if args.zipnn_python.is_none() {
        eprintln!("bench: no --zipnn-python given: ZipNN is NOT measured, no comparison is made");
    }
    let load_before = loadavg();
    println!(
        "{:<44} {:>8} {:>7} {:>10} {:>10}   (GB/s of BF16, {threads} threads, best of {repeats}, load {load_before})",
        "checkpoint / codec", "MiB", "ratio", "compress", "decompress"
    );
    let mut results = Vec::new();
    for (name, dir) in &models {
        let bytes = tensor_bytes(dir)?;
        let total = bytes.len();
        let formats = [Params::default(), super::bench::V1_PARAMS];
        let mut runs: Vec<Run> = formats
            .iter()
            .enumerate()
            .map(|(i, &p)| Run::new(p, work.join(format!("f{i}"))))
            .collect();
        let mut zipnn: Option<Value> = None;
        // Repeats are interleaved (v2, v1, ZipNN, v2, ...) so that a change in the machine's
        // load hits every codec alike.
        for _ in 0..repeats {
            for run in &mut runs {
                run.compress(dir)?;
            }
            if let Some(py) = &args.zipnn_python {
                let z = super::bench::measure_zipnn(py, &bytes, threads, 1)?;
                zipnn = Some(match zipnn {
                    None => z,
                    Some(mut best) => {
                        for f in ["compress_gbps", "decompress_gbps"] {
                            if z[f].as_f64() > best[f].as_f64() {
                                best[f] = z[f].clone();
                            }
                        }
                        best
                    }
                });
            }
        }
        for _ in 0..repeats {
            for run in &mut runs {
                run.decompress()?;
            }
        }
        let original = tensor_bytes(dir)?;
        let [v2, v1] = [&runs[0], &runs[1]].map(|r| r.result(total));
        for run in &runs {
            // The round trip must give the tensors back exactly.
            if tensor_bytes(&run.back)? != original {
                bail!(
                    "{}: compress + decompress is not byte-identical",
                    dir.display()
                );
            }
        }
        print_row(&format!("{name}: unweight compress/decompress"), total, &v2);
        print_row(&format!("{name}: unweight format v1"), total, &v1);
        let mut row = json!({
            "checkpoint": name,
            "bytes": total,
            "unweight": v2,
            "unweight_format_v1": v1,
            "decompress_v2_over_v1": ratio(&v2, &v1, "decompress_gbps"),
        });
        if let Some(mut z) = zipnn {
            z["repeats"] = json!(repeats);
            print_row(&format!("{name}: zipnn (in memory)"), total, &z);
            row["compress_speedup_vs_zipnn"] = ratio(&v2, &z, "compress_gbps");
            row["decompress_speedup_vs_zipnn"] = ratio(&v2, &z, "decompress_gbps");
            row["zipnn"] = z;
        }
        for run in &runs {
            let _ = std::fs::remove_dir_all(&run.comp);
            let _ = std::fs::remove_dir_all(&run.back);
        }
        results.push(row);
    }
    let load_after = loadavg();
    println!("load average before {load_before}, after {load_after}");
    if let Some(out) = &args.out {
        let doc = json!({
            "benchmark": "cli",
            "repeats": repeats,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "results": results,
        });
        super::bench::write_results(out, doc, threads)?;
    }
    Ok(())
}

/// `a[field] / b[field]`, or null where either is missing.
fn ratio(a: &Value, b: &Value, field: &str) -> Value {
    match (a[field].as_f64(), b[field].as_f64()) {
        (Some(x), Some(y)) if y > 0.0 => json!(x / y),
        _ => Value::Null,
    }
}

/// The first line of /proc/loadavg's three averages (empty where there is none).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Every tensor's bytes of a plain checkpoint, concatenated in storage order.
fn tensor_bytes(dir: &Path) -> Result<Vec<u8>> {
    let ck = container::Checkpoint::open(dir)?;
    if ck.is_compressed() {
        bail!(
            "{}: already compressed; bench cli wants a plain checkpoint",
            dir.display()
        );
    }
    let mut out = Vec::new();
    for e in ck.entries() {
        out.extend_from_slice(&ck.load_entry(e)?);
    }
    Ok(out)
}

/// One format's `compress` and `decompress` runs (directory in, directory out), best times.
struct Run {
    params: Params,
    comp: PathBuf,
    back: PathBuf,
    best_c: f64,
    best_d: f64,
    stored: u64,
}

impl Run {
    fn new(params: Params, dir: PathBuf) -> Self {
        Self {
            params,
            comp: dir.join("compressed"),
            back: dir.join("decompressed"),
            best_c: f64::INFINITY,
            best_d: f64::INFINITY,
            stored: 0,
        }
    }

    /// One timed `compress` of `dir`.
    fn compress(&mut self, dir: &Path) -> Result<()> {
        let opts = CompressOptions {
            params: self.params,
            force: true,
            progress: false,
        };
        let _ = std::fs::remove_dir_all(&self.comp);
        let t = Instant::now();
        let r = container::compress_dir(dir, &self.comp, &opts)
            .with_context(|| format!("compressing {}", dir.display()))?;
        self.best_c = self.best_c.min(t.elapsed().as_secs_f64());
        self.stored = r.stored_bytes.iter().sum();
        Ok(())
    }

    /// One timed `decompress` of the last `compress`.
    fn decompress(&mut self) -> Result<()> {
        let _ = std::fs::remove_dir_all(&self.back);
        let t = Instant::now();
        container::decompress_dir(&self.comp, &self.back, true, false)
            .with_context(|| format!("decompressing {}", self.comp.display()))?;
        self.best_d = self.best_d.min(t.elapsed().as_secs_f64());
        Ok(())
    }

    /// The results; `total` is the checkpoint's tensor bytes.
    fn result(&self, total: usize) -> Value {
        let p = self.params;
        json!({
            "params": {
                "chunk_elems": p.chunk_elems,
                "prob_bits": p.prob_bits,
                "mantissa_bits": p.mantissa_bits,
            },
            "compressed_bytes": self.stored,
            "ratio": self.stored as f64 / total as f64,
            "compress_gbps": total as f64 / self.best_c / 1e9,
            "decompress_gbps": total as f64 / self.best_d / 1e9,
            "compress_seconds": self.best_c,
            "decompress_seconds": self.best_d,
        })
    }
}

/// Writes the F32 tensors of a safetensors file, rounded to BF16 with their names and shapes,
/// as a one-file plain checkpoint in `dir`.
fn minilm_checkpoint(path: &Path, dir: &Path) -> Result<()> {
    use crate::model::synth::f32_to_bf16;
    let f = SafetensorsFile::open(path)?;
    let mut tensors = Vec::new();
    for (name, dtype, shape) in f.tensors() {
        if dtype != safetensors::Dtype::F32 {
            continue;
        }
        let bytes: Vec<u8> = f
            .bytes(name)
            .expect("listed tensor")
            .chunks_exact(4)
            .flat_map(|c| f32_to_bf16(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
            .collect();
        tensors.push((name.to_string(), shape.to_vec(), bytes));
    }
    if tensors.is_empty() {
        bail!("{}: no F32 tensors", path.display());
    }
    std::fs::create_dir_all(dir)?;
    let layout: Vec<_> = tensors
        .iter()
        .map(|(n, s, _)| (n.as_str(), safetensors::Dtype::BF16, s.as_slice()))
        .collect();
    let meta = Default::default();
    let reserve = container::header_reserve(&layout, &meta);
    let mut w = container::SafetensorsWriter::create(&dir.join("model.safetensors"), reserve)?;
    for (n, s, b) in &tensors {
        w.add(n, safetensors::Dtype::BF16, s, b)?;
    }
    w.finish(&meta)?;
    Ok(())
}
