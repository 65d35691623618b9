//! `unweight tune`: runs the autotuner (`device::cuda::tune`) offline, on a model directory's
//! layer-0 matrices (the table goes to `<MODEL_DIR>/tune/<device>.json`, where the CUDA backend
//! looks for it at load) or on synthetic matrices of a preset shape (`--shape`), and prints per
//! role and batch the best strategy on each storage form and the storage each role would get.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::container::Checkpoint;
use crate::device::cuda::driver::Context;
use crate::device::cuda::plan::{Role, Storage, TuneTable, TUNE_BATCHES};
use crate::device::cuda::tune::{self, Sample, TuneOptions};
use crate::device::cuda::{self};
use crate::model::{LlamaConfig, LlamaShape};

/// Arguments of `unweight tune`.
#[derive(clap::Args, Debug)]
pub struct TuneArgs {
    /// Model directory (plain or compressed checkpoint); its layer-0 matrices are timed and the
    /// table is written to MODEL_DIR/tune/<device>.json.
    #[arg(required_unless_present = "shape", value_name = "MODEL_DIR")]
    model: Option<PathBuf>,
    /// Instead of a model: synthetic N(0, --sigma) matrices of this preset's shapes.
    #[arg(long, conflicts_with = "model", value_parser = clap::builder::PossibleValuesParser::new(LlamaShape::PRESETS))]
    shape: Option<String>,
    /// Write the table here (default: MODEL_DIR/tune/<device>.json; with --shape, only printed
    /// unless given).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Batch buckets to time (each one of 1, 2, 4, ..., 256).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,4,8,16,32,64,128,256"
    )]
    batches: Vec<usize>,
    /// Wall-clock budget in seconds (encoding included); what is left unmeasured when it runs
    /// out uses the default strategies.
    #[arg(long, default_value_t = 60.0)]
    budget_s: f64,
    /// Products per timed CUDA graph.
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Standard deviation of the synthetic weights (--shape).
    #[arg(long, default_value_t = 0.02, requires = "shape")]
    sigma: f32,
}

/// Runs `unweight tune`.
pub fn run(a: &TuneArgs) -> Result<()> {
    if !(a.budget_s.is_finite() && a.budget_s > 0.0) {
        bail!(
            "--budget-s must be a positive number of seconds, got {}",
            a.budget_s
        );
    }
    if !(a.sigma.is_finite() && a.sigma > 0.0) {
        bail!("--sigma must be a positive number, got {}", a.sigma);
    }
    let opts = TuneOptions {
        batches: a.batches.clone(),
        budget: Duration::from_secs_f64(a.budget_s),
        reps: a.reps,
        progress: true,
    };
    opts.validate()
        .map_err(|e| anyhow!("--batches/--reps: {e}"))?;
    let info = cuda::probe().map_err(|r| anyhow!("no usable GPU: {r}"))?;
    eprintln!(
        "tune: {} ({} SMs, {} MiB L2, driver CUDA {}.{}), budget {:.0} s",
        info.name,
        info.multiprocessors,
        info.l2_bytes >> 20,
        info.driver_cuda_version / 1000,
        info.driver_cuda_version % 1000 / 10,
        a.budget_s
    );
    let t0 = Instant::now();
    let (samples, what) = match (&a.shape, &a.model) {
        (Some(shape), _) => {
            let s = LlamaShape::preset(shape).expect("clap restricts the shape to presets");
            let cfg = LlamaConfig::from_json(s.config_json().as_object().expect("an object"))?;
            let samples = tune::synthetic_samples(&cfg, 0, a.sigma)?;
            (samples, format!("synthetic {shape} (N(0, {}))", a.sigma))
        }
        (None, Some(dir)) => {
            let cfg = LlamaConfig::from_dir(dir)?;
            let ckpt =
                Checkpoint::open(dir).with_context(|| format!("opening {}", dir.display()))?;
            let samples: Vec<Sample<'static>> = tune::checkpoint_samples(&ckpt, &cfg)?;
            (samples, dir.display().to_string())
        }
        (None, None) => bail!("give a MODEL_DIR or --shape"),
    };
    let ctx: Arc<Context> = Context::new(info.ordinal)?;
    let table = tune::tune(&ctx, &samples, &opts)?;
    drop(samples);
    let secs = t0.elapsed().as_secs_f64();
    print_table(&table);
    let out = match (&a.out, &a.model) {
        (Some(o), _) => Some(o.clone()),
        (None, Some(dir)) => Some(tune::table_path(dir, &table.key.device)),
        (None, None) => None,
    };
    let measured = table.entries.len();
    let wanted = tune::batch_order(&a.batches).len() * Role::ALL.len();
    println!(
        "tuned {what} in {secs:.1} s: {measured} of {wanted} (role, batch) entries measured{}",
        if measured < wanted {
            " (budget spent: the rest use the default strategies)"
        } else {
            ""
        }
    );
    if let Some(out) = out {
        tune::write_table(&out, &table)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

/// The per-entry table and the storage each role gets for buckets 1..64.
fn print_table(t: &TuneTable) {
    println!(
        "{:<8} {:>13} {:>5}  {:<14} {:>10}  {:<14} {:>10}  {:>8}",
        "role", "rows×cols", "batch", "best raw", "us", "best tbe3", "us", "raw/tbe3"
    );
    for e in &t.entries {
        let cell = |s: Storage| match e.best(s) {
            Some(t) => (t.strategy.to_string(), format!("{:.1}", t.us)),
            None => ("-".to_string(), "-".to_string()),
        };
        let (rs, ru) = cell(Storage::Raw);
        let (ts, tu) = cell(Storage::Tbe3);
        let ratio = match (e.best(Storage::Raw), e.best(Storage::Tbe3)) {
            (Some(r), Some(t)) if t.us > 0.0 => format!("{:.2}", r.us / t.us),
            _ => "-".to_string(),
        };
        println!(
            "{:<8} {:>13} {:>5}  {:<14} {:>10}  {:<14} {:>10}  {:>8}",
            format!("{:?}", e.role),
            format!("{}×{}", e.rows, e.cols),
            e.batch,
            rs,
            ru,
            ts,
            tu,
            ratio
        );
    }
    let buckets: Vec<usize> = TUNE_BATCHES.iter().copied().filter(|&b| b <= 64).collect();
    println!("storage per role for an instance running batches {buckets:?}:");
    for role in Role::ALL {
        if t.entries.iter().any(|e| e.role == role) {
            println!(
                "  {:<8} {:?}",
                format!("{role:?}"),
                t.storage(role, &buckets)
            );
        }
    }
}
