//! Whole-tensor encoding: a BF16 tensor becomes a sign+mantissa plane, an exponent code table and
//! independently decodable rANS chunks, encoded and decoded in parallel across CPU threads.
//!
//! Chunk `c` holds elements `[c × chunk_elems, (c + 1) × chunk_elems)` of the row-major tensor
//! (the last one may be shorter). Its words are `exp_words[offsets[c]..offsets[c + 1]]` and its
//! lane states `states[32c..32c + 32]`; nothing before it is needed to decode it, so a GPU kernel
//! that owns rows `r0..r1` of a `K`-column matrix decodes chunks `r0·K / chunk_elems ..=
//! (r1·K - 1) / chunk_elems` and nothing else.

use rayon::prelude::*;

use super::ans::{self, LANES};
use super::bf16;
use super::freq::FreqTable;
use super::CodecError;

/// Encoding parameters. They are recorded in every compressed tensor's metadata, so the decoder
/// never assumes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// Elements per independently decodable chunk (a multiple of 32).
    pub chunk_elems: usize,
    /// Precision of the exponent probabilities, in bits.
    pub prob_bits: u32,
}

impl Default for Params {
    /// 32 Ki elements per chunk: the 128 bytes of lane states plus the 4-byte offset cost 0.3% at
    /// 10.6 bits per weight, and an 8B model still has ~250k chunks to spread over GPU warps.
    /// 12-bit probabilities: a 4 KiB decode table that fits L1 or shared memory, and a
    /// quantisation loss of a few thousandths of a bit per weight.
    fn default() -> Self {
        Self { chunk_elems: 1 << 15, prob_bits: 12 }
    }
}

impl Params {
    /// Checks the parameters a stored tensor claims before anything is sized from them.
    pub fn validate(&self) -> Result<(), CodecError> {
        if self.chunk_elems == 0 || self.chunk_elems % LANES != 0 || self.chunk_elems > 1 << 24 {
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
        Ok(())
    }
}

/// The encoded form of one BF16 tensor, as the parts the container stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedTensor {
    /// Number of BF16 elements.
    pub len: usize,
    /// Parameters the tensor was encoded with.
    pub params: Params,
    /// Exponent histogram of the original data (kept for size reports; not stored).
    pub histogram: [u64; 256],
    /// One `s mmmmmmm` byte per element, in element order.
    pub sign_mantissa: Vec<u8>,
    /// The exponent code table.
    pub table: FreqTable,
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

    /// Bytes the stored parts occupy (sign+mantissa, words, offsets, states, table).
    pub fn stored_bytes(&self) -> usize {
        self.sign_mantissa.len() + 2 * self.exp_words.len() + 4 * self.offsets.len() + 4 * self.states.len() + self.table.to_bytes().len()
    }
}

/// Number of chunks a tensor of `len` elements is cut into.
pub fn chunk_count(len: usize, chunk_elems: usize) -> usize {
    len.div_ceil(chunk_elems)
}

/// Encodes little-endian BF16 bytes.
pub fn encode(bytes: &[u8], params: Params) -> Result<EncodedTensor, CodecError> {
    params.validate()?;
    if bytes.len() % 2 != 0 {
        return Err(CodecError::Invalid(format!("BF16 data has an odd byte length {}", bytes.len())));
    }
    let len = bytes.len() / 2;
    let histogram = exponent_histogram(bytes);
    let table = FreqTable::from_histogram(&histogram, params.prob_bits)?;
    let encoder = ans::ChunkEncoder::new(&table);
    let chunk_bytes = 2 * params.chunk_elems;
    let mut sign_mantissa = vec![0u8; len];
    // One pass per chunk splits the BF16 values and codes the exponents; each worker reuses one
    // scratch buffer and keeps only an exactly sized copy of every chunk's words.
    let pieces: Vec<(Vec<u16>, [u32; LANES])> = bytes
        .par_chunks(chunk_bytes)
        .zip(sign_mantissa.par_chunks_mut(params.chunk_elems))
        .map_init(Vec::new, |scratch, (src, sm)| {
            let (states, words) = encoder.encode_bf16(src, sm, scratch);
            (words.to_vec(), states)
        })
        .collect();
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
    let mut dsts = Vec::with_capacity(pieces.len());
    let mut rest = &mut exp_words[..];
    for (words, _) in &pieces {
        let (dst, tail) = rest.split_at_mut(words.len());
        dsts.push(dst);
        rest = tail;
    }
    dsts.into_par_iter().zip(&pieces).for_each(|(dst, (words, _))| dst.copy_from_slice(words));
    Ok(EncodedTensor { len, params, histogram, sign_mantissa, table, exp_words, offsets, states })
}

/// Borrowed view of stored parts, as read from a container, before decoding.
#[derive(Clone, Copy, Debug)]
pub struct EncodedView<'a> {
    /// Number of BF16 elements.
    pub len: usize,
    /// Parameters the tensor was encoded with.
    pub params: Params,
    /// `len` sign+mantissa bytes.
    pub sign_mantissa: &'a [u8],
    /// Serialised code table (512 bytes).
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
            sign_mantissa: self.sign_mantissa.clone(),
            table: self.table.to_bytes(),
            exp_words: self.exp_words.iter().flat_map(|w| w.to_le_bytes()).collect(),
            offsets: self.offsets.iter().flat_map(|w| w.to_le_bytes()).collect(),
            states: self.states.iter().flat_map(|w| w.to_le_bytes()).collect(),
        }
    }
}

/// Owned stored parts in byte form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parts {
    /// See [`EncodedView::sign_mantissa`].
    pub sign_mantissa: Vec<u8>,
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
            sign_mantissa: &self.sign_mantissa,
            table: &self.table,
            exp_words: &self.exp_words,
            offsets: &self.offsets,
            states: &self.states,
        }
    }
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
        return Err(CodecError::Invalid(format!("output buffer is {} bytes for {len} elements", out.len())));
    }
    let chunks = chunk_count(len, p.chunk_elems);
    let expect = |what: &str, got: usize, want: usize| {
        if got == want {
            Ok(())
        } else {
            Err(CodecError::Corrupt(format!("{what} part is {got} bytes, expected {want}")))
        }
    };
    expect("sign_mantissa", view.sign_mantissa.len(), len)?;
    expect("offsets", view.offsets.len(), 4 * (chunks + 1))?;
    expect("states", view.states.len(), 4 * LANES * chunks)?;
    if view.exp_words.len() % 2 != 0 {
        return Err(CodecError::Corrupt("exponent stream has an odd byte length".into()));
    }
    let table = FreqTable::from_bytes(view.table, p.prob_bits)?;
    let lut = ans::DecodeTable::new(&table);
    let n_words = view.exp_words.len() / 2;
    let mut bounds = Vec::with_capacity(chunks + 1);
    for i in 0..=chunks {
        bounds.push(read_u32(view.offsets, i) as usize);
    }
    if bounds[0] != 0 || bounds[chunks] != n_words || bounds.windows(2).any(|w| w[0] > w[1]) {
        return Err(CodecError::Corrupt("chunk offsets are not increasing from 0 to the stream end".into()));
    }
    out.par_chunks_mut(2 * p.chunk_elems)
        .zip(view.sign_mantissa.par_chunks(p.chunk_elems))
        .enumerate()
        .try_for_each(|(c, (dst, sm))| {
            let mut st = [0u32; LANES];
            for (l, s) in st.iter_mut().enumerate() {
                *s = read_u32(view.states, c * LANES + l);
            }
            // The decoder reads the stored bytes in place; it needs `WORD_PAD_BYTES` readable
            // bytes after the chunk's words, which only the last chunks lack: they get a
            // zero-padded copy.
            let (start, n) = (2 * bounds[c], bounds[c + 1] - bounds[c]);
            let padded;
            let words = if start + 2 * n + ans::WORD_PAD_BYTES <= view.exp_words.len() {
                &view.exp_words[start..]
            } else {
                let mut v = vec![0u8; 2 * n + ans::WORD_PAD_BYTES];
                v[..2 * n].copy_from_slice(&view.exp_words[start..start + 2 * n]);
                padded = v;
                &padded[..]
            };
            ans::decode_chunk_bytes(&st, words, n, &lut, sm, dst).map_err(|e| match e {
                CodecError::Corrupt(m) => CodecError::Corrupt(format!("chunk {c}: {m}")),
                other => other,
            })
        })
}

/// Exponent histogram of little-endian BF16 bytes, in parallel over large inputs because it is
/// the first full pass of every compression (the AVX-512 version extracts 32 exponents per
/// instruction pair; the counting itself stays scalar).
fn exponent_histogram(bytes: &[u8]) -> [u64; 256] {
    #[cfg(target_arch = "x86_64")]
    if super::simd::available() {
        const PIECE: usize = 1 << 20;
        return bytes
            .par_chunks(PIECE)
            .fold(
                || [0u64; 256],
                |mut h, piece| {
                    // SAFETY: `simd::available()` found the kernel's features.
                    unsafe { super::simd::histogram(piece, &mut h) };
                    h
                },
            )
            .reduce(
                || [0u64; 256],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(b.iter()) {
                        *x += y;
                    }
                    a
                },
            );
    }
    bf16::exponent_histogram(bytes)
}

/// Decodes stored parts into a new buffer of little-endian BF16 bytes.
pub fn decode(view: &EncodedView<'_>) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![0u8; 2 * view.len];
    decode_into(view, &mut out)?;
    Ok(out)
}
