//! Matrix products `y = x · Wᵀ` over the two weight forms, parallel over output rows, or over
//! tokens for a prompt's product.
//!
//! Plain BF16 weights are read in place. A prompt's product (at least [`TOKEN_SPLIT_MIN`]
//! tokens) gives each task a range of tokens and all the rows, so each writes its own rows of the
//! output in place; fewer tokens (decode) split the rows, computed by row and transposed into
//! the output.
//!
//! Compressed weights are decoded chunk by chunk inside the product. A prompt decodes a group of
//! chunks (one per thread, in parallel) into a scratch buffer and runs the same token-split
//! product over the rows lying whole in it, so each chunk is decoded once per product and its
//! rows are reused by every token from cache; the piece of a row cut by the group's end stays at
//! the front of the buffer for the next group. The scratch of a running product is one group of
//! chunks plus one row: one chunk per thread, at least [`MIN_SCRATCH_BYTES`] (at the default chunk
//! of 2^20 elements, 4 MiB on 2 threads, 32 MiB on 16; two buffers are kept for the next
//! products), never more than the decoded matrix (a matrix of one chunk is decoded whole, as it
//! is in decode steps). A decode step instead gives each worker a
//! range of chunks, decoded one at a time into a small rolling buffer, and runs the row kernel on
//! every row that lies whole in its range; the (at most two) rows cut by its range boundaries are
//! returned as fragments, joined afterwards and run through the same kernel. Every row's dot
//! product therefore sees one contiguous BF16 row, exactly as with decoded weights, and the
//! results are bit-identical (see [`super::kernel`]).

use rayon::prelude::*;

use super::kernel::KernelKind;
use crate::device::DeviceError;
use crate::model::weights::{CompressedMatrix, Matrix, MatrixData, WeightError};

/// Work items per thread: enough to balance uneven progress, few enough that each decodes many
/// chunks in a row.
const TASKS_PER_THREAD: usize = 4;

/// Weight bytes of the smallest task over plain BF16 rows.
const MIN_TASK_BYTES: usize = 1 << 16;

/// Weight bytes of one block of rows, kept in L2 while every token group passes over it.
const ROW_BLOCK_BYTES: usize = 256 << 10;

/// Rows and token vectors of the register block of [`KernelKind::dot_block`]: 2 × 4 products
/// keep 16 accumulators, and each pass loads 2 weight and 4 activation vectors for 16 FMAs.
const BLOCK_ROWS: usize = 2;
const BLOCK_TOKENS: usize = 4;

/// Prompts of at least this many tokens are split between threads by tokens rather than by
/// weight rows: every task then writes whole rows of the `n × rows` output in place (no
/// transposition), at the price of every task streaming all the weights, which a prompt's
/// arithmetic per weight hides. Decode steps (few tokens) are bound by reading the weights once
/// and keep the split by rows.
const TOKEN_SPLIT_MIN: usize = 64;

/// Decoded bytes a prompt's product over compressed weights decodes at least per group of
/// chunks (see [`on_the_fly_by_tokens`]): each group ends in one parallel product over the
/// prompt's tokens, so tiny groups would pay more for starting tasks than they compute.
const MIN_SCRATCH_BYTES: usize = 4 << 20;

/// Tokens of the smallest task of the split by tokens.
const MIN_TASK_TOKENS: usize = 16;

/// Where [`product_rows`] puts the product of row `r` and token `t`:
/// `out[r * row_stride + t * token_stride]`.
#[derive(Clone, Copy, Debug)]
struct Layout {
    row_stride: usize,
    token_stride: usize,
}

impl Layout {
    /// `rows × n`, one weight row's products together.
    fn by_row(n: usize) -> Self {
        Layout {
            row_stride: n,
            token_stride: 1,
        }
    }

    /// `n × rows`, the matrix product's own layout.
    fn by_token(rows: usize) -> Self {
        Layout {
            row_stride: 1,
            token_stride: rows,
        }
    }
}

/// The products of consecutive BF16 rows of `cols` elements with `n` token vectors `x`, stored
/// by `layout`, blocked for the caches and registers: blocks of rows (L2), within them groups
/// of [`BLOCK_TOKENS`] tokens (L1; the last group of a prompt holds the remaining one to three),
/// within them pairs of rows over the group ([`KernelKind::dot_block`]). Every product keeps
/// the kernel's fixed arithmetic, so the bits depend neither on the blocking nor on the layout.
fn product_rows(
    kind: KernelKind,
    rows: &[u8],
    cols: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    layout: Layout,
) {
    let row_bytes = 2 * cols;
    let nrows = rows.len() / row_bytes;
    debug_assert!(x.len() >= n * cols);
    let block = (ROW_BLOCK_BYTES / row_bytes).max(BLOCK_ROWS);
    let xt = |t: usize| &x[t * cols..(t + 1) * cols];
    for b0 in (0..nrows).step_by(block) {
        let rows = &rows[b0 * row_bytes..(b0 + block).min(nrows) * row_bytes];
        let mut t0 = 0;
        while t0 < n {
            let pass = Pass {
                kind,
                rows,
                cols,
                first_row: b0,
                first_token: t0,
                layout,
            };
            // The last one to three tokens (all of a small decode step's) take the rows one by
            // one: with so few tokens a pass is bound by reading the rows, and a single row
            // keeps its loads in one stream.
            match n - t0 {
                1 => pass.run::<1, 1>([xt(t0)], out),
                2 => pass.run::<1, 2>(std::array::from_fn(|g| xt(t0 + g)), out),
                3 => pass.run::<1, 3>(std::array::from_fn(|g| xt(t0 + g)), out),
                _ => pass.run::<BLOCK_ROWS, BLOCK_TOKENS>(std::array::from_fn(|g| xt(t0 + g)), out),
            }
            t0 += (n - t0).min(BLOCK_TOKENS);
        }
    }
}

/// One pass of a group of token vectors over a block of rows (see [`product_rows`]).
struct Pass<'a> {
    kind: KernelKind,
    /// The block's rows, BF16.
    rows: &'a [u8],
    cols: usize,
    /// Index of the block's first row among the rows of [`product_rows`].
    first_row: usize,
    /// Index of the group's first token.
    first_token: usize,
    layout: Layout,
}

impl Pass<'_> {
    /// `R` rows at a time (the rest one by one) over the `G` token vectors `xs`.
    fn run<const R: usize, const G: usize>(&self, xs: [&[f32]; G], out: &mut [f32]) {
        let row_bytes = 2 * self.cols;
        let nrows = self.rows.len() / row_bytes;
        let row = |r: usize| &self.rows[r * row_bytes..(r + 1) * row_bytes];
        let Layout {
            row_stride,
            token_stride,
        } = self.layout;
        let mut store = |r: usize, o: &[f32; G]| {
            let at = (self.first_row + r) * row_stride + self.first_token * token_stride;
            for (g, &v) in o.iter().enumerate() {
                out[at + g * token_stride] = v;
            }
        };
        let mut r = 0;
        while r + R <= nrows {
            let ws: [&[u8]; R] = std::array::from_fn(|i| row(r + i));
            for (i, o) in self.kind.dot_block(ws, xs, self.cols).iter().enumerate() {
                store(r + i, o);
            }
            r += R;
        }
        for r in r..nrows {
            store(r, &self.kind.dot_block([row(r)], xs, self.cols)[0]);
        }
    }
}

/// `out_i = x · W_iᵀ` for several matrices over the same input (q, k and v; gate and up). Over
/// compressed weights the products run side by side, so that the chunks of different matrices
/// decode on different threads (decoding one chunk is sequential: a matrix of one chunk would
/// otherwise leave every other thread idle while it decodes); each product's bits are those of
/// [`matmul`] alone. Over decoded weights they run one after the other.
pub fn matmuls(
    kind: KernelKind,
    products: Vec<(&Matrix, &mut [f32])>,
    x: &[f32],
    n: usize,
) -> Result<(), DeviceError> {
    if products
        .iter()
        .all(|(w, _)| matches!(w.data, MatrixData::Compressed(_)))
    {
        products
            .into_par_iter()
            .try_for_each(|(w, out)| matmul(kind, w, x, n, out))
    } else {
        products
            .into_iter()
            .try_for_each(|(w, out)| matmul(kind, w, x, n, out))
    }
}

/// `out (n × rows) = x (n × cols) · Wᵀ`.
pub fn matmul(
    kind: KernelKind,
    w: &Matrix,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<(), DeviceError> {
    assert_eq!(x.len(), n * w.cols, "{}: input is not n × cols", w.name);
    assert_eq!(out.len(), n * w.rows, "{}: output is not n × rows", w.name);
    if w.rows == 0 || w.cols == 0 || n == 0 {
        // Empty sums (and no rows to split into tasks or chunks of rows).
        out.fill(0.0);
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    match &w.data {
        MatrixData::Bf16(bytes) if n >= TOKEN_SPLIT_MIN => {
            by_tokens(kind, bytes, w.cols, 0, x, n, out);
            Ok(())
        }
        MatrixData::Bf16(bytes) => {
            // Products are computed by weight row (`yt`, rows × n), then transposed.
            let mut yt = vec![0f32; w.rows * n];
            let row_bytes = 2 * w.cols;
            // Tasks of at least MIN_TASK_BYTES of weights: below that, scheduling costs more
            // than it spreads.
            let rows_per_task = w
                .rows
                .div_ceil(threads * TASKS_PER_THREAD)
                .max(MIN_TASK_BYTES / row_bytes)
                .max(1);
            yt.par_chunks_mut(rows_per_task * n)
                .enumerate()
                .for_each(|(i, ys)| {
                    let r0 = i * rows_per_task;
                    let r1 = r0 + ys.len() / n;
                    let rows = &bytes[r0 * row_bytes..r1 * row_bytes];
                    product_rows(kind, rows, w.cols, x, n, ys, Layout::by_row(n));
                });
            transpose(&yt, w.rows, n, out);
            Ok(())
        }
        MatrixData::Compressed(m) if n >= TOKEN_SPLIT_MIN => {
            on_the_fly_by_tokens(kind, w, m, x, n, out)
        }
        MatrixData::Compressed(m) => {
            let mut yt = vec![0f32; w.rows * n];
            on_the_fly(kind, w, m, x, n, &mut yt)?;
            transpose(&yt, w.rows, n, out);
            Ok(())
        }
    }
}

/// The products of the consecutive weight rows `first_row..` held in `rows` (BF16, `cols`
/// elements each) with all `n` tokens of `x`, written into their columns of `out` (`n × R`, `R`
/// = `out.len() / n`): tasks of whole register groups of tokens in parallel, each writing its
/// own rows of `out` in place.
fn by_tokens(
    kind: KernelKind,
    rows: &[u8],
    cols: usize,
    first_row: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) {
    let all_rows = out.len() / n;
    debug_assert!(first_row + rows.len() / (2 * cols) <= all_rows);
    let per_task = n
        .div_ceil(rayon::current_num_threads() * TASKS_PER_THREAD)
        .max(MIN_TASK_TOKENS)
        .next_multiple_of(BLOCK_TOKENS);
    out.par_chunks_mut(per_task * all_rows)
        .enumerate()
        .for_each(|(i, o)| {
            let (t0, nt) = (i * per_task, o.len() / all_rows);
            let xs = &x[t0 * cols..(t0 + nt) * cols];
            // Row `first_row + r` of token `t` is at `o[first_row + r + t * all_rows]`.
            let o = &mut o[first_row..];
            product_rows(kind, rows, cols, xs, nt, o, Layout::by_token(all_rows));
        });
}

/// `out (n × rows) = ytᵀ`, in tiles of 16 × 16 so that both sides stay in cache lines (a
/// column-by-column transpose of a prompt's product misses the cache on every store), parallel
/// over tiles of tokens when there are several.
fn transpose(yt: &[f32], rows: usize, n: usize, out: &mut [f32]) {
    const T: usize = 16;
    let tile = |t0: usize, out: &mut [f32]| {
        let t1 = (t0 + T).min(n);
        for r0 in (0..rows).step_by(T) {
            let r1 = (r0 + T).min(rows);
            for r in r0..r1 {
                let src = &yt[r * n + t0..r * n + t1];
                for (t, &v) in src.iter().enumerate() {
                    out[t * rows + r] = v;
                }
            }
        }
    };
    if n > T {
        out.par_chunks_mut(T * rows)
            .enumerate()
            .for_each(|(i, o)| tile(i * T, o));
    } else {
        tile(0, out);
    }
}

/// A piece of a row cut by a task's chunk range: row, first element within the row, BF16 bytes.
type Fragment = (usize, usize, Vec<u8>);

/// What one task of [`on_the_fly`] produced.
struct TaskOut {
    /// First row computed whole.
    first_row: usize,
    /// Products of the whole rows, `rows × n`.
    yt: Vec<f32>,
    /// Pieces of rows that cross the task's boundaries, in element order.
    fragments: Vec<Fragment>,
}

fn on_the_fly(
    kind: KernelKind,
    w: &Matrix,
    m: &CompressedMatrix,
    x: &[f32],
    n: usize,
    yt: &mut [f32],
) -> Result<(), DeviceError> {
    let chunks = m.chunks();
    let tasks = (rayon::current_num_threads() * TASKS_PER_THREAD).clamp(1, chunks.max(1));
    let outs: Vec<TaskOut> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            run_task(
                kind,
                w,
                m,
                x,
                n,
                t * chunks / tasks,
                (t + 1) * chunks / tasks,
            )
        })
        .collect::<Result<_, _>>()?;
    let mut pending: Option<(usize, Vec<u8>)> = None;
    let row_bytes = 2 * w.cols;
    for out in outs {
        yt[out.first_row * n..out.first_row * n + out.yt.len()].copy_from_slice(&out.yt);
        for (row, offset, bytes) in out.fragments {
            let joined = match pending.take() {
                None if offset == 0 => (row, bytes),
                Some((r, mut buf)) if r == row && buf.len() == 2 * offset => {
                    buf.extend_from_slice(&bytes);
                    (r, buf)
                }
                _ => return Err(broken(w, row)),
            };
            if joined.1.len() == row_bytes {
                kind.dot_row(&joined.1, x, w.cols, &mut yt[row * n..(row + 1) * n]);
            } else {
                pending = Some(joined);
            }
        }
    }
    match pending {
        Some((row, _)) => Err(broken(w, row)),
        None => Ok(()),
    }
}

/// `out (n × rows) = x · Wᵀ` for a prompt over compressed weights: the chunks are decoded in
/// groups (one chunk per thread at a time, in parallel, or more when chunks are small) into one
/// scratch buffer, and the rows lying whole in it go through the same token-split product as
/// decoded weights ([`by_tokens`]), so every decoded row is read by every token from cache and
/// decoded once per call. The piece of a row cut by a group's end stays at the front of the
/// buffer and is completed by the next group. The scratch holds at most one group of chunks
/// plus one row ([`scratch_chunks`]), never the whole decoded matrix when it spans more chunks.
fn on_the_fly_by_tokens(
    kind: KernelKind,
    w: &Matrix,
    m: &CompressedMatrix,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<(), DeviceError> {
    let (k, ce, chunks) = (w.cols, m.chunk_elems, m.chunks());
    let group = scratch_chunks(ce, rayon::current_num_threads()).min(chunks.max(1));
    let need = 2 * ((group * ce).min(m.len) + k);
    let mut buf = take_scratch(need);
    let result = products_over_groups(kind, w, m, x, n, out, group, &mut buf[..need]);
    keep_scratch(buf);
    result
}

/// Scratch buffers of [`on_the_fly_by_tokens`] kept for the next products (at most
/// [`SCRATCH_KEPT`]): allocating and zeroing megabytes per product cost more than a short
/// prompt's product over a small matrix.
static SCRATCH: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// Buffers [`SCRATCH`] keeps: enough for the products that run side by side ([`matmuls`]) to
/// reuse theirs, few enough that what stays allocated is a few groups of chunks.
const SCRATCH_KEPT: usize = 2;

/// A kept scratch buffer (or a new one) of at least `len` bytes.
fn take_scratch(len: usize) -> Vec<u8> {
    let kept = SCRATCH.lock().unwrap_or_else(|e| e.into_inner()).pop();
    let mut buf = kept.unwrap_or_default();
    if buf.len() < len {
        buf.resize(len, 0);
    }
    buf
}

/// Returns a buffer of [`take_scratch`] for the next product, unless enough are kept.
fn keep_scratch(buf: Vec<u8>) {
    let mut kept = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
    if kept.len() < SCRATCH_KEPT {
        kept.push(buf);
    }
}

/// The loop of [`on_the_fly_by_tokens`] over groups of `group` chunks, decoded into `buf`.
#[allow(clippy::too_many_arguments)]
fn products_over_groups(
    kind: KernelKind,
    w: &Matrix,
    m: &CompressedMatrix,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    group: usize,
    buf: &mut [u8],
) -> Result<(), DeviceError> {
    let (k, ce, chunks) = (w.cols, m.chunk_elems, m.chunks());
    // `buf[..2 * carry]` holds elements `done..done + carry`, the start of row `done / k`.
    let (mut done, mut carry) = (0, 0);
    for g0 in (0..chunks).step_by(group) {
        let g1 = (g0 + group).min(chunks);
        let e0 = m.chunk_range(g0).start;
        let e1 = m.chunk_range(g1 - 1).end;
        if done + carry != e0 {
            return Err(broken(w, done / k));
        }
        buf[2 * carry..2 * (carry + e1 - e0)]
            .par_chunks_mut(2 * ce)
            .enumerate()
            .try_for_each(|(i, b)| m.decode_chunk(g0 + i, b))
            .map_err(|source| WeightError::Codec {
                tensor: w.name.clone(),
                source,
            })?;
        let held = carry + e1 - e0;
        let whole = held / k;
        if whole > 0 {
            by_tokens(kind, &buf[..2 * whole * k], k, done / k, x, n, out);
        }
        buf.copy_within(2 * whole * k..2 * held, 0);
        (done, carry) = (done + whole * k, held - whole * k);
    }
    match carry {
        0 if done == w.rows * k => Ok(()),
        _ => Err(broken(w, done / k)),
    }
}

/// Chunks one group of [`on_the_fly_by_tokens`] decodes into its scratch: one per thread, or
/// as many as fill [`MIN_SCRATCH_BYTES`] when chunks are small (fewer, longer parallel products).
fn scratch_chunks(chunk_elems: usize, threads: usize) -> usize {
    let threads = threads.max(1);
    (MIN_SCRATCH_BYTES / (2 * chunk_elems).max(1))
        .max(1)
        .next_multiple_of(threads)
}

fn broken(w: &Matrix, row: usize) -> DeviceError {
    DeviceError::Invalid(format!(
        "{}: row {row} was not assembled from its chunks",
        w.name
    ))
}

/// Decodes chunks `c0..c1` one by one and multiplies every row lying whole inside them.
fn run_task(
    kind: KernelKind,
    w: &Matrix,
    m: &CompressedMatrix,
    x: &[f32],
    n: usize,
    c0: usize,
    c1: usize,
) -> Result<TaskOut, DeviceError> {
    let k = w.cols;
    let e0 = m.chunk_range(c0).start;
    let e1 = if c1 > c0 {
        m.chunk_range(c1 - 1).end
    } else {
        e0
    };
    let first_row = e0.div_ceil(k);
    let whole_rows = (e1 / k).saturating_sub(first_row);
    let mut out = TaskOut {
        first_row,
        yt: vec![0f32; whole_rows * n],
        fragments: Vec::new(),
    };
    // The buffer holds decoded elements [bs, be) of the matrix.
    let mut buf: Vec<u8> = Vec::with_capacity(2 * (m.chunk_elems + k));
    let mut bs = e0;
    let head_end = (first_row * k).min(e1);
    for c in c0..c1 {
        let rg = m.chunk_range(c);
        let at = buf.len();
        buf.resize(at + 2 * rg.len(), 0);
        m.decode_chunk(c, &mut buf[at..])
            .map_err(|source| WeightError::Codec {
                tensor: w.name.clone(),
                source,
            })?;
        let be = rg.end;
        let mut used = 0; // bytes of `buf` consumed
        if bs < head_end {
            // The end of a row that started before this task.
            let end = head_end.min(be);
            out.fragments
                .push((bs / k, bs % k, buf[..2 * (end - bs)].to_vec()));
            used = 2 * (end - bs);
            bs = end;
        }
        if bs >= head_end && bs + k <= be {
            // Every row now whole in the buffer, in one blocked product.
            let count = (be - bs) / k;
            let r = bs / k - first_row;
            product_rows(
                kind,
                &buf[used..used + 2 * k * count],
                k,
                x,
                n,
                &mut out.yt[r * n..(r + count) * n],
                Layout::by_row(n),
            );
            used += 2 * k * count;
            bs += k * count;
        }
        buf.drain(..used);
    }
    if bs < e1 {
        // The start of a row that ends after this task.
        out.fragments.push((bs / k, bs % k, buf));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{self, Params};
    use crate::model::weights::CompressedMatrix;
    use rand::{Rng, SeedableRng};

    fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
        (0..rows * cols)
            .flat_map(|_| {
                crate::model::synth::f32_to_bf16(rng.gen_range(-0.1f32..0.1)).to_le_bytes()
            })
            .collect()
    }

    /// The bits of row `r` of `bytes` times token `t` of `x` by the portable kernel, alone.
    fn single_dot(bytes: &[u8], cols: usize, x: &[f32], r: usize, t: usize) -> u32 {
        crate::device::cpu::kernel::dot_group_portable(
            &bytes[r * 2 * cols..(r + 1) * 2 * cols],
            [&x[t * cols..(t + 1) * cols]],
            cols,
        )[0]
        .to_bits()
    }

    #[test]
    fn prompt_products_split_by_tokens_equal_single_token_dots_bitwise() {
        // Prompts long enough for the split by tokens, with token counts that leave partial
        // register groups and a short last task; rows around the row pair and the row block;
        // columns with and without a tail.
        for (rows, cols) in [(3, 33), (5, 100), (460, 576), (2, 7)] {
            let bytes = matrix(rows, cols, (3 * rows + cols) as u64);
            let w = Matrix {
                name: "w".into(),
                rows,
                cols,
                data: MatrixData::Bf16(bytes.clone()),
            };
            for n in [
                TOKEN_SPLIT_MIN,
                TOKEN_SPLIT_MIN + 3,
                4 * TOKEN_SPLIT_MIN + 5,
            ] {
                let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(n as u64);
                let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                for kind in [KernelKind::Portable, KernelKind::detect()] {
                    let mut out = vec![f32::NAN; n * rows];
                    matmul(kind, &w, &x, n, &mut out).unwrap();
                    for t in 0..n {
                        for r in 0..rows {
                            assert_eq!(
                                out[t * rows + r].to_bits(),
                                single_dot(&bytes, cols, &x, r, t),
                                "{rows}x{cols}, n {n}, row {r}, token {t}, {kind:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn blocked_products_equal_single_token_dots_bitwise() {
        // Token counts around the register block, rows around the row pair and the row block
        // (ROW_BLOCK_BYTES / 2 / cols rows), columns with and without a tail.
        for (rows, cols) in [(1, 7), (3, 64), (5, 100), (2100, 64), (9, 1536)] {
            let bytes = matrix(rows, cols, (rows + cols) as u64);
            for n in [1, 2, 3, 4, 5, 6, 7, 9, 13] {
                let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(n as u64);
                let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                for kind in [KernelKind::Portable, KernelKind::detect()] {
                    let mut yt = vec![0f32; rows * n];
                    product_rows(kind, &bytes, cols, &x, n, &mut yt, Layout::by_row(n));
                    let mut y = vec![0f32; n * rows];
                    product_rows(kind, &bytes, cols, &x, n, &mut y, Layout::by_token(rows));
                    for r in 0..rows {
                        for t in 0..n {
                            let want = single_dot(&bytes, cols, &x, r, t);
                            assert_eq!(
                                (yt[r * n + t].to_bits(), y[t * rows + r].to_bits()),
                                (want, want),
                                "{rows}x{cols}, n {n}, row {r}, token {t}, {kind:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn on_the_fly_equals_decoded_bitwise_for_awkward_shapes() {
        // Rows longer than a chunk, rows that straddle chunk and task boundaries, one chunk.
        for (rows, cols, chunk) in [
            (37, 100, 96),
            (5, 700, 256),
            (64, 33, 1024),
            (3, 5, 32),
            (40, 40, 32),
        ] {
            let (plain, comp) = twins(rows, cols, chunk);
            // One token (decode), several (register blocks plus a remainder), and prompts split
            // by tokens (partial register groups, several tasks, a short last task).
            for (n, kind) in [1, 6, 13, TOKEN_SPLIT_MIN + 6, 4 * TOKEN_SPLIT_MIN + 5]
                .into_iter()
                .flat_map(|n| [(n, KernelKind::Portable), (n, KernelKind::detect())])
            {
                let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(n as u64);
                let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                let (mut a, mut b) = (vec![0f32; n * rows], vec![0f32; n * rows]);
                matmul(kind, &plain, &x, n, &mut a).unwrap();
                matmul(kind, &comp, &x, n, &mut b).unwrap();
                assert_eq!(
                    bits(&a),
                    bits(&b),
                    "{rows}x{cols} chunk {chunk} n {n} {kind:?}"
                );
                for r in [0, rows - 1] {
                    assert_eq!(comp.row(r).unwrap(), plain.row(r).unwrap());
                }
            }
        }
    }

    #[test]
    fn empty_products_are_zeros_not_panics() {
        // No rows (nothing to split into tasks) and no columns (empty sums), decode and prompt.
        for (rows, cols) in [(0, 8), (8, 0)] {
            let w = Matrix {
                name: "w".into(),
                rows,
                cols,
                data: MatrixData::Bf16(Vec::new()),
            };
            for n in [1, TOKEN_SPLIT_MIN] {
                let mut out = vec![f32::NAN; n * rows];
                matmul(KernelKind::detect(), &w, &vec![1.0; n * cols], n, &mut out).unwrap();
                assert!(out.iter().all(|&v| v == 0.0), "{rows}x{cols} n {n}");
            }
        }
    }

    /// A compressed matrix and its plain twin.
    fn twins(rows: usize, cols: usize, chunk: usize) -> (Matrix, Matrix) {
        let bytes = matrix(rows, cols, (rows * cols + chunk) as u64);
        let params = Params {
            chunk_elems: chunk,
            ..Params::default()
        };
        let cm = CompressedMatrix::from_encoded(&codec::encode(&bytes, params).unwrap());
        let plain = Matrix {
            name: "w".into(),
            rows,
            cols,
            data: MatrixData::Bf16(bytes),
        };
        let comp = Matrix {
            name: "w".into(),
            rows,
            cols,
            data: MatrixData::Compressed(cm),
        };
        (plain, comp)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    #[test]
    fn prompt_products_on_the_fly_fit_one_group_of_chunks_and_a_row() {
        // Groups of one to three chunks: rows cut by a group's end (carried to the next group),
        // rows longer than a group, a group ending on a row boundary. The scratch is exactly one
        // group plus one row, so a product that needed more would fail on its bounds.
        let n = TOKEN_SPLIT_MIN + 7;
        for (rows, cols, chunk) in [(37, 100, 96), (5, 700, 256), (40, 40, 32), (12, 64, 128)] {
            let (plain, comp) = twins(rows, cols, chunk);
            let MatrixData::Compressed(m) = &comp.data else {
                unreachable!()
            };
            let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(cols as u64);
            let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            let kind = KernelKind::detect();
            let mut want = vec![0f32; n * rows];
            matmul(kind, &plain, &x, n, &mut want).unwrap();
            for group in 1..=3 {
                let mut scratch = vec![0u8; 2 * ((group * chunk).min(m.len) + cols)];
                let mut got = vec![f32::NAN; n * rows];
                products_over_groups(kind, &comp, m, &x, n, &mut got, group, &mut scratch).unwrap();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{rows}x{cols} chunk {chunk} group {group}"
                );
            }
        }
    }

    #[test]
    fn side_by_side_products_equal_single_products_bitwise() {
        // q, k and v shapes over one input, compressed (run side by side) and plain, for a
        // decode step and a prompt.
        let cols = 96;
        let shapes = [(64, 96, 1024), (24, 96, 512), (24, 96, 4096)];
        let pairs: Vec<(Matrix, Matrix)> =
            shapes.iter().map(|&(r, c, ch)| twins(r, c, ch)).collect();
        for n in [1, 5, TOKEN_SPLIT_MIN + 1] {
            let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(n as u64);
            let x: Vec<f32> = (0..n * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            let kind = KernelKind::detect();
            let alone: Vec<Vec<f32>> = pairs
                .iter()
                .map(|(p, _)| {
                    let mut o = vec![0f32; n * p.rows];
                    matmul(kind, p, &x, n, &mut o).unwrap();
                    o
                })
                .collect();
            for compressed in [false, true] {
                let mut outs: Vec<Vec<f32>> = pairs
                    .iter()
                    .map(|(p, _)| vec![f32::NAN; n * p.rows])
                    .collect();
                let products = pairs
                    .iter()
                    .map(|(p, c)| if compressed { c } else { p })
                    .zip(outs.iter_mut().map(|o| &mut o[..]))
                    .collect();
                matmuls(kind, products, &x, n).unwrap();
                for (i, (got, want)) in outs.iter().zip(&alone).enumerate() {
                    assert_eq!(bits(got), bits(want), "matrix {i}, n {n}, {compressed}");
                }
            }
        }
    }
}
