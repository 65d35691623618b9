//! The `tbe3` kernels (kernels/tbe3_gemv.cu, kernels/tbe3_decode.cu): a runtime-form matrix
//! (`codec::runtime`, docs/format.md §6) uploaded as one image, the fused decode GEMV (strategy 2
//! of issue 6) with its pass-through twin on raw BF16, and the full decode to BF16 (strategy 1).
//!
//! Launch geometry is chosen by pure functions ([`gemv_geometry`], [`decode_blocks`]) that the
//! CPU tests cover; the kernels' requirements are checked here, so a launch never reads outside
//! the image. [`Tbe3Harness`] runs single kernels on host data for `tests/cuda_tbe3.rs`.
//! docs/cuda.md ("The tbe3 kernels") describes the design and what the H100 must verify.

use std::sync::Arc;

use super::driver::{Arg, Context, Cublas, DevBuf, GpuError, GpuResult, Kernel, Module};
use super::kernels::{built_with_kernels, i32_of as int, load_family, Kernels};
use crate::codec::runtime::{RuntimeMatrix, Shape, GROUP};
use crate::device::DeviceError;
use crate::model::synth::f32_to_bf16;

/// Threads per block of the GEMV and decode kernels (8 warps).
pub const THREADS: u32 = 256;
/// Warps per block.
pub const WARPS: usize = THREADS as usize / 32;
/// Weights a warp covers per step (16 per lane).
pub const STEP: usize = 512;
/// Largest activation batch of the fused GEMV (`tbe3_gemv_b1..b8`).
pub const MAX_GEMV_BATCH: usize = 8;
/// Shortest K chunk the split-K heuristic makes (columns), so a warp has a few steps to pipeline.
pub const MIN_KCHUNK: usize = 2048;
/// Blocks per SM the GEMV heuristic aims for (2 resident blocks, about 2 waves).
pub const TARGET_BLOCKS_PER_SM: usize = 4;

/// Rows each warp owns for `batch` activation rows: mirrors `gemv_rows_per_warp` in
/// kernels/tbe3_gemv.cu (4 where it fits 128 registers without spills, else 2).
pub fn gemv_rows_per_warp(batch: usize) -> usize {
    if batch == 3 || batch == 4 {
        4
    } else {
        2
    }
}

/// Launch geometry of one fused GEMV: grid `(row_blocks, ksplit)`, 256 threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemvGeometry {
    /// Activation rows (1..=8).
    pub batch: usize,
    /// Matrix rows (output features).
    pub rows: usize,
    /// Matrix columns (reduction length).
    pub cols: usize,
    /// Rows per warp.
    pub rows_per_warp: usize,
    /// Blocks along the rows (`gridDim.x`).
    pub row_blocks: usize,
    /// K chunks (`gridDim.y`); more than 1 needs a partial buffer and the reduce pass.
    pub ksplit: usize,
    /// Columns per chunk: a multiple of 512 and of the tile.
    pub kchunk: usize,
}

impl GemvGeometry {
    /// f32 values of the split-K partial buffer (0 when `ksplit == 1`).
    pub fn partial_len(&self) -> usize {
        if self.ksplit > 1 {
            self.ksplit * self.batch * self.rows
        } else {
            0
        }
    }
}

/// Checks that the fused GEMV can run on this shape: `cols` a multiple of 128 and of the tile
/// (rows start on tile boundaries), `batch` in 1..=8, sizes within a kernel's int.
pub fn gemv_supported(shape: &Shape, batch: usize) -> Result<(), String> {
    if !(1..=MAX_GEMV_BATCH).contains(&batch) {
        return Err(format!(
            "the fused GEMV takes 1..={MAX_GEMV_BATCH} rows, not {batch}"
        ));
    }
    if shape.rows == 0 || shape.cols == 0 {
        return Err("empty matrix".into());
    }
    if !shape.cols.is_multiple_of(GROUP) || !shape.cols.is_multiple_of(shape.tile_elems) {
        return Err(format!(
            "the fused GEMV needs cols ({}) a multiple of {GROUP} and of the tile ({})",
            shape.cols, shape.tile_elems
        ));
    }
    if shape.rows > i32::MAX as usize / 2 || shape.cols > i32::MAX as usize / 2 {
        return Err("matrix too large for the kernel's int indices".into());
    }
    Ok(())
}

/// The GEMV geometry with an explicit number of K chunks (clamped to what the shape allows).
pub fn gemv_geometry_with_split(
    shape: &Shape,
    batch: usize,
    ksplit: usize,
) -> Result<GemvGeometry, String> {
    gemv_supported(shape, batch)?;
    let unit = shape.tile_elems.max(STEP);
    let units = shape.cols.div_ceil(unit);
    let per = units.div_ceil(ksplit.clamp(1, units));
    let kchunk = per * unit;
    let r = gemv_rows_per_warp(batch);
    Ok(GemvGeometry {
        batch,
        rows: shape.rows,
        cols: shape.cols,
        rows_per_warp: r,
        row_blocks: shape.rows.div_ceil(WARPS * r),
        ksplit: shape.cols.div_ceil(kchunk),
        kchunk,
    })
}

/// The GEMV geometry for a device with `sms` multiprocessors: split K only when the row blocks
/// alone leave the GPU short of [`TARGET_BLOCKS_PER_SM`] blocks per SM, never into chunks shorter
/// than [`MIN_KCHUNK`] columns (or one tile, if larger).
pub fn gemv_geometry(shape: &Shape, batch: usize, sms: usize) -> Result<GemvGeometry, String> {
    gemv_supported(shape, batch)?;
    let row_blocks = shape.rows.div_ceil(WARPS * gemv_rows_per_warp(batch));
    let want = (TARGET_BLOCKS_PER_SM * sms.max(1)).div_ceil(row_blocks);
    let min_chunk = MIN_KCHUNK.max(shape.tile_elems).max(STEP);
    let most = (shape.cols / min_chunk).max(1);
    gemv_geometry_with_split(shape, batch, want.clamp(1, most))
}

/// Whether rows `rows` of `shape` can be decoded on their own: inside the matrix, and the first
/// starting on a span (max(tile, 512) weights) boundary.
pub fn decode_range_ok(shape: &Shape, rows: &std::ops::Range<usize>) -> bool {
    let span = shape.tile_elems.max(STEP);
    rows.start <= rows.end
        && rows.end <= shape.rows
        && (rows.start * shape.cols).is_multiple_of(span)
}

/// Blocks of the decode kernel for `n` weights in tiles of `tile`: one warp per span of
/// max(tile, 512) weights, at most 16 blocks per SM (the kernel loops grid-stride).
pub fn decode_blocks(n: usize, tile: usize, sms: usize) -> u32 {
    let spans = n.div_ceil(tile.max(STEP));
    spans.div_ceil(WARPS).clamp(1, 16 * sms.max(1)) as u32
}

/// A runtime-form matrix in device memory: the image as it is, and its plane addresses.
pub struct DeviceTbe3 {
    /// The image.
    pub buf: DevBuf,
    /// Geometry.
    pub shape: Shape,
    /// Escapes in the image.
    pub escapes: usize,
}

impl DeviceTbe3 {
    /// Uploads `m`'s image (validated first).
    pub fn upload(ctx: &Arc<Context>, m: &RuntimeMatrix) -> GpuResult<Self> {
        m.view()
            .map_err(|e| GpuError::invalid(format!("invalid runtime matrix: {e}")))?;
        Ok(Self {
            buf: DevBuf::from_host(ctx, &m.image)?,
            shape: m.shape,
            escapes: m.escape_count(),
        })
    }

    /// Bytes of the image (what a kernel reading it all moves).
    pub fn bytes(&self) -> usize {
        self.buf.bytes()
    }

    /// A copy of this image in another allocation (benchmarks rotate copies to defeat L2).
    pub fn duplicate(&self, ctx: &Arc<Context>) -> GpuResult<Self> {
        let buf = DevBuf::new(ctx, self.bytes())?;
        // SAFETY: both buffers hold `bytes()` bytes of this context.
        unsafe { super::driver::copy_dtod(ctx, buf.ptr(), self.buf.ptr(), self.bytes())? };
        ctx.sync()?;
        Ok(Self {
            buf,
            shape: self.shape,
            escapes: self.escapes,
        })
    }

    /// The kernels' first six parameters: sm, codes, bases, esc_start, esc, tile_shift.
    pub(crate) fn plane_args(&self) -> [Arg; 6] {
        let l = self.shape.layout(self.escapes);
        [
            Arg::P(self.buf.at(l.sm.start)),
            Arg::P(self.buf.at(l.codes.start)),
            Arg::P(self.buf.at(l.bases.start)),
            Arg::P(self.buf.at(l.esc_start.start)),
            Arg::P(self.buf.at(l.escapes.start)),
            Arg::I(self.shape.tile_elems.trailing_zeros() as i32),
        ]
    }
}

/// The tbe3 kernel entry points, loaded from their two fatbins.
pub struct Tbe3Kernels {
    ctx: Arc<Context>,
    _modules: Vec<Module>,
    gemv_tbe3: Vec<Kernel>,
    gemv_bf16: Vec<Kernel>,
    reduce: Kernel,
    decode: Kernel,
    /// The tensor-core strategy's kernels (kernels/tbe3_mma.cu).
    pub mma: super::mma::MmaKernels,
    /// The embedding gather from a tbe3 table (kernels/tbe3_gather.cu).
    pub gather: super::gather::GatherKernel,
}

impl Tbe3Kernels {
    /// Loads kernels/tbe3_gemv.cu, kernels/tbe3_decode.cu and kernels/tbe3_mma.cu.
    pub fn load(ctx: &Arc<Context>) -> GpuResult<Self> {
        if !built_with_kernels() {
            return Err(GpuError::invalid("built without CUDA kernels".into()));
        }
        let (g, d) = (
            load_family(ctx, "tbe3_gemv")?,
            load_family(ctx, "tbe3_decode")?,
        );
        let each = |prefix: &str| -> GpuResult<Vec<Kernel>> {
            (1..=MAX_GEMV_BATCH)
                .map(|b| g.function(&format!("{prefix}_b{b}")))
                .collect()
        };
        Ok(Self {
            ctx: ctx.clone(),
            gemv_tbe3: each("tbe3_gemv")?,
            gemv_bf16: each("bf16_gemv")?,
            reduce: g.function("gemv_reduce")?,
            decode: d.function("tbe3_decode")?,
            mma: super::mma::MmaKernels::load(ctx)?,
            gather: super::gather::GatherKernel::load(ctx)?,
            _modules: vec![g, d],
        })
    }

    /// Decodes the whole matrix to row-major BF16 at `out` (`shape.len()` u16).
    pub fn decode(&self, m: &DeviceTbe3, out: u64, sms: usize) -> GpuResult<()> {
        self.decode_rows(m, 0..m.shape.rows, out, sms)
    }

    /// Decodes rows `rows` to row-major BF16 at `out` (`rows.len() × cols` u16, 16-byte
    /// aligned). The first row must start on a span boundary ([`decode_range_ok`]).
    pub fn decode_rows(
        &self,
        m: &DeviceTbe3,
        rows: std::ops::Range<usize>,
        out: u64,
        sms: usize,
    ) -> GpuResult<()> {
        let (begin, end) = (rows.start * m.shape.cols, rows.end * m.shape.cols);
        if !decode_range_ok(&m.shape, &rows) {
            return Err(GpuError::invalid(format!(
                "cannot decode rows {rows:?} of {:?}: the first must start on a tile boundary",
                m.shape
            )));
        }
        if !out.is_multiple_of(16) {
            return Err(GpuError::invalid(
                "decode output must be 16-byte aligned".into(),
            ));
        }
        if begin == end {
            return Ok(());
        }
        let [a0, a1, a2, a3, a4, a5] = m.plane_args();
        let args = [
            a0,
            a1,
            a2,
            a3,
            a4,
            a5,
            Arg::P(out),
            Arg::U(begin as u64),
            Arg::U(end as u64),
        ];
        let grid = (decode_blocks(end - begin, m.shape.tile_elems, sms), 1, 1);
        // SAFETY: matches tbe3_decode's parameters; the plane addresses come from the validated
        // image's layout; the range lies in the matrix and starts on a span (checked above);
        // `out` holds `end - begin` u16 (the caller's).
        unsafe { self.decode.launch(&self.ctx, grid, THREADS, &args) }
    }

    /// `y[b][r] = Σ_c W[r][c] · x[b][c]` with W in tbe3 form: `x` f32 `batch × cols`, `y` f32
    /// `batch × rows`, `partial` f32 of `g.partial_len()` (unused when `ksplit == 1`).
    pub fn gemv_tbe3(
        &self,
        m: &DeviceTbe3,
        x: u64,
        y: u64,
        partial: u64,
        g: &GemvGeometry,
    ) -> GpuResult<()> {
        self.check(&m.shape, g)?;
        let out = if g.ksplit > 1 { partial } else { y };
        let mut args = m.plane_args().to_vec();
        args.extend([
            Arg::P(x),
            Arg::P(out),
            Arg::I(int(g.rows, "rows")?),
            Arg::I(int(g.cols, "cols")?),
            Arg::I(int(g.kchunk, "kchunk")?),
        ]);
        // SAFETY: matches tbe3_gemv_bN's parameters; geometry checked against the shape; the
        // extents of x, y and partial are the caller's (documented above).
        unsafe {
            self.gemv_tbe3[g.batch - 1].launch(&self.ctx, Self::grid(g), THREADS, &args)?;
        }
        self.reduce(y, partial, g)
    }

    /// The pass-through twin of [`Tbe3Kernels::gemv_tbe3`] on raw row-major BF16 `w` (`rows ×
    /// cols` u16), with the same geometry: bit-identical output when `w` is the decoded matrix.
    pub fn gemv_bf16(
        &self,
        w: u64,
        shape: &Shape,
        x: u64,
        y: u64,
        partial: u64,
        g: &GemvGeometry,
    ) -> GpuResult<()> {
        self.check(shape, g)?;
        let out = if g.ksplit > 1 { partial } else { y };
        let args = [
            Arg::P(w),
            Arg::P(x),
            Arg::P(out),
            Arg::I(int(g.rows, "rows")?),
            Arg::I(int(g.cols, "cols")?),
            Arg::I(int(g.kchunk, "kchunk")?),
        ];
        // SAFETY: matches bf16_gemv_bN's parameters; extents are the caller's.
        unsafe {
            self.gemv_bf16[g.batch - 1].launch(&self.ctx, Self::grid(g), THREADS, &args)?;
        }
        self.reduce(y, partial, g)
    }

    fn grid(g: &GemvGeometry) -> (u32, u32, u32) {
        (g.row_blocks as u32, g.ksplit as u32, 1)
    }

    fn check(&self, shape: &Shape, g: &GemvGeometry) -> GpuResult<()> {
        gemv_supported(shape, g.batch).map_err(GpuError::invalid)?;
        let unit = shape.tile_elems.max(STEP);
        let ok = g.rows == shape.rows
            && g.cols == shape.cols
            && g.rows_per_warp == gemv_rows_per_warp(g.batch)
            && g.row_blocks * WARPS * g.rows_per_warp >= g.rows
            && g.kchunk > 0
            && g.kchunk.is_multiple_of(unit)
            && g.ksplit == g.cols.div_ceil(g.kchunk)
            && g.row_blocks <= 0x7fff_ffff
            && g.ksplit <= 65535;
        if ok {
            Ok(())
        } else {
            Err(GpuError::invalid(format!(
                "GEMV geometry {g:?} does not fit {shape:?}"
            )))
        }
    }

    fn reduce(&self, y: u64, partial: u64, g: &GemvGeometry) -> GpuResult<()> {
        if g.ksplit <= 1 {
            return Ok(());
        }
        let n = g.batch * g.rows;
        let args = [
            Arg::P(partial),
            Arg::P(y),
            Arg::I(int(n, "batch × rows")?),
            Arg::I(int(g.ksplit, "ksplit")?),
        ];
        let blocks = n.div_ceil(THREADS as usize).clamp(1, 65535) as u32;
        // SAFETY: matches gemv_reduce(const float*, float*, int, int); partial holds ksplit × n
        // f32 and y n f32 (the caller's).
        unsafe {
            self.reduce
                .launch(&self.ctx, (blocks, 1, 1), THREADS, &args)
        }
    }
}

type R<T> = Result<T, DeviceError>;

/// The device's multiprocessor count.
pub fn multiprocessors(ctx: &Context) -> GpuResult<usize> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    Ok(ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize)
}

/// Single tbe3 kernels on host data, outputs poisoned first (tests; slow by design).
pub struct Tbe3Harness {
    ctx: Arc<Context>,
    fill: Kernels,
    k: Tbe3Kernels,
    blas: Cublas,
    sms: usize,
}

impl Tbe3Harness {
    /// Opens device 0 and loads the kernels.
    pub fn new() -> R<Self> {
        if !built_with_kernels() {
            return Err(DeviceError::cuda("built without CUDA kernels".into()));
        }
        let ctx = Context::new(0)?;
        Ok(Self {
            fill: Kernels::load(&ctx)?,
            k: Tbe3Kernels::load(&ctx)?,
            blas: Cublas::new(&ctx)?,
            sms: multiprocessors(&ctx)?,
            ctx,
        })
    }

    /// The device's multiprocessors.
    pub fn sms(&self) -> usize {
        self.sms
    }

    /// `tbe3_decode` of `m`; the output starts as BF16 NaN 0xFFFF.
    pub fn decode(&self, m: &RuntimeMatrix) -> R<Vec<u16>> {
        let d = DeviceTbe3::upload(&self.ctx, m)?;
        let n = m.shape.len();
        let out = DevBuf::new(&self.ctx, 2 * n)?;
        self.fill
            .fill_u16(out.ptr(), n, super::harness::POISON_BF16)?;
        self.k.decode(&d, out.ptr(), self.sms)?;
        self.ctx.sync()?;
        let mut v = vec![0u16; n];
        out.download(&mut v)?;
        Ok(v)
    }

    /// The fused GEMV on `m` and its pass-through twin on `bf16` (the same matrix as BF16 bits),
    /// both with geometry `g`; `x` is `g.batch × cols` f32. Outputs (and partials) start as NaN.
    pub fn gemv(
        &self,
        m: &RuntimeMatrix,
        bf16: &[u16],
        x: &[f32],
        g: &GemvGeometry,
    ) -> R<(Vec<f32>, Vec<f32>)> {
        let s = m.shape;
        if bf16.len() != s.len() || x.len() != g.batch * s.cols {
            return Err(DeviceError::cuda("gemv: input sizes do not match".into()));
        }
        let d = DeviceTbe3::upload(&self.ctx, m)?;
        let (wb, xb) = (
            DevBuf::from_host(&self.ctx, bf16)?,
            DevBuf::from_host(&self.ctx, x)?,
        );
        let n = g.batch * s.rows;
        let run = |tbe3: bool| -> R<Vec<f32>> {
            let y = DevBuf::new(&self.ctx, 4 * n)?;
            let p = DevBuf::new(&self.ctx, 4 * g.partial_len().max(1))?;
            self.fill.fill_f32(y.ptr(), n, f32::NAN)?;
            self.fill
                .fill_f32(p.ptr(), g.partial_len().max(1), f32::NAN)?;
            if tbe3 {
                self.k.gemv_tbe3(&d, xb.ptr(), y.ptr(), p.ptr(), g)?;
            } else {
                self.k
                    .gemv_bf16(wb.ptr(), &s, xb.ptr(), y.ptr(), p.ptr(), g)?;
            }
            self.ctx.sync()?;
            let mut v = vec![0f32; n];
            y.download(&mut v)?;
            Ok(v)
        };
        Ok((run(true)?, run(false)?))
    }

    /// [`Tbe3Kernels::decode_rows`] of rows `rows` of `m` into a buffer of `rows.len() × cols +
    /// guard` BF16 that starts as NaN 0xFFFF; returns the whole buffer, so the caller sees both
    /// the decoded rows and that the `guard` values after them were left alone.
    pub fn decode_rows(
        &self,
        m: &RuntimeMatrix,
        rows: std::ops::Range<usize>,
        guard: usize,
    ) -> R<Vec<u16>> {
        let d = DeviceTbe3::upload(&self.ctx, m)?;
        let n = rows.len() * m.shape.cols + guard;
        let out = DevBuf::new(&self.ctx, 2 * n)?;
        self.fill
            .fill_u16(out.ptr(), n, super::harness::POISON_BF16)?;
        self.k.decode_rows(&d, rows, out.ptr(), self.sms)?;
        self.ctx.sync()?;
        let mut v = vec![0u16; n];
        out.download(&mut v)?;
        Ok(v)
    }

    /// One product `y = x · Wᵀ` through [`super::linear::Products::run`] with `strategy`, on
    /// the same matrix stored both ways: `m` (tbe3) and `bits` (its BF16 bits, raw, with `m`'s
    /// shape and tile). `x` is `n × cols` f32: the GEMV reads it as it is, cuBLAS as BF16 rows
    /// (hi then lo rows when `split`, as the engine's split activations; else rounded). Outputs,
    /// the decode scratch and the split-K partials start as NaN. Returns (tbe3, raw) outputs as
    /// `n × rows` f32 per token (a split product's hi and lo rows added in f32, as `split_sum`
    /// does), or the error `Products::run` gives (an unsupported strategy).
    pub fn product(
        &self,
        m: &RuntimeMatrix,
        bits: &[u16],
        strategy: super::plan::Strategy,
        x: &[f32],
        n: usize,
        split: bool,
    ) -> R<(Vec<f32>, Vec<f32>)> {
        use super::linear::{Form, Input, Linear, Products};
        use super::plan::Strategy;
        let s = m.shape;
        if bits.len() != s.len() || x.len() != n * s.cols || n == 0 {
            return Err(DeviceError::cuda(format!(
                "product: {} weights and {} activations for {n} rows of a {} × {} matrix",
                bits.len(),
                x.len(),
                s.rows,
                s.cols
            )));
        }
        let tbe3 = Linear {
            shape: s,
            form: Form::Tbe3(DeviceTbe3::upload(&self.ctx, m)?),
        };
        let raw = Linear {
            shape: s,
            form: Form::Raw(DevBuf::from_host(&self.ctx, bits)?),
        };
        // Activations: f32 for the GEMV, BF16 (hi rows, then lo rows when split) for cuBLAS.
        let hi: Vec<u16> = x.iter().map(|&v| f32_to_bf16(v)).collect();
        let mut xb = hi.clone();
        if split {
            xb.extend(
                x.iter()
                    .zip(&hi)
                    .map(|(&v, &h)| f32_to_bf16(v - crate::model::weights::bf16_to_f32(h))),
            );
        }
        let bf16_rows = if split { 2 * n } else { n };
        let (xf, xh) = (
            DevBuf::from_host(&self.ctx, x)?,
            DevBuf::from_host(&self.ctx, &xb)?,
        );
        let input = Input {
            bf16: xh.ptr(),
            ldb: s.cols,
            bf16_rows,
            f32: xf.ptr(),
            n,
        };
        let (scratch_elems, partial_len) = match strategy {
            Strategy::Cublas { chunk_rows } => {
                let c = if chunk_rows == 0 {
                    s.rows
                } else {
                    chunk_rows.min(s.rows)
                };
                (c * s.cols, 0)
            }
            Strategy::Gemv { ksplit } => (
                0,
                gemv_geometry_with_split(&s, n, ksplit)
                    .map(|g| g.partial_len())
                    .unwrap_or(0),
            ),
            Strategy::Mma => (0, 0),
        };
        let split_out = strategy.split_output(split);
        let out_rows = if split_out { 2 * n } else { n };
        let run = |w: &Linear| -> R<Vec<f32>> {
            let scratch = DevBuf::new(&self.ctx, 2 * scratch_elems.max(8))?;
            self.fill.fill_u16(
                scratch.ptr(),
                scratch_elems.max(8),
                super::harness::POISON_BF16,
            )?;
            let partial = DevBuf::new(&self.ctx, 4 * partial_len.max(1))?;
            self.fill
                .fill_f32(partial.ptr(), partial_len.max(1), f32::NAN)?;
            let y = DevBuf::new(&self.ctx, 4 * out_rows * s.rows)?;
            self.fill.fill_f32(y.ptr(), out_rows * s.rows, f32::NAN)?;
            let p = Products {
                blas: &self.blas,
                tbe3: &self.k,
                scratch: &scratch,
                partial: &partial,
                sms: self.sms,
            };
            // SAFETY: xh holds `bf16_rows` BF16 rows of `cols`, xf `n` f32 rows of `cols`, y
            // `out_rows × rows` f32: what `run` reads and writes for this strategy.
            unsafe { p.run(w, strategy, &input, y.ptr())? };
            self.ctx.sync()?;
            let mut v = vec![0f32; out_rows * s.rows];
            y.download(&mut v)?;
            if split_out {
                let (a, b) = v.split_at(n * s.rows);
                Ok(a.iter().zip(b).map(|(p, q)| p + q).collect())
            } else {
                Ok(v)
            }
        };
        Ok((run(&tbe3)?, run(&raw)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(rows: usize, cols: usize) -> Shape {
        Shape::for_matrix(rows, cols).unwrap()
    }

    #[test]
    fn llama_shapes_get_valid_geometry() {
        let llama = [
            (4096, 4096),
            (1024, 4096),
            (14336, 4096),
            (4096, 14336),
            (128256, 4096),
        ];
        for (rows, cols) in llama {
            for batch in 1..=MAX_GEMV_BATCH {
                let s = shape(rows, cols);
                let g = gemv_geometry(&s, batch, 132).unwrap();
                let unit = s.tile_elems.max(STEP);
                assert!(g.kchunk.is_multiple_of(unit), "{g:?}");
                assert_eq!(g.ksplit, cols.div_ceil(g.kchunk));
                assert!(g.row_blocks * WARPS * g.rows_per_warp >= rows);
                assert!((g.row_blocks - 1) * WARPS * g.rows_per_warp < rows);
                assert!(g.kchunk >= MIN_KCHUNK.min(cols));
                // Enough blocks to cover the GPU, or K cannot be split further.
                assert!(
                    g.row_blocks * g.ksplit >= 132 || g.kchunk == MIN_KCHUNK.max(unit),
                    "{rows}x{cols} b{batch}: {g:?}"
                );
            }
        }
        // The small k/v projections split K; lm_head never does.
        let kv = gemv_geometry(&shape(1024, 4096), 1, 132).unwrap();
        assert_eq!((kv.ksplit, kv.kchunk), (2, 2048));
        let lm = gemv_geometry(&shape(128256, 4096), 1, 132).unwrap();
        assert_eq!((lm.ksplit, lm.row_blocks), (1, 128256usize.div_ceil(16)));
        assert_eq!(lm.partial_len(), 0);
        let down = gemv_geometry(&shape(4096, 14336), 4, 132).unwrap();
        assert_eq!(down.rows_per_warp, 4);
        assert_eq!(down.partial_len(), down.ksplit * 4 * 4096);
    }

    #[test]
    fn awkward_shapes_and_refusals() {
        // cols 384 -> tile 128: chunks of one 512-column step cover the row.
        let g = gemv_geometry(&shape(7, 384), 3, 132).unwrap();
        assert_eq!((g.ksplit, g.kchunk, g.row_blocks), (1, 512, 1));
        // An explicit split is clamped to the steps available and stays tile aligned.
        let s = shape(33, 4096 + 2048);
        let g = gemv_geometry_with_split(&s, 2, 100).unwrap();
        assert_eq!((g.ksplit, g.kchunk), (3, 2048));
        let g = gemv_geometry_with_split(&s, 2, 2).unwrap();
        assert_eq!((g.ksplit, g.kchunk), (2, 4096));
        // Refused: cols not a multiple of 128, tile not dividing cols, batch out of range.
        assert!(gemv_geometry(&Shape::new(4, 100, 128).unwrap(), 1, 132).is_err());
        assert!(gemv_geometry(&Shape::new(4, 384, 2048).unwrap(), 1, 132).is_err());
        assert!(gemv_geometry(&shape(4, 4096), 0, 132).is_err());
        assert!(gemv_geometry(&shape(4, 4096), 9, 132).is_err());
    }

    #[test]
    fn decode_grid() {
        assert_eq!(decode_blocks(1, 2048, 132), 1);
        assert_eq!(decode_blocks(4096 * 4096, 2048, 132), 1024);
        assert_eq!(decode_blocks(128256 * 4096, 2048, 132), 16 * 132);
        assert_eq!(decode_blocks(1000, 128, 132), 1);
        assert_eq!(gemv_rows_per_warp(1), 2);
        assert_eq!(gemv_rows_per_warp(4), 4);
        assert_eq!(gemv_rows_per_warp(8), 2);
    }
}
