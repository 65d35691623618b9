//! `unweight bench cli`: the whole `compress` and `decompress` commands, file in to file out,
//! next to ZipNN's compress and decompress calls on the same tensors' bytes, in one run.
//!
//! For every plain BF16 checkpoint given (and all-MiniLM-L6-v2, rounded to BF16 and written as
//! one, with `--minilm`) it times `compress` with format version 2's parameters and with
//! version 1's, and `decompress` of each result. Every codec, ZipNN included, follows one
//! stopping rule: runs go on in rounds until each codec has run at least `--repeats` times and
//! spent at least `--min-seconds` in its timed calls (a 30 ms job run five times measures the
//! scheduler more than the job on a shared machine). Within a round the codecs take turns
//! (version 2, version 1, ZipNN), every codec runs once per round, so every codec gets the same
//! number of runs and a change of load hits them alike. The best and the median of each codec's
//! runs are reported, with the number of runs. The input is read from the page cache after the
//! first run and the output goes to the page cache (no fsync), the same for every run and every
//! format. ZipNN gets the concatenation of the checkpoint's tensor bytes in memory
//! (`scripts/zipnn_bench.py`, one run per round): no file I/O at all on its side, so the
//! comparison leans its way. GB/s are bytes of BF16 tensors per second. The load average before
//! and after the run is recorded: on a shared machine the numbers are only as good as that.

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
    /// Fewest timed runs of each codec (every codec, ZipNN included, runs the same number of
    /// times; see `--min-seconds`).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Fewest seconds each codec spends in its timed runs: rounds go on until every codec has
    /// both this and `--repeats` runs.
    #[arg(long, default_value_t = 1.0)]
    min_seconds: f64,
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
    if !(args.min_seconds >= 0.0 && args.min_seconds.is_finite()) {
        bail!("--min-seconds must be a finite number of seconds, at least 0");
    }
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
        "{:<44} {:>8} {:>7} {:>10} {:>10}   (GB/s of BF16, {threads} threads, best of at least {repeats} runs and {} s per codec, load {load_before})",
        "checkpoint / codec", "MiB", "ratio", "compress", "decompress", args.min_seconds
    );
    let rule = Rule {
        runs: repeats,
        seconds: args.min_seconds,
    };
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
        let mut zipnn = ZipnnRuns::default();
        // Rounds of interleaved runs (v2, v1, ZipNN, v2, ...) so that a change in the machine's
        // load hits every codec alike; every codec runs once per round, until each has met the
        // rule (ZipNN's decompress, timed in the same call as its compress, included).
        loop {
            for run in &mut runs {
                run.compress(dir)?;
            }
            if let Some(py) = &args.zipnn_python {
                zipnn.add(super::bench::measure_zipnn(py, &bytes, threads, 1)?, total)?;
            }
            let zipnn_done = args.zipnn_python.is_none()
                || (rule.met(&zipnn.compress) && rule.met(&zipnn.decompress));
            if zipnn_done && runs.iter().all(|r| rule.met(&r.compress_s)) {
                break;
            }
        }
        loop {
            for run in &mut runs {
                run.decompress()?;
            }
            if runs.iter().all(|r| rule.met(&r.decompress_s)) {
                break;
            }
        }
        let zipnn = zipnn.result(total);
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
        if let Some(z) = zipnn {
            print_row(&format!("{name}: zipnn (in memory)"), total, &z);
            row["compress_speedup_vs_zipnn"] = ratio(&v2, &z, "compress_gbps");
            row["compress_speedup_vs_zipnn_median"] = ratio(&v2, &z, "compress_gbps_median");
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
            "min_runs": repeats,
            "min_seconds": args.min_seconds,
            "rule": "every codec (unweight v2, v1 and ZipNN) runs once per round, in turn, until each has at least min_runs runs and min_seconds in its timed calls; best and median reported",
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

/// When a codec has run enough: at least `runs` timed runs and `seconds` of them in all.
struct Rule {
    runs: usize,
    seconds: f64,
}

impl Rule {
    fn met(&self, times: &[f64]) -> bool {
        times.len() >= self.runs && times.iter().sum::<f64>() >= self.seconds
    }
}

/// The fastest of `times` and their median (the mean of the middle two of an even count).
fn best_and_median(times: &[f64]) -> (f64, f64) {
    let mut t = times.to_vec();
    t.sort_by(f64::total_cmp);
    let n = t.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let median = if n % 2 == 1 {
        t[n / 2]
    } else {
        (t[n / 2 - 1] + t[n / 2]) / 2.0
    };
    (t[0], median)
}

/// The timing fields of one direction of a codec: GB/s of the best and the median run, their
/// seconds, the number of runs and the seconds of all of them.
fn timing(direction: &str, times: &[f64], total: usize) -> Vec<(String, Value)> {
    let (best, median) = best_and_median(times);
    vec![
        (
            format!("{direction}_gbps"),
            json!(total as f64 / best / 1e9),
        ),
        (
            format!("{direction}_gbps_median"),
            json!(total as f64 / median / 1e9),
        ),
        (format!("{direction}_seconds"), json!(best)),
        (format!("{direction}_runs"), json!(times.len())),
        (
            format!("{direction}_seconds_total"),
            json!(times.iter().sum::<f64>()),
        ),
    ]
}

/// ZipNN's runs: one compress and one decompress per call of `scripts/zipnn_bench.py`.
#[derive(Default)]
struct ZipnnRuns {
    first: Option<Value>,
    compress: Vec<f64>,
    decompress: Vec<f64>,
}

impl ZipnnRuns {
    /// Adds one call's result (one run: its GB/s are of that run).
    fn add(&mut self, z: Value, total: usize) -> Result<()> {
        for (field, times) in [
            ("compress_gbps", &mut self.compress),
            ("decompress_gbps", &mut self.decompress),
        ] {
            let gbps = z[field]
                .as_f64()
                .filter(|g| *g > 0.0)
                .with_context(|| format!("zipnn benchmark result without {field}: {z}"))?;
            times.push(total as f64 / gbps / 1e9);
        }
        self.first.get_or_insert(z);
        Ok(())
    }

    /// The first call's result with the timing fields of all runs; `None` if ZipNN never ran.
    fn result(&self, total: usize) -> Option<Value> {
        let mut z = self.first.clone()?;
        for (k, v) in timing("compress", &self.compress, total)
            .into_iter()
            .chain(timing("decompress", &self.decompress, total))
        {
            z[k] = v;
        }
        Some(z)
    }
}

/// One format's `compress` and `decompress` runs (directory in, directory out): every run's
/// seconds.
struct Run {
    params: Params,
    comp: PathBuf,
    back: PathBuf,
    compress_s: Vec<f64>,
    decompress_s: Vec<f64>,
    stored: u64,
}

impl Run {
    fn new(params: Params, dir: PathBuf) -> Self {
        Self {
            params,
            comp: dir.join("compressed"),
            back: dir.join("decompressed"),
            compress_s: Vec::new(),
            decompress_s: Vec::new(),
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
        self.compress_s.push(t.elapsed().as_secs_f64());
        self.stored = r.stored_bytes.iter().sum();
        Ok(())
    }

    /// One timed `decompress` of the last `compress`.
    fn decompress(&mut self) -> Result<()> {
        let _ = std::fs::remove_dir_all(&self.back);
        let t = Instant::now();
        container::decompress_dir(&self.comp, &self.back, true, false)
            .with_context(|| format!("decompressing {}", self.comp.display()))?;
        self.decompress_s.push(t.elapsed().as_secs_f64());
        Ok(())
    }

    /// The results; `total` is the checkpoint's tensor bytes.
    fn result(&self, total: usize) -> Value {
        let p = self.params;
        let mut r = json!({
            "params": {
                "chunk_elems": p.chunk_elems,
                "prob_bits": p.prob_bits,
                "mantissa_bits": p.mantissa_bits,
            },
            "compressed_bytes": self.stored,
            "ratio": self.stored as f64 / total as f64,
        });
        for (k, v) in timing("compress", &self.compress_s, total)
            .into_iter()
            .chain(timing("decompress", &self.decompress_s, total))
        {
            r[k] = v;
        }
        r
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_wants_both_the_runs_and_the_seconds() {
        let rule = Rule {
            runs: 3,
            seconds: 1.0,
        };
        assert!(!rule.met(&[0.6, 0.6]), "enough seconds, too few runs");
        assert!(
            !rule.met(&[0.1, 0.1, 0.1, 0.1]),
            "enough runs, too few seconds"
        );
        assert!(rule.met(&[0.4, 0.4, 0.4]));
    }

    #[test]
    fn best_and_median_of_odd_and_even_counts() {
        assert_eq!(best_and_median(&[3.0, 1.0, 2.0]), (1.0, 2.0));
        assert_eq!(best_and_median(&[4.0, 1.0, 3.0, 2.0]), (1.0, 2.5));
        let (b, m) = best_and_median(&[]);
        assert!(b.is_nan() && m.is_nan());
    }
}
