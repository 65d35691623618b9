//! Llama models: architecture shapes, Hugging Face tensor names and `config.json`, and synthetic
//! checkpoints for benchmarks and tests at real scale.

pub mod shape;
pub mod synth;

pub use shape::LlamaShape;
