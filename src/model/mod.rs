//! Llama models: architecture shapes, Hugging Face tensor names and `config.json`, and synthetic
//! checkpoints for benchmarks and tests at real scale.

pub mod config;
pub mod fetch;
pub mod memory;
pub mod shape;
pub mod synth;
pub mod weights;

pub use config::LlamaConfig;
pub use shape::LlamaShape;
