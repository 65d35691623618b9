//! What the rANS symbols stand for: the symbol model of a tensor and the raw plane that holds
//! the bits it does not code.
//!
//! A BF16 value is `s eeeeeeee mmmmmmm`. With `mantissa_bits = k` the coded *key* of a value is
//! its exponent and its `k` leading mantissa bits, `key = bits >> (7 - k) & (2^(8+k) - 1)`, and the
//! sign and the `7 - k` trailing mantissa bits are stored raw. Coding the key with one table is
//! coding the leading mantissa bits conditioned on the exponent: `H(e, m_k) = H(e) + H(m_k | e)`.
//!
//! - `k = 0` (format version 1, and version 2's fallback): the key is the exponent and the rANS
//!   symbol is the exponent byte itself; the raw plane is one `s mmmmmmm` byte per element.
//! - `k = 3` (version 2): the keys that occur (at most 256, else the tensor falls back to `k = 0`)
//!   are numbered by decreasing count (ties by ascending key), and the rANS symbol is that number,
//!   its *rank*; the table lists the key of every rank. The raw plane holds, per step of 32
//!   elements, 16 bytes of 4-bit trailing mantissas (element `2j` in the low nibble of byte `j`,
//!   `2j + 1` in the high one) and 4 bytes of signs (element `j` in bit `j % 8` of byte
//!   `16 + j / 8`): 20 bytes per step, a partial last step padded with zero bits.
//!
//! docs/format.md §2 gives the measurements behind `k = 3`.

use super::CodecError;

/// The leading mantissa bits version 2 codes with the exponent.
pub const V2_MANTISSA_BITS: u32 = 3;
/// Raw-plane bytes per step of 32 elements when `mantissa_bits = 3`.
pub const M3_STEP_BYTES: usize = 20;
/// The most distinct keys a table can number (ranks are bytes).
pub const MAX_SYMBOLS: usize = 256;

/// Bytes of the raw plane of `n` elements.
pub fn raw_len(n: usize, mantissa_bits: u32) -> usize {
    match mantissa_bits {
        0 => n,
        _ => n.div_ceil(32) * M3_STEP_BYTES,
    }
}

/// The coded key of a BF16 value: its exponent and `mantissa_bits` leading mantissa bits.
#[inline(always)]
pub fn key(bits: u16, mantissa_bits: u32) -> usize {
    ((bits >> (7 - mantissa_bits)) & ((1u16 << (8 + mantissa_bits)) - 1)) as usize
}

/// Writes the raw plane of one step (up to 32 elements, `mantissa_bits = 3`): 20 bytes.
#[inline]
pub fn split_step_m3(bits: impl Iterator<Item = u16>, out: &mut [u8]) {
    out[..M3_STEP_BYTES].fill(0);
    for (j, b) in bits.enumerate() {
        out[j / 2] |= ((b & 0xf) as u8) << (4 * (j & 1));
        out[16 + j / 8] |= ((b >> 15) as u8) << (j % 8);
    }
}

/// The raw bits of element `j` of a step (`mantissa_bits = 3`), in their BF16 positions.
#[inline(always)]
pub fn raw_bits_m3(step: &[u8], j: usize) -> u16 {
    let nib = (step[j / 2] >> (4 * (j & 1))) & 0xf;
    let sign = (step[16 + j / 8] >> (j % 8)) & 1;
    (sign as u16) << 15 | nib as u16
}

/// The symbol model of one tensor: how many mantissa bits are coded, and which key each rank
/// stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolModel {
    mantissa_bits: u32,
    /// Key of each rank (`mantissa_bits > 0` only).
    keys: Vec<u16>,
    /// Rank of each key that occurs (`mantissa_bits > 0` only), indexed by key.
    rank: Vec<u8>,
}

impl SymbolModel {
    /// The exponent-only model of format version 1: the symbol is the exponent byte.
    pub fn exponent() -> Self {
        Self {
            mantissa_bits: 0,
            keys: Vec::new(),
            rank: Vec::new(),
        }
    }

    /// The model numbering the keys of a key histogram (`2^(8 + mantissa_bits)` counts) by
    /// decreasing count; `None` when more than [`MAX_SYMBOLS`] keys occur.
    pub fn from_key_histogram(histogram: &[u64], mantissa_bits: u32) -> Option<Self> {
        if mantissa_bits == 0 {
            return Some(Self::exponent());
        }
        debug_assert_eq!(histogram.len(), 1 << (8 + mantissa_bits));
        let mut keys: Vec<u16> = (0..histogram.len() as u16)
            .filter(|&k| histogram[k as usize] > 0)
            .collect();
        if keys.len() > MAX_SYMBOLS {
            return None;
        }
        if keys.is_empty() {
            keys.push(0);
        }
        keys.sort_by_key(|&k| (std::cmp::Reverse(histogram[k as usize]), k));
        Self::from_keys(keys, mantissa_bits).ok()
    }

    fn from_keys(keys: Vec<u16>, mantissa_bits: u32) -> Result<Self, CodecError> {
        let n_keys = 1usize << (8 + mantissa_bits);
        let mut rank = vec![0u8; n_keys];
        let mut seen = vec![false; n_keys];
        if keys.is_empty() || keys.len() > MAX_SYMBOLS {
            return Err(CodecError::Corrupt(format!(
                "{} keys in the symbol table",
                keys.len()
            )));
        }
        for (r, &k) in keys.iter().enumerate() {
            let k = k as usize;
            if k >= n_keys || seen[k] {
                return Err(CodecError::Corrupt(format!(
                    "symbol table key {k} is out of range or repeated"
                )));
            }
            seen[k] = true;
            rank[k] = r as u8;
        }
        Ok(Self {
            mantissa_bits,
            keys,
            rank,
        })
    }

    /// Leading mantissa bits coded with the exponent.
    pub fn mantissa_bits(&self) -> u32 {
        self.mantissa_bits
    }

    /// Number of symbols (ranks) the model defines; 256 for the exponent model.
    pub fn symbols(&self) -> usize {
        if self.mantissa_bits == 0 {
            256
        } else {
            self.keys.len()
        }
    }

    /// The counts of each symbol, from the key histogram the model was built on.
    pub fn symbol_histogram(&self, key_histogram: &[u64]) -> [u64; 256] {
        let mut h = [0u64; 256];
        if self.mantissa_bits == 0 {
            h.copy_from_slice(&key_histogram[..256]);
        } else {
            for (r, &k) in self.keys.iter().enumerate() {
                h[r] = key_histogram[k as usize];
            }
        }
        h
    }

    /// The symbol of a BF16 value (its key must occur in the model).
    #[inline(always)]
    pub fn symbol(&self, bits: u16) -> u8 {
        if self.mantissa_bits == 0 {
            super::bf16::exponent(bits)
        } else {
            self.rank[key(bits, self.mantissa_bits)]
        }
    }

    /// Rank of each key, indexed by key (empty for the exponent model).
    pub(crate) fn ranks(&self) -> &[u8] {
        &self.rank
    }

    /// The bits symbol `s` decodes to, in their BF16 positions (exponent and coded mantissa
    /// bits; 0 for a rank the model does not define).
    #[inline(always)]
    pub fn high_bits(&self, s: u8) -> u16 {
        if self.mantissa_bits == 0 {
            (s as u16) << 7
        } else {
            self.keys
                .get(s as usize)
                .map_or(0, |&k| k << (7 - self.mantissa_bits))
        }
    }

    /// The key list as stored after the frequency table: `u16` little-endian per rank (nothing
    /// for the exponent model).
    pub fn keys_to_bytes(&self) -> Vec<u8> {
        self.keys.iter().flat_map(|k| k.to_le_bytes()).collect()
    }

    /// Parses a stored key list of `symbols` ranks.
    pub fn from_key_bytes(
        bytes: &[u8],
        symbols: usize,
        mantissa_bits: u32,
    ) -> Result<Self, CodecError> {
        if mantissa_bits == 0 {
            return if bytes.is_empty() {
                Ok(Self::exponent())
            } else {
                Err(CodecError::Corrupt(format!(
                    "{} bytes after an exponent code table",
                    bytes.len()
                )))
            };
        }
        if mantissa_bits != V2_MANTISSA_BITS {
            return Err(CodecError::Corrupt(format!(
                "{mantissa_bits} coded mantissa bits is unsupported (0 or {V2_MANTISSA_BITS})"
            )));
        }
        if bytes.len() != 2 * symbols {
            return Err(CodecError::Corrupt(format!(
                "symbol key list is {} bytes for {symbols} symbols",
                bytes.len()
            )));
        }
        let keys = bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        Self::from_keys(keys, mantissa_bits)
    }
}

/// The histogram of the keys (`2^(8 + mantissa_bits)` counts) of little-endian BF16 bytes and the
/// histogram of whole 16-bit values, in one parallel pass (the value histogram gives the
/// whole-value entropy reports compare with). Each is derived from a 65,536-count histogram.
pub fn value_histogram(bytes: &[u8]) -> Vec<u64> {
    use rayon::prelude::*;
    const PIECE: usize = 1 << 20;
    if bytes.len() <= PIECE {
        // One piece: count on the calling thread rather than hand it to the pool.
        let mut h = vec![0u64; 1 << 16];
        for p in bytes.chunks_exact(2) {
            h[u16::from_le_bytes([p[0], p[1]]) as usize] += 1;
        }
        return h;
    }
    bytes
        .par_chunks(PIECE)
        .fold(
            || vec![0u32; 1 << 16],
            |mut h, piece| {
                for p in piece.chunks_exact(2) {
                    h[u16::from_le_bytes([p[0], p[1]]) as usize] += 1;
                }
                h
            },
        )
        .map(|h| h.into_iter().map(u64::from).collect::<Vec<u64>>())
        .reduce(
            || vec![0u64; 1 << 16],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += y;
                }
                a
            },
        )
}

/// The key histogram of `mantissa_bits` from a whole-value histogram (65,536 counts).
///
/// A key's bit patterns are a run of `2^(7 - mantissa_bits)` consecutive values, once with the
/// sign clear and once with it set ([`key`] drops the sign and the low mantissa bits), so each
/// count is two contiguous sums: no per-value index arithmetic, no scattered adds. This runs
/// for every tensor `compress` codes, and was a tenth of coding a small model's tensors.
pub fn key_histogram(value_histogram: &[u64], mantissa_bits: u32) -> Vec<u64> {
    assert_eq!(value_histogram.len(), 1 << 16, "a whole-value histogram");
    let run = 1usize << (7 - mantissa_bits);
    let mut h = vec![0u64; 1 << (8 + mantissa_bits)];
    for half in value_histogram.chunks_exact(1 << 15) {
        for (count, values) in h.iter_mut().zip(half.chunks_exact(run)) {
            *count += values.iter().sum::<u64>();
        }
    }
    h
}

/// The key histogram of `to_bits` mantissa bits from one of `from_bits` (at least `to_bits`):
/// the keys that differ only in the dropped low bits summed, as [`key_histogram`] would count
/// them, without another pass over the 65,536 values.
pub fn coarser_key_histogram(key_histogram: &[u64], from_bits: u32, to_bits: u32) -> Vec<u64> {
    assert!(to_bits <= from_bits);
    assert_eq!(key_histogram.len(), 1 << (8 + from_bits));
    key_histogram
        .chunks_exact(1 << (from_bits - to_bits))
        .map(|c| c.iter().sum())
        .collect()
}

/// What coding a tensor needs from a pass over its values: the key histogram of
/// [`V2_MANTISSA_BITS`] (every coarser key histogram, the exponent's included, is a sum of it) and
/// the whole-value entropy the reports compare with.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorStats {
    /// Counts of the keys of [`V2_MANTISSA_BITS`] leading mantissa bits (2,048 counts).
    pub keys: Vec<u64>,
    /// Order-0 entropy of the whole 16-bit values in bits per value.
    pub value_entropy_bits: f64,
}

impl TensorStats {
    /// The statistics of a whole-value histogram (65,536 counts).
    pub fn from_value_histogram(values: &[u64]) -> Self {
        Self {
            keys: key_histogram(values, V2_MANTISSA_BITS),
            value_entropy_bits: entropy(values),
        }
    }

    /// The statistics of little-endian BF16 bytes (a parallel pass, see [`value_histogram`]).
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_value_histogram(&value_histogram(bytes))
    }

    /// The key histogram of `mantissa_bits` (at most [`V2_MANTISSA_BITS`]).
    pub fn key_histogram(&self, mantissa_bits: u32) -> Vec<u64> {
        coarser_key_histogram(&self.keys, V2_MANTISSA_BITS, mantissa_bits)
    }

    /// Entropy of the exponents in bits per value.
    pub fn exponent_entropy_bits(&self) -> f64 {
        entropy(&self.key_histogram(0))
    }
}

/// A whole-value histogram filled piece by piece, as a tensor is read, and emptied into its
/// [`TensorStats`] when the tensor is complete; one is reused for every tensor.
///
/// `compress` counts each piece of a tensor right after reading it, while the piece is still in
/// the cache, instead of in a second pass over the whole tensor from memory. Counting into 32-bit
/// counts keeps the 65,536 of them in a quarter of a MiB (half of what 64-bit counts take, so the
/// table and a piece share a core's L2); they move to 64-bit counts before they could overflow.
/// Emptying costs one scan of the counts (which skips empty blocks), which also leaves them zero
/// for the next tensor: no per-tensor allocation or clearing.
pub struct ValueCounts {
    counts: Box<[u32; 1 << 16]>,
    /// 64-bit counts the 32-bit ones moved to (empty until a tensor of 2^32 values needs it).
    spill: Vec<u64>,
    /// Values counted since the last move to `spill`.
    since_spill: u64,
    /// Values counted since the last [`ValueCounts::take`].
    total: u64,
}

impl Default for ValueCounts {
    fn default() -> Self {
        Self::new()
    }
}

impl ValueCounts {
    /// Empty counts.
    pub fn new() -> Self {
        Self {
            counts: vec![0u32; 1 << 16]
                .into_boxed_slice()
                .try_into()
                .expect("65,536 counts"),
            spill: Vec::new(),
            since_spill: 0,
            total: 0,
        }
    }

    /// Counts the values of little-endian BF16 bytes (an even number of them).
    pub fn add(&mut self, bytes: &[u8]) {
        debug_assert!(bytes.len().is_multiple_of(2));
        let n = (bytes.len() / 2) as u64;
        if self.since_spill + n > u32::MAX as u64 {
            self.spill_counts();
        }
        self.since_spill += n;
        self.total += n;
        let h = &mut *self.counts;
        // Four values per 8-byte load: byte loads and shifts per value cost more than the counts.
        let mut eights = bytes.chunks_exact(8);
        for c in &mut eights {
            let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            h[(w & 0xffff) as usize] += 1;
            h[(w >> 16 & 0xffff) as usize] += 1;
            h[(w >> 32 & 0xffff) as usize] += 1;
            h[(w >> 48) as usize] += 1;
        }
        for p in eights.remainder().chunks_exact(2) {
            h[u16::from_le_bytes([p[0], p[1]]) as usize] += 1;
        }
    }

    /// Moves `other`'s counts into these, leaving `other` empty: two threads can count the two
    /// halves of one tensor and [`ValueCounts::take`] then gives exactly what one thread counting
    /// all of it would (the counts are the same integers).
    pub fn absorb(&mut self, other: &mut ValueCounts) {
        if self.since_spill + other.since_spill > u32::MAX as u64 {
            self.spill_counts();
        }
        // Whole blocks of 16 that are empty in `other` are skipped, as in `take`.
        for (mine, theirs) in self
            .counts
            .chunks_exact_mut(16)
            .zip(other.counts.chunks_exact_mut(16))
        {
            if theirs.iter().fold(0, |a, &c| a | c) == 0 {
                continue;
            }
            for (m, t) in mine.iter_mut().zip(theirs) {
                *m += std::mem::take(t);
            }
        }
        if !other.spill.is_empty() {
            self.spill.resize(1 << 16, 0);
            for (m, t) in self.spill.iter_mut().zip(&other.spill) {
                *m += t;
            }
            other.spill.clear();
        }
        self.since_spill += std::mem::take(&mut other.since_spill);
        self.total += std::mem::take(&mut other.total);
    }

    /// Moves the 32-bit counts to the 64-bit `spill`, so counting can go on without overflow.
    fn spill_counts(&mut self) {
        self.spill.resize(1 << 16, 0);
        for (s, c) in self.spill.iter_mut().zip(self.counts.iter_mut()) {
            *s += *c as u64;
            *c = 0;
        }
        self.since_spill = 0;
    }

    /// The statistics of everything counted since the last call; the counts are left empty.
    /// Exactly what [`TensorStats::of`] gives for the same values: the entropy is summed bin by
    /// bin in the same order with the same operations as [`entropy`].
    pub fn take(&mut self) -> TensorStats {
        let mut keys = vec![0u64; 1 << (8 + V2_MANTISSA_BITS)];
        let t = self.total as f64;
        // `Sum` of f64 starts from -0.0: so does this, to the last bit.
        let mut h = -0.0f64;
        let mut empty = |v: usize, c: u64| {
            keys[key(v as u16, V2_MANTISSA_BITS)] += c;
            let p = c as f64 / t;
            h += -p * p.log2();
        };
        if !self.spill.is_empty() {
            for (v, (s, c)) in self
                .spill
                .iter_mut()
                .zip(self.counts.iter_mut())
                .enumerate()
            {
                let n = *s + *c as u64;
                if n > 0 {
                    empty(v, n);
                }
                (*s, *c) = (0, 0);
            }
            self.spill.clear();
        } else {
            // The values of a tensor fill a few runs of the table: skip empty blocks of 16
            // counts with one (vectorised) test.
            for (b, block) in self.counts.chunks_exact_mut(16).enumerate() {
                if block.iter().fold(0, |a, &c| a | c) == 0 {
                    continue;
                }
                for (i, c) in block.iter_mut().enumerate() {
                    if *c > 0 {
                        empty(16 * b + i, std::mem::take(c) as u64);
                    }
                }
            }
        }
        let total = std::mem::take(&mut self.total);
        self.since_spill = 0;
        TensorStats {
            keys,
            value_entropy_bits: if total == 0 { 0.0 } else { h.max(0.0) },
        }
    }
}

/// Shannon entropy in bits per symbol of any histogram (0 for an empty one).
pub fn entropy(histogram: &[u64]) -> f64 {
    let total: u64 = histogram.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let t = total as f64;
    let h: f64 = histogram
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / t;
            -p * p.log2()
        })
        .sum();
    h.max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_histograms_count_every_value_under_its_key() {
        // Independent of the run arithmetic: every value counted under `key` one by one.
        let mut values = vec![0u64; 1 << 16];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for v in values.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *v = x % 1000;
        }
        for m in 0..=7 {
            let mut want = vec![0u64; 1 << (8 + m)];
            for (v, &c) in values.iter().enumerate() {
                want[key(v as u16, m)] += c;
            }
            let kh = key_histogram(&values, m);
            assert_eq!(kh, want, "mantissa bits {m}");
            for to in 0..=m {
                assert_eq!(
                    coarser_key_histogram(&kh, m, to),
                    key_histogram(&values, to),
                    "{m} -> {to}"
                );
            }
        }
    }

    #[test]
    fn value_counts_give_the_statistics_of_the_values_piece_by_piece_and_empty_themselves() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut gen = |n: usize, spread: u64| -> Vec<u8> {
            (0..n)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // A bell of values around 0x3c00 and its negative, and now and then any.
                    let v = if x.is_multiple_of(7) {
                        x >> 20
                    } else {
                        0x3c00 + (x >> 8) % spread
                    };
                    let v = v as u16 ^ ((x >> 40) as u16 & 0x8000);
                    v.to_le_bytes()
                })
                .collect()
        };
        let mut counts = ValueCounts::new();
        // Tensors counted in odd-sized pieces, one after the other: each must give exactly the
        // one-pass statistics (the entropy to the last bit, so metadata does not change).
        for (n, spread) in [(300_001, 900), (1000, 40), (70_000, 5000)] {
            let bytes = gen(n, spread);
            for piece in bytes.chunks(2 * 777) {
                counts.add(piece);
            }
            assert_eq!(counts.take(), TensorStats::of(&bytes), "{n} values");
        }
        assert!(counts.counts.iter().all(|&c| c == 0), "left empty");
        // Counts moved to 64 bits on the way give the same statistics.
        let bytes = gen(5000, 300);
        counts.add(&bytes[..4000]);
        counts.since_spill = u32::MAX as u64 - 10;
        counts.add(&bytes[4000..]);
        assert!(!counts.spill.is_empty());
        assert_eq!(counts.take(), TensorStats::of(&bytes));
        assert!(counts.spill.is_empty() && counts.counts.iter().all(|&c| c == 0));
        // Two halves counted apart and absorbed give the one-pass statistics, and leave the
        // absorbed counts empty; so do halves whose sum has to move to 64 bits, and a spilled
        // half absorbed into a plain one.
        let bytes = gen(90_001, 2000);
        let (a, b) = bytes.split_at(2 * 40_000);
        let mut other = ValueCounts::new();
        for spill_mine in [None, Some(u32::MAX as u64 - 10)] {
            for spill_theirs in [false, true] {
                counts.add(a);
                other.add(b);
                if let Some(s) = spill_mine {
                    counts.since_spill = s;
                }
                if spill_theirs {
                    other.spill_counts();
                }
                counts.absorb(&mut other);
                assert_eq!(
                    counts.take(),
                    TensorStats::of(&bytes),
                    "{spill_mine:?} {spill_theirs}"
                );
                assert_eq!((other.total, other.since_spill), (0, 0));
                assert!(other.spill.is_empty() && other.counts.iter().all(|&c| c == 0));
                assert!(counts.spill.is_empty() && counts.counts.iter().all(|&c| c == 0));
            }
        }
    }

    #[test]
    fn raw_bits_and_high_bits_rebuild_every_pattern() {
        // Every pattern once: 2048 keys, more than a model numbers, so check in 8 slices of 256.
        for slice in 0..8u32 {
            let values: Vec<u16> = (0..=u16::MAX)
                .filter(|&v| key(v, 3) as u32 / 256 == slice)
                .collect();
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let kh = key_histogram(&value_histogram(&bytes), 3);
            let m = SymbolModel::from_key_histogram(&kh, 3).expect("256 keys fit");
            for step in values.chunks(32) {
                let mut raw = [0u8; M3_STEP_BYTES];
                split_step_m3(step.iter().copied(), &mut raw);
                for (j, &v) in step.iter().enumerate() {
                    assert_eq!(m.high_bits(m.symbol(v)) | raw_bits_m3(&raw, j), v);
                }
            }
        }
    }

    #[test]
    fn ranks_follow_decreasing_counts_and_too_many_keys_fall_back() {
        let mut h = vec![0u64; 2048];
        h[5] = 10;
        h[900] = 30;
        h[7] = 10;
        let m = SymbolModel::from_key_histogram(&h, 3).unwrap();
        assert_eq!(m.keys, [900, 5, 7]);
        let back = SymbolModel::from_key_bytes(&m.keys_to_bytes(), 3, 3).unwrap();
        assert_eq!(back, m);
        assert!(
            SymbolModel::from_key_bytes(&[5, 0, 5, 0], 2, 3).is_err(),
            "repeated"
        );
        assert!(
            SymbolModel::from_key_bytes(&[0, 8], 1, 3).is_err(),
            "out of range"
        );
        assert!(
            SymbolModel::from_key_bytes(&[1, 0], 1, 2).is_err(),
            "unsupported k"
        );
        let all = vec![1u64; 2048];
        assert!(SymbolModel::from_key_histogram(&all, 3).is_none());
    }
}
