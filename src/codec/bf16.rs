//! BF16 bit-field helpers: the split of a BF16 value into the exponent byte that the codec
//! entropy-codes and the sign+mantissa byte that it stores raw, and the exponent statistics
//! (histogram, entropy, size floor) every size claim in the project is measured against.
//!
//! A BF16 value is `s eeeeeeee mmmmmmm` (1 + 8 + 7 bits). The split is a bijection between the
//! 65,536 bit patterns and the pairs (exponent byte, sign+mantissa byte), which is why the codec is
//! lossless for NaN payloads, infinities, subnormals and -0 without any special case.

/// The exponent field (bits 7..15) of a BF16 bit pattern.
#[inline(always)]
pub fn exponent(bits: u16) -> u8 {
    (bits >> 7) as u8
}

/// The sign and mantissa of a BF16 bit pattern packed into one byte: `s mmmmmmm`.
#[inline(always)]
pub fn sign_mantissa(bits: u16) -> u8 {
    (((bits >> 8) & 0x80) | (bits & 0x7f)) as u8
}

/// Rebuilds the BF16 bit pattern from its exponent byte and its sign+mantissa byte.
#[inline(always)]
pub fn join(exponent: u8, sign_mantissa: u8) -> u16 {
    (((sign_mantissa as u16) & 0x80) << 8)
        | ((exponent as u16) << 7)
        | ((sign_mantissa as u16) & 0x7f)
}

/// Reads the `i`-th little-endian BF16 value of a byte slice.
#[inline(always)]
pub fn load(bytes: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])
}

/// Counts how often each exponent value occurs in little-endian BF16 bytes.
///
/// Runs in parallel over large inputs because it is the first full pass of every compression.
pub fn exponent_histogram(bytes: &[u8]) -> [u64; 256] {
    use rayon::prelude::*;
    debug_assert!(bytes.len().is_multiple_of(2));
    const PIECE: usize = 1 << 20;
    bytes
        .par_chunks(PIECE)
        .map(|piece| {
            // Four sub-histograms hide the store-to-load dependency on repeated exponents.
            let mut h = [[0u32; 256]; 4];
            let mut quads = piece.chunks_exact(8);
            for q in &mut quads {
                h[0][exponent(u16::from_le_bytes([q[0], q[1]])) as usize] += 1;
                h[1][exponent(u16::from_le_bytes([q[2], q[3]])) as usize] += 1;
                h[2][exponent(u16::from_le_bytes([q[4], q[5]])) as usize] += 1;
                h[3][exponent(u16::from_le_bytes([q[6], q[7]])) as usize] += 1;
            }
            for pair in quads.remainder().chunks_exact(2) {
                h[0][exponent(u16::from_le_bytes([pair[0], pair[1]])) as usize] += 1;
            }
            let mut out = [0u64; 256];
            for sub in &h {
                for (o, &c) in out.iter_mut().zip(sub.iter()) {
                    *o += c as u64;
                }
            }
            out
        })
        .reduce(
            || [0u64; 256],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b.iter()) {
                    *x += y;
                }
                a
            },
        )
}

/// Shannon entropy, in bits per symbol, of a histogram (0 for an empty one).
pub fn entropy_bits(histogram: &[u64; 256]) -> f64 {
    let total: u64 = histogram.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let total = total as f64;
    let h: f64 = histogram
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total;
            -p * p.log2()
        })
        .sum();
    // A single-symbol histogram sums to -0.0; report it as 0.
    h.max(0.0)
}

/// The lossless size floor for `n` BF16 values whose exponents carry `exponent_entropy` bits:
/// `n × (8 + H_exp) / 8` bytes (sign+mantissa at 8 bits, exponent at its entropy).
pub fn floor_bytes(n: u64, exponent_entropy: f64) -> f64 {
    n as f64 * (8.0 + exponent_entropy) / 8.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_join_are_inverse_for_every_pattern() {
        for bits in 0..=u16::MAX {
            assert_eq!(
                join(exponent(bits), sign_mantissa(bits)),
                bits,
                "{bits:#06x}"
            );
        }
    }

    #[test]
    fn histogram_matches_a_naive_count() {
        let bytes: Vec<u8> = (0..10_007u32)
            .flat_map(|i| (i.wrapping_mul(2654435761) as u16).to_le_bytes())
            .collect();
        let mut naive = [0u64; 256];
        for i in 0..bytes.len() / 2 {
            naive[exponent(load(&bytes, i)) as usize] += 1;
        }
        assert_eq!(exponent_histogram(&bytes), naive);
    }
}
