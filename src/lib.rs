//! Unweight: lossless BF16 weight compression for Llama models, a compressor CLI and (in later
//! layers) a Triton Inference Server backend that serves from the compressed weights.
//!
//! Dependencies point one way: [`codec`] (pure bit manipulation) ← [`container`] (safetensors
//! files and checkpoints) ← [`model`] ← the CLI in `src/main.rs`.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod cli;
pub mod codec;
pub mod container;
pub mod device;
pub mod engine;
pub mod gguf;
pub mod model;
