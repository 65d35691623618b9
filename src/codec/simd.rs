//! AVX-512 kernels for the chunk coder of [`super::ans`], bit-exact with its scalar reference.
//!
//! The 32 interleaved lanes of a chunk are exactly two 16 × u32 AVX-512 registers, so one
//! decoding step (32 symbols) is two table gathers, a few multiplies and one shared word refill.
//! Everything here produces the same bytes, states and errors as the scalar code; the scalar code
//! stays the specification and the fallback (no AVX-512 at run time, other architectures, and,
//! for decoding, `prob_bits > 12`).
//!
//! Decoder:
//! - For `prob_bits <= 12` one decoding-table entry fits one u32: `symbol << 24 | (freq - 1) << 12
//!   | (slot - cum)`, so a single `vpgatherdd` yields everything 16 lanes need.
//! - Renormalisation: the lanes that fall below `2^16` form a 32-bit mask; 32 words are loaded
//!   from the stream position and `vpexpandw` (register form: the memory form is microcoded and
//!   slow on Zen 4) hands them out in ascending lane order, which is the stream order; the
//!   position advances by the mask's popcount. One load per step keeps the position's dependency
//!   chain short.
//! - Reads are made safe on corrupt data by clamping the load position to the chunk's word count
//!   and requiring [`WORD_PAD_BYTES`] of readable bytes after the chunk's words: a corrupt chunk
//!   only ever reads garbage inside the slice, and its position or final states then fail the
//!   same checks as the scalar decoder.
//!
//! Encoder:
//! - The division `x / freq` is an exact `f64` division (`x < 2^32`, `freq <= 2^15`: the quotient
//!   is at least `1/freq` away from the next integer, far more than the rounding error, so
//!   truncation gives the integer quotient), and the state update is `x + q·(2^pb - freq) + cum`.
//! - The scalar encoder emits, per step, the words of lanes 31 down to 0; holding the lanes in
//!   reversed order (register A = lanes 31..16, B = lanes 15..0) makes `vpcompressd` (register
//!   form) emit them in that same order, so the buffer is reversed once at the end, as in scalar.
//! - The BF16 split (sign+mantissa plane, exponent) is fused into the encoder's pass over the
//!   input, and the gather indexes a 512-entry table by `bits >> 7` directly (the sign bit
//!   selects a duplicate half), saving the mask.

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{decode_chunk, encode_chunk, histogram};

/// Bytes that must be readable after a chunk's words for the SIMD decoder's unaligned loads.
pub const WORD_PAD_BYTES: usize = 64;

/// Largest `prob_bits` the SIMD decoder handles (its packed table entry has 12-bit fields).
pub const MAX_SIMD_DECODE_PROB_BITS: u32 = 12;

/// Whether the AVX-512 kernels can run on this CPU (detected once, then cached by std).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vbmi2")
            && std::arch::is_x86_feature_detected!("popcnt")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The SIMD decoder's packed table for `prob_bits <= 12`: per slot
/// `symbol << 24 | (freq - 1) << 12 | (slot - cum)`.
pub fn pack_decode_table(symbol: &[u8], update: &[u32]) -> Vec<u32> {
    symbol
        .iter()
        .zip(update)
        .map(|(&s, &u)| {
            let (freq, bias) = (u >> 16, u & 0xffff);
            (s as u32) << 24 | (freq - 1) << 12 | bias
        })
        .collect()
}

/// The SIMD encoder's table, indexed by `bf16_bits >> 7` (sign bit included, so both halves are
/// the same): `cum << 16 | freq`.
pub fn pack_encode_table(freq: impl Fn(u8) -> u32, cum: impl Fn(u8) -> u32) -> Box<[u32; 512]> {
    let mut t = Box::new([0u32; 512]);
    for (i, e) in t.iter_mut().enumerate() {
        let s = i as u8;
        *e = cum(s) << 16 | freq(s);
    }
    t
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::WORD_PAD_BYTES;
    use crate::codec::ans::{self, DecodeTable, EncSymbol, LANES, STATE_LOW};
    use crate::codec::CodecError;

    /// Loads 32 u16 from an array.
    #[inline(always)]
    fn load_u16x32(a: &[u16; 32]) -> __m512i {
        // SAFETY: the array is exactly 64 readable bytes; the load is unaligned and AVX-512F is
        // enabled in every caller (they are all `#[target_feature]` functions of this module).
        unsafe { _mm512_loadu_si512(a.as_ptr().cast()) }
    }

    /// Decodes one chunk; see [`ans::decode_chunk`] for the contract. `words` holds the chunk's
    /// `n_words` words as little-endian bytes followed by at least [`WORD_PAD_BYTES`] more
    /// bytes (any content); `table` must have its packed form (`prob_bits <= 12`).
    ///
    /// # Safety
    /// The CPU must support the features [`super::available`] checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")]
    pub(crate) unsafe fn decode_chunk(
        states: &[u32; LANES],
        words: &[u8],
        n_words: usize,
        table: &DecodeTable,
        sign_mantissa: &[u8],
        out: &mut [u8],
    ) -> Result<(), CodecError> {
        let (packed, prob_bits) = (table.packed(), table.prob_bits());
        assert!(prob_bits <= super::MAX_SIMD_DECODE_PROB_BITS && packed.len() == 1 << prob_bits);
        assert!(words.len() >= 2 * n_words + WORD_PAD_BYTES);
        assert_eq!(out.len(), 2 * sign_mantissa.len());
        if let Some(bad) = states.iter().find(|&&s| s < STATE_LOW) {
            return Err(CodecError::Corrupt(format!("lane state {bad:#x} is below the normalised range")));
        }
        let mask = _mm512_set1_epi32(((1u32 << prob_bits) - 1) as i32);
        let low12 = _mm512_set1_epi32(0xfff);
        let one = _mm512_set1_epi32(1);
        let l = _mm512_set1_epi32(STATE_LOW as i32);
        let shift = _mm_cvtsi32_si128(prob_bits as i32);
        let sel = _mm512_set1_epi32(0x807f_807fu32 as i32);
        let mut odd = [0u16; 32];
        for (j, o) in odd.iter_mut().enumerate() {
            *o = 2 * j as u16 + 1;
        }
        let odd = load_u16x32(&odd);
        // SAFETY: `states` is 32 readable u32; unaligned loads.
        let (mut x0, mut x1) = unsafe {
            (_mm512_loadu_si512(states.as_ptr().cast()), _mm512_loadu_si512(states[16..].as_ptr().cast()))
        };
        let tbase = packed.as_ptr();
        let wbase = words.as_ptr();
        let mut pos = 0usize;

        let mut sm_steps = sign_mantissa.chunks_exact(LANES);
        let mut out_steps = out.chunks_exact_mut(2 * LANES);
        for (sm, o) in (&mut sm_steps).zip(&mut out_steps) {
            // SAFETY: every slot is masked to `prob_bits` bits and `packed` has `2^prob_bits`
            // entries, so all 32 gathered addresses are in bounds.
            let (e0, e1) = unsafe {
                (
                    _mm512_i32gather_epi32::<4>(_mm512_and_si512(x0, mask), tbase.cast()),
                    _mm512_i32gather_epi32::<4>(_mm512_and_si512(x1, mask), tbase.cast()),
                )
            };
            // y = freq · (x >> pb) + (slot - cum)
            let f0 = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32::<12>(e0), low12), one);
            let f1 = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32::<12>(e1), low12), one);
            let y0 = _mm512_add_epi32(_mm512_mullo_epi32(f0, _mm512_srl_epi32(x0, shift)), _mm512_and_si512(e0, low12));
            let y1 = _mm512_add_epi32(_mm512_mullo_epi32(f1, _mm512_srl_epi32(x1, shift)), _mm512_and_si512(e1, low12));
            let k0 = _mm512_cmplt_epu32_mask(y0, l);
            let k1 = _mm512_cmplt_epu32_mask(y1, l);
            let k = (k1 as u32) << 16 | k0 as u32;
            let p = pos.min(n_words);
            // SAFETY: `p <= n_words` and `words` has `WORD_PAD_BYTES >= 64` bytes after the
            // chunk's `2 · n_words`, so the 64-byte unaligned load is in bounds.
            let w = unsafe { _mm512_loadu_si512(wbase.add(2 * p).cast()) };
            pos += k.count_ones() as usize;
            // Lanes 0..15 take the first words, then lanes 16..31, each in ascending lane order.
            let w = _mm512_maskz_expand_epi16(k, w);
            let w0 = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(w));
            let w1 = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(w));
            x0 = _mm512_or_si512(_mm512_mask_slli_epi32::<16>(y0, k0, y0), w0);
            x1 = _mm512_or_si512(_mm512_mask_slli_epi32::<16>(y1, k1, y1), w1);
            // Output: the symbol (byte 3 of each entry) joined with its sign+mantissa byte.
            let sym = _mm512_srli_epi16::<1>(_mm512_permutex2var_epi16(e0, odd, e1)); // sym << 7 in bits 7..14
            // SAFETY: `sm` is exactly 32 bytes.
            let s = _mm512_cvtepu8_epi16(unsafe { _mm256_loadu_si256(sm.as_ptr().cast()) });
            let s = _mm512_or_si512(s, _mm512_slli_epi16::<8>(s));
            let v = _mm512_ternarylogic_epi32::<0xca>(sel, s, sym);
            // SAFETY: `o` is exactly 64 writable bytes.
            unsafe { _mm512_storeu_si512(o.as_mut_ptr().cast(), v) };
        }

        let mut x = [0u32; LANES];
        // SAFETY: `x` is 32 writable u32; unaligned stores.
        unsafe {
            _mm512_storeu_si512(x.as_mut_ptr().cast(), x0);
            _mm512_storeu_si512(x[16..].as_mut_ptr().cast(), x1);
        }
        let sm = sm_steps.remainder();
        let rest = out_steps.into_remainder();
        ans::decode_tail(&mut x, &mut pos, |p| ans::le_word(words, p.min(n_words)), table, sm, rest);
        ans::check_end(&x, pos, n_words)
    }

    /// Splits and encodes one chunk of little-endian BF16 bytes: writes its sign+mantissa bytes
    /// to `sign_mantissa` and its words, in stream order, to `buf[..count]`, and returns the lane
    /// states and `count`. Identical to [`ans::encode_chunk`] on the chunk's exponents.
    /// `buf.len()` must be at least `sign_mantissa.len() + 32`.
    ///
    /// # Safety
    /// The CPU must support the features [`super::available`] checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")]
    pub(crate) unsafe fn encode_chunk(
        bf16: &[u8],
        syms: &[EncSymbol; 256],
        packed: &[u32; 512],
        prob_bits: u32,
        sign_mantissa: &mut [u8],
        buf: &mut [u16],
    ) -> ([u32; LANES], usize) {
        let n = sign_mantissa.len();
        assert_eq!(bf16.len(), 2 * n);
        assert!(buf.len() >= n + 32);
        let full = n / LANES;
        let mut states = [STATE_LOW; LANES];
        let mut wp = 0usize;
        // The partial last step comes first in encoding order; do it lane by lane.
        for i in (full * LANES..n).rev() {
            let bits = u16::from_le_bytes([bf16[2 * i], bf16[2 * i + 1]]);
            sign_mantissa[i] = crate::codec::bf16::sign_mantissa(bits);
            let lane = i % LANES;
            states[lane] = ans::encode_one(states[lane], &syms[crate::codec::bf16::exponent(bits) as usize], prob_bits, buf, &mut wp);
        }
        let mut rev = [0u32; LANES];
        for (j, r) in rev.iter_mut().enumerate() {
            *r = states[LANES - 1 - j];
        }
        // SAFETY: `rev` is 32 readable u32; unaligned loads.
        let (mut a, mut b) =
            unsafe { (_mm512_loadu_si512(rev.as_ptr().cast()), _mm512_loadu_si512(rev[16..].as_ptr().cast())) };
        let mut rev_idx = [0u16; 32];
        for (j, r) in rev_idx.iter_mut().enumerate() {
            *r = 31 - j as u16;
        }
        let rev_idx = load_u16x32(&rev_idx);
        let sign = _mm512_set1_epi16(0x0080);
        let low16 = _mm512_set1_epi32(0xffff);
        let scale = _mm512_set1_epi32(1 << prob_bits);
        let xmax_shift = _mm_cvtsi32_si128(32 - prob_bits as i32);
        let table = packed.as_ptr();
        let out = buf.as_mut_ptr();

        // One half-step: 16 lanes in descending lane order.
        let half = |x: __m512i, idx: __m512i, wp: &mut usize| -> __m512i {
            // SAFETY: indices are `bits >> 7 < 512`, the table's length.
            let e = unsafe { _mm512_i32gather_epi32::<4>(idx, table.cast()) };
            let f = _mm512_and_si512(e, low16);
            // Emit the low word when x >= freq << (32 - pb), i.e. (x >> (32 - pb)) >= freq.
            let k = _mm512_cmpge_epu32_mask(_mm512_srl_epi32(x, xmax_shift), f);
            let w = _mm512_cvtepi32_epi16(_mm512_maskz_compress_epi32(k, x));
            // SAFETY: `*wp` counts the words emitted so far, at most one per symbol already
            // encoded, so `*wp + 16 <= n + 16 <= buf.len()`.
            unsafe { _mm256_storeu_si256(out.add(*wp).cast(), w) };
            *wp += k.count_ones() as usize;
            let x = _mm512_mask_srli_epi32::<16>(x, k, x);
            let fd_lo = _mm512_cvtepu32_pd(_mm512_castsi512_si256(f));
            let fd_hi = _mm512_cvtepu32_pd(_mm512_extracti64x4_epi64::<1>(f));
            let q_lo = _mm512_cvttpd_epu32(_mm512_div_pd(_mm512_cvtepu32_pd(_mm512_castsi512_si256(x)), fd_lo));
            let q_hi = _mm512_cvttpd_epu32(_mm512_div_pd(_mm512_cvtepu32_pd(_mm512_extracti64x4_epi64::<1>(x)), fd_hi));
            let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q_lo), q_hi);
            // x' = (q << pb) + (x - q·freq) + cum = x + q·(2^pb - freq) + cum
            let x = _mm512_add_epi32(x, _mm512_mullo_epi32(q, _mm512_sub_epi32(scale, f)));
            _mm512_add_epi32(x, _mm512_srli_epi32::<16>(e))
        };

        let mut src_steps = bf16[..2 * full * LANES].chunks_exact(2 * LANES).rev();
        let mut sm_steps = sign_mantissa[..full * LANES].chunks_exact_mut(LANES).rev();
        for (src, sm) in (&mut src_steps).zip(&mut sm_steps) {
            // SAFETY: `src` is exactly 64 readable bytes.
            let v = unsafe { _mm512_loadu_si512(src.as_ptr().cast()) };
            // sign+mantissa byte: bit 7 from bit 15, bits 0..6 from bits 0..6.
            let s = _mm512_cvtepi16_epi8(_mm512_ternarylogic_epi32::<0xca>(sign, _mm512_srli_epi16::<8>(v), v));
            // SAFETY: `sm` is exactly 32 writable bytes.
            unsafe { _mm256_storeu_si256(sm.as_mut_ptr().cast(), s) };
            let idx = _mm512_srli_epi16::<7>(_mm512_permutexvar_epi16(rev_idx, v));
            a = half(a, _mm512_cvtepu16_epi32(_mm512_castsi512_si256(idx)), &mut wp);
            b = half(b, _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(idx)), &mut wp);
        }

        // SAFETY: `rev` is 32 writable u32; unaligned stores.
        unsafe {
            _mm512_storeu_si512(rev.as_mut_ptr().cast(), a);
            _mm512_storeu_si512(rev[16..].as_mut_ptr().cast(), b);
        }
        for (j, &r) in rev.iter().enumerate() {
            states[LANES - 1 - j] = r;
        }
        buf[..wp].reverse();
        (states, wp)
    }

    /// Exponent histogram of little-endian BF16 bytes (one thread).
    ///
    /// # Safety
    /// The CPU must support the features [`super::available`] checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) unsafe fn histogram(bytes: &[u8], h: &mut [u64; 256]) {
        // Four sub-histograms hide the store-to-load dependency on repeated exponents.
        let mut sub = [[0u32; 256]; 4];
        let mut blocks = bytes.chunks_exact(64);
        let mut e = [0u8; 32];
        for (i, blk) in (&mut blocks).enumerate() {
            // SAFETY: `blk` is exactly 64 readable bytes, `e` 32 writable bytes.
            unsafe {
                let v = _mm512_loadu_si512(blk.as_ptr().cast());
                _mm256_storeu_si256(e.as_mut_ptr().cast(), _mm512_cvtepi16_epi8(_mm512_srli_epi16::<7>(v)));
            }
            for q in e.chunks_exact(4) {
                sub[0][q[0] as usize] += 1;
                sub[1][q[1] as usize] += 1;
                sub[2][q[2] as usize] += 1;
                sub[3][q[3] as usize] += 1;
            }
            // Flush before the u32 counters could overflow.
            if i % (1 << 24) == (1 << 24) - 1 {
                flush(&mut sub, h);
            }
        }
        for p in blocks.remainder().chunks_exact(2) {
            sub[0][crate::codec::bf16::exponent(u16::from_le_bytes([p[0], p[1]])) as usize] += 1;
        }
        flush(&mut sub, h);
    }

    fn flush(sub: &mut [[u32; 256]; 4], h: &mut [u64; 256]) {
        for s in sub.iter_mut() {
            for (o, c) in h.iter_mut().zip(s.iter_mut()) {
                *o += *c as u64;
                *c = 0;
            }
        }
    }
}
