//! Whole-tensor encoding: a BF16 tensor becomes a sign+mantissa plane, an exponent code table and
//! independently decodable rANS chunks, encoded and decoded in parallel across CPU threads.
//!
//! Chunk `c` holds elements `[c × chunk_elems, (c + 1) × chunk_elems)` of the row-major tensor
//! (the last one may be shorter). Its words are `exp_words[offsets[c]..offsets[c + 1]]` and its
//! lane states `states[32c..32c + 32]`; nothing before it is needed to decode it, so a GPU kernel
//! that owns rows `r0..r1` of a `K`-column matrix decodes chunks `r0·K / chunk_elems ..=
//! (r1·K - 1) / chunk_elems` and nothing else.
//!
//! CPU throughput notes (the reasons for the shape of [`encode`] and [`decode_into`]):
//! - Encoding is two passes over the input: the value histogram (the code table needs all of
//!   it), then one fused pass per chunk that splits the values and codes the symbols. [`encode`]
//!   reuses one scratch buffer for words per worker thread and concatenates the chunks' words in
//!   parallel at the end. `compress` instead counts the values as it reads them
//!   ([`model::ValueCounts`]) and codes with [`encode_into`] into reused buffers, each chunk's
//!   words in place in a slot of their own, which are written from there: no copy, and no fresh
//!   buffer to zero, per tensor.
//! - Decoding reads the stored word bytes in place (only the last chunk or two, which lack
//!   padding after their words, are copied) and decodes chunks two at a time, see
//!   [`ans::decode_chunk_pair`].
//! - A fresh multi-megabyte output buffer costs a page fault per 4 KiB on first write, which
//!   used to cost more than the decoding itself; [`decode`] and [`encode`] ask for huge pages.

use rayon::prelude::*;

use super::ans::{self, LANES};
use super::freq::FreqTable;
use super::model::{self, SymbolModel};
use super::CodecError;

/// Encoding parameters. They are recorded in every compressed tensor's metadata, so the decoder
/// never assumes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// Elements per independently decodable chunk (a multiple of 32).
    pub chunk_elems: usize,
    /// Precision of the symbol probabilities, in bits.
    pub prob_bits: u32,
    /// Leading mantissa bits coded with the exponent: 0 (format version 1's model) or
    /// [`model::V2_MANTISSA_BITS`]. The encoder falls back to 0 for a tensor with more distinct
    /// keys than a table numbers, and records what it used.
    pub mantissa_bits: u32,
}

impl Default for Params {
    /// Version 2's parameters (docs/format.md §5 has the measurements): the exponent and 3
    /// leading mantissa bits coded; 15-bit probabilities, because the ~200 symbols of that model
    /// include ~100 rare ones that each take at least one unit of probability (12 bits lose 0.0022
    /// of the BF16 size to that, 15 bits 0.0003); 1 Mi elements per chunk, so the 132 bytes of
    /// lane states and offset cost 0.006% of the size (64 Ki: 0.1%).
    fn default() -> Self {
        Self {
            chunk_elems: DEFAULT_CHUNK_ELEMS,
            prob_bits: 15,
            mantissa_bits: model::V2_MANTISSA_BITS,
        }
    }
}

/// Elements per chunk that version 2 writes (see [`Params::default`]).
pub const DEFAULT_CHUNK_ELEMS: usize = 1 << 20;

/// The smallest chunk [`Params::for_tensor`] picks.
pub const MIN_CHUNK_ELEMS: usize = 1 << 16;

impl Params {
    /// The parameters `compress` uses for a tensor of `len` elements: at least 16 chunks (so
    /// that decoding a mid-sized tensor still runs in parallel, two chunks per thread), but no
    /// chunk smaller than [`MIN_CHUNK_ELEMS`] (the lane states of a chunk cost 0.1% of a 64 Ki
    /// chunk) nor larger than `chunk_elems`, in powers of two; and at most `len / 32` table
    /// slots (`prob_bits` down to 12, never above `prob_bits`), because building the decoding
    /// and encoding tables of `2^prob_bits` slots is per-tensor work that small tensors do not
    /// amortise.
    pub fn for_tensor(self, len: usize) -> Self {
        let want = (len / 16).next_power_of_two().max(MIN_CHUNK_ELEMS);
        let slots_bits = (len / 32)
            .max(1)
            .ilog2()
            .clamp(12, super::freq::MAX_PROB_BITS);
        Self {
            chunk_elems: want.min(self.chunk_elems),
            prob_bits: self.prob_bits.min(slots_bits),
            ..self
        }
    }

    /// Checks the parameters a stored tensor claims before anything is sized from them.
    pub fn validate(&self) -> Result<(), CodecError> {
        if self.chunk_elems == 0
            || !self.chunk_elems.is_multiple_of(LANES)
            || self.chunk_elems > 1 << 24
        {
            return Err(CodecError::Corrupt(format!(
                "chunk size {} is not a multiple of {LANES} in 32..=16777216",
                self.chunk_elems
            )));
        }
        if !(super::freq::MIN_PROB_BITS..=super::freq::MAX_PROB_BITS).contains(&self.prob_bits) {
            return Err(CodecError::Corrupt(format!(
                "probability precision {} bits is unsupported",
                self.prob_bits
            )));
        }
        if self.mantissa_bits != 0 && self.mantissa_bits != model::V2_MANTISSA_BITS {
            return Err(CodecError::Corrupt(format!(
                "{} coded mantissa bits is unsupported (0 or {})",
                self.mantissa_bits,
                model::V2_MANTISSA_BITS
            )));
        }
        Ok(())
    }
}

/// The encoded form of one BF16 tensor, as the parts the container stores.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedTensor {
    /// Number of BF16 elements.
    pub len: usize,
    /// Parameters the tensor was encoded with (`mantissa_bits` as actually used).
    pub params: Params,
    /// Entropy of the exponents in bits per value (for size reports; not stored).
    pub exponent_entropy_bits: f64,
    /// Order-0 entropy of the whole 16-bit values in bits per value (reports; not stored).
    pub value_entropy_bits: f64,
    /// The raw plane: the bits the symbols do not code (see [`super::model`]).
    pub raw: Vec<u8>,
    /// The symbol code table.
    pub table: FreqTable,
    /// What the symbols stand for.
    pub model: SymbolModel,
    /// All chunks' rANS words, chunk after chunk.
    pub exp_words: Vec<u16>,
    /// `chunks + 1` word offsets into `exp_words`.
    pub offsets: Vec<u32>,
    /// 32 initial decoder states per chunk.
    pub states: Vec<u32>,
}

impl EncodedTensor {
    /// Number of chunks.
    pub fn chunks(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Bytes the stored parts occupy (raw plane, words, offsets, states, table).
    pub fn stored_bytes(&self) -> usize {
        self.raw.len()
            + 2 * self.exp_words.len()
            + 4 * self.offsets.len()
            + 4 * self.states.len()
            + self.table_bytes().len()
    }

    /// The serialised code table: the frequency table, then (with coded mantissa bits) the key
    /// of every symbol.
    pub fn table_bytes(&self) -> Vec<u8> {
        let mut b = self.table.to_bytes();
        b.extend(self.model.keys_to_bytes());
        b
    }
}

/// Number of chunks a tensor of `len` elements is cut into.
pub fn chunk_count(len: usize, chunk_elems: usize) -> usize {
    len.div_ceil(chunk_elems)
}

/// The code of one tensor, decided from its statistics before any value is coded.
struct Coding {
    params: Params,
    table: FreqTable,
    model: SymbolModel,
    exponent_entropy_bits: f64,
}

/// Checks the input and decides the model and code table (see [`encode`]).
fn coding(bytes: &[u8], params: Params, stats: &model::TensorStats) -> Result<Coding, CodecError> {
    params.validate()?;
    if !bytes.len().is_multiple_of(2) {
        return Err(CodecError::Invalid(format!(
            "BF16 data has an odd byte length {}",
            bytes.len()
        )));
    }
    // The keys of the asked mantissa bits; the exponent histogram is their sum over the
    // mantissa bits.
    let wanted = stats.key_histogram(params.mantissa_bits);
    let exp_hist = model::coarser_key_histogram(&wanted, params.mantissa_bits, 0);
    let mut params = params;
    let model = SymbolModel::from_key_histogram(&wanted, params.mantissa_bits)
        .filter(|m| m.mantissa_bits() == params.mantissa_bits);
    let (model, key_hist) = match model {
        Some(m) => (m, wanted),
        None => {
            // More distinct keys than a table numbers (not weights): the exponent model.
            params.mantissa_bits = 0;
            (SymbolModel::exponent(), exp_hist.clone())
        }
    };
    let table = FreqTable::from_histogram(&model.symbol_histogram(&key_hist), params.prob_bits)?;
    Ok(Coding {
        params,
        table,
        model,
        exponent_entropy_bits: model::entropy(&exp_hist),
    })
}

/// Encodes little-endian BF16 bytes.
pub fn encode(bytes: &[u8], params: Params) -> Result<EncodedTensor, CodecError> {
    if !bytes.len().is_multiple_of(2) {
        return Err(CodecError::Invalid(format!(
            "BF16 data has an odd byte length {}",
            bytes.len()
        )));
    }
    let stats = model::TensorStats::of(bytes);
    let Coding {
        params,
        table,
        model,
        exponent_entropy_bits,
    } = coding(bytes, params, &stats)?;
    let len = bytes.len() / 2;
    let encoder = ans::ChunkEncoder::with_model(&table, &model);
    let chunk_bytes = 2 * params.chunk_elems;
    let mut raw = vec![0u8; model::raw_len(len, params.mantissa_bits)];
    advise_huge_pages(&mut raw);
    // One pass per chunk splits the BF16 values and codes the symbols; each worker reuses one
    // scratch buffer and keeps only an exactly sized copy of every chunk's words.
    // A tensor of one chunk is coded on the calling thread: waking the pool for it costs more
    // than the coding (a checkpoint has hundreds of norm-sized and small tensors).
    let raw_chunk = model::raw_len(params.chunk_elems, params.mantissa_bits);
    let small = len <= params.chunk_elems;
    let pieces: Vec<(Vec<u16>, [u32; LANES])> = if small {
        let mut scratch = Vec::new();
        bytes
            .chunks(chunk_bytes)
            .zip(raw.chunks_mut(raw_chunk))
            .map(|(src, r)| {
                let (states, words) = encoder.encode_bf16(src, r, &mut scratch);
                (words.to_vec(), states)
            })
            .collect()
    } else {
        bytes
            .par_chunks(chunk_bytes)
            .zip(raw.par_chunks_mut(raw_chunk))
            .map_init(Vec::new, |scratch, (src, r)| {
                let (states, words) = encoder.encode_bf16(src, r, scratch);
                (words.to_vec(), states)
            })
            .collect()
    };
    let total_words: usize = pieces.iter().map(|(w, _)| w.len()).sum();
    if total_words > u32::MAX as usize {
        return Err(CodecError::Invalid(format!(
            "tensor of {len} elements needs {total_words} words, more than 32-bit offsets address"
        )));
    }
    let mut offsets = Vec::with_capacity(pieces.len() + 1);
    let mut states = Vec::with_capacity(pieces.len() * LANES);
    offsets.push(0);
    for (words, st) in &pieces {
        offsets.push(offsets[offsets.len() - 1] + words.len() as u32);
        states.extend_from_slice(st);
    }
    // Concatenate in parallel: the stream is a third of the input, too much for one thread.
    let mut exp_words = vec![0u16; total_words];
    advise_huge_pages(&mut exp_words);
    let mut dsts = Vec::with_capacity(pieces.len());
    let mut rest = &mut exp_words[..];
    for (words, _) in &pieces {
        let (dst, tail) = rest.split_at_mut(words.len());
        dsts.push(dst);
        rest = tail;
    }
    if small {
        for (dst, (words, _)) in dsts.into_iter().zip(&pieces) {
            dst.copy_from_slice(words);
        }
    } else {
        dsts.into_par_iter()
            .zip(&pieces)
            .for_each(|(dst, (words, _))| dst.copy_from_slice(words));
    }
    Ok(EncodedTensor {
        len,
        params,
        exponent_entropy_bits,
        value_entropy_bits: stats.value_entropy_bits,
        raw,
        table,
        model,
        exp_words,
        offsets,
        states,
    })
}

/// A tensor coded into the caller's buffers by [`encode_into`]: everything of an
/// [`EncodedTensor`] but the raw plane and the words, which stay where they were coded.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedChunks {
    /// Number of BF16 elements.
    pub len: usize,
    /// Parameters the tensor was encoded with (`mantissa_bits` as actually used).
    pub params: Params,
    /// Entropy of the exponents in bits per value (reports; not stored).
    pub exponent_entropy_bits: f64,
    /// Order-0 entropy of the whole 16-bit values in bits per value (reports; not stored).
    pub value_entropy_bits: f64,
    /// The symbol code table.
    pub table: FreqTable,
    /// What the symbols stand for.
    pub model: SymbolModel,
    /// `chunks + 1` word offsets, as stored (see [`EncodedTensor::offsets`]).
    pub offsets: Vec<u32>,
    /// 32 initial decoder states per chunk.
    pub states: Vec<u32>,
}

impl EncodedChunks {
    /// Elements of the words buffer one chunk's slot takes: at most one word per symbol, and room
    /// for the SIMD kernel's full-width stores.
    pub fn slot_words(&self) -> usize {
        self.params.chunk_elems + LANES
    }

    /// Bytes of the raw plane, the start of the raw buffer [`encode_into`] coded into.
    pub fn raw_bytes(&self) -> usize {
        model::raw_len(self.len, self.params.mantissa_bits)
    }

    /// Where each chunk's words lie in the words buffer [`encode_into`] coded into, in order;
    /// the concatenation of those words is the stored word stream.
    pub fn chunk_word_ranges(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        let slot = self.slot_words();
        self.offsets.windows(2).enumerate().map(move |(c, w)| {
            let n = (w[1] - w[0]) as usize;
            c * slot..c * slot + n
        })
    }

    /// Each chunk's words in order, out of the words buffer [`encode_into`] coded into.
    pub fn chunk_words<'w>(&'w self, words: &'w [u16]) -> impl Iterator<Item = &'w [u16]> + 'w {
        self.chunk_word_ranges().map(move |r| &words[r])
    }

    /// The serialised code table (see [`EncodedTensor::table_bytes`]).
    pub fn table_bytes(&self) -> Vec<u8> {
        let mut b = self.table.to_bytes();
        b.extend(self.model.keys_to_bytes());
        b
    }
}

/// [`encode`] with the statistics already gathered (see [`model::ValueCounts`]) and into the
/// caller's buffers, which may be reused from tensor to tensor: the raw plane is coded into the
/// start of `raw` ([`EncodedChunks::raw_bytes`]), and chunk `c`'s words in place into slot `c`
/// of `words`, so no word is copied after it is coded ([`EncodedChunks::chunk_words`] finds
/// them). A buffer too short grows (a fresh one is allocated zeroed, which costs nothing until
/// its pages are written); none shrinks, and what was in them is overwritten, never read. A
/// tensor of one chunk is coded on the calling thread (waking the pool for it costs more than
/// the coding), a larger one on all of the pool's threads.
pub fn encode_into(
    bytes: &[u8],
    params: Params,
    stats: &model::TensorStats,
    raw: &mut Vec<u8>,
    words: &mut Vec<u16>,
) -> Result<EncodedChunks, CodecError> {
    let Coding {
        params,
        table,
        model,
        exponent_entropy_bits,
    } = coding(bytes, params, stats)?;
    let len = bytes.len() / 2;
    let chunks = chunk_count(len, params.chunk_elems);
    let slot = params.chunk_elems + LANES;
    let raw_len = model::raw_len(len, params.mantissa_bits);
    // Every byte of the raw plane is written: 2 MiB pages make that 512 times fewer faults.
    // Only about a third of each word slot is: small pages leave the rest untouched.
    grow_to(raw, raw_len, true);
    grow_to(words, chunks * slot, false);
    let (raw, words) = (&mut raw[..raw_len], &mut words[..chunks * slot]);
    let encoder = ans::ChunkEncoder::with_model(&table, &model);
    let raw_chunk = model::raw_len(params.chunk_elems, params.mantissa_bits);
    let code = |((src, r), w): ((&[u8], &mut [u8]), &mut [u16])| {
        let n = src.len() / 2;
        encoder.encode_bf16_slice(src, r, &mut w[..n + LANES])
    };
    let chunk_bytes = 2 * params.chunk_elems;
    let coded: Vec<([u32; LANES], usize)> = if chunks <= 1 {
        bytes
            .chunks(chunk_bytes)
            .zip(raw.chunks_mut(raw_chunk))
            .zip(words.chunks_mut(slot))
            .map(code)
            .collect()
    } else {
        bytes
            .par_chunks(chunk_bytes)
            .zip(raw.par_chunks_mut(raw_chunk))
            .zip(words.par_chunks_mut(slot))
            .map(code)
            .collect()
    };
    let total_words: usize = coded.iter().map(|&(_, n)| n).sum();
    if total_words > u32::MAX as usize {
        return Err(CodecError::Invalid(format!(
            "tensor of {len} elements needs {total_words} words, more than 32-bit offsets address"
        )));
    }
    let mut offsets = Vec::with_capacity(chunks + 1);
    let mut states = Vec::with_capacity(chunks * LANES);
    offsets.push(0u32);
    for (st, n) in &coded {
        offsets.push(offsets[offsets.len() - 1] + *n as u32);
        states.extend_from_slice(st);
    }
    Ok(EncodedChunks {
        len,
        params,
        exponent_entropy_bits,
        value_entropy_bits: stats.value_entropy_bits,
        table,
        model,
        offsets,
        states,
    })
}

/// Makes a reused buffer at least `len` long: nothing to do when it is, else a fresh zeroed
/// buffer (pages the allocator maps fresh are zero without being written; `huge` offers them as
/// 2 MiB pages, see [`advise_huge_pages`]).
fn grow_to<T: Copy + Default>(buf: &mut Vec<T>, len: usize, huge: bool) {
    if buf.len() >= len {
        return;
    }
    *buf = Vec::new();
    let mut fresh = vec![T::default(); len];
    if huge {
        advise_huge_pages(&mut fresh);
    }
    *buf = fresh;
}

/// Borrowed view of stored parts, as read from a container, before decoding.
#[derive(Clone, Copy, Debug)]
pub struct EncodedView<'a> {
    /// Number of BF16 elements.
    pub len: usize,
    /// Parameters the tensor was encoded with.
    pub params: Params,
    /// The raw plane (see [`super::model`]).
    pub raw: &'a [u8],
    /// Serialised code table (see [`EncodedTensor::table_bytes`]).
    pub table: &'a [u8],
    /// rANS words as little-endian bytes.
    pub exp_words: &'a [u8],
    /// `chunks + 1` little-endian u32 word offsets.
    pub offsets: &'a [u8],
    /// `32 × chunks` little-endian u32 states.
    pub states: &'a [u8],
}

impl EncodedTensor {
    /// Borrows the parts in their stored byte form (little-endian), for tests and in-memory use.
    pub fn to_parts(&self) -> Parts {
        Parts {
            raw: self.raw.clone(),
            table: self.table_bytes(),
            exp_words: self
                .exp_words
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect(),
            offsets: self.offsets.iter().flat_map(|w| w.to_le_bytes()).collect(),
            states: self.states.iter().flat_map(|w| w.to_le_bytes()).collect(),
        }
    }
}

/// Owned stored parts in byte form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parts {
    /// See [`EncodedView::raw`].
    pub raw: Vec<u8>,
    /// See [`EncodedView::table`].
    pub table: Vec<u8>,
    /// See [`EncodedView::exp_words`].
    pub exp_words: Vec<u8>,
    /// See [`EncodedView::offsets`].
    pub offsets: Vec<u8>,
    /// See [`EncodedView::states`].
    pub states: Vec<u8>,
}

impl Parts {
    /// A borrowed view for decoding.
    pub fn view(&self, len: usize, params: Params) -> EncodedView<'_> {
        EncodedView {
            len,
            params,
            raw: &self.raw,
            table: &self.table,
            exp_words: &self.exp_words,
            offsets: &self.offsets,
            states: &self.states,
        }
    }
}

/// Parses a serialised code table (see [`EncodedTensor::table_bytes`]).
pub fn parse_table(
    bytes: &[u8],
    prob_bits: u32,
    mantissa_bits: u32,
) -> Result<(FreqTable, SymbolModel), CodecError> {
    let k = 1 + *bytes
        .first()
        .ok_or_else(|| CodecError::Corrupt("empty code table".into()))? as usize;
    let freq_len = (1 + 3 * k).min(bytes.len());
    let (freq, keys) = bytes.split_at(freq_len);
    let table = FreqTable::from_bytes(freq, prob_bits)?;
    if mantissa_bits != 0 && table.freq((k - 1) as u8) == 0 {
        return Err(CodecError::Corrupt(format!(
            "code table symbols are not the ranks 0..{k}"
        )));
    }
    let model = SymbolModel::from_key_bytes(keys, k, mantissa_bits)?;
    Ok((table, model))
}

fn read_u32(bytes: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap())
}

/// Decodes stored parts into little-endian BF16 bytes (`out.len() == 2 × len`), in parallel.
///
/// Every size and offset is checked against the others before use, so corrupted parts give a
/// [`CodecError::Corrupt`] naming what is inconsistent, never a panic or an out-of-bounds read.
pub fn decode_into(view: &EncodedView<'_>, out: &mut [u8]) -> Result<(), CodecError> {
    let p = view.params;
    p.validate()?;
    let len = view.len;
    if out.len() != 2 * len {
        return Err(CodecError::Invalid(format!(
            "output buffer is {} bytes for {len} elements",
            out.len()
        )));
    }
    let chunks = chunk_count(len, p.chunk_elems);
    let expect = |what: &str, got: usize, want: usize| {
        if got == want {
            Ok(())
        } else {
            Err(CodecError::Corrupt(format!(
                "{what} part is {got} bytes, expected {want}"
            )))
        }
    };
    expect("raw", view.raw.len(), model::raw_len(len, p.mantissa_bits))?;
    expect("offsets", view.offsets.len(), 4 * (chunks + 1))?;
    expect("states", view.states.len(), 4 * LANES * chunks)?;
    if !view.exp_words.len().is_multiple_of(2) {
        return Err(CodecError::Corrupt(
            "exponent stream has an odd byte length".into(),
        ));
    }
    let (table, sym_model) = parse_table(view.table, p.prob_bits, p.mantissa_bits)?;
    let lut = ans::DecodeTable::with_model(&table, &sym_model);
    let n_words = view.exp_words.len() / 2;
    let mut bounds = Vec::with_capacity(chunks + 1);
    for i in 0..=chunks {
        bounds.push(read_u32(view.offsets, i) as usize);
    }
    if bounds[0] != 0 || bounds[chunks] != n_words || bounds.windows(2).any(|w| w[0] > w[1]) {
        return Err(CodecError::Corrupt(
            "chunk offsets are not increasing from 0 to the stream end".into(),
        ));
    }
    // Chunks go in pairs: the SIMD decoder runs two chunks in lockstep to hide its latency.
    let ce = p.chunk_elems;
    let pair = |(g, (dst, sm)): (usize, (&mut [u8], &[u8]))| -> Result<(), CodecError> {
        let mut padded = [Vec::new(), Vec::new()];
        let mut jobs = dst
            .chunks_mut(2 * ce)
            .zip(sm.chunks(model::raw_len(ce, p.mantissa_bits)))
            .zip(&mut padded)
            .enumerate()
            .map(|(i, ((out, sm), pad))| {
                let c = 2 * g + i;
                let mut states = [0u32; LANES];
                for (l, s) in states.iter_mut().enumerate() {
                    *s = read_u32(view.states, c * LANES + l);
                }
                // The decoder reads the stored bytes in place; it needs `WORD_PAD_BYTES`
                // readable bytes after the chunk's words, which only the last chunks lack:
                // they get a zero-padded copy.
                let (start, n_words) = (2 * bounds[c], bounds[c + 1] - bounds[c]);
                let words = if start + 2 * n_words + ans::WORD_PAD_BYTES <= view.exp_words.len() {
                    &view.exp_words[start..]
                } else {
                    pad.resize(2 * n_words + ans::WORD_PAD_BYTES, 0);
                    pad[..2 * n_words].copy_from_slice(&view.exp_words[start..start + 2 * n_words]);
                    &pad[..]
                };
                ans::ChunkJob {
                    states,
                    words,
                    n_words,
                    raw: sm,
                    out,
                }
            });
        let first = jobs.next().expect("a chunk group holds at least one chunk");
        let results = match jobs.next() {
            Some(second) => ans::decode_chunk_pair(first, second, &lut),
            None => [
                ans::decode_chunk_bytes(
                    &first.states,
                    first.words,
                    first.n_words,
                    &lut,
                    first.raw,
                    first.out,
                ),
                Ok(()),
            ],
        };
        for (i, r) in results.into_iter().enumerate() {
            r.map_err(|e| match e {
                CodecError::Corrupt(m) => CodecError::Corrupt(format!("chunk {}: {m}", 2 * g + i)),
                other => other,
            })?;
        }
        Ok(())
    };
    let raw_pair = model::raw_len(2 * ce, p.mantissa_bits);
    if chunks <= 2 {
        // One pair: decode on the calling thread rather than wake the pool for it.
        out.chunks_mut(4 * ce)
            .zip(view.raw.chunks(raw_pair))
            .enumerate()
            .try_for_each(pair)
    } else {
        out.par_chunks_mut(4 * ce)
            .zip(view.raw.par_chunks(raw_pair))
            .enumerate()
            .try_for_each(pair)
    }
}

/// Decodes stored parts into a new buffer of little-endian BF16 bytes.
pub fn decode(view: &EncodedView<'_>) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![0u8; 2 * view.len];
    advise_huge_pages(&mut out);
    decode_into(view, &mut out)?;
    Ok(out)
}

/// Asks the kernel to back a fresh, still untouched buffer with 2 MiB pages.
///
/// A large `vec![0; n]` is fresh zero pages from `mmap`: the codec's parallel pass then takes one
/// page fault per 4 KiB it writes, and those faults (not the coding) dominated a fresh 128 MiB
/// decode and stopped it from scaling past one thread. With transparent huge pages in `madvise`
/// mode, the usual default, this makes it one fault per 2 MiB. Only a hint: errors are ignored,
/// and the contents are unaffected.
pub(crate) fn advise_huge_pages<T>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(buf);
        if bytes < 2 * HUGE {
            return;
        }
        let start = buf.as_mut_ptr() as usize;
        let (lo, hi) = ((start + 4095) & !4095, (start + bytes) & !4095);
        // SAFETY: `[lo, hi)` is page aligned and inside memory this buffer owns; MADV_HUGEPAGE
        // only changes how the kernel backs the pages, never their contents or validity.
        unsafe {
            libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::codec::bf16;

    /// The tensor encoding built from the reference chunk encoder, one chunk at a time, with the
    /// symbols and the raw plane computed naively from the definitions in `model`'s docs.
    fn reference(bytes: &[u8], params: Params) -> EncodedTensor {
        let len = bytes.len() / 2;
        let bits: Vec<u16> = (0..len).map(|i| bf16::load(bytes, i)).collect();
        let mut exp_hist = [0u64; 256];
        let mut values = vec![0u64; 1 << 16];
        for &b in &bits {
            exp_hist[bf16::exponent(b) as usize] += 1;
            values[b as usize] += 1;
        }
        let m = params.mantissa_bits;
        let key = |b: u16| ((b >> (7 - m)) & ((1 << (8 + m)) - 1)) as usize;
        let mut key_count = vec![0u64; 1 << (8 + m)];
        for &b in &bits {
            key_count[key(b)] += 1;
        }
        let mut keys: Vec<usize> = (0..key_count.len()).filter(|&k| key_count[k] > 0).collect();
        let m = if m > 0 && keys.len() > 256 { 0 } else { m };
        let params = Params {
            mantissa_bits: m,
            ..params
        };
        let (symbols, raw, hist, model) = if m == 0 {
            let sm = bits.iter().map(|&b| bf16::sign_mantissa(b)).collect();
            let exps: Vec<u8> = bits.iter().map(|&b| bf16::exponent(b)).collect();
            (exps, sm, exp_hist, SymbolModel::exponent())
        } else {
            if keys.is_empty() {
                keys.push(0);
            }
            keys.sort_by_key(|&k| (std::cmp::Reverse(key_count[k]), k));
            let mut rank = vec![0u8; key_count.len()];
            let mut hist = [0u64; 256];
            for (r, &k) in keys.iter().enumerate() {
                rank[k] = r as u8;
                hist[r] = key_count[k];
            }
            let mut raw = vec![0u8; 20 * len.div_ceil(32)];
            for (i, &b) in bits.iter().enumerate() {
                raw[20 * (i / 32) + (i % 32) / 2] |= ((b & 0xf) as u8) << (4 * (i % 2));
                raw[20 * (i / 32) + 16 + (i % 32) / 8] |= ((b >> 15) as u8) << (i % 8);
            }
            let key_bytes: Vec<u8> = keys
                .iter()
                .flat_map(|&k| (k as u16).to_le_bytes())
                .collect();
            let model = SymbolModel::from_key_bytes(&key_bytes, keys.len(), m).unwrap();
            (
                bits.iter().map(|&b| rank[key(b)]).collect(),
                raw,
                hist,
                model,
            )
        };
        let table = FreqTable::from_histogram(&hist, params.prob_bits).unwrap();
        let syms = ans::enc_symbols(&table);
        let (mut exp_words, mut offsets, mut states) = (Vec::new(), vec![0u32], Vec::new());
        for c in symbols.chunks(params.chunk_elems) {
            states.extend(ans::encode_chunk(
                c,
                &syms,
                params.prob_bits,
                &mut exp_words,
            ));
            offsets.push(exp_words.len() as u32);
        }
        EncodedTensor {
            len,
            params,
            exponent_entropy_bits: bf16::entropy_bits(&exp_hist),
            value_entropy_bits: model::entropy(&values),
            raw,
            table,
            model,
            exp_words,
            offsets,
            states,
        }
    }

    /// Weight-like values: N(0, 0.02) BF16.
    fn normal(n: usize, seed: u64) -> Vec<u8> {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
        let d = Normal::new(0f32, 0.02).unwrap();
        (0..n)
            .flat_map(|_| crate::model::synth::f32_to_bf16(d.sample(&mut rng)).to_le_bytes())
            .collect()
    }

    fn weights(n: usize, seed: u32) -> Vec<u8> {
        // Deterministic weight-like values: a narrow band of exponents, with outliers.
        (0..n as u32)
            .flat_map(|i| {
                let h = (i ^ seed)
                    .wrapping_mul(2654435761)
                    .rotate_left(13)
                    .wrapping_mul(40503);
                let e = 118 + (h >> 28) % 6 + if h.is_multiple_of(97) { h % 200 } else { 0 };
                let bits =
                    ((h & 0x8000) as u16) | ((e as u16 & 0xff) << 7) | (h >> 9) as u16 & 0x7f;
                bits.to_le_bytes()
            })
            .collect()
    }

    #[test]
    fn encode_matches_the_reference_and_decodes_back() {
        let mut fell_back = 0;
        // `encode_into`'s buffers are reused across all cases, starting dirty and too long.
        let (mut raw, mut words) = (vec![0xa5u8; 1 << 20], vec![0x5a5au16; 3 << 19]);
        for (n, chunk_elems, prob_bits) in [
            (0, 32, 12),
            (1, 32, 12),
            (33, 32, 8),
            (100_000, 4096, 12),
            (3 * 4096, 4096, 11),
            (70_001, 1024, 15),
            (5 * 64 + 7, 64, 13),
        ] {
            for mantissa_bits in [0, 3] {
                // `weights` has outliers over ~200 exponents: large ones fall back to 0.
                for (bytes, is_normal) in
                    [(weights(n, n as u32), false), (normal(n, n as u64), true)]
                {
                    let params = Params {
                        chunk_elems,
                        prob_bits,
                        mantissa_bits,
                    };
                    let enc = encode(&bytes, params).unwrap();
                    let want = reference(&bytes, params);
                    assert_eq!(enc, want, "n {n} params {params:?}");
                    let stats = model::TensorStats::of(&bytes);
                    let into = encode_into(&bytes, params, &stats, &mut raw, &mut words).unwrap();
                    assert_eq!(
                        raw[..into.raw_bytes()],
                        want.raw,
                        "raw plane in place, n {n} params {params:?}"
                    );
                    assert_eq!(
                        into.chunk_words(&words).collect::<Vec<_>>().concat(),
                        want.exp_words,
                        "words in place, n {n} params {params:?}"
                    );
                    assert_eq!(
                        (
                            &into.offsets,
                            &into.states,
                            &into.table,
                            &into.model,
                            into.params
                        ),
                        (
                            &want.offsets,
                            &want.states,
                            &want.table,
                            &want.model,
                            want.params
                        )
                    );
                    assert_eq!(into.table_bytes(), want.table_bytes());
                    if mantissa_bits == 3 && enc.params.mantissa_bits == 0 {
                        assert!(!is_normal, "normal weights use the v2 model, n {n}");
                        fell_back += 1;
                    }
                    let parts = enc.to_parts();
                    assert_eq!(
                        decode(&parts.view(n, enc.params)).unwrap(),
                        bytes,
                        "n {n} params {params:?}"
                    );
                }
            }
        }
        assert!(
            fell_back > 0,
            "the fallback to the exponent model is exercised"
        );
    }

    #[test]
    fn a_corrupt_chunk_is_named_whichever_half_of_a_pair_it_is() {
        for bytes in [weights(5 * 1024 + 100, 7), normal(5 * 1024 + 100, 7)] {
            let params = Params {
                chunk_elems: 1024,
                prob_bits: 12,
                mantissa_bits: 3,
            };
            let n = bytes.len() / 2;
            let enc = encode(&bytes, params).unwrap();
            let params = enc.params;
            for c in 0..enc.chunks() {
                let mut parts = enc.to_parts();
                // A state outside the normalised range, in lane 5 of chunk `c`.
                parts.states[4 * (c * LANES + 5)..][..4].copy_from_slice(&7u32.to_le_bytes());
                let err = decode(&parts.view(n, params)).unwrap_err();
                assert!(err.to_string().contains(&format!("chunk {c}:")), "{err}");
                // One flipped word in the middle of chunk `c`.
                let mut parts = enc.to_parts();
                let w = (enc.offsets[c] + enc.offsets[c + 1]) as usize / 2;
                parts.exp_words[2 * w] ^= 0x10;
                let err = decode(&parts.view(n, params)).unwrap_err();
                assert!(err.to_string().contains(&format!("chunk {c}:")), "{err}");
            }
        }
    }
}
