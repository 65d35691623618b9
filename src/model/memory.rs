//! The memory planner behind `unweight plan-memory`: for a model (its dimensions, and optionally
//! its checkpoint) on a GPU of a given size, how much the weights take in BF16 and in our
//! compressed runtime form (`tbe3`), how many tokens of KV cache that leaves, and how many
//! sequences of a given length run at once. Pure arithmetic plus a sample encoding on the CPU;
//! docs/memory.md is the model it implements.

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use rand_xoshiro::Xoshiro256PlusPlus;

use super::synth::f32_to_bf16;
use super::{LlamaConfig, LlamaShape};
use crate::codec::runtime::{self, Shape};
use crate::container::Checkpoint;

/// Positions per KV block (as the paged caches use).
pub const BLOCK_TOKENS: usize = 16;

/// Bytes kept back on the device for the CUDA context, cuBLAS, graphs and fragmentation.
pub const DEVICE_RESERVE: u64 = 1 << 30;

/// Rows of a matrix the planner encodes at most, times its columns, per role: enough for a
/// stable ratio (thousands of tiles), little enough to plan a 70B model in seconds.
const SAMPLE_ELEMENTS: usize = 1 << 24;

/// The dimensions the plan needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Decoder layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// MLP intermediate size.
    pub intermediate: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// Whether `lm_head` is the embedding.
    pub tied: bool,
}

impl Dims {
    /// A preset's dimensions.
    pub fn of_shape(s: &LlamaShape) -> Self {
        Self {
            layers: s.layers,
            hidden: s.hidden,
            intermediate: s.intermediate,
            heads: s.heads,
            kv_heads: s.kv_heads,
            head_dim: s.head_dim(),
            vocab: s.vocab,
            tied: s.tie_embeddings,
        }
    }

    /// A checkpoint's dimensions (from its config.json).
    pub fn of_config(c: &LlamaConfig) -> Self {
        Self {
            layers: c.num_hidden_layers,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            vocab: c.vocab_size,
            tied: c.tie_word_embeddings,
        }
    }

    /// The matrices, one entry per role: (tensor name in layer 0 or the model, rows, cols,
    /// how many the model has).
    pub fn matrices(&self) -> Vec<(&'static str, usize, usize, usize)> {
        let (h, im, l) = (self.hidden, self.intermediate, self.layers);
        let (qd, kvd) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let mut m = vec![
            ("model.embed_tokens.weight", self.vocab, h, 1),
            ("model.layers.0.self_attn.q_proj.weight", qd, h, l),
            ("model.layers.0.self_attn.k_proj.weight", kvd, h, l),
            ("model.layers.0.self_attn.v_proj.weight", kvd, h, l),
            ("model.layers.0.self_attn.o_proj.weight", h, qd, l),
            ("model.layers.0.mlp.gate_proj.weight", im, h, l),
            ("model.layers.0.mlp.up_proj.weight", im, h, l),
            ("model.layers.0.mlp.down_proj.weight", h, im, l),
        ];
        if !self.tied {
            m.push(("lm_head.weight", self.vocab, h, 1));
        }
        m
    }

    /// Elements of the norm vectors (two per layer and the final one), kept uncompressed.
    pub fn norm_elements(&self) -> u64 {
        (self.hidden * (2 * self.layers + 1)) as u64
    }

    /// Parameters.
    pub fn parameters(&self) -> u64 {
        let m: u64 = self
            .matrices()
            .iter()
            .map(|&(_, r, c, n)| (r * c * n) as u64)
            .sum();
        m + self.norm_elements()
    }

    /// KV-cache bytes per token with BF16 keys and values: 2 × layers × kv_heads × head_dim × 2.
    pub fn kv_bytes_per_token(&self) -> u64 {
        (2 * self.layers * self.kv_heads * self.head_dim * 2) as u64
    }
}

/// Weight bytes on the device, BF16 and compressed, and how the compressed figure was found.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightBytes {
    /// Every parameter in BF16.
    pub bf16: u64,
    /// Every matrix in the `tbe3` runtime form, norms in BF16.
    pub compressed: u64,
    /// Where the compressed figure comes from.
    pub source: String,
}

/// Runtime-form bytes of a `rows × cols` matrix from an encoded sample of its first rows.
fn tbe3_bytes(sample: &[u16], rows: usize, cols: usize) -> Result<u64, String> {
    let sample_rows = sample.len() / cols;
    let enc = runtime::encode(
        sample,
        Shape::for_matrix(sample_rows, cols).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let per_row = enc.stats().bytes as f64 / sample_rows as f64;
    Ok((per_row * rows as f64).ceil() as u64)
}

fn sample_rows(rows: usize, cols: usize) -> usize {
    (SAMPLE_ELEMENTS / cols.max(1)).clamp(1, rows)
}

/// Weight bytes of a shape without weights: each role's ratio measured by encoding a sample of
/// N(0, `sigma`) BF16 rows (the synthetic weights `synth` and the GPU benchmarks use) in the
/// runtime form, applied to every matrix of that role.
pub fn weight_bytes_synthetic(d: &Dims, sigma: f32, seed: u64) -> Result<WeightBytes, String> {
    let normal = Normal::new(0.0f32, sigma).map_err(|e| e.to_string())?;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut compressed = 2 * d.norm_elements();
    for (_, rows, cols, n) in d.matrices() {
        let k = sample_rows(rows, cols);
        let sample: Vec<u16> = (0..k * cols)
            .map(|_| f32_to_bf16(normal.sample(&mut rng)))
            .collect();
        compressed += n as u64 * tbe3_bytes(&sample, rows, cols)?;
    }
    Ok(WeightBytes {
        bf16: 2 * d.parameters(),
        compressed,
        source: format!(
            "tbe3 encoding of up to {SAMPLE_ELEMENTS} synthetic N(0, {sigma}) BF16 weights per role, \
             scaled to every matrix of the role"
        ),
    })
}

/// Weight bytes of a checkpoint: each role's ratio measured by encoding the first rows of its
/// layer-0 matrix (and of the embedding and `lm_head`) in the runtime form, applied to every
/// matrix of that role.
pub fn weight_bytes_of_checkpoint(ckpt: &Checkpoint, d: &Dims) -> Result<WeightBytes, String> {
    let mut compressed = 2 * d.norm_elements();
    for (name, rows, cols, n) in d.matrices() {
        let bytes = ckpt.load(name).map_err(|e| format!("{name}: {e}"))?;
        if bytes.len() != 2 * rows * cols {
            return Err(format!(
                "{name}: {} bytes, but config.json implies {rows} x {cols} BF16",
                bytes.len()
            ));
        }
        let k = sample_rows(rows, cols);
        let sample: Vec<u16> = bytes[..2 * k * cols]
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        compressed += n as u64 * tbe3_bytes(&sample, rows, cols)?;
    }
    Ok(WeightBytes {
        bf16: 2 * d.parameters(),
        compressed,
        source: format!(
            "tbe3 encoding of the first {SAMPLE_ELEMENTS} weights (at most) of each role's layer-0 \
             matrix in {}, scaled to every matrix of the role",
            ckpt.dir().display()
        ),
    })
}

/// The device and the serving limits a plan is made for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Target {
    /// Device memory, bytes.
    pub gpu_bytes: u64,
    /// Tokens per sequence the plan counts sequences of.
    pub context: usize,
    /// Fraction of the memory left after weights, work buffers and the reserve given to the KV
    /// cache (as vLLM's `gpu_memory_utilization`, applied to what is left).
    pub kv_fraction: f64,
}

/// One weight form's plan.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Fit {
    /// Weight bytes on the device.
    pub weights_bytes: u64,
    /// Work buffers and the device reserve.
    pub workspace_bytes: u64,
    /// Bytes given to the KV cache.
    pub kv_bytes: u64,
    /// Tokens the KV cache holds (whole blocks).
    pub kv_tokens: u64,
    /// Sequences of the full context that fit at once.
    pub sequences: u64,
    /// Whether the model runs at all: weights and workspace fit and one sequence of the full
    /// context has room.
    pub fits: bool,
}

/// Plans one weight form: `weights_bytes` of weights and `work_bytes` of the engine's work
/// buffers (the CUDA backend's `WorkBuffers` for this form's plan) on the device, plus
/// [`DEVICE_RESERVE`]; the KV cache gets its fraction of the rest.
pub fn fit(d: &Dims, weights_bytes: u64, work_bytes: u64, t: &Target) -> Fit {
    let workspace_bytes = work_bytes + DEVICE_RESERVE;
    let left = t.gpu_bytes.saturating_sub(weights_bytes + workspace_bytes);
    let kv_bytes = (left as f64 * t.kv_fraction.clamp(0.0, 1.0)) as u64;
    let block = d.kv_bytes_per_token() * BLOCK_TOKENS as u64;
    let kv_tokens = kv_bytes / block.max(1) * BLOCK_TOKENS as u64;
    let per_sequence = (t.context as u64).div_ceil(BLOCK_TOKENS as u64) * BLOCK_TOKENS as u64;
    let sequences = kv_tokens / per_sequence.max(1);
    Fit {
        weights_bytes,
        workspace_bytes,
        kv_bytes,
        kv_tokens,
        sequences,
        fits: weights_bytes + workspace_bytes <= t.gpu_bytes && sequences >= 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_count_the_presets_parameters_and_kv_bytes() {
        for name in LlamaShape::PRESETS {
            let s = LlamaShape::preset(name).unwrap();
            assert_eq!(
                Dims::of_shape(&s).parameters(),
                s.parameters() as u64,
                "{name}"
            );
        }
        let d = Dims::of_shape(&LlamaShape::preset("llama-3.1-70b").unwrap());
        // 2 × 80 layers × 8 KV heads × 128 × 2 bytes.
        assert_eq!(d.kv_bytes_per_token(), 327_680);
        let d8 = Dims::of_shape(&LlamaShape::preset("llama-3.1-8b").unwrap());
        assert_eq!(d8.kv_bytes_per_token(), 131_072);
    }

    #[test]
    fn kv_follows_what_the_weights_leave() {
        let d = Dims::of_shape(&LlamaShape::preset("llama-3.1-8b").unwrap());
        let t = Target {
            gpu_bytes: 80 << 30,
            context: 8192,
            kv_fraction: 0.9,
        };
        let small = fit(&d, 10 << 30, 300 << 20, &t);
        let big = fit(&d, 16 << 30, 200 << 20, &t);
        assert_eq!(small.workspace_bytes, (300 << 20) + DEVICE_RESERVE);
        assert!(small.fits && big.fits);
        let left = (80u64 << 30) - (10 << 30) - small.workspace_bytes;
        assert_eq!(small.kv_bytes, (left as f64 * 0.9) as u64);
        assert_eq!(small.kv_tokens % BLOCK_TOKENS as u64, 0);
        assert!(small.kv_tokens * d.kv_bytes_per_token() <= small.kv_bytes);
        assert_eq!(small.sequences, small.kv_tokens / 8192);
        assert!(small.kv_tokens > big.kv_tokens);
        // Weights larger than the device: does not fit, no KV.
        let none = fit(&d, 90 << 30, 200 << 20, &t);
        assert!(!none.fits);
        assert_eq!((none.kv_tokens, none.sequences), (0, 0));
    }

    #[test]
    fn synthetic_weights_compress_to_about_seventy_percent() {
        // The tiny preset is fast to encode; N(0, 0.02) BF16 in tbe3 costs ~11.2 bits a weight.
        let d = Dims::of_shape(&LlamaShape::preset("tiny").unwrap());
        let w = weight_bytes_synthetic(&d, 0.02, 7).unwrap();
        let ratio = w.compressed as f64 / w.bf16 as f64;
        assert!((0.6..0.8).contains(&ratio), "{ratio}");
    }
}
