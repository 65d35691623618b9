//! Dequantization of GGUF tensor data to f32 for the types llama.cpp uses for Llama weights that
//! this project reads: F32, F16, BF16, Q8_0, Q4_0 and Q4_1 (block layouts as in ggml's
//! `ggml-common.h`). The arithmetic is the one ggml and the `gguf` Python package use — an f32
//! multiply, then an f32 add for Q4_1, never fused — so results match them bit for bit.

use super::GgmlType;

/// Why tensor bytes could not be dequantized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DequantError {
    /// A type this module does not decode.
    #[error("dequantizing {0} is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)")]
    Unsupported(GgmlType),
    /// A byte count that is not a whole number of blocks.
    #[error("{len} bytes are not a whole number of {ty} blocks of {block} bytes")]
    Length {
        /// The type.
        ty: GgmlType,
        /// The byte count given.
        len: usize,
        /// Bytes per block of the type.
        block: usize,
    },
}

/// Elements per block of the quantized types.
const QK: usize = 32;

/// Decodes `bytes`, a whole number of blocks of type `ty`, to f32 values in storage order.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Result<Vec<f32>, DequantError> {
    let block = match ty {
        GgmlType::F32 => 4,
        GgmlType::F16 | GgmlType::BF16 => 2,
        GgmlType::Q8_0 => 2 + QK,
        GgmlType::Q4_0 => 2 + QK / 2,
        GgmlType::Q4_1 => 4 + QK / 2,
        other => return Err(DequantError::Unsupported(other)),
    };
    if !bytes.len().is_multiple_of(block) {
        return Err(DequantError::Length {
            ty,
            len: bytes.len(),
            block,
        });
    }
    let blocks = bytes.chunks_exact(block);
    Ok(match ty {
        GgmlType::F32 => blocks
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlType::F16 => blocks
            .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        GgmlType::BF16 => blocks
            .map(|b| bf16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        _ => {
            let mut out = Vec::with_capacity(bytes.len() / block * QK);
            for b in blocks {
                let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
                match ty {
                    GgmlType::Q8_0 => out.extend(b[2..].iter().map(|&q| f32::from(q as i8) * d)),
                    GgmlType::Q4_0 => {
                        let qs = &b[2..];
                        out.extend(qs.iter().map(|&q| f32::from((q & 0xf) as i8 - 8) * d));
                        out.extend(qs.iter().map(|&q| f32::from((q >> 4) as i8 - 8) * d));
                    }
                    _ => {
                        let m = f16_to_f32(u16::from_le_bytes([b[2], b[3]]));
                        let qs = &b[4..];
                        out.extend(qs.iter().map(|&q| f32::from(q & 0xf) * d + m));
                        out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
                    }
                }
            }
            out
        }
    })
}

/// Converts IEEE binary16 bits to f32 exactly (every f16, subnormals, infinities and NaN
/// payloads included, is representable in f32).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    match (exp, man) {
        (0, 0) => f32::from_bits(sign),
        (0, m) => {
            // Subnormal: m * 2^-24, exact in f32.
            let v = m as f32 * f32::from_bits(0x3380_0000);
            if sign != 0 {
                -v
            } else {
                v
            }
        }
        (0x1f, m) => f32::from_bits(sign | 0x7f80_0000 | (m << 13)),
        (e, m) => f32::from_bits(sign | ((e + 127 - 15) << 23) | (m << 13)),
    }
}

/// Converts bfloat16 bits to f32 (exact: bfloat16 is the top half of an f32).
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_values_derived_by_hand() {
        assert_eq!(f16_to_f32(0x3c00), 1.0); // exp 15, mantissa 0
        assert_eq!(f16_to_f32(0xc000), -2.0); // sign, exp 16
        assert_eq!(f16_to_f32(0x3800), 0.5);
        assert_eq!(f16_to_f32(0x3e00), 1.5); // mantissa 0x200 = half
        assert_eq!(f16_to_f32(0x7bff), 65504.0); // largest finite
        assert_eq!(f16_to_f32(0x0400), 2f32.powi(-14)); // smallest normal
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24)); // smallest subnormal
        assert_eq!(f16_to_f32(0x8003), -3.0 * 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24)); // largest subnormal
        assert_eq!(f16_to_f32(0x8000).to_bits(), 0x8000_0000); // -0 keeps its sign
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[test]
    fn f16_conversion_is_exhaustively_monotonic_and_exact() {
        // Every finite non-negative f16 keeps its order, and a normal one lands on an f32 whose
        // 13 low mantissa bits are zero (its 10 mantissa bits moved up unchanged).
        let mut prev = -1.0f32;
        for h in 0u16..0x7c00 {
            let v = f16_to_f32(h);
            assert!(v > prev, "{h:#06x}");
            prev = v;
            if h >= 0x0400 {
                assert_eq!(v.to_bits() & 0x1fff, 0, "{h:#06x}: low mantissa bits set");
            }
        }
    }

    #[test]
    fn bf16_is_the_top_half() {
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
        assert_eq!(bf16_to_f32(0xc0a0), -5.0);
    }

    #[test]
    fn plain_types() {
        let f32s: Vec<u8> = [1.5f32, -0.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(dequantize(GgmlType::F32, &f32s).unwrap(), vec![1.5, -0.25]);
        assert_eq!(
            dequantize(GgmlType::F16, &[0x00, 0x3c, 0x00, 0xc0]).unwrap(),
            vec![1.0, -2.0]
        );
        assert_eq!(
            dequantize(GgmlType::BF16, &[0x80, 0x3f, 0xa0, 0xc0]).unwrap(),
            vec![1.0, -5.0]
        );
    }

    #[test]
    fn q8_0_block() {
        // d = 0.5 (f16 0x3800), quants 0, 1, -1, 2, -2, ..., 127 and -128 at the end.
        let mut b = vec![0x00, 0x38];
        let qs: Vec<i8> = (0..30)
            .map(|i| if i % 2 == 0 { i / 2 } else { -(i / 2) - 1 })
            .chain([127, -128])
            .collect();
        b.extend(qs.iter().map(|&q| q as u8));
        let want: Vec<f32> = qs.iter().map(|&q| q as f32 * 0.5).collect();
        let got = dequantize(GgmlType::Q8_0, &b).unwrap();
        assert_eq!(got, want);
        assert_eq!(&got[..5], &[0.0, -0.5, 0.5, -1.0, 1.0]);
        assert_eq!(&got[30..], &[63.5, -64.0]);
    }

    #[test]
    fn q4_0_block_low_nibbles_first() {
        // d = 2.0 (f16 0x4000). Byte j holds element j in its low nibble and element j + 16 in
        // its high nibble; x = (q - 8) * d.
        let mut b = vec![0x00, 0x40];
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let got = dequantize(GgmlType::Q4_0, &b).unwrap();
        assert_eq!(got.len(), 32);
        assert_eq!(got[0], -16.0); // q = 0
        assert_eq!(got[8], 0.0); // q = 8
        assert_eq!(got[15], 14.0); // q = 15
        assert_eq!(got[16], 14.0); // high nibble of byte 0: q = 15
        assert_eq!(got[31], -16.0); // high nibble of byte 15: q = 0
    }

    #[test]
    fn q4_1_block_low_nibbles_first() {
        // d = 0.25 (f16 0x3400), m = -1.0 (f16 0xbc00); x = q * d + m.
        let mut b = vec![0x00, 0x34, 0x00, 0xbc];
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let got = dequantize(GgmlType::Q4_1, &b).unwrap();
        let want: Vec<f32> = (0..16)
            .chain((0..16).rev())
            .map(|q| q as f32 * 0.25 - 1.0)
            .collect();
        assert_eq!(got, want);
        assert_eq!(
            (got[0], got[4], got[15], got[16], got[31]),
            (-1.0, 0.0, 2.75, 2.75, -1.0)
        );
    }

    #[test]
    fn several_blocks_stay_in_order() {
        // Two Q4_1 blocks: the second's values follow the first's.
        let mut b = vec![0x00, 0x3c, 0x00, 0x00]; // d = 1, m = 0
        b.extend([0x10u8; 16]); // low nibble 0, high nibble 1
        b.extend([0x00, 0x3c, 0x00, 0x49]); // d = 1, m = 10 (f16 0x4900)
        b.extend([0x32u8; 16]); // low 2, high 3
        let got = dequantize(GgmlType::Q4_1, &b).unwrap();
        assert_eq!(got.len(), 64);
        assert_eq!((got[0], got[16], got[32], got[48]), (0.0, 1.0, 12.0, 13.0));
    }

    #[test]
    fn bad_lengths_and_types_are_errors() {
        assert_eq!(
            dequantize(GgmlType::Q4_1, &[0; 21]),
            Err(DequantError::Length {
                ty: GgmlType::Q4_1,
                len: 21,
                block: 20
            })
        );
        assert_eq!(
            dequantize(GgmlType(12), &[0; 144]),
            Err(DequantError::Unsupported(GgmlType(12)))
        );
        assert_eq!(dequantize(GgmlType::F32, &[]).unwrap(), Vec::<f32>::new());
    }
}
