//! Interleaved rANS over one chunk of byte symbols (exponents, or ranked keys, see
//! [`super::model`]): 32 lanes, 32-bit states, 16-bit words.
//!
//! Element `i` of a chunk belongs to lane `i % 32` and is that lane's symbol number `i / 32`, so a
//! GPU warp decodes 32 consecutive weights per step, one per thread, and writes them coalesced.
//! All lanes share one stream of 16-bit words, in the order the decoder consumes them: step by
//! step, and within a step by ascending lane among the lanes that renormalise. A warp finds each
//! thread's word with a ballot and a popcount; a CPU simply reads the next word. The encoder runs
//! backwards (rANS is LIFO), so it emits words in exactly the reverse of that order and the chunk's
//! words are reversed once at the end.
//!
//! State invariants (with `L = 2^16`): between symbols a state lies in `[L, 2^32)`; decoding one
//! symbol may drop it below `L`, and then exactly one word brings it back, because
//! `prob_bits <= 16`. Encoding starts every lane at `L`, so a correct decode ends every lane at
//! exactly `L` having consumed exactly the chunk's words: both are checked, which turns most
//! corruption into an error even before the checksum is compared.
//!
//! Two implementations of each direction live side by side. [`encode_chunk`] and
//! [`decode_chunk`] are the plain scalar reference: they define the stored bytes, and the tests
//! hold everything else to them. [`ChunkEncoder`], [`decode_chunk_bytes`] and
//! [`decode_chunk_pair`] are what the tensor codec runs: they pick the AVX-512 kernels of
//! [`super::simd`] at run time when the CPU has them (and, for decoding, `prob_bits <= 12` for the
//! exponent model, `<= 15` with coded mantissa bits), and
//! otherwise a scalar loop, always with identical results. They also work on the stored form
//! directly (BF16 input bytes; little-endian word bytes with padding after them), so the tensor
//! codec makes no per-chunk copies.

use super::freq::FreqTable;
use super::model::{self, SymbolModel};
use super::CodecError;

/// Number of interleaved rANS states per chunk (one per GPU warp lane).
pub const LANES: usize = 32;
/// Lower bound of the normalised state interval, and every lane's initial encoder state.
pub const STATE_LOW: u32 = 1 << 16;

/// Per-symbol encoder constants: the renormalisation bound and an exact reciprocal of the
/// frequency, so encoding a symbol costs a multiply instead of a division.
#[derive(Clone, Copy, Debug, Default)]
pub struct EncSymbol {
    x_max: u64,
    rcp: u64,
    rcp_shift: u32,
    freq: u32,
    cum: u32,
}

/// Encoder constants for every symbol of a table.
pub fn enc_symbols(table: &FreqTable) -> [EncSymbol; 256] {
    let pb = table.prob_bits();
    let mut out = [EncSymbol::default(); 256];
    for (s, o) in out.iter_mut().enumerate() {
        let f = table.freq(s as u8);
        if f == 0 {
            continue;
        }
        // Granlund-Montgomery: with l = ceil(log2 f) and m = floor(2^(32+l) / f) + 1,
        // floor(x / f) == (x * m) >> (32 + l) for every 32-bit x.
        let l = 32 - (f - 1).leading_zeros();
        let m = ((1u128 << (32 + l)) / f as u128 + 1) as u64;
        *o = EncSymbol {
            x_max: (f as u64) << (32 - pb),
            rcp: m,
            rcp_shift: 32 + l,
            freq: f,
            cum: table.cum(s as u8),
        };
    }
    out
}

/// Encodes one symbol into a lane state: writes the state's low word to `buf[*wp]` and advances
/// `*wp` when renormalisation is due (the write is unconditional, only the advance is not).
#[inline(always)]
pub(crate) fn encode_one(
    x: u32,
    sym: &EncSymbol,
    prob_bits: u32,
    buf: &mut [u16],
    wp: &mut usize,
) -> u32 {
    debug_assert!(sym.freq > 0, "exponent missing from the table");
    let emit = x as u64 >= sym.x_max;
    buf[*wp] = x as u16;
    *wp += emit as usize;
    let x = if emit { x >> 16 } else { x };
    let q = ((x as u128 * sym.rcp as u128) >> sym.rcp_shift) as u32;
    (q << prob_bits) + (x - q * sym.freq) + sym.cum
}

/// Encodes the exponents of one chunk. Returns the lanes' final states (the decoder's initial
/// states) and appends the chunk's words, in decoding order, to `words`.
///
/// This is the reference encoder; [`ChunkEncoder`] is the fast path and must match it exactly.
pub fn encode_chunk(
    exponents: &[u8],
    syms: &[EncSymbol; 256],
    prob_bits: u32,
    words: &mut Vec<u16>,
) -> [u32; LANES] {
    let mut states = [STATE_LOW; LANES];
    let n = exponents.len();
    // At most one word per symbol: write unconditionally, advance only when a word is due.
    let start = words.len();
    words.resize(start + n + 1, 0);
    let buf = &mut words[start..];
    let mut wp = 0usize;
    let steps = n.div_ceil(LANES);
    for step in (0..steps).rev() {
        let base = step * LANES;
        let width = (n - base).min(LANES);
        for lane in (0..width).rev() {
            let sym = &syms[exponents[base + lane] as usize];
            states[lane] = encode_one(states[lane], sym, prob_bits, buf, &mut wp);
        }
    }
    buf[..wp].reverse();
    words.truncate(start + wp);
    states
}

/// The encoder of one code table for whole chunks of BF16 data: splits each element into its
/// sign+mantissa byte and exponent and codes the exponents, in one pass, with the AVX-512 kernel
/// when the CPU has it and a scalar loop otherwise. Both give exactly [`encode_chunk`]'s output.
#[derive(Clone, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the SIMD parts are x86-64 only
pub struct ChunkEncoder {
    prob_bits: u32,
    syms: [EncSymbol; 256],
    model: SymbolModel,
    simd_table: super::simd::EncodeTable,
    simd: bool,
}

impl ChunkEncoder {
    /// The encoder of an exponent code table (format version 1's model), using SIMD when this
    /// CPU supports it.
    pub fn new(table: &FreqTable) -> Self {
        Self::with_model(table, &SymbolModel::exponent())
    }

    /// The encoder of a code table over the symbols of `model`.
    pub fn with_model(table: &FreqTable, model: &SymbolModel) -> Self {
        Self {
            prob_bits: table.prob_bits(),
            syms: enc_symbols(table),
            model: model.clone(),
            simd_table: super::simd::EncodeTable::new(table, model),
            simd: super::simd::available(),
        }
    }

    /// The same encoder restricted to the portable scalar loop.
    pub fn without_simd(mut self) -> Self {
        self.simd = false;
        self
    }

    /// Encodes one chunk of little-endian BF16 bytes: writes its raw plane
    /// (`model::raw_len(bf16.len() / 2, mantissa_bits)` bytes, see [`super::model`]) to `raw` and
    /// returns the lanes' final states and the chunk's words in decoding order, which live in
    /// `scratch` (reused between chunks, so a thread allocates it once). Every value's key must
    /// occur in the model.
    pub fn encode_bf16<'s>(
        &self,
        bf16: &[u8],
        raw: &mut [u8],
        scratch: &'s mut Vec<u16>,
    ) -> ([u32; LANES], &'s [u16]) {
        let n = bf16.len() / 2;
        // At most one word per symbol, plus room for the SIMD kernel's full-width stores.
        if scratch.len() < n + 32 {
            scratch.resize(n + 32, 0);
        }
        let (states, count) = self.encode_bf16_slice(bf16, raw, scratch);
        (states, &scratch[..count])
    }

    /// [`ChunkEncoder::encode_bf16`] into a slice of at least `bf16.len() / 2 + 32` words:
    /// returns the lanes' final states and the number of words, which are `scratch[..count]`.
    pub fn encode_bf16_slice(
        &self,
        bf16: &[u8],
        raw: &mut [u8],
        scratch: &mut [u16],
    ) -> ([u32; LANES], usize) {
        let n = bf16.len() / 2;
        let m = self.model.mantissa_bits();
        assert!(
            bf16.len().is_multiple_of(2) && raw.len() == model::raw_len(n, m),
            "a chunk of {} bytes with a raw plane of {} bytes",
            bf16.len(),
            raw.len()
        );
        assert!(scratch.len() >= n + 32, "room for the chunk's words");
        #[cfg(target_arch = "x86_64")]
        if self.simd {
            // SAFETY: `simd` is only set when `simd::available()` found the kernel's features.
            let (states, count) = unsafe {
                if m == 0 {
                    super::simd::encode_chunk::<false>(
                        bf16,
                        &self.syms,
                        &self.model,
                        &self.simd_table,
                        self.prob_bits,
                        raw,
                        scratch,
                    )
                } else {
                    super::simd::encode_chunk::<true>(
                        bf16,
                        &self.syms,
                        &self.model,
                        &self.simd_table,
                        self.prob_bits,
                        raw,
                        scratch,
                    )
                }
            };
            return (states, count);
        }
        let value = |i: usize| u16::from_le_bytes([bf16[2 * i], bf16[2 * i + 1]]);
        if m == 0 {
            for (i, r) in raw.iter_mut().enumerate() {
                *r = super::bf16::sign_mantissa(value(i));
            }
        } else {
            for (t, step) in raw.chunks_exact_mut(model::M3_STEP_BYTES).enumerate() {
                let end = (LANES * (t + 1)).min(n);
                model::split_step_m3((LANES * t..end).map(value), step);
            }
        }
        let mut states = [STATE_LOW; LANES];
        let mut wp = 0usize;
        for i in (0..n).rev() {
            let sym = &self.syms[self.model.symbol(value(i)) as usize];
            states[i % LANES] =
                encode_one(states[i % LANES], sym, self.prob_bits, scratch, &mut wp);
        }
        scratch[..wp].reverse();
        (states, wp)
    }
}

/// A decoding table: per slot the symbol, and `freq << 16 | (slot - cum)` for the state update;
/// the SIMD decoder's packed form of both when it applies (see [`super::simd`]); and per symbol
/// the bits it decodes to (see [`SymbolModel::high_bits`]).
#[derive(Clone, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the SIMD parts are x86-64 only
pub struct DecodeTable {
    prob_bits: u32,
    mantissa_bits: u32,
    symbol: Vec<u8>,
    update: Vec<u32>,
    packed: Packed,
    high: Box<[u16; 256]>,
    simd: bool,
}

impl DecodeTable {
    /// Builds the decoding table of an exponent code table (format version 1's model), for the
    /// SIMD decoder when this CPU supports it and the precision fits its packed entries.
    pub fn new(table: &FreqTable) -> Self {
        Self::with_model(table, &SymbolModel::exponent())
    }

    /// Builds the decoding table of a code table over the symbols of `model`.
    pub fn with_model(table: &FreqTable, model: &SymbolModel) -> Self {
        let pb = table.prob_bits();
        let mut symbol = Vec::with_capacity(1 << pb);
        let mut update = Vec::with_capacity(1 << pb);
        // Whole runs per symbol (a fill and a vectorised ramp): this is per-tensor work over
        // 2^15 slots, a few percent of decoding a mid-sized tensor when done slot by slot.
        for s in 0..=255u8 {
            let f = table.freq(s);
            symbol.resize(symbol.len() + f as usize, s);
            update.extend((0..f).map(|b| f << 16 | b));
        }
        let m = model.mantissa_bits();
        let simd = super::simd::available() && pb <= super::simd::max_simd_decode_prob_bits(m);
        let high: Box<[u16; 256]> = Box::new(std::array::from_fn(|s| model.high_bits(s as u8)));
        let packed = match (simd, m) {
            (false, _) => Packed::None,
            (true, 0) => Packed::Exponent(super::simd::pack_decode_table(&symbol, &update)),
            (true, _) => {
                Packed::Mantissa(super::simd::pack_decode_table_m3(&symbol, &update, &high))
            }
        };
        Self {
            prob_bits: pb,
            mantissa_bits: model.mantissa_bits(),
            symbol,
            update,
            packed,
            high,
            simd,
        }
    }

    /// The same table restricted to the portable scalar decoder.
    pub fn without_simd(mut self) -> Self {
        self.simd = false;
        self
    }

    /// Precision of the table, in bits.
    pub fn prob_bits(&self) -> u32 {
        self.prob_bits
    }

    /// Leading mantissa bits coded with the exponent (see [`super::model`]).
    pub fn mantissa_bits(&self) -> u32 {
        self.mantissa_bits
    }

    /// The SIMD decoder's packed entries of the exponent model (empty when it does not apply).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn packed(&self) -> &[u32] {
        match &self.packed {
            Packed::Exponent(p) => p,
            _ => &[],
        }
    }

    /// The SIMD decoder's packed entries with coded mantissa bits (empty when they do not apply).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn packed_m3(&self) -> &[u64] {
        match &self.packed {
            Packed::Mantissa(p) => p,
            _ => &[],
        }
    }
}

/// The SIMD decoder's form of a decoding table, by symbol model.
#[derive(Clone, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Packed {
    /// The SIMD decoder does not apply.
    None,
    /// Exponent model: u32 entries.
    Exponent(Vec<u32>),
    /// Coded mantissa bits: u64 entries.
    Mantissa(Vec<u64>),
}

/// Decodes one chunk into little-endian BF16 bytes, `out.len() / 2` elements, joining each
/// decoded symbol's bits with the element's raw bits from `raw` (the chunk's raw plane, see
/// [`super::model`]). Checks that the words are consumed exactly and every lane ends at its start
/// state.
///
/// `words` must hold the chunk's words followed by at least one padding word: renormalisation
/// reads are unconditional (no unpredictable branch) and clamp to the padding, so corrupt data
/// can never read past the slice.
///
/// This is the reference decoder; [`decode_chunk_bytes`] is the fast path.
pub fn decode_chunk(
    states: &[u32; LANES],
    words: &[u16],
    table: &DecodeTable,
    raw: &[u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    check_sizes(raw, out, table)?;
    let n_words = words.len() - 1;
    decode_scalar(states, |p| words[p.min(n_words)], n_words, table, raw, out)
}

/// Bytes that must follow a chunk's words in the slice given to [`decode_chunk_bytes`].
pub const WORD_PAD_BYTES: usize = super::simd::WORD_PAD_BYTES;

/// One chunk to decode straight from its stored parts.
#[derive(Debug)]
pub struct ChunkJob<'a> {
    /// The lanes' initial decoder states.
    pub states: [u32; LANES],
    /// The chunk's `n_words` words as little-endian bytes, followed by at least
    /// [`WORD_PAD_BYTES`] more bytes of any content (the next chunk's words, or zero padding
    /// after the last chunk), so that the SIMD decoder's wide loads stay inside the slice even on
    /// corrupt data.
    pub words: &'a [u8],
    /// Number of words the chunk stores.
    pub n_words: usize,
    /// The chunk's raw plane (see [`super::model`]).
    pub raw: &'a [u8],
    /// Where its little-endian BF16 values go (2 bytes per element).
    pub out: &'a mut [u8],
}

impl ChunkJob<'_> {
    fn check(&self, table: &DecodeTable) -> Result<(), CodecError> {
        if self.words.len() < 2 * self.n_words + WORD_PAD_BYTES {
            return Err(CodecError::Invalid(format!(
                "{} word bytes cannot hold {} words and {WORD_PAD_BYTES} bytes of padding",
                self.words.len(),
                self.n_words
            )));
        }
        check_sizes(self.raw, self.out, table)
    }
}

/// Checks that a raw plane and an output buffer describe the same number of elements.
fn check_sizes(raw: &[u8], out: &[u8], table: &DecodeTable) -> Result<(), CodecError> {
    let n = out.len() / 2;
    let want = model::raw_len(n, table.mantissa_bits);
    if !out.len().is_multiple_of(2) || raw.len() != want {
        return Err(CodecError::Invalid(format!(
            "output of {} bytes with a raw plane of {} bytes (expected {want})",
            out.len(),
            raw.len()
        )));
    }
    Ok(())
}

/// Decodes one chunk, like [`decode_chunk`], straight from its stored little-endian words:
/// `words[..2 × n_words]` are the chunk's words, and at least [`WORD_PAD_BYTES`] more bytes of
/// any content must follow (see [`ChunkJob::words`]). Uses the AVX-512 decoder when the table
/// allows it, the scalar one otherwise; both give the same output on valid data and an error on
/// data the other rejects.
pub fn decode_chunk_bytes(
    states: &[u32; LANES],
    words: &[u8],
    n_words: usize,
    table: &DecodeTable,
    raw: &[u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    decode_job(
        ChunkJob {
            states: *states,
            words,
            n_words,
            raw,
            out,
        },
        table,
    )
}

fn decode_job(job: ChunkJob<'_>, table: &DecodeTable) -> Result<(), CodecError> {
    job.check(table)?;
    #[cfg(target_arch = "x86_64")]
    if table.simd {
        // SAFETY: `simd` is only set when `simd::available()` found the kernel's features (and
        // the table has its packed form); the slice lengths were checked above.
        let [r] = unsafe { super::simd::decode_chunks([job], table) };
        return r;
    }
    let ChunkJob {
        states,
        words,
        n_words,
        raw,
        out,
    } = job;
    let words = words.as_chunks::<2>().0;
    decode_scalar(
        &states,
        |p| u16::from_le_bytes(words[p.min(n_words)]),
        n_words,
        table,
        raw,
        out,
    )
}

/// Decodes two chunks, as [`decode_chunk_bytes`] does each. The SIMD decoder runs them in
/// lockstep (as far as the shorter one goes), which hides most of its table lookups' latency
/// and nearly doubles its speed.
pub fn decode_chunk_pair(
    a: ChunkJob<'_>,
    b: ChunkJob<'_>,
    table: &DecodeTable,
) -> [Result<(), CodecError>; 2] {
    #[cfg(target_arch = "x86_64")]
    if table.simd && a.check(table).is_ok() && b.check(table).is_ok() {
        // SAFETY: as in `decode_chunk_bytes`; both jobs were checked.
        return unsafe { super::simd::decode_chunks([a, b], table) };
    }
    [decode_job(a, table), decode_job(b, table)]
}

/// Raw-plane bytes before step `t` of a chunk.
#[inline(always)]
pub(crate) fn raw_step_start(t: usize, mantissa_bits: u32) -> usize {
    model::raw_len(LANES * t, mantissa_bits)
}

/// The scalar decoder over any word source; `word(p)` must clamp `p` to the padding. The sizes
/// of `raw` and `out` have been checked.
fn decode_scalar(
    states: &[u32; LANES],
    word: impl Fn(usize) -> u16,
    n_words: usize,
    table: &DecodeTable,
    raw: &[u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    let mut x = *states;
    if let Some(bad) = x.iter().find(|&&s| s < STATE_LOW) {
        return Err(CodecError::Corrupt(format!(
            "lane state {bad:#x} is below the normalised range"
        )));
    }
    let mut pos = 0usize;
    let m = table.mantissa_bits;
    for (t, o) in out.chunks_mut(2 * LANES).enumerate() {
        let start = raw_step_start(t, m);
        decode_tail(&mut x, &mut pos, &word, table, &raw[start..], o);
    }
    check_end(&x, pos, n_words)
}

/// Decodes one step of up to 32 lanes (lanes `0..out.len() / 2`) with scalar code; `raw` starts
/// at the step's raw bits.
#[inline(always)]
pub(crate) fn decode_tail(
    x: &mut [u32; LANES],
    pos: &mut usize,
    word: impl Fn(usize) -> u16,
    table: &DecodeTable,
    raw: &[u8],
    out: &mut [u8],
) {
    let pb = table.prob_bits;
    let mask = (1u32 << pb) - 1;
    let (sym_t, upd_t) = (&table.symbol[..], &table.update[..]);
    let m3 = table.mantissa_bits != 0;
    for (j, (xs, o)) in x.iter_mut().zip(out.chunks_exact_mut(2)).enumerate() {
        let slot = (*xs & mask) as usize;
        let e = upd_t[slot];
        let s = sym_t[slot];
        let v = if m3 {
            table.high[s as usize] | model::raw_bits_m3(raw, j)
        } else {
            super::bf16::join(s, raw[j])
        };
        o.copy_from_slice(&v.to_le_bytes());
        let y = (e >> 16) * (*xs >> pb) + (e & 0xffff);
        let need = y < STATE_LOW;
        let w = word(*pos) as u32;
        *pos += need as usize;
        *xs = if need { (y << 16) | w } else { y };
    }
}

/// The end-of-chunk checks: every word consumed, every lane back at its start state.
pub(crate) fn check_end(x: &[u32; LANES], pos: usize, n_words: usize) -> Result<(), CodecError> {
    if pos != n_words {
        return Err(CodecError::Corrupt(format!(
            "chunk decoding wanted {pos} words but the chunk stores {n_words}"
        )));
    }
    if x.iter().any(|&s| s != STATE_LOW) {
        return Err(CodecError::Corrupt(
            "chunk did not decode back to the initial rANS state".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(exps: &[u8], pb: u32) -> usize {
        let mut h = [0u64; 256];
        for &e in exps {
            h[e as usize] += 1;
        }
        let t = FreqTable::from_histogram(&h, pb).unwrap();
        let mut words = Vec::new();
        let states = encode_chunk(exps, &enc_symbols(&t), pb, &mut words);
        let n_words = words.len();
        words.push(0);
        let sm: Vec<u8> = (0..exps.len()).map(|i| (i * 37) as u8).collect();
        let mut out = vec![0u8; 2 * exps.len()];
        decode_chunk(&states, &words, &DecodeTable::new(&t), &sm, &mut out).unwrap();
        for i in 0..exps.len() {
            let bits = u16::from_le_bytes([out[2 * i], out[2 * i + 1]]);
            assert_eq!(crate::codec::bf16::exponent(bits), exps[i], "element {i}");
            assert_eq!(
                crate::codec::bf16::sign_mantissa(bits),
                sm[i],
                "element {i}"
            );
        }
        n_words
    }

    #[test]
    fn roundtrips_partial_and_full_chunks() {
        for n in [0, 1, 31, 32, 33, 100, 4096, 4097] {
            let exps: Vec<u8> = (0..n)
                .map(|i| (120 + (i * 7919 % 13) as u32) as u8)
                .collect();
            roundtrip(&exps, 12);
        }
    }

    #[test]
    fn a_single_symbol_costs_no_words() {
        assert_eq!(roundtrip(&[127u8; 1000], 12), 0);
    }

    #[test]
    fn every_precision_roundtrips_uniform_bytes() {
        let exps: Vec<u8> = (0..5000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        for pb in 8..=15 {
            roundtrip(&exps, pb);
        }
    }

    #[test]
    fn reciprocal_division_is_exact_at_the_edges() {
        let mut h = [0u64; 256];
        for (s, c) in h.iter_mut().enumerate() {
            *c = (s as u64 * 7919) % 1000 + 1;
        }
        let t = FreqTable::from_histogram(&h, 15).unwrap();
        for (s, e) in enc_symbols(&t).iter().enumerate() {
            let f = t.freq(s as u8);
            for x in [
                0u32,
                1,
                f - 1,
                f,
                f + 1,
                u32::MAX / 2,
                u32::MAX - 1,
                u32::MAX,
                (e.x_max - 1).min(u32::MAX as u64) as u32,
            ] {
                let q = ((x as u128 * e.rcp as u128) >> e.rcp_shift) as u32;
                assert_eq!(q, x / f, "x={x} f={f}");
            }
        }
    }

    #[test]
    fn pairs_decode_like_single_chunks() {
        let mut h = [0u64; 256];
        let chunk = |n: usize, seed: usize| -> Vec<u8> {
            (0..n)
                .map(|i| (118 + ((i + seed) * 7919 % 11) as u32) as u8)
                .collect()
        };
        for e in chunk(5000, 0).iter().chain(&chunk(5000, 1)) {
            h[*e as usize] += 1;
        }
        let t = FreqTable::from_histogram(&h, 12).unwrap();
        let syms = enc_symbols(&t);
        for (na, nb) in [(4096, 4096), (4096, 4097), (33, 32), (5000, 5000)] {
            let (ea, eb) = (chunk(na, 0), chunk(nb, 1));
            let (mut wa, mut wb) = (Vec::new(), Vec::new());
            let (sa, sb) = (
                encode_chunk(&ea, &syms, 12, &mut wa),
                encode_chunk(&eb, &syms, 12, &mut wb),
            );
            let stored = |w: &[u16]| -> Vec<u8> {
                let mut b: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
                b.resize(b.len() + WORD_PAD_BYTES, 0);
                b
            };
            let (ba, bb) = (stored(&wa), stored(&wb));
            let (sma, smb) = (vec![0x81u8; na], vec![0x02u8; nb]);
            for table in [DecodeTable::new(&t), DecodeTable::new(&t).without_simd()] {
                for corrupt in [None, Some(0), Some(1)] {
                    let (mut oa, mut ob) = (vec![0u8; 2 * na], vec![0u8; 2 * nb]);
                    let mut sa2 = sa;
                    let mut sb2 = sb;
                    match corrupt {
                        Some(0) => sa2[3] ^= 1 << 20,
                        Some(_) => sb2[30] ^= 1 << 20,
                        None => {}
                    }
                    let ja = ChunkJob {
                        states: sa2,
                        words: &ba,
                        n_words: wa.len(),
                        raw: &sma,
                        out: &mut oa,
                    };
                    let jb = ChunkJob {
                        states: sb2,
                        words: &bb,
                        n_words: wb.len(),
                        raw: &smb,
                        out: &mut ob,
                    };
                    let [ra, rb] = decode_chunk_pair(ja, jb, &table);
                    assert_eq!(
                        (ra.is_ok(), rb.is_ok()),
                        (corrupt != Some(0), corrupt != Some(1)),
                        "{na} {nb} {corrupt:?}"
                    );
                    if corrupt != Some(0) {
                        let want: Vec<u8> = ea
                            .iter()
                            .flat_map(|&e| crate::codec::bf16::join(e, 0x81).to_le_bytes())
                            .collect();
                        assert_eq!(oa, want);
                    }
                    if corrupt != Some(1) {
                        let want: Vec<u8> = eb
                            .iter()
                            .flat_map(|&e| crate::codec::bf16::join(e, 0x02).to_le_bytes())
                            .collect();
                        assert_eq!(ob, want);
                    }
                }
            }
        }
    }
}
