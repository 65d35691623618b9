//! The lossless BF16 codec: the exponent and the leading mantissa bits entropy-coded as one
//! symbol with chunked, 32-way interleaved rANS, the sign and the other mantissa bits stored raw
//! ([`model`] says which bits go where). Pure Rust, no I/O, no device code.
//!
//! `docs/format.md` is the normative description of the stored form; this module implements it.

pub mod ans;
pub mod bf16;
pub mod checksum;
pub mod freq;
pub mod model;
pub mod runtime;
pub mod simd;
pub mod tensor;

pub use tensor::{decode, decode_into, encode, EncodedTensor, EncodedView, Params, Parts};

/// What can go wrong encoding or decoding a tensor.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    /// The stored data is inconsistent with itself: corruption or a foreign file.
    #[error("corrupt encoded data: {0}")]
    Corrupt(String),
    /// The input cannot be encoded as asked.
    #[error("invalid input: {0}")]
    Invalid(String),
}
