//! The `tbe3` runtime form: a fixed-rate BF16 code that GPU kernels read directly.
//!
//! The stored form (rANS, `docs/format.md` §1–5) is close to the entropy floor but sequential
//! inside a chunk, so a fused GEMV cannot decode it at the speed it streams bytes. At model load
//! each matrix is transcoded once into this form, which costs ~11.2-11.3 bits per weight instead
//! of ~10.6 but decodes with a handful of integer instructions per weight, from 16-byte loads, with
//! random access at tile granularity. `docs/format.md` §6 ("Runtime forms") is the normative
//! description; this module is its CPU encoder and decoder, and the two are tested bit-exact
//! against the original weights.
//!
//! In short, for a row-major `rows × cols` matrix of `n` weights, flat index `i = r·cols + c`:
//! - **sm plane**: byte `i` is the sign+mantissa byte `s << 7 | m` (as in the stored form);
//! - **code plane**: 3 bits per weight, 48 bytes per *group* of 128 consecutive weights, as three
//!   128-bit bit-planes (bit `k` of every code of the group), so one 16-byte load fetches one
//!   plane of a group and `P0 & P1 & P2` is the group's escape mask;
//! - **tiles** of `tile_elems` consecutive weights (a whole number of groups) each have a *base
//!   exponent*: code `c < 7` means exponent `base + c`, code 7 is an *escape*;
//! - **escape plane**: the exact exponent byte of every escaped weight, in weight order; tile `t`'s
//!   escapes start at `esc_start[t]` and an escape's place is that start plus the number of
//!   escape codes before it in the tile (popcounts of the escape masks).
//!
//! Every one of the 65,536 BF16 patterns round-trips: an escape carries any exponent, and the sign
//! and mantissa are stored verbatim.

use std::ops::Range;

use rayon::prelude::*;

use super::{bf16, CodecError, EncodedView};

/// Weights per group: the unit of the code plane (three 128-bit bit-planes, 48 bytes).
pub const GROUP: usize = 128;
/// Bytes of codes per group.
pub const GROUP_CODE_BYTES: usize = 48;
/// Bits of code per weight.
pub const CODE_BITS: u32 = 3;
/// The code that marks an escape (its exponent is in the escape plane).
pub const ESCAPE: u8 = 7;
/// Largest base exponent: `base + 6` must still be an exponent byte, so that adding a code to the
/// base never carries into the sign bit of a packed BF16 pair.
pub const MAX_BASE: u8 = 249;
/// Alignment, in bytes from the start of the image, of every plane (CUDA allocations are
/// 256-byte aligned, so every plane is then aligned for 16-byte loads and TMA).
pub const PLANE_ALIGN: usize = 256;
/// Largest tile: a tile's escape count must fit the u16 arithmetic a kernel may use for ranks.
pub const MAX_TILE: usize = 1 << 16;
/// Default tile size in weights, chosen from measurements (docs/format.md §6.5): 2048 costs
/// 0.02 bits/weight of header, total size is flat from 1024 to 65536 on the real test model
/// (smaller tiles save escapes but pay more header), and it divides every Llama-3.1-8B input
/// dimension (4096, 14336), so a row is a whole number of tiles.
pub const DEFAULT_TILE: usize = 2048;

/// The geometry of a matrix in runtime form; every offset derives from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Output features (matrix rows).
    pub rows: usize,
    /// Input features (matrix columns; the GEMV reduction dimension).
    pub cols: usize,
    /// Weights per tile: a power of two in `GROUP..=MAX_TILE`.
    pub tile_elems: usize,
}

impl Shape {
    /// A shape with an explicit tile size, checked.
    pub fn new(rows: usize, cols: usize, tile_elems: usize) -> Result<Self, CodecError> {
        if !tile_elems.is_power_of_two() || !(GROUP..=MAX_TILE).contains(&tile_elems) {
            return Err(CodecError::Invalid(format!(
                "tile size {tile_elems} is not a power of two in {GROUP}..={MAX_TILE}"
            )));
        }
        if rows
            .checked_mul(cols)
            .is_none_or(|n| n > (u32::MAX as usize))
        {
            return Err(CodecError::Invalid(format!(
                "{rows} × {cols} weights exceed the 2^32 - 1 that u32 escape offsets address"
            )));
        }
        Ok(Self {
            rows,
            cols,
            tile_elems,
        })
    }

    /// The shape the loader uses: [`DEFAULT_TILE`], reduced to the largest power of two that
    /// divides `cols` when `cols` is a multiple of [`GROUP`], so that rows start on tile
    /// boundaries and a kernel tile of whole rows × whole tiles never shares a format tile.
    pub fn for_matrix(rows: usize, cols: usize) -> Result<Self, CodecError> {
        Self::new(rows, cols, default_tile(cols, DEFAULT_TILE))
    }

    /// Number of weights.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// True for a matrix without weights.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of 128-weight groups (the last may be partial).
    pub fn groups(&self) -> usize {
        self.len().div_ceil(GROUP)
    }

    /// Number of tiles (the last may be partial).
    pub fn tiles(&self) -> usize {
        self.len().div_ceil(self.tile_elems)
    }

    /// The flat weight indices tile `t` covers.
    pub fn tile_range(&self, t: usize) -> Range<usize> {
        (t * self.tile_elems).min(self.len())..((t + 1) * self.tile_elems).min(self.len())
    }

    /// Byte offsets of the planes inside the image, for an image holding `escapes` escapes.
    pub fn layout(&self, escapes: usize) -> Layout {
        let groups = self.groups();
        let sm = 0..groups * GROUP;
        let codes = align(sm.end)..align(sm.end) + groups * GROUP_CODE_BYTES;
        let bases = align(codes.end)..align(codes.end) + self.tiles();
        let esc_start = align(bases.end)..align(bases.end) + 4 * (self.tiles() + 1);
        let escapes = align(esc_start.end)..align(esc_start.end) + escapes;
        let total = escapes.end.next_multiple_of(16);
        Layout {
            sm,
            codes,
            bases,
            esc_start,
            escapes,
            total,
        }
    }
}

/// The tile size rule of [`Shape::for_matrix`], for any preferred size.
pub fn default_tile(cols: usize, preferred: usize) -> usize {
    if cols > 0 && cols.is_multiple_of(GROUP) {
        preferred.min(1 << cols.trailing_zeros())
    } else {
        preferred
    }
}

fn align(x: usize) -> usize {
    x.next_multiple_of(PLANE_ALIGN)
}

/// Where each plane lies in the image (byte ranges from its start), as docs/format.md §6.3 says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Sign+mantissa bytes, one per weight, zero-padded to a whole group.
    pub sm: Range<usize>,
    /// Codes, 48 bytes per group.
    pub codes: Range<usize>,
    /// Base exponent of each tile, one byte per tile.
    pub bases: Range<usize>,
    /// `tiles + 1` little-endian u32: the first escape of each tile, then the escape count.
    pub esc_start: Range<usize>,
    /// One exponent byte per escape.
    pub escapes: Range<usize>,
    /// Size of the whole image (a multiple of 16).
    pub total: usize,
}

/// A matrix in runtime form: its shape and one contiguous image that is uploaded as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeMatrix {
    /// Geometry.
    pub shape: Shape,
    /// The image: every plane at its [`Layout`] offset.
    pub image: Vec<u8>,
}

/// Sizes and escape statistics of one runtime matrix (for reports and the 72% budget).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Weights.
    pub elements: u64,
    /// Bytes of the image (everything the GPU holds for this matrix).
    pub bytes: u64,
    /// Escaped weights.
    pub escapes: u64,
    /// Bytes of the tile headers (bases and escape starts) and alignment padding.
    pub header_bytes: u64,
}

impl Stats {
    /// Bits of GPU memory per weight, everything included.
    pub fn bits_per_weight(&self) -> f64 {
        if self.elements == 0 {
            0.0
        } else {
            8.0 * self.bytes as f64 / self.elements as f64
        }
    }

    /// Fraction of weights whose exponent is an escape.
    pub fn escape_rate(&self) -> f64 {
        if self.elements == 0 {
            0.0
        } else {
            self.escapes as f64 / self.elements as f64
        }
    }

    /// Size relative to BF16 (2 bytes per weight).
    pub fn ratio(&self) -> f64 {
        self.bits_per_weight() / 16.0
    }

    /// Adds another matrix's numbers (group totals).
    pub fn add(&mut self, o: &Stats) {
        self.elements += o.elements;
        self.bytes += o.bytes;
        self.escapes += o.escapes;
        self.header_bytes += o.header_bytes;
    }
}

impl RuntimeMatrix {
    /// A checked view of the image.
    pub fn view(&self) -> Result<RuntimeView<'_>, CodecError> {
        RuntimeView::new(self.shape, &self.image)
    }

    /// Size accounting.
    pub fn stats(&self) -> Stats {
        let l = self.shape.layout(self.escape_count());
        Stats {
            elements: self.shape.len() as u64,
            bytes: self.image.len() as u64,
            escapes: self.escape_count() as u64,
            header_bytes: (l.total - l.sm.len() - l.codes.len() - l.escapes.len()) as u64,
        }
    }

    /// Number of escapes (the last entry of the escape-start plane).
    pub fn escape_count(&self) -> usize {
        let r = self.shape.layout(0).esc_start;
        self.image
            .get(r.end - 4..r.end)
            .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
    }
}

/// A borrowed, length-checked runtime image. Constructing it validates the headers, so the
/// decoders below never index out of bounds whatever the bytes are.
#[derive(Clone, Copy, Debug)]
pub struct RuntimeView<'a> {
    shape: Shape,
    image: &'a [u8],
    escapes: usize,
}

impl<'a> RuntimeView<'a> {
    /// Checks an image against its shape: total length, base exponents `<= MAX_BASE`, escape
    /// starts beginning at 0, non-decreasing, and ending at the escape plane's length.
    pub fn new(shape: Shape, image: &'a [u8]) -> Result<Self, CodecError> {
        let shape = Shape::new(shape.rows, shape.cols, shape.tile_elems)?;
        let corrupt = |m: String| CodecError::Corrupt(format!("tbe3 runtime form: {m}"));
        let l0 = shape.layout(0);
        if image.len() < l0.escapes.start {
            return Err(corrupt(format!(
                "image is {} bytes, shorter than its {} bytes of fixed planes",
                image.len(),
                l0.escapes.start
            )));
        }
        let starts = &image[l0.esc_start.clone()];
        let start = |t: usize| u32::from_le_bytes(starts[4 * t..4 * t + 4].try_into().unwrap());
        let escapes = start(shape.tiles()) as usize;
        let l = shape.layout(escapes);
        if image.len() != l.total {
            return Err(corrupt(format!(
                "image is {} bytes, expected {} for {escapes} escapes",
                image.len(),
                l.total
            )));
        }
        if start(0) != 0 {
            return Err(corrupt(format!("tile 0 starts at escape {}", start(0))));
        }
        for t in 0..shape.tiles() {
            if start(t + 1) < start(t) {
                return Err(corrupt(format!("escape starts decrease at tile {t}")));
            }
            let b = image[l.bases.start + t];
            if b > MAX_BASE {
                return Err(corrupt(format!(
                    "tile {t} has base exponent {b} > {MAX_BASE}"
                )));
            }
        }
        Ok(Self {
            shape,
            image,
            escapes,
        })
    }

    /// Geometry.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Number of escapes in the whole matrix.
    pub fn escapes(&self) -> usize {
        self.escapes
    }

    fn layout(&self) -> Layout {
        self.shape.layout(self.escapes)
    }

    fn esc_start(&self, t: usize) -> usize {
        let o = self.layout().esc_start.start + 4 * t;
        u32::from_le_bytes(self.image[o..o + 4].try_into().unwrap()) as usize
    }
}

/// Chooses a tile's base exponent: the `base <= MAX_BASE` whose window `base..=base + 6` holds
/// the most of the tile's exponents (fewest escapes); the smallest such base on ties.
pub fn best_base(hist: &[u32; 256]) -> u8 {
    let mut window: u32 = hist[..7].iter().sum();
    let (mut best, mut best_n) = (0u8, window);
    for b in 1..=MAX_BASE as usize {
        window = window + hist[b + 6] - hist[b - 1];
        if window > best_n {
            (best, best_n) = (b as u8, window);
        }
    }
    best
}

/// Encodes one tile (`x` its weights) into its sm bytes and codes, returning its base and
/// pushing its escapes. `sm` and `codes` cover the tile's whole groups.
fn encode_tile(x: &[u16], sm: &mut [u8], codes: &mut [u8], escapes: &mut Vec<u8>) -> u8 {
    // Four sub-histograms hide the store-to-load dependency on repeated exponents.
    let mut h4 = [[0u32; 256]; 4];
    let mut quads = x.chunks_exact(4);
    for q in &mut quads {
        for (h, &b) in h4.iter_mut().zip(q) {
            h[bf16::exponent(b) as usize] += 1;
        }
    }
    for &b in quads.remainder() {
        h4[0][bf16::exponent(b) as usize] += 1;
    }
    let mut hist = [0u32; 256];
    for (e, slot) in hist.iter_mut().enumerate() {
        *slot = h4[0][e] + h4[1][e] + h4[2][e] + h4[3][e];
    }
    let base = best_base(&hist);
    for (xg, (smg, cg)) in x
        .chunks(GROUP)
        .zip(sm.chunks_mut(GROUP).zip(codes.chunks_mut(GROUP_CODE_BYTES)))
    {
        for (q, (x32, sm32)) in xg.chunks(32).zip(smg.chunks_mut(32)).enumerate() {
            // Branch-free over 32 weights (the compiler vectorises it); escapes are a rare
            // second pass. Padding positions keep code 0.
            let mut c = [0u8; 32];
            let mut escaped = 0u32;
            for ((&b, s), ci) in x32.iter().zip(sm32.iter_mut()).zip(c.iter_mut()) {
                *s = bf16::sign_mantissa(b);
                let d = bf16::exponent(b).wrapping_sub(base);
                let code = d.min(ESCAPE);
                escaped |= (code == ESCAPE) as u32;
                *ci = code;
            }
            if escaped != 0 {
                for (&b, &ci) in x32.iter().zip(c.iter()) {
                    if ci == ESCAPE {
                        escapes.push(bf16::exponent(b));
                    }
                }
            }
            for k in 0..3usize {
                let w = pack_bits(&c, k as u32);
                let o = 16 * k + 4 * q;
                cg[o..o + 4].copy_from_slice(&w.to_le_bytes());
            }
        }
    }
    base
}

/// Bit `k` of each of 32 code bytes, gathered into one word (byte `j`'s bit at bit `j`): eight
/// bytes at a time, the multiply moves bit 0 of byte `i` to bit `56 + i` without collisions.
#[inline(always)]
fn pack_bits(c: &[u8; 32], k: u32) -> u32 {
    let mut w = 0u32;
    for (i, eight) in c.chunks_exact(8).enumerate() {
        let x = (u64::from_le_bytes(eight.try_into().unwrap()) >> k) & 0x0101_0101_0101_0101;
        w |= ((x.wrapping_mul(0x0102_0408_1020_4080) >> 56) as u32) << (8 * i);
    }
    w
}

/// Encodes a BF16 matrix (bit patterns, row-major, `shape.len()` of them) into runtime form,
/// tiles in parallel.
pub fn encode(bits: &[u16], shape: Shape) -> Result<RuntimeMatrix, CodecError> {
    if bits.len() != shape.len() {
        return Err(CodecError::Invalid(format!(
            "{} values for a {} × {} matrix",
            bits.len(),
            shape.rows,
            shape.cols
        )));
    }
    encode_with(shape, |t, buf| {
        let r = shape.tile_range(t);
        buf.clear();
        buf.extend_from_slice(&bits[r]);
    })
}

/// Like [`encode`] from little-endian BF16 bytes (what the codec's decoder and safetensors
/// files hold), without an intermediate copy of the whole matrix.
pub fn encode_le_bytes(bytes: &[u8], shape: Shape) -> Result<RuntimeMatrix, CodecError> {
    if bytes.len() != 2 * shape.len() {
        return Err(CodecError::Invalid(format!(
            "{} bytes for a {} × {} BF16 matrix",
            bytes.len(),
            shape.rows,
            shape.cols
        )));
    }
    encode_with(shape, |t, buf| {
        let r = shape.tile_range(t);
        buf.resize(r.len(), 0);
        for (d, p) in buf
            .iter_mut()
            .zip(bytes[2 * r.start..2 * r.end].chunks_exact(2))
        {
            *d = u16::from_le_bytes([p[0], p[1]]);
        }
    })
}

fn encode_with(
    shape: Shape,
    fill: impl Fn(usize, &mut Vec<u16>) + Sync,
) -> Result<RuntimeMatrix, CodecError> {
    let tiles = shape.tiles();
    let l0 = shape.layout(0);
    // Zeroed by the allocator (untouched pages), so the page faults happen in the parallel
    // pass below rather than in a serial memset. Escapes are ~2-4% of weights; room for 6%
    // avoids a reallocation in the usual case.
    let mut image = vec![0u8; l0.escapes.start + shape.len() / 16 + 16];
    let (head, tail) = image.split_at_mut(l0.codes.start);
    let sm = &mut head[..l0.sm.end];
    let (codes_area, tail) = tail.split_at_mut(l0.bases.start - l0.codes.start);
    let codes = &mut codes_area[..l0.codes.len()];
    let bases = &mut tail[..tiles];
    let tile_groups = shape.tile_elems / GROUP;
    let per_tile: Vec<Vec<u8>> = sm
        .par_chunks_mut(shape.tile_elems)
        .zip(codes.par_chunks_mut(tile_groups * GROUP_CODE_BYTES))
        .zip(bases.par_iter_mut())
        .enumerate()
        .map_init(Vec::new, |buf, (t, ((sm, codes), base))| {
            fill(t, buf);
            let mut esc = Vec::new();
            *base = encode_tile(buf, sm, codes, &mut esc);
            esc
        })
        .collect();
    let mut acc = 0usize;
    let mut starts = Vec::with_capacity(4 * (tiles + 1));
    for e in &per_tile {
        starts.extend_from_slice(&(acc as u32).to_le_bytes());
        acc += e.len();
    }
    starts.extend_from_slice(&(acc as u32).to_le_bytes());
    image[l0.esc_start.clone()].copy_from_slice(&starts);
    let l = shape.layout(acc);
    image.resize(l.total.max(image.len()), 0);
    let mut at = l.escapes.start;
    for e in &per_tile {
        image[at..at + e.len()].copy_from_slice(e);
        at += e.len();
    }
    image.truncate(l.total);
    Ok(RuntimeMatrix { shape, image })
}

/// Decodes tile `t` into `out` (`out.len() == shape.tile_range(t).len()`), reading only that
/// tile's codes, sm bytes, base and escapes — what a GPU kernel owning the tile does.
pub fn decode_tile(view: &RuntimeView<'_>, t: usize, out: &mut [u16]) -> Result<(), CodecError> {
    let s = view.shape;
    if t >= s.tiles() {
        return Err(CodecError::Invalid(format!("tile {t} of {}", s.tiles())));
    }
    let r = s.tile_range(t);
    if out.len() != r.len() {
        return Err(CodecError::Invalid(format!(
            "output of {} values for tile {t} of {} weights",
            out.len(),
            r.len()
        )));
    }
    let l = view.layout();
    let img = view.image;
    let base = img[l.bases.start + t];
    let (e0, e1) = (view.esc_start(t), view.esc_start(t + 1));
    let esc = &img[l.escapes.start + e0..l.escapes.start + e1];
    let mut k = 0usize;
    let g0 = r.start / GROUP;
    for (gi, outg) in out.chunks_mut(GROUP).enumerate() {
        let g = g0 + gi;
        let sm = &img[l.sm.start + g * GROUP..l.sm.start + (g + 1) * GROUP];
        let cb = &img[l.codes.start + g * GROUP_CODE_BYTES..][..GROUP_CODE_BYTES];
        let w = |i: usize| u32::from_le_bytes(cb[4 * i..4 * i + 4].try_into().unwrap());
        for q in 0..4 {
            let (p0, p1, p2) = (w(q), w(4 + q), w(8 + q));
            let live = outg.len().saturating_sub(32 * q).min(32);
            if live < 32 {
                // Padding after the last weight must hold code 0 (the canonical form).
                let dead = if live == 0 {
                    u32::MAX
                } else {
                    u32::MAX << live
                };
                if (p0 | p1 | p2) & dead != 0 {
                    return Err(CodecError::Corrupt(format!(
                        "tbe3 runtime form: non-zero code in the padding of group {g}"
                    )));
                }
            }
            for j in 0..live {
                let c = ((p0 >> j) & 1) | (((p1 >> j) & 1) << 1) | (((p2 >> j) & 1) << 2);
                let e = if c == ESCAPE as u32 {
                    let e = *esc.get(k).ok_or_else(|| {
                        CodecError::Corrupt(format!(
                            "tbe3 runtime form: tile {t} has more escape codes than its {} escapes",
                            esc.len()
                        ))
                    })?;
                    k += 1;
                    e
                } else {
                    base + c as u8
                };
                outg[32 * q + j] = bf16::join(e, sm[32 * q + j]);
            }
        }
    }
    if k != esc.len() {
        return Err(CodecError::Corrupt(format!(
            "tbe3 runtime form: tile {t} has {k} escape codes but {} escapes",
            esc.len()
        )));
    }
    Ok(())
}

/// Decodes the whole matrix (row-major BF16 bit patterns), tiles in parallel.
pub fn decode(view: &RuntimeView<'_>) -> Result<Vec<u16>, CodecError> {
    let s = view.shape;
    let mut out = vec![0u16; s.len()];
    out.par_chunks_mut(s.tile_elems)
        .enumerate()
        .try_for_each(|(t, o)| decode_tile(view, t, o))?;
    Ok(out)
}

/// Transcodes a matrix from the stored (rANS) form to runtime form: decodes it to BF16 once,
/// then encodes; both passes are parallel. This is what the loader calls for each matrix.
pub fn transcode(stored: &EncodedView<'_>, shape: Shape) -> Result<RuntimeMatrix, CodecError> {
    if stored.len != shape.len() {
        return Err(CodecError::Invalid(format!(
            "stored tensor has {} weights, the shape {} × {}",
            stored.len, shape.rows, shape.cols
        )));
    }
    let bytes = super::decode(stored)?;
    encode_le_bytes(&bytes, shape)
}
