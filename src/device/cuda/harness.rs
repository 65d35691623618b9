//! Single kernels on host data, for differential tests against the CPU reference
//! (`tests/cuda.rs`): each call uploads its inputs, fills its outputs with a poison value (NaN,
//! or the BF16 NaN 0xFFFF), launches one kernel or GEMM, waits, checks for errors and downloads.
//! Slow by design; the backend never uses it.

use std::sync::Arc;

use super::driver::{Context, Cublas, DevBuf};
use super::kernels::{AttnSplit, Kernels, PagedKv, Product};
use super::kv::BLOCK_TOKENS;
use crate::device::DeviceError;
use crate::model::synth::f32_to_bf16;

/// BF16 poison: a NaN no kernel writes.
pub const POISON_BF16: u16 = 0xFFFF;

/// One context with every kernel loaded and a cuBLAS handle.
pub struct KernelHarness {
    ctx: Arc<Context>,
    k: Kernels,
    blas: Cublas,
}

type R<T> = Result<T, DeviceError>;

/// Which attention kernel [`KernelHarness::paged_attention`] runs.
#[derive(Clone, Copy)]
enum Which {
    /// A decode attention in `splits` splits: the engine's, or `attention_per_head`.
    Decode { splits: usize, per_head: bool },
    /// `attention_prefill`.
    Prefill,
}

impl KernelHarness {
    /// Opens device 0 and loads the kernels.
    pub fn new() -> R<Self> {
        if !super::kernels::built_with_kernels() {
            return Err(DeviceError::cuda("built without CUDA kernels".into()));
        }
        let ctx = Context::new(0)?;
        Ok(Self {
            k: Kernels::load(&ctx)?,
            blas: Cublas::new(&ctx)?,
            ctx,
        })
    }

    fn up<T: Copy>(&self, data: &[T]) -> R<DevBuf> {
        Ok(DevBuf::from_host(&self.ctx, data)?)
    }

    fn poison_f32(&self, len: usize) -> R<DevBuf> {
        let b = DevBuf::new(&self.ctx, 4 * len)?;
        self.k.fill_f32(b.ptr(), len, f32::NAN)?;
        Ok(b)
    }

    fn poison_u16(&self, len: usize) -> R<DevBuf> {
        let b = DevBuf::new(&self.ctx, 2 * len)?;
        self.k.fill_u16(b.ptr(), len, POISON_BF16)?;
        Ok(b)
    }

    /// Checks a kernel's f32 activation output against its BF16 rows: every hi value must be the
    /// f32 value rounded, and every lo value (when split) the rounded remainder, so the fused
    /// GEMV's input is exactly what the cuBLAS path's split rows approximate.
    fn check_act(&self, what: &str, bf16: &[u16], f: &DevBuf, n: usize, width: usize) -> R<()> {
        let vals: Vec<f32> = self.down(f, n * width)?;
        let split = bf16.len() == 2 * n * width;
        for (i, &v) in vals.iter().enumerate() {
            let hi = f32_to_bf16(v);
            let lo = split.then(|| f32_to_bf16(v - f32::from_bits((hi as u32) << 16)));
            if bf16[i] != hi || lo.is_some_and(|lo| bf16[n * width + i] != lo) {
                return Err(DeviceError::cuda(format!(
                    "{what}: the f32 output {v:e} at {i} disagrees with its BF16 rows"
                )));
            }
        }
        Ok(())
    }

    fn down<T: Copy + Default>(&self, b: &DevBuf, len: usize) -> R<Vec<T>> {
        self.ctx.sync()?;
        let mut v = vec![T::default(); len];
        b.download(&mut v)?;
        Ok(v)
    }

    /// `embed_gather_bf16`: rows `tokens` of `table` (`vocab x hidden` BF16 bits) as f32.
    pub fn embed(&self, table: &[u16], hidden: usize, tokens: &[u32]) -> R<Vec<f32>> {
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let (tb, ib) = (self.up(table)?, self.up(&ids)?);
        let out = self.poison_f32(tokens.len() * hidden)?;
        self.k
            .embed(tb.ptr(), ib.ptr(), out.ptr(), tokens.len(), hidden)?;
        self.down(&out, tokens.len() * hidden)
    }

    /// `rmsnorm_residual` over `n = x.len() / w.len()` rows: returns (x after the residual add,
    /// the BF16 output rows, `2n` of them when `out_split`).
    pub fn rmsnorm_residual(
        &self,
        x: &[f32],
        y: Option<(&[f32], bool)>,
        w: &[f32],
        eps: f32,
        out_split: bool,
    ) -> R<(Vec<f32>, Vec<u16>)> {
        let h = w.len();
        let n = x.len() / h;
        let (xb, wb) = (self.up(x)?, self.up(w)?);
        let yb = y.map(|(v, _)| self.up(v)).transpose()?;
        let rows = if out_split { 2 * n } else { n };
        let out = self.poison_u16(rows * h)?;
        let outf = self.poison_f32(n * h)?;
        let prod = yb.as_ref().map(|b| Product {
            ptr: b.ptr(),
            split: y.is_some_and(|(_, s)| s),
        });
        self.k.rmsnorm_residual(
            xb.ptr(),
            prod,
            wb.ptr(),
            out.ptr(),
            out_split,
            Some(outf.ptr()),
            n,
            h,
            eps,
        )?;
        let rows_out = self.down(&out, rows * h)?;
        self.check_act("rmsnorm_residual", &rows_out, &outf, n, h)?;
        Ok((self.down(&xb, n * h)?, rows_out))
    }

    /// `rope_qkv_store` for `n` tokens of a fused q|k|v product into a paged BF16 cache of
    /// `pool_blocks` blocks (`[block][16][kvd]` each of keys and values, poisoned with
    /// [`POISON_BF16`] first) whose block table is `table` (`slots x max_blocks` i32). Returns
    /// (q, key pool, value pool).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_qkv_store(
        &self,
        qkv: &[f32],
        split: bool,
        n: usize,
        cos: &[f32],
        sin: &[f32],
        pos: &[i32],
        slot: &[i32],
        (heads, kv_heads, head_dim): (usize, usize, usize),
        (table, max_blocks, pool_blocks): (&[i32], usize, usize),
    ) -> R<(Vec<f32>, Vec<u16>, Vec<u16>)> {
        let kvd = kv_heads * head_dim;
        let (qkvb, cb, sb) = (self.up(qkv)?, self.up(cos)?, self.up(sin)?);
        let (pb, slb, tb) = (self.up(pos)?, self.up(slot)?, self.up(table)?);
        let q = self.poison_f32(n * heads * head_dim)?;
        let cache = pool_blocks * BLOCK_TOKENS * kvd;
        let (kc, vc) = (self.poison_u16(cache)?, self.poison_u16(cache)?);
        self.k.rope_qkv_store(
            Product {
                ptr: qkvb.ptr(),
                split,
            },
            n,
            cb.ptr(),
            sb.ptr(),
            pb.ptr(),
            slb.ptr(),
            q.ptr(),
            PagedKv {
                keys: kc.ptr(),
                values: vc.ptr(),
                table: tb.ptr(),
                max_blocks,
            },
            heads,
            kv_heads,
            head_dim,
        )?;
        Ok((
            self.down(&q, n * heads * head_dim)?,
            self.down(&kc, cache)?,
            self.down(&vc, cache)?,
        ))
    }

    /// `attention` of `n` query tokens over paged BF16 key and value pools (`[block][16][kvd]`)
    /// through the block table `table` (`slots x max_blocks` i32), in `splits` splits along the
    /// sequence (1: no split, no combine); returns the BF16 output rows (`2n` when
    /// `out_split`).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: &[f32],
        pools: (&[u16], &[u16]),
        table: (&[i32], usize),
        pos: &[i32],
        slot: &[i32],
        dims: (usize, usize, usize),
        out_split: bool,
        splits: usize,
    ) -> R<Vec<u16>> {
        let which = Which::Decode {
            splits,
            per_head: false,
        };
        self.paged_attention(q, pools, table, pos, slot, dims, out_split, which)
    }

    /// [`KernelHarness::attention`] by the first decode kernel, `attention_per_head` (the
    /// benchmark's baseline).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_per_head(
        &self,
        q: &[f32],
        pools: (&[u16], &[u16]),
        table: (&[i32], usize),
        pos: &[i32],
        slot: &[i32],
        dims: (usize, usize, usize),
        out_split: bool,
        splits: usize,
    ) -> R<Vec<u16>> {
        let which = Which::Decode {
            splits,
            per_head: true,
        };
        self.paged_attention(q, pools, table, pos, slot, dims, out_split, which)
    }

    /// `attention_prefill` of `n` query tokens of one slot over paged BF16 key and value pools,
    /// as [`KernelHarness::attention`]; returns the BF16 output rows (`2n` when `out_split`).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill(
        &self,
        q: &[f32],
        pools: (&[u16], &[u16]),
        table: (&[i32], usize),
        pos: &[i32],
        slot: &[i32],
        dims: (usize, usize, usize),
        out_split: bool,
    ) -> R<Vec<u16>> {
        self.paged_attention(q, pools, table, pos, slot, dims, out_split, Which::Prefill)
    }

    /// The attention kernels over the same uploaded inputs: a decode attention in `splits`
    /// splits, or `attention_prefill`; the BF16 output checked against the f32 one.
    #[allow(clippy::too_many_arguments)]
    fn paged_attention(
        &self,
        q: &[f32],
        (k_pool, v_pool): (&[u16], &[u16]),
        (table, max_blocks): (&[i32], usize),
        pos: &[i32],
        slot: &[i32],
        (heads, kv_heads, head_dim): (usize, usize, usize),
        out_split: bool,
        which: Which,
    ) -> R<Vec<u16>> {
        let n = pos.len();
        let (qb, kb, vb) = (self.up(q)?, self.up(k_pool)?, self.up(v_pool)?);
        let (pb, sb, tb) = (self.up(pos)?, self.up(slot)?, self.up(table)?);
        let rows = if out_split { 2 * n } else { n };
        let out = self.poison_u16(rows * heads * head_dim)?;
        let outf = self.poison_f32(n * heads * head_dim)?;
        let kv = PagedKv {
            keys: kb.ptr(),
            values: vb.ptr(),
            table: tb.ptr(),
            max_blocks,
        };
        // The split partials live until the output is read back (the launch is asynchronous).
        let parts = match which {
            Which::Decode { splits, per_head } => {
                let parts = n * heads * splits;
                Some((
                    splits,
                    per_head,
                    self.poison_f32(2 * parts)?,
                    self.poison_f32(parts * head_dim)?,
                ))
            }
            Which::Prefill => None,
        };
        let (pp, sp, op, fp) = (pb.ptr(), sb.ptr(), out.ptr(), Some(outf.ptr()));
        let what = match &parts {
            Some((splits, per_head, ml, acc)) => {
                let split = AttnSplit {
                    splits: *splits,
                    part_ml: ml.ptr(),
                    part_acc: acc.ptr(),
                };
                let launch = if *per_head {
                    Kernels::attention_per_head
                } else {
                    Kernels::attention
                };
                launch(
                    &self.k,
                    qb.ptr(),
                    kv,
                    pp,
                    sp,
                    op,
                    out_split,
                    fp,
                    n,
                    heads,
                    kv_heads,
                    head_dim,
                    split,
                )?;
                if *per_head {
                    "attention_per_head"
                } else {
                    "attention"
                }
            }
            None => {
                self.k.attention_prefill(
                    qb.ptr(),
                    kv,
                    pp,
                    sp,
                    op,
                    out_split,
                    fp,
                    n,
                    heads,
                    kv_heads,
                    head_dim,
                )?;
                "attention_prefill"
            }
        };
        let rows_out = self.down(&out, rows * heads * head_dim)?;
        self.check_act(what, &rows_out, &outf, n, heads * head_dim)?;
        Ok(rows_out)
    }

    /// `silu_mul` of a fused gate|up product; returns BF16 rows (`2n` when `out_split`).
    pub fn silu_mul(
        &self,
        gu: &[f32],
        split: bool,
        n: usize,
        im: usize,
        out_split: bool,
    ) -> R<Vec<u16>> {
        let g = self.up(gu)?;
        let rows = if out_split { 2 * n } else { n };
        let out = self.poison_u16(rows * im)?;
        let outf = self.poison_f32(n * im)?;
        self.k.silu_mul(
            Product {
                ptr: g.ptr(),
                split,
            },
            n,
            im,
            out.ptr(),
            out_split,
            Some(outf.ptr()),
        )?;
        let rows_out = self.down(&out, rows * im)?;
        self.check_act("silu_mul", &rows_out, &outf, n, im)?;
        Ok(rows_out)
    }

    /// `split_sum` of a product of `n` (or `2n`) rows of `cols`.
    pub fn split_sum(&self, y: &[f32], split: bool, n: usize, cols: usize) -> R<Vec<f32>> {
        let yb = self.up(y)?;
        let out = self.poison_f32(n * cols)?;
        self.k.split_sum(
            Product {
                ptr: yb.ptr(),
                split,
            },
            n,
            cols,
            out.ptr(),
        )?;
        self.down(&out, n * cols)
    }

    /// The backend's GEMM: `Y[c][r] = Σ W[r][k] X[c][k]`, W `rows x k` and X `cols x k` BF16
    /// bits, Y f32 `cols x rows`.
    pub fn gemm_bf16(&self, w: &[u16], rows: usize, k: usize, x: &[u16]) -> R<Vec<f32>> {
        let cols = x.len() / k;
        if w.len() != rows * k || x.len() != cols * k {
            return Err(DeviceError::Invalid(
                "gemm_bf16: inconsistent extents".into(),
            ));
        }
        let (wb, xb) = (self.up(w)?, self.up(x)?);
        let out = self.poison_f32(rows * cols)?;
        // SAFETY: wb holds rows*k BF16, xb cols*k BF16 (stride k), out rows*cols f32.
        unsafe {
            self.blas
                .gemm_bf16(wb.ptr(), rows, k, xb.ptr(), k, cols, out.ptr())?
        };
        self.down(&out, rows * cols)
    }

    /// `fill_normal_bf16`: `count` N(0, sigma) BF16 values from `seed`.
    pub fn fill_normal_bf16(&self, count: usize, seed: u64, sigma: f32) -> R<Vec<u16>> {
        let out = self.poison_u16(count)?;
        self.k.fill_normal_bf16(out.ptr(), count, seed, sigma)?;
        self.down(&out, count)
    }

    /// `argmax_rows`: the greedy id of each row of `logits` (`rows x vocab` f32), to compare
    /// with `device::argmax`. The output starts as -1 (no id).
    pub fn argmax_rows(&self, logits: &[f32], vocab: usize) -> R<Vec<i32>> {
        if vocab == 0 || !logits.len().is_multiple_of(vocab) {
            return Err(DeviceError::Invalid(
                "argmax_rows: the logits are not whole rows".into(),
            ));
        }
        let rows = logits.len() / vocab;
        let lb = self.up(logits)?;
        let out = self.up(&vec![-1i32; rows])?;
        self.k.argmax_rows(lb.ptr(), rows, vocab, out.ptr())?;
        self.down(&out, rows)
    }

    /// `sample_rows`: the token of each row of `logits` (`rows x vocab` f32) chosen as
    /// `sampling[row]` says, to compare with `engine::sampler::choose`. The output starts as -1
    /// (no id).
    pub fn sample_rows(
        &self,
        logits: &[f32],
        vocab: usize,
        sampling: &[crate::device::RowSampling],
    ) -> R<Vec<i32>> {
        if vocab == 0 || logits.len() != sampling.len() * vocab {
            return Err(DeviceError::Invalid(
                "sample_rows: the logits are not one row per sampling record".into(),
            ));
        }
        let rows = sampling.len();
        let packed = super::sample::pack(sampling, vocab, usize::MAX)?;
        let lb = self.up(logits)?;
        let pb = self.up(&packed.rows)?;
        // A buffer of at least one record, so that a batch without edits has a valid pointer.
        let mut edits = packed.edits;
        if edits.is_empty() {
            edits.push(super::sample::SampleEdit { id: 0, delta: 0.0 });
        }
        let eb = self.up(&edits)?;
        let out = self.up(&vec![-1i32; rows])?;
        self.k
            .sample_rows(lb.ptr(), rows, vocab, pb.ptr(), eb.ptr(), out.ptr())?;
        self.down(&out, rows)
    }
}
