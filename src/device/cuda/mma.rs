//! The tensor-core strategy (kernels/tbe3_mma.cu, strategy 3 of issue 6): tbe3 weights decoded
//! into shared memory and multiplied with `mma.sync` BF16 → f32, with its pass-through twin on
//! raw BF16 (bit-identical by construction: one kernel body, two weight sources).
//!
//! Reads the same split-BF16 activation rows as the cuBLAS strategies and writes the same
//! layout (`y[n][r]`, `rows` apart), so the consumer cannot tell them apart. First version: no
//! asynchronous-copy pipeline yet (docs/cuda.md, "The tensor-core strategy").

use std::sync::Arc;

use super::driver::{Arg, Context, GpuError, GpuResult, Kernel, Module};
use super::kernels::{i32_of as int, load_family};
use super::tbe3::DeviceTbe3;
use crate::codec::runtime::Shape;

/// Threads per block.
pub const MMA_THREADS: u32 = 256;
/// Weight rows per block.
pub const MMA_M: usize = 64;
/// Activation rows per block.
pub const MMA_N: usize = 64;
/// Columns per stage (one tbe3 warp step per row).
pub const MMA_K: usize = 512;
/// Dynamic shared memory per block: two tiles of 64 rows × (512 + 8) BF16.
pub const MMA_SMEM: usize = 2 * 64 * (MMA_K + 8) * 2;

/// Why the tensor-core kernel cannot multiply `shape` by activation rows `ldx` apart, if not:
/// cols a multiple of 512 and of the tile (rows start on tiles, stages on tbe3 steps), `ldx` a
/// multiple of 8 (16-byte activation loads), sizes within a kernel's int.
pub fn mma_unsupported(shape: &Shape, ldx: usize) -> Option<String> {
    if shape.rows == 0 || shape.cols == 0 {
        return Some("empty matrix".into());
    }
    if !shape.cols.is_multiple_of(MMA_K) || !shape.cols.is_multiple_of(shape.tile_elems) {
        return Some(format!(
            "the tensor-core kernel needs cols ({}) a multiple of {MMA_K} and of the tile ({})",
            shape.cols, shape.tile_elems
        ));
    }
    if !ldx.is_multiple_of(8) || ldx < shape.cols {
        return Some(format!(
            "activation rows {ldx} apart: need a multiple of 8, at least cols"
        ));
    }
    if shape.rows > i32::MAX as usize || shape.cols > i32::MAX as usize || ldx > i32::MAX as usize {
        return Some("matrix too large for the kernel's int indices".into());
    }
    None
}

/// Launch grid for `rows` weight rows and `n_rows` activation rows.
pub fn mma_grid(rows: usize, n_rows: usize) -> (u32, u32, u32) {
    (
        rows.div_ceil(MMA_M) as u32,
        n_rows.div_ceil(MMA_N).min(65535) as u32,
        1,
    )
}

/// The two entry points, loaded with their shared-memory allowance.
pub struct MmaKernels {
    ctx: Arc<Context>,
    _module: Module,
    tbe3: Kernel,
    bf16: Kernel,
}

impl MmaKernels {
    /// Loads kernels/tbe3_mma.cu.
    pub fn load(ctx: &Arc<Context>) -> GpuResult<Self> {
        let module = load_family(ctx, "tbe3_mma")?;
        let tbe3 = module.function("tbe3_mma")?;
        let bf16 = module.function("bf16_mma")?;
        tbe3.allow_dynamic_smem(MMA_SMEM)?;
        bf16.allow_dynamic_smem(MMA_SMEM)?;
        Ok(Self {
            ctx: ctx.clone(),
            _module: module,
            tbe3,
            bf16,
        })
    }

    fn check(shape: &Shape, ldx: usize, n_rows: usize) -> GpuResult<()> {
        if let Some(why) = mma_unsupported(shape, ldx) {
            return Err(GpuError::invalid(why));
        }
        if n_rows == 0 || n_rows > 65535 * MMA_N {
            return Err(GpuError::invalid(format!("{n_rows} activation rows")));
        }
        Ok(())
    }

    /// `y[n][r] = Σ_c W[r][c] · x[n][c]` for W in tbe3 form: `x` BF16 `n_rows` rows `ldx`
    /// apart (16-byte aligned), `y` f32 `n_rows × rows`.
    ///
    /// # Safety
    /// `x` and `y` must be device memory of this context of the extents above.
    pub unsafe fn run_tbe3(
        &self,
        m: &DeviceTbe3,
        x: u64,
        ldx: usize,
        n_rows: usize,
        y: u64,
    ) -> GpuResult<()> {
        Self::check(&m.shape, ldx, n_rows)?;
        let mut args = m.plane_args().to_vec();
        args.extend([
            Arg::P(x),
            Arg::I(int(ldx, "ldx")?),
            Arg::I(int(n_rows, "n_rows")?),
            Arg::P(y),
            Arg::I(int(m.shape.rows, "rows")?),
            Arg::I(int(m.shape.cols, "cols")?),
        ]);
        // SAFETY: matches tbe3_mma's parameters; the shape checked above; extents the caller's.
        unsafe {
            self.tbe3.launch_smem(
                &self.ctx,
                mma_grid(m.shape.rows, n_rows),
                MMA_THREADS,
                MMA_SMEM as u32,
                &args,
            )
        }
    }

    /// The pass-through twin of [`MmaKernels::run_tbe3`] on raw row-major BF16 `w`.
    ///
    /// # Safety
    /// As [`MmaKernels::run_tbe3`]; `w` holds `rows × cols` BF16.
    pub unsafe fn run_bf16(
        &self,
        w: u64,
        shape: &Shape,
        x: u64,
        ldx: usize,
        n_rows: usize,
        y: u64,
    ) -> GpuResult<()> {
        Self::check(shape, ldx, n_rows)?;
        let args = [
            Arg::P(w),
            Arg::P(x),
            Arg::I(int(ldx, "ldx")?),
            Arg::I(int(n_rows, "n_rows")?),
            Arg::P(y),
            Arg::I(int(shape.rows, "rows")?),
            Arg::I(int(shape.cols, "cols")?),
        ];
        // SAFETY: matches bf16_mma's parameters; extents the caller's.
        unsafe {
            self.bf16.launch_smem(
                &self.ctx,
                mma_grid(shape.rows, n_rows),
                MMA_THREADS,
                MMA_SMEM as u32,
                &args,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_shapes_are_supported_and_odd_widths_are_not() {
        for (rows, cols) in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)] {
            let s = Shape::for_matrix(rows, cols).unwrap();
            assert_eq!(mma_unsupported(&s, cols), None, "{rows}x{cols}");
        }
        let s = Shape::for_matrix(1536, 576).unwrap();
        assert!(mma_unsupported(&s, 576).is_some());
        let s = Shape::for_matrix(64, 1024).unwrap();
        assert!(
            mma_unsupported(&s, 1028).is_some(),
            "ldx not a multiple of 8"
        );
        assert!(mma_unsupported(&s, 512).is_some(), "ldx below cols");
        // The Want::Last input: one row, ldx = n * cols.
        assert_eq!(mma_unsupported(&s, 7 * 1024), None);
    }

    #[test]
    fn grid_covers_every_row_and_fits_the_shared_memory_limit() {
        assert_eq!(mma_grid(4096, 512), (64, 8, 1));
        assert_eq!(mma_grid(4097, 1), (65, 1, 1));
        const { assert!(MMA_SMEM <= 227 * 1024) };
    }
}
