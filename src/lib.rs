//! Unweight: lossless BF16 weight compression for Llama models, a compressor CLI and (in later
//! layers) a Triton Inference Server backend that serves from the compressed weights.
//!
//! Dependencies point one way: [`codec`] (pure bit manipulation) ← [`container`] (safetensors
//! files and checkpoints) ← [`model`] ← [`device`] ← [`engine`] ← the CLI in `src/main.rs` and
//! the Triton backend in [`triton`] (the C ABI that `libtriton_unweight.so` exports).

#![deny(unsafe_op_in_unsafe_fn)]

pub mod cli;
pub mod codec;
pub mod container;
pub mod device;
pub mod engine;
pub mod gguf;
pub mod model;
pub mod triton;
