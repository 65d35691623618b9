//! The compressed container: Hugging Face style checkpoint directories whose safetensors files
//! hold compressed tensors as a few U8 parts plus JSON metadata (see `docs/format.md`).
//!
//! This layer owns files: finding the shards of a checkpoint, reading safetensors headers over a
//! memory map, writing safetensors files in a streaming way, and the whole-directory operations
//! the CLI exposes (compress, decompress, verify, inspect). It knows nothing of Llama beyond
//! tensor names and nothing of devices.
//!
//! Invariants: every tensor read through [`Checkpoint::load`] has had its checksum verified, and
//! an output directory only appears under its final name once every byte of it is written.

mod checkpoint;
mod compress;
mod decompress;
mod error;
mod inspect;
pub mod meta;
mod prefetch;
mod reader;
mod verify;
mod writer;

pub use checkpoint::{Checkpoint, TensorEntry};
pub use compress::{compress_dir, CompressOptions, CompressReport};
pub use decompress::decompress_dir;
pub use error::ContainerError;
pub use inspect::{inspect_dir, InspectReport, InspectRow};
pub use meta::{Encoding, TensorMeta, FORMAT_VERSION};
pub use prefetch::READ_AHEAD_BYTES;
pub use reader::SafetensorsFile;
pub use verify::{verify_dirs, Mismatch, VerifyReport};
pub use writer::{header_bytes, header_reserve, OutputDir, SafetensorsWriter};
