//! Interleaved rANS over one chunk of exponent bytes: 32 lanes, 32-bit states, 16-bit words.
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

use super::freq::FreqTable;
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
        *o = EncSymbol { x_max: (f as u64) << (32 - pb), rcp: m, rcp_shift: 32 + l, freq: f, cum: table.cum(s as u8) };
    }
    out
}

/// Encodes the exponents of one chunk. Returns the lanes' final states (the decoder's initial
/// states) and appends the chunk's words, in decoding order, to `words`.
pub fn encode_chunk(exponents: &[u8], syms: &[EncSymbol; 256], prob_bits: u32, words: &mut Vec<u16>) -> [u32; LANES] {
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
            let sym = syms[exponents[base + lane] as usize];
            debug_assert!(sym.freq > 0, "exponent missing from the table");
            let mut x = states[lane];
            let emit = x as u64 >= sym.x_max;
            buf[wp] = x as u16;
            wp += emit as usize;
            x = if emit { x >> 16 } else { x };
            let q = ((x as u128 * sym.rcp as u128) >> sym.rcp_shift) as u32;
            states[lane] = (q << prob_bits) + (x - q * sym.freq) + sym.cum;
        }
    }
    buf[..wp].reverse();
    words.truncate(start + wp);
    states
}

/// A decoding table: per slot the symbol, and `freq << 16 | (slot - cum)` for the state update.
#[derive(Clone, Debug)]
pub struct DecodeTable {
    prob_bits: u32,
    symbol: Vec<u8>,
    update: Vec<u32>,
}

impl DecodeTable {
    /// Builds the decoding table of a code table.
    pub fn new(table: &FreqTable) -> Self {
        let pb = table.prob_bits();
        let mut symbol = Vec::with_capacity(1 << pb);
        let mut update = Vec::with_capacity(1 << pb);
        for s in 0..=255u8 {
            let (f, c) = (table.freq(s), table.cum(s));
            for slot in c..c + f {
                symbol.push(s);
                update.push(f << 16 | (slot - c));
            }
        }
        Self { prob_bits: pb, symbol, update }
    }
}

/// Decodes one chunk into little-endian BF16 bytes (`out.len() == 2 × sign_mantissa.len()`),
/// joining each decoded exponent with its sign+mantissa byte. Checks that the words are
/// consumed exactly and every lane ends at its start state.
///
/// `words` must hold the chunk's words followed by at least one padding word: renormalisation
/// reads are unconditional (no unpredictable branch) and clamp to the padding, so corrupt data
/// can never read past the slice.
pub fn decode_chunk(
    states: &[u32; LANES],
    words: &[u16],
    table: &DecodeTable,
    sign_mantissa: &[u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    debug_assert_eq!(out.len(), 2 * sign_mantissa.len());
    let n_words = words.len() - 1;
    let mut x = *states;
    if let Some(bad) = x.iter().find(|&&s| s < STATE_LOW) {
        return Err(CodecError::Corrupt(format!("lane state {bad:#x} is below the normalised range")));
    }
    let pb = table.prob_bits;
    let mask = (1u32 << pb) - 1;
    let (sym_t, upd_t) = (&table.symbol[..], &table.update[..]);
    let mut pos = 0usize;
    let mut sm_steps = sign_mantissa.chunks_exact(LANES);
    let mut out_steps = out.chunks_exact_mut(2 * LANES);
    for (sm, o) in (&mut sm_steps).zip(&mut out_steps) {
        let sm: &[u8; LANES] = sm.try_into().unwrap();
        let o: &mut [u8; 2 * LANES] = o.try_into().unwrap();
        for lane in 0..LANES {
            x[lane] = decode_one(x[lane], &mut pos, words, n_words, sym_t, upd_t, pb, mask, sm[lane], &mut o[2 * lane..2 * lane + 2]);
        }
    }
    let sm = sm_steps.remainder();
    for (lane, o) in out_steps.into_remainder().chunks_exact_mut(2).enumerate() {
        x[lane] = decode_one(x[lane], &mut pos, words, n_words, sym_t, upd_t, pb, mask, sm[lane], o);
    }
    if pos != n_words {
        return Err(CodecError::Corrupt(format!("chunk decoding wanted {pos} words but the chunk stores {n_words}")));
    }
    if x.iter().any(|&s| s != STATE_LOW) {
        return Err(CodecError::Corrupt("chunk did not decode back to the initial rANS state".into()));
    }
    Ok(())
}

/// Decodes one symbol of one lane: writes its BF16 value and returns the lane's next state.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decode_one(
    xs: u32,
    pos: &mut usize,
    words: &[u16],
    n_words: usize,
    sym_t: &[u8],
    upd_t: &[u32],
    pb: u32,
    mask: u32,
    sm: u8,
    out: &mut [u8],
) -> u32 {
    let slot = (xs & mask) as usize;
    let e = upd_t[slot];
    out.copy_from_slice(&super::bf16::join(sym_t[slot], sm).to_le_bytes());
    let y = (e >> 16) * (xs >> pb) + (e & 0xffff);
    let need = y < STATE_LOW;
    let w = words[(*pos).min(n_words)] as u32;
    *pos += need as usize;
    if need {
        (y << 16) | w
    } else {
        y
    }
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
            assert_eq!(crate::codec::bf16::sign_mantissa(bits), sm[i], "element {i}");
        }
        n_words
    }

    #[test]
    fn roundtrips_partial_and_full_chunks() {
        for n in [0, 1, 31, 32, 33, 100, 4096, 4097] {
            let exps: Vec<u8> = (0..n).map(|i| (120 + (i * 7919 % 13) as u32) as u8).collect();
            roundtrip(&exps, 12);
        }
    }

    #[test]
    fn a_single_symbol_costs_no_words() {
        assert_eq!(roundtrip(&[127u8; 1000], 12), 0);
    }

    #[test]
    fn every_precision_roundtrips_uniform_bytes() {
        let exps: Vec<u8> = (0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
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
            for x in [0u32, 1, f - 1, f, f + 1, u32::MAX / 2, u32::MAX - 1, u32::MAX, (e.x_max - 1).min(u32::MAX as u64) as u32] {
                let q = ((x as u128 * e.rcp as u128) >> e.rcp_shift) as u32;
                assert_eq!(q, x / f, "x={x} f={f}");
            }
        }
    }
}
