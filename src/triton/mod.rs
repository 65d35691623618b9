//! The Triton Inference Server backend: the C ABI that `tritonserver` loads from
//! `libtriton_unweight.so`.
//!
//! What lives here, and only here: the bindgen declarations of Triton's C API (`sys`, private),
//! the `TRITONBACKEND_*` entry points (`exports`), the per-model and per-instance state behind
//! Triton's opaque pointers (`state`), the model configuration ([`config`]), the backend
//! configuration ([`backend_config`]), the request contract ([`inputs`]), the FFI side of a
//! request's life (`request`), the loaded model (`served`), the engine thread of an instance
//! (`worker`), the names of the backend's threads (`threads`), the log bridge (`log`), the custom
//! metrics (`metrics`) and the error mapping ([`error`]). No Triton type leaves this module: the engine and everything below
//! it never see a `TRITON*` handle. All `unsafe`
//! of this layer is here, each block with a `// SAFETY:` line (enforced by clippy's
//! `undocumented_unsafe_blocks`). docs/triton.md describes the whole.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backend_config;
pub mod config;
pub mod error;
mod exports;
pub mod inputs;
mod log;
mod metrics;
#[cfg(test)]
mod mock;
mod request;
mod served;
mod state;
mod sys;
mod threads;
mod worker;

pub use config::{DeviceChoice, InstanceGroup, InstanceKind, ModelConfig};
pub use error::{ErrorKind, TritonError};
