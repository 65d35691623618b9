//! The autotuner (issue 6): for each linear layer's shape and batch bucket, times every candidate
//! strategy ([`plan::candidates`]) on both storage forms on the actual device and writes the
//! timings as a [`TuneTable`], from which [`Plan::from_table`](super::plan::Plan::from_table)
//! picks per role the storage and per bucket the fastest strategy. Raw BF16 with one cuBLAS call
//! (the uncompressed baseline) is always measured, so a tuned plan is never slower than
//! uncompressed on what was measured.
//!
//! Where the table lives: `<model dir>/tune/<device>.json` ([`table_path`]), keyed by device
//! name, driver version and a hash of the embedded kernels ([`tune_key`]): another GPU, driver or
//! kernel build may rank the strategies differently, so a table whose key differs is not used
//! ([`usable`]). [`table_for_model`] is the load-time path (`PlanSource::Auto`): read the table
//! when present and usable, else tune now within the budget and save it. `unweight tune` runs
//! [`tune`] offline. docs/cuda.md ("Autotuner") describes the measurement.
//!
//! Everything here except [`tune`], [`tune_key`] and [`table_for_model`] is CPU-side and
//! unit-tested without a GPU.

mod samples;
mod table;

pub use samples::{checkpoint_samples, layer0_samples, synthetic_samples, MatrixSource, Sample};
pub use table::{
    fits_model, kernels_hash, read_table, rfc3339, sanitize_device, table_path, tune_key, usable,
    write_table,
};

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::driver::{self, Context, Cublas, DevBuf, Event, GpuError, GpuResult, Graph};
use super::kernels::{self, Kernels};
use super::linear::{Form, Input, Linear, Products};
use super::plan::{
    self, Role, RoleShapes, Storage, Strategy, Timing, TuneEntry, TuneTable, TUNE_BATCHES,
};
use super::tbe3::{self, gemv_geometry_with_split, Tbe3Kernels, MAX_GEMV_BATCH};
use crate::codec::runtime::Shape;
use crate::device::DeviceError;

/// Largest matrix (BF16 bytes) for which tbe3 storage with a whole-matrix decode
/// (`Cublas { chunk_rows: 0 }` on tbe3) is a candidate. The whole decode needs a scratch buffer
/// the size of the BF16 matrix; past 64 MiB (gate|up, down and lm_head of an 8B model) that
/// scratch costs more device memory than compressing the role saves on the smaller matrices,
/// so only the chunked decodes (scratch of a fraction of L2) are tried there.
pub const WHOLE_DECODE_MAX_BYTES: usize = 64 << 20;

/// Timed launches of the graph of `reps` products; the median over these is reported.
const ROUNDS: usize = 3;

/// Most kernel launches captured in one timing graph: an 8B `lm_head` in 256-row chunks is 1002
/// launches per product, and instantiating a graph of 20 of those would take longer than
/// running it; such strategies get fewer products per graph ([`graph_products`]).
pub const MAX_GRAPH_LAUNCHES: usize = 4096;

/// Most copies of one matrix rotated through (memory grows with the copies of tiny matrices
/// that never fill twice the L2 anyway).
const MAX_COPIES: usize = 32;

/// The order in which the batch buckets are measured: when the budget runs out the first ones
/// are in the table. Batch 1 first (single-stream latency, the compressed kernels' best case),
/// then 8 (the last fused-GEMV batch: where GEMV and cuBLAS cross) and 64 (a busy server's
/// cuBLAS bucket), then the small buckets a decode server spends most steps in, then the large.
pub const BATCH_PRIORITY: [usize; 9] = [1, 8, 64, 2, 4, 16, 32, 128, 256];

/// Settings of one tuning run.
#[derive(Clone, Debug)]
pub struct TuneOptions {
    /// Batch buckets to measure (each must be one of [`TUNE_BATCHES`]: the plan looks entries
    /// up by bucket).
    pub batches: Vec<usize>,
    /// Wall-clock budget of the whole run, encoding and uploads included. Measurement stops
    /// when it is spent; what was measured is returned.
    pub budget: Duration,
    /// Products per timed graph (each measurement runs `1 + (1 + 3) × reps` products; fewer
    /// for strategies of many launches, [`graph_products`]).
    pub reps: usize,
    /// Also print each measured entry to stderr (`unweight tune`, which installs no log
    /// subscriber); progress always goes to the `tracing` log.
    pub progress: bool,
}

impl Default for TuneOptions {
    fn default() -> Self {
        Self {
            batches: TUNE_BATCHES.to_vec(),
            budget: Duration::from_secs(60),
            reps: 20,
            progress: false,
        }
    }
}

impl TuneOptions {
    /// Checks the options; the error names the bad value.
    pub fn validate(&self) -> Result<(), String> {
        if self.batches.is_empty() {
            return Err("no batch sizes to tune".into());
        }
        if let Some(b) = self.batches.iter().find(|b| !TUNE_BATCHES.contains(b)) {
            return Err(format!(
                "batch {b} is not a tuning bucket ({TUNE_BATCHES:?}): plans look entries up by bucket"
            ));
        }
        if self.reps == 0 {
            return Err("reps must be at least 1".into());
        }
        Ok(())
    }
}
// ---------------------------------------------------------------------------------------------
// CPU side: the candidate list.

/// `batches` in measuring order: those of [`BATCH_PRIORITY`] first in its order, any others
/// after, ascending; duplicates dropped.
pub fn batch_order(batches: &[usize]) -> Vec<usize> {
    let mut out: Vec<usize> = BATCH_PRIORITY
        .iter()
        .copied()
        .filter(|b| batches.contains(b))
        .collect();
    let mut rest: Vec<usize> = batches
        .iter()
        .copied()
        .filter(|b| !BATCH_PRIORITY.contains(b))
        .collect();
    rest.sort_unstable();
    rest.dedup();
    out.extend(rest);
    out
}

/// The (storage, strategy) pairs measured for one matrix and batch: the raw baseline first,
/// then every other candidate of [`plan::candidates`] on raw and on tbe3, except tbe3 with a
/// whole-matrix decode past [`WHOLE_DECODE_MAX_BYTES`].
pub fn measured_candidates(
    shape: &Shape,
    batch: usize,
    sms: usize,
    l2_bytes: usize,
) -> Vec<(Storage, Strategy)> {
    let cands = plan::candidates(shape, batch, sms, l2_bytes);
    let mut out = vec![(Storage::Raw, Strategy::BASELINE)];
    for storage in [Storage::Raw, Storage::Tbe3] {
        for &s in &cands {
            if storage == Storage::Raw && s == Strategy::BASELINE {
                continue;
            }
            if storage == Storage::Tbe3
                && s == (Strategy::Cublas { chunk_rows: 0 })
                && 2 * shape.len() > WHOLE_DECODE_MAX_BYTES
            {
                continue;
            }
            out.push((storage, s));
        }
    }
    out
}

/// Kernel launches of one product by `strategy` on `shape` (at most: a decode and a GEMM per
/// chunk, a GEMV and its reduce).
pub fn launches_per_product(shape: &Shape, strategy: &Strategy) -> usize {
    match *strategy {
        Strategy::Cublas { chunk_rows: 0 } => 2,
        Strategy::Cublas { chunk_rows } => 2 * shape.rows.div_ceil(chunk_rows),
        _ => 2,
    }
}

/// Products captured in one timing graph: `reps`, fewer where that would exceed
/// [`MAX_GRAPH_LAUNCHES`] launches, at least 1.
pub fn graph_products(shape: &Shape, strategy: &Strategy, reps: usize) -> usize {
    (MAX_GRAPH_LAUNCHES / launches_per_product(shape, strategy).max(1)).clamp(1, reps.max(1))
}

/// BF16 scratch bytes and f32 partial sums the candidates of `shapes` at `batches` need: the
/// largest decoded chunk of a tbe3 cuBLAS candidate, the largest split-K GEMV's partial buffer.
pub fn work_sizes(
    shapes: &[Shape],
    batches: &[usize],
    sms: usize,
    l2_bytes: usize,
) -> (usize, usize) {
    let (mut scratch, mut partial) = (0usize, 0usize);
    for s in shapes {
        for &b in batches {
            for (storage, strategy) in measured_candidates(s, b, sms, l2_bytes) {
                match strategy {
                    Strategy::Cublas { chunk_rows } if storage == Storage::Tbe3 => {
                        let rows = if chunk_rows == 0 {
                            s.rows
                        } else {
                            chunk_rows.min(s.rows)
                        };
                        scratch = scratch.max(2 * rows * s.cols);
                    }
                    Strategy::Gemv { ksplit } => {
                        if let Ok(g) = gemv_geometry_with_split(s, b, ksplit) {
                            partial = partial.max(g.partial_len());
                        }
                    }
                    // cuBLAS on raw reads the weight in place; the tensor-core kernel decodes
                    // into shared memory.
                    _ => {}
                }
            }
        }
    }
    (scratch, partial)
}

// ---------------------------------------------------------------------------------------------
// GPU side.

/// One matrix on the device in both forms, each with the copies rotated through.
struct Mat {
    role: Role,
    shape: Shape,
    raw: Vec<Linear>,
    tbe3: Vec<Linear>,
}

impl Mat {
    fn copies(&self, s: Storage) -> &[Linear] {
        match s {
            Storage::Raw => &self.raw,
            Storage::Tbe3 => &self.tbe3,
        }
    }
}

/// Copies of `w` (kept as the first) until they total `rotate_bytes` (at most `cap` copies).
fn with_copies(
    ctx: &Arc<Context>,
    w: Linear,
    rotate_bytes: usize,
    cap: usize,
) -> GpuResult<Vec<Linear>> {
    let n = rotate_bytes.div_ceil(w.bytes().max(1)).clamp(1, cap.max(1));
    let mut out = Vec::with_capacity(n);
    for _ in 1..n {
        let form = match &w.form {
            Form::Raw(b) => {
                let c = DevBuf::new(ctx, b.bytes())?;
                // SAFETY: both buffers hold `b.bytes()` bytes of this context.
                unsafe { driver::copy_dtod(ctx, c.ptr(), b.ptr(), b.bytes())? };
                Form::Raw(c)
            }
            Form::Tbe3(m) => Form::Tbe3(m.duplicate(ctx)?),
        };
        out.push(Linear {
            shape: w.shape,
            form,
        });
    }
    ctx.sync()?;
    out.insert(0, w);
    Ok(out)
}

struct Bench<'a> {
    ctx: &'a Arc<Context>,
    products: Products<'a>,
    events: (Event, Event),
    reps: usize,
}

impl Bench<'_> {
    /// Median device microseconds of one product by `strategy` on `copies` (rotated): one eager
    /// product (warm-up, and errors surface outside a capture), then a CUDA graph of
    /// [`graph_products`] products (as the engine's decode steps run: no launch gaps), launched
    /// once untimed and [`ROUNDS`] times between two events; the median round over its products.
    fn measure(&self, copies: &[Linear], strategy: Strategy, x: &Input, y: u64) -> GpuResult<f64> {
        let n = graph_products(&copies[0].shape, &strategy, self.reps);
        // SAFETY: x and y were sized for the largest batch and matrix of the run, the scratch
        // and partial buffers for the largest candidate (`work_sizes`).
        unsafe { self.products.run(&copies[0], strategy, x, y)? };
        self.ctx.sync()?;
        let graph = Graph::capture(self.ctx, || {
            (0..n).try_for_each(|i| {
                // SAFETY: as for the warm-up product.
                unsafe {
                    self.products
                        .run(&copies[(i + 1) % copies.len()], strategy, x, y)
                }
            })
        })?;
        graph.launch()?;
        self.ctx.sync()?;
        let mut ms = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            self.events.0.record()?;
            graph.launch()?;
            self.events.1.record()?;
            ms.push(self.events.0.elapsed_ms(&self.events.1)? as f64);
        }
        ms.sort_by(f64::total_cmp);
        Ok(ms[ms.len() / 2] * 1e3 / n as f64)
    }
}

/// Uploads one sample in both forms with its copies.
fn upload(
    ctx: &Arc<Context>,
    fill: &Kernels,
    sample: &Sample<'_>,
    rotate_bytes: usize,
    cap: usize,
) -> Result<Mat, DeviceError> {
    let (role, rows, cols, src) = sample;
    let (role, rows, cols) = (*role, *rows, *cols);
    let shape = Shape::for_matrix(rows, cols)
        .map_err(|e| DeviceError::Invalid(format!("{role:?} ({rows} × {cols}): {e}")))?;
    let wrap =
        |e: GpuError| DeviceError::Cuda(e.context(format_args!("{role:?} ({rows} × {cols})")));
    let (raw, tbe3) = match src {
        MatrixSource::Bf16(bytes) => (
            Linear::upload(ctx, bytes, rows, cols, Storage::Raw).map_err(wrap)?,
            Linear::upload(ctx, bytes, rows, cols, Storage::Tbe3).map_err(wrap)?,
        ),
        MatrixSource::Synthetic { seed, sigma } => {
            let buf = DevBuf::new(ctx, 2 * shape.len()).map_err(wrap)?;
            fill.fill_normal_bf16(buf.ptr(), shape.len(), *seed, *sigma)
                .map_err(wrap)?;
            ctx.sync().map_err(wrap)?;
            let mut host = vec![0u8; 2 * shape.len()];
            buf.download(&mut host).map_err(wrap)?;
            let t = Linear::upload(ctx, &host, rows, cols, Storage::Tbe3).map_err(wrap)?;
            (Linear::raw(buf, rows, cols).map_err(wrap)?, t)
        }
    };
    Ok(Mat {
        role,
        shape,
        raw: with_copies(ctx, raw, rotate_bytes, cap).map_err(wrap)?,
        tbe3: with_copies(ctx, tbe3, rotate_bytes, cap).map_err(wrap)?,
    })
}

/// Times every candidate of every sample at every batch of `opts` on `ctx`'s device and returns
/// the table (entries sorted by role and batch, timings fastest first).
///
/// Each matrix is uploaded raw and in tbe3 form, with enough copies of each that the copies
/// rotated through exceed twice the L2 cache, so a product reads its weight from HBM as in a
/// real decode step. Activations are random: `2 × batch` BF16 rows (split hi/lo rows, as the
/// engine feeds cuBLAS) and `batch` f32 rows (the GEMV's input). Batches are measured in
/// [`batch_order`], all roles per batch; an entry holds every candidate or is absent. When the
/// budget is spent the (role, batch) pairs left are skipped with a warning (the plan uses the
/// default strategies there).
pub fn tune(
    ctx: &Arc<Context>,
    samples: &[Sample<'_>],
    opts: &TuneOptions,
) -> Result<TuneTable, DeviceError> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let start = Instant::now();
    let deadline = start + opts.budget;
    opts.validate().map_err(DeviceError::Invalid)?;
    if samples.is_empty() {
        return Err(DeviceError::Invalid("no matrices to tune".into()));
    }
    for (i, s) in samples.iter().enumerate() {
        if samples[..i].iter().any(|t| t.0 == s.0) {
            return Err(DeviceError::Invalid(format!(
                "two matrices for {:?}: a table holds one shape per role",
                s.0
            )));
        }
    }
    if !kernels::built_with_kernels() {
        return Err(DeviceError::cuda(
            "built without CUDA kernels (nvcc was not found when the crate was compiled)".into(),
        ));
    }
    ctx.bind()?;
    let key = tune_key(ctx)?;
    let fill = Kernels::load(ctx)?;
    let t3 = Tbe3Kernels::load(ctx)?;
    let blas = Cublas::new(ctx)?;
    let sms = tbe3::multiprocessors(ctx)?;
    let l2 = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?.max(1) as usize;
    let cap = opts.reps.clamp(1, MAX_COPIES);
    let mut mats = Vec::with_capacity(samples.len());
    for s in samples {
        mats.push(upload(ctx, &fill, s, 2 * l2, cap)?);
    }
    tracing::info!(
        device = %key.device,
        matrices = mats.len(),
        seconds = start.elapsed().as_secs_f64(),
        "tune: matrices encoded and uploaded"
    );
    let batches = batch_order(&opts.batches);
    let max_batch = *batches.iter().max().expect("validated non-empty");
    let max_cols = mats.iter().map(|m| m.shape.cols).max().unwrap_or(1);
    let max_rows = mats.iter().map(|m| m.shape.rows).max().unwrap_or(1);
    let shapes: Vec<Shape> = mats.iter().map(|m| m.shape).collect();
    let (scratch_bytes, partial_len) = work_sizes(&shapes, &batches, sms, l2);
    // Activations: split BF16 rows N(0, 1); f32 rows in [-2, 2].
    let xbf = DevBuf::new(ctx, 2 * 2 * max_batch * max_cols)?;
    fill.fill_normal_bf16(xbf.ptr(), 2 * max_batch * max_cols, 0x7475_6e65, 1.0)?;
    let gb = max_batch.min(MAX_GEMV_BATCH);
    let xf: Vec<f32> = (0..gb * max_cols)
        .map(|i| ((i as u64 * 2_654_435_761 % 2001) as f32 - 1000.0) / 500.0)
        .collect();
    let x32 = DevBuf::from_host(ctx, &xf)?;
    let y = DevBuf::new(ctx, 4 * 2 * max_batch * max_rows)?;
    let scratch = DevBuf::new(ctx, scratch_bytes.max(16))?;
    let partial = DevBuf::new(ctx, 4 * partial_len.max(1))?;
    ctx.sync()?;
    let bench = Bench {
        ctx,
        products: Products {
            blas: &blas,
            tbe3: &t3,
            scratch: &scratch,
            partial: &partial,
            sms,
        },
        events: (Event::new(ctx)?, Event::new(ctx)?),
        reps: opts.reps,
    };
    let mut entries = Vec::new();
    let mut skipped: Vec<(Role, usize)> = Vec::new();
    for &batch in &batches {
        for m in &mats {
            if Instant::now() >= deadline {
                skipped.push((m.role, batch));
                continue;
            }
            let x = Input {
                bf16: xbf.ptr(),
                ldb: m.shape.cols,
                bf16_rows: 2 * batch,
                f32: x32.ptr(),
                n: batch,
            };
            let mut timings = Vec::new();
            let mut complete = true;
            for (storage, strategy) in measured_candidates(&m.shape, batch, sms, l2) {
                if Instant::now() >= deadline {
                    complete = false;
                    break;
                }
                let what = |e: &str| {
                    format!(
                        "timing {:?} ({} × {}) at batch {batch}, {storage:?} {strategy:?}: {e}",
                        m.role, m.shape.rows, m.shape.cols
                    )
                };
                let us = match bench.measure(m.copies(storage), strategy, &x, y.ptr()) {
                    Ok(us) => us,
                    // A candidate that fails (a kernel the device refuses) is left out of the
                    // entry, so a plan never picks it; the baseline must run, and an error
                    // that sticks to the context (a fault) ends the tuning.
                    Err(e) if (storage, strategy) != (Storage::Raw, Strategy::BASELINE) => {
                        if let Err(sticky) = ctx.sync() {
                            let why = what(&format!("{}; the context is unusable", e.message));
                            return Err(DeviceError::Cuda(sticky.context(why)));
                        }
                        tracing::warn!("{}; left out of the table", what(&e.message));
                        if opts.progress {
                            eprintln!("tune: {}; left out of the table", what(&e.message));
                        }
                        continue;
                    }
                    Err(e) => {
                        return Err(DeviceError::Cuda(
                            e.context(what("").trim_end_matches(": ")),
                        ))
                    }
                };
                timings.push(Timing {
                    storage,
                    strategy,
                    us,
                });
            }
            if !complete {
                skipped.push((m.role, batch));
                continue;
            }
            timings.sort_by(|a, b| a.us.total_cmp(&b.us));
            let e = TuneEntry {
                role: m.role,
                rows: m.shape.rows,
                cols: m.shape.cols,
                batch,
                timings,
            };
            let label = |s: Storage| {
                e.best(s).map_or("-".to_string(), |t| {
                    format!("{} {:.1} us", t.strategy, t.us)
                })
            };
            tracing::info!(
                role = ?m.role,
                batch,
                raw = %label(Storage::Raw),
                tbe3 = %label(Storage::Tbe3),
                "tune: measured"
            );
            if opts.progress {
                eprintln!(
                    "tune: {:?} {} × {} batch {batch}: raw {}, tbe3 {} ({:.1} s)",
                    m.role,
                    m.shape.rows,
                    m.shape.cols,
                    label(Storage::Raw),
                    label(Storage::Tbe3),
                    start.elapsed().as_secs_f64()
                );
            }
            entries.push(e);
        }
    }
    if !skipped.is_empty() {
        let list: Vec<String> = skipped.iter().map(|(r, b)| format!("{r:?}@{b}")).collect();
        if opts.progress {
            eprintln!(
                "tune: budget of {:.0} s spent; not measured (default strategies there): {}",
                opts.budget.as_secs_f64(),
                list.join(" ")
            );
        }
        tracing::warn!(
            budget_s = opts.budget.as_secs_f64(),
            skipped = %list.join(" "),
            "tune: budget spent; these (role, batch) pairs were not measured and use the default strategies"
        );
    }
    entries.sort_by_key(|e| (e.role, e.batch));
    tracing::info!(
        entries = entries.len(),
        skipped = skipped.len(),
        seconds = start.elapsed().as_secs_f64(),
        "tune: done"
    );
    Ok(TuneTable {
        key,
        created: rfc3339(SystemTime::now()),
        entries,
    })
}

/// The load-time path of `PlanSource::Auto`: `dir`'s table for device `ordinal` when it is
/// there, readable, keyed for this device, driver and kernels and measured on `shapes`;
/// otherwise the model is tuned now on `samples()` within `opts.budget` and the table saved
/// there (a warning, not an error, when it cannot be written). Returns the table and where it
/// came from, for the plan's `source`.
pub fn table_for_model<'a>(
    dir: &Path,
    shapes: &RoleShapes,
    samples: impl FnOnce() -> Result<Vec<Sample<'a>>, DeviceError>,
    ordinal: usize,
    opts: &TuneOptions,
) -> Result<(TuneTable, String), DeviceError> {
    if !kernels::built_with_kernels() {
        return Err(DeviceError::cuda(
            "built without CUDA kernels (nvcc was not found when the crate was compiled)".into(),
        ));
    }
    let ctx = Context::new(ordinal)?;
    let key = tune_key(&ctx)?;
    let path = table_path(dir, &key.device);
    let why = match read_table(&path) {
        Ok(Some(t)) => match usable(&t, &key).and_then(|()| fits_model(&t, shapes)) {
            Ok(()) => {
                let source = format!("tuning table {}", path.display());
                tracing::info!(path = %path.display(), entries = t.entries.len(), "using the tuning table");
                return Ok((t, source));
            }
            Err(why) => format!("{} does not apply ({why})", path.display()),
        },
        Ok(None) => format!("no tuning table at {}", path.display()),
        Err(e) => {
            tracing::warn!(error = %e, "tuning table unreadable; tuning again");
            e.to_string()
        }
    };
    tracing::info!(reason = %why, budget_s = opts.budget.as_secs_f64(), "tuning the model at load");
    let t0 = Instant::now();
    let table = tune(&ctx, &samples()?, opts)?;
    let secs = t0.elapsed().as_secs_f64();
    let source = match write_table(&path, &table) {
        Ok(()) => format!("tuned at load in {secs:.1} s, saved to {}", path.display()),
        Err(e) => {
            tracing::warn!(error = %e, "the tuning table could not be saved; the next load tunes again");
            format!("tuned at load in {secs:.1} s, not saved ({e})")
        }
    };
    tracing::info!(source = %source, "tuning table ready");
    Ok((table, source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::Checkpoint;
    use crate::device::cuda::plan::{TuneKey, TUNE_FORMAT};
    use crate::model::weights::{LlamaWeights, Matrix};
    use crate::model::LlamaConfig;
    use std::time::UNIX_EPOCH;

    fn key() -> TuneKey {
        TuneKey {
            device: "NVIDIA H100 80GB HBM3".into(),
            driver: 13000,
            kernels: "0123456789abcdef".into(),
            format: TUNE_FORMAT,
        }
    }

    fn table() -> TuneTable {
        TuneTable {
            key: key(),
            created: "2026-11-27T00:00:00Z".into(),
            entries: vec![TuneEntry {
                role: Role::O,
                rows: 4096,
                cols: 4096,
                batch: 1,
                timings: vec![
                    Timing {
                        storage: Storage::Tbe3,
                        strategy: Strategy::Gemv { ksplit: 2 },
                        us: 9.5,
                    },
                    Timing {
                        storage: Storage::Raw,
                        strategy: Strategy::BASELINE,
                        us: 13.25,
                    },
                ],
            }],
        }
    }

    #[test]
    fn device_names_become_safe_file_names() {
        assert_eq!(
            table_path(Path::new("/m"), "NVIDIA H100 80GB HBM3"),
            Path::new("/m/tune/NVIDIA_H100_80GB_HBM3.json")
        );
        assert_eq!(sanitize_device("a/b\\c:d*e?é.1-2_3"), "a_b_c_d_e__.1-2_3");
        assert_eq!(sanitize_device("../.."), ".._..");
        assert_eq!(sanitize_device(""), "unknown");
        assert_eq!(sanitize_device(".."), "unknown");
        // Never escapes the tune directory.
        let p = table_path(Path::new("/m"), "../../etc/passwd");
        assert_eq!(p.parent(), Some(Path::new("/m/tune")));
    }

    #[test]
    fn tables_round_trip_and_a_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = table_path(dir.path(), "NVIDIA H100 80GB HBM3");
        assert!(read_table(&path).unwrap().is_none());
        write_table(&path, &table()).unwrap();
        assert_eq!(read_table(&path).unwrap(), Some(table()));
        // Overwriting leaves no temporary file behind.
        let mut t2 = table();
        t2.entries.clear();
        write_table(&path, &t2).unwrap();
        assert_eq!(read_table(&path).unwrap(), Some(t2));
        let names: Vec<String> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["NVIDIA_H100_80GB_HBM3.json".to_string()]);
    }

    #[test]
    fn malformed_or_unwritable_tables_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        std::fs::write(&path, "{\"key\": 3").unwrap();
        let e = read_table(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        std::fs::write(&path, "{\"entries\": []}").unwrap();
        let e = read_table(&path).unwrap_err().to_string();
        assert!(e.contains("t.json") && e.contains("key"), "{e}");
        // A directory where the table should be: unreadable, named.
        let d = dir.path().join("d.json");
        std::fs::create_dir(&d).unwrap();
        let e = read_table(&d).unwrap_err().to_string();
        assert!(e.contains("d.json"), "{e}");
        // Writing under a file (not a directory) fails naming the table.
        let under = dir.path().join("t.json").join("tune").join("x.json");
        let e = write_table(&under, &table()).unwrap_err().to_string();
        assert!(e.contains("x.json"), "{e}");
    }

    #[test]
    fn key_mismatches_name_every_differing_field() {
        let t = table();
        assert_eq!(usable(&t, &key()), Ok(()));
        let mut k = key();
        k.device = "NVIDIA H200".into();
        let e = usable(&t, &k).unwrap_err();
        assert!(e.contains("device") && e.contains("H200"), "{e}");
        assert!(!e.contains("driver"), "{e}");
        k.driver = 12080;
        k.kernels = "ffff".into();
        k.format = TUNE_FORMAT + 1;
        let e = usable(&t, &k).unwrap_err();
        for f in ["device", "driver", "12080", "kernels", "ffff", "format"] {
            assert!(e.contains(f), "{f} missing in {e}");
        }
    }

    #[test]
    fn a_table_of_another_model_does_not_fit() {
        let t = table();
        let s = |r, c| Shape::for_matrix(r, c).unwrap();
        let ok: RoleShapes = [(Role::O, s(4096, 4096)), (Role::Down, s(4096, 14336))]
            .into_iter()
            .collect();
        assert_eq!(fits_model(&t, &ok), Ok(()));
        let other: RoleShapes = [(Role::O, s(2048, 2048))].into_iter().collect();
        let e = fits_model(&t, &other).unwrap_err();
        assert!(
            e.contains("4096 × 4096") && e.contains("2048 × 2048"),
            "{e}"
        );
        let missing: RoleShapes = [(Role::Down, s(4096, 14336))].into_iter().collect();
        assert!(fits_model(&t, &missing).unwrap_err().contains("O"));
    }

    #[test]
    fn the_kernel_hash_is_stable_hex() {
        let h = kernels_hash();
        assert_eq!(h.len(), 16);
        assert!(h.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(h, kernels_hash());
    }

    #[test]
    fn batches_go_coarse_first_and_options_are_checked() {
        assert_eq!(batch_order(&TUNE_BATCHES), BATCH_PRIORITY.to_vec());
        assert_eq!(batch_order(&[256, 2, 1, 2]), vec![1, 2, 256]);
        let mut sorted = BATCH_PRIORITY.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, TUNE_BATCHES.to_vec());
        assert!(TuneOptions::default().validate().is_ok());
        let bad = |batches: Vec<usize>, reps| TuneOptions {
            batches,
            reps,
            ..TuneOptions::default()
        };
        assert!(bad(vec![], 1).validate().unwrap_err().contains("no batch"));
        assert!(bad(vec![3], 1).validate().unwrap_err().contains("batch 3"));
        assert!(bad(vec![1], 0).validate().unwrap_err().contains("reps"));
    }

    #[test]
    fn candidates_start_with_the_baseline_and_cap_whole_decodes() {
        let l2 = 50 << 20;
        // o_proj (32 MiB): whole decode on tbe3 is a candidate.
        let o = Shape::for_matrix(4096, 4096).unwrap();
        let c = measured_candidates(&o, 1, 132, l2);
        assert_eq!(c[0], (Storage::Raw, Strategy::BASELINE));
        assert_eq!(
            c.iter()
                .filter(|x| **x == (Storage::Raw, Strategy::BASELINE))
                .count(),
            1
        );
        assert!(c.contains(&(Storage::Tbe3, Strategy::Cublas { chunk_rows: 0 })));
        assert!(c.contains(&(Storage::Tbe3, Strategy::Cublas { chunk_rows: 1024 })));
        assert!(c
            .iter()
            .any(|(s, x)| *s == Storage::Tbe3 && matches!(x, Strategy::Gemv { .. })));
        // Every strategy is tried on both forms (but the whole decode on raw is the baseline).
        for (_, s) in &c {
            assert!(c.contains(&(Storage::Raw, *s)) && c.contains(&(Storage::Tbe3, *s)));
        }
        // gate|up (224 MiB) and lm_head: no whole-matrix decode on tbe3, baseline still there.
        for (rows, cols) in [(28672, 4096), (128256, 4096)] {
            let s = Shape::for_matrix(rows, cols).unwrap();
            for b in [1, 16, 256] {
                let c = measured_candidates(&s, b, 132, l2);
                assert_eq!(c[0], (Storage::Raw, Strategy::BASELINE));
                assert!(!c.contains(&(Storage::Tbe3, Strategy::Cublas { chunk_rows: 0 })));
                assert!(c.iter().any(|(st, _)| *st == Storage::Tbe3), "{c:?}");
            }
        }
    }

    #[test]
    fn work_buffers_cover_the_largest_candidate() {
        let l2 = 50 << 20;
        let shapes = [
            Shape::for_matrix(6144, 4096).unwrap(),
            Shape::for_matrix(128256, 4096).unwrap(),
        ];
        let (scratch, partial) = work_sizes(&shapes, &[1, 8, 64], 132, l2);
        // q|k|v (48 MiB) is decoded whole; lm_head only in chunks of at most 1024 rows.
        assert_eq!(scratch, 2 * 6144 * 4096);
        assert!(partial > 0);
        // Without GEMV batches, no partial sums; without the small matrix, chunk-sized scratch.
        let (scratch, partial) = work_sizes(&shapes[1..], &[64], 132, l2);
        assert_eq!((scratch, partial), (2 * 1024 * 4096, 0));
    }

    #[test]
    fn graphs_of_many_launches_hold_fewer_products() {
        let head = Shape::for_matrix(128256, 4096).unwrap();
        let chunked = Strategy::Cublas { chunk_rows: 256 };
        assert_eq!(launches_per_product(&head, &chunked), 2 * 501);
        assert_eq!(graph_products(&head, &chunked, 20), 4);
        assert_eq!(graph_products(&head, &Strategy::BASELINE, 20), 20);
        assert_eq!(graph_products(&head, &Strategy::Gemv { ksplit: 1 }, 7), 7);
        let tiny_chunks = Strategy::Cublas { chunk_rows: 8 };
        assert_eq!(graph_products(&head, &tiny_chunks, 20), 1);
        assert_eq!(graph_products(&head, &Strategy::BASELINE, 0), 1);
    }

    #[test]
    fn labels_and_timestamps() {
        assert_eq!(Strategy::BASELINE.to_string(), "cublas");
        assert_eq!(
            Strategy::Cublas { chunk_rows: 512 }.to_string(),
            "cublas/512"
        );
        assert_eq!(Strategy::Gemv { ksplit: 4 }.to_string(), "gemv/k4");
        assert_eq!(Strategy::Mma.to_string(), "mma");
        assert_eq!(Role::GateUp.to_string(), "gate_up");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_768_502);
        assert_eq!(rfc3339(t), "2026-11-27T08:35:02Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn samples_are_layer_zero_fused_as_the_backend_runs_them() {
        use crate::model::synth::{synth_checkpoint, SynthOptions};
        use crate::model::weights::WeightMode;
        use crate::model::LlamaShape;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m");
        let opts = SynthOptions {
            seed: 3,
            force: true,
            ..SynthOptions::default()
        };
        synth_checkpoint(&LlamaShape::preset("tiny").unwrap(), &out, &opts).unwrap();
        let cfg = LlamaConfig::from_dir(&out).unwrap();
        let ckpt = Checkpoint::open(&out).unwrap();
        let w = LlamaWeights::load(&ckpt, &cfg, WeightMode::Decoded).unwrap();
        let shapes = super::super::sizing::role_shapes(&cfg).unwrap();
        let a = layer0_samples(&w).unwrap();
        let b = checkpoint_samples(&ckpt, &cfg).unwrap();
        let roles: Vec<Role> = a.iter().map(|s| s.0).collect();
        assert_eq!(roles, Role::ALL.to_vec());
        let l0 = &w.layers[0];
        let cat = |ms: &[&Matrix]| -> Vec<u8> {
            ms.iter()
                .flat_map(|m| {
                    super::super::weights::bf16_bytes(m, "tuning")
                        .unwrap()
                        .iter()
                        .copied()
                })
                .collect()
        };
        let expect = [
            cat(&[&l0.q_proj, &l0.k_proj, &l0.v_proj]),
            cat(&[&l0.o_proj]),
            cat(&[&l0.gate_proj, &l0.up_proj]),
            cat(&[&l0.down_proj]),
            cat(&[w.output()]),
        ];
        for ((x, y), want) in a.iter().zip(&b).zip(&expect) {
            assert_eq!((x.0, x.1, x.2), (y.0, y.1, y.2));
            let s = shapes[&x.0];
            assert_eq!((x.1, x.2), (s.rows, s.cols));
            for src in [&x.3, &y.3] {
                match src {
                    MatrixSource::Bf16(bytes) => assert!(bytes.as_ref() == want.as_slice()),
                    MatrixSource::Synthetic { .. } => panic!("expected bytes"),
                }
            }
        }
        let s = synthetic_samples(&cfg, 1, 0.02).unwrap();
        assert_eq!(s.len(), 5);
        // A checkpoint without layer 0's q_proj: named.
        let mut cfg2 = cfg.clone();
        cfg2.hidden_size *= 2;
        let e = checkpoint_samples(&ckpt, &cfg2).unwrap_err().to_string();
        assert!(e.contains("q_proj") && e.contains("expected BF16"), "{e}");
    }

    #[test]
    fn without_a_gpu_load_time_tuning_is_an_error_not_a_panic() {
        if super::super::probe().is_ok() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let r = table_for_model(
            dir.path(),
            &RoleShapes::new(),
            || Ok(Vec::new()),
            0,
            &TuneOptions::default(),
        );
        assert!(r.is_err());
        assert!(!dir.path().join("tune").exists());
    }
}
