//! The kernels of `kernels/*.cu`: the embedded fatbins, the table of entry points the backend
//! loads, and one typed launcher per entry point (launch geometry and the one `unsafe` launch).
//!
//! Naming contract: every name in [`KERNELS`] is an `extern "C" __global__` function of
//! `kernels/<family>.cu`, compiled into that family's fatbin. Loading resolves every name and
//! fails naming the missing one; the test `fatbins_contain_every_kernel` checks the same on the
//! bytes without a GPU.

use std::sync::Arc;

use super::driver::{Arg, Context, GpuError, GpuResult, Kernel, Module};

#[cfg(unweight_kernels)]
mod embedded {
    include!(concat!(env!("OUT_DIR"), "/cuda_kernels.rs"));
}

/// Every (family, entry point) the backend launches.
pub const KERNELS: &[(&str, &str)] = &[
    ("embed", "embed_gather_bf16"),
    ("norm", "rmsnorm_residual"),
    ("rope", "rope_qkv_store"),
    ("attention", "attention_decode_h1"),
    ("attention", "attention_decode_h2"),
    ("attention", "attention_decode_h4"),
    ("attention", "attention_decode_h8"),
    ("attention", "attention_per_head"),
    ("attention", "attention_combine"),
    ("attention", "attention_prefill"),
    ("elementwise", "silu_mul"),
    ("elementwise", "split_sum"),
    ("elementwise", "split_f32"),
    ("elementwise", "gather_rows"),
    ("elementwise", "fill_f32"),
    ("elementwise", "fill_u16"),
    ("elementwise", "fill_normal_bf16"),
    ("argmax", "argmax_rows"),
    ("sample", "sample_rows"),
    // tbe3 runtime form (loaded by device::cuda::tbe3 for the plans' products and the gather).
    ("tbe3_gemv", "tbe3_gemv_b1"),
    ("tbe3_gemv", "tbe3_gemv_b2"),
    ("tbe3_gemv", "tbe3_gemv_b3"),
    ("tbe3_gemv", "tbe3_gemv_b4"),
    ("tbe3_gemv", "tbe3_gemv_b5"),
    ("tbe3_gemv", "tbe3_gemv_b6"),
    ("tbe3_gemv", "tbe3_gemv_b7"),
    ("tbe3_gemv", "tbe3_gemv_b8"),
    ("tbe3_gemv", "bf16_gemv_b1"),
    ("tbe3_gemv", "bf16_gemv_b2"),
    ("tbe3_gemv", "bf16_gemv_b3"),
    ("tbe3_gemv", "bf16_gemv_b4"),
    ("tbe3_gemv", "bf16_gemv_b5"),
    ("tbe3_gemv", "bf16_gemv_b6"),
    ("tbe3_gemv", "bf16_gemv_b7"),
    ("tbe3_gemv", "bf16_gemv_b8"),
    ("tbe3_gemv", "gemv_reduce"),
    ("tbe3_decode", "tbe3_decode"),
    ("tbe3_gather", "tbe3_gather_f32"),
    ("tbe3_mma", "tbe3_mma"),
    ("tbe3_mma", "bf16_mma"),
];

/// The embedded fatbins, by family (`kernels/<family>.cu`); empty when built without nvcc.
pub fn fatbins() -> &'static [(&'static str, &'static [u8])] {
    #[cfg(unweight_kernels)]
    {
        embedded::FATBINS
    }
    #[cfg(not(unweight_kernels))]
    {
        &[]
    }
}

/// Whether the build compiled the kernels (nvcc was found).
pub fn built_with_kernels() -> bool {
    cfg!(unweight_kernels)
}

/// The nvcc that compiled the kernels (its `--version` release line), if any.
pub fn nvcc_version() -> Option<&'static str> {
    option_env!("UNWEIGHT_NVCC_VERSION")
}

/// Threads per block of the 1-D kernels.
const THREADS: u32 = 256;
/// Threads of an RMSNorm block (one block per token row): wide, because at batch 1 the whole
/// norm is one block and its time is the latency of each thread's chain of loads.
const NORM_THREADS: u32 = 1024;
/// Threads of a RoPE block; each token gets [`rope_blocks`] of them.
const ROPE_THREADS: u32 = 128;

/// The arguments the attention kernels (kernels/attention.cu) share, in their order, after
/// checking the head shape they all need (`what` names the kernel in the error): `head_dim` a multiple of 32 up to [`ATTN_MAX_HEAD_DIM`], KV heads dividing heads (at
/// least one of each).
fn attention_args(
    what: &str,
    q: u64,
    kv: PagedKv,
    (pos, slot): (u64, u64),
    (out, out_split, out_f32): (u64, bool, Option<u64>),
    n: usize,
    (heads, kv_heads, head_dim): (usize, usize, usize),
) -> GpuResult<[Arg; 15]> {
    if head_dim == 0
        || !head_dim.is_multiple_of(32)
        || head_dim > ATTN_MAX_HEAD_DIM
        || heads == 0
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
    {
        return Err(GpuError::invalid(format!(
            "{what} needs head_dim a multiple of 32 up to {ATTN_MAX_HEAD_DIM} and kv heads dividing heads; got head_dim {head_dim}, {heads} / {kv_heads} heads"
        )));
    }
    Ok([
        Arg::P(q),
        Arg::P(kv.keys),
        Arg::P(kv.values),
        Arg::P(kv.table),
        Arg::I(i32_of(kv.max_blocks, "max_blocks")?),
        Arg::P(pos),
        Arg::P(slot),
        Arg::P(out),
        Arg::I(out_split as i32),
        Arg::I(i32_of(n, "n")?),
        Arg::I(i32_of(heads, "heads")?),
        Arg::I(i32_of(kv_heads, "kv_heads")?),
        Arg::I(i32_of(head_dim, "head_dim")?),
        Arg::F(1.0 / (head_dim as f32).sqrt()),
        Arg::P(out_f32.unwrap_or(0)),
    ])
}

/// Blocks per token of `rope_qkv_store`: enough that each thread handles about one rotation pair
/// (and one v value), so a batch-1 step is not one block's serial loop.
fn rope_blocks(heads: usize, kv_heads: usize, head_dim: usize) -> u32 {
    let pairs = (heads + kv_heads) * (head_dim / 2);
    let kvd = kv_heads * head_dim;
    (pairs.max(kvd).div_ceil(ROPE_THREADS as usize)).clamp(1, 65535) as u32
}
/// Threads per block of the argmax kernel (kernels/argmax.cu: one block per row, a multiple of
/// 32 up to 1024; many threads because one block reads a whole 128k-entry row).
const ARGMAX_THREADS: u32 = 1024;
/// Threads per block of the sampling kernel (kernels/sample.cu's SAMPLE_THREADS: its reductions
/// and scans assume exactly this many).
const SAMPLE_THREADS: u32 = 1024;
/// Threads per block of `attention_per_head`, `attention_combine` and `attention_prefill`
/// (kernels/attention.cu's ATTN_WARPS * 32).
const ATTN_THREADS: u32 = 256;
/// Threads per block of the decode attention `attention_decode_h*` (kernels/attention.cu's
/// DEC_THREADS).
const DECODE_THREADS: u32 = 128;
/// Largest head dimension the attention kernels take.
pub const ATTN_MAX_HEAD_DIM: usize = 256;
/// Fewest positions one split of the attention takes (kernels/attention.cu's ATTN_MIN_CHUNK).
pub const ATTN_MIN_CHUNK: usize = 64;

/// Most query heads one block of the decode or prefill attention computes (the decode kernel's
/// largest entry point, `attention_decode_h8`).
pub const MAX_HEADS_PER_BLOCK: usize = 8;

/// Query heads per block of the decode and prefill attention for a GQA group of `group` query
/// heads per KV head: the smallest of 1, 2, 4, 8 that holds the group, 8 for larger groups
/// (which then take `ceil(group / 8)` blocks per KV head). Picks the decode entry point
/// `attention_decode_h{G}`; kernels/attention.cu's `heads_per_block` is the same rule.
pub fn heads_per_block(group: usize) -> usize {
    group.max(1).next_power_of_two().min(MAX_HEADS_PER_BLOCK)
}

/// Blocks per KV-head set of the decode attention (per token and split) and of the prefill
/// attention (per query tile): `kv_heads × ceil(group / G)` with G from [`heads_per_block`]
/// (`kv_heads` when a group fits one block, as for every Llama).
pub fn blocks_per_row(heads: usize, kv_heads: usize) -> usize {
    let kvh = kv_heads.max(1);
    let group = (heads / kvh).max(1);
    kvh * group.div_ceil(heads_per_block(group))
}

/// (query, head) rows per block of the tiled prefill attention (kernels/attention.cu's
/// PF_ROWS): `PREFILL_ROWS / G` queries of G heads.
pub const PREFILL_ROWS: usize = 32;
/// Key positions per shared-memory tile of the prefill attention (PF_KTILE).
const PREFILL_KEY_TILE: usize = 32;

/// Dynamic shared memory of `attention_prefill` at `head_dim`: the block's rows' f32 queries,
/// then a tile of BF16 keys and one of values, rows padded to `head_dim + 2`.
pub fn prefill_smem(head_dim: usize) -> usize {
    PREFILL_ROWS * head_dim * 4 + 2 * PREFILL_KEY_TILE * (head_dim + 2) * 2
}

/// The positions split `z` of `splits` attends to, for a query at position `pos`: the in-kernel
/// rule of kernels/attention.cu (`split_chunk`) in Rust. Chunks are whole KV blocks of at least
/// [`ATTN_MIN_CHUNK`] positions, so short sequences leave their last splits empty; the ranges of
/// `0..splits` cover `0..=pos` exactly once, in order.
pub fn split_range(pos: usize, splits: usize, z: usize) -> std::ops::Range<usize> {
    let len = pos + 1;
    let chunk = if splits > 1 {
        let bt = super::kv::BLOCK_TOKENS;
        len.div_ceil(splits).max(ATTN_MIN_CHUNK).div_ceil(bt) * bt
    } else {
        len
    };
    let begin = (z * chunk).min(len);
    begin..(begin + chunk).min(len)
}

/// Where the attention of a pass reads the paged cache: this layer's key and value pools, the
/// block table and its entries per slot (src/device/cuda/kv.rs).
#[derive(Clone, Copy, Debug)]
pub struct PagedKv {
    /// Device address of the layer's keys, BF16 `[blocks][BLOCK_TOKENS][kv_dim]`.
    pub keys: u64,
    /// Device address of the layer's values, laid out like the keys.
    pub values: u64,
    /// Device address of the block table, i32 `[slots][max_blocks]`.
    pub table: u64,
    /// Entries per slot of the table.
    pub max_blocks: usize,
}

/// The split-along-the-sequence partials of a decode attention: `splits` ranges per (token,
/// head), merged by `attention_combine`. `splits = 1` needs no buffers (pass zeros).
#[derive(Clone, Copy, Debug)]
pub struct AttnSplit {
    /// Splits per (token, head); 1 writes the output directly.
    pub splits: usize,
    /// f32 `[n][heads][splits][2]` (max, sum).
    pub part_ml: u64,
    /// f32 `[n][heads][splits][head_dim]` (unnormalised accumulators).
    pub part_acc: u64,
}

impl AttnSplit {
    /// No split: the attention kernel writes the output.
    pub const NONE: Self = Self {
        splits: 1,
        part_ml: 0,
        part_acc: 0,
    };
}

/// Blocks for a grid-stride loop over `count` elements (capped; the loop covers the rest).
fn blocks_for(count: usize) -> u32 {
    count.div_ceil(THREADS as usize).clamp(1, 65535 * 8) as u32
}

/// `v` as a kernel's `int` parameter, or an error naming `what`.
pub(crate) fn i32_of(v: usize, what: &str) -> GpuResult<i32> {
    i32::try_from(v)
        .map_err(|_| GpuError::invalid(format!("{what} = {v} does not fit a kernel's int")))
}

/// Loads the fatbin of `kernels/<family>.cu` as a module of `ctx`.
pub(crate) fn load_family(ctx: &Arc<Context>, family: &str) -> GpuResult<Module> {
    let (_, image) = fatbins()
        .iter()
        .find(|(f, _)| *f == family)
        .ok_or_else(|| GpuError::invalid(format!("no fatbin for kernels/{family}.cu")))?;
    Module::load(ctx, image).map_err(|e| e.context(format_args!("kernels/{family}.cu")))
}

/// Every kernel, loaded.
pub struct Kernels {
    ctx: Arc<Context>,
    _modules: Vec<Module>,
    embed: Kernel,
    rmsnorm: Kernel,
    rope: Kernel,
    /// `attention_decode_h{1,2,4,8}`, in that order.
    attention_decode: [Kernel; 4],
    attention_per_head: Kernel,
    attention_combine: Kernel,
    attention_prefill: Kernel,
    silu_mul: Kernel,
    split_sum: Kernel,
    split_f32: Kernel,
    gather_rows: Kernel,
    fill_f32: Kernel,
    fill_u16: Kernel,
    fill_normal: Kernel,
    argmax: Kernel,
    sample: Kernel,
}

/// A GEMM product's rows: `split` when it holds hi rows then lo rows (see kernels/common.cuh).
#[derive(Clone, Copy, Debug)]
pub struct Product {
    /// Device address of the f32 product.
    pub ptr: u64,
    /// Whether rows `n..2n` hold the lo halves.
    pub split: bool,
}

impl Kernels {
    /// Loads the fatbins of the step's kernel families (not the tbe3 ones, which the plans'
    /// kernel sets load) and resolves their entry points.
    pub fn load(ctx: &Arc<Context>) -> GpuResult<Self> {
        if !built_with_kernels() {
            return Err(GpuError::invalid(
                "built without CUDA kernels (nvcc was not found when the crate was compiled)"
                    .into(),
            ));
        }
        // Only the families these kernels live in: the tbe3 families are loaded by the plans'
        // own kernel sets (tbe3::Tbe3Kernels), not twice.
        let mut modules: Vec<(&str, Module)> = Vec::new();
        let mut get = |name: &str| -> GpuResult<Kernel> {
            let family = KERNELS
                .iter()
                .find(|(_, n)| *n == name)
                .map(|(f, _)| *f)
                .ok_or_else(|| GpuError::invalid(format!("kernel `{name}` is not in the table")))?;
            let i = match modules.iter().position(|(f, _)| *f == family) {
                Some(i) => i,
                None => {
                    modules.push((family, load_family(ctx, family)?));
                    modules.len() - 1
                }
            };
            modules[i].1.function(name)
        };
        let k = Self {
            ctx: ctx.clone(),
            embed: get("embed_gather_bf16")?,
            rmsnorm: get("rmsnorm_residual")?,
            rope: get("rope_qkv_store")?,
            attention_decode: [
                get("attention_decode_h1")?,
                get("attention_decode_h2")?,
                get("attention_decode_h4")?,
                get("attention_decode_h8")?,
            ],
            attention_per_head: get("attention_per_head")?,
            attention_combine: get("attention_combine")?,
            attention_prefill: {
                let k = get("attention_prefill")?;
                k.allow_dynamic_smem(prefill_smem(ATTN_MAX_HEAD_DIM))?;
                k
            },
            silu_mul: get("silu_mul")?,
            split_sum: get("split_sum")?,
            split_f32: get("split_f32")?,
            gather_rows: get("gather_rows")?,
            fill_f32: get("fill_f32")?,
            fill_u16: get("fill_u16")?,
            fill_normal: get("fill_normal_bf16")?,
            argmax: get("argmax_rows")?,
            sample: get("sample_rows")?,
            _modules: Vec::new(),
        };
        Ok(Self {
            _modules: modules.into_iter().map(|(_, m)| m).collect(),
            ..k
        })
    }

    /// `x[t] = table[tokens[t]]` as f32: `table` BF16 `vocab x hidden`, `tokens` i32 `n` (each
    /// checked `< vocab` by the caller), `x` f32 `n x hidden`.
    pub fn embed(&self, table: u64, tokens: u64, x: u64, n: usize, hidden: usize) -> GpuResult<()> {
        let args = [
            Arg::P(table),
            Arg::P(tokens),
            Arg::P(x),
            Arg::I(i32_of(hidden, "hidden")?),
        ];
        // SAFETY: matches embed_gather_bf16(const u16*, const int*, float*, int); extents are the
        // caller's (documented above).
        unsafe {
            self.embed
                .launch(&self.ctx, (i32_of(n, "n")? as u32, 1, 1), THREADS, &args)
        }
    }

    /// Residual add then RMSNorm: `x += y` (when given), `out = rmsnorm(x) · w` as BF16
    /// (`out_split`: hi rows then lo rows). `x` f32 `n x h`, `y` f32 `(2)n x h`, `w` f32 `h`,
    /// `out` BF16 `(2)n x h`; `out_f32`, when given, f32 `n x h` gets the same values unrounded
    /// (the fused GEMV's input).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_residual(
        &self,
        x: u64,
        y: Option<Product>,
        w: u64,
        out: u64,
        out_split: bool,
        out_f32: Option<u64>,
        n: usize,
        h: usize,
        eps: f32,
    ) -> GpuResult<()> {
        let args = [
            Arg::P(x),
            Arg::P(y.map_or(0, |p| p.ptr)),
            Arg::I(y.is_some_and(|p| p.split) as i32),
            Arg::P(w),
            Arg::P(out),
            Arg::I(out_split as i32),
            Arg::I(i32_of(n, "n")?),
            Arg::I(i32_of(h, "hidden")?),
            Arg::F(eps),
            Arg::P(out_f32.unwrap_or(0)),
        ];
        // SAFETY: matches rmsnorm_residual's parameters; extents are the caller's.
        unsafe {
            self.rmsnorm.launch(
                &self.ctx,
                (i32_of(n, "n")? as u32, 1, 1),
                NORM_THREADS,
                &args,
            )
        }
    }

    /// RoPE of q and k from the fused QKV product, q to `q_out` (f32 `n x qd`), k and v rounded
    /// to BF16 into this layer's paged cache at (slot, pos) of each token. `cos`/`sin` f32
    /// `max_ctx x hd/2`, `pos`/`slot` i32 `n` (pos < max_ctx, slot < the table's slots, and the
    /// table's entries for every position reserved: the caller's).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_qkv_store(
        &self,
        qkv: Product,
        n: usize,
        cos: u64,
        sin: u64,
        pos: u64,
        slot: u64,
        q_out: u64,
        kv: PagedKv,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> GpuResult<()> {
        let args = [
            Arg::P(qkv.ptr),
            Arg::I(qkv.split as i32),
            Arg::I(i32_of(n, "n")?),
            Arg::P(cos),
            Arg::P(sin),
            Arg::P(pos),
            Arg::P(slot),
            Arg::P(kv.table),
            Arg::I(i32_of(kv.max_blocks, "max_blocks")?),
            Arg::P(q_out),
            Arg::P(kv.keys),
            Arg::P(kv.values),
            Arg::I(i32_of(heads, "heads")?),
            Arg::I(i32_of(kv_heads, "kv_heads")?),
            Arg::I(i32_of(head_dim, "head_dim")?),
        ];
        let grid = (
            i32_of(n, "n")? as u32,
            rope_blocks(heads, kv_heads, head_dim),
            1,
        );
        // SAFETY: matches rope_qkv_store's parameters; extents are the caller's.
        unsafe { self.rope.launch(&self.ctx, grid, ROPE_THREADS, &args) }
    }

    /// Attention of `n` query tokens (q f32 `n x heads x hd`) over positions `0..=pos[t]` of
    /// their slots in the paged cache `kv`; output BF16 (split when `out_split`) `(2)n x heads x
    /// hd`, and f32 `n x heads x hd` unrounded into `out_f32` when given. With `split.splits > 1`
    /// each (token, head) is computed in that many ranges of positions ([`split_range`]) into
    /// the partials, then merged by `attention_combine`. `head_dim` must be a multiple of 32
    /// and at most [`ATTN_MAX_HEAD_DIM`]. The decode kernel `attention_decode_h*`: one block per
    /// (token, KV head, split) computes all the query heads of its KV head
    /// ([`heads_per_block`]), so each key and value row is read once per step.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        q: u64,
        kv: PagedKv,
        pos: u64,
        slot: u64,
        out: u64,
        out_split: bool,
        out_f32: Option<u64>,
        n: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        split: AttnSplit,
    ) -> GpuResult<()> {
        let common = attention_args(
            "attention",
            q,
            kv,
            (pos, slot),
            (out, out_split, out_f32),
            n,
            (heads, kv_heads, head_dim),
        )?;
        let g = heads_per_block(heads / kv_heads);
        let kernel = &self.attention_decode[g.trailing_zeros() as usize];
        let blocks = blocks_per_row(heads, kv_heads);
        self.split_attention(
            kernel,
            (blocks, DECODE_THREADS),
            common,
            (out, out_split, out_f32),
            (n, heads, head_dim),
            split,
        )
    }

    /// [`Kernels::attention`] by the first decode kernel, `attention_per_head`: one block of 8
    /// warps per (token, query head, split), every query head re-reading its KV head's rows, 2
    /// bytes per lane per load. Same arguments, same results within f32 rounding. Only `unweight
    /// bench attention` runs it, as the baseline the decode kernel is measured against side by
    /// side (and the GPU tests, which hold it to the same reference).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_per_head(
        &self,
        q: u64,
        kv: PagedKv,
        pos: u64,
        slot: u64,
        out: u64,
        out_split: bool,
        out_f32: Option<u64>,
        n: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        split: AttnSplit,
    ) -> GpuResult<()> {
        let common = attention_args(
            "attention",
            q,
            kv,
            (pos, slot),
            (out, out_split, out_f32),
            n,
            (heads, kv_heads, head_dim),
        )?;
        self.split_attention(
            &self.attention_per_head,
            (heads, ATTN_THREADS),
            common,
            (out, out_split, out_f32),
            (n, heads, head_dim),
            split,
        )
    }

    /// Launches a decode attention kernel (`blocks` per token and split, `threads` each) with
    /// `common` ([`attention_args`]) and the split arguments, then `attention_combine` when the
    /// attention is split.
    fn split_attention(
        &self,
        kernel: &Kernel,
        (blocks, threads): (usize, u32),
        common: [Arg; 15],
        (out, out_split, out_f32): (u64, bool, Option<u64>),
        (n, heads, head_dim): (usize, usize, usize),
        split: AttnSplit,
    ) -> GpuResult<()> {
        if split.splits == 0
            || split.splits > 65535
            || (split.splits > 1 && (split.part_ml == 0 || split.part_acc == 0))
        {
            return Err(GpuError::invalid(format!(
                "attention in {} splits needs 1..=65535 splits and partial buffers beyond 1",
                split.splits
            )));
        }
        let mut args = common.to_vec();
        args.extend([
            Arg::I(i32_of(split.splits, "splits")?),
            Arg::P(split.part_ml),
            Arg::P(split.part_acc),
        ]);
        if n > 65535 {
            return Err(GpuError::invalid(format!(
                "attention of {n} tokens in one launch: the grid's y dimension holds 65535"
            )));
        }
        let grid = (
            i32_of(blocks, "attention blocks per token")? as u32,
            i32_of(n, "n")? as u32,
            split.splits as u32,
        );
        // SAFETY: `kernel` is attention_per_head or attention_decode_h*, whose parameters are
        // `common` then (splits, part_ml, part_acc); head_dim and the partials checked above;
        // extents (cache, table, partials for n x heads x splits) the caller's.
        unsafe { kernel.launch(&self.ctx, grid, threads, &args)? };
        if split.splits == 1 {
            return Ok(());
        }
        let args = [
            Arg::P(split.part_ml),
            Arg::P(split.part_acc),
            Arg::P(out),
            Arg::I(out_split as i32),
            Arg::I(i32_of(n, "n")?),
            Arg::I(i32_of(heads, "heads")?),
            Arg::I(i32_of(head_dim, "head_dim")?),
            Arg::I(i32_of(split.splits, "splits")?),
            Arg::P(out_f32.unwrap_or(0)),
        ];
        let grid = (heads as u32, n as u32, 1);
        // SAFETY: matches attention_combine's parameters; the partials hold n x heads x splits
        // records written by the launch above (stream-ordered before this one).
        unsafe {
            self.attention_combine
                .launch(&self.ctx, grid, ATTN_THREADS, &args)
        }
    }

    /// The tiled (flash-style, causal) attention of a prompt chunk: `n` query tokens (q f32 `n x
    /// heads x hd`) of ONE sequence (every `slot[t]` equal: the caller's contract) over
    /// positions `0..=pos[t]` of the paged cache `kv`, each key tile loaded once into shared
    /// memory for [`PREFILL_ROWS`] (query, head) rows: all the query heads of a KV head
    /// ([`heads_per_block`]) for `PREFILL_ROWS / G` queries; outputs as
    /// [`Kernels::attention`]'s. A query's result depends only on its position and the cache,
    /// not on the chunk it is in.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_prefill(
        &self,
        q: u64,
        kv: PagedKv,
        pos: u64,
        slot: u64,
        out: u64,
        out_split: bool,
        out_f32: Option<u64>,
        n: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> GpuResult<()> {
        if heads > 65535 {
            return Err(GpuError::invalid(format!(
                "prefill attention of {heads} heads: the grid's y dimension holds 65535"
            )));
        }
        let args = attention_args(
            "prefill attention",
            q,
            kv,
            (pos, slot),
            (out, out_split, out_f32),
            n,
            (heads, kv_heads, head_dim),
        )?;
        let queries = PREFILL_ROWS / heads_per_block(heads / kv_heads);
        let grid = (
            i32_of(n.div_ceil(queries), "query tiles")? as u32,
            blocks_per_row(heads, kv_heads) as u32,
            1,
        );
        let smem = prefill_smem(head_dim) as u32;
        // SAFETY: matches attention_prefill's parameters; head_dim checked above, so `smem` is
        // within the prefill_smem(ATTN_MAX_HEAD_DIM) allowed at load; extents (n tokens of one
        // slot, their cache positions reserved) the caller's.
        unsafe {
            self.attention_prefill
                .launch_smem(&self.ctx, grid, ATTN_THREADS, smem, &args)
        }
    }

    /// `out = silu(gate) · up` from the fused gate|up product (f32 `(2)n x 2im`) to BF16
    /// (split when `out_split`) `(2)n x im`, and f32 `n x im` into `out_f32` when given.
    pub fn silu_mul(
        &self,
        gu: Product,
        n: usize,
        im: usize,
        out: u64,
        out_split: bool,
        out_f32: Option<u64>,
    ) -> GpuResult<()> {
        let args = [
            Arg::P(gu.ptr),
            Arg::I(gu.split as i32),
            Arg::I(i32_of(n, "n")?),
            Arg::I(i32_of(im, "intermediate")?),
            Arg::P(out),
            Arg::I(out_split as i32),
            Arg::P(out_f32.unwrap_or(0)),
        ];
        // SAFETY: matches silu_mul's parameters; extents the caller's.
        unsafe {
            self.silu_mul
                .launch(&self.ctx, (blocks_for(n * im), 1, 1), THREADS, &args)
        }
    }

    /// `out (f32 n x cols) = y[t] (+ y[n + t] when split)`.
    pub fn split_sum(&self, y: Product, n: usize, cols: usize, out: u64) -> GpuResult<()> {
        let args = [
            Arg::P(y.ptr),
            Arg::I(y.split as i32),
            Arg::I(i32_of(n, "n")?),
            Arg::I(i32_of(cols, "cols")?),
            Arg::P(out),
        ];
        // SAFETY: matches split_sum's parameters; extents the caller's.
        unsafe {
            self.split_sum
                .launch(&self.ctx, (blocks_for(n * cols), 1, 1), THREADS, &args)
        }
    }

    /// `out` (BF16 `2 x count`) = `x` (f32 `count`) as split BF16: hi rows then lo rows, the bits
    /// the attention kernels write for a split output. A fused step's attention writes each
    /// part's f32 output (`out_f32`) only, since a part's lo rows lie `n` rows of the whole
    /// pass further; this makes the split rows of the whole pass from them.
    pub fn split_f32(&self, x: u64, count: usize, out: u64) -> GpuResult<()> {
        let args = [Arg::P(x), Arg::U(count as u64), Arg::P(out)];
        // SAFETY: matches split_f32(const float*, unsigned long long, u16*); `x` holds `count`
        // f32 and `out` 2 count u16 (the caller's).
        unsafe {
            self.split_f32
                .launch(&self.ctx, (blocks_for(count), 1, 1), THREADS, &args)
        }
    }

    /// Copies rows `rows[r]` (i32 `m` on the device, each < `n`) of a pass's normed activations
    /// (`xb` BF16 `(split ? 2n : n) x h`, `xf` f32 `n x h`) to rows `r` of `out_b` (BF16
    /// `(split ? 2m : m) x h`, lo rows `m` further) and `out_f` (f32 `m x h`): the lm_head's
    /// input of the rows whose logits a fused step wants.
    #[allow(clippy::too_many_arguments)]
    pub fn gather_rows(
        &self,
        xb: u64,
        xf: u64,
        split: bool,
        n: usize,
        h: usize,
        rows: u64,
        m: usize,
        out_b: u64,
        out_f: u64,
    ) -> GpuResult<()> {
        let args = [
            Arg::P(xb),
            Arg::P(xf),
            Arg::I(split as i32),
            Arg::I(i32_of(n, "n")?),
            Arg::I(i32_of(h, "hidden")?),
            Arg::P(rows),
            Arg::I(i32_of(m, "m")?),
            Arg::P(out_b),
            Arg::P(out_f),
        ];
        // SAFETY: matches gather_rows(const u16*, const float*, int, int, int, const int*, int,
        // u16*, float*); extents the caller's (documented above).
        unsafe {
            self.gather_rows
                .launch(&self.ctx, (blocks_for(m * h), 1, 1), THREADS, &args)
        }
    }

    /// Fills `count` f32 at `x` with `value` (poison before tests, norm weights of synthetic
    /// models).
    pub fn fill_f32(&self, x: u64, count: usize, value: f32) -> GpuResult<()> {
        let args = [Arg::P(x), Arg::U(count as u64), Arg::F(value)];
        // SAFETY: matches fill_f32(float*, unsigned long long, float); `x` holds `count` f32.
        unsafe {
            self.fill_f32
                .launch(&self.ctx, (blocks_for(count), 1, 1), THREADS, &args)
        }
    }

    /// Fills `count` u16 at `x` with `value`.
    pub fn fill_u16(&self, x: u64, count: usize, value: u16) -> GpuResult<()> {
        let args = [Arg::P(x), Arg::U(count as u64), Arg::I(value as i32)];
        // SAFETY: matches fill_u16(u16*, unsigned long long, unsigned int); `x` holds `count` u16.
        unsafe {
            self.fill_u16
                .launch(&self.ctx, (blocks_for(count), 1, 1), THREADS, &args)
        }
    }

    /// Fills `count` BF16 at `x` with N(0, sigma) values from `seed` (synthetic weights made on
    /// the device: an 8B model without 16 GB of host traffic).
    pub fn fill_normal_bf16(&self, x: u64, count: usize, seed: u64, sigma: f32) -> GpuResult<()> {
        let args = [Arg::P(x), Arg::U(count as u64), Arg::U(seed), Arg::F(sigma)];
        // SAFETY: matches fill_normal_bf16(u16*, unsigned long long, unsigned long long, float);
        // `x` holds `count` u16.
        unsafe {
            self.fill_normal
                .launch(&self.ctx, (blocks_for(count), 1, 1), THREADS, &args)
        }
    }

    /// `out[r]` (i32) = the argmax of row `r` of `logits` (f32 `rows x vocab`), with exactly
    /// [`crate::device::argmax`]'s semantics (lowest index among the maxima, NaN never wins, 0
    /// when nothing is above -inf): greedy tokens chosen on the device, so a greedy decode step
    /// copies `rows` ids back instead of `rows x vocab` logits.
    pub fn argmax_rows(&self, logits: u64, rows: usize, vocab: usize, out: u64) -> GpuResult<()> {
        let args = [Arg::P(logits), Arg::I(i32_of(vocab, "vocab")?), Arg::P(out)];
        let grid = (
            u32::try_from(rows).map_err(|_| GpuError::invalid(format!("{rows} rows")))?,
            1,
            1,
        );
        // SAFETY: matches argmax_rows(const float*, int, int*); `logits` holds rows x vocab f32
        // and `out` rows i32 (the caller's).
        unsafe { self.argmax.launch(&self.ctx, grid, ARGMAX_THREADS, &args) }
    }

    /// `sample_rows`: each of `rows` rows of `logits` (f32 `rows x vocab`, edited in place) gets
    /// its token chosen as its `SampleRow` at `params` says, its edits read from `edits`
    /// (`super::sample`'s records); the ids go to `out` (i32 `rows`; -1 where no token was
    /// chosen, which the caller refuses).
    pub fn sample_rows(
        &self,
        logits: u64,
        rows: usize,
        vocab: usize,
        params: u64,
        edits: u64,
        out: u64,
    ) -> GpuResult<()> {
        let args = [
            Arg::P(logits),
            Arg::I(i32_of(vocab, "vocab")?),
            Arg::P(params),
            Arg::P(edits),
            Arg::P(out),
        ];
        let grid = (
            u32::try_from(rows).map_err(|_| GpuError::invalid(format!("{rows} rows")))?,
            1,
            1,
        );
        // SAFETY: matches sample_rows(float*, int, const SampleRow*, const SampleEdit*, int*);
        // `logits` holds rows x vocab f32, `params` rows SampleRow records whose edit ranges lie
        // inside `edits`, and `out` rows i32 (the caller's).
        unsafe { self.sample.launch(&self.ctx, grid, SAMPLE_THREADS, &args) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_stride_blocks_cover_small_counts_and_cap_large_ones() {
        assert_eq!(blocks_for(0), 1);
        assert_eq!(blocks_for(1), 1);
        assert_eq!(blocks_for(256), 1);
        assert_eq!(blocks_for(257), 2);
        // Llama-3.1-8B's embedding (128256 x 4096): capped; the grid-stride loop covers the rest.
        let big = 128256 * 4096;
        let b = blocks_for(big) as usize;
        assert_eq!(b, 65535 * 8);
        assert!(b * THREADS as usize * big.div_ceil(b * THREADS as usize) >= big);
        assert!(i32_of(1 << 31, "x").is_err() && i32_of(i32::MAX as usize, "x").is_ok());
    }

    #[test]
    fn rope_blocks_give_each_thread_about_one_pair_or_value() {
        // Llama-3.1-8B: (32 + 8) heads x 64 pairs = 2560 pairs, kv_dim 1024: 20 blocks of 128.
        assert_eq!(rope_blocks(32, 8, 128), 20);
        // SmolLM2-135M: (9 + 3) x 32 = 384 pairs, kv_dim 192: 3 blocks.
        assert_eq!(rope_blocks(9, 3, 64), 3);
        // A model whose v values outnumber its pairs (no query heads) is still covered.
        let b = rope_blocks(0, 4, 64) as usize;
        assert!(b * ROPE_THREADS as usize >= 4 * 64);
        assert_eq!(rope_blocks(0, 0, 0), 1);
    }

    #[test]
    fn decode_blocks_cover_every_query_head_once() {
        // (heads, kv_heads) -> heads per block, blocks per row: Llama-3.1-8B, 70B, SmolLM2, MHA,
        // MQA with 32 heads (four blocks of 8 per KV head), a group of 12 (8 + 4).
        for (heads, kvh, g, blocks) in [
            (32usize, 8usize, 4usize, 8usize),
            (64, 8, 8, 8),
            (9, 3, 4, 3),
            (16, 16, 1, 16),
            (32, 1, 8, 4),
            (24, 2, 8, 4),
            (4, 2, 2, 2),
        ] {
            let group = heads / kvh;
            assert_eq!(heads_per_block(group), g, "{heads}/{kvh}");
            assert_eq!(blocks_per_row(heads, kvh), blocks, "{heads}/{kvh}");
            // The kernel's split of blockIdx.x: every query head exactly once, in its KV head.
            let mut seen = vec![0u32; heads];
            let chunks = group.div_ceil(g);
            for x in 0..blocks {
                let (kh, hc) = (x / chunks, x % chunks);
                let h0 = kh * group + hc * g;
                let gn = g.min(group - hc * g);
                for (h, n) in seen.iter_mut().enumerate().skip(h0).take(gn) {
                    assert_eq!(h / group, kh);
                    *n += 1;
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "{heads}/{kvh}: {seen:?}");
        }
        // The prefill grid (query tiles x blocks_per_row) covers every (query, head) once, as
        // the kernel maps blockIdx and rows, for chunks that end mid-tile.
        for (heads, kvh) in [(32usize, 8usize), (9, 3), (6, 6), (32, 1), (24, 2)] {
            let group = heads / kvh;
            let g = heads_per_block(group);
            let (qt, chunks) = (PREFILL_ROWS / g, group.div_ceil(g));
            for n in [1usize, 7, qt, qt + 1, 53] {
                let mut seen = vec![0u32; n * heads];
                for x in 0..n.div_ceil(qt) {
                    for y in 0..blocks_per_row(heads, kvh) {
                        let (kh, hc) = (y / chunks, y % chunks);
                        let (h0, gn) = (kh * group + hc * g, g.min(group - hc * g));
                        for rr in 0..PREFILL_ROWS {
                            let (t, gi) = (x * qt + rr / g, rr % g);
                            if t < n && gi < gn {
                                seen[t * heads + h0 + gi] += 1;
                            }
                        }
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "{heads}/{kvh} n {n}");
            }
        }
        assert_eq!(prefill_smem(128), 33024);
        // The entry points exist for exactly the G the host picks.
        for group in 1..=40 {
            let g = heads_per_block(group);
            let name = format!("attention_decode_h{g}");
            assert!(KERNELS.iter().any(|(_, n)| *n == name), "{name}");
        }
    }

    /// `attention_decode_h*` + `attention_combine` (kernels/attention.cu) transcribed thread by
    /// thread: the block's 128 threads as arrays, the xor butterfly as lane swaps, every address
    /// as the kernel computes it (head mapping, 16-byte chunk columns, the block table, the
    /// partial records, the output row), over a paged cache through a scrambled table, at groups
    /// 3 (G = 4, one idle head) and 16 (two blocks per KV head), head_dim 96 (idle lanes) and
    /// 128, unsplit and in 5 splits with empty ones. Checked against f64 softmax: the kernel's
    /// index arithmetic, exercised without a GPU.
    #[test]
    fn decode_kernel_transcribed_equals_the_softmax() {
        const KB: usize = 16;
        let mut r = 0x9e3779b9u64;
        let mut rand = || {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            (r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let bf = |x: f32| f32::from_bits(x.to_bits() & 0xffff_0000);
        for (hd, heads, kvh) in [(96usize, 6usize, 2usize), (128, 16, 1), (128, 8, 2)] {
            let (slots, max_blocks) = (2usize, 9usize);
            let kvd = kvh * hd;
            let nblk = slots * max_blocks;
            let table: Vec<usize> = (0..nblk).map(|i| (i * 7 + 3) % nblk).collect();
            let kc: Vec<f32> = (0..nblk * KB * kvd).map(|_| bf(rand())).collect();
            let vc: Vec<f32> = (0..nblk * KB * kvd).map(|_| bf(rand())).collect();
            let pos = [0usize, 16, 140, 63];
            let slot = [1usize, 0, 1, 0];
            let n = pos.len();
            let q: Vec<f32> = (0..n * heads * hd).map(|_| 2.0 * rand()).collect();
            let scale = 1.0 / (hd as f32).sqrt();
            let group = heads / kvh;
            let gm = heads_per_block(group);
            let hchunks = group.div_ceil(gm);
            let u_n = if gm <= 4 { 8 } else { 4 };
            let cn = hd / 8;
            let sub = cn.next_power_of_two().max(4);
            let ns = 4 * 32 / sub;
            for splits in [1usize, 5] {
                let parts = n * heads * splits;
                let (mut part_ml, mut part_acc) =
                    (vec![f32::NAN; 2 * parts], vec![f32::NAN; parts * hd]);
                let mut out = vec![f32::NAN; n * heads * hd];
                for t in 0..n {
                    for x in 0..blocks_per_row(heads, kvh) {
                        for z in 0..splits {
                            let (kh, hc) = (x / hchunks, x % hchunks);
                            let h0 = kh * group + hc * gm;
                            let gn = gm.min(group - hc * gm);
                            let range = split_range(pos[t], splits, z);
                            let (begin, end) = (range.start, range.end);
                            if begin >= end {
                                for i in 0..gn * hd {
                                    let part = (t * heads + h0 + i / hd) * splits + z;
                                    part_acc[part * hd + i % hd] = 0.0;
                                    if i % hd == 0 {
                                        part_ml[2 * part] = f32::NEG_INFINITY;
                                        part_ml[2 * part + 1] = 0.0;
                                    }
                                }
                                continue;
                            }
                            // Per thread (128): c, stream, q, m, l, acc.
                            let th: Vec<(usize, usize)> = (0..128)
                                .map(|tid| {
                                    ((tid % 32) % sub, (tid / 32) * (32 / sub) + (tid % 32) / sub)
                                })
                                .collect();
                            let mut qv = vec![[[0f32; 8]; 8]; 128];
                            let mut acc = vec![[[0f32; 8]; 8]; 128];
                            let mut m = vec![[f32::NEG_INFINITY; 8]; 128];
                            let mut l = vec![[0f32; 8]; 128];
                            for (tid, &(c, _)) in th.iter().enumerate() {
                                for g in 0..gm {
                                    if g < gn && c < cn {
                                        for i in 0..8 {
                                            qv[tid][g][i] =
                                                q[(t * heads + h0 + g) * hd + c * 8 + i];
                                        }
                                    }
                                }
                            }
                            let col = |c: usize| kh * hd + c * 8;
                            let mut base = begin;
                            while base < end {
                                for u in 0..u_n {
                                    let mut kx = vec![[0f32; 8]; 128];
                                    let mut vx = vec![[0f32; 8]; 128];
                                    for (tid, &(c, st)) in th.iter().enumerate() {
                                        let j = base + u * ns + st;
                                        if j < end && c < cn {
                                            let b = table[slot[t] * max_blocks + j / KB];
                                            let row = (b * KB + j % KB) * kvd + col(c);
                                            kx[tid].copy_from_slice(&kc[row..row + 8]);
                                            vx[tid].copy_from_slice(&vc[row..row + 8]);
                                        }
                                    }
                                    let mut s = vec![[0f32; 8]; 128];
                                    for g in 0..gm {
                                        let mut d: Vec<f32> = (0..128)
                                            .map(|tid| {
                                                (0..8).fold(0f32, |a, i| {
                                                    qv[tid][g][i].mul_add(kx[tid][i], a)
                                                })
                                            })
                                            .collect();
                                        let mut o = sub / 2;
                                        while o > 0 {
                                            d = (0..128).map(|tid| d[tid] + d[tid ^ o]).collect();
                                            o /= 2;
                                        }
                                        for tid in 0..128 {
                                            s[tid][g] = d[tid] * scale;
                                        }
                                    }
                                    for (tid, &(_, st)) in th.iter().enumerate() {
                                        if base + u * ns + st >= end {
                                            continue;
                                        }
                                        for g in 0..gm {
                                            let sg = s[tid][g];
                                            if sg > m[tid][g] {
                                                let corr = (m[tid][g] - sg).exp();
                                                l[tid][g] *= corr;
                                                for a in acc[tid][g].iter_mut() {
                                                    *a *= corr;
                                                }
                                                m[tid][g] = sg;
                                            }
                                            let pe = (sg - m[tid][g]).exp();
                                            l[tid][g] += pe;
                                            for i in 0..8 {
                                                acc[tid][g][i] =
                                                    pe.mul_add(vx[tid][i], acc[tid][g][i]);
                                            }
                                        }
                                    }
                                }
                                base += ns * u_n;
                            }
                            // Shared memory, then the merge over the streams.
                            let mut sm_m = vec![f32::NAN; 32 * gm];
                            let mut sm_l = vec![f32::NAN; 32 * gm];
                            let mut sm_acc = vec![f32::NAN; 1024 * gm];
                            for (tid, &(c, st)) in th.iter().enumerate() {
                                for g in 0..gm {
                                    if c == 0 {
                                        sm_m[st * gm + g] = m[tid][g];
                                        sm_l[st * gm + g] = l[tid][g];
                                    }
                                    if c < cn {
                                        for i in 0..8 {
                                            sm_acc[(st * gm + g) * hd + c * 8 + i] = acc[tid][g][i];
                                        }
                                    }
                                }
                            }
                            for i in 0..gn * hd {
                                let (g, d) = (i / hd, i % hd);
                                let h = h0 + g;
                                let mx = (0..ns)
                                    .fold(f32::NEG_INFINITY, |a, st| a.max(sm_m[st * gm + g]));
                                let (mut total, mut o) = (0f32, 0f32);
                                for st in 0..ns {
                                    let w = (sm_m[st * gm + g] - mx).exp();
                                    total = sm_l[st * gm + g].mul_add(w, total);
                                    o = sm_acc[(st * gm + g) * hd + d].mul_add(w, o);
                                }
                                if splits > 1 {
                                    let part = (t * heads + h) * splits + z;
                                    part_acc[part * hd + d] = o;
                                    if d == 0 {
                                        part_ml[2 * part] = mx;
                                        part_ml[2 * part + 1] = total;
                                    }
                                } else {
                                    out[(t * heads + h) * hd + d] = o / total;
                                }
                            }
                        }
                    }
                }
                if splits > 1 {
                    // attention_combine.
                    for t in 0..n {
                        for h in 0..heads {
                            let first = (t * heads + h) * splits;
                            let mx = (0..splits)
                                .fold(f32::NEG_INFINITY, |a, z| a.max(part_ml[2 * (first + z)]));
                            let mut total = 0f32;
                            for z in 0..splits {
                                total += part_ml[2 * (first + z) + 1]
                                    * (part_ml[2 * (first + z)] - mx).exp();
                            }
                            for d in 0..hd {
                                let mut o = 0f32;
                                for z in 0..splits {
                                    o += part_acc[(first + z) * hd + d]
                                        * (part_ml[2 * (first + z)] - mx).exp();
                                }
                                out[(t * heads + h) * hd + d] = o / total;
                            }
                        }
                    }
                }
                for t in 0..n {
                    for h in 0..heads {
                        let g = h / group;
                        let at = |j: usize, d: usize| {
                            (table[slot[t] * max_blocks + j / KB] * KB + j % KB) * kvd + g * hd + d
                        };
                        let qa = &q[(t * heads + h) * hd..][..hd];
                        let sc: Vec<f64> = (0..=pos[t])
                            .map(|j| {
                                (0..hd)
                                    .map(|d| qa[d] as f64 * kc[at(j, d)] as f64)
                                    .sum::<f64>()
                                    * scale as f64
                            })
                            .collect();
                        let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let zs: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                        for d in 0..hd {
                            let want: f64 = (0..=pos[t])
                                .map(|j| (sc[j] - mx).exp() / zs * vc[at(j, d)] as f64)
                                .sum();
                            let got = out[(t * heads + h) * hd + d] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * want.abs().max(1e-2),
                                "hd {hd} heads {heads}/{kvh} splits {splits} t {t} h {h} d {d}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// `attention_prefill` (kernels/attention.cu) transcribed warp by warp and lane by lane:
    /// the block's (query, head) rows, the queries in "shared memory", the key/value tiles, every
    /// address as the kernel computes it, over a scrambled paged cache, at groups 1, 3 (G = 4,
    /// one idle head), 4 and 16 (two blocks per KV head), head_dim 64 and 96. Checked against
    /// f64 softmax, and a chunk's rows split into chunks of 7 give the same bits.
    #[test]
    #[allow(clippy::needless_range_loop)] // indices as the kernel's threads and lanes use them
    fn prefill_kernel_transcribed_equals_the_softmax() {
        const KB: usize = 16;
        const KT: usize = 32;
        let mut r = 0x2545f491u64;
        let mut rand = || {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            (r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let bf = |x: f32| f32::from_bits(x.to_bits() & 0xffff_0000);
        let warp_sum = |v: &[f32]| {
            let mut v = v.to_vec();
            let mut o = 16;
            while o > 0 {
                v = (0..32).map(|l| v[l] + v[l ^ o]).collect();
                o /= 2;
            }
            v[0]
        };
        #[allow(clippy::too_many_arguments)]
        fn run(
            q: &[f32],
            (kc, vc): (&[f32], &[f32]),
            (table, max_blocks): (&[usize], usize),
            pos: &[usize],
            slot: &[usize],
            (heads, kvh, hd): (usize, usize, usize),
            warp_sum: &dyn Fn(&[f32]) -> f32,
        ) -> Vec<f32> {
            let n = pos.len();
            let e_n = hd / 32;
            let kvd = kvh * hd;
            let scale = 1.0 / (hd as f32).sqrt();
            let group = heads / kvh;
            let g_n = heads_per_block(group);
            let qt = PREFILL_ROWS / g_n;
            let hchunks = group.div_ceil(g_n);
            let mut out = vec![f32::NAN; n * heads * hd];
            for x in 0..n.div_ceil(qt) {
                for y in 0..blocks_per_row(heads, kvh) {
                    let (kh, hc) = (y / hchunks, y % hchunks);
                    let h0 = kh * group + hc * g_n;
                    let gn = g_n.min(group - hc * g_n);
                    let t0 = x * qt;
                    let sl = slot[t0];
                    let last = (t0..(t0 + qt).min(n)).map(|t| pos[t]).max().unwrap();
                    let sq: Vec<f32> = (0..PREFILL_ROWS * hd)
                        .map(|i| {
                            let (rr, e) = (i / hd, i % hd);
                            let (t, g) = (t0 + rr / g_n, rr % g_n);
                            if t < n && g < gn {
                                q[(t * heads + h0 + g) * hd + e]
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    for w in 0..8 {
                        let rows: Vec<(usize, usize, Option<usize>)> = (0..4)
                            .map(|rw| {
                                let rr = w * 4 + rw;
                                let (t, g) = (t0 + rr / g_n, rr % g_n);
                                (rr, t, (t < n && g < gn).then(|| pos[t]))
                            })
                            .collect();
                        let wlast = rows.iter().filter_map(|r| r.2).max();
                        let mut m = [f32::NEG_INFINITY; 4];
                        let mut l = [0f32; 4];
                        let mut pe = [[0f32; 32]; 4];
                        let mut acc = vec![[[0f32; 8]; 32]; 4];
                        let mut k0 = 0;
                        while k0 <= last {
                            let tile = |pool: &[f32], j: usize, e: usize| {
                                let p = k0 + j;
                                if p > last {
                                    return 0.0;
                                }
                                let b = table[sl * max_blocks + p / KB];
                                pool[(b * KB + p % KB) * kvd + kh * hd + e]
                            };
                            let Some(wl) = wlast.filter(|&wl| k0 <= wl) else {
                                k0 += KT;
                                continue;
                            };
                            let mut dot = [[0f32; 32]; 4];
                            for lane in 0..32 {
                                for c4 in 0..hd / 4 {
                                    let kv: Vec<f32> =
                                        (0..4).map(|i| tile(kc, lane, 4 * c4 + i)).collect();
                                    for (rw, row) in rows.iter().enumerate() {
                                        let qq = &sq[row.0 * hd + 4 * c4..][..4];
                                        for i in 0..4 {
                                            dot[rw][lane] = qq[i].mul_add(kv[i], dot[rw][lane]);
                                        }
                                    }
                                }
                            }
                            for (rw, row) in rows.iter().enumerate() {
                                let Some(pr) = row.2.filter(|&pr| k0 <= pr) else {
                                    continue;
                                };
                                let s: Vec<f32> = (0..32)
                                    .map(|lane| {
                                        if k0 + lane <= pr {
                                            dot[rw][lane] * scale
                                        } else {
                                            f32::NEG_INFINITY
                                        }
                                    })
                                    .collect();
                                let mn =
                                    m[rw].max(s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)));
                                for lane in 0..32 {
                                    pe[rw][lane] = (s[lane] - mn).exp();
                                }
                                let corr = (m[rw] - mn).exp();
                                l[rw] = l[rw] * corr + warp_sum(&pe[rw]);
                                for a in acc[rw].iter_mut().flatten() {
                                    *a *= corr;
                                }
                                m[rw] = mn;
                            }
                            for j in 0..KT {
                                if k0 + j > wl {
                                    break;
                                }
                                for lane in 0..32 {
                                    for e in 0..e_n {
                                        let v = tile(vc, j, lane + 32 * e);
                                        for (rw, row) in rows.iter().enumerate() {
                                            if row.2.is_some_and(|pr| k0 + j <= pr) {
                                                acc[rw][lane][e] =
                                                    pe[rw][j].mul_add(v, acc[rw][lane][e]);
                                            }
                                        }
                                    }
                                }
                            }
                            k0 += KT;
                        }
                        for (rw, row) in rows.iter().enumerate() {
                            if row.2.is_none() {
                                continue;
                            }
                            let (t, h) = (row.1, h0 + row.0 % g_n);
                            for lane in 0..32 {
                                for e in 0..e_n {
                                    out[(t * heads + h) * hd + lane + 32 * e] =
                                        acc[rw][lane][e] / l[rw];
                                }
                            }
                        }
                    }
                }
            }
            out
        }
        for (hd, heads, kvh) in [
            (64usize, 4usize, 4usize),
            (96, 6, 2),
            (64, 8, 2),
            (64, 16, 1),
        ] {
            let (slots, max_blocks) = (2usize, 7usize);
            let kvd = kvh * hd;
            let nblk = slots * max_blocks;
            let table: Vec<usize> = (0..nblk).map(|i| (i * 5 + 3) % nblk).collect();
            let kc: Vec<f32> = (0..nblk * KB * kvd).map(|_| bf(rand())).collect();
            let vc: Vec<f32> = (0..nblk * KB * kvd).map(|_| bf(rand())).collect();
            // 45 queries at positions 30..75 of slot 1: partial query and key tiles.
            let (p0, n) = (30usize, 45usize);
            let pos: Vec<usize> = (p0..p0 + n).collect();
            let slot = vec![1usize; n];
            let q: Vec<f32> = (0..n * heads * hd).map(|_| 2.0 * rand()).collect();
            let dims = (heads, kvh, hd);
            let out = run(
                &q,
                (&kc, &vc),
                (&table, max_blocks),
                &pos,
                &slot,
                dims,
                &warp_sum,
            );
            let group = heads / kvh;
            for t in 0..n {
                for h in 0..heads {
                    let at = |j: usize, d: usize| {
                        (table[max_blocks + j / KB] * KB + j % KB) * kvd + (h / group) * hd + d
                    };
                    let qa = &q[(t * heads + h) * hd..][..hd];
                    let sc: Vec<f64> = (0..=pos[t])
                        .map(|j| {
                            (0..hd)
                                .map(|d| qa[d] as f64 * kc[at(j, d)] as f64)
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let zs: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                    for d in 0..hd {
                        let want: f64 = (0..=pos[t])
                            .map(|j| (sc[j] - mx).exp() / zs * vc[at(j, d)] as f64)
                            .sum();
                        let got = out[(t * heads + h) * hd + d] as f64;
                        // f32 rounding (as prefill_tiles_model_equals_the_softmax's bound).
                        assert!(
                            (got - want).abs() <= 1e-5 * want.abs().max(0.1),
                            "hd {hd} heads {heads}/{kvh} t {t} h {h} d {d}: {got} vs {want}"
                        );
                    }
                }
            }
            let w = heads * hd;
            for c0 in (0..n).step_by(7) {
                let c1 = (c0 + 7).min(n);
                let part = run(
                    &q[c0 * w..c1 * w],
                    (&kc, &vc),
                    (&table, max_blocks),
                    &pos[c0..c1],
                    &slot[c0..c1],
                    dims,
                    &warp_sum,
                );
                for (i, (a, b)) in part.iter().zip(&out[c0 * w..c1 * w]).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "hd {hd} heads {heads}/{kvh} chunk {c0} at {i}"
                    );
                }
            }
        }
    }

    /// A sequential model of `attention_prefill` (kernels/attention.cu) for one query: key tiles
    /// of 32 from position 0, the tiles past the query's position skipped, lane j's score a
    /// sequential dot product (-inf past the position), the tile's max and sum, then p_j v_j
    /// key by key. It must give softmax(q K^T / sqrt(d)) V within f32 rounding at every
    /// position, partial first and last tiles included.
    #[test]
    fn prefill_tiles_model_equals_the_softmax() {
        const KT: usize = 32;
        let (d, n) = (64usize, 150usize);
        let mut r = 0x9e3779b97f4a7c15u64;
        let mut rand = || {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            (r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let q: Vec<f32> = (0..d).map(|_| 2.0 * rand()).collect();
        let k: Vec<f32> = (0..n * d).map(|_| rand()).collect();
        let v: Vec<f32> = (0..n * d).map(|_| rand()).collect();
        let scale = 1.0 / (d as f32).sqrt();
        for pos in [0usize, 1, 31, 32, 33, 63, 64, 100, 149] {
            let (mut m, mut l, mut acc) = (f32::NEG_INFINITY, 0f32, vec![0f32; d]);
            let mut k0 = 0;
            while k0 <= pos {
                let s: Vec<f32> = (0..KT)
                    .map(|j| {
                        if k0 + j > pos {
                            return f32::NEG_INFINITY;
                        }
                        (0..d).map(|e| q[e] * k[(k0 + j) * d + e]).sum::<f32>() * scale
                    })
                    .collect();
                let mn = m.max(s.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)));
                assert!(mn.is_finite(), "key k0 is visible");
                let p: Vec<f32> = s.iter().map(|&x| (x - mn).exp()).collect();
                let corr = (m - mn).exp();
                l = l * corr + p.iter().sum::<f32>();
                for a in acc.iter_mut() {
                    *a *= corr;
                }
                for j in 0..KT.min(pos + 1 - k0) {
                    for e in 0..d {
                        acc[e] += p[j] * v[(k0 + j) * d + e];
                    }
                }
                m = mn;
                k0 += KT;
            }
            let sc: Vec<f64> = (0..=pos)
                .map(|j| {
                    (0..d)
                        .map(|e| q[e] as f64 * k[j * d + e] as f64)
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
            for e in 0..d {
                let want: f64 = (0..=pos)
                    .map(|j| (sc[j] - mx).exp() / z * v[j * d + e] as f64)
                    .sum();
                let got = (acc[e] / l) as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(0.1),
                    "pos {pos} e {e}: {got} vs {want}"
                );
            }
        }
    }

    /// Every entry point the Rust side loads is in its family's fatbin, as PTX (`.entry name(`)
    /// and as sm_90a machine code (an ELF `.text.name` section). Needs no GPU.
    #[test]
    fn fatbins_contain_every_kernel() {
        if !built_with_kernels() {
            println!("*** skipped: built without CUDA kernels (no nvcc at build time) ***");
            assert!(fatbins().is_empty());
            return;
        }
        let find =
            |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
        for (family, entry) in KERNELS {
            let (_, image) = fatbins()
                .iter()
                .find(|(f, _)| f == family)
                .unwrap_or_else(|| panic!("no fatbin for kernels/{family}.cu"));
            assert!(
                find(image, &format!(".entry {entry}(")),
                "{entry}: no PTX entry in {family}"
            );
            assert!(
                find(image, &format!(".text.{entry}\0")),
                "{entry}: no sm_90a code in {family}"
            );
            assert!(
                find(image, ".target sm_90a"),
                "{family}: PTX is not for sm_90a"
            );
        }
        // And no family is left unused.
        for (family, _) in fatbins() {
            assert!(
                KERNELS.iter().any(|(f, _)| f == family),
                "kernels/{family}.cu is never loaded"
            );
        }
    }
}
