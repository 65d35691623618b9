//! `unweight bench kernels`: the tbe3 kernels against cuBLAS on raw BF16, for every linear shape
//! of Llama-3.1-8B and batch sizes 1..256, all in one run on one device.
//!
//! Per (shape, batch): the fused tbe3 decode GEMV (batch <= 8), tbe3 full decode + cuBLAS, the
//! pass-through GEMV on raw BF16 (batch <= 8; same kernel body, so the cost of decoding shows),
//! and cuBLAS on raw BF16. cuBLAS gets 2 x batch BF16 rows (the engine's split hi/lo
//! activations, docs/cuda.md); the GEMVs take f32 activations. Each timing is a CUDA graph of
//! `--launches` back-to-back launches (so launch overhead is not what is measured), rotating
//! among copies of the weights totalling more than 2x L2 (so repeated launches do not read L2),
//! replayed `--repeats` times after a warm-up; the median per launch is reported. Effective
//! bandwidth = bytes of the stored weights (tbe3 image or BF16) / time, next to the
//! device-to-device copy bandwidth measured in the same run (bytes read + written).
//! Weights: synthetic N(0, 0.02) BF16 made on the device, encoded to tbe3 on the host.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use serde_json::json;

use crate::codec::runtime::{self, Shape};
use crate::device::cuda::driver::{Context, Cublas, DevBuf, Event, GpuResult, Graph};
use crate::device::cuda::kernels::Kernels;
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
    /// Only these shapes (q,k,v,o,gate,up,down,lm_head); default all.
    #[arg(long, value_delimiter = ',')]
    pub shapes: Option<Vec<String>>,
    /// Launches captured in each timed graph.
    #[arg(long, default_value_t = 20)]
    pub launches: usize,
    /// Timed replays of each graph (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Llama-3.1-8B's linear layers: (name, rows = out features, cols = in features).
pub const LLAMA_8B_LINEAR: &[(&str, usize, usize)] = &[
    ("q", 4096, 4096),
    ("k", 1024, 4096),
    ("v", 1024, 4096),
    ("o", 4096, 4096),
    ("gate", 14336, 4096),
    ("up", 14336, 4096),
    ("down", 4096, 14336),
    ("lm_head", 128256, 4096),
];

const COPY_BYTES: usize = 1 << 30;
/// Most copies of one matrix in the rotation.
const MAX_COPIES: usize = 16;

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

/// Runs the kernel benchmark.
pub fn run(a: &KernelsArgs) -> Result<()> {
    let info = cuda::probe().map_err(|r| anyhow!("bench kernels needs a usable GPU: {r}"))?;
    if a.batch.is_empty() || a.batch.contains(&0) {
        bail!("--batch needs sizes of at least 1");
    }
    let shapes: Vec<(&str, usize, usize)> = match &a.shapes {
        None => LLAMA_8B_LINEAR.to_vec(),
        Some(names) => names
            .iter()
            .map(|n| {
                LLAMA_8B_LINEAR
                    .iter()
                    .find(|s| s.0 == n)
                    .copied()
                    .ok_or_else(|| anyhow!("unknown shape {n}"))
            })
            .collect::<Result<_>>()?,
    };
    eprintln!(
        "bench kernels: {} ({} SMs)",
        info.name, info.multiprocessors
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
    let rotate_bytes = 2 * info.l2_bytes.max(1) as usize;
    let max_batch = *a.batch.iter().max().unwrap();
    let max_cols = shapes.iter().map(|s| s.2).max().unwrap();
    let max_rows = shapes.iter().map(|s| s.1).max().unwrap();
    let max_n = shapes.iter().map(|s| s.1 * s.2).max().unwrap();
    // Activations: f32 for the GEMVs, split BF16 (2 x batch rows) for cuBLAS; N(0, 1)-ish.
    let gb = max_batch.min(tbe3::MAX_GEMV_BATCH);
    let xf: Vec<f32> = (0..gb * max_cols)
        .map(|i| ((i as u64 * 2654435761 % 2001) as f32 - 1000.0) / 500.0)
        .collect();
    let x32 = DevBuf::from_host(&ctx, &xf)?;
    let xbf = DevBuf::new(&ctx, 2 * 2 * max_batch * max_cols)?;
    b.fill
        .fill_normal_bf16(xbf.ptr(), 2 * max_batch * max_cols, 7, 1.0)?;
    let y = DevBuf::new(&ctx, 4 * 2 * max_batch * max_rows)?;
    let scratch = DevBuf::new(&ctx, 2 * max_n)?;
    let mut part_len = 1;
    for &(_, rows, cols) in &shapes {
        let s = Shape::for_matrix(rows, cols)?;
        for bs in 1..=gb {
            part_len = part_len.max(
                tbe3::gemv_geometry(&s, bs, b.sms)
                    .map_err(|e| anyhow!(e))?
                    .partial_len(),
            );
        }
    }
    let partial = DevBuf::new(&ctx, 4 * part_len)?;

    println!(
        "{:<8} {:>5} {:>10} {:>10} {:>10} {:>10}   {:>7} {:>7} {:>7} {:>7}  (ms per call; % of copy bandwidth on stored bytes)",
        "shape", "batch", "tbe3 gemv", "dec+cublas", "bf16 gemv", "cublas", "tg %", "dc %", "bg %", "cb %"
    );
    let mut results = Vec::new();
    let mut matrices = Vec::new();
    for (si, &(name, rows, cols)) in shapes.iter().enumerate() {
        let n = rows * cols;
        let shape = Shape::for_matrix(rows, cols)?;
        let w0 = DevBuf::new(&ctx, 2 * n)?;
        b.fill
            .fill_normal_bf16(w0.ptr(), n, 1000 + si as u64, 0.02)?;
        ctx.sync()?;
        let mut host = vec![0u16; n];
        w0.download(&mut host)?;
        let m = runtime::encode(&host, shape)?;
        let stats = m.stats();
        drop(host);
        let t0 = DeviceTbe3::upload(&ctx, &m)?;
        drop(m);
        let tbytes = t0.bytes();
        let bbytes = 2 * n;
        let tcopies = rotate_bytes.div_ceil(tbytes).clamp(1, MAX_COPIES);
        let bcopies = rotate_bytes.div_ceil(bbytes).clamp(1, MAX_COPIES);
        let mut tm = vec![t0];
        for _ in 1..tcopies {
            tm.push(tm[0].duplicate(&ctx)?);
        }
        let mut bw = vec![w0];
        for _ in 1..bcopies {
            let c = DevBuf::new(&ctx, bbytes)?;
            // SAFETY: both buffers hold `bbytes` bytes of this context.
            unsafe { cuda::driver::copy_dtod(&ctx, c.ptr(), bw[0].ptr(), bbytes)? };
            bw.push(c);
        }
        ctx.sync()?;
        // Sanity: the fused GEMV equals its pass-through twin at batch 1 on this shape.
        let g1 = tbe3::gemv_geometry(&shape, 1, b.sms).map_err(|e| anyhow!(e))?;
        let mut ya = vec![0f32; rows];
        let mut yb = vec![0f32; rows];
        b.k.gemv_tbe3(&tm[0], x32.ptr(), y.ptr(), partial.ptr(), &g1)?;
        ctx.sync()?;
        y.download(&mut ya)?;
        b.k.gemv_bf16(bw[0].ptr(), &shape, x32.ptr(), y.ptr(), partial.ptr(), &g1)?;
        ctx.sync()?;
        y.download(&mut yb)?;
        let identical = ya.iter().zip(&yb).all(|(p, q)| p.to_bits() == q.to_bits());
        if !identical {
            eprintln!("bench kernels: {name}: tbe3 GEMV and pass-through DIFFER at batch 1");
        }
        matrices.push(json!({
            "shape": name, "rows": rows, "cols": cols, "tile": shape.tile_elems,
            "tbe3_bytes": tbytes, "bf16_bytes": bbytes, "tbe3_ratio": tbytes as f64 / bbytes as f64,
            "escape_rate": stats.escape_rate(), "tbe3_copies": tcopies, "bf16_copies": bcopies,
            "gemv_bit_identical_batch1": identical,
        }));
        for &batch in &a.batch {
            let gemv = batch <= tbe3::MAX_GEMV_BATCH;
            let (tg, bg, geom) = if gemv {
                let g = tbe3::gemv_geometry(&shape, batch, b.sms).map_err(|e| anyhow!(e))?;
                let tg = b.time(|i| {
                    b.k.gemv_tbe3(&tm[i % tcopies], x32.ptr(), y.ptr(), partial.ptr(), &g)
                })?;
                let bg = b.time(|i| {
                    b.k.gemv_bf16(
                        bw[i % bcopies].ptr(),
                        &shape,
                        x32.ptr(),
                        y.ptr(),
                        partial.ptr(),
                        &g,
                    )
                })?;
                (Some(tg), Some(bg), Some(g))
            } else {
                (None, None, None)
            };
            let rows2 = 2 * batch;
            // SAFETY (both closures): scratch holds n BF16, xbf 2 x max_batch x max_cols BF16,
            // y 2 x max_batch x max_rows f32, every weight copy rows x cols BF16.
            let dc = b.time(|i| {
                b.k.decode(&tm[i % tcopies], scratch.ptr(), b.sms)?;
                unsafe {
                    b.blas
                        .gemm_bf16(scratch.ptr(), rows, cols, xbf.ptr(), cols, rows2, y.ptr())
                }
            })?;
            let cb = b.time(|i| unsafe {
                b.blas.gemm_bf16(
                    bw[i % bcopies].ptr(),
                    rows,
                    cols,
                    xbf.ptr(),
                    cols,
                    rows2,
                    y.ptr(),
                )
            })?;
            let frac = |bytes: usize, ms: f64| bytes as f64 / (ms * 1e-3) / copy_bw;
            let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
            let pct = |v: Option<f64>, bytes| {
                v.map_or("-".to_string(), |v| {
                    format!("{:.1}", 100.0 * frac(bytes, v))
                })
            };
            println!(
                "{name:<8} {batch:>5} {:>10} {:>10.4} {:>10} {:>10.4}   {:>7} {:>7.1} {:>7} {:>7.1}",
                cell(tg),
                dc,
                cell(bg),
                cb,
                pct(tg, tbytes),
                100.0 * frac(tbytes, dc),
                pct(bg, bbytes),
                100.0 * frac(bbytes, cb)
            );
            let gbps =
                |bytes: usize, ms: Option<f64>| ms.map(|ms| bytes as f64 / (ms * 1e-3) / 1e9);
            results.push(json!({
                "shape": name, "rows": rows, "cols": cols, "batch": batch,
                "cublas_rows": rows2,
                "ms": {"tbe3_gemv": tg, "tbe3_decode_cublas": dc, "bf16_gemv": bg, "cublas_bf16": cb},
                "stored_gbps": {
                    "tbe3_gemv": gbps(tbytes, tg), "tbe3_decode_cublas": gbps(tbytes, Some(dc)),
                    "bf16_gemv": gbps(bbytes, bg), "cublas_bf16": gbps(bbytes, Some(cb)),
                },
                "fraction_of_copy_bandwidth": {
                    "tbe3_gemv": tg.map(|v| frac(tbytes, v)), "tbe3_decode_cublas": frac(tbytes, dc),
                    "bf16_gemv": bg.map(|v| frac(bbytes, v)), "cublas_bf16": frac(bbytes, cb),
                },
                "speedup_vs_cublas": {
                    "tbe3_gemv": tg.map(|v| cb / v), "tbe3_decode_cublas": cb / dc,
                    "bf16_gemv": bg.map(|v| cb / v),
                },
                "gemv_geometry": geom.map(|g| json!({"rows_per_warp": g.rows_per_warp,
                    "row_blocks": g.row_blocks, "ksplit": g.ksplit, "kchunk": g.kchunk})),
            }));
        }
    }
    if let Some(out) = &a.out {
        let doc = json!({
            "benchmark": "kernels",
            "gpu": info,
            "weights": "synthetic N(0, 0.02) BF16 (fill_normal_bf16), tbe3 via codec::runtime::encode",
            "activations": "GEMV: f32 batch x cols; cuBLAS: split BF16, 2 x batch rows, FP32 output",
            "timing": format!("CUDA graph of {} launches rotating weight copies (> 2x L2), median of {} replays", a.launches, a.repeats),
            "copy_bandwidth_gbps": copy_bw / 1e9,
            "copy_bandwidth_note": "device-to-device cuMemcpyDtoDAsync, bytes read + written, 1 GiB buffers, median of 20",
            "matrices": matrices,
            "results": results,
        });
        super::bench::write_results(out, doc, rayon::current_num_threads())?;
    }
    Ok(())
}
