//! AVX-512 kernels for the chunk coder of [`super::ans`], bit-exact with its scalar reference.
//!
//! The 32 interleaved lanes of a chunk are exactly two 16 × u32 AVX-512 registers, so one coding
//! step (32 symbols) is a handful of vector instructions per half. Everything here produces the
//! same words, states and output bytes as the scalar code, and rejects exactly the inputs the
//! scalar decoder rejects; the scalar code stays the specification and the fallback (no AVX-512
//! at run time, other architectures, and, for decoding, `prob_bits` above
//! [`max_simd_decode_prob_bits`]). The choices below were
//! measured on Zen 4, where one 16-lane `vpgatherdd` costs about 14 cycles of throughput and
//! 30 of latency, which shapes both directions.
//!
//! Decoder:
//! - For the exponent model (`prob_bits <= 12`) one decoding-table entry fits one u32:
//!   `symbol << 24 | (freq - 1) << 12 | (slot - cum)`, so a single gather yields everything 16
//!   lanes need. With coded mantissa bits (`prob_bits <= 15`) the entry is one u64,
//!   `bits << 32 | freq << 16 | (slot - cum)`, four 8-lane gathers per step; its 2^15 entries
//!   live in L2 (docs/format.md §5.1 has the smaller-table designs measured and dropped).
//! - Renormalisation: the lanes that fall below `2^16` form a 32-bit mask; 32 words are loaded
//!   from the stream position and `vpexpandw` hands them out in ascending lane order, which is
//!   the stream order; the position advances by the mask's popcount. One load per step keeps the
//!   position's dependency chain short. The expand is written as assembly to keep its register
//!   form: the compiler would fold the load into the memory form, which is microcoded on Zen 4.
//! - A step's gathers depend on the previous step's states, so one chunk is latency bound; two
//!   chunks decoded in lockstep ([`ans::decode_chunk_pair`](super::ans::decode_chunk_pair))
//!   overlap their chains and run about 1.6 times as fast, also when one is shorter (a tensor's
//!   last chunk): the steps both have go in lockstep, the longer one's rest alone. (Four in
//!   lockstep gain nothing more: then the gathers' throughput is the limit; docs/format.md §5.1
//!   has the lookup designs measured and dropped.)
//! - Reads are made safe on corrupt data by clamping the load position to the chunk's word count
//!   and requiring [`WORD_PAD_BYTES`] of readable bytes after the chunk's words: a corrupt chunk
//!   only ever reads garbage inside the slice, and once its position has passed the end it can
//!   only fail the final position check, as in the scalar decoder.
//!
//! Encoder:
//! - The symbol lookup needs no gather: the 32 consecutive exponents with the most probability
//!   (all but a sliver of real weights) sit in two registers and one `vpermt2d` reads them; a
//!   masked gather handles the lanes outside that window, only when there are any.
//! - The division `x / freq` is an exact `f64` division (`x < 2^32`, `freq <= 2^15`: the quotient
//!   is at least `1/freq` away from the next integer, far more than the rounding error, so
//!   truncation gives the integer quotient), and the state update is `x + q·(2^pb - freq) + cum`.
//! - The scalar encoder emits, per step, the words of lanes 31 down to 0; holding the lanes in
//!   reversed order (register A = lanes 31..16, B = lanes 15..0) makes a register-form
//!   `vpcompressw` emit them in that same order, so the buffer is reversed once at the end, as in
//!   scalar.
//! - The BF16 split (raw plane, symbols) is fused into the encoder's pass over the input.
//! - With coded mantissa bits (`mantissa_bits = 3`, format version 2) the symbol is looked up by
//!   key: the 128 consecutive keys with the most probability from eight registers (four
//!   `vpermt2d` and two selects per 16 lanes), a masked gather from the 2048-entry table for the
//!   lanes outside them, only when there are any (a full gather per 16 lanes cost more). The
//!   raw plane's 20 bytes per step are split and joined with a few shifts, a narrowing move and
//!   a sign mask.

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{decode_chunks, encode_chunk};

/// Bytes that must be readable after a chunk's words for the SIMD decoder's unaligned loads.
pub const WORD_PAD_BYTES: usize = 64;

/// Largest `prob_bits` the SIMD decoder handles for the exponent model (its packed table entry
/// has 12-bit fields).
pub const MAX_SIMD_DECODE_PROB_BITS: u32 = 12;
/// Largest `prob_bits` the SIMD decoder handles with coded mantissa bits (its packed entry holds
/// the frequency and `slot - cum` in 16 bits each).
pub const MAX_SIMD_DECODE_PROB_BITS_M3: u32 = 15;

/// Largest `prob_bits` the SIMD decoder handles for a model.
pub fn max_simd_decode_prob_bits(mantissa_bits: u32) -> u32 {
    if mantissa_bits == 0 {
        MAX_SIMD_DECODE_PROB_BITS
    } else {
        MAX_SIMD_DECODE_PROB_BITS_M3
    }
}

/// Whether the AVX-512 kernels can run on this CPU (detected once, then cached by std).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vbmi")
            && std::arch::is_x86_feature_detected!("avx512vbmi2")
            && std::arch::is_x86_feature_detected!("popcnt")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The SIMD decoder's packed table of the exponent model (`prob_bits <= 12`): per slot
/// `symbol << 24 | (freq - 1) << 12 | (slot - cum)`.
pub(crate) fn pack_decode_table(symbol: &[u8], update: &[u32]) -> Vec<u32> {
    symbol
        .iter()
        .zip(update)
        .map(|(&s, &u)| {
            let (freq, bias) = (u >> 16, u & 0xffff);
            (s as u32) << 24 | (freq - 1) << 12 | bias
        })
        .collect()
}

/// The SIMD decoder's packed table with coded mantissa bits (`prob_bits <= 15`): per slot one
/// u64, `high_bits(symbol) << 32 | freq << 16 | (slot - cum)`, so one gather yields everything
/// a lane needs: the state update and the bits the symbol decodes to.
pub(crate) fn pack_decode_table_m3(symbol: &[u8], update: &[u32], high: &[u16; 256]) -> Vec<u64> {
    symbol
        .iter()
        .zip(update)
        .map(|(&s, &u)| (high[s as usize] as u64) << 32 | u as u64)
        .collect()
}

/// The SIMD encoder's view of a code table: `cum << 16 | freq` per symbol, and the 32
/// consecutive symbols that hold most of the probability, which the encoder keeps in two
/// registers and looks up with one permute. Symbols outside that window (rare exponents in
/// weights) fall back to a gather from the full table. With coded mantissa bits the lookup is by
/// key instead (`by_key`, `2^(8 + mantissa_bits)` entries): the [`KEY_WINDOW`] consecutive keys
/// with the most probability from registers, the others gathered.
#[derive(Clone, Debug)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the SIMD parts are x86-64 only
pub(crate) struct EncodeTable {
    entries: [u32; 256],
    base: usize,
    by_key: Vec<u32>,
    /// With coded mantissa bits: the first of the [`KEY_WINDOW`] consecutive keys that hold the
    /// most probability, whose entries the encoder keeps in registers.
    key_base: usize,
}

/// Keys the encoder looks up in registers with coded mantissa bits: 16 consecutive exponents
/// with their 8 mantissa prefixes, all but a sliver of any weight tensor (N(0, σ) puts ~0.6% of
/// its mass below the 8 binades under 4σ); the rest are gathered.
pub(crate) const KEY_WINDOW: usize = 128;

impl EncodeTable {
    /// Builds the table from a code table and the symbol model it codes.
    pub fn new(
        table: &crate::codec::freq::FreqTable,
        model: &crate::codec::model::SymbolModel,
    ) -> Self {
        let (freq, cum) = (|s: u8| table.freq(s), |s: u8| table.cum(s));
        let mut entries = [0u32; 256];
        for (s, e) in entries.iter_mut().enumerate() {
            *e = cum(s as u8) << 16 | freq(s as u8);
        }
        let base = (0..=256 - 32)
            .max_by_key(|&b| (b..b + 32).map(|s| freq(s as u8)).sum::<u32>())
            .unwrap_or(0);
        let by_key: Vec<u32> = model.ranks().iter().map(|&r| entries[r as usize]).collect();
        let mut key_freq = vec![0u32; by_key.len()];
        for r in 0..model.symbols().min(256) {
            let k = (model.high_bits(r as u8) >> (7 - model.mantissa_bits())) as usize;
            if let Some(f) = key_freq.get_mut(k) {
                *f = freq(r as u8);
            }
        }
        // The window of the most probability (the last of equals), found with a running sum:
        // this runs for every tensor `compress` codes.
        let width = KEY_WINDOW.min(key_freq.len());
        let mut sum: u32 = key_freq[..width].iter().sum();
        let (mut key_base, mut best) = (0, sum);
        for b in 1..=key_freq.len() - width {
            sum = sum + key_freq[b + width - 1] - key_freq[b - 1];
            if sum >= best {
                (key_base, best) = (b, sum);
            }
        }
        Self {
            entries,
            base,
            by_key,
            key_base,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{KEY_WINDOW, WORD_PAD_BYTES};
    use crate::codec::ans::{self, DecodeTable, EncSymbol, LANES, STATE_LOW};
    use crate::codec::CodecError;

    /// Loads 32 u16 from an array.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn load_u16x32(a: &[u16; 32]) -> __m512i {
        // SAFETY: the array is exactly 64 readable bytes; the load is unaligned.
        unsafe { _mm512_loadu_si512(a.as_ptr().cast()) }
    }

    /// Loop-invariant vectors of the decoder.
    #[derive(Clone, Copy)]
    struct DecodeConsts {
        mask: __m512i,
        low12: __m512i,
        one: __m512i,
        l: __m512i,
        shift: __m128i,
        sel: __m512i,
        odd: __m512i,
        table: *const u32,
        /// `mantissa_bits = 3`: the packed u64 entries.
        table64: *const u64,
        /// `mantissa_bits = 3`: picks the low u32 of 16 u64 entries held in two registers.
        even32: __m512i,
        /// `mantissa_bits = 3`: picks u16 number 2 (the high bits) of 16 u64 entries.
        word2: __m512i,
        low16: __m512i,
        low4: __m512i,
        top: __m512i,
    }

    /// A chunk being decoded: both state registers and its position in its word stream.
    struct Stream<'a> {
        x0: __m512i,
        x1: __m512i,
        pos: usize,
        n_words: usize,
        words: &'a [u8],
    }

    /// `vpexpandw` in its register form. Written as assembly because the compiler otherwise
    /// folds the preceding load into the memory form, which is microcoded and slow on Zen 4.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi2")]
    #[inline]
    fn expand_words(k: u32, w: __m512i) -> __m512i {
        let r: __m512i;
        // SAFETY: a register-to-register instruction of AVX512-VBMI2, which this function
        // requires; it touches no memory and no flags.
        unsafe {
            std::arch::asm!(
                "vpexpandw {r}{{{k}}}{{z}}, {w}",
                r = lateout(zmm_reg) r,
                k = in(kreg) k,
                w = in(zmm_reg) w,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        r
    }

    /// Moves the 32 lane states past one symbol each, given the symbols' frequencies `f` and
    /// biases `b` (`slot - cum`; lanes 0..15 in `[0]`, 16..31 in `[1]`): `x = f · (x >> pb) + b`,
    /// then every lane that fell below L takes the next 16-bit word, lanes 0..15 first, then
    /// 16..31, each in ascending lane order. Shared by both models' steps.
    ///
    /// # Safety
    /// `s.words` has `WORD_PAD_BYTES` bytes after its `s.n_words` words.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")]
    #[inline]
    unsafe fn advance(s: &mut Stream<'_>, c: &DecodeConsts, f: [__m512i; 2], b: [__m512i; 2]) {
        let y0 = _mm512_add_epi32(
            _mm512_mullo_epi32(f[0], _mm512_srl_epi32(s.x0, c.shift)),
            b[0],
        );
        let y1 = _mm512_add_epi32(
            _mm512_mullo_epi32(f[1], _mm512_srl_epi32(s.x1, c.shift)),
            b[1],
        );
        let k0 = _mm512_cmplt_epu32_mask(y0, c.l);
        let k1 = _mm512_cmplt_epu32_mask(y1, c.l);
        let k = (k1 as u32) << 16 | k0 as u32;
        let p = s.pos.min(s.n_words);
        // SAFETY: `p <= n_words` and `words` has `WORD_PAD_BYTES >= 64` bytes after the chunk's
        // `2 · n_words`, so the 64-byte unaligned load is in bounds.
        let w = unsafe { _mm512_loadu_si512(s.words.as_ptr().add(2 * p).cast()) };
        s.pos += k.count_ones() as usize;
        let w = expand_words(k, w);
        let w0 = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(w));
        let w1 = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(w));
        s.x0 = _mm512_or_si512(_mm512_mask_slli_epi32::<16>(y0, k0, y0), w0);
        s.x1 = _mm512_or_si512(_mm512_mask_slli_epi32::<16>(y1, k1, y1), w1);
    }

    /// Decodes one full step (32 symbols) of one chunk.
    ///
    /// # Safety
    /// `table` has `2^prob_bits` entries (the mask keeps slots below that); `s.words` has
    /// `WORD_PAD_BYTES` bytes after its `s.n_words` words; `sm` and `out` point to 32 readable
    /// and 64 writable bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")]
    #[inline]
    unsafe fn step<const M3: bool>(
        s: &mut Stream<'_>,
        c: &DecodeConsts,
        raw: *const u8,
        out: *mut u8,
    ) {
        if M3 {
            // SAFETY: the same contract.
            unsafe { step_m3(s, c, raw, out) };
            return;
        }
        // SAFETY: every slot is masked to `prob_bits` bits and the table has `2^prob_bits`
        // entries, so all 32 gathered addresses are in bounds.
        let (e0, e1) = unsafe {
            (
                _mm512_i32gather_epi32::<4>(_mm512_and_si512(s.x0, c.mask), c.table.cast()),
                _mm512_i32gather_epi32::<4>(_mm512_and_si512(s.x1, c.mask), c.table.cast()),
            )
        };
        // y = freq · (x >> pb) + (slot - cum)
        let f0 = _mm512_add_epi32(
            _mm512_and_si512(_mm512_srli_epi32::<12>(e0), c.low12),
            c.one,
        );
        let f1 = _mm512_add_epi32(
            _mm512_and_si512(_mm512_srli_epi32::<12>(e1), c.low12),
            c.one,
        );
        // SAFETY: as this function's own contract.
        unsafe {
            advance(
                s,
                c,
                [f0, f1],
                [_mm512_and_si512(e0, c.low12), _mm512_and_si512(e1, c.low12)],
            )
        };
        {
            // Output: the symbol (byte 3 of each entry) joined with its sign+mantissa byte.
            let sym = _mm512_srli_epi16::<1>(_mm512_permutex2var_epi16(e0, c.odd, e1)); // sym << 7 in bits 7..14
                                                                                        // SAFETY: the caller passes 32 readable bytes.
            let smv = _mm512_cvtepu8_epi16(unsafe { _mm256_loadu_si256(raw.cast()) });
            let smv = _mm512_or_si512(smv, _mm512_slli_epi16::<8>(smv));
            let v = _mm512_ternarylogic_epi32::<0xca>(c.sel, smv, sym);
            // SAFETY: the caller passes 64 writable bytes.
            unsafe { _mm512_storeu_si512(out.cast(), v) };
        }
    }

    /// One step with coded mantissa bits. Same contract as [`step`], with `c.table64` the
    /// packed u64 table of `2^prob_bits` entries.
    ///
    /// # Safety
    /// As [`step`]; `raw` points to the step's 20 readable raw bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")]
    #[inline]
    unsafe fn step_m3(s: &mut Stream<'_>, c: &DecodeConsts, raw: *const u8, out: *mut u8) {
        let (s0, s1) = (
            _mm512_and_si512(s.x0, c.mask),
            _mm512_and_si512(s.x1, c.mask),
        );
        // SAFETY: every slot is masked to `prob_bits` bits and the table has `2^prob_bits`
        // entries, so all 32 gathered addresses are in bounds.
        let g = unsafe {
            [
                _mm512_i32gather_epi64::<8>(_mm512_castsi512_si256(s0), c.table64.cast()),
                _mm512_i32gather_epi64::<8>(_mm512_extracti64x4_epi64::<1>(s0), c.table64.cast()),
                _mm512_i32gather_epi64::<8>(_mm512_castsi512_si256(s1), c.table64.cast()),
                _mm512_i32gather_epi64::<8>(_mm512_extracti64x4_epi64::<1>(s1), c.table64.cast()),
            ]
        };
        // `freq << 16 | bias` of lanes 0..15 and 16..31.
        let d0 = _mm512_permutex2var_epi32(g[0], c.even32, g[1]);
        let d1 = _mm512_permutex2var_epi32(g[2], c.even32, g[3]);
        // y = freq · (x >> pb) + (slot - cum)
        // SAFETY: as in `step`.
        unsafe {
            advance(
                s,
                c,
                [_mm512_srli_epi32::<16>(d0), _mm512_srli_epi32::<16>(d1)],
                [_mm512_and_si512(d0, c.low16), _mm512_and_si512(d1, c.low16)],
            )
        };
        // The symbols' bits: u16 number 2 of each entry, lanes 0..15 then 16..31.
        let h = _mm512_inserti64x4::<1>(
            _mm512_permutex2var_epi16(g[0], c.word2, g[1]),
            _mm512_castsi512_si256(_mm512_permutex2var_epi16(g[2], c.word2, g[3])),
        );
        // Output: the symbol's bits, the trailing mantissa nibbles and the sign bits.
        // SAFETY: the caller passes the step's 20 readable raw bytes.
        let (nib, signs) = unsafe {
            (
                _mm512_cvtepu8_epi32(_mm_loadu_si128(raw.cast())),
                std::ptr::read_unaligned(raw.add(16).cast::<u32>()),
            )
        };
        // u32 lane j = byte j: low nibble -> u16 lane 2j, high nibble -> u16 lane 2j + 1.
        let nv = _mm512_or_si512(
            _mm512_and_si512(nib, c.low4),
            _mm512_slli_epi32::<12>(_mm512_andnot_si512(c.low4, nib)),
        );
        let v = _mm512_or_si512(h, nv);
        let v = _mm512_mask_mov_epi16(v, signs, _mm512_or_si512(v, c.top));
        // SAFETY: the caller passes 64 writable bytes.
        unsafe { _mm512_storeu_si512(out.cast(), v) };
    }

    /// Decodes `N` chunks in lockstep, step by step (chunks longer than the shortest finish
    /// their remaining steps alone); see [`ans::decode_chunk`] for the contract of each. One chunk's steps form a dependency chain through the table
    /// gathers (tens of cycles each); interleaving independent chunks fills that latency.
    /// Each chunk's `words` holds its `n_words` words as little-endian bytes followed by at least
    /// [`WORD_PAD_BYTES`] more bytes (any content); `table` must have its packed form.
    ///
    /// # Safety
    /// The CPU must support the features [`super::available`] checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")]
    pub(crate) unsafe fn decode_chunks<const N: usize>(
        jobs: [ans::ChunkJob<'_>; N],
        table: &DecodeTable,
    ) -> [Result<(), CodecError>; N] {
        // SAFETY: same contract and features.
        unsafe {
            if table.mantissa_bits() == 0 {
                decode_chunks_with::<N, false>(jobs, table)
            } else {
                decode_chunks_with::<N, true>(jobs, table)
            }
        }
    }

    /// [`decode_chunks`] for one symbol model (`M3`: `mantissa_bits = 3`).
    ///
    /// # Safety
    /// The CPU must support the features [`super::available`] checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")]
    unsafe fn decode_chunks_with<const N: usize, const M3: bool>(
        jobs: [ans::ChunkJob<'_>; N],
        table: &DecodeTable,
    ) -> [Result<(), CodecError>; N] {
        let (packed, packed_m3, prob_bits) = (table.packed(), table.packed_m3(), table.prob_bits());
        let m = table.mantissa_bits();
        assert!(prob_bits <= super::max_simd_decode_prob_bits(m));
        assert!(if M3 { packed_m3.len() } else { packed.len() } == 1 << prob_bits);
        assert_eq!(M3, m != 0);
        let n: [usize; N] = std::array::from_fn(|i| jobs[i].out.len() / 2);
        for (j, &n) in jobs.iter().zip(&n) {
            assert!(j.words.len() >= 2 * j.n_words + WORD_PAD_BYTES);
            assert!(j.raw.len() == crate::codec::model::raw_len(n, m) && j.out.len() == 2 * n);
        }
        let mut result: [Result<(), CodecError>; N] = std::array::from_fn(|_| Ok(()));
        if jobs
            .iter()
            .flat_map(|j| j.states.iter())
            .any(|&s| s < STATE_LOW)
        {
            // A state outside the normalised range makes the chunk fail whatever its words: report
            // it for the chunks that have one, and decode the others one at a time.
            for (r, job) in result.iter_mut().zip(jobs) {
                *r = if let Some(bad) = job.states.iter().find(|&&s| s < STATE_LOW) {
                    Err(CodecError::Corrupt(format!(
                        "lane state {bad:#x} is below the normalised range"
                    )))
                } else {
                    // SAFETY: same features as this function.
                    unsafe { decode_chunks([job], table) }
                        .into_iter()
                        .next()
                        .unwrap()
                };
            }
            return result;
        }
        let mut odd = [0u16; 32];
        let mut word2 = [0u16; 32];
        let mut even32 = [0u16; 32];
        for j in 0..32 {
            odd[j] = 2 * j as u16 + 1;
            word2[j] = if j < 16 { 4 * j as u16 + 2 } else { 0 };
            // u32 index 2j in the low and zero in the high half of u32 lane j (j < 16).
            even32[j] = if j % 2 == 0 { j as u16 } else { 0 };
        }
        let c = DecodeConsts {
            mask: _mm512_set1_epi32(((1u32 << prob_bits) - 1) as i32),
            low12: _mm512_set1_epi32(0xfff),
            one: _mm512_set1_epi32(1),
            l: _mm512_set1_epi32(STATE_LOW as i32),
            shift: _mm_cvtsi32_si128(prob_bits as i32),
            sel: _mm512_set1_epi32(0x807f_807fu32 as i32),
            odd: load_u16x32(&odd),
            table: packed.as_ptr(),
            table64: packed_m3.as_ptr(),
            even32: load_u16x32(&even32),
            word2: load_u16x32(&word2),
            low16: _mm512_set1_epi32(0xffff),
            low4: _mm512_set1_epi32(0xf),
            top: _mm512_set1_epi16(0x8000u16 as i16),
        };
        let mut streams: [Stream<'_>; N] = std::array::from_fn(|i| Stream {
            // SAFETY: `states` is 32 readable u32; unaligned loads.
            x0: unsafe { _mm512_loadu_si512(jobs[i].states.as_ptr().cast()) },
            // SAFETY: as above, its upper 16.
            x1: unsafe { _mm512_loadu_si512(jobs[i].states[16..].as_ptr().cast()) },
            pos: 0,
            n_words: jobs[i].n_words,
            words: jobs[i].words,
        });
        let raws: [*const u8; N] = std::array::from_fn(|i| jobs[i].raw.as_ptr());
        let mut jobs = jobs;
        let outs: [*mut u8; N] = std::array::from_fn(|i| jobs[i].out.as_mut_ptr());
        let full: [usize; N] = std::array::from_fn(|i| n[i] / LANES);
        let common = full.iter().copied().min().unwrap_or(0);
        for t in 0..common {
            for i in 0..N {
                // SAFETY: the table and padding were checked above, and `t < n[i] / 32` keeps
                // the step's raw bytes and 64 output bytes of step `t` inside the slices, whose
                // lengths were checked above too.
                unsafe {
                    step::<M3>(
                        &mut streams[i],
                        &c,
                        raws[i].add(ans::raw_step_start(t, m)),
                        outs[i].add(2 * LANES * t),
                    )
                };
            }
        }
        // Chunks of unequal length (a tensor's last, shorter chunk with its neighbour): the
        // longer ones finish their full steps alone.
        for i in 0..N {
            for t in common..full[i] {
                // SAFETY: as above, `t < n[i] / 32`.
                unsafe {
                    step::<M3>(
                        &mut streams[i],
                        &c,
                        raws[i].add(ans::raw_step_start(t, m)),
                        outs[i].add(2 * LANES * t),
                    )
                };
            }
        }
        for (((r, s), job), full) in result
            .iter_mut()
            .zip(streams)
            .zip(jobs.iter_mut())
            .zip(full)
        {
            let mut x = [0u32; LANES];
            // SAFETY: `x` is 32 writable u32; unaligned stores.
            unsafe {
                _mm512_storeu_si512(x.as_mut_ptr().cast(), s.x0);
                _mm512_storeu_si512(x[16..].as_mut_ptr().cast(), s.x1);
            }
            let mut pos = s.pos;
            let (words, n_words) = (s.words, s.n_words);
            let raw = &job.raw[ans::raw_step_start(full, m)..];
            let out = &mut job.out[2 * full * LANES..];
            let words = words.as_chunks::<2>().0;
            ans::decode_tail(
                &mut x,
                &mut pos,
                |p| u16::from_le_bytes(words[p.min(n_words)]),
                table,
                raw,
                out,
            );
            *r = ans::check_end(&x, pos, n_words);
        }
        result
    }

    /// Splits and encodes one chunk of little-endian BF16 bytes: writes its raw plane to `raw`
    /// and its words, in stream order, to `buf[..count]`, and returns the lane states and
    /// `count`. Identical to [`ans::encode_chunk`] on the chunk's symbols. `M3` is
    /// `mantissa_bits = 3` (symbols by key, gathered from `table.by_key`), otherwise the symbol is
    /// the exponent. `buf.len()` must be at least `bf16.len() / 2 + 32`.
    ///
    /// # Safety
    /// The CPU must support the features [`super::available`] checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")]
    pub(crate) unsafe fn encode_chunk<const M3: bool>(
        bf16: &[u8],
        syms: &[EncSymbol; 256],
        model: &crate::codec::model::SymbolModel,
        table: &super::EncodeTable,
        prob_bits: u32,
        raw: &mut [u8],
        buf: &mut [u16],
    ) -> ([u32; LANES], usize) {
        use crate::codec::model;
        let n = bf16.len() / 2;
        let m = model.mantissa_bits();
        assert!(
            bf16.len().is_multiple_of(2) && raw.len() == model::raw_len(n, m) && M3 == (m != 0)
        );
        assert!(buf.len() >= n + 32);
        assert!(!M3 || table.by_key.len() == 1 << (8 + m));
        let full = n / LANES;
        let mut states = [STATE_LOW; LANES];
        let mut wp = 0usize;
        let value = |i: usize| u16::from_le_bytes([bf16[2 * i], bf16[2 * i + 1]]);
        // The partial last step comes first in encoding order; do it lane by lane.
        if M3 && full * LANES < n {
            let start = ans::raw_step_start(full, m);
            model::split_step_m3((full * LANES..n).map(value), &mut raw[start..]);
        }
        for i in (full * LANES..n).rev() {
            let bits = value(i);
            if !M3 {
                raw[i] = crate::codec::bf16::sign_mantissa(bits);
            }
            let lane = i % LANES;
            states[lane] = ans::encode_one(
                states[lane],
                &syms[model.symbol(bits) as usize],
                prob_bits,
                buf,
                &mut wp,
            );
        }
        let mut rev = [0u32; LANES];
        for (j, r) in rev.iter_mut().enumerate() {
            *r = states[LANES - 1 - j];
        }
        // SAFETY: `rev` is 32 readable u32; unaligned loads.
        let (mut a, mut b) = unsafe {
            (
                _mm512_loadu_si512(rev.as_ptr().cast()),
                _mm512_loadu_si512(rev[16..].as_ptr().cast()),
            )
        };
        let mut rev_idx = [0u16; 32];
        for (j, r) in rev_idx.iter_mut().enumerate() {
            *r = 31 - j as u16;
        }
        let rev_idx = load_u16x32(&rev_idx);
        let sign = _mm512_set1_epi16(0x0080);
        let low8 = _mm512_set1_epi16(0xff);
        let base = _mm512_set1_epi16(table.base as i16);
        let win: &[u32; 32] = table.entries[table.base..table.base + 32]
            .try_into()
            .expect("32 entries");
        // SAFETY: `win` is 32 readable u32; unaligned loads.
        let (win_lo, win_hi) = unsafe {
            (
                _mm512_loadu_si512(win.as_ptr().cast()),
                _mm512_loadu_si512(win[16..].as_ptr().cast()),
            )
        };
        let low16 = _mm512_set1_epi32(0xffff);
        let scale = _mm512_set1_epi32(1 << prob_bits);
        // Single-precision quotients are exact enough (within one) for x / f < 2^20.
        let single = prob_bits >= 12;
        let (one, zero) = (_mm512_set1_ps(1.0), _mm512_setzero_si512());
        let xmax_shift = _mm_cvtsi32_si128(32 - prob_bits as i32);
        let entries = if M3 {
            table.by_key.as_ptr()
        } else {
            table.entries.as_ptr()
        };
        let key_mask = _mm512_set1_epi16(((1u32 << (8 + m)) - 1) as i16);
        let key_base = _mm512_set1_epi16(table.key_base as i16);
        // The window's width, 16-bit lanes of half a step.
        let half_window = _mm256_set1_epi16(if M3 { KEY_WINDOW as i16 } else { 32 });
        // The window's 128 entries in eight registers (M3 only; zeros otherwise).
        let mut kwin = [_mm512_setzero_si512(); 8];
        if M3 {
            let w = &table.by_key[table.key_base..table.key_base + KEY_WINDOW];
            for (r, c) in kwin.iter_mut().zip(w.chunks_exact(16)) {
                // SAFETY: `c` is 16 readable u32; unaligned load.
                *r = unsafe { _mm512_loadu_si512(c.as_ptr().cast()) };
            }
        }
        let (bit5, bit6) = (_mm512_set1_epi32(32), _mm512_set1_epi32(64));
        let low4 = _mm512_set1_epi32(0xf);
        let out = buf.as_mut_ptr();

        // One half-step: 16 lanes in descending lane order, with their exponents `exp` and their
        // offsets `d` into the window (`outside` marks the lanes beyond it: compared here, per
        // half, since one 32-lane mask split in two went through the stack and a failed store
        // forward, which stalled the loop).
        let half = |x: __m512i, exp: __m256i, d: __m256i, wp: &mut usize| -> __m512i {
            let outside = _mm256_cmpge_epu16_mask(d, half_window);
            let idx = _mm512_cvtepu16_epi32(d);
            let mut e = if M3 {
                // Four 32-entry permutes and a select on index bits 5 and 6.
                let p0 = _mm512_permutex2var_epi32(kwin[0], idx, kwin[1]);
                let p1 = _mm512_permutex2var_epi32(kwin[2], idx, kwin[3]);
                let p2 = _mm512_permutex2var_epi32(kwin[4], idx, kwin[5]);
                let p3 = _mm512_permutex2var_epi32(kwin[6], idx, kwin[7]);
                let k5 = _mm512_test_epi32_mask(idx, bit5);
                let lo = _mm512_mask_mov_epi32(p0, k5, p1);
                let hi = _mm512_mask_mov_epi32(p2, k5, p3);
                _mm512_mask_mov_epi32(lo, _mm512_test_epi32_mask(idx, bit6), hi)
            } else {
                _mm512_permutex2var_epi32(win_lo, idx, win_hi)
            };
            if outside != 0 {
                // SAFETY: exponents are below 256, the number of entries; keys are below
                // 2^(8 + m), the number of `by_key` entries (checked above).
                e = unsafe {
                    _mm512_mask_i32gather_epi32::<4>(
                        e,
                        outside,
                        _mm512_cvtepu16_epi32(exp),
                        entries.cast(),
                    )
                };
            }
            let f = _mm512_and_si512(e, low16);
            // Emit the low word when x >= freq << (32 - pb), i.e. (x >> (32 - pb)) >= freq.
            let k = _mm512_cmpge_epu32_mask(_mm512_srl_epi32(x, xmax_shift), f);
            // Narrow first, then compress the words: a narrowing store would be folded into the
            // slow memory form of `vpmovdw`.
            let w = _mm256_maskz_compress_epi16(k, _mm512_cvtepi32_epi16(x));
            // SAFETY: `*wp` counts the words emitted so far, at most one per symbol already
            // encoded, so `*wp + 16 <= n <= buf.len()`.
            unsafe { _mm256_storeu_si256(out.add(*wp).cast(), w) };
            *wp += k.count_ones() as usize;
            let x = _mm512_mask_srli_epi32::<16>(x, k, x);
            if single {
                // q0 = trunc(float(x) · (1 / float(f))): each of the three roundings is
                // within 2^-24 relative and x / f < 2^(32 - pb) <= 2^20, so q0 is within
                // 0.19 of x / f and one of floor(x / f) - 1, floor(x / f), floor(x / f) + 1.
                // The remainder r = x - q0·f (exact in i32: it lies in [-f, 2f)) says which.
                // 1 / f does not depend on x, so only a multiply sits on the chain from one
                // step's state to the next, and 16 lanes go through each float operation
                // where the double division took 8 (and was the encoder's bottleneck).
                let rcp = _mm512_div_ps(one, _mm512_cvtepu32_ps(f));
                let q0 = _mm512_cvttps_epu32(_mm512_mul_ps(_mm512_cvtepu32_ps(x), rcp));
                let r = _mm512_sub_epi32(x, _mm512_mullo_epi32(q0, f));
                // x' = x + q·(2^pb - freq) + cum, from q0 and then corrected by one q.
                let sf = _mm512_sub_epi32(scale, f);
                let y = _mm512_add_epi32(
                    _mm512_add_epi32(x, _mm512_mullo_epi32(q0, sf)),
                    _mm512_srli_epi32::<16>(e),
                );
                let y = _mm512_mask_sub_epi32(y, _mm512_cmplt_epi32_mask(r, zero), y, sf);
                return _mm512_mask_add_epi32(y, _mm512_cmpge_epi32_mask(r, f), y, sf);
            }
            let fd_lo = _mm512_cvtepu32_pd(_mm512_castsi512_si256(f));
            let fd_hi = _mm512_cvtepu32_pd(_mm512_extracti64x4_epi64::<1>(f));
            let q_lo = _mm512_cvttpd_epu32(_mm512_div_pd(
                _mm512_cvtepu32_pd(_mm512_castsi512_si256(x)),
                fd_lo,
            ));
            let q_hi = _mm512_cvttpd_epu32(_mm512_div_pd(
                _mm512_cvtepu32_pd(_mm512_extracti64x4_epi64::<1>(x)),
                fd_hi,
            ));
            let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q_lo), q_hi);
            // x' = (q << pb) + (x - q·freq) + cum = x + q·(2^pb - freq) + cum
            let x = _mm512_add_epi32(x, _mm512_mullo_epi32(q, _mm512_sub_epi32(scale, f)));
            _mm512_add_epi32(x, _mm512_srli_epi32::<16>(e))
        };

        for t in (0..full).rev() {
            // SAFETY: `t < full`, so the step's 64 bytes are inside `bf16`.
            let v = unsafe { _mm512_loadu_si512(bf16.as_ptr().add(2 * LANES * t).cast()) };
            let (exp, d) = if M3 {
                // Raw plane: 16 bytes of nibble pairs, then the 32 sign bits.
                let nib = _mm512_cvtepi32_epi8(_mm512_or_si512(
                    _mm512_and_si512(v, low4),
                    _mm512_and_si512(_mm512_srli_epi32::<12>(v), _mm512_slli_epi32::<4>(low4)),
                ));
                let signs = _mm512_movepi16_mask(v);
                let at = ans::raw_step_start(t, m);
                let dst = &mut raw[at..at + model::M3_STEP_BYTES];
                // SAFETY: `dst` is exactly 20 writable bytes.
                unsafe {
                    _mm_storeu_si128(dst.as_mut_ptr().cast(), nib);
                    std::ptr::write_unaligned(dst.as_mut_ptr().add(16).cast::<u32>(), signs);
                }
                let key = _mm512_and_si512(
                    _mm512_srli_epi16::<4>(_mm512_permutexvar_epi16(rev_idx, v)),
                    key_mask,
                );
                let d = _mm512_sub_epi16(key, key_base);
                (key, d)
            } else {
                // sign+mantissa byte: bit 7 from bit 15, bits 0..6 from bits 0..6.
                let s = _mm512_cvtepi16_epi8(_mm512_ternarylogic_epi32::<0xca>(
                    sign,
                    _mm512_srli_epi16::<8>(v),
                    v,
                ));
                // SAFETY: `raw` has one byte per element and `t < full`: 32 writable bytes.
                unsafe { _mm256_storeu_si256(raw.as_mut_ptr().add(LANES * t).cast(), s) };
                let exp = _mm512_and_si512(
                    _mm512_srli_epi16::<7>(_mm512_permutexvar_epi16(rev_idx, v)),
                    low8,
                );
                let d = _mm512_sub_epi16(exp, base);
                (exp, d)
            };
            let (exp_a, exp_b) = (
                _mm512_castsi512_si256(exp),
                _mm512_extracti64x4_epi64::<1>(exp),
            );
            let (d_a, d_b) = (_mm512_castsi512_si256(d), _mm512_extracti64x4_epi64::<1>(d));
            a = half(a, exp_a, d_a, &mut wp);
            b = half(b, exp_b, d_b, &mut wp);
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
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, Normal};

    use crate::codec::ans::{self, ChunkEncoder, DecodeTable, LANES};
    use crate::codec::freq::FreqTable;
    use crate::codec::model::{self, SymbolModel};

    type Rng64 = rand_xoshiro::Xoshiro256PlusPlus;

    /// `n` BF16 values: weight-like (normal, narrow exponent range) or arbitrary bit patterns
    /// (with `mantissa_bits = 3`, arbitrary over 256 keys, as many as a table numbers).
    fn data(n: usize, arbitrary: bool, seed: u64, mb: u32) -> Vec<u8> {
        let mut rng = Rng64::seed_from_u64(seed);
        let d = Normal::new(0f32, 0.02).unwrap();
        (0..n)
            .flat_map(|_| {
                let bits = if arbitrary && mb == 0 {
                    rng.gen::<u16>()
                } else if arbitrary {
                    rng.gen::<u16>() & 0x8fff | 0x3000
                } else {
                    (d.sample(&mut rng).to_bits() >> 16) as u16
                };
                bits.to_le_bytes()
            })
            .collect()
    }

    /// A code table and the symbol model it codes.
    struct Code {
        t: FreqTable,
        m: SymbolModel,
    }

    impl Code {
        fn dec(&self) -> DecodeTable {
            DecodeTable::with_model(&self.t, &self.m)
        }

        fn enc(&self) -> ChunkEncoder {
            ChunkEncoder::with_model(&self.t, &self.m)
        }
    }

    fn table_of(bytes: &[u8], pb: u32, mb: u32) -> Code {
        let kh = model::key_histogram(&model::value_histogram(bytes), mb);
        let m = SymbolModel::from_key_histogram(&kh, mb).expect("at most 256 keys");
        let t = FreqTable::from_histogram(&m.symbol_histogram(&kh), pb).unwrap();
        Code { t, m }
    }

    /// The reference encoding of one chunk: (states, words, raw plane).
    fn reference(bytes: &[u8], c: &Code) -> ([u32; LANES], Vec<u16>, Vec<u8>) {
        let bits: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|p| u16::from_le_bytes([p[0], p[1]]))
            .collect();
        let syms: Vec<u8> = bits.iter().map(|&b| c.m.symbol(b)).collect();
        let raw = if c.m.mantissa_bits() == 0 {
            bits.iter()
                .map(|&b| crate::codec::bf16::sign_mantissa(b))
                .collect()
        } else {
            let mut raw = vec![0u8; model::raw_len(bits.len(), 3)];
            for (t, step) in bits.chunks(LANES).enumerate() {
                model::split_step_m3(step.iter().copied(), &mut raw[20 * t..]);
            }
            raw
        };
        let mut words = Vec::new();
        let states = ans::encode_chunk(&syms, &ans::enc_symbols(&c.t), c.t.prob_bits(), &mut words);
        (states, words, raw)
    }

    /// Words as stored (little-endian bytes) plus the decoder's padding.
    fn stored(words: &[u16]) -> Vec<u8> {
        let mut b: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        b.resize(b.len() + ans::WORD_PAD_BYTES, 0xa5);
        b
    }

    const SIZES: [usize; 11] = [0, 1, 31, 32, 33, 63, 100, 1000, 4096, 4097, 32768];

    #[test]
    fn encoders_match_the_reference_exactly() {
        for (pb, mb) in (8..=15).flat_map(|pb| [(pb, 0), (pb, 3)]) {
            for (i, &n) in SIZES.iter().enumerate() {
                for arbitrary in [false, true] {
                    let bytes = data(n, arbitrary, (pb as u64) << 32 | i as u64, mb);
                    let t = table_of(&bytes, pb, mb);
                    let (states, words, sm) = reference(&bytes, &t);
                    for enc in [t.enc(), t.enc().without_simd()] {
                        let mut got_sm = vec![0u8; sm.len()];
                        let mut scratch = Vec::new();
                        let (got_states, got_words) =
                            enc.encode_bf16(&bytes, &mut got_sm, &mut scratch);
                        assert_eq!(got_states, states, "pb {pb} n {n}");
                        assert_eq!(got_words, &words[..], "pb {pb} n {n}");
                        assert_eq!(got_sm, sm, "pb {pb} n {n}");
                    }
                }
            }
        }
    }

    #[test]
    fn single_precision_quotients_are_within_one_of_the_exact_ones() {
        // The AVX-512 encoder's quotient for prob_bits >= 12, in scalar IEEE single precision
        // (Rust's `as` conversions round and truncate as vcvtudq2ps and vcvttps2udq do): it
        // must be within one of floor(x / f) for every frequency and every state x < f·2^(32 -
        // pb) the encoder can divide, or the remainder correction would not fix it. Checked at
        // the exact multiples and their neighbours (where truncation is closest to going wrong)
        // across the whole range of quotients.
        let mut rng = Rng64::seed_from_u64(7);
        for pb in [12u32, 15] {
            for f in 1..=1u64 << pb {
                let rcp = 1.0f32 / f as f32;
                let top = (f << (32 - pb)).min(1 << 32);
                let mut ks: Vec<u64> = (0..24).map(|i| ((top / f) >> i).max(1)).collect();
                ks.extend((0..8).map(|_| rng.gen_range(1..top / f)));
                for k in ks {
                    for x in [k * f, k * f + 1, k * f + f - 1, k * f - 1] {
                        if !(ans::STATE_LOW as u64 / 2..top).contains(&x) {
                            continue;
                        }
                        let q0 = ((x as u32) as f32 * rcp) as u32 as i64;
                        let q = (x / f) as i64;
                        assert!((q0 - q).abs() <= 1, "pb {pb} f {f} x {x}: {q0} vs {q}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_scratch_buffer_is_reused_across_chunk_sizes() {
        let sizes = [4097, 33, 5000, 1];
        let all: Vec<u8> = sizes
            .iter()
            .flat_map(|&n| data(n, false, n as u64, 3))
            .collect();
        let t = table_of(&all, 12, 3);
        let enc = t.enc();
        let mut scratch = Vec::new();
        for n in sizes {
            let bytes = data(n, false, n as u64, 3);
            let (states, words, raw) = reference(&bytes, &t);
            let mut sm = vec![0u8; raw.len()];
            let (s, w) = enc.encode_bf16(&bytes, &mut sm, &mut scratch);
            assert_eq!((s, w), (states, &words[..]));
        }
    }

    #[test]
    fn decoders_match_the_reference() {
        for (pb, mb) in (8..=15).flat_map(|pb| [(pb, 0), (pb, 3)]) {
            for (i, &n) in SIZES.iter().enumerate() {
                for arbitrary in [false, true] {
                    let bytes = data(n, arbitrary, (pb as u64) << 32 | i as u64 | 1 << 20, mb);
                    let t = table_of(&bytes, pb, mb);
                    let (states, words, sm) = reference(&bytes, &t);
                    let mut padded = words.clone();
                    padded.push(0);
                    let mut out = vec![0u8; 2 * n];
                    ans::decode_chunk(&states, &padded, &t.dec(), &sm, &mut out).unwrap();
                    assert_eq!(out, bytes, "reference, pb {pb} n {n}");
                    for table in [t.dec(), t.dec().without_simd()] {
                        let mut out = vec![0x55u8; 2 * n];
                        ans::decode_chunk_bytes(
                            &states,
                            &stored(&words),
                            words.len(),
                            &table,
                            &sm,
                            &mut out,
                        )
                        .unwrap();
                        assert_eq!(out, bytes, "pb {pb} n {n}");
                    }
                }
            }
        }
    }

    #[test]
    fn pairs_of_unequal_chunks_decode_in_lockstep_like_single_chunks() {
        // Either chunk may be the longer one, by whole steps or by a partial step; the second
        // chunk of each case is also damaged once, which must fail it alone.
        for mb in [0, 3] {
            for (na, nb) in [(4096, 1000), (100, 4097), (33, 5000), (2048, 2047)] {
                let (ba, bb) = (data(na, false, 1, mb), data(nb, false, 2, mb));
                let t = table_of(&[ba.clone(), bb.clone()].concat(), 12, mb);
                let (sa, wa, ra) = reference(&ba, &t);
                let (sb, wb, rb) = reference(&bb, &t);
                let (swa, swb) = (stored(&wa), stored(&wb));
                for damaged in [false, true] {
                    let mut sb = sb;
                    if damaged {
                        sb[7] ^= 1 << 20;
                    }
                    for table in [t.dec(), t.dec().without_simd()] {
                        let (mut oa, mut ob) = (vec![0u8; 2 * na], vec![0u8; 2 * nb]);
                        let [a, b] = ans::decode_chunk_pair(
                            ans::ChunkJob {
                                states: sa,
                                words: &swa,
                                n_words: wa.len(),
                                raw: &ra,
                                out: &mut oa,
                            },
                            ans::ChunkJob {
                                states: sb,
                                words: &swb,
                                n_words: wb.len(),
                                raw: &rb,
                                out: &mut ob,
                            },
                            &table,
                        );
                        a.unwrap();
                        assert_eq!(oa, ba, "mb {mb} {na} {nb}");
                        assert_eq!(b.is_ok(), !damaged, "mb {mb} {na} {nb}");
                        if !damaged {
                            assert_eq!(ob, bb, "mb {mb} {na} {nb}");
                        }
                    }
                }
            }
        }
    }

    /// Every decoder (reference, scalar, SIMD) on the same possibly corrupt input; each must
    /// return, never panic, and they must agree on success.
    fn decode_all(
        states: &[u32; LANES],
        words: &[u16],
        t: &Code,
        sm: &[u8],
        n: usize,
    ) -> Vec<bool> {
        let mut padded = words.to_vec();
        padded.push(0);
        let mut out = vec![0u8; 2 * n];
        let mut ok = vec![ans::decode_chunk(states, &padded, &t.dec(), sm, &mut out).is_ok()];
        for table in [t.dec(), t.dec().without_simd()] {
            let mut out2 = vec![0u8; 2 * n];
            let r =
                ans::decode_chunk_bytes(states, &stored(words), words.len(), &table, sm, &mut out2);
            if r.is_ok() && ok[0] {
                assert_eq!(out2, out);
            }
            ok.push(r.is_ok());
        }
        ok
    }

    #[test]
    fn corrupt_chunks_are_errors_on_every_path() {
        let mut rng = Rng64::seed_from_u64(99);
        for (pb, mb) in [8, 11, 12, 13, 15]
            .into_iter()
            .flat_map(|pb| [(pb, 0), (pb, 3)])
        {
            for n in [33, 4097, 32768] {
                let bytes = data(n, false, n as u64 + pb as u64, mb);
                let t = table_of(&bytes, pb, mb);
                let (states, words, sm) = reference(&bytes, &t);
                assert_eq!(decode_all(&states, &words, &t, &sm, n), [true; 3]);
                for _ in 0..20 {
                    if words.is_empty() {
                        break;
                    }
                    // A flipped bit in one word.
                    let mut w = words.clone();
                    let i = rng.gen_range(0..w.len());
                    w[i] ^= 1 << rng.gen_range(0..16);
                    let r = decode_all(&states, &w, &t, &sm, n);
                    // A flipped bit lands in a state's low bits: see the state flips below.
                    if mb == 0 {
                        assert_eq!(r, [false; 3], "flip pb {pb} n {n} word {i}");
                    } else {
                        assert!(r == [false; 3] || r == [true; 3], "flip pb {pb} n {n}");
                    }
                    // Words cut short, or one too many.
                    let cut = rng.gen_range(0..w.len());
                    assert_eq!(
                        decode_all(&states, &words[..cut], &t, &sm, n),
                        [false; 3],
                        "cut pb {pb} n {n}"
                    );
                    let mut longer = words.clone();
                    longer.insert(rng.gen_range(0..=words.len()), rng.gen());
                    assert_eq!(
                        decode_all(&states, &longer, &t, &sm, n),
                        [false; 3],
                        "insert pb {pb} n {n}"
                    );
                    // A damaged lane state: flipped bit, or below the normalised range.
                    let mut s = states;
                    let lane = rng.gen_range(0..LANES);
                    s[lane] ^= 1 << rng.gen_range(0..32);
                    let r = decode_all(&s, &words, &t, &sm, n);
                    // With many frequency-1 symbols (coded mantissa bits, low precision) a flip
                    // in a state's slot bits can move between two of them and leave the state
                    // sequence intact: the chunk decodes, to other values, and only the
                    // container's checksum sees it. The decoders must still agree.
                    if mb == 0 {
                        assert_eq!(r, [false; 3], "state pb {pb} n {n}");
                    } else {
                        assert!(r == [false; 3] || r == [true; 3], "state pb {pb} n {n}");
                    }
                    s[lane] = rng.gen_range(0..ans::STATE_LOW);
                    assert_eq!(
                        decode_all(&s, &words, &t, &sm, n),
                        [false; 3],
                        "low state pb {pb} n {n}"
                    );
                }
                // Garbage everywhere: no panic, and no out-of-bounds read (the padding is only
                // 64 bytes however many words the garbage asks for).
                for _ in 0..20 {
                    let s: [u32; LANES] =
                        std::array::from_fn(|_| rng.gen_range(ans::STATE_LOW..=u32::MAX));
                    let w: Vec<u16> = (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect();
                    let _ = decode_all(&s, &w, &t, &sm, n);
                }
            }
        }
    }

    #[test]
    fn a_slice_without_padding_is_rejected() {
        let bytes = data(100, false, 5, 0);
        let t = table_of(&bytes, 12, 0);
        let (states, words, sm) = reference(&bytes, &t);
        let mut w = stored(&words);
        w.pop();
        let mut out = vec![0u8; 200];
        let table = t.dec();
        assert!(ans::decode_chunk_bytes(&states, &w, words.len(), &table, &sm, &mut out).is_err());
        assert!(ans::decode_chunk_bytes(
            &states,
            &stored(&words),
            words.len(),
            &table,
            &sm,
            &mut out[..198]
        )
        .is_err());
    }
}
