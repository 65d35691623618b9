//! `unweight bench kernels`: every product strategy of `device::cuda::plan` against cuBLAS on raw
//! BF16, for every linear layer of Llama-3.1-8B as the engine runs it (q|k|v and gate|up fused)
//! and batch sizes 1..256, all in one run on one device.
//!
//! Per (matrix, batch): the uncompressed baseline (raw BF16, one cuBLAS call), then on tbe3
//! storage every candidate the autotuner would time (`plan::candidates`: cuBLAS after a whole
//! decode, cuBLAS over row chunks decoded into an L2-sized scratch, the fused GEMV with the
//! heuristic split and its neighbours at batches up to 8, the tensor-core kernel from 8 rows)
//! plus the default plan's strategy, and the default strategy's raw twin (the same strategy on
//! BF16: what the decoding costs). Every product goes through `linear::Products::run`, exactly
//! as the engine runs it: cuBLAS and the tensor cores get 2 × batch BF16 rows (split hi/lo
//! activations, docs/cuda.md), the GEMV f32 activations.
//!
//! Each timing is a CUDA graph of `--launches` back-to-back products (so launch overhead between
//! products is not what is measured), rotating among copies of the weights totalling more than
//! 2× L2 (so repeated products do not read L2), replayed `--repeats` times after a warm-up; the
//! median per product is reported, with its ratio to the raw cuBLAS time of the same run and
//! the effective bandwidth: stored bytes (tbe3 image or BF16) / time, as a fraction of the
//! device-to-device copy bandwidth measured in the same run (bytes read + written). At batches
//! 1 and 16 every strategy also runs once on both storage forms and the outputs are compared bit
//! for bit (the twin guarantee). Weights: synthetic N(0, 0.02) BF16 made on the device, encoded
//! to tbe3 on the host.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use crate::codec::runtime::{self, Shape};
use crate::device::cuda::driver::{Context, Cublas, DevBuf, Event, GpuResult, Graph};
use crate::device::cuda::kernels::Kernels;
use crate::device::cuda::linear::{Form, Input, Linear, Products};
use crate::device::cuda::plan::{
    candidates, default_chunked, default_strategy, Role, Storage, Strategy,
};
use crate::device::cuda::tbe3::{self, DeviceTbe3, Tbe3Kernels};
use crate::device::cuda::{self};

/// Arguments of `bench kernels`.
#[derive(clap::Args, Debug)]
pub struct KernelsArgs {
    /// Activation batch sizes.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,4,8,16,32,64,128,256"
    )]
    pub batch: Vec<usize>,
    /// Only these matrices (qkv,o,gate_up,down,lm_head); default all.
    #[arg(long, value_delimiter = ',')]
    pub shapes: Option<Vec<String>>,
    /// Products captured in each timed graph.
    #[arg(long, default_value_t = 10)]
    pub launches: usize,
    /// Timed replays of each graph (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Llama-3.1-8B's linear layers as the CUDA backend runs them: (name, role, rows = out
/// features, cols = in features).
pub const LLAMA_8B_LINEAR: &[(&str, Role, usize, usize)] = &[
    ("qkv", Role::Qkv, 6144, 4096),
    ("o", Role::O, 4096, 4096),
    ("gate_up", Role::GateUp, 28672, 4096),
    ("down", Role::Down, 4096, 14336),
    ("lm_head", Role::LmHead, 128256, 4096),
];

const COPY_BYTES: usize = 1 << 30;
/// Most copies of one matrix in the rotation.
const MAX_COPIES: usize = 16;
/// Batches at which every strategy's tbe3 and raw outputs are compared bit for bit.
const IDENTITY_BATCHES: [usize; 2] = [1, 16];

struct Bench {
    ctx: Arc<Context>,
    fill: Kernels,
    k: Tbe3Kernels,
    blas: Cublas,
    sms: usize,
    launches: usize,
    repeats: usize,
}

impl Bench {
    /// Median milliseconds per call of `op(i)` (i = 0..launches), timed as graph replays.
    fn time(&self, mut op: impl FnMut(usize) -> GpuResult<()>) -> Result<f64> {
        let n = self.launches.max(1);
        // One eager call first: lazy loading and errors happen outside the capture.
        op(0)?;
        self.ctx.sync()?;
        let graph = Graph::capture(&self.ctx, || (0..n).try_for_each(&mut op))?;
        let (a, b) = (Event::new(&self.ctx)?, Event::new(&self.ctx)?);
        graph.launch()?;
        self.ctx.sync()?;
        let mut ms = Vec::with_capacity(self.repeats.max(1));
        for _ in 0..self.repeats.max(1) {
            a.record()?;
            graph.launch()?;
            b.record()?;
            ms.push(a.elapsed_ms(&b)? as f64 / n as f64);
        }
        ms.sort_by(f64::total_cmp);
        Ok(ms[ms.len() / 2])
    }
}

/// The buffers every product of one run shares.
struct Shared {
    x32: DevBuf,
    xbf: DevBuf,
    y: DevBuf,
    y2: DevBuf,
    scratch: DevBuf,
    partial: DevBuf,
}

impl Shared {
    fn products<'a>(&'a self, b: &'a Bench) -> Products<'a> {
        Products {
            blas: &b.blas,
            tbe3: &b.k,
            scratch: &self.scratch,
            partial: &self.partial,
            sms: b.sms,
        }
    }

    /// The engine's input for `batch` tokens of `cols` features (split BF16 rows for cuBLAS
    /// and the tensor cores, f32 for the GEMV).
    fn input(&self, batch: usize, cols: usize) -> Input {
        Input {
            bf16: self.xbf.ptr(),
            ldb: cols,
            bf16_rows: 2 * batch,
            f32: self.x32.ptr(),
            n: batch,
        }
    }
}

/// The strategies timed on tbe3 storage for one matrix and batch: the tuner's candidates and
/// the default plan's choice.
fn tbe3_strategies(shape: &Shape, batch: usize, sms: usize, l2: usize) -> Vec<Strategy> {
    let mut v = candidates(shape, batch, sms, l2);
    v.push(default_strategy(shape, batch, sms));
    v.push(default_chunked(shape));
    v.retain(|s| s.unsupported(shape, batch).is_none());
    v.sort();
    v.dedup();
    v
}

/// Runs the kernel benchmark.
pub fn run(a: &KernelsArgs) -> Result<()> {
    let info = cuda::probe().map_err(|r| anyhow!("bench kernels needs a usable GPU: {r}"))?;
    if a.batch.is_empty() || a.batch.contains(&0) {
        bail!("--batch needs sizes of at least 1");
    }
    let shapes: Vec<(&str, Role, usize, usize)> = match &a.shapes {
        None => LLAMA_8B_LINEAR.to_vec(),
        Some(names) => names
            .iter()
            .map(|n| {
                LLAMA_8B_LINEAR
                    .iter()
                    .find(|s| s.0 == n)
                    .copied()
                    .ok_or_else(|| {
                        anyhow!("unknown matrix {n} (one of qkv, o, gate_up, down, lm_head)")
                    })
            })
            .collect::<Result<_>>()?,
    };
    eprintln!(
        "bench kernels: {} ({} SMs, L2 {} MiB)",
        info.name,
        info.multiprocessors,
        info.l2_bytes >> 20
    );
    let copy_bw = cuda::copy_bandwidth(COPY_BYTES, 20)?;
    println!(
        "device-to-device copy: {:.0} GB/s (read + write, 1 GiB buffers, median of 20)",
        copy_bw / 1e9
    );
    let ctx = Context::new(0)?;
    let b = Bench {
        fill: Kernels::load(&ctx)?,
        k: Tbe3Kernels::load(&ctx)?,
        blas: Cublas::new(&ctx)?,
        sms: tbe3::multiprocessors(&ctx)?,
        launches: a.launches,
        repeats: a.repeats,
        ctx: ctx.clone(),
    };
    let l2 = info.l2_bytes.max(1) as usize;
    let rotate_bytes = 2 * l2;
    let max_batch = *a.batch.iter().max().unwrap();
    let max_cols = shapes.iter().map(|s| s.3).max().unwrap();
    let max_rows = shapes.iter().map(|s| s.2).max().unwrap();
    let max_n = shapes.iter().map(|s| s.2 * s.3).max().unwrap();
    // Activations: f32 for the GEMVs, split BF16 (2 x batch rows) for cuBLAS; N(0, 1)-ish.
    let gb = max_batch.min(tbe3::MAX_GEMV_BATCH);
    let xf: Vec<f32> = (0..gb * max_cols)
        .map(|i| ((i as u64 * 2654435761 % 2001) as f32 - 1000.0) / 500.0)
        .collect();
    let xbf = DevBuf::new(&ctx, 2 * 2 * max_batch * max_cols)?;
    b.fill
        .fill_normal_bf16(xbf.ptr(), 2 * max_batch * max_cols, 7, 1.0)?;
    // Split-K partials: the most any candidate GEMV needs.
    let mut part_len = 1;
    for &(_, _, rows, cols) in &shapes {
        let s = Shape::for_matrix(rows, cols)?;
        for bs in 1..=gb {
            for st in tbe3_strategies(&s, bs, b.sms, l2) {
                if let Strategy::Gemv { ksplit } = st {
                    if let Ok(g) = tbe3::gemv_geometry_with_split(&s, bs, ksplit) {
                        part_len = part_len.max(g.partial_len());
                    }
                }
            }
        }
    }
    let sh = Shared {
        x32: DevBuf::from_host(&ctx, &xf)?,
        xbf,
        y: DevBuf::new(&ctx, 4 * 2 * max_batch * max_rows)?,
        y2: DevBuf::new(&ctx, 4 * 2 * max_batch * max_rows)?,
        scratch: DevBuf::new(&ctx, 2 * max_n)?,
        partial: DevBuf::new(&ctx, 4 * part_len)?,
    };
    let p = sh.products(&b);

    println!(
        "{:<8} {:>5} {:>9} {:>6} | {:<12} {:>9} {:>7} {:>6} | {:<12} {:>9} {:>7} {:>6} | {:>9}",
        "matrix",
        "batch",
        "raw ms",
        "%copy",
        "default",
        "ms",
        "vs raw",
        "%copy",
        "best tbe3",
        "ms",
        "vs raw",
        "%copy",
        "twin ms"
    );
    let mut results = Vec::new();
    let mut summary = Vec::new();
    let mut matrices = Vec::new();
    let mut all_identical = true;
    for (si, &(name, role, rows, cols)) in shapes.iter().enumerate() {
        let n = rows * cols;
        let shape = Shape::for_matrix(rows, cols)?;
        let w0 = DevBuf::new(&ctx, 2 * n)?;
        b.fill
            .fill_normal_bf16(w0.ptr(), n, 1000 + si as u64, 0.02)?;
        ctx.sync()?;
        let mut host = vec![0u16; n];
        w0.download(&mut host)?;
        let t_enc = std::time::Instant::now();
        let m = runtime::encode(&host, shape)?;
        let encode_s = t_enc.elapsed().as_secs_f64();
        let stats = m.stats();
        drop(host);
        let t0 = DeviceTbe3::upload(&ctx, &m)?;
        drop(m);
        let tbytes = t0.bytes();
        let bbytes = 2 * n;
        let tcopies = rotate_bytes.div_ceil(tbytes).clamp(1, MAX_COPIES);
        let bcopies = rotate_bytes.div_ceil(bbytes).clamp(1, MAX_COPIES);
        let mut tm = Vec::with_capacity(tcopies);
        for _ in 1..tcopies {
            tm.push(Linear {
                shape,
                form: Form::Tbe3(t0.duplicate(&ctx)?),
            });
        }
        tm.insert(
            0,
            Linear {
                shape,
                form: Form::Tbe3(t0),
            },
        );
        let mut raw = Vec::with_capacity(bcopies);
        for _ in 1..bcopies {
            let c = DevBuf::new(&ctx, bbytes)?;
            // SAFETY: both buffers hold `bbytes` bytes of this context.
            unsafe { cuda::driver::copy_dtod(&ctx, c.ptr(), w0.ptr(), bbytes)? };
            raw.push(Linear {
                shape,
                form: Form::Raw(c),
            });
        }
        raw.insert(
            0,
            Linear {
                shape,
                form: Form::Raw(w0),
            },
        );
        ctx.sync()?;
        let mut identical_all = true;
        let mut not_identical = Vec::new();
        for &batch in &a.batch {
            let x = sh.input(batch, cols);
            // SAFETY (every `run` below): x holds 2 x batch BF16 rows and (up to 8) f32 rows of
            // `cols`, y and y2 2 x batch x rows f32, the scratch a whole matrix of BF16 and the
            // partials the most any candidate needs.
            let time = |ws: &[Linear], st: Strategy| -> Result<f64> {
                b.time(|i| unsafe { p.run(&ws[i % ws.len()], st, &x, sh.y.ptr()) })
            };
            let frac = |bytes: usize, ms: f64| bytes as f64 / (ms * 1e-3) / copy_bw;
            let row = |storage: Storage, st: Strategy, r: &Result<f64>, base: f64| -> Value {
                let bytes = if storage == Storage::Tbe3 {
                    tbytes
                } else {
                    bbytes
                };
                match r {
                    Ok(ms) => json!({
                        "matrix": name, "rows": rows, "cols": cols, "batch": batch,
                        "storage": storage, "strategy": st, "name": st.to_string(),
                        "ms": ms, "stored_bytes": bytes,
                        "stored_gbps": bytes as f64 / (ms * 1e-3) / 1e9,
                        "fraction_of_copy_bandwidth": frac(bytes, *ms),
                        "speedup_vs_raw_cublas": base / ms,
                        "default": st == default_strategy(&shape, batch, b.sms),
                    }),
                    Err(e) => json!({
                        "matrix": name, "rows": rows, "cols": cols, "batch": batch,
                        "storage": storage, "strategy": st, "name": st.to_string(),
                        "error": format!("{e:#}"),
                    }),
                }
            };
            let base = time(&raw, Strategy::BASELINE)?;
            results.push(row(Storage::Raw, Strategy::BASELINE, &Ok(base), base));
            let def = default_strategy(&shape, batch, b.sms);
            let mut best: Option<(Strategy, f64)> = None;
            let mut def_ms = None;
            for st in tbe3_strategies(&shape, batch, b.sms, l2) {
                let r = time(&tm, st);
                if let Err(e) = &r {
                    eprintln!("bench kernels: {name} batch {batch} {st:?} on tbe3: {e:#}");
                }
                if let Ok(ms) = r {
                    if best.is_none_or(|(_, bm)| ms < bm) {
                        best = Some((st, ms));
                    }
                    if st == def {
                        def_ms = Some(ms);
                    }
                }
                let mut v = row(Storage::Tbe3, st, &r, base);
                if IDENTITY_BATCHES.contains(&batch) && r.is_ok() {
                    let same = identical(&p, &tm[0], &raw[0], st, &x, &sh, rows)?;
                    if !same {
                        identical_all = false;
                        not_identical.push(format!("{st} at batch {batch}"));
                        eprintln!(
                            "bench kernels: {name} batch {batch} {st:?}: tbe3 and raw outputs DIFFER"
                        );
                    }
                    v["bit_identical_to_raw"] = json!(same);
                }
                results.push(v);
            }
            // The default strategy on raw BF16: the same work without the decoding.
            let twin = if def == Strategy::BASELINE {
                Ok(base)
            } else {
                time(&raw, def)
            };
            if def != Strategy::BASELINE {
                results.push(row(Storage::Raw, def, &twin, base));
            }
            let cell = |s: Option<Strategy>, ms: Option<f64>, bytes: usize| match ms {
                Some(ms) => format!(
                    "{:<12} {ms:>9.4} {:>6.2}x {:>5.1}%",
                    s.map_or(String::new(), |s| s.to_string()),
                    base / ms,
                    100.0 * frac(bytes, ms)
                ),
                None => format!("{:<12} {:>9} {:>7} {:>6}", "-", "-", "-", "-"),
            };
            println!(
                "{name:<8} {batch:>5} {base:>9.4} {:>5.1}% | {} | {} | {:>9}",
                100.0 * frac(bbytes, base),
                cell(Some(def), def_ms, tbytes),
                cell(best.map(|b| b.0), best.map(|b| b.1), tbytes),
                twin.as_ref()
                    .map_or("error".to_string(), |ms| format!("{ms:.4}"))
            );
            summary.push(json!({
                "matrix": name, "batch": batch,
                "raw_cublas_ms": base,
                "raw_cublas_fraction_of_copy": frac(bbytes, base),
                "default_strategy": def, "default_ms": def_ms,
                "default_speedup_vs_raw_cublas": def_ms.map(|ms| base / ms),
                "default_fraction_of_copy": def_ms.map(|ms| frac(tbytes, ms)),
                "default_raw_twin_ms": twin.ok(),
                "best_tbe3_strategy": best.map(|b| b.0),
                "best_tbe3_ms": best.map(|b| b.1),
                "best_tbe3_speedup_vs_raw_cublas": best.map(|b| base / b.1),
                "best_tbe3_fraction_of_copy": best.map(|b| frac(tbytes, b.1)),
            }));
        }
        all_identical &= identical_all;
        matrices.push(json!({
            "matrix": name, "role": role, "rows": rows, "cols": cols, "tile": shape.tile_elems,
            "tbe3_bytes": tbytes, "bf16_bytes": bbytes, "tbe3_ratio": tbytes as f64 / bbytes as f64,
            "escape_rate": stats.escape_rate(), "tbe3_copies": tcopies, "bf16_copies": bcopies,
            "encode_s_host": encode_s,
            "bit_identical": identical_all, "not_identical": not_identical,
        }));
    }
    println!(
        "tbe3 vs raw outputs at batches {IDENTITY_BATCHES:?}, every strategy: {}",
        if all_identical {
            "bit-identical"
        } else {
            "DIFFERENT (see above)"
        }
    );
    if let Some(out) = &a.out {
        let doc = json!({
            "benchmark": "kernels",
            "gpu": info,
            "weights": "synthetic N(0, 0.02) BF16 (fill_normal_bf16), tbe3 via codec::runtime::encode",
            "activations": "through linear::Products::run as the engine: GEMV f32 batch x cols; cuBLAS and tensor cores split BF16, 2 x batch rows, FP32 output",
            "timing": format!("CUDA graph of {} products rotating weight copies (> 2x L2), median of {} replays", a.launches, a.repeats),
            "copy_bandwidth_gbps": copy_bw / 1e9,
            "copy_bandwidth_note": "device-to-device cuMemcpyDtoDAsync, bytes read + written, 1 GiB buffers, median of 20",
            "bit_identical_batches": IDENTITY_BATCHES,
            "all_bit_identical": all_identical,
            "matrices": matrices,
            "summary": summary,
            "results": results,
        });
        super::bench::write_results(out, doc, rayon::current_num_threads())?;
    }
    if !all_identical {
        bail!("a strategy gave different outputs on tbe3 and raw storage");
    }
    Ok(())
}

/// Runs `st` once on the tbe3 and once on the raw matrix and compares the outputs bit for bit.
fn identical(
    p: &Products<'_>,
    t: &Linear,
    r: &Linear,
    st: Strategy,
    x: &Input,
    sh: &Shared,
    rows: usize,
) -> Result<bool> {
    let out_rows = if st.split_output(true) {
        x.bf16_rows
    } else {
        x.n
    };
    // SAFETY: as for the timings (the caller's buffers hold these products).
    unsafe {
        p.run(t, st, x, sh.y.ptr())?;
        p.run(r, st, x, sh.y2.ptr())?;
    }
    let mut a = vec![0f32; out_rows * rows];
    let mut b = vec![0f32; out_rows * rows];
    sh.y.download(&mut a)?;
    sh.y2.download(&mut b)?;
    Ok(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()))
}
