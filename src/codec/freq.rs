//! Per-tensor exponent code tables: a histogram quantised to frequencies that sum to
//! `2^prob_bits`, the form rANS needs.
//!
//! Every symbol that occurs gets a frequency of at least 1, so any exponent in the tensor can be
//! coded; symbols that do not occur get 0. The quantisation minimises the coded size greedily
//! (each unit of probability goes where it saves the most bits), which keeps the loss against
//! the exponent entropy to a few thousandths of a bit per weight at 12 bits of precision.
//!
//! Serialised form (sparse, since ~40 of 256 exponents occur): one byte `k - 1` where `k` is the
//! number of exponents with a non-zero frequency, then those `k` exponent values in strictly
//! ascending order, then their `k` frequencies as little-endian `u16`: `1 + 3k` bytes. A table is
//! valid when the frequencies are non-zero and sum to exactly `2^prob_bits`;
//! [`FreqTable::from_bytes`] checks that, so a corrupted table is an error and never a decoder
//! that reads out of bounds.

use super::CodecError;

/// Smallest supported probability precision.
pub const MIN_PROB_BITS: u32 = 8;
/// Largest supported probability precision. A 32-bit state with 16-bit renormalisation allows
/// 16; 15 keeps every frequency, including a lone symbol's `2^prob_bits`, inside a `u16`.
pub const MAX_PROB_BITS: u32 = 15;

/// Quantised exponent frequencies of one tensor, with the cumulative starts rANS needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FreqTable {
    prob_bits: u32,
    freq: [u32; 256],
    cum: [u32; 256],
}

impl FreqTable {
    /// Quantises a histogram to `2^prob_bits`. An empty histogram gives a table that codes
    /// exponent 0 only (nothing is ever coded with it).
    pub fn from_histogram(histogram: &[u64; 256], prob_bits: u32) -> Result<Self, CodecError> {
        check_prob_bits(prob_bits)?;
        let total: u64 = histogram.iter().sum();
        let scale = 1u64 << prob_bits;
        let present = histogram.iter().filter(|&&c| c > 0).count() as u64;
        if present > scale {
            return Err(CodecError::Invalid(format!(
                "{present} distinct exponents cannot be coded with {prob_bits}-bit probabilities"
            )));
        }
        let mut freq = [0u32; 256];
        if total == 0 {
            freq[0] = scale as u32;
            return Self::from_freqs(freq, prob_bits);
        }
        let mut sum: i64 = 0;
        for (f, &c) in freq.iter_mut().zip(histogram.iter()) {
            if c > 0 {
                let q = ((c as u128 * scale as u128 + total as u128 / 2) / total as u128) as u64;
                *f = q.max(1) as u32;
                sum += *f as i64;
            }
        }
        // Move single units of probability where they cost (or save) the least coded bits.
        let mut diff = scale as i64 - sum;
        while diff != 0 {
            let mut best: Option<(f64, usize)> = None;
            for s in 0..256 {
                let (c, f) = (histogram[s], freq[s]);
                if c == 0 {
                    continue;
                }
                // Bits saved (positive is good) by changing this symbol's frequency by one unit.
                let delta = if diff > 0 {
                    c as f64 * ((f as f64 + 1.0) / f as f64).log2()
                } else if f > 1 {
                    -(c as f64) * (f as f64 / (f as f64 - 1.0)).log2()
                } else {
                    continue;
                };
                if best.is_none_or(|(b, _)| delta > b) {
                    best = Some((delta, s));
                }
            }
            let (_, s) = best.expect("a present symbol can always take or give a unit");
            if diff > 0 {
                freq[s] += 1;
                diff -= 1;
            } else {
                freq[s] -= 1;
                diff += 1;
            }
        }
        Self::from_freqs(freq, prob_bits)
    }

    /// Builds a table from explicit frequencies, checking that they sum to `2^prob_bits`.
    pub fn from_freqs(freq: [u32; 256], prob_bits: u32) -> Result<Self, CodecError> {
        check_prob_bits(prob_bits)?;
        let sum: u64 = freq.iter().map(|&f| f as u64).sum();
        if sum != 1u64 << prob_bits {
            return Err(CodecError::Corrupt(format!(
                "exponent frequency table sums to {sum}, expected {}",
                1u64 << prob_bits
            )));
        }
        let mut cum = [0u32; 256];
        let mut acc = 0u32;
        for s in 0..256 {
            cum[s] = acc;
            acc += freq[s];
        }
        Ok(Self {
            prob_bits,
            freq,
            cum,
        })
    }

    /// Parses the serialised (sparse) form.
    pub fn from_bytes(bytes: &[u8], prob_bits: u32) -> Result<Self, CodecError> {
        let corrupt = |m: String| CodecError::Corrupt(format!("exponent code table: {m}"));
        let k = 1 + *bytes.first().ok_or_else(|| corrupt("empty".into()))? as usize;
        if bytes.len() != 1 + 3 * k {
            return Err(corrupt(format!(
                "{} bytes for {k} symbols, expected {}",
                bytes.len(),
                1 + 3 * k
            )));
        }
        let symbols = &bytes[1..1 + k];
        if symbols.windows(2).any(|w| w[0] >= w[1]) {
            return Err(corrupt("symbols are not strictly ascending".into()));
        }
        let mut freq = [0u32; 256];
        for (&s, f) in symbols.iter().zip(bytes[1 + k..].chunks_exact(2)) {
            let f = u16::from_le_bytes([f[0], f[1]]) as u32;
            if f == 0 {
                return Err(corrupt(format!("exponent {s} is listed with frequency 0")));
            }
            freq[s as usize] = f;
        }
        Self::from_freqs(freq, prob_bits)
    }

    /// The serialised (sparse) form. Every frequency fits a `u16` (see [`MAX_PROB_BITS`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let present: Vec<u8> = (0..=255u8).filter(|&s| self.freq[s as usize] > 0).collect();
        let mut out = Vec::with_capacity(1 + 3 * present.len());
        out.push((present.len() - 1) as u8);
        out.extend_from_slice(&present);
        for &s in &present {
            out.extend_from_slice(&(self.freq[s as usize] as u16).to_le_bytes());
        }
        out
    }

    /// Precision of the probabilities, in bits.
    pub fn prob_bits(&self) -> u32 {
        self.prob_bits
    }

    /// Frequency of exponent `s`.
    #[inline(always)]
    pub fn freq(&self, s: u8) -> u32 {
        self.freq[s as usize]
    }

    /// Cumulative frequency of the exponents below `s`.
    #[inline(always)]
    pub fn cum(&self, s: u8) -> u32 {
        self.cum[s as usize]
    }
}

fn check_prob_bits(prob_bits: u32) -> Result<(), CodecError> {
    if (MIN_PROB_BITS..=MAX_PROB_BITS).contains(&prob_bits) {
        Ok(())
    } else {
        Err(CodecError::Corrupt(format!(
            "probability precision {prob_bits} bits is outside {MIN_PROB_BITS}..={MAX_PROB_BITS}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantised_table_sums_to_scale_and_keeps_every_symbol() {
        let mut h = [0u64; 256];
        h[120] = 1_000_000;
        h[121] = 500_000;
        h[3] = 1;
        h[255] = 2;
        for bits in [8, 12, 15] {
            let t = FreqTable::from_histogram(&h, bits).unwrap();
            let sum: u32 = (0..=255u8).map(|s| t.freq(s)).sum();
            assert_eq!(sum, 1 << bits);
            assert!(t.freq(3) >= 1 && t.freq(255) >= 1);
            assert_eq!(t.freq(4), 0);
        }
    }

    #[test]
    fn too_many_symbols_for_the_precision_is_an_error() {
        let h = [1u64; 256];
        assert!(FreqTable::from_histogram(&h, 8).is_ok());
        let t = FreqTable::from_histogram(&h, 8).unwrap();
        assert!((0..=255u8).all(|s| t.freq(s) == 1));
    }

    #[test]
    fn corrupted_table_bytes_are_rejected() {
        let mut h = [0u64; 256];
        h[126] = 10;
        h[127] = 30;
        let t = FreqTable::from_histogram(&h, 12).unwrap();
        let bytes = t.to_bytes();
        assert_eq!(FreqTable::from_bytes(&bytes, 12).unwrap(), t);
        assert_eq!(bytes.len(), 7, "two symbols: 1 + 3 * 2 bytes");
        let mut bad = bytes.clone();
        bad[5] ^= 1;
        assert!(
            FreqTable::from_bytes(&bad, 12).is_err(),
            "frequencies no longer sum to 4096"
        );
        let mut bad = bytes.clone();
        bad[1] = bad[2];
        assert!(
            FreqTable::from_bytes(&bad, 12).is_err(),
            "symbols not ascending"
        );
        assert!(FreqTable::from_bytes(&bytes[..6], 12).is_err());
        assert!(FreqTable::from_bytes(&[], 12).is_err());
    }
}
