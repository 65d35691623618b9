//! The JSON metadata a compressed safetensors file carries in its `__metadata__` under the key
//! [`META_KEY`]: the format version and, for every logical tensor in file order, its original
//! dtype and shape, its encoding, its checksums and its encoding parameters.
//!
//! Logical tensors are what the original checkpoint held. A `raw` tensor is stored unchanged
//! under its own name; an `exp-rans` tensor is stored as the three U8 parts named by
//! [`part_name`]: `sm` (the raw plane: sign and uncoded mantissa bits), `exp` (rANS words) and `index` (chunk offsets,
//! lane states and the code table, concatenated). `docs/format.md` is the normative description.

use serde::{Deserialize, Serialize};

/// The format version this build writes; it reads this one and every earlier one (from
/// [`OLDEST_VERSION`]).
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads. Version 1 differs only in that it codes the
/// exponent alone (`mantissa_bits` 0, absent from its metadata).
pub const OLDEST_VERSION: u32 = 1;
/// The `__metadata__` key that holds [`FileMeta`] as a JSON string.
pub const META_KEY: &str = "unweight";
/// The value of [`FileMeta::format`]: tells an unweight file from any other safetensors file.
pub const FORMAT_NAME: &str = "unweight";

/// The suffixes of the stored parts of an `exp-rans` tensor, in the order their checksum covers.
pub const PARTS: [&str; 3] = ["sm", "exp", "index"];

/// The safetensors name of one stored part of a compressed tensor.
pub fn part_name(tensor: &str, part: &str) -> String {
    format!("{tensor}#{part}")
}

/// How one logical tensor is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encoding {
    /// The original bytes, unchanged, under the tensor's own name and dtype.
    #[serde(rename = "raw")]
    Raw,
    /// BF16 split into raw sign+mantissa bytes and 32-lane rANS-coded exponents.
    #[serde(rename = "exp-rans")]
    ExpRans,
}

impl Encoding {
    /// The name used in metadata and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Raw => "raw",
            Encoding::ExpRans => "exp-rans",
        }
    }
}

/// Metadata of one logical tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorMeta {
    /// The tensor's name in the original checkpoint.
    pub name: String,
    /// Its original dtype, as safetensors spells it ("BF16", "F32", ...).
    pub dtype: String,
    /// Its original shape.
    pub shape: Vec<usize>,
    /// How it is stored.
    pub encoding: Encoding,
    /// Bytes of the original tensor.
    pub original_bytes: u64,
    /// `xxh3-64:<16 hex digits>` of the original tensor bytes, checked after decoding.
    pub checksum: String,
    /// Entropy of the exponent field in bits per value (BF16 tensors only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exponent_entropy_bits: Option<f64>,
    /// Order-0 entropy of the whole 16-bit values in bits per value (BF16 tensors, version 2
    /// and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_entropy_bits: Option<f64>,
    /// Parameters of an `exp-rans` tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rans: Option<RansMeta>,
}

/// Encoding parameters and stored-part checksum of an `exp-rans` tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RansMeta {
    /// Elements per chunk.
    pub chunk_elems: usize,
    /// Probability precision in bits.
    pub prob_bits: u32,
    /// Interleaved lanes per chunk (always 32).
    pub lanes: usize,
    /// Leading mantissa bits coded with the exponent: 0 or 3 (version 2; absent, meaning 0, in
    /// version 1).
    #[serde(default)]
    pub mantissa_bits: u32,
    /// `xxh3-64:<hex>` over the stored parts, in [`PARTS`] order, checked before decoding.
    pub parts_checksum: String,
}

/// The whole `unweight` metadata entry of one file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileMeta {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// The format version, [`FORMAT_VERSION`] when written by this build.
    pub version: u32,
    /// Every logical tensor of the file, in the order they are stored.
    pub tensors: Vec<TensorMeta>,
}

/// Formats a checksum the way metadata stores it.
pub fn checksum_string(hash: u64) -> String {
    format!("xxh3-64:{hash:016x}")
}

/// The checksum of a byte slice, as metadata stores it.
pub fn checksum_of(bytes: &[u8]) -> String {
    checksum_string(crate::codec::checksum::xxh3_64(bytes))
}

/// The checksum over several byte slices in order, as metadata stores it.
pub fn checksum_of_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = crate::codec::checksum::Xxh3::new();
    for p in parts {
        h.update(p);
    }
    checksum_string(h.digest())
}
