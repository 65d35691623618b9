//! One linear layer's weight in device memory ([`Linear`], raw BF16 or tbe3) and the product
//! with it by a chosen [`Strategy`] ([`Products::run`]).
//!
//! The same call runs a strategy on either storage form: on tbe3 the fused GEMV decodes in
//! registers and the cuBLAS strategies decode row chunks into a scratch buffer first; on raw
//! BF16 the GEMV is the pass-through twin and cuBLAS reads the weight in place, chunk by chunk
//! with the same chunk boundaries. So a matrix's product is bit-identical on both forms.

use std::sync::Arc;

use super::driver::{Context, Cublas, DevBuf, GpuError, GpuResult};
use super::plan::{Storage, Strategy};
use super::tbe3::{gemv_geometry_with_split, DeviceTbe3, Tbe3Kernels};
use crate::codec::runtime::{encode_le_bytes, Shape};

/// Where a [`Linear`]'s weight lives.
pub enum Form {
    /// Row-major BF16.
    Raw(DevBuf),
    /// The tbe3 runtime form.
    Tbe3(DeviceTbe3),
}

/// A weight matrix `rows × cols` (the Hugging Face `[out, in]` layout) in device memory.
pub struct Linear {
    /// Its geometry (the tbe3 tile size also fixes the GEMV's K chunks on raw storage).
    pub shape: Shape,
    /// The weight.
    pub form: Form,
}

impl Linear {
    /// Uploads little-endian BF16 bytes (`2 × rows × cols`) in `storage` form (tbe3 is encoded
    /// on the CPU first, in parallel).
    pub fn upload(
        ctx: &Arc<Context>,
        bytes: &[u8],
        rows: usize,
        cols: usize,
        storage: Storage,
    ) -> GpuResult<Self> {
        let shape = Shape::for_matrix(rows, cols)
            .map_err(|e| GpuError::invalid(format!("{rows} × {cols} matrix: {e}")))?;
        if bytes.len() != 2 * shape.len() {
            return Err(GpuError::invalid(format!(
                "{} bytes for a {rows} × {cols} BF16 matrix",
                bytes.len()
            )));
        }
        let form = match storage {
            Storage::Raw => Form::Raw(DevBuf::from_host(ctx, bytes)?),
            Storage::Tbe3 => {
                let m = encode_le_bytes(bytes, shape)
                    .map_err(|e| GpuError::invalid(format!("tbe3 encoding: {e}")))?;
                Form::Tbe3(DeviceTbe3::upload(ctx, &m)?)
            }
        };
        Ok(Self { shape, form })
    }

    /// A raw matrix already in device memory (synthetic weights).
    pub fn raw(buf: DevBuf, rows: usize, cols: usize) -> GpuResult<Self> {
        let shape = Shape::for_matrix(rows, cols)
            .map_err(|e| GpuError::invalid(format!("{rows} × {cols} matrix: {e}")))?;
        if buf.bytes() < 2 * shape.len() {
            return Err(GpuError::invalid(format!(
                "{} bytes for a {rows} × {cols} BF16 matrix",
                buf.bytes()
            )));
        }
        Ok(Self {
            shape,
            form: Form::Raw(buf),
        })
    }

    /// Device bytes of the weight (what one full pass reads).
    pub fn bytes(&self) -> usize {
        match &self.form {
            Form::Raw(b) => 2 * self.shape.len().min(b.bytes() / 2),
            Form::Tbe3(m) => m.bytes(),
        }
    }
}

/// A product's input: the activation rows in both forms the strategies read.
#[derive(Clone, Copy, Debug)]
pub struct Input {
    /// BF16 activation rows for cuBLAS (hi rows then lo rows when split), `ldb` apart.
    pub bf16: u64,
    /// Elements between consecutive BF16 rows.
    pub ldb: usize,
    /// BF16 rows cuBLAS multiplies (`2n` when split, else `n`).
    pub bf16_rows: usize,
    /// The same `n` rows as f32, `cols` apart (the GEMV's input).
    pub f32: u64,
    /// Tokens.
    pub n: usize,
}

/// The product kernels and the buffers they share: cuBLAS, the tbe3 kernels, the decode
/// scratch and the split-K partial buffer.
pub struct Products<'a> {
    /// cuBLAS handle (on the context's stream).
    pub blas: &'a Cublas,
    /// GEMV and decode kernels.
    pub tbe3: &'a Tbe3Kernels,
    /// BF16 scratch for decoded chunks.
    pub scratch: &'a DevBuf,
    /// f32 partial sums of split-K GEMVs.
    pub partial: &'a DevBuf,
    /// Multiprocessors (decode grid size).
    pub sms: usize,
}

impl Products<'_> {
    /// `y = x · Wᵀ` by `strategy`: `y` receives `bf16_rows × rows` f32 (a split product) for
    /// the cuBLAS and tensor-core strategies and `n × rows` f32 for the GEMV
    /// ([`Strategy::split_output`]).
    ///
    /// # Safety
    /// `x` must describe device buffers of this context holding what [`Input`] says, with
    /// `cols` elements per row, and `y` must hold the product.
    pub unsafe fn run(&self, w: &Linear, strategy: Strategy, x: &Input, y: u64) -> GpuResult<()> {
        let s = w.shape;
        if let Some(why) = strategy.unsupported(&s, x.n) {
            return Err(GpuError::invalid(format!(
                "{strategy:?} on a {} × {} matrix with {} rows: {why}",
                s.rows, s.cols, x.n
            )));
        }
        match strategy {
            Strategy::Cublas { chunk_rows } => {
                let chunk = if chunk_rows == 0 {
                    s.rows
                } else {
                    chunk_rows.min(s.rows)
                };
                let mut r0 = 0;
                while r0 < s.rows {
                    let r1 = (r0 + chunk).min(s.rows);
                    let wptr = match &w.form {
                        Form::Raw(b) => b.ptr() + 2 * (r0 * s.cols) as u64,
                        Form::Tbe3(m) => {
                            let need = 2 * (r1 - r0) * s.cols;
                            if need > self.scratch.bytes() {
                                return Err(GpuError::invalid(format!(
                                    "decode scratch of {} bytes holds no chunk of {need}",
                                    self.scratch.bytes()
                                )));
                            }
                            self.tbe3
                                .decode_rows(m, r0..r1, self.scratch.ptr(), self.sms)?;
                            self.scratch.ptr()
                        }
                    };
                    // SAFETY: rows r0..r1 of the weight (or their decoded copy) are `r1 - r0`
                    // rows of `cols` BF16; x and y are the caller's; row r0 of each output row
                    // starts r0 f32 in, `rows` apart.
                    unsafe {
                        self.blas.gemm_bf16_ldc(
                            wptr,
                            r1 - r0,
                            s.cols,
                            x.bf16,
                            x.ldb,
                            x.bf16_rows,
                            y + 4 * r0 as u64,
                            s.rows,
                        )?;
                    }
                    r0 = r1;
                }
                Ok(())
            }
            Strategy::Mma => {
                let k = &self.tbe3.mma;
                // SAFETY: x holds `bf16_rows` BF16 rows `ldb` apart and y `bf16_rows × rows`
                // f32 (the caller's); the kernels check the shape and stride.
                unsafe {
                    match &w.form {
                        Form::Raw(b) => k.run_bf16(b.ptr(), &s, x.bf16, x.ldb, x.bf16_rows, y),
                        Form::Tbe3(m) => k.run_tbe3(m, x.bf16, x.ldb, x.bf16_rows, y),
                    }
                }
            }
            Strategy::Gemv { ksplit } => {
                let g = gemv_geometry_with_split(&s, x.n, ksplit).map_err(GpuError::invalid)?;
                if 4 * g.partial_len() > self.partial.bytes() {
                    return Err(GpuError::invalid(format!(
                        "split-K buffer of {} bytes holds no {} partial sums",
                        self.partial.bytes(),
                        g.partial_len()
                    )));
                }
                match &w.form {
                    Form::Raw(b) => {
                        self.tbe3
                            .gemv_bf16(b.ptr(), &s, x.f32, y, self.partial.ptr(), &g)
                    }
                    Form::Tbe3(m) => self.tbe3.gemv_tbe3(m, x.f32, y, self.partial.ptr(), &g),
                }
            }
        }
    }
}
