//! ggml tensor types: their ids as stored in GGUF tensor infos, names, and block layouts (how
//! many elements a block holds and how many bytes it takes), which the reader needs to check that
//! every tensor's data lies inside the file.

use std::fmt;

/// A ggml tensor type id as stored in a GGUF tensor info. Unknown ids are kept (the file may be
/// newer than this reader); such tensors can be listed but not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    /// 32-bit IEEE float.
    pub const F32: Self = Self(0);
    /// 16-bit IEEE float.
    pub const F16: Self = Self(1);
    /// Blocks of 32: f16 scale `d`, 16 bytes of 4-bit quants; x = (q - 8) * d.
    pub const Q4_0: Self = Self(2);
    /// Blocks of 32: f16 scale `d`, f16 minimum `m`, 16 bytes of 4-bit quants; x = q * d + m.
    pub const Q4_1: Self = Self(3);
    /// Blocks of 32: f16 scale `d`, 32 signed bytes; x = q * d.
    pub const Q8_0: Self = Self(8);
    /// bfloat16.
    pub const BF16: Self = Self(30);

    /// ggml's name of the type ("Q4_1"), or `type N` for an id this reader does not know.
    pub fn name(self) -> String {
        match LAYOUTS.iter().find(|l| l.0 == self.0) {
            Some(l) => l.1.to_string(),
            None => format!("type {}", self.0),
        }
    }

    /// `(elements per block, bytes per block)`, or `None` for an id this reader does not know.
    pub fn block(self) -> Option<(u64, u64)> {
        LAYOUTS.iter().find(|l| l.0 == self.0).map(|l| (l.2, l.3))
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// (id, name, block elements, block bytes), as in ggml's type traits. Ids 4 and 5 were removed
/// from ggml; Q8_1 (9) is left out because its block size changed between ggml versions.
const LAYOUTS: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_types() {
        assert_eq!(GgmlType::Q4_1.name(), "Q4_1");
        assert_eq!(GgmlType::Q4_1.block(), Some((32, 20)));
        assert_eq!(GgmlType::Q8_0.block(), Some((32, 34)));
        assert_eq!(GgmlType::BF16.block(), Some((1, 2)));
        assert_eq!(GgmlType(4).name(), "type 4");
        assert_eq!(GgmlType(4).block(), None);
        assert_eq!(GgmlType(9).block(), None);
    }
}
