//! `bench decode --prefill` on the CPU: how fast one prompt is prefilled by each weight form
//! the CPU backend holds (plain BF16, compressed decoded at load, compressed on the fly) and,
//! with `--hf-python`, by Hugging Face transformers in f32 and BF16 on the same prompts and
//! threads.
//!
//! On a shared machine a run measures the neighbours as much as the code, and the load changes
//! from one minute to the next; timing ours first and transformers' afterwards compared two
//! different machines. So every timed run alternates: per repeat and prompt length, each of our
//! forms, then transformers' f32 and BF16 (a long-lived `scripts/hf_prefill.py` that answers one
//! timed pass per request), and the best of [`PREFILL_REPEATS`] counts for each alike.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use super::bench_decode::{bench_prompt, timed_prefill};
use crate::device::cpu::{CpuBackend, CpuOptions};
use crate::device::Backend;
use crate::model::weights::WeightMode;

/// Timed runs per prompt length and contender, ours and transformers' alike (the best counts).
pub(super) const PREFILL_REPEATS: usize = 5;

/// The dtypes transformers is timed in, as `scripts/hf_prefill.py` names them.
const HF_DTYPES: [&str; 2] = ["float32", "bfloat16"];

/// One weight form of ours: its label, checkpoint directory and how the CPU holds it.
pub(super) type Form<'a> = (&'a str, &'a Path, WeightMode);

/// Prefill tokens/s of every form in `forms` (and of transformers with `hf_python`) for each of
/// `lengths`, alternated as the module says. Returns our rows (`weights`, `mode`,
/// `prompt_len`, `tokens_per_s`, `repeats`) and transformers' document (versions, threads,
/// repeats, and per dtype a map from prompt length to tokens/s). Fails if a form's last-position
/// logits differ from the first form's, or between its repeats: they hold the same weights.
pub(super) fn measure_prefill(
    forms: &[Form<'_>],
    lengths: &[usize],
    model: &Path,
    hf_python: Option<&Path>,
) -> Result<(Vec<Value>, Option<Value>)> {
    let opts = CpuOptions {
        max_sequences: 1,
        ..CpuOptions::default()
    };
    let mut backends = Vec::with_capacity(forms.len());
    for (_, dir, mode) in forms {
        backends.push(
            CpuBackend::load(dir, *mode, &opts)
                .with_context(|| format!("loading {}", dir.display()))?,
        );
    }
    let threads = rayon::current_num_threads();
    let mut hf = match hf_python {
        Some(py) => Some(HfPrefill::start(py, model, threads)?),
        None => None,
    };
    let vocab = backends
        .first()
        .context("no weight form to measure")?
        .config()
        .vocab_size as u32;
    // best[form][length] seconds; the logits' bits of each (form, length).
    let mut best = vec![vec![f64::INFINITY; lengths.len()]; forms.len()];
    let mut hf_best = vec![vec![f64::INFINITY; lengths.len()]; HF_DTYPES.len()];
    let mut bits: Vec<Vec<Option<Vec<u32>>>> = vec![vec![None; lengths.len()]; forms.len()];
    for _ in 0..PREFILL_REPEATS {
        for (li, &len) in lengths.iter().enumerate() {
            let prompt = bench_prompt(len, 0, vocab);
            for (fi, backend) in backends.iter_mut().enumerate() {
                let name = forms[fi].0;
                let (secs, logits) = timed_prefill(backend, &prompt, |l| l)
                    .with_context(|| format!("`{name}`: prefill of {len} tokens"))?;
                best[fi][li] = best[fi][li].min(secs);
                let now: Vec<u32> = logits.iter().map(|v| v.to_bits()).collect();
                match &bits[fi][li] {
                    Some(b) if *b != now => {
                        bail!("`{name}`: prefill of {len} tokens: repeats gave different logits")
                    }
                    Some(_) => {}
                    None => {
                        if fi > 0 && bits[0][li].as_ref() != Some(&now) {
                            bail!(
                                "`{name}`: the logits after a {len}-token prefill differ from \
                                 `{}`'s",
                                forms[0].0
                            );
                        }
                        bits[fi][li] = Some(now);
                    }
                }
            }
            if let Some(hf) = &mut hf {
                for (di, dtype) in HF_DTYPES.iter().enumerate() {
                    hf_best[di][li] = hf_best[di][li].min(hf.time(dtype, len)?);
                }
            }
        }
    }
    let mut rows = Vec::new();
    for (fi, (name, _, mode)) in forms.iter().enumerate() {
        for (li, &len) in lengths.iter().enumerate() {
            let tps = len as f64 / best[fi][li];
            println!("{name:<30} prefill of {len} tokens: {tps:.1} tokens/s");
            rows.push(json!({
                "weights": name, "mode": mode.as_str(), "prompt_len": len, "tokens_per_s": tps,
                "repeats": PREFILL_REPEATS,
            }));
        }
    }
    let Some(hf) = hf else {
        return Ok((rows, None));
    };
    let mut doc = hf.finish()?;
    doc["repeats"] = json!(PREFILL_REPEATS);
    doc["alternated_with_ours"] = json!(true);
    for (di, dtype) in HF_DTYPES.iter().enumerate() {
        let speeds: Map<String, Value> = lengths
            .iter()
            .enumerate()
            .map(|(li, &len)| (len.to_string(), json!(len as f64 / hf_best[di][li])))
            .collect();
        doc[*dtype] = Value::Object(speeds);
    }
    print_comparison(forms, lengths, &best, &hf_best, threads);
    Ok((rows, Some(doc)))
}

/// Ours (the first form, the plain checkpoint, and the compressed one decoded at load when
/// present) next to transformers' f32 and BF16, per prompt length.
fn print_comparison(
    forms: &[Form<'_>],
    lengths: &[usize],
    best: &[Vec<f64>],
    hf_best: &[Vec<f64>],
    threads: usize,
) {
    let decoded: Vec<usize> = (0..forms.len())
        .filter(|&f| forms[f].2 == WeightMode::Decoded)
        .collect();
    println!(
        "{:<8} {:>14} {:>14} {:>14} {:>14} {:>10}   (prefill tokens/s, {threads} threads, best of {PREFILL_REPEATS}, alternated)",
        "prompt", "unweight bf16", "unweight comp.", "hf float32", "hf bfloat16", "ours/f32"
    );
    for (li, &len) in lengths.iter().enumerate() {
        let tps = |secs: f64| len as f64 / secs;
        let ours: Vec<f64> = decoded.iter().map(|&f| tps(best[f][li])).collect();
        let column = |i: usize| ours.get(i).copied().unwrap_or(f64::NAN);
        let f32s = tps(hf_best[0][li]);
        let worst = ours.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "{len:<8} {:>14.1} {:>14.1} {f32s:>14.1} {:>14.1} {:>9.2}x",
            column(0),
            column(1),
            tps(hf_best[1][li]),
            worst / f32s
        );
    }
}

/// A running `scripts/hf_prefill.py`: transformers' models loaded once, one timed prefill per
/// request.
struct HfPrefill {
    child: Child,
    /// Taken (closed) to end the script.
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// Its stderr (transformers' warnings, a traceback), kept in a file so that a chatty process
    /// never blocks on a full pipe; quoted when it fails, removed when it ends.
    stderr: PathBuf,
    /// The `ready` line: versions and threads.
    ready: Value,
}

impl HfPrefill {
    /// Starts the script with `python` on `model` and `threads` threads and waits until both
    /// models are loaded.
    fn start(python: &Path, model: &Path, threads: usize) -> Result<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hf_prefill.py");
        eprintln!(
            "bench: loading Hugging Face transformers' model in f32 and BF16 ({})",
            python.display()
        );
        let stderr =
            std::env::temp_dir().join(format!("unweight-hf-prefill-{}.stderr", std::process::id()));
        let log = std::fs::File::create(&stderr)
            .with_context(|| format!("creating {}", stderr.display()))?;
        let mut child = Command::new(python)
            .arg(&script)
            .arg("--model")
            .arg(model)
            .args(["--threads", &threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("running {} {}", python.display(), script.display()))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut me = Self {
            child,
            stdin,
            stdout,
            stderr,
            ready: Value::Null,
        };
        let ready = me.read_line()?;
        if ready["ready"] != json!(true) {
            bail!("scripts/hf_prefill.py: expected its ready line, got {ready}");
        }
        me.ready = ready;
        Ok(me)
    }

    /// Seconds of one prefill of the `len`-token bench prompt in `dtype`.
    fn time(&mut self, dtype: &str, len: usize) -> Result<f64> {
        let sent = match &mut self.stdin {
            Some(stdin) => writeln!(stdin, "{dtype} {len}").and_then(|_| stdin.flush()),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        };
        sent.map_err(|e| self.failed(&format!("sending it a request: {e}")))?;
        let answer = self.read_line()?;
        answer["seconds"]
            .as_f64()
            .filter(|s| s.is_finite() && *s > 0.0)
            .ok_or_else(|| {
                self.failed(&format!(
                    "asked for a {dtype} prefill of {len} tokens, got {answer}"
                ))
            })
    }

    /// One JSON line from the script.
    fn read_line(&mut self) -> Result<Value> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) => Err(self.failed("it exited")),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| self.failed(&format!("unreadable line {line:?}: {e}"))),
            Err(e) => Err(self.failed(&format!("reading its output: {e}"))),
        }
    }

    /// An error naming what went wrong and the end of the script's stderr.
    fn failed(&self, what: &str) -> anyhow::Error {
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        anyhow::anyhow!(
            "scripts/hf_prefill.py: {what}; its stderr ends:\n{}",
            tail.join("\n")
        )
    }

    /// Ends the script (end of its input) and returns its `ready` document (versions, threads).
    fn finish(mut self) -> Result<Value> {
        drop(self.stdin.take());
        let status = self
            .child
            .wait()
            .context("waiting for scripts/hf_prefill.py")?;
        if !status.success() {
            return Err(self.failed(&format!("it ended with {status}")));
        }
        let mut doc = std::mem::take(&mut self.ready);
        if let Some(o) = doc.as_object_mut() {
            o.remove("ready");
        }
        Ok(doc)
    }
}

impl Drop for HfPrefill {
    /// A bench that fails part way does not leave the script running or its log behind.
    fn drop(&mut self) {
        if self.stdin.take().is_some() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr);
    }
}
