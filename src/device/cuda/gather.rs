//! The embedding gather from a tbe3 table (kernels/tbe3_gather.cu): the compressed twin of
//! `embed_gather_bf16`, so the embedding table (6.5% of Llama-3.1-8B) is stored compressed too
//! and x is bit-identical to the raw gather's.

use std::sync::Arc;

use super::driver::{Arg, Context, GpuError, GpuResult, Kernel, Module};
use super::kernels::load_family;
use super::tbe3::{DeviceTbe3, STEP, THREADS};
use crate::codec::runtime::Shape;

/// Why rows of `shape` cannot be gathered from its tbe3 form, if not: each row must be a whole
/// number of spans (max(tile, 512) weights), so a row starts where the escape ranks restart.
pub fn gather_unsupported(shape: &Shape) -> Option<String> {
    let span = shape.tile_elems.max(STEP);
    if shape.cols == 0 || !shape.cols.is_multiple_of(span) {
        return Some(format!(
            "the tbe3 gather needs rows ({} weights) a multiple of {span}",
            shape.cols
        ));
    }
    if shape.cols > i32::MAX as usize {
        return Some("rows too long for the kernel's int".into());
    }
    None
}

/// The gather kernel.
pub struct GatherKernel {
    ctx: Arc<Context>,
    _module: Module,
    k: Kernel,
}

impl GatherKernel {
    /// Loads kernels/tbe3_gather.cu.
    pub fn load(ctx: &Arc<Context>) -> GpuResult<Self> {
        let module = load_family(ctx, "tbe3_gather")?;
        let k = module.function("tbe3_gather_f32")?;
        Ok(Self {
            ctx: ctx.clone(),
            _module: module,
            k,
        })
    }

    /// `x[t] = table[tokens[t]]` as f32: `tokens` i32 `n` (each checked `< rows` by the caller),
    /// `x` f32 `n × cols`, 16-byte aligned.
    ///
    /// # Safety
    /// `tokens` and `x` must be device memory of this context of the extents above.
    pub unsafe fn run(&self, table: &DeviceTbe3, tokens: u64, x: u64, n: usize) -> GpuResult<()> {
        if let Some(why) = gather_unsupported(&table.shape) {
            return Err(GpuError::invalid(why));
        }
        if !x.is_multiple_of(16) {
            return Err(GpuError::invalid(
                "gather output must be 16-byte aligned".into(),
            ));
        }
        let n = u32::try_from(n)
            .ok()
            .filter(|&n| n <= i32::MAX as u32)
            .ok_or_else(|| GpuError::invalid(format!("{n} tokens in one gather")))?;
        let mut args = table.plane_args().to_vec();
        args.extend([Arg::P(tokens), Arg::I(table.shape.cols as i32), Arg::P(x)]);
        // SAFETY: matches tbe3_gather_f32's parameters; the row length checked above; extents
        // the caller's.
        unsafe { self.k.launch(&self.ctx, (n, 1, 1), THREADS, &args) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_must_be_whole_spans() {
        assert_eq!(
            gather_unsupported(&Shape::for_matrix(128256, 4096).unwrap()),
            None
        );
        assert_eq!(
            gather_unsupported(&Shape::for_matrix(10, 512).unwrap()),
            None
        );
        // SmolLM2's 576-wide rows: tile 2048 does not divide them.
        assert!(gather_unsupported(&Shape::for_matrix(49152, 576).unwrap()).is_some());
        // 384 = 3 × 128: tile 128, but a step is 512 weights.
        assert!(gather_unsupported(&Shape::for_matrix(10, 384).unwrap()).is_some());
    }
}
