//! Synthetic Llama checkpoints: every linear weight drawn from N(0, σ) and rounded to BF16 (as a
//! freshly initialised Llama; σ = 0.02 is Llama's `initializer_range`), norm weights 1.0.
//!
//! Generation is deterministic for a seed whatever the thread count: each tensor is generated in
//! fixed pieces, each piece from its own RNG seeded by (seed, tensor index, piece index). Data is
//! streamed to disk piece by piece, so an 8B checkpoint needs no more memory than a few pieces.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use rand_xoshiro::Xoshiro256PlusPlus;
use rayon::prelude::*;
use safetensors::Dtype;

use super::LlamaShape;
use crate::container::{header_bytes, ContainerError, OutputDir};

/// Elements generated per RNG stream.
const PIECE: usize = 1 << 20;

/// Settings of a synthetic checkpoint.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// RNG seed.
    pub seed: u64,
    /// Standard deviation of the linear weights.
    pub sigma: f32,
    /// Largest shard in bytes; a model larger than this is written as shards plus an index, the
    /// way Hugging Face stores large checkpoints.
    pub shard_bytes: u64,
    /// Replace an existing non-empty output directory.
    pub force: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            sigma: 0.02,
            shard_bytes: 5_000_000_000,
            force: false,
        }
    }
}

/// Rounds an f32 to BF16 bits, round to nearest, ties to even (NaN stays NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Writes a synthetic checkpoint of `shape` into the new directory `out`.
pub fn synth_checkpoint(
    shape: &LlamaShape,
    out: &Path,
    opts: &SynthOptions,
) -> Result<PathBuf, ContainerError> {
    let dir = OutputDir::create(None, out, opts.force)?;
    let tensors = shape.tensors();
    // Group tensors into shards of at most shard_bytes (a tensor never straddles shards).
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, (_, s)) in tensors.iter().enumerate() {
        let bytes = 2 * s.iter().product::<usize>() as u64;
        if size > 0 && size + bytes > opts.shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().unwrap().push(i);
        size += bytes;
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (si, members) in shards.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", si + 1)
        };
        let path = dir.path().join(&fname);
        let mut layout = Vec::new();
        let mut off = 0usize;
        for &i in members {
            let (name, s) = &tensors[i];
            let b = 2 * s.iter().product::<usize>();
            layout.push((name.as_str(), Dtype::BF16, s.as_slice(), off, off + b));
            off += b;
            weight_map.insert(name.clone(), fname.clone().into());
        }
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let mut w = BufWriter::with_capacity(
            1 << 22,
            File::create(&path).map_err(|e| ContainerError::io(&path, e))?,
        );
        w.write_all(&header_bytes(&layout, &meta))
            .map_err(|e| ContainerError::io(&path, e))?;
        for &i in members {
            let s = &tensors[i].1;
            let numel: usize = s.iter().product();
            let is_norm = s.len() == 1;
            for start in (0..numel).step_by(PIECE * 8) {
                let end = (start + PIECE * 8).min(numel);
                let buf: Vec<u8> = (start..end)
                    .into_par_iter()
                    .step_by(PIECE)
                    .flat_map_iter(|p| {
                        let len = PIECE.min(end - p);
                        piece(opts, i, p / PIECE, len, is_norm)
                    })
                    .collect();
                w.write_all(&buf)
                    .map_err(|e| ContainerError::io(&path, e))?;
            }
        }
        w.into_inner()
            .map_err(|e| ContainerError::io(&path, e.into_error()))?
            .sync_all()
            .map_err(|e| ContainerError::io(&path, e))?;
    }
    let config = dir.path().join("config.json");
    fs::write(
        &config,
        serde_json::to_string_pretty(&shape.config_json()).unwrap() + "\n",
    )
    .map_err(|e| ContainerError::io(&config, e))?;
    let gen = dir.path().join("generation_config.json");
    let gen_json = serde_json::json!({"bos_token_id": shape.bos, "eos_token_id": shape.eos});
    fs::write(
        &gen,
        serde_json::to_string_pretty(&gen_json).unwrap() + "\n",
    )
    .map_err(|e| ContainerError::io(&gen, e))?;
    if n > 1 {
        let total: u64 = tensors
            .iter()
            .map(|(_, s)| 2 * s.iter().product::<usize>() as u64)
            .sum();
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.path().join("model.safetensors.index.json");
        fs::write(&path, serde_json::to_string_pretty(&index).unwrap() + "\n")
            .map_err(|e| ContainerError::io(&path, e))?;
    }
    dir.commit()
}

/// One piece of tensor `t` as little-endian BF16 bytes.
fn piece(opts: &SynthOptions, t: usize, p: usize, len: usize, is_norm: bool) -> Vec<u8> {
    if is_norm {
        return f32_to_bf16(1.0).to_le_bytes().repeat(len);
    }
    let seed = opts.seed
        ^ (t as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (p as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, opts.sigma).expect("sigma is positive and finite");
    let mut out = Vec::with_capacity(2 * len);
    for _ in 0..len {
        out.extend_from_slice(&f32_to_bf16(normal.sample(&mut rng)).to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is exactly halfway between 1.0 and the next BF16; ties go to even (1.0).
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        // Halfway above an odd mantissa rounds up to even.
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(f32_to_bf16(-0.0), 0x8000);
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
        assert!(f32_to_bf16(f32::NAN) & 0x7f != 0);
    }
}
