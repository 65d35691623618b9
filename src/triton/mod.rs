//! The Triton Inference Server backend: the C ABI that `tritonserver` loads from
//! `libtriton_unweight.so`.
//!
//! What lives here, and only here: the bindgen declarations of Triton's C API ([`sys`], private),
//! the `TRITONBACKEND_*` entry points (`exports`), the per-model and per-instance state behind
//! Triton's opaque pointers (`state`), the model configuration ([`config`]) and the error
//! mapping ([`error`]). No Triton type leaves this module: the engine and everything below it
//! never see a `TRITON*` handle. All `unsafe` of this layer is here, each block with a
//! `// SAFETY:` line (enforced by clippy's `undocumented_unsafe_blocks`).
//!
//! Status: loading, configuration and the lifecycle work; `TRITONBACKEND_ModelInstanceExecute`
//! answers UNSUPPORTED until the engine thread lands (docs/triton.md).

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod config;
pub mod error;
mod exports;
mod log;
#[cfg(test)]
mod mock;
mod state;
mod sys;

pub use config::{DeviceChoice, InstanceGroup, InstanceKind, ModelConfig};
pub use error::{ErrorKind, TritonError};
